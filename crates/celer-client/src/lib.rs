//! celer-client: the distributed client. A [`Client`] is a
//! [`BlockDevice`] whose queues send every I/O straight to the storage nodes
//! that hold its blocks (no gateway), following a route table they learn
//! lazily from the nodes themselves.
//!
//! # Threading model
//! One client queue per front-end worker, owned by that worker's
//! thread: it has its own copy of the route table, its own non-blocking TCP
//! connections (one per (node, shard) it talks to, opened lazily, each
//! starting with `Hello`), its own epoll set (the `completion_fd`) with a
//! timerfd for its timeouts. All work happens inside `submit` and `poll` on
//! the owner's thread: no helper thread, no lock shared between queues on
//! the I/O path. Queues share only the client's hybrid logical clock (one
//! `AtomicU64`, one compare-and-swap per write request; see `hlc`) and,
//! on a route change only, a mutex-held copy of the newest table that a
//! queue opened later starts from.
//!
//! # What is allocated when
//! - Queue open: the request slab (`INFLIGHT_MAX` = 256 slots, each with
//!   room for 8 segments), the part slab (`PARTS_MAX` = 1024 parts, each
//!   with room for 16 member legs), the action and completion queues, the
//!   epoll event array.
//! - Connection open (control path): a 64 KiB receive buffer and a send
//!   queue of 64 frames (it grows under a backlog and keeps the room).
//! - Route change (control path): the decoded table and the node address map.
//! - Per I/O: nothing on the 4 KiB path. A request with more than 8
//!   segments grows its slot's segment list once (kept for reuse); a failed
//!   request allocates its error message.
//!
//! # Data path
//! `submit` cuts a request at chunk boundaries (`RouteTable::chunk_bytes`)
//! into parts, each bound for its partition, and queues the frames; the next
//! `poll` writes them (`writev`: header and the caller's segments; crc32c of
//! the payload computed over the segments once per part), reads responses
//! (a read payload goes into the caller's segments, checked against its
//! crc) and completes requests. Writes carry `version = (hlc << 16) |
//! writer` (`writer`: the low 16 bits of the attachment id) and the
//! attachment id, one version per part, the same on every retry unless a
//! member refuses it as older (see below).
//!
//! # Credentials
//! Every connection starts with the node's `Challenge` and the client's
//! `Hello` proving its [`Credential`] (a capability for the volume and its
//! key, from the control service); the client trusts no response before
//! the node proved it knows the key too. [`Client::renew`] installs a newer
//! capability: every open connection gets a `Renew` frame, in order with
//! the requests on it, so I/O does not pause.
//! - Write part ≤ `small_write_max`: `Write` to every member of the
//!   partition (in sync or syncing); done when every member answered `Ok`.
//! - Volumes with 512-byte sectors (`ClientConfig::sector_bytes`): a write,
//!   write-zeroes or discard that covers part of a 4 KiB block sends that
//!   part as a sector write (`FLAG_SECTORS`, zeroes as payload for the
//!   latter two) to every member, which merges it into the block; the whole
//!   blocks between go as usual. No read-modify-write in the client, so two
//!   attachments writing different sectors of one block both survive. Reads
//!   of sectors go as they are (the node reads the blocks around them).
//! - Larger write part: `WritePrimary` to the primary only, which forwards.
//! - `WriteZeroes`, `Discard`: to every member, no payload.
//! - `Flush`: completes at once (an acknowledged write is already durable on
//!   every member).
//! - Read: to the primary, or with [`ReadPolicy::AnyInSync`] to the in-sync
//!   members round-robin; `NotInSync`, `Checksum`, `Io`, a timeout or a dead
//!   connection → the next in-sync member; every member answered with an
//!   error → that error (`Checksum` → [`IoError::Checksum`]).
//!
//! # Retry rules
//! - `StaleEpoch` carries the newer table: install it; every part whose
//!   partition changed (or that was waiting for a route change) is sent again
//!   to the members of the new table with the same version (writes are
//!   idempotent by version). Parts whose partition did not change go on; a
//!   node that rejects them with `StaleEpoch` makes them resend.
//! - `RouteBehind`, `Busy`: the same frame again after 1 ms.
//! - A member that does not answer within `request_timeout`, a connection
//!   that fails (refused, reset, EOF, corrupt frame: closed with a log line),
//!   `Unavailable` (the primary could not forward), `NotReplica`: the part
//!   waits for a route change. Meanwhile the queue sends a `RouteTable`
//!   request with its epoch every 50 ms to the partition's other members and
//!   one other node in turn (a node with a newer table answers `StaleEpoch`
//!   with it), and re-sends the part's failed legs to the same members once
//!   per `request_timeout` (a reconnect, at most every 100 ms per
//!   connection), so a transient fault heals without a route change.
//! - A write is acknowledged only when every member of the route it was last
//!   sent under answered `Ok` for that attempt.
//! - After `op_deadline` the request fails with `IoError::Io`.
//! - `OlderVersion` on a write: a member holds a newer version of a block
//!   (another writer, or one whose clock is ahead). The clock moves past the
//!   stored version the response carries and the part is sent again to
//!   every member with a new version; if that version is more than the
//!   drift bound ahead of this client's clock, the request fails instead.
//! - `Expired` (the capability ran out before a renewal reached that
//!   node): the same frame again after 50 ms, until `op_deadline`.
//! - Other statuses (`NoSpace`, `ReadOnly`, `Invalid`, `OutOfRange`, `Io`
//!   on a write, `Unauthorized`, `VersionAhead`) fail the request at once.
//!
//! # Known gaps
//! - The protocol logic (`queue::Core`) takes its clocks from the driver
//!   (`Core::now` and `Core::unix_ms`, read once per `submit`/`poll`; the
//!   write clock, `hlc`, is handed the latter) and reaches the network
//!   only through `net::Transport` and the `net::Sink` callbacks, but no
//!   deterministic simulator drives it yet (the data simulation's clients
//!   are its own model of this core).
//! - The transport is TCP only (`net::Net`); `net::Transport` is the
//!   boundary an RDMA transport implements, plus its own readiness driver.
//! - A table whose `chunk_bytes` differs from the first one is refused
//!   (parts already cut could straddle the new chunks).
//! - Node addresses that are not IP literals are resolved with a blocking
//!   lookup when a table is installed.
//! - A read payload that arrives in the receive buffer together with its
//!   header is copied from there into the caller's segments (for 4 KiB,
//!   one memcpy instead of a second system call); the rest of a payload
//!   goes from the socket into the caller's memory directly (`readv`).
//! - A retry after `RouteBehind`/`Busy` is every 1 ms with no growth, up to
//!   `op_deadline`.
//! - No per-queue metrics yet.
//!
//! # Flatten
//! [`Client::layer_chunks`] and [`Client::fill_chunks`] drive `celer
//! volume flatten` (module `flatten`): a `Fill` per piece to every member
//! that takes writes, on the control path (blocking connections of their
//! own), retried like a write; see celer-proto for the op.
//!
//! `tests/alloc.rs` checks the no-allocation claim with a counting
//! allocator: 4 KiB writes and reads at depth 1 and 32 allocate nothing on
//! the submitting thread once the connections are open.

