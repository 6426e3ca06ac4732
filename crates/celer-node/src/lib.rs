//! celer-node: a storage node. One engine (one disk), cut into shards; each
//! shard runs on its own thread and owns its engine shard, its connections
//! and the partitions `p` with `p % shards == shard` (the engine places
//! chunks the same way, see `celer_device::chunk_hash`). Nothing on the I/O
//! path is shared between shards.
//!
//! A node serves the celer-proto conversation (see celer-proto's doc):
//! reads from in-sync members, writes applied by version, primary
//! forwarding for large writes, route hand-out to clients with an old epoch,
//! and backfill of partitions where it is a new (syncing) member.
//!
//! Around the shards: an acceptor thread authenticates each new connection
//! (see `handshake`) and hands it to the shard its `Hello` names; the admin HTTP server (routes pushed by the
//! control service, `/metrics`, `/v1/status`); the agent thread registers
//! with the control service, heartbeats, fetches routes on demand and
//! reports finished backfills.

mod admin;
mod agent;
mod conn;
pub mod core;
mod handshake;
mod hub;
mod identity;
mod metrics;
pub mod net;
mod progress;
pub(crate) mod shard;
mod space;

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use celer_engine::{Engine, EngineError, OpenOptions};
use celer_meta_api::api::VolumeLayers;
use celer_route::{NodeId, RouteTable};

pub use identity::{JoinOptions, REGISTER_TIMEOUT_DEFAULT};
pub use metrics::NodeMetrics;
pub use progress::BackfillProgress;

pub(crate) use hub::*;
pub(crate) use progress::ProgressCell;

#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The engine disk (formatted with `celer engine format`).
    pub disk: PathBuf,
    /// Where releases before disks recorded their node kept its id
    /// (`node.id`): read for such a disk only, never written.
    pub state_dir: PathBuf,
    /// Data (celer-proto) listener.
    pub listen: SocketAddr,
    /// Address others use to reach the data listener (default: `listen`).
    pub advertise: Option<String>,
    /// Admin HTTP listener (routes, /metrics, /v1/status).
    pub admin_listen: SocketAddr,
    /// Control service base URL; `None`: routes come from `route_file` or
    /// `PUT /v1/route` only.
    pub meta_url: Option<String>,
    /// Cluster secret presented to and required from the control plane;
    /// the data key (node to node, and the capabilities clients present) is
    /// derived from it (`celer_proto::auth::data_key_from_secret`).
    pub token: String,
    /// Fixed node id (without a control service).
    pub node_id: Option<NodeId>,
    pub domain: String,
    /// A JSON route table to start with.
    pub route_file: Option<PathBuf>,
    /// A member that does not answer a forwarded write within this is
    /// reported `Unavailable` to the client.
    pub forward_timeout: Duration,
    /// After activity, keep polling sockets and disk this long before
    /// sleeping in epoll (0: sleep at once).
    pub busy_poll: Duration,
    /// Accept every peer of the data port without checking its proof or
    /// capability (it may do anything): only to measure what
    /// authentication costs; refused unless `listen` is a loopback address.
    pub insecure_no_auth: bool,
    /// Close a client's (attachment's) data connection that sent nothing
    /// for this long while none of its requests is in flight (None:
    /// never). Clients ping quiet connections every
    /// `celer_client::KEEPALIVE_DEFAULT` (60 s), so a quiet attachment
    /// keeps its connections; one whose host vanished loses them.
    pub idle_timeout: Option<Duration>,
    /// Scrub rate: data bytes read per second by the whole node (shared
    /// by its shards; 0: no scrub). See [`SCRUB_RATE_DEFAULT`].
    pub scrub_bytes_per_sec: u64,
    /// A scrub pass starts this long after the previous one started (the
    /// first a minute after the node starts; `celer scrub start` starts
    /// one now).
    pub scrub_interval: Duration,
    /// Data TLS credentials (QEMU tls-creds-x509 layout, see celer-tls):
    /// the data port then speaks mutual TLS only, and the node's own
    /// connections to other nodes present `client-cert.pem`. None: plain.
    pub tls_creds: Option<PathBuf>,
    /// Put the shards' fixed buffers (the engine's journal and request
    /// buffers, the node's request buffers) on 2 MiB huge pages when the
    /// kernel has them reserved and free (`vm.nr_hugepages`); 4 KiB pages
    /// otherwise. Off by default: reserved huge pages are usually meant
    /// for guest memory. `celer_node_buffer_bytes{pages}` says which.
    pub hugepages: bool,
}

