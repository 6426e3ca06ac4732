//! `Fill`: copying into a volume's head the blocks it reads from the
//! layers under it (flatten), idempotent and version-checked.

use super::*;

impl<D: Disk> Shard<D> {
    /// `EngineOp::Fill`, read stage: picks the blocks to copy (the layer
    /// has no entry and no write planned for them; the first lower layer
    /// holding them holds data) and reads them into the request's segments,
    /// holding the lower slots (`layer_slots`) while reading. The write
    /// stage (`fill_phase`) follows in `fill_read_done`.
    pub(super) fn start_fill(&mut self, id: u32) {
        if self.ops[id as usize].merged {
            return self.fill_phase(id);
        }
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
        op.fill.clear();
        op.iov.clear();
        let head = self.slots.get(slots[0] as usize).and_then(|s| s.as_ref());
        for k in 0..op.count {
            let logical = op.first + k;
            let l = logical as usize;
            if head.is_some_and(|h| {
                h.entries[l].kind != BlockKind::Unwritten || h.planned_version[l] != 0
            }) {
                // Written, zeroed or being written: the layer's own.
                continue;
            }
            for (layer, &local) in slots.iter().enumerate().skip(1) {
                let Some(slot) = self.slots.get(local as usize).and_then(|s| s.as_ref()) else {
                    continue;
                };
                let e = slot.entries[l];
                match e.kind {
                    BlockKind::Unwritten => continue,
                    // Reads as zeroes through the chain and without it.
                    BlockKind::Zero => {}
                    BlockKind::Data => op.fill.push(Planned {
                        logical,
                        phys: e.phys,
                        crc: e.crc,
                        action: Action::ReadData,
                        layer: layer as u8,
                        version: e.version,
                    }),
                }
                break;
            }
        }
        if op.fill.is_empty() {
            slots.clear();
            op.layer_slots = slots;
            return self.finish(id);
        }
        // One read per run of blocks consecutive in the chunk and on disk,
        // in one layer, each into its place in the segments.
        let mut i = 0;
        while i < op.fill.len() {
            let p = op.fill[i];
            let mut j = i + 1;
            while j < op.fill.len()
                && op.fill[j].layer == p.layer
                && op.fill[j].logical as usize == p.logical as usize + (j - i)
                && op.fill[j].phys as usize == p.phys as usize + (j - i)
            {
                j += 1;
            }
            let slot_index = self.g.slot_of(self.id, slots[p.layer as usize] as u64);
            let offset = self.g.phys_offset(slot_index, p.phys);
            let at = (p.logical - op.first) as usize * BLOCK_SIZE;
            let len = (j - i) * BLOCK_SIZE;
            self.io.push_op_data(op, id, false, at, len, offset, false);
            i = j;
        }
        // The layer itself is not read: only the lower slots are held.
        slots[0] = u32::MAX;
        for &local in slots.iter() {
            if let Some(slot) = self.slots.get_mut(local as usize).and_then(|s| s.as_mut()) {
                slot.reads_inflight += 1;
                slot.ops_inflight += 1;
            }
        }
        let op = &mut self.ops[id as usize];
        op.layer_slots = slots;
        op.stage = Stage::Filling;
    }

    /// A fill's reads are back: check each block's crc, then write.
    pub(super) fn fill_read_done(&mut self, id: u32) {
        self.release_layer_slots(id);
        let chunk_bytes = self.g.chunk_bytes();
        let op = &mut self.ops[id as usize];
        op.stage = Stage::Idle;
        if op.error.is_none() {
            for p in op.fill.iter() {
                if crc_of(&op.segs, (p.logical - op.first) as usize * BLOCK_SIZE) != p.crc {
                    let volume = op.chain[p.layer as usize - 1];
                    let offset_bytes = op.chunk * chunk_bytes + p.logical as u64 * BLOCK_SIZE_U64;
                    tracing::error!(
                        volume,
                        offset_bytes,
                        shard = self.id,
                        "checksum mismatch on the read of a fill: not copied"
                    );
                    op.error = Some(EngineError::Checksum {
                        volume,
                        offset_bytes,
                    });
                    break;
                }
            }
        }
        if op.error.is_some() {
            return self.finish(id);
        }
        op.merged = true;
        op.cursor = 0;
        self.fill_phase(id);
    }

    /// Whether the blocks of a fill not yet planned still come from what
    /// it read: the same lower layer, holding data at the same version (a
    /// layer under a head is frozen, but a write of the snapshot's cut, a
    /// repair or a release may still reach it).
    pub(super) fn fill_sources_unchanged(&self, id: u32) -> bool {
        let op = &self.ops[id as usize];
        op.fill[op.cursor as usize..].iter().all(|p| {
            let l = p.logical as usize;
            for (k, &key) in op.chain.iter().enumerate() {
                let Some(e) = self
                    .by_chunk
                    .get(&(key, op.chunk))
                    .and_then(|&local| self.slots[local as usize].as_ref())
                    .map(|s| s.entries[l])
                else {
                    continue;
                };
                if e.kind == BlockKind::Unwritten {
                    continue;
                }
                return k + 1 == p.layer as usize
                    && e.kind == BlockKind::Data
                    && e.version == p.version;
            }
            false
        })
    }

