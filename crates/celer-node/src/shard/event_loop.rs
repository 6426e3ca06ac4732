//! The shard thread's loop: epoll over its connections, its engine shard
//! and its message channel, run to completion each turn. The loop is the
//! production driver of the shard core (`ShardLoop`); `celer-sim` drives
//! the same core with a simulated network and disk (see `crate::net`).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::mpsc::Receiver;

use super::*;
use crate::net::EpollNet;

const TOKEN_WAKE: u64 = u64::MAX;
const TOKEN_ENGINE: u64 = u64::MAX - 1;

pub(crate) fn run(
    engine: Shard,
    rx: Receiver<ShardMsg>,
    wake: Arc<OwnedFd>,
    shared: Arc<NodeShared>,
    cfg: ShardConfig,
) -> Result<(), NodeError> {
    let net = EpollNet::new().map_err(|source| NodeError::Io {
        what: "epoll_create1".into(),
        source,
    })?;
    net.add(wake.as_raw_fd(), TOKEN_WAKE);
    let engine_fd = engine
        .completion_fd()
        .ok_or_else(|| NodeError::Config("engine opened without a completion eventfd".into()))?;
    net.add(engine_fd, TOKEN_ENGINE);
    let epfd = net.epfd.as_raw_fd();
    let mut s = ShardLoop::new(engine, shared, cfg, net);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut last_activity = Instant::now();
    loop {
        let mut activity = false;
        // Messages: connections, routes, stop.
        while let Ok(m) = rx.try_recv() {
            activity = true;
            match m {
                ShardMsg::Conn(hs) => {
                    let hs = *hs;
                    s.adopt(hs.stream, hs.conn);
                }
                m => s.on_msg(m),
            }
        }
        if s.stopping {
            break;
        }
        activity |= s.turn();
        let now = Instant::now();
        if activity {
            last_activity = now;
        }
        let timeout_ms = if now.duration_since(last_activity) < s.cfg.busy_poll {
            0
        } else {
            s.wait_ms()
        };
        // SAFETY: events is a valid buffer of its length.
        let n =
            unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), events.len() as i32, timeout_ms) };
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
            s.woke();
        }
        for ev in &events[..n as usize] {
            let (token, bits) = (ev.u64, ev.events);
            match token {
                TOKEN_WAKE => drain_eventfd(wake.as_raw_fd()),
                TOKEN_ENGINE => drain_eventfd(engine_fd),
                c => s.on_ready(
                    c as usize,
                    bits & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0,
                    bits & libc::EPOLLOUT as u32 != 0,
                ),
            }
            last_activity = Instant::now();
        }
    }
    s.finish()
}

fn drain_eventfd(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a local from a nonblocking eventfd.
    unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
}

impl<D: Disk, N: Net> ShardLoop<D, N> {
    /// A shard core over its engine shard and its network.
    /// See `NodeCore::without_restart_floor`.
    pub(crate) fn drop_restart_floor(&mut self) {
        self.restart_floor = None;
    }

    /// See `NodeCore::without_fence_check`.
    pub(crate) fn drop_fence_check(&mut self) {
        self.fence_check = false;
    }

    pub(crate) fn new(engine: Shard<D>, shared: Arc<NodeShared>, cfg: ShardConfig, net: N) -> Self {
        let now = net.now();
        let id = engine.id() as u16;
        let versions = engine.max_versions_by_volume();
        // A block per request slot from one pool (a larger request replaces its
        // slot's buffer with a heap one: `take_op`).
        let mut pool = BufPool::new(CLIENT_OPS * BLOCK_SIZE, cfg.hugepages);
        let (engine_pages, engine_bytes) = engine.buffer_pages();
        shared
            .metrics
            .buffer_bytes(pool.pages(), pool.bytes() as u64);
        shared
            .metrics
            .buffer_bytes(engine_pages, engine_bytes as u64);
        tracing::info!(
            shard = id,
            node_buffers = pool.pages().name(),
            node_bytes = pool.bytes(),
            engine_buffers = engine_pages.name(),
            engine_bytes,
            "request and journal buffers mapped"
        );
        let ops = (0..CLIENT_OPS)
            .map(|_| NodeOp {
                busy: false,
                gen: 0,
                kind: OpKind::Read,
                conn: 0,
                conn_gen: 0,
                req: Header::request(Op::Ping, 0),
                buf: pool.take(1),
                len: 0,
                at: 0,
                pending: 0,
                status: Status::Ok,
                forwards: [(0, 0); 8],
                nforwards: 0,
                deadline: None,
                started: now,
                engine_at: now,
                newer: 0,
                copied: 0,
            })
            .collect();
        let counters = shared.metrics.shard(id);
        let scrub = Scrub::new(cfg.scrub_bytes_per_sec, cfg.scrub_interval, now);
        // As long as the engine keeps a discarded chunk's version in memory
        // (a client gives up on a request long before).
        let restart_floor = Some(engine.restart_floor())
            .filter(|f| *f > 0)
            .map(|f| (f, now + celer_engine::DISCARDED_KEEP));
        ShardLoop {
            id,
            engine,
            restart_floor,
            shared,
            cfg,
            net,
            conns: Vec::new(),
            free_conns: Vec::new(),
            conn_gen: 0,
            peers: HashMap::new(),
            ops,
            free_ops: (0..CLIENT_OPS).rev().collect(),
            route: None,
            versions,
            fences: HashMap::new(),
            fence_check: true,
            lease_until: None,
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
            landings: Vec::new(),
            woke_at: now,
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
            joining: Vec::new(),
            join_release: Vec::new(),
            join_inflight: 0,
            took_writes: HashMap::new(),
            purge_rescans: 0,
            repairs: Vec::new(),
            unrepairable: Vec::new(),
            repair_serial: 0,
            repair_seq: 0,
            scrub,
            compare_seq: 0,
            catch_ups: Vec::new(),
            last_timer: now,
        }
    }

