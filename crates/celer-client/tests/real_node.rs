//! Interop: the client against real celer-node storage nodes in this process.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use celer_client::{Client, ClientConfig};
use celer_device::{BlockDevice, IoOp};
use celer_engine::{Engine, FormatOptions};
use celer_node::{Node, NodeConfig};
use celer_route::{NodeInfo, RouteTable};
use common::*;

fn start_node(dir: &Path, id: u32) -> Node {
    let disk = dir.join(format!("node{id}.img"));
    Engine::format(
        &disk,
        &FormatOptions {
            shard_count: 2,
            journal_blocks: 1024,
            create_size_bytes: Some(96 << 20),
            ..Default::default()
        },
    )
    .expect("format");
    run_node(dir, id)
}

/// Starts node `id` on its existing disk.
fn run_node(dir: &Path, id: u32) -> Node {
    let disk = dir.join(format!("node{id}.img"));
    Node::start(NodeConfig {
        disk,
        state_dir: dir.join(format!("state{id}")),
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        meta_url: None,
        token: "t".into(),
        node_id: Some(id),
        domain: format!("host{id}"),
        route_file: None,
        forward_timeout: Duration::from_millis(500),
        busy_poll: Duration::ZERO,
        insecure_no_auth: false,
    })
    .expect("node starts")
}

fn info(n: &Node, up: bool) -> NodeInfo {
    NodeInfo {
        id: n.id(),
        data_addr: n.data_addr().to_string(),
        admin_addr: n.admin_addr().to_string(),
        shards: 2,
        domain: format!("host{}", n.id()),
        up,
    }
}

#[test]
fn real_nodes_round_trip_and_fail_over() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Option<Node>> = (1..=4).map(|i| Some(start_node(dir.path(), i))).collect();
    let infos: Vec<NodeInfo> = nodes
        .iter()
        .map(|n| info(n.as_ref().unwrap(), true))
        .collect();
    let t = RouteTable::initial(infos.clone(), 4, 3, 1 << 20).unwrap();
    for n in nodes.iter().flatten() {
        assert!(n.install_route(t.clone()));
    }
    let seeds = vec![infos[0].data_addr.clone()];
    let mut cfg = ClientConfig::new(
        seeds,
        1,
        32 << 20,
        celer_client::mint_credential("t", 1, 3, false, Duration::from_secs(3600)),
    );
    cfg.request_timeout = Duration::from_millis(300);
    let client = Client::connect(cfg).unwrap();
    let mut q = client.open_queue(0).unwrap();
    for i in 0..32u64 {
        let mut d = pattern(i, 4096);
        write(&mut q, i * (1 << 20) + 4096 * i, &mut d).unwrap();
        assert_eq!(
            read(&mut q, i * (1 << 20) + 4096 * i, 4096).unwrap(),
            d,
            "block {i}"
        );
    }
    let mut big = pattern(77, 256 << 10);
    let segs = [seg(&mut big[..100_000]), seg(&mut big[100_000..])];
    let off = (1 << 20) - (64 << 10);
    run(&mut q, IoOp::Write, off, 0, &segs).unwrap();
    assert!(read(&mut q, off, 256 << 10).unwrap() == pattern(77, 256 << 10));
    run(&mut q, IoOp::WriteZeroes, off, 8192, &[]).unwrap();
    assert!(read(&mut q, off, 8192).unwrap().iter().all(|b| *b == 0));

    // Node 2 stops; 400 ms later the survivors get the next epoch.
    nodes[1].take().unwrap().stop().unwrap();
    let mut down = infos.clone();
    down[1].up = false;
    let t2 = t.rebalance(down, usize::MAX);
    let start = Instant::now();
    let survivors: Vec<&Node> = nodes.iter().flatten().collect();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(400));
            for n in &survivors {
                n.install_route(t2.clone());
            }
        });
        for i in 0..32u64 {
            let mut d = pattern(1000 + i, 4096);
            write(&mut q, i * (1 << 20), &mut d).unwrap();
        }
    });
    eprintln!("writes across the fail-over took {:?}", start.elapsed());
    assert_eq!(client.route_table().epoch, t2.epoch);
    for i in 0..32u64 {
        assert_eq!(
            read(&mut q, i * (1 << 20), 4096).unwrap(),
            pattern(1000 + i, 4096)
        );
    }
    for n in nodes.into_iter().flatten() {
        n.stop().unwrap();
    }
}

