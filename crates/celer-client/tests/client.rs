//! The client against scriptable in-test storage nodes (tests/common).

mod common;

use std::time::{Duration, Instant};

use celer_client::{probe_route, Client, ClientConfig, ClientError, ReadPolicy};
use celer_device::{BlockDevice, DeviceQueue, IoError, IoOp, IoRequest};
use celer_proto::{Op, Status};
use common::*;

const VOLUME: u64 = 7;
const SIZE: u64 = 64 << 20;
const CHUNK: u64 = 64 << 10;

/// A timeout long enough that a loaded machine does not fire it by mistake.
fn config(c: &Cluster) -> ClientConfig {
    let mut cfg = ClientConfig::new(c.seeds(), VOLUME, SIZE, common::cred(VOLUME));
    cfg.request_timeout = Duration::from_secs(1);
    cfg.op_deadline = Duration::from_secs(10);
    cfg
}

/// For the tests of timeouts and fail-over.
fn fast_config(c: &Cluster) -> ClientConfig {
    ClientConfig {
        request_timeout: Duration::from_millis(150),
        ..config(c)
    }
}

fn open(cfg: ClientConfig) -> (Client, Box<dyn DeviceQueue>) {
    init_tracing();
    let client = Client::connect(cfg).unwrap();
    let q = client.open_queue(0).unwrap();
    (client, q)
}

fn data_ops(n: &FakeNode, op: Op) -> Vec<Logged> {
    n.data_log().into_iter().filter(|l| l.op == op).collect()
}

#[test]
fn round_trip_4k_and_multi_chunk() {
    let c = Cluster::start(3, &[1, 2, 3], 2, 3, CHUNK);
    let (_client, mut q) = open(config(&c));
    for (i, off) in [0u64, 5 * 4096, 1 << 20, SIZE - 4096]
        .into_iter()
        .enumerate()
    {
        let mut d = pattern(i as u64, 4096);
        write(&mut q, off, &mut d).unwrap();
        assert_eq!(read(&mut q, off, 4096).unwrap(), d, "offset {off}");
        for n in &c.nodes {
            assert_eq!(
                n.block(VOLUME, off).unwrap().1,
                d,
                "node {} offset {off}",
                n.id
            );
        }
    }
    // 256 KiB from 60 KiB: five chunks, written from three uneven segments
    // and read back through four others.
    let off = 60 << 10;
    let len = 256 << 10;
    let data = pattern(99, len);
    let mut w = data.clone();
    let (a, rest) = w.split_at_mut(10_000);
    let (b, cc) = rest.split_at_mut(200_000);
    let segs = [seg(a), seg(b), seg(cc)];
    run(&mut q, IoOp::Write, off, 0, &segs).unwrap();
    let mut r = vec![0u8; len];
    let (a, rest) = r.split_at_mut(4096);
    let (b, rest) = rest.split_at_mut(70_001);
    let (d, e) = rest.split_at_mut(100_000);
    let segs = [seg(a), seg(b), seg(d), seg(e)];
    run(&mut q, IoOp::Read, off, 0, &segs).unwrap();
    assert!(r == data, "multi-chunk read differs");
    // Zeroes over part of it, through every member.
    run(&mut q, IoOp::WriteZeroes, off + 8192, 8192, &[]).unwrap();
    let back = read(&mut q, off, 16384).unwrap();
    assert_eq!(back[..8192], data[..8192]);
    assert!(back[8192..].iter().all(|&b| b == 0));
    run(&mut q, IoOp::Discard, off, 4096, &[]).unwrap();
    run(&mut q, IoOp::Flush, 0, 0, &[]).unwrap();
    assert_eq!(q.inflight(), 0);
}

