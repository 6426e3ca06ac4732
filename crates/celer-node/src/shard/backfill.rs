//! Backfill: copying the partitions this shard joins from an in-sync
//! member (whole chunks, or only what a member back from a short outage
//! missed), with progress for `celer status`.

use celer_proto::payload::{decode_chunk_list, BackfillAnswer};

use super::*;

impl<D: Disk, N: Net> ShardLoop<D, N> {
    /// The control service ignored our report of these partitions at
    /// `epoch`: we rejoined them after it (in tables we never saw) and may
    /// lack writes of the time away. Forget the report and copy again.
    pub(super) fn backfill_again(&mut self, epoch: u64, partitions: &[u32]) {
        let me = self.shared.id;
        let Some(t) = self.route.clone() else {
            return;
        };
        let t = &t.table;
        for &p in partitions {
            if self.backfills.iter().any(|b| b.partition == p) {
                continue;
            }
            let syncing = t
                .partition(p)
                .and_then(|r| r.member(me))
                .is_some_and(|m| !m.in_sync && !m.down);
            let source = t.partition(p).and_then(|r| r.primary());
            let (Some(&(reported, bytes)), Some(source)) = (self.reported.get(&p), source) else {
                continue;
            };
            // Only that report: a later one (from a copy made since) stands.
            if reported != epoch || !syncing {
                continue;
            }
            self.reported.remove(&p);
            // That copy no longer counts: the new one will.
            self.round_bytes = self.round_bytes.saturating_sub(bytes);
            tracing::info!(
                shard = self.id,
                partition = p,
                source,
                "backfill starts again"
            );
            self.backfill_serial = self.backfill_serial.wrapping_add(1);
            self.backfills.push(new_backfill(
                self.backfill_serial,
                p,
                t.epoch,
                source,
                self.net.now(),
            ));
        }
        self.publish_progress();
        self.set_backfilling();
    }

    pub(super) fn set_backfilling(&self) {
        let n = self.backfills.len();
        self.counters.set_syncing(n);
        self.shared.backfilling[self.id as usize].store(n, std::sync::atomic::Ordering::Release);
    }

    /// Publishes this shard's backfill figures (see `BackfillProgress`):
    /// the backfills queued or running, plus those finished in the
    /// rebalance under way. A dropped or restarted backfill is simply no
    /// longer in the list, so it is counted nowhere.
    pub(super) fn publish_progress(&self) {
        let mut p = BackfillProgress {
            bytes_done: self.round_bytes,
            bytes_total: self.round_bytes,
            partitions_unlisted: 0,
            bytes_copied: self.copied_bytes,
        };
        for b in &self.backfills {
            match b.bytes_total {
                Some(total) => {
                    debug_assert!(
                        b.bytes_done <= total,
                        "partition {}: {} of {total} bytes done",
                        b.partition,
                        b.bytes_done
                    );
                    p.bytes_done += b.bytes_done;
                    p.bytes_total += total;
                }
                None => {
                    debug_assert_eq!(b.bytes_done, 0, "partition {}", b.partition);
                    p.partitions_unlisted += 1;
                }
            }
        }
        self.shared.progress[self.id as usize].store(p);
        self.counters
            .set_backfill_progress(p.bytes_done, p.bytes_total, p.partitions_unlisted);
    }

    pub(super) fn retire(&mut self, b: Backfill) {
        if b.writes_pending > 0 {
            self.retired.push(b);
        }
    }

