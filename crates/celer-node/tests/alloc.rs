//! Invariant 4 on the node side: once connections are open, serving a
//! 4 KiB write, a forwarded 64 KiB primary write and a 4 KiB read allocates
//! nothing on the node's shard threads.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};

use celer_node::Node;
use celer_proto::auth::{Capability, Credential, HelloProof};
use celer_proto::{Header, Op, Status, HEADER_BYTES};
use celer_route::RouteTable;
use common::{info, start_node};

static SHARD_ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// None: not known yet; Some(true): a node shard thread.
    static IS_SHARD: Cell<Option<bool>> = const { Cell::new(None) };
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    let _ = BUSY.try_with(|busy| {
        if busy.get() {
            return;
        }
        busy.set(true);
        let is_shard = IS_SHARD.with(|s| match s.get() {
            Some(v) => v,
            None => {
                let v = std::thread::current().name().is_some_and(|n| {
                    n.starts_with("celer-node-") && n[11..].parse::<u32>().is_ok()
                });
                s.set(Some(v));
                v
            }
        });
        if is_shard {
            SHARD_ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        busy.set(false);
    });
}

struct Counting;

// SAFETY: forwards to the system allocator; counting has no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Sends one frame and reads the answer into `resp` without allocating.
fn call(s: &mut TcpStream, h: Header, payload: &[u8], resp: &mut [u8]) -> Status {
    let h = h.with_payload([payload]);
    s.write_all(&h.encode()).expect("send");
    s.write_all(payload).expect("send");
    let mut b = [0u8; HEADER_BYTES];
    s.read_exact(&mut b).expect("header");
    let r = celer_proto::decode_header(&b)
        .expect("valid")
        .expect("whole");
    let n = r.payload_bytes as usize;
    s.read_exact(&mut resp[..n]).expect("payload");
    r.status
}

#[test]
fn serving_requests_allocates_nothing_on_shard_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes: Vec<Node> = (1..=3).map(|i| start_node(dir.path(), i)).collect();
    let infos = nodes.iter().map(|n| info(n, true)).collect();
    let t = RouteTable::initial(infos, 4, 3, 1 << 20).expect("table");
    for n in &nodes {
        n.install_route(t.clone());
    }
    // One partition: connections to every member's shard, and its primary.
    let p = t.partition_of(1, 0);
    let shard = (p % 2) as u64;
    const ATTACHMENT: u32 = 0x1_0007;
    let key = celer_proto::auth::data_key_from_secret(common::TOKEN);
    let cap = Capability::mint(&key, 1, ATTACHMENT, 0, false, u64::MAX);
    let cred = Credential::Attachment {
        capability: cap,
        key: cap.attachment_key(&key),
    };
    let primary = t.partition(p).and_then(|x| x.primary()).expect("primary");
    let mut conns: Vec<(u32, TcpStream)> = nodes
        .iter()
        .map(|n| {
            let mut s = TcpStream::connect(n.data_addr()).expect("connect");
            s.set_nodelay(true).expect("nodelay");
            // The node's Challenge, then our Hello with a client's
            // capability (the path every front end takes).
            let mut r = [0u8; 64];
            let mut b = [0u8; HEADER_BYTES];
            s.read_exact(&mut b).expect("challenge");
            let c = celer_proto::decode_header(&b)
                .expect("valid")
                .expect("whole");
            assert_eq!(c.op, Op::Challenge);
            let mut nonce = [0u8; 32];
            s.read_exact(&mut nonce).expect("nonce");
            let proof = HelloProof::build(&cred, &nonce, &[3; 32], shard as u16, 1, false);
            let mut h = Header::request(Op::Hello, 0);
            h.offset = shard;
            h.volume = 1;
            assert_eq!(call(&mut s, h, &proof, &mut r), Status::Ok);
            (n.id(), s)
        })
        .collect();
    let data = vec![0x5au8; 65536];
    let mut resp = vec![0u8; 65536];
    // Versions name the attachment (its low 16 bits) and follow the clock.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let mut version = (celer_proto::clock_of_unix_ms(now_ms) << 16) | (ATTACHMENT & 0xffff) as u64;
    let mut round = |conns: &mut Vec<(u32, TcpStream)>, i: u64| {
        let off = (i % 64) * 4096;
        version += 1 << 16;
        for (_, s) in conns.iter_mut() {
            let mut h = Header::request(Op::Write, 1);
            h.epoch = t.epoch;
            h.volume = 1;
            h.offset = off;
            h.length = 4096;
            h.version = version;
            h.attachment = ATTACHMENT;
            assert_eq!(call(s, h, &data[..4096], &mut resp), Status::Ok);
        }
        version += 1 << 16;
        let s = &mut conns
            .iter_mut()
            .find(|c| c.0 == primary)
            .expect("primary")
            .1;
        let mut h = Header::request(Op::WritePrimary, 2);
        h.epoch = t.epoch;
        h.volume = 1;
        h.offset = 512 << 10;
        h.length = 65536;
        h.version = version;
        h.attachment = ATTACHMENT;
        assert_eq!(call(s, h, &data, &mut resp), Status::Ok);
        let mut h = Header::request(Op::Read, 3);
        h.epoch = t.epoch;
        h.volume = 1;
        h.offset = off;
        h.length = 4096;
        assert_eq!(call(s, h, &[], &mut resp), Status::Ok);
    };
    for i in 0..300 {
        round(&mut conns, i);
    }
    let before = SHARD_ALLOCS.load(Ordering::Relaxed);
    for i in 0..500 {
        round(&mut conns, i);
    }
    let allocs = SHARD_ALLOCS.load(Ordering::Relaxed) - before;
    println!("shard-thread allocations over 500 rounds (3 small writes, 1 forwarded write, 1 read each): {allocs}");
    // Checkpoints run in the background of the same threads: their buffers
    // are reused too, so the bound is strict.
    assert_eq!(allocs, 0, "allocations on the I/O path");
    for n in nodes {
        n.stop().expect("stop");
    }
}
