//! Reads: a volume's own chunk, or through the layers under it (snapshots
//! and clones), with the crc of every block checked.

use super::*;

impl<D: Disk> Shard<D> {
    pub(super) fn start_read(&mut self, id: u32) {
        if !self.ops[id as usize].chain.is_empty() {
            return self.start_layered_read(id);
        }
        let (volume, chunk) = (self.ops[id as usize].volume, self.ops[id as usize].chunk);
        let Some(local) = self.by_chunk.get(&(volume, chunk)).copied() else {
            // Never written (or released): zeroes.
            let op = &mut self.ops[id as usize];
            zero_fill(op, 0, op.count as usize * BLOCK_SIZE);
            op.applied = op.count as u32;
            return self.finish(id);
        };
        if !self.sqe_room(self.ops[id as usize].count as u32)
            || self.slots[local as usize]
                .as_ref()
                .is_some_and(|s| s.releasing.is_some())
        {
            return self.defer(id);
        }
        let slot_index = self.g.slot_of(self.id, local as u64);
        let slot = self.slots[local as usize]
            .as_mut()
            .expect("indexed slot exists");
        // Blocks whose data is still moving from the journal are not on
        // their physical block yet: they come from the journal buffer.
        let moving = slot.moving();
        let jbufs = &self.jbufs;
        let op = &mut self.ops[id as usize];
        op.plan.clear();
        op.iov.clear();
        for i in 0..op.count {
            let e = slot.entries[(op.first + i) as usize];
            let action = match e.kind {
                BlockKind::Data if moving && moving_data(jbufs, local, e.phys).is_some() => {
                    Action::ReadMoving
                }
                BlockKind::Data => Action::ReadData,
                _ => Action::ReadZero,
            };
            op.plan.push(Planned {
                logical: op.first + i,
                phys: e.phys,
                crc: e.crc,
                action,
                layer: 0,
                version: 0,
            });
        }
        let mut i = 0;
        while i < op.plan.len() {
            let p = op.plan[i];
            if p.action == Action::ReadZero {
                zero_fill(op, i * BLOCK_SIZE, BLOCK_SIZE);
                i += 1;
                continue;
            }
            if p.action == Action::ReadMoving {
                let src = moving_data(jbufs, local, p.phys).expect("planned as moving");
                copy_to_op(op, i * BLOCK_SIZE, src);
                i += 1;
                continue;
            }
            let j = run_end(&op.plan, i, Action::ReadData);
            let offset = self.g.phys_offset(slot_index, p.phys);
            let (at, len) = (i * BLOCK_SIZE, (j - i) * BLOCK_SIZE);
            self.io.push_op_data(op, id, false, at, len, offset, false);
            i = j;
        }
        if op.pending == 0 {
            // Every block came from a journal buffer: checked as one read
            // from the disk is (the crc stored may be the client's).
            self.check_read_crcs(id);
            let op = &mut self.ops[id as usize];
            if op.error.is_none() {
                op.applied = op.count as u32;
            }
            return self.finish(id);
        }
        slot.reads_inflight += 1;
        op.stage = Stage::Running;
        self.bind_slot(id, local);
    }

