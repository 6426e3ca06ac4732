//! Opening a shard: its index, then the journal replayed over the slot
//! maps (copying the data of QD1 writes from the journal where a crash
//! lost its move), then a checkpoint so nothing is replayed twice.

use super::*;

pub(super) fn read_index(
    disk: &impl Disk,
    g: &Geometry,
    shard: u32,
) -> Result<ShardStart, EngineError> {
    let per = g.slots_per_shard() as usize;
    let mut buf = AlignedBuf::new(g.index_blocks() as usize);
    let mut best: Option<(IndexHeader, Vec<SlotEntry>)> = None;
    for copy in 0..2 {
        read_at(disk, &mut buf, g.index_offset(shard, copy))?;
        let mut owners = vec![None; per];
        if let Some(h) = layout::decode_index(g.disk_uuid, shard, &buf, &mut owners) {
            if h.generation % 2 == copy
                && best.as_ref().is_none_or(|b| h.generation > b.0.generation)
            {
                best = Some((h, owners));
            }
        }
    }
    let Some((h, owners)) = best else {
        return Err(EngineError::MetadataDamaged { shard });
    };
    let tail = h.journal_tail;
    let base = owners
        .iter()
        .map(|o| {
            o.map(|(seq, _)| (seq - 1).max(tail - 1))
                .unwrap_or(tail - 1)
        })
        .collect();
    Ok(ShardStart {
        owners,
        base,
        index_generation: h.generation,
        discard_floor: h.discard_floor,
    })
}

