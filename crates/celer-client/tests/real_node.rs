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
    start_node_idle(dir, id, Some(celer_node::IDLE_TIMEOUT_DEFAULT))
}

fn start_node_idle(dir: &Path, id: u32, idle: Option<Duration>) -> Node {
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
    run_node_idle(dir, id, idle)
}

/// Starts node `id` on its existing disk.
fn run_node(dir: &Path, id: u32) -> Node {
    run_node_idle(dir, id, Some(celer_node::IDLE_TIMEOUT_DEFAULT))
}

fn run_node_idle(dir: &Path, id: u32, idle: Option<Duration>) -> Node {
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
        idle_timeout: idle,
        scrub_bytes_per_sec: celer_node::SCRUB_RATE_DEFAULT,
        scrub_interval: celer_node::SCRUB_INTERVAL_DEFAULT,
        tls_creds: None,
        hugepages: false,
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
    // The queue's connections are up once it wrote to every chunk the
    // loop below uses (each chunk's partition lives in one node shard).
    for chunk in 0..8u64 {
        write(&mut q, chunk << 20, &mut pattern(chunk, 4096)).expect("first writes");
    }
    let counts = || -> (u64, u64) {
        (
            nodes
                .iter()
                .map(|n| metric(n, "celer_node_client_connections_total", &[]))
                .sum(),
            nodes
                .iter()
                .map(|n| metric(n, "celer_node_requests_total", &["result=\"error\""]))
                .sum(),
        )
    };
    let (conns0, errors0) = counts();
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
    // No pause is seen as events, not time (a loaded machine stretches
    // any pair): no request refused (an expired capability would be), no
    // connection made again (a renewal must not reconnect); and no pair
    // near a request timeout (500 ms), which a lapse would cost.
    let (conns, errors) = counts();
    assert_eq!(errors - errors0, 0, "requests refused across renewals");
    assert_eq!(conns - conns0, 0, "connections made again across renewals");
    assert!(longest < Duration::from_millis(450), "a pause: {longest:?}");
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
    metric(
        n,
        "celer_node_requests",
        &[&format!("op=\"{op}\""), "result=\"ok\""],
    )
}