    /// A fill's write stage: one phase of the blocks read (as many as the
    /// free physical blocks and the journal allow), each written only if
    /// the layer still has no entry and no write planned for it; a block a
    /// sector write holds is waited for. Allocates the layer's slot first
    /// if it has none.
    pub(super) fn fill_phase(&mut self, id: u32) {
        if !self.fill_sources_unchanged(id) {
            // Read again (blocks copied meanwhile are the layer's now).
            let op = &mut self.ops[id as usize];
            op.merged = false;
            op.cursor = 0;
            op.fill.clear();
            return self.start_fill(id);
        }
        let (volume, chunk, epoch) = {
            let op = &self.ops[id as usize];
            (op.volume, op.chunk, op.epoch)
        };
        let local = match self.by_chunk.get(&(volume, chunk)).copied() {
            Some(local) => {
                let slot = self.slots[local as usize]
                    .as_ref()
                    .expect("indexed slot exists");
                let started = self.ops[id as usize].local_slot == local;
                if slot.freeing || (slot.releasing.is_some() && !started) {
                    return self.defer(id);
                }
                local
            }
            None => match self.alloc_slot(id, volume, chunk, epoch) {
                Some(local) => local,
                None => return,
            },
        };
        self.bind_slot(id, local);
        let remaining = {
            let op = &self.ops[id as usize];
            op.fill.len() - op.cursor as usize
        };
        if !self.journal_room(remaining.min(self.g.spare_blocks as usize + 1) + 1)
            || !self.sqe_room(RUNS_PER_PHASE_MAX)
        {
            return self.defer(id);
        }
        let slot_index = self.g.slot_of(self.id, local as u64);
        let op = &mut self.ops[id as usize];
        let slot = self.slots[local as usize]
            .as_mut()
            .expect("slot of running op");
        op.plan.clear();
        op.iov.clear();
        let mut last: Option<(u16, u16)> = None;
        let mut runs = 0;
        while (op.cursor as usize) < op.fill.len() {
            let f = op.fill[op.cursor as usize];
            let l = f.logical as usize;
            if slot.entries[l].kind != BlockKind::Unwritten || slot.planned_version[l] != 0 {
                // A write got there first: it is the layer's own.
                op.cursor += 1;
                last = None;
                continue;
            }
            if slot.is_held(f.logical) {
                // A sector write is merging it: wait, then look again.
                break;
            }
            let next = last
                .filter(|&(logical, _)| logical + 1 == f.logical)
                .map(|(_, p)| p as usize + 1)
                .filter(|&p| slot.is_free(p))
                .map(|p| p as u16);
            if next.is_none() && last.is_some() {
                runs += 1;
                if runs >= RUNS_PER_PHASE_MAX {
                    break;
                }
            }
            let Some(phys) = next.or_else(|| slot.find_free()) else {
                break;
            };
            slot.take_phys(phys);
            last = Some((f.logical, phys));
            slot.planned_version[l] = f.version;
            op.plan.push(Planned {
                logical: f.logical,
                phys,
                crc: f.crc,
                action: Action::Write,
                layer: 0,
                version: f.version,
            });
            op.cursor += 1;
            if op.plan.len() > self.g.spare_blocks as usize {
                break;
            }
        }
        if op.plan.is_empty() && (op.cursor as usize) < op.fill.len() && op.pending == 0 {
            // Held by a sector write, or no free physical block yet.
            return self.defer(id);
        }
        op.stage = Stage::Running;
        for i in 0..self.ops[id as usize].plan.len() {
            let p = self.ops[id as usize].plan[i];
            self.append_record(
                id,
                &Record::Write {
                    slot: local,
                    logical: p.logical,
                    phys: p.phys,
                    crc: p.crc,
                    version: p.version,
                    in_journal: false,
                },
            );
        }
        // Never solo: it waits for the flush, which covers an Alloc block
        // already written; one still being written it waits for here.
        self.wait_for_alloc(id, local);
        // One data write per run consecutive in the chunk and on disk.
        let op = &mut self.ops[id as usize];
        let n = op.plan.len();
        let mut i = 0;
        while i < n {
            let p = op.plan[i];
            let mut j = i + 1;
            while j < n
                && op.plan[j].logical as usize == p.logical as usize + (j - i)
                && op.plan[j].phys as usize == p.phys as usize + (j - i)
            {
                j += 1;
            }
            let offset = self.g.phys_offset(slot_index, p.phys);
            let at = (p.logical - op.first) as usize * BLOCK_SIZE;
            let len = (j - i) * BLOCK_SIZE;
            self.io.push_op_data(op, id, true, at, len, offset, false);
            self.stats.data_bytes_written += len as u64;
            i = j;
        }
        if self.ops[id as usize].pending == 0 {
            // Nothing left to write: no I/O to wait for.
            self.phase_done(id);
        }
    }
}
