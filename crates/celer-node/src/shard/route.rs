//! Installing a route table (what this shard serves, what it backfills),
//! and releasing chunks nobody reads here any more (deleted volumes,
//! partitions that moved away for good, chunks of retired snapshot eras).

use super::*;

impl<D: Disk, N: Net> ShardLoop<D, N> {
    pub(super) fn install(&mut self, r: Arc<Installed>) {
        if self
            .route
            .as_ref()
            .is_some_and(|c| c.table.epoch >= r.table.epoch)
        {
            return;
        }
        let me = self.shared.id;
        let shards = self.shared.shards as u32;
        let t_epoch = r.table.epoch;
        let t = &r.table;
        // A split: the chunks a backfill listed, or a catch-up record
        // named, may now belong to the new halves, which the source may not
        // hold (it refuses them as NotReplica, for ever): every backfill
        // lists again, and the records answer "not recorded".
        let split = self
            .table()
            .is_some_and(|old| old.partition_count() != t.partition_count());
        // Tables skipped (a lost push, or this node cut off from the
        // control service): see `catch_up_install` and `release_on_join`.
        let gap = self.table().is_some_and(|old| t.epoch > old.epoch + 1);
        self.catch_up_install(t, split, gap);
        // Backfills of partitions where we are no longer syncing stop.
        let mut i = 0;
        while i < self.backfills.len() {
            let keep = t
                .partition(self.backfills[i].partition)
                .and_then(|p| p.member(me))
                .is_some_and(|m| !m.in_sync && !m.down);
            if keep {
                i += 1;
            } else {
                let b = self.backfills.remove(i);
                self.retire(b);
            }
        }
        self.reported.retain(|p, _| {
            t.partition(*p)
                .and_then(|r| r.member(me))
                .is_some_and(|m| !m.in_sync && !m.down)
        });
        let mut report = Vec::new();
        let mine = self.id as u32;
        let syncing: Vec<u32> = t.syncing_on(me).filter(|p| p % shards == mine).collect();
        for p in syncing {
            if let Some(&(e, _)) = self.reported.get(&p) {
                report.push((p, e));
                continue;
            }
            let source = t.partition(p).and_then(|r| r.primary());
            // Back from down: ask the source for what we missed first.
            let catch_up = t
                .partition(p)
                .and_then(|r| r.member(me))
                .is_some_and(|m| m.catch_up_since > 0);
            match self.backfills.iter().position(|b| b.partition == p) {
                Some(i) => {
                    // The table says copy whole where this backfill would
                    // catch up (it asked; see `copy_whole_instead`), the
                    // source changed, or the partitions split: start over.
                    let whole_now = !catch_up && self.backfills[i].catch_up;
                    // After skipped tables, a copy lists again once what
                    // it held is released (`release_on_join`).
                    let relisted = gap && !catch_up;
                    if Some(self.backfills[i].source) != source || whole_now || split || relisted {
                        // The source left or changed: start over from the new one.
                        if let Some(s) = source {
                            self.backfill_serial = self.backfill_serial.wrapping_add(1);
                            let mut fresh =
                                new_backfill(self.backfill_serial, p, t.epoch, s, self.net.now());
                            // A catch-up that fell back to a full copy
                            // stays one: this node dropped what it held.
                            fresh.catch_up = catch_up && self.backfills[i].catch_up;
                            let old = std::mem::replace(&mut self.backfills[i], fresh);
                            self.retire(old);
                        }
                    }
                    // Its epoch stays the one it started in: the report
                    // claims every write since then. Had we left and
                    // rejoined in tables we never saw, the control service
                    // refuses that claim and we copy again.
                }
                None => {
                    if let Some(s) = source {
                        tracing::info!(
                            shard = self.id,
                            partition = p,
                            source = s,
                            catch_up,
                            "backfill starts"
                        );
                        self.backfill_serial = self.backfill_serial.wrapping_add(1);
                        let mut b =
                            new_backfill(self.backfill_serial, p, t.epoch, s, self.net.now());
                        b.catch_up = catch_up;
                        self.backfills.push(b);
                    }
                }
            }
        }
        // Scan the chunks only when a partition just became one we hold for
        // nobody (always at the first table: leftovers of a past run).
        self.release_on_join(t, gap);
        let newly_left = (0..t.partition_count()).any(|p| {
            left_for_good(t, p, me) && !self.table().is_some_and(|old| left_for_good(old, p, me))
        });
        self.route = Some(r);
        self.shared.served_epochs[self.id as usize]
            .store(t_epoch, std::sync::atomic::Ordering::Release);
        if newly_left {
            self.queue_releases("partitions moved away");
        }
        // The rebalance is over when no partition has a syncing member:
        // the backfills finished in it leave the figures.
        if self
            .table()
            .is_some_and(|t| t.partitions.iter().all(|p| p.all_in_sync()))
        {
            self.round_bytes = 0;
        }
        for (p, e) in report {
            self.shared.tell_agent(AgentMsg::Synced {
                partition: p,
                epoch: e,
            });
        }
        self.publish_progress();
        self.set_backfilling();
    }

