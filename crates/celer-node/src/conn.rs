//! One TCP connection of a shard: nonblocking socket, a receive buffer that
//! frames are parsed from in place, a send buffer, and who the peer proved
//! to be.
//!
//! Buffers are per connection and reused: after warm-up a 4 KiB request
//! allocates nothing. Payloads are copied once on each side (socket buffer →
//! the op's aligned buffer for O_DIRECT; the op's buffer → send buffer):
//! a 4 KiB memcpy costs ~0.1 µs against a ~10 µs loopback round trip.
//!
//! Memory is bounded: the receive buffer starts at [`RBUF_INITIAL`] and
//! never grows by itself; a frame larger than it asks the shard for room
//! ([`Next::Grow`]), which the shard grants from a budget; the room is kept
//! for the next large frame until the budget runs short, then taken back
//! from connections that hold no partial frame ([`Conn::shrink`]). The send buffer is bounded by
//! the shard, which stops reading a connection whose responses are not
//! being read ([`SEND_HIGH_BYTES`]).
//!
//! With data TLS ([`Wire::Tls`]) `fill` and `flush` go through rustls:
//! one more copy each way (plaintext into and out of rustls's buffers) and
//! rustls's allocation per record. A plain connection takes the same path
//! as without TLS: one match on the enum per socket call, nothing more.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use celer_proto::auth::{Capability, Nonce};
use celer_proto::{decode_header, FrameError, Header, HEADER_BYTES};

use crate::handshake::ConnTicket;

/// Receive buffer of every connection: holds many small frames; a larger
/// frame borrows room from the shard's budget while it is received.
pub(crate) const RBUF_INITIAL: usize = 64 << 10;
/// Unsent response bytes above which the shard stops reading requests from
/// the connection, until they fall below [`SEND_LOW_BYTES`].
pub(crate) const SEND_HIGH_BYTES: usize = 1 << 20;
pub(crate) const SEND_LOW_BYTES: usize = 256 << 10;

/// Who the peer is.
pub(crate) enum ConnAuth {
    /// Inbound: a storage node proved the data key.
    Node,
    /// Inbound: a client proved the key of this capability.
    Attachment {
        cap: Capability,
        /// The handshake's values, which a `Renew` proof is bound to.
        node_nonce: Nonce,
        shard: u16,
        sender: u64,
    },
    /// Outbound to a node: waiting for its Challenge; output is held.
    AwaitChallenge,
    /// Outbound: our Hello is queued; waiting for the node's proof.
    AwaitAnswer {
        node_nonce: Nonce,
        peer_nonce: Nonce,
    },
    /// Outbound: the node proved the data key.
    Verified,
}

/// What the socket carries: celer-proto frames as they are, or inside TLS.
pub(crate) enum Wire {
    Plain,
    Tls(Box<rustls::Connection>),
}

pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) wire: Wire,
    /// Bumped each time the slot is reused, so stale references are noticed.
    pub(crate) gen: u32,
    pub(crate) rbuf: Vec<u8>,
    /// Valid bytes are rbuf[rstart..rend].
    rstart: usize,
    rend: usize,
    pub(crate) wbuf: Vec<u8>,
    wpos: usize,
    pub(crate) auth: ConnAuth,
    /// Outbound connection to (node, shard), for forwarding and backfill.
    pub(crate) peer: Option<(u32, u16)>,
    /// Whether EPOLLOUT is armed.
    pub(crate) want_out: bool,
    /// Whether EPOLLIN is armed (off while reading is paused).
    pub(crate) want_in: bool,
    /// Reading paused: its responses are not being read.
    pub(crate) send_blocked: bool,
    /// Reading paused: its next frame needs room the budget lacks.
    pub(crate) starved: bool,
    /// Bytes of the receive buffer above RBUF_INITIAL, taken from the
    /// shard's budget.
    pub(crate) borrowed: usize,
    /// Requests of this connection being served.
    pub(crate) ops: usize,
    /// Since when a frame's header is in but not its whole payload.
    pub(crate) partial_since: Option<Instant>,
    /// When the peer last sent anything (the idle timeout).
    pub(crate) last_input: Instant,
    /// Its place in the node's connection counts (inbound).
    pub(crate) _ticket: Option<ConnTicket>,
}

/// A complete frame at the head of the receive buffer.
pub(crate) struct Frame {
    pub(crate) header: Header,
    /// Payload position in `rbuf`.
    pub(crate) at: usize,
}

/// What the receive buffer holds next.
pub(crate) enum Next {
    Frame(Frame),
    /// Read more.
    More,
    /// A frame of this many bytes (header and payload) does not fit: ask
    /// the budget for room, then call [`Conn::grow`].
    Grow(usize),
}

