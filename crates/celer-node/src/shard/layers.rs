//! Volume layers (snapshots, clones, rollback; see celer-proto,
//! "Snapshots"): which engine key a client request of a volume reads or
//! writes, and through which layers under it.
//!
//! A volume without an entry is its own lineage at era 0: its engine key is
//! its id and it has no layer under it (every volume before its first
//! snapshot, so the I/O path of those is unchanged). Entries come from the
//! control service (its push at a snapshot, rollback or clone, and every
//! registration and heartbeat reply); the head era of a volume only goes up.

use std::sync::mpsc::Sender;
use std::sync::Arc;

use celer_device::layer_key;
use celer_engine::BlockKind;
use celer_meta_api::api::VolumeLayers;
use celer_proto::{Header, Status, FLAG_SNAPSHOT_READ};

use super::{OpKind, ShardLoop};

/// One volume's layers as engine keys.
pub(crate) struct Layered {
    pub(crate) lineage: u64,
    pub(crate) head: u32,
    head_key: u64,
    chain: Vec<u64>,
    /// The era a snapshot being cut froze, its key and the keys under it:
    /// writes naming it still land in it (then answered `StaleSnapshot`).
    cutting: Option<(u32, u64, Vec<u64>)>,
    /// Each snapshot's era, key and the keys under it.
    snapshots: Vec<(u32, u64, Vec<u64>)>,
    /// Keys of deleted snapshots' eras and of the era above each.
    retired: Vec<(u64, u64)>,
    /// Heads this shard saw frozen by a snapshot: (frozen key, the head
    /// key that replaced it, when it learned it); the last `FROZEN_KEPT`,
    /// see `frozen_since`.
    frozen: Vec<(u64, u64, std::time::Instant)>,
}

/// Frozen heads remembered per volume.
const FROZEN_KEPT: usize = 4;

impl Layered {
    fn new(v: &VolumeLayers) -> Layered {
        let keys =
            |eras: &[u32]| -> Vec<u64> { eras.iter().map(|&e| layer_key(v.lineage, e)).collect() };
        let snapshots: Vec<(u32, u64, Vec<u64>)> = v
            .snapshots
            .iter()
            .map(|s| (s.era, layer_key(v.lineage, s.era), keys(&s.under)))
            .collect();
        let cutting = v.cutting.and_then(|era| {
            snapshots
                .iter()
                .find(|s| s.0 == era)
                .map(|s| (era, s.1, s.2.clone()))
        });
        Layered {
            lineage: v.lineage,
            head: v.head,
            head_key: layer_key(v.lineage, v.head),
            chain: keys(&v.under),
            cutting,
            snapshots,
            retired: v
                .retired
                .iter()
                .map(|[e, t]| (layer_key(v.lineage, *e), layer_key(v.lineage, *t)))
                .collect(),
            frozen: Vec::new(),
        }
    }

    /// When `key` is the head, or a head that a snapshot froze since: the
    /// snapshot eras (keys) under it that this shard saw frozen at or after
    /// `at` (None: all it remembers), following the chain of frozen heads
    /// down from `key`. A write that landed in one of them on some members,
    /// before they learned of the snapshot or during its cut window, was
    /// written again into the head of the time by its writer, so a member
    /// that missed it finds only that head's copy recorded (see
    /// `catch_up::serve_catch_up`); a later snapshot may have frozen that
    /// head too by the time the member is back.
    pub(crate) fn frozen_since(&self, key: u64, at: Option<std::time::Instant>) -> Vec<u64> {
        let mut out = Vec::new();
        let mut above = key;
        // Each step goes to an older entry: at most FROZEN_KEPT of them.
        while let Some(&(k, _, _)) =
            self.frozen.iter().rev().find(|(k, succ, t)| {
                *succ == above && at.is_none_or(|at| *t >= at) && !out.contains(k)
            })
        {
            if self.snapshots.iter().any(|s| s.1 == k) {
                out.push(k);
            }
            above = k;
        }
        out
    }
}

/// Where a request goes: the engine key and the layers under it.
pub(crate) struct Target {
    pub(crate) key: u64,
    /// Holds the chain's storage alive for the request's submission.
    pub(crate) layers: Option<Arc<Layered>>,
    which: Which,
    /// A write into the era being cut: applied, then answered
    /// `StaleSnapshot` so the writer writes it again into the new head.
    pub(crate) stale: bool,
}

#[derive(Clone, Copy)]
enum Which {
    Head,
    Cutting,
    Snapshot(usize),
}

