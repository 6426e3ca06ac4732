//! Client requests: reads and mutations handed to the engine, their
//! completions and answers, block states and chunk lists.

use super::*;

impl<D: Disk, N: Net> ShardLoop<D, N> {
    pub(super) fn take_op(&mut self, c: usize, h: &Header, kind: OpKind, bytes: usize) -> usize {
        let id = self.free_ops.pop().expect("caller checked free ops");
        let conn_gen = match self.conns[c].as_mut() {
            Some(x) => {
                x.ops += 1;
                x.gen
            }
            None => 0,
        };
        let op = &mut self.ops[id];
        op.busy = true;
        op.gen = next_op_gen(op.gen);
        op.kind = kind;
        op.conn = c;
        op.conn_gen = conn_gen;
        op.req = *h;
        if op.buf.len() < bytes {
            if op.buf.len() > OP_LARGE_BYTES {
                self.large_kept -= op.buf.len();
            }
            op.buf = AlignedBuf::new(bytes.div_ceil(BLOCK_SIZE));
            if op.buf.len() > OP_LARGE_BYTES {
                self.large_kept += op.buf.len();
            }
        }
        if bytes > OP_LARGE_BYTES {
            self.large_inflight += bytes;
        }
        op.len = bytes;
        op.pending = 0;
        op.status = Status::Ok;
        op.nforwards = 0;
        op.deadline = None;
        op.started = self.net.now();
        op.newer = 0;
        op.copied = 0;
        id
    }

    pub(super) fn start_read(&mut self, c: usize, h: &Header, kind: OpKind) {
        let (p, in_sync, _) = match self.check_route(h) {
            Ok(x) => x,
            Err(s) => return self.reject(c, h, s),
        };
        if !in_sync {
            return self.reject(c, h, Status::NotInSync);
        }
        let len = h.length as usize;
        let _ = p;
        // Reads may address 512-byte sectors: the engine reads the whole
        // blocks around them and the response carries the range.
        let at = (h.offset % BLOCK_SIZE as u64) as usize;
        if kind == OpKind::Read
            && (!h.offset.is_multiple_of(SECTOR_BYTES)
                || !(len as u64).is_multiple_of(SECTOR_BYTES))
        {
            return self.reject(c, h, Status::Invalid);
        }
        let (table_bytes, total) = match kind {
            OpKind::BackfillServe => {
                if h.length as u64 > BACKFILL_PIECE_BYTES {
                    return self.reject(c, h, Status::Invalid);
                }
                // Writes of older epochs still in flight could land after
                // the snapshot below without reaching the new member.
                if self.older_writes_in_flight(h.epoch) {
                    return self.reject(c, h, Status::Busy);
                }
                if h.flags == FLAG_STATES_ONLY {
                    return self.serve_states(c, h);
                }
                let tb = payload::state_table_bytes(len / BLOCK_SIZE);
                (tb, tb + len)
            }
            _ => (0, (at + len).next_multiple_of(BLOCK_SIZE)),
        };
        let id = self.take_op(c, h, kind, total);
        let (at, len) = if kind == OpKind::Read {
            (at, total)
        } else {
            (0, len)
        };
        self.ops[id].at = at;
        if kind == OpKind::BackfillServe {
            let blocks = len / BLOCK_SIZE;
            let mut states = vec![(BlockKind::Unwritten, 0u64); blocks];
            self.engine.block_states(h.volume, h.offset, &mut states);
            payload::encode_state_table(
                states
                    .iter()
                    .map(|&(kind, version)| (wire_kind(kind), version)),
                &mut self.ops[id].buf[..table_bytes],
            );
        }
        let seg = Segment {
            // SAFETY: in bounds of the op's buffer (at least `total` bytes).
            addr: unsafe { self.ops[id].buf.as_mut_ptr().add(table_bytes) },
            len,
        };
        self.ops[id].pending = 1;
        let target = if kind == OpKind::Read {
            self.read_target(h)
        } else {
            // A peer's backfill or scrub names an engine key.
            Ok(layers::Target::plain(h.volume))
        };
        let target = match target {
            Ok(t) => t,
            Err(s) => {
                self.ops[id].pending = 0;
                self.ops[id].status = s;
                return self.finish_op(id);
            }
        };
        let req = EngineRequest {
            op: EngineOp::Read,
            volume: target.key,
            offset_bytes: h.offset - at as u64,
            len_bytes: len as u64,
            segments: &[seg],
            version: 0,
            epoch: h.epoch,
            tag: id as u64,
            chain: target.chain(),
            block_crc: None,
        };
        // SAFETY: the op's buffer lives in the slab until the op finishes.
        self.ops[id].engine_at = self.net.now();
        if let Err(e) = unsafe { self.engine.submit(&req) } {
            self.ops[id].pending = 0;
            self.ops[id].status = engine_status(&e);
            self.finish_op(id);
        }
    }

