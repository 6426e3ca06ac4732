//! Repair of damaged blocks from a good copy.
//!
//! A block whose crc fails when this shard reads it (a client read, or a
//! backfill this node serves) is queued here. One at a time per block, the
//! shard asks another in-sync member of the block's partition for it
//! (`BackfillRead` of one block: its state — version and kind — and its
//! data, crc-checked by that member's engine), writes it with
//! `EngineOp::Repair` at the member's version, then reads its own copy back.
//!
//! `Repair` writes a block whose version is not newer than the good copy's,
//! so a copy with the same version is rewritten; a client write that came
//! first (newer version) wins, so a repair never races a client write. The
//! read-back decides: a block that reads correctly is done (repaired, or
//! superseded by a newer write); one that still fails is asked of the next
//! member. A block no member holds correctly is logged by volume and offset
//! and counted, never zeroed.
//!
//! Bounded: at most `REPAIRS_MAX` blocks queued per shard (more are
//! dropped and counted: the next read of them queues them again), and at
//! most `REPAIRS_RUNNING` fetched at once.

use std::time::{Duration, Instant};

use celer_engine::{
    AlignedBuf, BlockKind, Completion, EngineError, EngineOp, EngineRequest, Segment, BLOCK_SIZE,
};
use celer_proto::payload::BackfillAnswer;
use celer_proto::{Header, Op, Status};
use celer_route::NodeId;

use super::{engine_kind, ShardLoop, REQ_BACKFILL};
use crate::AgentMsg;

/// Request-id bits of a repair's `BackfillRead` (within `REQ_BACKFILL`).
pub(super) const REQ_REPAIR: u32 = REQ_BACKFILL | 1 << 30;
/// Engine tags at or above this are a repair's write or read-back.
pub(super) const TAG_REPAIR: u64 = 1 << 41;
/// Blocks queued for repair per shard (room for two scrub pieces' worth of
/// blocks found behind).
pub(super) const REPAIRS_MAX: usize = 128;
/// Repairs fetching or writing at once per shard.
const REPAIRS_RUNNING: usize = 4;
/// A member that does not answer within this is skipped.
const REPAIR_ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// A block found unrepairable is not tried again for this long (reads of it
/// keep failing; each would otherwise ask every member again).
const UNREPAIRABLE_QUIET: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    /// Ask the next member.
    Fetch,
    /// Waiting for member `source`'s answer.
    Waiting,
    /// The good copy is being written.
    Writing,
    /// Reading our copy back.
    Verifying,
}

/// One damaged block (a block of `BLOCK_SIZE` bytes at `offset`).
pub(super) struct Repair {
    serial: u32,
    volume: u64,
    offset: u64,
    stage: Stage,
    /// Members asked so far (they refused, failed or held no good copy).
    tried: Vec<NodeId>,
    source: NodeId,
    conn: Option<(usize, u32)>,
    seq: u32,
    sent_at: Instant,
    /// The good copy's version.
    version: u64,
    /// A member holds this version (or newer): a copy older than it is
    /// not taken (0: any good copy; see `queue_catch_up`).
    at_least: u64,
    buf: AlignedBuf,
    /// Not before this (a member was busy, or the engine queue full).
    retry_at: Option<Instant>,
}

/// What a repair came to (the `result` label of `celer_node_repairs`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum RepairResult {
    /// Rewritten from a good copy and read back correctly.
    Repaired,
    /// A newer client write replaced the block meanwhile: nothing to do.
    Superseded,
    /// No member holds the block correctly.
    Unrepairable,
    /// Not queued: the queue was full.
    Dropped,
}

impl<D: celer_engine::Disk, N: crate::net::Net> ShardLoop<D, N> {
    /// Queues the block at `offset` of `volume` for repair (once).
    pub(super) fn queue_repair(&mut self, volume: u64, offset: u64) {
        self.queue_block(volume, offset, 0);
    }

    /// Queues the block at `offset` of `volume`, which another in-sync
    /// member holds at `version`, newer than ours (a write this node missed:
    /// a client that died between replicas, a write refused here by a
    /// fence that another member took): it is fetched from a member that
    /// holds that version or a newer one.
    pub(super) fn queue_catch_up(&mut self, volume: u64, offset: u64, version: u64) {
        if let Some(r) = self
            .repairs
            .iter_mut()
            .find(|r| r.volume == volume && r.offset == offset)
        {
            r.at_least = r.at_least.max(version);
            return;
        }
        self.queue_block(volume, offset, version);
    }

