//! Background scrub: each shard reads every data block it holds, at a
//! limited rate, so the engine checks its crc; a block that fails is
//! repaired from another member (see `repair`).
//!
//! Each piece read correctly is also compared with the partition's other
//! in-sync members: their block states (version, kind, crc; a
//! `BackfillRead` with `FLAG_STATES_ONLY`). A block one of them holds at a
//! newer version is copied from it (a write this node missed). A data
//! block every member holds at the same version is compared by crc: a copy
//! here that differs from the others, which agree with each other, is
//! copied from them; copies with no majority are reported (counted and
//! logged by volume and offset), never overwritten.
//!
//! A pass lists the shard's chunks, and asks the other in-sync members of
//! each partition it serves for theirs (`ListChunks`, one partition at a
//! time): a chunk a member holds and this node lacks entirely (a write
//! that reached the others only, a client that died between replicas) has
//! nothing here to read, so it would never be compared otherwise. Then it
//! reads the chunks in pieces of up to `SCRUB_PIECE_BYTES`, one piece in
//! flight per shard. Blocks never written or zeroed are not read (the
//! engine's block states say which hold data), and only data blocks count
//! against the rate: a token bucket of `NodeConfig::scrub_bytes_per_sec /
//! shards`. A piece with no data here, in a chunk another member holds, is
//! still compared (states only, one round trip, waited for): its blocks
//! another member holds are copied. A piece that hits a bad block queues
//! its repair and goes on from the next block.
//!
//! Passes start `SCRUB_FIRST_DELAY` after the node starts, then every
//! `NodeConfig::scrub_interval` after the previous pass started; an
//! operator starts one now or pauses scrubbing through the admin API
//! (`celer scrub start|pause|resume|status`). Progress and results are
//! published per shard in `ScrubCell` (status, metrics).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use celer_engine::{
    AlignedBuf, BlockKind, Completion, EngineError, EngineOp, EngineRequest, Segment, BLOCK_SIZE,
};

use celer_proto::payload::{decode_chunk_list, BlockKind as WireBlockKind, StateCrcTable};
use celer_proto::{Header, Op, Status, FLAG_STATES_ONLY};
use celer_route::NodeId;

use super::ShardLoop;
use crate::metrics::ScrubDifference;

mod compare;

pub(super) use compare::REQ_COMPARE;

/// Engine tags at or above this (and below `TAG_PURGE`) are scrub reads.
pub(super) const TAG_SCRUB: u64 = 1 << 38;
/// Largest scrub read.
const SCRUB_PIECE_BYTES: usize = 256 << 10;
/// The first pass starts this long after the node starts.
const SCRUB_FIRST_DELAY: Duration = Duration::from_secs(60);
/// A member that does not answer a listing or a comparison the scrub waits
/// for within this is skipped: a late listing is dropped (the next pass
/// asks again); a late comparison is still used for the blocks it shows
/// newer there.
const SCRUB_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Most chunks taken from the members' listings in one pass (a bound on
/// what a peer's answers can make this shard hold).
const SCRUB_LISTED_MAX: usize = 1 << 22;

/// Scrub controls and figures shared by the shards and the admin server.
pub(crate) struct ScrubShared {
    pub(crate) paused: AtomicBool,
    /// Raised by "start now"; a shard that sees it raised starts a pass.
    pub(crate) start_requests: AtomicU64,
    /// The layer keys the last "start now" named (one volume's), or None:
    /// every chunk. Read by a shard when it starts the pass asked for
    /// (control path; periodic passes read everything).
    pub(crate) start_only: std::sync::Mutex<Option<std::sync::Arc<Vec<u64>>>>,
    pub(crate) shards: Vec<ScrubCell>,
}