impl Conn {
    pub(crate) fn new(
        stream: TcpStream,
        wire: Wire,
        gen: u32,
        peer: Option<(u32, u16)>,
        auth: ConnAuth,
        ticket: Option<ConnTicket>,
    ) -> Conn {
        Conn {
            stream,
            wire,
            gen,
            rbuf: vec![0; RBUF_INITIAL],
            rstart: 0,
            rend: 0,
            wbuf: Vec::with_capacity(RBUF_INITIAL),
            wpos: 0,
            auth,
            peer,
            want_out: false,
            want_in: true,
            send_blocked: false,
            starved: false,
            borrowed: 0,
            ops: 0,
            partial_since: None,
            last_input: Instant::now(),
            _ticket: ticket,
        }
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Reads what the socket has, as far as the buffer holds. Ok(false): the
    /// peer closed.
    pub(crate) fn fill(&mut self) -> io::Result<bool> {
        loop {
            if self.rend == self.rbuf.len() {
                if self.rstart == 0 {
                    // Full: the frames in it are handled first.
                    return Ok(true);
                }
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            }
            let got = match &mut self.wire {
                Wire::Plain => self.stream.read(&mut self.rbuf[self.rend..]),
                Wire::Tls(tls) => {
                    celer_tls::wire::read_plain(tls, &mut self.stream, &mut self.rbuf[self.rend..])
                }
            };
            match got {
                Ok(0) => return Ok(false),
                Ok(n) => self.rend += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The next complete frame, if one has arrived (payload crc checked).
    pub(crate) fn next_frame(&mut self) -> Result<Next, FrameError> {
        let avail = &self.rbuf[self.rstart..self.rend];
        let Some(header) = decode_header(avail)? else {
            return Ok(Next::More);
        };
        let total = HEADER_BYTES + header.payload_bytes as usize;
        if avail.len() < total {
            if self.partial_since.is_none() {
                self.partial_since = Some(Instant::now());
            }
            if self.rbuf.len() - self.rstart < total {
                // Make room for the whole frame.
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
                if self.rbuf.len() < total {
                    return Ok(Next::Grow(total));
                }
            }
            return Ok(Next::More);
        }
        self.partial_since = None;
        let at = self.rstart + HEADER_BYTES;
        header.verify_payload([&self.rbuf[at..at + header.payload_bytes as usize]])?;
        Ok(Next::Frame(Frame { header, at }))
    }

    /// Room for a frame of `total` bytes (the shard granted it).
    pub(crate) fn grow(&mut self, total: usize) {
        self.rbuf.resize(total, 0);
        self.borrowed = total.saturating_sub(RBUF_INITIAL);
    }

    /// Drops the frame returned by `next_frame`.
    pub(crate) fn consume(&mut self, f: &Frame) {
        self.rstart = f.at + f.header.payload_bytes as usize;
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        }
    }

    /// Gives back borrowed room if what the buffer holds fits in the usual
    /// size; returns the bytes given back. (Room is kept between large
    /// frames, so a stream of them allocates nothing, until the budget
    /// runs short: see the shard's `reclaim`.)
    pub(crate) fn shrink(&mut self) -> usize {
        if self.borrowed == 0 || self.rend - self.rstart > RBUF_INITIAL {
            return 0;
        }
        self.rbuf.copy_within(self.rstart..self.rend, 0);
        self.rend -= self.rstart;
        self.rstart = 0;
        self.rbuf.truncate(RBUF_INITIAL);
        self.rbuf.shrink_to_fit();
        std::mem::take(&mut self.borrowed)
    }

    pub(crate) fn payload(&self, f: &Frame) -> &[u8] {
        &self.rbuf[f.at..f.at + f.header.payload_bytes as usize]
    }

    /// Queues a frame: header (payload length and crc set from `payload`).
    pub(crate) fn queue(&mut self, h: Header, payload: &[&[u8]]) {
        let h = h.with_payload(payload.iter().copied());
        self.wbuf.extend_from_slice(&h.encode());
        for p in payload {
            self.wbuf.extend_from_slice(p);
        }
    }

    /// Puts a frame before everything queued (the Hello of an outbound
    /// connection, once the node's Challenge came; nothing was sent yet).
    pub(crate) fn queue_first(&mut self, h: Header, payload: &[u8]) {
        let h = h.with_payload([payload]);
        let mut first = h.encode().to_vec();
        first.extend_from_slice(payload);
        self.wbuf.splice(self.wpos..self.wpos, first);
    }

    /// Response bytes not sent yet.
    pub(crate) fn unsent(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    pub(crate) fn has_output(&self) -> bool {
        (!matches!(self.auth, ConnAuth::AwaitChallenge) && self.wpos < self.wbuf.len())
            || matches!(&self.wire, Wire::Tls(t) if t.wants_write())
    }

    /// Whether TLS holds received bytes the socket no longer signals: read
    /// them before waiting for the socket.
    pub(crate) fn tls_buffered(&mut self) -> bool {
        match &mut self.wire {
            Wire::Plain => false,
            Wire::Tls(tls) => celer_tls::wire::has_plaintext(tls),
        }
    }

    /// Reads what TLS holds beyond the receive buffer (see
    /// [`Conn::tls_buffered`]); whether it added bytes. Always false for a
    /// plain connection.
    pub(crate) fn pull_buffered(&mut self) -> io::Result<bool> {
        if !self.tls_buffered() {
            return Ok(false);
        }
        let before = self.rend - self.rstart;
        self.fill()?;
        Ok(self.rend - self.rstart > before)
    }

    /// Sends what the socket takes. Err: the connection is broken.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        if let Wire::Tls(tls) = &mut self.wire {
            // The TLS handshake goes on while our Hello waits for the
            // node's Challenge.
            match celer_tls::wire::send_pending(tls, &mut self.stream) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        if matches!(self.auth, ConnAuth::AwaitChallenge) {
            return Ok(());
        }
        while self.wpos < self.wbuf.len() {
            let sent = match &mut self.wire {
                Wire::Plain => self.stream.write(&self.wbuf[self.wpos..]),
                Wire::Tls(tls) => celer_tls::wire::write_plain(
                    tls,
                    &mut self.stream,
                    &[io::IoSlice::new(&self.wbuf[self.wpos..])],
                ),
            };
            match sent {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        if self.wbuf.capacity() > SEND_HIGH_BYTES {
            // A burst of large responses is over: give the room back.
            self.wbuf.shrink_to(RBUF_INITIAL);
        }
        Ok(())
    }
}