    fn queue_block(&mut self, volume: u64, offset: u64, at_least: u64) {
        let offset = offset - offset % BLOCK_SIZE as u64;
        let now = self.net.now();
        self.unrepairable.retain(|u| u.2 > now);
        if self
            .repairs
            .iter()
            .any(|r| r.volume == volume && r.offset == offset)
            || self
                .unrepairable
                .iter()
                .any(|u| u.0 == volume && u.1 == offset)
        {
            return;
        }
        if self.repairs.len() >= REPAIRS_MAX {
            self.counters.repair(RepairResult::Dropped);
            return;
        }
        self.repair_serial = self.repair_serial.wrapping_add(1);
        if at_least == 0 {
            tracing::warn!(
                shard = self.id,
                volume,
                offset,
                "block failed its checksum here: repairing it from another member"
            );
        } else {
            tracing::warn!(
                shard = self.id,
                volume,
                offset,
                version = at_least,
                "another member holds a newer version of this block: copying it"
            );
        }
        self.repairs.push(Repair {
            serial: self.repair_serial,
            volume,
            offset,
            stage: Stage::Fetch,
            tried: Vec::new(),
            source: 0,
            conn: None,
            seq: 0,
            sent_at: self.net.now(),
            version: 0,
            at_least,
            buf: AlignedBuf::new(1),
            retry_at: None,
        });
    }

    /// Repairs waiting for a timer, or with work to start.
    pub(super) fn repairs_pending(&self) -> bool {
        !self.repairs.is_empty()
    }

    /// Starts fetches, times out silent members. Called every loop pass.
    pub(super) fn repair_step(&mut self) {
        if self.repairs.is_empty() {
            return;
        }
        let now = self.net.now();
        let mut running = self
            .repairs
            .iter()
            .filter(|r| r.stage != Stage::Fetch)
            .count();
        let mut i = 0;
        while i < self.repairs.len() {
            let r = &mut self.repairs[i];
            if r.stage == Stage::Waiting && now.duration_since(r.sent_at) > REPAIR_ANSWER_TIMEOUT {
                tracing::warn!(
                    volume = r.volume,
                    offset = r.offset,
                    node = r.source,
                    "repair: no answer from the member; asking the next"
                );
                r.tried.push(r.source);
                r.stage = Stage::Fetch;
                running -= 1;
            }
            if r.stage == Stage::Fetch
                && running < REPAIRS_RUNNING
                && r.retry_at.is_none_or(|t| now >= t)
            {
                r.retry_at = None;
                match self.repair_fetch(i) {
                    Ok(true) => running += 1,
                    Ok(false) => {}
                    Err(()) => {
                        // No member left to ask: removed.
                        continue;
                    }
                }
            }
            i += 1;
        }
    }

