//! One NBD connection: handshake, then the transmission loop.
//!
//! The loop owns the connection's device queue and a fixed set of slots
//! (one per request in flight, each with its own buffer). It sleeps in
//! poll(2) on the socket and the queue's completion fd; it reads a request
//! only when a slot is free and the bytes-in-flight budget allows, submits
//! it, and sends each reply as its completion arrives (any order).
//!
//! Invariants: a slot's buffer is neither read nor moved while the device
//! owns it (from submit until its last completion); every request gets
//! exactly one reply unless the connection dies; bytes in flight never
//! exceed `INFLIGHT_BYTES_MAX` plus one request.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use celer_device::{
    Allocation, BlockDevice, DeviceQueue, Extent, IoCompletion, IoError, IoOp, IoRequest, IoSegment,
};

use crate::admission::Ticket;
use crate::handshake::{negotiate, Negotiated, Outcome, Phase, OPTIONS_MAX};
use crate::proto::*;
use crate::tls::TlsServer;
use crate::{ConnLimits, Export};

/// Requests one connection keeps in flight.
pub(crate) const CONN_INFLIGHT_MAX: usize = 64;
/// Payload bytes one connection keeps in flight (reads and writes).
pub(crate) const INFLIGHT_BYTES_MAX: u64 = 64 << 20;
/// A slot buffer's size at start-up; grown for a bigger request and shrunk
/// back after it, so an idle connection holds `CONN_INFLIGHT_MAX` × this.
pub(crate) const SLOT_BUFFER_BYTES: usize = 128 << 10;
/// Data alignment in slot buffers (O_DIRECT devices need it).
const BUFFER_ALIGN_BYTES: usize = 4096;
/// A run of zeroes at least this long in a structured read reply goes as
/// an OFFSET_HOLE chunk (12 bytes) instead of data; shorter runs are not
/// worth a chunk header each.
pub(crate) const READ_HOLE_MIN_BYTES: usize = 64 << 10;
/// Extents one BLOCK_STATUS reply describes at most (the spec asks for at
/// most 2^20); a client asks again from where the reply ended.
pub(crate) const STATUS_EXTENTS_MAX: usize = 1 << 16;
/// BLOCK_STATUS buffers (the device's extents, the reply) larger than this
/// are given back after the reply instead of kept for the next.
const STATUS_BUFFER_KEEP_BYTES: usize = 64 << 10;
/// Bytes of an error message in a structured error chunk at most (the
/// spec: strings SHOULD be at most 256 bytes).
const ERROR_MESSAGE_MAX_BYTES: usize = 256;

/// A send that makes no progress for this long ends the connection: a
/// client that stops reading replies must not pin its thread forever.
pub(crate) const SEND_TIMEOUT_MS: u64 = 60_000;
/// A request (header or write payload) that stops arriving mid-way for this
/// long ends the connection, for the same reason. Reads start only when
/// poll(2) reports data, so an idle connection never meets it.
pub(crate) const RECEIVE_TIMEOUT_MS: u64 = 60_000;

/// A socket a connection runs on.
pub(crate) trait Stream: Read + Write + AsRawFd + Send {
    fn set_send_timeout(&self, t: Duration) -> std::io::Result<()>;
    fn set_receive_timeout(&self, t: Duration) -> std::io::Result<()>;
    /// Input already taken from the socket and waiting in the stream (TLS
    /// records decrypted ahead), which poll(2) on the socket cannot see.
    fn has_buffered_input(&mut self) -> bool {
        false
    }
}
impl Stream for std::net::TcpStream {
    fn set_send_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_write_timeout(Some(t))
    }
    fn set_receive_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))
    }
}
impl Stream for std::os::unix::net::UnixStream {
    fn set_send_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_write_timeout(Some(t))
    }
    fn set_receive_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))
    }
}

/// The stream during the handshake: every read and write may take only
/// what is left of one deadline for the whole handshake, so a client that
/// trickles bytes cannot stretch it.
pub(crate) struct HandshakeDeadline<'a, S: Stream> {
    pub(crate) s: &'a mut S,
    pub(crate) deadline: Instant,
    pub(crate) timeout: Duration,
}

impl<S: Stream> HandshakeDeadline<'_, S> {
    fn expired(&self) -> std::io::Error {
        std::io::Error::new(
            ErrorKind::TimedOut,
            format!(
                "handshake not finished within {} ms",
                self.timeout.as_millis()
            ),
        )
    }
    /// Time left, or the timeout error.
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.expired());
        }
        Ok(left)
    }
    /// A socket timeout (EAGAIN after SO_RCVTIMEO/SO_SNDTIMEO) is the deadline.
    fn map<T>(&self, r: std::io::Result<T>) -> std::io::Result<T> {
        r.map_err(|e| match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => self.expired(),
            _ => e,
        })
    }
}