    pub(super) fn backfill_step(&mut self) {
        let now = self.net.now();
        // Lists: every queued backfill's, a few in flight at a time.
        let mut listing = self
            .backfills
            .iter()
            .filter(|b| b.stage == BfStage::Waiting && b.bytes_total.is_none())
            .count();
        let mut i = 0;
        while listing < BACKFILL_LISTS_MAX && i < self.backfills.len() {
            let b = &self.backfills[i];
            let p = b.partition;
            let ready = b.stage == BfStage::List
                && !self.joining.contains(&p)
                && b.retry_at.is_none_or(|t| t <= now);
            if ready && !b.catch_up && !self.copy_whole_recorded(p) {
                // Fell back from a catch-up: the control service has not
                // recorded it yet (the report or its table was lost).
                self.backfills[i].retry_at = Some(now + Duration::from_millis(50));
                self.shared.tell_agent(AgentMsg::CopyWhole { partition: p });
            } else if ready && self.backfill_send(i, Op::ListChunks) {
                listing += 1;
            }
            i += 1;
        }
        // Copies: one backfill at a time per shard, the first in the list.
        let Some(b) = self.backfills.first() else {
            return;
        };
        if b.retry_at.is_some_and(|t| t > now) {
            return;
        }
        match b.stage {
            BfStage::Read => {
                // Writes of a piece that failed to submit still use the buffer.
                if b.writes_pending > 0 {
                    return;
                }
                self.backfill_skip_deleted();
                let b = &self.backfills[0];
                if b.next_range >= b.ranges.len() {
                    self.backfill_finish();
                    return;
                }
                self.backfill_send(0, Op::BackfillRead);
            }
            BfStage::Apply => self.backfill_submit_runs(),
            BfStage::List | BfStage::Waiting => {}
        }
    }

    /// Skips the first backfill's chunks of volumes deleted since its list:
    /// the source refuses their reads, and there is nothing to keep. Their
    /// bytes leave its total.
    pub(super) fn backfill_skip_deleted(&mut self) {
        let b = &mut self.backfills[0];
        let mut skipped = false;
        while b.next_range < b.ranges.len()
            && self
                .deleted
                .binary_search(&b.ranges[b.next_range].0)
                .is_ok()
        {
            let left = b.ranges[b.next_range].2 - b.piece;
            b.bytes_total = b.bytes_total.map(|t| t - left);
            b.next_range += 1;
            b.piece = 0;
            skipped = true;
        }
        if skipped {
            self.publish_progress();
        }
    }

    /// The first backfill copied its last chunk: it leaves the queue (its
    /// bytes stay in the figures until the rebalance ends) and the agent
    /// reports the partition.
    pub(super) fn backfill_finish(&mut self) {
        let b = self.backfills.remove(0);
        debug_assert_eq!(
            Some(b.bytes_done),
            b.bytes_total,
            "partition {}",
            b.partition
        );
        debug_assert_eq!(b.writes_pending, 0);
        tracing::info!(
            shard = self.id,
            partition = b.partition,
            bytes = b.bytes_done,
            took = ?b.started.elapsed(),
            "backfill done"
        );
        self.reported.insert(b.partition, (b.epoch, b.bytes_done));
        self.round_bytes += b.bytes_done;
        // Figures first: whoever sees no backfill left sees them final.
        self.publish_progress();
        self.set_backfilling();
        self.shared.tell_agent(AgentMsg::Synced {
            partition: b.partition,
            epoch: b.epoch,
        });
    }