/// Default scrub rate: a pass over 4 GiB of data takes 8.5 minutes.
pub const SCRUB_RATE_DEFAULT: u64 = 8 << 20;
/// Default time between scrub passes.
pub const SCRUB_INTERVAL_DEFAULT: Duration = Duration::from_secs(24 * 3600);
/// Default of [`NodeConfig::idle_timeout`].
pub const IDLE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("bad configuration: {0}")]
    Config(String),
    #[error("control service: {0}")]
    Meta(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Io { what, source }
}

/// Shared, read-mostly facts a node's threads need.
pub(crate) struct NodeShared {
    pub(crate) id: NodeId,
    pub(crate) shards: u16,
    /// The engine disk's identity, sent when registering.
    pub(crate) disk_uuid: u64,
    /// The engine disk (its file system's room is checked).
    pub(crate) disk: PathBuf,
    pub(crate) hub: RouteHub,
    pub(crate) agent: Mutex<Option<Sender<AgentMsg>>>,
    pub(crate) metrics: NodeMetrics,
    pub(crate) token: String,
    /// The cluster data key (see celer_proto::auth).
    pub(crate) data_key: celer_proto::auth::Key,
    /// See NodeConfig::insecure_no_auth.
    pub(crate) insecure_no_auth: bool,
    /// See NodeConfig::tls_creds (both configs are present when set).
    pub(crate) tls: Option<celer_tls::DataTls>,
    /// Why the node cannot serve (a failed engine shard); heartbeats carry
    /// it and the control service moves the node's partitions away.
    failure: Mutex<Option<String>>,
    /// Connections held (handshaking and established), and per address.
    pub(crate) conns_open: std::sync::atomic::AtomicUsize,
    pub(crate) limits: handshake::ConnLimits,
    pub(crate) stopping: AtomicBool,
    /// Per shard: the epoch of the table it serves (installed, not just
    /// queued to it). Heartbeats report the lowest: the control service
    /// drops a member that has left a partition only once the node serves
    /// a table that says so (see `celer_route::RouteTable::keep_leavers`).
    pub(crate) served_epochs: Vec<AtomicU64>,
    /// Per shard: partitions being backfilled.
    pub(crate) backfilling: Vec<std::sync::atomic::AtomicUsize>,
    /// Per shard: allocated engine chunks (space in use), for status.
    pub(crate) chunks: Vec<std::sync::atomic::AtomicUsize>,
    /// Per shard: backfill figures (heartbeats, status, metrics).
    pub(crate) progress: Vec<ProgressCell>,
    /// Scrub controls and per-shard figures.
    pub(crate) scrub: shard::ScrubShared,
}

impl NodeShared {
    /// The shared state of a node of one shard that runs no threads of its
    /// own (no acceptor, agent, admin server or mailboxes): the simulator's
    /// nodes (`core::NodeCore`).
    pub(crate) fn detached(id: NodeId, data_key: celer_proto::auth::Key) -> NodeShared {
        NodeShared {
            id,
            shards: 1,
            disk_uuid: 0,
            disk: PathBuf::new(),
            hub: RouteHub {
                current: Mutex::new(None),
                epoch: AtomicU64::new(0),
                shards: Vec::new(),
            },
            agent: Mutex::new(None),
            metrics: NodeMetrics::new(1),
            token: String::new(),
            data_key,
            insecure_no_auth: false,
            tls: None,
            failure: Mutex::new(None),
            conns_open: std::sync::atomic::AtomicUsize::new(0),
            limits: handshake::ConnLimits::default(),
            stopping: AtomicBool::new(false),
            served_epochs: vec![AtomicU64::new(0)],
            backfilling: vec![std::sync::atomic::AtomicUsize::new(0)],
            chunks: vec![std::sync::atomic::AtomicUsize::new(0)],
            progress: vec![ProgressCell::default()],
            scrub: shard::ScrubShared::new(1),
        }
    }

    /// Records that the node cannot serve (the first reason is kept).
    pub(crate) fn report_failure(&self, why: String) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            tracing::error!("the node cannot serve: {why}; the control service is told, its partitions move away");
            *f = Some(why);
        }
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The epoch every shard serves (the lowest of theirs).
    pub(crate) fn served_epoch(&self) -> u64 {
        self.served_epochs
            .iter()
            .map(|e| e.load(Ordering::Acquire))
            .min()
            .unwrap_or(0)
    }

    pub(crate) fn tell_agent(&self, m: AgentMsg) {
        if let Some(tx) = self
            .agent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = tx.send(m);
        }
    }

    /// The node's backfill figures: the sum of its shards'.
    pub(crate) fn backfill_progress(&self) -> BackfillProgress {
        self.progress
            .iter()
            .map(ProgressCell::load)
            .fold(BackfillProgress::default(), |a, b| a + b)
    }
}

