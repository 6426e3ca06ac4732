//! Journal records and journal blocks (whole, or compact in format 3).

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// Logical block `logical` of `slot` now lives at `phys` with `crc`.
    /// With `in_journal`, the data was written in the data block of this
    /// record's journal block and moved to `phys` afterwards: a replay
    /// copies it there if the move did not reach the disk.
    Write {
        slot: u32,
        logical: u16,
        phys: u16,
        crc: u32,
        version: u64,
        in_journal: bool,
    },
    /// Logical block zeroed (write-zeroes or discard).
    Zero {
        slot: u32,
        logical: u16,
        version: u64,
    },
    /// Slot now holds `owner`.
    Alloc { slot: u32, owner: SlotOwner },
    /// Slot released by a discard (`version`: the highest version the
    /// slot held, 0 for a release; older binaries wrote 0 here).
    Free { slot: u32, version: u64 },
    /// The shard's discard floor rose to `version`: a whole-chunk discard
    /// or write-zeroes of a chunk with no slot was acknowledged at a
    /// version at or below it (see `Shard::restart_floor`). Names no slot;
    /// an older binary skips it as an unknown record.
    Floor { version: u64 },
    /// Logical blocks `first..first + count` of `slot` forgotten: never
    /// written, version 0 (`EngineOp::Forget`). Replayed in journal order,
    /// so a later record of those blocks applies at any version. An older
    /// binary skips it as an unknown record (and keeps the blocks).
    Forget { slot: u32, first: u16, count: u16 },
}

pub const JOURNAL_HEADER_BYTES: usize = 64;
pub const RECORD_BYTES: usize = 48;
pub const RECORDS_PER_JOURNAL_BLOCK: usize = (BLOCK_SIZE - JOURNAL_HEADER_BYTES) / RECORD_BYTES;
/// Bytes of a compact record block (format 3) that hold its header and
/// records, and where its data begins.
pub const JOURNAL_COMPACT_BYTES: usize = 512;
/// Records a compact block holds.
pub const RECORDS_PER_COMPACT_BLOCK: usize =
    (JOURNAL_COMPACT_BYTES - JOURNAL_HEADER_BYTES) / RECORD_BYTES;
// Journal block header: magic(8) crc(4) count(4) uuid(8) shard(4)
// sealed length(4: 0 for a whole block, JOURNAL_COMPACT_BYTES for a compact
// one) seq(8) acked_through(8)
pub(super) const JOURNAL_CRC: usize = 8;
pub(super) const JOURNAL_SEALED_LEN: usize = 28;

#[inline]
pub fn encode_record(r: &Record, b: &mut [u8]) {
    b[..RECORD_BYTES].fill(0);
    match *r {
        Record::Write {
            slot,
            logical,
            phys,
            crc,
            version,
            in_journal,
        } => {
            b[0] = 1;
            b[1] = in_journal as u8;
            put_u32(b, 4, slot);
            put_u16(b, 8, logical);
            put_u16(b, 10, phys);
            put_u32(b, 12, crc);
            put_u64(b, 16, version);
        }
        Record::Zero {
            slot,
            logical,
            version,
        } => {
            b[0] = 2;
            put_u32(b, 4, slot);
            put_u16(b, 8, logical);
            put_u64(b, 16, version);
        }
        Record::Alloc { slot, owner } => {
            b[0] = 3;
            put_u32(b, 4, slot);
            put_u64(b, 24, owner.volume);
            put_u64(b, 32, owner.chunk);
            put_u64(b, 40, owner.epoch);
        }
        Record::Free { slot, version } => {
            b[0] = 4;
            put_u32(b, 4, slot);
            put_u64(b, 16, version);
        }
        Record::Floor { version } => {
            b[0] = 5;
            put_u64(b, 16, version);
        }
        Record::Forget { slot, first, count } => {
            b[0] = 6;
            put_u32(b, 4, slot);
            put_u16(b, 8, first);
            put_u16(b, 10, count);
        }
    }
}

