//! A small write alone in its shard (QD1) goes to disk as one device write,
//! its records and its data together: a 4.5 KiB compact entry (format 3),
//! or on a disk that takes only whole 4 KiB direct I/O, its journal block
//! and a data block (8 KiB, as format 2); the data moves to
//! its slot afterwards with a plain write (moves go out in batches of 8;
//! meanwhile a read takes the data from the journal buffer). A power cut
//! that loses the move, or comes before it, must not lose the acknowledged
//! write: the next open copies the data from the journal.

mod common;

use celer_engine::{AlignedBuf, Completion, Engine, EngineOp, EngineRequest, Segment, Shard};
use celer_sim::disk::SimDisk;

const BS: usize = 4096;

fn pattern(seed: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = (seed as usize * 131 + i * 7 + i / 512) as u8;
    }
}

/// Runs `op` on block 3 of volume 1 (one block) and waits for it.
fn one_block(sh: &mut Shard<SimDisk>, op: EngineOp, buf: &mut AlignedBuf, version: u64) {
    let segs = [Segment {
        addr: buf.as_mut_ptr(),
        len: BS,
    }];
    let req = EngineRequest {
        op,
        volume: 1,
        offset_bytes: 3 * BS as u64,
        len_bytes: BS as u64,
        segments: &segs,
        version,
        epoch: 1,
        tag: version,
        chain: &[],
        block_crc: None,
    };
    // SAFETY: `buf` outlives the wait for this request's completion.
    unsafe { sh.submit(&req) }.expect("submit");
    let mut done = None;
    while done.is_none() {
        sh.wait(&mut |c: Completion| {
            assert_eq!(c.tag, version);
            done = Some(c.result.expect("request"));
        });
    }
    assert_eq!(done, Some(1));
}

#[test]
fn a_qd1_write_is_one_device_write_and_survives_losing_its_move() {
    let mut moved_at_open = 0;
    for seed in 0..24u64 {
        let disk = SimDisk::new(16 << 20, seed);
        disk.keep_log();
        // Every third seed: a disk of 4 KiB logical sectors.
        let entry = if seed % 3 == 2 {
            disk.set_4k_sectors();
            " 8192 bytes dsync"
        } else {
            " 4608 bytes dsync"
        };
        let mut shards = vec![common::one_shard(&disk, seed, 64, 8)];
        let mut data = AlignedBuf::new(1);
        // The first write allocates the chunk; the second is the one
        // checked (both take the same path).
        pattern(seed + 1000, &mut data[..]);
        one_block(&mut shards[0], EngineOp::Write, &mut data, 1);
        pattern(seed, &mut data[..]);
        let before = disk.log().len();
        one_block(&mut shards[0], EngineOp::Write, &mut data, 2);
        let written = disk.log()[before..].to_vec();
        // (The first write's move is still queued: moves go in batches.)
        assert!(
            written.len() == 1 && written[0].ends_with(entry),
            "seed {seed}: one device write, the journal block and the data, durable, before the acknowledgement: {written:?}"
        );
        // Read back at once: served from the journal buffer (the move is
        // queued), no device write.
        let mut back = AlignedBuf::new(1);
        one_block(&mut shards[0], EngineOp::Read, &mut back, 3);
        assert!(back[..] == data[..], "seed {seed}: read before the move");
        assert_eq!(disk.log().len(), before + 1, "seed {seed}: the read wrote");
        if seed % 2 == 0 {
            // Six more QD1 writes fill a batch of moves, which goes out
            // and completes, never flushed (the first write's move is
            // dropped: the second replaced its block). Otherwise the power
            // goes with the moves queued.
            for b in 4..10u64 {
                let mut other = AlignedBuf::new(1);
                pattern(seed * 100 + b, &mut other[..]);
                let segs = [Segment {
                    addr: other.as_mut_ptr(),
                    len: BS,
                }];
                let req = EngineRequest {
                    op: EngineOp::Write,
                    volume: 1,
                    offset_bytes: b * BS as u64,
                    len_bytes: BS as u64,
                    segments: &segs,
                    version: 10 + b,
                    epoch: 1,
                    tag: 10 + b,
                    chain: &[],
                    block_crc: None,
                };
                // SAFETY: `other` outlives the wait below.
                unsafe { shards[0].submit(&req) }.expect("submit");
                let mut done = false;
                while !done {
                    shards[0].wait(&mut |c: Completion| done = c.result.is_ok());
                }
            }
            shards[0].wait(&mut |_| {}); // the moves
            let after = &disk.log()[before..];
            let pairs = after.iter().filter(|l| l.ends_with(entry)).count();
            let moves = after.iter().filter(|l| l.ends_with(" 4096 bytes")).count();
            assert_eq!(
                (pairs, moves, after.len()),
                (7, 7, 14),
                "seed {seed}: one device write per write, then the batch of moves: {after:?}"
            );
        }
        disk.crash();
        drop(shards);
        let engine = Engine::open_on(disk.clone(), &common::open_options(8)).expect("reopen");
        moved_at_open += engine.recovery_report().journal_data_moved;
        let mut shards = engine.into_shards();
        let mut back = AlignedBuf::new(1);
        one_block(&mut shards[0], EngineOp::Read, &mut back, 5);
        assert!(
            back[..] == data[..],
            "seed {seed}: the acknowledged write did not survive the power cut"
        );
    }
    // Of 24 power cuts, those that lost part of the 8 sectors of a move
    // needed the journal's copy (a move survives a cut with chance 1/256).
    assert!(
        moved_at_open >= 12,
        "the open copied only {moved_at_open} moves from the journal"
    );
}
