//! Invariant 4 on the client side: once a queue's connections are open, a
//! 4 KiB write or read allocates nothing on the thread that submits and
//! polls (the in-test nodes run on other threads and are not counted).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use celer_client::{Client, ClientConfig};
use celer_device::{BlockDevice, DeviceQueue, IoOp, IoRequest};
use common::*;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

fn allocs() -> u64 {
    ALLOCS.with(|c| c.get())
}

// SAFETY: forwards to the system allocator; counting has no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Submits `ops` (op, offset, buffer index) and polls until all completed,
/// without allocating.
fn batch(q: &mut Box<dyn DeviceQueue>, bufs: &mut [Vec<u8>], op: IoOp, offsets: &[u64]) {
    for (i, off) in offsets.iter().enumerate() {
        let s = [seg(&mut bufs[i])];
        let req = IoRequest {
            op,
            offset_bytes: *off,
            len_bytes: 0,
            segments: &s,
            tag: i as u64,
        };
        // SAFETY: `bufs` outlive the polling below.
        unsafe { q.submit(&req).unwrap() };
    }
    let start = Instant::now();
    let mut done = 0;
    let mut ok = true;
    while done < offsets.len() {
        q.poll(&mut |c| {
            done += 1;
            ok &= c.result.is_ok();
        });
        assert!(start.elapsed() < Duration::from_secs(20));
        if done < offsets.len() {
            let mut pfd = libc::pollfd {
                fd: q.completion_fd().unwrap(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd.
            unsafe { libc::poll(&mut pfd, 1, 20) };
        }
    }
    assert!(ok);
}

#[test]
fn the_4k_path_allocates_nothing() {
    let c = Cluster::start(3, &[1, 2, 3], 2, 4, 64 << 10);
    let client =
        Client::connect(ClientConfig::new(c.seeds(), 3, 64 << 20, common::cred(3))).unwrap();
    let mut q = client.open_queue(0).unwrap();
    let mut bufs: Vec<Vec<u8>> = (0..32).map(|i| pattern(i, 4096)).collect();
    let offsets: Vec<u64> = (0..32u64).map(|i| i * (1 << 20) + 8192).collect();
    // Warm up: every connection this workload needs opens now.
    for _ in 0..3 {
        batch(&mut q, &mut bufs, IoOp::Write, &offsets);
        batch(&mut q, &mut bufs, IoOp::Read, &offsets);
    }
    let before = allocs();
    assert!(before > 0, "the counting allocator counts");
    for round in 0..20 {
        // QD1 and QD32, writes and reads.
        let k = round % 32;
        batch(&mut q, &mut bufs[k..k + 1], IoOp::Write, &offsets[k..k + 1]);
        batch(&mut q, &mut bufs[k..k + 1], IoOp::Read, &offsets[k..k + 1]);
        batch(&mut q, &mut bufs, IoOp::Write, &offsets);
        batch(&mut q, &mut bufs, IoOp::Read, &offsets);
    }
    let n = allocs() - before;
    assert_eq!(n, 0, "{n} allocations on the 4 KiB path");
    for (i, b) in bufs.iter().enumerate() {
        assert!(*b == pattern(i as u64, 4096));
    }
}
