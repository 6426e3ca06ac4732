//! Checkpoints: slot maps and headers written back so the journal can be
//! reused.

use super::*;

impl<D: Disk> Shard<D> {
    pub(super) fn maybe_checkpoint(&mut self) {
        if self.ckpt.is_none()
            && self.failed.is_none()
            && self.checkpoint_due()
            && self.acked_through >= self.tail
        {
            self.start_checkpoint();
        }
        self.pump_checkpoint();
    }

    /// Starts a checkpoint at the current watermark: every record in journal
    /// blocks up to it belongs to a finished op, so the in-memory maps hold
    /// it. Dirty maps go to their other copy, then the index moves the
    /// journal tail past the cut.
    pub(super) fn start_checkpoint(&mut self) {
        let cut = self.acked_through;
        let uuid = self.g.disk_uuid;
        let mut bufs = std::mem::take(&mut self.ckpt_spare.bufs_list);
        let mut targets = std::mem::take(&mut self.ckpt_spare.targets);
        let mut index_entries = std::mem::take(&mut self.ckpt_spare.index_entries);
        index_entries.clear();
        index_entries.resize(self.g.slots_per_shard() as usize, None);
        for (local, s) in self.slots.iter_mut().enumerate() {
            let Some(s) = s else { continue };
            if s.alloc_seq > cut {
                continue;
            }
            index_entries[local] = Some((s.alloc_seq, s.owner));
            if s.header_due {
                // Both header copies, made durable by the maps' fdatasync
                // before the index moves the journal tail past the Alloc.
                s.header_due = false;
                let slot_index = self.g.slot_of(self.id, local as u64);
                for copy in 0..2 {
                    let mut buf = AlignedBuf::new(1);
                    layout::encode_slot_header(
                        uuid,
                        slot_index,
                        s.alloc_seq,
                        Some(s.owner),
                        &mut buf,
                    );
                    targets.push(self.g.header_offset(slot_index, copy));
                    bufs.push(buf);
                }
            }
            if !s.dirty {
                continue;
            }
            s.dirty = false;
            s.map_generation += 1;
            let slot_index = self.g.slot_of(self.id, local as u64);
            let mut buf = self
                .ckpt_spare
                .maps
                .pop()
                .unwrap_or_else(|| AlignedBuf::new(self.g.map_blocks() as usize));
            let h = MapHeader {
                generation: s.map_generation,
                journal_seq: cut,
                volume: s.owner.volume,
                chunk: s.owner.chunk,
            };
            layout::encode_map(uuid, slot_index, &h, &s.entries, &mut buf);
            targets.push(self.g.map_offset(slot_index, s.map_generation % 2));
            bufs.push(buf);
        }
        let mut index = self
            .ckpt_spare
            .index
            .take()
            .unwrap_or_else(|| AlignedBuf::new(self.g.index_blocks() as usize));
        // The floor of every Free and Floor record up to the cut (raised
        // when they were appended), which the journal forgets from now on.
        let h = IndexHeader {
            generation: self.index_generation + 1,
            journal_tail: cut + 1,
            discard_floor: self.discard_floor,
        };
        layout::encode_index(uuid, self.id, &h, &index_entries, &mut index);
        self.ckpt_spare.index_entries = index_entries;
        let mut c = Checkpoint {
            cut,
            stage: CkptStage::Maps,
            pending: 0,
            bufs,
            targets,
            next: 0,
            index,
        };
        // Every move of a record up to the cut has completed (the watermark
        // waits for them), maybe not yet flushed.
        if self.moves_unflushed {
            self.moves_unflushed = false;
            c.stage = CkptStage::MovesSync;
            self.push_ckpt_fsync(&mut c);
        }
        self.ckpt = Some(c);
        self.pump_checkpoint();
    }