impl<S: Stream> Read for HandshakeDeadline<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.s.set_receive_timeout(self.left()?)?;
        let r = self.s.read(buf);
        self.map(r)
    }
}

impl<S: Stream> Write for HandshakeDeadline<'_, S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.s.set_send_timeout(self.left()?)?;
        let r = self.s.write(buf);
        self.map(r)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("device queue: {0}")]
    Device(#[from] IoError),
    #[error("idle for {} ms with no request in flight (idle timeout)", .0.as_millis())]
    Idle(Duration),
}

/// What a connection needs besides its socket.
pub(crate) struct ConnContext<'a> {
    pub(crate) peer: &'a str,
    pub(crate) index: usize,
    pub(crate) device: &'a dyn BlockDevice,
    pub(crate) export: &'a Export,
    pub(crate) limits: &'a ConnLimits,
    /// TLS credentials, if the server has them.
    pub(crate) tls: Option<&'a TlsServer>,
    /// Options other than STARTTLS are refused before TLS.
    pub(crate) tls_required: bool,
}

pub(crate) fn run<S: Stream>(mut s: S, cx: &ConnContext<'_>, mut ticket: Ticket) {
    let (peer, index) = (cx.peer, cx.index);
    let timeout = cx.limits.handshake_timeout;
    let deadline = Instant::now() + timeout;
    let mut no_zeroes = false;
    let mut options_left = OPTIONS_MAX;
    let mut negotiated = Negotiated::default();
    let phase = if cx.tls_required {
        Phase::TlsRequired
    } else {
        Phase::Plain {
            tls_offered: cx.tls.is_some(),
        }
    };
    let outcome = negotiate(
        &mut HandshakeDeadline {
            s: &mut s,
            deadline,
            timeout,
        },
        cx.export,
        phase,
        &mut no_zeroes,
        &mut options_left,
        &mut negotiated,
    );
    let result = match (outcome, cx.tls) {
        (Ok(Outcome::StartTls), Some(tls)) => match tls.accept(s, deadline, timeout) {
            Ok((mut s, identity)) => {
                let phase = if identity.denied.is_some() {
                    Phase::Denied
                } else {
                    Phase::Tls
                };
                match &identity.subject {
                    Some(subject) if phase == Phase::Tls => tracing::info!(
                        peer,
                        connection = index,
                        %subject,
                        "NBD client authenticated (TLS client certificate)"
                    ),
                    Some(_) => {}
                    None => tracing::info!(
                        peer,
                        connection = index,
                        "NBD connection on TLS (no client certificate asked)"
                    ),
                }
                let outcome = negotiate(
                    &mut HandshakeDeadline {
                        s: &mut s,
                        deadline,
                        timeout,
                    },
                    cx.export,
                    phase,
                    &mut no_zeroes,
                    &mut options_left,
                    &mut negotiated,
                );
                s.end_deadline();
                match identity.denied {
                    // Told why (NBD_REP_ERR_POLICY); never served.
                    Some(why) => Err(ConnError::Tls(why)),
                    None => serve(s, outcome, negotiated, cx, &mut ticket),
                }
            }
            Err(e) => Err(e),
        },
        (Ok(Outcome::StartTls), None) => Err(ConnError::Protocol(
            "STARTTLS acknowledged without TLS credentials (internal)".into(),
        )),
        (outcome, _) => serve(s, outcome, negotiated, cx, &mut ticket),
    };
    drop(ticket);
    match result {
        Ok(()) => tracing::info!(peer, connection = index, "NBD connection closed"),
        Err(ConnError::Io(e)) if e.kind() == ErrorKind::UnexpectedEof => tracing::warn!(
            peer,
            connection = index,
            "NBD client went away mid-message (truncated frame); connection closed"
        ),
        // SO_RCVTIMEO/SO_SNDTIMEO expired (EAGAIN) after the handshake.
        Err(ConnError::Io(e)) if e.kind() == ErrorKind::WouldBlock => tracing::warn!(
            peer,
            connection = index,
            "NBD client stopped sending a request or reading replies for {} s; connection closed",
            RECEIVE_TIMEOUT_MS.max(SEND_TIMEOUT_MS) / 1000
        ),
        Err(ConnError::Tls(why)) => {
            tracing::warn!(peer, connection = index, "refusing an NBD client: {why}")
        }
        Err(e) => tracing::warn!(peer, connection = index, "NBD connection closed: {e}"),
    }
}

