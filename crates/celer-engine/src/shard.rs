//! One shard: the slots it owns, its journal ring, its io_uring, and the
//! state machine that turns requests into disk I/O. Driven by one thread.
//!
//! A write request runs in phases. A phase picks, for each block whose
//! version is newer than the stored one, a free physical block of the slot,
//! appends a journal record (logical → physical, version, crc32c) to the
//! open journal block, and submits the data write. The op completes when its
//! data writes and the journal blocks holding its records are durable; only
//! then does the in-memory map point at the new blocks and the old physical
//! blocks become free. A phase is as large as the free physical blocks
//! allow; a request larger than the spare space runs in several phases.
//!
//! Per request: one data write per contiguous physical run and a share of one
//! journal block write (every record appended between two `poll` calls goes
//! into the same journal block), submitted together, then a share of one
//! `fdatasync` (group commit: one flush covers every write that completed
//! before it was issued). On a device without FUA (virtio-blk, most files)
//! this costs what an O_DSYNC write costs: the write, then one flush.
//!
//! A write of 512-byte sectors within one block (a *sector write*) is merged
//! here, not by the caller: the op holds the block (other mutations of it
//! wait, and it waits for those already running), reads the committed block,
//! checks its crc, copies its sectors over it and writes the whole block as
//! an ordinary redirect-on-write phase with a new crc and its version. Two
//! sector writes of one block from different writers therefore both survive,
//! in version order, and a crash leaves the old or the merged block, never a
//! mix. Cost: one extra 4 KiB read when the block holds data.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use io_uring::{opcode, types, IoUring};

use crate::aligned::AlignedBuf;
use crate::layout::{
    self, BlockEntry, BlockKind, Geometry, IndexHeader, MapHeader, Record, SlotOwner, BLOCK_SIZE,
    BLOCK_SIZE_U64, PHYS_NONE, RECORDS_PER_JOURNAL_BLOCK, RECORD_BYTES,
};
use crate::{errno_text, EngineError};

/// Most segments one request may carry.
pub const SEGMENTS_MAX: usize = 256;
/// The most layers a request may read through (`EngineRequest::chain`).
pub const LAYERS_MAX: usize = 255;
/// Journal blocks that may be open or in flight at once, per shard.
const JOURNAL_BUFS: usize = 16;
/// Most data writes one phase of a request submits.
const RUNS_PER_PHASE_MAX: u32 = 32;
/// Most requests in flight per shard.
pub const INFLIGHT_MAX: usize = 256;
/// Checkpoint map writes in flight at once: a checkpoint trickles out
/// beside the requests instead of queueing a thousand writes ahead of them.
const CKPT_WRITES_INFLIGHT_MAX: u32 = 4;
/// Completion queue entries: bounds the SQEs in flight so the CQ never overflows.
const CQ_ENTRIES: u32 = 16384;
/// How long the version of a chunk freed by a whole-chunk discard is kept
/// (see `Discarded`): longer than a write can travel late (the client gives
/// up on a request after its deadline, 30 s by default).
const DISCARDED_KEEP: std::time::Duration = std::time::Duration::from_secs(120);
/// At most this many such versions are kept (the oldest go first).
const DISCARDED_MAX: usize = 1 << 20;

/// Versions of chunks whose slot a whole-chunk discard freed, kept in
/// memory for a while: a write that arrives late (a replica's copy of a
/// write the client already retried, then discarded) and carries a version
/// at or below the discard's is dropped, as it would have been had the slot
/// stayed, instead of bringing old data back on one replica. Not journaled:
/// a restart ends every connection, and with them any late write.
#[derive(Default)]
struct Discarded {
    versions: HashMap<(u64, u64), (u64, Instant)>,
    order: VecDeque<(Instant, (u64, u64))>,
}

impl Discarded {
    fn insert(&mut self, chunk: (u64, u64), version: u64) {
        let now = Instant::now();
        while let Some(&(at, key)) = self.order.front() {
            if now.duration_since(at) < DISCARDED_KEEP && self.order.len() < DISCARDED_MAX {
                break;
            }
            self.order.pop_front();
            if self.versions.get(&key).is_some_and(|(_, t)| *t == at) {
                self.versions.remove(&key);
            }
        }
        self.versions.insert(chunk, (version, now));
        self.order.push_back((now, chunk));
    }

    /// The discard's version if a write at `version` must be dropped.
    fn covers(&self, chunk: (u64, u64), version: u64) -> Option<u64> {
        self.versions
            .get(&chunk)
            .filter(|(v, at)| version <= *v && at.elapsed() < DISCARDED_KEEP)
            .map(|(v, _)| *v)
    }

    fn forget(&mut self, chunk: (u64, u64)) {
        self.versions.remove(&chunk);
    }

    /// Removes and returns the chunk's discard version (a new slot carries
    /// it from now on).
    fn take(&mut self, chunk: (u64, u64)) -> Option<u64> {
        self.versions
            .remove(&chunk)
            .filter(|(_, at)| at.elapsed() < DISCARDED_KEEP)
            .map(|(v, _)| v)
    }
}

/// A piece of caller memory, kept valid by the caller until completion:
/// the same type as at the `BlockDevice` boundary, so no conversion.
pub type Segment = celer_device::IoSegment;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineOp {
    Read,
    Write,
    WriteZeroes,
    Discard,
    /// Forgets a whole chunk: data and versions, as if never written (the
    /// slot is freed; `version` is ignored). Ordered after the chunk's ops
    /// already running and before those that start after it. For chunks
    /// this disk no longer holds for the cluster (deleted volumes, copies of
    /// partitions that moved away): a later write at any version applies.
    Release,
    /// A write of a good copy over a damaged one: as `Write`, but a block
    /// whose planned version equals the request's is written too (a `Write`
    /// takes an equal version for a retry and skips it). A block with a
    /// newer version skips, as for `Write`: a client write that came first
    /// wins. Nothing is done on a chunk without a slot. The replication
    /// layer sends it with the version a good member holds.
    Repair,
    /// Copies into the request's layer (`volume`) every block of the range
    /// that the layer has no entry for (nothing written, zeroed or planned)
    /// and that the first layer of `chain` holding it holds as data, with
    /// that block's data, crc and version (`version` is ignored): what a
    /// read through the chain returns, now held by the layer itself
    /// (`celer volume flatten`). Blocks the chain holds as zeroes or not at
    /// all are left alone (the layer reads zeroes there once the chain is
    /// gone, as through it). The segments are the caller's scratch room
    /// for the range (the data is read into it, then written from it).
    ///
    /// Ordered with writes by version: a block is copied only if no write
    /// of it is planned or stored at that moment (each block's first
    /// journal record in the layer), and every later write of it carries a
    /// newer version and wins; a block a sector write holds is waited for.
    /// So the result depends only on the layers' content, not on timing:
    /// replicas that hold the same layers end with the same blocks and
    /// versions. The lower blocks are checked against their crc (a bad one
    /// fails the op with `Checksum` naming the lower layer) and are still
    /// the ones read when the copy is planned (otherwise they are read
    /// again). Completes with the number of blocks copied.
    Fill,
}

/// A request to a shard. It must lie within one chunk.
#[derive(Clone, Copy, Debug)]
pub struct EngineRequest<'a> {
    pub op: EngineOp,
    pub volume: u64,
    pub offset_bytes: u64,
    /// For WriteZeroes/Discard; for Read/Write the segments' total length.
    pub len_bytes: u64,
    pub segments: &'a [Segment],
    /// Writes, zeroes and discards apply only where this is newer than the
    /// stored version of a block.
    pub version: u64,
    /// Route epoch, recorded in the chunk header when the chunk is allocated.
    pub epoch: u64,
    pub tag: u64,
    /// The layers under `volume`, newest first (layer keys of the same
    /// lineage, see `celer_device::layer_key`): a read takes each block
    /// from the first layer, `volume` first, that holds it (data or zeroes),
    /// and a sector write merges into that block. Empty for a volume with
    /// no snapshot or parent.
    pub chain: &'a [u64],
}

