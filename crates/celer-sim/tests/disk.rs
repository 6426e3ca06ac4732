//! The simulated disk's crash model: what survives a power cut.

use celer_engine::{Disk, DiskIo, DiskQueue, IoBufs};
use celer_sim::disk::SimDisk;

const BS: usize = 4096;

fn write_io(buf: &[u8], offset: u64, dsync: bool) -> DiskIo {
    DiskIo::Write {
        bufs: IoBufs::One {
            addr: buf.as_ptr() as *mut u8,
            len: buf.len() as u32,
        },
        offset,
        dsync,
    }
}

/// Submits until every pushed I/O completed; returns (user_data, result)
/// in completion order.
fn complete_all(q: &mut impl DiskQueue, n: usize) -> Vec<(u64, i32)> {
    let mut out = Vec::new();
    while out.len() < n {
        q.submit(1).expect("submit");
        while let Some(c) = q.next_completion() {
            out.push(c);
        }
    }
    out
}

fn block_at(disk: &SimDisk, offset: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    disk.peek(offset, &mut b);
    b
}

#[test]
fn a_dsync_write_survives_every_crash_and_a_plain_one_needs_a_later_fsync() {
    for seed in 0..64 {
        let disk = SimDisk::new(1 << 20, seed);
        let mut q = disk.queue(false).expect("queue");
        let dsync = vec![1u8; BS];
        let plain = vec![2u8; BS];
        let synced = vec![3u8; BS];
        // SAFETY: the buffers outlive the completions awaited below.
        unsafe {
            q.push(&write_io(&dsync, 0, true), 1);
            q.push(&write_io(&plain, BS as u64, false), 2);
            q.push(&write_io(&synced, 2 * BS as u64, false), 3);
        }
        let done = complete_all(&mut q, 3);
        assert!(done.iter().all(|&(_, r)| r == BS as i32), "{done:?}");
        // Only now (all three completed) does an fsync cover `synced`
        // and `plain`; then `plain` is written again, not synced.
        // SAFETY: no buffer.
        unsafe { q.push(&DiskIo::Fsync, 4) };
        assert_eq!(complete_all(&mut q, 1), vec![(4, 0)]);
        let again = vec![4u8; BS];
        // SAFETY: `again` outlives the completion.
        unsafe { q.push(&write_io(&again, BS as u64, false), 5) };
        complete_all(&mut q, 1);
        assert_eq!(
            block_at(&disk, BS as u64),
            again,
            "reads see completed writes"
        );
        disk.crash();
        assert_eq!(
            block_at(&disk, 0),
            dsync,
            "seed {seed}: RWF_DSYNC write lost"
        );
        assert_eq!(
            block_at(&disk, 2 * BS as u64),
            synced,
            "seed {seed}: fsynced write lost"
        );
        let b = block_at(&disk, BS as u64);
        for s in b.chunks(512) {
            assert!(
                s == &plain[..512] || s == &again[..512],
                "seed {seed}: a sector neither the synced nor the later content"
            );
        }
    }
}

#[test]
fn an_fsync_covers_only_writes_completed_before_it_was_issued() {
    let mut lost = 0;
    for seed in 0..64 {
        let disk = SimDisk::new(1 << 20, seed);
        let mut q = disk.queue(false).expect("queue");
        let data = vec![7u8; BS];
        // The fsync is queued while the write is still in flight.
        // SAFETY: `data` outlives the completions.
        unsafe {
            q.push(&write_io(&data, 0, false), 1);
            q.push(&DiskIo::Fsync, 2);
        }
        complete_all(&mut q, 2);
        disk.crash();
        if block_at(&disk, 0) != data {
            lost += 1;
        }
    }
    assert!(lost > 0, "a write the fsync did not cover always survived");
}

#[test]
fn a_crash_tears_writes_in_flight_by_sector_and_drops_their_completions() {
    let mut torn = 0;
    for seed in 0..64 {
        let disk = SimDisk::new(1 << 20, seed);
        let mut q = disk.queue(false).expect("queue");
        let data = vec![9u8; 4 * BS];
        // SAFETY: `data` outlives the crash, which reads it.
        unsafe { q.push(&write_io(&data, 0, true), 1) };
        disk.crash();
        assert_eq!(
            q.next_completion(),
            None,
            "a crashed queue completes nothing"
        );
        let mut after = vec![0u8; 4 * BS];
        disk.peek(0, &mut after);
        let landed = after
            .chunks(512)
            .filter(|s| s.iter().all(|b| *b == 9))
            .count();
        assert!(
            after
                .chunks(512)
                .all(|s| s.iter().all(|b| *b == 9) || s.iter().all(|b| *b == 0)),
            "seed {seed}: a sector half written"
        );
        if landed > 0 && landed < 32 {
            torn += 1;
        }
    }
    assert!(torn > 0, "no write was ever torn");
}

#[test]
fn reads_and_writes_beyond_the_disk_fail_with_einval() {
    let disk = SimDisk::new(1 << 20, 1);
    let mut q = disk.queue(false).expect("queue");
    let data = vec![1u8; BS];
    // SAFETY: `data` outlives the completion.
    unsafe { q.push(&write_io(&data, (1 << 20) - 512, false), 1) };
    assert_eq!(complete_all(&mut q, 1), vec![(1, -libc::EINVAL)]);
    let mut buf = vec![0u8; BS];
    assert!(disk.read_at(&mut buf, 1 << 20).is_err());
}