/// The handshake is over: leave the handshake caps, set the transmission
/// timeouts, and serve until the client leaves.
fn serve<S: Stream>(
    s: S,
    outcome: Result<Outcome, ConnError>,
    negotiated: Negotiated,
    cx: &ConnContext<'_>,
    ticket: &mut Ticket,
) -> Result<(), ConnError> {
    ticket.handshake_done();
    let timeouts = s
        .set_send_timeout(Duration::from_millis(SEND_TIMEOUT_MS))
        .and_then(|()| s.set_receive_timeout(Duration::from_millis(RECEIVE_TIMEOUT_MS)));
    if let Err(e) = timeouts {
        tracing::warn!(
            peer = cx.peer,
            connection = cx.index,
            "cannot set socket timeouts: {e}"
        );
    }
    match outcome? {
        Outcome::Transmission => {
            let queue = cx.device.open_queue(cx.index)?;
            Conn::new(
                s,
                queue,
                cx.device,
                cx.export,
                negotiated,
                cx.limits.idle_timeout,
            )
            .transmit()
        }
        Outcome::Aborted => Ok(()),
        Outcome::StartTls => Err(ConnError::Protocol("STARTTLS over TLS (internal)".into())),
    }
}

/// A payload buffer whose data starts 4 KiB-aligned with room for a reply
/// header (simple, or a structured OFFSET_DATA chunk's) just before it.
struct SlotBuffer {
    storage: Vec<u8>,
    data_off: usize,
    cap: usize,
}

impl SlotBuffer {
    fn new(cap: usize) -> SlotBuffer {
        let storage = vec![0u8; cap + 2 * BUFFER_ALIGN_BYTES];
        let mut data_off = storage.as_ptr().align_offset(BUFFER_ALIGN_BYTES);
        if data_off < DATA_CHUNK_BYTES.max(REPLY_BYTES) {
            data_off += BUFFER_ALIGN_BYTES;
        }
        assert!(data_off + cap <= storage.len());
        SlotBuffer {
            storage,
            data_off,
            cap,
        }
    }
    fn data(&mut self, len: usize) -> &mut [u8] {
        &mut self.storage[self.data_off..self.data_off + len]
    }
    /// Reply header followed by `len` data bytes.
    fn frame(&mut self, err: u32, handle: u64, len: usize) -> &[u8] {
        let h = &mut self.storage[self.data_off - REPLY_BYTES..self.data_off];
        write_reply_header(h, err, handle);
        &self.storage[self.data_off - REPLY_BYTES..self.data_off + len]
    }
    /// `header` written into the bytes just before data byte `at`,
    /// followed by `len` data bytes. The bytes it overwrites are the
    /// header room (`at` = 0) or the end of a zero run already sent as a
    /// hole chunk.
    fn chunk_frame(&mut self, at: usize, len: usize, header: &[u8; DATA_CHUNK_BYTES]) -> &[u8] {
        let start = self.data_off + at - DATA_CHUNK_BYTES;
        self.storage[start..start + DATA_CHUNK_BYTES].copy_from_slice(header);
        &self.storage[start..self.data_off + at + len]
    }
}

/// A structured reply chunk header.
fn write_chunk_header(h: &mut [u8], flags: u16, typ: u16, handle: u64, len: u32) {
    h[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&typ.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h[16..20].copy_from_slice(&len.to_be_bytes());
}

/// Whether every byte of `b` is zero (16 bytes per step).
fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(16);
    let whole = words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0);
    whole && words.remainder().iter().all(|&x| x == 0)
}

fn write_reply_header(h: &mut [u8], err: u32, handle: u64) {
    h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&err.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
}

struct Slot {
    buf: SlotBuffer,
    busy: bool,
    handle: u64,
    op: IoOp,
    /// Payload bytes (read reply / write data); counts in the budget.
    len: u32,
    /// Device requests submitted and not completed.
    parts_left: u32,
    /// Unsent range of a TRIM/WRITE_ZEROES cut into device-sized pieces.
    next_offset: u64,
    end_offset: u64,
    /// Flush after the write completes, before replying.
    fua: bool,
    /// NBD_CMD_FLAG_DF on a read: one content chunk, holes included.
    no_fragment: bool,
    error: Option<u32>,
    /// Where the device said the error is (a checksum mismatch names it).
    error_offset: Option<u64>,
    /// The first error's text, for a structured error chunk (kept, and
    /// its capacity reused).
    error_text: String,
}

struct Conn<'a, S: Stream> {
    s: S,
    queue: Box<dyn DeviceQueue>,
    device: &'a dyn BlockDevice,
    export: &'a Export,
    negotiated: Negotiated,
    /// A BLOCK_STATUS answer from the device, and its reply; reused.
    extents: Vec<Extent>,
    status_reply: Vec<u8>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Slots with pieces still to submit (device queue was full).
    pending: VecDeque<usize>,
    inflight_bytes: u64,
    disconnecting: bool,
    /// (slot, error) of the completions of one poll; reused.
    completed: Vec<(usize, Option<IoError>)>,
    /// Close after this long without a request while nothing is in flight.
    idle_timeout: Option<Duration>,
    last_request: Instant,
}

