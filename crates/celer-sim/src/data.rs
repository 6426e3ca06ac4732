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
//! the partition whole. Two
//! clients (two attachments of the volume) write, discard, zero and read at
//! a fixed rate, as Celer's client does: a one-block write (or a sector
//! write) goes to every replica with the same version (the attachment's
//! hybrid clock and its id) and is acknowledged when all three answered
//! `Ok`; a longer write goes as a `WritePrimary` to the partition's primary,
//! which forwards it over its own node-to-node connections; `OlderVersion`
//! makes the client write the same range again with a newer version; a
//! lost connection makes it send again with the same version. A read goes
//! to one replica. Every connection goes through the real handshake: a
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
//! Not simulated yet (docs/testing.md): repair, splits, disk replacement,
//! the real client core, TLS, fencing and snapshots.

mod control;

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::rc::Rc;
use std::time::Duration;

use celer_engine::{Engine, FormatOptions, OpenOptions};
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
        }
    }
}

/// What a run did and found.
#[derive(Clone, Debug, Default)]
pub struct DataReport {
    pub seed: u64,
    /// Simulated time at the end (µs).
    pub sim_us: u64,
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
    /// Blocks compared on every replica at the end.
    pub blocks_verified: u64,
    pub net_bytes: u64,
    pub violation: Option<String>,
    pub trace: Vec<String>,
}

