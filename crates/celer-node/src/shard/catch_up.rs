//! What a down member missed: the blocks written to a partition while one
//! of its members was down (within the control service's grace period,
//! still named in the route as a `down` member).
//!
//! A shard that is a member of a partition starts a record for a member
//! when it installs a table where that member is down *and* its previous
//! table (installed since this process started, the epoch just before)
//! had it as a member that was not down: it saw the member leave the write
//! set, so every write the member misses is accepted here after that point
//! (a node accepts writes of its current epoch only). From then on every
//! mutation the shard accepts for the partition sets the written blocks'
//! bits, until the member is back (no longer down: recording stops, the
//! record is kept for its catch-up), and the record is dropped once the
//! member is in sync or no longer a member. A member that goes down again
//! while catching up records into the same record. A table that skips
//! epochs (a lost push, or this node cut off from the control service
//! while clients still reached it) voids every record, and none starts at
//! it: in a skipped table this node may have been marked down itself and
//! got none of the partition's writes.
//!
//! When the member returns as a syncing member with `catch_up_since` (the
//! epoch it went down in while in sync), its backfill asks the source for
//! the record (`ListChunks` with `FLAG_CATCH_UP`); the source answers it
//! only if the record started at that very transition (the previous table
//! it saw is older than `catch_up_since`, the first with the member down is
//! not) and did not overflow. Otherwise (this process restarted since, or
//! it missed the transition) it answers "not recorded" and the member
//! copies the partition whole. Nothing is persisted: a restart loses the
//! records, and the full copy is the fallback.
//!
//! Cost: nothing while no member is down (one `is_empty` per mutation);
//! while one is, a scan of this shard's records (one per partition with a
//! down member) and a bit set per written block, and one bitmap allocated
//! per chunk first written (chunk bytes / 4 KiB / 8 bytes: 32 for 1 MiB).

use std::collections::HashMap;

use celer_engine::BLOCK_SIZE;
use celer_proto::payload::{self, CatchUpAnswer};
use celer_proto::{Header, Status};
use celer_route::{NodeId, RouteTable};

use super::{mark_blocks, ShardLoop};

/// Runs of written blocks this close (in blocks) are copied as one range.
const MERGE_GAP_BLOCKS_MAX: usize = 8;

/// How long before a member went down a snapshot may have frozen the head
/// for the frozen era's blocks to be copied with the head's (the control
/// service's lease plus the cut window, with room to spare).
const FROZEN_LOOKBACK: std::time::Duration = std::time::Duration::from_secs(60);

/// Largest catch-up answer: a record that would not fit overflows (and the
/// member copies the partition whole). Below the protocol's 4 MiB payload.
const CATCH_UP_ANSWER_BYTES_MAX: usize = 3 << 20;

/// The blocks written to `partition` since `node` went down.
pub(super) struct CatchUp {
    partition: u32,
    node: NodeId,
    /// The epoch of our table before the one where `node` went down.
    seen_up_epoch: u64,
    /// The epoch of our first table with `node` down.
    seen_down_epoch: u64,
    /// `node` is down now: writes are recorded.
    recording: bool,
    /// Too many chunks to answer: the member copies the partition whole.
    overflowed: bool,
    /// When recording started (this shard saw the member go down).
    started: std::time::Instant,
    /// (volume, chunk index) → one bit per block of the chunk.
    blocks: HashMap<(u64, u64), Vec<u64>>,
}