    pub(super) fn start_mutation(&mut self, c: usize, f: &Frame) {
        let h = f.header;
        let has_data = matches!(h.op, Op::Write | Op::WritePrimary);
        if has_data && h.payload_bytes != h.length {
            return self.reject(c, &h, Status::Invalid);
        }
        if !has_data && h.payload_bytes != 0 {
            return self.reject(c, &h, Status::Invalid);
        }
        // Whole blocks, or a sector write (merged by the engine).
        let (offset, len) = (h.offset, h.length as u64);
        let block = BLOCK_SIZE as u64;
        let aligned = offset.is_multiple_of(block) && len.is_multiple_of(block);
        let sectors_ok = h.op == Op::Write
            && !aligned
            && offset.is_multiple_of(SECTOR_BYTES)
            && len.is_multiple_of(SECTOR_BYTES)
            && offset % block + len <= block;
        let valid = match h.flags {
            0 => aligned,
            FLAG_SECTORS => sectors_ok,
            _ => false,
        };
        if !valid {
            return self.reject(c, &h, Status::Invalid);
        }
        let (p, in_sync, primary) = match self.check_route(&h) {
            Ok(x) => x,
            Err(s) => return self.reject(c, &h, s),
        };
        if h.op == Op::WritePrimary && !primary {
            return self.reject(c, &h, Status::NotReplica);
        }
        // Fewer members take writes than a write must reach (the others
        // down): the client waits for a member back or a stand-in.
        if let Some(t) = self.table() {
            if t.partition(p).map_or(0, |r| r.writers().count()) < t.min_copies() {
                return self.reject(c, &h, Status::Unavailable);
            }
        }
        // The header's generation is the capability's (checked in
        // `authorize`; a node forwards the writer's): a newer one than ours
        // means the volume was taken over and the push has not come yet.
        let fence = self.fence_of(h.volume);
        if h.fence < fence && self.fence_check {
            return self.reject(c, &h, Status::Fenced);
        }
        if h.fence > fence {
            self.fences.insert(h.volume, h.fence);
        }
        if h.version == 0 {
            return self.reject(c, &h, Status::Invalid);
        }
        // The era the write names: the head, the one a snapshot being cut
        // froze (applied there, then answered StaleSnapshot), or refused.
        let target = match self.write_target(&h) {
            Ok(t) => t,
            Err(s) => return self.reject(c, &h, s),
        };
        if !in_sync && (self.join_pending(p) || self.catch_up_unanswered(p)) {
            // Releasing what this member held of the partition before it
            // joined (a write now would be released with it), or back from
            // down and not yet told by its source whether it recorded what
            // this member missed (if not, the member releases what it held
            // and copies the partition whole).
            return self.reject(c, &h, Status::Busy);
        }
        if h.flags == FLAG_SECTORS && !in_sync && self.copy_pending(p, target.key, h.offset) {
            // A sector write merges into the block held here, which this
            // member's backfill has yet to bring up to date: the merged
            // block would carry the write's version over stale sectors,
            // and the copy would then skip it as not newer. Wait for the
            // copy (the client sends it again).
            return self.reject(c, &h, Status::Busy);
        }
        if version_clock(h.version) > clock_limit_at(self.net.unix_ms()) {
            // Far ahead of our clock: a wrong clock or a hostile writer. It
            // would make every later write of the block lose.
            return self.reject(c, &h, Status::VersionAhead);
        }
        if let Some((floor, until)) = self.restart_floor {
            if self.woke_at >= until {
                self.restart_floor = None;
            } else if h.version <= floor {
                // Sent before this node restarted, maybe older than a
                // discard applied here before it (whose version is gone
                // from memory): refused, the writer sends it again with a
                // newer version, to every replica.
                let named = floor.max(h.version.saturating_add(1));
                return self.respond_naming(c, &h, Status::OlderVersion, named, &[]);
            }
        }
        if !in_sync {
            self.note_took_write(target.key, h.offset, h.length as u64);
        }
        let v = self.versions.entry(h.volume).or_default();
        *v = (*v).max(h.version);
        if !self.catch_ups.is_empty() {
            // The engine key: what a backfill lists and reads.
            self.catch_up_record(p, target.key, h.offset, h.length as u64);
        }
        let kind = if h.op == Op::WritePrimary {
            OpKind::Primary
        } else {
            OpKind::Mutate
        };
        let len = h.length as usize;
        let id = self.take_op(c, &h, kind, if has_data { len } else { 0 });
        if has_data {
            let conn = self.conns[c].as_mut().expect("live connection");
            conn.payload_into(f, &mut self.ops[id].buf);
        }
        let seg = Segment {
            addr: self.ops[id].buf.as_mut_ptr(),
            len,
        };
        let segs = [seg];
        let req = EngineRequest {
            op: match h.op {
                Op::WriteZeroes => EngineOp::WriteZeroes,
                Op::Discard => EngineOp::Discard,
                _ => EngineOp::Write,
            },
            volume: target.key,
            offset_bytes: h.offset,
            len_bytes: len as u64,
            segments: if has_data { &segs } else { &[] },
            version: h.version,
            epoch: h.epoch,
            tag: id as u64,
            chain: target.chain(),
            // The frame's crc, verified on receipt, is the block's when the
            // payload is one whole block: the client's checksum is stored.
            block_crc: has_data.then_some(h.payload_crc),
        };
        self.ops[id].pending = 1;
        if target.stale {
            // Lands in the snapshot being cut; the writer writes it again
            // into the new head (engine errors no longer matter to it).
            self.ops[id].status = Status::StaleSnapshot;
        }
        // SAFETY: the op's buffer lives in the slab until the op finishes.
        self.ops[id].engine_at = self.net.now();
        if let Err(e) = unsafe { self.engine.submit(&req) } {
            self.ops[id].pending = 0;
            self.ops[id].status = engine_status(&e);
            if matches!(e, EngineError::Io { .. }) {
                // The engine shard failed earlier (see engine_done).
                self.shared
                    .report_failure(format!("engine shard {}: {e}", self.id));
                self.ops[id].status = Status::Unavailable;
            }
            return self.finish_op(id);
        }
        if kind == OpKind::Primary {
            self.forward(id, p);
        }
    }

