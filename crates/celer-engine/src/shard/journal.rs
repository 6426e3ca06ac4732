//! The journal ring: records appended to the open block, sealed and
//! written (RWF_DSYNC or group commit with one fdatasync), and the
//! watermark that says which records are durable.

use super::*;

impl<D: Disk> Shard<D> {
    /// Whether `records` more records fit in the journal without waiting.
    pub(super) fn journal_room(&self, records: usize) -> bool {
        let open_left = self
            .open_jb
            .map(|b| RECORDS_PER_JOURNAL_BLOCK - self.jbufs[b].count)
            .unwrap_or(0);
        let new_blocks = records
            .saturating_sub(open_left)
            .div_ceil(RECORDS_PER_JOURNAL_BLOCK);
        let ring_left = (self.tail + self.g.journal_seqs()).saturating_sub(self.next_seq + 1);
        new_blocks <= self.free_journal_bufs() && (new_blocks as u64) <= ring_left
    }

    pub(super) fn free_journal_bufs(&self) -> usize {
        self.jbufs
            .iter()
            .filter(|b| b.state == JbState::Free)
            .count()
    }

    /// Half the journal ring is in use: time for a checkpoint. (At three
    /// quarters, QD1 WA fell from 2.42 to 2.35, but a checkpoint slowed by
    /// a loaded disk then has half the room for the writes that come while
    /// it runs, and a full ring stalls them: kept at half, see
    /// docs/architecture.md, "Checkpoint share".)
    pub(super) fn checkpoint_due(&self) -> bool {
        (self.next_seq - self.tail) * 2 >= self.g.journal_seqs()
    }

    /// Appends a record to the open journal block (opening one if needed) and
    /// makes `id` wait for that block. Returns the block's sequence number.
    pub(super) fn append_record(&mut self, id: u32, rec: &Record) -> u64 {
        let b = match self.open_jb {
            Some(b) if self.jbufs[b].count < RECORDS_PER_JOURNAL_BLOCK => b,
            _ => {
                if self.open_jb.is_some() {
                    self.seal_and_write_journal(false);
                }
                let b = self
                    .jbufs
                    .iter()
                    .position(|b| b.state == JbState::Free)
                    .expect("journal_room checked");
                let seq = self.next_seq;
                // The ring never laps its tail: `journal_room` was checked,
                // and a sequence number's blocks are reused only once a
                // checkpoint moved the tail past it.
                assert!(
                    seq < self.tail + self.g.journal_seqs(),
                    "journal seq {seq} would overwrite the ring's tail {}",
                    self.tail
                );
                self.next_seq += 1;
                let jb = &mut self.jbufs[b];
                jb.state = JbState::Open;
                jb.seq = seq;
                jb.count = 0;
                jb.waiters.clear();
                jb.unfinished_ops = 0;
                jb.data_to = None;
                jb.data_at = BLOCK_SIZE;
                jb.floor = 0;
                debug_assert!(!jb.moving, "a free journal buffer still moving data");
                self.jorder.push_back(b);
                self.open_jb = Some(b);
                b
            }
        };
        let jb = &mut self.jbufs[b];
        if let Record::Free { version, .. } | Record::Floor { version } = *rec {
            jb.floor = jb.floor.max(version);
            self.discard_floor = self.discard_floor.max(version);
        }
        let at = layout::JOURNAL_HEADER_BYTES + jb.count * RECORD_BYTES;
        layout::encode_record(rec, &mut jb.buf[at..at + RECORD_BYTES]);
        jb.count += 1;
        if jb.waiters.last() != Some(&id) {
            jb.waiters.push(id);
            jb.unfinished_ops += 1;
            let op = &mut self.ops[id as usize];
            op.pending += 1;
            op.jbufs.push(b);
        }
        jb.seq
    }

