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
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use crate::aligned::{AlignedBuf, BufPool, PageSize};
use crate::disk::{Disk, DiskIo, DiskQueue, FileDisk, IoBufs, CQ_ENTRIES};
use crate::layout::{
    self, BlockEntry, BlockKind, Geometry, IndexHeader, MapHeader, Record, SlotOwner, BLOCK_SIZE,
    BLOCK_SIZE_U64, PHYS_NONE, RECORDS_PER_JOURNAL_BLOCK, RECORD_BYTES,
};
use crate::{errno_text, EngineError};

mod checkpoint;
mod driver;
mod fill;
mod inspect;
mod intake;
mod journal;
mod ops;
mod read;
mod slots;
mod submit;
mod write;

use ops::*;
use read::moving_data;
use slots::Discarded;
pub(crate) use slots::SlotState;
pub use slots::DISCARDED_KEEP;
pub(crate) use submit::for_each_piece;
use submit::*;

/// Most segments one request may carry.
pub const SEGMENTS_MAX: usize = 256;
/// The most layers a request may read through (`EngineRequest::chain`).
pub const LAYERS_MAX: usize = 255;
/// Journal blocks that may be open or in flight at once, per shard.
/// Journal buffers per shard (a small write's buffer is held until its
/// data has moved, see `MOVES_BATCH`).
pub(crate) const JOURNAL_BUFS: usize = 32;
/// Moves of small writes' data from the journal sent together.
const MOVES_BATCH: usize = 8;
/// Most data writes one phase of a request submits.
const RUNS_PER_PHASE_MAX: u32 = 32;
/// Most requests in flight per shard.
pub const INFLIGHT_MAX: usize = 256;
/// Checkpoint map writes in flight at once: a checkpoint trickles out
/// beside the requests instead of queueing a thousand writes ahead of them.
const CKPT_WRITES_INFLIGHT_MAX: u32 = 4;

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
    /// Forgets blocks of a chunk, whatever their version: data and
    /// versions, as if never written (`version` is ignored; a write at any
    /// version applies after it). Ordered as `Release`: after the chunk's
    /// ops already running, before those that start after it. For a
    /// member copying a partition whole over blocks it held from before,
    /// which may be stale where the members freed them by a discard they
    /// no longer remember: the node forgets them first. Nothing is done on
    /// a chunk without a slot (it holds no data; a zeroing's version kept
    /// for it stays).
    Forget,
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
    /// A write of exactly one aligned block: its crc32c if the caller has
    /// it already (the node passes the frame's payload crc, which it
    /// verified: the client's checksum then guards the block end to end,
    /// through every copy on the node). The engine stores it instead of
    /// computing it again; it is ignored for any other request.
    pub block_crc: Option<u32>,
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

// SAFETY: the raw pointers an op holds (segments, iovecs) point into memory
// the submitter keeps valid until completion (`Shard::submit`'s contract),
// not into thread-local state; a shard with its ops moves between threads
// as a whole and is used by one thread at a time.
unsafe impl Send for Op {}

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
    /// Small writes whose data went to disk in the journal, with their
    /// record (one device write), then moved to their slot.
    pub journal_data_writes: u64,
    /// Whole-chunk discards that emptied their chunk and waited for journal
    /// room to free its slot (`Stage::FreeWait`).
    pub free_waits: u64,
}

// user_data: kind in the top byte, id below.
const UD_DATA: u64 = 1 << 56;
const UD_JOURNAL: u64 = 2 << 56;
const UD_META: u64 = 3 << 56;
const UD_CKPT: u64 = 4 << 56;
const UD_FLUSH: u64 = 5 << 56;
const UD_MOVE: u64 = 6 << 56;
const UD_KIND: u64 = 0xff << 56;

/// user_data of an I/O: its kind, the op or buffer it belongs to (low 32
/// bits), and the bytes it must transfer in 512-byte units (bits 32..56):
/// a short transfer is an error, never a success.
#[inline]
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
#[inline]
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

