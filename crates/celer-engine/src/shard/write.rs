//! Mutations (writes, sector merges, zeroing, discard, repair): slot
//! allocation, planning a phase, and what happens when a phase is durable.

use super::*;

impl<D: Disk> Shard<D> {
    pub(super) fn start_mutation(&mut self, id: u32) {
        let (volume, chunk, epoch, kind) = {
            let op = &self.ops[id as usize];
            (op.volume, op.chunk, op.epoch, op.op)
        };
        let local = match self.by_chunk.get(&(volume, chunk)).copied() {
            Some(local) => {
                let slot = self.slots[local as usize]
                    .as_ref()
                    .expect("indexed slot exists");
                // An op that already holds the slot (a later phase) goes on:
                // the release waits for it.
                let started = self.ops[id as usize].local_slot == local;
                if slot.freeing || (slot.releasing.is_some() && !started) {
                    return self.defer(id);
                }
                local
            }
            None if !(matches!(kind, EngineOp::Write | EngineOp::Repair)
                || celer_device::era_of(volume) > 0
                    && matches!(kind, EngineOp::WriteZeroes | EngineOp::Discard)) =>
            {
                // Nothing stored: already zero. Versions of chunks that hold
                // no slot are not kept (see docs/architecture.md). A layer
                // above era 0 records its zeroes (below): they hide the
                // layers under it. (A repair allocates like a write: it
                // copies a block this member missed, maybe its chunk's
                // first.)
                if matches!(kind, EngineOp::WriteZeroes | EngineOp::Discard) {
                    // But the zeroing's version is kept a while, as a freed
                    // chunk's is (`Discarded`): an older write arriving
                    // after it is dropped here, as on a replica where the
                    // write came first and this zeroing replaced it. (The
                    // data-path simulator found replicas differing without
                    // this: a discard of a chunk already freed, racing a
                    // write older than it.)
                    let op = &self.ops[id as usize];
                    let (version, first, count) = (op.version, op.first, op.count);
                    self.discarded.raise(
                        (volume, chunk),
                        version,
                        first as usize,
                        count as usize,
                        self.g.chunk_blocks as usize,
                    );
                    // That version is in memory only: the shard's discard
                    // floor keeps it across a restart (`restart_floor`).
                    if version > self.floor_durable {
                        return self.raise_floor(id, version);
                    }
                }
                return self.finish(id);
            }
            None => {
                if let Some(v) = self.tomb_covers(id) {
                    // A late write older than the discard that freed the
                    // chunk (or the zeroings of every block it writes):
                    // dropped, as the slot's versions would have dropped
                    // it. Partly covered: a slot, whose versions drop the
                    // covered blocks.
                    let op = &mut self.ops[id as usize];
                    if v > op.version {
                        op.newer_version = v;
                    }
                    return self.finish(id);
                }
                match self.alloc_slot(id, volume, chunk, epoch) {
                    Some(local) => local,
                    None => return,
                }
            }
        };
        self.bind_slot(id, local);
        if self.ops[id as usize].sub_len > 0 {
            self.start_merge(id, local);
        } else {
            self.plan_phase(id, local);
        }
    }

    /// If the kept discard versions of op `id`'s chunk (which holds no
    /// slot) cover every block it writes at its version, the highest.
    fn tomb_covers(&self, id: u32) -> Option<u64> {
        let op = &self.ops[id as usize];
        self.discarded.covers(
            (op.volume, op.chunk),
            op.first as usize,
            op.count as usize,
            op.version,
        )
    }