    /// Sends backfill `i`'s next request: its chunk list, or its next piece.
    /// False when there is no connection to its source yet (retried later).
    pub(super) fn backfill_send(&mut self, i: usize, op: Op) -> bool {
        let (p, source) = (self.backfills[i].partition, self.backfills[i].source);
        let conn = match self.backfills[i].conn {
            Some((c, g)) if self.conns[c].as_ref().is_some_and(|x| x.gen == g) => c,
            _ => match self.peer_conn(source, p) {
                Some(c) => {
                    let g = self.conns[c].as_ref().map_or(0, |x| x.gen);
                    self.backfills[i].conn = Some((c, g));
                    c
                }
                None => {
                    self.backfills[i].retry_at = Some(self.net.now() + Duration::from_millis(100));
                    return false;
                }
            },
        };
        let epoch = self.table().map_or(0, |t| t.epoch);
        // Unique among this shard's backfill requests in flight.
        self.backfill_seq = self.backfill_seq.wrapping_add(1) & !REQ_REPAIR;
        let b = &mut self.backfills[i];
        b.seq = self.backfill_seq;
        b.sent_at = self.net.now();
        let mut h = Header::request(op, REQ_BACKFILL | b.seq);
        h.epoch = epoch;
        if op == Op::ListChunks {
            h.offset = p as u64;
            if b.catch_up {
                h.flags = FLAG_CATCH_UP;
                h.volume = self.shared.id as u64;
            }
        } else {
            let (v, at, len) = b.ranges[b.next_range];
            b.piece_len = (len - b.piece).min(BACKFILL_PIECE_BYTES);
            h.volume = v;
            h.offset = at + b.piece;
            h.length = b.piece_len as u32;
        }
        b.stage = BfStage::Waiting;
        if let Some(conn) = self.conns[conn].as_mut() {
            conn.queue(h, &[]);
        }
        self.mark_dirty(conn);
        true
    }

    /// Whether the block at `offset` of engine key `key` in partition `p`
    /// is still to be copied by this shard's backfill of `p`: its chunk
    /// list has not come yet, or the block is in a range (a listed chunk,
    /// or a block a catch-up names) not copied so far. Only what is left
    /// can be stale here; a sector write must not merge into it. A range
    /// not started yet moves up to be copied next, so the write waits for
    /// about one chunk's copy, not for the rest of the partition.
    pub(super) fn copy_pending(&mut self, p: u32, key: u64, offset: u64) -> bool {
        let Some(b) = self.backfills.iter_mut().find(|b| b.partition == p) else {
            return false;
        };
        if b.bytes_total.is_none() {
            return true;
        }
        let next = b.next_range;
        let found = b
            .ranges
            .iter()
            .enumerate()
            .skip(next)
            .find(|(i, &(v, at, len))| {
                let from = if *i == next { at + b.piece } else { at };
                v == key && from <= offset && offset < at + len
            });
        let Some((i, _)) = found else {
            return false;
        };
        if i > next + 1 {
            b.ranges[next + 1..=i].rotate_right(1);
        }
        true
    }

    /// Backfill `i`, a catch-up, copies its partition whole instead. What
    /// this shard held from before it went down may be stale where the
    /// members freed chunks or blocks they no longer remember: it is
    /// dropped first, but for the blocks written here since it came back
    /// (`release_partition`). Before that, the control service records
    /// that this member copies whole (its `catch_up_since` cleared), so
    /// that neither a later source nor this node after a restart takes it
    /// for a member that holds everything up to when it went down: the
    /// backfill lists once a table says so (`copy_whole_recorded`), and
    /// the table's arrival drops what was held (`release_on_join`).
    pub(super) fn copy_whole_instead(&mut self, i: usize, why: &str) {
        let b = &mut self.backfills[i];
        tracing::info!(
            shard = self.id,
            partition = b.partition,
            source = b.source,
            why,
            "catch-up: copying the partition whole"
        );
        b.catch_up = false;
        b.stage = BfStage::List;
        b.retry_at = None;
        b.bytes_total = None;
        b.ranges.clear();
        let p = b.partition;
        self.shared.tell_agent(AgentMsg::CopyWhole { partition: p });
    }

    /// Whether the table records that this shard copies partition `p`
    /// whole (no `catch_up_since`): a backfill that fell back from a
    /// catch-up lists only then.
    fn copy_whole_recorded(&self, p: u32) -> bool {
        self.table()
            .and_then(|t| t.partition(p))
            .and_then(|r| r.member(self.shared.id))
            .is_some_and(|m| m.catch_up_since == 0)
    }