/// The sum over shards of node `n`'s counter `name`.
fn node_counter(n: &Node, name: &str) -> u64 {
    metric(n, &format!("{name}{{"), &[])
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

/// Sum of node `n`'s metric lines that start with `name` and contain every
/// one of `labels` (its admin `/metrics`, read over plain HTTP/1.0).
fn metric(n: &Node, name: &str, labels: &[&str]) -> u64 {
    admin_http(n, "GET /metrics HTTP/1.0\r\n\r\n")
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Reads of node `n` that it refused (a checksum error on its copy, here).
fn refused_reads(n: &Node) -> u64 {
    metric(
        n,
        "celer_node_requests",
        &["op=\"read\"", "result=\"error\""],
    )
}

fn repairs(n: &Node, result: &str) -> u64 {
    metric(
        n,
        "celer_node_repairs_total",
        &[&format!("result=\"{result}\"")],
    )
}

/// Stops nodes `ids`, flips one byte of their copy of (volume 1, `off`)
/// where their engine says the block lives, starts them again on the same
/// disks and installs a table with their new addresses (same members) on
/// every node.
fn corrupt_copies(dir: &Path, nodes: &mut Vec<Node>, t: &mut RouteTable, ids: &[u32], off: u64) {
    edit_stopped(dir, nodes, t, ids, |disk, _| {
        let at = Engine::open(disk, &Default::default())
            .unwrap()
            .into_shards()
            .iter()
            .find_map(|s| s.locate(1, off))
            .expect("the node holds the block");
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(disk)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at + 100).unwrap();
        b[0] ^= 0x40;
        f.write_all_at(&b, at + 100).unwrap();
        f.sync_all().unwrap();
    });
}

/// Stops nodes `ids`, runs `edit(disk, id)` on each one's disk, starts
/// them again on the same disks and installs a table with their new
/// addresses (same members) on every node.
fn edit_stopped(
    dir: &Path,
    nodes: &mut Vec<Node>,
    t: &mut RouteTable,
    ids: &[u32],
    edit: impl Fn(&Path, u32),
) {
    for &id in ids {
        let i = nodes
            .iter()
            .position(|n| n.id() == id)
            .expect("node to edit");
        nodes.remove(i).stop().unwrap();
        edit(&dir.join(format!("node{id}.img")), id);
        let restarted = run_node(dir, id);
        nodes.insert(i, restarted);
    }
    t.epoch += 1;
    for slot in t.nodes.iter_mut() {
        if let Some(n) = nodes.iter().find(|n| n.id() == slot.id) {
            *slot = info(n, true);
        }
    }
    for n in nodes.iter() {
        assert!(n.install_route(t.clone()));
    }
}

/// Rewrites the copy of (volume 1, `off`) on the stopped node's `disk` with
/// `data` at the version it holds (an `EngineOp::Repair`: a valid block
/// with its own crc, the same version as the other copies: what a bug that
/// wrote different data under one version would leave).
fn rewrite_at_same_version(disk: &Path, off: u64, data: &[u8]) {
    let mut shards = Engine::open(disk, &Default::default())
        .expect("open the stopped node's disk")
        .into_shards();
    let g = *shards[0].geometry();
    let sh = &mut shards[celer_engine::shard_for(&g, 1, off / g.chunk_bytes()) as usize];
    let mut state = [(celer_engine::BlockKind::Unwritten, 0u64)];
    sh.block_states(1, off, &mut state);
    assert_eq!(
        state[0].0,
        celer_engine::BlockKind::Data,
        "the copy holds data"
    );
    let mut buf = celer_engine::AlignedBuf::new(1);
    buf[..4096].copy_from_slice(data);
    let s = [celer_engine::Segment {
        addr: buf.as_mut_ptr(),
        len: 4096,
    }];
    let req = celer_engine::EngineRequest {
        op: celer_engine::EngineOp::Repair,
        volume: 1,
        offset_bytes: off,
        len_bytes: 4096,
        segments: &s,
        version: state[0].1,
        epoch: 0,
        tag: 1,
        chain: &[],
        block_crc: None,
    };
    // SAFETY: `buf` outlives the wait.
    unsafe { sh.submit(&req) }.expect("submit");
    let mut result = None;
    while result.is_none() {
        sh.wait(&mut |c| result = Some(c.result));
    }
    result.expect("completion").expect("rewritten");
    let mut after = [(celer_engine::BlockKind::Unwritten, 0u64)];
    sh.block_states(1, off, &mut after);
    assert_eq!(after, state, "same kind and version as before");
}

/// What node `id`'s disk holds at (volume 1, `off`), one block (the node
/// stopped): `Err` with the engine's error if the copy is bad.
fn stored_block(dir: &Path, id: u32, off: u64) -> Result<Vec<u8>, celer_engine::EngineError> {
    let mut shards = Engine::open(&dir.join(format!("node{id}.img")), &Default::default())
        .expect("open the stopped node's disk")
        .into_shards();
    let g = *shards[0].geometry();
    let sh = &mut shards[celer_engine::shard_for(&g, 1, off / g.chunk_bytes()) as usize];
    let mut buf = celer_engine::AlignedBuf::new(1);
    let s = [celer_engine::Segment {
        addr: buf.as_mut_ptr(),
        len: 4096,
    }];
    let req = celer_engine::EngineRequest {
        op: celer_engine::EngineOp::Read,
        volume: 1,
        offset_bytes: off,
        len_bytes: 4096,
        segments: &s,
        version: 0,
        epoch: 0,
        tag: 1,
        chain: &[],
        block_crc: None,
    };
    // SAFETY: `buf` outlives the wait.
    unsafe { sh.submit(&req) }?;
    let mut result = None;
    while result.is_none() {
        sh.wait(&mut |c| result = Some(c.result));
    }
    result.expect("completion")?;
    Ok(buf[..4096].to_vec())
}

/// Checksum fail-over and read repair on real nodes: one byte of the
/// primary's copy of a block is flipped on its disk; a read of the block
/// gets `Checksum` from the primary and the right data from another member,
/// with no error, and the primary rewrites its copy from a member in the
/// background (one repair counted): its next read of the block succeeds and
/// its disk holds the right data.
#[test]
fn a_corrupt_copy_is_read_from_another_member_and_repaired() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, mut t) = three_nodes(dir.path());
    let client = attached(&nodes, 1, 0, Duration::from_secs(3600));
    let mut q = client.open_queue(0).unwrap();
    let off = 3 << 20;
    write(&mut q, off, &mut pattern(9, 4096)).unwrap();
    // A neighbour written later, so the damaged block is not the last
    // thing in the chunk.
    write(&mut q, off + 8192, &mut pattern(10, 4096)).unwrap();
    drop(q);
    drop(client);
    let primary = t
        .partition(t.partition_at(1, off))
        .and_then(|p| p.primary())
        .expect("primary");
    corrupt_copies(dir.path(), &mut nodes, &mut t, &[primary], off);
    let p = nodes.iter().position(|n| n.id() == primary).unwrap();
    // A client that connects now (the first one's connection to the
    // primary ended with its restart, which would send the read elsewhere
    // for another reason).
    let client = attached(&nodes, 2, 0, Duration::from_secs(3600));
    let mut q = client.open_queue(0).unwrap();
    let before = refused_reads(&nodes[p]);
    assert_eq!(
        read(&mut q, off, 4096).expect("read fails over"),
        pattern(9, 4096),
        "the right data from another member"
    );
    assert_eq!(
        refused_reads(&nodes[p]) - before,
        1,
        "the primary was asked first and refused its corrupt copy"
    );
    let t0 = Instant::now();
    while repairs(&nodes[p], "repaired") == 0 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(repairs(&nodes[p], "repaired"), 1, "one repair counted");
    println!("repaired {:?} after the read", t0.elapsed());
    // The primary now serves the block itself.
    assert_eq!(read(&mut q, off, 4096).unwrap(), pattern(9, 4096));
    assert_eq!(read(&mut q, off + 8192, 4096).unwrap(), pattern(10, 4096));
    assert_eq!(
        refused_reads(&nodes[p]) - before,
        1,
        "the primary's copy reads correctly after the repair"
    );
    // A client write after the repair applies (the repair kept the version).
    write(&mut q, off, &mut pattern(11, 4096)).unwrap();
    drop(q);
    drop(client);
    for n in nodes {
        n.stop().unwrap();
    }
    for id in 1..=3 {
        assert_eq!(
            stored_block(dir.path(), id, off).expect("every copy reads"),
            pattern(11, 4096),
            "node {id}"
        );
    }
}