    /// Allocates a slot for (`volume`, `chunk`) to op `id`, as a first
    /// write does: the Alloc record goes with the op's first phase (the
    /// slot headers with the next checkpoint, `SlotState::header_due`).
    /// `None`: the op was deferred (no room yet), or failed with `NoSpace`
    /// and finished.
    pub(super) fn alloc_slot(
        &mut self,
        id: u32,
        volume: u64,
        chunk: u64,
        epoch: u64,
    ) -> Option<u32> {
        // Room for the Alloc record and the whole first phase, so that the op
        // does not have to wait between allocating and planning.
        if !self.journal_room(1 + self.g.spare_blocks as usize + 2)
            || !self.sqe_room(2 + RUNS_PER_PHASE_MAX)
        {
            self.defer(id);
            return None;
        }
        let Some(local) = self.free_slots.pop() else {
            self.ops[id as usize].error = Some(EngineError::NoSpace { shard: self.id });
            self.finish(id);
            return None;
        };
        let owner = SlotOwner {
            volume,
            chunk,
            epoch,
        };
        let seq = self.append_record(id, &Record::Alloc { slot: local, owner });
        let mut state = SlotState::new(
            &self.g,
            owner,
            seq,
            vec![BlockEntry::UNWRITTEN; self.g.chunk_blocks as usize],
            0,
        );
        // The slot headers (owner, for a rebuild without the index) are
        // written by the next checkpoint, before it lets the journal reuse
        // this Alloc record; until then the record describes the slot, to
        // a replay and to a rebuild alike. Writing them here made a chunk's
        // first write in a layer four device writes instead of two (the
        // first write after a snapshot 1.8x a write's latency).
        state.header_due = true;
        state.dirty = true;
        if let Some(v) = self
            .discarded
            .take((volume, chunk), self.g.chunk_blocks as usize)
        {
            // Late writes at or below the discard stay dropped on
            // every block of the new slot (in memory, as above).
            for (p, d) in state.planned_version.iter_mut().zip(&v) {
                *p = (*p).max(*d);
            }
            state.discarded_at = v;
        }
        self.slots[local as usize] = Some(state);
        self.by_chunk.insert((volume, chunk), local);
        Some(local)
    }

    /// A sector write: hold the block, read it, merge, then write it whole
    /// (`plan_phase`). Waits while another op holds the block or has a
    /// mutation of it running, so it merges into the committed content and
    /// its journal record follows theirs (journal order = version order).
    pub(super) fn start_merge(&mut self, id: u32, local: u32) {
        let op = &self.ops[id as usize];
        let b = op.first;
        let slot = self.slots[local as usize]
            .as_ref()
            .expect("slot of running op");
        if op.merged || op.version <= slot.planned_version[b as usize] {
            // Merged (deferred afterwards for room), or older than the
            // block: plan_phase writes it, or skips it as any write.
            return self.plan_phase(id, local);
        }
        if slot.is_held(b) || !self.sqe_room(1) || self.block_busy(id, b) {
            return self.defer(id);
        }
        let slot_index = self.g.slot_of(self.id, local as u64);
        let slot = self.slots[local as usize]
            .as_mut()
            .expect("slot of running op");
        slot.set_held(b, true);
        let mut e = slot.entries[b as usize];
        let mut slot_index = slot_index;
        let mut read_local = local;
        if e.kind == BlockKind::Unwritten && !self.ops[id as usize].chain.is_empty() {
            // Not in this layer: merge into the block of the first layer
            // under it that holds one, and hold that slot while reading.
            let chunk = self.ops[id as usize].chunk;
            for k in 0..self.ops[id as usize].chain.len() {
                let key = self.ops[id as usize].chain[k];
                let Some(lower) = self.by_chunk.get(&(key, chunk)).copied() else {
                    continue;
                };
                let Some(ls) = self.slots[lower as usize].as_mut() else {
                    continue;
                };
                let le = ls.entries[b as usize];
                if le.kind == BlockKind::Unwritten {
                    continue;
                }
                e = le;
                if le.kind == BlockKind::Data {
                    ls.reads_inflight += 1;
                    ls.ops_inflight += 1;
                    slot_index = self.g.slot_of(self.id, lower as u64);
                    read_local = lower;
                    self.ops[id as usize].layer_slots.push(lower);
                }
                break;
            }
        }
        let op = &mut self.ops[id as usize];
        op.holding = true;
        if e.kind != BlockKind::Data {
            // Never written or zeroed: the sectors merge into zeroes.
            op.merge_buf.fill(0);
            op.merge_crc = crc32c::crc32c(&op.merge_buf[..BLOCK_SIZE]);
            return self.merge_apply(id, local);
        }
        op.merge_crc = e.crc;
        if let Some(src) = moving_data(&self.jbufs, read_local, e.phys) {
            // Its data is still moving from the journal: the journal
            // buffer holds it.
            op.merge_buf[..BLOCK_SIZE].copy_from_slice(src);
            return self.merge_read_done(id);
        }
        op.stage = Stage::Merging;
        op.pending += 1;
        let sqe = (
            read_io(
                op.merge_buf.as_mut_ptr(),
                BLOCK_SIZE as u32,
                self.g.phys_offset(slot_index, e.phys),
            ),
            io_ud(UD_DATA, id as u64, BLOCK_SIZE),
        );
        self.io.push(sqe);
    }