    pub(super) fn set_deleted(&mut self, ids: Arc<Vec<u64>>) {
        let newly = ids.iter().any(|v| self.deleted.binary_search(v).is_err());
        self.deleted = ids;
        if newly {
            self.queue_releases("volumes deleted");
        }
    }

    /// Whether this node holds chunk (`volume`, `chunk`) for nobody: its
    /// volume was deleted, or its partition moved away and is healthy
    /// without us (every member in sync, as many as the replicas), so the
    /// copy here is neither read nor a source for anyone. A partition still
    /// moving keeps our copy (it may come back to us, and it is the last
    /// resort of an operator while copies are short).
    pub(super) fn releasable(&self, volume: u64, chunk: u64) -> bool {
        if self.deleted.binary_search(&volume).is_ok() {
            return true;
        }
        if let Some(&above) = self.trims.get(&volume) {
            if self.shadowed(volume, above, chunk) {
                return true;
            }
        }
        let Some(t) = self.table() else {
            return false;
        };
        left_for_good(t, t.partition_of(volume, chunk), self.shared.id)
    }

    /// The chunks this shard holds that are `releasable`.
    pub(super) fn releasable_chunks(&self) -> Vec<(u64, u64)> {
        self.engine
            .chunks()
            .into_iter()
            .filter(|(v, c)| self.releasable(*v, *c))
            .collect()
    }

    /// Lists the chunks to release (after a new table or new deletions).
    pub(super) fn queue_releases(&mut self, why: &str) {
        self.purge = self.releasable_chunks();
        if !self.purge.is_empty() {
            tracing::info!(
                shard = self.id,
                chunks = self.purge.len(),
                why,
                "releasing chunks this node no longer holds"
            );
            self.purge_rescans = PURGE_RESCANS;
        }
    }

    /// Releases chunks of `purge` (data and versions forgotten, the slot
    /// freed), one at a time; checked again at submission, since the table
    /// may have changed since they were listed.
    pub(super) fn purge_step(&mut self) {
        if self.purge.is_empty() && self.purging == 0 && self.purge_rescans > 0 {
            self.purge_rescans -= 1;
            self.purge = self.releasable_chunks();
        }
        while self.purging < PURGE_INFLIGHT_MAX {
            let Some((v, c)) = self.purge.pop() else {
                return;
            };
            if !self.releasable(v, c) {
                continue;
            }
            match self.submit_drop(v, c, None, TAG_PURGE) {
                Ok(()) => self.purging += 1,
                Err(EngineError::QueueFull { .. }) => {
                    self.purge.push((v, c));
                    return;
                }
                Err(e) => {
                    tracing::warn!(shard = self.id, volume = v, chunk = c, "release chunk: {e}")
                }
            }
        }
    }

