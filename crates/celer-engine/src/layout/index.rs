//! The per-shard slot index (two copies, A/B by generation).

use super::*;

pub const INDEX_HEADER_BYTES: usize = 64;
pub const INDEX_ENTRY_BYTES: usize = 40;
// Index header: magic(8) crc(4) count(4) uuid(8) shard(4) pad(4) generation(8) journal_tail(8)
// discard_floor(8: 0 in indexes older binaries wrote) pad(8)
// Entry: state(1) pad(7) volume(8) chunk(8) epoch(8) alloc_seq(8)
const INDEX_CRC: usize = 8;

pub struct IndexHeader {
    pub generation: u64,
    /// Replay the journal from this sequence number on.
    pub journal_tail: u64,
    /// The shard's discard floor when the index was cut (see
    /// `Record::Floor`).
    pub discard_floor: u64,
}

pub fn encode_index(
    uuid: u64,
    shard: u32,
    h: &IndexHeader,
    entries: &[Option<(u64, SlotOwner)>],
    b: &mut [u8],
) {
    b.fill(0);
    b[0..8].copy_from_slice(INDEX_MAGIC);
    put_u32(b, 12, entries.len() as u32);
    put_u64(b, 16, uuid);
    put_u32(b, 24, shard);
    put_u64(b, 32, h.generation);
    put_u64(b, 40, h.journal_tail);
    put_u64(b, 48, h.discard_floor);
    for (i, e) in entries.iter().enumerate() {
        let at = INDEX_HEADER_BYTES + i * INDEX_ENTRY_BYTES;
        if let Some((seq, o)) = e {
            b[at] = 1;
            put_u64(b, at + 8, o.volume);
            put_u64(b, at + 16, o.chunk);
            put_u64(b, at + 24, o.epoch);
            put_u64(b, at + 32, *seq);
        }
    }
    seal(b, INDEX_CRC);
}

pub fn decode_index(
    uuid: u64,
    shard: u32,
    b: &[u8],
    out: &mut [Option<(u64, SlotOwner)>],
) -> Option<IndexHeader> {
    if !sealed_ok(b, INDEX_MAGIC, INDEX_CRC)
        || get_u64(b, 16) != uuid
        || get_u32(b, 24) != shard
        || get_u32(b, 12) as usize != out.len()
    {
        return None;
    }
    for (i, e) in out.iter_mut().enumerate() {
        let at = INDEX_HEADER_BYTES + i * INDEX_ENTRY_BYTES;
        *e = match b[at] {
            0 => None,
            1 => Some((
                get_u64(b, at + 32),
                SlotOwner {
                    volume: get_u64(b, at + 8),
                    chunk: get_u64(b, at + 16),
                    epoch: get_u64(b, at + 24),
                },
            )),
            _ => return None,
        };
    }
    Some(IndexHeader {
        generation: get_u64(b, 32),
        journal_tail: get_u64(b, 40),
        discard_floor: get_u64(b, 48),
    })
}