    /// Whether the sector write `id` must wait before it reads block `b`:
    /// an op submitted before it will write the block (running or waiting),
    /// or one submitted after it has planned a write of the block and not
    /// committed it yet. So a sector write merges into the committed content,
    /// after the writes submitted before it (for one writer, its version
    /// order: an older write of it is not refused as older because a newer
    /// one went first), and its journal record follows theirs.
    pub(super) fn block_busy(&self, id: u32, b: u16) -> bool {
        if self.inflight() <= 1 {
            return false;
        }
        let me = &self.ops[id as usize];
        self.ops.iter().enumerate().any(|(j, o)| {
            j as u32 != id
                && o.stage != Stage::Idle
                && o.volume == me.volume
                && o.chunk == me.chunk
                && matches!(
                    o.op,
                    EngineOp::Write | EngineOp::WriteZeroes | EngineOp::Discard
                )
                && if o.seq < me.seq {
                    (o.first..o.first + o.count).contains(&b)
                } else {
                    o.stage == Stage::Running && (o.first..o.first + o.cursor).contains(&b)
                }
        })
    }

    /// The first block from the op's cursor on that it would skip (a write
    /// of the block at its version or a newer one is planned) while that
    /// write is still running in another op, not applied: the op must wait
    /// for it there. Skipping it at once answered a write sent again at its
    /// version (a resend after a lost connection) `Ok` while its first copy
    /// was still on its way to the disk, and a read right after returned
    /// the older block (data simulation, route-change seed 122).
    fn first_skip_in_flight(&self, id: u32, local: u32) -> Option<u16> {
        let op = &self.ops[id as usize];
        let slot = self.slots[local as usize].as_ref()?;
        (op.cursor..op.count).find(|&k| {
            let l = (op.first + k) as usize;
            let planned = slot.planned_version[l];
            // (A planned version above the applied one with no op running
            // is a discard's floor, not a write in flight.)
            skips(op.op, op.version, planned)
                && slot.entries[l].version < planned
                && self.mutation_running(id, op.first + k)
        })
    }

    /// Whether an op other than `id` has planned a mutation of block `b` of
    /// `id`'s chunk and its phase is running (its blocks not applied yet).
    fn mutation_running(&self, id: u32, b: u16) -> bool {
        let me = &self.ops[id as usize];
        self.ops.iter().enumerate().any(|(j, o)| {
            j as u32 != id
                && o.stage == Stage::Running
                && o.volume == me.volume
                && o.chunk == me.chunk
                && matches!(
                    o.op,
                    EngineOp::Write | EngineOp::WriteZeroes | EngineOp::Discard | EngineOp::Repair
                )
                && (o.first..o.first + o.cursor).contains(&b)
        })
    }

    /// The sector write's read is back: check the block, then merge.
    pub(super) fn merge_read_done(&mut self, id: u32) {
        self.release_layer_slots(id);
        let local = self.ops[id as usize].local_slot;
        let op = &mut self.ops[id as usize];
        op.stage = Stage::Idle;
        if op.error.is_none() && crc32c::crc32c(&op.merge_buf[..BLOCK_SIZE]) != op.merge_crc {
            let offset_bytes = op.chunk * self.g.chunk_bytes() + op.first as u64 * BLOCK_SIZE_U64;
            tracing::error!(
                volume = op.volume,
                offset_bytes,
                shard = self.id,
                "checksum mismatch on the read of a sector write: not merged"
            );
            op.error = Some(EngineError::Checksum {
                volume: op.volume,
                offset_bytes,
            });
        }
        if op.error.is_some() {
            return self.finish(id);
        }
        self.merge_apply(id, local);
    }

    /// Copies the request's sectors over the block read into `merge_buf`
    /// and writes the whole block.
    pub(super) fn merge_apply(&mut self, id: u32, local: u32) {
        let op = &mut self.ops[id as usize];
        let (at, len) = (op.sub_at as usize, op.sub_len as usize);
        let mut to = at;
        let dst = op.merge_buf.as_mut_ptr();
        for_each_piece(&op.segs, 0, len, |addr, take| {
            // SAFETY: the submit contract keeps the segment valid for reads;
            // `to + take <= at + len <= BLOCK_SIZE` (checked at submit).
            unsafe { std::ptr::copy_nonoverlapping(addr, dst.add(to), take) };
            to += take;
        });
        op.segs.clear();
        op.segs.push(Segment {
            addr: dst,
            len: BLOCK_SIZE,
        });
        op.merged = true;
        self.plan_phase(id, local);
    }