/// One shard's scrub figures (written by the shard only).
#[derive(Default)]
pub(crate) struct ScrubCell {
    /// Passes finished since the node started.
    pub(crate) passes: AtomicU64,
    /// The pass under way: chunks listed and done (both 0 between passes).
    pub(crate) chunks_total: AtomicU64,
    pub(crate) chunks_done: AtomicU64,
    /// Data bytes read by the pass under way, and by every pass.
    pub(crate) pass_bytes: AtomicU64,
    pub(crate) bytes: AtomicU64,
    /// Blocks found damaged (each queued for repair).
    pub(crate) damaged: AtomicU64,
    /// Blocks another in-sync member holds at a newer version (each copied).
    pub(crate) behind: AtomicU64,
    /// Blocks whose copy here differs (same version, other crc) from every
    /// other in-sync member's, which agree (each copied from them).
    pub(crate) mismatched: AtomicU64,
    /// Blocks whose copies have the same version and differ with no two
    /// agreeing (reported, left as they are).
    pub(crate) divergent: AtomicU64,
    /// Milliseconds the last finished pass took, and its data bytes.
    pub(crate) last_pass_ms: AtomicU64,
    pub(crate) last_pass_bytes: AtomicU64,
    /// 1 while a pass is under way.
    pub(crate) running: AtomicU64,
}

impl ScrubShared {
    pub(crate) fn new(shards: u16) -> ScrubShared {
        ScrubShared {
            paused: AtomicBool::new(false),
            start_requests: AtomicU64::new(0),
            start_only: std::sync::Mutex::new(None),
            shards: (0..shards).map(|_| ScrubCell::default()).collect(),
        }
    }
}

/// A shard's scrub.
pub(super) struct Scrub {
    /// Data bytes per second for this shard (0: scrub off).
    rate: u64,
    interval: Duration,
    next_pass_at: Instant,
    start_requests_seen: u64,
    running: bool,
    started: Instant,
    /// The layer keys this pass covers (None: all).
    only: Option<std::sync::Arc<Vec<u64>>>,
    /// Partitions whose members' chunk lists are still to be asked for
    /// (the pass reads nothing until they are all listed).
    to_list: Vec<u32>,
    /// Sequence numbers of the listings waited for, and when they were sent.
    list_waiting: Vec<u32>,
    list_sent: Instant,
    /// Chunks the members listed (merged into `chunks` once all answered).
    listed: Vec<(u64, u64)>,
    /// The pass's chunks: layer key, chunk, whether another member holds it
    /// (then its pieces without data here are compared too).
    chunks: Vec<(u64, u64, bool)>,
    next_chunk: usize,
    /// Offset within the current chunk.
    at: u64,
    inflight: bool,
    /// The piece in flight is a comparison of a piece without data here
    /// (no read): it ends when every member asked has answered.
    probing: bool,
    /// The piece in flight: volume, offset, length, data bytes in it.
    piece: (u64, u64, u64, u64),
    tokens: f64,
    refilled: Instant,
    buf: AlignedBuf,
    states: Vec<(BlockKind, u64)>,
    crcs: Vec<u32>,
    /// The comparison of the last piece read with the other members.
    compare: CompareRound,
}

/// One piece's comparison with the partition's other in-sync members.
#[derive(Default)]
struct CompareRound {
    volume: u64,
    offset: u64,
    blocks: usize,
    /// Request sequence numbers not answered yet, and when they were sent.
    waiting: Vec<u32>,
    sent_at: Option<Instant>,
    /// Every member asked answered with a state table (none failed, none
    /// unreachable).
    complete: bool,
    /// The first `answers` tables are this round's answers (buffers kept
    /// between rounds).
    tables: Vec<Vec<u8>>,
    answers: usize,
}

impl Scrub {
    pub(super) fn new(rate: u64, interval: Duration, now: Instant) -> Scrub {
        Scrub {
            rate,
            interval,
            next_pass_at: now + SCRUB_FIRST_DELAY,
            start_requests_seen: 0,
            running: false,
            started: now,
            only: None,
            to_list: Vec::new(),
            list_waiting: Vec::new(),
            list_sent: now,
            listed: Vec::new(),
            chunks: Vec::new(),
            next_chunk: 0,
            at: 0,
            inflight: false,
            probing: false,
            piece: (0, 0, 0, 0),
            tokens: 0.0,
            refilled: now,
            buf: AlignedBuf::new(SCRUB_PIECE_BYTES / BLOCK_SIZE),
            states: Vec::with_capacity(SCRUB_PIECE_BYTES / BLOCK_SIZE),
            crcs: Vec::with_capacity(SCRUB_PIECE_BYTES / BLOCK_SIZE),
            compare: CompareRound::default(),
        }
    }