mod allocation;
mod flatten;
mod hlc;
mod net;
mod queue;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celer_device::{BlockDevice, DeviceInfo, DeviceQueue, IoError};
use celer_proto::auth::{HelloProof, NONCE_BYTES};
use celer_proto::{decode_header, Header, Kind, Op, Status, HEADER_BYTES, PAYLOAD_MAX_BYTES};
use celer_route::{RouteDecodeError, RouteTable};

pub use celer_proto::auth::{Capability, Credential};
pub use celer_tls;

pub use flatten::{FillError, FillOptions, FillProgress, FILL_PIECE_MAX_BYTES};
pub use queue::{INFLIGHT_MAX, PARTS_MAX};

/// Block size the client exposes; offsets and lengths are multiples of it.
pub const BLOCK_BYTES: u64 = 4096;
/// Largest request (one frame's payload at most).
pub const REQUEST_MAX_BYTES: u64 = PAYLOAD_MAX_BYTES as u64;
/// How long `probe_route` waits for a node.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Which member serves reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReadPolicy {
    /// The partition's primary (its first in-sync member).
    #[default]
    Primary,
    /// Any in-sync member, chosen round-robin per queue.
    AnyInSync,
}

/// How to reach a volume.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Data addresses (`host:port`) of storage nodes to learn the route from.
    pub seeds: Vec<String>,
    pub volume: u64,
    pub size_bytes: u64,
    /// What the client proves to every node: a capability for `volume`
    /// (its attachment id names the client's writes) and its key.
    pub credential: Credential,
    /// Added to this host's wall clock for write versions (simulating a
    /// host whose clock is wrong; 0 in production).
    pub clock_skew_ms: i64,
    /// Writes up to this many bytes go to every member; larger ones to the primary.
    pub small_write_max: u32,
    /// The volume's logical sector size, 512 or 4096 (`Volume::sector_size_bytes`):
    /// the alignment the client accepts and the block size front ends show.
    pub sector_bytes: u32,
    /// A member that has not answered after this long is taken for dead.
    pub request_timeout: Duration,
    /// A request not done after this long fails.
    pub op_deadline: Duration,
    pub read_policy: ReadPolicy,
    /// A connection that carried no frame for a whole interval of this
    /// gets a `Ping`, so a node's idle timeout (default 10 min) never
    /// closes a quiet attachment's connections: keep it well below the
    /// nodes' `--idle-timeout-s`. Zero: no keep-alive.
    pub keepalive: Duration,
    /// The lineage whose placement the volume's chunks follow (a clone's
    /// is its parent's; `Volume::lineage`). 0: the volume's id.
    pub lineage: u64,
    /// The head era the client knows at start (`Volume::head_era`); it
    /// learns newer ones from the nodes (see celer-proto, "Snapshots").
    pub era: u32,
    /// Read this snapshot (by era) instead of the volume: read-only.
    pub read_snapshot: Option<u32>,
    /// Data TLS (nodes started with `--tls-creds`): the CA the nodes'
    /// certificates must be signed by and the client certificate this
    /// client presents ([`celer_tls::DataTls::load_client`]). None: plain.
    pub data_tls: Option<celer_tls::DataTls>,
}

