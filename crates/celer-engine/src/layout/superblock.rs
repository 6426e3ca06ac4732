//! The superblock: geometry and owning node, two copies at blocks 0 and 1.

use super::*;

// Superblock: magic(8) version(4) crc(4) uuid(8) chunk_blocks(4) spare(4)
// shards(4) journal_blocks(4) slot_count(8) node_id_set(4) pad(4) node_id(8)
// = 64 bytes, rest zero. `node_id_set` and `node_id` came later in format
// version 1: a disk formatted before has zeroes there (and its crc covers
// them), so it reads as "no node id"; older builds ignore the two fields.
pub(super) const SB_CRC: usize = 12;
pub(super) const SB_NODE_ID_SET: usize = 48;
pub(super) const SB_NODE_ID: usize = 56;

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