pub fn decode_record(b: &[u8]) -> Option<Record> {
    let slot = get_u32(b, 4);
    Some(match b[0] {
        1 => Record::Write {
            slot,
            logical: get_u16(b, 8),
            phys: get_u16(b, 10),
            crc: get_u32(b, 12),
            version: get_u64(b, 16),
            in_journal: b[1] != 0,
        },
        2 => Record::Zero {
            slot,
            logical: get_u16(b, 8),
            version: get_u64(b, 16),
        },
        3 => Record::Alloc {
            slot,
            owner: SlotOwner {
                volume: get_u64(b, 24),
                chunk: get_u64(b, 32),
                epoch: get_u64(b, 40),
            },
        },
        4 => Record::Free {
            slot,
            version: get_u64(b, 16),
        },
        5 => Record::Floor {
            version: get_u64(b, 16),
        },
        6 => Record::Forget {
            slot,
            first: get_u16(b, 8),
            count: get_u16(b, 10),
        },
        _ => return None,
    })
}

/// Fills the header of a journal block whose records are already in place.
/// `compact`: seal only its first [`JOURNAL_COMPACT_BYTES`] (the data of a
/// small write follows them; format 3 only, at most
/// [`RECORDS_PER_COMPACT_BLOCK`] records).
pub fn seal_journal_block(
    uuid: u64,
    shard: u32,
    seq: u64,
    acked_through: u64,
    count: usize,
    compact: bool,
    b: &mut [u8],
) {
    let len = if compact {
        debug_assert!(count <= RECORDS_PER_COMPACT_BLOCK);
        JOURNAL_COMPACT_BYTES
    } else {
        BLOCK_SIZE
    };
    b[0..8].copy_from_slice(JOURNAL_MAGIC);
    put_u32(b, 12, count as u32);
    put_u64(b, 16, uuid);
    put_u32(b, 24, shard);
    put_u32(b, JOURNAL_SEALED_LEN, if compact { len as u32 } else { 0 });
    put_u64(b, 32, seq);
    put_u64(b, 40, acked_through);
    b[48..JOURNAL_HEADER_BYTES].fill(0);
    b[JOURNAL_HEADER_BYTES + count * RECORD_BYTES..len].fill(0);
    seal(&mut b[..len], JOURNAL_CRC);
}

pub struct JournalBlockHeader {
    pub seq: u64,
    pub acked_through: u64,
    pub count: usize,
    /// A compact block: its data (if a record says so) is at byte
    /// [`JOURNAL_COMPACT_BYTES`] of the block, not in the next block.
    pub compact: bool,
}

/// The header of a valid journal block of this disk and shard. A compact
/// block is accepted only where `compact_allowed` (format 3): an older
/// format never wrote one, and must not take a stray pattern for one.
pub fn decode_journal_block(
    uuid: u64,
    shard: u32,
    compact_allowed: bool,
    b: &[u8],
) -> Option<JournalBlockHeader> {
    // The sealed length is read before the crc is checked: a damaged one
    // makes the crc fail over the length it names, or names none.
    let (len, max) = match get_u32(b, JOURNAL_SEALED_LEN) {
        0 => (BLOCK_SIZE, RECORDS_PER_JOURNAL_BLOCK),
        n if compact_allowed && n as usize == JOURNAL_COMPACT_BYTES => {
            (JOURNAL_COMPACT_BYTES, RECORDS_PER_COMPACT_BLOCK)
        }
        _ => return None,
    };
    if !sealed_ok(&b[..len], JOURNAL_MAGIC, JOURNAL_CRC)
        || get_u64(b, 16) != uuid
        || get_u32(b, 24) != shard
    {
        return None;
    }
    let count = get_u32(b, 12) as usize;
    if count > max {
        return None;
    }
    Some(JournalBlockHeader {
        seq: get_u64(b, 32),
        acked_through: get_u64(b, 40),
        count,
        compact: len == JOURNAL_COMPACT_BYTES,
    })
}

pub fn journal_record(b: &[u8], i: usize) -> &[u8] {
    let at = JOURNAL_HEADER_BYTES + i * RECORD_BYTES;
    &b[at..at + RECORD_BYTES]
}
