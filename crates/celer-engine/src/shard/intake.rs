//! Request intake: a request is checked (alignment, range, shard,
//! segments) and becomes an op, then starts.

use super::*;

impl<D: Disk> Shard<D> {
    /// Submits a request; its completion comes from `poll`/`wait`.
    ///
    /// # Safety
    /// Every segment must be valid for reads (Write) or writes (Read) of its
    /// length until the completion carrying `req.tag` has been returned.
    pub unsafe fn submit(&mut self, req: &EngineRequest<'_>) -> Result<(), EngineError> {
        let chunk_bytes = self.g.chunk_bytes();
        let len_bytes = match req.op {
            EngineOp::Read | EngineOp::Write | EngineOp::Repair | EngineOp::Fill => {
                if req.segments.len() > SEGMENTS_MAX {
                    return Err(EngineError::TooManySegments {
                        count: req.segments.len(),
                        max: SEGMENTS_MAX,
                    });
                }
                if req
                    .segments
                    .iter()
                    .any(|s| !(s.addr as usize).is_multiple_of(512) || s.len % 512 != 0)
                {
                    let len_bytes = req.segments.iter().map(|s| s.len as u64).sum();
                    return Err(EngineError::Misaligned {
                        offset_bytes: req.offset_bytes,
                        len_bytes,
                    });
                }
                req.segments.iter().map(|s| s.len as u64).sum()
            }
            EngineOp::WriteZeroes | EngineOp::Discard | EngineOp::Release | EngineOp::Forget => {
                req.len_bytes
            }
        };
        if req.chain.len() > LAYERS_MAX {
            return Err(EngineError::BadRange {
                offset_bytes: req.offset_bytes,
                len_bytes,
                max_bytes: 0,
            });
        }
        let in_block = req.offset_bytes % BLOCK_SIZE_U64;
        // A sector write: 512-byte sectors within one block, merged here.
        let sectors = req.op == EngineOp::Write
            && (in_block != 0 || !len_bytes.is_multiple_of(BLOCK_SIZE_U64))
            && in_block.is_multiple_of(512)
            && len_bytes.is_multiple_of(512)
            && in_block + len_bytes <= BLOCK_SIZE_U64;
        if !sectors
            && (in_block != 0 || !len_bytes.is_multiple_of(BLOCK_SIZE_U64) || len_bytes == 0)
        {
            return Err(EngineError::Misaligned {
                offset_bytes: req.offset_bytes,
                len_bytes,
            });
        }
        let max_bytes = match req.op {
            EngineOp::Read | EngineOp::Write | EngineOp::Repair | EngineOp::Fill => {
                self.max_request_bytes()
            }
            _ => chunk_bytes,
        };
        let chunk = req.offset_bytes / chunk_bytes;
        let in_chunk = req.offset_bytes % chunk_bytes;
        let partial_release =
            req.op == EngineOp::Release && (in_chunk != 0 || len_bytes != chunk_bytes);
        if len_bytes > max_bytes || in_chunk + len_bytes > chunk_bytes || partial_release {
            return Err(EngineError::BadRange {
                offset_bytes: req.offset_bytes,
                len_bytes,
                max_bytes,
            });
        }
        let owner = shard_for(&self.g, req.volume, chunk);
        if owner != self.id {
            return Err(EngineError::WrongShard {
                volume: req.volume,
                chunk,
                owner,
                shard: self.id,
            });
        }
        if let Some(e) = &self.failed {
            return Err(EngineError::Io {
                volume: req.volume,
                offset_bytes: req.offset_bytes,
                errno_text: e.clone(),
            });
        }
        let Some(id) = self.free_ops.pop() else {
            return Err(EngineError::QueueFull {
                inflight_max: self.ops.len(),
            });
        };
        let op = &mut self.ops[id as usize];
        op.tag = req.tag;
        op.op = req.op;
        op.volume = req.volume;
        op.chunk = chunk;
        op.first = (in_chunk / BLOCK_SIZE_U64) as u16;
        op.count = if sectors {
            1
        } else {
            (len_bytes / BLOCK_SIZE_U64) as u16
        };
        op.sub_at = if sectors { in_block as u16 } else { 0 };
        op.sub_len = if sectors { len_bytes as u16 } else { 0 };
        op.holding = false;
        op.merged = false;
        self.submitted += 1;
        op.seq = self.submitted;
        op.cursor = 0;
        op.version = req.version;
        op.epoch = req.epoch;
        // Only a write of exactly one whole block: its data is the block.
        op.given_crc = req
            .block_crc
            .filter(|_| req.op == EngineOp::Write && !sectors && len_bytes == BLOCK_SIZE_U64);
        op.segs.clear();
        op.segs.extend_from_slice(req.segments);
        op.chain.clear();
        op.chain.extend_from_slice(req.chain);
        op.layer_slots.clear();
        op.pending = 0;
        op.applied = 0;
        op.newer_version = 0;
        op.error = None;
        op.solo = false;
        op.jbufs.clear();
        op.local_slot = u32::MAX;
        op.stage = Stage::Idle;
        self.stats.ops += 1;
        self.start(id);
        Ok(())
    }
}