/// Default of [`ClientConfig::keepalive`]: a quiet connection is pinged
/// within 2 minutes, far inside a node's default 10-minute idle timeout.
pub const KEEPALIVE_DEFAULT: Duration = Duration::from_secs(60);

impl ClientConfig {
    pub fn new(seeds: Vec<String>, volume: u64, size_bytes: u64, credential: Credential) -> Self {
        ClientConfig {
            seeds,
            volume,
            size_bytes,
            credential,
            clock_skew_ms: 0,
            small_write_max: 4096,
            sector_bytes: 4096,
            request_timeout: Duration::from_millis(500),
            op_deadline: Duration::from_secs(30),
            read_policy: ReadPolicy::Primary,
            keepalive: KEEPALIVE_DEFAULT,
            lineage: 0,
            era: 0,
            read_snapshot: None,
            data_tls: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no seed node given: pass the data address (host:port) of at least one storage node")]
    NoSeeds,
    #[error("volume size {0} bytes is not a positive multiple of {BLOCK_BYTES}")]
    Size(u64),
    #[error("logical sector size {0}: must be 512 or 4096")]
    SectorSize(u32),
    #[error(
        "request_timeout and op_deadline must be positive, and request_timeout at most op_deadline"
    )]
    Timeouts,
    #[error("cannot resolve storage node address {addr}: {reason}")]
    Resolve { addr: String, reason: String },
    #[error("cannot talk to storage node {addr}: {source} (is the node running and reachable?)")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("storage node {addr} broke the protocol: {reason}")]
    Protocol { addr: String, reason: String },
    #[error("storage node {addr} sent a route table that does not decode: {source}")]
    Route {
        addr: String,
        source: RouteDecodeError,
    },
    #[error("no seed node handed out a route table: {0}")]
    NoRoute(String),
    #[error("cannot shrink the volume from {size_bytes} to {new_size_bytes} bytes: only growing is supported")]
    Shrink {
        size_bytes: u64,
        new_size_bytes: u64,
    },
    #[error("{0}")]
    Credential(String),
    #[error("data TLS with storage node {addr}: {reason}")]
    Tls { addr: String, reason: String },
}