/// One shard of an engine, driven by exactly one thread; generic over the
/// disk it lives on (io_uring on a file in production, see `disk`).
pub struct Shard<D: Disk = FileDisk> {
    id: u32,
    g: Geometry,
    /// Kept open as long as the queue's I/O may use it.
    _disk: Arc<D>,
    io: Io<D::Queue>,
    slots: Vec<Option<SlotState>>,
    by_chunk: HashMap<(u64, u64), u32>,
    free_slots: Vec<u32>,
    discarded: Discarded,
    /// The discard floor: at or above the version of every whole-chunk
    /// discard or zeroing of a chunk left without a slot that this shard
    /// acknowledged (their per-chunk versions, `discarded`, live in memory
    /// only). Journaled (`Record::Free`, `Record::Floor`) and kept by the
    /// checkpoint's index; `restart_floor` is what an open found.
    discard_floor: u64,
    /// The part of `discard_floor` that is durable (its journal block is).
    floor_durable: u64,
    /// The floor this shard was opened with (0 on a fresh disk).
    floor_at_open: u64,
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
    /// Most I/O in flight: completions never overflow the queue.
    cq_budget: u32,
    max_request_blocks: u16,
    stats: ShardStats,
    /// Ops submitted so far (`Op::seq`).
    submitted: u64,
    /// Ops whose reads (merge or fill) a journal write finished last.
    reads_done: Vec<u32>,
    /// Data moves from journal data blocks to their slots in flight.
    moves_inflight: u32,
    /// Journal buffers whose data waits to be moved (`maybe_issue_moves`).
    moves_queued: Vec<usize>,
    /// A move completed since the last checkpoint began: the next one
    /// flushes before it writes maps (`CkptStage::MovesSync`).
    moves_unflushed: bool,
    /// Where the fixed buffers are (`buffer_pages`).
    buffer_pages: (PageSize, usize),
    /// Write compact journal entries (format 3, on a disk that takes
    /// 512-byte aligned direct I/O).
    compact_journal: bool,
}

pub(crate) struct ShardInit<D> {
    pub(crate) id: u32,
    pub(crate) g: Geometry,
    pub(crate) disk: Arc<D>,
    pub(crate) slots: Vec<Option<SlotState>>,
    pub(crate) next_seq: u64,
    pub(crate) tail: u64,
    pub(crate) acked_through: u64,
    pub(crate) index_generation: u64,
    /// The discard floor found on disk (index and journal).
    pub(crate) discard_floor: u64,
    pub(crate) inflight_max: usize,
    pub(crate) completion_eventfd: bool,
    pub(crate) hugepages: bool,
}

