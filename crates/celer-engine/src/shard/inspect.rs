//! What a shard tells about itself and its data without doing I/O:
//! geometry, counters, block states and crcs, versions, chunk lists, a
//! description for `celer engine check`.

use super::*;

impl<D: Disk> Shard<D> {
    pub fn id(&self) -> u32 {
        self.id
    }
    pub fn geometry(&self) -> &Geometry {
        &self.g
    }
    pub fn stats(&self) -> ShardStats {
        self.stats
    }
    /// The discard floor this shard was opened with: at or above the
    /// version of every whole-chunk discard or zeroing it acknowledged
    /// before that left the chunk without a slot (0 on a fresh disk). The
    /// per-chunk versions that drop a write arriving late behind such a
    /// discard live in memory; after a restart, the caller refuses client
    /// writes at or below this floor for as long as a late write can
    /// arrive (the storage node answers `OlderVersion`: the client writes
    /// again with a newer version). The engine cannot: a backfill writes
    /// old versions legitimately.
    pub fn restart_floor(&self) -> u64 {
        self.floor_at_open
    }

    /// The discard floor now (what the next checkpoint keeps).
    pub fn discard_floor(&self) -> u64 {
        self.discard_floor
    }

    pub fn inflight(&self) -> usize {
        self.ops.len() - self.free_ops.len()
    }
    pub fn inflight_max(&self) -> usize {
        self.ops.len()
    }
    /// Largest Read/Write request, in bytes.
    pub fn max_request_bytes(&self) -> u64 {
        self.max_request_blocks as u64 * BLOCK_SIZE_U64
    }
    /// Where the current data of the block at `offset_bytes` of `volume`
    /// lives on the disk, if it has any (diagnostics, `celer engine locate`).
    pub fn locate(&self, volume: u64, offset_bytes: u64) -> Option<u64> {
        let chunk = offset_bytes / self.g.chunk_bytes();
        let local = *self.by_chunk.get(&(volume, chunk))?;
        let slot = self.slots[local as usize].as_ref()?;
        let logical = (offset_bytes % self.g.chunk_bytes() / BLOCK_SIZE_U64) as usize;
        let e = slot.entries[logical];
        (e.kind == BlockKind::Data).then(|| {
            self.g
                .phys_offset(self.g.slot_of(self.id, local as u64), e.phys)
        })
    }

    /// With `OpenOptions::completion_eventfd`: a nonblocking eventfd that
    /// becomes readable when completions may be ready. The owner drains it
    /// (reads its counter) and then calls `poll`.
    pub fn completion_fd(&self) -> Option<RawFd> {
        self.io.queue.completion_fd()
    }

    /// The state of `count` blocks from `offset_bytes` of `volume` (within
    /// one chunk), as a read submitted right now would see them: per block
    /// its kind and version. A backfill source sends these beside the data,
    /// read in the same step, so the data is never older than the versions.
    /// Returns false when the chunk holds no slot: every block is then
    /// `Zero` at the version of the discard or zeroing that left it so, if
    /// that version is still kept (`DISCARDED_KEEP`), else `Unwritten` at
    /// version 0 (never written, released, or discarded long ago). In a
    /// slot allocated after such a discard, the blocks not written since
    /// are `Zero` at its version too. A member that copies the range thus
    /// zeroes the older data it holds there.
    pub fn block_states(
        &self,
        volume: u64,
        offset_bytes: u64,
        out: &mut [(BlockKind, u64)],
    ) -> bool {
        let chunk = offset_bytes / self.g.chunk_bytes();
        let first = (offset_bytes % self.g.chunk_bytes() / BLOCK_SIZE_U64) as usize;
        let slot = self
            .by_chunk
            .get(&(volume, chunk))
            .and_then(|l| self.slots[*l as usize].as_ref());
        let tomb = self
            .discarded
            .get((volume, chunk))
            .filter(|_| slot.is_none());
        let zeroed = |v: u64| {
            if v > 0 {
                (BlockKind::Zero, v)
            } else {
                (BlockKind::Unwritten, 0)
            }
        };
        for (i, o) in out.iter_mut().enumerate() {
            let b = first + i;
            *o = match slot.and_then(|s| Some((s, s.entries.get(b)?))) {
                Some((s, e)) if e.kind == BlockKind::Unwritten => {
                    zeroed(s.discarded_at.get(b).copied().unwrap_or(0))
                }
                Some((_, e)) => (e.kind, e.version),
                None => zeroed(tomb.map_or(0, |t| t.of(b))),
            };
        }
        slot.is_some()
    }