/// POSTs `/v1/scrub/{action}` to node `n`'s admin port with the token.
fn scrub(n: &Node, action: &str) {
    let text = scrub_as(n, action, "t");
    assert!(text.starts_with("HTTP/1.0 200"), "scrub {action}: {text}");
}

fn scrub_as(n: &Node, action: &str, token: &str) -> String {
    admin_http(
        n,
        &format!(
            "POST /v1/scrub/{action} HTTP/1.0\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
        ),
    )
}

/// Sends `request` (plain HTTP/1.0) to node `n`'s admin port and returns
/// the whole answer, status line included (a 5 s read timeout).
fn admin_http(n: &Node, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(n.admin_addr()).expect("admin port");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(request.as_bytes()).expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("answer");
    text
}

/// The scrub finds a damaged copy nobody reads and repairs it: a block is
/// flipped on a non-primary member (reads go to the primary, so only the
/// scrub can see it); a pass started on that node reads every data block
/// the node holds, counts one damaged block and one repair, and the disk
/// holds the right data after. The other nodes' passes find nothing.
#[test]
fn the_scrub_finds_and_repairs_a_copy_nobody_reads() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, mut t) = three_nodes(dir.path());
    let client = attached(&nodes, 1, 0, Duration::from_secs(3600));
    let mut q = client.open_queue(0).unwrap();
    // 4 MiB in 64 KiB writes (every chunk of the volume's first 4 MiB).
    for i in 0..64u64 {
        write(&mut q, i * (64 << 10), &mut pattern(100 + i, 64 << 10)).unwrap();
    }
    drop(q);
    drop(client);
    let off = (2 << 20) + 5 * 4096;
    let part = t
        .partition(t.partition_at(1, off))
        .expect("partition")
        .clone();
    let victim = part
        .members
        .iter()
        .map(|m| m.node)
        .find(|&n| Some(n) != part.primary())
        .expect("a non-primary member");
    corrupt_copies(dir.path(), &mut nodes, &mut t, &[victim], off);
    let v = nodes.iter().position(|n| n.id() == victim).unwrap();
    // Only the cluster token controls it; an unknown action is refused.
    assert!(scrub_as(&nodes[v], "start", "wrong").starts_with("HTTP/1.0 401"));
    assert!(scrub_as(&nodes[v], "explode", "t").starts_with("HTTP/1.0 404"));
    // A pass over one volume's layer keys only: volume 99's (none here)
    // reads nothing and finds nothing; a body that is not a key list is
    // refused.
    let start_only = |n: &Node, body: &str| {
        admin_http(
            n,
            &format!(
                "POST /v1/scrub/start HTTP/1.0\r\nAuthorization: Bearer t\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
    };
    assert!(start_only(&nodes[v], "{\"keys\": 99}").starts_with("HTTP/1.0 400"));
    assert!(start_only(&nodes[v], "{\"keys\": [99]}").starts_with("HTTP/1.0 200"));
    let t0 = Instant::now();
    while !admin_http(&nodes[v], "GET /v1/scrub HTTP/1.0\r\n\r\n").contains("\"passes\":1")
        && t0.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = admin_http(&nodes[v], "GET /v1/scrub HTTP/1.0\r\n\r\n");
    assert!(status.contains("\"passes\":1"), "{status}");
    assert_eq!(metric(&nodes[v], "celer_node_scrub_bytes_total", &[]), 0);
    assert_eq!(
        metric(&nodes[v], "celer_node_scrub_damaged_blocks_total", &[]),
        0
    );
    let t0 = Instant::now();
    for n in &nodes {
        scrub(n, "start");
    }
    let passes = |n: &Node| metric(n, "celer_node_scrub_bytes_total", &[]);
    while repairs(&nodes[v], "repaired") == 0 && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "victim node {victim}: repaired after {:?}, {} bytes scrubbed",
        t0.elapsed(),
        passes(&nodes[v])
    );
    assert_eq!(
        metric(&nodes[v], "celer_node_scrub_damaged_blocks_total", &[]),
        1,
        "the scrub found the damaged block"
    );
    assert_eq!(repairs(&nodes[v], "repaired"), 1, "and repaired it");
    // Every node's pass reads all it holds: 4 MiB of data each (3 replicas).
    let t1 = Instant::now();
    while nodes.iter().any(|n| passes(n) < (4 << 20) - 4096)
        && t1.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = t0.elapsed();
    println!("every node scrubbed its 4 MiB in {took:?}");
    // Each node reads 4 MiB at its default 8 MiB/s: not faster than 0.5 s
    // (the bucket starts empty at the pass's start).
    assert!(
        took >= Duration::from_millis(450),
        "4 MiB per node scrubbed in {took:?}: faster than the rate allows"
    );
    for n in &nodes {
        assert!(
            passes(n) >= (4 << 20) - 4096,
            "node {} scrubbed {} bytes",
            n.id(),
            passes(n)
        );
        if n.id() != victim {
            assert_eq!(metric(n, "celer_node_scrub_damaged_blocks_total", &[]), 0);
        }
    }
    for n in nodes {
        n.stop().unwrap();
    }
    assert_eq!(
        stored_block(dir.path(), victim, off).expect("the victim's copy reads"),
        pattern(100 + off / (64 << 10), 64 << 10)[(off % (64 << 10)) as usize..][..4096].to_vec()
    );
}