impl Target {
    /// An engine key as it is, with no layer under it.
    pub(crate) fn plain(key: u64) -> Target {
        Target {
            key,
            layers: None,
            which: Which::Head,
            stale: false,
        }
    }
    pub(crate) fn chain(&self) -> &[u64] {
        let Some(l) = self.layers.as_deref() else {
            return &[];
        };
        match self.which {
            Which::Head => &l.chain,
            Which::Cutting => l.cutting.as_ref().map_or(&[][..], |c| &c.2),
            Which::Snapshot(i) => &l.snapshots[i].2,
        }
    }
}

impl<D: celer_engine::Disk, N: crate::net::Net> ShardLoop<D, N> {
    /// The lineage whose placement a request's volume follows: a layer key
    /// (node peers' backfill and scrub) is placed by its own lineage bits
    /// (`celer_device::chunk_hash`); a clone's id by its parent's lineage.
    pub(crate) fn placement_volume(&self, volume: u64) -> u64 {
        self.layers.get(&volume).map_or(volume, |l| l.lineage)
    }

    /// The head era this node knows for `volume` (0: none).
    pub(crate) fn head_era(&self, volume: u64) -> u64 {
        self.layers.get(&volume).map_or(0, |l| l.head as u64)
    }

    /// The layer a client `Read` reads: the volume's head, or with
    /// [`FLAG_SNAPSHOT_READ`] the snapshot whose era the header names.
    pub(crate) fn read_target(&self, h: &Header) -> Result<Target, Status> {
        let Some(l) = self.layers.get(&h.volume).cloned() else {
            if h.flags & FLAG_SNAPSHOT_READ != 0 {
                return Err(Status::SnapshotBehind);
            }
            return Ok(Target {
                key: h.volume,
                layers: None,
                which: Which::Head,
                stale: false,
            });
        };
        if h.flags & FLAG_SNAPSHOT_READ != 0 {
            let Some(i) = l.snapshots.iter().position(|s| s.0 as u64 == h.snapshot) else {
                // Deleted, or this node has not heard of it yet.
                return Err(if h.snapshot > l.head as u64 {
                    Status::SnapshotBehind
                } else {
                    Status::Invalid
                });
            };
            return Ok(Target {
                key: l.snapshots[i].1,
                layers: Some(l),
                which: Which::Snapshot(i),
                stale: false,
            });
        }
        Ok(Target {
            key: l.head_key,
            layers: Some(l),
            which: Which::Head,
            stale: false,
        })
    }

    /// The layer a client's mutation goes to, by the era it names.
    pub(crate) fn write_target(&self, h: &Header) -> Result<Target, Status> {
        let Some(l) = self.layers.get(&h.volume).cloned() else {
            return if h.snapshot == 0 {
                Ok(Target {
                    key: h.volume,
                    layers: None,
                    which: Which::Head,
                    stale: false,
                })
            } else {
                Err(Status::SnapshotBehind)
            };
        };
        if h.snapshot == l.head as u64 {
            return Ok(Target {
                key: l.head_key,
                layers: Some(l),
                which: Which::Head,
                stale: false,
            });
        }
        if h.snapshot > l.head as u64 {
            return Err(Status::SnapshotBehind);
        }
        match &l.cutting {
            Some((era, key, _)) if *era as u64 == h.snapshot => {
                let key = *key;
                Ok(Target {
                    key,
                    layers: Some(l),
                    which: Which::Cutting,
                    stale: true,
                })
            }
            _ => Err(Status::StaleSnapshot),
        }
    }

    /// Installs layers (see `ShardMsg::Layers`); with `reply`, answers once
    /// no accepted write to an era they no longer accept is in flight.
    pub(crate) fn set_layers(
        &mut self,
        layers: Arc<Vec<VolumeLayers>>,
        reply: Option<Sender<u16>>,
    ) {
        for v in layers.iter() {
            let newer = match self.layers.get(&v.volume) {
                None => true,
                Some(cur) => {
                    v.head > cur.head
                        || (v.head == cur.head
                            && (cur.cutting.is_some() != v.cutting.is_some()
                                || cur.snapshots.len() != v.snapshots.len()
                                || cur.retired.len() != v.retired.len()
                                || cur.chain.len() != v.under.len()))
                }
            };
            if newer {
                tracing::info!(
                    shard = self.id,
                    volume = v.volume,
                    lineage = v.lineage,
                    head = v.head,
                    cutting = ?v.cutting,
                    snapshots = v.snapshots.len(),
                    "volume layers installed"
                );
                let mut l = Layered::new(v);
                match self.layers.get(&v.volume) {
                    Some(cur) => {
                        l.frozen = cur.frozen.clone();
                        if cur.head_key != l.head_key {
                            l.frozen.push((cur.head_key, l.head_key, self.net.now()));
                        }
                        let excess = l.frozen.len().saturating_sub(FROZEN_KEPT);
                        l.frozen.drain(..excess);
                    }
                    // A volume's first layers: its first snapshot froze
                    // era 0, the era now directly under the head (or this
                    // process just started: no member is being recorded).
                    None => {
                        let head = l.head_key;
                        l.frozen
                            .extend(l.chain.first().map(|k| (*k, head, self.net.now())))
                    }
                }
                self.layers.insert(v.volume, Arc::new(l));
            }
        }
        let trims: std::collections::HashMap<u64, u64> = self
            .layers
            .values()
            .flat_map(|l| l.retired.iter().copied())
            .collect();
        if trims != self.trims {
            self.trims = trims;
            self.queue_releases("snapshots deleted");
        }
        if let Some(reply) = reply {
            self.layer_waits.push((layers, reply));
            self.answer_layer_waits();
        }
    }

