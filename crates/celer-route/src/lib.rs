//! celer-route: where every chunk of every volume lives.
//!
//! A volume is cut into chunks of `chunk_bytes`; a chunk belongs to partition
//! `chunk_hash(volume, chunk) & (partitions - 1)` (the hash every layer shares,
//! `celer_device::chunk_hash`); a partition is held by `replicas` distinct
//! nodes chosen by rendezvous hashing over the live nodes, one per failure
//! domain where there are enough domains.
//!
//! A [`RouteTable`] is a numbered (epoch) snapshot of that mapping. The
//! control service computes tables and pushes them to the storage nodes; a
//! client learns a newer table only when a node rejects its request with
//! `StaleEpoch` and hands it over (lazy route sync).
//!
//! Each partition lists its *members*: every node that must receive writes.
//! A member is either in sync (holds every acknowledged write, may serve
//! reads) or syncing (new to the partition, backfilling from an in-sync
//! member). A node that is leaving (still in sync, no longer a target) stays
//! a member until every target member is in sync, so a partition never has
//! fewer in-sync copies during a move than before it.
//!
//! Partition count is a power of two. [`RouteTable::split`] doubles it:
//! partition `p` becomes `p` and `p + P`, and `p + P` starts on `p`'s members,
//! so nothing moves at split time; the next [`RouteTable::rebalance`] moves
//! the new halves only (the old halves keep their rendezvous placement).

mod codec;
mod place;

pub use codec::RouteDecodeError;
pub use place::{rendezvous_score, target_members};

use serde::{Deserialize, Serialize};

/// A storage node's identity in the cluster (assigned by the control service).
pub type NodeId = u32;

