//! The control service's state machine: nodes, volumes, the route table and
//! the change log, kept in memory and written through to the
//! [`MetaStore`].
//!
//! Every change runs as a `Tx` on a copy of the persistent state: it
//! records store ops and change-log entries; only when the store has applied
//! them atomically does the copy replace the state. A failed store write
//! leaves memory as it was. Liveness (last heartbeat, acknowledged epoch) and
//! the nodes' backfill figures are memory only: after a restart every known
//! node gets a fresh lease, and figures come with the next heartbeats.
//!
//! The state machine reads no clock of its own: time comes from the
//! [`Clock`] it is loaded with ([`SystemClock`] in the service; a
//! [`ManualClock`] that a test or a simulator moves), so leases, grace
//! periods, cut windows and log times can be driven without sleeping.
//!
//! Store layout (keys): `node/{id:010}` → `NodeInfo`, `vol/{name}` →
//! `Volume`, `route` → `StoredRoute`, `ctr/node`, `ctr/volume` and
//! `ctr/attachment` → the next ids (decimal), `att/{id:010}` →
//! `AttachmentRecord`; the change log holds `LogEntry` JSON.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use celer_route::{NodeId, NodeInfo, RouteTable};
use serde::{Deserialize, Serialize};

use crate::api::{
    validate_volume_name, validate_volume_size, AttachMode, AttachVolume, AttachmentRecord, Change,
    CloneVolume, CreateVolume, Cutting, FlattenVolume, Heartbeat, HeartbeatReply, LogEntry,
    NodeRecord, NodeStatus, RegisterNode, Registered, Restored, Snapshot, Status, SyncedReply,
    Volume, VolumeFence, VolumeLayers, HOLDER_MAX_BYTES, LOG_PAGE_MAX, SNAPSHOT_CUT_MS,
    VOLUME_REPLICAS_MAX,
};
use crate::store::{MetaStore, Op, StoreError};

/// Longest address or failure-domain string a node may register.
const NODE_FIELD_MAX_BYTES: usize = 256;
/// Log entries read per store call while replaying.
const REPLAY_PAGE: usize = 4096;

/// The cluster parameters of [`crate::server::MetaConfig`] that the state
/// machine uses.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub heartbeat_ms: u64,
    pub lease_ms: u64,
    pub partition_bits: u8,
    pub replicas: u8,
    pub max_moves: usize,
    pub chunk_bytes: u64,
    /// A node down for less than this keeps its places in the partitions
    /// as a down member (no stand-in; it catches up when it returns);
    /// past it, its partitions move to other nodes. 0: at once.
    pub down_grace_ms: u64,
    /// How long a capability handed to an attaching client is valid; the
    /// client renews it well before (and keeps working through a control
    /// service outage shorter than what is left).
    pub capability_ttl_ms: u64,
}

/// An API error: HTTP status and a message saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

type Result<T> = std::result::Result<T, StateError>;

/// A new attachment (see [`Cluster::attach`]).
#[derive(Debug)]
pub struct Attached {
    pub volume: Volume,
    pub attachment: AttachmentRecord,
    /// Attachments it took over (ended and fenced).
    pub taken_over: Vec<u32>,
    /// When the fence generation went up: the nodes that must install it
    /// (id, admin address) before the attachment is handed out.
    pub fenced: Option<Vec<(NodeId, String)>>,
}

/// An attachment, for an operator: id, mode, holder, age.
pub fn describe(a: &AttachmentRecord, now_unix_ms: u64) -> String {
    let mode = if a.read_only {
        "read-only".to_string()
    } else {
        a.mode.to_string()
    };
    let holder = if a.holder.is_empty() {
        String::new()
    } else {
        format!(", holder {}", a.holder)
    };
    let age_s = now_unix_ms.saturating_sub(a.at) / 1000;
    format!(
        "attachment {} ({mode}{holder}, attached {age_s} s ago)",
        a.id
    )
}

/// The route table and, for every syncing member, the epoch it joined in:
/// a `synced` report counts only if it is about the current membership.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct StoredRoute {
    table: Option<RouteTable>,
    /// (partition, node) → the epoch the node joined as a syncing member.
    #[serde(with = "joined_as_list")]
    joined: BTreeMap<(u32, NodeId), u64>,
}

/// JSON maps need string keys: the map is stored as `[[p, node, epoch]...]`.
mod joined_as_list {
    use std::collections::BTreeMap;

    use celer_route::NodeId;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<(u32, NodeId), u64>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let v: Vec<(u32, NodeId, u64)> = m.iter().map(|(&(p, n), &e)| (p, n, e)).collect();
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<(u32, NodeId), u64>, D::Error> {
        let v = Vec::<(u32, NodeId, u64)>::deserialize(d)?;
        Ok(v.into_iter().map(|(p, n, e)| ((p, n), e)).collect())
    }
}

/// What persists.
#[derive(Clone, Debug)]
struct Persistent {
    nodes: BTreeMap<NodeId, NodeInfo>,
    volumes: BTreeMap<String, Volume>,
    route: StoredRoute,
    next_node_id: NodeId,
    next_volume_id: u64,
    /// Attachments handed out and not detached.
    attachments: BTreeMap<u32, AttachmentRecord>,
    next_attachment_id: u64,
    last_seq: u64,
    /// Deleted volume ids (tombstones): storage nodes free their chunks and
    /// refuse I/O to them. A restore that brings a volume back removes its
    /// tombstone (the data the nodes already freed does not come back).
    deleted: BTreeSet<u64>,
    /// Each node's engine disk identity, as registered.
    disks: BTreeMap<NodeId, u64>,
    /// The next era (layer) number: eras are never reused cluster-wide.
    next_era: u32,
}

#[derive(Clone, Debug)]
struct Liveness {
    last_heartbeat: Option<Instant>,
    /// Lease start when there was no heartbeat yet (registration or start).
    since: Instant,
    epoch_acked: u64,
    /// The backfill figures of the last heartbeat (progress, not metadata).
    backfill: Backfill,
    /// The failure the node's last heartbeat reported.
    failure: Option<String>,
    /// The warning the node's last heartbeat reported.
    warning: Option<String>,
}

/// A node's backfill figures as its last heartbeat reported them.
#[derive(Clone, Copy, Debug, Default)]
struct Backfill {
    bytes_done: u64,
    bytes_total: u64,
    partitions_unlisted: u64,
}

impl Liveness {
    fn fresh(now: Instant) -> Liveness {
        Liveness {
            last_heartbeat: None,
            since: now,
            epoch_acked: 0,
            backfill: Backfill::default(),
            failure: None,
            warning: None,
        }
    }
    fn expired(&self, now: Instant, lease: Duration) -> bool {
        now.duration_since(self.last_heartbeat.unwrap_or(self.since)) > lease
    }
}

pub struct Cluster {
    cfg: ClusterConfig,
    p: Persistent,
    live: BTreeMap<NodeId, Liveness>,
    /// The highest epoch a node reported (memory only).
    epoch_floor: u64,
    /// When each down node went down (memory only: a restarted control
    /// service starts every down node's grace period again).
    down_since: BTreeMap<NodeId, Instant>,
    /// The only time this state reads.
    clock: Arc<dyn Clock>,
}

/// What a change did besides its reply: a new table to push.
pub type Pushed = Option<RouteTable>;

/// The wall clock in Unix milliseconds (0 before 1970).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where the state machine reads time.
pub trait Clock: Send + Sync {
    /// Monotonic time: leases, grace periods.
    fn now(&self) -> Instant;
    /// Wall-clock milliseconds since the Unix epoch: what is stored or
    /// compared with other machines' clocks (log entries, creation times,
    /// a snapshot's cut window).
    fn unix_ms(&self) -> u64;
}

/// The machine's clocks.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn unix_ms(&self) -> u64 {
        unix_ms()
    }
}

/// A clock that moves only when told to ([`ManualClock::advance`]): both
/// of its readings move together.
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    start_unix_ms: u64,
    elapsed_ms: AtomicU64,
}

impl ManualClock {
    /// Starts at the machine's current time.
    pub fn new() -> ManualClock {
        ManualClock {
            start: Instant::now(),
            start_unix_ms: unix_ms(),
            elapsed_ms: AtomicU64::new(0),
        }
    }
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.elapsed_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

impl Default for ManualClock {
    fn default() -> ManualClock {
        ManualClock::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + Duration::from_millis(self.elapsed_ms.load(Ordering::Relaxed))
    }
    fn unix_ms(&self) -> u64 {
        self.start_unix_ms + self.elapsed_ms.load(Ordering::Relaxed)
    }
}

/// A disk identity as messages and logs show it (`celer engine` prints
/// the same form).
fn disk_name(uuid: u64) -> String {
    format!("{uuid:016x}")
}

fn node_key(id: NodeId) -> String {
    format!("node/{id:010}")
}

fn volume_key(name: &str) -> String {
    format!("vol/{name}")
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(v).expect("metadata serializes to JSON")
}

fn parse<T: for<'de> Deserialize<'de>>(key: &[u8], v: &[u8]) -> std::result::Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

fn record_of(n: &NodeInfo) -> NodeRecord {
    NodeRecord {
        id: n.id,
        data_addr: n.data_addr.clone(),
        admin_addr: n.admin_addr.clone(),
        shards: n.shards,
        domain: n.domain.clone(),
    }
}

/// A change in progress: a copy of the state plus what to write.
struct Tx {
    p: Persistent,
    /// New tables get epochs above this (the highest a node reported).
    epoch_floor: u64,
    who: String,
    ops: Vec<Op>,
    entries: Vec<LogEntry>,
    table_changed: bool,
    /// Down nodes within the grace period: they keep their places.
    held: Vec<NodeId>,
    /// Per node, the epoch its last heartbeat reported it serves (see
    /// `RouteTable::keep_leavers`).
    served: BTreeMap<NodeId, u64>,
    /// The clock's wall time when the change began: its log entries' and
    /// tombstones' time.
    now_unix_ms: u64,
}

impl Tx {
    fn log(&mut self, what: Change) {
        self.p.last_seq += 1;
        let epoch = self.p.route.table.as_ref().map_or(0, |t| t.epoch);
        self.entries.push(LogEntry {
            seq: self.p.last_seq,
            at: self.now_unix_ms,
            who: self.who.clone(),
            what,
            epoch,
        });
    }
    fn put_node(&mut self, n: NodeInfo) {
        self.ops.push(Op::put(node_key(n.id), json(&n)));
        self.p.nodes.insert(n.id, n);
    }
    fn put_volume(&mut self, v: Volume) {
        self.ops.push(Op::put(volume_key(&v.name), json(&v)));
        self.p.volumes.insert(v.name.clone(), v);
    }
    fn put_counters(&mut self) {
        self.ops
            .push(Op::put("ctr/node", self.p.next_node_id.to_string()));
        self.ops
            .push(Op::put("ctr/volume", self.p.next_volume_id.to_string()));
        self.ops.push(Op::put(
            "ctr/attachment",
            self.p.next_attachment_id.to_string(),
        ));
        self.ops
            .push(Op::put("ctr/era", self.p.next_era.to_string()));
    }
    /// A new era, never used before.
    fn new_era(&mut self) -> Result<u32> {
        let era = self.p.next_era;
        if era > celer_device::ERA_MAX {
            return Err(StateError::Conflict(format!(
                "every era number up to {} is used: no more snapshots, rollbacks or clones",
                celer_device::ERA_MAX
            )));
        }
        self.p.next_era += 1;
        self.put_counters();
        Ok(era)
    }
    /// Tombstones layers no volume or snapshot reads any more (their
    /// keys: nodes free their chunks, as for a deleted volume).
    fn bury_layers(&mut self, lineage: u64, before: &BTreeSet<u32>) {
        let now = lineage_eras(&self.p.volumes, lineage);
        for era in before.difference(&now) {
            let key = celer_device::layer_key(lineage, *era);
            if key == lineage {
                // Era 0 of the lineage is its root volume's id: tombstoned
                // when that volume is deleted.
                continue;
            }
            self.ops.push(Op::put(
                format!("deleted/{key}"),
                self.now_unix_ms.to_string(),
            ));
            self.p.deleted.insert(key);
        }
    }
    /// Installs `t` as the current table, recording which syncing members
    /// are new in it.
    fn set_table(&mut self, t: RouteTable, reason: &str) {
        let old = self.p.route.table.as_ref();
        let mut joined = BTreeMap::new();
        for (p, part) in t.partitions.iter().enumerate() {
            let p = p as u32;
            // After a split, p + P continues p's membership.
            let old_p = old.map_or(p, |o| p & (o.partition_count() - 1));
            for m in part.members.iter().filter(|m| !m.in_sync) {
                // Syncing and up in the old table. A member that was down
                // (even while syncing) missed the writes of the tables it
                // was down in: a synced report from before it came back
                // covers none of them, so it counts from here.
                let was_syncing = old
                    .and_then(|o| o.partition(old_p))
                    .and_then(|o| o.member(m.node))
                    .is_some_and(|o| !o.in_sync && !o.down);
                let since = match self.p.route.joined.get(&(old_p, m.node)) {
                    Some(e) if was_syncing => *e,
                    _ => t.epoch,
                };
                joined.insert((p, m.node), since);
            }
        }
        let epoch = t.epoch;
        self.p.route = StoredRoute {
            table: Some(t),
            joined,
        };
        self.ops.push(Op::put("route", json(&self.p.route)));
        self.table_changed = true;
        self.log(Change::RouteEpoch {
            epoch,
            reason: reason.to_string(),
        });
    }