    /// Whether chunk `chunk` of a deleted snapshot's era `key` is read by
    /// nobody: the era directly above it (`above`) holds every block it
    /// holds (data or zeroes), so every read through both stops above.
    pub(crate) fn shadowed(&self, key: u64, above: u64, chunk: u64) -> bool {
        let g = self.engine.geometry();
        let blocks = g.chunk_blocks as usize;
        let at = chunk * g.chunk_bytes();
        let mut mine = vec![(BlockKind::Unwritten, 0u64); blocks];
        let mut over = vec![(BlockKind::Unwritten, 0u64); blocks];
        self.engine.block_states(key, at, &mut mine);
        self.engine.block_states(above, at, &mut over);
        mine.iter()
            .zip(&over)
            .all(|(m, o)| m.0 == BlockKind::Unwritten || o.0 != BlockKind::Unwritten)
    }

    /// Per query `[key, above]`: the chunk slots of layer `key` this shard
    /// holds, all of them (`above` 0) or only those `above` shadows (what
    /// deleting the snapshot of layer `key` frees here; see `shadowed`).
    pub(crate) fn layer_usage(&self, queries: &[[u64; 2]]) -> Vec<u64> {
        let chunks = self.engine.chunks();
        queries
            .iter()
            .map(|&[key, above]| {
                chunks
                    .iter()
                    .filter(|&&(v, ch)| v == key && (above == 0 || self.shadowed(key, above, ch)))
                    .count() as u64
            })
            .collect()
    }

    /// Answers the layer installs whose writes to eras no longer accepted
    /// are all done.
    pub(crate) fn answer_layer_waits(&mut self) {
        let ops = &self.ops;
        let id = self.id;
        self.layer_waits.retain(|(layers, reply)| {
            let busy = ops.iter().any(|op| {
                op.busy
                    && matches!(op.kind, OpKind::Mutate | OpKind::Primary)
                    && layers.iter().any(|v| {
                        op.req.volume == v.volume
                            && op.req.snapshot != v.head as u64
                            && v.cutting.is_none_or(|c| op.req.snapshot != c as u64)
                    })
            });
            if !busy {
                let _ = reply.send(id);
            }
            busy
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use celer_meta_api::api::SnapshotLayers;
    use std::time::{Duration, Instant};

    /// Volume 5 after two snapshots: s1 froze era 0 (head 1), s2 froze
    /// era 1 (head 2).
    fn two_snapshots() -> Layered {
        let v = VolumeLayers {
            volume: 5,
            lineage: 5,
            head: 2,
            under: vec![1, 0],
            snapshots: vec![
                SnapshotLayers {
                    era: 0,
                    under: vec![],
                },
                SnapshotLayers {
                    era: 1,
                    under: vec![0],
                },
            ],
            cutting: None,
            retired: vec![],
        };
        Layered::new(&v)
    }

    #[test]
    fn frozen_eras_are_found_from_the_head_and_from_a_head_frozen_since() {
        let k = |e| layer_key(5, e);
        let t0 = Instant::now();
        let mut l = two_snapshots();
        l.frozen = vec![(k(0), k(1), t0), (k(1), k(2), t0 + Duration::from_secs(1))];
        assert_eq!(l.frozen_since(k(2), None), vec![k(1), k(0)]);
        // Era 1 is no longer the head: a write recorded in it while a member
        // was down still brings era 0's copy (s2 froze era 1 meanwhile).
        assert_eq!(l.frozen_since(k(1), None), vec![k(0)]);
        assert_eq!(l.frozen_since(k(0), None), Vec::<u64>::new());
        assert_eq!(
            l.frozen_since(k(2), Some(t0 + Duration::from_millis(500))),
            vec![k(1)]
        );
        assert_eq!(l.frozen_since(layer_key(6, 2), None), Vec::<u64>::new());
        // A frozen era that is no snapshot (a rollback's old head) is not
        // copied, and the chain goes on under it.
        l.frozen = vec![(k(0), k(1), t0), (k(1), k(7), t0), (k(7), k(2), t0)];
        assert_eq!(l.frozen_since(k(2), None), vec![k(1), k(0)]);
    }
}