/// The fence generation a credential carries (0 for a node credential).
pub fn fence_of(c: &Credential) -> u32 {
    match c {
        Credential::Attachment { capability, .. } => capability.fence,
        Credential::Node { .. } => 0,
    }
}

/// The attachment id a credential names (0 for a node credential).
pub fn attachment_of(c: &Credential) -> u32 {
    match c {
        Credential::Attachment { capability, .. } => capability.attachment,
        Credential::Node { .. } => 0,
    }
}

/// A credential minted locally with the cluster secret, as the control
/// service does (tests and operator tools on a node's host).
pub fn mint_credential(
    cluster_secret: &str,
    volume: u64,
    attachment: u32,
    read_only: bool,
    ttl: Duration,
) -> Credential {
    let key = celer_proto::auth::data_key_from_secret(cluster_secret);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let capability = Capability::mint(
        &key,
        volume,
        attachment,
        0,
        read_only,
        now + ttl.as_millis() as u64,
    );
    Credential::Attachment {
        key: capability.attachment_key(&key),
        capability,
    }
}

/// What the queues of one client share.
pub(crate) struct Shared {
    pub(crate) hlc: hlc::Hlc,
    /// The volume's size; grows online with [`Client::grow`].
    pub(crate) size_bytes: AtomicU64,
    /// The newest table any queue has seen (read when a queue opens).
    pub(crate) table: Mutex<Arc<RouteTable>>,
    /// The newest credential ([`Client::renew`]) and its generation, which
    /// each queue checks once per poll.
    pub(crate) credential: Mutex<Arc<Credential>>,
    pub(crate) credential_gen: AtomicU64,
    /// The newest head era of the volume any queue has learned: writes
    /// name it (see celer-proto, "Snapshots").
    pub(crate) era: AtomicU64,
    /// See ClientConfig::data_tls.
    pub(crate) data_tls: Option<celer_tls::DataTls>,
}

impl Shared {
    pub(crate) fn credential(&self) -> (Arc<Credential>, u64) {
        let c = self
            .credential
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (c, self.credential_gen.load(Ordering::Acquire))
    }
}

/// A volume served by the storage nodes.
pub struct Client {
    cfg: ClientConfig,
    info: DeviceInfo,
    shared: Arc<Shared>,
    /// Connections for [`BlockDevice::allocation`] (control path).
    chunk_lists: allocation::ChunkLists,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("volume", &self.cfg.volume)
            .field("epoch", &self.route_table().epoch)
            .finish()
    }
}

