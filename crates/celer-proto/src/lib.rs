//! celer-proto: the frames clients and storage nodes exchange over TCP.
//!
//! # Protocol v3
//!
//! A frame is a fixed 96-byte header and an optional payload:
//!
//! ```text
//!  0 magic "CLR1"   4 proto version u16 (3)  6 kind u8   7 op u8
//!  8 status u16    10 flags u16             12 payload length u32
//! 16 request id u32                         20 length u32
//! 24 route epoch u64
//! 32 volume u64
//! 40 offset u64
//! 48 write version u64
//! 56 attachment id u32                      60 fence generation u32
//! 64 snapshot sequence u64
//! 72 reserved, zero (16 bytes)
//! 88 header crc32c u32                      92 payload crc32c u32
//! ```
//!
//! All little-endian. The header crc covers bytes 0..88 and the payload crc
//! field, so a header is trusted only whole; the payload crc covers the
//! payload, so a torn or corrupted payload is caught before it reaches a
//! disk. Request ids let many requests share one connection (pipelining);
//! responses carry the id of their request and a typed [`Status`].
//!
//! Magic and version come first and are checked as soon as 6 bytes are in,
//! so a peer of another protocol version gets a clear error at once: a v2
//! peer reading a v3 frame reports "protocol version 3 not supported", a v3
//! peer reading a v2 frame [`FrameError::Version`] with `found: 2`.
//!
//! Decoding is sans-I/O: [`decode_header`] looks at bytes already received
//! and says "need more", "here is a frame header", or why the stream is
//! broken; the caller owns the socket and the buffers, so payloads can be
//! received straight into their final place and sent from the caller's
//! buffers (writev). Every error is a reason to close the connection.
//!
//! # Versions
//!
//! A write version is `hlc << 16 | writer`: `hlc` is a hybrid logical clock,
//! `(ms since 2025-01-01) << 8 | logical`, 48 bits; `writer` is the low 16
//! bits of the attachment id the control service assigned (never random).
//! The header's `attachment` field names the whole id; a node refuses a
//! write whose version's writer bits or attachment field name another
//! attachment than the connection's capability. The rule, in one place
//! (enforced by the node, followed by the client):
//!
//! - a write whose version equals the stored one is acknowledged (a retry);
//! - a write whose version is lower than the stored one (or than a write to
//!   the same block already accepted) is refused with
//!   [`Status::OlderVersion`], never acknowledged; the response's `version`
//!   is the stored one. The client moves its clock past it and sends the
//!   write again with a new version, unless the stored version is more than
//!   [`VERSION_DRIFT_MAX_MS`] ahead of its clock (then the write fails);
//! - a node refuses ([`Status::VersionAhead`]) a version more than
//!   [`VERSION_DRIFT_MAX_MS`] ahead of its own clock, so no writer, hostile
//!   or with a wrong clock, can push a block's version out of reach;
//! - the highest version a node reports (in every response's `version`) is
//!   per volume: one tenant's clock does not push another's.
//!
//! # Fencing
//!
//! `fence` is the volume's fence generation the writer's capability was
//! minted with (a client's header must name its capability's; a node's
//! forward carries the original writer's). The control service raises a
//! volume's generation when an attachment takes the volume over from
//! another (a forced exclusive attach, a migration hand-off), pushes it to
//! every node and answers the take-over only once all live nodes have
//! installed it and finished every write of an older generation already
//! accepted. From then on a node answers every mutation of an older
//! generation [`Status::Fenced`], so the old holder can no longer change
//! the volume, even while its process and network still work. A node
//! learns generations from that push, from its registration and heartbeat
//! replies (a node that was down), and from any newer capability it sees;
//! it never lowers one. Reads are not fenced.
//!
//! # Snapshots
//!
//! A volume's data is a chain of *layers* (eras of its lineage, see
//! `celer_device::layer_key`): writes go to the newest, the *head*; a read
//! takes each block from the first layer that holds it. A snapshot freezes
//! the head and starts a new era; a rollback or a clone starts a new era
//! over a snapshot's layers. The header's `snapshot` is the head era the
//! writer knows (0 for a volume never snapshotted). A node refuses a write
//! naming an older era ([`Status::StaleSnapshot`], carrying the current
//! one) and waits for the control service when it names a newer one
//! ([`Status::SnapshotBehind`]). While a snapshot is being cut (a couple
//! of seconds after it was taken, `SNAPSHOT_CUT_MS` in celer-meta) a write
//! naming the era just frozen is still applied to it and then answered
//! `StaleSnapshot`: every replica that receives the write puts it in the
//! snapshot, so the snapshot's copies agree; the writer writes it again
//! into the new era. A client names one era in every leg of one attempt. A `Read`
//! with [`FLAG_SNAPSHOT_READ`] reads the snapshot whose era is `snapshot`.
//!
//! # Connection set-up and authentication
//!
//! Nothing but the handshake is served before the peer proved it holds a
//! credential (see [`auth`]):
//!
//! 1. The node speaks first: a `Challenge` request with a 32-byte random
//!    nonce as payload.
//! 2. The peer answers with `Hello` (`offset` = node shard index, `volume` =
//!    sender id), payload [`auth::HelloProof`]: its own nonce, its role, an
//!    HMAC-SHA256 over both nonces keyed by its credential's key, and for a
//!    client its capability. A node peer's key is the cluster data key; a
//!    client's is the per-attachment key derived from its capability.
//! 3. The node checks it and answers `Hello` `Ok` with an HMAC over the
//!    nonces the other way round (the node proves it knows the key too), or
//!    `Unauthorized` and closes. The peer may pipeline requests right after
//!    its Hello; it trusts no response before the node's proof.
//! 4. `Renew` (client only) replaces the connection's capability with a
//!    newer one of the same volume and attachment, proven the same way, so a
//!    capability is renewed without reconnecting or pausing I/O.
//!
//! The connection is authenticated, not each frame: an attacker who can
//! inject into a TCP stream on the path can still tamper with it. Use a
//! network the attacker cannot inject into, or TLS (not built yet).
//!
//! # Conversation (client ↔ node, node ↔ node)
//!
//! - A connection is for one node *shard*. Partition `p` lives in shard
//!   `p % shards` (`celer_route::RouteTable::shard_of`).
//! - Every request carries the sender's route `epoch`. The node answers
//!   `StaleEpoch` with the encoded newer `RouteTable` as payload when the
//!   sender's epoch is older (install it, resend), `RouteBehind` when it is
//!   newer (the node is fetching it; resend after a short pause).
//!   `NotReplica`: the node is not a member of the partition in that epoch.
//! - `Read` (volume, offset, length): the response payload is the data.
//!   Only an in-sync member serves it (`NotInSync` otherwise). Offset and
//!   length are multiples of 512 (volumes with 512-byte sectors read single
//!   sectors; the node reads the whole 4 KiB blocks and sends the range).
//! - `Write` (volume, offset, length = payload bytes, version, attachment):
//!   applied by the version rule above, acknowledged when durable. A client
//!   sends small writes as `Write` to every member. Offset and length are
//!   multiples of 4096, except for a *sector write*.
//! - Sector write: a `Write` with [`FLAG_SECTORS`] in `flags` covers
//!   512-byte sectors within one 4 KiB block (offset and length multiples
//!   of 512, `offset % 4096 + length <= 4096`, not the whole block). The
//!   node merges it into the stored block (read, merge, write the whole
//!   block with the write's version and a new crc) while holding the block
//!   against every other write of it on that node, so writes of different
//!   sectors of one block, from any attachment, all survive. The version
//!   rule applies per block as for any write: a sector write older than
//!   the block is refused with `OlderVersion` and sent again with a newer
//!   version, which merges it into the newer content; each replica applies
//!   a block's writes in increasing version order, so replicas converge. A
//!   client sends sector writes to every member, never as `WritePrimary`; a
//!   write that is not 4 KiB aligned is cut into sector writes for its
//!   partial blocks and an ordinary write for the whole ones. A node
//!   refuses (`Invalid`) a sector write that is misaligned or covers a
//!   whole block, an unaligned write without the flag, and any other
//!   `flags` bit. Nodes of this protocol without the flag refused
//!   unaligned writes (`Invalid`), so an older node never merges wrongly.
//! - `WritePrimary`: as `Write`, sent to the primary only, which writes it
//!   and forwards it as `Write` to the other members; `Ok` once all have it,
//!   `Unavailable` if a member did not answer in time.
//! - `WriteZeroes`, `Discard` (length, version, no payload): to every member.
//! - `Flush`: `Ok`; every acknowledged write is already durable.
//! - `RouteTable`: asks for the node's table (epoch 0 from a new client).
//! - `ListChunks`, `BackfillRead`: node to node only. A `BackfillRead`
//!   with [`FLAG_STATES_ONLY`] is answered with the block states alone,
//!   [`payload::STATE_CRC_BYTES`] per block: version (u64 LE), kind (u8: 0
//!   unwritten, 1 data, 2 zeroes) and the data's crc32c (u32 LE, 0 unless
//!   data): the scrub's comparison of copies. The answers' layouts, with
//!   their encoders and decoders, are in [`payload`]. A client may send `ListChunks`
//!   for its own volume (`volume`): the answer lists that volume's chunks
//!   of the partition only (what the NBD front end's block status reads),
//!   or with [`FLAG_SINCE`] those held by layers newer than an era.
//! - `Fill` (volume, offset, length ≤ 1 MiB, no payload; `snapshot` = the
//!   head era the sender knows): *flatten*. The node copies into the
//!   volume's head layer every block of the range that a read takes from a
//!   layer under the head (data only) and the head has no entry for,
//!   with the lower block's data, crc and version (`EngineOp::Fill`). The
//!   volume reads the same before and after, so a read-only capability may
//!   send it and it is not fenced; a guest write of the block is ordered
//!   with it by version, as any two writes (the fill's version is older
//!   than any write made after the volume was cloned: a write that came
//!   first is kept, one that comes later wins). Every replica holding the
//!   same layers ends with the same blocks and versions, so the client
//!   sends it to every member that takes writes, like a small write, and
//!   waits for all (`celer volume flatten`); members that stayed record it
//!   for a down member's catch-up. Answered `Ok` with a 4-byte payload, the
//!   blocks copied (u32 LE); `Busy` while a member of the partition that
//!   takes writes is not in sync (its lower layers may be incomplete: a
//!   backfill or catch-up is running; retry after it); `StaleSnapshot` /
//!   `SnapshotBehind` when the era it names is not the node's head era;
//!   `Checksum` when a lower block fails its crc (the node repairs it in the
//!   background; retry). A node older than this op closes the connection
//!   on it (unknown op 14).
//! - A request must lie within one chunk (`RouteTable::chunk_bytes`).
//! - Every response echoes request id, op, volume, offset, length, and
//!   carries in `version` the highest write version the node has seen for
//!   that volume, so clients keep their hybrid logical clock ahead of it.

