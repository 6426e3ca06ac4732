//! On-disk format. Everything is in 4 KiB blocks, little-endian, and every
//! structure carries a magic, the disk's uuid and a crc32c so that a torn,
//! foreign or stale block is recognised and ignored, never trusted.
//!
//! ```text
//! block 0, 1      superblock, two copies
//! journal         shard_count rings of journal_blocks each; in format 2
//!                 each sequence number takes two blocks: its record block,
//!                 then a data block (a small write's data, written with it)
//! index           per shard, two copies (A/B by generation) of the slot index
//! slots           slot_count chunk slots, each:
//!                   header A | map copy 0 | map copy 1 | phys data blocks | header B
//! ```
//!
//! A chunk slot is self-describing: its header (two copies) names the volume,
//! chunk and epoch it holds, and its map copies give, for every logical block,
//! the physical block, version and crc32c. The index and journal only speed up
//! start-up and make recent changes durable; `rebuild` needs the slots alone
//! plus whatever journal survives.

use crate::EngineError;

pub const BLOCK_SIZE: usize = 4096;
pub const BLOCK_SIZE_U64: u64 = BLOCK_SIZE as u64;
/// The format `format` writes. Version 2 pairs each journal block with a
/// data block (`Geometry::journal_data`); version 3 may write a small
/// write's record and data as one 4.5 KiB entry (`Geometry::compact_journal`);
/// version 1 and 2 disks are still opened, and written as before.
pub const FORMAT_VERSION: u32 = 3;
/// The oldest format still opened.
pub const FORMAT_VERSION_MIN: u32 = 1;

const SUPERBLOCK_MAGIC: &[u8; 8] = b"CELERENG";
const SLOT_MAGIC: &[u8; 8] = b"CELSLOT1";
const MAP_MAGIC: &[u8; 8] = b"CELMAP01";
const JOURNAL_MAGIC: &[u8; 8] = b"CELJRNL1";
const INDEX_MAGIC: &[u8; 8] = b"CELINDX1";

/// No physical block assigned.
pub const PHYS_NONE: u16 = u16::MAX;

pub fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
pub fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
pub fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// crc32c of `b` with the 4 bytes at `crc_at` taken as zero.
fn crc_with_hole(b: &[u8], crc_at: usize) -> u32 {
    let c = crc32c::crc32c(&b[..crc_at]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &b[crc_at + 4..])
}

fn seal(b: &mut [u8], crc_at: usize) {
    put_u32(b, crc_at, 0);
    let c = crc_with_hole(b, crc_at);
    put_u32(b, crc_at, c);
}

fn sealed_ok(b: &[u8], magic: &[u8; 8], crc_at: usize) -> bool {
    &b[0..8] == magic && crc_with_hole(b, crc_at) == get_u32(b, crc_at)
}

/// Geometry chosen at format time; everything else is derived from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub disk_uuid: u64,
    /// Logical blocks per chunk (power of two).
    pub chunk_blocks: u32,
    /// Extra physical blocks per slot used for redirect-on-write.
    pub spare_blocks: u32,
    pub shard_count: u32,
    /// Journal ring length per shard, in blocks.
    pub journal_blocks: u32,
    pub slot_count: u64,
    /// Format 2: journal sequence number `s` owns two consecutive ring
    /// blocks, its record block and a data block. A small write alone in
    /// its shard puts its data there, written with its record as one
    /// device write, and moves it to its slot afterwards. A replay reads
    /// only record blocks, so a data block is never taken for a journal
    /// block, whatever a guest wrote in it.
    pub journal_data: bool,
    /// Format 3: a record block with a small write's data may be
    /// *compact*: journal header and records in its first
    /// [`JOURNAL_COMPACT_BYTES`], sealed over those, and the data right
    /// after them, so record and data are one 4.5 KiB write instead of
    /// 8 KiB. Other blocks are whole (sealed over 4 KiB) as in format 2.
    pub compact_journal: bool,
}

