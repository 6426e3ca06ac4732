//! The shard thread's loop: epoll over its connections, its engine shard
//! and its message channel, run to completion each turn; and the socket
//! helpers it uses to reach peers.

use super::*;

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
            started: Instant::now(),
            engine_at: Instant::now(),
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
        landings: Vec::new(),
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

pub(super) fn epoll_add(epfd: RawFd, fd: RawFd, token: u64, events: u32) {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: valid fds and event struct.
    unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
}

pub(super) fn epoll_mod(epfd: RawFd, fd: RawFd, token: u64, events: u32) {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: valid fds and event struct.
    unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_MOD, fd, &mut ev) };
}

pub(super) fn drain_eventfd(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a local from a nonblocking eventfd.
    unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
}

/// Starts a nonblocking connect; the socket becomes writable when connected.
pub(super) fn connect_nonblocking(addr: SocketAddr) -> io::Result<TcpStream> {
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

pub(super) fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
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