    /// How long the shard may sleep before the scrub has work (None: it
    /// waits for nothing: off, paused, between passes or a read in flight).
    pub(super) fn wait_hint(&self) -> Option<Duration> {
        if !self.running || self.rate == 0 {
            return None;
        }
        if self.probing || !self.list_waiting.is_empty() {
            // Waiting for members' answers: wake up for their timeout.
            return Some(SCRUB_ANSWER_TIMEOUT / 4);
        }
        if self.inflight {
            return None;
        }
        let missing = SCRUB_PIECE_BYTES as f64 - self.tokens;
        Some(Duration::from_secs_f64(
            (missing / self.rate as f64).max(0.001),
        ))
    }
}

impl<D: celer_engine::Disk, N: crate::net::Net> ShardLoop<D, N> {
    fn scrub_cell(&self) -> &ScrubCell {
        &self.shared.scrub.shards[self.id as usize]
    }

    /// Starts passes when due, refills the bucket and reads the next piece.
    /// Called every loop pass.
    pub(super) fn scrub_step(&mut self) {
        if self.scrub.rate == 0 {
            return;
        }
        let now = self.net.now();
        let requests = self.shared.scrub.start_requests.load(Ordering::Acquire);
        let asked = requests != self.scrub.start_requests_seen;
        if !self.scrub.running && (asked || now >= self.scrub.next_pass_at) {
            self.scrub.start_requests_seen = requests;
            let only = if asked {
                self.shared
                    .scrub
                    .start_only
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            } else {
                None
            };
            self.scrub_begin(now, only);
        } else if asked {
            // Asked while a pass runs: that pass is the one asked for.
            self.scrub.start_requests_seen = requests;
        }
        if self.scrub.probing
            && self
                .scrub
                .compare
                .sent_at
                .is_none_or(|t| now.duration_since(t) > SCRUB_ANSWER_TIMEOUT)
        {
            // A member did not answer the comparison: go on without it.
            self.scrub_probe_done();
        }
        if !self.scrub.running || self.scrub.inflight {
            return;
        }
        if self.shared.scrub.paused.load(Ordering::Acquire) {
            self.scrub.refilled = now;
            return;
        }
        if !self.scrub.to_list.is_empty() || !self.scrub.list_waiting.is_empty() {
            self.scrub_list_step(now);
            return;
        }
        let s = &mut self.scrub;
        let cap = (s.rate as f64 / 5.0).max(2.0 * SCRUB_PIECE_BYTES as f64);
        s.tokens =
            (s.tokens + now.duration_since(s.refilled).as_secs_f64() * s.rate as f64).min(cap);
        s.refilled = now;
        // Pieces without data cost nothing: skip them in one go (bounded,
        // so a huge sparse disk does not stall the loop).
        for _ in 0..64 {
            if self.scrub.tokens < SCRUB_PIECE_BYTES as f64 {
                return;
            }
            if self.scrub_next_piece() {
                return;
            }
        }
    }

    /// Starts a pass over every chunk this shard or another member of its
    /// partitions holds, or over the chunks of the layer keys in `only`
    /// (one volume: `celer scrub start --volume`). The members' lists are
    /// asked for first (`scrub_list_step`).
    fn scrub_begin(&mut self, now: Instant, only: Option<std::sync::Arc<Vec<u64>>>) {
        let me = self.shared.id;
        let to_list: Vec<u32> = self
            .table()
            .map(|t| {
                let Some(node) = t.node(me) else {
                    return Vec::new();
                };
                (0..t.partition_count())
                    .filter(|&p| {
                        t.shard_of(node, p) == self.id
                            && t.partition(p).is_some_and(|part| {
                                part.member(me).is_some_and(|m| m.in_sync)
                                    && part.members.iter().any(|m| m.in_sync && m.node != me)
                            })
                    })
                    .rev()
                    .collect()
            })
            .unwrap_or_default();
        let s = &mut self.scrub;
        s.only = only;
        s.to_list = to_list;
        s.list_waiting.clear();
        s.listed.clear();
        s.chunks = self
            .engine
            .chunks()
            .into_iter()
            .map(|(v, c)| (v, c, false))
            .collect();
        self.scrub_keep_covered();
        let s = &mut self.scrub;
        s.chunks.sort_unstable();
        s.next_chunk = 0;
        s.at = 0;
        s.running = true;
        s.started = now;
        // The rate counts from the pass's start (no burst saved up).
        s.tokens = 0.0;
        s.refilled = now;
        s.next_pass_at = now + s.interval;
        let cell = &self.shared.scrub.shards[self.id as usize];
        cell.chunks_total
            .store(s.chunks.len() as u64, Ordering::Relaxed);
        cell.chunks_done.store(0, Ordering::Relaxed);
        cell.pass_bytes.store(0, Ordering::Relaxed);
        cell.running.store(1, Ordering::Relaxed);
        tracing::info!(
            shard = self.id,
            chunks = s.chunks.len(),
            "scrub pass started"
        );
    }