#[test]
fn small_writes_reach_every_member_large_ones_only_the_primary() {
    let c = Cluster::start(3, &[1, 2, 3], 1, 2, CHUNK);
    let (client, mut q) = open(config(&c));
    let table = client.route_table();
    let off = 3 * CHUNK;
    let route = table
        .partition(table.partition_at(VOLUME, off))
        .unwrap()
        .clone();
    let primary = route.primary().unwrap();

    let mut d = pattern(1, 4096);
    write(&mut q, off, &mut d).unwrap();
    let mut versions = Vec::new();
    for n in &c.nodes {
        let w = data_ops(n, Op::Write);
        assert_eq!(w.len(), 1, "node {}: {:?}", n.id, w);
        versions.push(w[0].version);
        assert_eq!(w[0].epoch, table.epoch);
    }
    assert!(versions.iter().all(|v| *v == versions[0]));
    for n in &c.nodes {
        n.clear_log();
    }

    let mut big = pattern(2, 32 << 10);
    write(&mut q, off, &mut big).unwrap();
    for n in &c.nodes {
        let ops = n.data_log();
        if n.id == primary {
            assert_eq!(ops.len(), 1);
            assert_eq!(ops[0].op, Op::WritePrimary);
            assert_eq!(ops[0].length, 32 << 10);
        } else {
            assert!(ops.is_empty(), "node {} got {:?}", n.id, ops);
        }
        // The primary forwarded it.
        assert_eq!(n.block(VOLUME, off + 4096).unwrap().1, big[4096..8192]);
    }
    // With small_write_max raised, the same write goes to every member.
    let mut cfg = config(&c);
    cfg.small_write_max = 64 << 10;
    let client2 = Client::connect(cfg).unwrap();
    let mut q2 = client2.open_queue(0).unwrap();
    for n in &c.nodes {
        n.clear_log();
    }
    write(&mut q2, off, &mut big).unwrap();
    for n in &c.nodes {
        assert_eq!(data_ops(n, Op::Write).len(), 1, "node {}", n.id);
    }
}

#[test]
fn stale_epoch_installs_the_table_and_resends_with_the_same_version() {
    let c = Cluster::start(4, &[1, 2, 3], 1, 2, CHUNK);
    let (client, mut q) = open(config(&c));
    assert_eq!(client.route_table().epoch, 1);
    // Node 3 leaves, node 4 joins: epoch 2 everywhere.
    let t2 = c.next_table(&c.table, &[1, 2, 4]);
    assert_eq!(t2.epoch, 2);
    c.set_table(&t2, &[1, 2, 3, 4]);
    let off = 5 * CHUNK;
    let members: Vec<u32> = t2
        .partition(t2.partition_at(VOLUME, off))
        .unwrap()
        .members
        .iter()
        .map(|m| m.node)
        .collect();
    assert!(members.contains(&4) && !members.contains(&3), "{members:?}");

    let mut d = pattern(3, 4096);
    write(&mut q, off, &mut d).unwrap();
    assert_eq!(client.route_table().epoch, 2);
    let mut version = None;
    for id in [1, 2, 3, 4] {
        for l in data_ops(c.node(id), Op::Write) {
            assert_eq!(*version.get_or_insert(l.version), l.version, "node {id}");
            if l.epoch == 2 {
                assert!(members.contains(&id));
            }
        }
    }
    assert_eq!(c.node(4).block(VOLUME, off).unwrap().1, d);
    assert!(c.node(4).block(VOLUME, off).unwrap().0 == version.unwrap());
    // Reads use the new table: node 4 is syncing, so an in-sync member serves.
    assert_eq!(read(&mut q, off, 4096).unwrap(), d);
}