    /// Plans and submits the next phase of a write/zero/discard.
    pub(super) fn plan_phase(&mut self, id: u32, local: u32) {
        let slot_index = self.g.slot_of(self.id, local as u64);
        // Journal room for the worst case of this phase.
        let remaining = {
            let op = &self.ops[id as usize];
            (op.count - op.cursor) as usize
        };
        if !self.journal_room(remaining.min(self.g.spare_blocks as usize + 1) + 1)
            || !self.sqe_room(RUNS_PER_PHASE_MAX)
        {
            return self.defer(id);
        }
        let wait_at = self.first_skip_in_flight(id, local);
        let op = &mut self.ops[id as usize];
        let slot = self.slots[local as usize]
            .as_mut()
            .expect("slot of running op");
        op.plan.clear();
        op.iov.clear();
        let mut last_phys: Option<u16> = None;
        let mut runs = 0;
        let is_write = matches!(op.op, EngineOp::Write | EngineOp::Repair);
        let mut k = op.cursor;
        while k < op.count {
            if wait_at == Some(k) {
                break;
            }
            let logical = op.first + k;
            let planned = slot.planned_version[logical as usize];
            if skips(op.op, op.version, planned) {
                let stored = slot.planned_version[logical as usize];
                if stored > op.version {
                    op.newer_version = op.newer_version.max(stored);
                }
                op.plan.push(Planned {
                    logical,
                    phys: PHYS_NONE,
                    crc: 0,
                    action: Action::Skip,
                    layer: 0,
                    version: 0,
                });
                last_phys = None;
                k += 1;
                continue;
            }
            if slot.is_held(logical) && !op.holding {
                // A sector write is merging this block: wait for it.
                break;
            }
            if !is_write {
                last_phys = None;
                slot.planned_version[logical as usize] = op.version;
                op.plan.push(Planned {
                    logical,
                    phys: PHYS_NONE,
                    crc: 0,
                    action: Action::Zero,
                    layer: 0,
                    version: 0,
                });
                k += 1;
                // As for writes: a phase journals at most what the room
                // check above counted (a whole-chunk zeroing went over it
                // and panicked in `append_record` on a nearly full journal).
                if op.plan.len() > self.g.spare_blocks as usize {
                    break;
                }
                continue;
            }
            let next = last_phys
                .map(|p| p as usize + 1)
                .filter(|p| slot.is_free(*p))
                .map(|p| p as u16);
            if next.is_none() && last_phys.is_some() {
                runs += 1;
                if runs >= RUNS_PER_PHASE_MAX {
                    break;
                }
            }
            let Some(phys) = next.or_else(|| slot.find_free()) else {
                break;
            };
            slot.take_phys(phys);
            last_phys = Some(phys);
            // The caller's crc is trusted as given: data that changed after
            // it was computed (a bad copy on the node) then reads back as a
            // checksum error instead of being stored as good.
            let crc = match op.given_crc {
                Some(crc) if !op.merged => crc,
                _ => crc_of(&op.segs, k as usize * BLOCK_SIZE),
            };
            slot.planned_version[logical as usize] = op.version;
            op.plan.push(Planned {
                logical,
                phys,
                crc,
                action: Action::Write,
                layer: 0,
                version: 0,
            });
            k += 1;
            if op.plan.len() > self.g.spare_blocks as usize {
                break;
            }
        }
        if op.plan.is_empty() {
            // No free physical block (wait for in-flight writes to release
            // some), or the next block is held by a sector write.
            return self.defer(id);
        }
        op.stage = Stage::Running;
        let version = op.version;
        // Journal records.
        for i in 0..self.ops[id as usize].plan.len() {
            let p = self.ops[id as usize].plan[i];
            let rec = match p.action {
                Action::Write => Record::Write {
                    slot: local,
                    logical: p.logical,
                    phys: p.phys,
                    crc: p.crc,
                    version,
                    in_journal: false,
                },
                Action::Zero => Record::Zero {
                    slot: local,
                    logical: p.logical,
                    version,
                },
                _ => continue,
            };
            self.append_record(id, &rec);
        }
        let alloc_pending = self.wait_for_alloc(id, local);
        // A request alone in the shard (QD1) writes its data and its own
        // journal block in parallel, both with RWF_DSYNC: each is durable on
        // completion, no fsync worker is woken, and the thread sleeps once.
        // Everything else is served by group commit (one fdatasync a batch).
        // A chunk's first write qualifies too: its Alloc record is in the
        // same journal block, and its slot headers wait for the checkpoint
        // (they used to be plain writes that needed the fdatasync).
        let solo = {
            let op = &self.ops[id as usize];
            op.jbufs.len() == 1
                && !alloc_pending
                && self.inflight() == 1
                && self.open_jb == Some(op.jbufs[0])
                && self.jbufs[op.jbufs[0]].waiters.len() == 1
        };
        // Format 2: a one-block write alone in its shard (QD1) goes to disk
        // as one device write, its journal block and its data in the data
        // block after it (RWF_DSYNC); the data moves to its physical block
        // after that write is durable (`queue_move`), and a replay moves it
        // if the move did not reach the disk. Two RWF_DSYNC writes in
        // parallel took 1.3-1.7x the time of one 8 KiB write here.
        let inline = solo && self.g.journal_data && {
            let op = &self.ops[id as usize];
            op.plan.len() == 1 && op.plan[0].action == Action::Write && op.cursor + 1 == op.count
        };
        if inline {
            self.put_data_in_journal(id, local);
        }
        // Data writes, one per contiguous physical run.
        let op = &mut self.ops[id as usize];
        op.solo = solo;
        let base = op.cursor as usize;
        let n = op.plan.len();
        let mut i = if inline { n } else { 0 };
        while i < n {
            let p = op.plan[i];
            if p.action != Action::Write {
                i += 1;
                continue;
            }
            let j = run_end(&op.plan, i, Action::Write);
            let offset = self.g.phys_offset(slot_index, p.phys);
            let (at, len) = ((base + i) * BLOCK_SIZE, (j - i) * BLOCK_SIZE);
            self.io.push_op_data(op, id, true, at, len, offset, solo);
            self.stats.data_bytes_written += len as u64;
            self.stats.user_bytes_written += len as u64;
            i = j;
        }
        op.cursor += n as u16;
        if solo {
            self.seal_and_write_journal(true);
        }
        let op = &mut self.ops[id as usize];
        if op.pending == 0 {
            // Everything skipped: no I/O to wait for.
            self.phase_done(id);
        }
    }