/// The default chunk: 1 MiB, the engine's default chunk too.
pub const CHUNK_BYTES_DEFAULT: u64 = 1 << 20;
/// Replicas per partition.
pub const REPLICAS_DEFAULT: u8 = 3;
/// Most partitions a table may have (2^16).
pub const PARTITION_BITS_MAX: u8 = 16;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: NodeId,
    /// `host:port` of the data (celer-proto) listener.
    pub data_addr: String,
    /// `host:port` of the admin HTTP listener (routes pushed here, /metrics).
    pub admin_addr: String,
    /// Engine shards: partition `p` lives in shard `p % shards` (a power of two).
    pub shards: u16,
    /// Failure domain (host, rack...): replicas go to distinct domains.
    pub domain: String,
    /// Holds a live lease.
    pub up: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub node: NodeId,
    pub in_sync: bool,
    /// Down, within the control service's grace period: keeps its place
    /// (no stand-in is chosen) but receives no writes and serves nothing;
    /// never in sync. The other members record what it misses.
    #[serde(default, skip_serializing_if = "is_false")]
    pub down: bool,
    /// The epoch this member went down in while in sync (0: never, or it
    /// has been in sync since). Kept while it is down and while it catches
    /// up after coming back, so a source can tell whether the writes it
    /// recorded since then are all the member lacks (see `celer-node`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub catch_up_since: u64,
    /// A down member whose place a stand-in took before the end of its
    /// grace period (the partition had fewer members up than
    /// `RouteTable::min_copies`): not placed any more, it stays as a copy
    /// complete up to when it went down until the stand-ins are in sync.
    #[serde(default, skip_serializing_if = "is_false")]
    pub displaced: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Member {
    /// A member holding every acknowledged write.
    pub fn in_sync(node: NodeId) -> Member {
        Member {
            node,
            in_sync: true,
            down: false,
            catch_up_since: 0,
            displaced: false,
        }
    }
    /// A new member that copies the partition whole.
    pub fn syncing(node: NodeId) -> Member {
        Member {
            in_sync: false,
            ..Member::in_sync(node)
        }
    }
    /// Receives writes: every member but a down one.
    pub fn takes_writes(&self) -> bool {
        !self.down
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PartitionRoute {
    /// Write set, in preference order: the primary is the first in-sync one.
    pub members: Vec<Member>,
}

impl PartitionRoute {
    /// The node that serves reads and forwards large writes.
    pub fn primary(&self) -> Option<NodeId> {
        self.members.iter().find(|m| m.in_sync).map(|m| m.node)
    }
    pub fn member(&self, node: NodeId) -> Option<&Member> {
        self.members.iter().find(|m| m.node == node)
    }
    pub fn all_in_sync(&self) -> bool {
        self.members.iter().all(|m| m.in_sync)
    }
    /// The members that receive writes (every one but those down).
    pub fn writers(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| m.takes_writes())
    }
    /// The members clients read from: the first `replicas` in-sync ones
    /// (the primary first). A member kept after its partition moved away
    /// ([`RouteTable::keep_leavers`]) comes after them, so no client of
    /// this table reads from it.
    pub fn readers(&self, replicas: u8) -> impl Iterator<Item = &Member> {
        self.members
            .iter()
            .filter(|m| m.in_sync)
            .take(replicas.max(1) as usize)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteTable {
    pub epoch: u64,
    pub chunk_bytes: u64,
    /// log2 of the partition count.
    pub partition_bits: u8,
    /// Target copies per partition.
    pub replicas: u8,
    /// Every known node, up or down, sorted by id.
    pub nodes: Vec<NodeInfo>,
    pub partitions: Vec<PartitionRoute>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("partition bits {0} out of range (0..={PARTITION_BITS_MAX})")]
    PartitionBits(u8),
    #[error("replicas must be 1..=8, got {0}")]
    Replicas(u8),
    #[error("node {id} has {shards} shards: must be a power of two and at most the partition count {partitions}")]
    Shards {
        id: NodeId,
        shards: u16,
        partitions: u32,
    },
    #[error("chunk size {0} must be a power of two between 64 KiB and 64 MiB")]
    ChunkBytes(u64),
    #[error("node id {0} appears twice")]
    DuplicateNode(NodeId),
    #[error("partition {partition} has no member {node}")]
    NotMember { partition: u32, node: NodeId },
    #[error("partition {0} out of range")]
    Partition(u32),
}

impl RouteTable {
    /// The first table of a cluster: every partition on its target nodes,
    /// all in sync (there is no data yet).
    pub fn initial(
        nodes: Vec<NodeInfo>,
        partition_bits: u8,
        replicas: u8,
        chunk_bytes: u64,
    ) -> Result<RouteTable, RouteError> {
        let mut t = RouteTable {
            epoch: 1,
            chunk_bytes,
            partition_bits,
            replicas,
            nodes,
            partitions: Vec::new(),
        };
        t.nodes.sort_by_key(|n| n.id);
        t.validate()?;
        let up: Vec<&NodeInfo> = t.nodes.iter().filter(|n| n.up).collect();
        t.partitions = (0..t.partition_count())
            .map(|p| PartitionRoute {
                members: target_members(p, &up, replicas)
                    .into_iter()
                    .map(Member::in_sync)
                    .collect(),
            })
            .collect();
        Ok(t)
    }

    pub fn validate(&self) -> Result<(), RouteError> {
        if self.partition_bits > PARTITION_BITS_MAX {
            return Err(RouteError::PartitionBits(self.partition_bits));
        }
        if self.replicas == 0 || self.replicas > 8 {
            return Err(RouteError::Replicas(self.replicas));
        }
        if !self.chunk_bytes.is_power_of_two() || !(64 << 10..=64 << 20).contains(&self.chunk_bytes)
        {
            return Err(RouteError::ChunkBytes(self.chunk_bytes));
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if i > 0 && self.nodes[i - 1].id == n.id {
                return Err(RouteError::DuplicateNode(n.id));
            }
            if !n.shards.is_power_of_two() || n.shards as u32 > self.partition_count() {
                return Err(RouteError::Shards {
                    id: n.id,
                    shards: n.shards,
                    partitions: self.partition_count(),
                });
            }
        }
        Ok(())
    }

    /// The fewest members that must take a write for it to be
    /// acknowledged: a majority of `replicas` (2 of 3, 1 of 2 or 1; Ceph's
    /// default `min_size`). A partition with fewer writers (the others
    /// down) takes no writes until a member is back or a stand-in joins
    /// (`rebalance_holding` brings one in at once): a write acknowledged by
    /// one copy would be lost with that one disk.
    pub fn min_copies(&self) -> usize {
        let r = self.replicas.max(1) as usize;
        r - r / 2
    }

    pub fn partition_count(&self) -> u32 {
        1 << self.partition_bits
    }

    /// The partition of chunk `chunk` (index, not byte offset) of `volume`.
    pub fn partition_of(&self, volume: u64, chunk: u64) -> u32 {
        (celer_device::chunk_hash(volume, chunk) & (self.partition_count() as u64 - 1)) as u32
    }

    /// The partition holding byte `offset` of `volume`.
    pub fn partition_at(&self, volume: u64, offset: u64) -> u32 {
        self.partition_of(volume, offset / self.chunk_bytes)
    }

    pub fn partition(&self, p: u32) -> Option<&PartitionRoute> {
        self.partitions.get(p as usize)
    }

    pub fn node(&self, id: NodeId) -> Option<&NodeInfo> {
        self.nodes
            .binary_search_by_key(&id, |n| n.id)
            .ok()
            .map(|i| &self.nodes[i])
    }

    /// The shard of `node` that owns partition `p`.
    pub fn shard_of(&self, node: &NodeInfo, p: u32) -> u16 {
        (p % node.shards as u32) as u16
    }

    /// The next table for a changed node list (a node joined, left, went
    /// down or came back): down nodes leave every partition at once; target
    /// nodes that are not members join as syncing; in-sync members that are
    /// no longer targets stay until the targets are all in sync, syncing
    /// ones leave at once (they hold no complete copy). At most
    /// `max_moves` partitions start a move in this epoch (bounded movement);
    /// removing down nodes is never deferred.
    pub fn rebalance(&self, nodes: Vec<NodeInfo>, max_moves: usize) -> RouteTable {
        self.rebalance_holding(nodes, max_moves, &[])
    }

    /// [`RouteTable::rebalance`], except that the down nodes in `held`
    /// (down for less than the grace period) keep their places as down
    /// members: no stand-in joins for them, and when they are up again they
    /// catch up as syncing members. A member that goes down while in sync
    /// records the epoch (`catch_up_since`).
    pub fn rebalance_holding(
        &self,
        nodes: Vec<NodeInfo>,
        max_moves: usize,
        held: &[NodeId],
    ) -> RouteTable {
        let mut t = RouteTable {
            epoch: self.epoch + 1,
            nodes,
            partitions: Vec::with_capacity(self.partitions.len()),
            ..*self
        };
        t.nodes.sort_by_key(|n| n.id);
        let up: Vec<&NodeInfo> = t.nodes.iter().filter(|n| n.up).collect();
        let is_up = |id: NodeId| up.iter().any(|n| n.id == id);
        let is_held = |id: NodeId| !is_up(id) && held.contains(&id);
        let min_copies = t.min_copies();
        let mut moves = 0;
        for (p, old) in self.partitions.iter().enumerate() {
            let mut members: Vec<Member> = Vec::with_capacity(old.members.len());
            for m in &old.members {
                if is_up(m.node) {
                    // Back from down: it catches up as a syncing member.
                    members.push(Member {
                        down: false,
                        displaced: false,
                        ..*m
                    });
                } else if is_held(m.node) {
                    let catch_up_since = match (m.down, m.in_sync) {
                        (false, true) => t.epoch,
                        _ => m.catch_up_since,
                    };
                    members.push(Member {
                        node: m.node,
                        in_sync: false,
                        down: true,
                        catch_up_since,
                        displaced: m.displaced,
                    });
                }
            }
            // A partition whose in-sync copies are all down keeps its members
            // as they were: nobody may be promoted to in sync without a source.
            if members.iter().all(|m| !m.in_sync) && old.members.iter().any(|m| m.in_sync) {
                t.partitions.push(old.clone());
                continue;
            }
            // Fewer members take writes than a write must reach
            // (`min_copies`): stand-ins take the down members' places now,
            // not at the end of their grace period, if that brings it to
            // `min_copies` (nodes to place them on, move budget left). The
            // down members stay, displaced, as copies complete up to when
            // they went down, until the stand-ins are in sync: the one
            // member left may lose its disk too (the control-plane
            // simulation lost the data when they were dropped at once).
            // Otherwise the down members keep (or get back) their places,
            // and the partition's writes wait.
            if members.iter().filter(|m| !m.down).count() < min_copies {
                let mut trial = members.clone();
                for m in trial.iter_mut().filter(|m| m.down) {
                    m.displaced = true;
                }
                let target = target_members(p as u32, &placed(&t.nodes, &trial), t.replicas);
                let staying = trial
                    .iter()
                    .filter(|m| !m.down)
                    .filter(|m| m.in_sync || m.catch_up_since > 0 || target.contains(&m.node))
                    .count();
                let joining = target
                    .iter()
                    .filter(|n| trial.iter().all(|m| m.node != **n))
                    .count();
                if moves < max_moves && staying + joining >= min_copies {
                    members = trial;
                } else {
                    for m in members.iter_mut() {
                        m.displaced = false;
                    }
                }
            }
            let target = target_members(p as u32, &placed(&t.nodes, &members), t.replicas);
            let joining: Vec<NodeId> = target
                .iter()
                .copied()
                .filter(|n| members.iter().all(|m| m.node != *n))
                .collect();
            if !joining.is_empty() {
                if moves >= max_moves {
                    t.partitions.push(PartitionRoute { members });
                    continue;
                }
                moves += 1;
            }
            for node in joining {
                members.push(Member::syncing(node));
            }
            t.partitions.push(PartitionRoute {
                members: order_members(members, &target),
            });
        }
        for p in 0..t.partition_count() {
            t.drop_leavers(p);
        }
        t
    }

    /// Marks `node` in sync for partition `p`, in place (the caller bumps the
    /// epoch); drops leaving members once every target member is in sync.
    pub fn mark_in_sync(&mut self, p: u32, node: NodeId) -> Result<(), RouteError> {
        let m = self.member_mut(p, node)?;
        m.in_sync = true;
        m.down = false;
        m.catch_up_since = 0;
        self.drop_leavers(p);
        Ok(())
    }

    /// Member `node` of partition `p`, back from down and catching up,
    /// copies the partition whole instead: it drops what it held (see
    /// `celer-node`), so it no longer holds a copy complete up to when it
    /// went down, and after a restart it must not catch up from a record
    /// again. Returns whether the member changed (the caller bumps the
    /// epoch); a member that is not catching up is left alone.
    pub fn copy_whole(&mut self, p: u32, node: NodeId) -> Result<bool, RouteError> {
        let m = self.member_mut(p, node)?;
        if m.in_sync || m.down || m.catch_up_since == 0 {
            return Ok(false);
        }
        m.catch_up_since = 0;
        Ok(true)
    }

    fn member_mut(&mut self, p: u32, node: NodeId) -> Result<&mut Member, RouteError> {
        self.partitions
            .get_mut(p as usize)
            .ok_or(RouteError::Partition(p))?
            .members
            .iter_mut()
            .find(|m| m.node == node)
            .ok_or(RouteError::NotMember { partition: p, node })
    }

    fn drop_leavers(&mut self, p: u32) {
        let min_copies = self.min_copies();
        let part = &self.partitions[p as usize];
        let target = target_members(p, &placed(&self.nodes, &part.members), self.replicas);
        let part = &mut self.partitions[p as usize];
        // A syncing member that is no longer a target (a node came back, or
        // placement moved on) holds no complete copy: it leaves at once, so
        // its backfill stops instead of copying what will be dropped. A
        // member that went down while in sync (down still, or back and
        // catching up) holds a copy complete up to then: it stays until
        // every target is in sync, as an in-sync member would. Dropping it
        // when a node joined or came back lost the last complete copy once
        // an in-sync member's disk was then replaced (the simulator, seeds
        // 6 and 641).
        part.members
            .retain(|m| m.in_sync || m.catch_up_since > 0 || target.contains(&m.node));
        // No target (no node up): nothing to hand over to, keep everyone
        // (`all` of nothing would be true and drop every member).
        let targets_in_sync = !target.is_empty()
            && target
                .iter()
                .all(|t| part.member(*t).is_some_and(|m| m.in_sync));
        if targets_in_sync {
            // Displaced members stay while fewer than `min_copies` targets
            // are in sync (their stand-ins went away): they are the copies
            // left besides those.
            let enough = target.len() >= min_copies;
            part.members
                .retain(|m| target.contains(&m.node) || (m.displaced && !enough));
        }
    }

    /// Doubles the partition count: `p + P` starts on `p`'s members, so
    /// nothing moves now; a later `rebalance` moves the new halves.
    pub fn split(&self) -> Result<RouteTable, RouteError> {
        if self.partition_bits >= PARTITION_BITS_MAX {
            return Err(RouteError::PartitionBits(self.partition_bits + 1));
        }
        let mut partitions = self.partitions.clone();
        partitions.extend(self.partitions.iter().cloned());
        Ok(RouteTable {
            epoch: self.epoch + 1,
            partition_bits: self.partition_bits + 1,
            partitions,
            nodes: self.nodes.clone(),
            ..*self
        })
    }

    /// The next table, with `node` taken out of every partition: its
    /// copies are gone (its disk was replaced). Unlike a rebalance, this
    /// holds even for a partition whose in-sync members are all down,
    /// which a rebalance keeps as it was: there `node` must not stay an
    /// in-sync member, or it would be one again, empty, once it is up.
    ///
    /// If `node` was a partition's last member in sync, the members that
    /// went down while in sync (down still, or back and catching up) hold
    /// everything written up to the epoch they went down in, and nobody
    /// holds more now: the latest of them are in sync again (a down one as
    /// in a partition whose in-sync members are all down, kept as it is
    /// until it is back). Without this the partition would have no member
    /// in sync: catching up would wait forever for a source, and the down
    /// ones would lose their places, and the data, when their grace ran
    /// out.
    pub fn without_copies_of(&self, node: NodeId) -> RouteTable {
        let mut t = self.clone();
        t.epoch += 1;
        for part in &mut t.partitions {
            part.members.retain(|m| m.node != node);
            if part.members.iter().any(|m| m.in_sync) {
                continue;
            }
            let latest = part
                .members
                .iter()
                .filter(|m| m.catch_up_since > 0)
                .map(|m| m.catch_up_since)
                .max();
            if let Some(latest) = latest {
                for m in &mut part.members {
                    if m.catch_up_since == latest {
                        *m = Member::in_sync(m.node);
                    }
                }
            }
        }
        t
    }

    /// Puts back, as in-sync members after the others, the in-sync members
    /// of `old` that this table drops while their node is up, unless
    /// dropping one is safe: its node already serves `old` or a newer table
    /// (`served(node)`, the epoch it last reported) and it is not one of
    /// `old`'s readers of the partition (`PartitionRoute::readers`).
    /// Returns whether any was put back.
    ///
    /// Why: a client that has not learned of this table yet reads with an
    /// older one, from a member the table drops, and that node may not
    /// have this table yet either (a push lost or late): it would answer
    /// with a block older than a write acknowledged under this table
    /// without it. Kept, the member still takes every write, and it is
    /// dropped by a later table once it serves one where it is no reader:
    /// then it refuses older epochs, and clients of the newer ones do not
    /// read from it. (A member that is down serves nothing: its lease ran
    /// out before the control service marked it down.)
    pub fn keep_leavers(&mut self, old: &RouteTable, served: impl Fn(NodeId) -> u64) -> bool {
        let mut kept = false;
        let old_count = old.partition_count();
        if old_count == 0 || old_count > self.partition_count() {
            return false;
        }
        for p in 0..self.partition_count() {
            let old_part = &old.partitions[(p & (old_count - 1)) as usize];
            for m in old_part.members.iter().filter(|m| m.in_sync) {
                let node_up = self.node(m.node).is_some_and(|n| n.up);
                if !node_up || self.partitions[p as usize].member(m.node).is_some() {
                    continue;
                }
                let old_reader = old_part.readers(old.replicas).any(|r| r.node == m.node);
                if !old_reader && served(m.node) >= old.epoch {
                    continue;
                }
                self.partitions[p as usize]
                    .members
                    .push(Member::in_sync(m.node));
                kept = true;
            }
        }
        kept
    }

    /// Partitions where `node` is a syncing member.
    pub fn syncing_on(&self, node: NodeId) -> impl Iterator<Item = u32> + '_ {
        self.partitions
            .iter()
            .enumerate()
            .filter_map(move |(p, r)| {
                r.member(node)
                    .is_some_and(|m| !m.in_sync && !m.down)
                    .then_some(p as u32)
            })
    }
}

/// The nodes partition `p` is placed over: the up ones, and its down
/// members (held within the grace period: they keep their places) but the
/// displaced ones.
fn placed<'a>(nodes: &'a [NodeInfo], members: &[Member]) -> Vec<&'a NodeInfo> {
    nodes
        .iter()
        .filter(|n| {
            n.up || members
                .iter()
                .any(|m| m.node == n.id && m.down && !m.displaced)
        })
        .collect()
}

/// Target members first in target (rendezvous) order, then leavers.
fn order_members(mut members: Vec<Member>, target: &[NodeId]) -> Vec<Member> {
    members.sort_by_key(|m| {
        target
            .iter()
            .position(|t| *t == m.node)
            .unwrap_or(usize::MAX)
    });
    members
}