#[test]
fn silent_member_times_out_then_the_write_moves_to_the_new_members() {
    let c = Cluster::start(4, &[1, 2, 3], 1, 2, CHUNK);
    let cfg = fast_config(&c);
    let timeout = cfg.request_timeout;
    let (client, mut q) = open(cfg);
    c.node(3).script(|s| s.silent = true);
    let t2 = c.next_table(&c.table, &[1, 2, 4]);
    let off = 2 * CHUNK;
    let mut d = pattern(4, 4096);
    let segs = [seg(&mut d)];
    let start = Instant::now();
    // SAFETY: `d` outlives the wait below.
    unsafe {
        q.submit(&IoRequest {
            op: IoOp::Write,
            offset_bytes: off,
            len_bytes: 0,
            segments: &segs,
            tag: 1,
        })
        .unwrap()
    };
    // The write must not complete while node 3 is silent and the route stays.
    let hold = timeout * 4;
    let mut early = Vec::new();
    while start.elapsed() < hold {
        q.poll(&mut |c| early.push(c));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(early.is_empty(), "acknowledged without node 3: {early:?}");
    // The client asked the other nodes for routes meanwhile.
    let probes: usize = [1, 2, 4]
        .iter()
        .map(|id| {
            c.node(*id)
                .log()
                .iter()
                .filter(|l| l.op == Op::RouteTable)
                .count()
        })
        .sum();
    assert!(probes >= 2, "{probes} route probes");
    c.set_table(&t2, &[1, 2, 4]);
    let done = wait_n(&mut q, 1, Duration::from_secs(5));
    assert!(done[0].result.is_ok(), "{:?}", done[0]);
    let pause = start.elapsed();
    assert!(pause >= hold);
    assert_eq!(client.route_table().epoch, 2);
    let v3 = data_ops(c.node(3), Op::Write)[0].version;
    let w4 = data_ops(c.node(4), Op::Write);
    assert_eq!(w4.len(), 1);
    assert_eq!(w4[0].version, v3, "resent with the same version");
    assert_eq!(w4[0].epoch, 2);
    assert_eq!(c.node(4).block(VOLUME, off).unwrap().1, d);
    eprintln!("fail-over pause {pause:?} (route changed after {hold:?})");
}

#[test]
fn refused_connection_waits_for_the_route_change() {
    let c = Cluster::start(4, &[1, 2, 3], 1, 2, CHUNK);
    let (_client, mut q) = open(fast_config(&c));
    c.node(3).kill();
    std::thread::sleep(Duration::from_millis(20));
    let t2 = c.next_table(&c.table, &[1, 2, 4]);
    let nodes = c.nodes.clone();
    let flip = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        for id in [1u32, 2, 4] {
            nodes[id as usize - 1].set_table(&t2);
        }
    });
    let start = Instant::now();
    let mut d = pattern(5, 8192);
    write(&mut q, 7 * CHUNK, &mut d).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(300));
    flip.join().unwrap();
    assert_eq!(
        c.node(4).block(VOLUME, 7 * CHUNK + 4096).unwrap().1,
        d[4096..]
    );
}

#[test]
fn corrupt_frame_or_closed_connection_is_survived() {
    let c = Cluster::start(3, &[1, 2, 3], 1, 2, CHUNK);
    let (client, mut q) = open(fast_config(&c));
    let table = client.route_table();
    let off = CHUNK;
    let primary = table
        .partition(table.partition_at(VOLUME, off))
        .unwrap()
        .primary()
        .unwrap();
    // A write whose answer from node 2 is corrupt: the connection is closed,
    // the leg is retried on a new connection, same version.
    c.node(2).script(|s| s.corrupt_next = 1);
    let mut d = pattern(6, 4096);
    write(&mut q, off, &mut d).unwrap();
    let w = data_ops(c.node(2), Op::Write);
    assert_eq!(w.len(), 2, "{w:?}");
    assert_eq!(w[0].version, w[1].version);
    assert_ne!(w[0].conn, w[1].conn);
    // A read whose primary closes the connection: the next member serves it.
    c.node(primary).script(|s| s.close_next = 1);
    assert_eq!(read(&mut q, off, 4096).unwrap(), d);
    // And a corrupt read answer from the primary.
    c.node(primary).script(|s| s.corrupt_next = 1);
    assert_eq!(read(&mut q, off, 4096).unwrap(), d);
    // Everything still works afterwards.
    let mut d2 = pattern(7, 4096);
    write(&mut q, off, &mut d2).unwrap();
    assert_eq!(read(&mut q, off, 4096).unwrap(), d2);
}

