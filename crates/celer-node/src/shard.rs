//! One node shard: a thread that owns an engine shard, its connections and
//! its partitions, and runs everything to completion in one epoll loop.
//!
//! Per loop turn: read every readable socket and handle whole frames
//! (submitting engine requests and forwards), let the engine submit and
//! reap, send responses, check forward timeouts, advance backfill, then
//! sleep in epoll (or keep polling for `busy_poll` after activity).

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use celer_engine::{
    AlignedBuf, BlockKind, Completion, EngineError, EngineOp, EngineRequest, Segment, Shard,
    BLOCK_SIZE,
};

mod catch_up;
mod fill;
mod layers;
mod repair;
use catch_up::{catch_up_ranges, CatchUp};
use celer_proto::auth::{Credential, HelloProof, Peer, NONCE_BYTES};
use celer_proto::{
    clock_limit_at, version_clock, version_writer, Header, Kind, Op, Status, FLAG_CATCH_UP,
    FLAG_SECTORS, FLAG_SINCE, FLAG_STATES_ONLY, SECTOR_BYTES, STATE_CRC_BYTES,
};
use celer_route::NodeId;
pub(crate) use repair::RepairResult;
use repair::{Repair, REQ_REPAIR, TAG_REPAIR};
mod scrub;
use scrub::{Scrub, REQ_COMPARE, TAG_SCRUB};
pub(crate) use scrub::{ScrubCell, ScrubShared};

use crate::conn::{Conn, ConnAuth, Frame, Next, Wire, SEND_HIGH_BYTES, SEND_LOW_BYTES};
use crate::handshake::{ConnTicket, Handshaken};
use crate::metrics::ShardCounters;
use crate::{AgentMsg, BackfillProgress, Installed, NodeError, NodeShared, ShardMsg};

pub(crate) struct ShardConfig {
    pub(crate) forward_timeout: Duration,
    pub(crate) busy_poll: Duration,
    pub(crate) idle_timeout: Option<Duration>,
    /// This shard's share of the node's scrub rate (0: off).
    pub(crate) scrub_bytes_per_sec: u64,
    pub(crate) scrub_interval: Duration,
}

const TOKEN_WAKE: u64 = u64::MAX;
const TOKEN_ENGINE: u64 = u64::MAX - 1;
/// Engine tags at or above this are backfill writes.
const TAG_BACKFILL: u64 = 1 << 40;
/// Engine tags at or above this (and below TAG_BACKFILL) release chunks this
/// node no longer holds for the cluster.
const TAG_PURGE: u64 = 1 << 39;
/// Chunk releases in flight per shard: one, so freeing space never crowds
/// out client I/O.
const PURGE_INFLIGHT_MAX: usize = 1;
/// Rescans after a purge list ran out: chunks written just before the
/// volume was deleted or the partition left (a late write) are found too.
const PURGE_RESCANS: u32 = 5;
/// Request ids with this bit are the backfill's own requests.
const REQ_BACKFILL: u32 = 1 << 31;
/// Generations of an op slot wrap below this, so a forward's request id
/// (`gen << 16 | slot`) never has the bits of backfill or repair requests
/// (`REQ_BACKFILL`, `REQ_REPAIR`) set.
const OP_GEN_MASK: u16 = 0x3fff;
/// Ops kept for client requests; the engine has a few more for backfill.
const CLIENT_OPS: usize = 224;
const BACKFILL_WRITES_MAX: usize = 16;
/// ListChunks in flight per shard: every queued backfill is listed soon
/// after a route change (so its bytes are known), without a burst of list
/// requests on the sources.
const BACKFILL_LISTS_MAX: usize = 4;
/// A backfill request not answered in this long is sent again (a silent
/// source must not hold a list slot for good).
const BACKFILL_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest BackfillRead piece.
const BACKFILL_PIECE_BYTES: u64 = 1 << 20;
/// Bytes per block in a BackfillRead state table: version u64 + kind u8.
const STATE_BYTES: usize = 9;
/// Receive-buffer room a shard lends to connections receiving frames
/// larger than `conn::RBUF_INITIAL` (large writes). A connection that needs
/// room the budget lacks waits, not read, until some is given back.
const RBUF_BUDGET_BYTES: usize = 64 << 20;
/// Requests of one connection served at once: one peer cannot take every op
/// (and its buffer) of the shard.
const CONN_OPS_MAX: usize = 64;
/// Requests whose buffer is larger than this are large: their buffers
/// count against `OP_LARGE_BUDGET_BYTES`.
const OP_LARGE_BYTES: usize = 256 << 10;
/// Bytes of large requests a shard serves at once (a large request that
/// does not fit waits), and of large op buffers it keeps between requests
/// (above it, a finished op gives its buffer back). So a peer asking for
/// 4 MiB reads it never takes cannot make the shard hold 224 × 4 MiB.
const OP_LARGE_BUDGET_BYTES: usize = 32 << 20;
/// A frame whose header arrived must be whole within this (a peer that
/// announces a large payload and trickles it is cut).
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum OpKind {
    Read,
    /// Write, WriteZeroes, Discard applied locally.
    Mutate,
    /// WritePrimary: local write plus forwards.
    Primary,
    /// Serving a backfill read: state table then data.
    BackfillServe,
    /// A fill (flatten): the head copies what it reads from under it.
    Fill,
}

struct NodeOp {
    busy: bool,
    gen: u16,
    kind: OpKind,
    conn: usize,
    conn_gen: u32,
    req: Header,
    buf: AlignedBuf,
    /// Bytes of `buf` the response carries.
    len: usize,
    /// A read of sectors: where in `buf` (whole blocks) the requested range
    /// starts.
    at: usize,
    /// Engine request + forwards not yet answered.
    pending: u32,
    status: Status,
    /// Forwards in flight: (conn, conn gen).
    forwards: [(usize, u32); 8],
    nforwards: usize,
    deadline: Option<Instant>,
    started: Instant,
    /// A member (this node or a forward) holds a newer version than the
    /// write's: the highest such (answered with `OlderVersion`).
    newer: u64,
    /// A fill: the blocks it copied (its answer's payload).
    copied: u32,
}