impl Client {
    /// Learns the first route table from the seeds (the first that answers).
    pub fn connect(cfg: ClientConfig) -> Result<Client, ClientError> {
        if cfg.seeds.is_empty() {
            return Err(ClientError::NoSeeds);
        }
        if cfg.size_bytes == 0 || !cfg.size_bytes.is_multiple_of(BLOCK_BYTES) {
            return Err(ClientError::Size(cfg.size_bytes));
        }
        if !matches!(cfg.sector_bytes, 512 | 4096) {
            return Err(ClientError::SectorSize(cfg.sector_bytes));
        }
        if cfg.request_timeout.is_zero()
            || cfg.op_deadline.is_zero()
            || cfg.request_timeout > cfg.op_deadline
        {
            return Err(ClientError::Timeouts);
        }
        if let Credential::Attachment { capability, .. } = &cfg.credential {
            if capability.volume != cfg.volume {
                return Err(ClientError::Credential(format!(
                    "the capability is for volume {}, not volume {}",
                    capability.volume, cfg.volume
                )));
            }
        }
        let mut errors = Vec::new();
        let mut table = None;
        for seed in &cfg.seeds {
            match fetch_route(
                seed,
                &cfg.credential,
                PROBE_TIMEOUT.min(cfg.op_deadline),
                cfg.data_tls.as_ref(),
            ) {
                Ok(t) => {
                    table = Some(t);
                    break;
                }
                Err(e) => {
                    tracing::warn!(seed, error = %e, "seed node did not hand out a route table");
                    errors.push(format!("{seed}: {e}"));
                }
            }
        }
        let Some(table) = table else {
            return Err(ClientError::NoRoute(errors.join("; ")));
        };
        tracing::info!(
            volume = cfg.volume,
            epoch = table.epoch,
            nodes = table.nodes.len(),
            partitions = table.partition_count(),
            "client connected"
        );
        let size_bytes = cfg.size_bytes;
        let read_only = cfg.read_snapshot.is_some()
            || matches!(&cfg.credential, Credential::Attachment { capability, .. } if capability.read_only);
        Ok(Client {
            info: volume_info(cfg.volume, cfg.size_bytes, cfg.sector_bytes, read_only),
            shared: Arc::new(Shared {
                hlc: hlc::Hlc::with_skew(cfg.clock_skew_ms),
                size_bytes: AtomicU64::new(size_bytes),
                table: Mutex::new(Arc::new(table)),
                credential: Mutex::new(Arc::new(cfg.credential.clone())),
                credential_gen: AtomicU64::new(0),
                era: AtomicU64::new(cfg.era as u64),
                data_tls: cfg.data_tls.clone(),
            }),
            cfg,
            chunk_lists: allocation::ChunkLists::default(),
        })
    }

    /// The newest route table a queue of this client has installed.
    pub fn route_table(&self) -> Arc<RouteTable> {
        self.shared
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    /// The volume's current size.
    pub fn size_bytes(&self) -> u64 {
        self.shared.size_bytes.load(Ordering::Acquire)
    }

    /// Installs a renewed credential (the control service handed a newer
    /// capability): every queue presents it on its open connections at its
    /// next poll (a `Renew` frame, in order with the requests; no pause) and
    /// on every new one. It must be for the same volume and attachment.
    pub fn renew(&self, credential: Credential) -> Result<(), ClientError> {
        let (cur, _) = self.shared.credential();
        let same = match (&*cur, &credential) {
            (
                Credential::Attachment { capability: a, .. },
                Credential::Attachment { capability: b, .. },
            ) => a.volume == b.volume && a.attachment == b.attachment && a.fence == b.fence,
            _ => false,
        };
        if !same {
            return Err(ClientError::Credential(
                "a renewed capability must be for the same volume, attachment and fence generation"
                    .into(),
            ));
        }
        *self
            .shared
            .credential
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(credential);
        self.shared.credential_gen.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// When the credential in use expires (ms since the Unix epoch; `None`
    /// for a node credential).
    pub fn credential_expiry(&self) -> Option<u64> {
        match &*self.shared.credential().0 {
            Credential::Attachment { capability, .. } => Some(capability.expires_unix_ms),
            Credential::Node { .. } => None,
        }
    }

    /// The volume grew to `size_bytes` (the control service resized it):
    /// every queue accepts requests up to the new size from its next
    /// request on. Returns whether the size changed; shrinking is refused
    /// (a guest may hold data there).
    pub fn grow(&self, size_bytes: u64) -> Result<bool, ClientError> {
        if size_bytes == 0 || !size_bytes.is_multiple_of(BLOCK_BYTES) {
            return Err(ClientError::Size(size_bytes));
        }
        let old = self
            .shared
            .size_bytes
            .fetch_max(size_bytes, Ordering::AcqRel);
        if size_bytes < old {
            return Err(ClientError::Shrink {
                size_bytes: old,
                new_size_bytes: size_bytes,
            });
        }
        if size_bytes > old {
            tracing::info!(volume = self.cfg.volume, old, size_bytes, "volume grew");
        }
        Ok(size_bytes > old)
    }
}

impl BlockDevice for Client {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            size_bytes: self.size_bytes(),
            ..self.info.clone()
        }
    }