    /// A read through layers (`EngineRequest::chain`): each block comes
    /// from the first layer that holds it. Runs are contiguous physical
    /// blocks of one slot; every slot read is held (`reads_inflight`) until
    /// the read is done, so none of its blocks is reused under it.
    pub(super) fn start_layered_read(&mut self, id: u32) {
        let chunk = self.ops[id as usize].chunk;
        let layers = 1 + self.ops[id as usize].chain.len();
        let mut slots = std::mem::take(&mut self.ops[id as usize].layer_slots);
        slots.clear();
        for l in 0..layers {
            let key = if l == 0 {
                self.ops[id as usize].volume
            } else {
                self.ops[id as usize].chain[l - 1]
            };
            slots.push(
                self.by_chunk
                    .get(&(key, chunk))
                    .copied()
                    .unwrap_or(u32::MAX),
            );
        }
        let busy = slots.iter().any(|&l| {
            l != u32::MAX
                && self.slots[l as usize]
                    .as_ref()
                    .is_some_and(|s| s.releasing.is_some() || s.freeing || s.moving())
        });
        if busy || !self.sqe_room(self.ops[id as usize].count as u32) {
            slots.clear();
            self.ops[id as usize].layer_slots = slots;
            return self.defer(id);
        }
        let op = &mut self.ops[id as usize];
        op.plan.clear();
        op.iov.clear();
        for i in 0..op.count {
            let logical = op.first + i;
            let mut planned = Planned {
                logical,
                phys: PHYS_NONE,
                crc: 0,
                action: Action::ReadZero,
                layer: 0,
                version: 0,
            };
            for (l, &local) in slots.iter().enumerate() {
                let Some(slot) = self.slots.get(local as usize).and_then(|s| s.as_ref()) else {
                    continue;
                };
                let e = slot.entries[logical as usize];
                match e.kind {
                    BlockKind::Unwritten => continue,
                    BlockKind::Zero => {}
                    BlockKind::Data => {
                        planned.phys = e.phys;
                        planned.crc = e.crc;
                        planned.action = Action::ReadData;
                    }
                }
                planned.layer = l as u8;
                break;
            }
            op.plan.push(planned);
        }
        let mut i = 0;
        while i < op.plan.len() {
            let p = op.plan[i];
            if p.action == Action::ReadZero {
                zero_fill(op, i * BLOCK_SIZE, BLOCK_SIZE);
                i += 1;
                continue;
            }
            let j = run_end(&op.plan, i, Action::ReadData);
            let slot_index = self.g.slot_of(self.id, slots[p.layer as usize] as u64);
            let offset = self.g.phys_offset(slot_index, p.phys);
            let (at, len) = (i * BLOCK_SIZE, (j - i) * BLOCK_SIZE);
            self.io.push_op_data(op, id, false, at, len, offset, false);
            i = j;
        }
        if op.pending == 0 {
            slots.clear();
            op.layer_slots = slots;
            op.applied = op.count as u32;
            return self.finish(id);
        }
        for &local in slots.iter() {
            if let Some(slot) = self.slots.get_mut(local as usize).and_then(|s| s.as_mut()) {
                slot.reads_inflight += 1;
                slot.ops_inflight += 1;
            }
        }
        let op = &mut self.ops[id as usize];
        op.layer_slots = slots;
        op.stage = Stage::Running;
    }

    /// Lets go of the slots a layered read (or a merge from a lower layer)
    /// held; frees their blocks released meanwhile.
    pub(super) fn release_layer_slots(&mut self, id: u32) {
        let slots = std::mem::take(&mut self.ops[id as usize].layer_slots);
        for &local in slots.iter() {
            if let Some(slot) = self.slots.get_mut(local as usize).and_then(|s| s.as_mut()) {
                slot.end_read();
                slot.ops_inflight = slot.ops_inflight.saturating_sub(1);
            }
        }
        let mut slots = slots;
        slots.clear();
        self.ops[id as usize].layer_slots = slots;
    }

    pub(super) fn read_done(&mut self, id: u32) {
        let local = self.ops[id as usize].local_slot;
        let layered = !self.ops[id as usize].layer_slots.is_empty();
        self.check_read_crcs(id);
        let op = &mut self.ops[id as usize];
        if op.error.is_none() {
            op.applied = op.count as u32;
        }
        if layered {
            self.release_layer_slots(id);
            return self.finish(id);
        }
        if let Some(slot) = self.slots.get_mut(local as usize).and_then(|s| s.as_mut()) {
            slot.end_read();
        }
        self.finish(id);
    }

    /// Sets the read's error if a block it read (from the disk or from a
    /// journal buffer) does not match its crc.
    fn check_read_crcs(&mut self, id: u32) {
        let op = &mut self.ops[id as usize];
        if op.error.is_some() {
            return;
        }
        for (i, p) in op.plan.iter().enumerate() {
            let read = matches!(p.action, Action::ReadData | Action::ReadMoving);
            if read && crc_of(&op.segs, i * BLOCK_SIZE) != p.crc {
                let offset_bytes =
                    op.chunk * self.g.chunk_bytes() + p.logical as u64 * BLOCK_SIZE_U64;
                // The layer the bad block is in (a lower one for a read
                // through layers).
                let volume = match p.layer {
                    0 => op.volume,
                    l => op.chain[l as usize - 1],
                };
                tracing::error!(
                    volume,
                    offset_bytes,
                    shard = self.id,
                    "checksum mismatch on read: data not returned"
                );
                op.error = Some(EngineError::Checksum {
                    volume,
                    offset_bytes,
                });
                return;
            }
        }
    }
}

/// The data of physical block `phys` of slot `local` while it moves from
/// the journal (queued or in flight): the journal buffer's data block.
pub(super) fn moving_data(jbufs: &[JournalBuf], local: u32, phys: u16) -> Option<&[u8]> {
    jbufs
        .iter()
        .find(|jb| jb.moving && jb.data_to.is_some_and(|(l, _, p)| l == local && p == phys))
        .map(|jb| jb.data())
}

/// Copies one block into the request's buffers at byte `at`.
fn copy_to_op(op: &mut Op, at: usize, src: &[u8]) {
    let mut from = 0;
    for_each_piece(&op.segs, at, src.len(), |addr, take| {
        // SAFETY: the submit contract keeps the segment valid for writes;
        // `from + take <= src.len()`.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(from), addr, take) };
        from += take;
    });
}