impl<D: celer_engine::Disk, N: crate::net::Net> ShardLoop<D, N> {
    /// Starts, stops and drops records for table `new` (before it becomes
    /// the current one); `split`: `new` splits the partitions; `gap`: `new`
    /// is more than one epoch past the current one.
    pub(super) fn catch_up_install(&mut self, new: &RouteTable, split: bool, gap: bool) {
        let me = self.shared.id;
        let shards = self.shared.shards as u32;
        let mine = self.id as u32;
        let old = self.route.as_ref().map(|r| &r.table);
        // A split: a record names chunks by the partition they had, and
        // some are the new halves' now, which this node may not hold (the
        // member asked for them under the old partition and was refused
        // as NotReplica, for ever): records from before it answer "not
        // recorded", and their members copy whole.
        // Tables skipped (a push lost, or this node cut off from the
        // control service while clients still reached it): in one of them
        // this node may have been marked down itself and got none of the
        // partition's writes, or a member may have gone down before this
        // node saw it. No record is complete across the gap: records
        // answer "not recorded", and those it would start begin so.
        if split || gap {
            for c in self.catch_ups.iter_mut().filter(|c| !c.overflowed) {
                c.overflowed = true;
                c.blocks = HashMap::new();
            }
        }
        // Records of members that are gone, in sync, or no longer catching up.
        self.catch_ups.retain(|c| {
            let Some(part) = new.partition(c.partition) else {
                return false;
            };
            part.member(me).is_some()
                && part
                    .member(c.node)
                    .is_some_and(|m| !m.in_sync && (m.down || m.catch_up_since > 0))
        });
        for c in self.catch_ups.iter_mut() {
            c.recording = new
                .partition(c.partition)
                .and_then(|p| p.member(c.node))
                .is_some_and(|m| m.down);
            // Marked down ourselves, we get no writes of the partition
            // (the clients skip a down member): what we record from now on
            // is not all the member misses.
            if new
                .partition(c.partition)
                .and_then(|p| p.member(me))
                .is_some_and(|m| m.down)
                && !c.overflowed
            {
                c.overflowed = true;
                c.blocks = HashMap::new();
            }
        }
        let Some(old) = old else {
            return; // the first table since start: no transition seen
        };
        for (p, part) in new.partitions.iter().enumerate() {
            let p = p as u32;
            if p % shards != mine || part.member(me).is_none() {
                continue;
            }
            for m in part.members.iter().filter(|m| m.down && m.node != me) {
                if self
                    .catch_ups
                    .iter()
                    .any(|c| c.partition == p && c.node == m.node)
                {
                    continue;
                }
                let was_up = old
                    .partition(p)
                    .and_then(|o| o.member(m.node))
                    .is_some_and(|o| !o.down);
                if !was_up {
                    continue;
                }
                if gap {
                    tracing::info!(
                        shard = self.id,
                        partition = p,
                        node = m.node,
                        epoch = new.epoch,
                        skipped_from = old.epoch,
                        "member down, seen across skipped tables: no record, it will copy whole"
                    );
                } else {
                    tracing::info!(
                        shard = self.id,
                        partition = p,
                        node = m.node,
                        epoch = new.epoch,
                        "member down: recording the writes it misses"
                    );
                }
                self.catch_ups.push(CatchUp {
                    partition: p,
                    node: m.node,
                    seen_up_epoch: old.epoch,
                    seen_down_epoch: new.epoch,
                    recording: true,
                    overflowed: gap,
                    started: self.net.now(),
                    blocks: HashMap::new(),
                });
            }
        }
    }

    /// Records a mutation accepted for partition `p` (whole blocks around
    /// `[offset, offset + len)`).
    pub(super) fn catch_up_record(&mut self, p: u32, volume: u64, offset: u64, len: u64) {
        let Some(t) = self.route.as_ref().map(|r| &r.table) else {
            return;
        };
        let chunk_bytes = t.chunk_bytes;
        let blocks_per_chunk = (chunk_bytes / BLOCK_SIZE as u64) as usize;
        let words = blocks_per_chunk.div_ceil(64);
        let entry_bytes = 16 + words * 8;
        let chunk = offset / chunk_bytes;
        for c in self
            .catch_ups
            .iter_mut()
            .filter(|c| c.partition == p && c.recording && !c.overflowed)
        {
            if !c.blocks.contains_key(&(volume, chunk))
                && (c.blocks.len() + 1) * entry_bytes + 8 > CATCH_UP_ANSWER_BYTES_MAX
            {
                tracing::warn!(
                    partition = p,
                    node = c.node,
                    "too many chunks written while the member is down: it will copy the partition whole"
                );
                c.overflowed = true;
                c.blocks = HashMap::new();
                continue;
            }
            let bits = c
                .blocks
                .entry((volume, chunk))
                .or_insert_with(|| vec![0u64; words]);
            mark_blocks(bits, chunk_bytes, offset, len);
        }
    }