impl DataReport {
    pub fn render(&self, wall: Duration) -> String {
        let secs = self.sim_us as f64 / 1e6;
        let mut s = format!(
            "data seed {}: {:.2} s simulated in {:.2} s ({:.0}x real time), {} writes acknowledged ({:.0}/s simulated, {:.0}/s wall), {} of them through the primary, {} sector writes, {} rewritten after OlderVersion, {} discards acknowledged, {} reads checked, {} power cuts, {} resets, {} stalled connections given up, {} clock steps, route epoch {} ({} StaleEpoch answers, {} splits, {} disks replaced), {} blocks verified on every replica, {} network bytes\n",
            self.seed,
            secs,
            wall.as_secs_f64(),
            secs / wall.as_secs_f64().max(1e-9),
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
    /// When every replica acknowledged it.
    acked_at: Option<u64>,
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
            });
        }
        let control = Control::new(NODES, cfg.route_changes)?;
        let clients = (0..2)
            .map(|i| Client {
                attachment: i + 1,
                table: empty_table(),
                cap: Capability::mint(&DATA_KEY, VOLUME, i + 1, 0, false, u64::MAX),
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
            })
            .collect();
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

    fn log(&mut self, line: String) {
        let line = format!("{:>9} µs  {line}", self.now());
        self.trace.push_back(line);
        if !self.keep_all && self.trace.len() > TRACE_KEEP {
            self.trace.pop_front();
        }
    }

    fn start_node(&mut self, i: usize) -> Result<(), String> {
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
        self.nodes[i].core = Some(core);
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
            busy |= core.engine_inflight() > 0;
        }
        Ok(busy)
    }

    /// Nodes whose down time is over start again on their disks.
    fn restart_due_nodes(&mut self) -> Result<(), String> {
        let now = self.now();
        for i in 0..NODES {
            if self.nodes[i].core.is_none() && now >= self.nodes[i].up_at {
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
            for c in 0..self.clients.len() {
                busy |= self.client_step(c)?;
            }
            let outstanding: usize = self.clients.iter().map(|c| c.ops.len()).sum();
            if !self.faults && outstanding == 0 && self.converged() {
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
            // Time: small steps while anything moves, else to the next event.
            let next = if busy {
                now + 2
            } else {
                let w = self.world.borrow();
                let mut next = now + 1_000;
                if let Some(a) = w.next_arrival() {
                    next = next.min(a);
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
            };
            self.world.borrow_mut().now_us = next;
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

    /// A client issues due operations, reads answers and sends what waits.
    /// Whether it did anything.
    fn client_step(&mut self, c: usize) -> Result<bool, String> {
        let now = self.now();
        let mut busy = false;
        if self.faults && now >= self.clients[c].next_issue_at {
            let gap = 1_000_000 / self.cfg.ops_per_sec.max(1);
            self.clients[c].next_issue_at = now + self.rng.gen_range(gap / 2..=gap * 3 / 2);
            if self.clients[c].ops.len() < CLIENT_DEPTH {
                self.issue(c);
                busy = true;
            }
        }
        busy |= self.retry_due(c);
        for i in 0..NODES {
            busy |= self.client_conn_io(c, i)?;
        }
        Ok(busy)
    }

    /// Ops whose retry is due: with a newer table than the one they were
    /// sent under (the client asks for the current one first), every leg
    /// goes again as that table says; otherwise the due legs go again.
    fn retry_due(&mut self, c: usize) -> bool {
        let now = self.now();
        let due: Vec<u64> = self.clients[c]
            .ops
            .iter()
            .filter(|(_, op)| {
                op.route_at.is_some_and(|t| t <= now)
                    || op
                        .want
                        .iter()
                        .any(|w| matches!(w, Want::RetryAt(t) if *t <= now))
            })
            .map(|(&id, _)| id)
            .collect();
        if due.is_empty() {
            return false;
        }
        self.refresh_table(c);
        let epoch = self.clients[c].table.epoch;
        for id in due {
            let Some(op) = self.clients[c].ops.get_mut(&id) else {
                continue;
            };
            if op.epoch < epoch || op.route_at.is_some() {
                self.route_op(c, id);
            } else {
                for w in &mut op.want {
                    if matches!(w, Want::RetryAt(t) if *t <= now) {
                        *w = Want::Send;
                    }
                }
            }
        }
        true
    }

    /// A new write (2 in 3) or read of 1-4 blocks within one chunk.
    fn issue(&mut self, c: usize) {
        let blocks = if self.rng.gen_bool(0.7) {
            1
        } else {
            self.rng.gen_range(2..=4)
        };
        let chunk = self.rng.gen_range(0..CHUNKS);
        let first = chunk * CHUNK_BLOCKS + self.rng.gen_range(0..=CHUNK_BLOCKS - blocks);
        let dice = self.rng.gen_range(0..100);
        if dice < 8 {
            // A discard or write-zeroes: of the whole chunk (a discard
            // frees its slot) or of a range.
            let w = if self.rng.gen_bool(0.5) {
                self.new_write(c, chunk * CHUNK_BLOCKS, CHUNK_BLOCKS, true)
            } else {
                self.new_write(c, first, blocks, true)
            };
            let write_zeroes = self.rng.gen_bool(0.3);
            if let Some(r) = self.writes.get_mut(&w) {
                r.write_zeroes = write_zeroes;
            }
        } else if dice < 18 {
            // A sector write: some of a block's sectors, not all.
            let s = self.rng.gen_range(0..SECTORS as u64);
            let most = SECTORS as u64 - s - u64::from(s == 0);
            let n = self.rng.gen_range(1..=most);
            self.new_write_sectors(c, first, 1, false, Some((s, n)));
        } else if dice < 67 {
            self.new_write(c, first, blocks, false);
        } else {
            self.new_read(c, first, blocks, None, false);
        }
    }

    /// A read of `blocks` blocks from `first` by client `c`, from an
    /// in-sync replica, or from node `target`; `verify`: a final read,
    /// which must find the newest acknowledged write.
    fn new_read(&mut self, c: usize, first: u64, blocks: u64, target: Option<usize>, verify: bool) {
        self.add_op(c, None, first, blocks, false, target, verify);
    }

    /// Gives client `c` a new operation, routed by its table.
    #[allow(clippy::too_many_arguments)]
    fn add_op(
        &mut self,
        c: usize,
        write: Option<u64>,
        first: u64,
        blocks: u64,
        primary: bool,
        target: Option<usize>,
        verify: bool,
    ) {
        let now = self.now();
        let cl = &mut self.clients[c];
        let id = cl.next_op;
        cl.next_op += 1;
        cl.ops.insert(
            id,
            ClientOp {
                write,
                first,
                blocks,
                want: [Want::Done; NODES],
                epoch: 0,
                route_at: None,
                target,
                primary,
                issued_at: now,
                verify,
            },
        );
        self.route_op(c, id);
    }

    /// Client `c` sends op `id` (again, every leg) as its table says: a
    /// write to every member that takes writes, or to the primary for a
    /// `WritePrimary`; a read to one in-sync member. With nobody to send
    /// it to, the op waits for a newer table.
    fn route_op(&mut self, c: usize, id: u64) {
        let now = self.now();
        let cl = &self.clients[c];
        let Some(op) = cl.ops.get(&id) else { return };
        let t = &cl.table;
        let r = t
            .partition(t.partition_at(VOLUME, op.first * BS as u64))
            .cloned()
            .unwrap_or_default();
        let mut want = [Want::Done; NODES];
        let (write, target, primary) = (op.write, op.target, op.primary);
        let epoch = t.epoch;
        match (write, target) {
            (_, Some(i)) => want[i] = Want::Send,
            (Some(_), None) if primary => {
                if let Some(i) = r.primary().and_then(index_of) {
                    want[i] = Want::Send;
                }
            }
            (Some(_), None) => {
                for i in r.writers().filter_map(|m| index_of(m.node)) {
                    want[i] = Want::Send;
                }
            }
            (None, None) => {
                let in_sync: Vec<usize> = r
                    .members
                    .iter()
                    .filter(|m| m.in_sync && !m.down)
                    .filter_map(|m| index_of(m.node))
                    .collect();
                if !in_sync.is_empty() {
                    want[in_sync[self.rng.gen_range(0..in_sync.len())]] = Want::Send;
                }
            }
        }
        let none = want.iter().all(|w| *w == Want::Done);
        self.forget_requests(c, id);
        if let Some(op) = self.clients[c].ops.get_mut(&id) {
            op.want = want;
            op.epoch = epoch;
            op.route_at = none.then_some(now + RETRY_US);
        }
    }

    /// Client `c` asks for the current table (a node with a newer one would
    /// answer a probe with it; the control service has the newest).
    fn refresh_table(&mut self, c: usize) {
        if let Some(t) = self.control.table() {
            if t.epoch > self.clients[c].table.epoch {
                self.clients[c].table = t.clone();
            }
        }
    }

    fn new_write(&mut self, c: usize, first: u64, blocks: u64, zero: bool) -> u64 {
        self.new_write_sectors(c, first, blocks, zero, None)
    }

    fn new_write_sectors(
        &mut self,
        c: usize,
        first: u64,
        blocks: u64,
        zero: bool,
        sectors: Option<(u64, u64)>,
    ) -> u64 {
        let unix_ms = self.world.borrow().unix_ms();
        let cl = &mut self.clients[c];
        let unix_ms = unix_ms.saturating_add_signed(cl.clock_offset_ms);
        cl.hlc = (cl.hlc + 1).max(clock_of_unix_ms(unix_ms));
        let version = (cl.hlc << 16) | cl.attachment as u64;
        let wid = self.next_write;
        self.next_write += 1;
        self.writes.insert(
            wid,
            WriteRec {
                version,
                first,
                blocks,
                sectors,
                zero,
                write_zeroes: false,
                acked_at: None,
            },
        );
        for b in first..first + blocks {
            self.by_block[b as usize].push(wid);
        }
        // Writes of more than a block go to the partition's primary, which
        // writes and forwards them to the other members (as the client
        // sends writes above 4 KiB); the rest to every member.
        let primary = !zero && blocks > 1 && sectors.is_none();
        self.add_op(c, Some(wid), first, blocks, primary, None, false);
        wid
    }

    /// Connects client `c` to node `i` if the node runs: the node adopts
    /// the connection as the acceptor would after a valid Hello.
    fn connect(&mut self, c: usize, i: usize) -> bool {
        if self.clients[c].conns[i].is_some() {
            return true;
        }
        if self.nodes[i].core.is_none() {
            return false;
        }
        let (client_end, node_end) = World::pipe(&self.world);
        self.accept(i, node_end);
        let pipe = client_end.pipe;
        self.clients[c].conns[i] = Some(ClientConn {
            stream: client_end,
            pipe,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            held: Vec::new(),
            hs: ClientHs::AwaitChallenge,
        });
        true
    }

    /// Node `i`'s acceptor takes a new connection.
    fn accept(&mut self, i: usize, stream: SimStream) {
        let mut nonce = [0u8; NONCE_BYTES];
        self.rng.fill(&mut nonce[..]);
        self.accepting.push(Accepting {
            node: i,
            stream,
            nonce,
            challenged: false,
            got: Vec::new(),
        });
    }

    /// Acceptors: connections node cores opened go to the node at their
    /// address; every pending one gets its Challenge, its Hello read and
    /// checked (`HelloProof::check`, as `celer-node`'s acceptor does), and
    /// goes to its node's core. Whether anything moved.
    fn accept_step(&mut self) -> Result<bool, String> {
        let mut busy = false;
        let opened: Vec<_> = self.world.borrow_mut().accepts.drain(..).collect();
        for (addr, stream) in opened {
            busy = true;
            let to = (0..NODES).find(|&i| control::data_addr(i).parse().ok() == Some(addr));
            match to {
                Some(i) if self.nodes[i].core.is_some() => self.accept(i, stream),
                // Connection refused.
                _ => self.world.borrow_mut().reset(stream.pipe),
            }
        }
        let mut k = 0;
        while k < self.accepting.len() {
            let a = &mut self.accepting[k];
            let pipe = a.stream.pipe;
            if self.world.borrow().is_reset(pipe) || self.nodes[a.node].core.is_none() {
                self.world.borrow_mut().reset(pipe);
                self.accepting.swap_remove(k);
                continue;
            }
            if !a.challenged {
                let h = Header::request(Op::Challenge, 0).with_payload([&a.nonce[..]]);
                let mut out = h.encode().to_vec();
                out.extend_from_slice(&a.nonce);
                let mut at = 0;
                while at < out.len() {
                    match a.stream.write(&out[at..]) {
                        Ok(n) => at += n,
                        Err(e) => return Err(format!("acceptor: Challenge not sent: {e}")),
                    }
                }
                a.challenged = true;
                busy = true;
            }
            // Exactly the Hello: its header, then its payload.
            let need = if a.got.len() < HEADER_BYTES {
                HEADER_BYTES
            } else {
                match decode_header(&a.got[..HEADER_BYTES]) {
                    Ok(Some(h)) if h.kind == Kind::Request && h.op == Op::Hello => {
                        HEADER_BYTES + (h.payload_bytes as usize).min(HelloProof::MAX_BYTES)
                    }
                    other => {
                        return Err(format!(
                            "acceptor of node {}: first frame is not a Hello: {other:?}",
                            node_id(a.node)
                        ))
                    }
                }
            };
            let have = a.got.len();
            if have < need {
                a.got.resize(need, 0);
                match a.stream.read(&mut a.got[have..need]) {
                    Ok(0) => {
                        self.accepting.swap_remove(k);
                        continue;
                    }
                    Ok(n) => {
                        a.got.truncate(have + n);
                        busy = true;
                    }
                    Err(_) => a.got.truncate(have),
                }
                // The header alone, or not all of it: read on.
                if a.got.len() <= HEADER_BYTES || a.got.len() < need {
                    k += 1;
                    continue;
                }
            }
            let a = self.accepting.swap_remove(k);
            let Ok(Some(h)) = decode_header(&a.got[..HEADER_BYTES]) else {
                return Err("acceptor: the Hello's header went bad".into());
            };
            if h.verify_payload([&a.got[HEADER_BYTES..]]).is_err() {
                return Err(format!(
                    "acceptor of node {} (pipe {}): a Hello with a bad crc: {h:?}, {} bytes",
                    node_id(a.node),
                    a.stream.pipe,
                    a.got.len()
                ));
            }
            let unix_ms = self
                .world
                .borrow()
                .unix_ms()
                .saturating_add_signed(self.nodes[a.node].clock_offset_ms);
            let (peer, peer_nonce) = HelloProof::check(
                &a.got[HEADER_BYTES..],
                &DATA_KEY,
                &a.nonce,
                h.offset as u16,
                h.volume,
                false,
                unix_ms,
            )
            .map_err(|e| format!("acceptor of node {}: Hello refused: {e}", node_id(a.node)))?;
            let answer = HelloProof::answer(&peer.key(&DATA_KEY), &a.nonce, &peer_nonce);
            if let Some(core) = self.nodes[a.node].core.as_mut() {
                core.adopt(a.stream, h, peer, a.nonce, answer);
            }
            busy = true;
        }
        Ok(busy)
    }

    fn client_conn_io(&mut self, c: usize, i: usize) -> Result<bool, String> {
        let now = self.now();
        let mut busy = false;
        // A lost connection: forget it (requests are sent again on the
        // next one).
        if let Some(conn) = &self.clients[c].conns[i] {
            if self.world.borrow().is_reset(conn.pipe) {
                self.drop_conn(c, i);
            }
        }
        // Queue what must be sent to node i.
        let ids: Vec<u64> = self.clients[c]
            .ops
            .iter()
            .filter(|(_, op)| op.want[i] == Want::Send)
            .map(|(&id, _)| id)
            .collect();
        if !ids.is_empty() {
            if self.connect(c, i) {
                for id in ids {
                    self.send(c, i, id);
                    busy = true;
                }
            } else {
                // Refused (the node is down): try again later, maybe under
                // a table where it is marked down.
                for id in ids {
                    if let Some(op) = self.clients[c].ops.get_mut(&id) {
                        op.want[i] = Want::RetryAt(now + RETRY_US);
                    }
                }
            }
        }
        let Some(conn) = self.clients[c].conns[i].as_mut() else {
            return Ok(busy);
        };
        // Send.
        while !conn.wbuf.is_empty() {
            match conn.stream.write(&conn.wbuf) {
                Ok(n) => {
                    conn.wbuf.drain(..n);
                    busy = true;
                }
                Err(_) => break,
            }
        }
        // Receive.
        loop {
            match conn.stream.read(&mut self.scratch) {
                Ok(0) => {
                    self.drop_conn(c, i);
                    return Ok(true);
                }
                Ok(n) => {
                    conn.rbuf.extend_from_slice(&self.scratch[..n]);
                    busy = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.drop_conn(c, i);
                    return Ok(true);
                }
            }
        }
        while let Some(conn) = self.clients[c].conns[i].as_mut() {
            let h = match decode_header(&conn.rbuf) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return Err(format!("node {} sent a corrupt frame: {e}", node_id(i))),
            };
            let total = HEADER_BYTES + h.payload_bytes as usize;
            if conn.rbuf.len() < total {
                break;
            }
            let payload: Vec<u8> = conn.rbuf[HEADER_BYTES..total].to_vec();
            conn.rbuf.drain(..total);
            if h.verify_payload([&payload[..]]).is_err() {
                return Err(format!("node {} sent a payload with a bad crc", node_id(i)));
            }
            if h.kind == Kind::Request
                && h.op == Op::Challenge
                && conn.hs == ClientHs::AwaitChallenge
            {
                let node_nonce: Nonce = payload[..].try_into().map_err(|_| {
                    format!(
                        "node {}: a Challenge of {} bytes",
                        node_id(i),
                        payload.len()
                    )
                })?;
                let mut peer_nonce = [0u8; NONCE_BYTES];
                self.rng.fill(&mut peer_nonce[..]);
                let cl = &self.clients[c];
                let cred = Credential::Attachment {
                    capability: cl.cap,
                    key: cl.cap.attachment_key(&DATA_KEY),
                };
                let sender = cl.attachment as u64;
                let proof = HelloProof::build(&cred, &node_nonce, &peer_nonce, 0, sender, false);
                let mut hello = Header::request(Op::Hello, 0);
                hello.offset = 0;
                hello.volume = sender;
                let hello = hello.with_payload([&proof[..]]);
                let Some(conn) = self.clients[c].conns[i].as_mut() else {
                    break;
                };
                conn.wbuf.extend_from_slice(&hello.encode());
                conn.wbuf.extend_from_slice(&proof);
                // Requests go right behind the Hello (the acceptor reads
                // exactly the Hello; the shard reads what follows).
                let held = std::mem::take(&mut conn.held);
                conn.wbuf.extend_from_slice(&held);
                conn.hs = ClientHs::AwaitAnswer {
                    node_nonce,
                    peer_nonce,
                };
                busy = true;
                continue;
            }
            if h.kind != Kind::Response {
                return Err(format!("node {} sent a request {:?}", node_id(i), h.op));
            }
            if h.op == Op::Hello {
                let ClientHs::AwaitAnswer {
                    node_nonce,
                    peer_nonce,
                } = conn.hs
                else {
                    return Err(format!("node {}: a Hello answer out of turn", node_id(i)));
                };
                let key = self.clients[c].cap.attachment_key(&DATA_KEY);
                if h.status != Status::Ok
                    || !HelloProof::check_answer(&key, &node_nonce, &peer_nonce, &payload)
                {
                    return Err(format!(
                        "node {} refused the Hello ({:?}) or did not prove the key",
                        node_id(i),
                        h.status
                    ));
                }
                if let Some(conn) = self.clients[c].conns[i].as_mut() {
                    conn.hs = ClientHs::Ready;
                }
                continue;
            }
            self.answer(c, i, &h, &payload)?;
        }
        Ok(busy)
    }

    fn send(&mut self, c: usize, i: usize, id: u64) {
        let cl = &mut self.clients[c];
        let Some(op) = cl.ops.get_mut(&id) else {
            return;
        };
        let epoch = op.epoch;
        let q = cl.next_req;
        cl.next_req = cl.next_req.wrapping_add(1).max(1);
        op.want[i] = Want::Sent(q);
        cl.reqs.insert(q, (id, i));
        let (zero, write_zeroes) = op
            .write
            .and_then(|w| self.writes.get(&w))
            .map_or((false, false), |r| (r.zero, r.write_zeroes));
        let mut h = Header::request(
            match op.write {
                Some(_) if write_zeroes => Op::WriteZeroes,
                Some(_) if zero => Op::Discard,
                Some(_) if op.primary => Op::WritePrimary,
                Some(_) => Op::Write,
                None => Op::Read,
            },
            q,
        );
        h.volume = VOLUME;
        h.offset = op.first * BS as u64;
        h.length = (op.blocks * BS as u64) as u32;
        h.epoch = epoch;
        let mut data = Vec::new();
        if let Some(w) = op.write {
            let rec = &self.writes[&w];
            h.version = rec.version;
            h.attachment = cl.attachment;
            let (s, n) = rec.sectors.unwrap_or((0, SECTORS as u64));
            if let Some((s, n)) = rec.sectors {
                h.flags = FLAG_SECTORS;
                h.offset += s * SECTOR as u64;
                h.length = (n * SECTOR as u64) as u32;
            }
            if !rec.zero {
                data = vec![0u8; h.length as usize];
                let mut at = 0;
                for b in 0..op.blocks {
                    for sector in s..s + n {
                        let block = op.first + b;
                        fill_sector(w, rec.version, block, sector, &mut data[at..at + SECTOR]);
                        at += SECTOR;
                    }
                }
            }
        }
        let h = h.with_payload([&data[..]]);
        let pipe = cl.conns[i].as_ref().map(|c| c.pipe);
        if self.keep_all {
            let line = format!(
                "client {} sends request {q} ({:?} blocks {}+{}) to node {} on pipe {pipe:?}",
                cl.attachment,
                h.op,
                op.first,
                op.blocks,
                node_id(i)
            );
            self.trace.push_back(line);
        }
        let cl = &mut self.clients[c];
        if let Some(conn) = cl.conns[i].as_mut() {
            let out = if conn.hs == ClientHs::AwaitChallenge {
                &mut conn.held
            } else {
                &mut conn.wbuf
            };
            out.extend_from_slice(&h.encode());
            out.extend_from_slice(&data);
        }
    }

    fn answer(&mut self, c: usize, i: usize, h: &Header, payload: &[u8]) -> Result<(), String> {
        let now = self.now();
        if self.keep_all {
            self.log(format!(
                "client {} answer {} {:?} from node {}",
                self.clients[c].attachment,
                h.request_id,
                h.status,
                node_id(i)
            ));
        }
        if h.status != Status::OlderVersion {
            // Every answer names the highest version the node saw for the
            // volume: the clock follows it unless it is beyond the drift
            // bound of this client's own clock (as `Hlc::observe_reported`).
            let limit = self.clock_limit(c);
            let seen = celer_proto::version_clock(h.version);
            if seen <= limit {
                let cl = &mut self.clients[c];
                cl.hlc = cl.hlc.max(seen);
            }
        }
        let Some((id, r)) = self.clients[c].reqs.remove(&h.request_id) else {
            return Ok(()); // an answer to a request given up
        };
        debug_assert_eq!(r, i);
        let Some(op) = self.clients[c].ops.get_mut(&id) else {
            return Ok(());
        };
        if op.want[i] != Want::Sent(h.request_id) {
            return Ok(());
        }
        match (op.write, h.status) {
            (Some(w), Status::Ok) => {
                op.want[i] = Want::Done;
                let zeroing = self.writes.get(&w).is_some_and(|r| r.zero);
                if zeroing && self.faults && self.rng.gen_bool(self.cfg.crash_after_discard) {
                    let at = now + self.rng.gen_range(0..100);
                    self.due_crashes.push((at, i));
                }
                let Some(op) = self.clients[c].ops.get_mut(&id) else {
                    return Ok(());
                };
                if op.want.iter().all(|w| *w == Want::Done) {
                    let op = self.clients[c].ops.remove(&id).expect("present");
                    let w = op.write.expect("a write");
                    if let Some(rec) = self.writes.get_mut(&w) {
                        rec.acked_at = Some(now);
                        let (s0, n) = rec.sectors.unwrap_or((0, SECTORS as u64));
                        let this = (rec.version, w, rec.zero);
                        for b in rec.first..rec.first + rec.blocks {
                            for sector in s0..s0 + n {
                                let list = &mut self.acked[b as usize * SECTORS + sector as usize];
                                let newest = list.last().map_or(this, |&(_, m)| m.max(this));
                                list.push((now, newest));
                            }
                        }
                        if rec.zero {
                            self.report.discards_acked += 1;
                        } else {
                            self.report.writes_acked += 1;
                            self.report.primary_writes += op.primary as u64;
                            self.report.sector_writes += rec.sectors.is_some() as u64;
                        }
                    }
                    self.log(format!(
                        "client {} write {w} acked (blocks {}+{})",
                        self.clients[c].attachment, op.first, op.blocks
                    ));
                }
            }
            (Some(w), Status::OlderVersion) => {
                // A newer write holds some block (or the node restarted
                // and refuses what may be older than a discard it forgot):
                // move the clock past the version it names and write the
                // range again with a newer version (as the client does).
                let limit = self.clock_limit(c);
                let cl = &mut self.clients[c];
                let stored = celer_proto::version_clock(h.version);
                if stored > cl.hlc && stored > limit {
                    // The client fails such a write (a writer's clock is
                    // wrong); the offsets here stay far within the bound.
                    return Err(format!(
                        "node {} holds version {:#x}, beyond the drift bound of client {}'s clock",
                        node_id(i),
                        h.version,
                        cl.attachment
                    ));
                }
                cl.hlc = cl.hlc.max(stored);
                let op = cl.ops.remove(&id).expect("present");
                self.forget_requests(c, id);
                let (zero, sectors, write_zeroes) =
                    self.writes.get(&w).map_or((false, None, false), |r| {
                        (r.zero, r.sectors, r.write_zeroes)
                    });
                let newer = self.new_write_sectors(c, op.first, op.blocks, zero, sectors);
                if let Some(r) = self.writes.get_mut(&newer) {
                    r.write_zeroes = write_zeroes;
                }
                self.report.rewrites += 1;
                self.log(format!(
                    "client {} write {w}: OlderVersion from node {}, rewritten as {newer}",
                    self.clients[c].attachment,
                    node_id(i)
                ));
            }
            (None, Status::Ok) => {
                let op = self.clients[c].ops.remove(&id).expect("present");
                self.check_read(c, i, &op, payload)?;
            }
            (_, Status::StaleEpoch) => {
                // The node has a newer table, in the payload: take it and
                // send the op again as it says (same version).
                self.report.stale_epochs += 1;
                let t = RouteTable::decode(payload).map_err(|e| {
                    format!("node {}: StaleEpoch with a bad table: {e}", node_id(i))
                })?;
                if t.epoch <= op.epoch {
                    return Err(format!(
                        "node {} answered StaleEpoch with epoch {} to a request of epoch {}",
                        node_id(i),
                        t.epoch,
                        op.epoch
                    ));
                }
                if t.epoch > self.clients[c].table.epoch {
                    self.clients[c].table = t;
                }
                self.route_op(c, id);
            }
            (_, Status::RouteBehind) => {
                // The node fetches the newer table; ask again shortly.
                op.want[i] = Want::RetryAt(now + RETRY_US / 2);
            }
            (None, Status::NotInSync) => {
                // Not in sync in the node's table: another replica.
                op.want[i] = Want::RetryAt(now + RETRY_US);
            }
            (_, Status::Busy | Status::Io | Status::Unavailable) => {
                op.want[i] = Want::RetryAt(now + RETRY_US);
            }
            (_, s) => {
                return Err(format!(
                    "node {} answered {:?} to a {:?} of blocks {}+{}",
                    node_id(i),
                    s,
                    h.op,
                    op.first,
                    op.blocks
                ))
            }
        }
        Ok(())
    }

    /// Client `c`'s connection to node `i` is gone: what was sent on it is
    /// sent again on the next one, with the same version.
    fn drop_conn(&mut self, c: usize, i: usize) {
        if let Some(conn) = &self.clients[c].conns[i] {
            self.world.borrow_mut().reset(conn.pipe);
        }
        self.abandon_conn(c, i);
    }

    /// Client `c` gives up its connection to node `i` without a reset: the
    /// node still reads what it carried, then its end. What was sent on it
    /// is sent again on the next one.
    fn abandon_conn(&mut self, c: usize, i: usize) {
        if self.keep_all {
            self.log(format!(
                "client {} leaves its connection to node {}",
                self.clients[c].attachment,
                node_id(i)
            ));
        }
        let cl = &mut self.clients[c];
        cl.conns[i] = None;
        let ops = &mut cl.ops;
        cl.reqs.retain(|&q, &mut (op, r)| {
            if r != i {
                return true;
            }
            if let Some(op) = ops.get_mut(&op) {
                if op.want[i] == Want::Sent(q) {
                    op.want[i] = Want::Send;
                }
            }
            false
        });
    }

    /// The clients' unfinished requests, for a report.
    fn describe_ops(&self) -> String {
        let mut out = Vec::new();
        for c in &self.clients {
            for op in c.ops.values() {
                out.push(format!(
                    "client {} {} blocks {}+{} issued at {} µs, replicas {:?}",
                    c.attachment,
                    match op.write {
                        Some(w) => format!("write {w}"),
                        None => "read".into(),
                    },
                    op.first,
                    op.blocks,
                    op.issued_at,
                    op.want
                ));
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(core) = &n.core {
                out.push(format!(
                    "node {}: {} engine requests in flight, {} connections watched",
                    node_id(i),
                    core.engine_inflight(),
                    core.net().pipes().len()
                ));
            }
        }
        out.join("; ")
    }

    fn forget_requests(&mut self, c: usize, op: u64) {
        self.clients[c].reqs.retain(|_, (o, _)| *o != op);
    }

    /// The newest write acknowledged before `at` that covers the sector.
    fn newest_acked(&self, block: u64, sector: u64, before: u64) -> Option<Newest> {
        let list = &self.acked[block as usize * SECTORS + sector as usize];
        // Acknowledgements come in time order: the last one before `before`
        // carries the newest so far.
        let k = list.partition_point(|&(t, _)| t < before);
        k.checked_sub(1).map(|k| list[k].1)
    }

    /// Whether a discard of `block` newer than `version` was sent.
    fn discard_after(&self, block: u64, version: u64) -> bool {
        self.by_block[block as usize]
            .iter()
            .filter_map(|id| self.writes.get(id))
            .any(|w| w.zero && w.version > version)
    }

    fn check_read(&mut self, c: usize, i: usize, op: &ClientOp, data: &[u8]) -> Result<(), String> {
        if data.len() != op.blocks as usize * BS {
            return Err(format!(
                "node {} returned {} bytes for a read of {} blocks",
                node_id(i),
                data.len(),
                op.blocks
            ));
        }
        let before = if op.verify { u64::MAX } else { op.issued_at };
        let mut want = vec![0u8; SECTOR];
        for b in 0..op.blocks {
            let block = op.first + b;
            for sector in 0..SECTORS as u64 {
                let at = b as usize * BS + sector as usize * SECTOR;
                let got = &data[at..at + SECTOR];
                self.check_sector(c, i, op.verify, block, sector, before, got, &mut want)?;
            }
        }
        self.report.reads_checked += 1;
        if op.verify {
            self.report.blocks_verified += op.blocks;
        }
        Ok(())
    }

    /// One sector of a read (see `check_read`).
    #[allow(clippy::too_many_arguments)]
    fn check_sector(
        &self,
        c: usize,
        i: usize,
        verify: bool,
        block: u64,
        sector: u64,
        before: u64,
        got: &[u8],
        want: &mut [u8],
    ) -> Result<(), String> {
        let wid = u64::from_le_bytes(got[..8].try_into().expect("8 bytes"));
        let newest = self.newest_acked(block, sector, before);
        let who = format!(
            "client {} read of block {block} sector {sector} from node {}",
            self.clients[c].attachment,
            node_id(i)
        );
        if wid == 0 {
            if got.iter().any(|&x| x != 0) {
                return Err(format!("{who}: neither zeroes nor a write"));
            }
            match newest {
                Some((v, w, false)) if verify || !self.discard_after(block, v) => {
                    return Err(format!(
                        "{who}: zeroes, but write {w} (version {v}) was acknowledged before{}",
                        if verify {
                            " (at the end)"
                        } else {
                            " and no newer discard sent"
                        }
                    ));
                }
                _ => {}
            }
            return Ok(());
        }
        let Some(rec) = self.writes.get(&wid) else {
            return Err(format!("{who}: names write {wid}, never sent"));
        };
        if !covers(rec, block, sector) {
            return Err(format!("{who}: holds write {wid}, which did not cover it"));
        }
        fill_sector(wid, rec.version, block, sector, want);
        if got != want {
            return Err(format!("{who}: write {wid}'s sector is corrupt"));
        }
        if rec.zero {
            return Err(format!("{who}: holds data naming discard {wid}"));
        }
        match newest {
            Some((v, w, _)) if rec.version < v => Err(format!(
                "{who}: write {wid} (version {}), older than write {w} (version {v}) acknowledged before the read",
                rec.version
            )),
            Some((v, w, _)) if verify && rec.version != v => Err(format!(
                "{who} at the end: write {wid} (version {}), not the newest acknowledged, write {w} (version {v})",
                rec.version
            )),
            None if verify => Err(format!(
                "{who} at the end: write {wid}, never acknowledged, where no write was"
            )),
            _ => Ok(()),
        }
    }

    /// At the end: every block from every member of its partition,
    /// through client 1.
    fn verify(&mut self) -> Result<(), String> {
        self.log("verifying every block on every replica".into());
        self.refresh_table(0);
        let t = self.clients[0].table.clone();
        for first in (0..BLOCKS).step_by(4) {
            let p = t.partition_at(VOLUME, first * BS as u64);
            let members: Vec<usize> = t
                .partition(p)
                .map(|r| r.members.iter().filter_map(|m| index_of(m.node)).collect())
                .unwrap_or_default();
            for target in members {
                self.new_read(0, first, 4, Some(target), true);
            }
        }
        let mut rounds = 0u64;
        while !self.clients[0].ops.is_empty() {
            rounds += 1;
            if rounds > 5_000_000 {
                return Err("the final reads never finished".into());
            }
            self.drive_nodes()?;
            self.client_step(0)?;
            let next = self.world.borrow().next_arrival().unwrap_or(0);
            let mut w = self.world.borrow_mut();
            w.now_us = (w.now_us + 2).max(next.min(w.now_us + 1_000));
        }
        Ok(())
    }
}
