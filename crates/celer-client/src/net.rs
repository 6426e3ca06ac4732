//! The TCP transport of one client queue: non-blocking connections, one per
//! (node, shard), registered in the queue's epoll set.
//!
//! The transport moves frames and knows nothing of parts, routes or retries:
//! it asks its [`Sink`] (the queue's protocol logic) where a response payload
//! goes, hands it every verified response, tells it when the caller's memory
//! of a request is no longer referenced, and when a connection died.
//!
//! Sending: frames are queued per connection and written by [`Net::flush`]
//! with `writev` (a header and the caller's segments, several frames per
//! call). Receiving: bytes are read into a per-connection buffer; a read
//! payload is copied from it into the caller's segments as far as it
//! arrived with its header, the rest goes straight from the socket into the
//! caller's memory with `readv`. Any malformed frame, payload checksum
//! mismatch, EOF or socket error closes the connection with a log line.
//!
//! Memory: a connection's receive buffer and send queue are allocated when
//! it opens; frames, headers and iovec arrays are not allocated per I/O.
//!
//! Handshake: a new connection sends nothing until the node's `Challenge`
//! arrives; then its `Hello` (the credential's proof) goes first, followed
//! by whatever requests were queued meanwhile. A response before the node
//! proved the key in its Hello answer closes the connection. When the
//! client's credential changes ([`crate::Client::renew`]), every verified
//! connection gets a `Renew` frame at the next flush.
//!
//! Data TLS ([`crate::ClientConfig::data_tls`]): the same frames go
//! through a rustls session per connection, at the socket boundary only
//! (`writev`/`readv` become rustls's writer/reader): the payload is copied
//! into rustls to be encrypted, and out of it when decrypted, and rustls
//! allocates per record. A plain connection pays one `Option` test per
//! socket call.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use celer_device::IoSegment;
use celer_proto::auth::{Credential, HelloProof, Nonce, NONCE_BYTES};
use celer_proto::{decode_header, Header, Kind, Op, Status, HEADER_BYTES};
use celer_route::NodeId;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tracing::{debug, warn};

pub(crate) type ConnId = u32;

/// Bytes of a connection's receive buffer.
const RECV_BUFFER_BYTES: usize = 64 << 10;
/// iovecs one `writev`/`readv` call carries.
const IOVECS_MAX: usize = 64;
/// Frames a connection's send queue starts with room for (it grows under a
/// backlog and keeps the room).
const SEND_QUEUE_FRAMES: usize = 64;
/// Socket reads per readiness event, so one busy connection cannot starve
/// the others (epoll is level-triggered: the rest is read on the next poll).
const READS_PER_EVENT_MAX: usize = 16;
/// A connection that failed is not reopened sooner than this.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);
/// Request id of the `Hello` that opens every connection.
pub(crate) const HELLO_REQUEST_ID: u32 = u32::MAX;
/// Request id of a `Renew`.
pub(crate) const RENEW_REQUEST_ID: u32 = u32::MAX - 1;
/// Request id of a keep-alive `Ping` ([`Net::keepalive`]).
pub(crate) const PING_REQUEST_ID: u32 = u32::MAX - 2;
/// Largest payload of the handshake frames a node sends (Challenge, Hello
/// answer): they are read from the receive buffer whole.
const HANDSHAKE_PAYLOAD_MAX: usize = 64;

/// Where a response payload goes.
pub(crate) enum Dest {
    /// Into caller memory: `len` bytes of `segs` after skipping `skip` bytes.
    /// The sink has counted the pin on request slot `slot`.
    Segments {
        slot: u32,
        segs: *const IoSegment,
        nsegs: usize,
        skip: usize,
    },
    /// Into the connection's scratch buffer (route tables, unexpected data).
    Scratch,
}

/// The protocol logic the transport reports to.
pub(crate) trait Sink {
    /// Where the payload of response `h` goes.
    fn dest(&mut self, conn: ConnId, h: &Header) -> Dest;
    /// A whole, verified response. `payload` holds the scratch bytes (empty
    /// when the payload went into the caller's segments).
    fn response(&mut self, conn: ConnId, node: NodeId, h: &Header, payload: &[u8]);
    /// The transport no longer references the memory of request slot `slot`
    /// for one frame (sent, dropped, received or abandoned).
    fn unpin(&mut self, slot: u32);
    /// The connection is closed: every request on it is lost.
    fn closed(&mut self, conn: ConnId);
}

/// A frame waiting to be written.
struct Outgoing {
    header: [u8; HEADER_BYTES],
    /// Request slot whose segments hold the payload (`NO_SLOT`: none).
    slot: u32,
    segs: *const IoSegment,
    nsegs: usize,
    skip: usize,
    len: usize,
    /// A payload of the connection's own (handshake frames); empty for
    /// requests, which send from caller memory.
    owned: Vec<u8>,
}

const NO_SLOT: u32 = u32::MAX;

/// A payload to send: `len` bytes of the request slot's segments from `skip`.
#[derive(Clone, Copy)]
pub(crate) struct Payload {
    pub slot: u32,
    pub segs: *const IoSegment,
    pub nsegs: usize,
    pub skip: usize,
    pub len: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Connecting,
    Open,
    Closed,
}