#[derive(Debug)]
pub struct Completion {
    pub tag: u64,
    /// Blocks applied (writes) or read; a write whose version was not newer
    /// than the stored one completes with `Ok(0)`.
    pub result: Result<u32, EngineError>,
    /// Writes, zeroes, discards: the highest version, strictly newer than
    /// the request's, that made a block of it skip (0: every block was
    /// applied or held the request's own version, i.e. a retry). The
    /// caller decides what an older write means (a client's is refused).
    pub newer_version: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Action {
    Skip,
    Write,
    Zero,
    ReadData,
    ReadZero,
}

#[derive(Clone, Copy, Debug)]
struct Planned {
    logical: u16,
    phys: u16,
    crc: u32,
    action: Action,
    /// A read through layers: which of `Op::layer_slots` holds the block.
    layer: u8,
    /// A fill: the version the block is copied with (the source's).
    version: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    Idle,
    /// Waiting for I/O of the current phase.
    Running,
    /// Waiting for resources (free physical blocks, journal space, header).
    Deferred,
    /// Releasing the slot after a whole-chunk discard.
    Freeing,
    /// A sector write reading the block it merges into.
    Merging,
    /// A fill reading the lower layers' blocks it copies.
    Filling,
}

struct Op {
    tag: u64,
    op: EngineOp,
    volume: u64,
    chunk: u64,
    local_slot: u32,
    /// First logical block in the chunk and block count of the request.
    first: u16,
    count: u16,
    /// Next block (relative to `first`) not yet planned.
    cursor: u16,
    version: u64,
    epoch: u64,
    segs: Vec<Segment>,
    iov: Vec<libc::iovec>,
    plan: Vec<Planned>,
    /// Journal buffers this op waits on or is counted in.
    jbufs: Vec<usize>,
    pending: u32,
    applied: u32,
    /// See `Completion::newer_version`.
    newer_version: u64,
    error: Option<EngineError>,
    /// Alone in the shard: its data and journal writes carry RWF_DSYNC, so it
    /// is durable when they complete, without waiting for a group flush.
    solo: bool,
    stage: Stage,
    meta: AlignedBuf,
    /// Sector write: byte offset in its block and bytes (0: whole blocks).
    sub_at: u16,
    sub_len: u16,
    /// The sector write holds its block (see `SlotState::held`).
    holding: bool,
    /// The sector write's block is merged into `merge_buf`, which is now
    /// its only segment.
    merged: bool,
    /// crc32c of the committed block the sector write read.
    merge_crc: u32,
    /// The block a sector write is merged into (one per op, from start-up).
    merge_buf: AlignedBuf,
    /// Submission order (a shard-wide counter).
    seq: u64,
    /// See `EngineRequest::chain` (capacity kept across requests).
    chain: Vec<u64>,
    /// A read through layers (or a sector write merging from a lower
    /// layer): the local slots it reads, whose `reads_inflight` and
    /// `ops_inflight` it holds until it finishes; `u32::MAX` for a layer
    /// with no slot for the chunk.
    layer_slots: Vec<u32>,
    /// A fill: the blocks to copy (source layer, physical block, crc and
    /// version, in block order); `cursor` counts those planned. The read
    /// stage is done when `merged` is set.
    fill: Vec<Planned>,
}

// SAFETY: the raw pointers an op holds (segments, iovecs) point into memory
// the submitter keeps valid until completion (`Shard::submit`'s contract),
// not into thread-local state; a shard with its ops moves between threads
// as a whole and is used by one thread at a time.
unsafe impl Send for Op {}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum JbState {
    Free,
    Open,
    Writing,
    /// Written, waiting for a flush.
    Unflushed,
    /// Durable.
    Written,
}

struct JournalBuf {
    buf: AlignedBuf,
    state: JbState,
    seq: u64,
    count: usize,
    waiters: Vec<u32>,
    unfinished_ops: u32,
    /// Written with RWF_DSYNC: durable on completion.
    dsync: bool,
}

/// In-memory state of an allocated slot.
pub(crate) struct SlotState {
    pub(crate) owner: SlotOwner,
    pub(crate) alloc_seq: u64,
    pub(crate) entries: Vec<BlockEntry>,
    /// Per block, the highest version planned (journaled) so far. A request
    /// applies only above it, so per block the journal order is the version
    /// order and replay reaches the state the in-memory commits reach.
    planned_version: Vec<u64>,
    pub(crate) map_generation: u64,
    pub(crate) dirty: bool,
    free_phys: Vec<u64>,
    pending_free: Vec<u16>,
    reads_inflight: u32,
    ops_inflight: u32,
    /// Allocated since the last checkpoint: its two headers are written by
    /// the next checkpoint that covers its Alloc record (until then the
    /// journal's Alloc record describes the slot; see `alloc_slot`).
    pub(crate) header_due: bool,
    freeing: bool,
    /// A Release op holds the slot: ops that start after it wait.
    releasing: Option<u32>,
    /// Blocks held by a sector write between its read and its commit: no
    /// other mutation of them is planned meanwhile (bit per logical block).
    held: Vec<u64>,
}

impl SlotState {
    pub(crate) fn new(
        g: &Geometry,
        owner: SlotOwner,
        alloc_seq: u64,
        entries: Vec<BlockEntry>,
        gen: u64,
    ) -> Self {
        let phys = g.phys_blocks() as usize;
        let mut free_phys = vec![0u64; phys.div_ceil(64)];
        for p in 0..phys {
            free_phys[p / 64] |= 1 << (p % 64);
        }
        let planned_version = entries.iter().map(|e| e.version).collect();
        let mut s = SlotState {
            owner,
            alloc_seq,
            entries,
            planned_version,
            map_generation: gen,
            dirty: false,
            free_phys,
            pending_free: Vec::with_capacity(phys),
            reads_inflight: 0,
            ops_inflight: 0,
            header_due: false,
            freeing: false,
            releasing: None,
            held: vec![0; (g.chunk_blocks as usize).div_ceil(64)],
        };
        for i in 0..s.entries.len() {
            let e = s.entries[i];
            if e.kind == BlockKind::Data {
                s.take_phys(e.phys);
            }
        }
        s
    }
    fn take_phys(&mut self, p: u16) {
        let p = p as usize;
        self.free_phys[p / 64] &= !(1 << (p % 64));
    }
    fn is_free(&self, p: usize) -> bool {
        p / 64 < self.free_phys.len() && self.free_phys[p / 64] & (1 << (p % 64)) != 0
    }
    fn find_free(&self) -> Option<u16> {
        for (w, bits) in self.free_phys.iter().enumerate() {
            if *bits != 0 {
                return Some((w * 64 + bits.trailing_zeros() as usize) as u16);
            }
        }
        None
    }
    fn is_held(&self, logical: u16) -> bool {
        let l = logical as usize;
        self.held[l / 64] & (1 << (l % 64)) != 0
    }
    fn set_held(&mut self, logical: u16, on: bool) {
        let l = logical as usize;
        if on {
            self.held[l / 64] |= 1 << (l % 64);
        } else {
            self.held[l / 64] &= !(1 << (l % 64));
        }
    }
    fn release_phys(&mut self, p: u16) {
        if self.reads_inflight > 0 {
            self.pending_free.push(p);
        } else {
            let p = p as usize;
            self.free_phys[p / 64] |= 1 << (p % 64);
        }
    }
}

/// Counters for benchmarks and write-amplification accounting.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShardStats {
    pub ops: u64,
    pub user_bytes_written: u64,
    pub data_bytes_written: u64,
    pub journal_bytes_written: u64,
    pub meta_bytes_written: u64,
    pub checkpoints: u64,
    pub flushes: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum CkptStage {
    Maps,
    MapsSync,
    Index,
    IndexSync,
}

#[derive(Default)]
struct CheckpointSpare {
    maps: Vec<AlignedBuf>,
    /// The (empty) vectors themselves, to keep their capacity.
    bufs_list: Vec<AlignedBuf>,
    targets: Vec<u64>,
    index: Option<AlignedBuf>,
    index_entries: Vec<Option<(u64, SlotOwner)>>,
}

struct Checkpoint {
    cut: u64,
    stage: CkptStage,
    pending: u32,
    bufs: Vec<AlignedBuf>,
    targets: Vec<u64>,
    next: usize,
    index: AlignedBuf,
}

// user_data: kind in the top byte, id below.
const UD_DATA: u64 = 1 << 56;
const UD_JOURNAL: u64 = 2 << 56;
const UD_META: u64 = 3 << 56;
const UD_CKPT: u64 = 4 << 56;
const UD_FLUSH: u64 = 5 << 56;
const UD_KIND: u64 = 0xff << 56;

/// user_data of an I/O: its kind, the op or buffer it belongs to (low 32
/// bits), and the bytes it must transfer in 512-byte units (bits 32..56):
/// a short transfer is an error, never a success.
fn io_ud(kind: u64, id: u64, bytes: usize) -> u64 {
    debug_assert!(
        bytes.is_multiple_of(512) && bytes / 512 < 1 << 24,
        "{bytes}"
    );
    kind | ((bytes as u64 / 512) << 32) | (id & 0xffff_ffff)
}

/// The completion result of an I/O that had to transfer `expected` bytes:
/// a short transfer becomes EIO (with a log line), so it fails like any
/// device error.
fn checked_result(res: i32, expected: i32, what: u64) -> i32 {
    if res < 0 || res == expected {
        return res;
    }
    tracing::error!(
        res,
        expected,
        kind = what >> 56,
        "short device transfer: {res} of {expected} bytes; failing it with EIO"
    );
    -libc::EIO
}

/// One shard of an engine, driven by exactly one thread.
pub struct Shard {
    id: u32,
    g: Geometry,
    _file: Arc<File>,
    fd: i32,
    ring: IoUring,
    completion_fd: Option<OwnedFd>,
    slots: Vec<Option<SlotState>>,
    by_chunk: HashMap<(u64, u64), u32>,
    free_slots: Vec<u32>,
    discarded: Discarded,
    ops: Vec<Op>,
    free_ops: Vec<u32>,
    deferred: VecDeque<u32>,
    done: VecDeque<Completion>,
    jbufs: Vec<JournalBuf>,
    /// Buffers in sequence order, from the oldest not yet acknowledged.
    jorder: VecDeque<usize>,
    open_jb: Option<usize>,
    next_seq: u64,
    tail: u64,
    acked_through: u64,
    index_generation: u64,
    ckpt: Option<Checkpoint>,
    /// Buffers of finished checkpoints, reused by the next ones so that a
    /// checkpoint allocates nothing once the pool has grown.
    ckpt_spare: CheckpointSpare,
    /// Ops whose writes completed, waiting for the next flush.
    flush_waiting: Vec<u32>,
    /// Journal blocks written, waiting for the next flush.
    unflushed_jbs: Vec<usize>,
    /// What the flush in flight covers.
    flush_batch: Vec<u32>,
    flush_jbs: Vec<usize>,
    flush_inflight: bool,
    failed: Option<String>,
    unsubmitted: u32,
    inflight_sqes: u32,
    cq_budget: u32,
    max_request_blocks: u16,
    stats: ShardStats,
    /// Ops submitted so far (`Op::seq`).
    submitted: u64,
    /// Ops whose reads (merge or fill) a journal write finished last.
    reads_done: Vec<u32>,
}

pub(crate) struct ShardInit {
    pub(crate) id: u32,
    pub(crate) g: Geometry,
    pub(crate) file: Arc<File>,
    pub(crate) slots: Vec<Option<SlotState>>,
    pub(crate) next_seq: u64,
    pub(crate) tail: u64,
    pub(crate) acked_through: u64,
    pub(crate) index_generation: u64,
    pub(crate) inflight_max: usize,
    pub(crate) completion_eventfd: bool,
}

impl Shard {
    pub(crate) fn new(init: ShardInit) -> Result<Shard, EngineError> {
        let g = init.g;
        let inflight_max = init.inflight_max.clamp(1, INFLIGHT_MAX);
        let max_request_blocks = g.chunk_blocks.min(256) as u16;
        let mut builder = IoUring::builder();
        builder.setup_cqsize(CQ_ENTRIES);
        if !init.completion_eventfd {
            // No inter-processor interrupt per completion: the owning thread
            // runs completion work when it enters the kernel anyway. (Not
            // with an eventfd: an owner asleep in epoll must be woken.)
            builder.setup_coop_taskrun();
        }
        let ring = builder.build(512).map_err(|e| EngineError::Os {
            path: "io_uring".into(),
            what: "io_uring_setup",
            errno_text: e.to_string(),
        })?;
        let completion_fd = if init.completion_eventfd {
            // SAFETY: plain syscall; the result is checked before use.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(EngineError::Os {
                    path: "eventfd".into(),
                    what: "eventfd",
                    errno_text: std::io::Error::last_os_error().to_string(),
                });
            }
            // SAFETY: fd is a fresh descriptor owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            ring.submitter()
                .register_eventfd(fd.as_raw_fd())
                .map_err(|e| EngineError::Os {
                    path: "io_uring".into(),
                    what: "register eventfd",
                    errno_text: e.to_string(),
                })?;
            Some(fd)
        } else {
            None
        };
        let mut by_chunk = HashMap::with_capacity(init.slots.len());
        let mut free_slots = Vec::with_capacity(init.slots.len());
        for (local, s) in init.slots.iter().enumerate().rev() {
            match s {
                Some(s) => {
                    by_chunk.insert((s.owner.volume, s.owner.chunk), local as u32);
                }
                None if g.slot_of(init.id, local as u64) < g.slot_count => {
                    free_slots.push(local as u32)
                }
                None => {}
            }
        }
        let ops = (0..inflight_max)
            .map(|_| Op {
                tag: 0,
                op: EngineOp::Read,
                volume: 0,
                chunk: 0,
                local_slot: 0,
                first: 0,
                count: 0,
                cursor: 0,
                version: 0,
                epoch: 0,
                segs: Vec::with_capacity(SEGMENTS_MAX),
                iov: Vec::with_capacity(SEGMENTS_MAX + max_request_blocks as usize),
                plan: Vec::with_capacity(max_request_blocks as usize),
                jbufs: Vec::with_capacity(JOURNAL_BUFS),
                pending: 0,
                applied: 0,
                newer_version: 0,
                error: None,
                solo: false,
                stage: Stage::Idle,
                meta: AlignedBuf::new(1),
                sub_at: 0,
                sub_len: 0,
                holding: false,
                merged: false,
                merge_crc: 0,
                merge_buf: AlignedBuf::new(1),
                seq: 0,
                chain: Vec::with_capacity(LAYERS_MAX),
                layer_slots: Vec::with_capacity(LAYERS_MAX + 1),
                fill: Vec::with_capacity(max_request_blocks as usize),
            })
            .collect();
        let jbufs = (0..JOURNAL_BUFS)
            .map(|_| JournalBuf {
                buf: AlignedBuf::new(1),
                state: JbState::Free,
                seq: 0,
                count: 0,
                waiters: Vec::with_capacity(RECORDS_PER_JOURNAL_BLOCK),
                unfinished_ops: 0,
                dsync: false,
            })
            .collect();
        Ok(Shard {
            id: init.id,
            g,
            fd: init.file.as_raw_fd(),
            _file: init.file,
            ring,
            completion_fd,
            slots: init.slots,
            by_chunk,
            free_slots,
            discarded: Discarded::default(),
            ops,
            free_ops: (0..inflight_max as u32).rev().collect(),
            deferred: VecDeque::with_capacity(inflight_max),
            done: VecDeque::with_capacity(inflight_max),
            jbufs,
            jorder: VecDeque::with_capacity(JOURNAL_BUFS),
            open_jb: None,
            next_seq: init.next_seq,
            tail: init.tail,
            acked_through: init.acked_through,
            index_generation: init.index_generation,
            ckpt: None,
            ckpt_spare: CheckpointSpare::default(),
            flush_waiting: Vec::with_capacity(inflight_max),
            unflushed_jbs: Vec::with_capacity(JOURNAL_BUFS),
            flush_batch: Vec::with_capacity(inflight_max),
            flush_jbs: Vec::with_capacity(JOURNAL_BUFS),
            flush_inflight: false,
            failed: None,
            unsubmitted: 0,
            inflight_sqes: 0,
            cq_budget: CQ_ENTRIES - 64,
            max_request_blocks,
            stats: ShardStats::default(),
            submitted: 0,
            reads_done: Vec::with_capacity(inflight_max),
        })
    }

    pub fn id(&self) -> u32 {
        self.id
    }
    pub fn geometry(&self) -> &Geometry {
        &self.g
    }
    pub fn stats(&self) -> ShardStats {
        self.stats
    }
    pub fn inflight(&self) -> usize {
        self.ops.len() - self.free_ops.len()
    }
    pub fn inflight_max(&self) -> usize {
        self.ops.len()
    }
    /// Largest Read/Write request, in bytes.
    pub fn max_request_bytes(&self) -> u64 {
        self.max_request_blocks as u64 * BLOCK_SIZE_U64
    }
    /// Where the current data of the block at `offset_bytes` of `volume`
    /// lives on the disk, if it has any (diagnostics, `celer engine locate`).
    pub fn locate(&self, volume: u64, offset_bytes: u64) -> Option<u64> {
        let chunk = offset_bytes / self.g.chunk_bytes();
        let local = *self.by_chunk.get(&(volume, chunk))?;
        let slot = self.slots[local as usize].as_ref()?;
        let logical = (offset_bytes % self.g.chunk_bytes() / BLOCK_SIZE_U64) as usize;
        let e = slot.entries[logical];
        (e.kind == BlockKind::Data).then(|| {
            self.g
                .phys_offset(self.g.slot_of(self.id, local as u64), e.phys)
        })
    }

    /// With `OpenOptions::completion_eventfd`: a nonblocking eventfd that
    /// becomes readable when completions may be ready. The owner drains it
    /// (reads its counter) and then calls `poll`.
    pub fn completion_fd(&self) -> Option<RawFd> {
        self.completion_fd.as_ref().map(|f| f.as_raw_fd())
    }

    /// The state of `count` blocks from `offset_bytes` of `volume` (within
    /// one chunk), as a read submitted right now would see them: per block
    /// its kind and version. A backfill source sends these beside the data,
    /// read in the same step, so the data is never older than the versions.
    /// Returns false when the chunk holds no slot (never written or
    /// released): every block is `Unwritten` at version 0.
    pub fn block_states(
        &self,
        volume: u64,
        offset_bytes: u64,
        out: &mut [(BlockKind, u64)],
    ) -> bool {
        let chunk = offset_bytes / self.g.chunk_bytes();
        let first = (offset_bytes % self.g.chunk_bytes() / BLOCK_SIZE_U64) as usize;
        let slot = self
            .by_chunk
            .get(&(volume, chunk))
            .and_then(|l| self.slots[*l as usize].as_ref());
        for (i, o) in out.iter_mut().enumerate() {
            *o = match slot.and_then(|s| s.entries.get(first + i)) {
                Some(e) => (e.kind, e.version),
                None => (BlockKind::Unwritten, 0),
            };
        }
        slot.is_some()
    }

    /// The crc32c of each block of a range held as data (0 for blocks
    /// never written, zeroed or discarded), from the slot map: the crc the
    /// block was written with, which a read of it checks. Returns whether
    /// the chunk has a slot. The scrub compares it between replicas of
    /// equal version.
    pub fn block_crcs(&self, volume: u64, offset_bytes: u64, out: &mut [u32]) -> bool {
        let chunk = offset_bytes / self.g.chunk_bytes();
        let first = (offset_bytes % self.g.chunk_bytes() / BLOCK_SIZE_U64) as usize;
        let slot = self
            .by_chunk
            .get(&(volume, chunk))
            .and_then(|l| self.slots[*l as usize].as_ref());
        for (i, o) in out.iter_mut().enumerate() {
            *o = match slot.and_then(|s| s.entries.get(first + i)) {
                Some(e) if e.kind == BlockKind::Data => e.crc,
                _ => 0,
            };
        }
        slot.is_some()
    }

    /// The highest block version this shard holds (0 if none).
    pub fn max_version(&self) -> u64 {
        self.slots
            .iter()
            .flatten()
            .flat_map(|s| s.planned_version.iter().copied())
            .max()
            .unwrap_or(0)
    }

    /// Per volume, the highest block version this shard holds.
    pub fn max_versions_by_volume(&self) -> HashMap<u64, u64> {
        let mut m: HashMap<u64, u64> = HashMap::new();
        for s in self.slots.iter().flatten() {
            let v = s.planned_version.iter().copied().max().unwrap_or(0);
            let e = m.entry(s.owner.volume).or_default();
            *e = (*e).max(v);
        }
        m
    }

    /// The (volume, chunk) pairs this shard holds, in no particular order.
    pub fn chunks(&self) -> Vec<(u64, u64)> {
        self.by_chunk.keys().copied().collect()
    }

    /// One line of internal state, for diagnostics.
    pub fn describe(&self) -> String {
        let jb: Vec<String> = self
            .jorder
            .iter()
            .map(|&b| {
                format!(
                    "{}:{:?}/{}",
                    self.jbufs[b].seq, self.jbufs[b].state, self.jbufs[b].unfinished_ops
                )
            })
            .collect();
        let deferred: Vec<String> = self
            .deferred
            .iter()
            .map(|&id| {
                let op = &self.ops[id as usize];
                format!(
                    "{:?} v{} c{} cur{}/{} pend{}",
                    op.op, op.volume, op.chunk, op.cursor, op.count, op.pending
                )
            })
            .collect();
        let running: Vec<String> = self
            .ops
            .iter()
            .filter(|op| op.stage != Stage::Idle && op.stage != Stage::Deferred)
            .map(|op| {
                format!(
                    "{:?} {:?} v{} c{} cur{}/{} pend{}",
                    op.op, op.stage, op.volume, op.chunk, op.cursor, op.count, op.pending
                )
            })
            .collect();
        format!(
            "shard {} inflight {} sqes {} next_seq {} tail {} acked {} ckpt {} jorder [{}] running [{}] deferred [{}] failed {:?}",
            self.id,
            self.inflight(),
            self.inflight_sqes,
            self.next_seq,
            self.tail,
            self.acked_through,
            self.ckpt.is_some(),
            jb.join(" "),
            running.join("; "),
            deferred.join("; "),
            self.failed
        )
    }

    /// Chunks currently allocated in this shard.
    pub fn allocated_chunks(&self) -> usize {
        self.by_chunk.len()
    }
    pub fn free_slot_count(&self) -> usize {
        self.free_slots.len()
    }

    /// Submits a request; its completion comes from `poll`/`wait`.
    ///
    /// # Safety
    /// Every segment must be valid for reads (Write) or writes (Read) of its
    /// length until the completion carrying `req.tag` has been returned.
    pub unsafe fn submit(&mut self, req: &EngineRequest<'_>) -> Result<(), EngineError> {
        let chunk_bytes = self.g.chunk_bytes();
        let len_bytes = match req.op {
            EngineOp::Read | EngineOp::Write | EngineOp::Repair | EngineOp::Fill => {
                if req.segments.len() > SEGMENTS_MAX {
                    return Err(EngineError::TooManySegments {
                        count: req.segments.len(),
                        max: SEGMENTS_MAX,
                    });
                }
                if req
                    .segments
                    .iter()
                    .any(|s| !(s.addr as usize).is_multiple_of(512) || s.len % 512 != 0)
                {
                    let len_bytes = req.segments.iter().map(|s| s.len as u64).sum();
                    return Err(EngineError::Misaligned {
                        offset_bytes: req.offset_bytes,
                        len_bytes,
                    });
                }
                req.segments.iter().map(|s| s.len as u64).sum()
            }
            EngineOp::WriteZeroes | EngineOp::Discard | EngineOp::Release => req.len_bytes,
        };
        if req.chain.len() > LAYERS_MAX {
            return Err(EngineError::BadRange {
                offset_bytes: req.offset_bytes,
                len_bytes,
                max_bytes: 0,
            });
        }
        let in_block = req.offset_bytes % BLOCK_SIZE_U64;
        // A sector write: 512-byte sectors within one block, merged here.
        let sectors = req.op == EngineOp::Write
            && (in_block != 0 || !len_bytes.is_multiple_of(BLOCK_SIZE_U64))
            && in_block.is_multiple_of(512)
            && len_bytes.is_multiple_of(512)
            && in_block + len_bytes <= BLOCK_SIZE_U64;
        if !sectors
            && (in_block != 0 || !len_bytes.is_multiple_of(BLOCK_SIZE_U64) || len_bytes == 0)
        {
            return Err(EngineError::Misaligned {
                offset_bytes: req.offset_bytes,
                len_bytes,
            });
        }
        let max_bytes = match req.op {
            EngineOp::Read | EngineOp::Write | EngineOp::Repair | EngineOp::Fill => {
                self.max_request_bytes()
            }
            _ => chunk_bytes,
        };
        let chunk = req.offset_bytes / chunk_bytes;
        let in_chunk = req.offset_bytes % chunk_bytes;
        let partial_release =
            req.op == EngineOp::Release && (in_chunk != 0 || len_bytes != chunk_bytes);
        if len_bytes > max_bytes || in_chunk + len_bytes > chunk_bytes || partial_release {
            return Err(EngineError::BadRange {
                offset_bytes: req.offset_bytes,
                len_bytes,
                max_bytes,
            });
        }
        let owner = shard_for(&self.g, req.volume, chunk);
        if owner != self.id {
            return Err(EngineError::WrongShard {
                volume: req.volume,
                chunk,
                owner,
                shard: self.id,
            });
        }
        if let Some(e) = &self.failed {
            return Err(EngineError::Io {
                volume: req.volume,
                offset_bytes: req.offset_bytes,
                errno_text: e.clone(),
            });
        }
        let Some(id) = self.free_ops.pop() else {
            return Err(EngineError::QueueFull {
                inflight_max: self.ops.len(),
            });
        };
        let op = &mut self.ops[id as usize];
        op.tag = req.tag;
        op.op = req.op;
        op.volume = req.volume;
        op.chunk = chunk;
        op.first = (in_chunk / BLOCK_SIZE_U64) as u16;
        op.count = if sectors {
            1
        } else {
            (len_bytes / BLOCK_SIZE_U64) as u16
        };
        op.sub_at = if sectors { in_block as u16 } else { 0 };
        op.sub_len = if sectors { len_bytes as u16 } else { 0 };
        op.holding = false;
        op.merged = false;
        self.submitted += 1;
        op.seq = self.submitted;
        op.cursor = 0;
        op.version = req.version;
        op.epoch = req.epoch;
        op.segs.clear();
        op.segs.extend_from_slice(req.segments);
        op.chain.clear();
        op.chain.extend_from_slice(req.chain);
        op.layer_slots.clear();
        op.pending = 0;
        op.applied = 0;
        op.newer_version = 0;
        op.error = None;
        op.solo = false;
        op.jbufs.clear();
        op.local_slot = u32::MAX;
        op.stage = Stage::Idle;
        self.stats.ops += 1;
        self.start(id);
        Ok(())
    }

    /// Submits queued I/O and hands over every finished request without
    /// blocking. Returns the number handed over.
    pub fn poll(&mut self, done: &mut dyn FnMut(Completion)) -> usize {
        let n = self.reap_and_hand_out(done);
        self.prepare_io();
        self.submit_ring(0);
        n
    }

    /// Like `poll`, but blocks until at least one request finished, if any
    /// is in flight. Submitting and waiting share one system call.
    pub fn wait(&mut self, done: &mut dyn FnMut(Completion)) -> usize {
        loop {
            let n = self.reap_and_hand_out(done);
            self.prepare_io();
            if n > 0 || (self.inflight() == 0 && self.ckpt.is_none()) {
                self.submit_ring(0);
                return n;
            }
            if self.inflight_sqes == 0 {
                // Only deferred requests and nothing in the kernel that
                // could free what they wait for: hand back control rather
                // than sleep forever (cannot happen while invariants hold).
                debug_assert!(
                    false,
                    "requests deferred with no I/O in flight: {}",
                    self.describe()
                );
                return 0;
            }
            self.submit_ring(1);
        }
    }

    fn reap_and_hand_out(&mut self, done: &mut dyn FnMut(Completion)) -> usize {
        self.reap();
        let mut n = 0;
        while let Some(c) = self.done.pop_front() {
            done(c);
            n += 1;
        }
        n
    }

    /// Seals the open journal block, starts a flush and checkpoint work as
    /// needed; the caller submits.
    fn prepare_io(&mut self) {
        self.flush_journal();
        self.maybe_flush();
        self.maybe_checkpoint();
    }

    /// Drives every request to completion, then checkpoints the shard so the
    /// next open has no journal to replay.
    pub fn close(mut self) -> Result<(), EngineError> {
        let mut sink = |_c: Completion| {};
        while self.inflight() > 0 || self.ckpt.is_some() {
            self.wait(&mut sink);
        }
        if self.failed.is_none() && self.next_seq > self.tail {
            self.start_checkpoint();
            while self.ckpt.is_some() {
                self.wait(&mut sink);
            }
        }
        match self.failed {
            Some(e) => Err(EngineError::Os {
                path: "engine".into(),
                what: "close",
                errno_text: e,
            }),
            None => Ok(()),
        }
    }

    fn submit_ring(&mut self, want: usize) {
        if self.unsubmitted == 0 && want == 0 {
            return;
        }
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // Completion queue full: reap and retry.
                    self.reap();
                    continue;
                }
                Err(e) => {
                    self.fail(format!("io_uring_enter: {e}"));
                    break;
                }
            }
        }
        self.unsubmitted = 0;
    }

    fn reap(&mut self) {
        loop {
            let cqe = match self.ring.completion().next() {
                Some(c) => c,
                None => break,
            };
            self.inflight_sqes -= 1;
            let ud = cqe.user_data();
            let expected = ((ud >> 32) & 0xff_ffff) as i32 * 512;
            let res = checked_result(cqe.result(), expected, ud & UD_KIND);
            let id = ud & 0xffff_ffff;
            match ud & UD_KIND {
                UD_DATA | UD_META => self.op_io_done(id as u32, res),
                UD_JOURNAL => self.journal_done(id as usize, res),
                UD_CKPT => self.checkpoint_io_done(res),
                UD_FLUSH => self.flush_done(res),
                _ => unreachable!("unknown user_data {ud:#x}"),
            }
        }
        if !self.deferred.is_empty() {
            self.retry_deferred();
        }
    }

    fn fail(&mut self, why: String) {
        if self.failed.is_none() {
            tracing::error!(
                shard = self.id,
                "engine shard failed: {why}; refusing new requests"
            );
            self.failed = Some(why);
        }
    }

    fn retry_deferred(&mut self) {
        for _ in 0..self.deferred.len() {
            let Some(id) = self.deferred.pop_front() else {
                break;
            };
            self.ops[id as usize].stage = Stage::Idle;
            self.start(id);
        }
    }

    /// Starts (or continues) an op: plans its next phase and submits it.
    fn start(&mut self, id: u32) {
        match self.ops[id as usize].op {
            EngineOp::Read => self.start_read(id),
            EngineOp::Write | EngineOp::Repair | EngineOp::WriteZeroes | EngineOp::Discard => {
                self.start_mutation(id)
            }
            EngineOp::Release => self.start_release(id),
            EngineOp::Fill => self.start_fill(id),
        }
    }

    /// Frees the chunk's slot once the ops that started before this one are
    /// done; ops that start meanwhile wait (`releasing`), then find no slot.
    fn start_release(&mut self, id: u32) {
        let (volume, chunk) = (self.ops[id as usize].volume, self.ops[id as usize].chunk);
        let Some(local) = self.by_chunk.get(&(volume, chunk)).copied() else {
            self.discarded.forget((volume, chunk));
            return self.finish(id); // Nothing stored.
        };
        let room = self.journal_room(1) && self.sqe_room(2);
        let slot = self.slots[local as usize]
            .as_mut()
            .expect("indexed slot exists");
        if slot.freeing || slot.releasing.is_some_and(|r| r != id) {
            return self.defer(id);
        }
        slot.releasing = Some(id);
        self.bind_slot(id, local);
        let slot = self.slots[local as usize]
            .as_mut()
            .expect("indexed slot exists");
        if slot.ops_inflight > 1 || slot.reads_inflight > 0 || !room {
            return self.defer(id);
        }
        slot.freeing = true;
        self.ops[id as usize].stage = Stage::Freeing;
        let seq = self.append_record(id, &Record::Free { slot: local });
        self.write_slot_headers(id, local, seq, None);
    }

    fn defer(&mut self, id: u32) {
        self.ops[id as usize].stage = Stage::Deferred;
        self.deferred.push_back(id);
    }

    /// Binds an op to its slot once; `finish` unbinds it.
    fn bind_slot(&mut self, id: u32, local: u32) {
        let op = &mut self.ops[id as usize];
        if op.local_slot == u32::MAX {
            op.local_slot = local;
            self.slots[local as usize]
                .as_mut()
                .expect("bound slot exists")
                .ops_inflight += 1;
        }
    }

    /// Whether `sqes` more SQEs keep every in-flight request within the
    /// completion queue, so completions never overflow it.
    fn sqe_room(&self, sqes: u32) -> bool {
        self.inflight_sqes + sqes <= self.cq_budget
    }

    fn start_read(&mut self, id: u32) {
        if !self.ops[id as usize].chain.is_empty() {
            return self.start_layered_read(id);
        }
        let (volume, chunk) = (self.ops[id as usize].volume, self.ops[id as usize].chunk);
        let Some(local) = self.by_chunk.get(&(volume, chunk)).copied() else {
            // Never written (or released): zeroes.
            let op = &mut self.ops[id as usize];
            zero_fill(op, 0, op.count as usize * BLOCK_SIZE);
            op.applied = op.count as u32;
            return self.finish(id);
        };
        if !self.sqe_room(self.ops[id as usize].count as u32)
            || self.slots[local as usize]
                .as_ref()
                .is_some_and(|s| s.releasing.is_some())
        {
            return self.defer(id);
        }
        let slot_index = self.g.slot_of(self.id, local as u64);
        let slot = self.slots[local as usize]
            .as_mut()
            .expect("indexed slot exists");
        let op = &mut self.ops[id as usize];
        op.plan.clear();
        op.iov.clear();
        for i in 0..op.count {
            let e = slot.entries[(op.first + i) as usize];
            let action = if e.kind == BlockKind::Data {
                Action::ReadData
            } else {
                Action::ReadZero
            };
            op.plan.push(Planned {
                logical: op.first + i,
                phys: e.phys,
                crc: e.crc,
                action,
                layer: 0,
                version: 0,
            });
        }
        let mut i = 0;
        while i < op.plan.len() {
            let p = op.plan[i];
            if p.action == Action::ReadZero {
                zero_fill(op, i * BLOCK_SIZE, BLOCK_SIZE);
                i += 1;
                continue;
            }
            let j = run_end(&op.plan, i, Action::ReadData);
            let iov_at = op.iov.len();
            slice_segments(&op.segs, i * BLOCK_SIZE, (j - i) * BLOCK_SIZE, &mut op.iov);
            let sqe = rw_sqe(
                false,
                self.fd,
                &op.iov[iov_at..],
                self.g.phys_offset(slot_index, p.phys),
                0,
            )
            .user_data(io_ud(UD_DATA, id as u64, (j - i) * BLOCK_SIZE));
            op.pending += 1;
            push_sqe(
                &mut self.ring,
                &mut self.unsubmitted,
                &mut self.inflight_sqes,
                &sqe,
            );
            i = j;
        }
        if op.pending == 0 {
            op.applied = op.count as u32;
            return self.finish(id);
        }
        slot.reads_inflight += 1;
        op.stage = Stage::Running;
        self.bind_slot(id, local);
    }

    /// A read through layers (`EngineRequest::chain`): each block comes
    /// from the first layer that holds it. Runs are contiguous physical
    /// blocks of one slot; every slot read is held (`reads_inflight`) until
    /// the read is done, so none of its blocks is reused under it.
    fn start_layered_read(&mut self, id: u32) {
        let chunk = self.ops[id as usize].chunk;
        let layers = 1 + self.ops[id as usize].chain.len();
        let mut slots = std::mem::take(&mut self.ops[id as usize].layer_slots);
        slots.clear();
        for l in 0..layers {
            let key = if l == 0 {
                self.ops[id as usize].volume
            } else {
                self.ops[id as usize].chain[l - 1]
            };
            slots.push(
                self.by_chunk
                    .get(&(key, chunk))
                    .copied()
                    .unwrap_or(u32::MAX),
            );
        }
        let busy = slots.iter().any(|&l| {
            l != u32::MAX
                && self.slots[l as usize]
                    .as_ref()
                    .is_some_and(|s| s.releasing.is_some() || s.freeing)
        });
        if busy || !self.sqe_room(self.ops[id as usize].count as u32) {
            slots.clear();
            self.ops[id as usize].layer_slots = slots;
            return self.defer(id);
        }
        let op = &mut self.ops[id as usize];
        op.plan.clear();
        op.iov.clear();
        for i in 0..op.count {
            let logical = op.first + i;
            let mut planned = Planned {
                logical,
                phys: PHYS_NONE,
                crc: 0,
                action: Action::ReadZero,
                layer: 0,
                version: 0,
            };
            for (l, &local) in slots.iter().enumerate() {
                let Some(slot) = self.slots.get(local as usize).and_then(|s| s.as_ref()) else {
                    continue;
                };
                let e = slot.entries[logical as usize];
                match e.kind {
                    BlockKind::Unwritten => continue,
                    BlockKind::Zero => {}
                    BlockKind::Data => {
                        planned.phys = e.phys;
                        planned.crc = e.crc;
                        planned.action = Action::ReadData;
                    }
                }
                planned.layer = l as u8;
                break;
            }
            op.plan.push(planned);
        }
        let mut i = 0;
        while i < op.plan.len() {
            let p = op.plan[i];
            if p.action == Action::ReadZero {
                zero_fill(op, i * BLOCK_SIZE, BLOCK_SIZE);
                i += 1;
                continue;
            }
            let j = run_end(&op.plan, i, Action::ReadData);
            let iov_at = op.iov.len();
            slice_segments(&op.segs, i * BLOCK_SIZE, (j - i) * BLOCK_SIZE, &mut op.iov);
            let slot_index = self.g.slot_of(self.id, slots[p.layer as usize] as u64);
            let sqe = rw_sqe(
                false,
                self.fd,
                &op.iov[iov_at..],
                self.g.phys_offset(slot_index, p.phys),
                0,
            )
            .user_data(io_ud(UD_DATA, id as u64, (j - i) * BLOCK_SIZE));
            op.pending += 1;
            push_sqe(
                &mut self.ring,
                &mut self.unsubmitted,
                &mut self.inflight_sqes,
                &sqe,
            );
            i = j;
        }
        if op.pending == 0 {
            slots.clear();
            op.layer_slots = slots;
            op.applied = op.count as u32;
            return self.finish(id);
        }
        for &local in slots.iter() {
            if let Some(slot) = self.slots.get_mut(local as usize).and_then(|s| s.as_mut()) {
                slot.reads_inflight += 1;
                slot.ops_inflight += 1;
            }
        }
        let op = &mut self.ops[id as usize];
        op.layer_slots = slots;
        op.stage = Stage::Running;
    }

    /// Lets go of the slots a layered read (or a merge from a lower layer)
    /// held; frees their blocks released meanwhile.
    fn release_layer_slots(&mut self, id: u32) {
        let slots = std::mem::take(&mut self.ops[id as usize].layer_slots);
        for &local in slots.iter() {
            if let Some(slot) = self.slots.get_mut(local as usize).and_then(|s| s.as_mut()) {
                slot.reads_inflight = slot.reads_inflight.saturating_sub(1);
                slot.ops_inflight = slot.ops_inflight.saturating_sub(1);
                if slot.reads_inflight == 0 {
                    while let Some(p) = slot.pending_free.pop() {
                        let p = p as usize;
                        slot.free_phys[p / 64] |= 1 << (p % 64);
                    }
                }
            }
        }
        let mut slots = slots;
        slots.clear();
        self.ops[id as usize].layer_slots = slots;
    }

    /// `EngineOp::Fill`, read stage: picks the blocks to copy (the layer
    /// has no entry and no write planned for them; the first lower layer
    /// holding them holds data) and reads them into the request's segments,
    /// holding the lower slots (`layer_slots`) while reading. The write
    /// stage (`fill_phase`) follows in `fill_read_done`.
    fn start_fill(&mut self, id: u32) {
        if self.ops[id as usize].merged {
            return self.fill_phase(id);
        }
        let chunk = self.ops[id as usize].chunk;
        let layers = 1 + self.ops[id as usize].chain.len();
        let mut slots = std::mem::take(&mut self.ops[id as usize].layer_slots);
        slots.clear();
        for l in 0..layers {
            let key = if l == 0 {
                self.ops[id as usize].volume
            } else {
                self.ops[id as usize].chain[l - 1]
            };
            slots.push(
                self.by_chunk
                    .get(&(key, chunk))
                    .copied()
                    .unwrap_or(u32::MAX),
            );
        }
        let busy = slots.iter().any(|&l| {
            l != u32::MAX
                && self.slots[l as usize]
                    .as_ref()
                    .is_some_and(|s| s.releasing.is_some() || s.freeing)
        });
        if busy || !self.sqe_room(self.ops[id as usize].count as u32) {
            slots.clear();
            self.ops[id as usize].layer_slots = slots;
            return self.defer(id);
        }
        let op = &mut self.ops[id as usize];
        op.fill.clear();
        op.iov.clear();
        let head = self.slots.get(slots[0] as usize).and_then(|s| s.as_ref());
        for k in 0..op.count {
            let logical = op.first + k;
            let l = logical as usize;
            if head.is_some_and(|h| {
                h.entries[l].kind != BlockKind::Unwritten || h.planned_version[l] != 0
            }) {
                // Written, zeroed or being written: the layer's own.
                continue;
            }
            for (layer, &local) in slots.iter().enumerate().skip(1) {
                let Some(slot) = self.slots.get(local as usize).and_then(|s| s.as_ref()) else {
                    continue;
                };
                let e = slot.entries[l];
                match e.kind {
                    BlockKind::Unwritten => continue,
                    // Reads as zeroes through the chain and without it.
                    BlockKind::Zero => {}
                    BlockKind::Data => op.fill.push(Planned {
                        logical,
                        phys: e.phys,
                        crc: e.crc,
                        action: Action::ReadData,
                        layer: layer as u8,
                        version: e.version,
                    }),
                }
                break;
            }
        }
        if op.fill.is_empty() {
            slots.clear();
            op.layer_slots = slots;
            return self.finish(id);
        }
        // One read per run of blocks consecutive in the chunk and on disk,
        // in one layer, each into its place in the segments.
        let mut i = 0;
        while i < op.fill.len() {
            let p = op.fill[i];
            let mut j = i + 1;
            while j < op.fill.len()
                && op.fill[j].layer == p.layer
                && op.fill[j].logical as usize == p.logical as usize + (j - i)
                && op.fill[j].phys as usize == p.phys as usize + (j - i)
            {
                j += 1;
            }
            let iov_at = op.iov.len();
            slice_segments(
                &op.segs,
                (p.logical - op.first) as usize * BLOCK_SIZE,
                (j - i) * BLOCK_SIZE,
                &mut op.iov,
            );
            let slot_index = self.g.slot_of(self.id, slots[p.layer as usize] as u64);
            let sqe = rw_sqe(
                false,
                self.fd,
                &op.iov[iov_at..],
                self.g.phys_offset(slot_index, p.phys),
                0,
            )
            .user_data(io_ud(UD_DATA, id as u64, (j - i) * BLOCK_SIZE));
            op.pending += 1;
            push_sqe(
                &mut self.ring,
                &mut self.unsubmitted,
                &mut self.inflight_sqes,
                &sqe,
            );
            i = j;
        }
        // The layer itself is not read: only the lower slots are held.
        slots[0] = u32::MAX;
        for &local in slots.iter() {
            if let Some(slot) = self.slots.get_mut(local as usize).and_then(|s| s.as_mut()) {
                slot.reads_inflight += 1;
                slot.ops_inflight += 1;
            }
        }
        let op = &mut self.ops[id as usize];
        op.layer_slots = slots;
        op.stage = Stage::Filling;
    }

    /// A fill's reads are back: check each block's crc, then write.
    fn fill_read_done(&mut self, id: u32) {
        self.release_layer_slots(id);
        let chunk_bytes = self.g.chunk_bytes();
        let op = &mut self.ops[id as usize];
        op.stage = Stage::Idle;
        if op.error.is_none() {
            for p in op.fill.iter() {
                if crc_of(&op.segs, (p.logical - op.first) as usize * BLOCK_SIZE) != p.crc {
                    let volume = op.chain[p.layer as usize - 1];
                    let offset_bytes = op.chunk * chunk_bytes + p.logical as u64 * BLOCK_SIZE_U64;
                    tracing::error!(
                        volume,
                        offset_bytes,
                        shard = self.id,
                        "checksum mismatch on the read of a fill: not copied"
                    );
                    op.error = Some(EngineError::Checksum {
                        volume,
                        offset_bytes,
                    });
                    break;
                }
            }
        }
        if op.error.is_some() {
            return self.finish(id);
        }
        op.merged = true;
        op.cursor = 0;
        self.fill_phase(id);
    }

    /// Whether the blocks of a fill not yet planned still come from what
    /// it read: the same lower layer, holding data at the same version (a
    /// layer under a head is frozen, but a write of the snapshot's cut, a
    /// repair or a release may still reach it).
    fn fill_sources_unchanged(&self, id: u32) -> bool {
        let op = &self.ops[id as usize];
        op.fill[op.cursor as usize..].iter().all(|p| {
            let l = p.logical as usize;
            for (k, &key) in op.chain.iter().enumerate() {
                let Some(e) = self
                    .by_chunk
                    .get(&(key, op.chunk))
                    .and_then(|&local| self.slots[local as usize].as_ref())
                    .map(|s| s.entries[l])
                else {
                    continue;
                };
                if e.kind == BlockKind::Unwritten {
                    continue;
                }
                return k + 1 == p.layer as usize
                    && e.kind == BlockKind::Data
                    && e.version == p.version;
            }
            false
        })
    }

    /// A fill's write stage: one phase of the blocks read (as many as the
    /// free physical blocks and the journal allow), each written only if
    /// the layer still has no entry and no write planned for it; a block a
    /// sector write holds is waited for. Allocates the layer's slot first
    /// if it has none.
    fn fill_phase(&mut self, id: u32) {
        if !self.fill_sources_unchanged(id) {
            // Read again (blocks copied meanwhile are the layer's now).
            let op = &mut self.ops[id as usize];
            op.merged = false;
            op.cursor = 0;
            op.fill.clear();
            return self.start_fill(id);
        }
        let (volume, chunk, epoch) = {
            let op = &self.ops[id as usize];
            (op.volume, op.chunk, op.epoch)
        };
        let local = match self.by_chunk.get(&(volume, chunk)).copied() {
            Some(local) => {
                let slot = self.slots[local as usize]
                    .as_ref()
                    .expect("indexed slot exists");
                let started = self.ops[id as usize].local_slot == local;
                if slot.freeing || (slot.releasing.is_some() && !started) {
                    return self.defer(id);
                }
                local
            }
            None => match self.alloc_slot(id, volume, chunk, epoch) {
                Some(local) => local,
                None => return,
            },
        };
        self.bind_slot(id, local);
        let remaining = {
            let op = &self.ops[id as usize];
            op.fill.len() - op.cursor as usize
        };
        if !self.journal_room(remaining.min(self.g.spare_blocks as usize + 1) + 1)
            || !self.sqe_room(RUNS_PER_PHASE_MAX)
        {
            return self.defer(id);
        }
        let slot_index = self.g.slot_of(self.id, local as u64);
        let op = &mut self.ops[id as usize];
        let slot = self.slots[local as usize]
            .as_mut()
            .expect("slot of running op");
        op.plan.clear();
        op.iov.clear();
        let mut last: Option<(u16, u16)> = None;
        let mut runs = 0;
        while (op.cursor as usize) < op.fill.len() {
            let f = op.fill[op.cursor as usize];
            let l = f.logical as usize;
            if slot.entries[l].kind != BlockKind::Unwritten || slot.planned_version[l] != 0 {
                // A write got there first: it is the layer's own.
                op.cursor += 1;
                last = None;
                continue;
            }
            if slot.is_held(f.logical) {
                // A sector write is merging it: wait, then look again.
                break;
            }
            let next = last
                .filter(|&(logical, _)| logical + 1 == f.logical)
                .map(|(_, p)| p as usize + 1)
                .filter(|&p| slot.is_free(p))
                .map(|p| p as u16);
            if next.is_none() && last.is_some() {
                runs += 1;
                if runs >= RUNS_PER_PHASE_MAX {
                    break;
                }
            }
            let Some(phys) = next.or_else(|| slot.find_free()) else {
                break;
            };
            slot.take_phys(phys);
            last = Some((f.logical, phys));
            slot.planned_version[l] = f.version;
            op.plan.push(Planned {
                logical: f.logical,
                phys,
                crc: f.crc,
                action: Action::Write,
                layer: 0,
                version: f.version,
            });
            op.cursor += 1;
            if op.plan.len() > self.g.spare_blocks as usize {
                break;
            }
        }
        if op.plan.is_empty() && (op.cursor as usize) < op.fill.len() && op.pending == 0 {
            // Held by a sector write, or no free physical block yet.
            return self.defer(id);
        }
        op.stage = Stage::Running;
        for i in 0..self.ops[id as usize].plan.len() {
            let p = self.ops[id as usize].plan[i];
            self.append_record(
                id,
                &Record::Write {
                    slot: local,
                    logical: p.logical,
                    phys: p.phys,
                    crc: p.crc,
                    version: p.version,
                },
            );
        }
        // One data write per run consecutive in the chunk and on disk.
        let op = &mut self.ops[id as usize];
        let n = op.plan.len();
        let mut i = 0;
        while i < n {
            let p = op.plan[i];
            let mut j = i + 1;
            while j < n
                && op.plan[j].logical as usize == p.logical as usize + (j - i)
                && op.plan[j].phys as usize == p.phys as usize + (j - i)
            {
                j += 1;
            }
            let iov_at = op.iov.len();
            slice_segments(
                &op.segs,
                (p.logical - op.first) as usize * BLOCK_SIZE,
                (j - i) * BLOCK_SIZE,
                &mut op.iov,
            );
            let sqe = rw_sqe(
                true,
                self.fd,
                &op.iov[iov_at..],
                self.g.phys_offset(slot_index, p.phys),
                0,
            )
            .user_data(io_ud(UD_DATA, id as u64, (j - i) * BLOCK_SIZE));
            op.pending += 1;
            self.stats.data_bytes_written += ((j - i) * BLOCK_SIZE) as u64;
            push_sqe(
                &mut self.ring,
                &mut self.unsubmitted,
                &mut self.inflight_sqes,
                &sqe,
            );
            i = j;
        }
        if self.ops[id as usize].pending == 0 {
            // Nothing left to write: no I/O to wait for.
            self.phase_done(id);
        }
    }

    fn start_mutation(&mut self, id: u32) {
        let (volume, chunk, epoch, kind) = {
            let op = &self.ops[id as usize];
            (op.volume, op.chunk, op.epoch, op.op)
        };
        let local = match self.by_chunk.get(&(volume, chunk)).copied() {
            Some(local) => {
                let slot = self.slots[local as usize]
                    .as_ref()
                    .expect("indexed slot exists");
                // An op that already holds the slot (a later phase) goes on:
                // the release waits for it.
                let started = self.ops[id as usize].local_slot == local;
                if slot.freeing || (slot.releasing.is_some() && !started) {
                    return self.defer(id);
                }
                local
            }
            None if !(matches!(kind, EngineOp::Write | EngineOp::Repair)
                || celer_device::era_of(volume) > 0
                    && matches!(kind, EngineOp::WriteZeroes | EngineOp::Discard)) =>
            {
                // Nothing stored: already zero. Versions of chunks that hold
                // no slot are not kept (see docs/architecture.md). A layer
                // above era 0 records its zeroes (below): they hide the
                // layers under it. (A repair allocates like a write: it
                // copies a block this member missed, maybe its chunk's
                // first.)
                return self.finish(id);
            }
            None if self
                .discarded
                .covers((volume, chunk), self.ops[id as usize].version)
                .is_some() =>
            {
                // A late write older than the discard that freed the chunk:
                // dropped, as the slot's versions would have dropped it.
                let op = &mut self.ops[id as usize];
                if let Some(v) = self.discarded.covers((volume, chunk), op.version) {
                    if v > op.version {
                        op.newer_version = v;
                    }
                }
                return self.finish(id);
            }
            None => match self.alloc_slot(id, volume, chunk, epoch) {
                Some(local) => local,
                None => return,
            },
        };
        self.bind_slot(id, local);
        if self.ops[id as usize].sub_len > 0 {
            self.start_merge(id, local);
        } else {
            self.plan_phase(id, local);
        }
    }

    /// Allocates a slot for (`volume`, `chunk`) to op `id`, as a first
    /// write does: the Alloc record goes with the op's first phase (the
    /// slot headers with the next checkpoint, `SlotState::header_due`).
    /// `None`: the op was deferred (no room yet), or failed with `NoSpace`
    /// and finished.
    fn alloc_slot(&mut self, id: u32, volume: u64, chunk: u64, epoch: u64) -> Option<u32> {
        // Room for the Alloc record and the whole first phase, so that the op
        // does not have to wait between allocating and planning.
        if !self.journal_room(1 + self.g.spare_blocks as usize + 2)
            || !self.sqe_room(2 + RUNS_PER_PHASE_MAX)
        {
            self.defer(id);
            return None;
        }
        let Some(local) = self.free_slots.pop() else {
            self.ops[id as usize].error = Some(EngineError::NoSpace { shard: self.id });
            self.finish(id);
            return None;
        };
        let owner = SlotOwner {
            volume,
            chunk,
            epoch,
        };
        let seq = self.append_record(id, &Record::Alloc { slot: local, owner });
        let mut state = SlotState::new(
            &self.g,
            owner,
            seq,
            vec![BlockEntry::UNWRITTEN; self.g.chunk_blocks as usize],
            0,
        );
        // The slot headers (owner, for a rebuild without the index) are
        // written by the next checkpoint, before it lets the journal reuse
        // this Alloc record; until then the record describes the slot, to
        // a replay and to a rebuild alike. Writing them here made a chunk's
        // first write in a layer four device writes instead of two (the
        // first write after a snapshot 1.8x a write's latency).
        state.header_due = true;
        state.dirty = true;
        if let Some(v) = self.discarded.take((volume, chunk)) {
            // Late writes at or below the discard stay dropped on
            // every block of the new slot (in memory, as above).
            state.planned_version.fill(v);
        }
        self.slots[local as usize] = Some(state);
        self.by_chunk.insert((volume, chunk), local);
        Some(local)
    }

    /// A sector write: hold the block, read it, merge, then write it whole
    /// (`plan_phase`). Waits while another op holds the block or has a
    /// mutation of it running, so it merges into the committed content and
    /// its journal record follows theirs (journal order = version order).
    fn start_merge(&mut self, id: u32, local: u32) {
        let op = &self.ops[id as usize];
        let b = op.first;
        let slot = self.slots[local as usize]
            .as_ref()
            .expect("slot of running op");
        if op.merged || op.version <= slot.planned_version[b as usize] {
            // Merged (deferred afterwards for room), or older than the
            // block: plan_phase writes it, or skips it as any write.
            return self.plan_phase(id, local);
        }
        if slot.is_held(b) || !self.sqe_room(1) || self.block_busy(id, b) {
            return self.defer(id);
        }
        let slot_index = self.g.slot_of(self.id, local as u64);
        let slot = self.slots[local as usize]
            .as_mut()
            .expect("slot of running op");
        slot.set_held(b, true);
        let mut e = slot.entries[b as usize];
        let mut slot_index = slot_index;
        if e.kind == BlockKind::Unwritten && !self.ops[id as usize].chain.is_empty() {
            // Not in this layer: merge into the block of the first layer
            // under it that holds one, and hold that slot while reading.
            let chunk = self.ops[id as usize].chunk;
            for k in 0..self.ops[id as usize].chain.len() {
                let key = self.ops[id as usize].chain[k];
                let Some(lower) = self.by_chunk.get(&(key, chunk)).copied() else {
                    continue;
                };
                let Some(ls) = self.slots[lower as usize].as_mut() else {
                    continue;
                };
                let le = ls.entries[b as usize];
                if le.kind == BlockKind::Unwritten {
                    continue;
                }
                e = le;
                if le.kind == BlockKind::Data {
                    ls.reads_inflight += 1;
                    ls.ops_inflight += 1;
                    slot_index = self.g.slot_of(self.id, lower as u64);
                    self.ops[id as usize].layer_slots.push(lower);
                }
                break;
            }
        }
        let op = &mut self.ops[id as usize];
        op.holding = true;
        if e.kind != BlockKind::Data {
            // Never written or zeroed: the sectors merge into zeroes.
            op.merge_buf.fill(0);
            op.merge_crc = crc32c::crc32c(&op.merge_buf[..BLOCK_SIZE]);
            return self.merge_apply(id, local);
        }
        op.merge_crc = e.crc;
        op.stage = Stage::Merging;
        op.pending += 1;
        let sqe = opcode::Read::new(
            types::Fd(self.fd),
            op.merge_buf.as_mut_ptr(),
            BLOCK_SIZE as u32,
        )
        .offset(self.g.phys_offset(slot_index, e.phys))
        .build()
        .user_data(io_ud(UD_DATA, id as u64, BLOCK_SIZE));
        push_sqe(
            &mut self.ring,
            &mut self.unsubmitted,
            &mut self.inflight_sqes,
            &sqe,
        );
    }

    /// Whether the sector write `id` must wait before it reads block `b`:
    /// an op submitted before it will write the block (running or waiting),
    /// or one submitted after it has planned a write of the block and not
    /// committed it yet. So a sector write merges into the committed content,
    /// after the writes submitted before it (for one writer, its version
    /// order: an older write of it is not refused as older because a newer
    /// one went first), and its journal record follows theirs.
    fn block_busy(&self, id: u32, b: u16) -> bool {
        if self.inflight() <= 1 {
            return false;
        }
        let me = &self.ops[id as usize];
        self.ops.iter().enumerate().any(|(j, o)| {
            j as u32 != id
                && o.stage != Stage::Idle
                && o.volume == me.volume
                && o.chunk == me.chunk
                && matches!(
                    o.op,
                    EngineOp::Write | EngineOp::WriteZeroes | EngineOp::Discard
                )
                && if o.seq < me.seq {
                    (o.first..o.first + o.count).contains(&b)
                } else {
                    o.stage == Stage::Running && (o.first..o.first + o.cursor).contains(&b)
                }
        })
    }

    /// The sector write's read is back: check the block, then merge.
    fn merge_read_done(&mut self, id: u32) {
        self.release_layer_slots(id);
        let local = self.ops[id as usize].local_slot;
        let op = &mut self.ops[id as usize];
        op.stage = Stage::Idle;
        if op.error.is_none() && crc32c::crc32c(&op.merge_buf[..BLOCK_SIZE]) != op.merge_crc {
            let offset_bytes = op.chunk * self.g.chunk_bytes() + op.first as u64 * BLOCK_SIZE_U64;
            tracing::error!(
                volume = op.volume,
                offset_bytes,
                shard = self.id,
                "checksum mismatch on the read of a sector write: not merged"
            );
            op.error = Some(EngineError::Checksum {
                volume: op.volume,
                offset_bytes,
            });
        }
        if op.error.is_some() {
            return self.finish(id);
        }
        self.merge_apply(id, local);
    }

    /// Copies the request's sectors over the block read into `merge_buf`
    /// and writes the whole block.
    fn merge_apply(&mut self, id: u32, local: u32) {
        let op = &mut self.ops[id as usize];
        let (at, len) = (op.sub_at as usize, op.sub_len as usize);
        let mut to = at;
        let dst = op.merge_buf.as_mut_ptr();
        for_each_piece(&op.segs, 0, len, |addr, take| {
            // SAFETY: the submit contract keeps the segment valid for reads;
            // `to + take <= at + len <= BLOCK_SIZE` (checked at submit).
            unsafe { std::ptr::copy_nonoverlapping(addr, dst.add(to), take) };
            to += take;
        });
        op.segs.clear();
        op.segs.push(Segment {
            addr: dst,
            len: BLOCK_SIZE,
        });
        op.merged = true;
        self.plan_phase(id, local);
    }

    /// Plans and submits the next phase of a write/zero/discard.
    fn plan_phase(&mut self, id: u32, local: u32) {
        let slot_index = self.g.slot_of(self.id, local as u64);
        // Journal room for the worst case of this phase.
        let remaining = {
            let op = &self.ops[id as usize];
            (op.count - op.cursor) as usize
        };
        if !self.journal_room(remaining.min(self.g.spare_blocks as usize + 1) + 1)
            || !self.sqe_room(RUNS_PER_PHASE_MAX)
        {
            return self.defer(id);
        }
        let op = &mut self.ops[id as usize];
        let slot = self.slots[local as usize]
            .as_mut()
            .expect("slot of running op");
        op.plan.clear();
        op.iov.clear();
        let mut last_phys: Option<u16> = None;
        let mut runs = 0;
        let is_write = matches!(op.op, EngineOp::Write | EngineOp::Repair);
        // A repair rewrites a block at its own version; anything else needs
        // a newer one.
        let equal_applies = op.op == EngineOp::Repair;
        let mut k = op.cursor;
        while k < op.count {
            let logical = op.first + k;
            let planned = slot.planned_version[logical as usize];
            if op.version < planned || (op.version == planned && !equal_applies) {
                let stored = slot.planned_version[logical as usize];
                if stored > op.version {
                    op.newer_version = op.newer_version.max(stored);
                }
                op.plan.push(Planned {
                    logical,
                    phys: PHYS_NONE,
                    crc: 0,
                    action: Action::Skip,
                    layer: 0,
                    version: 0,
                });
                last_phys = None;
                k += 1;
                continue;
            }
            if slot.is_held(logical) && !op.holding {
                // A sector write is merging this block: wait for it.
                break;
            }
            if !is_write {
                last_phys = None;
                slot.planned_version[logical as usize] = op.version;
                op.plan.push(Planned {
                    logical,
                    phys: PHYS_NONE,
                    crc: 0,
                    action: Action::Zero,
                    layer: 0,
                    version: 0,
                });
                k += 1;
                // As for writes: a phase journals at most what the room
                // check above counted (a whole-chunk zeroing went over it
                // and panicked in `append_record` on a nearly full journal).
                if op.plan.len() > self.g.spare_blocks as usize {
                    break;
                }
                continue;
            }
            let next = last_phys
                .map(|p| p as usize + 1)
                .filter(|p| slot.is_free(*p))
                .map(|p| p as u16);
            if next.is_none() && last_phys.is_some() {
                runs += 1;
                if runs >= RUNS_PER_PHASE_MAX {
                    break;
                }
            }
            let Some(phys) = next.or_else(|| slot.find_free()) else {
                break;
            };
            slot.take_phys(phys);
            last_phys = Some(phys);
            let crc = crc_of(&op.segs, k as usize * BLOCK_SIZE);
            slot.planned_version[logical as usize] = op.version;
            op.plan.push(Planned {
                logical,
                phys,
                crc,
                action: Action::Write,
                layer: 0,
                version: 0,
            });
            k += 1;
            if op.plan.len() > self.g.spare_blocks as usize {
                break;
            }
        }
        if op.plan.is_empty() {
            // No free physical block (wait for in-flight writes to release
            // some), or the next block is held by a sector write.
            return self.defer(id);
        }
        op.stage = Stage::Running;
        let version = op.version;
        // Journal records.
        for i in 0..self.ops[id as usize].plan.len() {
            let p = self.ops[id as usize].plan[i];
            let rec = match p.action {
                Action::Write => Record::Write {
                    slot: local,
                    logical: p.logical,
                    phys: p.phys,
                    crc: p.crc,
                    version,
                },
                Action::Zero => Record::Zero {
                    slot: local,
                    logical: p.logical,
                    version,
                },
                _ => continue,
            };
            self.append_record(id, &rec);
        }
        // A request alone in the shard (QD1) writes its data and its own
        // journal block in parallel, both with RWF_DSYNC: each is durable on
        // completion, no fsync worker is woken, and the thread sleeps once.
        // Everything else is served by group commit (one fdatasync a batch).
        // A chunk's first write qualifies too: its Alloc record is in the
        // same journal block, and its slot headers wait for the checkpoint
        // (they used to be plain writes that needed the fdatasync).
        let solo = {
            let op = &self.ops[id as usize];
            op.jbufs.len() == 1
                && self.inflight() == 1
                && self.open_jb == Some(op.jbufs[0])
                && self.jbufs[op.jbufs[0]].waiters.len() == 1
        };
        // Data writes, one per contiguous physical run.
        let op = &mut self.ops[id as usize];
        op.solo = solo;
        let base = op.cursor as usize;
        let n = op.plan.len();
        let mut i = 0;
        while i < n {
            let p = op.plan[i];
            if p.action != Action::Write {
                i += 1;
                continue;
            }
            let j = run_end(&op.plan, i, Action::Write);
            let iov_at = op.iov.len();
            slice_segments(
                &op.segs,
                (base + i) * BLOCK_SIZE,
                (j - i) * BLOCK_SIZE,
                &mut op.iov,
            );
            let sqe = rw_sqe(
                true,
                self.fd,
                &op.iov[iov_at..],
                self.g.phys_offset(slot_index, p.phys),
                if solo { libc::RWF_DSYNC } else { 0 },
            )
            .user_data(io_ud(UD_DATA, id as u64, (j - i) * BLOCK_SIZE));
            op.pending += 1;
            self.stats.data_bytes_written += ((j - i) * BLOCK_SIZE) as u64;
            self.stats.user_bytes_written += ((j - i) * BLOCK_SIZE) as u64;
            push_sqe(
                &mut self.ring,
                &mut self.unsubmitted,
                &mut self.inflight_sqes,
                &sqe,
            );
            i = j;
        }
        op.cursor += n as u16;
        if solo {
            self.seal_and_write_journal(true);
        }
        let op = &mut self.ops[id as usize];
        if op.pending == 0 {
            // Everything skipped: no I/O to wait for.
            self.phase_done(id);
        }
    }

    fn write_slot_headers(&mut self, id: u32, local: u32, seq: u64, owner: Option<SlotOwner>) {
        let slot_index = self.g.slot_of(self.id, local as u64);
        let op = &mut self.ops[id as usize];
        layout::encode_slot_header(self.g.disk_uuid, slot_index, seq, owner, &mut op.meta);
        let ptr = op.meta.as_ptr();
        for copy in 0..2 {
            let sqe = opcode::Write::new(types::Fd(self.fd), ptr, BLOCK_SIZE as u32)
                .offset(self.g.header_offset(slot_index, copy))
                .build()
                .user_data(io_ud(UD_META, id as u64, BLOCK_SIZE));
            self.ops[id as usize].pending += 1;
            self.stats.meta_bytes_written += BLOCK_SIZE_U64;
            push_sqe(
                &mut self.ring,
                &mut self.unsubmitted,
                &mut self.inflight_sqes,
                &sqe,
            );
        }
    }

    /// Whether `records` more records fit in the journal without waiting.
    fn journal_room(&self, records: usize) -> bool {
        let open_left = self
            .open_jb
            .map(|b| RECORDS_PER_JOURNAL_BLOCK - self.jbufs[b].count)
            .unwrap_or(0);
        let new_blocks = records
            .saturating_sub(open_left)
            .div_ceil(RECORDS_PER_JOURNAL_BLOCK);
        let free_bufs = self
            .jbufs
            .iter()
            .filter(|b| b.state == JbState::Free)
            .count();
        let ring_left =
            (self.tail + self.g.journal_blocks as u64).saturating_sub(self.next_seq + 1);
        new_blocks <= free_bufs && (new_blocks as u64) <= ring_left
    }

    /// Appends a record to the open journal block (opening one if needed) and
    /// makes `id` wait for that block. Returns the block's sequence number.
    fn append_record(&mut self, id: u32, rec: &Record) -> u64 {
        let b = match self.open_jb {
            Some(b) if self.jbufs[b].count < RECORDS_PER_JOURNAL_BLOCK => b,
            _ => {
                if self.open_jb.is_some() {
                    self.seal_and_write_journal(false);
                }
                let b = self
                    .jbufs
                    .iter()
                    .position(|b| b.state == JbState::Free)
                    .expect("journal_room checked");
                let seq = self.next_seq;
                self.next_seq += 1;
                let jb = &mut self.jbufs[b];
                jb.state = JbState::Open;
                jb.seq = seq;
                jb.count = 0;
                jb.waiters.clear();
                jb.unfinished_ops = 0;
                self.jorder.push_back(b);
                self.open_jb = Some(b);
                b
            }
        };
        let jb = &mut self.jbufs[b];
        let at = layout::JOURNAL_HEADER_BYTES + jb.count * RECORD_BYTES;
        layout::encode_record(rec, &mut jb.buf[at..at + RECORD_BYTES]);
        jb.count += 1;
        if jb.waiters.last() != Some(&id) {
            jb.waiters.push(id);
            jb.unfinished_ops += 1;
            let op = &mut self.ops[id as usize];
            op.pending += 1;
            op.jbufs.push(b);
        }
        jb.seq
    }

    fn flush_journal(&mut self) {
        if self.open_jb.is_some_and(|b| self.jbufs[b].count > 0) {
            self.seal_and_write_journal(false);
        }
    }

    /// Writes the open journal block; with `dsync` it is durable when it
    /// completes (RWF_DSYNC), otherwise it waits for the next flush.
    fn seal_and_write_journal(&mut self, dsync: bool) {
        let Some(b) = self.open_jb.take() else { return };
        let jb = &mut self.jbufs[b];
        layout::seal_journal_block(
            self.g.disk_uuid,
            self.id,
            jb.seq,
            self.acked_through,
            jb.count,
            &mut jb.buf,
        );
        jb.state = JbState::Writing;
        jb.dsync = dsync;
        let sqe = opcode::Write::new(types::Fd(self.fd), jb.buf.as_ptr(), BLOCK_SIZE as u32)
            .offset(self.g.journal_block_offset(self.id, jb.seq))
            .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
            .build()
            .user_data(io_ud(UD_JOURNAL, b as u64, BLOCK_SIZE));
        self.stats.journal_bytes_written += BLOCK_SIZE_U64;
        push_sqe(
            &mut self.ring,
            &mut self.unsubmitted,
            &mut self.inflight_sqes,
            &sqe,
        );
    }

    fn journal_done(&mut self, b: usize, res: i32) {
        // The reason, for the shard and for every op waiting on the block.
        let why = (res != BLOCK_SIZE as i32).then(|| {
            let why = if res < 0 {
                errno_text(-res)
            } else {
                format!("short journal write {res}")
            };
            format!("journal write: {why}")
        });
        if let Some(why) = &why {
            self.fail(why.clone());
        }
        if self.jbufs[b].dsync {
            self.jbufs[b].state = JbState::Written;
        } else {
            self.jbufs[b].state = JbState::Unflushed;
            self.unflushed_jbs.push(b);
        }
        let mut solo_done = None;
        for w in 0..self.jbufs[b].waiters.len() {
            let id = self.jbufs[b].waiters[w];
            let op = &mut self.ops[id as usize];
            if res != BLOCK_SIZE as i32 && op.error.is_none() {
                op.error = Some(EngineError::Io {
                    volume: op.volume,
                    offset_bytes: op.chunk * self.g.chunk_bytes(),
                    errno_text: why.clone().unwrap_or_default(),
                });
            }
            op.pending -= 1;
            if op.pending == 0 && matches!(op.stage, Stage::Running | Stage::Freeing) {
                if op.solo {
                    solo_done = Some(id);
                } else {
                    self.flush_waiting.push(id);
                }
            }
            if op.pending == 0 && matches!(op.stage, Stage::Merging | Stage::Filling) {
                // Its reads finished before this journal block (the Alloc
                // record of a slot it allocated): go on with it here, as
                // `op_io_done` does when a read is last.
                self.reads_done.push(id);
            }
        }
        if let Some(id) = solo_done {
            self.phase_done(id);
        }
        while let Some(id) = self.reads_done.pop() {
            match self.ops[id as usize].stage {
                Stage::Merging => self.merge_read_done(id),
                Stage::Filling => self.fill_read_done(id),
                _ => {}
            }
        }
        self.advance_watermark();
    }

    /// Issues one fdatasync for every write completed since the last one.
    fn maybe_flush(&mut self) {
        if self.flush_inflight || (self.flush_waiting.is_empty() && self.unflushed_jbs.is_empty()) {
            return;
        }
        std::mem::swap(&mut self.flush_waiting, &mut self.flush_batch);
        std::mem::swap(&mut self.unflushed_jbs, &mut self.flush_jbs);
        let sqe = opcode::Fsync::new(types::Fd(self.fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(UD_FLUSH);
        self.flush_inflight = true;
        self.stats.flushes += 1;
        push_sqe(
            &mut self.ring,
            &mut self.unsubmitted,
            &mut self.inflight_sqes,
            &sqe,
        );
    }

    fn flush_done(&mut self, res: i32) {
        self.flush_inflight = false;
        if res < 0 {
            self.fail(format!("fdatasync: {}", errno_text(-res)));
            for i in 0..self.flush_batch.len() {
                let id = self.flush_batch[i];
                let op = &mut self.ops[id as usize];
                op.error.get_or_insert(EngineError::Io {
                    volume: op.volume,
                    offset_bytes: op.chunk * self.g.chunk_bytes(),
                    errno_text: errno_text(-res),
                });
            }
        }
        for i in 0..self.flush_jbs.len() {
            let b = self.flush_jbs[i];
            self.jbufs[b].state = JbState::Written;
        }
        self.flush_jbs.clear();
        let mut batch = std::mem::take(&mut self.flush_batch);
        for &id in batch.iter() {
            self.phase_done(id);
        }
        batch.clear();
        self.flush_batch = batch;
        self.advance_watermark();
    }

    fn advance_watermark(&mut self) {
        while let Some(&b) = self.jorder.front() {
            let jb = &mut self.jbufs[b];
            if jb.state != JbState::Written || jb.unfinished_ops > 0 || self.failed.is_some() {
                break;
            }
            self.acked_through = jb.seq;
            jb.state = JbState::Free;
            self.jorder.pop_front();
        }
    }

    fn op_io_done(&mut self, id: u32, res: i32) {
        let op = &mut self.ops[id as usize];
        if res < 0 && op.error.is_none() {
            let errno = errno_text(-res);
            tracing::error!(
                volume = op.volume,
                chunk = op.chunk,
                "disk I/O failed: {errno}"
            );
            op.error = Some(EngineError::Io {
                volume: op.volume,
                offset_bytes: op.chunk * self.g.chunk_bytes() + op.first as u64 * BLOCK_SIZE_U64,
                errno_text: errno,
            });
        }
        op.pending -= 1;
        if op.pending == 0 && op.stage == Stage::Merging {
            return self.merge_read_done(id);
        }
        if op.pending == 0 && op.stage == Stage::Filling {
            return self.fill_read_done(id);
        }
        // A deferred op (it allocated its slot, then waited for room) has
        // nothing to finish here: it resumes from the deferred queue.
        if op.pending == 0 && matches!(op.stage, Stage::Running | Stage::Freeing) {
            if op.op == EngineOp::Read || op.solo {
                self.phase_done(id);
            } else {
                // Written, not yet durable: the next flush makes it so.
                self.flush_waiting.push(id);
            }
        }
    }

    /// All I/O of the op's current phase is done (and durable).
    fn phase_done(&mut self, id: u32) {
        let op_kind = self.ops[id as usize].op;
        if op_kind == EngineOp::Read {
            return self.read_done(id);
        }
        let local = self.ops[id as usize].local_slot;
        if self.ops[id as usize].stage == Stage::Freeing {
            return self.free_done(id, local);
        }
        let failed = self.ops[id as usize].error.is_some();
        if let Some(e) = &self.ops[id as usize].error {
            // Disk writes that fail leave the shard unable to promise
            // durability: stop taking writes (see fail()), with the reason.
            let why = match e {
                EngineError::Io { errno_text, .. } => format!("a write failed: {errno_text}"),
                e => format!("a write failed: {e}"),
            };
            self.fail(why);
        }
        let room_to_free = self.journal_room(1) && self.sqe_room(2);
        let op = &mut self.ops[id as usize];
        let slot = self.slots[local as usize]
            .as_mut()
            .expect("slot of running op");
        // A repair rewrites a block at its own version (see EngineOp::Repair).
        let equal_applies = op.op == EngineOp::Repair;
        let fill = op.op == EngineOp::Fill;
        for p in op.plan.iter() {
            let cur = slot.entries[p.logical as usize];
            // A fill copies each block at its source's version.
            let version = if fill { p.version } else { op.version };
            let newer = version > cur.version || (equal_applies && version == cur.version);
            match p.action {
                Action::Write if !failed && newer => {
                    slot.entries[p.logical as usize] = BlockEntry {
                        phys: p.phys,
                        kind: BlockKind::Data,
                        crc: p.crc,
                        version,
                    };
                    if cur.kind == BlockKind::Data {
                        slot.release_phys(cur.phys);
                    }
                    op.applied += 1;
                    slot.dirty = true;
                }
                Action::Write => slot.release_phys(p.phys),
                Action::Zero if !failed && newer => {
                    slot.entries[p.logical as usize] = BlockEntry::zeroed(op.version);
                    if cur.kind == BlockKind::Data {
                        slot.release_phys(cur.phys);
                    }
                    op.applied += 1;
                    slot.dirty = true;
                }
                _ => {}
            }
        }
        // The phase is in the in-memory map now: its journal blocks no
        // longer wait for this op (the watermark, and so checkpoints, can
        // pass them while a later phase waits for room).
        for &b in op.jbufs.iter() {
            self.jbufs[b].unfinished_ops -= 1;
        }
        op.jbufs.clear();
        if fill {
            if !failed && (op.cursor as usize) < op.fill.len() {
                op.stage = Stage::Idle;
                self.advance_watermark();
                return self.fill_phase(id);
            }
            return self.finish(id);
        }
        if !failed && op.cursor < op.count {
            op.stage = Stage::Idle;
            self.advance_watermark();
            return self.plan_phase(id, local);
        }
        // A discard of the whole chunk that leaves it empty releases the
        // slot, unless the slot is a layer above others: its zeroes hide
        // theirs.
        let whole_chunk = op.first == 0 && op.count as u32 == self.g.chunk_blocks;
        if !failed
            && op.op == EngineOp::Discard
            && celer_device::era_of(op.volume) == 0
            && whole_chunk
            && slot.ops_inflight == 1
            && slot.reads_inflight == 0
            && slot.entries.iter().all(|e| e.kind != BlockKind::Data)
            && room_to_free
        {
            slot.freeing = true;
            op.stage = Stage::Freeing;
            let seq = self.append_record(id, &Record::Free { slot: local });
            self.write_slot_headers(id, local, seq, None);
            return;
        }
        self.finish(id);
    }

    fn free_done(&mut self, id: u32, local: u32) {
        let failed = self.ops[id as usize].error.is_some();
        let slot = self.slots[local as usize].take().expect("slot being freed");
        let chunk = (slot.owner.volume, slot.owner.chunk);
        self.by_chunk.remove(&chunk);
        if self.ops[id as usize].op == EngineOp::Discard {
            // The versions go with the slot: keep the highest a while.
            let version = slot.planned_version.iter().copied().max().unwrap_or(0);
            self.discarded.insert(chunk, version);
        } else {
            self.discarded.forget(chunk);
        }
        if failed {
            self.fail("slot release failed".into());
        } else {
            self.free_slots.push(local);
        }
        self.ops[id as usize].local_slot = u32::MAX;
        self.finish(id);
    }

    fn read_done(&mut self, id: u32) {
        let local = self.ops[id as usize].local_slot;
        let layered = !self.ops[id as usize].layer_slots.is_empty();
        let op = &mut self.ops[id as usize];
        if op.error.is_none() {
            for (i, p) in op.plan.iter().enumerate() {
                if p.action == Action::ReadData && crc_of(&op.segs, i * BLOCK_SIZE) != p.crc {
                    let offset_bytes =
                        op.chunk * self.g.chunk_bytes() + p.logical as u64 * BLOCK_SIZE_U64;
                    // The layer the bad block is in (a lower one for a
                    // read through layers).
                    let volume = match p.layer {
                        0 => op.volume,
                        l => op.chain[l as usize - 1],
                    };
                    tracing::error!(
                        volume,
                        offset_bytes,
                        shard = self.id,
                        "checksum mismatch on read: data not returned"
                    );
                    op.error = Some(EngineError::Checksum {
                        volume,
                        offset_bytes,
                    });
                    break;
                }
            }
        }
        if op.error.is_none() {
            op.applied = op.count as u32;
        }
        if layered {
            self.release_layer_slots(id);
            return self.finish(id);
        }
        if let Some(slot) = self.slots.get_mut(local as usize).and_then(|s| s.as_mut()) {
            slot.reads_inflight -= 1;
            if slot.reads_inflight == 0 {
                while let Some(p) = slot.pending_free.pop() {
                    let p = p as usize;
                    slot.free_phys[p / 64] |= 1 << (p % 64);
                }
            }
        }
        self.finish(id);
    }

    fn maybe_checkpoint(&mut self) {
        if self.ckpt.is_none()
            && self.failed.is_none()
            && (self.next_seq - self.tail) * 2 >= self.g.journal_blocks as u64
            && self.acked_through >= self.tail
        {
            self.start_checkpoint();
        }
        self.pump_checkpoint();
    }

    /// Starts a checkpoint at the current watermark: every record in journal
    /// blocks up to it belongs to a finished op, so the in-memory maps hold
    /// it. Dirty maps go to their other copy, then the index moves the
    /// journal tail past the cut.
    fn start_checkpoint(&mut self) {
        let cut = self.acked_through;
        let uuid = self.g.disk_uuid;
        let mut bufs = std::mem::take(&mut self.ckpt_spare.bufs_list);
        let mut targets = std::mem::take(&mut self.ckpt_spare.targets);
        let mut index_entries = std::mem::take(&mut self.ckpt_spare.index_entries);
        index_entries.clear();
        index_entries.resize(self.g.slots_per_shard() as usize, None);
        for (local, s) in self.slots.iter_mut().enumerate() {
            let Some(s) = s else { continue };
            if s.alloc_seq > cut {
                continue;
            }
            index_entries[local] = Some((s.alloc_seq, s.owner));
            if s.header_due {
                // Both header copies, made durable by the maps' fdatasync
                // before the index moves the journal tail past the Alloc.
                s.header_due = false;
                let slot_index = self.g.slot_of(self.id, local as u64);
                for copy in 0..2 {
                    let mut buf = AlignedBuf::new(1);
                    layout::encode_slot_header(
                        uuid,
                        slot_index,
                        s.alloc_seq,
                        Some(s.owner),
                        &mut buf,
                    );
                    targets.push(self.g.header_offset(slot_index, copy));
                    bufs.push(buf);
                }
            }
            if !s.dirty {
                continue;
            }
            s.dirty = false;
            s.map_generation += 1;
            let slot_index = self.g.slot_of(self.id, local as u64);
            let mut buf = self
                .ckpt_spare
                .maps
                .pop()
                .unwrap_or_else(|| AlignedBuf::new(self.g.map_blocks() as usize));
            let h = MapHeader {
                generation: s.map_generation,
                journal_seq: cut,
                volume: s.owner.volume,
                chunk: s.owner.chunk,
            };
            layout::encode_map(uuid, slot_index, &h, &s.entries, &mut buf);
            targets.push(self.g.map_offset(slot_index, s.map_generation % 2));
            bufs.push(buf);
        }
        let mut index = self
            .ckpt_spare
            .index
            .take()
            .unwrap_or_else(|| AlignedBuf::new(self.g.index_blocks() as usize));
        let h = IndexHeader {
            generation: self.index_generation + 1,
            journal_tail: cut + 1,
        };
        layout::encode_index(uuid, self.id, &h, &index_entries, &mut index);
        self.ckpt_spare.index_entries = index_entries;
        self.ckpt = Some(Checkpoint {
            cut,
            stage: CkptStage::Maps,
            pending: 0,
            bufs,
            targets,
            next: 0,
            index,
        });
        self.pump_checkpoint();
    }

    /// Advances the checkpoint: map writes (as many as the completion
    /// budget allows), one fdatasync, the index write, one more fdatasync.
    /// Plain writes and two flushes, not one flush per map.
    fn pump_checkpoint(&mut self) {
        let Some(mut c) = self.ckpt.take() else {
            return;
        };
        if c.pending == 0 {
            match c.stage {
                CkptStage::Maps if c.next == c.bufs.len() => {
                    c.stage = CkptStage::MapsSync;
                    self.push_ckpt_fsync(&mut c);
                }
                CkptStage::MapsSync => {
                    c.stage = CkptStage::Index;
                    let copy = (self.index_generation + 1) % 2;
                    let sqe = opcode::Write::new(
                        types::Fd(self.fd),
                        c.index.as_ptr(),
                        c.index.len() as u32,
                    )
                    .offset(self.g.index_offset(self.id, copy))
                    .build()
                    .user_data(io_ud(UD_CKPT, 0, c.index.len()));
                    self.stats.meta_bytes_written += c.index.len() as u64;
                    push_sqe(
                        &mut self.ring,
                        &mut self.unsubmitted,
                        &mut self.inflight_sqes,
                        &sqe,
                    );
                    c.pending += 1;
                }
                CkptStage::Index => {
                    c.stage = CkptStage::IndexSync;
                    self.push_ckpt_fsync(&mut c);
                }
                CkptStage::IndexSync => {
                    // Durable: the journal up to the cut may be reused.
                    if self.failed.is_none() {
                        self.tail = c.cut + 1;
                        self.index_generation += 1;
                        self.stats.checkpoints += 1;
                    }
                    let spare = &mut self.ckpt_spare;
                    // Map buffers are kept for the next checkpoint; header
                    // ones (one block) are not.
                    let map_bytes = self.g.map_blocks() as usize * BLOCK_SIZE;
                    c.bufs.retain(|b| b.len() == map_bytes);
                    spare.maps.append(&mut c.bufs);
                    spare.bufs_list = c.bufs;
                    c.targets.clear();
                    spare.targets = c.targets;
                    spare.index = Some(c.index);
                    return;
                }
                CkptStage::Maps => {}
            }
        }
        while c.stage == CkptStage::Maps
            && c.next < c.bufs.len()
            && c.pending < CKPT_WRITES_INFLIGHT_MAX
            && self.sqe_room(1)
        {
            let buf = &c.bufs[c.next];
            let sqe = opcode::Write::new(types::Fd(self.fd), buf.as_ptr(), buf.len() as u32)
                .offset(c.targets[c.next])
                .build()
                .user_data(io_ud(UD_CKPT, 0, buf.len()));
            self.stats.meta_bytes_written += buf.len() as u64;
            push_sqe(
                &mut self.ring,
                &mut self.unsubmitted,
                &mut self.inflight_sqes,
                &sqe,
            );
            c.pending += 1;
            c.next += 1;
        }
        if c.stage == CkptStage::Maps && c.next == c.bufs.len() && c.pending == 0 {
            // No dirty map at all: go straight on.
            self.ckpt = Some(c);
            return self.pump_checkpoint();
        }
        self.ckpt = Some(c);
    }

    fn push_ckpt_fsync(&mut self, c: &mut Checkpoint) {
        let sqe = opcode::Fsync::new(types::Fd(self.fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(UD_CKPT);
        push_sqe(
            &mut self.ring,
            &mut self.unsubmitted,
            &mut self.inflight_sqes,
            &sqe,
        );
        c.pending += 1;
    }

    fn checkpoint_io_done(&mut self, res: i32) {
        if res < 0 {
            self.fail(format!("checkpoint write: {}", errno_text(-res)));
        }
        let Some(c) = self.ckpt.as_mut() else { return };
        c.pending -= 1;
        if c.pending == 0 {
            self.pump_checkpoint();
        }
    }

    fn finish(&mut self, id: u32) {
        if !self.ops[id as usize].layer_slots.is_empty() {
            self.release_layer_slots(id);
        }
        let op = &mut self.ops[id as usize];
        let local = op.local_slot;
        if local != u32::MAX {
            if let Some(slot) = self.slots.get_mut(local as usize).and_then(|s| s.as_mut()) {
                slot.ops_inflight = slot.ops_inflight.saturating_sub(1);
                if op.holding {
                    slot.set_held(op.first, false);
                }
            }
        }
        op.holding = false;
        for &b in op.jbufs.iter() {
            self.jbufs[b].unfinished_ops -= 1;
        }
        op.jbufs.clear();
        op.stage = Stage::Idle;
        let result = match op.error.take() {
            Some(e) => Err(e),
            None => Ok(op.applied),
        };
        self.done.push_back(Completion {
            tag: op.tag,
            result,
            newer_version: op.newer_version,
        });
        self.free_ops.push(id);
        self.advance_watermark();
    }
}

/// Submits `sqe`, making room in the submission queue first if needed.
fn push_sqe(
    ring: &mut IoUring,
    unsubmitted: &mut u32,
    inflight: &mut u32,
    sqe: &io_uring::squeue::Entry,
) {
    loop {
        // SAFETY: every buffer and iovec an SQE points to lives in an op,
        // journal buffer or checkpoint that is neither moved nor reused
        // until its CQE has been reaped.
        if unsafe { ring.submission().push(sqe) }.is_ok() {
            break;
        }
        // Submission queue full: hand it to the kernel. The CQ budget keeps
        // completions from overflowing, so this cannot fail with EBUSY.
        match ring.submit() {
            Ok(_) => *unsubmitted = 0,
            // Interrupted, or the kernel is short of memory: try again.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {
                std::thread::yield_now()
            }
            // Anything else means a bad SQE or ring: a programming error.
            Err(e) => panic!("io_uring_enter failed with an in-budget queue: {e}"),
        }
    }
    *unsubmitted += 1;
    *inflight += 1;
}

/// A read or write of `iov` at `offset`: the plain opcode for one buffer
/// (cheaper in the kernel), the vectored one otherwise.
fn rw_sqe(
    write: bool,
    fd: i32,
    iov: &[libc::iovec],
    offset: u64,
    rw_flags: i32,
) -> io_uring::squeue::Entry {
    let fd = types::Fd(fd);
    match (write, iov) {
        (false, [one]) => opcode::Read::new(fd, one.iov_base as *mut u8, one.iov_len as u32)
            .offset(offset)
            .build(),
        (true, [one]) => opcode::Write::new(fd, one.iov_base as *const u8, one.iov_len as u32)
            .offset(offset)
            .rw_flags(rw_flags)
            .build(),
        (false, _) => opcode::Readv::new(fd, iov.as_ptr(), iov.len() as u32)
            .offset(offset)
            .build(),
        (true, _) => opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32)
            .offset(offset)
            .rw_flags(rw_flags)
            .build(),
    }
}

/// End (exclusive) of the run of `action` blocks starting at `i` whose
/// physical blocks are consecutive.
fn run_end(plan: &[Planned], i: usize, action: Action) -> usize {
    let mut j = i + 1;
    while j < plan.len()
        && plan[j].action == action
        && plan[j].layer == plan[i].layer
        && plan[j].phys as usize == plan[i].phys as usize + (j - i)
    {
        j += 1;
    }
    j
}

/// Calls `f(address, length)` for each piece of the request's segments that
/// covers bytes `[at, at + len)`, in order.
pub(crate) fn for_each_piece(
    segs: &[Segment],
    mut at: usize,
    mut len: usize,
    mut f: impl FnMut(*mut u8, usize),
) {
    for s in segs {
        if len == 0 {
            break;
        }
        if at >= s.len {
            at -= s.len;
            continue;
        }
        let take = (s.len - at).min(len);
        // SAFETY: at < s.len, so the pointer stays inside the segment.
        f(unsafe { s.addr.add(at) }, take);
        len -= take;
        at = 0;
    }
}

/// Appends iovecs covering bytes `[at, at + len)` of the request's segments.
fn slice_segments(segs: &[Segment], at: usize, len: usize, out: &mut Vec<libc::iovec>) {
    for_each_piece(segs, at, len, |addr, take| {
        debug_assert!(
            out.len() < out.capacity(),
            "iovec capacity reserved at start-up"
        );
        out.push(libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: take,
        });
    });
}

