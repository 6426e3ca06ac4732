//! `Fill` (flatten, see celer-proto): the head layer of a volume copies
//! the blocks it reads from the layers under it (`EngineOp::Fill`), on
//! every member that takes writes, each from its own copies of those
//! layers. A member whose copies of the lower layers may be incomplete (a
//! backfill or a catch-up is running for the partition) would copy less,
//! or older blocks: while the partition has such a member the fill is
//! refused (`Busy`) and the client asks again. Members that stayed record
//! the range for a down member's catch-up, as for a write.

use celer_engine::{EngineError, EngineOp, EngineRequest, Segment, BLOCK_SIZE};
use celer_proto::{payload, Header, Status};

use super::layers::Target;
use super::{engine_status, OpKind, ShardLoop};

impl<D: celer_engine::Disk, N: crate::net::Net> ShardLoop<D, N> {
    pub(super) fn start_fill(&mut self, c: usize, h: &Header) {
        let block = BLOCK_SIZE as u64;
        if h.payload_bytes != 0
            || !h.offset.is_multiple_of(block)
            || !(h.length as u64).is_multiple_of(block)
            || h.length as u64 > self.engine.max_request_bytes()
        {
            return self.reject(c, h, Status::Invalid);
        }
        let p = match self.check_route(h) {
            Ok((p, _, _)) => p,
            Err(s) => return self.reject(c, h, s),
        };
        let settled = self
            .table()
            .and_then(|t| t.partition(p))
            .is_some_and(|part| part.writers().all(|m| m.in_sync));
        if !settled {
            return self.reject(c, h, Status::Busy);
        }
        let target = match self.fill_target(h) {
            Ok(Some(t)) => t,
            // No layer under the head: nothing to copy.
            Ok(None) => return self.respond(c, h, Status::Ok, &[&payload::encode_fill_answer(0)]),
            Err(s) => return self.reject(c, h, s),
        };
        if !self.catch_ups.is_empty() {
            // A down member misses the copy: its catch-up reads the range
            // of the head (the engine key) from a member that has it.
            self.catch_up_record(p, target.key, h.offset, h.length as u64);
        }
        let len = h.length as usize;
        let id = self.take_op(c, h, OpKind::Fill, len);
        let segs = [Segment {
            addr: self.ops[id].buf.as_mut_ptr(),
            len,
        }];
        let req = EngineRequest {
            op: EngineOp::Fill,
            volume: target.key,
            offset_bytes: h.offset,
            len_bytes: len as u64,
            segments: &segs,
            version: 0,
            epoch: h.epoch,
            tag: id as u64,
            chain: target.chain(),
            block_crc: None,
        };
        self.ops[id].pending = 1;
        // SAFETY: the op's buffer lives in the slab until the op finishes.
        if let Err(e) = unsafe { self.engine.submit(&req) } {
            self.ops[id].pending = 0;
            self.ops[id].status = engine_status(&e);
            if matches!(e, EngineError::Io { .. }) {
                self.shared
                    .report_failure(format!("engine shard {}: {e}", self.id));
                self.ops[id].status = Status::Unavailable;
            }
            self.finish_op(id);
        }
    }

    /// The head a fill names (its `snapshot` field), with the layers under
    /// it; `None` when the volume has none.
    fn fill_target(&self, h: &Header) -> Result<Option<Target>, Status> {
        let t = self.write_target(h)?;
        if t.stale {
            // The era a snapshot of the volume is cutting: the head moved on.
            return Err(Status::StaleSnapshot);
        }
        Ok((!t.chain().is_empty()).then_some(t))
    }
}