    /// Partitions of table `t` that this shard joins as a new member that
    /// copies them whole (syncing, not catching up), while the table it
    /// held had it in no such place: what it still holds of them is from
    /// before and stale. A chunk the partition's members freed since (a
    /// discard whose version they no longer keep) is not in the source's
    /// list, so the copy would leave it here, and a read would return it.
    /// Such chunks are released before any write of the partition is
    /// taken here (the engine orders later requests of a chunk after its
    /// release) and before the backfill lists.
    ///
    /// After a table that skips epochs (`gap`: a lost push, or this node
    /// cut off from the control service while clients still reached it), every
    /// partition it copies whole is released, with the writes taken here
    /// before (`took_writes`): in a table this node never saw it may have
    /// been marked down or removed while the partition went on without it
    /// (a discard that freed a chunk, say), whatever place the table it
    /// held gave it. None is lost: the source lists only once the writes
    /// of older epochs it accepted are done (`older_writes_in_flight`), and
    /// refuses the later ones, which their clients send again under the
    /// new table, to this member too. (The caller restarts those
    /// partitions' backfills.)
    fn release_on_join(&mut self, t: &celer_route::RouteTable, gap: bool) {
        let me = self.shared.id;
        let shards = self.shared.shards as u32;
        let mine = self.id as u32;
        if gap {
            self.took_writes.clear();
        }
        let old = self.table();
        let was = |p: u32| old.and_then(|o| o.partition(p)).and_then(|r| r.member(me));
        // Joined or back (not a member, or down, in the table we held): no
        // write of the partition taken since.
        let returned: Vec<u32> = t
            .syncing_on(me)
            .filter(|&p| p % shards == mine && was(p).is_none_or(|m| m.down))
            .collect();
        // Of them, those copied whole (not catching up): a new member, or
        // one that went down while it was copying (what it holds is part
        // of a copy, stale where the partition went on without it).
        let copies_whole = |p: u32| {
            t.partition(p)
                .and_then(|r| r.member(me))
                .is_some_and(|m| m.catch_up_since == 0)
        };
        let mut joined: Vec<u32> = returned
            .iter()
            .copied()
            .filter(|&p| copies_whole(p))
            .collect();
        // And those where this member was catching up and now copies whole
        // (it asked: `copy_whole_instead`): what it held may be stale,
        // but for the blocks it took writes of since it came back.
        joined.extend(t.syncing_on(me).filter(|&p| {
            p % shards == mine
                && copies_whole(p)
                && (gap || was(p).is_some_and(|m| !m.down && !m.in_sync && m.catch_up_since > 0))
        }));
        joined.sort_unstable();
        joined.dedup();
        // Written since they came back: nothing yet. Kept for the
        // partitions this shard syncs only.
        self.took_writes.retain(|&(v, c), _| {
            let p = t.partition_of(v, c);
            !returned.contains(&p)
                && t.partition(p)
                    .and_then(|r| r.member(me))
                    .is_some_and(|m| !m.in_sync)
        });
        for p in joined {
            self.release_partition(t, p);
        }
    }

    /// Drops what this shard holds of partition `p` of table `t` before the
    /// partition's writes are taken here and its backfill lists (see
    /// `release_on_join`), but for the blocks it took writes of since it
    /// joined or came back (`took_writes`): those hold what a client wrote
    /// here, maybe not yet on the copy's source (its write in flight), and
    /// the copy brings only what is newer. A chunk with none of them is
    /// released; in the others the remaining blocks are forgotten
    /// (`EngineOp::Forget`).
    pub(super) fn release_partition(&mut self, t: &celer_route::RouteTable, p: u32) {
        let blocks = (t.chunk_bytes / BLOCK_SIZE as u64) as usize;
        let mut stale = Vec::new();
        for (v, c) in self.engine.chunks() {
            if t.partition_of(v, c) != p {
                continue;
            }
            let Some(took) = self.took_writes.get(&(v, c)) else {
                stale.push((v, c, None));
                continue;
            };
            let taken = |b: usize| took[b / 64] & (1 << (b % 64)) != 0;
            let mut b = 0;
            while b < blocks {
                if taken(b) {
                    b += 1;
                    continue;
                }
                let first = b;
                while b < blocks && !taken(b) {
                    b += 1;
                }
                stale.push((v, c, Some((first as u16, (b - first) as u16))));
            }
        }
        if stale.is_empty() {
            return;
        }
        tracing::info!(
            shard = self.id,
            partition = p,
            ranges = stale.len(),
            "copying a partition whole: dropping what this node held of it from before"
        );
        if !self.joining.contains(&p) {
            self.joining.push(p);
        }
        self.join_release.extend(stale);
    }