/// crc32c of the 4 KiB block at byte `at` of the request's segments.
fn crc_of(segs: &[Segment], at: usize) -> u32 {
    let mut crc = 0;
    for_each_piece(segs, at, BLOCK_SIZE, |addr, take| {
        // SAFETY: the submit contract keeps the segment valid for reads.
        let bytes = unsafe { std::slice::from_raw_parts(addr, take) };
        crc = crc32c::crc32c_append(crc, bytes);
    });
    crc
}

fn zero_fill(op: &mut Op, at: usize, len: usize) {
    for_each_piece(&op.segs, at, len, |addr, take| {
        // SAFETY: the submit contract keeps the segment valid for writes.
        unsafe { std::ptr::write_bytes(addr, 0, take) };
    });
}

/// Which shard owns a chunk: a fixed hash, stable across restarts (the
/// placement hash shared with the route table, see `celer_device::chunk_hash`).
pub fn shard_for(g: &Geometry, volume: u64, chunk: u64) -> u32 {
    (celer_device::chunk_hash(volume, chunk) % g.shard_count as u64) as u32
}

#[cfg(test)]
mod transfer_tests {
    use super::*;

    #[test]
    fn a_short_transfer_is_an_error_never_a_success() {
        let ud = io_ud(UD_DATA, 7, 3 * BLOCK_SIZE);
        assert_eq!(ud & 0xffff_ffff, 7);
        assert_eq!(ud & UD_KIND, UD_DATA);
        let expected = ((ud >> 32) & 0xff_ffff) as i32 * 512;
        assert_eq!(expected, 3 * BLOCK_SIZE as i32);
        assert_eq!(checked_result(expected, expected, UD_DATA), expected);
        assert_eq!(
            checked_result(expected - 4096, expected, UD_DATA),
            -libc::EIO
        );
        assert_eq!(checked_result(0, expected, UD_DATA), -libc::EIO);
        assert_eq!(
            checked_result(-libc::ENOSPC, expected, UD_DATA),
            -libc::ENOSPC
        );
        // An fsync transfers nothing: 0 is its success.
        assert_eq!(checked_result(0, 0, UD_FLUSH), 0);
    }
}