    /// Makes op `id` wait for the journal block holding the Alloc record
    /// of slot `local` while that block is not durable: another op may
    /// have allocated the slot, and a replay without the Alloc drops every
    /// record naming the slot, so this op's write would be lost after a
    /// power cut although it was acknowledged. Returns whether that block
    /// still waits for a flush (the op then cannot complete without one:
    /// it is not `solo`).
    pub(super) fn wait_for_alloc(&mut self, id: u32, local: u32) -> bool {
        let Some(alloc_seq) = self.slots[local as usize].as_ref().map(|s| s.alloc_seq) else {
            return false;
        };
        if alloc_seq <= self.acked_through {
            return false; // durable
        }
        let Some(b) = self
            .jbufs
            .iter()
            .position(|jb| jb.seq == alloc_seq && jb.state != JbState::Free)
        else {
            return false;
        };
        match self.jbufs[b].state {
            JbState::Free | JbState::Written => false,
            // Written: the flush this op waits for (issued once its own
            // writes complete) covers it.
            JbState::Unflushed => true,
            // Its own block (it allocated the slot, or its records went
            // in with the Alloc): nothing more to wait for, and a solo op
            // stays solo.
            JbState::Open | JbState::Writing if self.ops[id as usize].jbufs.contains(&b) => false,
            JbState::Open | JbState::Writing => {
                let jb = &mut self.jbufs[b];
                jb.waiters.push(id);
                jb.unfinished_ops += 1;
                let op = &mut self.ops[id as usize];
                op.pending += 1;
                op.jbufs.push(b);
                true
            }
        }
    }

    pub(super) fn flush_journal(&mut self) {
        if self.open_jb.is_some_and(|b| self.jbufs[b].count > 0) {
            self.seal_and_write_journal(false);
        }
    }

    /// Writes the open journal block; with `dsync` it is durable when it
    /// completes (RWF_DSYNC), otherwise it waits for the next flush.
    pub(super) fn seal_and_write_journal(&mut self, dsync: bool) {
        let Some(b) = self.open_jb.take() else { return };
        let jb = &mut self.jbufs[b];
        layout::seal_journal_block(
            self.g.disk_uuid,
            self.id,
            jb.seq,
            self.acked_through,
            jb.count,
            jb.compact(),
            &mut jb.buf,
        );
        jb.state = JbState::Writing;
        jb.dsync = dsync;
        // With a small write's data: the record block and the data block
        // after it, one write.
        let len = journal_write_len(jb);
        let sqe = (
            write_io(
                jb.buf.as_ptr(),
                len as u32,
                self.g.journal_block_offset(self.id, jb.seq),
                dsync,
            ),
            io_ud(UD_JOURNAL, b as u64, len),
        );
        self.stats.journal_bytes_written += len as u64;
        self.io.push(sqe);
    }

    pub(super) fn journal_done(&mut self, b: usize, res: i32) {
        let len = journal_write_len(&self.jbufs[b]);
        // The reason, for the shard and for every op waiting on the block.
        let why = (res != len as i32).then(|| {
            let why = if res < 0 {
                errno_text(-res)
            } else {
                format!("short journal write {res}")
            };
            format!("journal write: {why}")
        });
        if let Some(why) = &why {
            self.fail(why.clone());
        }
        if self.jbufs[b].dsync {
            self.jbufs[b].state = JbState::Written;
            if res == len as i32 && self.failed.is_none() {
                self.floor_durable = self.floor_durable.max(self.jbufs[b].floor);
            }
        } else {
            self.jbufs[b].state = JbState::Unflushed;
            self.unflushed_jbs.push(b);
        }
        let mut solo_done = None;
        for w in 0..self.jbufs[b].waiters.len() {
            let id = self.jbufs[b].waiters[w];
            let op = &mut self.ops[id as usize];
            if res != len as i32 && op.error.is_none() {
                op.error = Some(EngineError::Io {
                    volume: op.volume,
                    offset_bytes: op.chunk * self.g.chunk_bytes(),
                    errno_text: why.clone().unwrap_or_default(),
                });
            }
            op.pending -= 1;
            if op.pending == 0
                && matches!(
                    op.stage,
                    Stage::Running | Stage::Freeing | Stage::Flooring | Stage::Forgetting
                )
            {
                if op.solo {
                    solo_done = Some(id);
                } else {
                    self.flush_waiting.push(id);
                }
            }
            if op.pending == 0 && matches!(op.stage, Stage::Merging | Stage::Filling) {
                // Its reads finished before this journal block (the Alloc
                // record of a slot it allocated): go on with it here, as
                // `op_io_done` does when a read is last.
                self.reads_done.push(id);
            }
        }
        // A small write's data moves once its op applied it; the buffer is
        // held from now on (finishing the op may advance the watermark).
        let moves = self.jbufs[b].data_to.is_some() && res == len as i32 && self.failed.is_none();
        self.jbufs[b].moving = moves;
        if let Some(id) = solo_done {
            self.phase_done(id);
        }
        if moves {
            self.queue_move(b);
        }
        while let Some(id) = self.reads_done.pop() {
            match self.ops[id as usize].stage {
                Stage::Merging => self.merge_read_done(id),
                Stage::Filling => self.fill_read_done(id),
                _ => {}
            }
        }
        self.advance_watermark();
    }