/// Three real nodes and their first table.
fn three_nodes(dir: &Path) -> (Vec<Node>, RouteTable) {
    let nodes: Vec<Node> = (1..=3).map(|i| start_node(dir, i)).collect();
    let t =
        RouteTable::initial(nodes.iter().map(|n| info(n, true)).collect(), 4, 3, 1 << 20).unwrap();
    for n in &nodes {
        assert!(n.install_route(t.clone()));
    }
    (nodes, t)
}

/// A client of volume 1 as attachment `attachment`, its clock `skew_ms`
/// off (the nodes' secret is "t"), with a capability valid for `ttl`.
fn attached(nodes: &[Node], attachment: u32, skew_ms: i64, ttl: Duration) -> Client {
    let cred = celer_client::mint_credential("t", 1, attachment, false, ttl);
    let mut cfg = ClientConfig::new(vec![nodes[0].data_addr().to_string()], 1, 32 << 20, cred);
    cfg.clock_skew_ms = skew_ms;
    cfg.op_deadline = Duration::from_secs(5);
    Client::connect(cfg).unwrap()
}

/// The version rule end to end: writers whose clocks differ by more than
/// the drift bound. Every write is either refused (an error to the front
/// end) or acknowledged and readable until a later acknowledged write
/// replaces it; none is acknowledged and lost.
#[test]
fn skewed_clocks_never_lose_an_acknowledged_write() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (nodes, _) = three_nodes(dir.path());
    let bound = celer_proto::VERSION_DRIFT_MAX_MS as i64;
    let hour = Duration::from_secs(3600);
    let ahead = attached(&nodes, 11, bound * 9 / 10, hour);
    let behind = attached(&nodes, 12, -bound * 9 / 10, hour);
    let right = attached(&nodes, 13, 0, hour);
    let far = attached(&nodes, 14, 2 * 3600 * 1000, hour);
    let (mut qa, mut qb, mut qr, mut qf) = (
        ahead.open_queue(0).unwrap(),
        behind.open_queue(0).unwrap(),
        right.open_queue(0).unwrap(),
        far.open_queue(0).unwrap(),
    );
    let x = 4096 * 3;
    // The writer ahead writes X.
    write(&mut qa, x, &mut pattern(1, 4096)).expect("acknowledged");
    // The writer 1.8 bounds behind it cannot get past its version: refused,
    // with the reason, never acknowledged.
    let e = write(&mut qb, x, &mut pattern(2, 4096)).expect_err("must not be acknowledged");
    assert!(e.to_string().contains("clock"), "{e}");
    for q in [&mut qa, &mut qb, &mut qr] {
        assert_eq!(read(q, x, 4096).unwrap(), pattern(1, 4096));
    }
    // A writer with the right clock is refused as older first, moves its
    // clock past the stored version and writes again: acknowledged and
    // read back everywhere.
    write(&mut qr, x, &mut pattern(3, 4096)).expect("acknowledged after a retry");
    for q in [&mut qa, &mut qb, &mut qr] {
        assert_eq!(read(q, x, 4096).unwrap(), pattern(3, 4096));
    }
    // A host whose clock runs 2 h ahead cannot push any version out of
    // reach: its writes are refused outright.
    let y = 4096 * 9;
    let e = write(&mut qf, y, &mut pattern(4, 4096)).expect_err("far ahead");
    assert!(e.to_string().contains("clock"), "{e}");
    assert_eq!(read(&mut qr, y, 4096).unwrap(), vec![0u8; 4096]);
    // The writer behind is fine where nobody ahead wrote; the others
    // write after it and win.
    let z = 4096 * 20;
    write(&mut qb, z, &mut pattern(5, 4096)).expect("acknowledged");
    assert_eq!(read(&mut qr, z, 4096).unwrap(), pattern(5, 4096));
    write(&mut qr, z, &mut pattern(6, 4096)).expect("acknowledged");
    write(&mut qa, z, &mut pattern(7, 4096)).expect("acknowledged");
    assert_eq!(read(&mut qb, z, 4096).unwrap(), pattern(7, 4096));
    drop((qa, qb, qr, qf));
    for n in nodes {
        n.stop().unwrap();
    }
}