    /// Asks the next in-sync member for repair `i`'s block. `Ok(false)`: not
    /// now (no route, no connection); `Err`: no member left, the repair is
    /// finished as unrepairable.
    fn repair_fetch(&mut self, i: usize) -> Result<bool, ()> {
        let me = self.shared.id;
        let (volume, offset) = (self.repairs[i].volume, self.repairs[i].offset);
        let Some((p, epoch, source)) = self.table().map(|t| {
            let p = t.partition_at(volume, offset);
            let source = t.partition(p).and_then(|part| {
                part.members
                    .iter()
                    .find(|m| m.in_sync && m.node != me && !self.repairs[i].tried.contains(&m.node))
                    .map(|m| m.node)
            });
            (p, t.epoch, source)
        }) else {
            self.repairs[i].retry_at = Some(self.net.now() + Duration::from_millis(100));
            return Ok(false);
        };
        let Some(source) = source else {
            let r = self.repairs.swap_remove(i);
            if r.at_least > 0 {
                // Our copy reads fine; the newer one is gone from every
                // member asked (moved, or replaced by then).
                tracing::info!(
                    shard = self.id,
                    volume = r.volume,
                    offset = r.offset,
                    "no member holds the newer version any more"
                );
                self.counters.repair(RepairResult::Superseded);
                return Err(());
            }
            tracing::error!(
                shard = self.id,
                volume = r.volume,
                offset = r.offset,
                asked = ?r.tried,
                "block is damaged here and no other member holds a good copy: \
                 reads of it fail with a checksum error until it is rewritten"
            );
            self.counters.repair(RepairResult::Unrepairable);
            if self.unrepairable.len() < REPAIRS_MAX {
                self.unrepairable
                    .push((r.volume, r.offset, self.net.now() + UNREPAIRABLE_QUIET));
            }
            return Err(());
        };
        let conn = match self.repairs[i].conn {
            Some((c, g))
                if self.repairs[i].source == source
                    && self.conns[c].as_ref().is_some_and(|x| x.gen == g) =>
            {
                c
            }
            _ => match self.peer_conn(source, p) {
                Some(c) => c,
                None => {
                    // Unreachable now: the next member.
                    self.repairs[i].tried.push(source);
                    return Ok(false);
                }
            },
        };
        let gen = self.conns[conn].as_ref().map_or(0, |x| x.gen);
        self.repair_seq = (self.repair_seq + 1) & 0xffff;
        let r = &mut self.repairs[i];
        r.source = source;
        r.conn = Some((conn, gen));
        r.seq = self.repair_seq;
        r.sent_at = self.net.now();
        r.stage = Stage::Waiting;
        let mut h = Header::request(Op::BackfillRead, REQ_REPAIR | r.seq);
        h.epoch = epoch;
        h.volume = volume;
        h.offset = offset;
        h.length = BLOCK_SIZE as u32;
        if let Some(c) = self.conns[conn].as_mut() {
            c.queue(h, &[]);
        }
        self.mark_dirty(conn);
        Ok(true)
    }

    /// A member's answer to a repair's `BackfillRead`.
    pub(super) fn repair_response(&mut self, c: usize, h: &Header, payload: &[u8]) {
        let Some(i) = self.repairs.iter().position(|r| {
            r.stage == Stage::Waiting
                && h.request_id == REQ_REPAIR | r.seq
                && r.conn.is_some_and(|(rc, _)| rc == c)
        }) else {
            return; // timed out since
        };
        let r = &mut self.repairs[i];
        match h.status {
            Status::Ok => {}
            Status::StaleEpoch | Status::RouteBehind | Status::Busy => {
                // Ask the same member again once routes settle.
                if h.status == Status::StaleEpoch {
                    self.shared.tell_agent(AgentMsg::NeedRoute(h.epoch + 1));
                }
                r.stage = Stage::Fetch;
                r.retry_at = Some(self.net.now() + Duration::from_millis(50));
                return;
            }
            s => {
                // Checksum (its copy is bad too), NotInSync, ...: the next.
                tracing::info!(
                    volume = r.volume,
                    offset = r.offset,
                    node = r.source,
                    status = ?s,
                    "repair: the member has no good copy; asking the next"
                );
                r.tried.push(r.source);
                r.stage = Stage::Fetch;
                return;
            }
        }
        // One block: its state, then its data.
        let answer = BackfillAnswer::parse(payload, BLOCK_SIZE).ok();
        let Some(((kind, version), data)) = answer.and_then(|a| Some((a.states.get(0)?, a.data)))
        else {
            r.tried.push(r.source);
            r.stage = Stage::Fetch;
            return;
        };
        match engine_kind(kind) {
            BlockKind::Data => r.buf[..BLOCK_SIZE].copy_from_slice(data),
            // Written as a data block of zeroes at its version (the same
            // bytes; a repair is rare).
            BlockKind::Zero => r.buf[..BLOCK_SIZE].fill(0),
            BlockKind::Unwritten => {
                r.tried.push(r.source);
                r.stage = Stage::Fetch;
                return;
            }
        }
        if version == 0 || version < r.at_least {
            r.tried.push(r.source);
            r.stage = Stage::Fetch;
            return;
        }
        r.version = version;
        self.repair_submit(i, EngineOp::Repair);
    }