/// A copy that missed a write is caught up by the scrub's comparison: a
/// member is stopped while a client writes three blocks (each write
/// reaches the two others and fails, as a client dying between replicas
/// would leave it), then starts again on its disk in the same table, still
/// an in-sync member with the old versions. The blocks: one it holds at an
/// older version; one in a 256 KiB piece of that chunk where it holds no
/// data (nothing there to read); one in a chunk it lacks entirely (known
/// only from the other members' chunk lists). Its scrub compares block
/// states with the other members, finds the newer versions there and
/// copies all three: its disk then holds the writes.
#[test]
fn the_scrub_copies_a_write_a_member_missed() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, mut t) = three_nodes(dir.path());
    let off = (6 << 20) + 3 * 4096;
    let in_empty_piece = (6 << 20) + (700 << 10);
    // The lagging member is the last one the client writes to (a write it
    // cannot send there has reached the two others then).
    let last_writer = |at: u64| {
        t.partition(t.partition_at(1, at))
            .and_then(|part| part.members.last())
            .map(|m| m.node)
            .expect("a member")
    };
    let lagging = last_writer(off);
    let in_missing_chunk = (8..64u64)
        .map(|c| (c << 20) + 2 * 4096)
        .find(|&at| last_writer(at) == lagging)
        .expect("another chunk written last to the same member");
    {
        let client = attached(&nodes, 1, 0, Duration::from_secs(3600));
        let mut q = client.open_queue(0).unwrap();
        write(&mut q, off, &mut pattern(1, 4096)).unwrap();
        let i = nodes.iter().position(|n| n.id() == lagging).unwrap();
        nodes.remove(i).stop().unwrap();
        // The member is gone: each write lands on the two others only and
        // is not acknowledged.
        assert!(write(&mut q, off, &mut pattern(2, 4096)).is_err());
        assert!(write(&mut q, in_empty_piece, &mut pattern(3, 4096)).is_err());
        assert!(write(&mut q, in_missing_chunk, &mut pattern(4, 4096)).is_err());
        drop(q);
        drop(client);
        nodes.insert(i, run_node(dir.path(), lagging));
    }
    // Same members, all in sync, the restarted one at its new address.
    t.epoch += 1;
    for slot in t.nodes.iter_mut() {
        if let Some(n) = nodes.iter().find(|n| n.id() == slot.id) {
            *slot = info(n, true);
        }
    }
    for n in &nodes {
        assert!(n.install_route(t.clone()));
    }
    let l = nodes.iter().position(|n| n.id() == lagging).unwrap();
    let t0 = Instant::now();
    scrub(&nodes[l], "start");
    let caught_up = |n: &Node| repairs(n, "repaired");
    while caught_up(&nodes[l]) == 0 && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    while caught_up(&nodes[l]) < 3 && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("caught up {:?} after the scrub started", t0.elapsed());
    assert_eq!(
        caught_up(&nodes[l]),
        3,
        "the three missed writes were copied"
    );
    for n in nodes {
        n.stop().unwrap();
    }
    for id in 1..=3 {
        for (at, seed) in [(off, 2), (in_empty_piece, 3), (in_missing_chunk, 4)] {
            assert_eq!(
                stored_block(dir.path(), id, at).expect("every copy reads"),
                pattern(seed, 4096),
                "node {id} holds the write at {at}"
            );
        }
    }
}

