//! Deterministic simulation of Celer's control plane (issue 16, first
//! part); the engine on a simulated disk ([`engine`]) and the data path
//! with real node cores ([`data`]) are in their modules.
//!
//! One thread, one seed, no sleeping: the real control-service state
//! machine (`celer_meta::state::Cluster`, on redb's in-memory backend) runs
//! on a [`ManualClock`] that the simulator moves in steps of
//! [`STEP_MS`]. Around it, modelled storage nodes register, heartbeat,
//! learn route tables (from heartbeat replies and pushes, some of them
//! lost), copy the partitions they join from a member in sync and report
//! them synced, and drop the partitions they no longer belong to. A fault
//! schedule drawn from the seed crashes and restarts nodes, replaces their
//! disks (an empty disk, registered with the operator's `--replace-disk`),
//! cuts them off the control service, stops the whole cluster, restarts
//! the control service (its state loaded from the store), adds nodes and
//! splits partitions.
//!
//! The nodes are a model, not `celer-node`: what a node's disk holds is
//! one flag per partition (it holds a copy or not), so the checker sees
//! placement and trust, not block contents. After every step it checks:
//!
//! * **no partition without a copy**: some member of every partition of
//!   the current table has a disk that holds its data;
//! * **no trusted empty copy**: a running member that the table calls in
//!   sync (and not down) holds the data;
//! * **epochs only grow**, across control-service restarts too;
//! * **attachments**: two front ends attach the volume (exclusive, with or
//!   without `--force`, some read-only) and detach it; at most one
//!   read-write attachment exists, it holds the volume's current fence,
//!   fences only grow and attachment ids are never handed out twice;
//!
//! and at the end, after every fault is healed and every node runs again
//! for a quiet period, **the cluster converged**: every partition has
//! `min(replicas, nodes)` members in sync, each holding the data.
//!
//! The same seed gives the same trace, line for line ([`run`] twice, or
//! `celer sim --seed S` twice).

pub mod data;
pub mod disk;
pub mod engine;
pub mod net;

pub use data::{run_data, sim_time_us, DataReport, DataSimConfig};
pub use engine::{run_engine, EngineReport, EngineSimConfig};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use celer_meta::api::{AttachMode, AttachVolume, CreateVolume, Heartbeat, RegisterNode};
use celer_meta::state::{Cluster, ClusterConfig, ManualClock, Pushed};
use celer_meta::store::RedbStore;
use celer_route::{NodeId, RouteTable};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A route member's state in a trace line: down, in sync, or copying.
pub(crate) fn member_state(m: &celer_route::Member) -> &'static str {
    if m.down {
        "down"
    } else if m.in_sync {
        "sync"
    } else {
        "copy"
    }
}

/// Simulated time per step.
pub const STEP_MS: u64 = 100;
/// How often the control service checks leases (as `meta serve` does).
const LEASE_CHECK_MS: u64 = 500;
/// Most partition bits the simulator splits to.
const MAX_PARTITION_BITS: u8 = 6;
/// The volume the front ends attach.
const VOLUME: &str = "vm1";
/// Trace lines kept before the failing step in a report.
pub const TRACE_TAIL: usize = 60;

/// Per simulated second, the chance of each fault.
#[derive(Clone, Debug)]
pub struct Faults {
    /// A running node's process dies.
    pub crash: f64,
    /// A dead node's process starts again.
    pub restart: f64,
    /// Of the restarts, the share on a new, empty disk.
    pub replace_disk: f64,
    /// A running node loses its link to the control service.
    pub cut: f64,
    /// A cut link comes back.
    pub heal: f64,
    /// Every node stops at once (`celer up` stopping, a power cut).
    pub stop_all: f64,
    /// An operator splits the partitions.
    pub split: f64,
    /// An operator adds a node.
    pub add_node: f64,
    /// The control service restarts (or another takes over with etcd): it
    /// loads its state from the store, and liveness starts afresh.
    pub meta_restart: f64,
    /// A pushed route table does not reach a node.
    pub push_loss: f64,
    /// A front end attaches the volume (half of them with `--force`, one
    /// in ten read-only).
    pub attach: f64,
    /// A front end detaches.
    pub detach: f64,
}