impl<D: Disk> Shard<D> {
    pub(crate) fn new(init: ShardInit<D>) -> Result<Shard<D>, EngineError> {
        let g = init.g;
        let inflight_max = init.inflight_max.clamp(1, INFLIGHT_MAX);
        let max_request_blocks = g.chunk_blocks.min(256) as u16;
        let queue = init.disk.queue(init.completion_eventfd)?;
        let compact_journal = g.compact_journal && init.disk.dio_512();
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
        // Every fixed buffer from one pool: per op a metadata block and a
        // merge block; per journal buffer two blocks.
        let mut pool = BufPool::new(
            (inflight_max * 2 + JOURNAL_BUFS * 2) * BLOCK_SIZE,
            init.hugepages,
        );
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
                meta: pool.take(1),
                sub_at: 0,
                sub_len: 0,
                holding: false,
                merged: false,
                merge_crc: 0,
                given_crc: None,
                merge_buf: pool.take(1),
                seq: 0,
                chain: Vec::with_capacity(LAYERS_MAX),
                layer_slots: Vec::with_capacity(LAYERS_MAX + 1),
                fill: Vec::with_capacity(max_request_blocks as usize),
            })
            .collect();
        let jbufs = (0..JOURNAL_BUFS)
            .map(|_| JournalBuf {
                // The record block and the data block of a small write.
                buf: pool.take(2),
                state: JbState::Free,
                seq: 0,
                count: 0,
                waiters: Vec::with_capacity(RECORDS_PER_JOURNAL_BLOCK),
                unfinished_ops: 0,
                dsync: false,
                data_to: None,
                data_at: BLOCK_SIZE,
                moving: false,
                floor: 0,
            })
            .collect();
        Ok(Shard {
            id: init.id,
            g,
            _disk: init.disk,
            io: Io {
                queue,
                unsubmitted: 0,
                inflight: 0,
            },
            slots: init.slots,
            by_chunk,
            free_slots,
            discarded: Discarded::default(),
            discard_floor: init.discard_floor,
            floor_durable: init.discard_floor,
            floor_at_open: init.discard_floor,
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
            cq_budget: CQ_ENTRIES - 64,
            max_request_blocks,
            stats: ShardStats::default(),
            submitted: 0,
            reads_done: Vec::with_capacity(inflight_max),
            moves_inflight: 0,
            moves_queued: Vec::with_capacity(JOURNAL_BUFS),
            moves_unflushed: false,
            buffer_pages: (pool.pages(), pool.bytes()),
            compact_journal,
        })
    }

    /// Which pages this shard's fixed buffers are on, and how many bytes
    /// were mapped for them.
    pub fn buffer_pages(&self) -> (PageSize, usize) {
        self.buffer_pages
    }

    fn retry_deferred(&mut self) {
        for _ in 0..self.deferred.len() {
            let Some(id) = self.deferred.pop_front() else {
                break;
            };
            let free_wait = self.ops[id as usize].stage == Stage::FreeWait;
            self.ops[id as usize].stage = Stage::Idle;
            if let Some(why) = &self.failed {
                // Fail-stop: what waits for journal room, a block or a slot
                // may wait forever (a failed checkpoint never moves the
                // journal tail), so it fails now.
                let op = &mut self.ops[id as usize];
                op.error.get_or_insert(EngineError::Io {
                    volume: op.volume,
                    offset_bytes: op.chunk * self.g.chunk_bytes(),
                    errno_text: why.clone(),
                });
                self.finish(id);
                continue;
            }
            if free_wait {
                let local = self.ops[id as usize].local_slot;
                self.free_or_finish(id, local);
                continue;
            }
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
            EngineOp::Forget => self.start_forget(id),
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
        if !self.hold_quiet_slot(id, local, room) {
            return;
        }
        let slot = self.slots[local as usize]
            .as_mut()
            .expect("indexed slot exists");
        slot.freeing = true;
        self.ops[id as usize].stage = Stage::Freeing;
        // A release (the partition moved away) is no discard: no floor.
        let seq = self.append_record(
            id,
            &Record::Free {
                slot: local,
                version: 0,
            },
        );
        self.write_slot_headers(id, local, seq, None);
    }

    /// Forgets the op's blocks once the chunk's ops that started before
    /// it are done (ops that start meanwhile wait, as for a release): the
    /// Forget record is journaled, and the map changes once it is durable
    /// (`forget_done`).
    fn start_forget(&mut self, id: u32) {
        let (volume, chunk) = (self.ops[id as usize].volume, self.ops[id as usize].chunk);
        let Some(local) = self.by_chunk.get(&(volume, chunk)).copied() else {
            return self.finish(id); // Nothing stored.
        };
        let room = self.journal_room(1);
        if !self.hold_quiet_slot(id, local, room) {
            return;
        }
        let op = &mut self.ops[id as usize];
        op.stage = Stage::Forgetting;
        op.solo = false;
        let (first, count) = (op.first, op.count);
        self.append_record(
            id,
            &Record::Forget {
                slot: local,
                first,
                count,
            },
        );
    }

    /// The Forget record of op `id` is durable (or its write failed):
    /// the blocks leave the map, and the chunk's waiting ops go on.
    pub(super) fn forget_done(&mut self, id: u32, local: u32) {
        let failed = self.ops[id as usize].error.is_some() || self.failed.is_some();
        let op = &self.ops[id as usize];
        let blocks = op.first as usize..op.first as usize + op.count as usize;
        let slot = self.slots[local as usize]
            .as_mut()
            .expect("slot of a running forget");
        if !failed {
            for b in blocks {
                let cur = slot.entries[b];
                if cur.kind == BlockKind::Data {
                    slot.release_phys(cur.phys);
                }
                slot.entries[b] = BlockEntry::UNWRITTEN;
                slot.planned_version[b] = 0;
                if let Some(d) = slot.discarded_at.get_mut(b) {
                    *d = 0;
                }
            }
            slot.dirty = true;
        }
        slot.releasing = None;
        self.finish(id);
    }

    /// Op `id`, a release or a forget, holds slot `local`: ops that start
    /// after it wait (`releasing`). Whether the slot is quiet now (no other
    /// op, read or move on it; queued moves count as reads and are sent
    /// while ops wait) and `room` holds; if not, the op is deferred.
    fn hold_quiet_slot(&mut self, id: u32, local: u32, room: bool) -> bool {
        let slot = self.slots[local as usize]
            .as_mut()
            .expect("indexed slot exists");
        if slot.freeing || slot.releasing.is_some_and(|r| r != id) {
            self.defer(id);
            return false;
        }
        slot.releasing = Some(id);
        self.bind_slot(id, local);
        if !self.moves_queued.is_empty() {
            self.drop_stale_moves(local);
        }
        let slot = self.slots[local as usize]
            .as_ref()
            .expect("indexed slot exists");
        if slot.ops_inflight > 1 || slot.reads_inflight > 0 || !room {
            self.defer(id);
            return false;
        }
        true
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
        self.io.inflight + sqes <= self.cq_budget
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
        if op.op != EngineOp::Read && op.error.is_none() {
            if let Some(why) = &self.failed {
                // Nothing a failed shard finishes is acknowledged: it may
                // depend on writes a failed flush left not durable (the
                // Alloc record of its slot, in another op's journal block).
                op.error = Some(EngineError::Io {
                    volume: op.volume,
                    offset_bytes: op.chunk * self.g.chunk_bytes(),
                    errno_text: why.clone(),
                });
            }
        }
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