pub mod auth;
pub mod payload;

/// Bytes of a frame header.
pub const HEADER_BYTES: usize = 96;
/// This build speaks protocol version 3.
pub const PROTO_VERSION: u16 = 3;
/// Where the header crc sits (it covers the bytes before it and the payload
/// crc after it).
const HEADER_CRC_AT: usize = 88;
/// 2025-01-01T00:00:00Z in ms since the Unix epoch: the zero of the
/// physical part of a write version's clock.
pub const HLC_EPOCH_UNIX_MS: u64 = 1_735_689_600_000;
/// Bits of the logical counter below the milliseconds in the clock.
pub const HLC_LOGICAL_BITS: u32 = 8;
/// How far a write version's clock may run ahead of a node's clock (and a
/// stored version ahead of a client's) before it is refused.
pub const VERSION_DRIFT_MAX_MS: u64 = 5 * 60 * 1000;

/// The clock part of a write version (its top 48 bits).
pub fn version_clock(version: u64) -> u64 {
    version >> 16
}

/// The writer part of a write version: the low 16 bits of the attachment id.
pub fn version_writer(version: u64) -> u16 {
    version as u16
}

/// The clock value of a wall-clock time in ms since the Unix epoch.
pub fn clock_of_unix_ms(unix_ms: u64) -> u64 {
    unix_ms.saturating_sub(HLC_EPOCH_UNIX_MS) << HLC_LOGICAL_BITS
}