impl Default for Faults {
    fn default() -> Faults {
        Faults {
            crash: 0.02,
            restart: 0.15,
            replace_disk: 0.25,
            cut: 0.01,
            heal: 0.2,
            stop_all: 0.004,
            split: 0.004,
            add_node: 0.004,
            meta_restart: 0.005,
            push_loss: 0.2,
            attach: 0.05,
            detach: 0.03,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    /// Simulated seconds with faults.
    pub seconds: u64,
    /// Simulated seconds after the faults: links healed, every node
    /// running; the cluster must have converged by the end.
    pub quiet_seconds: u64,
    /// Nodes at the start.
    pub nodes: usize,
    /// Most nodes the operator adds up to.
    pub max_nodes: usize,
    pub faults: Faults,
    /// The control service's settings.
    pub cluster: ClusterConfig,
}

impl SimConfig {
    pub fn new(seed: u64) -> SimConfig {
        SimConfig {
            seed,
            seconds: 600,
            quiet_seconds: 120,
            nodes: 4,
            max_nodes: 6,
            faults: Faults::default(),
            cluster: ClusterConfig {
                heartbeat_ms: 1_000,
                lease_ms: 3_000,
                partition_bits: 3,
                replicas: 3,
                max_moves: 8,
                chunk_bytes: 1 << 20,
                down_grace_ms: 10_000,
                capability_ttl_ms: 60_000,
            },
        }
    }
}

/// What a run did and found.
#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    /// Every event, one line each, with its simulated time.
    pub trace: Vec<String>,
    /// The first invariant broken, if any (the run stops there).
    pub violation: Option<String>,
    /// Simulated milliseconds run.
    pub sim_ms: u64,
    /// Faults injected and calls made, by kind.
    pub counts: BTreeMap<&'static str, u64>,
    /// The last route table's epoch.
    pub epoch: u64,
}

impl Report {
    /// The trace's last lines, up to the failing step.
    pub fn tail(&self) -> &[String] {
        &self.trace[self.trace.len().saturating_sub(TRACE_TAIL)..]
    }
}

/// A partition copy in progress on a node.
#[derive(Clone, Copy, Debug)]
struct Copy {
    source: usize,
    done_at_ms: u64,
    /// The table epoch the copy started from (reported when synced).
    epoch: u64,
}

/// A modelled storage node.
#[derive(Debug)]
struct Node {
    id: Option<NodeId>,
    disk: u64,
    /// The process runs.
    alive: bool,
    /// Registered since its last start: it serves.
    registered: bool,
    /// Its next registration replaces the disk of node `id`.
    replacing: bool,
    /// Cannot reach the control service.
    cut: bool,
    /// Partitions (of the current partition count) its disk holds.
    holds: BTreeSet<u32>,
    /// The route table it knows.
    view: Option<RouteTable>,
    next_beat_ms: u64,
    copying: BTreeMap<u32, Copy>,
    /// Copies done, to report synced when the control service is reachable.
    to_report: Vec<(u32, u64)>,
}

impl Node {
    fn new(disk: u64, first_beat_ms: u64) -> Node {
        Node {
            id: None,
            disk,
            alive: true,
            registered: false,
            replacing: false,
            cut: false,
            holds: BTreeSet::new(),
            view: None,
            next_beat_ms: first_beat_ms,
            copying: BTreeMap::new(),
            to_report: Vec::new(),
        }
    }
}

struct Sim {
    cfg: SimConfig,
    rng: StdRng,
    clock: Arc<ManualClock>,
    store: RedbStore,
    cluster: Cluster,
    nodes: Vec<Node>,
    now_ms: u64,
    next_disk: u64,
    /// The first table was seen and its members given their data.
    seeded: bool,
    /// The last table the trace described.
    traced: Option<RouteTable>,
    /// The highest route epoch seen.
    max_epoch: u64,
    /// Two front ends (hosts) and the attachment each holds of the volume.
    front_ends: [Option<u32>; 2],
    /// The highest attachment id and fence generation handed out.
    max_attachment: u32,
    /// The fence each attachment handed out got.
    fence_of: BTreeMap<u32, u32>,
    max_fence: u32,
    trace: Vec<String>,
    counts: BTreeMap<&'static str, u64>,
}

/// Runs one simulation. Deterministic: the same config gives the same
/// report.
pub fn run(cfg: &SimConfig) -> Report {
    let mut sim = match Sim::new(cfg.clone()) {
        Ok(s) => s,
        Err(e) => {
            return Report {
                seed: cfg.seed,
                trace: Vec::new(),
                violation: Some(format!("the simulator could not start: {e}")),
                sim_ms: 0,
                counts: BTreeMap::new(),
                epoch: 0,
            }
        }
    };
    let violation = sim.run_all().err();
    Report {
        seed: cfg.seed,
        epoch: sim.cluster.epoch(),
        trace: sim.trace,
        violation,
        sim_ms: sim.now_ms,
        counts: sim.counts,
    }
}

impl Sim {
    fn new(cfg: SimConfig) -> Result<Sim, String> {
        let clock = Arc::new(ManualClock::new());
        let store = RedbStore::in_memory().map_err(|e| e.to_string())?;
        let cluster =
            Cluster::load(cfg.cluster.clone(), &store, clock.clone()).map_err(|e| e.to_string())?;
        let mut sim = Sim {
            rng: StdRng::seed_from_u64(cfg.seed),
            clock,
            store,
            cluster,
            nodes: Vec::new(),
            now_ms: 0,
            next_disk: 1,
            seeded: false,
            traced: None,
            max_epoch: 0,
            front_ends: [None; 2],
            max_attachment: 0,
            fence_of: BTreeMap::new(),
            max_fence: 0,
            trace: Vec::new(),
            counts: BTreeMap::new(),
            cfg,
        };
        for _ in 0..sim.cfg.nodes {
            sim.add_node();
        }
        Ok(sim)
    }

