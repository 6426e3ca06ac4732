//! One client queue: the request and part slabs, the route table copy, the
//! retry and fail-over rules, and the epoll/timer driver around [`Net`].
//!
//! A request is cut into parts (one per chunk it touches); a part has one
//! leg per member it is sent to (every member for small writes, zeroes and
//! discards; the primary for large writes; one in-sync member at a time for
//! reads). A wire request id names (part, leg, attempt generation), so a
//! response is matched without a lookup table and a response to an older
//! attempt is ignored.
//!
//! Invariants:
//! - A part completes `Ok` only when every leg of its current attempt did.
//! - A request's caller memory is referenced by the transport only while
//!   the request is in flight: `Request::pinned` counts the frames and
//!   payload receptions that reference it; completing a request with pins
//!   left first makes the transport drop them (`Net::release_slot`).
//! - The protocol handlers never touch the transport directly while it is
//!   reporting (the `Sink` callbacks): they queue `Action`s, run right after.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use celer_device::{
    check_request, DeviceInfo, DeviceQueue, IoCompletion, IoError, IoOp, IoRequest, IoSegment,
};
use celer_proto::{version_clock, Header, Op, Status, FLAG_SECTORS, FLAG_SNAPSHOT_READ};
use celer_route::{NodeId, RouteTable};
use tracing::{debug, info, warn};

use crate::hlc::{wall_unix_ms, Hlc};
use crate::net::{segments_crc, ConnId, Dest, Net, Payload, Sink, Transport};
use crate::{ClientConfig, ReadPolicy, Shared, BLOCK_BYTES};

/// Requests one queue accepts in flight.
pub const INFLIGHT_MAX: usize = 256;
/// Parts in flight per queue (a request waits for free parts beyond this).
pub const PARTS_MAX: usize = 1 << PART_BITS;
/// Members one partition may have (targets plus leavers during a move).
const LEGS_MAX: usize = 1 << LEG_BITS;
/// Segments a request slot has room for when the queue opens.
const SEGMENTS_PREALLOC: usize = 8;
/// Segments one request may carry.
const SEGMENTS_MAX: usize = 1024;
/// Pause before re-sending after `RouteBehind` or `Busy`.
const BACKOFF: Duration = Duration::from_millis(1);
/// Pause before re-sending after `Expired`: a renewed capability is on its
/// way (or the control service is down and it will not come soon); no
/// point asking every millisecond.
const EXPIRED_BACKOFF: Duration = Duration::from_millis(50);
/// How often a queue with parts waiting for a route change asks for tables.
const ROUTE_PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// Nodes asked per probe round.
const PROBE_TARGETS_MAX: usize = 3;
/// epoll events taken per `epoll_wait`, and `epoll_wait` calls per poll.
const EVENTS_MAX: usize = 64;
const EPOLL_ROUNDS_MAX: usize = 4;
/// Rounds of (actions, flush) per poll: a flush that fails a connection
/// queues actions that queue frames.
const SETTLE_ROUNDS_MAX: usize = 4;

const TOKEN_TIMER: u64 = u64::MAX;
const TOKEN_WAKE: u64 = u64::MAX - 1;

// Wire request ids: control frames have the top bit; data frames pack
// (generation, leg, part).
const CONTROL_BIT: u32 = 1 << 31;
const PART_BITS: u32 = 10;
const LEG_BITS: u32 = 4;
const GEN_BITS: u32 = 31 - PART_BITS - LEG_BITS;
const GEN_MASK: u32 = (1 << GEN_BITS) - 1;

fn data_request_id(part: u32, leg: usize, gen: u32) -> u32 {
    (gen << (PART_BITS + LEG_BITS)) | ((leg as u32) << PART_BITS) | part
}