/// A block damaged on every member: the read fails with a checksum error
/// naming the offset (no member returns wrong data), and each node reports
/// it unrepairable (nothing is zeroed or rewritten).
#[test]
fn a_block_damaged_on_every_member_fails_its_read() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, mut t) = three_nodes(dir.path());
    let client = attached(&nodes, 1, 0, Duration::from_secs(3600));
    let mut q = client.open_queue(0).unwrap();
    let off = 5 << 20;
    write(&mut q, off, &mut pattern(3, 4096)).unwrap();
    drop(q);
    drop(client);
    corrupt_copies(dir.path(), &mut nodes, &mut t, &[1, 2, 3], off);
    let client = attached(&nodes, 2, 0, Duration::from_secs(3600));
    let mut q = client.open_queue(0).unwrap();
    match read(&mut q, off, 4096) {
        Ok(_) => panic!("a block damaged on every member was read"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("checksum") && msg.contains(&off.to_string()),
                "the error names the checksum and the offset: {msg}"
            );
        }
    }
    let t0 = Instant::now();
    while nodes
        .iter()
        .map(|n| repairs(n, "unrepairable"))
        .sum::<u64>()
        < 3
        && t0.elapsed() < Duration::from_secs(15)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    for n in &nodes {
        assert_eq!(repairs(n, "unrepairable"), 1, "node {}", n.id());
        assert_eq!(repairs(n, "repaired"), 0, "node {}", n.id());
    }
    drop(q);
    drop(client);
    for n in nodes {
        n.stop().unwrap();
    }
    for id in 1..=3 {
        assert!(
            matches!(
                stored_block(dir.path(), id, off),
                Err(celer_engine::EngineError::Checksum { .. })
            ),
            "node {id}: the damaged copy stays as it was (never zeroed)"
        );
    }
}

fn differences(n: &Node, kind: &str) -> u64 {
    metric(
        n,
        "celer_node_scrub_differences_total",
        &[&format!("kind=\"{kind}\"")],
    )
}