    fn open_queue(&self, index: usize) -> Result<Box<dyn DeviceQueue>, IoError> {
        let q = queue::ClientQueue::open(index, &self.cfg, &self.info, self.shared.clone())?;
        Ok(Box::new(q))
    }

    /// A write is acknowledged once every member has it durably, and
    /// reads go to in-sync members, which all have it: no queue holds
    /// anything another cannot see, and a flush has nothing to do.
    fn flush_is_device_wide(&self) -> bool {
        true
    }

    /// Every member acknowledges a write once it is durable on its disk.
    fn writes_durable_on_completion(&self) -> bool {
        true
    }

    /// At chunk granularity, from the nodes' chunk lists (see `allocation`).
    fn allocation(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        out: &mut Vec<celer_device::Extent>,
    ) -> Result<(), IoError> {
        self.chunks_since(None, offset_bytes, len_bytes, out)
    }
}

impl Client {
    /// The extents of `[offset_bytes, offset_bytes + len_bytes)` that
    /// changed after the snapshot of era `since`: data where a layer of an
    /// era newer than it (in the chain this client reads: the volume's, or
    /// `ClientConfig::read_snapshot`'s) holds the chunk, holes elsewhere.
    /// At chunk granularity, like [`BlockDevice::allocation`] (which is
    /// this with no era: every layer). For `celer snapshot diff`: the era
    /// must be one of the chain's (a snapshot taken before the one read,
    /// with no rollback between); the caller checks.
    pub fn chunks_since(
        &self,
        since: Option<u32>,
        offset_bytes: u64,
        len_bytes: u64,
        out: &mut Vec<celer_device::Extent>,
    ) -> Result<(), IoError> {
        let layers = allocation::Layers {
            placement: if self.cfg.lineage == 0 {
                self.cfg.volume
            } else {
                self.cfg.lineage
            },
            read_snapshot: self.cfg.read_snapshot,
            since,
        };
        self.chunk_lists.allocation(
            &self.shared,
            self.cfg.volume,
            layers,
            offset_bytes,
            len_bytes,
            self.cfg.op_deadline,
            out,
        )
    }
}

/// What a client of `volume` shows its front end (the same before it
/// connects: a migration destination shows it before it takes over).
pub fn volume_info(volume: u64, size_bytes: u64, sector_bytes: u32, read_only: bool) -> DeviceInfo {
    DeviceInfo {
        size_bytes,
        block_size_bytes: sector_bytes,
        read_only,
        supports_discard: true,
        supports_write_zeroes: true,
        max_request_bytes: REQUEST_MAX_BYTES,
        serial: format!("celer-vol-{volume}").chars().take(20).collect(),
    }
}

/// Fetches the route table of one node (for the CLI and tests):
/// `Challenge`, `Hello` with `credential`, then a `RouteTable` request with
/// epoch 0, answered with the table.
pub fn probe_route(seed: &str, credential: &Credential) -> Result<RouteTable, ClientError> {
    fetch_route(seed, credential, PROBE_TIMEOUT, None)
}

/// [`probe_route`] over data TLS when `tls` is given.
pub fn probe_route_with(
    seed: &str,
    credential: &Credential,
    tls: Option<&celer_tls::DataTls>,
) -> Result<RouteTable, ClientError> {
    fetch_route(seed, credential, PROBE_TIMEOUT, tls)
}

/// A TLS failure, worded for a person, carried inside an `io::Error` from
/// [`NodeStream`] to [`io_error`].
#[derive(Debug)]
struct TlsFailure(String);

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsFailure {}

/// A blocking connection to a node (control path: route probes, chunk
/// lists, flatten), plain or inside data TLS.
pub(crate) enum NodeStream {
    Plain(TcpStream),
    Tls {
        s: Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
        dir: std::path::PathBuf,
    },
}