    /// Advances the checkpoint: map writes (as many as the completion
    /// budget allows), one fdatasync, the index write, one more fdatasync.
    /// Plain writes and two flushes, not one flush per map.
    pub(super) fn pump_checkpoint(&mut self) {
        let Some(mut c) = self.ckpt.take() else {
            return;
        };
        if c.pending == 0 {
            if self.failed.is_some() {
                // A failed shard writes no index: after a failed map flush,
                // the index would move the journal tail past records whose
                // maps never reached the disk (a failed fdatasync leaves
                // the pages clean, not durable, and the next one succeeds).
                // Skip to the end, which leaves the tail where it is.
                c.stage = CkptStage::IndexSync;
            }
            match c.stage {
                CkptStage::MovesSync => c.stage = CkptStage::Maps,
                CkptStage::Maps if c.next == c.bufs.len() => {
                    c.stage = CkptStage::MapsSync;
                    self.push_ckpt_fsync(&mut c);
                }
                CkptStage::MapsSync => {
                    c.stage = CkptStage::Index;
                    let copy = (self.index_generation + 1) % 2;
                    let sqe = (
                        write_io(
                            c.index.as_ptr(),
                            c.index.len() as u32,
                            self.g.index_offset(self.id, copy),
                            false,
                        ),
                        io_ud(UD_CKPT, 0, c.index.len()),
                    );
                    self.stats.meta_bytes_written += c.index.len() as u64;
                    self.io.push(sqe);
                    c.pending += 1;
                }
                CkptStage::Index => {
                    c.stage = CkptStage::IndexSync;
                    self.push_ckpt_fsync(&mut c);
                }
                CkptStage::IndexSync => {
                    // Durable: the journal up to the cut may be reused.
                    if self.failed.is_none() {
                        // The tail moves forward only, and never past a
                        // record not yet covered by the maps just written.
                        assert!(
                            c.cut + 1 >= self.tail && c.cut <= self.acked_through,
                            "checkpoint cut {} with tail {} and watermark {}",
                            c.cut,
                            self.tail,
                            self.acked_through
                        );
                        self.tail = c.cut + 1;
                        self.index_generation += 1;
                        self.stats.checkpoints += 1;
                    }
                    let spare = &mut self.ckpt_spare;
                    // Map buffers are kept for the next checkpoint; header
                    // ones (one block) are not.
                    let map_bytes = self.g.map_blocks() as usize * BLOCK_SIZE;
                    c.bufs.retain(|b| b.len() == map_bytes);
                    spare.maps.append(&mut c.bufs);
                    spare.bufs_list = c.bufs;
                    c.targets.clear();
                    spare.targets = c.targets;
                    spare.index = Some(c.index);
                    return;
                }
                CkptStage::Maps => {}
            }
        }
        while c.stage == CkptStage::Maps
            && self.failed.is_none()
            && c.next < c.bufs.len()
            && c.pending < CKPT_WRITES_INFLIGHT_MAX
            && self.sqe_room(1)
        {
            let buf = &c.bufs[c.next];
            let sqe = (
                write_io(buf.as_ptr(), buf.len() as u32, c.targets[c.next], false),
                io_ud(UD_CKPT, 0, buf.len()),
            );
            self.stats.meta_bytes_written += buf.len() as u64;
            self.io.push(sqe);
            c.pending += 1;
            c.next += 1;
        }
        if c.stage == CkptStage::Maps && c.next == c.bufs.len() && c.pending == 0 {
            // No dirty map at all: go straight on.
            self.ckpt = Some(c);
            return self.pump_checkpoint();
        }
        self.ckpt = Some(c);
    }

    pub(super) fn push_ckpt_fsync(&mut self, c: &mut Checkpoint) {
        let sqe = (DiskIo::Fsync, UD_CKPT);
        self.io.push(sqe);
        c.pending += 1;
    }

    pub(super) fn checkpoint_io_done(&mut self, res: i32) {
        if res < 0 {
            self.fail(format!("checkpoint write: {}", errno_text(-res)));
        }
        let Some(c) = self.ckpt.as_mut() else { return };
        c.pending -= 1;
        if c.pending == 0 {
            self.pump_checkpoint();
        }
    }
}