    /// A `ListChunks` with `FLAG_CATCH_UP` for partition `p` from member
    /// `node` (the caller checked the epoch, that we are in sync, and that
    /// no older write is in flight).
    pub(super) fn serve_catch_up(&mut self, c: usize, h: &Header, p: u32, node: NodeId) {
        let Some(t) = self.route.as_ref().map(|r| &r.table) else {
            return self.reject(c, h, Status::RouteBehind);
        };
        let blocks_per_chunk = t.chunk_bytes / BLOCK_SIZE as u64;
        let since = t
            .partition(p)
            .and_then(|r| r.member(node))
            .filter(|m| !m.in_sync && !m.down)
            .map_or(0, |m| m.catch_up_since);
        let record = self.catch_ups.iter().find(|c| {
            c.partition == p
                && c.node == node
                && !c.overflowed
                && since > 0
                && c.seen_up_epoch < since
                && since <= c.seen_down_epoch
        });
        let Some(record) = record else {
            tracing::info!(
                shard = self.id,
                partition = p,
                node,
                "no complete record of what the member missed: it copies the partition whole"
            );
            return self.respond(c, h, Status::Ok, &[&payload::CATCH_UP_NOT_RECORDED_ANSWER]);
        };
        // A write that landed in a snapshot's era on the members that
        // stayed (before they learned of the snapshot, or during its cut
        // window) and not on the member that went down is written again by
        // its writer into the new head: only the head's copy is recorded.
        // So for a head frozen shortly before the member went down, the
        // same blocks of the frozen era are copied too (a copy that is not
        // newer there is skipped).
        let since = record.started.checked_sub(FROZEN_LOOKBACK);
        let mut blocks: std::collections::BTreeMap<(u64, u64), Vec<u64>> =
            record.blocks.iter().map(|(k, b)| (*k, b.clone())).collect();
        for ((v, ch), bits) in &record.blocks {
            let frozen = self
                .layers
                .values()
                .map(|l| l.frozen_since(*v, since))
                .find(|f| !f.is_empty())
                .unwrap_or_default();
            for key in frozen {
                let e = blocks
                    .entry((key, *ch))
                    .or_insert_with(|| vec![0u64; bits.len()]);
                for (w, b) in e.iter_mut().zip(bits) {
                    *w |= b;
                }
            }
        }
        let answer_bytes = payload::catch_up_answer_bytes(blocks_per_chunk, blocks.len());
        if answer_bytes > CATCH_UP_ANSWER_BYTES_MAX {
            tracing::info!(
                shard = self.id,
                partition = p,
                node,
                "what the member missed, frozen eras included, does not fit one answer: it copies the partition whole"
            );
            return self.respond(c, h, Status::Ok, &[&payload::CATCH_UP_NOT_RECORDED_ANSWER]);
        }
        let mut out = Vec::with_capacity(answer_bytes);
        payload::encode_catch_up_answer(
            blocks_per_chunk,
            blocks.iter().map(|((v, ch), bits)| (*v, *ch, &bits[..])),
            &mut out,
        );
        tracing::info!(
            shard = self.id,
            partition = p,
            node,
            chunks = blocks.len(),
            "serving what the member missed"
        );
        self.respond(c, h, Status::Ok, &[&out]);
    }
}

/// The ranges (volume, byte offset, bytes) to copy from a catch-up answer:
/// runs of written blocks, merged across gaps of up to
/// `MERGE_GAP_BLOCKS_MAX` while a range holds at least as many written
/// blocks as unwritten ones (so at most twice the written bytes are
/// copied, in fewer requests). `None`: the source did not record everything
/// (copy the partition whole), or the answer is malformed.
pub(super) fn catch_up_ranges(answer: &[u8], chunk_bytes: u64) -> Option<Vec<(u64, u64, u64)>> {
    let Ok(CatchUpAnswer::Recorded(chunks)) = CatchUpAnswer::parse(answer) else {
        return None;
    };
    let blocks_per_chunk = chunks.blocks_per_chunk();
    if blocks_per_chunk != chunk_bytes / BLOCK_SIZE as u64 {
        return None;
    }
    let block = BLOCK_SIZE as u64;
    let mut ranges = Vec::new();
    for e in chunks.iter() {
        let v = e.volume;
        let bit = |b: usize| e.written(b);
        let base = e.chunk.checked_mul(chunk_bytes)?;
        // The current range: first block, end, written blocks in it.
        let mut open: Option<(usize, usize, usize)> = None;
        let mut b = 0;
        while b < blocks_per_chunk as usize {
            if !bit(b) {
                b += 1;
                continue;
            }
            let start = b;
            while b < blocks_per_chunk as usize && bit(b) {
                b += 1;
            }
            let run = b - start;
            open = match open {
                // A short gap costs less than a request of its own; at
                // most as many unwritten blocks as written ones are copied.
                Some((first, end, written))
                    if start - end <= MERGE_GAP_BLOCKS_MAX && b - first <= 2 * (written + run) =>
                {
                    Some((first, b, written + run))
                }
                Some((first, end, _)) => {
                    ranges.push((v, base + first as u64 * block, (end - first) as u64 * block));
                    Some((start, b, run))
                }
                None => Some((start, b, run)),
            };
        }
        if let Some((first, end, _)) = open {
            ranges.push((v, base + first as u64 * block, (end - first) as u64 * block));
        }
    }
    ranges.sort_unstable();
    Some(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_the_runs_of_written_blocks() {
        let chunk_bytes = 1u64 << 20;
        let mut p = 256u64.to_le_bytes().to_vec();
        p.extend_from_slice(&7u64.to_le_bytes());
        p.extend_from_slice(&3u64.to_le_bytes());
        let mut bits = [0u64; 4];
        bits[0] = 0b1101; // blocks 0, 2, 3: one range
        bits[1] = 1 | 1 << 30; // blocks 64 and 94: too far apart
        bits[3] = 1 << 63; // block 255
        for w in bits {
            p.extend_from_slice(&w.to_le_bytes());
        }
        let base = 3 * chunk_bytes;
        assert_eq!(
            catch_up_ranges(&p, chunk_bytes),
            Some(vec![
                (7, base, 4 * 4096),
                (7, base + 64 * 4096, 4096),
                (7, base + 94 * 4096, 4096),
                (7, base + 255 * 4096, 4096),
            ])
        );
        assert_eq!(catch_up_ranges(&0u64.to_le_bytes(), chunk_bytes), None);
        assert_eq!(catch_up_ranges(&p[..p.len() - 1], chunk_bytes), None);
    }
}