/// A running node.
pub struct Node {
    shared: Arc<NodeShared>,
    threads: Vec<JoinHandle<Result<(), NodeError>>>,
    aux: Vec<JoinHandle<()>>,
    data_addr: SocketAddr,
    admin_addr: SocketAddr,
}

impl Node {
    /// Opens the engine, binds the listeners and starts every thread.
    pub fn start(cfg: NodeConfig) -> Result<Node, NodeError> {
        Node::start_with(cfg, JoinOptions::default())
    }

    /// [`Node::start`], with how the node joins its cluster.
    pub fn start_with(cfg: NodeConfig, join: JoinOptions) -> Result<Node, NodeError> {
        if cfg.insecure_no_auth && !cfg.listen.ip().is_loopback() {
            return Err(NodeError::Config(format!(
                "--insecure-no-auth lets anyone read and write every volume: refused on {}, only a loopback address may serve without authentication",
                cfg.listen
            )));
        }
        let tls = match &cfg.tls_creds {
            Some(dir) => Some(
                celer_tls::DataTls::load_node(dir)
                    .map_err(|e| NodeError::Config(format!("--tls-creds: {e}")))?,
            ),
            None => None,
        };
        if cfg.insecure_no_auth {
            tracing::warn!(listen = %cfg.listen, "the data port checks no credential (--insecure-no-auth): for benchmarks only");
        }
        let engine = Engine::open(
            &cfg.disk,
            &OpenOptions {
                completion_eventfd: true,
                hugepages: cfg.hugepages,
                ..OpenOptions::default()
            },
        )?;
        let disk_uuid = engine.geometry().disk_uuid;
        let disk_node = identity::disk_node_id(&cfg.disk, engine.node_id())?;
        let shards = engine.into_shards();
        let shard_count = shards.len() as u16;
        if !shard_count.is_power_of_two() {
            return Err(NodeError::Config(format!(
                "{} has {shard_count} engine shards: a node needs a power of two (format with --shards 1, 2, 4, ...)",
                cfg.disk.display()
            )));
        }
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(io_err(format!("create {}", cfg.state_dir.display())))?;
        let listener =
            TcpListener::bind(cfg.listen).map_err(io_err(format!("bind {}", cfg.listen)))?;
        let data_addr = listener.local_addr().map_err(io_err("local address"))?;
        let admin = TcpListener::bind(cfg.admin_listen)
            .map_err(io_err(format!("bind {}", cfg.admin_listen)))?;
        let admin_addr = admin.local_addr().map_err(io_err("local address"))?;

        let claim = identity::claim(&cfg, &join, disk_node)?;
        let mut mailboxes = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..shard_count {
            let (tx, rx) = mpsc::channel();
            let wake = Arc::new(new_eventfd()?);
            mailboxes.push(ShardMailbox {
                tx,
                wake: wake.clone(),
            });
            receivers.push((rx, wake));
        }
        let advertise = cfg
            .advertise
            .clone()
            .unwrap_or_else(|| data_addr.to_string());
        // The node id: the disk's (see `identity`), or assigned by the
        // control service; then recorded on the disk.
        let (id, agent_setup) = match &cfg.meta_url {
            Some(url) => {
                let client = celer_meta_api::client::MetaClient::new(url, &cfg.token);
                let req = celer_meta_api::api::RegisterNode {
                    node_id: claim.id,
                    data_addr: advertise.clone(),
                    admin_addr: admin_addr.to_string(),
                    shards: shard_count,
                    domain: cfg.domain.clone(),
                    disk_uuid: Some(disk_uuid),
                    replace_disk: claim.replace_disk,
                };
                let (reg, sent) =
                    agent::register(&client, &req, join.register_timeout).map_err(|e| match e {
                        NodeError::Meta(m) => NodeError::Meta(format!("{m} ({})", claim.why)),
                        e => e,
                    })?;
                let lease_until = sent + celer_meta_api::api::node_serves_for(reg.lease_ms);
                (reg.node_id, Some((client, reg, lease_until)))
            }
            None => (
                claim.id.ok_or_else(|| {
                    NodeError::Config(
                        "no node id: give --node-id or a control service (--meta)".into(),
                    )
                })?,
                None,
            ),
        };
        identity::record(&cfg.disk, disk_node, id)?;
        let shared = Arc::new(NodeShared {
            id,
            shards: shard_count,
            disk_uuid,
            hub: RouteHub {
                current: Mutex::new(None),
                epoch: AtomicU64::new(0),
                shards: mailboxes,
            },
            agent: Mutex::new(None),
            metrics: NodeMetrics::new(shard_count),
            token: cfg.token.clone(),
            data_key: celer_proto::auth::data_key_from_secret(&cfg.token),
            insecure_no_auth: cfg.insecure_no_auth,
            tls,
            failure: Mutex::new(None),
            disk: cfg.disk.clone(),
            conns_open: std::sync::atomic::AtomicUsize::new(0),
            limits: handshake::ConnLimits::default(),
            stopping: AtomicBool::new(false),
            served_epochs: (0..shard_count).map(|_| AtomicU64::new(0)).collect(),
            backfilling: (0..shard_count)
                .map(|_| std::sync::atomic::AtomicUsize::new(0))
                .collect(),
            chunks: (0..shard_count)
                .map(|_| std::sync::atomic::AtomicUsize::new(0))
                .collect(),
            progress: (0..shard_count).map(|_| ProgressCell::default()).collect(),
            scrub: shard::ScrubShared::new(shard_count),
        });
        if let Some((_, reg, lease_until)) = &agent_setup {
            // Queued before the shards start: nothing is served before.
            let fences = reg.fences.iter().map(|f| (f.volume, f.fence)).collect();
            shared.hub.set_fences(fences, None).ok();
            if admin::check_layers(&reg.layers).is_ok() {
                shared.hub.set_layers(reg.layers.clone(), None).ok();
            }
            shared.hub.set_lease(*lease_until);
        }
        let mut threads = Vec::new();
        for (engine_shard, (rx, wake)) in shards.into_iter().zip(receivers) {
            let shared = shared.clone();
            let cfg = shard::ShardConfig {
                forward_timeout: cfg.forward_timeout,
                busy_poll: cfg.busy_poll,
                idle_timeout: cfg.idle_timeout,
                scrub_bytes_per_sec: cfg.scrub_bytes_per_sec / shard_count.max(1) as u64,
                scrub_interval: cfg.scrub_interval,
                hugepages: cfg.hugepages,
            };
            let idx = engine_shard.id();
            let t = std::thread::Builder::new()
                .name(format!("celer-node-{idx}"))
                .spawn(move || {
                    // A shard that stops (an epoll error, a panic) while the
                    // node runs leaves its partitions unserved: reported, so
                    // they move.
                    let run = std::panic::AssertUnwindSafe(|| {
                        shard::run(engine_shard, rx, wake, shared.clone(), cfg)
                    });
                    let r = std::panic::catch_unwind(run);
                    let stopping = shared.stopping.load(Ordering::Acquire);
                    match r {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => {
                            shared.report_failure(format!("shard {idx} stopped: {e}"));
                            Err(e)
                        }
                        Err(_) => {
                            if !stopping {
                                shared.report_failure(format!("shard {idx} panicked"));
                            }
                            Err(NodeError::Config(format!("shard {idx} panicked")))
                        }
                    }
                })
                .map_err(io_err("spawn shard thread"))?;
            threads.push(t);
        }
        if let Some(path) = &cfg.route_file {
            let text = std::fs::read_to_string(path)
                .map_err(io_err(format!("read {}", path.display())))?;
            let table: RouteTable = serde_json::from_str(&text).map_err(|e| {
                NodeError::Config(format!("{}: not a route table: {e}", path.display()))
            })?;
            table
                .validate()
                .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))?;
            shared.hub.install(table);
        }
        let mut aux = Vec::new();
        {
            let shared = shared.clone();
            aux.push(
                std::thread::Builder::new()
                    .name("celer-node-accept".into())
                    .spawn(move || handshake::accept_loop(listener, shared))
                    .map_err(io_err("spawn acceptor"))?,
            );
        }
        {
            let shared = shared.clone();
            aux.push(
                std::thread::Builder::new()
                    .name("celer-node-admin".into())
                    .spawn(move || admin::serve(admin, shared))
                    .map_err(io_err("spawn admin server"))?,
            );
        }
        if let Some((client, reg, lease_until)) = agent_setup {
            let (tx, rx) = mpsc::channel();
            *shared.agent.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
            let shared2 = shared.clone();
            aux.push(
                std::thread::Builder::new()
                    .name("celer-node-agent".into())
                    .spawn(move || agent::run(client, reg, lease_until, rx, shared2))
                    .map_err(io_err("spawn agent"))?,
            );
        }
        tracing::info!(node = id, %data_addr, %admin_addr, shards = shard_count, "node started");
        Ok(Node {
            shared,
            threads,
            aux,
            data_addr,
            admin_addr,
        })
    }

    pub fn id(&self) -> NodeId {
        self.shared.id
    }
    pub fn data_addr(&self) -> SocketAddr {
        self.data_addr
    }
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }
    pub fn epoch(&self) -> u64 {
        self.shared.hub.epoch()
    }
    /// Partitions this node is backfilling right now (recovery in progress).
    pub fn backfilling(&self) -> usize {
        self.shared
            .backfilling
            .iter()
            .map(|a| a.load(Ordering::Acquire))
            .sum()
    }

    /// Bytes moved and to move by this node's backfills in the rebalance
    /// under way (see [`BackfillProgress`]).
    pub fn backfill_progress(&self) -> BackfillProgress {
        self.shared.backfill_progress()
    }

    /// Engine chunks allocated on this node (thin: space in use).
    pub fn allocated_chunks(&self) -> usize {
        self.shared
            .chunks
            .iter()
            .map(|a| a.load(Ordering::Acquire))
            .sum()
    }

    /// Installs a route table (as `PUT /v1/route` does).
    pub fn install_route(&self, table: RouteTable) -> bool {
        self.shared.hub.install(table)
    }

    /// Stops every thread; shards drain and checkpoint their engine.
    pub fn stop(self) -> Result<(), NodeError> {
        self.shared.stopping.store(true, Ordering::Release);
        for s in &self.shared.hub.shards {
            s.send(ShardMsg::Stop);
        }
        self.shared.tell_agent(AgentMsg::Stop);
        let mut result = Ok(());
        for t in self.threads {
            match t.join() {
                Ok(Err(e)) if result.is_ok() => result = Err(e),
                Err(_) if result.is_ok() => {
                    result = Err(NodeError::Config("a shard thread panicked".into()))
                }
                _ => {}
            }
        }
        for t in self.aux {
            let _ = t.join();
        }
        result
    }

    /// Blocks until the node stops (for the daemon).
    pub fn wait(self) -> Result<(), NodeError> {
        while !self.shared.stopping.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(200));
        }
        self.stop()
    }

    /// A handle that can stop the node from a signal handler thread.
    pub fn stopper(&self) -> impl Fn() + Send + 'static {
        let shared = self.shared.clone();
        move || shared.stopping.store(true, Ordering::Release)
    }
}