/// The scrub compares copies of equal version by crc. Block A is
/// rewritten on one member with other data at the version all three hold
/// (a valid block: its own crc passes); block B on two members, each with
/// its own data. A scrub pass on every node: the member whose copy of A
/// differs from the two others (which agree) counts one mismatch and
/// copies theirs; no node touches A otherwise. B has no majority: every
/// node reports it divergent and leaves it as it is.
#[test]
fn the_scrub_compares_copies_of_equal_version_by_crc() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, mut t) = three_nodes(dir.path());
    let client = attached(&nodes, 1, 0, Duration::from_secs(3600));
    let mut q = client.open_queue(0).unwrap();
    // 1 MiB in 64 KiB writes: all of chunk 2.
    for i in 0..16u64 {
        write(
            &mut q,
            (2 << 20) + i * (64 << 10),
            &mut pattern(200 + i, 64 << 10),
        )
        .unwrap();
    }
    drop(q);
    drop(client);
    let original = |off: u64| {
        let w = (off - (2 << 20)) / (64 << 10);
        pattern(200 + w, 64 << 10)[(off % (64 << 10)) as usize..][..4096].to_vec()
    };
    let (a, b) = ((2 << 20) + 7 * 4096, (2 << 20) + 200 * 4096);
    let part = t
        .partition(t.partition_at(1, a))
        .expect("partition")
        .clone();
    let ids: Vec<u32> = part.members.iter().map(|m| m.node).collect();
    assert_eq!(ids.len(), 3);
    let odd = ids[1];
    let (b1, b2) = (ids[0], ids[2]);
    edit_stopped(
        dir.path(),
        &mut nodes,
        &mut t,
        &[odd, b1, b2],
        |disk, id| {
            if id == odd {
                rewrite_at_same_version(disk, a, &pattern(900, 4096));
            }
            if id == b1 || id == b2 {
                rewrite_at_same_version(disk, b, &pattern(901 + id as u64, 4096));
            }
        },
    );
    let t0 = Instant::now();
    for n in &nodes {
        scrub(n, "start");
    }
    let scrubbed = |n: &Node| metric(n, "celer_node_scrub_bytes_total", &[]);
    let o = nodes.iter().position(|n| n.id() == odd).unwrap();
    while (repairs(&nodes[o], "repaired") == 0
        || nodes.iter().any(|n| scrubbed(n) < 1 << 20)
        || nodes.iter().any(|n| differences(n, "divergent") == 0))
        && t0.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("compared and repaired in {:?}", t0.elapsed());
    for n in &nodes {
        let id = n.id();
        assert_eq!(
            scrubbed(n),
            1 << 20,
            "node {id} scrubbed its copy of the chunk"
        );
        assert_eq!(differences(n, "behind"), 0, "node {id}: no version differs");
        assert_eq!(
            differences(n, "mismatched"),
            u64::from(id == odd),
            "node {id}: only the odd copy of A is copied"
        );
        assert_eq!(repairs(n, "repaired"), u64::from(id == odd), "node {id}");
        assert_eq!(
            differences(n, "divergent"),
            1,
            "node {id}: B has no majority (reported by every member)"
        );
    }
    for n in nodes {
        n.stop().unwrap();
    }
    for &id in &ids {
        assert_eq!(
            stored_block(dir.path(), id, a).expect("A reads"),
            original(a),
            "node {id}: A holds the majority's data"
        );
        let want_b = if id == b1 || id == b2 {
            pattern(901 + id as u64, 4096)
        } else {
            original(b)
        };
        assert_eq!(
            stored_block(dir.path(), id, b).expect("B reads"),
            want_b,
            "node {id}: B left as it was"
        );
    }
}

/// A client of volume 1 with 512-byte logical sectors.
fn attached_512(nodes: &[Node], attachment: u32) -> Client {
    let cred = celer_client::mint_credential("t", 1, attachment, false, Duration::from_secs(3600));
    let mut cfg = ClientConfig::new(vec![nodes[0].data_addr().to_string()], 1, 32 << 20, cred);
    cfg.sector_bytes = 512;
    cfg.op_deadline = Duration::from_secs(10);
    Client::connect(cfg).unwrap()
}

/// Writes `writes` (offset, data) at queue depth `depth`; every one must be
/// acknowledged.
fn write_all(
    q: &mut Box<dyn celer_device::DeviceQueue>,
    writes: &mut [(u64, Vec<u8>)],
    depth: usize,
) {
    let mut next = 0;
    let mut inflight = 0;
    let mut done = 0;
    while done < writes.len() {
        while inflight < depth && next < writes.len() {
            let (offset, data) = &mut writes[next];
            let s = [seg(data)];
            let req = celer_device::IoRequest {
                op: IoOp::Write,
                offset_bytes: *offset,
                len_bytes: 0,
                segments: &s,
                tag: next as u64,
            };
            // SAFETY: `writes` outlives every completion awaited here.
            unsafe { q.submit(&req) }.expect("submit");
            next += 1;
            inflight += 1;
        }
        for c in wait_n(q, 1, Duration::from_secs(30)) {
            let (offset, _) = &writes[c.tag as usize];
            c.result
                .unwrap_or_else(|e| panic!("write at {offset} not acknowledged: {e}"));
            inflight -= 1;
            done += 1;
        }
    }
}