    pub(super) fn engine_poll(&mut self) -> bool {
        // The closure cannot borrow self: collect into a reused vector first.
        let mut completions = std::mem::take(&mut self.completions);
        self.engine.poll(&mut |c| completions.push(c));
        let n = completions.len();
        for c in completions.drain(..) {
            self.engine_done(c);
        }
        self.completions = completions;
        n > 0
    }

    pub(super) fn engine_done(&mut self, c: Completion) {
        if c.tag >= TAG_REPAIR {
            return self.repair_done(c);
        }
        if c.tag >= TAG_BACKFILL {
            return self.backfill_write_done(c);
        }
        if c.tag >= TAG_PURGE {
            if c.tag == TAG_JOIN_RELEASE {
                self.join_inflight -= 1;
            }
            self.purging -= 1;
            if let Err(e) = c.result {
                tracing::warn!(shard = self.id, "releasing a chunk: {e}");
            }
            return;
        }
        if c.tag >= TAG_SCRUB {
            return self.scrub_done(c);
        }
        let id = c.tag as usize;
        if let Err(e @ EngineError::Io { .. }) = &c.result {
            // The device failed (EIO, ENOSPC, a short transfer): this node
            // cannot keep its copies; its partitions must move. A write is
            // answered Unavailable, so the client waits for the new route
            // instead of failing; a read goes to the next member anyway.
            self.shared
                .report_failure(format!("engine shard {}: {e}", self.id));
            if matches!(
                self.ops[id].kind,
                OpKind::Mutate | OpKind::Primary | OpKind::Fill
            ) && self.ops[id].status == Status::Ok
            {
                self.ops[id].status = Status::Unavailable;
            }
        }
        if matches!(
            self.ops[id].kind,
            OpKind::Read | OpKind::Mutate | OpKind::Primary
        ) {
            let op = &self.ops[id];
            self.counters
                .record_engine(op.req.op, op.engine_at.elapsed());
        }
        if let (Ok(n), OpKind::Fill) = (&c.result, self.ops[id].kind) {
            self.ops[id].copied = *n;
        }
        if c.newer_version > 0 && matches!(self.ops[id].kind, OpKind::Mutate | OpKind::Primary) {
            // Not applied (or not whole): the block holds a newer version.
            // Refused, never acknowledged: the writer retries with a newer one.
            let op = &mut self.ops[id];
            op.newer = op.newer.max(c.newer_version);
            if op.status == Status::Ok {
                op.status = Status::OlderVersion;
            }
        }
        if let Err(EngineError::Checksum {
            volume,
            offset_bytes,
        }) = &c.result
        {
            // Our copy is damaged: the reader goes to another member; the
            // block is rewritten from one in the background.
            self.queue_repair(*volume, *offset_bytes);
        }
        if let Err(e) = &c.result {
            tracing::warn!(shard = self.id, "engine: {e}");
            let s = engine_status(e);
            if self.ops[id].status == Status::Ok {
                self.ops[id].status = s;
            }
        }
        self.ops[id].pending -= 1;
        if self.ops[id].pending == 0 {
            self.finish_op(id);
        }
    }