fn split_request_id(id: u32) -> (u32, usize, u32) {
    (
        id & ((1 << PART_BITS) - 1),
        ((id >> PART_BITS) & ((1 << LEG_BITS) - 1)) as usize,
        (id >> (PART_BITS + LEG_BITS)) & GEN_MASK,
    )
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum LegState {
    Idle,
    InFlight,
    Done,
    /// Timed out, connection lost, or refused: waits for a route change or
    /// the next retry round.
    Failed,
    /// `RouteBehind`/`Busy`: re-sent at `at`.
    Backoff,
}

#[derive(Clone, Copy)]
struct Leg {
    node: NodeId,
    conn: ConnId,
    state: LegState,
    /// Sent at (InFlight), failed at (Failed), re-send at (Backoff).
    at: Instant,
}

struct Part {
    in_use: bool,
    req: u32,
    gen: u32,
    op: Op,
    offset: u64,
    len: u32,
    /// Where the part's bytes start in the request's segments.
    skip: usize,
    /// crc32c of the payload (writes).
    crc: u32,
    /// Header flags: `FLAG_SECTORS` for a sector write.
    flags: u16,
    /// The era every leg of this attempt names (read once per attempt, so
    /// the replicas of one write never see two eras; see celer-proto,
    /// "Snapshots").
    era: u64,
    /// The payload is zeroes (a sector write cut from a write-zeroes or
    /// discard of a partial block), from `Core::zero_seg`.
    zero: bool,
    /// Write version of the part: the request's, or a newer one after a
    /// member refused it as older.
    version: u64,
    partition: u32,
    /// Epoch of the table the current attempt was sent under.
    epoch: u64,
    legs: [Leg; LEGS_MAX],
    nlegs: usize,
    read_start: usize,
    read_tries: usize,
    read_err: Option<Status>,
    /// Waiting for a route change since.
    wait_since: Option<Instant>,
    /// Next re-send of failed legs while waiting.
    retry_at: Instant,
}

struct Request {
    in_use: bool,
    tag: u64,
    op: IoOp,
    offset: u64,
    len: u64,
    segs: Vec<IoSegment>,
    version: u64,
    /// Bytes already cut into parts.
    cut: u64,
    parts_active: u32,
    /// In `waiting_reqs` (not yet cut whole for lack of parts).
    queued: bool,
    error: Option<IoError>,
    deadline: Instant,
    pinned: u32,
}

enum Action {
    Start {
        part: u32,
        gen: u32,
    },
    Send {
        part: u32,
        gen: u32,
        leg: usize,
    },
    /// Drop the transport's references to a request's memory; free the
    /// slot when `free`.
    Release {
        slot: u32,
        free: bool,
    },
}

struct Core {
    index: usize,
    volume: u64,
    /// The lineage the volume's chunks are placed by (`ClientConfig::lineage`).
    placement: u64,
    /// `ClientConfig::read_snapshot`.
    read_snapshot: Option<u32>,
    /// The attachment id of the client's credential: its low 16 bits are
    /// the writer bits of every write version.
    attachment: u32,
    /// The fence generation of the client's capability: every mutation
    /// carries it (a node refuses it once the volume was taken over).
    fence: u32,
    small_write_max: u32,
    request_timeout: Duration,
    op_deadline: Duration,
    read_policy: ReadPolicy,
    info: DeviceInfo,
    shared: Arc<Shared>,
    table: Arc<RouteTable>,
    addrs: HashMap<NodeId, SocketAddr>,
    reqs: Vec<Request>,
    free_reqs: Vec<u32>,
    parts: Vec<Part>,
    free_parts: Vec<u32>,
    waiting_reqs: VecDeque<u32>,
    actions: VecDeque<Action>,
    done: VecDeque<IoCompletion>,
    /// The time of this `submit`/`poll` (the driver's input: the core
    /// reads no clock): monotonic for timeouts, wall (ms since the Unix
    /// epoch) for the write clock.
    now: Instant,
    unix_ms: u64,
    next_scan_at: Option<Instant>,
    waiting_parts: usize,
    probe_at: Instant,
    probe_seq: u32,
    probe_rr: usize,
    read_rr: usize,
    /// One zero block and a segment over it: the payload of sector writes
    /// that zero part of a block. Boxed so the pointer stays put.
    zero_block: Box<[u8]>,
    zero_seg: Box<[IoSegment; 1]>,
}

fn resolve_addrs(table: &RouteTable) -> HashMap<NodeId, SocketAddr> {
    let mut m = HashMap::with_capacity(table.nodes.len());
    for n in &table.nodes {
        let addr = n.data_addr.parse::<SocketAddr>().ok().or_else(|| {
            n.data_addr
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
        });
        match addr {
            Some(a) => {
                m.insert(n.id, a);
            }
            None => {
                warn!(node = n.id, addr = %n.data_addr, "cannot resolve the data address of a storage node")
            }
        }
    }
    m
}

fn status_error(s: Status, node: NodeId, volume: u64, offset: u64, len: u32) -> IoError {
    match s {
        Status::ReadOnly => IoError::ReadOnly,
        Status::VersionAhead => IoError::Io(format!(
            "volume {volume} [{offset}, +{len}): storage node {node} refused the write's version: this host's clock is more than {} s ahead of the node's (check NTP)",
            celer_proto::VERSION_DRIFT_MAX_MS / 1000
        )),
        Status::Unauthorized => IoError::Io(format!(
            "volume {volume} [{offset}, +{len}): storage node {node} refused the request: the client's capability does not allow it"
        )),
        Status::Fenced => IoError::Io(format!(
            "volume {volume} [{offset}, +{len}): storage node {node} refused the write: this attachment was fenced (another attachment took the volume over); attach again"
        )),
        Status::Checksum => IoError::Checksum {
            offset_bytes: offset,
        },
        _ => IoError::Io(format!(
            "volume {volume} [{offset}, +{len}): storage node {node} answered {s:?}"
        )),
    }
}

impl Core {
    fn part_current(&self, part: u32, gen: u32) -> bool {
        let p = &self.parts[part as usize];
        p.in_use && p.gen == gen
    }

    fn schedule(&mut self, at: Instant) {
        if self.next_scan_at.is_none_or(|t| at < t) {
            self.next_scan_at = Some(at);
        }
    }

    fn push_done(&mut self, tag: u64, result: Result<(), IoError>) {
        self.done.push_back(IoCompletion { tag, result });
    }

    fn inflight(&self) -> usize {
        INFLIGHT_MAX - self.free_reqs.len() + self.done.len()
    }

    fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), IoError> {
        // The volume may have grown online (`Client::grow`): one shared
        // read-mostly atomic, no lock.
        self.info.size_bytes = self.shared.size_bytes.load(Ordering::Acquire);
        check_request(&self.info, req)?;
        let len = match req.op {
            IoOp::Read | IoOp::Write => req.segments.iter().map(|s| s.len as u64).sum(),
            IoOp::Discard | IoOp::WriteZeroes => req.len_bytes,
            IoOp::Flush => 0,
        };
        // The volume's logical sector: 4096, or 512 (partial blocks then go
        // out as sector writes, merged by the nodes).
        let align_bytes = u64::from(self.info.block_size_bytes);
        if !req.offset_bytes.is_multiple_of(align_bytes) || !len.is_multiple_of(align_bytes) {
            return Err(IoError::Misaligned {
                offset_bytes: req.offset_bytes,
                len_bytes: len,
                align_bytes,
            });
        }
        if len > self.info.max_request_bytes {
            return Err(IoError::Io(format!(
                "request of {len} bytes is larger than {} bytes",
                self.info.max_request_bytes
            )));
        }
        if req.segments.len() > SEGMENTS_MAX {
            return Err(IoError::Io(format!(
                "request has {} segments, at most {SEGMENTS_MAX} allowed",
                req.segments.len()
            )));
        }
        if self.inflight() >= INFLIGHT_MAX {
            return Err(IoError::QueueFull {
                inflight_max: INFLIGHT_MAX,
            });
        }
        if req.op == IoOp::Flush || len == 0 {
            self.push_done(req.tag, Ok(()));
            return Ok(());
        }
        let slot = self
            .free_reqs
            .pop()
            .expect("inflight() counted a free slot");
        let version = if req.op == IoOp::Read {
            0
        } else {
            Hlc::version(self.shared.hlc.tick(self.unix_ms), self.attachment as u16)
        };
        let r = &mut self.reqs[slot as usize];
        debug_assert!(!r.in_use && r.pinned == 0);
        r.in_use = true;
        r.tag = req.tag;
        r.op = req.op;
        r.offset = req.offset_bytes;
        r.len = len;
        r.segs.clear();
        if matches!(req.op, IoOp::Read | IoOp::Write) {
            r.segs.extend_from_slice(req.segments);
        }
        r.version = version;
        r.cut = 0;
        r.parts_active = 0;
        r.queued = false;
        r.error = None;
        r.deadline = self.now + self.op_deadline;
        self.schedule(self.now + self.op_deadline);
        self.cut(slot);
        Ok(())
    }

    /// Cuts as much of request `slot` into parts as free parts allow.
    fn cut(&mut self, slot: u32) {
        let chunk_bytes = self.table.chunk_bytes;
        loop {
            let r = &self.reqs[slot as usize];
            if r.cut == r.len {
                return;
            }
            let Some(p) = self.free_parts.pop() else {
                let r = &mut self.reqs[slot as usize];
                if !r.queued {
                    r.queued = true;
                    self.waiting_reqs.push_back(slot);
                }
                return;
            };
            let offset = r.offset + r.cut;
            let chunk_end = (offset / chunk_bytes + 1) * chunk_bytes;
            let mut len = (r.len - r.cut).min(chunk_end - offset);
            let skip = r.cut as usize;
            // A mutation of part of a block (512-byte sector volumes): a
            // sector write of that block alone, merged by every member;
            // whole blocks go on as usual.
            let in_block = offset % BLOCK_BYTES;
            let sectors = r.op != IoOp::Read && (in_block != 0 || len < BLOCK_BYTES);
            if sectors {
                len = len.min(BLOCK_BYTES - in_block);
            } else if r.op != IoOp::Read {
                len -= len % BLOCK_BYTES;
            }
            let len = len as u32;
            let zero = sectors && r.op != IoOp::Write;
            let op = match r.op {
                IoOp::Read => Op::Read,
                _ if sectors => Op::Write,
                IoOp::Write if len <= self.small_write_max => Op::Write,
                IoOp::Write => Op::WritePrimary,
                IoOp::WriteZeroes => Op::WriteZeroes,
                IoOp::Discard => Op::Discard,
                IoOp::Flush => unreachable!("flushes complete at submit"),
            };
            let crc = if zero {
                crc32c::crc32c(&self.zero_block[..len as usize])
            } else if r.op == IoOp::Write {
                // SAFETY: the segments are caller memory valid for reads
                // until completion (the submit contract).
                unsafe { segments_crc(0, r.segs.as_ptr(), r.segs.len(), skip, len as usize) }
            } else {
                0
            };
            let part = &mut self.parts[p as usize];
            debug_assert!(!part.in_use);
            part.in_use = true;
            part.req = slot;
            part.op = op;
            part.offset = offset;
            part.len = len;
            part.skip = skip;
            part.crc = crc;
            part.flags = if sectors { FLAG_SECTORS } else { 0 };
            part.zero = zero;
            part.version = r.version;
            part.nlegs = 0;
            part.wait_since = None;
            let gen = part.gen;
            let r = &mut self.reqs[slot as usize];
            r.cut += len as u64;
            r.parts_active += 1;
            self.actions.push_back(Action::Start { part: p, gen });
        }
    }

    /// Gives freed parts to requests waiting for them, oldest first.
    fn feed(&mut self) {
        while let Some(&slot) = self.waiting_reqs.front() {
            if self.free_parts.is_empty() {
                return;
            }
            self.reqs[slot as usize].queued = false;
            self.waiting_reqs.pop_front();
            self.cut(slot);
            if self.reqs[slot as usize].queued {
                // Re-queued at the back: put it back in front.
                self.waiting_reqs.pop_back();
                self.waiting_reqs.push_front(slot);
                return;
            }
        }
    }

    /// The members reads may go to (`PartitionRoute::readers`): never a
    /// member kept after its partition moved away, which may not have the
    /// newest table yet.
    fn reader_count(&self, partition: u32) -> usize {
        self.table
            .partition(partition)
            .map(|r| r.readers(self.table.replicas).count())
            .unwrap_or(0)
    }

    /// (Re)starts a part under the current table with a new generation.
    fn start_part(&mut self, p: u32, net: &mut dyn Transport) {
        let table = &self.table;
        let part = &mut self.parts[p as usize];
        part.gen = (part.gen + 1) & GEN_MASK;
        if part.epoch != table.epoch && part.wait_since.take().is_some() {
            // The wait is over: a new route (the pause was logged by install).
            self.waiting_parts -= 1;
        }
        part.epoch = table.epoch;
        part.era = self.shared.era.load(Ordering::Relaxed);
        part.partition = table.partition_at(self.placement, part.offset);
        part.read_tries = 0;
        part.read_err = None;
        let Some(route) = table.partition(part.partition) else {
            self.enter_wait(p);
            return;
        };
        let now = self.now;
        let idle = |node| Leg {
            node,
            conn: 0,
            state: LegState::Idle,
            at: now,
        };
        // A write reaches at least `min_copies` members or waits for a
        // route where it can (a member back, or a stand-in).
        if part.op != Op::Read && route.writers().count() < table.min_copies() {
            part.nlegs = 0;
            self.enter_wait(p);
            return;
        }
        match part.op {
            Op::Read => {
                let n = route.readers(table.replicas).count();
                part.nlegs = 1;
                part.legs[0] = idle(0);
                part.read_start = match self.read_policy {
                    ReadPolicy::Primary => 0,
                    ReadPolicy::AnyInSync => {
                        self.read_rr = self.read_rr.wrapping_add(1);
                        self.read_rr % n.max(1)
                    }
                };
                if n == 0 {
                    self.enter_wait(p);
                    return;
                }
            }
            Op::WritePrimary => {
                let Some(primary) = route.primary() else {
                    part.nlegs = 0;
                    self.enter_wait(p);
                    return;
                };
                part.nlegs = 1;
                part.legs[0] = idle(primary);
            }
            _ => {
                // A down member (within the control service's grace
                // period) takes no writes: the others record them for it.
                let writers = route.writers().count();
                if writers > LEGS_MAX {
                    let (offset, len) = (part.offset, part.len);
                    let e = IoError::Io(format!(
                        "volume {} [{offset}, +{len}): partition {} has {writers} members, at most {LEGS_MAX} supported",
                        self.volume,
                        part.partition,
                    ));
                    self.part_done(p, Err(e));
                    return;
                }
                part.nlegs = writers;
                for (i, m) in route.writers().enumerate() {
                    part.legs[i] = idle(m.node);
                }
                if part.nlegs == 0 {
                    self.enter_wait(p);
                    return;
                }
            }
        }
        for i in 0..self.parts[p as usize].nlegs {
            self.send_leg(p, i, net);
            if !self.parts[p as usize].in_use {
                return;
            }
        }
    }

    /// Sends leg `i` of part `p` of its current attempt.
    fn send_leg(&mut self, p: u32, i: usize, net: &mut dyn Transport) {
        let now = self.now;
        let part = &self.parts[p as usize];
        let node = if part.op == Op::Read {
            let readers = self.reader_count(part.partition);
            if readers == 0 {
                self.enter_wait(p);
                return;
            }
            let k = (part.read_start + part.read_tries) % readers;
            let route = self.table.partition(part.partition).expect("counted above");
            route
                .readers(self.table.replicas)
                .nth(k)
                .map(|m| m.node)
                .expect("k < readers")
        } else {
            part.legs[i].node
        };
        let partition = part.partition;
        self.parts[p as usize].legs[i].node = node;
        let target = self
            .table
            .node(node)
            .map(|n| self.table.shard_of(n, partition))
            .zip(self.addrs.get(&node).copied());
        let Some((shard, addr)) = target else {
            self.leg_failed(p, i, "node unknown or without an address");
            return;
        };
        let gen = self.parts[p as usize].gen;
        let Ok(conn) = net.conn(node, shard, addr, now, self) else {
            self.leg_failed(p, i, "cannot connect");
            return;
        };
        if !self.part_current(p, gen) {
            // Opening the connection closed an old one, and that ended this
            // part's attempt.
            return;
        }
        let part = &self.parts[p as usize];
        let r = &self.reqs[part.req as usize];
        let mut h = Header::request(part.op, data_request_id(p, i, part.gen));
        h.epoch = part.epoch;
        h.volume = self.volume;
        h.offset = part.offset;
        h.length = part.len;
        h.version = part.version;
        h.attachment = self.attachment;
        h.fence = self.fence;
        h.flags = part.flags;
        match self.read_snapshot {
            Some(era) if part.op == Op::Read => {
                h.flags |= FLAG_SNAPSHOT_READ;
                h.snapshot = era as u64;
            }
            _ => h.snapshot = part.era,
        }
        let payload = if part.zero {
            h.payload_bytes = part.len;
            h.payload_crc = part.crc;
            Some(Payload {
                slot: part.req,
                segs: self.zero_seg.as_ptr(),
                nsegs: 1,
                skip: 0,
                len: part.len as usize,
            })
        } else if matches!(part.op, Op::Write | Op::WritePrimary) {
            h.payload_bytes = part.len;
            h.payload_crc = part.crc;
            Some(Payload {
                slot: part.req,
                segs: r.segs.as_ptr(),
                nsegs: r.segs.len(),
                skip: part.skip,
                len: part.len as usize,
            })
        } else {
            None
        };
        if payload.is_some() {
            self.reqs[part.req as usize].pinned += 1;
        }
        net.send(conn, &h, payload);
        let leg = &mut self.parts[p as usize].legs[i];
        leg.conn = conn;
        leg.state = LegState::InFlight;
        leg.at = now;
        self.schedule(now + self.request_timeout);
    }

    /// Leg `i` of part `p` got no usable answer: reads try the next in-sync
    /// member; everything else waits for a route change.
    fn leg_failed(&mut self, p: u32, i: usize, why: &str) {
        let now = self.now;
        let part = &mut self.parts[p as usize];
        let leg = &mut part.legs[i];
        debug!(
            queue = self.index,
            node = leg.node,
            partition = part.partition,
            offset = part.offset,
            why,
            "leg failed"
        );
        leg.state = LegState::Failed;
        leg.at = now;
        if part.op == Op::Read {
            self.read_next(p);
        } else {
            self.enter_wait(p);
        }
    }

    /// The current read member failed: the next reader, or the error, or
    /// a wait for a route change.
    fn read_next(&mut self, p: u32) {
        let readers = self.reader_count(self.parts[p as usize].partition);
        let part = &mut self.parts[p as usize];
        part.read_tries += 1;
        if part.read_tries < readers {
            let (req, gen) = (part.req, part.gen);
            self.abandon_receives(req);
            self.actions.push_back(Action::Send {
                part: p,
                gen,
                leg: 0,
            });
        } else if let Some(s) = part.read_err.filter(|s| *s != Status::NotInSync) {
            let node = part.legs[0].node;
            let e = status_error(s, node, self.volume, part.offset, part.len);
            self.part_done(p, Err(e));
        } else {
            // No member answered, or every one said it is not in sync: our
            // table is behind theirs (members that came back and catch up,
            // a table read from a node that had just restarted). Ask for
            // routes and try again, until the op's deadline.
            if part.read_err.is_some() {
                self.probe_at = self.now;
            }
            self.enter_wait(p);
        }
    }

    /// A read moves to another attempt: a payload still arriving for the old
    /// one must not land in the caller's memory later.
    fn abandon_receives(&mut self, req: u32) {
        if self.reqs[req as usize].pinned > 0 {
            self.actions.push_back(Action::Release {
                slot: req,
                free: false,
            });
        }
    }

    fn enter_wait(&mut self, p: u32) {
        let now = self.now;
        let part = &mut self.parts[p as usize];
        if part.wait_since.is_none() {
            part.wait_since = Some(now);
            part.retry_at = now + self.request_timeout;
            self.waiting_parts += 1;
            debug!(
                queue = self.index,
                partition = part.partition,
                offset = part.offset,
                epoch = part.epoch,
                "part waits for a route change"
            );
            if self.probe_at > now {
                self.probe_at = now;
            }
            let retry_at = part.retry_at;
            self.schedule(now);
            self.schedule(retry_at);
        }
    }

    fn part_done(&mut self, p: u32, result: Result<(), IoError>) {
        let part = &mut self.parts[p as usize];
        debug_assert!(part.in_use);
        part.in_use = false;
        part.gen = (part.gen + 1) & GEN_MASK;
        if let Some(since) = part.wait_since.take() {
            self.waiting_parts -= 1;
            info!(
                queue = self.index,
                partition = part.partition,
                epoch = part.epoch,
                offset = part.offset,
                pause_ms = self.now.saturating_duration_since(since).as_millis() as u64,
                ok = result.is_ok(),
                "part done after a pause, on the same route"
            );
        }
        let slot = part.req;
        self.free_parts.push(p);
        let r = &mut self.reqs[slot as usize];
        r.parts_active -= 1;
        if let Err(e) = result {
            r.error.get_or_insert(e);
        }
        if r.parts_active == 0 && r.cut == r.len {
            self.complete_request(slot);
        }
        self.feed();
    }

    fn complete_request(&mut self, slot: u32) {
        let r = &mut self.reqs[slot as usize];
        let result = match r.error.take() {
            None => Ok(()),
            Some(e) => Err(e),
        };
        r.in_use = false;
        let (tag, pinned) = (r.tag, r.pinned);
        self.push_done(tag, result);
        if pinned > 0 {
            self.actions.push_back(Action::Release { slot, free: true });
        } else {
            self.free_reqs.push(slot);
        }
    }

    /// Fails request `slot` at once (deadline): its parts are dropped.
    fn fail_request(&mut self, slot: u32, e: IoError) {
        for p in 0..self.parts.len() {
            let part = &mut self.parts[p];
            if part.in_use && part.req == slot {
                part.in_use = false;
                part.gen = (part.gen + 1) & GEN_MASK;
                if part.wait_since.take().is_some() {
                    self.waiting_parts -= 1;
                }
                self.free_parts.push(p as u32);
            }
        }
        let r = &mut self.reqs[slot as usize];
        r.parts_active = 0;
        r.cut = r.len;
        if r.queued {
            r.queued = false;
            self.waiting_reqs.retain(|&s| s != slot);
        }
        r.error = Some(e);
        self.complete_request(slot);
        self.feed();
    }

    /// Takes a table a node handed over; installs it if newer.
    fn offer_table(&mut self, payload: &[u8], from: NodeId) {
        match RouteTable::decode(payload) {
            Ok(t) => self.install(t, from),
            Err(e) => warn!(queue = self.index, node = from, error = %e,
                "storage node sent a route table that does not decode"),
        }
    }

    fn install(&mut self, table: RouteTable, from: NodeId) {
        if table.epoch <= self.table.epoch {
            return;
        }
        if table.chunk_bytes != self.table.chunk_bytes {
            warn!(
                queue = self.index,
                node = from,
                epoch = table.epoch,
                chunk_bytes = table.chunk_bytes,
                ours = self.table.chunk_bytes,
                "route table with another chunk size refused"
            );
            return;
        }
        let now = self.now;
        self.addrs = resolve_addrs(&table);
        let old = std::mem::replace(&mut self.table, Arc::new(table));
        {
            let mut shared = self.shared.table.lock().unwrap_or_else(|e| e.into_inner());
            if shared.epoch < self.table.epoch {
                *shared = self.table.clone();
            }
        }
        let same_layout = old.partition_bits == self.table.partition_bits;
        let mut resent = 0usize;
        let mut longest_pause = Duration::ZERO;
        for p in 0..self.parts.len() {
            let part = &self.parts[p];
            if !part.in_use {
                continue;
            }
            let route = self.table.partition(part.partition);
            let changed = !same_layout
                || old.partition(part.partition) != route
                || route.is_some_and(|r| {
                    r.members.iter().any(|m| {
                        let (a, b) = (old.node(m.node), self.table.node(m.node));
                        a.map(|n| (&n.data_addr, n.shards)) != b.map(|n| (&n.data_addr, n.shards))
                    })
                });
            if let Some(since) = part.wait_since {
                longest_pause = longest_pause.max(now.saturating_duration_since(since));
            } else if !changed {
                continue;
            }
            resent += 1;
            let gen = part.gen;
            self.actions.push_back(Action::Start {
                part: p as u32,
                gen,
            });
        }
        info!(
            queue = self.index,
            from_epoch = old.epoch,
            to_epoch = self.table.epoch,
            node = from,
            resent,
            longest_pause_ms = longest_pause.as_millis() as u64,
            "route table installed"
        );
    }

    fn match_leg(&self, conn: ConnId, h: &Header) -> Option<(u32, usize)> {
        if h.request_id & CONTROL_BIT != 0 {
            return None;
        }
        let (p, i, gen) = split_request_id(h.request_id);
        let part = self.parts.get(p as usize)?;
        let ok = part.in_use
            && part.gen == gen
            && i < part.nlegs
            && part.legs[i].conn == conn
            && part.legs[i].state == LegState::InFlight
            && h.op == part.op
            && h.volume == self.volume
            && h.offset == part.offset
            && h.length == part.len;
        ok.then_some((p, i))
    }

    fn on_response(&mut self, conn: ConnId, node: NodeId, h: &Header, payload: &[u8]) {
        if h.status != Status::OlderVersion {
            self.shared
                .hlc
                .observe_reported(version_clock(h.version), self.unix_ms);
        }
        if h.request_id & CONTROL_BIT != 0 {
            if !payload.is_empty() {
                self.offer_table(payload, node);
            }
            return;
        }
        let Some((p, i)) = self.match_leg(conn, h) else {
            if h.status == Status::StaleEpoch && !payload.is_empty() {
                self.offer_table(payload, node);
            }
            return;
        };
        if h.snapshot > self.shared.era.load(Ordering::Relaxed) {
            // A snapshot or rollback started a newer era: later writes name it.
            self.shared.era.fetch_max(h.snapshot, Ordering::Relaxed);
        }
        let part = &self.parts[p as usize];
        match h.status {
            Status::StaleSnapshot if part.op != Op::Read => {
                // The volume went on in a newer era (a snapshot was taken):
                // send the part again, to every member, naming it. Members
                // that applied it to the old era put it in the snapshot.
                debug!(
                    queue = self.index,
                    node,
                    era = h.snapshot,
                    offset = part.offset,
                    "write named an older era: sending it again in the new one"
                );
                let gen = part.gen;
                self.actions.push_back(Action::Start { part: p, gen });
            }
            Status::Ok if part.op == Op::Read => {
                if h.payload_bytes == part.len && payload.is_empty() {
                    self.part_done(p, Ok(()));
                } else {
                    warn!(
                        queue = self.index,
                        node,
                        bytes = h.payload_bytes,
                        expected = part.len,
                        "read answered with a payload of the wrong size"
                    );
                    self.parts[p as usize].read_err = Some(Status::Io);
                    self.read_next(p);
                }
            }
            Status::Ok => {
                let part = &mut self.parts[p as usize];
                part.legs[i].state = LegState::Done;
                if part.legs[..part.nlegs]
                    .iter()
                    .all(|l| l.state == LegState::Done)
                {
                    self.part_done(p, Ok(()));
                }
            }
            Status::StaleEpoch => {
                self.offer_table(payload, node);
                let part = &self.parts[p as usize];
                if part.in_use && self.table.epoch > part.epoch {
                    let gen = part.gen;
                    self.actions.push_back(Action::Start { part: p, gen });
                } else {
                    self.leg_failed(p, i, "stale epoch without a newer table");
                }
            }
            Status::OlderVersion if part.op != Op::Read => {
                // A member holds a newer version of a block: this write would
                // be lost if acknowledged. Move the clock past it and send the
                // part again, to every member, with a new version.
                match self
                    .shared
                    .hlc
                    .observe(version_clock(h.version), self.unix_ms)
                {
                    Ok(()) => {
                        let version = Hlc::version(
                            self.shared.hlc.tick(self.unix_ms),
                            self.attachment as u16,
                        );
                        debug!(
                            queue = self.index,
                            node,
                            stored = h.version,
                            version,
                            offset = part.offset,
                            "write refused as older: sending it again with a newer version"
                        );
                        let part = &mut self.parts[p as usize];
                        part.version = version;
                        let gen = part.gen;
                        self.actions.push_back(Action::Start { part: p, gen });
                    }
                    Err(e) => {
                        let err = IoError::Io(format!(
                            "volume {} [{}, +{}): storage node {node} holds version {:#x} of a block, more than {} s ahead of this host's clock: a writer's clock is wrong (check NTP on every host)",
                            self.volume,
                            part.offset,
                            part.len,
                            h.version,
                            celer_proto::VERSION_DRIFT_MAX_MS / 1000
                        ));
                        warn!(
                            queue = self.index,
                            node,
                            remote = e.remote,
                            limit = e.limit,
                            "a stored version is beyond the drift bound: the write fails"
                        );
                        self.part_done(p, Err(err));
                    }
                }
            }
            Status::RouteBehind | Status::Busy | Status::Expired | Status::SnapshotBehind => {
                let pause = if h.status == Status::Expired {
                    EXPIRED_BACKOFF
                } else {
                    BACKOFF
                };
                let at = self.now + pause;
                let leg = &mut self.parts[p as usize].legs[i];
                leg.state = LegState::Backoff;
                leg.at = at;
                self.schedule(at);
            }
            Status::NotReplica | Status::Unavailable => {
                debug!(queue = self.index, node, status = ?h.status, epoch = part.epoch,
                    "member cannot take the request in our epoch: asking for routes");
                self.probe_at = self.now;
                self.leg_failed(p, i, "not a replica, or a member unavailable");
            }
            s @ (Status::NotInSync | Status::Checksum | Status::Io) if part.op == Op::Read => {
                debug!(queue = self.index, node, status = ?s, offset = part.offset,
                    "read failed on one member: trying the next");
                if s != Status::NotInSync || self.parts[p as usize].read_err.is_none() {
                    self.parts[p as usize].read_err = Some(s);
                }
                self.read_next(p);
            }
            s => {
                let e = status_error(s, node, self.volume, part.offset, part.len);
                warn!(queue = self.index, node, status = ?s, offset = part.offset,
                    "request failed on a storage node");
                self.part_done(p, Err(e));
            }
        }
    }

    /// Timer work: timeouts, back-offs, retries, probes, deadlines.
    fn scan(&mut self, net: &mut dyn Transport) {
        let now = self.now;
        self.next_scan_at = None;
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| {
            if next.is_none_or(|n| t < n) {
                next = Some(t);
            }
        };
        for p in 0..self.parts.len() as u32 {
            if !self.parts[p as usize].in_use {
                continue;
            }
            for i in 0..self.parts[p as usize].nlegs {
                if !self.parts[p as usize].in_use {
                    break;
                }
                let leg = self.parts[p as usize].legs[i];
                match leg.state {
                    LegState::InFlight if now >= leg.at + self.request_timeout => {
                        let part = &self.parts[p as usize];
                        if part.wait_since.is_none() {
                            warn!(
                                queue = self.index,
                                node = leg.node,
                                partition = part.partition,
                                epoch = part.epoch,
                                timeout_ms = self.request_timeout.as_millis() as u64,
                                "storage node did not answer in time"
                            );
                        }
                        self.leg_failed(p, i, "timeout");
                    }
                    LegState::InFlight => at(leg.at + self.request_timeout),
                    LegState::Backoff if now >= leg.at => {
                        let gen = self.parts[p as usize].gen;
                        self.actions.push_back(Action::Send {
                            part: p,
                            gen,
                            leg: i,
                        });
                        // Marked so that the next scan does not send it twice.
                        self.parts[p as usize].legs[i].state = LegState::Idle;
                    }
                    LegState::Backoff => at(leg.at),
                    _ => {}
                }
            }
            let part = &mut self.parts[p as usize];
            if !part.in_use || part.wait_since.is_none() {
                continue;
            }
            if now >= part.retry_at {
                part.retry_at = now + self.request_timeout;
                let gen = part.gen;
                if part.op == Op::Read {
                    if part.legs[0].state != LegState::InFlight {
                        part.read_tries = 0;
                        part.read_err = None;
                        self.actions.push_back(Action::Send {
                            part: p,
                            gen,
                            leg: 0,
                        });
                    }
                } else {
                    for i in 0..part.nlegs {
                        if part.legs[i].state == LegState::Failed {
                            self.actions.push_back(Action::Send {
                                part: p,
                                gen,
                                leg: i,
                            });
                        }
                    }
                    if part.nlegs == 0 {
                        self.actions.push_back(Action::Start { part: p, gen });
                    }
                }
            }
            at(self.parts[p as usize].retry_at);
        }
        for slot in 0..self.reqs.len() as u32 {
            let r = &self.reqs[slot as usize];
            if !r.in_use {
                continue;
            }
            if now >= r.deadline {
                let e = IoError::Io(format!(
                    "volume {} [{}, +{}): not done within {} ms: the replicas did not answer and no newer route came",
                    self.volume,
                    r.offset,
                    r.len,
                    self.op_deadline.as_millis()
                ));
                warn!(
                    queue = self.index,
                    offset = r.offset,
                    len = r.len,
                    "request failed at its deadline"
                );
                self.fail_request(slot, e);
            } else {
                at(r.deadline);
            }
        }
        if self.waiting_parts > 0 {
            if now >= self.probe_at {
                self.probe_at = now + ROUTE_PROBE_INTERVAL;
                self.send_probes(net);
            }
            at(self.probe_at);
        }
        if let Some(t) = next {
            self.schedule(t);
        }
    }

    /// Asks a few nodes for their table: members of waiting partitions that
    /// did not fail, and one node of the table in turn.
    fn send_probes(&mut self, net: &mut dyn Transport) {
        let mut targets: [(NodeId, u16); PROBE_TARGETS_MAX] = [(0, 0); PROBE_TARGETS_MAX];
        let mut n = 0;
        let add = |t: (NodeId, u16), targets: &mut [(NodeId, u16)], n: &mut usize| {
            if *n < PROBE_TARGETS_MAX && !targets[..*n].iter().any(|x| x.0 == t.0) {
                targets[*n] = t;
                *n += 1;
            }
        };
        for part in self.parts.iter() {
            if n >= PROBE_TARGETS_MAX - 1 {
                break;
            }
            if !part.in_use || part.wait_since.is_none() {
                continue;
            }
            let Some(route) = self.table.partition(part.partition) else {
                continue;
            };
            for m in route.writers() {
                let failed = part.legs[..part.nlegs]
                    .iter()
                    .any(|l| l.node == m.node && l.state == LegState::Failed);
                if failed {
                    continue;
                }
                if let Some(info) = self.table.node(m.node) {
                    add(
                        (m.node, self.table.shard_of(info, part.partition)),
                        &mut targets,
                        &mut n,
                    );
                }
                if n >= PROBE_TARGETS_MAX - 1 {
                    break;
                }
            }
        }
        let count = self.table.nodes.len();
        for k in 0..count {
            let node = &self.table.nodes[(self.probe_rr + k) % count];
            if node.up && !targets[..n].iter().any(|t| t.0 == node.id) {
                self.probe_rr = (self.probe_rr + k + 1) % count;
                add((node.id, 0), &mut targets, &mut n);
                break;
            }
        }
        for &(node, shard) in &targets[..n] {
            let Some(addr) = self.addrs.get(&node).copied() else {
                continue;
            };
            let now = self.now;
            let Ok(conn) = net.conn(node, shard, addr, now, self) else {
                continue;
            };
            self.probe_seq = self.probe_seq.wrapping_add(1);
            let id = CONTROL_BIT | (self.probe_seq & 0x3fff_ffff);
            let mut h = Header::request(Op::RouteTable, id);
            h.epoch = self.table.epoch;
            h.volume = self.volume;
            net.send(conn, &h, None);
            debug!(
                queue = self.index,
                node,
                epoch = self.table.epoch,
                "asking for a newer route table"
            );
        }
    }
}

