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

// Superblock: magic(8) version(4) crc(4) uuid(8) chunk_blocks(4) spare(4)
// shards(4) journal_blocks(4) slot_count(8) node_id_set(4) pad(4) node_id(8)
// = 64 bytes, rest zero. `node_id_set` and `node_id` came later in format
// version 1: a disk formatted before has zeroes there (and its crc covers
// them), so it reads as "no node id"; older builds ignore the two fields.
const SB_CRC: usize = 12;
const SB_NODE_ID_SET: usize = 48;
const SB_NODE_ID: usize = 56;

/// What the superblock records: the geometry, and the storage node this
/// disk belongs to (once a node has taken it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub geometry: Geometry,
    pub node_id: Option<u64>,
}

pub fn encode_superblock(sb: &Superblock, b: &mut [u8]) {
    let g = &sb.geometry;
    b.fill(0);
    b[0..8].copy_from_slice(SUPERBLOCK_MAGIC);
    // A disk keeps its version (recording a node id rewrites this).
    let version = match (g.journal_data, g.compact_journal) {
        (false, _) => 1,
        (true, false) => 2,
        (true, true) => 3,
    };
    put_u32(b, 8, version);
    put_u64(b, 16, g.disk_uuid);
    put_u32(b, 24, g.chunk_blocks);
    put_u32(b, 28, g.spare_blocks);
    put_u32(b, 32, g.shard_count);
    put_u32(b, 36, g.journal_blocks);
    put_u64(b, 40, g.slot_count);
    if let Some(id) = sb.node_id {
        put_u32(b, SB_NODE_ID_SET, 1);
        put_u64(b, SB_NODE_ID, id);
    }
    seal(&mut b[..BLOCK_SIZE], SB_CRC);
}

pub enum SuperblockState {
    Valid(Superblock),
    /// Our magic, but a format version we do not understand.
    WrongVersion(u32),
    /// Our magic, bad crc.
    Corrupt,
    /// Not a Celer disk at all.
    Foreign,
}

pub fn decode_superblock(b: &[u8]) -> SuperblockState {
    if &b[0..8] != SUPERBLOCK_MAGIC {
        return SuperblockState::Foreign;
    }
    if !sealed_ok(&b[..BLOCK_SIZE], SUPERBLOCK_MAGIC, SB_CRC) {
        return SuperblockState::Corrupt;
    }
    let version = get_u32(b, 8);
    if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version) {
        return SuperblockState::WrongVersion(version);
    }
    SuperblockState::Valid(Superblock {
        geometry: Geometry {
            disk_uuid: get_u64(b, 16),
            chunk_blocks: get_u32(b, 24),
            spare_blocks: get_u32(b, 28),
            shard_count: get_u32(b, 32),
            journal_blocks: get_u32(b, 36),
            slot_count: get_u64(b, 40),
            journal_data: version >= 2,
            compact_journal: version >= 3,
        },
        node_id: (get_u32(b, SB_NODE_ID_SET) != 0).then(|| get_u64(b, SB_NODE_ID)),
    })
}

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

