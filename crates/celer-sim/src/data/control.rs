//! The control service in the data-path simulation: the real state machine
//! (`celer_meta::state::Cluster`, on redb's in-memory backend and a
//! [`ManualClock`] that follows the simulated time), and what each node's
//! agent does with it: register at start (and after a power cut), beat,
//! fetch the table when a peer names a newer epoch, report finished
//! backfills (`synced`). Pushes of new tables reach each running node,
//! a few of them lost (a heartbeat's reply carries the table then).
//!
//! With `DataSimConfig::route_changes`, leases are short in simulated time (heartbeat 2 ms, lease 6 ms, a down
//! node's places kept 20 ms) so that a node's power cut (2-80 ms) marks it
//! down, its partitions' other members record what it misses, and it
//! catches up when it is back, or, down longer, its partitions move to
//! other nodes and are copied whole (backfill). Each answered registration
//! or heartbeat renews the node core's lease (`NodeCore::renew_lease`),
//! as the agent does.

use std::sync::Arc;
use std::time::Duration;

use celer_meta::api::{
    node_serves_for, AttachMode, AttachVolume, CreateVolume, Heartbeat, RegisterNode, VolumeFence,
};
use celer_meta::state::{Attached, Cluster, ClusterConfig, ManualClock, Pushed};
use celer_meta::store::RedbStore;
use celer_node::core::AgentNote;
use celer_node::net::Net;
use celer_route::{NodeId, RouteTable};
use rand::Rng;

use super::{node_id, DataSim, BLOCKS, BS, CHUNK_BLOCKS, VOLUME};

/// How often a node beats, and how long its lease lasts (simulated ms).
const HEARTBEAT_MS: u64 = 2;
const LEASE_MS: u64 = 6;
/// A node down this long loses its places in the partitions.
const DOWN_GRACE_MS: u64 = 20;
/// The chance that a push of a new table does not reach one node.
const PUSH_LOSS: f64 = 0.05;
/// The volume's name at the control service. The service numbers it 1;
/// the nodes and clients know it as [`VOLUME`] (the seeds' placements,
/// which hash the volume id, predate the attachments), so the fences the
/// service hands out are translated ([`Control::node_fences`]).
const VOLUME_NAME: &str = "vm";

/// The control service and what the simulation keeps about the agents.
pub(super) struct Control {
    cluster: Cluster,
    store: RedbStore,
    clock: Arc<ManualClock>,
    /// Simulated ms the clock was moved to.
    clock_ms: u64,
    /// Per node: when it beats next (µs).
    pub(super) next_beat: Vec<u64>,
    /// Per node: whether it registered once (it then names its id).
    known: Vec<bool>,
    /// Per node: partitions its catch-ups copy whole instead, sent with
    /// its next heartbeat (at once), until one is answered.
    copy_whole: Vec<Vec<u32>>,
    /// The volume's id at the control service.
    volume_id: u64,
}

impl Control {
    /// Without `route_changes`, leases and the grace outlast any run.
    pub(super) fn new(nodes: usize, route_changes: bool) -> Result<Control, String> {
        let (lease_ms, down_grace_ms) = if route_changes {
            (LEASE_MS, DOWN_GRACE_MS)
        } else {
            (3_600_000, 3_600_000)
        };
        let clock = Arc::new(ManualClock::new());
        let store = RedbStore::in_memory().map_err(|e| e.to_string())?;
        let cfg = ClusterConfig {
            heartbeat_ms: HEARTBEAT_MS,
            lease_ms,
            partition_bits: 2,
            replicas: 3,
            max_moves: 8,
            chunk_bytes: CHUNK_BLOCKS * BS as u64,
            down_grace_ms,
            capability_ttl_ms: 3_600_000,
        };
        let mut cluster = Cluster::load(cfg, &store, clock.clone()).map_err(|e| e.to_string())?;
        let volume = cluster
            .create_volume(
                &store,
                "sim",
                CreateVolume {
                    name: VOLUME_NAME.into(),
                    size_bytes: BLOCKS * BS as u64,
                    replicas: None,
                    sector_size_bytes: None,
                },
            )
            .map_err(|e| format!("creating the volume: {e}"))?;
        Ok(Control {
            volume_id: volume.id,
            cluster,
            store,
            clock,
            clock_ms: 0,
            next_beat: vec![0; nodes],
            copy_whole: vec![Vec::new(); nodes],
            known: vec![false; nodes],
        })
    }

