//! `Client::fill_chunks` (the data side of `celer volume flatten`) against
//! scriptable nodes: a `Fill` per piece to every member of its partition,
//! retried after `Busy`; a node built before the op (it closes the
//! connection on it) is named in a clear error instead of a retry loop.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use celer_client::{Client, ClientConfig, FillError, FillOptions, FillProgress};
use celer_proto::Op;
use common::*;

const CHUNK: u64 = 1 << 20;

fn client(c: &Cluster) -> Client {
    let mut cfg = ClientConfig::new(c.seeds(), 1, 64 << 20, cred(1));
    cfg.request_timeout = Duration::from_millis(200);
    Client::connect(cfg).expect("client connects")
}

fn opts() -> FillOptions {
    FillOptions {
        workers: 2,
        stall_timeout: Duration::from_secs(20),
    }
}

#[test]
fn every_member_of_each_piece_gets_a_fill_and_busy_is_asked_again() {
    let c = Cluster::start(4, &[1, 2, 3, 4], 2, 4, CHUNK);
    let cl = client(&c);
    c.node(2).script(|s| s.busy_next = 3);
    let chunks: Vec<u64> = (0..8).collect();
    let seen = Mutex::new(Vec::<FillProgress>::new());
    let done = cl
        .fill_chunks(&chunks, &opts(), &|p| {
            seen.lock().expect("progress").push(p)
        })
        .expect("fill");
    assert_eq!(done.bytes_total, 8 * CHUNK);
    assert_eq!(done.bytes_done, 8 * CHUNK);
    assert_eq!(done.bytes_copied, 8 * CHUNK, "the members' counts");
    let seen = seen.into_inner().expect("progress");
    assert_eq!(seen.len(), 8, "one progress report per piece");
    assert!(seen.windows(2).all(|w| w[0].bytes_done < w[1].bytes_done));
    for ch in chunks {
        let p = c.table.partition_of(1, ch);
        for m in &c.table.partition(p).expect("partition").members {
            let fills = c
                .node(m.node)
                .log()
                .iter()
                .filter(|l| l.op == Op::Fill && l.offset == ch * CHUNK)
                .count();
            assert!(fills >= 1, "node {} got no Fill of chunk {ch}", m.node);
        }
    }
    let busy_answered = c.node(2).log().iter().filter(|l| l.op == Op::Fill).count();
    assert!(
        busy_answered > 3,
        "node 2's Busy answers were not asked again"
    );
}

#[test]
fn a_node_that_does_not_know_fill_is_named() {
    let c = Cluster::start(3, &[1, 2, 3], 1, 2, CHUNK);
    let cl = client(&c);
    c.node(3).script(|s| s.unknown_fill = true);
    let t = Instant::now();
    let err = cl
        .fill_chunks(&[0, 1], &opts(), &|_| {})
        .expect_err("node 3 cannot fill");
    println!("{err} (after {} ms)", t.elapsed().as_millis());
    match &err {
        FillError::OldNode { node, .. } => assert_eq!(*node, 3),
        e => panic!("not the old-node error: {e}"),
    }
    assert!(err.to_string().contains("older"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10));
}