/// A capability renewed before it expires: I/O goes on through many
/// expiries of the short-lived capabilities without an error or a pause.
#[test]
fn capabilities_are_renewed_without_an_io_pause() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (nodes, _) = three_nodes(dir.path());
    let ttl = Duration::from_millis(1500);
    let client = std::sync::Arc::new(attached(&nodes, 21, 0, ttl));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let renewer = {
        let (client, stop) = (client.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut renewals = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                std::thread::sleep(ttl / 3);
                let cred = celer_client::mint_credential("t", 1, 21, false, ttl);
                client.renew(cred).expect("same volume and attachment");
                renewals += 1;
            }
            renewals
        })
    };
    let mut q = client.open_queue(0).unwrap();
    let start = Instant::now();
    let mut longest = Duration::ZERO;
    let mut ops = 0u64;
    while start.elapsed() < ttl * 4 {
        let t = Instant::now();
        let off = (ops % 64) * 4096 + (ops % 8) * (1 << 20);
        write(&mut q, off, &mut pattern(ops, 4096)).expect("write across renewals");
        assert_eq!(read(&mut q, off, 4096).unwrap(), pattern(ops, 4096));
        longest = longest.max(t.elapsed());
        ops += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    let renewals = renewer.join().unwrap();
    println!(
        "{ops} write+read pairs over {:?} ({renewals} renewals of a {ttl:?} capability): longest pair {longest:?}",
        start.elapsed()
    );
    assert!(renewals >= 8, "{renewals}");
    assert!(longest < Duration::from_millis(200), "a pause: {longest:?}");
    // Renewing with another attachment's capability is refused.
    let other = celer_client::mint_credential("t", 1, 22, false, ttl);
    assert!(client.renew(other).is_err());
    drop(q);
    for n in nodes {
        n.stop().unwrap();
    }
}

/// A capability that expires before its renewal arrives: requests wait
/// (`Expired`, retried) instead of failing, and go on once it comes.
#[test]
fn a_late_renewal_pauses_io_without_an_error() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (nodes, _) = three_nodes(dir.path());
    let client = std::sync::Arc::new(attached(&nodes, 31, 0, Duration::from_millis(800)));
    let mut q = client.open_queue(0).unwrap();
    write(&mut q, 0, &mut pattern(1, 4096)).expect("before expiry");
    std::thread::sleep(Duration::from_millis(1000));
    // Expired now; the renewal comes 500 ms later.
    let renewer = {
        let client = client.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            let cred = celer_client::mint_credential("t", 1, 31, false, Duration::from_secs(60));
            client.renew(cred).expect("renew");
        })
    };
    let t = Instant::now();
    write(&mut q, 4096, &mut pattern(2, 4096)).expect("waits for the renewal");
    let waited = t.elapsed();
    renewer.join().unwrap();
    println!("a write on an expired capability completed {waited:?} later, after the renewal");
    assert!(waited >= Duration::from_millis(400), "{waited:?}");
    assert_eq!(read(&mut q, 4096, 4096).unwrap(), pattern(2, 4096));
    drop(q);
    for n in nodes {
        n.stop().unwrap();
    }
}