    pub(super) fn finish_op(&mut self, id: usize) {
        let (c, conn_gen, req, status, kind, len, started) = {
            let op = &self.ops[id];
            (
                op.conn,
                op.conn_gen,
                op.req,
                op.status,
                op.kind,
                op.len,
                op.started,
            )
        };
        self.counters
            .record(req.op, status, req.length as u64, started.elapsed());
        let live = self.conns[c].as_ref().is_some_and(|x| x.gen == conn_gen);
        if live {
            let mut h = Header::response_to(&req, status);
            h.version = if status == Status::OlderVersion {
                self.ops[id].newer
            } else {
                self.volume_version(req.volume)
            };
            h.snapshot = self.head_era(req.volume);
            if let Some(conn) = self.conns[c].as_mut() {
                conn.ops -= 1;
                if conn.ops + 1 == CONN_OPS_MAX && !self.backlog.contains(&c) {
                    // It may have frames waiting for an op of its own.
                    self.backlog.push(c);
                }
            }
            let conn = self.conns[c].as_mut().expect("live");
            let op = &self.ops[id];
            if status == Status::Ok && kind == OpKind::Read {
                conn.queue(h, &[&op.buf[op.at..op.at + req.length as usize]]);
            } else if status == Status::Ok && kind == OpKind::BackfillServe {
                conn.queue(h, &[&op.buf[..len]]);
            } else if status == Status::Ok && kind == OpKind::Fill {
                conn.queue(h, &[&payload::encode_fill_answer(op.copied)]);
            } else if status == Status::StaleEpoch {
                let enc = self
                    .route
                    .as_ref()
                    .map(|r| r.encoded.as_slice())
                    .unwrap_or(&[]);
                conn.queue(h, &[enc]);
            } else {
                conn.queue(h, &[]);
            }
            self.mark_dirty(c);
        }
        let op = &mut self.ops[id];
        op.busy = false;
        if op.len > OP_LARGE_BYTES {
            self.large_inflight -= op.len;
        }
        if op.buf.len() > OP_LARGE_BYTES && self.large_kept > OP_LARGE_BUDGET_BYTES {
            self.large_kept -= op.buf.len();
            op.buf = AlignedBuf::new(1);
        }
        self.free_ops.push(id);
        if !self.fence_waits.is_empty() {
            self.answer_fence_waits();
        }
        if !self.layer_waits.is_empty() {
            self.answer_layer_waits();
        }
    }