    /// Whether repair `i`'s block holds the version it wrote, or a newer
    /// one (true when its write was skipped for a newer version).
    fn repair_took(&self, i: usize) -> bool {
        let r = &self.repairs[i];
        if r.version == 0 {
            return true;
        }
        let mut state = [(BlockKind::Unwritten, 0u64)];
        self.engine.block_states(r.volume, r.offset, &mut state);
        state[0].0 != BlockKind::Unwritten && state[0].1 >= r.version
    }

    /// Submits repair `i`'s write (`EngineOp::Repair`) or read-back.
    fn repair_submit(&mut self, i: usize, op: EngineOp) {
        let epoch = self.table().map_or(0, |t| t.epoch);
        let r = &mut self.repairs[i];
        let segs = [Segment {
            addr: r.buf.as_mut_ptr(),
            len: BLOCK_SIZE,
        }];
        let req = EngineRequest {
            op,
            volume: r.volume,
            offset_bytes: r.offset,
            len_bytes: BLOCK_SIZE as u64,
            segments: &segs,
            version: if op == EngineOp::Repair { r.version } else { 0 },
            epoch,
            tag: TAG_REPAIR | r.serial as u64,
            chain: &[],
            block_crc: None,
        };
        // SAFETY: the buffer belongs to the repair, which stays in
        // `self.repairs` until this request completes.
        match unsafe { self.engine.submit(&req) } {
            Ok(()) => {
                r.stage = if op == EngineOp::Repair {
                    Stage::Writing
                } else {
                    Stage::Verifying
                };
            }
            Err(EngineError::QueueFull { .. }) => {
                // Fetch again later (the copy may be newer by then).
                r.stage = Stage::Fetch;
                r.retry_at = Some(self.net.now() + Duration::from_millis(10));
            }
            Err(e) => {
                tracing::warn!(volume = r.volume, offset = r.offset, "repair: {e}");
                r.tried.push(r.source);
                r.stage = Stage::Fetch;
            }
        }
    }

    /// A repair's engine write or read-back completed.
    pub(super) fn repair_done(&mut self, c: Completion) {
        let serial = (c.tag & 0xffff_ffff) as u32;
        let Some(i) = self.repairs.iter().position(|r| r.serial == serial) else {
            return;
        };
        match self.repairs[i].stage {
            Stage::Writing => {
                if let Err(e) = &c.result {
                    let r = &mut self.repairs[i];
                    tracing::warn!(volume = r.volume, offset = r.offset, "repair write: {e}");
                    r.tried.push(r.source);
                    r.stage = Stage::Fetch;
                    return;
                }
                // Written, or skipped for a newer version: read it back.
                let superseded = c.newer_version > 0;
                if superseded {
                    // Remember for the verdict (version 0: not ours).
                    self.repairs[i].version = 0;
                }
                self.repair_submit(i, EngineOp::Read);
            }
            Stage::Verifying => match c.result {
                Ok(_) if !self.repair_took(i) => {
                    // Read back, but not at the version written (the write
                    // was dropped): not repaired; the next member.
                    let r = &mut self.repairs[i];
                    tracing::warn!(
                        volume = r.volume,
                        offset = r.offset,
                        node = r.source,
                        version = r.version,
                        "repair: the copy was not stored at its version; asking the next member"
                    );
                    r.tried.push(r.source);
                    r.stage = Stage::Fetch;
                }
                Ok(_) => {
                    let r = self.repairs.swap_remove(i);
                    let result = if r.version == 0 {
                        RepairResult::Superseded
                    } else {
                        RepairResult::Repaired
                    };
                    tracing::info!(
                        shard = self.id,
                        volume = r.volume,
                        offset = r.offset,
                        from = r.source,
                        version = r.version,
                        ?result,
                        "block repaired"
                    );
                    self.counters.repair(result);
                }
                Err(e) => {
                    // Still bad: that member's copy was older than ours
                    // (skipped), or the write did not take. The next one.
                    let r = &mut self.repairs[i];
                    tracing::warn!(
                        volume = r.volume,
                        offset = r.offset,
                        node = r.source,
                        "repair: the block still reads wrong ({e}); asking the next member"
                    );
                    r.tried.push(r.source);
                    r.stage = Stage::Fetch;
                }
            },
            _ => {}
        }
    }
}