/// Where the connection's handshake stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Auth {
    /// Waiting for the node's Challenge: nothing is sent.
    AwaitChallenge,
    /// Our Hello is queued first: waiting for the node's proof.
    AwaitAnswer {
        node_nonce: Nonce,
        peer_nonce: Nonce,
    },
    /// The node proved the key; requests may be answered.
    Verified { node_nonce: Nonce },
}

enum Recv {
    Header,
    Payload {
        h: Header,
        dest: Dest,
        got: usize,
        crc: u32,
    },
}

struct Conn {
    node: NodeId,
    shard: u16,
    addr: SocketAddr,
    /// Bumped at every (re)open: epoll events of an older socket are ignored.
    gen: u32,
    state: State,
    stream: Option<TcpStream>,
    /// The TLS session of the current socket (data TLS on).
    tls: Option<Box<rustls::Connection>>,
    sendq: VecDeque<Outgoing>,
    /// Bytes of the front frame already written.
    front_sent: usize,
    /// EPOLLOUT is registered.
    want_out: bool,
    dirty: bool,
    /// Frames queued on this connection (wrapping), and the count at the
    /// last keep-alive round: equal means it carried nothing since.
    queued: u32,
    queued_seen: u32,
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    recv: Recv,
    scratch: Vec<u8>,
    failed_at: Option<Instant>,
    /// When the current socket was opened (connect timeout).
    opened_at: Instant,
    /// Consecutive failures (to log the first one loudly only).
    failures: u32,
    auth: Auth,
    /// The credential this connection proved (or will prove), and its
    /// generation.
    cred: Arc<Credential>,
    cred_gen: u64,
}

pub(crate) struct Net {
    epoll: OwnedFd,
    shared: Arc<crate::Shared>,
    /// The credential generation every verified connection presented.
    cred_gen: u64,
    queue_index: usize,
    conns: Vec<Conn>,
    by_key: HashMap<(NodeId, u16), ConnId>,
    dirty: Vec<ConnId>,
}

fn iovec(ptr: *const u8, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: ptr as *mut libc::c_void,
        iov_len: len,
    }
}