/// A journal record: one metadata change.
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
    /// Slot released.
    Free { slot: u32 },
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
const JOURNAL_CRC: usize = 8;
const JOURNAL_SEALED_LEN: usize = 28;

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
        Record::Free { slot } => {
            b[0] = 4;
            put_u32(b, 4, slot);
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
        4 => Record::Free { slot },
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

pub const INDEX_HEADER_BYTES: usize = 64;
pub const INDEX_ENTRY_BYTES: usize = 40;
// Index header: magic(8) crc(4) count(4) uuid(8) shard(4) pad(4) generation(8) journal_tail(8)
// Entry: state(1) pad(7) volume(8) chunk(8) epoch(8) alloc_seq(8)
const INDEX_CRC: usize = 8;

pub struct IndexHeader {
    pub generation: u64,
    /// Replay the journal from this sequence number on.
    pub journal_tail: u64,
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_round_trips_and_rejects_damage() {
        let entries: Vec<BlockEntry> = (0..256u32)
            .map(|i| match i % 3 {
                0 => BlockEntry::UNWRITTEN,
                1 => BlockEntry {
                    phys: i as u16 + 7,
                    kind: BlockKind::Data,
                    crc: i.wrapping_mul(0x9E37_79B9),
                    version: u64::MAX - i as u64,
                },
                _ => BlockEntry::zeroed(i as u64 * 1000),
            })
            .collect();
        let mut b = vec![0u8; BLOCK_SIZE];
        let h = MapHeader {
            generation: 5,
            journal_seq: 77,
            volume: 9,
            chunk: 11,
        };
        encode_map(42, 3, &h, &entries, &mut b);
        let mut out = vec![BlockEntry::UNWRITTEN; 256];
        let got = decode_map(42, 3, 256, &b, &mut out).expect("valid map");
        assert_eq!(
            (got.generation, got.journal_seq, got.volume, got.chunk),
            (5, 77, 9, 11)
        );
        assert_eq!(out, entries);
        assert!(
            decode_map(43, 3, 256, &b, &mut out).is_none(),
            "foreign disk uuid accepted"
        );
        assert!(
            decode_map(42, 4, 256, &b, &mut out).is_none(),
            "other slot accepted"
        );
        b[100] ^= 1;
        assert!(
            decode_map(42, 3, 256, &b, &mut out).is_none(),
            "damaged map accepted"
        );
    }

    #[test]
    fn records_and_headers_round_trip() {
        let owner = SlotOwner {
            volume: 1,
            chunk: u64::MAX,
            epoch: 3,
        };
        for r in [
            Record::Write {
                slot: 9,
                logical: 255,
                phys: 300,
                crc: 0xdead_beef,
                version: 1 << 60,
                in_journal: false,
            },
            Record::Write {
                slot: 9,
                logical: 3,
                phys: 4,
                crc: 1,
                version: 2,
                in_journal: true,
            },
            Record::Zero {
                slot: 1,
                logical: 0,
                version: 5,
            },
            Record::Alloc { slot: 7, owner },
            Record::Free { slot: u32::MAX },
        ] {
            let mut b = [0u8; RECORD_BYTES];
            encode_record(&r, &mut b);
            assert_eq!(decode_record(&b), Some(r));
        }
        let mut b = vec![0u8; BLOCK_SIZE];
        encode_slot_header(42, 8, 99, Some(owner), &mut b);
        assert_eq!(decode_slot_header(42, 8, &b), Some((99, Some(owner))));
        encode_slot_header(42, 8, 100, None, &mut b);
        assert_eq!(decode_slot_header(42, 8, &b), Some((100, None)));
        assert_eq!(decode_slot_header(42, 9, &b), None);
    }

    fn geometry() -> Geometry {
        Geometry::for_disk(0x1234_5678_9abc_def0, 64 << 20, 256, 64, 2, 16).expect("geometry")
    }

    #[test]
    fn format_1_disks_keep_their_journal_layout() {
        let mut g = geometry();
        let mut b = vec![0u8; BLOCK_SIZE];
        for (journal_data, compact_journal, version) in
            [(true, true, 3), (true, false, 2), (false, false, 1)]
        {
            g.journal_data = journal_data;
            g.compact_journal = compact_journal;
            let sb = Superblock {
                geometry: g,
                node_id: Some(3),
            };
            encode_superblock(&sb, &mut b);
            assert_eq!(get_u32(&b, 8), version);
            match decode_superblock(&b) {
                SuperblockState::Valid(got) => assert_eq!(got, sb),
                _ => panic!("superblock of format {version} not read back"),
            }
        }
        // Format 1: sequence numbers fill the ring; format 2: every other
        // block, the data block after each.
        g.journal_data = false;
        assert_eq!((g.journal_seqs(), g.journal_position(17)), (16, 1));
        g.journal_data = true;
        assert_eq!((g.journal_seqs(), g.journal_position(17)), (8, 2));
        assert_eq!(g.journal_position(7), 14);
        put_u32(&mut b, 8, 4);
        seal(&mut b, SB_CRC);
        assert!(matches!(
            decode_superblock(&b),
            SuperblockState::WrongVersion(4)
        ));
        assert!(Geometry::for_disk(1, 64 << 20, 256, 64, 2, 17).is_err());
    }

    /// A compact block (format 3) is sealed over its first 512 bytes: the
    /// data after them may be anything; its header and records may not.
    /// Formats before 3 take none.
    #[test]
    fn compact_journal_blocks_are_sealed_over_their_records_only() {
        let mut b = vec![0u8; 2 * BLOCK_SIZE];
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i * 7 + 3) as u8;
        }
        let rec = Record::Write {
            slot: 1,
            logical: 2,
            phys: 3,
            crc: 4,
            version: 5,
            in_journal: true,
        };
        for r in 0..2 {
            let at = JOURNAL_HEADER_BYTES + r * RECORD_BYTES;
            encode_record(&rec, &mut b[at..at + RECORD_BYTES]);
        }
        let data: Vec<u8> = b[JOURNAL_COMPACT_BYTES..JOURNAL_COMPACT_BYTES + 64].to_vec();
        seal_journal_block(9, 1, 77, 70, 2, true, &mut b);
        // The data after the records' bytes is left as it was.
        assert_eq!(
            &b[JOURNAL_COMPACT_BYTES..JOURNAL_COMPACT_BYTES + 64],
            &data[..]
        );
        let h = decode_journal_block(9, 1, true, &b).expect("a valid compact block");
        assert_eq!(
            (h.seq, h.acked_through, h.count, h.compact),
            (77, 70, 2, true)
        );
        assert!(
            decode_journal_block(9, 1, false, &b).is_none(),
            "format 2 takes none"
        );
        b[1000] ^= 1;
        assert!(
            decode_journal_block(9, 1, true, &b).is_some(),
            "data is not sealed"
        );
        b[JOURNAL_COMPACT_BYTES - 1] ^= 1;
        assert!(decode_journal_block(9, 1, true, &b).is_none());
        b[JOURNAL_COMPACT_BYTES - 1] ^= 1;
        put_u32(&mut b, JOURNAL_SEALED_LEN, 1024);
        assert!(
            decode_journal_block(9, 1, true, &b).is_none(),
            "unknown sealed length"
        );
        // A whole block decodes under every format, and is not compact.
        seal_journal_block(9, 1, 78, 70, 2, false, &mut b);
        for allowed in [true, false] {
            let h = decode_journal_block(9, 1, allowed, &b).expect("a whole block");
            assert_eq!((h.seq, h.compact), (78, false));
        }
    }

    #[test]
    fn superblock_node_id_round_trips() {
        let g = geometry();
        let mut b = vec![0u8; BLOCK_SIZE];
        for node_id in [None, Some(0), Some(7), Some(u64::MAX)] {
            encode_superblock(
                &Superblock {
                    geometry: g,
                    node_id,
                },
                &mut b,
            );
            match decode_superblock(&b) {
                SuperblockState::Valid(sb) => assert_eq!(
                    sb,
                    Superblock {
                        geometry: g,
                        node_id
                    }
                ),
                _ => panic!("superblock with node id {node_id:?} does not decode"),
            }
        }
        b[SB_NODE_ID] ^= 1;
        assert!(matches!(decode_superblock(&b), SuperblockState::Corrupt));
    }

    /// A superblock as the encoder wrote it before the node id existed:
    /// the 48 bytes of geometry, zeroes after, sealed. It still decodes,
    /// with no node id; and a superblock without a node id is exactly that.
    #[test]
    fn superblock_from_before_the_node_id_reads_as_none() {
        // A format 1 disk (one block per journal sequence number).
        let g = Geometry {
            journal_data: false,
            compact_journal: false,
            ..geometry()
        };
        let mut old = vec![0u8; BLOCK_SIZE];
        old[0..8].copy_from_slice(SUPERBLOCK_MAGIC);
        put_u32(&mut old, 8, 1);
        put_u64(&mut old, 16, g.disk_uuid);
        put_u32(&mut old, 24, g.chunk_blocks);
        put_u32(&mut old, 28, g.spare_blocks);
        put_u32(&mut old, 32, g.shard_count);
        put_u32(&mut old, 36, g.journal_blocks);
        put_u64(&mut old, 40, g.slot_count);
        seal(&mut old, SB_CRC);
        match decode_superblock(&old) {
            SuperblockState::Valid(sb) => {
                assert_eq!(
                    sb,
                    Superblock {
                        geometry: g,
                        node_id: None
                    }
                )
            }
            _ => panic!("an old superblock does not decode"),
        }
        let mut new = vec![0u8; BLOCK_SIZE];
        encode_superblock(
            &Superblock {
                geometry: g,
                node_id: None,
            },
            &mut new,
        );
        assert_eq!(new, old, "no node id must encode as the old format did");
    }
}