/// One partition this shard backfills. Every queued backfill is listed
/// early (`List` → `Waiting` → `Read`), then they copy one at a time, the
/// first in `ShardLoop::backfills` (`Read` → `Waiting` → `Apply` → `Read`...).
struct Backfill {
    /// Tags its engine writes, so a restarted backfill ignores old ones.
    serial: u32,
    partition: u32,
    /// The epoch it started in (reported when done): this node has been a
    /// syncing member since then, unless the control service knows better.
    epoch: u64,
    source: NodeId,
    conn: Option<(usize, u32)>,
    /// Ask the source for only what this member missed while it was down
    /// (`FLAG_CATCH_UP`); cleared when the source did not record it all.
    catch_up: bool,
    /// What to copy: (volume, byte offset, bytes), within one chunk each:
    /// whole chunks, or the runs of blocks written while we were down.
    ranges: Vec<(u64, u64, u64)>,
    next_range: usize,
    /// Offset within the current range of the next piece.
    piece: u64,
    stage: BfStage,
    retry_at: Option<Instant>,
    /// The request it waits for (from the shard-wide `backfill_seq`, so a
    /// response finds its backfill among several in flight).
    seq: u32,
    /// When that request went out.
    sent_at: Instant,
    buf: AlignedBuf,
    states: Vec<(BlockKind, u64)>,
    writes_pending: usize,
    /// Runs of the current piece still to submit: (first block, count).
    runs: Vec<(usize, usize, BlockKind, u64)>,
    next_run: usize,
    /// Length of the piece being read or applied.
    piece_len: u64,
    /// A write of the current piece failed: read and apply it again.
    piece_failed: bool,
    started: Instant,
    /// Bytes of the ranges listed (less those of volumes deleted since);
    /// `None` until the source's list came back.
    bytes_total: Option<u64>,
    /// Bytes of pieces written (all their runs done).
    bytes_done: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum BfStage {
    List,
    /// Waiting for the answer to request `seq`.
    Waiting,
    /// Listed: reads the next piece when its turn comes.
    Read,
    Apply,
}

/// A fence install (volume, generation pairs) and where to answer once
/// the older generations' mutations are done.
type FenceWait = (Arc<Vec<(u64, u32)>>, Sender<u16>);

struct ShardLoop {
    id: u16,
    engine: Shard,
    shared: Arc<NodeShared>,
    cfg: ShardConfig,
    epfd: OwnedFd,
    conns: Vec<Option<Conn>>,
    free_conns: Vec<usize>,
    conn_gen: u32,
    peers: HashMap<(NodeId, u16), usize>,
    ops: Vec<NodeOp>,
    free_ops: Vec<usize>,
    route: Option<Arc<Installed>>,
    /// Per volume, the highest write version accepted or stored here.
    versions: HashMap<u64, u64>,
    /// Per volume, the fence generation: mutations of older ones are
    /// refused (`Fenced`). Raised, never lowered (see `set_fences`).
    fences: HashMap<u64, u32>,
    /// Fence installs that wait for older-generation mutations in flight.
    fence_waits: Vec<FenceWait>,
    /// Layered volumes (snapshots, clones): see `layers.rs`.
    layers: HashMap<u64, Arc<layers::Layered>>,
    /// Deleted snapshots' era keys still read through, and the key of the
    /// era above each (see `layers::shadowed`).
    trims: HashMap<u64, u64>,
    /// Layer installs that wait for writes to eras no longer accepted.
    layer_waits: Vec<(Arc<Vec<celer_meta::api::VolumeLayers>>, Sender<u16>)>,
    /// Receive-buffer room lent to connections (see RBUF_BUDGET_BYTES).
    rbuf_lent: usize,
    /// Connections waiting for room.
    starved: Vec<usize>,
    /// Bytes of large requests being served (see OP_LARGE_BUDGET_BYTES).
    large_inflight: usize,
    /// Bytes of large op buffers allocated (busy or idle).
    large_kept: usize,
    /// Connections with unprocessed frames (stalled for lack of ops).
    backlog: Vec<usize>,
    /// Connections with output to send.
    dirty: Vec<usize>,
    forwards_inflight: usize,
    /// When epoll_wait last returned: the input time of the connections it
    /// reported (the idle timeout), one clock read per wake-up rather than
    /// one per readable connection.
    woke_at: Instant,
    backfills: Vec<Backfill>,
    /// Dropped backfills whose engine writes are still in flight: their
    /// buffers must outlive those writes.
    retired: Vec<Backfill>,
    backfill_serial: u32,
    /// Request ids of backfill requests (with `REQ_BACKFILL`).
    backfill_seq: u32,
    /// Bytes of backfills finished in the rebalance under way (until the
    /// route table has no syncing member): they stay in the figures.
    round_bytes: u64,
    /// Bytes ever backfilled (every piece written).
    copied_bytes: u64,
    completions: Vec<Completion>,
    /// Partitions whose backfill finished and was reported: (epoch, bytes).
    reported: HashMap<u32, (u64, u64)>,
    counters: ShardCounters,
    stopping: bool,
    /// Deleted volumes (sorted): their I/O is refused.
    deleted: Arc<Vec<u64>>,
    /// Chunks to release (deleted volumes, partitions that moved away), and
    /// releases in flight.
    purge: Vec<(u64, u64)>,
    purging: usize,
    /// Rescans left (see PURGE_RESCANS).
    purge_rescans: u32,
    /// Damaged blocks being repaired from another member (see `repair`).
    repairs: Vec<Repair>,
    /// Blocks found unrepairable lately: (volume, offset, quiet until).
    unrepairable: Vec<(u64, u64, Instant)>,
    repair_serial: u32,
    repair_seq: u32,
    scrub: Scrub,
    compare_seq: u32,
    /// What down members of our partitions miss (see `catch_up`).
    catch_ups: Vec<CatchUp>,
}

pub(crate) fn run(
    engine: Shard,
    rx: Receiver<ShardMsg>,
    wake: Arc<OwnedFd>,
    shared: Arc<NodeShared>,
    cfg: ShardConfig,
) -> Result<(), NodeError> {
    // SAFETY: plain syscall; checked.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epfd < 0 {
        return Err(NodeError::Io {
            what: "epoll_create1".into(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: a fresh descriptor.
    let epfd = unsafe { OwnedFd::from_raw_fd(epfd) };
    epoll_add(
        epfd.as_raw_fd(),
        wake.as_raw_fd(),
        TOKEN_WAKE,
        libc::EPOLLIN as u32,
    );
    let engine_fd = engine
        .completion_fd()
        .ok_or_else(|| NodeError::Config("engine opened without a completion eventfd".into()))?;
    epoll_add(
        epfd.as_raw_fd(),
        engine_fd,
        TOKEN_ENGINE,
        libc::EPOLLIN as u32,
    );
    let id = engine.id() as u16;
    let versions = engine.max_versions_by_volume();
    let ops = (0..CLIENT_OPS)
        .map(|_| NodeOp {
            busy: false,
            gen: 0,
            kind: OpKind::Read,
            conn: 0,
            conn_gen: 0,
            req: Header::request(Op::Ping, 0),
            buf: AlignedBuf::new(1),
            len: 0,
            at: 0,
            pending: 0,
            status: Status::Ok,
            forwards: [(0, 0); 8],
            nforwards: 0,
            deadline: None,
            started: Instant::now(),
            newer: 0,
            copied: 0,
        })
        .collect();
    let counters = shared.metrics.shard(id);
    let scrub = Scrub::new(cfg.scrub_bytes_per_sec, cfg.scrub_interval);
    let mut s = ShardLoop {
        id,
        engine,
        shared,
        cfg,
        epfd,
        conns: Vec::new(),
        free_conns: Vec::new(),
        conn_gen: 0,
        peers: HashMap::new(),
        ops,
        free_ops: (0..CLIENT_OPS).rev().collect(),
        route: None,
        versions,
        fences: HashMap::new(),
        fence_waits: Vec::new(),
        layers: HashMap::new(),
        trims: HashMap::new(),
        layer_waits: Vec::new(),
        rbuf_lent: 0,
        starved: Vec::new(),
        large_inflight: 0,
        large_kept: 0,
        backlog: Vec::new(),
        dirty: Vec::new(),
        forwards_inflight: 0,
        backfills: Vec::new(),
        retired: Vec::new(),
        woke_at: Instant::now(),
        backfill_serial: 0,
        backfill_seq: 0,
        round_bytes: 0,
        copied_bytes: 0,
        completions: Vec::with_capacity(256),
        reported: HashMap::new(),
        counters,
        stopping: false,
        deleted: Arc::new(Vec::new()),
        purge: Vec::new(),
        purging: 0,
        purge_rescans: 0,
        repairs: Vec::new(),
        unrepairable: Vec::new(),
        repair_serial: 0,
        repair_seq: 0,
        scrub,
        compare_seq: 0,
        catch_ups: Vec::new(),
    };
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut last_activity = Instant::now();
    let mut last_timer = Instant::now();
    loop {
        let mut activity = false;
        // Messages: connections, routes, stop.
        while let Ok(m) = rx.try_recv() {
            activity = true;
            match m {
                ShardMsg::Conn(hs) => s.adopt(*hs),
                ShardMsg::Route(r) => s.install(r),
                ShardMsg::Deleted(ids) => s.set_deleted(ids),
                ShardMsg::BackfillAgain(epoch, ps) => s.backfill_again(epoch, &ps),
                ShardMsg::Fences(f, reply) => s.set_fences(f, reply),
                ShardMsg::Layers(l, reply) => s.set_layers(l, reply),
                ShardMsg::LayerUsage(q, reply) => {
                    let _ = reply.send(s.layer_usage(&q));
                }
                ShardMsg::Stop => s.stopping = true,
            }
        }
        if s.stopping {
            break;
        }
        activity |= s.engine_poll();
        if !s.backlog.is_empty() {
            let backlog = std::mem::take(&mut s.backlog);
            for c in backlog {
                s.process_frames(c);
            }
        }
        s.backfill_step();
        s.repair_step();
        s.scrub_step();
        s.purge_step();
        s.shared.chunks[s.id as usize].store(
            s.engine.allocated_chunks(),
            std::sync::atomic::Ordering::Relaxed,
        );
        activity |= s.engine_poll();
        s.flush_dirty();
        let now = Instant::now();
        if now.duration_since(last_timer) >= Duration::from_millis(5) {
            last_timer = now;
            s.check_timeouts(now);
        }
        if activity {
            last_activity = now;
        }
        let timeout_ms = if now.duration_since(last_activity) < s.cfg.busy_poll {
            0
        } else if s.forwards_inflight > 0
            || s.backfills.iter().any(|b| b.retry_at.is_some())
            || s.repairs_pending()
        {
            5
        } else if !s.backfills.is_empty() {
            20
        } else {
            200
        };
        // A scrub waiting for its rate wakes up when it may read again.
        let timeout_ms = match s.scrub.wait_hint() {
            Some(d) if timeout_ms > 0 => timeout_ms.min(d.as_millis().max(1) as i32),
            _ => timeout_ms,
        };
        // SAFETY: events is a valid buffer of its length.
        let n = unsafe {
            libc::epoll_wait(
                s.epfd.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(NodeError::Io {
                what: "epoll_wait".into(),
                source: e,
            });
        }
        if n > 0 {
            s.woke_at = Instant::now();
        }
        for ev in &events[..n as usize] {
            let (token, bits) = (ev.u64, ev.events);
            match token {
                TOKEN_WAKE => drain_eventfd(wake.as_raw_fd()),
                TOKEN_ENGINE => drain_eventfd(engine_fd),
                c => {
                    let c = c as usize;
                    if bits & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                        s.on_readable(c);
                    }
                    if bits & libc::EPOLLOUT as u32 != 0 {
                        s.flush_conn(c);
                    }
                }
            }
            last_activity = Instant::now();
        }
    }
    // Drain: finish what the engine has, then close it (checkpoint).
    while s.engine.inflight() > 0 {
        let mut sink = |_c: Completion| {};
        s.engine.wait(&mut sink);
    }
    s.engine.close()?;
    Ok(())
}

fn epoll_add(epfd: RawFd, fd: RawFd, token: u64, events: u32) {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: valid fds and event struct.
    unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
}

fn epoll_mod(epfd: RawFd, fd: RawFd, token: u64, events: u32) {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: valid fds and event struct.
    unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_MOD, fd, &mut ev) };
}

fn drain_eventfd(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a local from a nonblocking eventfd.
    unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
}

/// Starts a nonblocking connect; the socket becomes writable when connected.
fn connect_nonblocking(addr: SocketAddr) -> io::Result<TcpStream> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall; checked.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor, owned from here on.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let (storage, len) = sockaddr(addr);
    // SAFETY: storage holds a valid sockaddr of `len` bytes.
    let r = unsafe { libc::connect(fd, &storage as *const _ as *const libc::sockaddr, len) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            (
                storage,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            (
                storage,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

/// The op buffer a request needs if it is large (see OP_LARGE_BYTES), else 0.
fn large_bytes(h: &Header) -> usize {
    let bytes = match h.op {
        // A read of sectors reads the whole blocks around them.
        Op::Read => {
            (h.offset as usize % BLOCK_SIZE + h.length as usize).next_multiple_of(BLOCK_SIZE)
        }
        Op::Write | Op::WritePrimary | Op::Fill => h.length as usize,
        // State table and data.
        Op::BackfillRead => h.length as usize + h.length as usize / BLOCK_SIZE * STATE_BYTES,
        _ => 0,
    };
    if bytes > OP_LARGE_BYTES {
        bytes
    } else {
        0
    }
}

fn engine_status(e: &EngineError) -> Status {
    match e {
        EngineError::Misaligned { .. } | EngineError::BadRange { .. } => Status::Invalid,
        EngineError::TooManySegments { .. } | EngineError::WrongShard { .. } => Status::Invalid,
        EngineError::QueueFull { .. } => Status::Busy,
        EngineError::NoSpace { .. } => Status::NoSpace,
        EngineError::Checksum { .. } => Status::Checksum,
        _ => Status::Io,
    }
}

impl ShardLoop {
    fn table(&self) -> Option<&celer_route::RouteTable> {
        self.route.as_ref().map(|r| &r.table)
    }

    fn new_conn(
        &mut self,
        stream: TcpStream,
        wire: Wire,
        peer: Option<(NodeId, u16)>,
        auth: ConnAuth,
        ticket: Option<ConnTicket>,
        out: bool,
    ) -> usize {
        self.conn_gen = self.conn_gen.wrapping_add(1);
        let conn = Conn::new(stream, wire, self.conn_gen, peer, auth, ticket);
        let fd = conn.fd();
        let idx = match self.free_conns.pop() {
            Some(i) => {
                self.conns[i] = Some(conn);
                i
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        let mut bits = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
        if out {
            bits |= libc::EPOLLOUT as u32;
            if let Some(c) = self.conns[idx].as_mut() {
                c.want_out = true;
            }
        }
        epoll_add(self.epfd.as_raw_fd(), fd, idx as u64, bits);
        idx
    }

    /// Takes an authenticated connection: answers its Hello with the
    /// node's proof.
    fn adopt(&mut self, hs: Handshaken) {
        let hello = hs.hello;
        let (auth, volume) = match hs.peer {
            Peer::Node { .. } => (ConnAuth::Node, None),
            Peer::Attachment(cap) => {
                self.counters.client_connected();
                (
                    ConnAuth::Attachment {
                        cap,
                        node_nonce: hs.node_nonce,
                        shard: hello.offset as u16,
                        sender: hello.volume,
                    },
                    Some(cap.volume),
                )
            }
        };
        let tls = matches!(hs.wire, Wire::Tls(_));
        let idx = self.new_conn(hs.stream, hs.wire, None, auth, Some(hs.ticket), false);
        let mut r = Header::response_to(&hello, Status::Ok);
        r.version = volume.map_or(0, |v| self.volume_version(v));
        if let Some(c) = self.conns[idx].as_mut() {
            c.queue(r, &[&hs.answer]);
        }
        self.mark_dirty(idx);
        if tls {
            // Requests pipelined after the Hello may already sit in the
            // TLS session, where epoll does not see them.
            self.process_frames(idx);
        }
    }

    /// The highest write version this shard knows for `volume`.
    fn fence_of(&self, volume: u64) -> u32 {
        self.fences.get(&volume).copied().unwrap_or(0)
    }

    /// Raises fence generations (see `ShardMsg::Fences`); with `reply`,
    /// answers once no accepted mutation of an older one is in flight.
    fn set_fences(&mut self, fences: Arc<Vec<(u64, u32)>>, reply: Option<Sender<u16>>) {
        for &(volume, fence) in fences.iter() {
            if fence > self.fence_of(volume) {
                tracing::info!(shard = self.id, volume, fence, "fence generation raised");
                self.fences.insert(volume, fence);
            }
        }
        if let Some(reply) = reply {
            self.fence_waits.push((fences, reply));
            self.answer_fence_waits();
        }
    }

    /// Answers the fence installs whose older-generation mutations are all
    /// done. A few entries at most, and only while a take-over is under way.
    fn answer_fence_waits(&mut self) {
        let ops = &self.ops;
        let id = self.id;
        self.fence_waits.retain(|(fences, reply)| {
            let busy = ops.iter().any(|op| {
                op.busy
                    && matches!(op.kind, OpKind::Mutate | OpKind::Primary)
                    && fences
                        .iter()
                        .any(|&(v, f)| op.req.volume == v && op.req.fence < f)
            });
            if !busy {
                let _ = reply.send(id);
            }
            busy
        });
    }

    fn volume_version(&self, volume: u64) -> u64 {
        self.versions.get(&volume).copied().unwrap_or(0)
    }

    /// EPOLLIN unless reading is paused, EPOLLOUT while output waits.
    fn arm(&mut self, c: usize) {
        let Some(conn) = self.conns[c].as_mut() else {
            return;
        };
        let want_in = !conn.send_blocked && !conn.starved;
        let want_out = conn.has_output();
        if want_in == conn.want_in && want_out == conn.want_out {
            return;
        }
        conn.want_in = want_in;
        conn.want_out = want_out;
        let mut bits = libc::EPOLLRDHUP as u32;
        if want_in {
            bits |= libc::EPOLLIN as u32;
        }
        if want_out {
            bits |= libc::EPOLLOUT as u32;
        }
        epoll_mod(self.epfd.as_raw_fd(), conn.fd(), c as u64, bits);
    }

    /// The budget runs short: takes back the room lent to connections
    /// that hold no partial frame (all but `except`).
    fn reclaim(&mut self, except: usize) {
        let mut back = 0;
        for (i, conn) in self.conns.iter_mut().enumerate() {
            if i != except {
                if let Some(conn) = conn.as_mut() {
                    back += conn.shrink();
                }
            }
        }
        self.give_back(back);
    }

    /// Gives back lent receive room and lets starved connections go on.
    fn give_back(&mut self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.rbuf_lent -= bytes;
        for c in std::mem::take(&mut self.starved) {
            if let Some(conn) = self.conns[c].as_mut() {
                conn.starved = false;
                self.arm(c);
                if !self.backlog.contains(&c) {
                    self.backlog.push(c);
                }
            }
        }
    }

    fn mark_dirty(&mut self, c: usize) {
        if !self.dirty.contains(&c) {
            self.dirty.push(c);
        }
    }

    fn close_conn(&mut self, c: usize, why: &str) {
        let Some(conn) = self.conns[c].take() else {
            return;
        };
        if let Some(peer) = conn.peer {
            tracing::warn!(shard = self.id, peer = ?peer, "peer connection closed: {why}");
            self.peers.retain(|_, v| *v != c);
        } else if why != "peer closed" {
            let addr = conn
                .stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            tracing::warn!(shard = self.id, %addr, "closing connection: {why}");
        }
        // SAFETY: removing a registered fd.
        unsafe {
            libc::epoll_ctl(
                self.epfd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                conn.fd(),
                std::ptr::null_mut(),
            )
        };
        self.free_conns.push(c);
        self.dirty.retain(|d| *d != c);
        self.backlog.retain(|d| *d != c);
        self.starved.retain(|d| *d != c);
        self.give_back(conn.borrowed);
        // Forwards waiting on this connection fail now.
        let gen = conn.gen;
        for id in 0..self.ops.len() {
            let op = &self.ops[id];
            if !op.busy || op.kind != OpKind::Primary {
                continue;
            }
            if let Some(k) = op.forwards[..op.nforwards]
                .iter()
                .position(|f| *f == (c, gen))
            {
                self.forward_failed(id, k, Status::Unavailable);
            }
        }
        for b in &mut self.backfills {
            if b.conn.is_some_and(|(bc, bg)| bc == c && bg == gen) {
                b.conn = None;
                if b.stage == BfStage::Waiting {
                    b.stage = if b.bytes_total.is_none() {
                        BfStage::List
                    } else {
                        BfStage::Read
                    };
                }
                b.retry_at = Some(Instant::now() + Duration::from_millis(50));
            }
        }
    }

    fn on_readable(&mut self, c: usize) {
        let Some(conn) = self.conns[c].as_mut() else {
            return;
        };
        conn.last_input = self.woke_at;
        if matches!(conn.wire, Wire::Tls(_)) {
            // Reading may have advanced the TLS handshake or a key update,
            // whose records go out with the next flush.
            self.mark_dirty(c);
        }
        let Some(conn) = self.conns[c].as_mut() else {
            return;
        };
        match conn.fill() {
            Ok(true) => {}
            Ok(false) => {
                self.process_frames(c);
                self.close_conn(c, "peer closed");
                return;
            }
            Err(e) => {
                let hs = matches!(&conn.wire, Wire::Tls(t) if t.is_handshaking());
                let why = match (celer_tls::wire::tls_error(&e), &self.shared.tls) {
                    (Some(t), Some(creds)) if conn.peer.is_some() => {
                        celer_tls::describe_client_error(t, &creds.dir, hs)
                    }
                    (Some(t), Some(creds)) => celer_tls::describe_server_error(t, &creds.dir, hs),
                    _ => e.to_string(),
                };
                self.close_conn(c, &why);
                return;
            }
        }
        self.process_frames(c);
    }

    fn process_frames(&mut self, c: usize) {
        loop {
            let Some(conn) = self.conns[c].as_mut() else {
                return;
            };
            if conn.send_blocked || conn.starved {
                return;
            }
            let frame = match conn.next_frame() {
                Ok(Next::Frame(f)) => f,
                Ok(Next::More) => match conn.pull_buffered() {
                    Ok(true) => continue,
                    Ok(false) => return,
                    Err(e) => {
                        self.close_conn(c, &e.to_string());
                        return;
                    }
                },
                Ok(Next::Grow(total)) => {
                    let extra = total - crate::conn::RBUF_INITIAL - conn.borrowed;
                    if self.rbuf_lent + extra > RBUF_BUDGET_BYTES {
                        self.reclaim(c);
                    }
                    let Some(conn) = self.conns[c].as_mut() else {
                        return;
                    };
                    if self.rbuf_lent + extra <= RBUF_BUDGET_BYTES {
                        self.rbuf_lent += extra;
                        conn.grow(total);
                        // Read the rest of the frame into the room.
                        if let Err(e) = conn.fill() {
                            self.close_conn(c, &e.to_string());
                            return;
                        }
                        continue;
                    }
                    conn.starved = true;
                    self.starved.push(c);
                    self.arm(c);
                    return;
                }
                Err(e) => {
                    self.close_conn(c, &format!("corrupt frame: {e}"));
                    return;
                }
            };
            let is_peer = conn.peer.is_some();
            if frame.header.kind == Kind::Response {
                if is_peer {
                    self.on_peer_response(c, &frame);
                } else {
                    self.close_conn(c, "a client sent a response frame");
                    return;
                }
            } else if is_peer {
                if frame.header.op != Op::Challenge {
                    self.close_conn(c, "a peer we called sent a request");
                    return;
                }
                self.on_challenge(c, &frame);
            } else {
                let needs_op = matches!(
                    frame.header.op,
                    Op::Read
                        | Op::Write
                        | Op::WritePrimary
                        | Op::WriteZeroes
                        | Op::Discard
                        | Op::BackfillRead
                        | Op::Fill
                );
                let large = large_bytes(&frame.header);
                if needs_op
                    && (self.free_ops.is_empty()
                        || conn.ops >= CONN_OPS_MAX
                        || (large > 0
                            && self.large_inflight > 0
                            && self.large_inflight + large > OP_LARGE_BUDGET_BYTES))
                {
                    // Out of ops: leave the frame for later (backpressure).
                    if !self.backlog.contains(&c) {
                        self.backlog.push(c);
                    }
                    return;
                }
                if conn.unsent() > SEND_HIGH_BYTES {
                    // Its answers are not being read: read no more of it
                    // until they are (flush_conn lets it go on).
                    conn.send_blocked = true;
                    self.arm(c);
                    return;
                }
                self.on_request(c, &frame);
            }
            if let Some(conn) = self.conns[c].as_mut() {
                conn.consume(&frame);
            }
        }
    }

    /// The node we called sent its Challenge: our Hello goes first.
    fn on_challenge(&mut self, c: usize, f: &Frame) {
        let Some(conn) = self.conns[c].as_mut() else {
            return;
        };
        let payload = conn.payload(f);
        if !matches!(conn.auth, ConnAuth::AwaitChallenge) || payload.len() != NONCE_BYTES {
            self.close_conn(c, "unexpected Challenge from a peer");
            return;
        }
        let mut node_nonce = [0u8; NONCE_BYTES];
        node_nonce.copy_from_slice(payload);
        let mut peer_nonce = [0u8; NONCE_BYTES];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut peer_nonce);
        let shard = conn.peer.map_or(0, |p| p.1);
        let me = self.shared.id as u64;
        let proof = HelloProof::build(
            &Credential::Node {
                key: self.shared.data_key,
            },
            &node_nonce,
            &peer_nonce,
            shard,
            me,
            false,
        );
        let mut hello = Header::request(Op::Hello, 0);
        hello.offset = shard as u64;
        hello.volume = me;
        conn.queue_first(hello, &proof);
        conn.auth = ConnAuth::AwaitAnswer {
            node_nonce,
            peer_nonce,
        };
        self.mark_dirty(c);
    }

    fn respond(&mut self, c: usize, req: &Header, status: Status, payload: &[&[u8]]) {
        let mut h = Header::response_to(req, status);
        h.version = self.volume_version(req.volume);
        h.snapshot = self.head_era(req.volume);
        if let Some(conn) = self.conns[c].as_mut() {
            conn.queue(h, payload);
        }
        self.mark_dirty(c);
    }

    /// Checks the sender's epoch and that this node serves the partition.
    /// On success: the partition, whether this node is an in-sync member,
    /// and whether it is the primary. Allocates nothing.
    fn check_route(&mut self, h: &Header) -> Result<(u32, bool, bool), Status> {
        let Some(t) = self.table() else {
            self.shared.tell_agent(AgentMsg::NeedRoute(h.epoch));
            return Err(Status::RouteBehind);
        };
        if h.epoch < t.epoch {
            return Err(Status::StaleEpoch);
        }
        if h.epoch > t.epoch {
            self.shared.tell_agent(AgentMsg::NeedRoute(h.epoch));
            return Err(Status::RouteBehind);
        }
        if self.deleted.binary_search(&h.volume).is_ok() {
            return Err(Status::Invalid);
        }
        let chunk_bytes = t.chunk_bytes;
        let len = h.length as u64;
        if len == 0 || h.offset % chunk_bytes + len > chunk_bytes {
            return Err(Status::Invalid);
        }
        let p = t.partition_at(self.placement_volume(h.volume), h.offset);
        if p % self.shared.shards as u32 != self.id as u32 {
            return Err(Status::Invalid);
        }
        let part = t.partition(p).ok_or(Status::Invalid)?;
        let Some(me) = part.member(self.shared.id) else {
            return Err(Status::NotReplica);
        };
        Ok((p, me.in_sync, part.primary() == Some(self.shared.id)))
    }

    fn reject(&mut self, c: usize, req: &Header, status: Status) {
        if status == Status::StaleEpoch {
            if let Some(r) = self.route.clone() {
                self.respond(c, req, status, &[&r.encoded]);
                return;
            }
        }
        self.respond(c, req, status, &[]);
    }

    /// What the connection's credential allows: a node, everything; a
    /// client, its capability's volume only, writes only with a read-write
    /// capability and a version naming its attachment, no node-only op.
    fn authorize(&self, c: usize, h: &Header) -> Result<(), Status> {
        let Some(conn) = self.conns[c].as_ref() else {
            return Err(Status::Unauthorized);
        };
        let cap = match &conn.auth {
            ConnAuth::Node => {
                return match h.op {
                    Op::Hello | Op::Challenge | Op::Renew => Err(Status::Invalid),
                    _ => Ok(()),
                }
            }
            ConnAuth::Attachment { cap, .. } => cap,
            _ => return Err(Status::Unauthorized),
        };
        match h.op {
            Op::Ping | Op::Flush | Op::RouteTable | Op::Renew => return Ok(()),
            // ListChunks from a client: its own volume's chunks only (see
            // serve_list_chunks), for the NBD front end's block status.
            // Fill: the volume reads the same after it (a read-only
            // capability may send it, and it is not fenced).
            Op::Read
            | Op::ListChunks
            | Op::Fill
            | Op::Write
            | Op::WritePrimary
            | Op::WriteZeroes
            | Op::Discard => {}
            Op::BackfillRead | Op::Hello | Op::Challenge => return Err(Status::Unauthorized),
        }
        if h.volume != cap.volume {
            return Err(Status::Unauthorized);
        }
        if crate::unix_ms() >= cap.expires_unix_ms {
            return Err(Status::Expired);
        }
        if !matches!(h.op, Op::Read | Op::ListChunks | Op::Fill) {
            if cap.read_only {
                return Err(Status::ReadOnly);
            }
            if h.attachment != cap.attachment
                || version_writer(h.version) != cap.attachment as u16
                || h.fence != cap.fence
            {
                return Err(Status::Unauthorized);
            }
        }
        Ok(())
    }

    /// `Renew`: a newer capability for the connection, proven like the
    /// Hello; the same volume and attachment only.
    fn renew(&mut self, c: usize, f: &Frame) {
        let h = f.header;
        let Some(conn) = self.conns[c].as_ref() else {
            return;
        };
        let ConnAuth::Attachment {
            cap,
            node_nonce,
            shard,
            sender,
        } = &conn.auth
        else {
            return self.respond(c, &h, Status::Unauthorized, &[]);
        };
        let checked = HelloProof::check(
            conn.payload(f),
            &self.shared.data_key,
            node_nonce,
            *shard,
            *sender,
            true,
            crate::unix_ms(),
        );
        let status = match checked {
            Ok((Peer::Attachment(new), _))
                if new.volume == cap.volume && new.attachment == cap.attachment =>
            {
                if let Some(ConnAuth::Attachment { cap, .. }) =
                    self.conns[c].as_mut().map(|x| &mut x.auth)
                {
                    *cap = new;
                }
                Status::Ok
            }
            Ok(_) => Status::Unauthorized,
            Err(celer_proto::auth::AuthError::Expired { .. }) => Status::Expired,
            Err(e) => {
                tracing::warn!(shard = self.id, "capability renewal refused: {e}");
                Status::Unauthorized
            }
        };
        self.respond(c, &h, status, &[]);
    }

    fn on_request(&mut self, c: usize, f: &Frame) {
        let h = f.header;
        if let Err(s) = self.authorize(c, &h) {
            return self.respond(c, &h, s, &[]);
        }
        match h.op {
            Op::Hello | Op::Challenge => self.respond(c, &h, Status::Invalid, &[]),
            Op::Renew => self.renew(c, f),
            Op::Ping | Op::Flush => self.respond(c, &h, Status::Ok, &[]),
            Op::RouteTable => match self.table().map(|t| t.epoch) {
                Some(e) if h.epoch < e => self.reject(c, &h, Status::StaleEpoch),
                Some(e) if h.epoch == e => self.respond(c, &h, Status::Ok, &[]),
                _ => {
                    self.shared.tell_agent(AgentMsg::NeedRoute(h.epoch));
                    self.respond(c, &h, Status::RouteBehind, &[]);
                }
            },
            Op::ListChunks => self.serve_list_chunks(c, &h),
            Op::Read => self.start_read(c, &h, OpKind::Read),
            Op::BackfillRead => self.start_read(c, &h, OpKind::BackfillServe),
            Op::Write | Op::WritePrimary | Op::WriteZeroes | Op::Discard => {
                self.start_mutation(c, f)
            }
            Op::Fill => self.start_fill(c, &h),
        }
    }

    fn take_op(&mut self, c: usize, h: &Header, kind: OpKind, bytes: usize) -> usize {
        let id = self.free_ops.pop().expect("caller checked free ops");
        let conn_gen = match self.conns[c].as_mut() {
            Some(x) => {
                x.ops += 1;
                x.gen
            }
            None => 0,
        };
        let op = &mut self.ops[id];
        op.busy = true;
        op.gen = next_op_gen(op.gen);
        op.kind = kind;
        op.conn = c;
        op.conn_gen = conn_gen;
        op.req = *h;
        if op.buf.len() < bytes {
            if op.buf.len() > OP_LARGE_BYTES {
                self.large_kept -= op.buf.len();
            }
            op.buf = AlignedBuf::new(bytes.div_ceil(BLOCK_SIZE));
            if op.buf.len() > OP_LARGE_BYTES {
                self.large_kept += op.buf.len();
            }
        }
        if bytes > OP_LARGE_BYTES {
            self.large_inflight += bytes;
        }
        op.len = bytes;
        op.pending = 0;
        op.status = Status::Ok;
        op.nforwards = 0;
        op.deadline = None;
        op.started = Instant::now();
        op.newer = 0;
        op.copied = 0;
        id
    }

    fn start_read(&mut self, c: usize, h: &Header, kind: OpKind) {
        let (p, in_sync, _) = match self.check_route(h) {
            Ok(x) => x,
            Err(s) => return self.reject(c, h, s),
        };
        if !in_sync {
            return self.reject(c, h, Status::NotInSync);
        }
        let len = h.length as usize;
        let _ = p;
        // Reads may address 512-byte sectors: the engine reads the whole
        // blocks around them and the response carries the range.
        let at = (h.offset % BLOCK_SIZE as u64) as usize;
        if kind == OpKind::Read
            && (!h.offset.is_multiple_of(SECTOR_BYTES)
                || !(len as u64).is_multiple_of(SECTOR_BYTES))
        {
            return self.reject(c, h, Status::Invalid);
        }
        let (table_bytes, total) = match kind {
            OpKind::BackfillServe => {
                if h.length as u64 > BACKFILL_PIECE_BYTES {
                    return self.reject(c, h, Status::Invalid);
                }
                // Writes of older epochs still in flight could land after
                // the snapshot below without reaching the new member.
                if self.older_writes_in_flight(h.epoch) {
                    return self.reject(c, h, Status::Busy);
                }
                if h.flags == FLAG_STATES_ONLY {
                    return self.serve_states(c, h);
                }
                let tb = (len / BLOCK_SIZE * STATE_BYTES).next_multiple_of(BLOCK_SIZE);
                (tb, tb + len)
            }
            _ => (0, (at + len).next_multiple_of(BLOCK_SIZE)),
        };
        let id = self.take_op(c, h, kind, total);
        let (at, len) = if kind == OpKind::Read {
            (at, total)
        } else {
            (0, len)
        };
        self.ops[id].at = at;
        if kind == OpKind::BackfillServe {
            let blocks = len / BLOCK_SIZE;
            let mut states = vec![(BlockKind::Unwritten, 0u64); blocks];
            self.engine.block_states(h.volume, h.offset, &mut states);
            let buf = &mut self.ops[id].buf;
            buf[..table_bytes].fill(0);
            encode_states(&states, &mut buf[..table_bytes]);
        }
        let seg = Segment {
            // SAFETY: in bounds of the op's buffer (at least `total` bytes).
            addr: unsafe { self.ops[id].buf.as_mut_ptr().add(table_bytes) },
            len,
        };
        self.ops[id].pending = 1;
        let target = if kind == OpKind::Read {
            self.read_target(h)
        } else {
            // A peer's backfill or scrub names an engine key.
            Ok(layers::Target::plain(h.volume))
        };
        let target = match target {
            Ok(t) => t,
            Err(s) => {
                self.ops[id].pending = 0;
                self.ops[id].status = s;
                return self.finish_op(id);
            }
        };
        let req = EngineRequest {
            op: EngineOp::Read,
            volume: target.key,
            offset_bytes: h.offset - at as u64,
            len_bytes: len as u64,
            segments: &[seg],
            version: 0,
            epoch: h.epoch,
            tag: id as u64,
            chain: target.chain(),
        };
        // SAFETY: the op's buffer lives in the slab until the op finishes.
        if let Err(e) = unsafe { self.engine.submit(&req) } {
            self.ops[id].pending = 0;
            self.ops[id].status = engine_status(&e);
            self.finish_op(id);
        }
    }

    fn start_mutation(&mut self, c: usize, f: &Frame) {
        let h = f.header;
        let has_data = matches!(h.op, Op::Write | Op::WritePrimary);
        if has_data && h.payload_bytes != h.length {
            return self.reject(c, &h, Status::Invalid);
        }
        if !has_data && h.payload_bytes != 0 {
            return self.reject(c, &h, Status::Invalid);
        }
        // Whole blocks, or a sector write (merged by the engine).
        let (offset, len) = (h.offset, h.length as u64);
        let block = BLOCK_SIZE as u64;
        let aligned = offset.is_multiple_of(block) && len.is_multiple_of(block);
        let sectors_ok = h.op == Op::Write
            && !aligned
            && offset.is_multiple_of(SECTOR_BYTES)
            && len.is_multiple_of(SECTOR_BYTES)
            && offset % block + len <= block;
        let valid = match h.flags {
            0 => aligned,
            FLAG_SECTORS => sectors_ok,
            _ => false,
        };
        if !valid {
            return self.reject(c, &h, Status::Invalid);
        }
        let (p, _, primary) = match self.check_route(&h) {
            Ok(x) => x,
            Err(s) => return self.reject(c, &h, s),
        };
        if h.op == Op::WritePrimary && !primary {
            return self.reject(c, &h, Status::NotReplica);
        }
        // The header's generation is the capability's (checked in
        // `authorize`; a node forwards the writer's): a newer one than ours
        // means the volume was taken over and the push has not come yet.
        let fence = self.fence_of(h.volume);
        if h.fence < fence {
            return self.reject(c, &h, Status::Fenced);
        }
        if h.fence > fence {
            self.fences.insert(h.volume, h.fence);
        }
        if h.version == 0 {
            return self.reject(c, &h, Status::Invalid);
        }
        // The era the write names: the head, the one a snapshot being cut
        // froze (applied there, then answered StaleSnapshot), or refused.
        let target = match self.write_target(&h) {
            Ok(t) => t,
            Err(s) => return self.reject(c, &h, s),
        };
        if version_clock(h.version) > clock_limit_at(crate::unix_ms()) {
            // Far ahead of our clock: a wrong clock or a hostile writer. It
            // would make every later write of the block lose.
            return self.reject(c, &h, Status::VersionAhead);
        }
        let v = self.versions.entry(h.volume).or_default();
        *v = (*v).max(h.version);
        if !self.catch_ups.is_empty() {
            // The engine key: what a backfill lists and reads.
            self.catch_up_record(p, target.key, h.offset, h.length as u64);
        }
        let kind = if h.op == Op::WritePrimary {
            OpKind::Primary
        } else {
            OpKind::Mutate
        };
        let len = h.length as usize;
        let id = self.take_op(c, &h, kind, if has_data { len } else { 0 });
        if has_data {
            let conn = self.conns[c].as_ref().expect("live connection");
            let payload = conn.payload(f);
            self.ops[id].buf[..len].copy_from_slice(payload);
        }
        let seg = Segment {
            addr: self.ops[id].buf.as_mut_ptr(),
            len,
        };
        let segs = [seg];
        let req = EngineRequest {
            op: match h.op {
                Op::WriteZeroes => EngineOp::WriteZeroes,
                Op::Discard => EngineOp::Discard,
                _ => EngineOp::Write,
            },
            volume: target.key,
            offset_bytes: h.offset,
            len_bytes: len as u64,
            segments: if has_data { &segs } else { &[] },
            version: h.version,
            epoch: h.epoch,
            tag: id as u64,
            chain: target.chain(),
        };
        self.ops[id].pending = 1;
        if target.stale {
            // Lands in the snapshot being cut; the writer writes it again
            // into the new head (engine errors no longer matter to it).
            self.ops[id].status = Status::StaleSnapshot;
        }
        // SAFETY: the op's buffer lives in the slab until the op finishes.
        if let Err(e) = unsafe { self.engine.submit(&req) } {
            self.ops[id].pending = 0;
            self.ops[id].status = engine_status(&e);
            if matches!(e, EngineError::Io { .. }) {
                // The engine shard failed earlier (see engine_done).
                self.shared
                    .report_failure(format!("engine shard {}: {e}", self.id));
                self.ops[id].status = Status::Unavailable;
            }
            return self.finish_op(id);
        }
        if kind == OpKind::Primary {
            self.forward(id, p);
        }
    }

    /// Sends a primary write to the other members.
    fn forward(&mut self, id: usize, p: u32) {
        let me = self.shared.id;
        // The other members, copied to the stack (the loop needs `self`).
        let mut others = [0 as NodeId; 8];
        // (A partition has at most 3 targets and 3 leavers: 5 others.)
        let mut n = 0;
        if let Some(part) = self.table().and_then(|t| t.partition(p)) {
            for m in part.writers().filter(|m| m.node != me).take(others.len()) {
                others[n] = m.node;
                n += 1;
            }
        }
        for &node in &others[..n] {
            let Some(c) = self.peer_conn(node, p) else {
                self.ops[id].status = Status::Unavailable;
                continue;
            };
            let op = &mut self.ops[id];
            let mut h = op.req;
            h.op = Op::Write;
            h.request_id = ((op.gen as u32) << 16) | id as u32;
            // (Clients send sector writes as Write, never here.)
            h.flags = 0;
            let gen = self.conns[c].as_ref().map_or(0, |x| x.gen);
            let conn = self.conns[c].as_mut().expect("peer connection");
            conn.queue(h, &[&op.buf[..op.len]]);
            op.forwards[op.nforwards] = (c, gen);
            op.nforwards += 1;
            op.pending += 1;
            op.deadline = Some(Instant::now() + self.cfg.forward_timeout);
            self.forwards_inflight += 1;
            self.mark_dirty(c);
        }
    }

    /// The connection to `node`'s shard for partition `p`, opened if needed.
    fn peer_conn(&mut self, node: NodeId, p: u32) -> Option<usize> {
        let shard = {
            let t = self.table()?;
            t.shard_of(t.node(node)?, p)
        };
        if let Some(&c) = self.peers.get(&(node, shard)) {
            return Some(c);
        }
        let addr = self.table()?.node(node)?.data_addr.clone();
        let sa = addr.to_socket_addrs().ok()?.next()?;
        let stream = match connect_nonblocking(sa) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(shard = self.id, node, %addr, "cannot connect to peer: {e}");
                return None;
            }
        };
        let wire = match self.shared.tls.as_ref().and_then(|t| t.client.clone()) {
            Some(config) => {
                // The certificate must name the IP dialled (as clients check).
                let name = rustls::pki_types::ServerName::IpAddress(sa.ip().into());
                let tls = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string());
                match tls {
                    Ok(c) => Wire::Tls(Box::new(rustls::Connection::Client(c))),
                    Err(e) => {
                        tracing::warn!(shard = self.id, node, %addr, "cannot start TLS to peer: {e}");
                        return None;
                    }
                }
            }
            None => Wire::Plain,
        };
        let tls = matches!(wire, Wire::Tls(_));
        // Frames queued on it wait for the node's Challenge and our Hello.
        let c = self.new_conn(
            stream,
            wire,
            Some((node, shard)),
            ConnAuth::AwaitChallenge,
            None,
            false,
        );
        self.peers.insert((node, shard), c);
        if tls {
            // The ClientHello goes out as soon as the socket connects.
            self.mark_dirty(c);
        }
        Some(c)
    }

    fn on_peer_response(&mut self, c: usize, f: &Frame) {
        let h = f.header;
        let Some(conn) = self.conns[c].as_mut() else {
            return;
        };
        if h.op == Op::Hello {
            let proven = match conn.auth {
                ConnAuth::AwaitAnswer {
                    node_nonce,
                    peer_nonce,
                } => {
                    h.status == Status::Ok
                        && HelloProof::check_answer(
                            &self.shared.data_key,
                            &node_nonce,
                            &peer_nonce,
                            conn.payload(f),
                        )
                }
                _ => false,
            };
            if proven {
                conn.auth = ConnAuth::Verified;
            } else {
                self.close_conn(
                    c,
                    &format!(
                        "peer refused our Hello ({:?}) or did not prove the data key",
                        h.status
                    ),
                );
            }
            return;
        }
        if !matches!(conn.auth, ConnAuth::Verified) {
            self.close_conn(c, "a response before the peer proved the data key");
            return;
        }
        if h.status != Status::OlderVersion && h.version > 0 {
            let v = self.versions.entry(h.volume).or_default();
            *v = (*v).max(h.version);
        }
        if h.request_id & REQ_BACKFILL != 0 {
            let payload = self.conns[c]
                .as_ref()
                .map(|conn| conn.payload(f).to_vec())
                .unwrap_or_default();
            if h.request_id & REQ_COMPARE == REQ_COMPARE {
                self.scrub_compare_response(&h, &payload);
            } else if h.request_id & REQ_REPAIR == REQ_REPAIR {
                self.repair_response(c, &h, &payload);
            } else {
                self.backfill_response(c, &h, &payload);
            }
            return;
        }
        let id = (h.request_id & 0xffff) as usize;
        let gen = (h.request_id >> 16) as u16;
        let conn_gen = self.conns[c].as_ref().map_or(0, |x| x.gen);
        let Some(op) = self.ops.get(id) else { return };
        if !op.busy || op.gen != gen || op.kind != OpKind::Primary {
            return; // a late answer to a forward that already timed out
        }
        let Some(k) = op.forwards[..op.nforwards]
            .iter()
            .position(|x| *x == (c, conn_gen))
        else {
            return;
        };
        let status = match h.status {
            Status::Ok => Status::Ok,
            Status::OlderVersion => {
                let op = &mut self.ops[id];
                op.newer = op.newer.max(h.version);
                Status::OlderVersion
            }
            // The member knows a newer route than ours: we are behind.
            Status::StaleEpoch => {
                self.shared
                    .tell_agent(AgentMsg::NeedRoute(self.shared.hub.epoch() + 1));
                Status::RouteBehind
            }
            s => s,
        };
        self.forward_failed(id, k, status);
    }

    /// Removes forward `k` of op `id` with its outcome.
    fn forward_failed(&mut self, id: usize, k: usize, status: Status) {
        let op = &mut self.ops[id];
        op.forwards[k] = op.forwards[op.nforwards - 1];
        op.nforwards -= 1;
        op.pending -= 1;
        self.forwards_inflight -= 1;
        if status != Status::Ok && op.status == Status::Ok {
            op.status = status;
        }
        if op.nforwards == 0 {
            op.deadline = None;
        }
        if op.pending == 0 {
            self.finish_op(id);
        }
    }

    fn check_timeouts(&mut self, now: Instant) {
        for c in 0..self.conns.len() {
            let late = self.conns[c].as_ref().is_some_and(|x| {
                x.partial_since
                    .is_some_and(|t| now.duration_since(t) > FRAME_TIMEOUT)
            });
            if late {
                self.close_conn(
                    c,
                    &format!("a frame was not received whole within {FRAME_TIMEOUT:?}"),
                );
            }
            // Attachments only: node connections are few and their ends
            // reconnect on their own. A connection we stopped reading
            // (blocked sending, starved of buffer room) is not idle.
            let idle = self.cfg.idle_timeout.filter(|&idle| {
                self.conns[c].as_ref().is_some_and(|x| {
                    matches!(x.auth, ConnAuth::Attachment { .. })
                        && x.ops == 0
                        && x.unsent() == 0
                        && !x.send_blocked
                        && !x.starved
                        && now.duration_since(x.last_input) > idle
                })
            });
            if let Some(idle) = idle {
                self.counters.idle_closed();
                self.close_conn(c, &format!("sent nothing for {idle:?} (idle timeout)"));
            }
        }
        if self.forwards_inflight > 0 {
            for id in 0..self.ops.len() {
                let op = &self.ops[id];
                if op.busy && op.deadline.is_some_and(|d| d <= now) {
                    tracing::warn!(
                        shard = self.id,
                        "forwarded write not answered in {:?}: Unavailable",
                        self.cfg.forward_timeout
                    );
                    // Close the silent connections: late answers are dropped.
                    let conns: Vec<usize> =
                        op.forwards[..op.nforwards].iter().map(|f| f.0).collect();
                    for c in conns {
                        self.close_conn(c, "forwarded write timed out");
                    }
                }
            }
        }
        for b in &mut self.backfills {
            if b.retry_at.is_some_and(|t| t <= now) {
                b.retry_at = None;
            }
            if b.stage == BfStage::Waiting
                && now.duration_since(b.sent_at) > BACKFILL_ANSWER_TIMEOUT
            {
                // Sent again with a new id: a late answer is ignored.
                tracing::warn!(
                    shard = self.id,
                    partition = b.partition,
                    "backfill request not answered in {BACKFILL_ANSWER_TIMEOUT:?}; sending it again"
                );
                b.stage = if b.bytes_total.is_none() {
                    BfStage::List
                } else {
                    BfStage::Read
                };
            }
        }
    }

    fn engine_poll(&mut self) -> bool {
        // The closure cannot borrow self: collect into a reused vector first.
        let mut completions = std::mem::take(&mut self.completions);
        self.engine.poll(&mut |c| completions.push(c));
        let n = completions.len();
        for c in completions.drain(..) {
            self.engine_done(c);
        }
        self.completions = completions;
        n > 0
    }

    fn engine_done(&mut self, c: Completion) {
        if c.tag >= TAG_REPAIR {
            return self.repair_done(c);
        }
        if c.tag >= TAG_BACKFILL {
            return self.backfill_write_done(c);
        }
        if c.tag >= TAG_PURGE {
            self.purging -= 1;
            if let Err(e) = c.result {
                tracing::warn!(shard = self.id, "releasing a chunk: {e}");
            }
            return;
        }
        if c.tag >= TAG_SCRUB {
            return self.scrub_done(c);
        }
        let id = c.tag as usize;
        if let Err(e @ EngineError::Io { .. }) = &c.result {
            // The device failed (EIO, ENOSPC, a short transfer): this node
            // cannot keep its copies; its partitions must move. A write is
            // answered Unavailable, so the client waits for the new route
            // instead of failing; a read goes to the next member anyway.
            self.shared
                .report_failure(format!("engine shard {}: {e}", self.id));
            if matches!(
                self.ops[id].kind,
                OpKind::Mutate | OpKind::Primary | OpKind::Fill
            ) && self.ops[id].status == Status::Ok
            {
                self.ops[id].status = Status::Unavailable;
            }
        }
        if let (Ok(n), OpKind::Fill) = (&c.result, self.ops[id].kind) {
            self.ops[id].copied = *n;
        }
        if c.newer_version > 0 && matches!(self.ops[id].kind, OpKind::Mutate | OpKind::Primary) {
            // Not applied (or not whole): the block holds a newer version.
            // Refused, never acknowledged: the writer retries with a newer one.
            let op = &mut self.ops[id];
            op.newer = op.newer.max(c.newer_version);
            if op.status == Status::Ok {
                op.status = Status::OlderVersion;
            }
        }
        if let Err(EngineError::Checksum {
            volume,
            offset_bytes,
        }) = &c.result
        {
            // Our copy is damaged: the reader goes to another member; the
            // block is rewritten from one in the background.
            self.queue_repair(*volume, *offset_bytes);
        }
        if let Err(e) = &c.result {
            tracing::warn!(shard = self.id, "engine: {e}");
            let s = engine_status(e);
            if self.ops[id].status == Status::Ok {
                self.ops[id].status = s;
            }
        }
        self.ops[id].pending -= 1;
        if self.ops[id].pending == 0 {
            self.finish_op(id);
        }
    }

    fn finish_op(&mut self, id: usize) {
        let (c, conn_gen, req, status, kind, len, started) = {
            let op = &self.ops[id];
            (
                op.conn,
                op.conn_gen,
                op.req,
                op.status,
                op.kind,
                op.len,
                op.started,
            )
        };
        self.counters
            .record(req.op, status, req.length as u64, started.elapsed());
        let live = self.conns[c].as_ref().is_some_and(|x| x.gen == conn_gen);
        if live {
            let mut h = Header::response_to(&req, status);
            h.version = if status == Status::OlderVersion {
                self.ops[id].newer
            } else {
                self.volume_version(req.volume)
            };
            h.snapshot = self.head_era(req.volume);
            if let Some(conn) = self.conns[c].as_mut() {
                conn.ops -= 1;
                if conn.ops + 1 == CONN_OPS_MAX && !self.backlog.contains(&c) {
                    // It may have frames waiting for an op of its own.
                    self.backlog.push(c);
                }
            }
            let conn = self.conns[c].as_mut().expect("live");
            let op = &self.ops[id];
            if status == Status::Ok && kind == OpKind::Read {
                conn.queue(h, &[&op.buf[op.at..op.at + req.length as usize]]);
            } else if status == Status::Ok && kind == OpKind::BackfillServe {
                conn.queue(h, &[&op.buf[..len]]);
            } else if status == Status::Ok && kind == OpKind::Fill {
                conn.queue(h, &[&op.copied.to_le_bytes()]);
            } else if status == Status::StaleEpoch {
                let enc = self
                    .route
                    .as_ref()
                    .map(|r| r.encoded.as_slice())
                    .unwrap_or(&[]);
                conn.queue(h, &[enc]);
            } else {
                conn.queue(h, &[]);
            }
            self.mark_dirty(c);
        }
        let op = &mut self.ops[id];
        op.busy = false;
        if op.len > OP_LARGE_BYTES {
            self.large_inflight -= op.len;
        }
        if op.buf.len() > OP_LARGE_BYTES && self.large_kept > OP_LARGE_BUDGET_BYTES {
            self.large_kept -= op.buf.len();
            op.buf = AlignedBuf::new(1);
        }
        self.free_ops.push(id);
        if !self.fence_waits.is_empty() {
            self.answer_fence_waits();
        }
        if !self.layer_waits.is_empty() {
            self.answer_layer_waits();
        }
    }

    fn flush_conn(&mut self, c: usize) {
        let Some(conn) = self.conns[c].as_mut() else {
            return;
        };
        if let Err(e) = conn.flush() {
            self.close_conn(c, &format!("send: {e}"));
            return;
        }
        if conn.send_blocked && conn.unsent() <= SEND_LOW_BYTES {
            // Its answers are being read again: go on with its requests.
            conn.send_blocked = false;
            if !self.backlog.contains(&c) {
                self.backlog.push(c);
            }
        }
        self.arm(c);
    }

    fn flush_dirty(&mut self) {
        while let Some(c) = self.dirty.pop() {
            self.flush_conn(c);
        }
    }

    /// Whether writes of an epoch older than `epoch` are in flight here.
    fn older_writes_in_flight(&self, epoch: u64) -> bool {
        self.ops.iter().any(|o| {
            o.busy
                && matches!(o.kind, OpKind::Mutate | OpKind::Primary | OpKind::Fill)
                && o.req.epoch < epoch
        })
    }

    /// A `BackfillRead` with `FLAG_STATES_ONLY`: the state table of the
    /// range (version, kind and crc per block, `STATE_CRC_BYTES` each), no
    /// data. Only a scrub asks (rarely, a 64 KiB piece at a time).
    fn serve_states(&mut self, c: usize, h: &Header) {
        if !h.offset.is_multiple_of(BLOCK_SIZE as u64)
            || !(h.length as usize).is_multiple_of(BLOCK_SIZE)
        {
            return self.reject(c, h, Status::Invalid);
        }
        let blocks = h.length as usize / BLOCK_SIZE;
        let mut states = vec![(BlockKind::Unwritten, 0u64); blocks];
        self.engine.block_states(h.volume, h.offset, &mut states);
        let mut crcs = vec![0u32; blocks];
        self.engine.block_crcs(h.volume, h.offset, &mut crcs);
        let mut table = vec![0u8; blocks * STATE_CRC_BYTES];
        encode_states_crc(&states, &crcs, &mut table);
        self.respond(c, h, Status::Ok, &[&table]);
    }

    fn serve_list_chunks(&mut self, c: usize, h: &Header) {
        let Some(t) = self.table() else {
            return self.reject(c, h, Status::RouteBehind);
        };
        if h.epoch != t.epoch {
            let s = if h.epoch < t.epoch {
                Status::StaleEpoch
            } else {
                Status::RouteBehind
            };
            return self.reject(c, h, s);
        }
        let p = h.offset as u32;
        let in_sync = t
            .partition(p)
            .and_then(|r| r.member(self.shared.id))
            .is_some_and(|m| m.in_sync);
        if !in_sync {
            return self.reject(c, h, Status::NotInSync);
        }
        // A chunk that a write of an older epoch still in flight creates
        // would be missing from the list, and that write does not reach
        // the new member. (Lists now go out right after a route change.)
        if self.older_writes_in_flight(h.epoch) {
            return self.reject(c, h, Status::Busy);
        }
        if h.flags == FLAG_CATCH_UP {
            // (A node id: the connection is a node's, checked in `authorize`.)
            return self.serve_catch_up(c, h, p, h.volume as NodeId);
        }
        // A client (authorized for `h.volume` only) sees its volume's
        // chunks: those of every layer a read of it (or of the snapshot
        // FLAG_SNAPSHOT_READ names) goes through, under its id. A node sees
        // every key's.
        let only_keys: Option<Vec<u64>> = match self.conns[c].as_ref().map(|conn| &conn.auth) {
            Some(ConnAuth::Node) => None,
            _ => match self.read_target(h) {
                // With FLAG_SINCE: only the layers newer than era `version`
                // (the chain is newest first; eras only grow).
                Ok(target) => Some(
                    std::iter::once(target.key)
                        .chain(target.chain().iter().copied())
                        .filter(|k| {
                            h.flags & FLAG_SINCE == 0
                                || u64::from(celer_device::era_of(*k)) > h.version
                        })
                        .collect(),
                ),
                Err(s) => return self.reject(c, h, s),
            },
        };
        let mut out = Vec::new();
        let mut listed = std::collections::HashSet::new();
        for (v, ch) in self.engine.chunks() {
            if t.partition_of(v, ch) != p {
                continue;
            }
            let v = match &only_keys {
                None => v,
                Some(keys) if keys.contains(&v) => h.volume,
                Some(_) => continue,
            };
            if only_keys.is_none() || listed.insert(ch) {
                out.extend_from_slice(&v.to_le_bytes());
                out.extend_from_slice(&ch.to_le_bytes());
            }
        }
        self.respond(c, h, Status::Ok, &[&out]);
    }

    // ---- deleted volumes ----

    fn set_deleted(&mut self, ids: Arc<Vec<u64>>) {
        let newly = ids.iter().any(|v| self.deleted.binary_search(v).is_err());
        self.deleted = ids;
        if newly {
            self.queue_releases("volumes deleted");
        }
    }

    /// Whether this node holds chunk (`volume`, `chunk`) for nobody: its
    /// volume was deleted, or its partition moved away and is healthy
    /// without us (every member in sync, as many as the replicas), so the
    /// copy here is neither read nor a source for anyone. A partition still
    /// moving keeps our copy (it may come back to us, and it is the last
    /// resort of an operator while copies are short).
    fn releasable(&self, volume: u64, chunk: u64) -> bool {
        if self.deleted.binary_search(&volume).is_ok() {
            return true;
        }
        if let Some(&above) = self.trims.get(&volume) {
            if self.shadowed(volume, above, chunk) {
                return true;
            }
        }
        let Some(t) = self.table() else {
            return false;
        };
        left_for_good(t, t.partition_of(volume, chunk), self.shared.id)
    }

    /// The chunks this shard holds that are `releasable`.
    fn releasable_chunks(&self) -> Vec<(u64, u64)> {
        self.engine
            .chunks()
            .into_iter()
            .filter(|(v, c)| self.releasable(*v, *c))
            .collect()
    }

    /// Lists the chunks to release (after a new table or new deletions).
    fn queue_releases(&mut self, why: &str) {
        self.purge = self.releasable_chunks();
        if !self.purge.is_empty() {
            tracing::info!(
                shard = self.id,
                chunks = self.purge.len(),
                why,
                "releasing chunks this node no longer holds"
            );
            self.purge_rescans = PURGE_RESCANS;
        }
    }

    /// Releases chunks of `purge` (data and versions forgotten, the slot
    /// freed), one at a time; checked again at submission, since the table
    /// may have changed since they were listed.
    fn purge_step(&mut self) {
        let chunk_bytes = self.engine.geometry().chunk_bytes();
        if self.purge.is_empty() && self.purging == 0 && self.purge_rescans > 0 {
            self.purge_rescans -= 1;
            self.purge = self.releasable_chunks();
        }
        while self.purging < PURGE_INFLIGHT_MAX {
            let Some((v, c)) = self.purge.pop() else {
                return;
            };
            if !self.releasable(v, c) {
                continue;
            }
            let req = EngineRequest {
                op: EngineOp::Release,
                volume: v,
                offset_bytes: c * chunk_bytes,
                len_bytes: chunk_bytes,
                segments: &[],
                version: 0,
                epoch: 0,
                tag: TAG_PURGE,
                chain: &[],
            };
            // SAFETY: a release has no segments.
            match unsafe { self.engine.submit(&req) } {
                Ok(()) => self.purging += 1,
                Err(EngineError::QueueFull { .. }) => {
                    self.purge.push((v, c));
                    return;
                }
                Err(e) => {
                    tracing::warn!(shard = self.id, volume = v, chunk = c, "release chunk: {e}")
                }
            }
        }
    }

    // ---- routes and backfill ----

    fn install(&mut self, r: Arc<Installed>) {
        if self
            .route
            .as_ref()
            .is_some_and(|c| c.table.epoch >= r.table.epoch)
        {
            return;
        }
        let me = self.shared.id;
        let shards = self.shared.shards as u32;
        let t = &r.table;
        self.catch_up_install(t);
        // Backfills of partitions where we are no longer syncing stop.
        let mut i = 0;
        while i < self.backfills.len() {
            let keep = t
                .partition(self.backfills[i].partition)
                .and_then(|p| p.member(me))
                .is_some_and(|m| !m.in_sync && !m.down);
            if keep {
                i += 1;
            } else {
                let b = self.backfills.remove(i);
                self.retire(b);
            }
        }
        self.reported.retain(|p, _| {
            t.partition(*p)
                .and_then(|r| r.member(me))
                .is_some_and(|m| !m.in_sync && !m.down)
        });
        let mut report = Vec::new();
        let mine = self.id as u32;
        let syncing: Vec<u32> = t.syncing_on(me).filter(|p| p % shards == mine).collect();
        for p in syncing {
            if let Some(&(e, _)) = self.reported.get(&p) {
                report.push((p, e));
                continue;
            }
            let source = t.partition(p).and_then(|r| r.primary());
            // Back from down: ask the source for what we missed first.
            let catch_up = t
                .partition(p)
                .and_then(|r| r.member(me))
                .is_some_and(|m| m.catch_up_since > 0);
            match self.backfills.iter().position(|b| b.partition == p) {
                Some(i) => {
                    if Some(self.backfills[i].source) != source {
                        // The source left or changed: start over from the new one.
                        if let Some(s) = source {
                            self.backfill_serial = self.backfill_serial.wrapping_add(1);
                            let mut fresh = new_backfill(self.backfill_serial, p, t.epoch, s);
                            fresh.catch_up = catch_up;
                            let old = std::mem::replace(&mut self.backfills[i], fresh);
                            self.retire(old);
                        }
                    }
                    // Its epoch stays the one it started in: the report
                    // claims every write since then. Had we left and
                    // rejoined in tables we never saw, the control service
                    // refuses that claim and we copy again.
                }
                None => {
                    if let Some(s) = source {
                        tracing::info!(
                            shard = self.id,
                            partition = p,
                            source = s,
                            catch_up,
                            "backfill starts"
                        );
                        self.backfill_serial = self.backfill_serial.wrapping_add(1);
                        let mut b = new_backfill(self.backfill_serial, p, t.epoch, s);
                        b.catch_up = catch_up;
                        self.backfills.push(b);
                    }
                }
            }
        }
        // Scan the chunks only when a partition just became one we hold for
        // nobody (always at the first table: leftovers of a past run).
        let newly_left = (0..t.partition_count()).any(|p| {
            left_for_good(t, p, me) && !self.table().is_some_and(|old| left_for_good(old, p, me))
        });
        self.route = Some(r);
        if newly_left {
            self.queue_releases("partitions moved away");
        }
        // The rebalance is over when no partition has a syncing member:
        // the backfills finished in it leave the figures.
        if self
            .table()
            .is_some_and(|t| t.partitions.iter().all(|p| p.all_in_sync()))
        {
            self.round_bytes = 0;
        }
        for (p, e) in report {
            self.shared.tell_agent(AgentMsg::Synced {
                partition: p,
                epoch: e,
            });
        }
        self.publish_progress();
        self.set_backfilling();
    }

    /// The control service ignored our report of these partitions at
    /// `epoch`: we rejoined them after it (in tables we never saw) and may
    /// lack writes of the time away. Forget the report and copy again.
    fn backfill_again(&mut self, epoch: u64, partitions: &[u32]) {
        let me = self.shared.id;
        let Some(t) = self.route.clone() else {
            return;
        };
        let t = &t.table;
        for &p in partitions {
            if self.backfills.iter().any(|b| b.partition == p) {
                continue;
            }
            let syncing = t
                .partition(p)
                .and_then(|r| r.member(me))
                .is_some_and(|m| !m.in_sync && !m.down);
            let source = t.partition(p).and_then(|r| r.primary());
            let (Some(&(reported, bytes)), Some(source)) = (self.reported.get(&p), source) else {
                continue;
            };
            // Only that report: a later one (from a copy made since) stands.
            if reported != epoch || !syncing {
                continue;
            }
            self.reported.remove(&p);
            // That copy no longer counts: the new one will.
            self.round_bytes = self.round_bytes.saturating_sub(bytes);
            tracing::info!(
                shard = self.id,
                partition = p,
                source,
                "backfill starts again"
            );
            self.backfill_serial = self.backfill_serial.wrapping_add(1);
            self.backfills
                .push(new_backfill(self.backfill_serial, p, t.epoch, source));
        }
        self.publish_progress();
        self.set_backfilling();
    }

    fn set_backfilling(&self) {
        let n = self.backfills.len();
        self.counters.set_syncing(n);
        self.shared.backfilling[self.id as usize].store(n, std::sync::atomic::Ordering::Release);
    }

    /// Publishes this shard's backfill figures (see `BackfillProgress`):
    /// the backfills queued or running, plus those finished in the
    /// rebalance under way. A dropped or restarted backfill is simply no
    /// longer in the list, so it is counted nowhere.
    fn publish_progress(&self) {
        let mut p = BackfillProgress {
            bytes_done: self.round_bytes,
            bytes_total: self.round_bytes,
            partitions_unlisted: 0,
            bytes_copied: self.copied_bytes,
        };
        for b in &self.backfills {
            match b.bytes_total {
                Some(total) => {
                    debug_assert!(
                        b.bytes_done <= total,
                        "partition {}: {} of {total} bytes done",
                        b.partition,
                        b.bytes_done
                    );
                    p.bytes_done += b.bytes_done;
                    p.bytes_total += total;
                }
                None => {
                    debug_assert_eq!(b.bytes_done, 0, "partition {}", b.partition);
                    p.partitions_unlisted += 1;
                }
            }
        }
        self.shared.progress[self.id as usize].store(p);
        self.counters
            .set_backfill_progress(p.bytes_done, p.bytes_total, p.partitions_unlisted);
    }

    fn retire(&mut self, b: Backfill) {
        if b.writes_pending > 0 {
            self.retired.push(b);
        }
    }

    fn backfill_step(&mut self) {
        let now = Instant::now();
        // Lists: every queued backfill's, a few in flight at a time.
        let mut listing = self
            .backfills
            .iter()
            .filter(|b| b.stage == BfStage::Waiting && b.bytes_total.is_none())
            .count();
        let mut i = 0;
        while listing < BACKFILL_LISTS_MAX && i < self.backfills.len() {
            let b = &self.backfills[i];
            if b.stage == BfStage::List
                && b.retry_at.is_none_or(|t| t <= now)
                && self.backfill_send(i, Op::ListChunks)
            {
                listing += 1;
            }
            i += 1;
        }
        // Copies: one backfill at a time per shard, the first in the list.
        let Some(b) = self.backfills.first() else {
            return;
        };
        if b.retry_at.is_some_and(|t| t > now) {
            return;
        }
        match b.stage {
            BfStage::Read => {
                // Writes of a piece that failed to submit still use the buffer.
                if b.writes_pending > 0 {
                    return;
                }
                self.backfill_skip_deleted();
                let b = &self.backfills[0];
                if b.next_range >= b.ranges.len() {
                    self.backfill_finish();
                    return;
                }
                self.backfill_send(0, Op::BackfillRead);
            }
            BfStage::Apply => self.backfill_submit_runs(),
            BfStage::List | BfStage::Waiting => {}
        }
    }

    /// Skips the first backfill's chunks of volumes deleted since its list:
    /// the source refuses their reads, and there is nothing to keep. Their
    /// bytes leave its total.
    fn backfill_skip_deleted(&mut self) {
        let b = &mut self.backfills[0];
        let mut skipped = false;
        while b.next_range < b.ranges.len()
            && self
                .deleted
                .binary_search(&b.ranges[b.next_range].0)
                .is_ok()
        {
            let left = b.ranges[b.next_range].2 - b.piece;
            b.bytes_total = b.bytes_total.map(|t| t - left);
            b.next_range += 1;
            b.piece = 0;
            skipped = true;
        }
        if skipped {
            self.publish_progress();
        }
    }

    /// The first backfill copied its last chunk: it leaves the queue (its
    /// bytes stay in the figures until the rebalance ends) and the agent
    /// reports the partition.
    fn backfill_finish(&mut self) {
        let b = self.backfills.remove(0);
        debug_assert_eq!(
            Some(b.bytes_done),
            b.bytes_total,
            "partition {}",
            b.partition
        );
        debug_assert_eq!(b.writes_pending, 0);
        tracing::info!(
            shard = self.id,
            partition = b.partition,
            bytes = b.bytes_done,
            took = ?b.started.elapsed(),
            "backfill done"
        );
        self.reported.insert(b.partition, (b.epoch, b.bytes_done));
        self.round_bytes += b.bytes_done;
        // Figures first: whoever sees no backfill left sees them final.
        self.publish_progress();
        self.set_backfilling();
        self.shared.tell_agent(AgentMsg::Synced {
            partition: b.partition,
            epoch: b.epoch,
        });
    }

    /// Sends backfill `i`'s next request: its chunk list, or its next piece.
    /// False when there is no connection to its source yet (retried later).
    fn backfill_send(&mut self, i: usize, op: Op) -> bool {
        let (p, source) = (self.backfills[i].partition, self.backfills[i].source);
        let conn = match self.backfills[i].conn {
            Some((c, g)) if self.conns[c].as_ref().is_some_and(|x| x.gen == g) => c,
            _ => match self.peer_conn(source, p) {
                Some(c) => {
                    let g = self.conns[c].as_ref().map_or(0, |x| x.gen);
                    self.backfills[i].conn = Some((c, g));
                    c
                }
                None => {
                    self.backfills[i].retry_at = Some(Instant::now() + Duration::from_millis(100));
                    return false;
                }
            },
        };
        let epoch = self.table().map_or(0, |t| t.epoch);
        // Unique among this shard's backfill requests in flight.
        self.backfill_seq = self.backfill_seq.wrapping_add(1) & !REQ_REPAIR;
        let b = &mut self.backfills[i];
        b.seq = self.backfill_seq;
        b.sent_at = Instant::now();
        let mut h = Header::request(op, REQ_BACKFILL | b.seq);
        h.epoch = epoch;
        if op == Op::ListChunks {
            h.offset = p as u64;
            if b.catch_up {
                h.flags = FLAG_CATCH_UP;
                h.volume = self.shared.id as u64;
            }
        } else {
            let (v, at, len) = b.ranges[b.next_range];
            b.piece_len = (len - b.piece).min(BACKFILL_PIECE_BYTES);
            h.volume = v;
            h.offset = at + b.piece;
            h.length = b.piece_len as u32;
        }
        b.stage = BfStage::Waiting;
        if let Some(conn) = self.conns[conn].as_mut() {
            conn.queue(h, &[]);
        }
        self.mark_dirty(conn);
        true
    }

    fn backfill_response(&mut self, c: usize, h: &Header, payload: &[u8]) {
        let chunk_bytes = self.table().map_or(1 << 20, |t| t.chunk_bytes);
        let Some(i) = self.backfills.iter().position(|b| {
            b.stage == BfStage::Waiting
                && h.request_id == REQ_BACKFILL | b.seq
                && b.conn.is_some_and(|(bc, _)| bc == c)
        }) else {
            return; // for a backfill dropped, restarted or timed out since
        };
        let b = &mut self.backfills[i];
        let retry_stage = if h.op == Op::ListChunks {
            BfStage::List
        } else {
            BfStage::Read
        };
        match h.status {
            Status::Ok => {}
            Status::StaleEpoch => {
                // The source is ahead: fetch the route, then go on.
                self.shared.tell_agent(AgentMsg::NeedRoute(h.epoch + 1));
                b.stage = retry_stage;
                b.retry_at = Some(Instant::now() + Duration::from_millis(20));
                return;
            }
            s => {
                tracing::debug!(partition = b.partition, status = ?s, "backfill request refused; retrying");
                b.stage = retry_stage;
                b.retry_at = Some(Instant::now() + Duration::from_millis(10));
                return;
            }
        }
        if h.op == Op::ListChunks {
            if h.flags == FLAG_CATCH_UP {
                match catch_up_ranges(payload, chunk_bytes) {
                    Some(r) => b.ranges = r,
                    None => {
                        // The source did not record all we missed: copy
                        // the partition whole.
                        tracing::info!(
                            shard = self.id,
                            partition = b.partition,
                            source = b.source,
                            "no record of what we missed: full copy"
                        );
                        b.catch_up = false;
                        b.stage = BfStage::List;
                        b.retry_at = None;
                        return;
                    }
                }
            } else {
                b.ranges = payload
                    .chunks_exact(16)
                    .map(|x| {
                        let mut v = [0u8; 8];
                        let mut c = [0u8; 8];
                        v.copy_from_slice(&x[..8]);
                        c.copy_from_slice(&x[8..]);
                        let ch = u64::from_le_bytes(c);
                        (
                            u64::from_le_bytes(v),
                            ch.saturating_mul(chunk_bytes),
                            chunk_bytes,
                        )
                    })
                    .collect();
                b.ranges.sort_unstable();
            }
            let deleted = &self.deleted;
            b.ranges
                .retain(|(v, _, _)| deleted.binary_search(v).is_err());
            b.next_range = 0;
            b.piece = 0;
            b.bytes_total = Some(b.ranges.iter().map(|r| r.2).sum());
            b.stage = BfStage::Read;
            tracing::debug!(
                shard = self.id,
                partition = b.partition,
                ranges = b.ranges.len(),
                catch_up = b.catch_up,
                bytes = b.bytes_total,
                "backfill listed"
            );
            self.publish_progress();
            return;
        }
        // BackfillRead: only the first backfill copies.
        debug_assert_eq!(i, 0, "a BackfillRead answer for a queued backfill");
        if i != 0 {
            b.stage = BfStage::Read;
            return;
        }
        // State table, then data.
        let len = h.length as usize;
        let blocks = len / BLOCK_SIZE;
        let tb = (blocks * STATE_BYTES).next_multiple_of(BLOCK_SIZE);
        if payload.len() != tb + len || !len.is_multiple_of(BLOCK_SIZE) || len as u64 != b.piece_len
        {
            tracing::warn!(
                partition = b.partition,
                "backfill answer of the wrong size; retrying"
            );
            b.stage = BfStage::Read;
            b.retry_at = Some(Instant::now() + Duration::from_millis(10));
            return;
        }
        if b.buf.len() < len {
            b.buf = AlignedBuf::new(blocks);
        }
        b.buf[..len].copy_from_slice(&payload[tb..]);
        b.states.clear();
        b.states
            .extend((0..blocks).map(|i| decode_state(payload, i)));
        // Runs of blocks with the same kind and version: one write each.
        b.runs.clear();
        let mut i = 0;
        while i < blocks {
            let (k, v) = b.states[i];
            let mut j = i + 1;
            while j < blocks && b.states[j] == (k, v) {
                j += 1;
            }
            if k != BlockKind::Unwritten && v > 0 {
                b.runs.push((i, j - i, k, v));
            }
            i = j;
        }
        b.next_run = 0;
        b.piece_failed = false;
        b.stage = BfStage::Apply;
        self.backfill_submit_runs();
    }

    fn backfill_submit_runs(&mut self) {
        let epoch = self.table().map_or(0, |t| t.epoch);
        let b = &mut self.backfills[0];
        let (v, at, range_len) = b.ranges[b.next_range];
        let base = at + b.piece;
        while b.next_run < b.runs.len() && b.writes_pending < BACKFILL_WRITES_MAX {
            let (first, count, kind, version) = b.runs[b.next_run];
            let seg = Segment {
                // SAFETY: within the backfill buffer, which outlives the write:
                // a backfill dropped with writes pending is kept in `retired`.
                addr: unsafe { b.buf.as_mut_ptr().add(first * BLOCK_SIZE) },
                len: count * BLOCK_SIZE,
            };
            let segs = [seg];
            let req = EngineRequest {
                op: if kind == BlockKind::Data {
                    EngineOp::Write
                } else {
                    EngineOp::WriteZeroes
                },
                volume: v,
                offset_bytes: base + (first * BLOCK_SIZE) as u64,
                len_bytes: (count * BLOCK_SIZE) as u64,
                segments: if kind == BlockKind::Data { &segs } else { &[] },
                version,
                epoch,
                tag: TAG_BACKFILL | b.serial as u64,
                chain: &[],
            };
            // SAFETY: see above.
            match unsafe { self.engine.submit(&req) } {
                Ok(()) => {
                    b.writes_pending += 1;
                    b.next_run += 1;
                }
                Err(EngineError::QueueFull { .. }) => break,
                Err(e) => {
                    tracing::warn!(
                        partition = b.partition,
                        "backfill write failed: {e}; retrying the piece"
                    );
                    b.stage = BfStage::Read;
                    b.retry_at = Some(Instant::now() + Duration::from_millis(100));
                    return;
                }
            }
        }
        if b.next_run == b.runs.len() && b.writes_pending == 0 {
            if b.piece_failed {
                // A write of this piece failed: read and apply it again
                // (versions make that idempotent); it does not count.
                b.piece_failed = false;
                b.stage = BfStage::Read;
                b.retry_at = Some(Instant::now() + Duration::from_millis(100));
                return;
            }
            // The piece is written: it counts as moved.
            let n = b.piece_len;
            b.bytes_done += n;
            b.piece += BACKFILL_PIECE_BYTES;
            if b.piece >= range_len {
                b.piece = 0;
                b.next_range += 1;
            }
            b.stage = BfStage::Read;
            self.copied_bytes += n;
            self.counters.add_backfill_bytes(n);
            self.publish_progress();
        }
    }

    fn backfill_write_done(&mut self, c: Completion) {
        let serial = (c.tag & 0xffff_ffff) as u32;
        if let Some(i) = self.retired.iter().position(|b| b.serial == serial) {
            self.retired[i].writes_pending -= 1;
            if self.retired[i].writes_pending == 0 {
                self.retired.swap_remove(i);
            }
            return;
        }
        let Some(i) = self.backfills.iter().position(|b| b.serial == serial) else {
            return;
        };
        let b = &mut self.backfills[i];
        b.writes_pending -= 1;
        if let Err(e) = c.result {
            tracing::warn!(
                partition = b.partition,
                "backfill write: {e}; redoing the piece"
            );
            // Submit no more of it; when the others are back, it is read
            // and applied again.
            b.next_run = b.runs.len();
            b.piece_failed = true;
        }
        if i == 0 && b.stage == BfStage::Apply {
            self.backfill_submit_runs();
        }
    }
}

/// Writes a block-state table (the start of a `BackfillRead` answer): per
/// block its version (u64 LE) and kind (u8), `STATE_BYTES` each.
fn encode_states(states: &[(BlockKind, u64)], out: &mut [u8]) {
    for (i, (k, v)) in states.iter().enumerate() {
        out[i * STATE_BYTES..i * STATE_BYTES + 8].copy_from_slice(&v.to_le_bytes());
        out[i * STATE_BYTES + 8] = *k as u8;
    }
}

/// Writes the states-only answer (`FLAG_STATES_ONLY`): per block its
/// version (u64 LE), kind (u8) and crc32c (u32 LE), `STATE_CRC_BYTES` each.
fn encode_states_crc(states: &[(BlockKind, u64)], crcs: &[u32], out: &mut [u8]) {
    for (i, ((k, v), crc)) in states.iter().zip(crcs).enumerate() {
        let at = i * STATE_CRC_BYTES;
        out[at..at + 8].copy_from_slice(&v.to_le_bytes());
        out[at + 8] = *k as u8;
        out[at + 9..at + 13].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Block `i` of a states-only answer written by [`encode_states_crc`] (the
/// caller checked its length): kind, version and crc.
fn decode_state_crc(table: &[u8], i: usize) -> (BlockKind, u64, u32) {
    let at = i * STATE_CRC_BYTES;
    let mut v = [0u8; 8];
    v.copy_from_slice(&table[at..at + 8]);
    let kind = match table[at + 8] {
        1 => BlockKind::Data,
        2 => BlockKind::Zero,
        _ => BlockKind::Unwritten,
    };
    let mut c = [0u8; 4];
    c.copy_from_slice(&table[at + 9..at + 13]);
    (kind, u64::from_le_bytes(v), u32::from_le_bytes(c))
}

/// Block `i` of a state table written by [`encode_states`] (the caller
/// checked its length); an unknown kind reads as unwritten.
fn decode_state(table: &[u8], i: usize) -> (BlockKind, u64) {
    let at = i * STATE_BYTES;
    let mut v = [0u8; 8];
    v.copy_from_slice(&table[at..at + 8]);
    let kind = match table[at + 8] {
        1 => BlockKind::Data,
        2 => BlockKind::Zero,
        _ => BlockKind::Unwritten,
    };
    (kind, u64::from_le_bytes(v))
}

/// The next generation of an op slot (see `OP_GEN_MASK`).
fn next_op_gen(gen: u16) -> u16 {
    gen.wrapping_add(1) & OP_GEN_MASK
}

fn new_backfill(serial: u32, partition: u32, epoch: u64, source: NodeId) -> Backfill {
    Backfill {
        serial,
        partition,
        epoch,
        source,
        conn: None,
        catch_up: false,
        ranges: Vec::new(),
        next_range: 0,
        piece: 0,
        stage: BfStage::List,
        retry_at: None,
        seq: 0,
        sent_at: Instant::now(),
        buf: AlignedBuf::new(1),
        states: Vec::new(),
        writes_pending: 0,
        runs: Vec::new(),
        next_run: 0,
        piece_len: 0,
        piece_failed: false,
        started: Instant::now(),
        bytes_total: None,
        bytes_done: 0,
    }
}

/// Partition `p` of `t` is healthy without `me`: every member in sync and
/// up, as many as the replicas, `me` not among them. Our copy, if any,
/// serves no one. (A partition whose copies are all down keeps its members
/// in the table: it is not healthy, and an old copy here is left alone.)
fn left_for_good(t: &celer_route::RouteTable, p: u32, me: NodeId) -> bool {
    t.partition(p).is_some_and(|r| {
        r.member(me).is_none()
            && r.members.len() >= t.replicas as usize
            && r.members
                .iter()
                .all(|m| m.in_sync && t.node(m.node).is_some_and(|n| n.up))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forward's request id never looks like a backfill's or a repair's,
    /// whatever the op slot's generation: with plain 16-bit generations,
    /// every answer to a forward from a slot past 32767 uses went to the
    /// backfill code and the large write timed out.
    #[test]
    fn forward_request_ids_never_carry_backfill_bits() {
        let mut gen = 0u16;
        for _ in 0..200_000 {
            gen = next_op_gen(gen);
            let id = ((gen as u32) << 16) | (CLIENT_OPS as u32 - 1);
            assert_eq!(id & REQ_BACKFILL, 0, "gen {gen}");
            assert_eq!(id & REQ_REPAIR, 0, "gen {gen}");
            assert_eq!((id >> 16) as u16, gen, "the gen comes back out");
        }
    }
}
