//! A write sent again with the same version (a client or a primary resends
//! it after a lost connection) while the first copy is still on its way to
//! the disk: the engine must not answer the second `Ok` before the first is
//! durable and in the map. Answering at once (the block's planned version
//! already equals the write's) let a node acknowledge a forwarded write
//! whose data was not there yet, and a read right after returned the older
//! block: found by the data simulation (route-change seed 122) once the
//! simulated disks took time to complete.

mod common;

use celer_engine::{AlignedBuf, Completion, EngineOp, EngineRequest, Segment, Shard};
use celer_sim::disk::SimDisk;

const BS: usize = 4096;

fn request(
    op: EngineOp,
    buf: &mut AlignedBuf,
    blocks: u64,
    version: u64,
    tag: u64,
) -> EngineRequest<'static> {
    // The segment list must outlive the request: leaked, a test's few.
    let segs: &'static [Segment] = Box::leak(Box::new([Segment {
        addr: buf.as_mut_ptr(),
        len: blocks as usize * BS,
    }]));
    EngineRequest {
        op,
        volume: 1,
        offset_bytes: 3 * BS as u64,
        len_bytes: blocks * BS as u64,
        segments: segs,
        version,
        epoch: 1,
        tag,
        chain: &[],
        block_crc: None,
    }
}

/// Polls `sh` with simulated time moving 5 µs a step until `tag`
/// completes; the tags completed, in order.
fn run_until(sh: &mut Shard<SimDisk>, disk: &SimDisk, now: &mut u64, tag: u64) -> Vec<u64> {
    let mut seen = Vec::new();
    for _ in 0..100_000 {
        sh.poll(&mut |c: Completion| {
            c.result.expect("request");
            seen.push(c.tag);
        });
        if seen.contains(&tag) {
            return seen;
        }
        *now += 5;
        disk.set_time(*now);
    }
    panic!("request {tag} never completed (saw {seen:?})");
}

#[test]
fn a_write_sent_again_at_its_version_completes_only_after_the_first_copy() {
    for seed in 0..16u64 {
        let disk = SimDisk::new(16 << 20, seed);
        let mut now = 0;
        disk.set_time(now);
        let mut sh = common::one_shard(&disk, seed, 64, 8);
        // The block holds an older write, durable.
        let mut old = AlignedBuf::new(2);
        old[..].fill(0x11);
        let req = request(EngineOp::Write, &mut old, 2, 5, 1);
        // SAFETY: the buffers outlive the requests (the test waits for all).
        unsafe { sh.submit(&req) }.expect("submit");
        run_until(&mut sh, &disk, &mut now, 1);
        // The newer write (two blocks: data and journal record, not the
        // one-write path), and at once its copy at the same version.
        let mut new = AlignedBuf::new(2);
        new[..].fill(0x22);
        let first = request(EngineOp::Write, &mut new, 2, 9, 2);
        let again = request(EngineOp::Write, &mut new, 2, 9, 3);
        // SAFETY: as above.
        unsafe { sh.submit(&first) }.expect("submit");
        sh.poll(&mut |c| panic!("completed before any time passed: {}", c.tag));
        // SAFETY: as above.
        unsafe { sh.submit(&again) }.expect("submit");
        let seen = run_until(&mut sh, &disk, &mut now, 3);
        assert!(
            seen.contains(&2),
            "seed {seed}: the copy completed before the first write ({seen:?})"
        );
        // What a read right after the acknowledgement sees: the new data.
        let mut back = AlignedBuf::new(2);
        let read = request(EngineOp::Read, &mut back, 2, 0, 4);
        // SAFETY: as above.
        unsafe { sh.submit(&read) }.expect("submit");
        run_until(&mut sh, &disk, &mut now, 4);
        assert!(
            back[..] == new[..],
            "seed {seed}: read the older write after the newer one's copy was acknowledged"
        );
    }
}