impl<'a, S: Stream> Conn<'a, S> {
    fn new(
        s: S,
        queue: Box<dyn DeviceQueue>,
        device: &'a dyn BlockDevice,
        export: &'a Export,
        negotiated: Negotiated,
        idle_timeout: Option<Duration>,
    ) -> Self {
        let n = CONN_INFLIGHT_MAX.min(queue.inflight_max()).max(1);
        let completed_max = queue.inflight_max();
        let slots = (0..n)
            .map(|_| Slot {
                buf: SlotBuffer::new(SLOT_BUFFER_BYTES),
                busy: false,
                handle: 0,
                op: IoOp::Flush,
                len: 0,
                parts_left: 0,
                next_offset: 0,
                end_offset: 0,
                fua: false,
                no_fragment: false,
                error: None,
                error_offset: None,
                error_text: String::new(),
            })
            .collect();
        Conn {
            s,
            queue,
            device,
            export,
            negotiated,
            extents: Vec::new(),
            status_reply: Vec::new(),
            slots,
            free: (0..n).rev().collect(),
            pending: VecDeque::with_capacity(n),
            inflight_bytes: 0,
            disconnecting: false,
            completed: Vec::with_capacity(completed_max),
            idle_timeout,
            last_request: Instant::now(),
        }
    }