/// Online resize: a queue opened before `grow` serves the new range from
/// its next request; the device info reports the new size; shrinking and
/// unaligned sizes are refused and change nothing.
#[test]
fn grow_opens_the_new_range_to_open_queues() {
    let c = Cluster::start(3, &[1, 2, 3], 1, 2, CHUNK);
    let (client, mut q) = open(config(&c));
    let mut d = pattern(5, 4096);
    assert!(matches!(
        write(&mut q, SIZE, &mut d),
        Err(IoError::OutOfRange {
            size_bytes: SIZE,
            ..
        })
    ));
    assert!(!client.grow(SIZE).unwrap(), "same size: no change");
    assert!(client.grow(2 * SIZE).unwrap());
    assert_eq!(client.info().size_bytes, 2 * SIZE);
    assert_eq!(client.size_bytes(), 2 * SIZE);
    write(&mut q, SIZE, &mut d).unwrap();
    write(&mut q, 2 * SIZE - 4096, &mut d).unwrap();
    assert_eq!(read(&mut q, 2 * SIZE - 4096, 4096).unwrap(), d);
    assert!(matches!(
        read(&mut q, 2 * SIZE, 4096),
        Err(IoError::OutOfRange { .. })
    ));
    assert!(matches!(
        client.grow(SIZE),
        Err(ClientError::Shrink { size_bytes, new_size_bytes: SIZE }) if size_bytes == 2 * SIZE
    ));
    assert!(matches!(
        client.grow(3 * SIZE + 100),
        Err(ClientError::Size(_))
    ));
    assert_eq!(client.size_bytes(), 2 * SIZE);
    // A queue opened after the growth sees it too.
    let mut q2 = client.open_queue(1).unwrap();
    assert_eq!(read(&mut q2, SIZE, 4096).unwrap(), d);
}

#[test]
fn misaligned_out_of_range_and_oversized_requests_are_rejected() {
    let c = Cluster::start(3, &[1, 2, 3], 1, 2, CHUNK);
    let (client, mut q) = open(config(&c));
    let info = client.info();
    assert_eq!(info.block_size_bytes, 4096);
    let mut buf = vec![0u8; 8 << 20];
    let mut submit = |op, off: u64, len: usize, len_bytes: u64| {
        let s = [seg(&mut buf[..len])];
        let segs: &[_] = if len == 0 { &[] } else { &s };
        let req = IoRequest {
            op,
            offset_bytes: off,
            len_bytes,
            segments: segs,
            tag: 1,
        };
        // SAFETY: rejected requests never touch the buffer.
        unsafe { q.submit(&req) }
    };
    assert!(matches!(
        submit(IoOp::Write, 512, 4096, 0),
        Err(IoError::Misaligned {
            align_bytes: 4096,
            ..
        })
    ));
    assert!(matches!(
        submit(IoOp::Read, 0, 512, 0),
        Err(IoError::Misaligned { .. })
    ));
    assert!(matches!(
        submit(IoOp::Read, 0, 100, 0),
        Err(IoError::Misaligned { .. })
    ));
    assert!(matches!(
        submit(IoOp::Discard, 4096, 0, 1024),
        Err(IoError::Misaligned { .. })
    ));
    assert!(matches!(
        submit(IoOp::Write, SIZE, 4096, 0),
        Err(IoError::OutOfRange { .. })
    ));
    assert!(matches!(
        submit(IoOp::Read, SIZE - 4096, 8192, 0),
        Err(IoError::OutOfRange { .. })
    ));
    assert!(matches!(
        submit(IoOp::WriteZeroes, u64::MAX - 4095, 0, 8192),
        Err(IoError::OutOfRange { .. })
    ));
    assert!(matches!(
        submit(IoOp::Write, 0, 8 << 20, 0),
        Err(IoError::Io(_))
    ));
    assert_eq!(q.inflight(), 0);
    // Configuration errors.
    assert!(matches!(
        Client::connect(ClientConfig::new(vec![], 1, SIZE, common::cred(1))),
        Err(ClientError::NoSeeds)
    ));
    assert!(matches!(
        Client::connect(ClientConfig::new(c.seeds(), 1, 1000, common::cred(1))),
        Err(ClientError::Size(1000))
    ));
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    assert!(matches!(
        Client::connect(ClientConfig::new(
            vec![dead.clone()],
            1,
            SIZE,
            common::cred(1)
        )),
        Err(ClientError::NoRoute(_))
    ));
    assert!(probe_route(&dead, &common::cred(1)).is_err());
    // A second seed that works is used when the first does not.
    let cfg = ClientConfig::new(
        vec![dead, c.nodes[1].addr.clone()],
        1,
        SIZE,
        common::cred(1),
    );
    assert_eq!(Client::connect(cfg).unwrap().route_table().epoch, 1);
}