    /// Queues the move of a small write's data from journal buffer `b`
    /// (durable in the journal's data block) to its physical block, if its
    /// op applied it. Moves go out in batches (`maybe_issue_moves`): one
    /// per write would wake the thread once more per write when it
    /// completes, which cost a storage node more than the device write it
    /// saved. A move is a plain write: the checkpoint's fdatasync makes it
    /// durable before the journal is reused, and the watermark stays below
    /// `b` until it completes, so no checkpoint is cut past it meanwhile.
    /// Until then reads of the slot wait (and make the queued moves go
    /// out), and no block of the slot is reused.
    fn queue_move(&mut self, b: usize) {
        if self.failed.is_some() || self.move_is_stale(b) {
            // The shard failed, or the op did not apply it (the block is
            // free again).
            let jb = &mut self.jbufs[b];
            jb.moving = false;
            jb.data_to = None;
            return;
        }
        let (local, _, _) = self.jbufs[b].data_to.expect("a move has its target");
        let slot = self.slots[local as usize]
            .as_mut()
            .expect("not stale: the slot exists");
        slot.reads_inflight += 1;
        slot.moves_inflight += 1;
        self.moves_queued.push(b);
    }

    /// Sends the queued moves when enough have gathered, or when anything
    /// waits that they hold: a deferred request (a read of their slot, or
    /// one waiting for journal room or a journal buffer, which they keep),
    /// or a checkpoint that is due (the watermark waits for them).
    pub(super) fn maybe_issue_moves(&mut self) {
        if self.moves_queued.is_empty() {
            return;
        }
        if self.moves_queued.len() >= MOVES_BATCH
            || !self.deferred.is_empty()
            || self.free_journal_bufs() < JOURNAL_BUFS / 4
            || self.checkpoint_due()
        {
            self.issue_moves();
        }
    }

    /// Whether the map no longer names the block queued move `b` writes
    /// (a later write, zeroing or discard of the block replaced it).
    fn move_is_stale(&self, b: usize) -> bool {
        let (local, logical, phys) = self.jbufs[b].data_to.expect("a queued move has its target");
        self.slots[local as usize].as_ref().is_none_or(|s| {
            let e = s.entries[logical as usize];
            e.kind != BlockKind::Data || e.phys != phys
        })
    }

    /// Lets go of queued move `b` without writing it: its data is not
    /// needed any more (a replay finds the record that replaced it).
    fn drop_move(&mut self, b: usize) {
        let jb = &mut self.jbufs[b];
        jb.moving = false;
        let (local, _, _) = jb.data_to.take().expect("a queued move has its target");
        if let Some(slot) = self.slots[local as usize].as_mut() {
            slot.moves_inflight -= 1;
            slot.end_read();
        }
    }

    /// Drops the queued moves into slot `local` that are stale, so that a
    /// discard emptying the chunk can free it at once.
    pub(super) fn drop_stale_moves(&mut self, local: u32) {
        let mut i = 0;
        while i < self.moves_queued.len() {
            let b = self.moves_queued[i];
            let into = self.jbufs[b].data_to.map(|(l, _, _)| l);
            if into == Some(local) && self.move_is_stale(b) {
                self.moves_queued.swap_remove(i);
                self.drop_move(b);
            } else {
                i += 1;
            }
        }
        self.advance_watermark();
    }