/// Wall-clock ms since the Unix epoch (capability expiry, version bounds).
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader never sees figures from two different writes, however the
    /// writer's stores interleave with its loads.
    #[test]
    fn progress_cell_reads_whole_figures() {
        let cell = Arc::new(ProgressCell::default());
        let stop = Arc::new(AtomicBool::new(false));
        // Reads so far: the writer goes on until the reader has run beside
        // it (on a loaded machine the reader thread may start late).
        let seen = Arc::new(AtomicU64::new(0));
        let reader = {
            let (cell, stop, seen) = (cell.clone(), stop.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let p = cell.load();
                    // Every write below has done <= total, unlisted =
                    // total - done and copied = done + total.
                    assert!(p.bytes_done <= p.bytes_total, "{p:?}");
                    assert_eq!(p.partitions_unlisted, p.bytes_total - p.bytes_done, "{p:?}");
                    assert_eq!(p.bytes_copied, p.bytes_done + p.bytes_total, "{p:?}");
                    reads += 1;
                    seen.store(reads, Ordering::Relaxed);
                }
                reads
            })
        };
        // Totals that rise and fall (lists, retired backfills, round ends).
        let mut i = 0u64;
        while i < 500_000 || seen.load(Ordering::Relaxed) < 10_000 {
            i += 1;
            let total = (i * 7919) % 1000;
            let done = if total == 0 {
                0
            } else {
                (i * 104_729) % (total + 1)
            };
            cell.store(BackfillProgress {
                bytes_done: done,
                bytes_total: total,
                partitions_unlisted: total - done,
                bytes_copied: done + total,
            });
        }
        stop.store(true, Ordering::Release);
        let reads = reader.join().expect("reader saw whole figures");
        assert!(reads > 0);
    }
}