    /// Copies the one block op `id` writes into its journal buffer and
    /// marks its record `in_journal` (it is the last record there: the op
    /// is alone in the block, after its Alloc if it allocated the slot).
    /// The data goes right after the records when they fit a compact block
    /// (format 3), else into the data block after the record block.
    fn put_data_in_journal(&mut self, id: u32, local: u32) {
        let op = &self.ops[id as usize];
        let p = op.plan[0];
        let b = op.jbufs[0];
        let jb = &mut self.jbufs[b];
        jb.data_at = if self.compact_journal && jb.count <= layout::RECORDS_PER_COMPACT_BLOCK {
            layout::JOURNAL_COMPACT_BYTES
        } else {
            BLOCK_SIZE
        };
        let dst = jb.buf[jb.data_at..].as_mut_ptr();
        let mut to = 0;
        for_each_piece(
            &op.segs,
            op.cursor as usize * BLOCK_SIZE,
            BLOCK_SIZE,
            |addr, take| {
                // SAFETY: the submit contract keeps the segment valid for
                // reads; `to + take <= BLOCK_SIZE`, the data block's size.
                unsafe { std::ptr::copy_nonoverlapping(addr, dst.add(to), take) };
                to += take;
            },
        );
        debug_assert_eq!(to, BLOCK_SIZE);
        let at = layout::JOURNAL_HEADER_BYTES + (jb.count - 1) * RECORD_BYTES;
        layout::encode_record(
            &Record::Write {
                slot: local,
                logical: p.logical,
                phys: p.phys,
                crc: p.crc,
                version: op.version,
                in_journal: true,
            },
            &mut jb.buf[at..at + RECORD_BYTES],
        );
        jb.data_to = Some((local, p.logical, p.phys));
        self.stats.user_bytes_written += BLOCK_SIZE_U64;
        self.stats.journal_data_writes += 1;
    }