    /// Notes that this shard, a syncing member, takes a write of `len`
    /// bytes at `offset` of engine key `key` (within one chunk).
    pub(super) fn note_took_write(&mut self, key: u64, offset: u64, len: u64) {
        let Some(chunk_bytes) = self.table().map(|t| t.chunk_bytes) else {
            return;
        };
        let words = ((chunk_bytes / BLOCK_SIZE as u64) as usize).div_ceil(64);
        let bits = self
            .took_writes
            .entry((key, offset / chunk_bytes))
            .or_insert_with(|| vec![0; words]);
        mark_blocks(bits, chunk_bytes, offset, len);
    }

    /// Whether this shard, back from down in partition `p`, waits for its
    /// source's answer to what it missed (its writes wait: see
    /// `start_mutation`). Not longer than `CATCH_UP_ANSWER_WAIT`: a source
    /// this node cannot reach while the clients can must not stall the
    /// partition's writes; past it the writes are taken (and noted in
    /// `took_writes`: a full copy then keeps the blocks written).
    pub(super) fn catch_up_unanswered(&self, p: u32) -> bool {
        let now = self.net.now();
        self.backfills.iter().any(|b| {
            b.partition == p
                && b.catch_up
                && b.bytes_total.is_none()
                && now.saturating_duration_since(b.started) < CATCH_UP_ANSWER_WAIT
        })
    }

    /// Submits the releases `release_on_join` listed; the partitions leave
    /// `joining` once every release completed (a release the engine
    /// defers must not land after the copy's writes).
    pub(super) fn join_release_step(&mut self) {
        if self.joining.is_empty() {
            return;
        }
        while let Some(&(v, c, blocks)) = self.join_release.last() {
            match self.submit_drop(v, c, blocks, TAG_JOIN_RELEASE) {
                Ok(()) => {
                    self.purging += 1;
                    self.join_inflight += 1;
                }
                Err(EngineError::QueueFull { .. }) => return,
                Err(e) => {
                    tracing::warn!(shard = self.id, volume = v, chunk = c, "release chunk: {e}")
                }
            }
            self.join_release.pop();
        }
        if self.join_inflight == 0 {
            self.joining.clear();
        }
    }

    /// Whether partition `p` waits for the release of what this shard held
    /// of it before it joined (its writes are answered Busy meanwhile).
    pub(super) fn join_pending(&self, p: u32) -> bool {
        self.joining.contains(&p)
    }

    /// Submits the release of chunk `c` of engine key `v` (its data and
    /// versions forgotten, its slot freed), or with `blocks` (first, count)
    /// the forgetting of those blocks of it.
    fn submit_drop(
        &mut self,
        v: u64,
        c: u64,
        blocks: Option<(u16, u16)>,
        tag: u64,
    ) -> Result<(), EngineError> {
        let chunk_bytes = self.engine.geometry().chunk_bytes();
        let (op, at, len) = match blocks {
            None => (EngineOp::Release, 0, chunk_bytes),
            Some((first, count)) => (
                EngineOp::Forget,
                first as u64 * BLOCK_SIZE as u64,
                count as u64 * BLOCK_SIZE as u64,
            ),
        };
        let req = EngineRequest {
            op,
            volume: v,
            offset_bytes: c * chunk_bytes + at,
            len_bytes: len,
            segments: &[],
            version: 0,
            epoch: 0,
            tag,
            chain: &[],
            block_crc: None,
        };
        // SAFETY: a release or a forget has no segments.
        unsafe { self.engine.submit(&req) }
    }

    // ---- routes and backfill ----
}
