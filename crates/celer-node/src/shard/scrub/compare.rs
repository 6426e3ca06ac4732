//! The scrub's comparison with the other in-sync members: block states
//! (version, kind, crc) of each piece read here, and the copies taken
//! from them where this node holds an older or a differing block.

use super::*;

/// Request ids of the scrub's state comparisons (within `REQ_REPAIR`).
pub(in crate::shard) const REQ_COMPARE: u32 = crate::shard::REQ_REPAIR | 1 << 29;

impl<D: celer_engine::Disk, N: crate::net::Net> ShardLoop<D, N> {
    /// Asks the partition's other in-sync members for the states of a
    /// piece this shard just read correctly; `scrub_compare_response`
    /// compares. Only as an in-sync member itself.
    pub(super) fn scrub_compare(&mut self, volume: u64, offset: u64, len: u64) {
        let Some(p) = self.table().map(|t| t.partition_at(volume, offset)) else {
            return;
        };
        let Some((epoch, peers)) = self.in_sync_peers(p) else {
            return;
        };
        // A round still waiting for an answer is given up (its blocks are
        // compared again by the next pass).
        let round = &mut self.scrub.compare;
        round.volume = volume;
        round.offset = offset;
        round.blocks = len as usize / BLOCK_SIZE;
        round.waiting.clear();
        round.sent_at = Some(self.net.now());
        round.answers = 0;
        round.complete = true;
        for node in peers {
            let Some(c) = self.peer_conn(node, p) else {
                self.scrub.compare.complete = false;
                continue;
            };
            self.compare_seq = (self.compare_seq + 1) & 0xffff;
            self.scrub.compare.waiting.push(self.compare_seq);
            let mut h = Header::request(Op::BackfillRead, REQ_COMPARE | self.compare_seq);
            h.epoch = epoch;
            h.volume = volume;
            h.offset = offset;
            h.length = len as u32;
            h.flags = FLAG_STATES_ONLY;
            if let Some(conn) = self.conns[c].as_mut() {
                conn.queue(h, &[]);
            }
            self.mark_dirty(c);
        }
    }

    /// A member's states-only answer for a piece (`StateCrcTable`: version,
    /// kind and crc per block). A block it holds at a newer version than
    /// this node is copied from it at once (`queue_catch_up`); a block
    /// newer here is the other member's to catch up (its own scrub). Once
    /// every member asked has answered, copies of equal version are
    /// compared by crc (`scrub_compare_crcs`). Blocks written meanwhile
    /// compare at their new versions, so a write in flight is at worst
    /// copied early (the same data, at its version).
    pub(in crate::shard) fn scrub_compare_response(&mut self, h: &Header, payload: &[u8]) {
        if h.op == Op::ListChunks {
            return self.scrub_list_response(h, payload);
        }
        self.scrub_compare_answer(h, payload);
        if self.scrub.probing && self.scrub.compare.waiting.is_empty() {
            self.scrub_probe_done();
        }
    }

    pub(super) fn scrub_compare_answer(&mut self, h: &Header, payload: &[u8]) {
        let seq = h.request_id & 0xffff;
        let round = &mut self.scrub.compare;
        let in_round = h.volume == round.volume && h.offset == round.offset;
        let waited = in_round && round.waiting.contains(&seq);
        if waited {
            round.waiting.retain(|s| *s != seq);
        }
        if h.status != Status::Ok {
            // Busy, moved, behind: the next pass compares again.
            if waited {
                round.complete = false;
            }
            return;
        }
        let blocks = h.length as usize / BLOCK_SIZE;
        let their_states = match StateCrcTable::parse(payload, blocks) {
            Ok(t) if blocks > 0 && blocks <= SCRUB_PIECE_BYTES / BLOCK_SIZE => t,
            _ => {
                if waited {
                    round.complete = false;
                }
                return;
            }
        };
        if waited && blocks == round.blocks {
            let n = round.answers;
            if round.tables.len() <= n {
                round.tables.push(Vec::with_capacity(payload.len()));
            }
            round.tables[n].clear();
            round.tables[n].extend_from_slice(payload);
            round.answers += 1;
        } else if waited {
            round.complete = false;
        }
        let mut local = std::mem::take(&mut self.scrub.states);
        local.clear();
        local.resize(blocks, (BlockKind::Unwritten, 0));
        self.engine.block_states(h.volume, h.offset, &mut local);
        for (i, ((_, version), (their_kind, theirs, _))) in
            local.iter().zip(their_states.iter()).enumerate()
        {
            if their_kind != WireBlockKind::Unwritten && theirs > *version {
                self.scrub_cell().behind.fetch_add(1, Ordering::Relaxed);
                self.counters.add_scrub_difference(ScrubDifference::Behind);
                self.queue_catch_up(h.volume, h.offset + (i * BLOCK_SIZE) as u64, theirs);
            }
        }
        self.scrub.states = local;
        let round = &self.scrub.compare;
        if waited && round.waiting.is_empty() && round.complete {
            self.scrub_compare_crcs();
        }
    }

