//! One TCP connection of a shard: nonblocking socket, a receive buffer that
//! frames are parsed from in place, a send buffer, and who the peer proved
//! to be.
//!
//! Buffers are per connection and reused: after warm-up a 4 KiB request
//! allocates nothing. A 4 KiB payload lands in place: when the receive
//! buffer is empty (between frames) the socket is read with `readv` into
//! the header's room, then a one-block aligned *landing* buffer, then the
//! rest of the receive buffer. If the header announces a 4 KiB payload, the
//! payload is in the landing buffer, which the shard swaps into the request
//! (`Conn::swap_landing`: no copy between the socket and the disk); if not,
//! the bytes are put back in stream order (a copy, as before). Other
//! payloads (larger writes, payloads that came behind other frames in one
//! read) are copied once from the receive buffer into the op's aligned
//! buffer; responses are copied once into the send buffer.
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
use std::time::Instant;

use celer_engine::{AlignedBuf, BLOCK_SIZE};
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

/// `S`: the byte stream (a nonblocking `TcpStream` in production; see
/// `crate::net::Net`).
pub(crate) struct Conn<S> {
    pub(crate) stream: S,
    pub(crate) wire: Wire,
    /// Bumped each time the slot is reused, so stale references are noticed.
    pub(crate) gen: u32,
    pub(crate) rbuf: Vec<u8>,
    /// Valid bytes are rbuf[rstart..rend].
    rstart: usize,
    rend: usize,
    /// Where the next 4 KiB payload lands (plain wire only).
    landing: Option<AlignedBuf>,
    /// The frame at the head of `rbuf` (its header at `rbuf[0..HEADER_BYTES]`)
    /// has its payload in `landing`: this many bytes of it so far. The
    /// stream is then `rbuf[..HEADER_BYTES]`, `landing[..landed]`,
    /// `rbuf[HEADER_BYTES..rend]`, and the bytes after the header in
    /// `rbuf` exist only once the payload is whole.
    landed: Option<usize>,
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
    /// The payload is in the landing buffer, not in `rbuf`.
    pub(crate) landed: bool,
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

impl<S: Read + Write> Conn<S> {
    /// `landing`: a one-block buffer payloads may land in (used on a plain
    /// wire only; given back by [`Conn::take_landing`] when it closes).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        stream: S,
        wire: Wire,
        gen: u32,
        peer: Option<(u32, u16)>,
        auth: ConnAuth,
        ticket: Option<ConnTicket>,
        landing: AlignedBuf,
        now: Instant,
    ) -> Conn<S> {
        debug_assert_eq!(landing.len(), BLOCK_SIZE);
        Conn {
            stream,
            wire,
            gen,
            rbuf: vec![0; RBUF_INITIAL],
            rstart: 0,
            rend: 0,
            landing: Some(landing),
            landed: None,
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
            last_input: now,
            _ticket: ticket,
        }
    }