    /// Node `i`'s agent stopped (a power cut): what it was to report is
    /// gone with it.
    pub(super) fn forget_agent(&mut self, i: usize) {
        self.copy_whole[i].clear();
    }

    /// A client attaches the volume read-write: `Shared` beside the
    /// other client, or `Exclusive` with `force` (a take-over, which ends
    /// every other writer's attachment and raises the fence generation).
    pub(super) fn attach(
        &mut self,
        holder: String,
        mode: AttachMode,
        force: bool,
    ) -> Result<Attached, String> {
        let req = AttachVolume {
            read_only: false,
            mode,
            force,
            holder,
        };
        self.cluster
            .attach(&self.store, "sim", VOLUME_NAME, &req)
            .map_err(|e| format!("attach refused: {e}"))
    }

    /// The fence generations of `fences` as the nodes install them:
    /// (volume as the nodes know it, generation).
    pub(super) fn node_fences(&self, fences: &[VolumeFence]) -> Vec<(u64, u32)> {
        fences
            .iter()
            .filter(|f| f.volume == self.volume_id)
            .map(|f| (VOLUME, f.fence))
            .collect()
    }

    /// Whether the control service counts node `i` up (a fence push to
    /// it must be answered; one down gets the generation when it
    /// registers or beats again).
    pub(super) fn node_up(&self, i: usize) -> bool {
        self.cluster.node_up(node_id(i))
    }

    pub(super) fn table(&self) -> Option<&RouteTable> {
        self.cluster.table()
    }

    pub(super) fn epoch(&self) -> u64 {
        self.cluster.epoch()
    }
}

/// Node `i`'s data address, as it registers it.
pub(super) fn data_addr(i: usize) -> String {
    format!("10.0.0.{}:7000", i + 1)
}

impl DataSim {
    /// Node `i` (just started on its disk) registers, as its agent does
    /// before the node serves, and installs the current table.
    pub(super) fn register_node(&mut self, i: usize) -> Result<(), String> {
        let req = RegisterNode {
            node_id: self.control.known[i].then(|| node_id(i)),
            data_addr: data_addr(i),
            admin_addr: format!("10.0.0.{}:7001", i + 1),
            shards: 1,
            domain: format!("host{i}"),
            disk_uuid: Some(0xD15C_0000 + i as u64 + (self.nodes[i].disk_gen << 8)),
            replace_disk: self.nodes[i].replacing,
        };
        let c = &mut self.control;
        let (r, pushed) = c
            .cluster
            .register(&c.store, req)
            .map_err(|e| format!("node {} registration refused: {e}", node_id(i)))?;
        if r.node_id != node_id(i) {
            return Err(format!(
                "node {} was given id {} at registration",
                node_id(i),
                r.node_id
            ));
        }
        c.known[i] = true;
        // Fences before the table, before the node serves (as the node
        // queues them before its shards start).
        let fences = c.node_fences(&r.fences);
        if let Some(core) = self.nodes[i].core.as_mut() {
            core.set_fences(fences);
            // Answered at once (the service runs in the same moment).
            let until = core.net().now() + node_serves_for(LEASE_MS);
            core.renew_lease(until);
        }
        self.nodes[i].replacing = false;
        c.next_beat[i] = self.world.borrow().now_us + HEARTBEAT_MS * 1000;
        self.log(format!(
            "node {} registers (epoch {})",
            node_id(i),
            self.control.epoch()
        ));
        self.deliver(pushed);
        if let Some(t) = self.control.table().cloned() {
            self.install(i, t);
        }
        Ok(())
    }

