//! celer-proto: the frames clients and storage nodes exchange over TCP.
//!
//! A frame is a fixed 64-byte header and an optional payload:
//!
//! ```text
//!  0 magic "CLR1"   4 proto version u16   6 kind u8   7 op u8
//!  8 status u16    10 flags u16          12 payload length u32
//! 16 request id u32  20 length u32       24 route epoch u64
//! 32 volume u64      40 offset u64
//! 48 write version u64                   56 header crc32c u32  60 payload crc32c u32
//! ```
//!
//! All little-endian. The header crc covers bytes 0..56 and the payload crc
//! field, so a header is trusted only whole; the payload crc covers the
//! payload, so a torn or corrupted payload is caught before it reaches a
//! disk. Request ids let many requests share one connection (pipelining);
//! responses carry the id of their request and a typed [`Status`].
//!
//! Decoding is sans-I/O: [`decode_header`] looks at bytes already received
//! and says "need more", "here is a frame header", or why the stream is
//! broken; the caller owns the socket and the buffers, so payloads can be
//! received straight into their final place and sent from the caller's
//! buffers (writev). Every error is a reason to close the connection.
//!
//! # Conversation (client ↔ node, node ↔ node)
//!
//! - A connection is for one node *shard*: its first frame is `Hello` with
//!   `offset` = shard index and `volume` = sender id. The shard answers `Ok`
//!   (or `Invalid` and closes). Partition `p` lives in shard
//!   `p % shards` (`celer_route::RouteTable::shard_of`).
//! - Every request carries the sender's route `epoch`. The node answers
//!   `StaleEpoch` with the encoded newer `RouteTable` as payload when the
//!   sender's epoch is older (install it, resend), `RouteBehind` when it is
//!   newer (the node is fetching it; resend after a short pause).
//!   `NotReplica`: the node is not a member of the partition in that epoch.
//! - `Read` (volume, offset, length): the response payload is the data.
//!   Only an in-sync member serves it (`NotInSync` otherwise).
//! - `Write` (volume, offset, length = payload bytes, version): applied where
//!   `version` is newer than the stored block version, acknowledged when
//!   durable (a write that was not newer is acknowledged too: retries are
//!   idempotent). A client sends small writes as `Write` to every member.
//! - `WritePrimary`: as `Write`, sent to the primary only, which writes it
//!   and forwards it as `Write` to the other members; `Ok` once all have it,
//!   `Unavailable` if a member did not answer in time.
//! - `WriteZeroes`, `Discard` (length, version, no payload): to every member.
//! - `Flush`: `Ok`; every acknowledged write is already durable.
//! - `RouteTable`: asks for the node's table (epoch 0 from a new client).
//! - A request must lie within one chunk (`RouteTable::chunk_bytes`).
//! - Every response echoes request id, op, volume, offset, length, and
//!   carries in `version` the highest write version the shard has seen, so
//!   clients keep their hybrid logical clock ahead of it.

/// Bytes of a frame header.
pub const HEADER_BYTES: usize = 64;
/// This build speaks protocol version 2.
pub const PROTO_VERSION: u16 = 2;
/// Largest payload a frame may carry.
pub const PAYLOAD_MAX_BYTES: u32 = 4 << 20;

const MAGIC: [u8; 4] = *b"CLR1";

/// Request or response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Request = 1,
    Response = 2,
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read = 1,
    /// Client → every replica (small writes), applied where the version is newer.
    Write = 2,
    /// Client → primary, which forwards to the other replicas (large writes).
    WritePrimary = 3,
    WriteZeroes = 4,
    Discard = 5,
    Flush = 6,
    /// Node → client: the route table, as the payload.
    RouteTable = 7,
    Ping = 8,
    /// First frame of every connection: `offset` names the node shard the
    /// connection is for, `volume` the sender's client id (for logs).
    Hello = 9,
    /// Node → node during backfill: the chunks of partition `offset` that
    /// the node holds; payload of the response: (volume u64, chunk u64) pairs.
    ListChunks = 10,
    /// Node → node during backfill: one whole chunk with its per-block
    /// versions (see `celer-node` for the payload layout).
    BackfillRead = 11,
}

/// Outcome carried by a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    /// The client's route epoch is older than the node's; the payload holds
    /// the newer table. Install it and retry.
    StaleEpoch = 1,
    /// This node does not hold the partition in the current route.
    NotReplica = 2,
    /// The replica is catching up and cannot serve reads yet.
    NotInSync = 3,
    Checksum = 4,
    OutOfRange = 5,
    Invalid = 6,
    NoSpace = 7,
    Io = 8,
    ReadOnly = 9,
    /// The client's epoch is newer than the node's: the node is fetching the
    /// newer table; retry shortly.
    RouteBehind = 10,
    /// A replica did not answer (the primary could not forward a write):
    /// retry once the route has changed.
    Unavailable = 11,
    /// Try again shortly (e.g. a backfill read waits for older writes).
    Busy = 12,
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Read,
            2 => Op::Write,
            3 => Op::WritePrimary,
            4 => Op::WriteZeroes,
            5 => Op::Discard,
            6 => Op::Flush,
            7 => Op::RouteTable,
            8 => Op::Ping,
            9 => Op::Hello,
            10 => Op::ListChunks,
            11 => Op::BackfillRead,
            _ => return None,
        })
    }
}

impl Status {
    fn from_u16(v: u16) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::StaleEpoch,
            2 => Status::NotReplica,
            3 => Status::NotInSync,
            4 => Status::Checksum,
            5 => Status::OutOfRange,
            6 => Status::Invalid,
            7 => Status::NoSpace,
            8 => Status::Io,
            9 => Status::ReadOnly,
            10 => Status::RouteBehind,
            11 => Status::Unavailable,
            12 => Status::Busy,
            _ => return None,
        })
    }
}

