//! Storage nodes in one process, driven with raw celer-proto frames: the
//! conversation rules (epochs, membership, shards, versions), primary
//! forwarding, bad frames, and backfill of a new member.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use celer_node::Node;
use celer_proto::{decode_header, Header, Op, Status, HEADER_BYTES};
use celer_route::RouteTable;
use common::*;

#[test]
fn replicates_forwards_and_enforces_the_route() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes: Vec<Node> = (1..=3).map(|i| start_node(dir.path(), i)).collect();
    let t = RouteTable::initial(nodes.iter().map(|n| info(n, true)).collect(), 4, 3, 1 << 20)
        .expect("table");
    for n in &nodes {
        assert!(n.install_route(t.clone()));
    }
    let (off_a, pa) = chunk_where(&t, |_| true);
    let shard = (pa % 2) as u16;

    // Small write: the client sends it to every member.
    let data = pattern(1, 4096);
    for n in &nodes {
        let mut w = Wire::connect(n, shard);
        let h = w.req(Op::Write, t.epoch, 1, off_a, 4096);
        let mut h = h;
        h.version = 100;
        let (r, _) = w.call(h, &data);
        assert_eq!(r.status, Status::Ok);
        assert!(r.version >= 100, "responses carry the highest version seen");
    }
    // Large write: to the primary, which forwards.
    let big = pattern(2, 256 << 10);
    let primary = t.partition(pa).and_then(|p| p.primary()).expect("primary");
    let pn = nodes
        .iter()
        .find(|n| n.id() == primary)
        .expect("primary node");
    let mut w = Wire::connect(pn, shard);
    let mut h = w.req(Op::WritePrimary, t.epoch, 1, off_a + 8192, big.len() as u32);
    h.version = 101;
    let (r, _) = w.call(h, &big);
    assert_eq!(r.status, Status::Ok);
    // A non-primary refuses WritePrimary.
    let other = nodes.iter().find(|n| n.id() != primary).expect("other");
    let mut w2 = Wire::connect(other, shard);
    let mut h = w2.req(Op::WritePrimary, t.epoch, 1, off_a, 4096);
    h.version = 102;
    assert_eq!(w2.call(h, &data).0.status, Status::NotReplica);

    for n in &nodes {
        let (s, got) = read_block(n, &t, off_a, 4096);
        assert_eq!(s, Status::Ok);
        assert_eq!(got, data, "node {} holds the small write", n.id());
        let (s, got) = read_block(n, &t, off_a + 8192, big.len() as u32);
        assert_eq!(s, Status::Ok);
        assert_eq!(got, big, "node {} holds the forwarded write", n.id());
    }

    // The version rule: an older version is refused (never acknowledged)
    // with the stored version; the same version is a retry (Ok); neither
    // changes the data.
    let mut w = Wire::connect(&nodes[0], shard);
    let mut h = w.req(Op::Write, t.epoch, 1, off_a, 4096);
    h.version = 50;
    let (r, _) = w.call(h, &pattern(9, 4096));
    assert_eq!((r.status, r.version), (Status::OlderVersion, 100));
    let mut h = w.req(Op::Write, t.epoch, 1, off_a, 4096);
    h.version = 100;
    assert_eq!(w.call(h, &data).0.status, Status::Ok);
    assert_eq!(read_block(&nodes[0], &t, off_a, 4096).1, data);
    // A version far ahead of the node's clock is refused: it would make
    // every later write of the block lose.
    let mut h = w.req(Op::Write, t.epoch, 1, off_a, 4096);
    h.version = u64::MAX;
    assert_eq!(w.call(h, &pattern(9, 4096)).0.status, Status::VersionAhead);
    assert_eq!(read_block(&nodes[0], &t, off_a, 4096).1, data);

    // Old epoch: the node hands over its table.
    let h = w.req(Op::Read, 0, 1, off_a, 4096);
    let (r, p) = w.call(h, &[]);
    assert_eq!(r.status, Status::StaleEpoch);
    assert_eq!(RouteTable::decode(&p).expect("a table"), t);
    // Newer epoch than the node's: RouteBehind.
    let h = w.req(Op::Read, t.epoch + 5, 1, off_a, 4096);
    assert_eq!(w.call(h, &[]).0.status, Status::RouteBehind);
    // The partition's other shard: Invalid. Crossing a chunk: Invalid.
    let mut wrong = Wire::connect(&nodes[0], 1 - shard);
    let h = wrong.req(Op::Read, t.epoch, 1, off_a, 4096);
    assert_eq!(wrong.call(h, &[]).0.status, Status::Invalid);
    let h = w.req(Op::Read, t.epoch, 1, off_a + (1 << 20) - 4096, 8192);
    assert_eq!(w.call(h, &[]).0.status, Status::Invalid);
    // A write without a version, or whose payload is not its length: Invalid.
    let h = w.req(Op::Write, t.epoch, 1, off_a, 4096);
    assert_eq!(w.call(h, &data).0.status, Status::Invalid);
    let mut h = w.req(Op::Write, t.epoch, 1, off_a, 8192);
    h.version = 200;
    assert_eq!(w.call(h, &data).0.status, Status::Invalid);

    // Garbage closes that connection only; the node keeps serving. A
    // Hello without a credential is refused and its connection closed.
    let mut bad = TcpStream::connect(nodes[0].data_addr()).expect("connect");
    bad.write_all(&[0xAB; 200]).expect("send garbage");
    let mut hello = Header::request(Op::Hello, 1);
    hello.offset = shard as u64;
    let mut c2 = TcpStream::connect(nodes[0].data_addr()).expect("connect");
    c2.write_all(&hello.encode()).expect("hello");
    c2.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut sink = Vec::new();
    let _ = c2.read_to_end(&mut sink); // closed by the node after its answer
    assert_eq!(sink.len(), HEADER_BYTES + 32 + HEADER_BYTES, "{sink:?}");
    let answer = decode_header(&sink[HEADER_BYTES + 32..])
        .expect("valid")
        .expect("whole");
    assert_eq!(answer.status, Status::Unauthorized);
    assert_eq!(read_block(&nodes[0], &t, off_a, 4096).1, data);

    for n in nodes {
        n.stop().expect("clean stop");
    }
}