    pub(super) fn backfill_response(&mut self, c: usize, h: &Header, payload: &[u8]) {
        let now = self.net.now();
        let chunk_bytes = self.table().map_or(1 << 20, |t| t.chunk_bytes);
        let Some(i) = self.backfills.iter().position(|b| {
            b.stage == BfStage::Waiting
                && h.request_id == REQ_BACKFILL | b.seq
                && b.conn.is_some_and(|(bc, _)| bc == c)
        }) else {
            return; // for a backfill dropped, restarted or timed out since
        };
        let b = &mut self.backfills[i];
        let retry_stage = if h.op == Op::ListChunks {
            BfStage::List
        } else {
            BfStage::Read
        };
        match h.status {
            Status::Ok => {}
            Status::StaleEpoch => {
                // The source is ahead: fetch the route, then go on.
                self.shared.tell_agent(AgentMsg::NeedRoute(h.epoch + 1));
                b.retry(retry_stage, Duration::from_millis(20), now);
                return;
            }
            s => {
                tracing::debug!(partition = b.partition, status = ?s, "backfill request refused; retrying");
                b.retry(retry_stage, Duration::from_millis(10), now);
                return;
            }
        }
        if h.op == Op::ListChunks {
            if h.flags == FLAG_CATCH_UP {
                match catch_up_ranges(payload, chunk_bytes) {
                    Some(r) => b.ranges = r,
                    None => {
                        // The source did not record all we missed.
                        return self.copy_whole_instead(i, "no record of what we missed");
                    }
                }
            } else {
                let Ok(chunks) = decode_chunk_list(payload) else {
                    tracing::warn!(
                        partition = b.partition,
                        "backfill chunk list of the wrong size; retrying"
                    );
                    b.retry(BfStage::List, Duration::from_millis(10), now);
                    return;
                };
                b.ranges = chunks
                    .map(|(v, ch)| (v, ch.saturating_mul(chunk_bytes), chunk_bytes))
                    .collect();
                b.ranges.sort_unstable();
            }
            let deleted = &self.deleted;
            b.ranges
                .retain(|(v, _, _)| deleted.binary_search(v).is_err());
            b.next_range = 0;
            b.piece = 0;
            b.bytes_total = Some(b.ranges.iter().map(|r| r.2).sum());
            b.stage = BfStage::Read;
            tracing::debug!(
                shard = self.id,
                partition = b.partition,
                ranges = b.ranges.len(),
                catch_up = b.catch_up,
                bytes = b.bytes_total,
                "backfill listed"
            );
            self.publish_progress();
            return;
        }
        // BackfillRead: only the first backfill copies.
        debug_assert_eq!(i, 0, "a BackfillRead answer for a queued backfill");
        if i != 0 {
            b.stage = BfStage::Read;
            return;
        }
        // State table, then data.
        let len = h.length as usize;
        let answer = match BackfillAnswer::parse(payload, len) {
            Ok(answer) if len as u64 == b.piece_len => answer,
            _ => {
                tracing::warn!(
                    partition = b.partition,
                    "backfill answer of the wrong size; retrying"
                );
                b.retry(BfStage::Read, Duration::from_millis(10), now);
                return;
            }
        };
        let blocks = len / BLOCK_SIZE;
        if b.buf.len() < len {
            b.buf = AlignedBuf::new(blocks);
        }
        b.buf[..len].copy_from_slice(answer.data);
        b.states.clear();
        b.states.extend(
            answer
                .states
                .iter()
                .map(|(kind, version)| (engine_kind(kind), version)),
        );
        // Runs of blocks with the same kind and version: one write each.
        // Data first: a zeroing of a chunk that holds no slot here keeps
        // its version per block, but for the whole chunk once the engine
        // keeps too many such chunks (`Discarded`), and data older than it,
        // of other blocks, would then be dropped.
        b.runs.clear();
        for data in [true, false] {
            let mut i = 0;
            while i < blocks {
                let (k, v) = b.states[i];
                let mut j = i + 1;
                while j < blocks && b.states[j] == (k, v) {
                    j += 1;
                }
                if k != BlockKind::Unwritten && v > 0 && (k == BlockKind::Data) == data {
                    b.runs.push((i, j - i, k, v));
                }
                i = j;
            }
        }
        b.next_run = 0;
        b.piece_failed = false;
        b.stage = BfStage::Apply;
        self.backfill_submit_runs();
    }