impl Geometry {
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_blocks as u64 * BLOCK_SIZE_U64
    }
    pub fn phys_blocks(&self) -> u32 {
        self.chunk_blocks + self.spare_blocks
    }
    /// Blocks of one map copy: a 64-byte header then 15 bytes per logical block.
    pub fn map_blocks(&self) -> u64 {
        (MAP_HEADER_BYTES + MAP_ENTRY_BYTES * self.chunk_blocks as usize).div_ceil(BLOCK_SIZE)
            as u64
    }
    pub fn slot_blocks(&self) -> u64 {
        2 + 2 * self.map_blocks() + self.phys_blocks() as u64
    }
    pub fn journal_start(&self) -> u64 {
        2
    }
    /// Journal sequence numbers a shard's ring holds at once.
    pub fn journal_seqs(&self) -> u64 {
        if self.journal_data {
            self.journal_blocks as u64 / 2
        } else {
            self.journal_blocks as u64
        }
    }
    /// Position in its shard's ring of the record block of `seq`.
    pub fn journal_position(&self, seq: u64) -> u64 {
        let at = seq % self.journal_seqs();
        if self.journal_data {
            2 * at
        } else {
            at
        }
    }
    pub fn journal_block_offset(&self, shard: u32, seq: u64) -> u64 {
        (self.journal_start()
            + shard as u64 * self.journal_blocks as u64
            + self.journal_position(seq))
            * BLOCK_SIZE_U64
    }
    pub fn slots_per_shard(&self) -> u64 {
        self.slot_count.div_ceil(self.shard_count as u64)
    }
    /// Blocks of one copy of one shard's slot index.
    pub fn index_blocks(&self) -> u64 {
        (INDEX_HEADER_BYTES + INDEX_ENTRY_BYTES * self.slots_per_shard() as usize)
            .div_ceil(BLOCK_SIZE) as u64
    }
    pub fn index_start(&self) -> u64 {
        self.journal_start() + self.shard_count as u64 * self.journal_blocks as u64
    }
    pub fn index_offset(&self, shard: u32, copy: u64) -> u64 {
        (self.index_start() + (shard as u64 * 2 + copy) * self.index_blocks()) * BLOCK_SIZE_U64
    }
    pub fn slots_start(&self) -> u64 {
        self.index_start() + self.shard_count as u64 * 2 * self.index_blocks()
    }
    pub fn slot_offset(&self, slot: u64) -> u64 {
        (self.slots_start() + slot * self.slot_blocks()) * BLOCK_SIZE_U64
    }
    pub fn header_offset(&self, slot: u64, copy: u64) -> u64 {
        let base = self.slot_offset(slot);
        if copy == 0 {
            base
        } else {
            base + (self.slot_blocks() - 1) * BLOCK_SIZE_U64
        }
    }
    pub fn map_offset(&self, slot: u64, copy: u64) -> u64 {
        self.slot_offset(slot) + (1 + copy * self.map_blocks()) * BLOCK_SIZE_U64
    }
    pub fn phys_offset(&self, slot: u64, phys: u16) -> u64 {
        self.slot_offset(slot) + (1 + 2 * self.map_blocks() + phys as u64) * BLOCK_SIZE_U64
    }
    pub fn total_bytes(&self) -> u64 {
        (self.slots_start() + self.slot_count * self.slot_blocks()) * BLOCK_SIZE_U64
    }
    /// Which shard owns a slot: slots are dealt round-robin.
    pub fn shard_of_slot(&self, slot: u64) -> u32 {
        (slot % self.shard_count as u64) as u32
    }
    /// Slot index from a shard-local position.
    pub fn slot_of(&self, shard: u32, local: u64) -> u64 {
        local * self.shard_count as u64 + shard as u64
    }

    /// Picks the largest slot count that fits `disk_bytes`.
    pub fn for_disk(
        disk_uuid: u64,
        disk_bytes: u64,
        chunk_blocks: u32,
        spare_blocks: u32,
        shard_count: u32,
        journal_blocks: u32,
    ) -> Result<Geometry, EngineError> {
        if !chunk_blocks.is_power_of_two() || !(16..=16384).contains(&chunk_blocks) {
            return Err(EngineError::BadConfig(format!(
                "chunk_blocks {chunk_blocks} must be a power of two in [16, 16384]"
            )));
        }
        if spare_blocks == 0 || chunk_blocks + spare_blocks >= PHYS_NONE as u32 {
            return Err(EngineError::BadConfig(format!(
                "spare_blocks {spare_blocks} must be in [1, {}]",
                PHYS_NONE as u32 - 1 - chunk_blocks
            )));
        }
        if !(1..=64).contains(&shard_count) {
            return Err(EngineError::BadConfig(format!(
                "shard_count {shard_count} must be in [1, 64]"
            )));
        }
        if journal_blocks < 16 || !journal_blocks.is_multiple_of(2) {
            return Err(EngineError::BadConfig(format!(
                "journal_blocks {journal_blocks} must be even and at least 16"
            )));
        }
        let mut g = Geometry {
            disk_uuid,
            chunk_blocks,
            spare_blocks,
            shard_count,
            journal_blocks,
            slot_count: 0,
            journal_data: true,
            compact_journal: true,
        };
        // index size depends on slot count: shrink from an upper bound.
        let mut slots = disk_bytes / BLOCK_SIZE_U64 / g.slot_blocks();
        while slots > 0 {
            g.slot_count = slots;
            if g.total_bytes() <= disk_bytes {
                break;
            }
            slots -= 1;
        }
        if slots < shard_count as u64 {
            g.slot_count = shard_count as u64;
            return Err(EngineError::DiskTooSmall {
                disk_bytes,
                needed_bytes: g.total_bytes(),
            });
        }
        Ok(g)
    }
}

mod index;
mod journal;
mod slot;
mod superblock;
#[cfg(test)]
mod tests;

pub use index::*;
pub use journal::*;
pub use slot::*;
pub use superblock::*;