    /// The next table for the current node list: the first one once
    /// `replicas` nodes are up, then a bounded rebalance. No new epoch when
    /// nothing would change.
    fn reroute(
        &mut self,
        cfg: &ClusterConfig,
        reason: &str,
    ) -> std::result::Result<(), StateError> {
        if let Some(next) = next_table(&self.p, cfg, &self.held, &self.served, self.epoch_floor)? {
            self.set_table(next, reason);
        }
        Ok(())
    }
}

/// The next table for `p`'s node list: the first one once `replicas` nodes
/// are up, then a bounded rebalance; `None` when nothing would change.
/// Reads `p` only, so a periodic check needs no transaction (no copy of the
/// state) when there is nothing to do.
fn next_table(
    p: &Persistent,
    cfg: &ClusterConfig,
    held: &[NodeId],
    served: &BTreeMap<NodeId, u64>,
    epoch_floor: u64,
) -> std::result::Result<Option<RouteTable>, StateError> {
    let nodes: Vec<NodeInfo> = p.nodes.values().cloned().collect();
    match &p.route.table {
        None => {
            if nodes.iter().filter(|n| n.up).count() < cfg.replicas as usize {
                return Ok(None);
            }
            let mut t =
                RouteTable::initial(nodes, cfg.partition_bits, cfg.replicas, cfg.chunk_bytes)
                    .map_err(|e| {
                        StateError::BadRequest(format!("cannot build the route table: {e}"))
                    })?;
            t.epoch = t.epoch.max(epoch_floor + 1);
            Ok(Some(t))
        }
        Some(t) => {
            // Bounded concurrent movement: partitions still moving use
            // up the budget.
            let moving = t.partitions.iter().filter(|p| !p.all_in_sync()).count();
            let mut next = t.rebalance_holding(nodes, cfg.max_moves.saturating_sub(moving), held);
            next.keep_leavers(t, |n| served.get(&n).copied().unwrap_or(0));
            if next.nodes == t.nodes && next.partitions == t.partitions {
                return Ok(None);
            }
            Ok(Some(next))
        }
    }
}

impl Cluster {
    /// Loads the state from `store` (empty on a new store); `clock` is the
    /// only time it reads.
    pub fn load(
        cfg: ClusterConfig,
        store: &dyn MetaStore,
        clock: Arc<dyn Clock>,
    ) -> std::result::Result<Cluster, StoreError> {
        let mut nodes = BTreeMap::new();
        for (k, v) in store.scan_prefix(b"node/")? {
            let n: NodeInfo = parse(&k, &v)?;
            nodes.insert(n.id, n);
        }
        let mut volumes = BTreeMap::new();
        for (k, v) in store.scan_prefix(b"vol/")? {
            let vol: Volume = parse(&k, &v)?;
            volumes.insert(vol.name.clone(), vol);
        }
        let route = match store.get(b"route")? {
            Some(v) => parse(b"route", &v)?,
            None => StoredRoute::default(),
        };
        let counter = |key: &str| -> std::result::Result<u64, StoreError> {
            match store.get(key.as_bytes())? {
                None => Ok(1),
                Some(v) => std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| StoreError::Corrupt {
                        key: key.into(),
                        reason: "not a number".into(),
                    }),
            }
        };
        let next_node_id = counter("ctr/node")?;
        let next_node_id = NodeId::try_from(next_node_id).map_err(|_| StoreError::Corrupt {
            key: "ctr/node".into(),
            reason: "out of range".into(),
        })?;
        let next_volume_id = counter("ctr/volume")?;
        let next_attachment_id = counter("ctr/attachment")?;
        let next_era = counter("ctr/era")?;
        let next_era = u32::try_from(next_era).map_err(|_| StoreError::Corrupt {
            key: "ctr/era".into(),
            reason: "out of range".into(),
        })?;
        let mut attachments = BTreeMap::new();
        for (k, v) in store.scan_prefix(b"att/")? {
            let a: AttachmentRecord = parse(&k, &v)?;
            attachments.insert(a.id, a);
        }
        let mut disks = BTreeMap::new();
        for (k, v) in store.scan_prefix(b"disk/")? {
            let parsed = std::str::from_utf8(&k[5..])
                .ok()
                .and_then(|s| s.parse::<NodeId>().ok())
                .zip(
                    std::str::from_utf8(&v)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok()),
                );
            let (id, uuid) = parsed.ok_or_else(|| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: "not a node id and disk uuid".into(),
            })?;
            disks.insert(id, uuid);
        }
        let mut deleted = BTreeSet::new();
        for (k, _) in store.scan_prefix(b"deleted/")? {
            let id = std::str::from_utf8(&k[8..])
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    reason: "not a volume id".into(),
                })?;
            deleted.insert(id);
        }
        let last_seq = store.last_seq()?;
        let now = clock.now();
        let live = nodes.keys().map(|id| (*id, Liveness::fresh(now))).collect();
        let down_since = nodes
            .values()
            .filter(|n| !n.up)
            .map(|n| (n.id, now))
            .collect();
        Ok(Cluster {
            cfg,
            p: Persistent {
                nodes,
                volumes,
                route,
                next_node_id,
                next_volume_id,
                attachments,
                next_attachment_id,
                last_seq,
                deleted,
                disks,
                next_era,
            },
            live,
            epoch_floor: 0,
            down_since,
            clock,
        })
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    /// The clock this state reads.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn table(&self) -> Option<&RouteTable> {
        self.p.route.table.as_ref()
    }

    pub fn epoch(&self) -> u64 {
        self.table().map_or(0, |t| t.epoch)
    }

    pub fn node_ids(&self) -> Vec<NodeId> {
        self.p.nodes.keys().copied().collect()
    }

    fn begin(&self, who: &str) -> Tx {
        Tx {
            p: self.p.clone(),
            epoch_floor: self.epoch_floor,
            who: who.to_string(),
            ops: Vec::new(),
            entries: Vec::new(),
            table_changed: false,
            held: self.held(self.clock.now()),
            served: self.served(),
            now_unix_ms: self.clock.unix_ms(),
        }
    }

    /// Per node, the epoch of the table its last heartbeat reported it
    /// serves (memory only: after a restart of the control service, none
    /// until the next heartbeats, so no member leaves before them).
    fn served(&self) -> BTreeMap<NodeId, u64> {
        self.live
            .iter()
            .map(|(id, l)| (*id, l.epoch_acked))
            .collect()
    }

    /// Down nodes whose grace period has not run out.
    fn held(&self, now: Instant) -> Vec<NodeId> {
        let grace = Duration::from_millis(self.cfg.down_grace_ms);
        self.down_since
            .iter()
            .filter(|(id, since)| {
                now.duration_since(**since) < grace && self.p.nodes.get(id).is_some_and(|n| !n.up)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Down nodes that still hold places as down members: the grace period
    /// ran out for some of them when they are not in `held`.
    fn holding(&self) -> BTreeSet<NodeId> {
        self.table()
            .map(|t| {
                t.partitions
                    .iter()
                    .flat_map(|p| p.members.iter().filter(|m| m.down).map(|m| m.node))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Writes `tx` to the store; on success it becomes the state. Returns
    /// the new table when it changed (to push).
    fn commit(&mut self, store: &dyn MetaStore, tx: Tx) -> std::result::Result<Pushed, StoreError> {
        if tx.ops.is_empty() && tx.entries.is_empty() {
            return Ok(None);
        }
        let log: Vec<(u64, Vec<u8>)> = tx.entries.iter().map(|e| (e.seq, json(e))).collect();
        store.apply(&tx.ops, &log)?;
        for e in &tx.entries {
            tracing::info!(seq = e.seq, who = %e.who, epoch = e.epoch, "{}", e.what);
        }
        self.p = tx.p;
        Ok(if tx.table_changed {
            self.p.route.table.clone()
        } else {
            None
        })
    }

    fn known_node(&self, id: NodeId) -> Result<&NodeInfo> {
        self.p.nodes.get(&id).ok_or_else(|| {
            StateError::NotFound(format!(
                "node {id} is not registered: register first (POST /v1/nodes/register)"
            ))
        })
    }

    /// How long ago node `id` last showed life (a heartbeat, its
    /// registration, or this service's start), if it still holds its
    /// lease: marked up and heard from within `lease_ms`.
    fn lease_held(&self, id: NodeId, now: Instant) -> Option<u64> {
        let lease = Duration::from_millis(self.cfg.lease_ms);
        let up = self.p.nodes.get(&id).is_some_and(|n| n.up);
        let l = self.live.get(&id)?;
        let age = now.duration_since(l.last_heartbeat.unwrap_or(l.since));
        (up && age <= lease).then_some(age.as_millis() as u64)
    }

    /// The identity checks of a registration: one node per id and per disk.
    /// Returns the id to register (the claimed one, or for a node that
    /// claims none the one its disk was registered with). Without a disk
    /// identity (nodes of older releases) nothing is checked.
    fn check_identity(&self, req: &RegisterNode, now: Instant) -> Result<Option<NodeId>> {
        let lease_ms = self.cfg.lease_ms;
        if req.replace_disk && req.node_id.is_none() {
            return Err(StateError::BadRequest(
                "replace_disk needs the node_id of the node whose disk this one replaces".into(),
            ));
        }
        let Some(disk) = req.disk_uuid else {
            return Ok(req.node_id);
        };
        if let Some(id) = req.node_id {
            self.check_claim(id, disk, req.replace_disk, now)?;
        }
        // The node this disk was registered with, if another than claimed.
        let owner = self
            .p
            .disks
            .iter()
            .find(|(id, d)| {
                **d == disk && Some(**id) != req.node_id && self.p.nodes.contains_key(id)
            })
            .map(|(id, _)| *id);
        if let Some(owner) = owner {
            if let Some(age) = self.lease_held(owner, now) {
                return Err(StateError::Conflict(format!(
                    "disk {} is node {owner}'s, and node {owner} is running (last heard from {age} ms ago, lease {lease_ms} ms); this registration {} from the same disk. Two processes must not serve one disk (or this is a copied disk image: format the copy with `celer engine format`). Stop the other process first; if it has just stopped, start this one again once its lease has expired.",
                    disk_name(disk),
                    req.node_id.map_or("asks for a new node id".to_string(), |id| format!("claims node {id}")),
                )));
            }
            if req.node_id.is_none() {
                // The disk's own node, back without knowing its id (an old
                // disk whose node.id file was lost): give it back its id.
                tracing::info!(node = owner, disk = %disk_name(disk), "a node with no id registers with node {owner}'s disk: it is node {owner}");
                return Ok(Some(owner));
            }
        }
        Ok(req.node_id)
    }

    /// A registration claiming node `id` from `disk`: refused while `id`
    /// runs with another disk, and without the operator's replace flag.
    fn check_claim(&self, id: NodeId, disk: u64, replace_disk: bool, now: Instant) -> Result<()> {
        let lease_ms = self.cfg.lease_ms;
        if replace_disk && !self.p.nodes.contains_key(&id) {
            return Err(StateError::Conflict(format!(
                "node {id} is not registered here, so it has no disk to replace (is {id} the right id? `celer meta nodes` lists them): start without --replace-disk to join as a new node"
            )));
        }
        let Some(known) = self.p.disks.get(&id).copied() else {
            // A node registered before disks were recorded, or one this
            // service does not know (restored metadata): take its disk.
            return Ok(());
        };
        if known == disk || !self.p.nodes.contains_key(&id) {
            return Ok(());
        }
        if let Some(age) = self.lease_held(id, now) {
            return Err(StateError::Conflict(format!(
                "node {id} is running with disk {} (last heard from {age} ms ago, lease {lease_ms} ms), and this registration claims node {id} from disk {}. Two nodes cannot share an id: this node probably read another node's id (a node.id file in a state directory shared by two disks, or --node-id). Give each node a state directory of its own (--state-dir) and do not pass --node-id. If this disk really replaces node {id}'s, stop node {id}, wait for its lease to expire and start this one with --replace-disk {id}.",
                disk_name(known),
                disk_name(disk),
            )));
        }
        if !replace_disk {
            return Err(StateError::Conflict(format!(
                "node {id} was registered with disk {}, and this registration claims node {id} from disk {}: refused, the new disk holds none of node {id}'s data. If node {id}'s disk was replaced, start it with --replace-disk {id} (it rejoins its partitions empty and copies their data back). Otherwise this is not node {id}: give it a state directory of its own (--state-dir) and do not pass --node-id.",
                disk_name(known),
                disk_name(disk),
            )));
        }
        Ok(())
    }

    pub fn register(
        &mut self,
        store: &dyn MetaStore,
        req: RegisterNode,
    ) -> Result<(Registered, Pushed)> {
        let partitions = self
            .table()
            .map_or(1u32 << self.cfg.partition_bits, |t| t.partition_count());
        for (what, v) in [
            ("data_addr", &req.data_addr),
            ("admin_addr", &req.admin_addr),
        ] {
            if v.is_empty() || v.len() > NODE_FIELD_MAX_BYTES || !v.contains(':') {
                return Err(StateError::BadRequest(format!(
                    "{what} `{v}` is not an address: use HOST:PORT"
                )));
            }
        }
        if req.domain.is_empty() || req.domain.len() > NODE_FIELD_MAX_BYTES {
            return Err(StateError::BadRequest(format!(
                "failure domain must be 1 to {NODE_FIELD_MAX_BYTES} bytes (e.g. the host name)"
            )));
        }
        if !req.shards.is_power_of_two() || req.shards as u32 > partitions {
            return Err(StateError::BadRequest(format!(
                "{} shards: must be a power of two and at most the partition count {partitions}",
                req.shards
            )));
        }
        let now = self.clock.now();
        let claimed = self.check_identity(&req, now)?;
        let mut tx = self.begin("");
        let id = match claimed {
            Some(0) => {
                return Err(StateError::BadRequest(
                    "node id 0 is not valid: send no node_id to get one assigned".into(),
                ))
            }
            Some(id) => {
                // An id this service does not know (a restored or rebuilt
                // control service): take it, and never hand it out again.
                if id >= tx.p.next_node_id {
                    tx.p.next_node_id = id.checked_add(1).ok_or_else(|| {
                        StateError::BadRequest(format!("node id {id} is out of range"))
                    })?;
                    tx.put_counters();
                }
                id
            }
            None => {
                let id = tx.p.next_node_id;
                tx.p.next_node_id = id
                    .checked_add(1)
                    .ok_or_else(|| StateError::Conflict("no node ids left".to_string()))?;
                tx.put_counters();
                id
            }
        };
        tx.who = format!("node {id}");
        let info = NodeInfo {
            id,
            data_addr: req.data_addr,
            admin_addr: req.admin_addr,
            shards: req.shards,
            domain: req.domain,
            up: true,
        };
        if let Some(uuid) = req.disk_uuid {
            let known = tx.p.disks.get(&id).copied();
            if known != Some(uuid) {
                tx.ops.push(Op::put(format!("disk/{id}"), uuid.to_string()));
                tx.p.disks.insert(id, uuid);
                // One node per disk: a down node whose disk this was (a
                // reused disk, checked above) no longer has it.
                let others: Vec<NodeId> =
                    tx.p.disks
                        .iter()
                        .filter(|(o, d)| **d == uuid && **o != id)
                        .map(|(o, _)| *o)
                        .collect();
                for o in others {
                    tx.ops.push(Op::delete(format!("disk/{o}")));
                    tx.p.disks.remove(&o);
                }
            }
            if known.is_some_and(|k| k != uuid) && tx.p.nodes.contains_key(&id) {
                // Checked above: an operator replaced the disk of a node
                // whose lease expired. It holds none of the data the routes
                // say it does: take it out of every partition first; the
                // registration below brings it back as a syncing member.
                tracing::warn!(
                    node = id,
                    old_disk = %disk_name(known.unwrap_or(0)),
                    new_disk = %disk_name(uuid),
                    "disk replaced by the operator: the node rejoins as an empty member"
                );
                let mut gone = info.clone();
                gone.up = false;
                tx.put_node(gone);
                // Its copies are gone: no place is kept for it, and it is
                // no member anywhere, not even of a partition whose
                // members are all down (which a rebalance leaves as it
                // was: it would come back in sync, empty; the simulator
                // found this, seed 6).
                tx.held.retain(|h| *h != id);
                tx.log(Change::NodeDown { id });
                if let Some(t) = tx.p.route.table.as_ref() {
                    let t = t.without_copies_of(id);
                    tx.set_table(
                        t,
                        &format!("node {id}'s disk was replaced: its copies are gone"),
                    );
                }
                tx.reroute(&self.cfg, &format!("node {id}'s disk was replaced"))?;
            }
        }
        let was_down = tx.p.nodes.get(&id).is_some_and(|n| !n.up);
        if tx.p.nodes.get(&id) != Some(&info) {
            tx.put_node(info.clone());
            tx.log(Change::NodeRegistered {
                node: record_of(&info),
            });
            if was_down {
                tx.log(Change::NodeUp { id });
            }
            tx.reroute(&self.cfg, &format!("node {id} registered"))?;
        }
        let pushed = self.commit(store, tx)?;
        self.down_since.remove(&id);
        self.live.insert(
            id,
            Liveness {
                last_heartbeat: Some(now),
                since: now,
                epoch_acked: 0,
                backfill: Backfill::default(),
                failure: None,
                warning: None,
            },
        );
        Ok((
            Registered {
                node_id: id,
                heartbeat_ms: self.cfg.heartbeat_ms,
                lease_ms: self.cfg.lease_ms,
                fences: self.fences(),
                layers: self.layers(),
            },
            pushed,
        ))
    }

    pub fn heartbeat(
        &mut self,
        store: &dyn MetaStore,
        id: NodeId,
        beat: &Heartbeat,
    ) -> Result<(HeartbeatReply, Pushed)> {
        let epoch = beat.epoch;
        let node = self.known_node(id)?;
        let mut pushed = None;
        if let Some(why) = &beat.failure {
            // A node that cannot serve is treated as a dead one: its lease
            // is not renewed, so it is marked down and its partitions move
            // (expire_leases); the reason shows in the node list.
            let l = self
                .live
                .entry(id)
                .or_insert_with(|| Liveness::fresh(self.clock.now()));
            if l.failure.as_deref() != Some(why.as_str()) {
                tracing::warn!(node = id, "node reports it cannot serve: {why}");
            }
            l.failure = Some(why.clone());
            l.epoch_acked = epoch;
            let current = self.epoch();
            let table = self.table().filter(|t| t.epoch > epoch).cloned();
            return Ok((
                HeartbeatReply {
                    epoch: current,
                    table,
                    deleted_volumes: self.p.deleted.iter().copied().collect(),
                    fences: self.fences(),
                    layers: self.layers(),
                },
                None,
            ));
        }
        if !node.up {
            let mut tx = self.begin(&format!("node {id}"));
            let mut up = node.clone();
            up.up = true;
            tx.put_node(up);
            tx.log(Change::NodeUp { id });
            tx.reroute(&self.cfg, &format!("node {id} up"))?;
            pushed = self.commit(store, tx)?;
            self.down_since.remove(&id);
        }
        if epoch > self.epoch() {
            // The nodes know a newer epoch than this control service (its
            // metadata was restored or rebuilt): continue above it, or the
            // nodes would ignore its tables as stale.
            self.epoch_floor = self.epoch_floor.max(epoch);
            if let Some(mut t) = self.table().cloned() {
                let mut tx = self.begin(&format!("node {id}"));
                t.epoch = epoch + 1;
                tx.set_table(
                    t,
                    &format!("epoch raised above {epoch}, reported by node {id}"),
                );
                pushed = self.commit(store, tx)?.or(pushed);
            }
        }
        if !beat.copy_whole.is_empty() {
            pushed = self.copy_whole(store, id, &beat.copy_whole)?.or(pushed);
        }
        let now = self.clock.now();
        let l = self.live.entry(id).or_insert_with(|| Liveness::fresh(now));
        l.last_heartbeat = Some(now);
        l.failure = None;
        if l.warning != beat.warning {
            if let Some(w) = &beat.warning {
                tracing::warn!(node = id, "node warns: {w}");
            }
            l.warning = beat.warning.clone();
        }
        l.epoch_acked = epoch;
        // Kept as reported (a node counting more done than total has a
        // bug worth seeing in the figures), with a line in the log.
        if beat.backfill_bytes_done > beat.backfill_bytes_total {
            tracing::warn!(
                node = id,
                done = beat.backfill_bytes_done,
                total = beat.backfill_bytes_total,
                "heartbeat reports more backfill bytes done than in total"
            );
        }
        l.backfill = Backfill {
            bytes_done: beat.backfill_bytes_done,
            bytes_total: beat.backfill_bytes_total,
            partitions_unlisted: beat.backfill_partitions_unlisted,
        };
        let current = self.epoch();
        let table = self.table().filter(|t| t.epoch > epoch).cloned();
        Ok((
            HeartbeatReply {
                epoch: current,
                table,
                deleted_volumes: self.p.deleted.iter().copied().collect(),
                fences: self.fences(),
                layers: self.layers(),
            },
            pushed,
        ))
    }

    /// Node `id` copies `partitions` whole instead of catching up (see
    /// `Heartbeat::copy_whole`): its members there lose `catch_up_since`,
    /// in a new epoch. Partitions where it is not a member catching up are
    /// skipped (the table moved on).
    fn copy_whole(
        &mut self,
        store: &dyn MetaStore,
        id: NodeId,
        partitions: &[u32],
    ) -> Result<Pushed> {
        let Some(mut t) = self.table().cloned() else {
            return Ok(None);
        };
        let mut changed = Vec::new();
        for &p in partitions {
            if t.copy_whole(p, id).unwrap_or(false) {
                changed.push(p);
            }
        }
        if changed.is_empty() {
            return Ok(None);
        }
        let mut tx = self.begin(&format!("node {id}"));
        t.epoch += 1;
        tx.set_table(
            t,
            &format!(
                "node {id} copies {} partition(s) whole instead of catching up: {changed:?}",
                changed.len()
            ),
        );
        Ok(self.commit(store, tx)?)
    }

    pub fn synced(
        &mut self,
        store: &dyn MetaStore,
        id: NodeId,
        epoch: u64,
        partitions: &[u32],
    ) -> Result<(SyncedReply, Pushed)> {
        self.known_node(id)?;
        let mut tx = self.begin(&format!("node {id}"));
        let Some(mut t) = tx.p.route.table.clone() else {
            return Err(StateError::Conflict(
                "there is no route table yet, so no partition to be in sync for".into(),
            ));
        };
        let old = t.clone();
        let mut marked = Vec::new();
        let mut backfill_again = Vec::new();
        for &p in partitions {
            let syncing = t
                .partition(p)
                .and_then(|r| r.member(id))
                .is_some_and(|m| !m.in_sync);
            let joined = tx.p.route.joined.get(&(p, id)).copied();
            match joined {
                Some(since) if syncing && epoch >= since && epoch <= t.epoch => {
                    // Checked above: p exists and `id` is a member.
                    if t.mark_in_sync(p, id).is_ok() {
                        marked.push(p);
                    }
                }
                Some(since) if syncing && epoch < since => {
                    // Without this answer a node that missed the tables
                    // where it left would report the old epoch forever.
                    tracing::info!(
                        node = id,
                        partition = p,
                        report_epoch = epoch,
                        joined_epoch = since,
                        "a synced report from before the node rejoined: it backfills again"
                    );
                    backfill_again.push(p);
                }
                _ => tracing::info!(
                    node = id,
                    partition = p,
                    report_epoch = epoch,
                    joined_epoch = ?joined,
                    "ignoring a synced report: the node is not a syncing member of this partition since that epoch"
                ),
            }
        }
        if marked.is_empty() {
            return Ok((
                SyncedReply {
                    epoch: t.epoch,
                    marked,
                    backfill_again,
                },
                None,
            ));
        }
        // Members the marks drop that clients may still read from stay
        // until they serve a table where they are no readers.
        t.keep_leavers(&old, |n| tx.served.get(&n).copied().unwrap_or(0));
        t.epoch += 1;
        tx.set_table(
            t,
            &format!("node {id} in sync for {} partition(s)", marked.len()),
        );
        // Finished moves free budget for deferred ones.
        tx.reroute(&self.cfg, "rebalance after sync")?;
        let pushed = self.commit(store, tx)?;
        Ok((
            SyncedReply {
                epoch: self.epoch(),
                marked,
                backfill_again,
            },
            pushed,
        ))
    }

    /// Marks down every up node whose lease expired (within the grace
    /// period its partitions keep it as a down member), and moves the
    /// partitions of nodes down for longer than the grace period.
    pub fn expire_leases(&mut self, store: &dyn MetaStore) -> Result<Pushed> {
        let now = self.clock.now();
        let lease = Duration::from_millis(self.cfg.lease_ms);
        let expired: Vec<NodeId> = self
            .p
            .nodes
            .values()
            .filter(|n| n.up)
            .filter(|n| self.live.get(&n.id).is_none_or(|l| l.expired(now, lease)))
            .map(|n| n.id)
            .collect();
        if expired.is_empty() {
            let pushed = self.end_grace(store, now)?;
            if pushed.is_some() {
                return Ok(pushed);
            }
            return self.resume_moves(store);
        }
        let mut tx = self.begin("meta");
        if self.cfg.down_grace_ms > 0 {
            // A node that said it cannot serve (a failed or full disk) is
            // not coming back as it was: its partitions move at once.
            tx.held.extend(
                expired
                    .iter()
                    .copied()
                    .filter(|id| self.live.get(id).is_none_or(|l| l.failure.is_none())),
            );
        }
        for id in &expired {
            if let Some(n) = tx.p.nodes.get(id) {
                let mut down = n.clone();
                down.up = false;
                tx.put_node(down);
                tx.log(Change::NodeDown { id: *id });
            }
        }
        let ids: Vec<String> = expired.iter().map(|i| i.to_string()).collect();
        let reason = if self.cfg.down_grace_ms > 0 {
            format!(
                "node {} down: its partitions keep it as a down member for {} s",
                ids.join(", "),
                self.cfg.down_grace_ms / 1000
            )
        } else {
            format!("node {} down", ids.join(", "))
        };
        tx.reroute(&self.cfg, &reason)?;
        let pushed = self.commit(store, tx)?;
        for id in expired {
            if self.live.get(&id).is_none_or(|l| l.failure.is_none()) {
                self.down_since.insert(id, now);
            }
        }
        Ok(pushed)
    }

    /// Reroutes if that changes anything: a rebalance moves at most
    /// `max_moves` partitions at a time, and one change can use up the
    /// budget and end another's moves (a disk replaced and its node back in
    /// one registration left partitions short of a copy, with no event to
    /// reroute again: the simulator found it). Checked with the leases, so
    /// no short partition waits for an unrelated event.
    fn resume_moves(&mut self, store: &dyn MetaStore) -> Result<Pushed> {
        if self.table().is_none() {
            return Ok(None);
        }
        // Computed against the live state first: this runs on every lease
        // check, and almost always finds nothing to move.
        let held = self.held(self.clock.now());
        let served = self.served();
        let Some(next) = next_table(&self.p, &self.cfg, &held, &served, self.epoch_floor)? else {
            return Ok(None);
        };
        let mut tx = self.begin("meta");
        tx.set_table(next, "rebalance: partitions short of their copies");
        Ok(self.commit(store, tx)?)
    }

    /// Nodes down past the grace period lose their places: a stand-in is
    /// chosen for each of their partitions.
    fn end_grace(&mut self, store: &dyn MetaStore, now: Instant) -> Result<Pushed> {
        let held = self.held(now);
        let out: Vec<NodeId> = self
            .holding()
            .into_iter()
            .filter(|id| !held.contains(id) && self.p.nodes.get(id).is_some_and(|n| !n.up))
            .collect();
        if out.is_empty() {
            return Ok(None);
        }
        let mut tx = self.begin("meta");
        let ids: Vec<String> = out.iter().map(|i| i.to_string()).collect();
        tx.reroute(
            &self.cfg,
            &format!(
                "node {} down for longer than the {} s grace period: its partitions move",
                ids.join(", "),
                self.cfg.down_grace_ms / 1000
            ),
        )?;
        Ok(self.commit(store, tx)?)
    }

    pub fn split(&mut self, store: &dyn MetaStore, who: &str) -> Result<(RouteTable, Pushed)> {
        let mut tx = self.begin(who);
        let Some(old) = tx.p.route.table.clone() else {
            return Err(StateError::Conflict(format!(
                "no route table yet: register at least {} nodes first",
                self.cfg.replicas
            )));
        };
        let t = old
            .split()
            .map_err(|e| StateError::BadRequest(format!("cannot split: {e}")))?;
        let bits = t.partition_bits;
        tx.log(Change::RouteSplit {
            partition_bits: bits,
        });
        tx.set_table(t, &format!("split to {} partitions", 1u64 << bits));
        tx.reroute(&self.cfg, "rebalance after split: move the new halves")?;
        let pushed = self.commit(store, tx)?;
        let table = self
            .table()
            .cloned()
            .ok_or_else(|| StateError::Conflict("route table vanished".into()))?;
        Ok((table, pushed))
    }

    pub fn create_volume(
        &mut self,
        store: &dyn MetaStore,
        who: &str,
        req: CreateVolume,
    ) -> Result<Volume> {
        validate_volume_name(&req.name).map_err(StateError::BadRequest)?;
        validate_volume_size(req.size_bytes).map_err(StateError::BadRequest)?;
        let sector_size_bytes = req
            .sector_size_bytes
            .unwrap_or(crate::api::SECTOR_SIZE_DEFAULT_BYTES);
        crate::api::validate_sector_size(sector_size_bytes).map_err(StateError::BadRequest)?;
        let replicas = req
            .replicas
            .unwrap_or(self.cfg.replicas.min(VOLUME_REPLICAS_MAX));
        if !(1..=VOLUME_REPLICAS_MAX).contains(&replicas) {
            return Err(StateError::BadRequest(format!(
                "replicas {replicas}: must be 1 to {VOLUME_REPLICAS_MAX}"
            )));
        }
        if self.p.volumes.contains_key(&req.name) {
            return Err(StateError::Conflict(format!(
                "volume {} already exists: pick another name or delete it first",
                req.name
            )));
        }
        let mut tx = self.begin(who);
        let id = tx.p.next_volume_id;
        tx.p.next_volume_id += 1;
        tx.put_counters();
        let v = Volume {
            id,
            name: req.name,
            size_bytes: req.size_bytes,
            replicas,
            created_at: self.clock.unix_ms(),
            fence: 0,
            sector_size_bytes,
            lineage: 0,
            head_era: 0,
            under: Vec::new(),
            snapshots: Vec::new(),
            parent: None,
            cutting: None,
            retired: Vec::new(),
        };
        tx.put_volume(v.clone());
        tx.log(Change::VolumeCreated { volume: v.clone() });
        self.commit(store, tx)?;
        Ok(v)
    }

    pub fn volumes(&self) -> Vec<Volume> {
        self.p.volumes.values().cloned().collect()
    }

    pub fn volume(&self, name: &str) -> Result<Volume> {
        self.p.volumes.get(name).cloned().ok_or_else(|| {
            StateError::NotFound(format!(
                "no volume named `{name}`: `celer volume list` shows the volumes"
            ))
        })
    }

    pub fn resize_volume(
        &mut self,
        store: &dyn MetaStore,
        who: &str,
        name: &str,
        size_bytes: u64,
    ) -> Result<Volume> {
        let old = self.volume(name)?;
        validate_volume_size(size_bytes).map_err(StateError::BadRequest)?;
        if size_bytes < old.size_bytes {
            return Err(StateError::BadRequest(format!(
                "volume {name} is {} bytes: it can only grow, not shrink to {size_bytes}",
                old.size_bytes
            )));
        }
        if size_bytes == old.size_bytes {
            return Ok(old);
        }
        let mut tx = self.begin(who);
        let mut v = old.clone();
        v.size_bytes = size_bytes;
        tx.put_volume(v.clone());
        tx.log(Change::VolumeResized {
            id: v.id,
            name: v.name.clone(),
            old_size_bytes: old.size_bytes,
            size_bytes,
        });
        self.commit(store, tx)?;
        Ok(v)
    }

    /// Records a new attachment of volume `name`: a fresh id, never used
    /// before (ids are never reused, so two attachments never share the
    /// writer bits of their versions until 2^16 attachments later; see
    /// celer-proto).
    ///
    /// Read-write attachments are exclusive or shared (see
    /// [`AttachMode`]); a conflicting one is refused with the holder named,
    /// or with `force` ended. An exclusive attach, and a shared one that is
    /// not joining other shared writers, raises the volume's fence
    /// generation: every capability minted before (also of attachments
    /// detached since, which stay valid until they expire) can no longer
    /// write once the nodes have the new generation. The caller pushes it
    /// to the nodes when `Attached::fenced` says so, before answering.
    pub fn attach(
        &mut self,
        store: &dyn MetaStore,
        who: &str,
        name: &str,
        req: &AttachVolume,
    ) -> Result<Attached> {
        let mut v = self.volume(name)?;
        if req.holder.len() > HOLDER_MAX_BYTES {
            return Err(StateError::BadRequest(format!(
                "holder is {} bytes, at most {HOLDER_MAX_BYTES}",
                req.holder.len()
            )));
        }
        let id = u32::try_from(self.p.next_attachment_id)
            .ok()
            .filter(|id| *id > 0)
            .ok_or_else(|| {
                StateError::Conflict("attachment ids are exhausted (2^32 handed out)".into())
            })?;
        let writers: Vec<&AttachmentRecord> = self
            .p
            .attachments
            .values()
            .filter(|a| a.volume_id == v.id && !a.read_only)
            .collect();
        let conflicting: Vec<&AttachmentRecord> = if req.read_only {
            Vec::new()
        } else {
            writers
                .iter()
                .copied()
                .filter(|a| req.mode == AttachMode::Exclusive || a.mode == AttachMode::Exclusive)
                .collect()
        };
        if !conflicting.is_empty() && !req.force {
            let held: Vec<String> = conflicting
                .iter()
                .map(|a| describe(a, self.clock.unix_ms()))
                .collect();
            return Err(StateError::Conflict(format!(
                "volume `{name}` is attached by {}: detach it (`celer volume detach {name}`), attach in shared mode if every writer is (a clustered file system), or take it over with --force (fences the holder)",
                held.join(", ")
            )));
        }
        let taken: Vec<u32> = conflicting.iter().map(|a| a.id).collect();
        // Joining shared writers keeps their generation; anything else
        // starts a new one.
        let raise = !req.read_only
            && (req.mode == AttachMode::Exclusive
                || !writers.iter().any(|a| a.mode == AttachMode::Shared));
        let mut tx = self.begin(who);
        for t in &taken {
            if let Some(a) = tx.p.attachments.remove(t) {
                tx.ops.push(Op::delete(format!("att/{t:010}")));
                tx.log(Change::VolumeDetached { attachment: a });
            }
        }
        if raise {
            v.fence = v.fence.checked_add(1).ok_or_else(|| {
                StateError::Conflict(format!(
                    "volume `{name}`: fence generations are exhausted (2^32 take-overs)"
                ))
            })?;
            tx.put_volume(v.clone());
            tx.log(Change::VolumeTakenOver {
                volume: v.name.clone(),
                fence: v.fence,
                from: taken.clone(),
            });
        }
        let a = AttachmentRecord {
            id,
            volume_id: v.id,
            volume: v.name.clone(),
            read_only: req.read_only,
            at: self.clock.unix_ms(),
            mode: req.mode,
            fence: v.fence,
            holder: req.holder.clone(),
        };
        tx.p.next_attachment_id += 1;
        tx.put_counters();
        tx.ops.push(Op::put(format!("att/{id:010}"), json(&a)));
        tx.p.attachments.insert(id, a.clone());
        tx.log(Change::VolumeAttached {
            attachment: a.clone(),
        });
        self.commit(store, tx)?;
        let fenced = raise.then(|| self.fence_targets());
        Ok(Attached {
            volume: v,
            attachment: a,
            taken_over: taken,
            fenced,
        })
    }

    /// Every volume's fence generation, where it was ever raised.
    pub fn fences(&self) -> Vec<VolumeFence> {
        self.p
            .volumes
            .values()
            .filter(|v| v.fence > 0)
            .map(|v| VolumeFence {
                volume: v.id,
                fence: v.fence,
            })
            .collect()
    }

    /// The nodes a new fence generation must reach: every registered node
    /// that is up (one that is down gets it when it registers or
    /// heartbeats again, before it serves), by id and admin address.
    pub fn fence_targets(&self) -> Vec<(NodeId, String)> {
        self.p
            .nodes
            .values()
            .filter(|n| n.up)
            .map(|n| (n.id, n.admin_addr.clone()))
            .collect()
    }

    /// Whether node `id` is still up (a fence push to it must succeed).
    pub fn node_up(&self, id: NodeId) -> bool {
        self.p.nodes.get(&id).is_some_and(|n| n.up)
    }

    /// Attachment `id` and its volume (for a renewal).
    pub fn attachment(&self, id: u32) -> Result<(Volume, AttachmentRecord)> {
        let a = self.p.attachments.get(&id).cloned().ok_or_else(|| {
            StateError::NotFound(format!(
                "no attachment {id}: it was detached, or never made (attach the volume again)"
            ))
        })?;
        let v = self
            .p
            .volumes
            .values()
            .find(|v| v.id == a.volume_id)
            .cloned()
            .ok_or_else(|| {
                StateError::NotFound(format!(
                    "attachment {id} is of volume {} (id {}), which no longer exists",
                    a.volume, a.volume_id
                ))
            })?;
        Ok((v, a))
    }

    /// Ends attachment `id`: no capability is renewed for it any more.
    pub fn detach(
        &mut self,
        store: &dyn MetaStore,
        who: &str,
        id: u32,
    ) -> Result<AttachmentRecord> {
        let a = self
            .p
            .attachments
            .get(&id)
            .cloned()
            .ok_or_else(|| StateError::NotFound(format!("no attachment {id}")))?;
        let mut tx = self.begin(who);
        tx.ops.push(Op::delete(format!("att/{id:010}")));
        tx.p.attachments.remove(&id);
        tx.log(Change::VolumeDetached {
            attachment: a.clone(),
        });
        self.commit(store, tx)?;
        Ok(a)
    }

    /// Attachments handed out and not detached.
    pub fn attachments(&self) -> Vec<AttachmentRecord> {
        self.p.attachments.values().cloned().collect()
    }

    /// Layers of every layered volume, as nodes hold them.
    pub fn layers(&self) -> Vec<VolumeLayers> {
        self.p
            .volumes
            .values()
            .filter(|v| v.layered())
            .map(|v| v.layers_at(self.clock.unix_ms()))
            .collect()
    }

    /// Takes snapshot `snap` of volume `name`: the head era is frozen as
    /// the snapshot and the volume goes on in a new era over it. No data
    /// moves. The caller pushes the volume's layers to the nodes (with
    /// `cutting`, then without) before answering.
    pub fn create_snapshot(
        &mut self,
        store: &dyn MetaStore,
        who: &str,
        name: &str,
        snap: &str,
    ) -> Result<(Volume, Snapshot)> {
        let mut v = self.volume(name)?;
        validate_volume_name(snap)
            .map_err(|e| StateError::BadRequest(e.replace("volume name", "snapshot name")))?;
        if v.snapshot(snap).is_some() {
            return Err(StateError::Conflict(format!(
                "volume {name} already has a snapshot named {snap}: pick another name or delete it first"
            )));
        }
        if v.under.len() + 1 >= celer_engine_layers_max() {
            return Err(StateError::Conflict(format!(
                "volume {name} has {} layers, the most a read goes through: delete snapshots first",
                v.under.len() + 1
            )));
        }
        let mut tx = self.begin(who);
        let era = tx.new_era()?;
        let s = Snapshot {
            name: snap.to_string(),
            era: v.head_era,
            under: v.under.clone(),
            created_at: self.clock.unix_ms(),
        };
        v.under.insert(0, v.head_era);
        v.head_era = era;
        v.snapshots.push(s.clone());
        v.cutting = Some(Cutting {
            era: s.era,
            until_unix_ms: self.clock.unix_ms() + SNAPSHOT_CUT_MS,
        });
        tx.put_volume(v.clone());
        tx.log(Change::VolumeLayersChanged {
            what: format!("snapshot {snap} taken"),
            volume: v.clone(),
        });
        self.commit(store, tx)?;
        Ok((v, s))
    }

    /// Rolls volume `name` back to snapshot `snap`: a new era over the
    /// snapshot's layers, so nothing written after the snapshot is read
    /// again (a node that was away comes back with those blocks in an era
    /// the volume no longer reads). Refused while the volume is attached.
    pub fn rollback(
        &mut self,
        store: &dyn MetaStore,
        who: &str,
        name: &str,
        snap: &str,
    ) -> Result<Volume> {
        let mut v = self.volume(name)?;
        let s = v.snapshot(snap).cloned().ok_or_else(|| {
            StateError::NotFound(format!(
                "volume {name} has no snapshot named {snap}: `celer snapshot list {name}` shows them"
            ))
        })?;
        if let Some(a) = self.p.attachments.values().find(|a| a.volume_id == v.id) {
            return Err(StateError::Conflict(format!(
                "volume {name} is attached ({}): detach it (stop the VM or front end) before a rollback",
                describe(a, self.clock.unix_ms())
            )));
        }
        let lineage = v.lineage();
        let before = lineage_eras(&self.p.volumes, lineage);
        let mut tx = self.begin(who);
        let era = tx.new_era()?;
        v.head_era = era;
        v.under = std::iter::once(s.era)
            .chain(s.under.iter().copied())
            .collect();
        v.cutting = None;
        tx.put_volume(v.clone());
        tx.bury_layers(lineage, &before);
        tx.log(Change::VolumeLayersChanged {
            what: format!("rolled back to snapshot {snap}"),
            volume: v.clone(),
        });
        self.commit(store, tx)?;
        Ok(v)
    }

    /// A new volume `req.name` over snapshot `req.snapshot` of volume
    /// `name`: a new era of the same lineage, so it shares the snapshot's
    /// blocks (on the same nodes) until it writes them. No data moves.
    pub fn clone_volume(
        &mut self,
        store: &dyn MetaStore,
        who: &str,
        name: &str,
        req: &CloneVolume,
    ) -> Result<Volume> {
        let src = self.volume(name)?;
        let s = src.snapshot(&req.snapshot).cloned().ok_or_else(|| {
            StateError::NotFound(format!(
                "volume {name} has no snapshot named {}: `celer snapshot list {name}` shows them",
                req.snapshot
            ))
        })?;
        validate_volume_name(&req.name).map_err(StateError::BadRequest)?;
        if self.p.volumes.contains_key(&req.name) {
            return Err(StateError::Conflict(format!(
                "volume {} already exists: pick another name or delete it first",
                req.name
            )));
        }
        let mut tx = self.begin(who);
        let id = tx.p.next_volume_id;
        tx.p.next_volume_id += 1;
        let era = tx.new_era()?;
        let v = Volume {
            id,
            name: req.name.clone(),
            size_bytes: src.size_bytes,
            replicas: src.replicas,
            created_at: self.clock.unix_ms(),
            sector_size_bytes: src.sector_size_bytes,
            fence: 0,
            lineage: src.lineage(),
            head_era: era,
            under: std::iter::once(s.era)
                .chain(s.under.iter().copied())
                .collect(),
            snapshots: Vec::new(),
            parent: Some(format!("{name}@{}", req.snapshot)),
            cutting: None,
            retired: Vec::new(),
        };
        tx.put_volume(v.clone());
        tx.log(Change::VolumeCreated { volume: v.clone() });
        self.commit(store, tx)?;
        Ok(v)
    }

    /// Records that volume `name` no longer reads the layers under its head:
    /// `celer volume flatten` copied every block it read from them into the
    /// head, on every member (celer-proto `Fill`). Its chain is cut (`under`
    /// emptied, the parent link dropped), so its parent's snapshot can be
    /// deleted; eras only it read are tombstoned. Refused unless `req`
    /// names the volume's current head and layers (a snapshot taken during
    /// the copy made the head another era), and for a volume that is not a
    /// clone (its layers are its own snapshots).
    pub fn flatten_volume(
        &mut self,
        store: &dyn MetaStore,
        who: &str,
        name: &str,
        req: &FlattenVolume,
    ) -> Result<Volume> {
        let mut v = self.volume(name)?;
        if v.under.is_empty() {
            return Err(StateError::Conflict(format!(
                "volume {name} reads no layer under its head (flattened already, or never cloned): nothing to flatten"
            )));
        }
        let Some(parent) = v.parent.clone() else {
            return Err(StateError::Conflict(format!(
                "volume {name} is not a clone: the layers under its head are its own snapshots (deleting them frees their space)"
            )));
        };
        if req.head_era != v.head_era || req.under != v.under {
            return Err(StateError::Conflict(format!(
                "the layers of volume {name} changed while it was being flattened (head era {} over {:?}, the copy was for era {} over {:?}: a snapshot of it was taken): run `celer volume flatten {name}` again",
                v.head_era, v.under, req.head_era, req.under
            )));
        }
        let lineage = v.lineage();
        let before = lineage_eras(&self.p.volumes, lineage);
        let eras = v.under.clone();
        let mut tx = self.begin(who);
        v.under.clear();
        v.parent = None;
        // Deleted snapshots' eras the volume no longer reads at all.
        let reads = v.eras();
        v.retired.retain(|[e, _]| reads.contains(e));
        tx.put_volume(v.clone());
        tx.bury_layers(lineage, &before);
        tx.log(Change::VolumeLayersChanged {
            what: format!("flattened: no longer reads {parent} (eras {eras:?} under its head)"),
            volume: v.clone(),
        });
        self.commit(store, tx)?;
        Ok(v)
    }

    /// Deletes snapshot `snap` of volume `name`. Its layer is freed when no
    /// volume or other snapshot reads it any more; otherwise (the volume
    /// or a later snapshot still reads the blocks it holds) the layer stays
    /// until they no longer need it. Refused while a clone reads it.
    pub fn delete_snapshot(
        &mut self,
        store: &dyn MetaStore,
        who: &str,
        name: &str,
        snap: &str,
    ) -> Result<Volume> {
        let mut v = self.volume(name)?;
        let Some(at) = v.snapshots.iter().position(|s| s.name == snap) else {
            return Err(StateError::NotFound(format!(
                "volume {name} has no snapshot named {snap}: `celer snapshot list {name}` shows them"
            )));
        };
        let parent = format!("{name}@{snap}");
        let era = v.snapshots[at].era;
        if let Some(c) = self
            .p
            .volumes
            .values()
            .find(|c| c.parent.as_deref() == Some(parent.as_str()))
        {
            return Err(StateError::Conflict(format!(
                "volume {} is a clone of {parent}: flatten or delete it first",
                c.name
            )));
        }
        // Another volume reading the snapshot's era: a clone of a clone of
        // it, or a snapshot a clone took before it was flattened.
        if let Some(c) = self
            .p
            .volumes
            .values()
            .find(|c| c.id != v.id && c.lineage() == v.lineage() && c.eras().contains(&era))
        {
            return Err(StateError::Conflict(format!(
                "volume {} reads snapshot {parent} (a clone of a clone of it, or one of its own snapshots taken before it was flattened): flatten it, delete those snapshots, or delete it first",
                c.name
            )));
        }
        let lineage = v.lineage();
        let before = lineage_eras(&self.p.volumes, lineage);
        let mut tx = self.begin(who);
        v.snapshots.remove(at);
        tx.p.volumes.insert(v.name.clone(), v.clone());
        // Still read through (the volume or a later snapshot goes on over
        // it)? With one era directly above it everywhere, the nodes free
        // each of its chunks that era covers whole.
        let above = eras_directly_above(&tx.p.volumes, lineage, era);
        if above.len() == 1 {
            let t = *above.iter().next().expect("one era");
            v.retired.push([era, t]);
        }
        tx.put_volume(v.clone());
        tx.bury_layers(lineage, &before);
        tx.log(Change::VolumeLayersChanged {
            what: format!("snapshot {snap} deleted"),
            volume: v.clone(),
        });
        self.commit(store, tx)?;
        Ok(v)
    }

    /// What deleting each snapshot of volume `name` would free, as layer
    /// usage queries for the nodes (`POST /v1/layers/usage`): per snapshot
    /// `[key, above]` with `above` the key of the one era directly above it
    /// in every chain that reads it (its chunks that era covers whole), 0
    /// when no chain reads it (all its chunks), or None when several eras
    /// do (a delete frees nothing then).
    pub fn snapshot_usage_queries(&self, name: &str) -> Result<Vec<(Snapshot, Option<[u64; 2]>)>> {
        let v = self.volume(name)?;
        let lineage = v.lineage();
        Ok(v.snapshots
            .iter()
            .map(|s| {
                let above = eras_directly_above(&self.p.volumes, lineage, s.era);
                let key = celer_device::layer_key(lineage, s.era);
                let q = match above.len() {
                    0 => Some([key, 0]),
                    1 => above
                        .iter()
                        .next()
                        .map(|&a| [key, celer_device::layer_key(lineage, a)]),
                    _ => None,
                };
                (s.clone(), q)
            })
            .collect())
    }

    pub fn delete_volume(
        &mut self,
        store: &dyn MetaStore,
        who: &str,
        name: &str,
    ) -> Result<Volume> {
        let v = self.volume(name)?;
        let own = v.own_eras();
        if let Some(c) = self.p.volumes.values().find(|c| {
            c.id != v.id && c.lineage() == v.lineage() && c.eras().iter().any(|e| own.contains(e))
        }) {
            return Err(StateError::Conflict(format!(
                "volume {} is a clone of a snapshot of {name}: flatten or delete it first",
                c.name
            )));
        }
        let lineage = v.lineage();
        let before = lineage_eras(&self.p.volumes, lineage);
        let mut tx = self.begin(who);
        tx.ops.push(Op::delete(volume_key(name)));
        tx.p.volumes.remove(name);
        tx.ops.push(Op::put(
            format!("deleted/{}", v.id),
            self.clock.unix_ms().to_string(),
        ));
        tx.p.deleted.insert(v.id);
        if v.layered() {
            tx.bury_layers(lineage, &before);
        }
        tx.log(Change::VolumeDeleted {
            id: v.id,
            name: v.name.clone(),
        });
        self.commit(store, tx)?;
        Ok(v)
    }

    pub fn nodes(&self) -> Vec<NodeStatus> {
        let now = self.clock.now();
        self.p
            .nodes
            .values()
            .map(|n| {
                let l = self.live.get(&n.id);
                NodeStatus {
                    id: n.id,
                    data_addr: n.data_addr.clone(),
                    admin_addr: n.admin_addr.clone(),
                    shards: n.shards,
                    domain: n.domain.clone(),
                    up: n.up,
                    last_heartbeat_ms_ago: l
                        .and_then(|l| l.last_heartbeat)
                        .map(|h| now.duration_since(h).as_millis() as u64),
                    epoch_acked: l.map_or(0, |l| l.epoch_acked),
                    backfill_bytes_done: l.map_or(0, |l| l.backfill.bytes_done),
                    backfill_bytes_total: l.map_or(0, |l| l.backfill.bytes_total),
                    backfill_partitions_unlisted: l.map_or(0, |l| l.backfill.partitions_unlisted),
                    failure: l.and_then(|l| l.failure.clone()),
                    warning: l.and_then(|l| l.warning.clone()),
                }
            })
            .collect()
    }

    pub fn status(&self) -> Status {
        let up = self.p.nodes.values().filter(|n| n.up).count();
        let (mut in_sync, mut degraded, mut partitions) = (0, 0, 0);
        let (mut partitions_down_member, mut partitions_write_blocked) = (0, 0);
        if let Some(t) = self.table() {
            partitions = t.partition_count();
            for p in &t.partitions {
                if p.members.iter().any(|m| m.down) {
                    partitions_down_member += 1;
                }
                if p.writers().count() < t.min_copies() {
                    partitions_write_blocked += 1;
                }
                if p.all_in_sync() && p.members.len() >= t.replicas as usize {
                    in_sync += 1;
                } else {
                    degraded += 1;
                }
            }
        }
        // Progress of the up nodes only: a down node's figures are stale.
        let mut moving = Backfill::default();
        for n in self.p.nodes.values().filter(|n| n.up) {
            if let Some(b) = self.live.get(&n.id).map(|l| l.backfill) {
                moving.bytes_done += b.bytes_done;
                moving.bytes_total += b.bytes_total;
                moving.partitions_unlisted += b.partitions_unlisted;
            }
        }
        Status {
            nodes_up: up,
            nodes_down: self.p.nodes.len() - up,
            epoch: self.epoch(),
            partitions,
            partitions_in_sync: in_sync,
            partitions_degraded: degraded,
            volumes: self.p.volumes.len(),
            log_seq: self.p.last_seq,
            leader: true,
            rebalance_bytes_done: moving.bytes_done,
            rebalance_bytes_total: moving.bytes_total,
            rebalance_partitions_unlisted: moving.partitions_unlisted,
            partitions_down_member,
            partitions_write_blocked,
            down_grace_left_s: self.grace_left(self.clock.now()),
        }
    }

    /// Seconds left of each down node's grace period (rounded up).
    fn grace_left(&self, now: Instant) -> Vec<(NodeId, u64)> {
        let grace = Duration::from_millis(self.cfg.down_grace_ms);
        let mut left: Vec<(NodeId, u64)> = self
            .held(now)
            .into_iter()
            .filter_map(|id| {
                let since = self.down_since.get(&id)?;
                let rest = grace.saturating_sub(now.duration_since(*since));
                Some((id, rest.as_millis().div_ceil(1000) as u64))
            })
            .collect();
        left.sort_unstable();
        left
    }

    pub fn log(&self, store: &dyn MetaStore, since: u64, limit: usize) -> Result<Vec<LogEntry>> {
        let limit = limit.clamp(1, LOG_PAGE_MAX);
        let mut out = Vec::new();
        for (seq, v) in store.log_after(since, limit)? {
            out.push(parse(format!("log/{seq}").as_bytes(), &v)?);
        }
        Ok(out)
    }

    /// Restores volumes and nodes to what they were right after entry `seq`
    /// by replaying the change log from the start (`Restored` entries carry
    /// their full state, so a replay never recurses). Ids are never reused
    /// (the counters stay), the route epoch only moves forward: the restored
    /// node list gets a new, rebalanced table.
    pub fn restore(
        &mut self,
        store: &dyn MetaStore,
        who: &str,
        seq: u64,
    ) -> Result<(Restored, Pushed)> {
        if seq > self.p.last_seq {
            return Err(StateError::BadRequest(format!(
                "entry {seq} does not exist: the change log ends at {} (see `celer meta log`)",
                self.p.last_seq
            )));
        }
        let mut volumes: BTreeMap<String, Volume> = BTreeMap::new();
        let mut nodes: BTreeMap<NodeId, NodeRecord> = BTreeMap::new();
        let mut after = 0;
        while after < seq {
            let page = store.log_after(after, REPLAY_PAGE)?;
            if page.is_empty() {
                break;
            }
            for (s, v) in page {
                if s > seq {
                    break;
                }
                after = s;
                let e: LogEntry = parse(format!("log/{s}").as_bytes(), &v)?;
                replay(&mut volumes, &mut nodes, e.what);
            }
        }
        let (volumes, not_restored, removed) = self.restorable(volumes);
        let mut tx = self.begin(who);
        let lineages: BTreeSet<u64> = self.p.volumes.values().map(|v| v.lineage()).collect();
        let before: BTreeMap<u64, BTreeSet<u32>> = lineages
            .iter()
            .map(|&l| (l, lineage_eras(&self.p.volumes, l)))
            .collect();
        for v in self.p.volumes.values() {
            if !volumes.values().any(|r| r.id == v.id) {
                // Created after `seq` (or brought back by an earlier
                // restore): deleted, its data freed like a deleted volume's.
                tx.ops.push(Op::delete(volume_key(&v.name)));
                tx.ops.push(Op::put(
                    format!("deleted/{}", v.id),
                    self.clock.unix_ms().to_string(),
                ));
                tx.p.deleted.insert(v.id);
            } else if !volumes.contains_key(&v.name) {
                tx.ops.push(Op::delete(volume_key(&v.name)));
            }
        }
        tx.p.volumes.clear();
        for v in volumes.values() {
            tx.put_volume(v.clone());
        }
        // Layers nothing reads any more (snapshots and clones made after
        // `seq`, the heads of removed volumes) are freed on the nodes.
        for (lineage, eras) in &before {
            tx.bury_layers(*lineage, eras);
        }
        for id in self.p.nodes.keys() {
            if !nodes.contains_key(id) {
                tx.ops.push(Op::delete(node_key(*id)));
            }
        }
        tx.p.nodes.clear();
        for r in nodes.values() {
            let up = self.p.nodes.get(&r.id).is_some_and(|n| n.up);
            tx.put_node(NodeInfo {
                id: r.id,
                data_addr: r.data_addr.clone(),
                admin_addr: r.admin_addr.clone(),
                shards: r.shards,
                domain: r.domain.clone(),
                up,
            });
        }
        tx.log(Change::Restored {
            seq,
            volumes: volumes.values().cloned().collect(),
            nodes: nodes.values().cloned().collect(),
        });
        tx.reroute(&self.cfg, &format!("restored to entry {seq}"))?;
        let pushed = self.commit(store, tx)?;
        let now = self.clock.now();
        self.live.retain(|id, _| nodes.contains_key(id));
        for id in nodes.keys() {
            self.live.entry(*id).or_insert_with(|| Liveness::fresh(now));
        }
        Ok((
            Restored {
                seq: self.p.last_seq,
                volumes: volumes.len(),
                nodes: nodes.len(),
                not_restored,
                removed,
            },
            pushed,
        ))
    }

    /// What a restore to the volume list `past` (replayed from the log)
    /// makes of the volumes now. Metadata goes back; data never does, and
    /// nothing whose data the nodes may have freed comes back:
    ///
    /// - a volume that exists now keeps its layers as they are now (head,
    ///   the eras under it, clone parent), so its data is what it is now;
    ///   its size and other settings are those of `past`. Of its snapshots,
    ///   those in both `past` and now stay; those taken after the restore
    ///   point are deleted (as `celer snapshot delete` would: a layer the
    ///   volume still reads through is retired, the rest is freed);
    /// - a volume or snapshot deleted after the restore point is not
    ///   brought back (its layers are tombstoned: the nodes free them);
    /// - a volume created after the restore point is deleted.
    ///
    /// Returns the volumes to install, what was not brought back, and what
    /// the restore deletes (volumes and snapshots, by name).
    fn restorable(
        &self,
        past: BTreeMap<String, Volume>,
    ) -> (BTreeMap<String, Volume>, Vec<String>, Vec<String>) {
        let mut out: BTreeMap<String, Volume> = BTreeMap::new();
        let mut not_restored = Vec::new();
        let mut removed = Vec::new();
        // Snapshots dropped from volumes that stay: (lineage, era).
        let mut dropped: Vec<(String, u32)> = Vec::new();
        for r in past.into_values() {
            let Some(now) = self.p.volumes.values().find(|c| c.id == r.id) else {
                let freed = r.eras().iter().any(|&e| {
                    self.p
                        .deleted
                        .contains(&celer_device::layer_key(r.lineage(), e))
                });
                if freed || self.p.deleted.contains(&r.id) {
                    not_restored.push(format!(
                        "volume {} (deleted after that point: its data is freed)",
                        r.name
                    ));
                } else {
                    out.insert(r.name.clone(), r);
                }
                continue;
            };
            let mut v = now.clone();
            v.name = r.name.clone();
            v.size_bytes = r.size_bytes;
            v.replicas = r.replicas;
            v.sector_size_bytes = r.sector_size_bytes;
            v.created_at = r.created_at;
            // Fence generations never go back: nodes keep the highest they
            // saw, so a lower one would fence every new attachment.
            v.fence = r.fence.max(now.fence);
            for s in &r.snapshots {
                if !now.snapshots.iter().any(|n| n.era == s.era) {
                    not_restored.push(format!(
                        "snapshot {}@{} (deleted after that point: its data is freed)",
                        r.name, s.name
                    ));
                }
            }
            v.snapshots.retain(|s| {
                let keep = r.snapshots.iter().any(|p| p.era == s.era);
                if !keep {
                    removed.push(format!("snapshot {}@{}", now.name, s.name));
                    dropped.push((v.name.clone(), s.era));
                }
                keep
            });
            out.insert(v.name.clone(), v);
        }
        for c in self.p.volumes.values() {
            if !out.values().any(|v| v.id == c.id) {
                removed.push(format!("volume {}", c.name));
            }
        }
        // A dropped snapshot's era that a chain still reads through, with
        // one era directly above it everywhere: the nodes free each of its
        // chunks that era covers whole (as `delete_snapshot`).
        for (name, era) in dropped {
            let Some(lineage) = out.get(&name).map(|v| v.lineage()) else {
                continue;
            };
            if !lineage_eras(&out, lineage).contains(&era) {
                continue; // nothing reads it: buried by the caller
            }
            let above = eras_directly_above(&out, lineage, era);
            if above.len() == 1 {
                let t = *above.iter().next().expect("one era");
                if let Some(v) = out.get_mut(&name) {
                    if !v.retired.contains(&[era, t]) {
                        v.retired.push([era, t]);
                    }
                }
            }
        }
        (out, not_restored, removed)
    }
}

/// The eras directly above `era` in every chain of lineage `lineage` that
/// reads it (each volume's head chain and each snapshot's), the snapshot's
/// own chain aside (it starts at `era`).
fn eras_directly_above(
    volumes: &BTreeMap<String, Volume>,
    lineage: u64,
    era: u32,
) -> BTreeSet<u32> {
    let mut above = BTreeSet::new();
    for w in volumes.values().filter(|w| w.lineage() == lineage) {
        let chains = std::iter::once(
            std::iter::once(w.head_era)
                .chain(w.under.iter().copied())
                .collect::<Vec<_>>(),
        )
        .chain(w.snapshots.iter().map(|s| {
            std::iter::once(s.era)
                .chain(s.under.iter().copied())
                .collect::<Vec<_>>()
        }));
        for chain in chains {
            if let Some(i) = chain.iter().position(|&e| e == era) {
                if i > 0 {
                    above.insert(chain[i - 1]);
                }
            }
        }
    }
    above
}

/// Every era of `lineage` a volume or a snapshot reads.
fn lineage_eras(volumes: &BTreeMap<String, Volume>, lineage: u64) -> BTreeSet<u32> {
    volumes
        .values()
        .filter(|v| v.lineage() == lineage)
        .flat_map(|v| v.eras())
        .collect()
}

/// The most layers a read goes through (`celer_engine::LAYERS_MAX`).
fn celer_engine_layers_max() -> usize {
    255
}

/// Applies one change-log entry to the restorable metadata.
fn replay(
    volumes: &mut BTreeMap<String, Volume>,
    nodes: &mut BTreeMap<NodeId, NodeRecord>,
    what: Change,
) {
    match what {
        Change::VolumeCreated { volume } => {
            volumes.insert(volume.name.clone(), volume);
        }
        Change::VolumeResized {
            name, size_bytes, ..
        } => {
            if let Some(v) = volumes.get_mut(&name) {
                v.size_bytes = size_bytes;
            }
        }
        Change::VolumeDeleted { name, .. } => {
            volumes.remove(&name);
        }
        Change::VolumeLayersChanged { volume, .. } => {
            volumes.insert(volume.name.clone(), volume);
        }
        Change::VolumeTakenOver { volume, fence, .. } => {
            if let Some(v) = volumes.get_mut(&volume) {
                v.fence = v.fence.max(fence);
            }
        }
        Change::NodeRegistered { node } => {
            nodes.insert(node.id, node);
        }
        Change::Restored {
            volumes: v,
            nodes: n,
            ..
        } => {
            *volumes = v.into_iter().map(|v| (v.name.clone(), v)).collect();
            *nodes = n.into_iter().map(|n| (n.id, n)).collect();
        }
        Change::NodeDown { .. }
        | Change::NodeUp { .. }
        | Change::VolumeAttached { .. }
        | Change::VolumeDetached { .. }
        | Change::RouteEpoch { .. }
        | Change::RouteSplit { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    //! Leases, grace periods and identity claims driven by a [`ManualClock`]:
    //! no sleeping, the same result on any machine load.
    use super::*;
    use crate::store::RedbStore;

    const LEASE_MS: u64 = 3_000;
    const GRACE_MS: u64 = 10_000;

    fn cluster(dir: &std::path::Path, clock: Arc<ManualClock>) -> (Cluster, RedbStore) {
        let store = RedbStore::open_dir(dir).expect("store");
        let cfg = ClusterConfig {
            heartbeat_ms: 1_000,
            lease_ms: LEASE_MS,
            partition_bits: 4,
            replicas: 3,
            max_moves: 64,
            chunk_bytes: 1 << 20,
            down_grace_ms: GRACE_MS,
            capability_ttl_ms: 60_000,
        };
        let c = Cluster::load(cfg, &store, clock).expect("load");
        (c, store)
    }

    fn register(
        c: &mut Cluster,
        store: &RedbStore,
        i: u64,
        node_id: Option<NodeId>,
    ) -> Result<NodeId> {
        let req = RegisterNode {
            node_id,
            data_addr: format!("127.0.0.1:{}", 7000 + i),
            admin_addr: format!("127.0.0.1:{}", 8000 + i),
            shards: 1,
            domain: format!("host{i}"),
            disk_uuid: Some(0xd15c_0000 + i),
            replace_disk: false,
        };
        c.register(store, req).map(|(r, _)| r.node_id)
    }

    fn beat(c: &mut Cluster, store: &RedbStore, id: NodeId) {
        let epoch = c.epoch();
        let hb = Heartbeat {
            epoch,
            ..Heartbeat::default()
        };
        c.heartbeat(store, id, &hb).expect("heartbeat");
    }

    /// A cluster of four registered nodes that each beat once.
    fn four_nodes(
        dir: &std::path::Path,
        clock: &Arc<ManualClock>,
    ) -> (Cluster, RedbStore, Vec<NodeId>) {
        let (mut c, store) = cluster(dir, clock.clone());
        let ids: Vec<NodeId> = (0..4)
            .map(|i| register(&mut c, &store, i, None).expect("register"))
            .collect();
        for &id in &ids {
            beat(&mut c, &store, id);
        }
        (c, store, ids)
    }

    fn up(c: &Cluster, id: NodeId) -> bool {
        c.nodes().iter().any(|n| n.id == id && n.up)
    }

    /// Partitions listing `id` as a member, and how many of those mark it down.
    fn places(c: &Cluster, id: NodeId) -> (usize, usize) {
        let t = c.table().expect("table");
        let members: Vec<&celer_route::Member> = (0..t.partition_count())
            .filter_map(|p| t.partition(p)?.member(id))
            .collect();
        (members.len(), members.iter().filter(|m| m.down).count())
    }

    #[test]
    fn a_silent_node_is_marked_down_after_its_lease_and_replaced_after_its_grace() {
        let dir = tempfile::tempdir().expect("dir");
        let clock = Arc::new(ManualClock::new());
        let (mut c, store, ids) = four_nodes(dir.path(), &clock);
        let silent = ids[3];
        let (held, _) = places(&c, silent);
        assert!(held > 0, "the fourth node holds no partition");

        // Just inside the lease: still up.
        clock.advance(Duration::from_millis(LEASE_MS));
        for &id in &ids[..3] {
            beat(&mut c, &store, id);
        }
        c.expire_leases(&store).expect("expire");
        assert!(up(&c, silent), "marked down before its lease ran out");

        // Past the lease: down, but it keeps its places during the grace.
        clock.advance(Duration::from_millis(1));
        c.expire_leases(&store).expect("expire");
        assert!(
            !up(&c, silent),
            "still up {} ms after its last heartbeat",
            LEASE_MS + 1
        );
        assert_eq!(
            places(&c, silent),
            (held, held),
            "a down node lost places within its grace"
        );
        assert_eq!(c.status().nodes_down, 1);

        // Through the grace, the others beating every second.
        for _ in 0..(GRACE_MS / 1_000 - 1) {
            clock.advance(Duration::from_millis(1_000));
            for &id in &ids[..3] {
                beat(&mut c, &store, id);
            }
            c.expire_leases(&store).expect("expire");
            assert_eq!(
                places(&c, silent).0,
                held,
                "replaced before its grace ran out"
            );
        }
        // Past the grace: its partitions move to the others.
        clock.advance(Duration::from_millis(1_001));
        for &id in &ids[..3] {
            beat(&mut c, &store, id);
        }
        c.expire_leases(&store).expect("expire");
        assert_eq!(places(&c, silent).0, 0, "still a member after its grace");
        for &id in &ids[..3] {
            assert!(
                up(&c, id),
                "node {id} lost its lease while beating every second"
            );
        }
    }

    /// A syncing member that was down in between: its synced report from
    /// the epoch it copied under before it went down covers none of the
    /// writes of the tables it was down in, so it is not marked in sync and
    /// backfills again (found by the data-path simulation with the
    /// control service cut off from a node: seed 20, a block read back as
    /// an older write).
    #[test]
    fn a_synced_report_from_before_a_syncing_member_went_down_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let clock = Arc::new(ManualClock::new());
        let (mut c, store, ids) = four_nodes(dir.path(), &clock);
        let new = register(&mut c, &store, 4, None).expect("register");
        let joined_at = c.epoch();
        let syncing: Vec<u32> = c.table().expect("table").syncing_on(new).collect();
        assert!(!syncing.is_empty(), "the fifth node syncs nothing");

        // Silent past its lease: a down member of those partitions.
        clock.advance(Duration::from_millis(LEASE_MS + 1));
        for &id in &ids {
            beat(&mut c, &store, id);
        }
        c.expire_leases(&store).expect("expire");
        assert!(!up(&c, new));
        assert!(c.epoch() > joined_at);
        // Back: it beats again, a syncing member that is up.
        beat(&mut c, &store, new);
        assert!(up(&c, new));
        let back_at = c.epoch();

        let (r, _) = c.synced(&store, new, joined_at, &syncing).expect("synced");
        assert!(
            r.marked.is_empty(),
            "marked in sync from before it went down: {:?}",
            r.marked
        );
        assert_eq!(r.backfill_again, syncing);
        // A report from after it came back counts.
        let (r, _) = c.synced(&store, new, back_at, &syncing).expect("synced");
        assert_eq!(r.marked, syncing);
    }

    /// A node back from down catches up; asked in a heartbeat, the control
    /// service records that it copies some partition whole instead (its
    /// `catch_up_since` cleared, in a new epoch that the reply carries and
    /// a reload keeps), and ignores the ask for a partition where the node
    /// does not catch up.
    #[test]
    fn a_catching_up_member_that_copies_whole_loses_its_catch_up_epoch() {
        let dir = tempfile::tempdir().expect("dir");
        let clock = Arc::new(ManualClock::new());
        let (mut c, store, ids) = four_nodes(dir.path(), &clock);
        let back = ids[3];
        let t = c.table().expect("table").clone();
        for p in t.syncing_on(back).collect::<Vec<_>>() {
            c.synced(&store, back, t.epoch, &[p]).expect("synced");
        }
        clock.advance(Duration::from_millis(LEASE_MS + 1));
        for &id in &ids[..3] {
            beat(&mut c, &store, id);
        }
        c.expire_leases(&store).expect("expire");
        assert!(!up(&c, back));
        beat(&mut c, &store, back); // up again: catching up
        let t = c.table().expect("table").clone();
        let catching: Vec<u32> = t.syncing_on(back).collect();
        assert!(!catching.is_empty(), "no partition to catch up");
        let since = |c: &Cluster, p: u32| {
            c.table()
                .and_then(|t| t.partition(p))
                .and_then(|r| r.member(back))
                .map(|m| m.catch_up_since)
        };
        assert!(catching.iter().all(|&p| since(&c, p) > Some(0)));
        let (whole, other) = (catching[0], catching.get(1).copied());
        let not_member = (0..t.partition_count())
            .find(|&p| t.partition(p).and_then(|r| r.member(back)).is_none());
        let hb = Heartbeat {
            epoch: t.epoch,
            copy_whole: std::iter::once(whole).chain(not_member).collect(),
            ..Heartbeat::default()
        };
        let (reply, _) = c.heartbeat(&store, back, &hb).expect("heartbeat");
        assert_eq!(reply.epoch, t.epoch + 1);
        assert_eq!(reply.table.map(|t| t.epoch), Some(t.epoch + 1));
        assert_eq!(since(&c, whole), Some(0));
        if let Some(p) = other {
            assert!(since(&c, p) > Some(0), "partition {p} copies whole too");
        }
        // Asked again: nothing changes.
        let hb = Heartbeat {
            epoch: t.epoch + 1,
            copy_whole: vec![whole],
            ..Heartbeat::default()
        };
        let (reply, _) = c.heartbeat(&store, back, &hb).expect("heartbeat");
        assert_eq!(reply.epoch, t.epoch + 1);
        drop((c, store));
        let (c, _store) = cluster(dir.path(), clock);
        assert_eq!(since(&c, whole), Some(0), "lost by a reload");
    }

    #[test]
    fn a_running_nodes_id_is_refused_to_another_disk_until_its_lease_expires() {
        let dir = tempfile::tempdir().expect("dir");
        let clock = Arc::new(ManualClock::new());
        let (mut c, store) = cluster(dir.path(), clock.clone());
        let a = register(&mut c, &store, 0, None).expect("register");
        beat(&mut c, &store, a);
        // Disk 9 claims node a's id: refused while a's lease holds.
        let claim = |c: &mut Cluster| {
            let req = RegisterNode {
                node_id: Some(a),
                data_addr: "127.0.0.1:7009".into(),
                admin_addr: "127.0.0.1:8009".into(),
                shards: 1,
                domain: "host9".into(),
                disk_uuid: Some(0xd15c_0009),
                replace_disk: true,
            };
            c.register(&store, req)
        };
        clock.advance(Duration::from_millis(LEASE_MS));
        match claim(&mut c) {
            Err(StateError::Conflict(why)) => assert!(why.contains("running"), "{why}"),
            other => panic!("a claim on a running node's id was not refused: {other:?}"),
        }
        // Its lease over (no heartbeat since), the replacement is accepted.
        clock.advance(Duration::from_millis(1));
        let (r, _) = claim(&mut c).expect("replacement after the lease");
        assert_eq!(r.node_id, a);
    }

    #[test]
    fn a_snapshot_is_cut_for_its_window_and_sealed_after_it_on_the_clock_of_the_state() {
        let dir = tempfile::tempdir().expect("dir");
        let clock = Arc::new(ManualClock::new());
        let (mut c, store) = cluster(dir.path(), clock.clone());
        for i in 0..3 {
            register(&mut c, &store, i, None).expect("register");
        }
        let req = CreateVolume {
            name: "vm1".into(),
            size_bytes: 64 << 20,
            replicas: None,
            sector_size_bytes: None,
        };
        c.create_volume(&store, "test", req).expect("create");
        let (v, s) = c
            .create_snapshot(&store, "test", "vm1", "s1")
            .expect("snapshot");
        let cutting = |c: &Cluster| {
            c.layers()
                .into_iter()
                .find(|l| l.volume == v.id)
                .expect("layers of vm1")
                .cutting
        };
        assert_eq!(
            cutting(&c),
            Some(s.era),
            "a fresh snapshot is not being cut"
        );
        clock.advance(Duration::from_millis(SNAPSHOT_CUT_MS - 1));
        assert_eq!(cutting(&c), Some(s.era), "sealed before its window ran out");
        clock.advance(Duration::from_millis(1));
        assert_eq!(cutting(&c), None, "still cut after its window");
        // The log entry carries the clock's time, not the machine's.
        let logged = c.log(&store, 0, 100).expect("log");
        let last = logged.last().expect("entries");
        assert_eq!(last.at + SNAPSHOT_CUT_MS, clock.unix_ms());
    }
}
