//! The node's front door: one thread with its own epoll loop accepts
//! connections, sends each its `Challenge`, reads and checks its `Hello`
//! without blocking, and hands authenticated connections to the shard the
//! Hello names. Nothing but the handshake is served before that.
//!
//! Limits (a stranger cannot hold the door or fill the node):
//! - a connection must complete its handshake within [`HANDSHAKE_TIMEOUT`]
//!   (the whole of it, not per read: a byte every 0.9 s does not keep it);
//! - at most [`HANDSHAKES_MAX`] handshakes at once, [`HANDSHAKES_PER_IP_MAX`]
//!   from one address;
//! - at most [`CONNS_MAX`] connections (handshaking or established), and
//!   [`CONNS_PER_IP_MAX`] from one address; a connection over a limit is
//!   closed at once;
//! - the Hello's payload is at most `HelloProof::MAX_BYTES`: the buffer is
//!   fixed, nothing is allocated from what a stranger announces.
//!
//! With data TLS (`--tls-creds`) the door first runs the TLS handshake
//! (rustls, driven on the non-blocking socket by this same loop), then
//! sends the Challenge and reads the Hello inside TLS. The TLS handshake
//! counts within [`HANDSHAKE_TIMEOUT`] and the caps above: a trickled or
//! silent ClientHello is cut at the deadline like a trickled Hello.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celer_proto::auth::{Capability, HelloProof, Key, MacBytes, Nonce, Peer, NONCE_BYTES};
use celer_proto::{decode_header, Header, Kind, Op, Status, HEADER_BYTES};

use crate::conn::Wire;
use crate::{NodeShared, ShardMsg};

/// Time a new connection has to prove its credential.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections in their handshake at once.
pub(crate) const HANDSHAKES_MAX: usize = 256;
/// Connections in their handshake at once from one address.
pub(crate) const HANDSHAKES_PER_IP_MAX: usize = 32;
/// Connections a node holds (handshaking and established).
pub(crate) const CONNS_MAX: usize = 4096;
/// Connections a node holds from one address.
pub(crate) const CONNS_PER_IP_MAX: usize = 512;

const TOKEN_LISTENER: u64 = u64::MAX;