pub(super) fn recover_shard<D: Disk>(
    disk: &Arc<D>,
    g: &Geometry,
    shard: u32,
    start: ShardStart,
    opts: &OpenOptions,
    report: &mut RebuildReport,
) -> Result<ShardInit<D>, EngineError> {
    let per = g.slots_per_shard() as usize;
    let ShardStart {
        owners,
        mut base,
        index_generation,
        mut discard_floor,
    } = start;
    let mut slots: Vec<Option<SlotState>> = (0..per).map(|_| None).collect();
    let mut maps = AlignedBuf::new(2 * g.map_blocks() as usize);
    let map_bytes = g.map_blocks() as usize * BLOCK_SIZE;
    for (local, o) in owners.iter().enumerate() {
        let Some((alloc_seq, owner)) = *o else {
            continue;
        };
        let slot_index = g.slot_of(shard, local as u64);
        read_at(&**disk, &mut maps, g.map_offset(slot_index, 0))?;
        let mut entries = vec![BlockEntry::UNWRITTEN; g.chunk_blocks as usize];
        let mut scratch = entries.clone();
        let mut gen = 0;
        let mut best_seq = None;
        for copy in 0..2 {
            let b = &maps[copy * map_bytes..(copy + 1) * map_bytes];
            if let Some(h) =
                layout::decode_map(g.disk_uuid, slot_index, g.chunk_blocks, b, &mut scratch)
            {
                let fits = h.journal_seq >= alloc_seq
                    && h.volume == owner.volume
                    && h.chunk == owner.chunk;
                if fits && h.generation >= gen && h.generation % 2 == copy as u64 {
                    gen = h.generation;
                    best_seq = Some(h.journal_seq);
                    entries.copy_from_slice(&scratch);
                }
            }
        }
        if let Some(seq) = best_seq {
            report.maps_loaded += 1;
            base[local] = base[local].max(seq);
        }
        slots[local] = Some(SlotState::new(g, owner, alloc_seq, entries, gen));
        report.chunks_found += 1;
    }

    // Journal: read the whole ring, keep valid blocks, replay in order.
    // Only record blocks are decoded: in format 2 a data block (guest data)
    // is never taken for one.
    let mut ring = AlignedBuf::new(g.journal_blocks as usize);
    read_at(&**disk, &mut ring, g.journal_block_offset(shard, 0))?;
    let block = |pos: usize| &ring[pos * BLOCK_SIZE..(pos + 1) * BLOCK_SIZE];
    let mut blocks = Vec::new();
    let mut watermark = 0;
    let seqs = g.journal_seqs();
    for i in 0..seqs {
        let pos = g.journal_position(i) as usize;
        if let Some(h) =
            layout::decode_journal_block(g.disk_uuid, shard, g.compact_journal, block(pos))
        {
            if h.seq % seqs == i {
                watermark = watermark.max(h.acked_through);
                // Where a small write's data is: after a compact block's
                // records, else in the data block after the record block.
                let data_at = if h.compact {
                    pos * BLOCK_SIZE + layout::JOURNAL_COMPACT_BYTES
                } else {
                    (pos + 1) * BLOCK_SIZE
                };
                blocks.push((h.seq, pos, h.count, data_at));
            }
        }
    }
    // Writes whose data is in the journal: (slot, logical block, physical
    // block, version, byte offset of the data in the ring).
    let mut in_journal = Vec::new();
    blocks.sort_unstable();
    let min_base = base.iter().copied().min().unwrap_or(0);
    let mut max_seq = base.iter().copied().max().unwrap_or(0);
    let mut data = AlignedBuf::new(1);
    let mut replayed_any = false;
    for &(seq, pos, count, data_at) in blocks.iter() {
        max_seq = max_seq.max(seq);
        let b = block(pos);
        // The discard floor: every valid block's records count, also those
        // the index already covers (a floor too high only makes a client
        // write again, with a newer version).
        for r in 0..count {
            if let Some(Record::Free { version, .. } | Record::Floor { version }) =
                layout::decode_record(layout::journal_record(b, r))
            {
                discard_floor = discard_floor.max(version);
            }
        }
        if seq <= min_base {
            continue;
        }
        for r in 0..count {
            let Some(rec) = layout::decode_record(layout::journal_record(b, r)) else {
                continue;
            };
            let local = match rec {
                Record::Write { slot, .. }
                | Record::Zero { slot, .. }
                | Record::Alloc { slot, .. }
                | Record::Free { slot, .. }
                | Record::Forget { slot, .. } => slot as usize,
                Record::Floor { .. } => continue,
            };
            if local >= per || g.slot_of(shard, local as u64) >= g.slot_count || seq <= base[local]
            {
                continue;
            }
            replayed_any = true;
            report.journal_records_replayed += 1;
            match rec {
                Record::Alloc { owner, .. } => {
                    let entries = vec![BlockEntry::UNWRITTEN; g.chunk_blocks as usize];
                    let gen = slots[local].as_ref().map(|s| s.map_generation).unwrap_or(0);
                    let mut s = SlotState::new(g, owner, seq, entries, gen);
                    // Its headers may not be written yet (the checkpoint
                    // after it writes them; see `Shard::alloc_slot`).
                    s.header_due = true;
                    slots[local] = Some(s);
                }
                Record::Free { .. } => slots[local] = None,
                Record::Floor { .. } => {}
                Record::Forget { first, count, .. } => {
                    let Some(s) = slots[local].as_mut() else {
                        continue;
                    };
                    let end = (first as usize + count as usize).min(s.entries.len());
                    for e in s.entries[(first as usize).min(end)..end].iter_mut() {
                        *e = BlockEntry::UNWRITTEN;
                    }
                    s.dirty = true;
                }
                Record::Write {
                    logical,
                    phys,
                    crc,
                    version,
                    in_journal: data_in_journal,
                    ..
                } => {
                    let Some(s) = slots[local].as_mut() else {
                        continue;
                    };
                    if logical as u32 >= g.chunk_blocks || phys as u32 >= g.phys_blocks() {
                        continue;
                    }
                    // An equal version in a later record is a repair
                    // (`EngineOp::Repair` rewrites a damaged block at its
                    // version; no other write journals a version it does
                    // not raise): it replaces the entry.
                    if version < s.entries[logical as usize].version {
                        continue;
                    }
                    let journal_copy = (data_in_journal && g.journal_data)
                        .then(|| &ring[data_at..data_at + BLOCK_SIZE])
                        .filter(|d| crc32c::crc32c(d) == crc);
                    if journal_copy.is_some() {
                        // Moved to `phys` below if the move did not
                        // reach the disk.
                        in_journal.push((local, logical, phys, version, data_at));
                    } else if seq > watermark || data_in_journal {
                        // Its data write may not have reached the disk
                        // (a torn pair of record and data blocks was never
                        // acknowledged; its move never started).
                        let slot_index = g.slot_of(shard, local as u64);
                        read_at(&**disk, &mut data, g.phys_offset(slot_index, phys))?;
                        if crc32c::crc32c(&data) != crc {
                            report.journal_records_dropped += 1;
                            continue;
                        }
                    }
                    s.entries[logical as usize] = BlockEntry {
                        phys,
                        kind: BlockKind::Data,
                        crc,
                        version,
                    };
                    s.dirty = true;
                }
                Record::Zero {
                    logical, version, ..
                } => {
                    let Some(s) = slots[local].as_mut() else {
                        continue;
                    };
                    if logical as u32 >= g.chunk_blocks
                        || version <= s.entries[logical as usize].version
                    {
                        continue;
                    }
                    s.entries[logical as usize] = BlockEntry::zeroed(version);
                    s.dirty = true;
                }
            }
        }
    }
    // Data still only in the journal goes to its block, where the final
    // maps name it (a later record may have replaced it, and its block may
    // hold another block's data since). The recovery checkpoint's
    // fdatasync makes these writes durable before the journal is reused.
    for &(local, logical, phys, version, data_at) in in_journal.iter() {
        let Some(s) = slots[local].as_ref() else {
            continue;
        };
        let e = s.entries[logical as usize];
        if e.kind != BlockKind::Data || e.phys != phys || e.version != version {
            continue;
        }
        let at = g.phys_offset(g.slot_of(shard, local as u64), phys);
        read_at(&**disk, &mut data, at)?;
        if crc32c::crc32c(&data) != e.crc {
            // Through the aligned buffer: a compact entry's data is only
            // 512-byte aligned in the ring.
            data.copy_from_slice(&ring[data_at..data_at + BLOCK_SIZE]);
            write_at(&**disk, &data, at)?;
            report.journal_data_moved += 1;
        }
    }
    if report.journal_data_moved > 0 {
        // Durable before the checkpoint below writes maps that skip their
        // records (a map can land without the moved data otherwise).
        sync(&**disk)?;
    }
    // Rebuild the free-block bitmaps from the final maps.
    for s in slots.iter_mut() {
        if let Some(st) = s.take() {
            let owner = st.owner;
            let mut n = SlotState::new(g, owner, st.alloc_seq, st.entries, st.map_generation);
            n.dirty = st.dirty || replayed_any;
            *s = Some(n);
        }
    }
    // Never reuse a sequence number the dead process may have written: a
    // journal block it wrote torn (not durable, some sectors landed) and
    // the new block of the same number, torn in turn by a later power cut,
    // can mix into a valid copy of the old one (the sectors past a few
    // records are zeroes in both), whose records a replay would then apply
    // (the engine simulator found a zeroing that was never acknowledged
    // come back so). Its blocks above the last valid one were all in its
    // journal buffers, so they are numbered below `max_seq + 1 +
    // JOURNAL_BUFS`; the recovery checkpoint moves the tail past them.
    let next_seq = max_seq + 1 + crate::shard::JOURNAL_BUFS as u64;
    let mut init = ShardInit {
        id: shard,
        g: *g,
        disk: disk.clone(),
        slots,
        next_seq,
        tail: next_seq,
        acked_through: next_seq - 1,
        index_generation,
        discard_floor,
        inflight_max: opts.inflight_max,
        completion_eventfd: opts.completion_eventfd,
        hugepages: opts.hugepages,
    };
    // Checkpoint now: the journal's records are all reflected in the maps
    // and index, so the next open never replays (or trusts) them again.
    checkpoint_sync(&**disk, g, &mut init)?;
    Ok(init)
}