    /// Every member asked answered for the piece in `scrub.compare`: each
    /// data block held at the same version by this node and all of them
    /// is compared by crc. A copy that differs from members which agree
    /// with each other (two or more) is this node's to fix: it is copied
    /// from them (`queue_catch_up` at that version: the repair rewrites an
    /// equal version). A copy that differs where no two copies agree (or
    /// only one other member answered) is reported, not touched: nothing
    /// says which is right. A copy that agrees with another member while a
    /// third differs is left to the third's own scrub.
    pub(super) fn scrub_compare_crcs(&mut self) {
        let mut round = std::mem::take(&mut self.scrub.compare);
        let mut local = std::mem::take(&mut self.scrub.states);
        let mut crcs = std::mem::take(&mut self.scrub.crcs);
        local.clear();
        local.resize(round.blocks, (BlockKind::Unwritten, 0));
        crcs.clear();
        crcs.resize(round.blocks, 0);
        self.engine
            .block_states(round.volume, round.offset, &mut local);
        self.engine
            .block_crcs(round.volume, round.offset, &mut crcs);
        let answers = &round.tables[..round.answers];
        for (i, ((kind, version), crc)) in local.iter().zip(&crcs).enumerate() {
            if *kind != BlockKind::Data || answers.is_empty() {
                continue;
            }
            let (mut same, mut other, mut others_agree) = (0, 0, true);
            let mut other_crc = None;
            let mut comparable = true;
            for t in answers {
                let their_state = StateCrcTable::parse(t, round.blocks)
                    .ok()
                    .and_then(|t| t.get(i));
                let Some((k, v, c)) = their_state else {
                    comparable = false;
                    break;
                };
                if k != WireBlockKind::Data || v != *version {
                    comparable = false;
                    break;
                }
                if c == *crc {
                    same += 1;
                } else {
                    other += 1;
                    match other_crc {
                        None => other_crc = Some(c),
                        Some(o) if o != c => others_agree = false,
                        Some(_) => {}
                    }
                }
            }
            if !comparable || other == 0 || same > 0 {
                continue;
            }
            let offset = round.offset + (i * BLOCK_SIZE) as u64;
            if other >= 2 && others_agree {
                tracing::warn!(
                    shard = self.id,
                    volume = round.volume,
                    offset,
                    version = *version,
                    "scrub: this copy differs from every other member's (same version, other crc); copying theirs"
                );
                self.scrub_cell().mismatched.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .add_scrub_difference(ScrubDifference::Mismatched);
                self.queue_catch_up(round.volume, offset, *version);
            } else {
                tracing::error!(
                    shard = self.id,
                    volume = round.volume,
                    offset,
                    version = *version,
                    members = answers.len() + 1,
                    "scrub: copies of the same version differ and no two agree; left as they are"
                );
                self.scrub_cell().divergent.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .add_scrub_difference(ScrubDifference::Divergent);
            }
        }
        round.answers = 0;
        self.scrub.compare = round;
        self.scrub.states = local;
        self.scrub.crcs = crcs;
    }
}
