//! The state of a request in flight (its planned blocks and stage), of a
//! journal buffer and of a checkpoint.

use super::*;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Action {
    Skip,
    Write,
    Zero,
    ReadData,
    ReadZero,
    /// Read from the journal buffer: the block's data is moving there.
    ReadMoving,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Planned {
    pub(super) logical: u16,
    pub(super) phys: u16,
    pub(super) crc: u32,
    pub(super) action: Action,
    /// A read through layers: which of `Op::layer_slots` holds the block.
    pub(super) layer: u8,
    /// A fill: the version the block is copied with (the source's).
    pub(super) version: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Stage {
    Idle,
    /// Waiting for I/O of the current phase.
    Running,
    /// Waiting for resources (free physical blocks, journal space, header).
    Deferred,
    /// Releasing the slot after a whole-chunk discard.
    Freeing,
    /// A whole-chunk discard done, waiting for journal room to free its
    /// slot (`free_or_finish`).
    FreeWait,
    /// A sector write reading the block it merges into.
    Merging,
    /// A fill reading the lower layers' blocks it copies.
    Filling,
    /// A whole-chunk zeroing of a chunk with no slot, waiting for the
    /// journal block that raises the shard's discard floor to its version.
    Flooring,
    /// A forget waiting for its journal record to be durable.
    Forgetting,
}

pub(super) struct Op {
    pub(super) tag: u64,
    pub(super) op: EngineOp,
    pub(super) volume: u64,
    pub(super) chunk: u64,
    pub(super) local_slot: u32,
    /// First logical block in the chunk and block count of the request.
    pub(super) first: u16,
    pub(super) count: u16,
    /// Next block (relative to `first`) not yet planned.
    pub(super) cursor: u16,
    pub(super) version: u64,
    pub(super) epoch: u64,
    pub(super) segs: Vec<Segment>,
    pub(super) iov: Vec<libc::iovec>,
    pub(super) plan: Vec<Planned>,
    /// Journal buffers this op waits on or is counted in.
    pub(super) jbufs: Vec<usize>,
    pub(super) pending: u32,
    pub(super) applied: u32,
    /// See `Completion::newer_version`.
    pub(super) newer_version: u64,
    pub(super) error: Option<EngineError>,
    /// Alone in the shard: its data and journal writes carry RWF_DSYNC, so it
    /// is durable when they complete, without waiting for a group flush.
    pub(super) solo: bool,
    pub(super) stage: Stage,
    pub(super) meta: AlignedBuf,
    /// Sector write: byte offset in its block and bytes (0: whole blocks).
    pub(super) sub_at: u16,
    pub(super) sub_len: u16,
    /// The sector write holds its block (see `SlotState::held`).
    pub(super) holding: bool,
    /// The sector write's block is merged into `merge_buf`, which is now
    /// its only segment.
    pub(super) merged: bool,
    /// crc32c of the committed block the sector write read.
    pub(super) merge_crc: u32,
    /// A one-block write's crc as the caller gave it (`EngineRequest::block_crc`).
    pub(super) given_crc: Option<u32>,
    /// The block a sector write is merged into (one per op, from start-up).
    pub(super) merge_buf: AlignedBuf,
    /// Submission order (a shard-wide counter).
    pub(super) seq: u64,
    /// See `EngineRequest::chain` (capacity kept across requests).
    pub(super) chain: Vec<u64>,
    /// A read through layers (or a sector write merging from a lower
    /// layer): the local slots it reads, whose `reads_inflight` and
    /// `ops_inflight` it holds until it finishes; `u32::MAX` for a layer
    /// with no slot for the chunk.
    pub(super) layer_slots: Vec<u32>,
    /// A fill: the blocks to copy (source layer, physical block, crc and
    /// version, in block order); `cursor` counts those planned. The read
    /// stage is done when `merged` is set.
    pub(super) fill: Vec<Planned>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum JbState {
    Free,
    Open,
    Writing,
    /// Written, waiting for a flush.
    Unflushed,
    /// Durable.
    Written,
}

pub(super) struct JournalBuf {
    pub(super) buf: AlignedBuf,
    pub(super) state: JbState,
    pub(super) seq: u64,
    pub(super) count: usize,
    pub(super) waiters: Vec<u32>,
    pub(super) unfinished_ops: u32,
    /// Written with RWF_DSYNC: durable on completion.
    pub(super) dsync: bool,
    /// A small write's data is in `buf` at `data_at`, written with the
    /// record block as one device write (format 2, `Geometry::journal_data`):
    /// its slot, logical block and physical block, where it is moved once
    /// the pair is durable.
    pub(super) data_to: Option<(u32, u16, u16)>,
    /// Where that data is in `buf`: `BLOCK_SIZE` (the data block after the
    /// record block), or `JOURNAL_COMPACT_BYTES` in a compact block
    /// (format 3: record block and data are one 4.5 KiB write).
    pub(super) data_at: usize,
    /// That move is in flight: the buffer is not reused, and the watermark
    /// does not pass this block (so no checkpoint lets the journal reuse
    /// the data block before the move is flushed).
    pub(super) moving: bool,
    /// The highest discard floor a record in this block carries (`Free`,
    /// `Floor`): the shard's durable floor rises to it once the block is.
    pub(super) floor: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum CkptStage {
    /// A flush of the data moved from the journal before the maps go out:
    /// a map that lands names the sequence numbers it covers, and a replay
    /// skips their records, so their moved data must be durable first.
    MovesSync,
    Maps,
    MapsSync,
    Index,
    IndexSync,
}

#[derive(Default)]
pub(super) struct CheckpointSpare {
    pub(super) maps: Vec<AlignedBuf>,
    /// The (empty) vectors themselves, to keep their capacity.
    pub(super) bufs_list: Vec<AlignedBuf>,
    pub(super) targets: Vec<u64>,
    pub(super) index: Option<AlignedBuf>,
    pub(super) index_entries: Vec<Option<(u64, SlotOwner)>>,
}

pub(super) struct Checkpoint {
    pub(super) cut: u64,
    pub(super) stage: CkptStage,
    pub(super) pending: u32,
    pub(super) bufs: Vec<AlignedBuf>,
    pub(super) targets: Vec<u64>,
    pub(super) next: usize,
    pub(super) index: AlignedBuf,
}