    fn busy(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn transmit(mut self) -> Result<(), ConnError> {
        let result = self.transmit_loop();
        // Never drop buffers the device still owns: wait for what is in
        // flight even when the socket failed.
        while self.queue.inflight() > 0 {
            let mut sink = |_c: IoCompletion| {};
            if self.queue.poll(&mut sink) == 0 {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
        result
    }

    fn transmit_loop(&mut self) -> Result<(), ConnError> {
        loop {
            self.reap()?;
            if self.disconnecting && self.busy() == 0 {
                return Ok(());
            }
            if let Some(idle) = self.idle_timeout {
                if self.busy() == 0 && self.last_request.elapsed() >= idle {
                    return Err(ConnError::Idle(idle));
                }
            }
            let accepting = !self.disconnecting
                && !self.free.is_empty()
                && self.inflight_bytes < INFLIGHT_BYTES_MAX;
            if accepting && self.s.has_buffered_input() {
                self.read_request()?;
                continue;
            }
            let mut fds = [libc::pollfd {
                fd: -1,
                events: libc::POLLIN,
                revents: 0,
            }; 2];
            if accepting {
                fds[0].fd = self.s.as_raw_fd();
            }
            let cfd = self.queue.completion_fd();
            if let Some(fd) = cfd {
                fds[1].fd = fd;
            }
            // Completions without an fd show up on the next poll: don't sleep long.
            let timeout_ms = match (self.busy(), cfd) {
                (0, _) => self.idle_timeout.map_or(1000, |idle| {
                    let left = idle.saturating_sub(self.last_request.elapsed());
                    left.as_millis().clamp(1, 1000) as i32
                }),
                (_, Some(_)) => 100,
                (_, None) => 1,
            };
            // SAFETY: `fds` is a live array of two pollfds (fd -1 is ignored).
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            if let Some(fd) = cfd {
                if fds[1].revents != 0 {
                    drain_eventfd(fd);
                }
            }
            if accepting && fds[0].revents != 0 {
                self.read_request()?;
            }
        }
    }

    /// Reads one request (header and payload) and submits or answers it.
    fn read_request(&mut self) -> Result<(), ConnError> {
        let mut h = [0u8; REQUEST_BYTES];
        let got = read_full(&mut self.s, &mut h)?;
        self.last_request = Instant::now();
        if got == 0 {
            if self.busy() > 0 {
                tracing::warn!("NBD client closed the connection with requests in flight");
            } else {
                tracing::info!("NBD client closed the connection without NBD_CMD_DISC");
            }
            self.disconnecting = true;
            return Ok(());
        }
        if got < REQUEST_BYTES {
            return Err(ConnError::Protocol(format!(
                "truncated request header ({got} of {REQUEST_BYTES} bytes)"
            )));
        }
        let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let flags = u16::from_be_bytes([h[4], h[5]]);
        let cmd = u16::from_be_bytes([h[6], h[7]]);
        let handle = u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        let offset = u64::from_be_bytes([h[16], h[17], h[18], h[19], h[20], h[21], h[22], h[23]]);
        let len = u32::from_be_bytes([h[24], h[25], h[26], h[27]]);
        if magic != REQUEST_MAGIC {
            // Framing is lost: nothing after this can be parsed.
            return Err(ConnError::Protocol(format!(
                "bad request magic {magic:#010x}"
            )));
        }
        let e = self.export;
        if cmd == CMD_WRITE && len > e.max_block_bytes {
            // The payload cannot be skipped without reading it all; close.
            return Err(ConnError::Protocol(format!(
                "write of {len} bytes at {offset} exceeds the advertised maximum {} bytes",
                e.max_block_bytes
            )));
        }
        if cmd == CMD_BLOCK_STATUS {
            // Answered at once from the device's map: no slot, no payload.
            return self.block_status(flags, handle, offset, len);
        }
        let Some(si) = self.free.pop() else {
            return Err(ConnError::Protocol("no free slot (internal)".into()));
        };
        if cmd == CMD_WRITE {
            let slot = &mut self.slots[si];
            if slot.buf.cap < len as usize {
                slot.buf = SlotBuffer::new(len as usize);
            }
            let got = read_full(&mut self.s, slot.buf.data(len as usize));
            match got {
                Ok(n) if n == len as usize => {}
                Ok(n) => {
                    self.free.push(si);
                    return Err(ConnError::Protocol(format!(
                        "truncated write payload ({n} of {len} bytes)"
                    )));
                }
                Err(err) => {
                    self.free.push(si);
                    return Err(err.into());
                }
            }
        }
        let check = self.validate(flags, cmd, offset, len);
        let op = match check {
            Ok(Some(op)) => op,
            Ok(None) => {
                // NBD_CMD_DISC: no reply; finish what is in flight, then close.
                self.free.push(si);
                self.disconnecting = true;
                return Ok(());
            }
            Err((errno, why)) => {
                // A refused write may have grown the buffer: give it back.
                if self.slots[si].buf.cap > SLOT_BUFFER_BYTES {
                    self.slots[si].buf = SlotBuffer::new(SLOT_BUFFER_BYTES);
                }
                self.free.push(si);
                tracing::debug!(cmd, offset, len, errno, "NBD request refused: {why}");
                return self.refuse(handle, errno, why);
            }
        };
        let data_len = if matches!(op, IoOp::Read | IoOp::Write) {
            len
        } else {
            0
        };
        let slot = &mut self.slots[si];
        if slot.buf.cap < data_len as usize {
            slot.buf = SlotBuffer::new(data_len as usize);
        }
        slot.busy = true;
        slot.handle = handle;
        slot.op = op;
        slot.len = data_len;
        slot.parts_left = 0;
        slot.next_offset = offset;
        slot.end_offset = offset + u64::from(len);
        slot.fua = op != IoOp::Read && op != IoOp::Flush && flags & CMD_FLAG_FUA != 0;
        slot.no_fragment = flags & CMD_FLAG_DF != 0;
        slot.error = None;
        slot.error_offset = None;
        self.inflight_bytes += u64::from(data_len);
        self.pending.push_back(si);
        self.submit_pending()
    }

    /// Replies with an error to a request refused before the device saw
    /// it: a structured error chunk (with `why`) when negotiated, else a
    /// simple reply.
    fn refuse(&mut self, handle: u64, errno: u32, why: &str) -> Result<(), ConnError> {
        if self.negotiated.structured_replies {
            return send_error_chunk(&mut self.s, handle, errno, why, None);
        }
        let mut r = [0u8; REPLY_BYTES];
        write_reply_header(&mut r, errno, handle);
        self.s.write_all(&r)?;
        Ok(())
    }

    /// Checks a request against the export. `Ok(None)` is DISC; `Err` is
    /// the errno to reply with and why.
    fn validate(
        &self,
        flags: u16,
        cmd: u16,
        offset: u64,
        len: u32,
    ) -> Result<Option<IoOp>, (u32, &'static str)> {
        let e = self.export;
        let known = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO | CMD_FLAG_REQ_ONE;
        if flags & !known != 0 && !(flags & CMD_FLAG_DF != 0 && self.negotiated.structured_replies)
        {
            return Err((EINVAL, "unknown command flags"));
        }
        let op = match cmd {
            CMD_READ => IoOp::Read,
            CMD_WRITE => IoOp::Write,
            CMD_DISC => return Ok(None),
            CMD_FLUSH => return Ok(Some(IoOp::Flush)),
            CMD_TRIM if e.transmission_flags & TF_SEND_TRIM != 0 || e.read_only => IoOp::Discard,
            CMD_WRITE_ZEROES if e.transmission_flags & TF_SEND_WRITE_ZEROES != 0 || e.read_only => {
                IoOp::WriteZeroes
            }
            _ => return Err((EINVAL, "unsupported command")),
        };
        if op != IoOp::Read && e.read_only {
            return Err((EPERM, "the export is read-only"));
        }
        if op == IoOp::Read && len > e.max_block_bytes {
            return Err((
                EOVERFLOW,
                "read longer than the advertised maximum block size",
            ));
        }
        let min = u64::from(e.min_block_bytes);
        if len == 0 || !offset.is_multiple_of(min) || !u64::from(len).is_multiple_of(min) {
            return Err((
                EINVAL,
                "zero length, or offset or length not a multiple of the minimum block size",
            ));
        }
        if offset
            .checked_add(u64::from(len))
            .is_none_or(|end| end > e.size_bytes)
        {
            let errno = if op == IoOp::Read { EINVAL } else { ENOSPC };
            return Err((errno, "request beyond the end of the export"));
        }
        Ok(Some(op))
    }

    /// NBD_CMD_BLOCK_STATUS for `base:allocation`: the device's map of the
    /// range (from the request's offset to its end rounded up to the
    /// minimum block), holes as HOLE|ZERO, data as 0, in one chunk.
    fn block_status(
        &mut self,
        flags: u16,
        handle: u64,
        offset: u64,
        len: u32,
    ) -> Result<(), ConnError> {
        let e = self.export;
        if !self.negotiated.base_allocation {
            return self.refuse(
                handle,
                EINVAL,
                "no metadata context selected: NBD_OPT_SET_META_CONTEXT base:allocation first",
            );
        }
        if flags & !(CMD_FLAG_REQ_ONE | CMD_FLAG_FUA) != 0 {
            return self.refuse(handle, EINVAL, "unknown command flags for BLOCK_STATUS");
        }
        let min = u64::from(e.min_block_bytes);
        let request_end = offset.checked_add(u64::from(len));
        if len == 0 || request_end.is_none_or(|end| end > e.size_bytes) {
            return self.refuse(
                handle,
                EINVAL,
                "BLOCK_STATUS of zero bytes or beyond the end of the export",
            );
        }
        // The length is a hint: ask the device from the block holding
        // `offset` to the block holding the last byte.
        let start = offset / min * min;
        let end = (offset + u64::from(len)).div_ceil(min) * min;
        let end = end.min(e.size_bytes);
        self.extents.clear();
        if let Err(err) = self
            .device
            .allocation(start, end - start, &mut self.extents)
        {
            // Status 0 ("data") is always true: a copy reads it all.
            tracing::warn!(offset, len, "block status unknown, reported as data: {err}");
            self.extents.clear();
        }
        let r = &mut self.status_reply;
        r.clear();
        r.resize(CHUNK_BYTES, 0);
        r.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
        let mut at = start;
        let mut described = 0usize;
        for x in &self.extents {
            let x_end = (at + x.len_bytes).min(end);
            let from = at.max(offset);
            at = x_end;
            if x_end <= from {
                continue;
            }
            let mut piece = x_end - from;
            if flags & CMD_FLAG_REQ_ONE != 0 {
                piece = piece.min(u64::from(len));
            }
            // Every piece is below 2^32: the range is at most `len` plus
            // one block.
            let piece = piece.min(u64::from(u32::MAX) / min * min) as u32;
            let state = match x.allocation {
                Allocation::Hole => STATE_HOLE | STATE_ZERO,
                Allocation::Data => 0,
            };
            r.extend_from_slice(&piece.to_be_bytes());
            r.extend_from_slice(&state.to_be_bytes());
            described += 1;
            if flags & CMD_FLAG_REQ_ONE != 0
                || described >= STATUS_EXTENTS_MAX
                || from + u64::from(piece) >= offset + u64::from(len)
            {
                break;
            }
        }
        if described == 0 {
            // A device that answered nothing (or failed): one data extent.
            let piece = (end - offset).min(u64::from(len)) as u32;
            r.extend_from_slice(&piece.to_be_bytes());
            r.extend_from_slice(&0u32.to_be_bytes());
        }
        let payload = (r.len() - CHUNK_BYTES) as u32;
        write_chunk_header(
            &mut r[..CHUNK_BYTES],
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            handle,
            payload,
        );
        self.s.write_all(r)?;
        if self.status_reply.capacity() > STATUS_BUFFER_KEEP_BYTES {
            self.status_reply = Vec::new();
        }
        if self.extents.capacity() * std::mem::size_of::<Extent>() > STATUS_BUFFER_KEEP_BYTES {
            self.extents = Vec::new();
        }
        Ok(())
    }

    /// Submits pieces of pending slots until the device queue is full.
    fn submit_pending(&mut self) -> Result<(), ConnError> {
        while let Some(&si) = self.pending.front() {
            let slot = &mut self.slots[si];
            let (offset, len) = match slot.op {
                IoOp::Flush => (0, 0),
                IoOp::Read | IoOp::Write => (slot.next_offset, u64::from(slot.len)),
                IoOp::Discard | IoOp::WriteZeroes => (
                    slot.next_offset,
                    (slot.end_offset - slot.next_offset).min(self.export.device_piece_bytes),
                ),
            };
            let has_data = matches!(slot.op, IoOp::Read | IoOp::Write);
            let seg = [IoSegment {
                addr: if has_data {
                    slot.buf.data(len as usize).as_mut_ptr()
                } else {
                    std::ptr::null_mut()
                },
                len: len as usize,
            }];
            let segments: &[IoSegment] = if has_data { &seg } else { &[] };
            let req = IoRequest {
                op: slot.op,
                offset_bytes: offset,
                len_bytes: len,
                segments,
                tag: si as u64,
            };
            // SAFETY: the segment is the slot's buffer, which stays allocated
            // and untouched while `parts_left > 0` (nothing reads, writes or
            // replaces a busy slot's buffer until its last completion).
            match unsafe { self.queue.submit(&req) } {
                Ok(()) => {
                    slot.parts_left += 1;
                    slot.next_offset = offset + len;
                }
                Err(IoError::QueueFull { .. }) if self.queue.inflight() > 0 => break,
                Err(err) => {
                    tracing::debug!(offset, len, "device refused request: {err}");
                    note_error(slot, &err);
                    slot.next_offset = slot.end_offset;
                }
            }
            let slot = &self.slots[si];
            if slot.op == IoOp::Flush || slot.next_offset >= slot.end_offset {
                self.pending.pop_front();
                if slot.parts_left == 0 {
                    self.finish(si)?;
                }
            }
        }
        Ok(())
    }

    /// Takes every completion from the device and replies to finished requests.
    fn reap(&mut self) -> Result<(), ConnError> {
        loop {
            // Completions are copied out (into a buffer sized at start-up)
            // so the replies can use `self`.
            let mut done = std::mem::take(&mut self.completed);
            done.clear();
            let n = self.queue.poll(&mut |c: IoCompletion| {
                done.push((c.tag as usize, c.result.err()));
            });
            assert_eq!(n, done.len(), "device miscounted its completions");
            for (si, err) in done.drain(..) {
                let slot = &mut self.slots[si];
                assert!(
                    slot.busy && slot.parts_left > 0,
                    "completion for an idle slot"
                );
                slot.parts_left -= 1;
                if let Some(err) = err {
                    note_error(slot, &err);
                }
                let sent_all = slot.next_offset >= slot.end_offset || slot.op == IoOp::Flush;
                if slot.parts_left == 0 && sent_all && !self.pending.contains(&si) {
                    self.finish(si)?;
                }
            }
            self.completed = done;
            self.submit_pending()?;
            if n == 0 {
                return Ok(());
            }
        }
    }

    /// All pieces of a slot are done: flush for FUA, or reply and free it.
    fn finish(&mut self, si: usize) -> Result<(), ConnError> {
        let slot = &mut self.slots[si];
        if slot.fua && slot.error.is_none() {
            slot.fua = false;
            slot.op = IoOp::Flush;
            self.pending.push_back(si);
            return Ok(());
        }
        let structured = self.negotiated.structured_replies;
        match (slot.error, structured) {
            (None, true) if slot.op == IoOp::Read => {
                let start = slot.end_offset - u64::from(slot.len);
                send_read_chunks(&mut self.s, slot, start)?;
            }
            (Some(errno), true) => {
                // A read names where its data stops being valid: the
                // device's offset, else the request's.
                let offset = match slot.op {
                    IoOp::Read => Some(
                        slot.error_offset
                            .unwrap_or(slot.end_offset - u64::from(slot.len)),
                    ),
                    _ => None,
                };
                send_error_chunk(&mut self.s, slot.handle, errno, &slot.error_text, offset)?;
            }
            (err, _) => {
                let err = err.unwrap_or(0);
                let data_len = if slot.op == IoOp::Read && err == 0 {
                    slot.len as usize
                } else {
                    0
                };
                let frame = slot.buf.frame(err, slot.handle, data_len);
                self.s.write_all(frame)?;
            }
        }
        self.inflight_bytes -= u64::from(slot.len);
        if slot.buf.cap > SLOT_BUFFER_BYTES {
            slot.buf = SlotBuffer::new(SLOT_BUFFER_BYTES);
        }
        slot.busy = false;
        self.free.push(si);
        Ok(())
    }
}

/// Keeps a slot's first error: errno, offset if the device named one,
/// and its text.
fn note_error(slot: &mut Slot, err: &IoError) {
    if slot.error.is_some() {
        return;
    }
    slot.error = Some(errno_of(err));
    slot.error_offset = match err {
        IoError::Checksum { offset_bytes } => Some(*offset_bytes),
        _ => None,
    };
    slot.error_text.clear();
    use std::fmt::Write as _;
    let _ = write!(slot.error_text, "{err}");
}

/// A successful structured read reply: the data as OFFSET_DATA chunks and
/// zero runs of at least [`READ_HOLE_MIN_BYTES`] as OFFSET_HOLE chunks, in
/// order, the last with NBD_REPLY_FLAG_DONE. With DF: one data chunk.
/// Data chunks go from the slot buffer with their header in the bytes
/// before them: one send per chunk, no copy.
fn send_read_chunks<S: Write>(s: &mut S, slot: &mut Slot, start: u64) -> std::io::Result<()> {
    let len = slot.len as usize;
    let handle = slot.handle;
    // Zero runs are found at this granularity (a 4 KiB block, or the
    // whole read if it is not a multiple of it).
    let step = if len.is_multiple_of(4096) { 4096 } else { len };
    let mut data_from = 0;
    let mut at = 0;
    // A read shorter than a hole chunk's minimum (a guest's 4 KiB read)
    // is not scanned: it goes as one data chunk.
    let look_for_holes = !slot.no_fragment && len >= READ_HOLE_MIN_BYTES;
    while look_for_holes && at < len {
        let buf = slot.buf.data(len);
        if !is_zero(&buf[at..at + step]) {
            at += step;
            continue;
        }
        let zero_from = at;
        while at < len && is_zero(&buf[at..at + step]) {
            at += step;
        }
        if at - zero_from < READ_HOLE_MIN_BYTES {
            continue;
        }
        if zero_from > data_from {
            send_data_chunk(s, &mut slot.buf, handle, start, data_from, zero_from, len)?;
        }
        let mut h = [0u8; CHUNK_BYTES + 12];
        let flags = if at == len { REPLY_FLAG_DONE } else { 0 };
        write_chunk_header(&mut h, flags, REPLY_TYPE_OFFSET_HOLE, handle, 12);
        h[CHUNK_BYTES..CHUNK_BYTES + 8].copy_from_slice(&(start + zero_from as u64).to_be_bytes());
        h[CHUNK_BYTES + 8..].copy_from_slice(&((at - zero_from) as u32).to_be_bytes());
        s.write_all(&h)?;
        data_from = at;
    }
    if data_from < len {
        send_data_chunk(s, &mut slot.buf, handle, start, data_from, len, len)?;
    }
    Ok(())
}

/// One OFFSET_DATA chunk of bytes `[from, to)` of a read of `len` bytes
/// at `start`; the last one (`to == len`) is marked DONE.
fn send_data_chunk<S: Write>(
    s: &mut S,
    buf: &mut SlotBuffer,
    handle: u64,
    start: u64,
    from: usize,
    to: usize,
    len: usize,
) -> std::io::Result<()> {
    let mut h = [0u8; DATA_CHUNK_BYTES];
    let flags = if to == len { REPLY_FLAG_DONE } else { 0 };
    write_chunk_header(
        &mut h,
        flags,
        REPLY_TYPE_OFFSET_DATA,
        handle,
        (8 + to - from) as u32,
    );
    h[CHUNK_BYTES..].copy_from_slice(&(start + from as u64).to_be_bytes());
    s.write_all(buf.chunk_frame(from, to - from, &h))
}

/// A structured error chunk, the request's only and last one:
/// ERROR_OFFSET when `offset` is known, else ERROR.
fn send_error_chunk<S: Write>(
    s: &mut S,
    handle: u64,
    errno: u32,
    message: &str,
    offset: Option<u64>,
) -> Result<(), ConnError> {
    let mut cut = message.len().min(ERROR_MESSAGE_MAX_BYTES);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let message = &message.as_bytes()[..cut];
    let mut c = [0u8; CHUNK_BYTES + 6 + ERROR_MESSAGE_MAX_BYTES + 8];
    let (typ, payload) = match offset {
        Some(_) => (REPLY_TYPE_ERROR_OFFSET, 6 + message.len() + 8),
        None => (REPLY_TYPE_ERROR, 6 + message.len()),
    };
    write_chunk_header(&mut c, REPLY_FLAG_DONE, typ, handle, payload as u32);
    let p = &mut c[CHUNK_BYTES..];
    // The spec: an error chunk's error MUST be nonzero.
    let errno = if errno == 0 { EIO } else { errno };
    p[0..4].copy_from_slice(&errno.to_be_bytes());
    p[4..6].copy_from_slice(&(message.len() as u16).to_be_bytes());
    p[6..6 + message.len()].copy_from_slice(message);
    if let Some(offset) = offset {
        p[6 + message.len()..6 + message.len() + 8].copy_from_slice(&offset.to_be_bytes());
    }
    s.write_all(&c[..CHUNK_BYTES + payload])?;
    Ok(())
}

fn errno_of(e: &IoError) -> u32 {
    match e {
        IoError::OutOfRange { .. } | IoError::Misaligned { .. } => EINVAL,
        IoError::ReadOnly => EPERM,
        IoError::Unsupported(_) => ENOTSUP,
        IoError::Checksum { .. } | IoError::QueueFull { .. } | IoError::Io(_) => EIO,
    }
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn drain_eventfd(fd: i32) {
    let mut v = 0u64;
    // SAFETY: reads at most 8 bytes into a local u64; the fd is the queue's
    // nonblocking eventfd, reported readable by poll.
    unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
}