impl Sink for Core {
    fn dest(&mut self, conn: ConnId, h: &Header) -> Dest {
        if h.status == Status::Ok {
            if let Some((p, _)) = self.match_leg(conn, h) {
                let part = &self.parts[p as usize];
                if part.op == Op::Read && h.payload_bytes == part.len {
                    let slot = part.req;
                    let skip = part.skip;
                    let r = &mut self.reqs[slot as usize];
                    r.pinned += 1;
                    return Dest::Segments {
                        slot,
                        segs: r.segs.as_ptr(),
                        nsegs: r.segs.len(),
                        skip,
                    };
                }
            }
        }
        Dest::Scratch
    }

    fn response(&mut self, conn: ConnId, node: NodeId, h: &Header, payload: &[u8]) {
        self.on_response(conn, node, h, payload);
    }

    fn unpin(&mut self, slot: u32) {
        let r = &mut self.reqs[slot as usize];
        debug_assert!(r.pinned > 0);
        r.pinned = r.pinned.saturating_sub(1);
    }

    fn closed(&mut self, conn: ConnId) {
        for p in 0..self.parts.len() as u32 {
            for i in 0..self.parts[p as usize].nlegs {
                let part = &self.parts[p as usize];
                if !part.in_use {
                    break;
                }
                let leg = part.legs[i];
                if leg.conn == conn && leg.state == LegState::InFlight {
                    self.leg_failed(p, i, "connection closed");
                }
            }
        }
    }
}