#[test]
fn probe_route_fetches_the_nodes_table() {
    let c = Cluster::start(3, &[1, 2, 3], 2, 4, CHUNK);
    let t = probe_route(&c.nodes[2].addr, &common::cred(1)).unwrap();
    assert_eq!(t, c.table);
    let t2 = c.next_table(&c.table, &[1, 2]);
    c.node(3).set_table(&t2);
    assert_eq!(
        probe_route(&c.nodes[2].addr, &common::cred(1))
            .unwrap()
            .epoch,
        2
    );
}

#[test]
fn hlc_versions_strictly_increase_and_follow_the_nodes() {
    let c = Cluster::start(3, &[1, 2, 3], 1, 2, CHUNK);
    let (_client, mut q) = open(config(&c));
    for i in 0..50u64 {
        let mut d = pattern(i, 4096);
        write(&mut q, (i % 7) * 4096, &mut d).unwrap();
    }
    let v: Vec<u64> = data_ops(c.node(1), Op::Write)
        .iter()
        .map(|l| l.version)
        .collect();
    assert_eq!(v.len(), 50);
    assert!(v.windows(2).all(|w| w[0] < w[1]), "{v:?}");
    assert!(v.iter().all(|v| v & 0xffff == 9));
    // A node that has seen a version from a clock 10 s ahead pulls ours along.
    let ahead = v[49] + ((10_000u64 << 8) << 16);
    c.node(1).script(|s| s.version_boost = ahead - v[49]);
    let mut d = pattern(100, 4096);
    write(&mut q, 0, &mut d).unwrap();
    write(&mut q, 0, &mut d).unwrap();
    let last = data_ops(c.node(1), Op::Write).last().unwrap().version;
    assert!(last >> 16 > ahead >> 16, "{last:#x} vs {ahead:#x}");
}