/// The highest clock value acceptable at wall-clock time `unix_ms`.
pub fn clock_limit_at(unix_ms: u64) -> u64 {
    clock_of_unix_ms(unix_ms.saturating_add(VERSION_DRIFT_MAX_MS))
}
/// `flags` bit of a `Write`: a sector write (see the crate doc).
pub const FLAG_SECTORS: u16 = 1;
/// `flags` bit of a `BackfillRead`: answer with the block states only (the
/// version, kind and crc of each block, no data): a scrub comparing copies
/// ([`payload::StateCrcTable`]).
pub const FLAG_STATES_ONLY: u16 = 2;
/// `flags` bit of a `Read`: read the snapshot whose era is the header's
/// `snapshot`, not the volume's current content.
pub const FLAG_SNAPSHOT_READ: u16 = 4;
/// `flags` bit of a `ListChunks` (node to node): list only the blocks
/// written since the sender (node id in `volume`) went down, as the source
/// recorded them; the answer says when the source did not record them all
/// ([`payload::CatchUpAnswer`]).
pub const FLAG_CATCH_UP: u16 = 8;
/// `flags` bit of a client's `ListChunks`: list only the chunks held by
/// layers of an era newer than the header's `version` (the chunks changed
/// since the snapshot of that era: `celer snapshot diff`).
pub const FLAG_SINCE: u16 = 16;
/// Bytes of a sector in sector writes and reads.
pub const SECTOR_BYTES: u64 = 512;
/// Bytes of a block: the unit a node stores and versions.
pub const BLOCK_BYTES: u64 = 4096;

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
    /// the node holds; payload of the response: (volume u64, chunk u64)
    /// pairs ([`payload::decode_chunk_list`]). From a client: only its
    /// `volume`'s chunks.
    ListChunks = 10,
    /// Node → node during backfill: one whole chunk with its per-block
    /// versions (payload layout: [`payload::BackfillAnswer`]).
    BackfillRead = 11,
    /// Node → peer, first frame of every connection: the node's nonce.
    Challenge = 12,
    /// Client → node: a newer capability for the connection (payload: an
    /// [`auth::HelloProof`] with the new capability).
    Renew = 13,
    /// Client → every member: copy the range's blocks the volume reads
    /// from layers under its head into the head (flatten; see the crate
    /// doc). Response payload: blocks copied, u32 LE.
    Fill = 14,
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
    /// No valid credential, or the credential does not allow this request
    /// (another volume, a write on a read-only capability, a version naming
    /// another attachment, a node-only op).
    Unauthorized = 13,
    /// The connection's capability expired: renew it (`Renew`) and retry.
    Expired = 14,
    /// The block holds a newer version than the write's: `version` carries
    /// it. Move the clock past it and write again with a new version.
    OlderVersion = 15,
    /// The write's version is more than [`VERSION_DRIFT_MAX_MS`] ahead of
    /// the node's clock (the writer's clock is wrong, or it is hostile).
    VersionAhead = 16,
    /// The write's fence generation is older than the volume's: another
    /// attachment took the volume over (an exclusive attach with `force`,
    /// or a migration hand-off). Final for this attachment: attach again.
    Fenced = 17,
    /// The write names an older era of the volume than the node's (a
    /// snapshot or a rollback started a new one): `snapshot` carries the
    /// current era. Write again with it. A write answered so during a
    /// snapshot's cut may have been applied to the older era (it then
    /// belongs to the snapshot); see "Snapshots".
    StaleSnapshot = 18,
    /// The write names a newer era than the node knows: the node is
    /// fetching the volume's layers; retry shortly.
    SnapshotBehind = 19,
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
            12 => Op::Challenge,
            13 => Op::Renew,
            14 => Op::Fill,
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
            13 => Status::Unauthorized,
            14 => Status::Expired,
            15 => Status::OlderVersion,
            16 => Status::VersionAhead,
            17 => Status::Fenced,
            18 => Status::StaleSnapshot,
            19 => Status::SnapshotBehind,
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
    /// The writer's attachment id (writes; 0 from nodes and for reads).
    pub attachment: u32,
    /// The attachment's fence generation (0 until fencing is in use).
    pub fence: u32,
    /// The volume's snapshot sequence the writer knows (0: none).
    pub snapshot: u64,
    /// crc32c of the payload (0 when there is none).
    pub payload_crc: u32,
}