/// A queue of the client: see the crate doc for the threading model.
pub(crate) struct ClientQueue {
    core: Core,
    net: Net,
    timer: OwnedFd,
    wake: OwnedFd,
    events: Box<[libc::epoll_event]>,
    /// When the timerfd is set to fire (None: disarmed or fired).
    armed: Option<Instant>,
    /// The eventfd was signalled and not yet drained.
    woken: bool,
    /// Keep-alive interval ([`ClientConfig::keepalive`]) and the next round
    /// (None: keep-alive off).
    keepalive: Duration,
    keepalive_at: Option<Instant>,
}

// SAFETY: the raw pointers a queue holds (segments of requests in flight, in
// its slabs and its connections' send queues) point to caller memory the
// submit contract keeps valid; the queue moves between threads only whole
// and is used by one thread at a time (DeviceQueue is Send, not Sync).
unsafe impl Send for ClientQueue {}

fn new_fd(fd: RawFd, what: &str, index: usize) -> Result<OwnedFd, IoError> {
    if fd < 0 {
        return Err(IoError::Io(format!(
            "queue {index}: {what}: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl ClientQueue {
    pub(crate) fn open(
        index: usize,
        cfg: &ClientConfig,
        info: &DeviceInfo,
        shared: Arc<Shared>,
    ) -> Result<ClientQueue, IoError> {
        // SAFETY: no memory arguments; results are checked by new_fd.
        let epoll = new_fd(
            unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) },
            "epoll_create1",
            index,
        )?;
        // SAFETY: as above.
        let timer = new_fd(
            unsafe {
                libc::timerfd_create(
                    libc::CLOCK_MONOTONIC,
                    libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
                )
            },
            "timerfd_create",
            index,
        )?;
        // SAFETY: as above.
        let wake = new_fd(
            unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) },
            "eventfd",
            index,
        )?;
        let net = Net::new(epoll, shared.clone(), index);
        let reg = |fd: RawFd, tok: u64, what: &str| {
            net.register(fd, tok)
                .map_err(|e| IoError::Io(format!("queue {index}: epoll add {what}: {e}")))
        };
        reg(timer.as_raw_fd(), TOKEN_TIMER, "timerfd")?;
        reg(wake.as_raw_fd(), TOKEN_WAKE, "eventfd")?;
        let table = shared
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let now = Instant::now();
        let idle_leg = Leg {
            node: 0,
            conn: 0,
            state: LegState::Idle,
            at: now,
        };
        let reqs = (0..INFLIGHT_MAX)
            .map(|_| Request {
                in_use: false,
                tag: 0,
                op: IoOp::Read,
                offset: 0,
                len: 0,
                segs: Vec::with_capacity(SEGMENTS_PREALLOC),
                version: 0,
                cut: 0,
                parts_active: 0,
                queued: false,
                error: None,
                deadline: now,
                pinned: 0,
            })
            .collect();
        let mut zero_block = vec![0u8; BLOCK_BYTES as usize].into_boxed_slice();
        let zero_seg = Box::new([IoSegment {
            addr: zero_block.as_mut_ptr(),
            len: BLOCK_BYTES as usize,
        }]);
        let parts = (0..PARTS_MAX)
            .map(|_| Part {
                in_use: false,
                req: 0,
                gen: 0,
                op: Op::Read,
                offset: 0,
                len: 0,
                skip: 0,
                crc: 0,
                flags: 0,
                era: 0,
                zero: false,
                version: 0,
                partition: 0,
                epoch: 0,
                legs: [idle_leg; LEGS_MAX],
                nlegs: 0,
                read_start: 0,
                read_tries: 0,
                read_err: None,
                wait_since: None,
                retry_at: now,
            })
            .collect();
        let core = Core {
            index,
            volume: cfg.volume,
            placement: if cfg.lineage == 0 {
                cfg.volume
            } else {
                cfg.lineage
            },
            read_snapshot: cfg.read_snapshot,
            attachment: crate::attachment_of(&cfg.credential),
            fence: crate::fence_of(&cfg.credential),
            small_write_max: cfg.small_write_max,
            request_timeout: cfg.request_timeout,
            op_deadline: cfg.op_deadline,
            read_policy: cfg.read_policy,
            info: info.clone(),
            addrs: resolve_addrs(&table),
            table,
            shared,
            reqs,
            free_reqs: (0..INFLIGHT_MAX as u32).rev().collect(),
            parts,
            free_parts: (0..PARTS_MAX as u32).rev().collect(),
            waiting_reqs: VecDeque::with_capacity(INFLIGHT_MAX),
            actions: VecDeque::with_capacity(PARTS_MAX * 2),
            done: VecDeque::with_capacity(INFLIGHT_MAX),
            now,
            unix_ms: wall_unix_ms(),
            next_scan_at: None,
            waiting_parts: 0,
            probe_at: now,
            probe_seq: 0,
            probe_rr: index,
            read_rr: index,
            zero_block,
            zero_seg,
        };
        Ok(ClientQueue {
            core,
            net,
            timer,
            wake,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_MAX].into_boxed_slice(),
            armed: None,
            woken: false,
            keepalive: cfg.keepalive,
            keepalive_at: (!cfg.keepalive.is_zero()).then(|| now + cfg.keepalive),
        })
    }

    /// Hands the core its clocks, read once per `submit`/`poll`.
    fn read_clocks(&mut self) {
        self.core.now = Instant::now();
        self.core.unix_ms = wall_unix_ms();
    }

    fn run_actions(&mut self) {
        while let Some(a) = self.core.actions.pop_front() {
            match a {
                Action::Start { part, gen } => {
                    if self.core.part_current(part, gen) {
                        self.core.start_part(part, &mut self.net);
                    }
                }
                Action::Send { part, gen, leg } => {
                    if self.core.part_current(part, gen) {
                        self.core.send_leg(part, leg, &mut self.net);
                    }
                }
                Action::Release { slot, free } => {
                    self.net.release_slot(slot, &mut self.core);
                    debug_assert_eq!(self.core.reqs[slot as usize].pinned, 0);
                    if free {
                        self.core.free_reqs.push(slot);
                    }
                }
            }
        }
    }

    /// Runs queued actions and writes queued frames until both are done.
    fn settle(&mut self) {
        for _ in 0..SETTLE_ROUNDS_MAX {
            self.run_actions();
            self.net.flush(&mut self.core);
            if self.core.actions.is_empty() {
                return;
            }
        }
    }

    fn drain(fd: RawFd) {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into `v` from a non-blocking timerfd/eventfd we own.
        unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    }

    /// Sets the timerfd to the next timer if it is earlier than what is set.
    fn arm_timer(&mut self) {
        let at = match (self.core.next_scan_at, self.keepalive_at) {
            (Some(a), Some(b)) => a.min(b),
            (Some(t), None) | (None, Some(t)) => t,
            (None, None) => return,
        };
        if self.armed.is_some_and(|a| a <= at) {
            return;
        }
        let d = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_micros(50));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `spec` lives across the call; the old value is not asked for.
        let rc = unsafe {
            libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut())
        };
        if rc == 0 {
            self.armed = Some(at);
        } else {
            warn!(queue = self.core.index, error = %std::io::Error::last_os_error(), "timerfd_settime failed");
        }
    }

    fn signal(&mut self) {
        if self.woken {
            return;
        }
        let one = 1u64;
        // SAFETY: writes 8 bytes from `one` to our non-blocking eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        self.woken = true;
    }
}