    /// A `BackfillRead` with `FLAG_STATES_ONLY`: the state table of the
    /// range (version, kind and crc per block, `STATE_CRC_BYTES` each), no
    /// data. Only a scrub asks (rarely, a 64 KiB piece at a time).
    pub(super) fn serve_states(&mut self, c: usize, h: &Header) {
        if !h.offset.is_multiple_of(BLOCK_SIZE as u64)
            || !(h.length as usize).is_multiple_of(BLOCK_SIZE)
        {
            return self.reject(c, h, Status::Invalid);
        }
        let blocks = h.length as usize / BLOCK_SIZE;
        let mut states = vec![(BlockKind::Unwritten, 0u64); blocks];
        self.engine.block_states(h.volume, h.offset, &mut states);
        let mut crcs = vec![0u32; blocks];
        self.engine.block_crcs(h.volume, h.offset, &mut crcs);
        let mut table = vec![0u8; blocks * payload::STATE_CRC_BYTES];
        payload::encode_state_crc_table(
            states
                .iter()
                .zip(&crcs)
                .map(|(&(kind, version), &crc)| (wire_kind(kind), version, crc)),
            &mut table,
        );
        self.respond(c, h, Status::Ok, &[&table]);
    }

    pub(super) fn serve_list_chunks(&mut self, c: usize, h: &Header) {
        if let Err(s) = self.check_lease() {
            return self.reject(c, h, s);
        }
        let Some(t) = self.table() else {
            return self.reject(c, h, Status::RouteBehind);
        };
        if h.epoch != t.epoch {
            let s = if h.epoch < t.epoch {
                Status::StaleEpoch
            } else {
                Status::RouteBehind
            };
            return self.reject(c, h, s);
        }
        let p = h.offset as u32;
        let in_sync = t
            .partition(p)
            .and_then(|r| r.member(self.shared.id))
            .is_some_and(|m| m.in_sync);
        if !in_sync {
            return self.reject(c, h, Status::NotInSync);
        }
        // A chunk that a write of an older epoch still in flight creates
        // would be missing from the list, and that write does not reach
        // the new member. (Lists now go out right after a route change.)
        if self.older_writes_in_flight(h.epoch) {
            return self.reject(c, h, Status::Busy);
        }
        if h.flags == FLAG_CATCH_UP {
            // (A node id: the connection is a node's, checked in `authorize`.)
            return self.serve_catch_up(c, h, p, h.volume as NodeId);
        }
        // A client (authorized for `h.volume` only) sees its volume's
        // chunks: those of every layer a read of it (or of the snapshot
        // FLAG_SNAPSHOT_READ names) goes through, under its id. A node sees
        // every key's.
        let only_keys: Option<Vec<u64>> = match self.conns[c].as_ref().map(|conn| &conn.auth) {
            Some(ConnAuth::Node) => None,
            _ => match self.read_target(h) {
                // With FLAG_SINCE: only the layers newer than era `version`
                // (the chain is newest first; eras only grow).
                Ok(target) => Some(
                    std::iter::once(target.key)
                        .chain(target.chain().iter().copied())
                        .filter(|k| {
                            h.flags & FLAG_SINCE == 0
                                || u64::from(celer_device::era_of(*k)) > h.version
                        })
                        .collect(),
                ),
                Err(s) => return self.reject(c, h, s),
            },
        };
        let mut listed = std::collections::HashSet::new();
        // A node (a new member's backfill, a scrub) also gets the chunks
        // emptied by a discard whose version is still kept: copying them
        // zeroes what the new member holds there from before.
        let mut held = self.engine.chunks();
        if only_keys.is_none() {
            held.extend(self.engine.discarded_chunks());
            held.sort_unstable();
        }
        let chunks = held.into_iter().filter_map(|(v, ch)| {
            if t.partition_of(v, ch) != p {
                return None;
            }
            let v = match &only_keys {
                None => v,
                Some(keys) if keys.contains(&v) => h.volume,
                Some(_) => return None,
            };
            (only_keys.is_none() || listed.insert(ch)).then_some((v, ch))
        });
        let mut out = Vec::new();
        payload::encode_chunk_list(chunks, &mut out);
        self.respond(c, h, Status::Ok, &[&out]);
    }

    // ---- deleted volumes ----
}