    pub(super) fn write_slot_headers(
        &mut self,
        id: u32,
        local: u32,
        seq: u64,
        owner: Option<SlotOwner>,
    ) {
        let slot_index = self.g.slot_of(self.id, local as u64);
        let op = &mut self.ops[id as usize];
        layout::encode_slot_header(self.g.disk_uuid, slot_index, seq, owner, &mut op.meta);
        let ptr = op.meta.as_ptr();
        for copy in 0..2 {
            let sqe = (
                write_io(
                    ptr,
                    BLOCK_SIZE as u32,
                    self.g.header_offset(slot_index, copy),
                    false,
                ),
                io_ud(UD_META, id as u64, BLOCK_SIZE),
            );
            self.ops[id as usize].pending += 1;
            self.stats.meta_bytes_written += BLOCK_SIZE_U64;
            self.io.push(sqe);
        }
    }

    /// All I/O of the op's current phase is done (and durable).
    pub(super) fn phase_done(&mut self, id: u32) {
        let op_kind = self.ops[id as usize].op;
        if op_kind == EngineOp::Read {
            return self.read_done(id);
        }
        let local = self.ops[id as usize].local_slot;
        if self.ops[id as usize].stage == Stage::Freeing {
            return self.free_done(id, local);
        }
        if self.ops[id as usize].stage == Stage::Forgetting {
            return self.forget_done(id, local);
        }
        if self.ops[id as usize].stage == Stage::Flooring {
            // Its floor is durable (or the journal write failed: the op
            // carries the error).
            return self.finish(id);
        }
        // A failed shard applies nothing more, and starts no next phase:
        // after a failed fdatasync a later one may succeed without the
        // writes the failed one covered (the device, or Linux, forgot
        // them), so a phase that completes now may not be durable, and
        // the blocks it would free may still be the only durable copy.
        let failed = self.ops[id as usize].error.is_some() || self.failed.is_some();
        if let Some(e) = &self.ops[id as usize].error {
            // Disk writes that fail leave the shard unable to promise
            // durability: stop taking writes (see fail()), with the reason.
            let why = match e {
                EngineError::Io { errno_text, .. } => format!("a write failed: {errno_text}"),
                e => format!("a write failed: {e}"),
            };
            self.fail(why);
        }
        let op = &mut self.ops[id as usize];
        let slot = self.slots[local as usize]
            .as_mut()
            .expect("slot of running op");
        // A repair rewrites a block at its own version (see EngineOp::Repair).
        let equal_applies = op.op == EngineOp::Repair;
        let fill = op.op == EngineOp::Fill;
        for p in op.plan.iter() {
            let cur = slot.entries[p.logical as usize];
            // A fill copies each block at its source's version.
            let version = if fill { p.version } else { op.version };
            let newer = version > cur.version || (equal_applies && version == cur.version);
            match p.action {
                Action::Write if !failed && newer => {
                    slot.entries[p.logical as usize] = BlockEntry {
                        phys: p.phys,
                        kind: BlockKind::Data,
                        crc: p.crc,
                        version,
                    };
                    if cur.kind == BlockKind::Data {
                        slot.release_phys(cur.phys);
                    }
                    op.applied += 1;
                    slot.dirty = true;
                }
                Action::Write => slot.release_phys(p.phys),
                Action::Zero if !failed && newer => {
                    slot.entries[p.logical as usize] = BlockEntry::zeroed(op.version);
                    if cur.kind == BlockKind::Data {
                        slot.release_phys(cur.phys);
                    }
                    op.applied += 1;
                    slot.dirty = true;
                }
                _ => {}
            }
        }
        // The phase is in the in-memory map now: its journal blocks no
        // longer wait for this op (the watermark, and so checkpoints, can
        // pass them while a later phase waits for room).
        for &b in op.jbufs.iter() {
            self.jbufs[b].unfinished_ops -= 1;
        }
        op.jbufs.clear();
        if fill {
            if !failed && (op.cursor as usize) < op.fill.len() {
                op.stage = Stage::Idle;
                self.advance_watermark();
                return self.fill_phase(id);
            }
            return self.finish(id);
        }
        if !failed && op.cursor < op.count {
            op.stage = Stage::Idle;
            self.advance_watermark();
            return self.plan_phase(id, local);
        }
        // A discard of the whole chunk that leaves it empty releases the
        // slot, unless the slot is a layer above others: its zeroes hide
        // theirs.
        let whole_chunk = op.first == 0 && op.count as u32 == self.g.chunk_blocks;
        if whole_chunk && op.op == EngineOp::Discard && !self.moves_queued.is_empty() {
            self.drop_stale_moves(local);
        }
        if !failed && whole_chunk {
            return self.free_or_finish(id, local);
        }
        self.finish(id);
    }