    /// Whether node `i`'s agent is cut off from the control service now
    /// (`DataSimConfig::control_cut_per_ms`; its data connections work).
    pub(super) fn control_cut(&self, i: usize) -> bool {
        self.now() < self.nodes[i].control_cut_until
    }

    /// Hands table `t` to node `i` if it runs and holds an older one.
    fn install(&mut self, i: usize, t: RouteTable) {
        if let Some(core) = self.nodes[i].core.as_mut() {
            if core.route_epoch() < t.epoch {
                let _node = tracing::info_span!("node", id = i + 1).entered();
                core.install_route(t);
            }
        }
    }

    /// A pushed table goes to every running node, but a few pushes are lost.
    fn deliver(&mut self, pushed: Pushed) {
        let Some(t) = pushed else { return };
        self.log(format!("route epoch {}: {}", t.epoch, describe(&t)));
        for i in 0..self.nodes.len() {
            if self.nodes[i].core.is_some() && !self.control_cut(i) && !self.rng.gen_bool(PUSH_LOSS)
            {
                self.install(i, t.clone());
            }
        }
    }

    /// The control service's side of a simulated moment: its clock follows
    /// the simulated one; the agents report what their cores asked for and
    /// beat when due; leases are checked every simulated millisecond.
    pub(super) fn control_step(&mut self) -> Result<(), String> {
        let now = self.now();
        for i in 0..self.nodes.len() {
            if self.control_cut(i) {
                // Its agent cannot reach the service: what the core asks
                // waits, and so do its heartbeats.
                continue;
            }
            let Some(core) = self.nodes[i].core.as_mut() else {
                continue;
            };
            for note in core.agent_notes() {
                match note {
                    AgentNote::NeedRoute(_) => {
                        if let Some(t) = self.control.table().cloned() {
                            self.install(i, t);
                        }
                    }
                    AgentNote::Synced { partition, epoch } => {
                        self.report_synced(i, partition, epoch)
                    }
                    AgentNote::CopyWhole { partition } => {
                        let asked = &mut self.control.copy_whole[i];
                        if !asked.contains(&partition) {
                            asked.push(partition);
                            self.control.next_beat[i] = now;
                        }
                    }
                }
            }
            if now >= self.control.next_beat[i] {
                self.control.next_beat[i] = now + HEARTBEAT_MS * 1000;
                self.beat(i)?;
            }
        }
        let ms = now / 1000;
        if ms > self.control.clock_ms {
            let c = &mut self.control;
            c.clock.advance(Duration::from_millis(ms - c.clock_ms));
            c.clock_ms = ms;
            let pushed = c
                .cluster
                .expire_leases(&c.store)
                .map_err(|e| format!("expire_leases failed: {e}"))?;
            self.deliver(pushed);
        }
        Ok(())
    }

    fn beat(&mut self, i: usize) -> Result<(), String> {
        let Some(core) = self.nodes[i].core.as_ref() else {
            return Ok(());
        };
        let beat = Heartbeat {
            epoch: core.route_epoch(),
            copy_whole: self.control.copy_whole[i].clone(),
            ..Heartbeat::default()
        };
        let c = &mut self.control;
        match c.cluster.heartbeat(&c.store, node_id(i), &beat) {
            Ok((reply, pushed)) => {
                if !beat.copy_whole.is_empty() {
                    self.log(format!(
                        "node {} copies partitions {:?} whole instead of catching up",
                        node_id(i),
                        beat.copy_whole
                    ));
                }
                self.control.copy_whole[i].clear();
                self.deliver(pushed);
                let fences = self.control.node_fences(&reply.fences);
                if let Some(core) = self.nodes[i].core.as_mut() {
                    core.set_fences(fences);
                }
                if let Some(t) = reply.table {
                    self.install(i, t);
                }
                if let Some(core) = self.nodes[i].core.as_mut() {
                    let until = core.net().now() + node_serves_for(LEASE_MS);
                    core.renew_lease(until);
                }
                Ok(())
            }
            Err(e) => {
                // Marked down while it ran (a beat came too late): the
                // agent registers again.
                self.log(format!("node {} heartbeat refused: {e}", node_id(i)));
                self.register_node(i)
            }
        }
    }

