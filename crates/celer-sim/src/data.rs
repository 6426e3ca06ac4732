//! Deterministic simulation of the data path: real storage-node cores
//! (`celer_node::core::NodeCore`, the code `celer node serve` runs, minus
//! its epoll loop) over real engine shards on [`SimDisk`]s, connected by a
//! simulated network ([`crate::net`]), with clients writing and reading one
//! volume, and a checker.
//!
//! One thread, one seed, simulated time in microseconds. Four nodes of one
//! shard hold the partitions (3 replicas), placed by the real control
//! service ([`control`]); they join under load, so the first tables move
//! partitions. With [`DataSimConfig::route_changes`], a node that loses
//! power is marked down when its lease runs out, catches up when it is
//! back, or, down longer, loses its places to another node, which copies
//! the partition whole; with it, operators may split the partitions
//! ([`DataSimConfig::split_per_ms`]) and nodes may come back on new, empty
//! disks ([`DataSimConfig::replace_disk`]). Two clients (two attachments of the volume) write, discard, zero and read at
//! a fixed rate, as Celer's client does: a one-block write (or a sector
//! write) goes to every replica with the same version (the attachment's
//! hybrid clock and its id) and is acknowledged when all three answered
//! `Ok`; a longer write goes as a `WritePrimary` to the partition's primary,
//! which forwards it over its own node-to-node connections; `OlderVersion`
//! makes the client write the same range again with a newer version; a
//! lost connection makes it send again with the same version. A read goes
//! to one of the partition's readers (`PartitionRoute::readers`). Every connection goes through the real handshake: a
//! simulated acceptor per node sends the Challenge and checks the Hello
//! (`HelloProof::check`), then the node's core takes the connection.
//! Faults drawn from the seed: power cuts of a node (its disk keeps a
//! random part of what was not durable, and its writes in flight are
//! torn), at random and aimed just after it acknowledged a discard, after
//! which the node restarts on the same disk; connection
//! resets; stalled connections the client gives up on while the node still
//! gets their bytes, late; wall clocks of nodes and clients off the
//! simulated one and stepped (`DataSimConfig::clock_offset_max_ms`). The
//! network cuts, delays and spreads the byte stream (see [`crate::net`]).
//!
//! The checker: a read returns, for every 512-byte sector, the content of a
//! write that was sent (its pattern, naming its write), never older than
//! the newest write acknowledged before the read was sent (zeroes only
//! where none was, or under a newer discard); at the end, with the faults
//! stopped and every write done, every replica holds, for every sector, the
//! newest acknowledged write; a node closing a connection for a protocol
//! error is a violation too.
//!
//! Time: in a round every node handles what is ready (arrived bytes, its
//! engine's completions, its timers) and every client issues, sends and
//! reads. After a round in which something moved the next one is 1 µs
//! later; otherwise time jumps to the next event: a piece of a byte stream
//! arriving, a disk completing an I/O (the [`SimDisk`]s take simulated
//! latency), a node's timer or heartbeat, a restart, a client's next
//! operation or retry, and at most 1 ms (faults are drawn per simulated
//! millisecond). The report counts rounds, and busy ones.
//!
//! With [`DataSimConfig::takeover_per_ms`], clients take the volume over
//! from each other through the real control service, which fences the
//! other attachment (`takeover.rs`); with
//! [`DataSimConfig::control_cut_per_ms`], a node's agent loses the control
//! service for a while as clients and peers still reach it; each answered
//! registration or heartbeat renews the node core's lease, and past it the
//! core serves nothing.
//!
//! Not simulated yet (docs/testing.md): repair, the real client core,
//! TLS and snapshots.

mod acceptor;
mod checker;
mod clients;
mod control;
mod takeover;

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::rc::Rc;
use std::time::Duration;

use celer_engine::{Engine, FormatOptions, OpenOptions};
use celer_meta::api::AttachMode;
use celer_node::core::{CoreConfig, NodeCore};
use celer_proto::auth::{Capability, Credential, HelloProof, Nonce, NONCE_BYTES};
use celer_proto::{
    clock_of_unix_ms, decode_header, Header, Kind, Op, Status, FLAG_SECTORS, HEADER_BYTES,
};
use celer_route::{NodeId, RouteTable};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::disk::SimDisk;
use crate::net::{NetConfig, SimNet, SimStream, World};
use control::Control;