/// Appends to `out` the iovecs of `len` bytes of `segs` starting `from`
/// bytes in; returns how many bytes it covered (less when `out` filled up).
///
/// # Safety
/// `segs` must point to `nsegs` valid segments.
unsafe fn segment_iovecs(
    segs: *const IoSegment,
    nsegs: usize,
    from: usize,
    len: usize,
    out: &mut [libc::iovec],
    n: &mut usize,
) -> usize {
    // SAFETY: the caller guarantees `segs` holds `nsegs` segments.
    let segs = unsafe { std::slice::from_raw_parts(segs, nsegs) };
    let mut skip = from;
    let mut left = len;
    let mut covered = 0;
    for s in segs {
        if left == 0 || *n == out.len() {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let take = (s.len - skip).min(left);
        // The pointer stays inside the segment: skip < s.len.
        out[*n] = iovec(s.addr.wrapping_add(skip), take);
        *n += 1;
        covered += take;
        left -= take;
        skip = 0;
    }
    covered
}

/// Copies `data` into `segs` at byte `at` (after `skip`).
///
/// # Safety
/// `segs` must point to `nsegs` segments valid for writes.
unsafe fn copy_into_segments(segs: *const IoSegment, nsegs: usize, at: usize, data: &[u8]) {
    // SAFETY: as promised by the caller.
    let segs = unsafe { std::slice::from_raw_parts(segs, nsegs) };
    let mut skip = at;
    let mut data = data;
    for s in segs {
        if data.is_empty() {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let take = (s.len - skip).min(data.len());
        // SAFETY: [skip, skip + take) lies inside the segment, which is
        // valid for writes; `data` is our own buffer, not caller memory.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), s.addr.add(skip), take) };
        data = &data[take..];
        skip = 0;
    }
}

/// crc32c of `len` bytes of `segs` from byte `from`.
///
/// # Safety
/// `segs` must point to `nsegs` segments valid for reads.
pub(crate) unsafe fn segments_crc(
    crc: u32,
    segs: *const IoSegment,
    nsegs: usize,
    from: usize,
    len: usize,
) -> u32 {
    // SAFETY: as promised by the caller.
    let segs = unsafe { std::slice::from_raw_parts(segs, nsegs) };
    let mut crc = crc;
    let mut skip = from;
    let mut left = len;
    for s in segs {
        if left == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let take = (s.len - skip).min(left);
        // SAFETY: [skip, skip + take) lies inside a segment valid for reads.
        let piece = unsafe { std::slice::from_raw_parts(s.addr.add(skip), take) };
        crc = crc32c::crc32c_append(crc, piece);
        left -= take;
        skip = 0;
    }
    crc
}

/// `read(2)`'s result as an `io::Result`.
fn os_rc(rc: isize) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

fn token(id: ConnId, gen: u32) -> u64 {
    ((gen as u64) << 32) | id as u64
}

/// What the protocol logic needs from a transport: a connection to a node
/// shard, and a way to queue a frame on it. TCP ([`Net`]) is the one
/// implementation; an RDMA transport, or a simulated network, would be
/// another (the driver side, readiness and flushing, stays per transport).
pub(crate) trait Transport {
    /// The open (or opening) connection to (node, shard), opened now if
    /// there is none; it starts with `Hello`. `Err`: it failed too recently
    /// or cannot be opened (logged).
    fn conn(
        &mut self,
        node: NodeId,
        shard: u16,
        addr: SocketAddr,
        now: Instant,
        sink: &mut dyn Sink,
    ) -> Result<ConnId, ()>;

    /// Queues a request frame on an open connection. A payload pins its
    /// request slot until the frame is written or dropped (the caller counts
    /// the pin; the sink's `unpin` releases it).
    fn send(&mut self, id: ConnId, h: &Header, payload: Option<Payload>);
}

impl Transport for Net {
    fn conn(
        &mut self,
        node: NodeId,
        shard: u16,
        addr: SocketAddr,
        now: Instant,
        sink: &mut dyn Sink,
    ) -> Result<ConnId, ()> {
        self.conn_impl(node, shard, addr, now, sink)
    }

    fn send(&mut self, id: ConnId, h: &Header, payload: Option<Payload>) {
        debug_assert!(self.conns[id as usize].state != State::Closed);
        debug_assert_eq!(
            h.payload_bytes as usize,
            payload.map(|p| p.len).unwrap_or(0)
        );
        self.push(id, h.encode(), payload);
    }
}

impl Net {
    pub(crate) fn new(epoll: OwnedFd, shared: Arc<crate::Shared>, queue_index: usize) -> Net {
        let cred_gen = shared.credential().1;
        Net {
            epoll,
            shared,
            cred_gen,
            queue_index,
            conns: Vec::new(),
            by_key: HashMap::new(),
            dirty: Vec::new(),
        }
    }

    pub(crate) fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn epoll_ctl(&self, op: libc::c_int, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: data };
        // SAFETY: `ev` lives across the call; both fds are open.
        let rc = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Registers a non-connection fd (timer, eventfd) under `data`.
    pub(crate) fn register(&self, fd: RawFd, data: u64) -> io::Result<()> {
        self.epoll_ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32, data)
    }

    fn conn_impl(
        &mut self,
        node: NodeId,
        shard: u16,
        addr: SocketAddr,
        now: Instant,
        sink: &mut dyn Sink,
    ) -> Result<ConnId, ()> {
        let id = match self.by_key.get(&(node, shard)) {
            Some(&id) => {
                let c = &self.conns[id as usize];
                if c.state != State::Closed && c.addr == addr {
                    return Ok(id);
                }
                if c.state == State::Closed
                    && c.failed_at
                        .is_some_and(|t| now.saturating_duration_since(t) < RECONNECT_PAUSE)
                {
                    return Err(());
                }
                id
            }
            None => {
                let id = self.conns.len() as ConnId;
                self.conns.push(Conn {
                    node,
                    shard,
                    addr,
                    gen: 0,
                    state: State::Closed,
                    stream: None,
                    tls: None,
                    sendq: VecDeque::with_capacity(SEND_QUEUE_FRAMES),
                    front_sent: 0,
                    want_out: false,
                    dirty: false,
                    queued: 0,
                    queued_seen: 0,
                    rbuf: vec![0u8; RECV_BUFFER_BYTES].into_boxed_slice(),
                    rstart: 0,
                    rend: 0,
                    recv: Recv::Header,
                    scratch: Vec::new(),
                    failed_at: None,
                    opened_at: now,
                    failures: 0,
                    auth: Auth::AwaitChallenge,
                    cred: self.shared.credential().0,
                    cred_gen: 0,
                });
                self.by_key.insert((node, shard), id);
                id
            }
        };
        if self.conns[id as usize].state != State::Closed {
            // Same key, new address (the node moved): start over.
            self.close(id, "the node has a new address", sink);
        }
        self.conns[id as usize].opened_at = now;
        match self.open(id, addr) {
            Ok(()) => Ok(id),
            Err(e) => {
                let c = &mut self.conns[id as usize];
                c.failed_at = Some(now);
                c.failures += 1;
                if c.failures == 1 {
                    warn!(queue = self.queue_index, node, shard, %addr, error = %e,
                        "cannot connect to storage node");
                }
                Err(())
            }
        }
    }

    fn open(&mut self, id: ConnId, addr: SocketAddr) -> io::Result<()> {
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        sock.set_nonblocking(true)?;
        sock.set_tcp_nodelay(true)?;
        let state = match sock.connect(&SockAddr::from(addr)) {
            Ok(()) => State::Open,
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => State::Connecting,
            Err(e) => return Err(e),
        };
        let stream: TcpStream = sock.into();
        let tls = match self.shared.data_tls.as_ref().and_then(|t| t.client.clone()) {
            Some(config) => {
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let c = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
                Some(Box::new(rustls::Connection::Client(c)))
            }
            None => None,
        };
        let (cred, cred_gen) = self.shared.credential();
        let c = &mut self.conns[id as usize];
        c.gen = c.gen.wrapping_add(1);
        c.addr = addr;
        c.state = state;
        c.auth = Auth::AwaitChallenge;
        c.cred = cred;
        c.cred_gen = cred_gen;
        c.front_sent = 0;
        c.rstart = 0;
        c.rend = 0;
        c.recv = Recv::Header;
        // With TLS the ClientHello goes out as soon as the socket takes it.
        c.want_out = state == State::Connecting || tls.is_some();
        c.tls = tls;
        let events = libc::EPOLLIN as u32
            | libc::EPOLLRDHUP as u32
            | if c.want_out { libc::EPOLLOUT as u32 } else { 0 };
        let fd = stream.as_raw_fd();
        let tok = token(id, c.gen);
        c.stream = Some(stream);
        debug_assert!(c.sendq.is_empty());
        if let Err(e) = self.epoll_ctl(libc::EPOLL_CTL_ADD, fd, events, tok) {
            self.conns[id as usize].stream = None;
            self.conns[id as usize].state = State::Closed;
            return Err(e);
        }
        debug!(queue = self.queue_index, node = self.conns[id as usize].node,
            shard = self.conns[id as usize].shard, %addr, "connecting");
        // The Hello goes out when the node's Challenge comes.
        Ok(())
    }

    /// Queues a handshake frame (Hello or Renew) with its own payload,
    /// before every request queued (`first`) or after them.
    fn push_control(&mut self, id: ConnId, h: Header, payload: Vec<u8>, first: bool) {
        let h = h.with_payload([payload.as_slice()]);
        let f = Outgoing {
            header: h.encode(),
            slot: NO_SLOT,
            segs: std::ptr::null(),
            nsegs: 0,
            skip: 0,
            len: payload.len(),
            owned: payload,
        };
        let c = &mut self.conns[id as usize];
        c.queued = c.queued.wrapping_add(1);
        if first {
            debug_assert_eq!(c.front_sent, 0, "nothing is sent before the Hello");
            c.sendq.push_front(f);
        } else {
            c.sendq.push_back(f);
        }
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(id);
        }
    }

    /// The node's Challenge came: our Hello goes first.
    fn on_challenge(&mut self, id: ConnId, node_nonce: &[u8]) -> Result<(), String> {
        let c = &mut self.conns[id as usize];
        if c.auth != Auth::AwaitChallenge || node_nonce.len() != NONCE_BYTES {
            return Err("unexpected Challenge".into());
        }
        let mut nn = [0u8; NONCE_BYTES];
        nn.copy_from_slice(node_nonce);
        let mut pn = [0u8; NONCE_BYTES];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut pn);
        let sender = crate::attachment_of(&c.cred) as u64;
        let proof = HelloProof::build(&c.cred, &nn, &pn, c.shard, sender, false);
        c.auth = Auth::AwaitAnswer {
            node_nonce: nn,
            peer_nonce: pn,
        };
        let mut hello = Header::request(Op::Hello, HELLO_REQUEST_ID);
        hello.offset = c.shard as u64;
        hello.volume = sender;
        self.push_control(id, hello, proof, true);
        Ok(())
    }

    /// Presents the newest credential on every verified connection whose
    /// credential is older (a Renew, in order with its requests).
    fn renew_all(&mut self) {
        let (cred, gen) = self.shared.credential();
        self.cred_gen = gen;
        for id in 0..self.conns.len() as ConnId {
            let c = &mut self.conns[id as usize];
            if c.state == State::Closed || c.cred_gen == gen {
                continue;
            }
            // A connection not proven yet presents the new one when it is
            // (its generation stays old until then).
            if let Auth::Verified { node_nonce } = c.auth {
                let mut pn = [0u8; NONCE_BYTES];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut pn);
                let sender = crate::attachment_of(&c.cred) as u64;
                let proof = HelloProof::build(&cred, &node_nonce, &pn, c.shard, sender, true);
                c.cred = cred.clone();
                c.cred_gen = gen;
                let h = Header::request(Op::Renew, RENEW_REQUEST_ID);
                self.push_control(id, h, proof, false);
            }
        }
    }

    fn push(&mut self, id: ConnId, header: [u8; HEADER_BYTES], payload: Option<Payload>) {
        let c = &mut self.conns[id as usize];
        c.queued = c.queued.wrapping_add(1);
        let p = payload.unwrap_or(Payload {
            slot: NO_SLOT,
            segs: std::ptr::null(),
            nsegs: 0,
            skip: 0,
            len: 0,
        });
        c.sendq.push_back(Outgoing {
            header,
            slot: p.slot,
            segs: p.segs,
            nsegs: p.nsegs,
            skip: p.skip,
            len: p.len,
            owned: Vec::new(),
        });
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(id);
        }
    }

    /// A keep-alive round, once per keep-alive interval: every proven
    /// connection that carried no frame since the last round gets a `Ping`,
    /// so a node's idle timeout does not close a quiet attachment's
    /// connections (the answer is dropped). Allocates nothing.
    pub(crate) fn keepalive(&mut self) {
        for id in 0..self.conns.len() as ConnId {
            let c = &mut self.conns[id as usize];
            let quiet = c.queued == c.queued_seen;
            if quiet && c.state == State::Open && matches!(c.auth, Auth::Verified { .. }) {
                let h = Header::request(Op::Ping, PING_REQUEST_ID);
                self.push_control(id, h, Vec::new(), false);
            }
            let c = &mut self.conns[id as usize];
            c.queued_seen = c.queued;
        }
    }

    /// Writes what the connections queued.
    pub(crate) fn flush(&mut self, sink: &mut dyn Sink) {
        if self
            .shared
            .credential_gen
            .load(std::sync::atomic::Ordering::Acquire)
            != self.cred_gen
        {
            self.renew_all();
        }
        let mut i = 0;
        while i < self.dirty.len() {
            let id = self.dirty[i];
            i += 1;
            self.conns[id as usize].dirty = false;
            if self.conns[id as usize].state == State::Open {
                self.write_out(id, sink);
            }
        }
        self.dirty.clear();
    }

    fn set_want_out(&mut self, id: ConnId, want: bool) {
        let c = &mut self.conns[id as usize];
        if c.want_out == want {
            return;
        }
        c.want_out = want;
        let Some(fd) = c.stream.as_ref().map(|s| s.as_raw_fd()) else {
            return;
        };
        let tok = token(id, c.gen);
        let events = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32
            | if want { libc::EPOLLOUT as u32 } else { 0 };
        if let Err(e) = self.epoll_ctl(libc::EPOLL_CTL_MOD, fd, events, tok) {
            warn!(queue = self.queue_index, error = %e, "epoll_ctl MOD failed");
        }
    }

    fn write_out(&mut self, id: ConnId, sink: &mut dyn Sink) {
        loop {
            let c = &mut self.conns[id as usize];
            if c.state != State::Open {
                return;
            }
            if c.sendq.is_empty() || c.auth == Auth::AwaitChallenge {
                // TLS records (the handshake, or the tail of what was
                // written) may still wait for the socket.
                let pending = match (&mut c.tls, c.stream.as_mut()) {
                    (Some(tls), Some(stream)) => match celer_tls::wire::send_pending(tls, stream) {
                        Ok(()) => false,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                        Err(e) => {
                            self.close(id, &format!("send failed: {e}"), sink);
                            return;
                        }
                    },
                    _ => false,
                };
                self.set_want_out(id, pending);
                return;
            }
            let mut iov = [iovec(std::ptr::null(), 0); IOVECS_MAX];
            let mut n = 0;
            let mut from = c.front_sent;
            for f in c.sendq.iter() {
                if n >= IOVECS_MAX - 1 {
                    break;
                }
                if from < HEADER_BYTES {
                    iov[n] = iovec(f.header[from..].as_ptr(), HEADER_BYTES - from);
                    n += 1;
                    from = 0;
                } else {
                    from -= HEADER_BYTES;
                }
                if !f.owned.is_empty() {
                    iov[n] = iovec(f.owned[from..].as_ptr(), f.len - from);
                    n += 1;
                } else if f.len > 0 {
                    // SAFETY: the slot's segments stay valid while the frame
                    // is queued (pinned; given up only through release_slot).
                    let covered = unsafe {
                        segment_iovecs(
                            f.segs,
                            f.nsegs,
                            f.skip + from,
                            f.len - from,
                            &mut iov,
                            &mut n,
                        )
                    };
                    if covered < f.len - from {
                        break;
                    }
                }
                from = 0;
            }
            let sent = match (&mut c.tls, c.stream.as_mut()) {
                (Some(tls), Some(stream)) => {
                    let mut slices = [IoSlice::new(&[]); IOVECS_MAX];
                    for (s, v) in slices.iter_mut().zip(&iov[..n]) {
                        // SAFETY: each iovec describes our queued headers
                        // or pinned caller memory, valid while queued.
                        *s = IoSlice::new(unsafe {
                            std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                        });
                    }
                    celer_tls::wire::write_plain(tls, stream, &slices[..n])
                }
                _ => {
                    let fd = c.stream.as_ref().map(|s| s.as_raw_fd()).unwrap_or(-1);
                    // SAFETY: `iov[..n]` describe our queued headers and pinned caller memory.
                    let rc = unsafe { libc::writev(fd, iov.as_ptr(), n as libc::c_int) };
                    if rc < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(rc as usize)
                    }
                }
            };
            let rc = match sent {
                Ok(n) => n,
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => {
                        self.set_want_out(id, true);
                        return;
                    }
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        self.close(id, &format!("send failed: {e}"), sink);
                        return;
                    }
                },
            };
            let mut wrote = rc;
            while wrote > 0 {
                let Some(f) = c.sendq.front() else {
                    break;
                };
                let left = HEADER_BYTES + f.len - c.front_sent;
                if wrote >= left {
                    wrote -= left;
                    let slot = f.slot;
                    c.sendq.pop_front();
                    c.front_sent = 0;
                    if slot != NO_SLOT {
                        sink.unpin(slot);
                    }
                } else {
                    c.front_sent += wrote;
                    wrote = 0;
                }
            }
        }
    }

    /// Handles an epoll event with `data` (a connection token).
    pub(crate) fn on_event(&mut self, data: u64, events: u32, sink: &mut dyn Sink) {
        let id = (data & 0xffff_ffff) as ConnId;
        let gen = (data >> 32) as u32;
        let Some(c) = self.conns.get(id as usize) else {
            return;
        };
        if c.gen != gen || c.state == State::Closed {
            return;
        }
        if c.state == State::Connecting {
            if events & (libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP) as u32 == 0 {
                return;
            }
            let err = match c.stream.as_ref().map(|s| s.take_error()) {
                Some(Ok(None)) => None,
                Some(Ok(Some(e))) | Some(Err(e)) => Some(e),
                None => Some(io::Error::other("no socket")),
            };
            if let Some(e) = err {
                self.close(id, &format!("connect failed: {e}"), sink);
                return;
            }
            self.conns[id as usize].state = State::Open;
            self.conns[id as usize].failures = 0;
            self.write_out(id, sink);
        } else if events & libc::EPOLLOUT as u32 != 0 {
            self.write_out(id, sink);
        }
        if self.conns[id as usize].state == State::Open
            && events & (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP | libc::EPOLLRDHUP) as u32
                != 0
        {
            self.read_in(id, sink);
        }
    }

    fn read_in(&mut self, id: ConnId, sink: &mut dyn Sink) {
        let mut reads = 0;
        loop {
            if let Err(why) = self.parse_buffered(id, sink) {
                self.close(id, &why, sink);
                return;
            }
            // Past the fairness bound, only what TLS already holds (epoll
            // would not signal it again).
            if reads >= READS_PER_EVENT_MAX && !self.tls_buffered(id) {
                break;
            }
            reads += 1;
            match self.read_some(id, sink) {
                Ok(true) => {}
                Ok(false) => break,
                Err(why) => {
                    self.close(id, &why, sink);
                    return;
                }
            }
        }
        if let Err(why) = self.parse_buffered(id, sink) {
            self.close(id, &why, sink);
            return;
        }
        // Reading may have advanced the TLS handshake: its records go out
        // when the socket takes them.
        if self.conns[id as usize]
            .tls
            .as_ref()
            .is_some_and(|t| t.wants_write())
        {
            self.set_want_out(id, true);
        }
    }

    fn tls_buffered(&mut self, id: ConnId) -> bool {
        let c = &mut self.conns[id as usize];
        c.state == State::Open
            && c.tls
                .as_mut()
                .is_some_and(|t| celer_tls::wire::has_plaintext(t))
    }

    /// One read from the socket: into the receive buffer, or straight into
    /// the payload's destination. `Ok(false)`: nothing more to read now.
    fn read_some(&mut self, id: ConnId, sink: &mut dyn Sink) -> Result<bool, String> {
        let c = &mut self.conns[id as usize];
        if c.state != State::Open {
            return Ok(false);
        }
        let fd = c.stream.as_ref().map(|s| s.as_raw_fd()).unwrap_or(-1);
        let tls = match (&mut c.tls, c.stream.as_mut()) {
            (Some(tls), Some(stream)) => Some((tls, stream)),
            _ => None,
        };
        let rc = match &mut c.recv {
            Recv::Payload { h, dest, got, .. } if c.rstart == c.rend => {
                let want = h.payload_bytes as usize - *got;
                match dest {
                    Dest::Segments {
                        segs, nsegs, skip, ..
                    } => {
                        let mut iov = [iovec(std::ptr::null(), 0); IOVECS_MAX];
                        let mut n = 0;
                        // SAFETY: the destination is pinned caller memory.
                        unsafe {
                            segment_iovecs(*segs, *nsegs, *skip + *got, want, &mut iov, &mut n)
                        };
                        match tls {
                            // rustls reads into one buffer at a time.
                            Some((tls, stream)) if n > 0 => {
                                // SAFETY: the first iovec is writable pinned caller memory.
                                let buf = unsafe {
                                    std::slice::from_raw_parts_mut(
                                        iov[0].iov_base as *mut u8,
                                        iov[0].iov_len,
                                    )
                                };
                                celer_tls::wire::read_plain(tls, stream, buf)
                            }
                            // SAFETY: the iovecs describe writable caller memory.
                            _ => os_rc(unsafe { libc::readv(fd, iov.as_ptr(), n as libc::c_int) }),
                        }
                    }
                    Dest::Scratch => {
                        let buf = &mut c.scratch[*got..*got + want];
                        match tls {
                            Some((tls, stream)) => celer_tls::wire::read_plain(tls, stream, buf),
                            // SAFETY: `buf` is our own writable buffer of `want` bytes.
                            None => os_rc(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), want) }),
                        }
                    }
                }
            }
            _ => {
                if c.rstart > 0 {
                    c.rbuf.copy_within(c.rstart..c.rend, 0);
                    c.rend -= c.rstart;
                    c.rstart = 0;
                }
                let buf = &mut c.rbuf[c.rend..];
                match tls {
                    Some((tls, stream)) => celer_tls::wire::read_plain(tls, stream, buf),
                    // SAFETY: `buf` is our own writable buffer.
                    None => os_rc(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) }),
                }
            }
        };
        let rc = match rc {
            Ok(n) => n,
            Err(e) => {
                if let Some(t) = celer_tls::wire::tls_error(&e) {
                    let hs = c.tls.as_ref().is_some_and(|t| t.is_handshaking());
                    let dir = self.shared.data_tls.as_ref().map(|d| d.dir.clone());
                    return Err(celer_tls::describe_client_error(
                        t,
                        dir.as_deref().unwrap_or(std::path::Path::new("DIR")),
                        hs,
                    ));
                }
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(false),
                    io::ErrorKind::Interrupted => Ok(true),
                    _ => Err(format!("receive failed: {e}")),
                };
            }
        };
        if rc == 0 {
            return Err("connection closed by the node".to_string());
        }
        let n = rc as usize;
        let mut complete = false;
        match &mut c.recv {
            Recv::Payload { h, dest, got, crc } if c.rstart == c.rend => {
                match dest {
                    Dest::Segments {
                        segs, nsegs, skip, ..
                    } => {
                        // SAFETY: the bytes were just received into pinned caller memory.
                        *crc = unsafe { segments_crc(*crc, *segs, *nsegs, *skip + *got, n) };
                    }
                    Dest::Scratch => {
                        *crc = crc32c::crc32c_append(*crc, &c.scratch[*got..*got + n]);
                    }
                }
                *got += n;
                complete = *got == h.payload_bytes as usize;
            }
            _ => c.rend += n,
        }
        if complete {
            self.finish_payload(id, sink)?;
        }
        Ok(true)
    }

    /// Handles every whole frame in the receive buffer.
    fn parse_buffered(&mut self, id: ConnId, sink: &mut dyn Sink) -> Result<(), String> {
        loop {
            let c = &mut self.conns[id as usize];
            if c.state != State::Open {
                return Ok(());
            }
            if let Recv::Payload { h, dest, got, crc } = &mut c.recv {
                if c.rstart == c.rend {
                    return Ok(());
                }
                let take = (h.payload_bytes as usize - *got).min(c.rend - c.rstart);
                let data = &c.rbuf[c.rstart..c.rstart + take];
                match dest {
                    Dest::Segments {
                        segs, nsegs, skip, ..
                    } => {
                        // SAFETY: the destination is pinned caller memory.
                        unsafe { copy_into_segments(*segs, *nsegs, *skip + *got, data) };
                    }
                    Dest::Scratch => c.scratch[*got..*got + take].copy_from_slice(data),
                }
                *crc = crc32c::crc32c_append(*crc, data);
                *got += take;
                c.rstart += take;
                let complete = *got == h.payload_bytes as usize;
                if complete {
                    self.finish_payload(id, sink)?;
                }
                continue;
            }
            let h = match decode_header(&c.rbuf[c.rstart..c.rend]) {
                Ok(None) => return Ok(()),
                Ok(Some(h)) => h,
                Err(e) => return Err(format!("bad frame: {e}")),
            };
            let handshake = (h.kind == Kind::Request && h.op == Op::Challenge)
                || (h.kind == Kind::Response
                    && matches!(
                        h.request_id,
                        HELLO_REQUEST_ID | RENEW_REQUEST_ID | PING_REQUEST_ID
                    ));
            if handshake {
                if !self.handshake_frame(id, &h)? {
                    return Ok(()); // not whole yet
                }
                continue;
            }
            c.rstart += HEADER_BYTES;
            if h.kind != Kind::Response {
                return Err(format!("the node sent a request ({:?}) to a client", h.op));
            }
            if !matches!(c.auth, Auth::Verified { .. }) {
                return Err("an answer before the node proved it knows the key".to_string());
            }
            if h.payload_bytes == 0 {
                if h.payload_crc != 0 {
                    return Err("empty payload with a nonzero checksum".to_string());
                }
                sink.response(id, c.node, &h, &[]);
                continue;
            }
            let dest = sink.dest(id, &h);
            let c = &mut self.conns[id as usize];
            if let Dest::Scratch = dest {
                c.scratch.clear();
                c.scratch.resize(h.payload_bytes as usize, 0);
            }
            c.recv = Recv::Payload {
                h,
                dest,
                got: 0,
                crc: 0,
            };
        }
    }

    /// A Challenge, Hello answer or Renew answer at the head of the
    /// receive buffer: handled once whole (it is small), then consumed.
    /// `Ok(false)`: not whole yet.
    fn handshake_frame(&mut self, id: ConnId, h: &Header) -> Result<bool, String> {
        let plen = h.payload_bytes as usize;
        if plen > HANDSHAKE_PAYLOAD_MAX {
            return Err(format!("a handshake frame with {plen} payload bytes"));
        }
        let c = &mut self.conns[id as usize];
        if c.rend - c.rstart < HEADER_BYTES + plen {
            return Ok(false);
        }
        let at = c.rstart + HEADER_BYTES;
        let mut payload = [0u8; HANDSHAKE_PAYLOAD_MAX];
        payload[..plen].copy_from_slice(&c.rbuf[at..at + plen]);
        let payload = &payload[..plen];
        h.verify_payload([payload])
            .map_err(|e| format!("bad handshake frame: {e}"))?;
        c.rstart += HEADER_BYTES + plen;
        if h.op == Op::Challenge {
            return self.on_challenge(id, payload).map(|()| true);
        }
        if h.request_id == PING_REQUEST_ID {
            return Ok(true);
        }
        if h.request_id == RENEW_REQUEST_ID {
            return match h.status {
                Status::Ok => Ok(true),
                s => Err(format!(
                    "the node refused the renewed capability ({s:?}): reconnecting with it"
                )),
            };
        }
        let Auth::AwaitAnswer {
            node_nonce,
            peer_nonce,
        } = c.auth
        else {
            return Err("a Hello answer outside the handshake".into());
        };
        match h.status {
            Status::Ok => {}
            Status::Unauthorized => return Err(
                "the node refused this client's credential (another cluster's, expired or forged)"
                    .into(),
            ),
            s => return Err(format!("hello refused: {s:?}")),
        }
        if !HelloProof::check_answer(c.cred.answer_key(), &node_nonce, &peer_nonce, payload) {
            return Err(
                "the node did not prove it knows the credential's key: not a node of this cluster"
                    .into(),
            );
        }
        c.auth = Auth::Verified { node_nonce };
        if c.cred_gen != self.cred_gen {
            // The credential was renewed while this one was being proven.
            self.renew_all();
        }
        Ok(true)
    }

    fn finish_payload(&mut self, id: ConnId, sink: &mut dyn Sink) -> Result<(), String> {
        let c = &mut self.conns[id as usize];
        let Recv::Payload { h, dest, crc, .. } = std::mem::replace(&mut c.recv, Recv::Header)
        else {
            unreachable!("finish_payload outside a payload");
        };
        if let Dest::Segments { slot, .. } = dest {
            sink.unpin(slot);
        }
        if crc != h.payload_crc {
            return Err(format!(
                "payload checksum mismatch in the answer to request {:#x} ({:?})",
                h.request_id, h.op
            ));
        }
        let node = self.conns[id as usize].node;
        let scratch = std::mem::take(&mut self.conns[id as usize].scratch);
        match dest {
            Dest::Segments { .. } => sink.response(id, node, &h, &[]),
            Dest::Scratch => sink.response(id, node, &h, &scratch),
        }
        self.conns[id as usize].scratch = scratch;
        Ok(())
    }

    fn drop_socket(&mut self, id: ConnId) -> Option<Dest> {
        let c = &mut self.conns[id as usize];
        // Dropping the stream closes the fd, which leaves the epoll set.
        c.stream = None;
        c.tls = None;
        c.state = State::Closed;
        c.want_out = false;
        c.front_sent = 0;
        c.rstart = 0;
        c.rend = 0;
        match std::mem::replace(&mut c.recv, Recv::Header) {
            Recv::Payload { dest, .. } => Some(dest),
            Recv::Header => None,
        }
    }

    /// Closes a connection: frames still queued are dropped, a payload being
    /// received is abandoned, and the sink learns its requests are lost.
    pub(crate) fn close(&mut self, id: ConnId, why: &str, sink: &mut dyn Sink) {
        let c = &self.conns[id as usize];
        if c.state == State::Closed {
            return;
        }
        if c.failures == 0 {
            warn!(queue = self.queue_index, node = c.node, shard = c.shard, addr = %c.addr,
                reason = why, "closing connection to storage node");
        } else {
            // Still failing (e.g. reconnects refused while the node is down).
            debug!(queue = self.queue_index, node = c.node, shard = c.shard, addr = %c.addr,
                reason = why, failures = c.failures, "closing connection to storage node");
        }
        if let Some(Dest::Segments { slot, .. }) = self.drop_socket(id) {
            sink.unpin(slot);
        }
        let c = &mut self.conns[id as usize];
        c.failed_at = Some(Instant::now());
        c.failures += 1;
        while let Some(f) = c.sendq.pop_front() {
            if f.slot != NO_SLOT {
                sink.unpin(f.slot);
            }
        }
        sink.closed(id);
    }

    /// Closes connections still connecting after `timeout` (a SYN lost to a
    /// dead host): their frames are dropped and the next use reconnects.
    pub(crate) fn expire_connects(&mut self, now: Instant, timeout: Duration, sink: &mut dyn Sink) {
        for id in 0..self.conns.len() as ConnId {
            let c = &self.conns[id as usize];
            if c.state == State::Connecting && now.saturating_duration_since(c.opened_at) >= timeout
            {
                self.close(id, "connect timed out", sink);
            }
        }
    }

    /// Frames are queued and not yet written.
    pub(crate) fn has_unsent(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Makes sure no connection references the memory of request slot
    /// `slot` any more: queued frames are dropped; a connection in the middle
    /// of sending or receiving that memory is closed (the stream cannot be
    /// resumed without it).
    pub(crate) fn release_slot(&mut self, slot: u32, sink: &mut dyn Sink) {
        for id in 0..self.conns.len() as ConnId {
            let c = &mut self.conns[id as usize];
            if c.state == State::Closed {
                continue;
            }
            let receiving = matches!(&c.recv, Recv::Payload { dest: Dest::Segments { slot: s, .. }, .. } if *s == slot);
            let sending = c.front_sent > 0 && c.sendq.front().is_some_and(|f| f.slot == slot);
            if receiving || sending {
                self.close(id, "a request it carried was given up", sink);
                continue;
            }
            let before = c.sendq.len();
            if before == 0 {
                continue;
            }
            let mut dropped = 0;
            c.sendq.retain(|f| {
                let keep = f.slot != slot;
                if !keep {
                    dropped += 1;
                }
                keep
            });
            for _ in 0..dropped {
                sink.unpin(slot);
            }
        }
    }
}