    /// Whether node `i` may lose its disk: every partition it is a member
    /// of has another member in sync and not down, which holds the data
    /// (not one whose disk was replaced already, and which the table does
    /// not show yet).
    pub(super) fn can_lose_disk(&self, i: usize) -> bool {
        let Some(t) = self.control.table() else {
            return false;
        };
        let me = node_id(i);
        let disk_gone =
            |n: NodeId| (0..self.nodes.len()).any(|k| node_id(k) == n && self.nodes[k].replacing);
        t.partitions.iter().all(|r| {
            r.member(me).is_none()
                || r.members
                    .iter()
                    .any(|m| m.node != me && m.in_sync && !m.down && !disk_gone(m.node))
        })
    }

    /// An operator splits the partitions (up to `SPLIT_PARTITIONS_MAX`).
    pub(super) fn split_partitions(&mut self) -> Result<(), String> {
        if self
            .control
            .table()
            .is_none_or(|t| t.partition_count() >= super::SPLIT_PARTITIONS_MAX)
        {
            return Ok(());
        }
        let c = &mut self.control;
        match c.cluster.split(&c.store, "operator") {
            Ok((t, pushed)) => {
                self.report.splits += 1;
                self.log(format!(
                    "SPLIT to {} partitions (epoch {})",
                    t.partition_count(),
                    t.epoch
                ));
                self.deliver(pushed);
                Ok(())
            }
            // Refused while a rebalance is under way, say: the operator
            // tries again later.
            Err(e) => {
                self.log(format!("split refused: {e}"));
                Ok(())
            }
        }
    }

    fn report_synced(&mut self, i: usize, partition: u32, epoch: u64) {
        let c = &mut self.control;
        match c.cluster.synced(&c.store, node_id(i), epoch, &[partition]) {
            Ok((reply, pushed)) => {
                if !reply.marked.is_empty() {
                    self.log(format!(
                        "node {} in sync for partition {partition} (epoch {epoch})",
                        node_id(i)
                    ));
                }
                if !reply.backfill_again.is_empty() {
                    self.log(format!(
                        "node {} backfills partitions {:?} again",
                        node_id(i),
                        reply.backfill_again
                    ));
                    if let Some(core) = self.nodes[i].core.as_mut() {
                        core.backfill_again(epoch, reply.backfill_again);
                    }
                }
                self.deliver(pushed);
            }
            Err(e) => self.log(format!(
                "node {} synced for partition {partition} refused: {e}",
                node_id(i)
            )),
        }
    }

    /// Whether the cluster is whole again: every node runs the current
    /// table, and every partition has its replicas, all in sync.
    pub(super) fn converged(&self) -> bool {
        let Some(t) = self.control.table() else {
            return false;
        };
        let want = usize::from(t.replicas).min(self.nodes.len());
        self.nodes
            .iter()
            .all(|n| n.core.as_ref().is_some_and(|c| c.route_epoch() == t.epoch))
            && t.partitions
                .iter()
                .all(|p| p.members.len() == want && p.all_in_sync())
    }
}

/// A table in one line: each partition's members and their states.
pub(super) fn describe(t: &RouteTable) -> String {
    let mut parts = Vec::new();
    for (p, r) in t.partitions.iter().enumerate() {
        let ms: Vec<String> = r
            .members
            .iter()
            .map(|m| format!("{}:{}", m.node, crate::member_state(m)))
            .collect();
        parts.push(format!("p{p}[{}]", ms.join(" ")));
    }
    parts.join(" ")
}