#[test]
fn two_queues_on_two_threads() {
    let c = Cluster::start(3, &[1, 2, 3], 2, 3, CHUNK);
    init_tracing();
    let client = std::sync::Arc::new(Client::connect(config(&c)).unwrap());
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let client = client.clone();
            std::thread::spawn(move || {
                let mut q = client.open_queue(t as usize).unwrap();
                let base = t * (8 << 20);
                let blocks = 64usize;
                let mut bufs: Vec<Vec<u8>> = (0..blocks)
                    .map(|i| pattern(t * 1000 + i as u64, 4096))
                    .collect();
                let segs: Vec<_> = bufs.iter_mut().map(|b| [seg(b)]).collect();
                for (i, s) in segs.iter().enumerate() {
                    let req = IoRequest {
                        op: IoOp::Write,
                        offset_bytes: base + i as u64 * 4096 * 3,
                        len_bytes: 0,
                        segments: s,
                        tag: i as u64,
                    };
                    // SAFETY: `bufs` outlive the wait below.
                    unsafe { q.submit(&req).unwrap() };
                }
                let done = wait_n(&mut q, blocks, Duration::from_secs(20));
                assert!(done.iter().all(|c| c.result.is_ok()));
                for (i, b) in bufs.iter().enumerate() {
                    let back = read(&mut q, base + i as u64 * 4096 * 3, 4096).unwrap();
                    assert!(back == *b, "thread {t} block {i}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn route_behind_and_busy_are_retried() {
    let c = Cluster::start(3, &[1, 2, 3], 1, 2, CHUNK);
    let (_client, mut q) = open(config(&c));
    c.node(1).script(|s| {
        s.route_behind_next = 3;
        s.busy_next = 2;
    });
    let start = Instant::now();
    let mut d = pattern(8, 4096);
    write(&mut q, 0, &mut d).unwrap();
    assert!(
        start.elapsed() < Duration::from_millis(140),
        "{:?}",
        start.elapsed()
    );
    let w = data_ops(c.node(1), Op::Write);
    assert_eq!(w.len(), 6);
    assert!(w.iter().all(|l| l.version == w[0].version));
}

#[test]
fn reads_fail_over_between_in_sync_members() {
    let c = Cluster::start(3, &[1, 2, 3], 1, 2, CHUNK);
    let (client, mut q) = open(config(&c));
    let table = client.route_table();
    let off = 9 * CHUNK;
    let route = table
        .partition(table.partition_at(VOLUME, off))
        .unwrap()
        .clone();
    let primary = route.primary().unwrap();
    let mut d = pattern(9, 8192);
    write(&mut q, off, &mut d).unwrap();
    for s in [Status::Checksum, Status::Io, Status::NotInSync] {
        c.node(primary).script(|sc| sc.read_status = Some((s, 1)));
        assert_eq!(read(&mut q, off, 8192).unwrap(), d, "{s:?}");
    }
    // Every member reports a checksum error: so does the client.
    for n in &c.nodes {
        n.script(|sc| sc.read_status = Some((Status::Checksum, 1)));
    }
    match read(&mut q, off, 8192) {
        Err(IoError::Checksum { offset_bytes }) => assert_eq!(offset_bytes, off),
        other => panic!("{other:?}"),
    }
    for n in &c.nodes {
        n.script(|sc| sc.read_status = Some((Status::Io, 1)));
    }
    assert!(matches!(read(&mut q, off, 8192), Err(IoError::Io(_))));
    assert_eq!(read(&mut q, off, 8192).unwrap(), d);
    // Every member says it is not in sync (the client's table is behind:
    // members catching up after a restart): not an error, the read waits
    // for routes and is served once a member is in sync again.
    for n in &c.nodes {
        n.script(|sc| sc.read_status = Some((Status::NotInSync, 1)));
    }
    assert_eq!(read(&mut q, off, 8192).unwrap(), d, "NotInSync everywhere");
}

#[test]
fn any_in_sync_spreads_reads() {
    let c = Cluster::start(3, &[1, 2, 3], 1, 0, CHUNK);
    let mut cfg = config(&c);
    cfg.read_policy = ReadPolicy::AnyInSync;
    let (_client, mut q) = open(cfg);
    let mut d = pattern(10, 4096);
    write(&mut q, 0, &mut d).unwrap();
    for _ in 0..30 {
        assert_eq!(read(&mut q, 0, 4096).unwrap(), d);
    }
    for n in &c.nodes {
        let reads = data_ops(n, Op::Read).len();
        assert!(reads >= 5, "node {} served {reads} reads", n.id);
    }
}

#[test]
fn a_request_fails_at_its_deadline() {
    let c = Cluster::start(3, &[1, 2, 3], 1, 2, CHUNK);
    let mut cfg = config(&c);
    cfg.request_timeout = Duration::from_millis(100);
    cfg.op_deadline = Duration::from_millis(500);
    let (_client, mut q) = open(cfg);
    for n in &c.nodes {
        n.script(|s| s.silent = true);
    }
    let start = Instant::now();
    let mut d = pattern(11, 4096);
    let e = write(&mut q, 0, &mut d).unwrap_err();
    assert!(matches!(e, IoError::Io(_)), "{e:?}");
    let t = start.elapsed();
    assert!(
        t >= Duration::from_millis(500) && t < Duration::from_secs(2),
        "{t:?}"
    );
    assert!(read(&mut q, 0, 4096).is_err());
    assert_eq!(q.inflight(), 0);
    // The nodes come back: the queue works again.
    for n in &c.nodes {
        n.script(|s| s.silent = false);
    }
    write(&mut q, 0, &mut d).unwrap();
}

#[test]
fn a_full_queue_of_writes_completes() {
    let c = Cluster::start(3, &[1, 2, 3], 2, 4, CHUNK);
    let (client, mut q) = open(config(&c));
    let max = q.inflight_max();
    let mut bufs: Vec<Vec<u8>> = (0..max).map(|i| pattern(i as u64, 4096)).collect();
    let segs: Vec<_> = bufs.iter_mut().map(|b| [seg(b)]).collect();
    for (i, s) in segs.iter().enumerate() {
        let req = IoRequest {
            op: IoOp::Write,
            offset_bytes: i as u64 * 4096,
            len_bytes: 0,
            segments: s,
            tag: i as u64,
        };
        // SAFETY: `bufs` outlive the wait below.
        unsafe { q.submit(&req).unwrap() };
    }
    let extra = IoRequest {
        op: IoOp::Flush,
        offset_bytes: 0,
        len_bytes: 0,
        segments: &[],
        tag: 999,
    };
    // SAFETY: no segments.
    assert!(matches!(
        unsafe { q.submit(&extra) },
        Err(IoError::QueueFull { .. })
    ));
    let done = wait_n(&mut q, max, Duration::from_secs(20));
    assert!(done.iter().all(|c| c.result.is_ok()));
    let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, (0..max as u64).collect::<Vec<_>>());
    let _ = client;
    for (i, b) in bufs.iter().enumerate() {
        assert!(c.node(1).block(VOLUME, i as u64 * 4096).unwrap().1 == *b);
    }
}

#[test]
fn unavailable_from_the_primary_waits_for_the_route_change() {
    let c = Cluster::start(4, &[1, 2, 3], 1, 2, CHUNK);
    let (client, mut q) = open(fast_config(&c));
    let table = client.route_table();
    let off = 4 * CHUNK;
    let route = table
        .partition(table.partition_at(VOLUME, off))
        .unwrap()
        .clone();
    let primary = route.primary().unwrap();
    let other = route
        .members
        .iter()
        .map(|m| m.node)
        .find(|n| *n != primary)
        .unwrap();
    // The primary cannot forward to `other`: Unavailable until the route
    // drops `other`.
    c.node(other).script(|s| s.silent = true);
    let up: Vec<u32> = [1, 2, 3, 4].into_iter().filter(|n| *n != other).collect();
    let t2 = c.next_table(&c.table, &up);
    let nodes = c.nodes.clone();
    let up2 = up.clone();
    let flip = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        for id in up2 {
            nodes[id as usize - 1].set_table(&t2);
        }
    });
    let mut big = pattern(12, 64 << 10);
    write(&mut q, off, &mut big).unwrap();
    flip.join().unwrap();
    let wp: Vec<Logged> = up
        .iter()
        .flat_map(|id| data_ops(c.node(*id), Op::WritePrimary))
        .collect();
    assert!(wp.len() >= 2, "{wp:?}");
    assert!(wp.iter().all(|l| l.version == wp[0].version));
    assert!(wp.iter().any(|l| l.epoch == 2));
    assert_eq!(client.route_table().epoch, 2);
    for id in &up {
        let n = c.node(*id);
        if let Some((v, d)) = n.block(VOLUME, off) {
            assert_eq!(v, wp[0].version);
            assert_eq!(d, big[..4096]);
        }
    }
}

#[test]
fn a_split_moves_parts_to_their_new_partitions_and_shards() {
    let c = Cluster::start(3, &[1, 2, 3], 4, 2, CHUNK);
    let (client, mut q) = open(config(&c));
    let t2 = c.table.split().unwrap();
    c.set_table(&t2, &[1, 2, 3]);
    // Chunks whose partition changes with the split (p → p + 4) land in
    // another shard: the fake node refuses the wrong one.
    let offs: Vec<u64> = (0..16u64).map(|i| i * CHUNK).collect();
    assert!(offs
        .iter()
        .any(|o| t2.partition_at(VOLUME, *o) != c.table.partition_at(VOLUME, *o)));
    for (i, off) in offs.iter().enumerate() {
        let mut d = pattern(200 + i as u64, 8192);
        write(&mut q, *off, &mut d).unwrap();
        assert_eq!(read(&mut q, *off, 8192).unwrap(), d);
    }
    assert_eq!(client.route_table().partition_count(), 8);
}

#[test]
fn a_read_payload_with_a_bad_checksum_goes_to_the_next_member() {
    let c = Cluster::start(3, &[1, 2, 3], 1, 2, CHUNK);
    let (client, mut q) = open(config(&c));
    let table = client.route_table();
    let off = 6 * CHUNK;
    let primary = table
        .partition(table.partition_at(VOLUME, off))
        .unwrap()
        .primary()
        .unwrap();
    let mut d = pattern(13, 12288);
    write(&mut q, off, &mut d).unwrap();
    c.node(primary).script(|s| s.bad_payload_next = 1);
    assert_eq!(read(&mut q, off, 12288).unwrap(), d);
    let reads: usize = c.nodes.iter().map(|n| data_ops(n, Op::Read).len()).sum();
    assert_eq!(reads, 2);
}

#[test]
fn not_replica_makes_the_client_ask_for_routes() {
    let c = Cluster::start(4, &[1, 2, 3], 1, 2, CHUNK);
    let (client, mut q) = open(fast_config(&c));
    // Node 4 has epoch 2 where node 3 left; nodes 1..3 still have epoch 1 but
    // node 3 already dropped the partition (NotReplica at the same epoch).
    let t2 = c.next_table(&c.table, &[1, 2, 4]);
    let mut t1_without_3 = c.table.clone();
    for p in t1_without_3.partitions.iter_mut() {
        p.members.retain(|m| m.node != 3);
    }
    c.node(3).set_table(&t1_without_3);
    c.node(4).set_table(&t2);
    let nodes = c.nodes.clone();
    let t2b = t2.clone();
    let flip = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        for id in [1u32, 2] {
            nodes[id as usize - 1].set_table(&t2b);
        }
    });
    let mut d = pattern(14, 4096);
    write(&mut q, 0, &mut d).unwrap();
    flip.join().unwrap();
    assert_eq!(client.route_table().epoch, 2);
    assert!(c.node(4).block(VOLUME, 0).is_some());
}