const BS: usize = 4096;
/// A logical sector: sector writes cover some of a block's eight.
const SECTOR: usize = 512;
const SECTORS: usize = BS / SECTOR;
const CHUNK_BLOCKS: u64 = 16;
const CHUNKS: u64 = 6;
const BLOCKS: u64 = CHUNK_BLOCKS * CHUNKS;
const DISK_BYTES: u64 = 8 << 20;
/// A node whose disk is replaced starts this long after (µs): past the
/// old disk's lease (6 ms with route changes).
const REPLACE_AFTER_US: u64 = 8_000;
const VOLUME: u64 = 7;
const NODES: usize = 4;
const TRACE_KEEP: usize = 80;
/// Requests a client keeps in flight.
const CLIENT_DEPTH: usize = 8;
/// A replica that answered Busy, Io or Unavailable is asked again after this.
const RETRY_US: u64 = 2_000;
/// The cluster's data key: nodes prove it to each other, capabilities are
/// signed with it.
const DATA_KEY: [u8; 32] = [7; 32];

thread_local! {
    static SIM_TIME_US: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The simulated time (µs) of the data simulation running on this thread:
/// what its log lines are stamped with (`celer sim --data` with
/// `CELER_LOG`), so the node cores' lines read against the trace.
pub fn sim_time_us() -> u64 {
    SIM_TIME_US.with(|t| t.get())
}

/// What to simulate.
#[derive(Clone, Debug)]
pub struct DataSimConfig {
    pub seed: u64,
    /// Simulated time with load and faults (µs); then the faults stop and
    /// the clients finish what they started.
    pub duration_us: u64,
    /// Operations per simulated second, per client.
    pub ops_per_sec: u64,
    /// Per simulated millisecond: the chance of a node's power cut, and
    /// of a connection reset.
    pub crash_per_ms: f64,
    pub reset_per_ms: f64,
    /// Per simulated millisecond: the chance that a client connection
    /// stalls for 1-20 ms and the client gives up on it, sending its
    /// requests again on a new one, while the node still gets what the old
    /// one carried, late.
    pub stall_per_ms: f64,
    /// Every node's and client's wall clock starts up to this far off the
    /// simulated one (ms, either way), and per simulated millisecond one
    /// of them is stepped to a new such offset with this chance (NTP
    /// stepping a clock, or a wrong one fixed). Versions come from the
    /// clients' hybrid clocks; the nodes refuse versions far ahead of
    /// theirs.
    pub clock_offset_max_ms: u64,
    pub clock_step_per_ms: f64,
    /// The chance that a node that acknowledged a discard or zeroing loses
    /// power 0-100 µs after the client got the answer: aimed at the window
    /// in which a write older than the discard may still be on its way to
    /// it (FoundationDB calls such aimed faults "buggify"; 0-2 ms missed
    /// it).
    pub crash_after_discard: f64,
    /// The nodes refuse client writes at or below their engine's discard
    /// floor after a restart (always, in a real node). Off only to show
    /// that the simulation finds what it prevents.
    pub restart_floor: bool,
    /// The control service marks a node that lost power down when its
    /// lease runs out (6 ms), so its partitions' members record what it
    /// misses and it catches up when back, and moves its partitions to
    /// other nodes when it stays down past the grace (20 ms). Off: leases
    /// outlast the run, and the route changes only while the four nodes
    /// join at the start.
    pub route_changes: bool,
    /// Per simulated millisecond, with `route_changes`: the chance that an
    /// operator splits the partitions (`celer meta split`: each partition's
    /// new half starts with the old one's members, then the rebalance
    /// moves some of them), up to [`SPLIT_PARTITIONS_MAX`]. 0: none.
    pub split_per_ms: f64,
    /// With `route_changes`: the chance that a node restarting after a
    /// power cut comes back on a new, empty disk (the old one died), and
    /// registers with the operator's `--replace-disk`; only while every
    /// partition it is a member of has another member in sync and not
    /// down, so no more copies go than replication tolerates. 0: never.
    pub replace_disk: f64,
    /// Per simulated millisecond: the chance that a client takes the
    /// volume over (an exclusive attach with `--force` at the real control
    /// service, which raises the fence generation and pushes it to the
    /// nodes; see `takeover.rs`). The clients start as two shared
    /// attachments. 0: none.
    pub takeover_per_ms: f64,
    /// Per simulated millisecond, with `route_changes`: the chance that a
    /// node's agent loses the control service for 10-40 ms while clients
    /// and peers still reach the node (a partition of the management
    /// network). Its heartbeats and the service's pushes (tables, fences)
    /// do not get through; past its lease the service marks it down and a
    /// take-over's fence push no longer waits for it. 0: never.
    pub control_cut_per_ms: f64,
    /// The nodes refuse writes of an older fence generation (always, in a
    /// real node). Off only to show that the simulation finds what the
    /// check prevents.
    pub fence_check: bool,
}

/// Most partitions the data simulation splits to.
pub const SPLIT_PARTITIONS_MAX: u32 = 32;

impl DataSimConfig {
    pub fn new(seed: u64) -> DataSimConfig {
        DataSimConfig {
            seed,
            duration_us: 2_000_000,
            ops_per_sec: 4_000,
            crash_per_ms: 0.004,
            reset_per_ms: 0.01,
            stall_per_ms: 0.02,
            clock_offset_max_ms: 2_000,
            clock_step_per_ms: 0.002,
            crash_after_discard: 0.02,
            restart_floor: true,
            route_changes: false,
            split_per_ms: 0.0,
            replace_disk: 0.0,
            takeover_per_ms: 0.0,
            control_cut_per_ms: 0.0,
            fence_check: true,
        }
    }
}

/// What a run did and found.
#[derive(Clone, Debug, Default)]
pub struct DataReport {
    pub seed: u64,
    /// Simulated time at the end (µs).
    pub sim_us: u64,
    /// Rounds the simulator ran (every node and client looks at its
    /// input), and of them those in which something moved (the next one
    /// is 1 µs later; after the others, time jumps to the next event).
    pub rounds: u64,
    pub busy_rounds: u64,
    pub writes_acked: u64,
    /// Of them, sent to the primary, which forwarded them.
    pub primary_writes: u64,
    /// Of them, sector writes (merged into their block by the nodes).
    pub sector_writes: u64,
    pub rewrites: u64,
    pub reads_checked: u64,
    pub crashes: u64,
    pub resets: u64,
    pub stalls: u64,
    pub discards_acked: u64,
    /// Clocks stepped to a new offset.
    pub clock_steps: u64,
    /// Connections a node closed for a protocol error (a violation: the
    /// simulated network carries bytes faithfully).
    pub protocol_errors: u64,
    /// The route epoch at the end (each a change of the table).
    pub epoch: u64,
    /// Partition splits done (`DataSimConfig::split_per_ms`).
    pub splits: u64,
    /// Nodes restarted on a new disk (`DataSimConfig::replace_disk`).
    pub disks_replaced: u64,
    /// Answers `StaleEpoch` (the client's table was older than the node's).
    pub stale_epochs: u64,
    /// Take-overs confirmed by every node (`DataSimConfig::takeover_per_ms`).
    pub takeovers: u64,
    /// Writes and discards failed because a node refused them as fenced
    /// (their client was taken over), and writes their client gave up when
    /// it took the volume over.
    pub fenced: u64,
    pub given_up: u64,
    /// Blocks compared on every replica at the end.
    pub blocks_verified: u64,
    pub net_bytes: u64,
    pub violation: Option<String>,
    pub trace: Vec<String>,
}

impl DataReport {
    pub fn render(&self, wall: Duration) -> String {
        let secs = self.sim_us as f64 / 1e6;
        // Operations finished: writes and discards acknowledged, reads
        // checked.
        let ops = self.writes_acked + self.discards_acked + self.reads_checked;
        let mut s = format!(
            "data seed {}: {:.2} s simulated in {:.2} s ({:.0}x real time; {} rounds, {} busy), {} operations ({:.0}/s simulated, {:.0}/s wall), {} writes acknowledged ({:.0}/s simulated, {:.0}/s wall), {} of them through the primary, {} sector writes, {} rewritten after OlderVersion, {} discards acknowledged, {} reads checked, {} power cuts, {} resets, {} stalled connections given up, {} clock steps, route epoch {} ({} StaleEpoch answers, {} splits, {} disks replaced), {} take-overs ({} writes refused as fenced, {} given up), {} blocks verified on every replica, {} network bytes\n",
            self.seed,
            secs,
            wall.as_secs_f64(),
            secs / wall.as_secs_f64().max(1e-9),
            self.rounds,
            self.busy_rounds,
            ops,
            ops as f64 / secs.max(1e-9),
            ops as f64 / wall.as_secs_f64().max(1e-9),
            self.writes_acked,
            self.writes_acked as f64 / secs.max(1e-9),
            self.writes_acked as f64 / wall.as_secs_f64().max(1e-9),
            self.primary_writes,
            self.sector_writes,
            self.rewrites,
            self.discards_acked,
            self.reads_checked,
            self.crashes,
            self.resets,
            self.stalls,
            self.clock_steps,
            self.epoch,
            self.stale_epochs,
            self.splits,
            self.disks_replaced,
            self.takeovers,
            self.fenced,
            self.given_up,
            self.blocks_verified,
            self.net_bytes,
        );
        if let Some(v) = &self.violation {
            s.push_str(&format!("VIOLATION: {v}\nlast steps:\n"));
            for l in &self.trace {
                s.push_str(&format!("  {l}\n"));
            }
        }
        s
    }
}

/// Runs one seed. With `trace`, the report keeps every trace line.
pub fn run_data(cfg: &DataSimConfig, trace: bool) -> DataReport {
    let mut sim = match DataSim::new(cfg, trace) {
        Ok(s) => s,
        Err(e) => {
            return DataReport {
                seed: cfg.seed,
                violation: Some(format!("set-up: {e}")),
                ..DataReport::default()
            }
        }
    };
    let r = sim.run();
    let world = sim.world.borrow();
    sim.report.sim_us = world.now_us;
    sim.report.resets = world.resets;
    sim.report.net_bytes = world.bytes;
    drop(world);
    if let Err(v) = r {
        sim.report.violation = Some(v);
    }
    sim.report.trace = sim.trace.iter().cloned().collect();
    sim.report
}

struct SimNode {
    disk: SimDisk,
    /// Its wall clock's offset from the simulated one (ms), kept across
    /// restarts (see `DataSimConfig::clock_offset_max_ms`).
    clock_offset_ms: i64,
    core: Option<NodeCore<SimDisk, SimNet>>,
    /// Down (power cut) until this time.
    up_at: u64,
    /// Disks this node had before the one it runs on (its disk's identity).
    disk_gen: u64,
    /// On a new disk, not registered on it yet (`--replace-disk`).
    replacing: bool,
    /// Times its core started (a fence push to an earlier core is
    /// answered by the registration of the next).
    starts: u64,
    /// Its agent cannot reach the control service until then (µs).
    control_cut_until: u64,
}

/// The newest write of a sector as the checker keeps it: (version, write
/// id, zeroes).
type Newest = (u64, u64, bool);

/// One write or discard as the checker knows it.
struct WriteRec {
    version: u64,
    first: u64,
    blocks: u64,
    /// A sector write: (first sector, sectors) of block `first`, which the
    /// node merges into the stored block.
    sectors: Option<(u64, u64)>,
    /// A discard or write-zeroes: the blocks read back as zeroes.
    zero: bool,
    /// Sent as `WriteZeroes` rather than `Discard`.
    write_zeroes: bool,
    /// When its client issued it.
    issued_at: u64,
    /// When every replica acknowledged it.
    acked_at: Option<u64>,
    /// The fence generation of its client's capability when issued.
    fence: u32,
    /// Never acknowledged: a node refused it as fenced, its client took
    /// the volume over under a new attachment, or it was written again
    /// with a newer version after `OlderVersion` (which may be given up
    /// in turn). Some replicas may hold it and others not (until a scrub
    /// compares them).
    given_up: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Want {
    /// Not sent on the current connection yet (or to be sent again).
    Send,
    /// Sent as this request id; waiting.
    Sent(u32),
    /// Ask again at this time.
    RetryAt(u64),
    Done,
}

struct ClientOp {
    write: Option<u64>,
    first: u64,
    blocks: u64,
    /// Write: per replica (the primary only for a `WritePrimary`). Read:
    /// only the replica asked.
    want: [Want; NODES],
    /// Write: the replicas that answered `Ok` under the current `want`.
    acks: usize,
    /// The epoch of the table `want` was drawn from (sent in the header).
    epoch: u64,
    /// No replica to send to in that table: look for a newer one then.
    route_at: Option<u64>,
    /// A read of this node only (the final check of every replica).
    target: Option<usize>,
    /// Sent as a `WritePrimary` (the primary forwards it).
    primary: bool,
    issued_at: u64,
    /// Final check: a read that must return the newest acknowledged write.
    verify: bool,
}

struct ClientConn {
    stream: SimStream,
    pipe: usize,
    rbuf: Vec<u8>,
    /// Bytes to send (the Hello, then requests).
    wbuf: Vec<u8>,
    /// Requests queued before the node's Challenge came.
    held: Vec<u8>,
    hs: ClientHs,
}

/// A client connection's handshake, as Celer's client does it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClientHs {
    /// Nothing is sent until the node's Challenge.
    AwaitChallenge,
    /// The Hello went out: the node must prove the key in its answer.
    AwaitAnswer {
        node_nonce: Nonce,
        peer_nonce: Nonce,
    },
    Ready,
}

/// A connection at a node's acceptor: the Challenge goes out, the Hello is
/// read (exactly, so what follows stays for the shard) and checked, then
/// the node's core adopts it.
struct Accepting {
    node: usize,
    stream: SimStream,
    nonce: Nonce,
    challenged: bool,
    got: Vec<u8>,
}

struct Client {
    attachment: u32,
    /// Its capability's fence generation (in every mutation's header).
    fence: u32,
    /// The route table it sends by: a `StaleEpoch` answer carries a newer
    /// one, and a request that found no replica asks for the current one.
    table: RouteTable,
    cap: Capability,
    hlc: u64,
    /// Its wall clock's offset from the simulated one (ms).
    clock_offset_ms: i64,
    conns: [Option<ClientConn>; NODES],
    ops: BTreeMap<u64, ClientOp>,
    next_op: u64,
    next_req: u32,
    /// Request id → (op, replica).
    reqs: BTreeMap<u32, (u64, usize)>,
    next_issue_at: u64,
}

struct DataSim {
    cfg: DataSimConfig,
    rng: StdRng,
    world: Rc<RefCell<World>>,
    nodes: Vec<SimNode>,
    control: Control,
    clients: Vec<Client>,
    writes: BTreeMap<u64, WriteRec>,
    /// Per block, the writes and discards that cover it (ids, in order).
    by_block: Vec<Vec<u64>>,
    /// Per sector (block × 8 + sector), the acknowledgements that covered
    /// it in time order: (when, the newest (version, write, zero) so far).
    acked: Vec<Vec<(u64, Newest)>>,
    next_write: u64,
    report: DataReport,
    trace: VecDeque<String>,
    keep_all: bool,
    faults: bool,
    /// Power cuts due: (when, node), from `crash_after_discard`.
    due_crashes: Vec<(u64, usize)>,
    /// Where clients read into.
    scratch: Vec<u8>,
    accepting: Vec<Accepting>,
    /// A take-over whose fence push is not answered by every node yet.
    takeover: Option<takeover::Takeover>,
    /// Fence generations every node confirmed, and when (µs).
    fences_confirmed: Vec<(u32, u64)>,
}

/// Node `i`'s disk number `gen` of the run, formatted.
fn new_disk(seed: u64, i: usize, gen: u64) -> Result<SimDisk, String> {
    let disk = SimDisk::new(DISK_BYTES, seed ^ (0xD15C + i as u64) ^ (gen << 32));
    let opts = FormatOptions {
        chunk_blocks: CHUNK_BLOCKS as u32,
        spare_blocks: 4,
        shard_count: 1,
        journal_blocks: 32,
        create_size_bytes: None,
    };
    Engine::format_on(&disk, &opts, (seed << 2) | i as u64 | 1 | (gen << 40))
        .map_err(|e| e.to_string())?;
    Ok(disk)
}

fn engine_opts() -> OpenOptions {
    OpenOptions {
        inflight_max: 32,
        completion_eventfd: false,
        lock_wait: Duration::ZERO,
        hugepages: false,
    }
}

fn node_id(i: usize) -> NodeId {
    i as NodeId + 1
}

/// The node index of node id `n`.
fn index_of(n: NodeId) -> Option<usize> {
    (n as usize).checked_sub(1).filter(|&i| i < NODES)
}

/// A client's table before it has one (epoch 0: no node takes it).
fn empty_table() -> RouteTable {
    RouteTable {
        epoch: 0,
        chunk_bytes: CHUNK_BLOCKS * BS as u64,
        partition_bits: 0,
        replicas: 3,
        nodes: Vec::new(),
        partitions: Vec::new(),
    }
}

/// Sector `sector` of block `block` as write `write` (version `version`)
/// leaves it: its identity in the first 32 bytes, a pattern after. Every
/// sector names its write, so a block merged from sector writes is checked
/// sector by sector.
fn fill_sector(write: u64, version: u64, block: u64, sector: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&write.to_le_bytes());
    out[8..16].copy_from_slice(&version.to_le_bytes());
    out[16..24].copy_from_slice(&block.to_le_bytes());
    out[24..32].copy_from_slice(&sector.to_le_bytes());
    let mut x = write.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (block << 3 | sector) ^ 0xC0FFEE;
    for w in out[32..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
}

/// Whether write `w` covers sector `sector` of block `block`.
fn covers(w: &WriteRec, block: u64, sector: u64) -> bool {
    w.first <= block
        && block < w.first + w.blocks
        && w.sectors.is_none_or(|(s, n)| s <= sector && sector < s + n)
}

impl DataSim {
    fn new(cfg: &DataSimConfig, keep_all: bool) -> Result<DataSim, String> {
        let world = World::new(cfg.seed ^ 0x4E37, NetConfig { delay_us: (5, 60) });
        // The clocks' first offsets (the run's own generator draws the
        // faults).
        let mut offset_rng = StdRng::seed_from_u64(cfg.seed ^ 0xC10C);
        let mut nodes = Vec::new();
        for i in 0..NODES {
            let disk = new_disk(cfg.seed, i, 0)?;
            let m = cfg.clock_offset_max_ms as i64;
            nodes.push(SimNode {
                disk,
                clock_offset_ms: offset_rng.gen_range(-m..=m),
                core: None,
                up_at: 0,
                disk_gen: 0,
                replacing: false,
                starts: 0,
                control_cut_until: 0,
            });
        }
        let mut control = Control::new(NODES, cfg.route_changes)?;
        let mut clients = Vec::new();
        for i in 0..2 {
            // Two shared writers (as a clustered file system's), until one
            // takes the volume over.
            let a = control.attach(format!("client {i}"), AttachMode::Shared, false)?;
            let (attachment, fence) = (a.attachment.id, a.attachment.fence);
            clients.push(Client {
                attachment,
                fence,
                table: empty_table(),
                cap: Capability::mint(&DATA_KEY, VOLUME, attachment, fence, false, u64::MAX),
                hlc: 0,
                clock_offset_ms: {
                    let m = cfg.clock_offset_max_ms as i64;
                    offset_rng.gen_range(-m..=m)
                },
                conns: [const { None }; NODES],
                ops: BTreeMap::new(),
                next_op: 1,
                next_req: 1,
                reqs: BTreeMap::new(),
                next_issue_at: 0,
            });
        }
        let mut sim = DataSim {
            cfg: cfg.clone(),
            rng: StdRng::seed_from_u64(cfg.seed),
            world,
            nodes,
            control,
            clients,
            writes: BTreeMap::new(),
            by_block: vec![Vec::new(); BLOCKS as usize],
            acked: vec![Vec::new(); BLOCKS as usize * SECTORS],
            next_write: 1,
            report: DataReport {
                seed: cfg.seed,
                ..DataReport::default()
            },
            trace: VecDeque::new(),
            keep_all,
            faults: true,
            due_crashes: Vec::new(),
            scratch: vec![0; 16 << 10],
            accepting: Vec::new(),
            takeover: None,
            fences_confirmed: Vec::new(),
        };
        for i in 0..NODES {
            sim.start_node(i)?;
        }
        let t = sim.control.table().cloned().ok_or("no route table")?;
        for cl in &mut sim.clients {
            cl.table = t.clone();
        }
        Ok(sim)
    }

    fn now(&self) -> u64 {
        self.world.borrow().now_us
    }

    /// Whether to note every request and answer: with the whole trace
    /// kept, or with the simulator's debug lines on (`CELER_LOG`).
    fn detail(&self) -> bool {
        self.keep_all || tracing::enabled!(target: "celer_sim", tracing::Level::DEBUG)
    }

    fn log(&mut self, line: String) {
        // In the log stream too, in order with the node cores' lines.
        tracing::debug!(target: "celer_sim", "{line}");
        let line = format!("{:>9} µs  {line}", self.now());
        self.trace.push_back(line);
        if !self.keep_all && self.trace.len() > TRACE_KEEP {
            self.trace.pop_front();
        }
    }

    fn start_node(&mut self, i: usize) -> Result<(), String> {
        self.nodes[i].disk.set_time(self.now());
        let shard = Engine::open_on(self.nodes[i].disk.clone(), &engine_opts())
            .map_err(|e| format!("node {} engine open: {e}", node_id(i)))?
            .into_shards()
            .pop()
            .ok_or("no engine shard")?;
        let cfg = CoreConfig {
            node: node_id(i),
            data_key: DATA_KEY,
            forward_timeout: Duration::from_secs(2),
        };
        let mut net = SimNet::new(&self.world);
        net.set_clock_offset_ms(self.nodes[i].clock_offset_ms);
        let mut core = NodeCore::new(&cfg, shard, net);
        if !self.cfg.restart_floor {
            core.without_restart_floor();
        }
        if !self.cfg.fence_check {
            core.without_fence_check();
        }
        self.nodes[i].core = Some(core);
        self.nodes[i].starts += 1;
        self.register_node(i)
    }

    /// One round for the nodes, as their epoll loops would run it: nodes
    /// due restart, what arrived is delivered, the acceptors work, and each
    /// running core handles its ready connections and takes a turn.
    /// Whether anything moved or is still in an engine.
    fn drive_nodes(&mut self) -> Result<bool, String> {
        self.restart_due_nodes()?;
        self.control_step()?;
        self.world.borrow_mut().deliver();
        let mut busy = self.accept_step()?;
        for (i, n) in self.nodes.iter_mut().enumerate() {
            let Some(core) = n.core.as_mut() else {
                continue;
            };
            // Log lines name the node.
            let _node = tracing::info_span!("node", id = i + 1).entered();
            let ready = core.net().ready();
            if !ready.is_empty() {
                core.woke();
                busy = true;
            }
            for (c, r, w) in ready {
                core.ready(c, r, w);
            }
            busy |= core.turn();
        }
        Ok(busy)
    }

    /// Moves simulated time to `us`, for the network, the disks and the
    /// log lines' time stamps ([`sim_time_us`]).
    fn set_now(&mut self, us: u64) {
        self.world.borrow_mut().now_us = us;
        SIM_TIME_US.with(|t| t.set(us));
        for n in &self.nodes {
            n.disk.set_time(us);
        }
    }

    /// Moves time on after a round: a small step if anything moved in it,
    /// else to the next event.
    fn step_time(&mut self, busy: bool) {
        let next = if busy {
            self.now() + 1
        } else {
            self.next_event()
        };
        self.set_now(next);
    }

    /// When something happens next, with nothing moving now: a piece
    /// arrives, a disk completes, a node's timer or heartbeat is due, a
    /// node restarts, a client issues or retries; at most 1 ms on (faults
    /// are drawn per simulated millisecond).
    fn next_event(&self) -> u64 {
        let now = self.now();
        let mut next = now + 1_000;
        if let Some(a) = self.world.borrow().next_arrival() {
            next = next.min(a);
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(t) = n.disk.next_due() {
                next = next.min(t);
            }
            match &n.core {
                Some(core) => {
                    next = next.min(now + core.wait().as_micros() as u64);
                    next = next.min(self.control.next_beat[i]);
                }
                None => next = next.min(n.up_at),
            }
        }
        for &(at, _) in &self.due_crashes {
            next = next.min(at);
        }
        for c in &self.clients {
            if self.faults {
                next = next.min(c.next_issue_at);
            }
            for op in c.ops.values() {
                for wnt in op.want {
                    if let Want::RetryAt(t) = wnt {
                        next = next.min(t);
                    }
                }
                if let Some(t) = op.route_at {
                    next = next.min(t);
                }
            }
        }
        next.max(now + 1)
    }

    /// Nodes whose down time is over start again on their disks.
    fn restart_due_nodes(&mut self) -> Result<(), String> {
        let now = self.now();
        for i in 0..NODES {
            if self.nodes[i].core.is_none() && now >= self.nodes[i].up_at {
                if self.control_cut(i) {
                    // A node registers before it serves: it starts once
                    // its agent reaches the control service again.
                    self.nodes[i].up_at = self.nodes[i].control_cut_until;
                    continue;
                }
                // Drawn only when on: runs without it keep their course.
                let replace = self.cfg.route_changes
                    && self.cfg.replace_disk > 0.0
                    && self.faults
                    && !self.nodes[i].replacing
                    && self.rng.gen_bool(self.cfg.replace_disk)
                    && self.can_lose_disk(i);
                if replace {
                    let n = &mut self.nodes[i];
                    n.disk_gen += 1;
                    n.disk = new_disk(self.cfg.seed, i, n.disk_gen)?;
                    n.replacing = true;
                    // The control service refuses the node's id to another
                    // disk while the old one's lease runs: the operator
                    // starts it after that.
                    n.up_at = now + REPLACE_AFTER_US;
                    self.report.disks_replaced += 1;
                    self.log(format!(
                        "node {}'s disk is replaced by a new, empty one; it starts in {} ms (--replace-disk)",
                        node_id(i),
                        REPLACE_AFTER_US / 1000
                    ));
                    continue;
                }
                self.start_node(i)?;
                self.log(format!("node {} restarted", node_id(i)));
            }
        }
        Ok(())
    }

    /// The highest clock value client `c` follows: its own wall clock plus
    /// the drift bound.
    fn clock_limit(&self, c: usize) -> u64 {
        let unix_ms = self.world.borrow().unix_ms();
        celer_proto::clock_limit_at(unix_ms.saturating_add_signed(self.clients[c].clock_offset_ms))
    }

    /// Steps the wall clock of a node or a client to a new offset.
    fn step_clock(&mut self) {
        let m = self.cfg.clock_offset_max_ms as i64;
        let offset = self.rng.gen_range(-m..=m);
        let k = self.rng.gen_range(0..NODES + self.clients.len());
        self.report.clock_steps += 1;
        if k < NODES {
            self.nodes[k].clock_offset_ms = offset;
            if let Some(core) = self.nodes[k].core.as_mut() {
                core.net_mut().set_clock_offset_ms(offset);
            }
            self.log(format!(
                "the clock of node {} steps to {offset:+} ms",
                node_id(k)
            ));
        } else {
            let cl = &mut self.clients[k - NODES];
            cl.clock_offset_ms = offset;
            let who = cl.attachment;
            self.log(format!("the clock of client {who} steps to {offset:+} ms"));
        }
    }

    /// Power cut: the disk keeps what it keeps, the process and its
    /// connections are gone.
    fn crash_node(&mut self, i: usize) {
        let Some(core) = self.nodes[i].core.take() else {
            return;
        };
        self.report.crashes += 1;
        self.report.protocol_errors += core.protocol_errors();
        let pipes = core.net().pipes();
        self.nodes[i].disk.crash();
        drop(core);
        // The agent goes with the process.
        self.control.forget_agent(i);
        let mut w = self.world.borrow_mut();
        for p in pipes {
            w.reset(p);
        }
        drop(w);
        for c in 0..self.clients.len() {
            self.drop_conn(c, i);
        }
        // Mostly shorter than the control service's grace (the node
        // catches up), some longer (its partitions move).
        let down = if self.rng.gen_bool(0.8) {
            2_000 + self.rng.gen_range(0..30_000)
        } else {
            30_000 + self.rng.gen_range(0..50_000)
        };
        self.nodes[i].up_at = self.now() + down;
        self.log(format!("POWER CUT node {} (down {down} µs)", node_id(i)));
    }

    fn run(&mut self) -> Result<(), String> {
        let end = self.cfg.duration_us;
        let mut last_ms = 0;
        let mut idle_rounds = 0u64;
        loop {
            let now = self.now();
            if now >= end && self.faults {
                self.faults = false;
                self.log("faults stop; the clients finish".into());
            }
            while let Some(k) = self.due_crashes.iter().position(|&(at, _)| at <= now) {
                let (_, i) = self.due_crashes.swap_remove(k);
                if self.faults {
                    self.crash_node(i);
                }
            }
            // Faults, once per simulated millisecond.
            while self.faults && last_ms < now / 1000 {
                last_ms += 1;
                if self.rng.gen_bool(self.cfg.crash_per_ms) {
                    let i = self.rng.gen_range(0..NODES);
                    self.crash_node(i);
                }
                if self.rng.gen_bool(self.cfg.reset_per_ms) {
                    let c = self.rng.gen_range(0..self.clients.len());
                    let i = self.rng.gen_range(0..NODES);
                    if self.clients[c].conns[i].is_some() {
                        self.drop_conn(c, i);
                        self.log(format!(
                            "reset client {} ↔ node {}",
                            self.clients[c].attachment,
                            node_id(i)
                        ));
                    }
                }
                if self.rng.gen_bool(self.cfg.clock_step_per_ms) {
                    self.step_clock();
                }
                // Drawn only when on: runs without splits keep their course.
                if self.cfg.route_changes
                    && self.cfg.split_per_ms > 0.0
                    && self.rng.gen_bool(self.cfg.split_per_ms)
                {
                    self.split_partitions()?;
                }
                // Drawn only when on: runs without take-overs keep their
                // course.
                if self.cfg.route_changes
                    && self.cfg.control_cut_per_ms > 0.0
                    && self.rng.gen_bool(self.cfg.control_cut_per_ms)
                {
                    let i = self.rng.gen_range(0..NODES);
                    let cut = self.rng.gen_range(10_000..40_000);
                    self.nodes[i].control_cut_until = now + cut;
                    self.log(format!(
                        "node {} loses the control service for {cut} µs (clients and peers still reach it)",
                        node_id(i)
                    ));
                }
                if self.cfg.takeover_per_ms > 0.0 && self.rng.gen_bool(self.cfg.takeover_per_ms) {
                    let c = self.rng.gen_range(0..self.clients.len());
                    self.take_over(c)?;
                }
                if self.rng.gen_bool(self.cfg.stall_per_ms) {
                    let c = self.rng.gen_range(0..self.clients.len());
                    let i = self.rng.gen_range(0..NODES);
                    if let Some(conn) = &self.clients[c].conns[i] {
                        let pipe = conn.pipe;
                        let extra = self.rng.gen_range(1_000..20_000);
                        self.world.borrow_mut().stall(pipe, extra);
                        self.report.stalls += 1;
                        self.log(format!(
                            "client {} ↔ node {} stalls {extra} µs; the client sends again on a new connection",
                            self.clients[c].attachment,
                            node_id(i)
                        ));
                        self.abandon_conn(c, i);
                    }
                }
            }
            let mut busy = self.drive_nodes()?;
            busy |= self.takeover_step();
            for c in 0..self.clients.len() {
                busy |= self.client_step(c)?;
            }
            self.report.rounds += 1;
            self.report.busy_rounds += busy as u64;
            let outstanding: usize = self.clients.iter().map(|c| c.ops.len()).sum();
            if !self.faults && outstanding == 0 && self.takeover.is_none() && self.converged() {
                self.report.epoch = self.control.epoch();
                self.verify()?;
                for n in &self.nodes {
                    self.report.protocol_errors +=
                        n.core.as_ref().map_or(0, |c| c.protocol_errors());
                }
                if self.report.protocol_errors > 0 {
                    return Err(format!(
                        "the nodes closed {} connections for protocol errors (corrupt or out-of-turn frames) on a network that corrupts nothing",
                        self.report.protocol_errors
                    ));
                }
                return Ok(());
            }
            self.step_time(busy);
            if !self.faults {
                idle_rounds += 1;
                if idle_rounds > 20_000_000 {
                    return Err(format!("{outstanding} client requests never finished"));
                }
            }
            if now > end + 60_000_000 {
                if outstanding == 0 {
                    return Err(format!(
                        "the cluster did not converge a simulated minute after the faults stopped: {}",
                        self.control
                            .table()
                            .map_or("no table".into(), control::describe)
                    ));
                }
                return Err(format!(
                    "{outstanding} client requests still unfinished a simulated minute after the faults stopped: {}",
                    self.describe_ops()
                ));
            }
        }
    }
}