    /// Drops from `scrub.chunks` those of deleted layers and of layers the
    /// pass does not cover.
    fn scrub_keep_covered(&mut self) {
        let deleted = &self.deleted;
        let s = &mut self.scrub;
        let only = s.only.as_deref();
        s.chunks.retain(|(v, _, _)| {
            deleted.binary_search(v).is_err() && only.is_none_or(|keys| keys.contains(v))
        });
    }

    /// The route's epoch and the other in-sync members of partition `p`,
    /// when this node is an in-sync member of it (None otherwise: the scrub
    /// compares only as an in-sync member).
    fn in_sync_peers(&self, p: u32) -> Option<(u64, Vec<NodeId>)> {
        let me = self.shared.id;
        let t = self.table()?;
        let part = t.partition(p)?;
        if !part.member(me).is_some_and(|m| m.in_sync) {
            return None;
        }
        let peers = part
            .members
            .iter()
            .filter(|m| m.in_sync && m.node != me)
            .map(|m| m.node)
            .collect();
        Some((t.epoch, peers))
    }

    /// Asks the other in-sync members of the next partition for their
    /// chunks, once the previous partition's answers are in (or timed out).
    fn scrub_list_step(&mut self, now: Instant) {
        if !self.scrub.list_waiting.is_empty() {
            if now.duration_since(self.scrub.list_sent) <= SCRUB_ANSWER_TIMEOUT {
                return;
            }
            // A member that does not answer: this pass goes without its list.
            self.scrub.list_waiting.clear();
        }
        while let Some(p) = self.scrub.to_list.pop() {
            let Some((epoch, peers)) = self.in_sync_peers(p) else {
                continue;
            };
            for node in peers {
                let Some(c) = self.peer_conn(node, p) else {
                    continue;
                };
                self.compare_seq = (self.compare_seq + 1) & 0xffff;
                self.scrub.list_waiting.push(self.compare_seq);
                let mut h = Header::request(Op::ListChunks, REQ_COMPARE | self.compare_seq);
                h.epoch = epoch;
                h.offset = p as u64;
                if let Some(conn) = self.conns[c].as_mut() {
                    conn.queue(h, &[]);
                }
                self.mark_dirty(c);
            }
            if !self.scrub.list_waiting.is_empty() {
                self.scrub.list_sent = now;
                return;
            }
        }
        self.scrub_list_done();
    }

    /// A member's chunk list for one partition (`ListChunks` as a node:
    /// every layer key's chunks in it, 16 bytes each).
    fn scrub_list_response(&mut self, h: &Header, payload: &[u8]) {
        let seq = h.request_id & 0xffff;
        let s = &mut self.scrub;
        if !s.list_waiting.contains(&seq) {
            return; // timed out since, or from another pass
        }
        s.list_waiting.retain(|x| *x != seq);
        if let (Status::Ok, Ok(entries)) = (h.status, decode_chunk_list(payload)) {
            let p = h.offset as u32;
            if let Some(t) = self.table() {
                // Only chunks of the partition asked about (which this
                // shard serves as an in-sync member: checked when asked).
                let mine: Vec<(u64, u64)> = entries
                    .filter(|&(k, c)| t.partition_of(k, c) == p)
                    .collect();
                let room = SCRUB_LISTED_MAX.saturating_sub(self.scrub.listed.len());
                if mine.len() > room {
                    tracing::warn!(
                        shard = self.id,
                        partition = p,
                        "scrub: members list more chunks than one pass takes; the rest waits for the next pass"
                    );
                }
                self.scrub.listed.extend(mine.into_iter().take(room));
            }
        }
        if self.scrub.list_waiting.is_empty() && self.scrub.to_list.is_empty() {
            self.scrub_list_done();
        }
    }