#[test]
fn big_requests_at_depth_round_trip() {
    // 4 MiB chunks: each request is one 4 MiB frame, more than a socket
    // buffer holds, so writes and reads go out and come in by pieces.
    let c = Cluster::start(3, &[1, 2, 3], 2, 3, 4 << 20);
    let (_client, mut q) = open(config(&c));
    let n = 8usize;
    let len = 4 << 20;
    let mut bufs: Vec<Vec<u8>> = (0..n).map(|i| pattern(300 + i as u64, len)).collect();
    let expect = bufs.clone();
    let segs: Vec<Vec<_>> = bufs
        .iter_mut()
        .map(|b| {
            let (a, rest) = b.split_at_mut(4096 * 3 + 17);
            let (m, z) = rest.split_at_mut(1 << 20);
            vec![seg(a), seg(m), seg(z)]
        })
        .collect();
    for (i, s) in segs.iter().enumerate() {
        let req = IoRequest {
            op: IoOp::Write,
            offset_bytes: i as u64 * len as u64,
            len_bytes: 0,
            segments: s,
            tag: i as u64,
        };
        // SAFETY: `bufs` outlive the wait below.
        unsafe { q.submit(&req).unwrap() };
    }
    let done = wait_n(&mut q, n, Duration::from_secs(60));
    assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
    let mut back: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; len]).collect();
    let segs: Vec<Vec<_>> = back
        .iter_mut()
        .map(|b| {
            let (a, z) = b.split_at_mut(len - 4096 * 5 - 3);
            vec![seg(a), seg(z)]
        })
        .collect();
    for (i, s) in segs.iter().enumerate() {
        let req = IoRequest {
            op: IoOp::Read,
            offset_bytes: i as u64 * len as u64,
            len_bytes: 0,
            segments: s,
            tag: i as u64,
        };
        // SAFETY: `back` outlives the wait below.
        unsafe { q.submit(&req).unwrap() };
    }
    let done = wait_n(&mut q, n, Duration::from_secs(60));
    assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
    for i in 0..n {
        assert!(back[i] == expect[i], "request {i} differs");
    }
}
