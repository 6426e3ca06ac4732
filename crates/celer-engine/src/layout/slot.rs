//! A chunk slot's self-describing parts: its header copies and its block maps.

use super::*;

/// What a slot holds, as its header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotOwner {
    pub volume: u64,
    pub chunk: u64,
    pub epoch: u64,
}

// Slot header: magic(8) crc(4) state(4) uuid(8) slot(8) volume(8) chunk(8) epoch(8) seq(8)
// `seq` is the journal sequence of the Alloc/Free record that wrote it: of
// two valid copies the higher one wins, and map copies older than it are stale.
const SLOT_CRC: usize = 8;

pub fn encode_slot_header(uuid: u64, slot: u64, seq: u64, owner: Option<SlotOwner>, b: &mut [u8]) {
    b.fill(0);
    b[0..8].copy_from_slice(SLOT_MAGIC);
    put_u32(b, 12, owner.is_some() as u32);
    put_u64(b, 16, uuid);
    put_u64(b, 24, slot);
    put_u64(b, 56, seq);
    if let Some(o) = owner {
        put_u64(b, 32, o.volume);
        put_u64(b, 40, o.chunk);
        put_u64(b, 48, o.epoch);
    }
    seal(&mut b[..BLOCK_SIZE], SLOT_CRC);
}

/// `Some((seq, Some(owner)))`: allocated; `Some((seq, None))`: explicitly free;
/// `None`: not a valid header of this slot on this disk.
pub fn decode_slot_header(uuid: u64, slot: u64, b: &[u8]) -> Option<(u64, Option<SlotOwner>)> {
    if !sealed_ok(&b[..BLOCK_SIZE], SLOT_MAGIC, SLOT_CRC)
        || get_u64(b, 16) != uuid
        || get_u64(b, 24) != slot
    {
        return None;
    }
    let seq = get_u64(b, 56);
    if get_u32(b, 12) == 0 {
        return Some((seq, None));
    }
    Some((
        seq,
        Some(SlotOwner {
            volume: get_u64(b, 32),
            chunk: get_u64(b, 40),
            epoch: get_u64(b, 48),
        }),
    ))
}

/// One logical block's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockEntry {
    pub phys: u16,
    pub kind: BlockKind,
    pub crc: u32,
    pub version: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// Never written: reads as zeroes, version 0.
    Unwritten = 0,
    Data = 1,
    /// Zeroed or discarded at `version`; no physical block.
    Zero = 2,
}

impl BlockEntry {
    pub const UNWRITTEN: BlockEntry = BlockEntry {
        phys: PHYS_NONE,
        kind: BlockKind::Unwritten,
        crc: 0,
        version: 0,
    };
    pub fn zeroed(version: u64) -> BlockEntry {
        BlockEntry {
            phys: PHYS_NONE,
            kind: BlockKind::Zero,
            crc: 0,
            version,
        }
    }
}

pub const MAP_HEADER_BYTES: usize = 64;
/// phys(2) kind(1) crc(4) version(8), packed: a 256-block chunk's map fits one block.
pub const MAP_ENTRY_BYTES: usize = 15;
// Map header: magic(8) crc(4) count(4) uuid(8) slot(8) generation(8) journal_seq(8) volume(8) chunk(8)
const MAP_CRC: usize = 8;

pub struct MapHeader {
    pub generation: u64,
    /// Every journal record with seq <= this is reflected in the map.
    pub journal_seq: u64,
    pub volume: u64,
    pub chunk: u64,
}

pub fn encode_map(uuid: u64, slot: u64, h: &MapHeader, entries: &[BlockEntry], b: &mut [u8]) {
    b.fill(0);
    b[0..8].copy_from_slice(MAP_MAGIC);
    put_u32(b, 12, entries.len() as u32);
    put_u64(b, 16, uuid);
    put_u64(b, 24, slot);
    put_u64(b, 32, h.generation);
    put_u64(b, 40, h.journal_seq);
    put_u64(b, 48, h.volume);
    put_u64(b, 56, h.chunk);
    for (i, e) in entries.iter().enumerate() {
        let at = MAP_HEADER_BYTES + i * MAP_ENTRY_BYTES;
        put_u16(b, at, e.phys);
        b[at + 2] = e.kind as u8;
        put_u32(b, at + 3, e.crc);
        put_u64(b, at + 7, e.version);
    }
    seal(b, MAP_CRC);
}

pub fn decode_map(
    uuid: u64,
    slot: u64,
    chunk_blocks: u32,
    b: &[u8],
    out: &mut [BlockEntry],
) -> Option<MapHeader> {
    if !sealed_ok(b, MAP_MAGIC, MAP_CRC)
        || get_u64(b, 16) != uuid
        || get_u64(b, 24) != slot
        || get_u32(b, 12) != chunk_blocks
    {
        return None;
    }
    for (i, e) in out.iter_mut().enumerate().take(chunk_blocks as usize) {
        let at = MAP_HEADER_BYTES + i * MAP_ENTRY_BYTES;
        let kind = match b[at + 2] {
            0 => BlockKind::Unwritten,
            1 => BlockKind::Data,
            2 => BlockKind::Zero,
            _ => return None,
        };
        *e = BlockEntry {
            phys: get_u16(b, at),
            kind,
            crc: get_u32(b, at + 3),
            version: get_u64(b, at + 7),
        };
    }
    Some(MapHeader {
        generation: get_u64(b, 32),
        journal_seq: get_u64(b, 40),
        volume: get_u64(b, 48),
        chunk: get_u64(b, 56),
    })
}