    /// Every partition listed: the members' chunks join the pass's.
    fn scrub_list_done(&mut self) {
        let s = &mut self.scrub;
        let listed = std::mem::take(&mut s.listed);
        s.chunks
            .extend(listed.into_iter().map(|(k, c)| (k, c, true)));
        self.scrub_keep_covered();
        let s = &mut self.scrub;
        s.chunks.sort_unstable();
        // One entry per chunk, marked when any member listed it.
        s.chunks.dedup_by(|later, kept| {
            if later.0 == kept.0 && later.1 == kept.1 {
                kept.2 |= later.2;
                true
            } else {
                false
            }
        });
        self.scrub_cell()
            .chunks_total
            .store(self.scrub.chunks.len() as u64, Ordering::Relaxed);
        tracing::debug!(
            shard = self.id,
            chunks = self.scrub.chunks.len(),
            "scrub: chunk lists merged"
        );
    }

    fn scrub_end(&mut self) {
        let s = &mut self.scrub;
        s.running = false;
        let took = s.started.elapsed();
        let cell = &self.shared.scrub.shards[self.id as usize];
        let bytes = cell.pass_bytes.load(Ordering::Relaxed);
        cell.passes.fetch_add(1, Ordering::Relaxed);
        cell.last_pass_ms
            .store(took.as_millis() as u64, Ordering::Relaxed);
        cell.last_pass_bytes.store(bytes, Ordering::Relaxed);
        cell.chunks_total.store(0, Ordering::Relaxed);
        cell.chunks_done.store(0, Ordering::Relaxed);
        cell.running.store(0, Ordering::Relaxed);
        tracing::info!(
            shard = self.id,
            bytes,
            seconds = took.as_secs_f64(),
            "scrub pass finished"
        );
    }

    /// Submits the read of the next piece holding data. True when it is
    /// done with this step (a read submitted, the pass over, or the engine
    /// busy); false after skipping a piece without data.
    fn scrub_next_piece(&mut self) -> bool {
        // Blocks found behind are queued for copying: the next piece waits
        // until the queue has room for all of its blocks.
        if self.repairs.len() + SCRUB_PIECE_BYTES / BLOCK_SIZE > super::repair::REPAIRS_MAX {
            return true;
        }
        let chunk_bytes = self.engine.geometry().chunk_bytes();
        let s = &mut self.scrub;
        if s.next_chunk >= s.chunks.len() {
            self.scrub_end();
            return true;
        }
        let (volume, chunk, elsewhere) = s.chunks[s.next_chunk];
        let offset = chunk * chunk_bytes + s.at;
        let len = (chunk_bytes - s.at).min(SCRUB_PIECE_BYTES as u64);
        let blocks = (len / BLOCK_SIZE as u64) as usize;
        s.states.clear();
        s.states.resize(blocks, (BlockKind::Unwritten, 0));
        self.engine.block_states(volume, offset, &mut s.states);
        let s = &mut self.scrub;
        // The data blocks' span: read from the first to the last.
        let first = s.states.iter().position(|x| x.0 == BlockKind::Data);
        let Some(first) = first else {
            if elsewhere {
                return self.scrub_probe(volume, offset, len);
            }
            self.scrub_advance(len);
            return false;
        };
        let last = s
            .states
            .iter()
            .rposition(|x| x.0 == BlockKind::Data)
            .unwrap_or(first);
        let data =
            s.states.iter().filter(|x| x.0 == BlockKind::Data).count() as u64 * BLOCK_SIZE as u64;
        let skip = (first * BLOCK_SIZE) as u64;
        let span = ((last + 1 - first) * BLOCK_SIZE) as u64;
        let segs = [Segment {
            addr: s.buf.as_mut_ptr(),
            len: span as usize,
        }];
        let req = EngineRequest {
            op: EngineOp::Read,
            volume,
            offset_bytes: offset + skip,
            len_bytes: span,
            segments: &segs,
            version: 0,
            epoch: 0,
            tag: TAG_SCRUB,
            chain: &[],
            block_crc: None,
        };
        // SAFETY: the scrub's buffer lives as long as the shard loop, which
        // drains the engine before it ends.
        match unsafe { self.engine.submit(&req) } {
            Ok(()) => {
                let s = &mut self.scrub;
                s.inflight = true;
                s.piece = (volume, offset + skip, span, data);
                s.tokens -= data as f64;
                // Where the piece ends, whatever the read finds.
                s.at += skip;
                true
            }
            Err(EngineError::QueueFull { .. }) => true,
            Err(e) => {
                tracing::warn!(shard = self.id, volume, offset, "scrub read: {e}; skipped");
                self.scrub_advance(len);
                false
            }
        }
    }