    pub(super) fn backfill_submit_runs(&mut self) {
        let now = self.net.now();
        let epoch = self.table().map_or(0, |t| t.epoch);
        let b = &mut self.backfills[0];
        let (v, at, range_len) = b.ranges[b.next_range];
        let base = at + b.piece;
        while b.next_run < b.runs.len() && b.writes_pending < BACKFILL_WRITES_MAX {
            let (first, count, kind, version) = b.runs[b.next_run];
            let seg = Segment {
                // SAFETY: within the backfill buffer, which outlives the write:
                // a backfill dropped with writes pending is kept in `retired`.
                addr: unsafe { b.buf.as_mut_ptr().add(first * BLOCK_SIZE) },
                len: count * BLOCK_SIZE,
            };
            let segs = [seg];
            let req = EngineRequest {
                op: if kind == BlockKind::Data {
                    EngineOp::Write
                } else {
                    EngineOp::WriteZeroes
                },
                volume: v,
                offset_bytes: base + (first * BLOCK_SIZE) as u64,
                len_bytes: (count * BLOCK_SIZE) as u64,
                segments: if kind == BlockKind::Data { &segs } else { &[] },
                version,
                epoch,
                tag: TAG_BACKFILL | b.serial as u64,
                chain: &[],
                block_crc: None,
            };
            // SAFETY: see above.
            match unsafe { self.engine.submit(&req) } {
                Ok(()) => {
                    b.writes_pending += 1;
                    b.next_run += 1;
                }
                Err(EngineError::QueueFull { .. }) => break,
                Err(e) => {
                    tracing::warn!(
                        partition = b.partition,
                        "backfill write failed: {e}; retrying the piece"
                    );
                    b.retry(BfStage::Read, Duration::from_millis(100), now);
                    return;
                }
            }
        }
        if b.next_run == b.runs.len() && b.writes_pending == 0 {
            if b.piece_failed {
                // A write of this piece failed: read and apply it again
                // (versions make that idempotent); it does not count.
                b.piece_failed = false;
                b.retry(BfStage::Read, Duration::from_millis(100), now);
                return;
            }
            // The piece is written: it counts as moved.
            let n = b.piece_len;
            b.bytes_done += n;
            b.piece += BACKFILL_PIECE_BYTES;
            if b.piece >= range_len {
                b.piece = 0;
                b.next_range += 1;
            }
            b.stage = BfStage::Read;
            self.copied_bytes += n;
            self.counters.add_backfill_bytes(n);
            self.publish_progress();
        }
    }

    pub(super) fn backfill_write_done(&mut self, c: Completion) {
        let serial = (c.tag & 0xffff_ffff) as u32;
        if let Some(i) = self.retired.iter().position(|b| b.serial == serial) {
            self.retired[i].writes_pending -= 1;
            if self.retired[i].writes_pending == 0 {
                self.retired.swap_remove(i);
            }
            return;
        }
        let Some(i) = self.backfills.iter().position(|b| b.serial == serial) else {
            return;
        };
        let b = &mut self.backfills[i];
        b.writes_pending -= 1;
        if let Err(e) = c.result {
            tracing::warn!(
                partition = b.partition,
                "backfill write: {e}; redoing the piece"
            );
            // Submit no more of it; when the others are back, it is read
            // and applied again.
            b.next_run = b.runs.len();
            b.piece_failed = true;
        }
        if i == 0 && b.stage == BfStage::Apply {
            self.backfill_submit_runs();
        }
    }
}