/// Bytes `[0, len)` of volume 1 as the engine of a stopped node holds them.
fn engine_bytes(disk: &Path, len: u64) -> Vec<u8> {
    let mut shards = Engine::open(disk, &celer_engine::OpenOptions::default())
        .expect("open the stopped node's disk")
        .into_shards();
    let g = *shards[0].geometry();
    let mut out = vec![0u8; len as usize];
    let mut buf = celer_engine::AlignedBuf::new((g.chunk_bytes() / 4096) as usize);
    let mut at = 0;
    while at < len {
        let n = (g.chunk_bytes() - at % g.chunk_bytes()).min(len - at);
        let sh = &mut shards[celer_engine::shard_for(&g, 1, at / g.chunk_bytes()) as usize];
        let s = [celer_engine::Segment {
            addr: buf.as_mut_ptr(),
            len: n as usize,
        }];
        let req = celer_engine::EngineRequest {
            op: celer_engine::EngineOp::Read,
            volume: 1,
            offset_bytes: at,
            len_bytes: n,
            segments: &s,
            version: 0,
            epoch: 0,
            tag: 1,
            chain: &[],
            block_crc: None,
        };
        // SAFETY: `buf` outlives the wait.
        unsafe { sh.submit(&req) }.expect("engine read");
        let mut result = None;
        while result.is_none() {
            sh.wait(&mut |c| result = Some(c.result));
        }
        result.unwrap().expect("engine read");
        out[at as usize..(at + n) as usize].copy_from_slice(&buf[..n as usize]);
        at += n;
    }
    out
}