    /// A whole-chunk discard whose data phase is done: frees the slot if
    /// the discard left it empty and nothing else uses it (unless the slot
    /// is a layer above others: its zeroes hide theirs). Without journal
    /// room for the Free record it waits for room (`Stage::FreeWait`,
    /// retried with the deferred ops) rather than leave the empty slot
    /// allocated (seen in CI: a checkpoint slowed by a loaded disk held the
    /// ring, and a freed chunk stayed allocated).
    pub(super) fn free_or_finish(&mut self, id: u32, local: u32) {
        let op = &self.ops[id as usize];
        let slot = self.slots[local as usize]
            .as_ref()
            .expect("slot of running op");
        let empty = op.op == EngineOp::Discard
            && celer_device::era_of(op.volume) == 0
            && slot.ops_inflight == 1
            && slot.reads_inflight == 0
            && slot.entries.iter().all(|e| e.kind != BlockKind::Data);
        if !empty {
            return self.finish(id);
        }
        if !(self.journal_room(1) && self.sqe_room(2)) {
            self.ops[id as usize].stage = Stage::FreeWait;
            self.stats.free_waits += 1;
            self.deferred.push_back(id);
            return;
        }
        let op = &mut self.ops[id as usize];
        let slot = self.slots[local as usize]
            .as_mut()
            .expect("slot of running op");
        slot.freeing = true;
        op.stage = Stage::Freeing;
        // The Free record and the headers are plain writes: the op
        // completes after the flush that makes them durable, even when its
        // data phase ran alone with RWF_DSYNC (`solo`), or a power cut could
        // bring back an acknowledged free.
        op.solo = false;
        // The versions the slot held go with it: the Free record carries
        // the highest (the discard's, or a newer write's), which raises the
        // shard's discard floor (`restart_floor`).
        let version = slot.planned_version.iter().copied().max().unwrap_or(0);
        let seq = self.append_record(
            id,
            &Record::Free {
                slot: local,
                version,
            },
        );
        self.write_slot_headers(id, local, seq, None);
    }

    /// Journals the discard floor `version` for op `id`, a whole-chunk
    /// zeroing of a chunk with no slot, which completes once the floor is
    /// durable. Exactly its version, never above: the floor is shard-wide,
    /// and one a node names after a restart must stay within what every
    /// writer's clock accepts (see docs/architecture.md). The zeroings of
    /// a trim submitted together share a journal block.
    fn raise_floor(&mut self, id: u32, version: u64) {
        if !self.journal_room(1) {
            return self.defer(id);
        }
        let op = &mut self.ops[id as usize];
        op.stage = Stage::Flooring;
        op.solo = false;
        self.append_record(id, &Record::Floor { version });
    }

    pub(super) fn free_done(&mut self, id: u32, local: u32) {
        let failed = self.ops[id as usize].error.is_some();
        let slot = self.slots[local as usize].take().expect("slot being freed");
        let chunk = (slot.owner.volume, slot.owner.chunk);
        self.by_chunk.remove(&chunk);
        if self.ops[id as usize].op == EngineOp::Discard {
            // The versions go with the slot: keep the highest a while.
            let version = slot.planned_version.iter().copied().max().unwrap_or(0);
            self.discarded.insert(chunk, version);
        } else {
            self.discarded.forget(chunk);
        }
        if failed {
            self.fail("slot release failed".into());
        } else {
            self.free_slots.push(local);
        }
        self.ops[id as usize].local_slot = u32::MAX;
        self.finish(id);
    }
}

/// Whether an op of kind `op` at `version` skips a block whose planned
/// version is `planned`: a repair rewrites a block at its own version;
/// anything else needs a newer one.
fn skips(op: EngineOp, version: u64, planned: u64) -> bool {
    version < planned || (version == planned && op != EngineOp::Repair)
}