/// Connection counts per source address (control path: taken at accept,
/// given back when the connection closes).
#[derive(Default)]
pub(crate) struct ConnLimits {
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection's place in the counts; given back on drop.
pub(crate) struct ConnTicket {
    limits: Arc<NodeShared>,
    ip: IpAddr,
}

impl ConnLimits {
    fn admit(shared: &Arc<NodeShared>, ip: IpAddr) -> Option<ConnTicket> {
        let mut m = shared
            .limits
            .per_ip
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let total: usize = shared.conns_open.load(Ordering::Relaxed);
        let mine = m.get(&ip).copied().unwrap_or(0);
        if total >= CONNS_MAX || mine >= CONNS_PER_IP_MAX {
            return None;
        }
        *m.entry(ip).or_default() += 1;
        shared.conns_open.fetch_add(1, Ordering::Relaxed);
        Some(ConnTicket {
            limits: shared.clone(),
            ip,
        })
    }
}

impl Drop for ConnTicket {
    fn drop(&mut self) {
        let mut m = self
            .limits
            .limits
            .per_ip
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
        self.limits.conns_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An authenticated connection on its way to its shard.
pub(crate) struct Handshaken {
    pub(crate) stream: TcpStream,
    pub(crate) conn: Adopted,
}

/// What the handshake learnt about a connection, which its shard takes
/// with the stream (`ShardLoop::adopt`).
pub(crate) struct Adopted {
    /// With TLS: the session, which may hold requests the peer pipelined
    /// after its Hello.
    pub(crate) wire: Wire,
    pub(crate) hello: Header,
    pub(crate) peer: Peer,
    pub(crate) node_nonce: Nonce,
    /// The node's proof for the Hello response.
    pub(crate) answer: MacBytes,
    /// Its place in the node's connection counts (none in the simulator).
    pub(crate) ticket: Option<ConnTicket>,
}

struct Pending {
    stream: TcpStream,
    /// With TLS: the session; the Challenge goes out when its handshake is
    /// done (`challenged`).
    tls: Option<Box<rustls::Connection>>,
    challenged: bool,
    /// TLS bytes received (none: perhaps a plain client, see `PLAIN_PEER`).
    tls_in: usize,
    /// EPOLLOUT is armed (TLS records wait for the socket).
    want_out: bool,
    ticket: ConnTicket,
    nonce: Nonce,
    buf: [u8; HEADER_BYTES + HelloProof::MAX_BYTES],
    got: usize,
    /// Bytes of the Hello: the header, then header + its payload.
    need: usize,
    deadline: Instant,
}

/// Warnings about refused connections: at most one a second (an attack
/// must not flood the log), with the count of those not logged.
struct Quiet {
    last: Option<Instant>,
    hidden: u64,
}

impl Quiet {
    fn warn(&mut self, peer: IpAddr, why: &str) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.hidden += 1;
            return;
        }
        tracing::warn!(%peer, hidden = self.hidden, "connection refused: {why}");
        self.last = Some(now);
        self.hidden = 0;
    }
}

/// Why a TLS data port hears nothing from a plain client.
const PLAIN_PEER: &str = "this data port requires TLS (--tls-creds); a plain client sends nothing and waits for a Challenge, give it --data-tls-creds";

fn challenge(nonce: &Nonce) -> [u8; HEADER_BYTES + NONCE_BYTES] {
    let h = Header::request(Op::Challenge, 0).with_payload([&nonce[..]]);
    let mut out = [0u8; HEADER_BYTES + NONCE_BYTES];
    out[..HEADER_BYTES].copy_from_slice(&h.encode());
    out[HEADER_BYTES..].copy_from_slice(nonce);
    out
}

/// What the TLS layer of a pending connection gave.
enum Step {
    /// Wait for the socket.
    Wait,
    Refuse(String),
    /// This many bytes of the Hello were read into the buffer.
    Read(usize),
}

impl Pending {
    /// Sends a short frame (a refusal): into TLS when the session is up.
    fn send(&mut self, bytes: &[u8]) {
        match &mut self.tls {
            None => {
                let _ = self.stream.write(bytes);
            }
            Some(tls) => {
                if !tls.is_handshaking() {
                    let _ = tls.writer().write(bytes);
                    let _ = celer_tls::wire::send_pending(tls, &mut self.stream);
                }
            }
        }
    }

    /// Drives the TLS handshake, sends the Challenge once it is done, and
    /// reads what the peer sent of its Hello.
    fn tls_step(&mut self, dir: &std::path::Path) -> Step {
        use celer_tls::wire::send_pending;
        let Some(tls) = self.tls.as_mut() else {
            return Step::Refuse("no TLS session".into());
        };
        loop {
            if !tls.is_handshaking() {
                if !self.challenged {
                    if tls.writer().write_all(&challenge(&self.nonce)).is_err() {
                        return Step::Refuse("cannot queue the Challenge".into());
                    }
                    self.challenged = true;
                }
                match tls.reader().read(&mut self.buf[self.got..self.need]) {
                    Ok(0) => return Step::Refuse("closed during the handshake".into()),
                    Ok(n) => return Step::Read(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Step::Refuse("closed during the handshake".into()),
                }
            }
            match send_pending(tls, &mut self.stream) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Step::Refuse(format!("socket error in the TLS handshake: {e}")),
            }
            match tls.read_tls(&mut self.stream) {
                Ok(0) => {
                    return Step::Refuse(if self.tls_in == 0 {
                        format!("closed without sending anything: {PLAIN_PEER}")
                    } else if tls.is_handshaking() {
                        "closed during the TLS handshake".into()
                    } else {
                        "closed during the handshake".into()
                    })
                }
                Ok(n) => self.tls_in += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Step::Refuse(format!("socket error in the TLS handshake: {e}")),
            }
            if let Err(e) = tls.process_new_packets() {
                let _ = send_pending(tls, &mut self.stream);
                return Step::Refuse(celer_tls::describe_server_error(&e, dir, true));
            }
        }
    }
}

fn random_nonce() -> Nonce {
    let mut n = [0u8; NONCE_BYTES];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut n);
    n
}