    /// Chunks that hold no slot but whose discard version is still kept
    /// (freed by a whole-chunk discard, or zeroed without a slot, within
    /// `DISCARDED_KEEP`): a backfill source lists them beside `chunks`, so
    /// the new member zeroes what it holds there (`block_states`).
    pub fn discarded_chunks(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = self
            .discarded
            .versions
            .iter()
            .filter(|(k, t)| !self.by_chunk.contains_key(k) && t.at.elapsed() < DISCARDED_KEEP)
            .map(|(k, _)| *k)
            .collect();
        out.sort_unstable();
        out
    }

    /// The crc32c of each block of a range held as data (0 for blocks
    /// never written, zeroed or discarded), from the slot map: the crc the
    /// block was written with, which a read of it checks. Returns whether
    /// the chunk has a slot. The scrub compares it between replicas of
    /// equal version.
    pub fn block_crcs(&self, volume: u64, offset_bytes: u64, out: &mut [u32]) -> bool {
        let chunk = offset_bytes / self.g.chunk_bytes();
        let first = (offset_bytes % self.g.chunk_bytes() / BLOCK_SIZE_U64) as usize;
        let slot = self
            .by_chunk
            .get(&(volume, chunk))
            .and_then(|l| self.slots[*l as usize].as_ref());
        for (i, o) in out.iter_mut().enumerate() {
            *o = match slot.and_then(|s| s.entries.get(first + i)) {
                Some(e) if e.kind == BlockKind::Data => e.crc,
                _ => 0,
            };
        }
        slot.is_some()
    }

    /// The highest block version this shard holds (0 if none).
    pub fn max_version(&self) -> u64 {
        self.slots
            .iter()
            .flatten()
            .flat_map(|s| s.planned_version.iter().copied())
            .max()
            .unwrap_or(0)
    }

    /// Per volume, the highest block version this shard holds.
    pub fn max_versions_by_volume(&self) -> HashMap<u64, u64> {
        let mut m: HashMap<u64, u64> = HashMap::new();
        for s in self.slots.iter().flatten() {
            let v = s.planned_version.iter().copied().max().unwrap_or(0);
            let e = m.entry(s.owner.volume).or_default();
            *e = (*e).max(v);
        }
        m
    }

    /// The (volume, chunk) pairs this shard holds, sorted.
    pub fn chunks(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = self.by_chunk.keys().copied().collect();
        // In order: what a node does with the list (releases, lists sent)
        // must not depend on a hash seed (the simulator replays a seed).
        out.sort_unstable();
        out
    }

    /// One line of internal state, for diagnostics.
    pub fn describe(&self) -> String {
        let jb: Vec<String> = self
            .jorder
            .iter()
            .map(|&b| {
                format!(
                    "{}:{:?}/{}",
                    self.jbufs[b].seq, self.jbufs[b].state, self.jbufs[b].unfinished_ops
                )
            })
            .collect();
        let deferred: Vec<String> = self
            .deferred
            .iter()
            .map(|&id| {
                let op = &self.ops[id as usize];
                format!(
                    "{:?} v{} c{} cur{}/{} pend{}",
                    op.op, op.volume, op.chunk, op.cursor, op.count, op.pending
                )
            })
            .collect();
        let running: Vec<String> = self
            .ops
            .iter()
            .filter(|op| op.stage != Stage::Idle && op.stage != Stage::Deferred)
            .map(|op| {
                format!(
                    "{:?} {:?} v{} c{} cur{}/{} pend{}",
                    op.op, op.stage, op.volume, op.chunk, op.cursor, op.count, op.pending
                )
            })
            .collect();
        format!(
            "shard {} inflight {} sqes {} next_seq {} tail {} acked {} ckpt {} jorder [{}] running [{}] deferred [{}] failed {:?}",
            self.id,
            self.inflight(),
            self.io.inflight,
            self.next_seq,
            self.tail,
            self.acked_through,
            self.ckpt.is_some(),
            jb.join(" "),
            running.join("; "),
            deferred.join("; "),
            self.failed
        )
    }

    /// Chunks currently allocated in this shard.
    pub fn allocated_chunks(&self) -> usize {
        self.by_chunk.len()
    }
    pub fn free_slot_count(&self) -> usize {
        self.free_slots.len()
    }
}