impl NodeStream {
    /// Connects with `timeout` for the connect and for every read and write
    /// (the TLS handshake runs within the first read or write).
    pub(crate) fn dial(
        addr: &str,
        timeout: Duration,
        tls: Option<&celer_tls::DataTls>,
    ) -> Result<NodeStream, ClientError> {
        let sa = resolve(addr)?;
        let io = io_error(addr);
        let s = TcpStream::connect_timeout(&sa, timeout).map_err(io)?;
        s.set_read_timeout(Some(timeout)).map_err(io)?;
        s.set_write_timeout(Some(timeout)).map_err(io)?;
        s.set_nodelay(true).map_err(io)?;
        let Some(tls) = tls else {
            return Ok(NodeStream::Plain(s));
        };
        let err = |reason: String| ClientError::Tls {
            addr: addr.to_string(),
            reason,
        };
        let config = tls
            .client
            .clone()
            .ok_or_else(|| err("no client certificate loaded".into()))?;
        let name = rustls::pki_types::ServerName::IpAddress(sa.ip().into());
        let conn = rustls::ClientConnection::new(config, name).map_err(|e| err(e.to_string()))?;
        Ok(NodeStream::Tls {
            s: Box::new(rustls::StreamOwned::new(conn, s)),
            dir: tls.dir.clone(),
        })
    }

    pub(crate) fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            NodeStream::Plain(s) => s.peer_addr(),
            NodeStream::Tls { s, .. } => s.sock.peer_addr(),
        }
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            NodeStream::Plain(s) => s.set_read_timeout(t),
            NodeStream::Tls { s, .. } => s.sock.set_read_timeout(t),
        }
    }
}

fn tls_failure(e: std::io::Error, dir: &std::path::Path, in_handshake: bool) -> std::io::Error {
    match celer_tls::wire::tls_error(&e) {
        Some(t) => std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            TlsFailure(celer_tls::describe_client_error(t, dir, in_handshake)),
        ),
        None => e,
    }
}

impl Read for NodeStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            NodeStream::Plain(s) => s.read(buf),
            NodeStream::Tls { s, dir } => {
                let hs = s.conn.is_handshaking();
                s.read(buf).map_err(|e| tls_failure(e, dir, hs))
            }
        }
    }
}

impl Write for NodeStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            NodeStream::Plain(s) => s.write(buf),
            NodeStream::Tls { s, dir } => {
                let hs = s.conn.is_handshaking();
                s.write(buf).map_err(|e| tls_failure(e, dir, hs))
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            NodeStream::Plain(s) => s.flush(),
            NodeStream::Tls { s, dir } => {
                let hs = s.conn.is_handshaking();
                s.flush().map_err(|e| tls_failure(e, dir, hs))
            }
        }
    }
}

fn resolve(addr: &str) -> Result<SocketAddr, ClientError> {
    let err = |reason: String| ClientError::Resolve {
        addr: addr.to_string(),
        reason,
    };
    addr.to_socket_addrs()
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no address".to_string()))
}

/// `ClientError::Io` of talking to `seed`.
fn io_error(seed: &str) -> impl Fn(std::io::Error) -> ClientError + Copy + '_ {
    move |source| match source
        .get_ref()
        .and_then(|e| e.downcast_ref::<TlsFailure>())
    {
        Some(t) => ClientError::Tls {
            addr: seed.to_string(),
            reason: t.0.clone(),
        },
        None => ClientError::Io {
            addr: seed.to_string(),
            source,
        },
    }
}

/// `ClientError::Protocol` of `seed`'s answers.
fn protocol_error(seed: &str) -> impl Fn(String) -> ClientError + Copy + '_ {
    move |reason| ClientError::Protocol {
        addr: seed.to_string(),
        reason,
    }
}