    /// Sends every queued move that is still needed.
    pub(super) fn issue_moves(&mut self) {
        for i in 0..self.moves_queued.len() {
            let b = self.moves_queued[i];
            if self.move_is_stale(b) {
                self.drop_move(b);
                continue;
            }
            let (local, _, phys) = self.jbufs[b].data_to.expect("a queued move has its target");
            let slot_index = self.g.slot_of(self.id, local as u64);
            let sqe = (
                write_io(
                    self.jbufs[b].data().as_ptr(),
                    BLOCK_SIZE as u32,
                    self.g.phys_offset(slot_index, phys),
                    false,
                ),
                io_ud(UD_MOVE, b as u64, BLOCK_SIZE),
            );
            self.moves_inflight += 1;
            self.stats.data_bytes_written += BLOCK_SIZE_U64;
            self.io.push(sqe);
        }
        self.moves_queued.clear();
        self.advance_watermark();
    }

    pub(super) fn move_done(&mut self, b: usize, res: i32) {
        let jb = &mut self.jbufs[b];
        jb.moving = false;
        let (local, _, _) = jb.data_to.take().expect("a move has its target");
        self.moves_inflight -= 1;
        self.moves_unflushed = true;
        if res < 0 {
            // The data stays in the journal, which a replay moves again;
            // this process stops promising anything (fail-stop).
            self.fail(format!(
                "moving data from the journal: {}",
                errno_text(-res)
            ));
        }
        if let Some(slot) = self.slots[local as usize].as_mut() {
            slot.moves_inflight -= 1;
            slot.end_read();
        }
        self.advance_watermark();
    }

    /// Issues one fdatasync for every write completed since the last one.
    pub(super) fn maybe_flush(&mut self) {
        if self.flush_inflight || (self.flush_waiting.is_empty() && self.unflushed_jbs.is_empty()) {
            return;
        }
        std::mem::swap(&mut self.flush_waiting, &mut self.flush_batch);
        std::mem::swap(&mut self.unflushed_jbs, &mut self.flush_jbs);
        let sqe = (DiskIo::Fsync, UD_FLUSH);
        self.flush_inflight = true;
        self.stats.flushes += 1;
        self.io.push(sqe);
    }

    pub(super) fn flush_done(&mut self, res: i32) {
        self.flush_inflight = false;
        if res < 0 {
            self.fail(format!("fdatasync: {}", errno_text(-res)));
            for i in 0..self.flush_batch.len() {
                let id = self.flush_batch[i];
                let op = &mut self.ops[id as usize];
                op.error.get_or_insert(EngineError::Io {
                    volume: op.volume,
                    offset_bytes: op.chunk * self.g.chunk_bytes(),
                    errno_text: errno_text(-res),
                });
            }
        }
        for i in 0..self.flush_jbs.len() {
            let b = self.flush_jbs[i];
            self.jbufs[b].state = JbState::Written;
            if res >= 0 && self.failed.is_none() {
                self.floor_durable = self.floor_durable.max(self.jbufs[b].floor);
            }
        }
        self.flush_jbs.clear();
        let mut batch = std::mem::take(&mut self.flush_batch);
        for &id in batch.iter() {
            self.phase_done(id);
        }
        batch.clear();
        self.flush_batch = batch;
        self.advance_watermark();
    }

    pub(super) fn advance_watermark(&mut self) {
        while let Some(&b) = self.jorder.front() {
            let jb = &mut self.jbufs[b];
            if jb.state != JbState::Written
                || jb.unfinished_ops > 0
                || jb.moving
                || self.failed.is_some()
            {
                break;
            }
            // Blocks become durable in order: the watermark only grows.
            assert!(
                jb.seq > self.acked_through,
                "watermark going back: {} after {}",
                jb.seq,
                self.acked_through
            );
            self.acked_through = jb.seq;
            jb.state = JbState::Free;
            self.jorder.pop_front();
        }
    }
}

/// Bytes of a journal buffer's write: its record block, and the data block
/// when a small write's data goes with it.
fn journal_write_len(jb: &JournalBuf) -> usize {
    if jb.data_to.is_some() {
        jb.data_at + BLOCK_SIZE
    } else {
        BLOCK_SIZE
    }
}

impl JournalBuf {
    /// Sealed as a compact block: records and data in one 4.5 KiB write.
    pub(super) fn compact(&self) -> bool {
        self.data_to.is_some() && self.data_at == layout::JOURNAL_COMPACT_BYTES
    }

    /// The small write's data it holds (meaningful with `data_to`).
    pub(super) fn data(&self) -> &[u8] {
        &self.buf[self.data_at..self.data_at + BLOCK_SIZE]
    }
}