    fn log(&mut self, line: String) {
        let t = self.now_ms;
        self.trace
            .push(format!("{:>4}.{} s  {line}", t / 1000, (t % 1000) / 100));
    }

    fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_insert(0) += 1;
    }

    fn chance(&mut self, per_second: f64) -> bool {
        self.rng.gen::<f64>() < per_second * STEP_MS as f64 / 1000.0
    }

    fn add_node(&mut self) {
        let disk = self.next_disk;
        self.next_disk += 1;
        let first = self.now_ms + self.rng.gen_range(0..10) * STEP_MS;
        self.nodes.push(Node::new(disk, first));
        let i = self.nodes.len() - 1;
        self.log(format!("node #{i} added (disk {disk})"));
    }

    fn run_all(&mut self) -> Result<(), String> {
        let fault_end = self.cfg.seconds * 1000;
        while self.now_ms < fault_end {
            self.inject_faults()?;
            self.step()?;
        }
        self.log("faults end: every link healed, every node started".into());
        for i in 0..self.nodes.len() {
            self.nodes[i].cut = false;
            if !self.nodes[i].alive {
                self.start(i, false);
            }
        }
        let end = fault_end + self.cfg.quiet_seconds * 1000;
        while self.now_ms < end {
            self.step()?;
        }
        self.check_converged()
    }