    /// Reads what the socket has, as far as the buffer holds. Ok(false): the
    /// peer closed.
    pub(crate) fn fill(&mut self) -> io::Result<bool> {
        loop {
            let got = if let Some(landed) = self.landed.filter(|&n| n < BLOCK_SIZE) {
                // The rest of a landing payload goes where it belongs.
                let landing = self.landing.as_mut().expect("landing while landed");
                match self.stream.read(&mut landing[landed..BLOCK_SIZE]) {
                    Ok(n) if n > 0 => {
                        self.landed = Some(landed + n);
                        continue;
                    }
                    other => other,
                }
            } else if self.can_land() {
                match self.read_landing() {
                    Ok(n) if n > 0 => continue,
                    other => other,
                }
            } else {
                if self.rend == self.rbuf.len() {
                    if self.rstart == 0 {
                        // Full: the frames in it are handled first.
                        return Ok(true);
                    }
                    self.rbuf.copy_within(self.rstart..self.rend, 0);
                    self.rend -= self.rstart;
                    self.rstart = 0;
                }
                match &mut self.wire {
                    Wire::Plain => self.stream.read(&mut self.rbuf[self.rend..]),
                    Wire::Tls(tls) => celer_tls::wire::read_plain(
                        tls,
                        &mut self.stream,
                        &mut self.rbuf[self.rend..],
                    ),
                }
                .inspect(|&n| self.rend += n)
            };
            match got {
                Ok(0) => return Ok(false),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Between frames on a plain wire, with the landing buffer here and
    /// room to put landed bytes back in `rbuf` if they are not a payload.
    fn can_land(&self) -> bool {
        self.rstart == self.rend
            && self.landed.is_none()
            && self.landing.is_some()
            && matches!(self.wire, Wire::Plain)
            && self.rbuf.len() >= HEADER_BYTES + 2 * BLOCK_SIZE
    }

    /// One `readv`: a header's room, the landing buffer, the rest of the
    /// receive buffer (less one block, kept to put landed bytes back).
    /// Returns the bytes read.
    fn read_landing(&mut self) -> io::Result<usize> {
        self.rstart = 0;
        self.rend = 0;
        let landing = self.landing.as_mut().expect("can_land");
        let (head, rest) = self.rbuf.split_at_mut(HEADER_BYTES);
        let rest_len = rest.len() - BLOCK_SIZE;
        let mut iov = [
            io::IoSliceMut::new(head),
            io::IoSliceMut::new(&mut landing[..BLOCK_SIZE]),
            io::IoSliceMut::new(&mut rest[..rest_len]),
        ];
        let n = self.stream.read_vectored(&mut iov)?;
        if n <= HEADER_BYTES {
            self.rend = n;
            return Ok(n);
        }
        let in_landing = (n - HEADER_BYTES).min(BLOCK_SIZE);
        let after = n - HEADER_BYTES - in_landing;
        let payload_here = matches!(
            decode_header(&self.rbuf[..HEADER_BYTES]),
            Ok(Some(h)) if h.payload_bytes as usize == BLOCK_SIZE
        );
        if payload_here {
            self.landed = Some(in_landing);
            self.rend = HEADER_BYTES + after;
        } else {
            // Not a 4 KiB payload (or not a valid header: `next_frame`
            // says so): the bytes go back in stream order.
            let landing = self.landing.as_ref().expect("can_land");
            self.rbuf.copy_within(
                HEADER_BYTES..HEADER_BYTES + after,
                HEADER_BYTES + in_landing,
            );
            self.rbuf[HEADER_BYTES..HEADER_BYTES + in_landing]
                .copy_from_slice(&landing[..in_landing]);
            self.rend = n;
        }
        Ok(n)
    }

    /// The next complete frame, if one has arrived (payload crc checked).
    /// `now` starts the frame deadline of a partial frame.
    pub(crate) fn next_frame(&mut self, now: Instant) -> Result<Next, FrameError> {
        if let Some(landed) = self.landed {
            let header = decode_header(&self.rbuf[..HEADER_BYTES])?
                .expect("a landing frame's header is whole");
            if landed < BLOCK_SIZE {
                if self.partial_since.is_none() {
                    self.partial_since = Some(now);
                }
                return Ok(Next::More);
            }
            self.partial_since = None;
            let landing = self.landing.as_ref().expect("landing while landed");
            header.verify_payload([&landing[..BLOCK_SIZE]])?;
            return Ok(Next::Frame(Frame {
                header,
                at: HEADER_BYTES,
                landed: true,
            }));
        }
        let avail = &self.rbuf[self.rstart..self.rend];
        let Some(header) = decode_header(avail)? else {
            return Ok(Next::More);
        };
        let total = HEADER_BYTES + header.payload_bytes as usize;
        if avail.len() < total {
            if self.partial_since.is_none() {
                self.partial_since = Some(now);
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
        Ok(Next::Frame(Frame {
            header,
            at,
            landed: false,
        }))
    }

    /// Room for a frame of `total` bytes (the shard granted it).
    pub(crate) fn grow(&mut self, total: usize) {
        self.rbuf.resize(total, 0);
        self.borrowed = total.saturating_sub(RBUF_INITIAL);
    }

    /// Drops the frame returned by `next_frame`.
    pub(crate) fn consume(&mut self, f: &Frame) {
        if f.landed {
            // The payload was never in rbuf: what follows the header is the
            // next frame.
            self.landed = None;
            self.rstart = f.at;
        } else {
            self.rstart = f.at + f.header.payload_bytes as usize;
        }
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
        match (&self.landing, f.landed) {
            (Some(l), true) => &l[..BLOCK_SIZE],
            _ => &self.rbuf[f.at..f.at + f.header.payload_bytes as usize],
        }
    }

    /// The frame's payload into `buf` without a copy when it landed in the
    /// landing buffer and `buf` is one block: the two buffers swap (the
    /// connection keeps `buf`'s old memory for the next payload). Else a
    /// copy into `buf`'s start. Call once per frame, before `consume`.
    pub(crate) fn payload_into(&mut self, f: &Frame, buf: &mut AlignedBuf) {
        match &mut self.landing {
            Some(l) if f.landed && buf.len() == BLOCK_SIZE => std::mem::swap(l, buf),
            _ => {
                let p = self.payload(f);
                buf[..p.len()].copy_from_slice(p);
            }
        }
    }

    /// The landing buffer, for reuse by another connection (this one is
    /// closing).
    pub(crate) fn take_landing(&mut self) -> Option<AlignedBuf> {
        self.landed = None;
        self.landing.take()
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

#[cfg(test)]
mod tests {
    use super::*;
    use celer_proto::{Kind, Op};
    use proptest::prelude::*;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    fn pair() -> (TcpStream, Conn<TcpStream>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let tx = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (rx, _) = l.accept().expect("accept");
        rx.set_nonblocking(true).expect("nonblocking");
        tx.set_nodelay(true).expect("nodelay");
        let conn = Conn::new(
            rx,
            Wire::Plain,
            1,
            None,
            ConnAuth::Node,
            None,
            AlignedBuf::new(1),
            Instant::now(),
        );
        (tx, conn)
    }

    fn frame(id: u32, payload: &[u8]) -> Vec<u8> {
        let h = Header::request(Op::Write, id).with_payload([payload]);
        let mut out = h.encode().to_vec();
        out.extend_from_slice(payload);
        out
    }

    fn payload(id: u32, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32 ^ id.wrapping_mul(2654435761)) as u8)
            .collect()
    }

    /// Reads frames until `want` came (or the peer closed), as the shard
    /// does (growing for large frames). Returns (request id, payload, landed).
    fn receive(conn: &mut Conn<TcpStream>, want: usize) -> Vec<(u32, Vec<u8>, bool)> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < want {
            assert!(
                Instant::now() < deadline,
                "stuck after {} frames",
                got.len()
            );
            let open = conn.fill().expect("fill");
            loop {
                match conn.next_frame(Instant::now()).expect("a valid stream") {
                    Next::Frame(f) => {
                        assert_eq!(f.header.kind, Kind::Request);
                        let mut buf = AlignedBuf::new(
                            (f.header.payload_bytes as usize)
                                .div_ceil(BLOCK_SIZE)
                                .max(1),
                        );
                        let before = buf.as_ptr();
                        conn.payload_into(&f, &mut buf);
                        let swapped = buf.as_ptr() != before;
                        assert_eq!(swapped, f.landed, "a landed payload swaps, no other");
                        got.push((
                            f.header.request_id,
                            buf[..f.header.payload_bytes as usize].to_vec(),
                            f.landed,
                        ));
                        conn.consume(&f);
                    }
                    Next::More => break,
                    Next::Grow(total) => conn.grow(total),
                }
            }
            if !open {
                break;
            }
        }
        got
    }

    #[test]
    fn a_4k_payload_at_a_frame_boundary_lands_in_place() {
        let (mut tx, mut conn) = pair();
        let p = payload(1, BLOCK_SIZE);
        tx.write_all(&frame(1, &p)).expect("send");
        let got = receive(&mut conn, 1);
        assert_eq!(got, vec![(1, p, true)]);
        // A header alone, then its payload in two pieces: still in place.
        let p = payload(2, BLOCK_SIZE);
        let f = frame(2, &p);
        for piece in [&f[..HEADER_BYTES + 100], &f[HEADER_BYTES + 100..]] {
            tx.write_all(piece).expect("send");
            std::thread::sleep(Duration::from_millis(5));
            conn.fill().expect("fill");
        }
        assert_eq!(receive(&mut conn, 1), vec![(2, p, true)]);
        // Not a 4 KiB payload: the bytes are put back in order.
        let (a, b) = (payload(3, 512), payload(4, BLOCK_SIZE));
        let mut two = frame(3, &a);
        two.extend(frame(4, &b));
        tx.write_all(&two).expect("send");
        let got = receive(&mut conn, 2);
        assert_eq!(got[0], (3, a, false));
        assert_eq!((got[1].0, &got[1].1), (4, &b));
    }

    #[test]
    fn a_corrupt_landed_payload_is_refused() {
        let (mut tx, mut conn) = pair();
        let mut f = frame(1, &payload(1, BLOCK_SIZE));
        f[HEADER_BYTES + 7] ^= 0x10;
        tx.write_all(&f).expect("send");
        std::thread::sleep(Duration::from_millis(20));
        conn.fill().expect("fill");
        assert!(matches!(
            conn.next_frame(Instant::now()),
            Err(FrameError::PayloadChecksum)
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any mix of frames, sent in any pieces, comes out whole and in
        /// order, whether the payloads landed in place or not.
        #[test]
        fn frames_arrive_whole_and_in_order_however_the_stream_is_cut(
            sizes in proptest::collection::vec(
                prop_oneof![Just(0usize), Just(512), Just(BLOCK_SIZE), Just(BLOCK_SIZE), Just(2 * BLOCK_SIZE), Just(70_000)],
                1..12,
            ),
            cuts in proptest::collection::vec(1usize..9000, 0..20),
        ) {
            let (mut tx, mut conn) = pair();
            let sent: Vec<(u32, Vec<u8>)> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| (i as u32, payload(i as u32, n)))
                .collect();
            let stream: Vec<u8> = sent.iter().flat_map(|(id, p)| frame(*id, p)).collect();
            let sender = std::thread::spawn(move || {
                let mut at = 0;
                for c in cuts {
                    let end = (at + c).min(stream.len());
                    tx.write_all(&stream[at..end]).expect("send");
                    at = end;
                    std::thread::sleep(Duration::from_micros(200));
                }
                tx.write_all(&stream[at..]).expect("send");
            });
            let got = receive(&mut conn, sent.len());
            sender.join().expect("sender");
            let got: Vec<(u32, Vec<u8>)> = got.into_iter().map(|(id, p, _)| (id, p)).collect();
            prop_assert_eq!(got, sent);
        }
    }
}