fn checkpoint_sync<D: Disk>(
    disk: &D,
    g: &Geometry,
    init: &mut ShardInit<D>,
) -> Result<(), EngineError> {
    let cut = init.next_seq - 1;
    let mut buf = AlignedBuf::new(g.map_blocks() as usize);
    let mut entries = vec![None; g.slots_per_shard() as usize];
    for (local, s) in init.slots.iter_mut().enumerate() {
        let Some(s) = s else { continue };
        entries[local] = Some((s.alloc_seq, s.owner));
        let slot_index = g.slot_of(init.id, local as u64);
        if s.dirty {
            s.map_generation += 1;
            let h = MapHeader {
                generation: s.map_generation,
                journal_seq: cut,
                volume: s.owner.volume,
                chunk: s.owner.chunk,
            };
            layout::encode_map(g.disk_uuid, slot_index, &h, &s.entries, &mut buf);
            write_at(disk, &buf, g.map_offset(slot_index, s.map_generation % 2))?;
            s.dirty = false;
        }
    }
    sync(disk)?;
    init.index_generation += 1;
    let mut index = AlignedBuf::new(g.index_blocks() as usize);
    let h = IndexHeader {
        generation: init.index_generation,
        journal_tail: cut + 1,
        discard_floor: init.discard_floor,
    };
    layout::encode_index(g.disk_uuid, init.id, &h, &entries, &mut index);
    write_at(
        disk,
        &index,
        g.index_offset(init.id, init.index_generation % 2),
    )?;
    sync(disk)?;
    Ok(())
}