    /// One step: node actions, the lease check, time moves, invariants.
    fn step(&mut self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            self.act(i)?;
        }
        if self.now_ms.is_multiple_of(LEASE_CHECK_MS) {
            let pushed = self
                .cluster
                .expire_leases(&self.store)
                .map_err(|e| format!("expire_leases failed: {e}"))?;
            self.deliver(pushed);
        }
        self.trace_table();
        // Route epochs only grow: nodes refuse an older table.
        let epoch = self.cluster.epoch();
        if epoch < self.max_epoch {
            return Err(format!(
                "the route epoch went back from {} to {epoch}",
                self.max_epoch
            ));
        }
        self.max_epoch = epoch;
        self.check_attachments()?;
        self.now_ms += STEP_MS;
        self.clock.advance(Duration::from_millis(STEP_MS));
        self.check()
    }

    fn inject_faults(&mut self) -> Result<(), String> {
        let f = self.cfg.faults.clone();
        if self.chance(f.stop_all) {
            self.count("stop_all");
            self.log("every node stops".into());
            for i in 0..self.nodes.len() {
                if self.nodes[i].alive {
                    self.crash(i);
                }
            }
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].alive {
                if self.chance(f.crash) {
                    self.count("crash");
                    self.crash(i);
                } else if !self.nodes[i].cut && self.chance(f.cut) {
                    self.count("cut");
                    self.nodes[i].cut = true;
                    self.log(format!("node #{i} cut off the control service"));
                } else if self.nodes[i].cut && self.chance(f.heal) {
                    self.nodes[i].cut = false;
                    self.log(format!("node #{i} reaches the control service again"));
                }
            } else if self.chance(f.restart) {
                let new_disk = self.nodes[i].id.is_some()
                    && self.rng.gen::<f64>() < f.replace_disk
                    && self.can_lose_disk(i);
                self.count(if new_disk {
                    "restart_new_disk"
                } else {
                    "restart"
                });
                self.start(i, new_disk);
            }
        }
        if self.chance(f.meta_restart) {
            self.count("meta_restart");
            self.cluster = Cluster::load(self.cfg.cluster.clone(), &self.store, self.clock.clone())
                .map_err(|e| format!("the control service could not load its state: {e}"))?;
            self.log(format!(
                "control service restarts: state loaded from the store (epoch {})",
                self.cluster.epoch()
            ));
        }
        if self.seeded {
            for h in 0..self.front_ends.len() {
                if self.chance(f.attach) {
                    self.attach(h)?;
                } else if self.front_ends[h].is_some() && self.chance(f.detach) {
                    self.detach(h);
                }
            }
        }
        if self.chance(f.add_node) && self.nodes.len() < self.cfg.max_nodes {
            self.count("add_node");
            self.add_node();
        }
        let bits = self.cluster.table().map(|t| t.partition_bits);
        if bits.is_some_and(|b| b < MAX_PARTITION_BITS) && self.chance(f.split) {
            self.count("split");
            match self.cluster.split(&self.store, "sim") {
                Ok((t, pushed)) => {
                    self.log(format!(
                        "split to {} partitions (epoch {})",
                        t.partition_count(),
                        t.epoch
                    ));
                    self.split_disks(t.partition_count() / 2);
                    self.deliver(pushed);
                }
                Err(e) => self.log(format!("split refused: {e}")),
            }
        }
        Ok(())
    }

    /// A disk may be lost only if every partition it holds has another
    /// complete copy: a member in sync (not down) whose disk holds it. A
    /// syncing or down member's copy may lack recent writes. So the
    /// simulator never destroys more copies than replication tolerates.
    fn can_lose_disk(&self, i: usize) -> bool {
        let Some(t) = self.cluster.table() else {
            return true;
        };
        self.nodes[i].holds.iter().all(|&p| {
            t.partition(p).is_some_and(|r| {
                r.members
                    .iter()
                    .filter(|m| m.in_sync && !m.down)
                    .any(|m| self.index_of(m.node) != Some(i) && self.holds(m.node, p))
            })
        })
    }

    fn crash(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.alive = false;
        n.registered = false;
        n.cut = false;
        n.view = None;
        n.copying.clear();
        n.to_report.clear();
        // Copies from it break with their connections.
        for other in &mut self.nodes {
            other.copying.retain(|_, c| c.source != i);
        }
        self.log(format!("node #{i} ({}) crashes", self.name(i)));
    }

    fn start(&mut self, i: usize, new_disk: bool) {
        let disk = if new_disk {
            let d = self.next_disk;
            self.next_disk += 1;
            Some(d)
        } else {
            None
        };
        let first = self.now_ms + STEP_MS;
        let n = &mut self.nodes[i];
        n.alive = true;
        n.next_beat_ms = first;
        if let Some(d) = disk {
            n.disk = d;
            n.holds.clear();
            n.replacing = true;
        }
        let what = match disk {
            Some(d) => format!("on a new empty disk {d} (--replace-disk)"),
            None => "on its disk".to_string(),
        };
        self.log(format!("node #{i} ({}) starts {what}", self.name(i)));
    }

    fn name(&self, i: usize) -> String {
        match self.nodes[i].id {
            Some(id) => format!("id {id}"),
            None => "no id yet".into(),
        }
    }

    fn index_of(&self, id: NodeId) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == Some(id))
    }

    /// Whether node `id`'s disk holds partition `p`'s data.
    fn holds(&self, id: NodeId, p: u32) -> bool {
        self.index_of(id)
            .is_some_and(|j| self.nodes[j].holds.contains(&p))
    }

    /// A split doubled the partitions: partition p's data is now p's and
    /// `p + old`'s, on every disk that held it.
    fn split_disks(&mut self, old: u32) {
        for n in &mut self.nodes {
            let halves: Vec<u32> = n.holds.iter().map(|p| p + old).collect();
            n.holds.extend(halves);
        }
    }

    /// Hands a pushed table to every running node the push reaches.
    fn deliver(&mut self, pushed: Pushed) {
        let Some(t) = pushed else { return };
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            if !n.alive || !n.registered || n.cut {
                continue;
            }
            if self.rng.gen::<f64>() < self.cfg.faults.push_loss {
                continue;
            }
            self.learn(i, t.clone());
        }
    }

    /// Node `i` learns table `t` (if newer than its own): drops the
    /// partitions it no longer belongs to.
    fn learn(&mut self, i: usize, t: RouteTable) {
        let n = &self.nodes[i];
        if n.view.as_ref().is_some_and(|v| v.epoch >= t.epoch) {
            return;
        }
        let Some(id) = n.id else { return };
        let current = self.cluster.table().map_or(0, |c| c.partition_count());
        if t.partition_count() == current {
            let dropped: Vec<u32> = n
                .holds
                .iter()
                .copied()
                .filter(|&p| t.partition(p).is_none_or(|r| r.member(id).is_none()))
                .collect();
            if !dropped.is_empty() {
                self.log(format!(
                    "node #{i} (id {id}) drops partitions {dropped:?} (epoch {})",
                    t.epoch
                ));
            }
            let n = &mut self.nodes[i];
            for p in dropped {
                n.holds.remove(&p);
                n.copying.remove(&p);
            }
        }
        self.nodes[i].view = Some(t);
    }

    /// What node `i` does in this step.
    fn act(&mut self, i: usize) -> Result<(), String> {
        if !self.nodes[i].alive || self.now_ms < self.nodes[i].next_beat_ms {
            self.finish_copies(i)?;
            return Ok(());
        }
        self.nodes[i].next_beat_ms = self.now_ms + self.cfg.cluster.heartbeat_ms;
        if self.nodes[i].cut {
            return Ok(());
        }
        if !self.nodes[i].registered {
            return self.register(i);
        }
        let Some(id) = self.nodes[i].id else {
            return Ok(());
        };
        self.count("heartbeat");
        let beat = Heartbeat {
            epoch: self.nodes[i].view.as_ref().map_or(0, |v| v.epoch),
            ..Heartbeat::default()
        };
        match self.cluster.heartbeat(&self.store, id, &beat) {
            Ok((reply, pushed)) => {
                if let Some(t) = reply.table {
                    self.learn(i, t);
                }
                self.deliver(pushed);
            }
            Err(e) => {
                // Not known any more, or not up: register again.
                self.log(format!("node #{i} (id {id}) heartbeat refused: {e}"));
                self.nodes[i].registered = false;
            }
        }
        self.seed_first_table();
        self.report_synced(i)?;
        self.start_copies(i);
        self.finish_copies(i)
    }

    fn register(&mut self, i: usize) -> Result<(), String> {
        self.count("register");
        let n = &self.nodes[i];
        let req = RegisterNode {
            node_id: n.id,
            data_addr: format!("10.0.0.{i}:7000"),
            admin_addr: format!("10.0.0.{i}:8000"),
            shards: 1,
            domain: format!("host{i}"),
            disk_uuid: Some(n.disk),
            replace_disk: n.replacing,
        };
        match self.cluster.register(&self.store, req) {
            Ok((r, pushed)) => {
                let n = &mut self.nodes[i];
                n.id = Some(r.node_id);
                n.registered = true;
                n.replacing = false;
                n.view = None;
                self.log(format!("node #{i} registered as id {}", r.node_id));
                self.deliver(pushed);
                self.seed_first_table();
                if let Some(t) = self.cluster.table().cloned() {
                    self.learn(i, t);
                }
            }
            Err(e) => {
                let e = e.to_string();
                let short: String = e.chars().take(90).collect();
                self.log(format!(
                    "node #{i} ({}) registration refused: {short}",
                    self.name(i)
                ));
            }
        }
        Ok(())
    }

    /// The first table: its members start out holding their (empty)
    /// partitions.
    fn seed_first_table(&mut self) {
        if self.seeded {
            return;
        }
        let Some(t) = self.cluster.table().cloned() else {
            return;
        };
        self.seeded = true;
        for p in 0..t.partition_count() {
            let Some(r) = t.partition(p) else { continue };
            for m in r.members.iter().filter(|m| m.in_sync) {
                if let Some(j) = self.index_of(m.node) {
                    self.nodes[j].holds.insert(p);
                }
            }
        }
        self.log(format!(
            "first route table (epoch {}, {} partitions)",
            t.epoch,
            t.partition_count()
        ));
        let req = CreateVolume {
            name: VOLUME.into(),
            size_bytes: 1 << 30,
            replicas: None,
            sector_size_bytes: None,
        };
        match self.cluster.create_volume(&self.store, "sim", req) {
            Ok(v) => self.log(format!("volume {VOLUME} created (id {})", v.id)),
            Err(e) => self.log(format!("volume {VOLUME} not created: {e}")),
        }
    }

    /// Starts a copy of every partition node `i` joined as a syncing
    /// member, from a running member in sync.
    fn start_copies(&mut self, i: usize) {
        let Some(id) = self.nodes[i].id else { return };
        let Some(view) = self.nodes[i].view.clone() else {
            return;
        };
        if view.partition_count() != self.cluster.table().map_or(0, |t| t.partition_count()) {
            return; // learns the split first
        }
        for p in 0..view.partition_count() {
            let Some(r) = view.partition(p) else { continue };
            let syncing = r.member(id).is_some_and(|m| !m.in_sync && !m.down);
            if !syncing || self.nodes[i].copying.contains_key(&p) {
                continue;
            }
            let source = r
                .members
                .iter()
                .filter(|m| m.in_sync && !m.down && m.node != id)
                .filter_map(|m| self.index_of(m.node))
                .find(|&j| self.nodes[j].alive && self.nodes[j].registered);
            let Some(source) = source else { continue };
            let done_at_ms = self.now_ms + self.rng.gen_range(5..30) * STEP_MS;
            self.nodes[i].copying.insert(
                p,
                Copy {
                    source,
                    done_at_ms,
                    epoch: view.epoch,
                },
            );
            self.log(format!(
                "node #{i} (id {id}) copies partition {p} from node #{source} (epoch {})",
                view.epoch
            ));
        }
    }

    fn finish_copies(&mut self, i: usize) -> Result<(), String> {
        let due: Vec<(u32, Copy)> = self.nodes[i]
            .copying
            .iter()
            .filter(|(_, c)| c.done_at_ms <= self.now_ms)
            .map(|(p, c)| (*p, *c))
            .collect();
        for (p, c) in due {
            self.nodes[i].copying.remove(&p);
            let src = &self.nodes[c.source];
            if !src.alive {
                self.log(format!(
                    "node #{i} copy of partition {p}: source #{} died",
                    c.source
                ));
                continue;
            }
            // A node serves a backfill only as an in-sync member of the
            // partition in the table it holds (BackfillRead answers
            // NotInSync otherwise): the copy fails, and starts again.
            let serves = src.id.is_some_and(|sid| {
                src.view
                    .as_ref()
                    .and_then(|v| v.partition(p))
                    .and_then(|r| r.member(sid))
                    .is_some_and(|m| m.in_sync)
            });
            if !serves {
                self.log(format!(
                    "node #{i} copy of partition {p}: source #{} is no longer in sync for it",
                    c.source
                ));
                continue;
            }
            // The copy is whatever the source's disk holds.
            if src.holds.contains(&p) {
                self.nodes[i].holds.insert(p);
            } else {
                self.nodes[i].holds.remove(&p);
            }
            self.nodes[i].to_report.push((p, c.epoch));
        }
        if self.nodes[i].alive && self.nodes[i].registered && !self.nodes[i].cut {
            self.report_synced(i)?;
        }
        Ok(())
    }

    fn report_synced(&mut self, i: usize) -> Result<(), String> {
        let Some(id) = self.nodes[i].id else {
            return Ok(());
        };
        let reports = std::mem::take(&mut self.nodes[i].to_report);
        for (p, epoch) in reports {
            self.count("synced");
            match self.cluster.synced(&self.store, id, epoch, &[p]) {
                Ok((reply, pushed)) => {
                    if !reply.marked.is_empty() {
                        self.log(format!(
                            "node #{i} (id {id}) in sync for partition {p} (epoch {})",
                            reply.epoch
                        ));
                    }
                    self.deliver(pushed);
                }
                Err(e) => self.log(format!("node #{i} (id {id}) synced refused: {e}")),
            }
        }
        Ok(())
    }

    /// Front end `h` attaches the volume; a new attachment's id must be
    /// above every id handed out before (ids are never reused).
    fn attach(&mut self, h: usize) -> Result<(), String> {
        self.count("attach");
        let req = AttachVolume {
            read_only: self.rng.gen::<f64>() < 0.1,
            mode: AttachMode::Exclusive,
            force: self.rng.gen::<f64>() < 0.5,
            holder: format!("host{h}"),
        };
        let what = format!(
            "front end {h} attaches{}{}",
            if req.read_only { " read-only" } else { "" },
            if req.force { " with --force" } else { "" }
        );
        match self.cluster.attach(&self.store, "sim", VOLUME, &req) {
            Ok(a) => {
                let id = a.attachment.id;
                self.log(format!(
                    "{what}: attachment {id} (fence {}), took over {:?}",
                    a.attachment.fence, a.taken_over
                ));
                if !req.force && !a.taken_over.is_empty() {
                    return Err(format!(
                        "attachment {id} took over {:?} without --force",
                        a.taken_over
                    ));
                }
                // A writer taken over is fenced: its generation is below
                // the new one, so the nodes refuse its writes.
                if !req.read_only {
                    for t in &a.taken_over {
                        let old = self.fence_of.get(t).copied().unwrap_or(0);
                        if old >= a.attachment.fence {
                            return Err(format!(
                                "attachment {t}, taken over by {id}, keeps fence {old} (the new one is {}): its writes would still be accepted",
                                a.attachment.fence
                            ));
                        }
                    }
                }
                self.fence_of.insert(id, a.attachment.fence);
                if id <= self.max_attachment {
                    return Err(format!(
                        "attachment id {id} handed out again (up to {} were)",
                        self.max_attachment
                    ));
                }
                self.max_attachment = id;
                self.front_ends[h] = Some(id);
            }
            Err(e) => {
                let e = e.to_string();
                let short: String = e.chars().take(70).collect();
                self.log(format!("{what}: refused: {short}"));
            }
        }
        Ok(())
    }

    fn detach(&mut self, h: usize) {
        let Some(id) = self.front_ends[h].take() else {
            return;
        };
        self.count("detach");
        match self.cluster.detach(&self.store, "sim", id) {
            Ok(_) => self.log(format!("front end {h} detaches attachment {id}")),
            // Taken over (ended) by the other front end meanwhile.
            Err(e) => self.log(format!("front end {h} detach {id}: {e}")),
        }
    }

    /// Attachments: the fence only grows, at most one read-write
    /// exclusive attachment, and it holds the volume's current fence.
    fn check_attachments(&mut self) -> Result<(), String> {
        let live = self.cluster.attachments();
        let Ok(v) = self.cluster.volume(VOLUME) else {
            return Ok(());
        };
        if v.fence < self.max_fence {
            return Err(format!(
                "volume {VOLUME}'s fence went back from {} to {}",
                self.max_fence, v.fence
            ));
        }
        self.max_fence = v.fence;
        let writers: Vec<&celer_meta::api::AttachmentRecord> = live
            .iter()
            .filter(|a| a.volume_id == v.id && !a.read_only)
            .collect();
        if writers.len() > 1 {
            let ids: Vec<u32> = writers.iter().map(|a| a.id).collect();
            return Err(format!(
                "two exclusive writers of {VOLUME}: attachments {ids:?}"
            ));
        }
        if let Some(w) = writers.first() {
            if w.fence != v.fence {
                return Err(format!(
                    "writer attachment {} holds fence {}, the volume is at {}",
                    w.id, w.fence, v.fence
                ));
            }
        }
        Ok(())
    }

    /// Traces each new table: the partitions whose members changed.
    fn trace_table(&mut self) {
        let Some(t) = self.cluster.table().cloned() else {
            return;
        };
        if self.traced.as_ref().is_some_and(|o| o.epoch == t.epoch) {
            return;
        }
        let mut changed = Vec::new();
        for p in 0..t.partition_count() {
            let new = t.partition(p).map(|r| &r.members);
            let old = self
                .traced
                .as_ref()
                .filter(|o| o.partition_count() == t.partition_count())
                .and_then(|o| o.partition(p))
                .map(|r| &r.members);
            if new != old {
                let ms: Vec<String> = new
                    .into_iter()
                    .flatten()
                    .map(|m| format!("{}:{}", m.node, member_state(m)))
                    .collect();
                changed.push(format!("p{p}[{}]", ms.join(" ")));
            }
        }
        let up: Vec<String> = t
            .nodes
            .iter()
            .filter(|n| n.up)
            .map(|n| n.id.to_string())
            .collect();
        self.log(format!(
            "table epoch {} (up: {}): {}",
            t.epoch,
            up.join(","),
            changed.join(" ")
        ));
        self.traced = Some(t);
    }

    /// The invariants that hold after every step.
    fn check(&self) -> Result<(), String> {
        let Some(t) = self.cluster.table() else {
            return Ok(());
        };
        if !self.seeded {
            return Ok(());
        }
        for p in 0..t.partition_count() {
            let Some(r) = t.partition(p) else {
                return Err(format!(
                    "epoch {}: partition {p} missing from the table",
                    t.epoch
                ));
            };
            let holders: Vec<NodeId> = r
                .members
                .iter()
                .filter(|m| self.holds(m.node, p))
                .map(|m| m.node)
                .collect();
            if holders.is_empty() {
                return Err(format!(
                    "epoch {}: partition {p} has no copy: its members {:?} hold none of its data",
                    t.epoch, r.members
                ));
            }
            for m in r.members.iter().filter(|m| m.in_sync && !m.down) {
                let Some(j) = self.index_of(m.node) else {
                    continue;
                };
                let n = &self.nodes[j];
                if n.alive && n.registered && !n.holds.contains(&p) {
                    return Err(format!(
                        "epoch {}: node {} serves partition {p} as in sync, and its disk does not hold it (members {:?})",
                        t.epoch, m.node, r.members
                    ));
                }
            }
        }
        Ok(())
    }

    /// After the quiet period: every partition fully replicated and in sync.
    fn check_converged(&self) -> Result<(), String> {
        let t = self
            .cluster
            .table()
            .ok_or_else(|| "no route table after the quiet period".to_string())?;
        let want = usize::from(self.cfg.cluster.replicas).min(self.nodes.len());
        for p in 0..t.partition_count() {
            let r = t
                .partition(p)
                .ok_or_else(|| format!("partition {p} missing"))?;
            let good = r
                .members
                .iter()
                .filter(|m| m.in_sync && !m.down && self.holds(m.node, p))
                .count();
            if good < want {
                return Err(format!(
                    "not converged after {} quiet seconds: partition {p} has {good} of {want} copies in sync (members {:?})",
                    self.cfg.quiet_seconds, r.members
                ));
            }
        }
        Ok(())
    }
}

/// Renders a report as `celer sim` prints it.
pub fn render(r: &Report, wall: Duration) -> String {
    let mut out = String::new();
    let sim_s = r.sim_ms as f64 / 1000.0;
    let wall_s = wall.as_secs_f64().max(1e-9);
    let calls: u64 = ["heartbeat", "register", "synced"]
        .iter()
        .filter_map(|k| r.counts.get(k))
        .sum();
    match &r.violation {
        None => out.push_str(&format!(
            "seed {}: ok, {sim_s:.0} simulated s, final epoch {}\n",
            r.seed, r.epoch
        )),
        Some(v) => {
            out.push_str(&format!(
                "seed {}: VIOLATION at {sim_s:.1} s: {v}\n",
                r.seed
            ));
            out.push_str("trace up to the failing step:\n");
            for l in r.tail() {
                out.push_str("  ");
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    let counts: Vec<String> = r.counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    out.push_str(&format!("  events: {}\n", counts.join(", ")));
    out.push_str(&format!(
        "  {:.0}x real time ({sim_s:.0} simulated s in {wall_s:.2} s), {:.0} control-service calls per wall-clock second\n",
        sim_s / wall_s,
        calls as f64 / wall_s
    ));
    out
}