/// Reads one whole frame (blocking, with the stream's timeouts).
fn read_frame<S: Read>(s: &mut S, seed: &str) -> Result<(Header, Vec<u8>), ClientError> {
    let (io, protocol) = (io_error(seed), protocol_error(seed));
    let mut hb = [0u8; HEADER_BYTES];
    s.read_exact(&mut hb).map_err(io)?;
    let h = decode_header(&hb)
        .map_err(|e| protocol(format!("bad frame: {e}")))?
        .ok_or_else(|| protocol("short header".to_string()))?;
    let mut payload = vec![0u8; h.payload_bytes as usize];
    s.read_exact(&mut payload).map_err(io)?;
    h.verify_payload([payload.as_slice()])
        .map_err(|e| protocol(e.to_string()))?;
    Ok((h, payload))
}

fn fetch_route(
    seed: &str,
    credential: &Credential,
    timeout: Duration,
    tls: Option<&celer_tls::DataTls>,
) -> Result<RouteTable, ClientError> {
    let (io, protocol) = (io_error(seed), protocol_error(seed));
    let mut s = NodeStream::dial(seed, timeout, tls)?;
    let (challenge, node_nonce) = match read_frame(&mut s, seed) {
        Err(ClientError::Io { source, .. })
            if tls.is_none()
                && matches!(
                    source.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::UnexpectedEof
                ) =>
        {
            return Err(protocol(format!(
                "no Challenge from the node within {timeout:?} ({source}): a node with data TLS (celer node serve --tls-creds) says nothing to a plain client; give this client --data-tls-creds DIR"
            )));
        }
        r => r?,
    };
    if challenge.kind != Kind::Request
        || challenge.op != Op::Challenge
        || node_nonce.len() != NONCE_BYTES
    {
        return Err(protocol(format!(
            "expected the node's Challenge, got {:?} {:?}",
            challenge.kind, challenge.op
        )));
    }
    let mut nn = [0u8; NONCE_BYTES];
    nn.copy_from_slice(&node_nonce);
    let mut peer_nonce = [0u8; NONCE_BYTES];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut peer_nonce);
    let sender = attachment_of(credential) as u64;
    let proof = HelloProof::build(credential, &nn, &peer_nonce, 0, sender, false);
    let mut hello = Header::request(Op::Hello, 1).with_payload([proof.as_slice()]);
    hello.volume = sender;
    let ask = Header::request(Op::RouteTable, 2);
    let mut out = Vec::with_capacity(2 * HEADER_BYTES + proof.len());
    out.extend_from_slice(&hello.encode());
    out.extend_from_slice(&proof);
    out.extend_from_slice(&ask.encode());
    s.write_all(&out).map_err(io)?;
    let mut proven = false;
    loop {
        let (h, payload) = read_frame(&mut s, seed)?;
        if h.kind != Kind::Response {
            return Err(protocol(format!(
                "a request ({:?}) instead of a response",
                h.op
            )));
        }
        match (h.request_id, h.op, h.status) {
            (1, Op::Hello, Status::Ok) => {
                if !HelloProof::check_answer(credential.answer_key(), &nn, &peer_nonce, &payload) {
                    return Err(protocol(
                        "the node did not prove it knows the credential's key: not a node of this cluster".into(),
                    ));
                }
                proven = true;
            }
            (1, _, Status::Unauthorized) => {
                return Err(ClientError::Credential(format!(
                    "storage node {seed} refused the credential (another cluster's, expired, or forged)"
                )))
            }
            (1, _, status) => return Err(protocol(format!("hello refused: {status:?}"))),
            (2, _, _) if !proven => {
                return Err(protocol("an answer before the node's proof".into()))
            }
            (2, Op::RouteTable, Status::StaleEpoch | Status::Ok) if !payload.is_empty() => {
                return RouteTable::decode(&payload).map_err(|source| ClientError::Route {
                    addr: seed.to_string(),
                    source,
                });
            }
            (2, _, status) => {
                return Err(protocol(format!(
                    "route table request answered with {status:?} and {} payload bytes",
                    payload.len()
                )))
            }
            (id, _, _) => return Err(protocol(format!("answer to unknown request {id}"))),
        }
    }
}