    /// A message from the node (a route table, fences, stop...). A
    /// connection (`ShardMsg::Conn`) carries a socket: the driver adopts it
    /// (`adopt`).
    pub(crate) fn on_msg(&mut self, m: ShardMsg) {
        match m {
            ShardMsg::Conn(_) => {
                tracing::error!(
                    shard = self.id,
                    "a socket handed to a shard without sockets: dropped"
                )
            }
            ShardMsg::Route(r) => self.install(r),
            ShardMsg::Deleted(ids) => self.set_deleted(ids),
            ShardMsg::BackfillAgain(epoch, ps) => self.backfill_again(epoch, &ps),
            ShardMsg::Fences(f, reply) => self.set_fences(f, reply),
            ShardMsg::Layers(l, reply) => self.set_layers(l, reply),
            ShardMsg::LayerUsage(q, reply) => {
                let _ = reply.send(self.layer_usage(&q));
            }
            ShardMsg::Lease(until) => self.renew_lease(until),
            ShardMsg::Stop => self.stopping = true,
        }
    }

    /// One turn's work between waits: engine completions, held-back
    /// frames, backfill, repair, scrub, releases, sends, timeouts. Whether
    /// anything happened in the engine.
    pub(crate) fn turn(&mut self) -> bool {
        let mut activity = self.engine_poll();
        if !self.backlog.is_empty() {
            let backlog = std::mem::take(&mut self.backlog);
            for c in backlog {
                self.process_frames(c);
            }
        }
        self.join_release_step();
        self.backfill_step();
        self.repair_step();
        self.scrub_step();
        self.purge_step();
        self.shared.chunks[self.id as usize].store(
            self.engine.allocated_chunks(),
            std::sync::atomic::Ordering::Relaxed,
        );
        activity |= self.engine_poll();
        self.flush_dirty();
        let now = self.net.now();
        if now.duration_since(self.last_timer) >= Duration::from_millis(5) {
            self.last_timer = now;
            self.check_timeouts(now);
        }
        activity
    }

    /// How long the shard may wait for input before its timers need it
    /// (milliseconds).
    pub(crate) fn wait_ms(&self) -> i32 {
        let timeout_ms = if self.forwards_inflight > 0
            || self.backfills.iter().any(|b| b.retry_at.is_some())
            || self.repairs_pending()
        {
            5
        } else if !self.backfills.is_empty() {
            20
        } else {
            200
        };
        // A scrub waiting for its rate wakes up when it may read again.
        match self.scrub.wait_hint() {
            Some(d) => timeout_ms.min(d.as_millis().max(1) as i32),
            None => timeout_ms,
        }
    }

    /// Connection `c` can be read (or was closed) and/or written.
    pub(crate) fn on_ready(&mut self, c: usize, readable: bool, writable: bool) {
        if readable {
            self.on_readable(c);
        }
        if writable {
            self.flush_conn(c);
        }
    }

    /// Stops: finishes what the engine has, then closes it (checkpoint).
    pub(crate) fn finish(mut self) -> Result<(), NodeError> {
        while self.engine.inflight() > 0 {
            let mut sink = |_c: Completion| {};
            self.engine.wait(&mut sink);
        }
        self.engine.close()?;
        Ok(())
    }
}

impl<D: Disk, N: Net> ShardLoop<D, N> {
    /// The driver woke up with input: the input time of the connections
    /// it reports next (the idle timeout, a partial frame's deadline).
    pub(crate) fn woke(&mut self) {
        self.woke_at = self.net.now();
    }

    pub(crate) fn net(&self) -> &N {
        &self.net
    }

    pub(crate) fn net_mut(&mut self) -> &mut N {
        &mut self.net
    }

    /// Connections closed because the peer broke the protocol.
    pub(crate) fn protocol_errors(&self) -> u64 {
        self.counters.protocol_errors()
    }

    /// Requests in the engine, for a driver that must drain it.
    pub(crate) fn engine_inflight(&self) -> usize {
        self.engine.inflight()
    }
}