/// The accept loop; returns when the node stops.
pub(crate) fn accept_loop(listener: TcpListener, shared: Arc<NodeShared>) {
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::error!("listener: {e}: no connection will be accepted");
        return;
    }
    // SAFETY: plain syscall; checked.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        tracing::error!(
            "epoll_create1: {}: no connection will be accepted",
            io::Error::last_os_error()
        );
        return;
    }
    // SAFETY: a fresh descriptor.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    ctl(
        &ep,
        libc::EPOLL_CTL_ADD,
        listener.as_raw_fd(),
        TOKEN_LISTENER,
    );
    let mut door = Door {
        shared,
        pending: Vec::new(),
        free: Vec::new(),
        per_ip: HashMap::new(),
        count: 0,
        quiet: Quiet {
            last: None,
            hidden: 0,
        },
    };
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
    loop {
        if door.shared.stopping.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: `events` is a valid buffer of its length.
        let n = unsafe {
            libc::epoll_wait(
                ep.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                100,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!("acceptor epoll_wait: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        for ev in &events[..n as usize] {
            if ev.u64 == TOKEN_LISTENER {
                door.accept_all(&listener, &ep);
            } else {
                door.progress(ev.u64 as usize, &ep);
            }
        }
        door.expire(&ep);
    }
}

fn ctl(ep: &OwnedFd, op: libc::c_int, fd: i32, token: u64) {
    ctl_events(ep, op, fd, token, libc::EPOLLIN as u32);
}

fn ctl_events(ep: &OwnedFd, op: libc::c_int, fd: i32, token: u64, events: u32) {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: valid descriptors and event struct.
    unsafe { libc::epoll_ctl(ep.as_raw_fd(), op, fd, &mut ev) };
}

struct Door {
    shared: Arc<NodeShared>,
    pending: Vec<Option<Pending>>,
    free: Vec<usize>,
    per_ip: HashMap<IpAddr, usize>,
    count: usize,
    quiet: Quiet,
}

impl Door {
    fn accept_all(&mut self, listener: &TcpListener, ep: &OwnedFd) {
        loop {
            let (stream, addr) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: leave the rest in the backlog.
                    tracing::warn!("accept: {e}");
                    return;
                }
            };
            if self.shared.stopping.load(Ordering::Acquire) {
                return;
            }
            let ip = addr.ip();
            if self.count >= HANDSHAKES_MAX
                || self.per_ip.get(&ip).copied().unwrap_or(0) >= HANDSHAKES_PER_IP_MAX
            {
                self.quiet
                    .warn(ip, "too many connections in their handshake");
                continue;
            }
            let Some(ticket) = ConnLimits::admit(&self.shared, ip) else {
                self.quiet.warn(ip, "connection limit reached");
                continue;
            };
            self.start(stream, ticket, ep);
        }
    }

    fn start(&mut self, mut stream: TcpStream, ticket: ConnTicket, ep: &OwnedFd) {
        let ip = ticket.ip;
        if stream.set_nonblocking(true).is_err() || stream.set_nodelay(true).is_err() {
            return;
        }
        let nonce = random_nonce();
        let tls = match self.shared.tls.as_ref().and_then(|t| t.server.clone()) {
            Some(config) => match rustls::ServerConnection::new(config) {
                Ok(c) => Some(Box::new(rustls::Connection::Server(c))),
                Err(e) => {
                    self.quiet.warn(ip, &format!("cannot start TLS: {e}"));
                    return;
                }
            },
            None => {
                // A fresh socket's send buffer takes 128 bytes whole.
                if !matches!(stream.write(&challenge(&nonce)), Ok(n) if n == HEADER_BYTES + NONCE_BYTES)
                {
                    return;
                }
                None
            }
        };
        let p = Pending {
            stream,
            challenged: tls.is_none(),
            tls_in: 0,
            tls,
            want_out: false,
            ticket,
            nonce,
            buf: [0; HEADER_BYTES + HelloProof::MAX_BYTES],
            got: 0,
            need: HEADER_BYTES,
            deadline: Instant::now() + HANDSHAKE_TIMEOUT,
        };
        let fd = p.stream.as_raw_fd();
        let i = match self.free.pop() {
            Some(i) => {
                self.pending[i] = Some(p);
                i
            }
            None => {
                self.pending.push(Some(p));
                self.pending.len() - 1
            }
        };
        *self.per_ip.entry(ip).or_default() += 1;
        self.count += 1;
        ctl(ep, libc::EPOLL_CTL_ADD, fd, i as u64);
    }

    /// Takes slot `i` out of the handshake set.
    fn take(&mut self, i: usize, ep: &OwnedFd) -> Option<Pending> {
        let p = self.pending.get_mut(i)?.take()?;
        ctl(ep, libc::EPOLL_CTL_DEL, p.stream.as_raw_fd(), 0);
        self.free.push(i);
        self.count -= 1;
        if let Some(n) = self.per_ip.get_mut(&p.ticket.ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&p.ticket.ip);
            }
        }
        Some(p)
    }

    fn refuse(&mut self, i: usize, ep: &OwnedFd, why: &str, answer: Option<(Header, Status)>) {
        let Some(mut p) = self.take(i, ep) else {
            return;
        };
        if let Some((hello, status)) = answer {
            p.send(&Header::response_to(&hello, status).encode());
        }
        self.quiet.warn(p.ticket.ip, why);
    }

    fn progress(&mut self, i: usize, ep: &OwnedFd) {
        let dir = self.shared.tls.as_ref().map(|t| t.dir.clone());
        let Some(Some(p)) = self.pending.get_mut(i) else {
            return;
        };
        loop {
            if let Some(dir) = &dir {
                match p.tls_step(dir) {
                    Step::Read(n) => p.got += n,
                    Step::Refuse(why) => return self.refuse(i, ep, &why, None),
                    Step::Wait => {
                        // Records the socket did not take wait for EPOLLOUT.
                        let out = p.tls.as_ref().is_some_and(|t| t.wants_write());
                        if out != p.want_out {
                            p.want_out = out;
                            let mut bits = libc::EPOLLIN as u32;
                            if out {
                                bits |= libc::EPOLLOUT as u32;
                            }
                            ctl_events(
                                ep,
                                libc::EPOLL_CTL_MOD,
                                p.stream.as_raw_fd(),
                                i as u64,
                                bits,
                            );
                        }
                        return;
                    }
                }
            } else {
                match p.stream.read(&mut p.buf[p.got..p.need]) {
                    Ok(0) => return self.refuse(i, ep, "closed during the handshake", None),
                    Ok(n) => p.got += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return self.refuse(i, ep, "socket error during the handshake", None),
                }
            }
            if p.got < p.need {
                continue;
            }
            let h = match decode_header(&p.buf[..HEADER_BYTES]) {
                Ok(Some(h)) => h,
                Ok(None) => unreachable!("a whole header was read"),
                Err(e) => {
                    let why = format!("bad first frame: {e}");
                    return self.refuse(i, ep, &why, None);
                }
            };
            if h.kind != Kind::Request || h.op != Op::Hello {
                return self.refuse(
                    i,
                    ep,
                    "first frame is not a Hello",
                    Some((h, Status::Unauthorized)),
                );
            }
            let len = h.payload_bytes as usize;
            if !(HelloProof::NODE_BYTES..=HelloProof::MAX_BYTES).contains(&len) {
                return self.refuse(
                    i,
                    ep,
                    "Hello without a credential",
                    Some((h, Status::Unauthorized)),
                );
            }
            if p.need == HEADER_BYTES {
                p.need = HEADER_BYTES + len;
                continue;
            }
            return self.finish(i, ep, h);
        }
    }

    fn finish(&mut self, i: usize, ep: &OwnedFd, h: Header) {
        let Some(mut p) = self.take(i, ep) else {
            return;
        };
        let checked = self.check(&p, &h);
        let (peer, answer_key, peer_nonce) = match checked {
            Ok(x) => x,
            Err((why, status)) => {
                p.send(&Header::response_to(&h, status).encode());
                self.quiet.warn(p.ticket.ip, &why);
                return;
            }
        };
        let shard = h.offset as usize;
        let answer = HelloProof::answer(&answer_key, &p.nonce, &peer_nonce);
        let wire = match p.tls.take() {
            Some(tls) => Wire::Tls(tls),
            None => Wire::Plain,
        };
        self.shared.hub.shards[shard].send(ShardMsg::Conn(Box::new(Handshaken {
            stream: p.stream,
            conn: Adopted {
                wire,
                hello: h,
                peer,
                node_nonce: p.nonce,
                answer,
                ticket: Some(p.ticket),
            },
        })));
    }

    /// Checks a whole Hello: who the peer is, the key the node answers
    /// with, and the peer's nonce; or why not.
    fn check(&self, p: &Pending, h: &Header) -> Result<(Peer, Key, Nonce), (String, Status)> {
        let payload = &p.buf[HEADER_BYTES..p.need];
        if h.verify_payload([payload]).is_err() {
            return Err(("corrupt Hello".into(), Status::Invalid));
        }
        if h.offset >= self.shared.shards as u64 {
            return Err((
                format!(
                    "Hello names shard {} of a node with {}",
                    h.offset, self.shared.shards
                ),
                Status::Invalid,
            ));
        }
        if self.shared.insecure_no_auth {
            // Benchmarks of the authentication's cost only: the proof is
            // not checked and the peer may do anything; the node still
            // answers with the key the peer expects.
            let mut nonce = [0u8; NONCE_BYTES];
            if let Some(n) = payload.get(..NONCE_BYTES) {
                nonce.copy_from_slice(n);
            }
            let key = payload
                .get(HelloProof::NODE_BYTES..)
                .and_then(|c| Capability::decode(c).ok())
                .map_or(self.shared.data_key, |c| {
                    c.attachment_key(&self.shared.data_key)
                });
            return Ok((Peer::Node { id: h.volume }, key, nonce));
        }
        let (peer, nonce) = HelloProof::check(
            payload,
            &self.shared.data_key,
            &p.nonce,
            h.offset as u16,
            h.volume,
            false,
            crate::unix_ms(),
        )
        .map_err(|e| (format!("credential refused: {e}"), Status::Unauthorized))?;
        Ok((peer, peer.key(&self.shared.data_key), nonce))
    }

    fn expire(&mut self, ep: &OwnedFd) {
        let now = Instant::now();
        for i in 0..self.pending.len() {
            let Some(p) = self.pending[i].as_ref() else {
                continue;
            };
            if p.deadline > now {
                continue;
            }
            let why = match &p.tls {
                Some(_) if p.tls_in == 0 => {
                    format!("nothing received within the handshake deadline (HANDSHAKE_TIMEOUT): {PLAIN_PEER}")
                }
                Some(tls) if tls.is_handshaking() => {
                    "TLS handshake not completed in time (HANDSHAKE_TIMEOUT)".to_string()
                }
                _ => "handshake not completed in time (HANDSHAKE_TIMEOUT)".to_string(),
            };
            self.refuse(i, ep, &why, None);
        }
    }
}