/// `celer_node_requests` of `op` answered `ok` by node `n`, all shards
/// (its admin `/metrics`, read over plain HTTP/1.0).
fn served(n: &Node, op: &str) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(n.admin_addr()).expect("admin port");
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("metrics");
    let want = format!("op=\"{op}\"");
    text.lines()
        .filter(|l| l.starts_with("celer_node_requests") && l.contains(&want))
        .filter(|l| l.contains("result=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Routing on real nodes: a 4 KiB write goes from the client to every
/// member as `Write`; a 64 KiB write goes to the primary only, as
/// `WritePrimary`, and reaches the others as `Write` forwarded by it.
#[test]
fn small_writes_go_to_every_member_large_ones_through_the_primary() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (nodes, t) = three_nodes(dir.path());
    let client = attached(&nodes, 1, 0, Duration::from_secs(3600));
    let mut q = client.open_queue(0).unwrap();
    let counts = || -> Vec<(u64, u64)> {
        nodes
            .iter()
            .map(|n| (served(n, "write"), served(n, "write_primary")))
            .collect()
    };
    let before = counts();
    write(&mut q, 0, &mut pattern(1, 4096)).unwrap();
    let small = counts();
    for (i, (b, a)) in before.iter().zip(&small).enumerate() {
        assert_eq!(
            (a.0 - b.0, a.1 - b.1),
            (1, 0),
            "node {}: a small write arrives once, as Write",
            nodes[i].id()
        );
    }
    let off = 5 << 20;
    let primary = t
        .partition(t.partition_at(1, off))
        .and_then(|p| p.primary())
        .expect("primary");
    write(&mut q, off, &mut pattern(2, 64 << 10)).unwrap();
    let large = counts();
    for (i, (b, a)) in small.iter().zip(&large).enumerate() {
        let want = if nodes[i].id() == primary {
            (0, 1)
        } else {
            (1, 0)
        };
        assert_eq!(
            (a.0 - b.0, a.1 - b.1),
            want,
            "node {} (primary {primary}): a large write reaches the primary as WritePrimary, the others as its Write",
            nodes[i].id()
        );
    }
    assert!(read(&mut q, off, 64 << 10).unwrap() == pattern(2, 64 << 10));
    drop(q);
    drop(client);
    for n in nodes {
        n.stop().unwrap();
    }
}

/// Checksum fail-over on real nodes: one byte of the primary's copy of a
/// block is flipped on its disk; a read of the block gets `Checksum` from
/// the primary and the right data from another member, with no error.
#[test]
fn a_corrupt_copy_on_the_primary_is_read_from_another_member() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, t) = three_nodes(dir.path());
    let client = attached(&nodes, 1, 0, Duration::from_secs(3600));
    let mut q = client.open_queue(0).unwrap();
    let off = 3 << 20;
    write(&mut q, off, &mut pattern(9, 4096)).unwrap();
    let primary = t
        .partition(t.partition_at(1, off))
        .and_then(|p| p.primary())
        .expect("primary");
    // Stop the primary, flip a byte of its copy where its engine says the
    // block lives, start it again on the same disk.
    let i = nodes
        .iter()
        .position(|n| n.id() == primary)
        .expect("primary node");
    nodes.remove(i).stop().unwrap();
    let disk = dir.path().join(format!("node{primary}.img"));
    let at = Engine::open(&disk, &Default::default())
        .unwrap()
        .into_shards()
        .iter()
        .find_map(|s| s.locate(1, off))
        .expect("the primary holds the block");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at + 100).unwrap();
        b[0] ^= 0x40;
        f.write_all_at(&b, at + 100).unwrap();
        f.sync_all().unwrap();
    }
    let restarted = run_node(dir.path(), primary);
    nodes.insert(i, restarted);
    // It listens on new ports: a table with its new addresses, same
    // members.
    let mut t = t;
    t.epoch += 1;
    for n in t.nodes.iter_mut() {
        if n.id == primary {
            *n = info(&nodes[i], true);
        }
    }
    for n in &nodes {
        assert!(n.install_route(t.clone()));
    }
    let checksum_errors = |n: &Node| -> u64 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(n.admin_addr()).expect("admin port");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .expect("request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("metrics");
        text.lines()
            .filter(|l| l.starts_with("celer_node_requests") && l.contains("op=\"read\""))
            .filter(|l| !l.contains("result=\"ok\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    // A client that connects now (the first one's connection to the
    // primary ended with its restart, which would send the read elsewhere
    // for another reason).
    drop(q);
    drop(client);
    let client = attached(&nodes, 2, 0, Duration::from_secs(3600));
    let mut q = client.open_queue(0).unwrap();
    let before = checksum_errors(&nodes[i]);
    assert_eq!(
        read(&mut q, off, 4096).expect("read fails over"),
        pattern(9, 4096),
        "the right data from another member"
    );
    assert_eq!(
        checksum_errors(&nodes[i]) - before,
        1,
        "the primary was asked first and refused its corrupt copy"
    );
    drop(q);
    drop(client);
    for n in nodes {
        n.stop().unwrap();
    }
}
