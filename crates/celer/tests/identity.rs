//! A storage node's identity belongs to its disk, on a real cluster
//! (`celer meta serve` and `celer node serve` processes): nodes whose
//! disks share a directory keep their own ids across restarts; a process
//! claiming a running node's id is refused; a node whose disk was replaced
//! is refused without `--replace-disk` and accepted with it.

mod support;

use std::time::{Duration, Instant};

use support::cluster::{Cluster, ClusterOpts};

const BIN: &str = env!("CARGO_BIN_EXE_celer");

/// The incident: two nodes whose disk files sat in one directory shared
/// its `node.id`; one restarted, registered under the id of the other,
/// still running, and the control service moved that node's partitions.
/// Here three nodes share the directory and each is SIGKILLed and
/// restarted at once (within its lease): each comes back as itself.
#[test]
fn nodes_whose_disks_share_a_directory_keep_their_own_ids() {
    let mut c = Cluster::start(
        std::path::Path::new(BIN),
        ClusterOpts {
            nodes: 3,
            disks_in_one_dir: true,
            ..ClusterOpts::default()
        },
    );
    let ids: Vec<u32> = (0..3).map(|i| c.node_id(i)).collect();
    println!("node ids {ids:?}");
    let epoch = c.route().epoch;
    for (i, want) in ids.iter().enumerate() {
        c.restart(i);
        let t0 = Instant::now();
        let id = c.node_id(i);
        println!("node {i} back as {id} after {:?}", t0.elapsed());
        assert_eq!(id, *want, "node {i} took another node's id");
    }
    let t = c.wait_healthy(Duration::from_secs(60));
    assert_eq!(t.nodes.len(), 3, "{:?}", t.nodes);
    // Nobody was taken for another disk: no member was replaced, the
    // table moved only for the nodes' own restarts (if at all).
    println!("epoch {epoch} -> {}", t.epoch);
    for (i, n) in c.nodes.iter().enumerate() {
        let recorded = celer_engine::Engine::node_id_of(&n.disk).expect("read the superblock");
        assert_eq!(recorded, Some(ids[i] as u64), "{}", n.disk.display());
    }
    assert!(
        !c.dir.path().join("disks/node.id").exists(),
        "node.id is not written any more"
    );
}

/// A process on another disk claiming a running node's id is refused (with
/// `--node-id`, and even with `--replace-disk`): it exits at once with the
/// control service's 409 and nothing changes. A node whose disk died is
/// refused on its new disk without `--replace-disk`, and with it rejoins
/// under its id and is backfilled.
#[test]
fn a_node_id_goes_to_another_disk_only_when_replaced_explicitly() {
    let mut c = Cluster::start(
        std::path::Path::new(BIN),
        ClusterOpts {
            nodes: 3,
            ..ClusterOpts::default()
        },
    );
    let id0 = c.node_id(0);
    let before = c.route();
    for (name, flag) in [
        ("claims-node-id", "--node-id"),
        ("claims-replace", "--replace-disk"),
    ] {
        let t0 = Instant::now();
        let (code, log) = c.run_node_once(
            name,
            &[flag.into(), id0.to_string()],
            Duration::from_secs(30),
        );
        println!("{flag} {id0}: exit {code:?} after {:?}", t0.elapsed());
        assert_eq!(code, Some(1), "{flag}: {log}");
        for needle in ["409", &format!("node {id0} is running"), "not retried"] {
            assert!(log.contains(needle), "{flag}: `{needle}` not in {log}");
        }
    }
    assert_eq!(c.node_id(0), id0);
    let t = c.route();
    assert_eq!(
        t.epoch, before.epoch,
        "the refused claims changed the table"
    );
    assert!(t.node(id0).is_some_and(|n| n.up));

    // Node 1's disk dies.
    let id1 = c.node_id(1);
    c.kill(1);
    std::fs::remove_file(&c.nodes[1].disk).expect("remove the disk");
    c.wait_down(id1, Duration::from_secs(10));
    let (code, log) = c.run_node_once(
        "new-disk-no-flag",
        &["--node-id".into(), id1.to_string()],
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(1), "{log}");
    for needle in [
        format!("node {id1} was registered with disk"),
        format!("--replace-disk {id1}"),
    ] {
        assert!(log.contains(&needle), "`{needle}` not in {log}");
    }
    assert!(!c.route().node(id1).expect("listed").up);
    let disk_bytes = c.disk_bytes;
    c.spawn_node_with(1, disk_bytes, &["--replace-disk".into(), id1.to_string()]);
    assert_eq!(c.node_id(1), id1);
    let t = c.wait_healthy(Duration::from_secs(120));
    assert_eq!(t.nodes.len(), 3, "{:?}", t.nodes);
    assert_eq!(
        celer_engine::Engine::node_id_of(&c.nodes[1].disk).expect("read"),
        Some(id1 as u64)
    );
}
