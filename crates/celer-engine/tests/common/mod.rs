//! Test helpers: synchronous wrappers over a shard, and block patterns.
#![allow(dead_code)]

use std::path::Path;

use celer_engine::{
    AlignedBuf, Completion, EngineError, EngineOp, EngineRequest, FormatOptions, Segment, Shard,
};

pub const BS: usize = 4096;

pub fn small_format(shards: u32, size_bytes: u64) -> FormatOptions {
    FormatOptions {
        chunk_blocks: 16,
        spare_blocks: 4,
        shard_count: shards,
        journal_blocks: 32,
        create_size_bytes: Some(size_bytes),
    }
}

/// Deterministic content of a block written with `seed`.
pub fn pattern(seed: u64, block: u64, out: &mut [u8]) {
    let mut x = seed ^ block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5555;
    for w in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
}

pub fn seg(buf: &mut AlignedBuf, at: usize, len: usize) -> Segment {
    assert!(at + len <= buf.len());
    // SAFETY: in bounds of buf.
    Segment {
        addr: unsafe { buf.as_mut_ptr().add(at) },
        len,
    }
}

pub fn run_one(shard: &mut Shard, req: &EngineRequest<'_>) -> Result<u32, EngineError> {
    // SAFETY: the buffers outlive the wait below.
    unsafe { shard.submit(req)? };
    let mut out = None;
    while out.is_none() {
        shard.wait(&mut |c: Completion| {
            assert_eq!(c.tag, req.tag);
            out = Some(c.result);
        });
    }
    out.expect("completion")
}

pub fn write(
    shard: &mut Shard,
    volume: u64,
    offset: u64,
    data: &mut AlignedBuf,
    version: u64,
) -> Result<u32, EngineError> {
    let len = data.len();
    let s = [seg(data, 0, len)];
    let req = EngineRequest {
        op: EngineOp::Write,
        volume,
        offset_bytes: offset,
        len_bytes: len as u64,
        segments: &s,
        version,
        epoch: 1,
        tag: 7,
        chain: &[],
        block_crc: None,
    };
    run_one(shard, &req)
}

pub fn read(
    shard: &mut Shard,
    volume: u64,
    offset: u64,
    blocks: usize,
) -> Result<AlignedBuf, EngineError> {
    let mut buf = AlignedBuf::new(blocks);
    buf.fill(0xEE);
    let s = [seg(&mut buf, 0, blocks * BS)];
    let req = EngineRequest {
        op: EngineOp::Read,
        volume,
        offset_bytes: offset,
        len_bytes: 0,
        segments: &s,
        version: 0,
        epoch: 0,
        tag: 9,
        chain: &[],
        block_crc: None,
    };
    run_one(shard, &req)?;
    Ok(buf)
}

pub fn zero(
    shard: &mut Shard,
    op: EngineOp,
    volume: u64,
    offset: u64,
    blocks: usize,
    version: u64,
) -> Result<u32, EngineError> {
    let req = EngineRequest {
        op,
        volume,
        offset_bytes: offset,
        len_bytes: (blocks * BS) as u64,
        segments: &[],
        version,
        epoch: 1,
        tag: 11,
        chain: &[],
        block_crc: None,
    };
    run_one(shard, &req)
}

pub fn temp_disk(dir: &Path, name: &str) -> std::path::PathBuf {
    dir.join(name)
}