/// Why a stream of frames cannot be trusted any more.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {0:02x?}: not a Celer peer, or the stream lost its framing")]
    BadMagic([u8; 4]),
    #[error("protocol version {found} not supported (this build speaks {PROTO_VERSION}): upgrade the older side")]
    Version { found: u16 },
    #[error("reserved header bytes are not zero: a newer peer, or a corrupt frame")]
    Reserved,
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

/// The header crc: the bytes before it and the payload crc field after it.
fn header_crc(b: &[u8; HEADER_BYTES]) -> u32 {
    crc32c::crc32c_append(
        crc32c::crc32c(&b[..HEADER_CRC_AT]),
        &b[HEADER_CRC_AT + 4..HEADER_BYTES],
    )
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
            attachment: 0,
            fence: 0,
            snapshot: 0,
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
        put_u32(&mut b, 56, self.attachment);
        put_u32(&mut b, 60, self.fence);
        put_u64(&mut b, 64, self.snapshot);
        put_u32(&mut b, HEADER_CRC_AT + 4, self.payload_crc);
        let crc = header_crc(&b);
        put_u32(&mut b, HEADER_CRC_AT, crc);
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
    // Magic and version first, as soon as they are in: a peer of another
    // protocol version gets its error without waiting for a whole header.
    let seen = received.len().min(4);
    if received[..seen] != MAGIC[..seen] {
        let mut m = [0u8; 4];
        m[..seen].copy_from_slice(&received[..seen]);
        return Err(FrameError::BadMagic(m));
    }
    if received.len() >= 6 {
        let found = get_u16(received, 4);
        if found != PROTO_VERSION {
            return Err(FrameError::Version { found });
        }
    }
    let Some(b) = received.get(..HEADER_BYTES) else {
        return Ok(None);
    };
    let mut h = [0u8; HEADER_BYTES];
    h.copy_from_slice(b);
    if header_crc(&h) != get_u32(&h, HEADER_CRC_AT) {
        return Err(FrameError::HeaderChecksum);
    }
    if h[72..HEADER_CRC_AT].iter().any(|&x| x != 0) {
        return Err(FrameError::Reserved);
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
        attachment: get_u32(&h, 56),
        fence: get_u32(&h, 60),
        snapshot: get_u64(&h, 64),
        payload_crc: get_u32(&h, HEADER_CRC_AT + 4),
    }))
}