/// A decoded (or to-be-encoded) frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub op: Op,
    pub status: Status,
    pub flags: u16,
    pub payload_bytes: u32,
    pub request_id: u32,
    /// Bytes of the data range (reads, writes, zeroes, discards).
    pub length: u32,
    pub epoch: u64,
    pub volume: u64,
    pub offset: u64,
    pub version: u64,
    /// crc32c of the payload (0 when there is none).
    pub payload_crc: u32,
}

/// Why a stream of frames cannot be trusted any more.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {0:02x?}: not a Celer peer, or the stream lost its framing")]
    BadMagic([u8; 4]),
    #[error("protocol version {found} not supported (this build speaks {PROTO_VERSION})")]
    Version { found: u16 },
    #[error("header checksum mismatch: corrupt frame")]
    HeaderChecksum,
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("unknown op {0}")]
    Op(u8),
    #[error("unknown status {0}")]
    Status(u16),
    #[error("payload of {0} bytes exceeds the {PAYLOAD_MAX_BYTES}-byte limit")]
    PayloadTooLarge(u32),
    #[error("payload checksum mismatch: corrupt frame")]
    PayloadChecksum,
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The header crc: bytes 0..56 and the payload crc field (60..64).
fn header_crc(b: &[u8; HEADER_BYTES]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&b[..56]), &b[60..64])
}

/// crc32c of a payload given as pieces (as it will be sent with writev).
pub fn payload_crc<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> u32 {
    pieces.into_iter().fold(0, crc32c::crc32c_append)
}

impl Header {
    /// A request header with everything but the op-specific fields zero.
    pub fn request(op: Op, request_id: u32) -> Header {
        Header {
            kind: Kind::Request,
            op,
            status: Status::Ok,
            flags: 0,
            payload_bytes: 0,
            request_id,
            length: 0,
            epoch: 0,
            volume: 0,
            offset: 0,
            version: 0,
            payload_crc: 0,
        }
    }

    /// The response to `req` with `status`.
    pub fn response_to(req: &Header, status: Status) -> Header {
        Header {
            kind: Kind::Response,
            status,
            payload_bytes: 0,
            payload_crc: 0,
            ..*req
        }
    }

    /// Sets the payload length and crc from its pieces.
    pub fn with_payload<'a>(
        mut self,
        pieces: impl IntoIterator<Item = &'a [u8]> + Clone,
    ) -> Header {
        self.payload_bytes = pieces.clone().into_iter().map(|p| p.len() as u32).sum();
        self.payload_crc = payload_crc(pieces);
        self
    }

    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..4].copy_from_slice(&MAGIC);
        put_u16(&mut b, 4, PROTO_VERSION);
        b[6] = self.kind as u8;
        b[7] = self.op as u8;
        put_u16(&mut b, 8, self.status as u16);
        put_u16(&mut b, 10, self.flags);
        put_u32(&mut b, 12, self.payload_bytes);
        put_u32(&mut b, 16, self.request_id);
        put_u32(&mut b, 20, self.length);
        put_u64(&mut b, 24, self.epoch);
        put_u64(&mut b, 32, self.volume);
        put_u64(&mut b, 40, self.offset);
        put_u64(&mut b, 48, self.version);
        put_u32(&mut b, 60, self.payload_crc);
        let crc = header_crc(&b);
        put_u32(&mut b, 56, crc);
        b
    }

    /// Checks a received payload against the header's crc.
    pub fn verify_payload<'a>(
        &self,
        pieces: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<(), FrameError> {
        if payload_crc(pieces) == self.payload_crc {
            Ok(())
        } else {
            Err(FrameError::PayloadChecksum)
        }
    }
}

/// Decodes the header at the start of `received`. `Ok(None)`: fewer than
/// [`HEADER_BYTES`] bytes so far, read more. The payload (if any) follows the
/// header and is `payload_bytes` long; check it with [`Header::verify_payload`].
pub fn decode_header(received: &[u8]) -> Result<Option<Header>, FrameError> {
    let Some(b) = received.get(..HEADER_BYTES) else {
        return Ok(None);
    };
    let mut h = [0u8; HEADER_BYTES];
    h.copy_from_slice(b);
    if h[0..4] != MAGIC {
        return Err(FrameError::BadMagic([h[0], h[1], h[2], h[3]]));
    }
    let found = get_u16(&h, 4);
    if found != PROTO_VERSION {
        return Err(FrameError::Version { found });
    }
    if header_crc(&h) != get_u32(&h, 56) {
        return Err(FrameError::HeaderChecksum);
    }
    let kind = match h[6] {
        1 => Kind::Request,
        2 => Kind::Response,
        k => return Err(FrameError::Kind(k)),
    };
    let op = Op::from_u8(h[7]).ok_or(FrameError::Op(h[7]))?;
    let status = Status::from_u16(get_u16(&h, 8)).ok_or(FrameError::Status(get_u16(&h, 8)))?;
    let payload_bytes = get_u32(&h, 12);
    if payload_bytes > PAYLOAD_MAX_BYTES {
        return Err(FrameError::PayloadTooLarge(payload_bytes));
    }
    Ok(Some(Header {
        kind,
        op,
        status,
        flags: get_u16(&h, 10),
        payload_bytes,
        request_id: get_u32(&h, 16),
        length: get_u32(&h, 20),
        epoch: get_u64(&h, 24),
        volume: get_u64(&h, 32),
        offset: get_u64(&h, 40),
        version: get_u64(&h, 48),
        payload_crc: get_u32(&h, 60),
    }))
}