impl DeviceQueue for ClientQueue {
    unsafe fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), IoError> {
        self.read_clocks();
        let before = self.core.done.len();
        self.core.submit(req)?;
        // Frames are queued now and written by the next poll (a batch of
        // submits costs one writev per connection), as the file device
        // hands its SQEs to the kernel in the next poll.
        self.run_actions();
        if self.core.done.len() > before {
            // Completed at once (flush): make the completion fd readable.
            self.signal();
        }
        self.arm_timer();
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(IoCompletion)) -> usize {
        self.read_clocks();
        self.settle();
        for _ in 0..EPOLL_ROUNDS_MAX {
            // SAFETY: `events` is a live array of EVENTS_MAX entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.net.epoll_fd(),
                    self.events.as_mut_ptr(),
                    EVENTS_MAX as libc::c_int,
                    0,
                )
            };
            if n <= 0 {
                break;
            }
            for k in 0..n as usize {
                let ev = self.events[k];
                match ev.u64 {
                    TOKEN_TIMER => {
                        Self::drain(self.timer.as_raw_fd());
                        self.armed = None;
                    }
                    TOKEN_WAKE => {
                        Self::drain(self.wake.as_raw_fd());
                        self.woken = false;
                    }
                    data => self.net.on_event(data, ev.events, &mut self.core),
                }
            }
            self.settle();
            if (n as usize) < EVENTS_MAX {
                break;
            }
        }
        if self.core.next_scan_at.is_some_and(|t| self.core.now >= t) {
            self.net
                .expire_connects(self.core.now, self.core.request_timeout, &mut self.core);
            self.core.scan(&mut self.net);
            self.settle();
        }
        if self.keepalive_at.is_some_and(|t| self.core.now >= t) {
            self.keepalive_at = Some(self.core.now + self.keepalive);
            self.net.keepalive();
            self.settle();
        }
        if !self.core.actions.is_empty() || self.net.has_unsent() {
            // Work left over from a bounded round: come back soon.
            self.signal();
        }
        self.arm_timer();
        let mut n = 0;
        while let Some(c) = self.core.done.pop_front() {
            done(c);
            n += 1;
        }
        n
    }

    fn inflight(&self) -> usize {
        self.core.inflight()
    }

    fn inflight_max(&self) -> usize {
        INFLIGHT_MAX
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.net.epoll_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_round_trip() {
        for (p, l, g) in [
            (0, 0, 0),
            (PARTS_MAX as u32 - 1, LEGS_MAX - 1, GEN_MASK),
            (5, 3, 77),
        ] {
            let id = data_request_id(p, l, g);
            assert_eq!(id & CONTROL_BIT, 0);
            assert_eq!(split_request_id(id), (p, l, g));
        }
    }
}