#[test]
fn a_new_member_backfills_and_then_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes: Vec<Node> = (1..=3).map(|i| start_node(dir.path(), i)).collect();
    let t = RouteTable::initial(nodes.iter().map(|n| info(n, true)).collect(), 4, 3, 1 << 20)
        .expect("table");
    for n in &nodes {
        n.install_route(t.clone());
    }
    // Write 4 blocks (various versions) into every chunk 0..32 of volume 1.
    let mut expect = Vec::new();
    for c in 0..32u64 {
        let p = t.partition_of(1, c);
        for n in &nodes {
            let mut w = Wire::connect(n, (p % 2) as u16);
            for b in 0..4u64 {
                let off = c * (1 << 20) + b * 65536;
                let mut h = w.req(Op::Write, t.epoch, 1, off, 4096);
                h.version = 1000 + c * 10 + b;
                assert_eq!(w.call(h, &pattern(c * 4 + b, 4096)).0.status, Status::Ok);
            }
            // A zeroed block too.
            let mut h = w.req(Op::WriteZeroes, t.epoch, 1, c * (1 << 20) + 4096, 4096);
            h.version = 5000 + c;
            assert_eq!(w.call(h, &[]).0.status, Status::Ok);
        }
        for b in 0..4u64 {
            expect.push((c * (1 << 20) + b * 65536, pattern(c * 4 + b, 4096)));
        }
    }
    // Node 4 joins: it becomes a syncing member of the partitions it wins.
    nodes.push(start_node(dir.path(), 4));
    let t2 = t.rebalance(nodes.iter().map(|n| info(n, true)).collect(), usize::MAX);
    let syncing: Vec<u32> = t2.syncing_on(4).collect();
    assert!(!syncing.is_empty(), "node 4 joins some partitions");
    for n in &nodes {
        n.install_route(t2.clone());
    }
    // Before it is in sync, node 4 refuses reads.
    let (late_off, _) = chunk_where(&t2, |p| syncing.contains(&p));
    assert_eq!(
        read_block(&nodes[3], &t2, late_off, 4096).0,
        Status::NotInSync
    );
    // Writes during the backfill reach it directly.
    let p = t2.partition_at(1, late_off);
    let late = pattern(777, 4096);
    for m in &t2.partition(p).expect("partition").members {
        let n = nodes.iter().find(|n| n.id() == m.node).expect("member");
        let mut w = Wire::connect(n, (p % 2) as u16);
        let mut h = w.req(Op::Write, t2.epoch, 1, late_off, 4096);
        h.version = 9_000_000;
        assert_eq!(w.call(h, &late).0.status, Status::Ok);
    }
    // Progress in bytes: node 4 copies every written chunk (0..32) of the
    // partitions it joins, whole chunks; done never passes total.
    let chunk_bytes = t2.chunk_bytes;
    let want_total = (0..32u64)
        .filter(|c| syncing.contains(&t2.partition_of(1, *c)))
        .count() as u64
        * chunk_bytes;
    assert!(want_total > 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut samples = 0;
    let mut seen_partial = false;
    loop {
        let p = nodes[3].backfill_progress();
        samples += 1;
        assert!(p.bytes_done <= p.bytes_total, "{p:?}");
        assert!(p.bytes_total <= want_total, "more than was written: {p:?}");
        assert!(p.bytes_done.is_multiple_of(4096), "{p:?}");
        if p.partitions_unlisted == 0 && p.bytes_done < p.bytes_total {
            // Everything listed while copying goes on: the total is whole.
            assert_eq!(p.bytes_total, want_total, "{p:?}");
            seen_partial = true;
        }
        if p.bytes_done * 2 >= want_total && p.bytes_done < want_total {
            // Lists go out eagerly (4 per shard in flight), not one
            // partition after another: long before half is copied, every
            // backfill's size is known.
            assert_eq!(p.partitions_unlisted, 0, "half copied: {p:?}");
        }
        if nodes[3].backfilling() == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "backfill did not finish: {p:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
    // Finished backfills stay in the figures until no partition syncs.
    let p = nodes[3].backfill_progress();
    assert_eq!(
        (
            p.bytes_done,
            p.bytes_total,
            p.partitions_unlisted,
            p.bytes_copied
        ),
        (want_total, want_total, 0, want_total),
        "after the backfill ({samples} samples)"
    );
    println!(
        "node 4 backfilled {} MiB in {} partitions; {samples} samples, a partial one seen: {seen_partial}",
        want_total >> 20,
        syncing.len()
    );
    for n in &nodes[..3] {
        assert_eq!(
            n.backfill_progress(),
            celer_node::BackfillProgress::default()
        );
    }
    // What the control service does on the node's report: mark it in sync.
    let mut t3 = t2.clone();
    t3.epoch += 1;
    for p in &syncing {
        t3.mark_in_sync(*p, 4).expect("member");
    }
    for n in &nodes {
        n.install_route(t3.clone());
    }
    for (off, data) in &expect {
        let p = t3.partition_at(1, *off);
        if !syncing.contains(&p) {
            continue;
        }
        let (s, got) = read_block(&nodes[3], &t3, *off, 4096);
        assert_eq!(s, Status::Ok);
        let want = if *off == late_off { &late } else { data };
        assert_eq!(&got, want, "node 4 at offset {off}");
        // The zeroed block reads as zeroes.
        let (_, z) = read_block(&nodes[3], &t3, off - off % (1 << 20) + 4096, 4096);
        assert!(z.iter().all(|b| *b == 0));
    }
    let (_, got) = read_block(&nodes[3], &t3, late_off, 4096);
    assert_eq!(got, late, "the write made during the backfill survives it");
    // The old members that left those partitions (healthy without them)
    // release their copies: each keeps exactly the chunks of its partitions.
    for n in &nodes[..3] {
        let keep = (0..32u64)
            .filter(|c| {
                t3.partition(t3.partition_of(1, *c))
                    .is_some_and(|r| r.member(n.id()).is_some())
            })
            .count();
        let deadline = Instant::now() + Duration::from_secs(20);
        while n.allocated_chunks() != keep {
            assert!(
                Instant::now() < deadline,
                "node {} holds {} chunks, its partitions {keep}",
                n.id(),
                n.allocated_chunks()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let released: usize = 3 * 32
        - nodes[..3]
            .iter()
            .map(|n| n.allocated_chunks())
            .sum::<usize>();
    assert!(released > 0, "some chunks moved away");
    println!("old members released {released} chunks of partitions that moved to node 4");
    // Their partitions still read back from every member.
    for (off, data) in &expect {
        let p = t3.partition_at(1, *off);
        for m in &t3.partition(p).expect("partition").members {
            let n = nodes.iter().find(|n| n.id() == m.node).expect("member");
            let (s, got) = read_block(n, &t3, *off, 4096);
            assert_eq!(s, Status::Ok);
            let want = if *off == late_off { &late } else { data };
            assert_eq!(&got, want, "node {} at offset {off}", n.id());
        }
    }
    // No partition syncs any more: the rebalance is over, its figures go
    // to 0; the counter of bytes ever copied stays.
    assert!(t3.partitions.iter().all(|p| p.all_in_sync()));
    let over = celer_node::BackfillProgress {
        bytes_copied: want_total,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while nodes[3].backfill_progress() != over {
        assert!(
            Instant::now() < deadline,
            "figures after the rebalance: {:?}",
            nodes[3].backfill_progress()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    for n in nodes {
        n.stop().expect("clean stop");
    }
}

/// A restarted node refuses a client's write at or below the discard floor
/// its engine kept. The version of a chunk a discard left without a slot
/// lives in memory; a write sent before the restart (the client sends
/// again what was not answered) may be older than such a discard applied
/// here before it, while the other replicas got the write first and the
/// discard after. The writer sends it again with a newer version, which
/// every replica applies.
#[test]
fn a_restarted_node_refuses_writes_older_than_a_discard_it_applied_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table_of =
        |n: &Node| RouteTable::initial(vec![info(n, true)], 4, 1, 1 << 20).expect("table");
    let n = start_node(dir.path(), 1);
    let t = table_of(&n);
    assert!(n.install_route(t.clone()));
    let (off, p) = chunk_where(&t, |_| true);
    let shard = (p % 2) as u16;
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let clock = celer_proto::clock_of_unix_ms(unix_ms);
    let version = |tick: u64| ((clock + tick) << 16) | 1;
    let data = pattern(3, 4096);
    let mut w = Wire::connect(&n, shard);
    let mut h = w.req(Op::Write, t.epoch, 1, off, 4096);
    h.version = version(1);
    assert_eq!(w.call(h, &data).0.status, Status::Ok);
    let mut h = w.req(Op::Discard, t.epoch, 1, off, 1 << 20);
    h.version = version(3);
    assert_eq!(w.call(h, &[]).0.status, Status::Ok);
    // Before the restart the discard's version, in memory, drops it.
    let late = pattern(4, 4096);
    let mut h = w.req(Op::Write, t.epoch, 1, off, 4096);
    h.version = version(2);
    let (r, _) = w.call(h, &late);
    assert_eq!((r.status, r.version), (Status::OlderVersion, version(3)));
    drop(w);
    n.stop().expect("stop");

    let n = start_node(dir.path(), 1);
    let t = table_of(&n);
    assert!(n.install_route(t.clone()));
    let mut w = Wire::connect(&n, shard);
    let mut h = w.req(Op::Write, t.epoch, 1, off, 4096);
    h.version = version(2);
    let (r, _) = w.call(h, &late);
    assert_eq!(r.status, Status::OlderVersion, "the floor refuses it");
    assert!(r.version >= version(3), "{:#x}", r.version);
    let (s, got) = read_block(&n, &t, off, 4096);
    assert_eq!(s, Status::Ok);
    assert!(got.iter().all(|b| *b == 0), "the discard stands");
    // Sent again past the version the node named, as the client does.
    let mut h = w.req(Op::Write, t.epoch, 1, off, 4096);
    h.version = (celer_proto::version_clock(r.version) + 1) << 16 | 1;
    assert_eq!(w.call(h, &late).0.status, Status::Ok);
    assert_eq!(read_block(&n, &t, off, 4096).1, late);
    n.stop().expect("stop");
}