/// Shared mode, 512-byte sectors: two attachments write different 512 B
/// sectors of the same 4 KiB blocks at the same time (QD 16 each, in the
/// same block order so they collide), over several rounds. After each round
/// both read every block back and find every sector the last acknowledged
/// write of either gave it (read-after-write across clients). Unaligned
/// writes and write-zeroes that span blocks (sector writes at both ends,
/// whole blocks between) land exactly. At the end the three replicas'
/// disks are identical and hold the same. (With a client-side
/// read-modify-write, or a node merge that does not hold the block, one
/// writer's sectors go missing here.)
#[test]
fn two_attachments_writing_sectors_of_one_block_both_survive() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (nodes, _) = three_nodes(dir.path());
    let (a, b) = (attached_512(&nodes, 41), attached_512(&nodes, 42));
    const BLOCKS: u64 = 96;
    let span = BLOCKS * 4096;
    let mut want = vec![0u8; span as usize + 3 * 4096];
    for round in 0..4u64 {
        // Writer w owns sectors s with s % 2 == w; a stride over the chunk
        // boundary (block 256 = 1 MiB) would be the same, the blocks here
        // cover several partitions through their chunks' placement anyway.
        let writes = |w: u64| -> Vec<(u64, Vec<u8>)> {
            let mut v = Vec::new();
            for blk in 0..BLOCKS {
                for s in (w..8).step_by(2) {
                    let seed = (round << 32) | (w << 24) | (blk << 4) | s;
                    v.push((blk * 4096 + s * 512, pattern(seed, 512)));
                }
            }
            v
        };
        let (mut wa, mut wb) = (writes(0), writes(1));
        std::thread::scope(|scope| {
            let ta = scope.spawn(|| {
                let mut q = a.open_queue(0).unwrap();
                write_all(&mut q, &mut wa, 16);
            });
            let tb = scope.spawn(|| {
                let mut q = b.open_queue(0).unwrap();
                write_all(&mut q, &mut wb, 16);
            });
            ta.join().unwrap();
            tb.join().unwrap();
        });
        for (offset, data) in wa.iter().chain(wb.iter()) {
            want[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
        for c in [&a, &b] {
            let mut q = c.open_queue(0).unwrap();
            let got = read(&mut q, 0, span as usize).unwrap();
            for (i, (g, w)) in got.chunks(512).zip(want.chunks(512)).enumerate() {
                assert!(
                    g == w,
                    "round {round}: sector {i} (block {}, sector {}) lost",
                    i / 8,
                    i % 8
                );
            }
            // Single sectors read on their own, unaligned.
            assert_eq!(
                read(&mut q, 512 * 13, 512).unwrap(),
                &want[512 * 13..512 * 14]
            );
        }
    }
    // An unaligned write across blocks (3 KiB in one block, a whole block,
    // 2 KiB of the next), then a write-zeroes that covers part of two
    // blocks, from the two attachments; each reads what the other wrote.
    let (mut qa, mut qb) = (a.open_queue(0).unwrap(), b.open_queue(0).unwrap());
    let base = span;
    let mut odd = pattern(99, 9 * 1024);
    write(&mut qa, base + 1024, &mut odd).expect("unaligned write");
    want[(base + 1024) as usize..(base + 1024) as usize + odd.len()].copy_from_slice(&odd);
    assert_eq!(
        read(&mut qb, base, 3 * 4096).unwrap(),
        &want[base as usize..]
    );
    run(&mut qb, IoOp::WriteZeroes, base + 2048, 4096 + 1024, &[]).expect("partial zeroes");
    want[(base + 2048) as usize..(base + 2048 + 4096 + 1024) as usize].fill(0);
    assert_eq!(
        read(&mut qa, base, 3 * 4096).unwrap(),
        &want[base as usize..]
    );
    // Misaligned for the volume's 512-byte sectors: refused.
    assert!(write(&mut qa, base + 100, &mut [0u8; 512]).is_err());
    drop((qa, qb, a, b));
    let disks: Vec<_> = nodes
        .iter()
        .map(|n| dir.path().join(format!("node{}.img", n.id())))
        .collect();
    for n in nodes {
        n.stop().unwrap();
    }
    let total = want.len() as u64;
    let copies: Vec<Vec<u8>> = disks.iter().map(|d| engine_bytes(d, total)).collect();
    for (i, c) in copies.iter().enumerate() {
        for (k, (g, w)) in c.chunks(512).zip(want.chunks(512)).enumerate() {
            assert!(
                g == w,
                "replica {i}: sector {k} differs from what was acknowledged"
            );
        }
    }
}

/// The node closes client connections silent for 1 s. A client whose
/// queue pings quiet connections (every 300 ms here) keeps them through a
/// quiet 2.5 s: the node closes none and takes no new one for the next
/// read. Without keep-alive the node closes them and the next read
/// reconnects (and still works).
#[test]
fn a_quiet_attachment_keeps_its_connections_through_the_idle_timeout() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let idle = Duration::from_secs(1);
    let n = start_node_idle(dir.path(), 1, Some(idle));
    let t = RouteTable::initial(vec![info(&n, true)], 4, 1, 1 << 20).unwrap();
    assert!(n.install_route(t));
    let opened = || node_counter(&n, "celer_node_client_connections_total");
    let closed = || node_counter(&n, "celer_node_idle_closed_connections_total");
    // (connections taken before the quiet time, closed by the idle
    // timeout during it, taken by the read after it)
    let quiet = |keepalive: Duration, seed: u64| -> (u64, u64, u64) {
        let mut cfg = ClientConfig::new(
            vec![n.data_addr().to_string()],
            1,
            32 << 20,
            celer_client::mint_credential("t", 1, 3, false, Duration::from_secs(3600)),
        );
        cfg.keepalive = keepalive;
        // (Connecting fetches the route on a connection of its own, closed
        // at once: counted from after that.)
        let client = Client::connect(cfg).unwrap();
        let (opened0, closed0) = (opened(), closed());
        let mut q = client.open_queue(0).unwrap();
        let mut d = pattern(seed, 4096);
        write(&mut q, 8192, &mut d).unwrap();
        assert_eq!(read(&mut q, 8192, 4096).unwrap(), d);
        let opened1 = opened();
        // A front end with nothing to do: it sleeps on the completion fd
        // and polls when woken (the keep-alive timer wakes it).
        let fd = q.completion_fd().expect("completion fd");
        let t0 = Instant::now();
        while t0.elapsed() < idle * 5 / 2 {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd.
            unsafe { libc::poll(&mut p, 1, 100) };
            assert_eq!(q.poll(&mut |_| {}), 0, "nothing was submitted");
        }
        let closed1 = closed();
        // The volume works either way.
        assert_eq!(read(&mut q, 8192, 4096).unwrap(), d);
        let opened2 = opened();
        drop(q);
        drop(client);
        (opened1 - opened0, closed1 - closed0, opened2 - opened1)
    };
    let (taken, closed_quiet, retaken) = quiet(Duration::from_millis(300), 1);
    println!("keep-alive every 300 ms: {taken} connections, {closed_quiet} closed idle, {retaken} new for the read after 2.5 s");
    assert!(taken > 0, "the client connected");
    assert_eq!(
        (closed_quiet, retaken),
        (0, 0),
        "keep-alive on: no connection closed idle, none taken anew"
    );
    let (taken, closed_quiet, retaken) = quiet(Duration::ZERO, 2);
    println!("no keep-alive: {taken} connections, {closed_quiet} closed idle, {retaken} new for the read after 2.5 s");
    assert_eq!(
        closed_quiet, taken,
        "keep-alive off: the node closed every connection after {idle:?}"
    );
    assert!(retaken > 0, "keep-alive off: the read reconnected");
    n.stop().unwrap();
}