    /// Compares a piece without data here, in a chunk another member holds,
    /// with the members (`scrub_compare`); the pass goes on once they all
    /// answered (`scrub_probe_done`). True: wait (a comparison in flight).
    fn scrub_probe(&mut self, volume: u64, offset: u64, len: u64) -> bool {
        let round = &self.scrub.compare;
        if !round.waiting.is_empty()
            && round
                .sent_at
                .is_some_and(|t| t.elapsed() <= SCRUB_ANSWER_TIMEOUT)
        {
            // The last piece read is still being compared: after it.
            return true;
        }
        self.scrub_compare(volume, offset, len);
        let round = &self.scrub.compare;
        if round.waiting.is_empty() || round.volume != volume || round.offset != offset {
            // No member asked (not in sync here, none reachable).
            self.scrub_advance(len);
            return false;
        }
        let s = &mut self.scrub;
        s.inflight = true;
        s.probing = true;
        s.piece = (volume, offset, len, 0);
        true
    }

    /// The comparison of a piece without data here is over (answered or
    /// timed out): the pass goes on after it.
    fn scrub_probe_done(&mut self) {
        let s = &mut self.scrub;
        s.probing = false;
        s.inflight = false;
        let len = s.piece.2;
        self.scrub_advance(len);
    }

    /// Moves past `len` bytes of the current chunk.
    fn scrub_advance(&mut self, len: u64) {
        let chunk_bytes = self.engine.geometry().chunk_bytes();
        let s = &mut self.scrub;
        s.at += len;
        if s.at >= chunk_bytes {
            s.at = 0;
            s.next_chunk += 1;
            self.scrub_cell()
                .chunks_done
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts `bytes` read and found correct (status and metrics).
    fn scrub_checked(&self, bytes: u64) {
        let cell = self.scrub_cell();
        cell.pass_bytes.fetch_add(bytes, Ordering::Relaxed);
        cell.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.counters.add_scrub_bytes(bytes);
    }

    /// A scrub read completed.
    pub(super) fn scrub_done(&mut self, c: Completion) {
        self.scrub.inflight = false;
        let (volume, offset, span, data) = self.scrub.piece;
        match c.result {
            Ok(_) => {
                self.scrub_checked(data);
                self.scrub_advance(span);
                self.scrub_compare(volume, offset, span);
            }
            Err(EngineError::Checksum {
                volume: v,
                offset_bytes,
            }) if v == volume && offset_bytes >= offset && offset_bytes < offset + span => {
                // Blocks before it read fine; go on after it.
                self.scrub_cell().damaged.fetch_add(1, Ordering::Relaxed);
                self.counters.add_scrub_damaged();
                self.queue_repair(volume, offset_bytes);
                let good = offset_bytes - offset;
                self.scrub_checked(good);
                self.scrub_advance(good + BLOCK_SIZE as u64);
            }
            Err(e) => {
                tracing::warn!(shard = self.id, volume, offset, "scrub read: {e}; skipped");
                self.scrub_advance(span);
            }
        }
    }
}
