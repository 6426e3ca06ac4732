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
