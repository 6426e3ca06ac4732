//! The control service's API against a real server on an ephemeral port
//! with a real redb file, driven by the real `MetaClient`; fake storage
//! nodes are tiny axum servers that record the route tables pushed to them.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use celer_meta::api::{
    AttachMode, AttachVolume, Change, CreateVolume, Heartbeat, RegisterNode, VolumeFence,
};
use celer_meta::celer_route::{NodeId, RouteTable};
use celer_meta::{MetaClient, MetaClientError, MetaConfig, MetaServer};

const TOKEN: &str = "test-secret";

fn config(dir: &Path, tweak: impl FnOnce(&mut MetaConfig)) -> MetaConfig {
    let mut cfg = MetaConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        dir.to_path_buf(),
        TOKEN,
    );
    cfg.cluster.partition_bits = 6;
    // Down nodes leave their partitions at once unless a test says otherwise.
    cfg.cluster.down_grace_ms = 0;
    tweak(&mut cfg);
    cfg
}

fn start(dir: &Path, tweak: impl FnOnce(&mut MetaConfig)) -> (MetaServer, MetaClient) {
    let server = MetaServer::start(config(dir, tweak)).expect("start the control service");
    let client = MetaClient::new(&server.url(), TOKEN);
    (server, client)
}

fn status_of<T: std::fmt::Debug>(r: Result<T, MetaClientError>) -> (u16, String) {
    match r {
        Err(MetaClientError::Status {
            status, message, ..
        }) => (status, message),
        other => panic!("expected an HTTP error, got {other:?}"),
    }
}

fn vol(name: &str, size_bytes: u64) -> CreateVolume {
    CreateVolume {
        name: name.into(),
        size_bytes,
        replicas: None,
        sector_size_bytes: None,
    }
}

/// Polls `f` every 10 ms until it returns Some, or panics after `within`.
/// `n` fake nodes registered on hosts `host0`.. (one failure domain each).
fn register_nodes(c: &MetaClient, n: usize) -> (Vec<FakeNode>, Vec<NodeId>) {
    let nodes: Vec<FakeNode> = (0..n).map(|_| FakeNode::start()).collect();
    let ids = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| node.register(c, &format!("host{i}")))
        .collect();
    (nodes, ids)
}

fn wait_for<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < within,
            "timed out after {within:?}: {what}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// A storage node's admin endpoint: records every table pushed to it.
struct FakeNode {
    addr: SocketAddr,
    tables: Arc<Mutex<Vec<(Instant, RouteTable)>>>,
    /// Fence generations pushed (`PUT /v1/fences`).
    fences: Arc<Mutex<Vec<VolumeFence>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FakeNode {
    fn start() -> FakeNode {
        use axum::http::{HeaderMap, StatusCode};
        let tables: Arc<Mutex<Vec<(Instant, RouteTable)>>> = Arc::default();
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let t = tables.clone();
        let fences: Arc<Mutex<Vec<VolumeFence>>> = Arc::default();
        let f = fences.clone();
        let thread = thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let app = axum::Router::new()
                    .route(
                        "/v1/route",
                        axum::routing::put(move |h: HeaderMap, body: axum::body::Bytes| {
                            let t = t.clone();
                            async move {
                                let auth = h.get("authorization").and_then(|v| v.to_str().ok());
                                if auth != Some(&format!("Bearer {TOKEN}")) {
                                    return StatusCode::UNAUTHORIZED;
                                }
                                match serde_json::from_slice::<RouteTable>(&body) {
                                    Ok(table) => {
                                        t.lock().expect("lock").push((Instant::now(), table));
                                        StatusCode::OK
                                    }
                                    Err(_) => StatusCode::BAD_REQUEST,
                                }
                            }
                        }),
                    )
                    .route(
                        "/v1/fences",
                        axum::routing::put(move |h: HeaderMap, body: axum::body::Bytes| {
                            let f = f.clone();
                            async move {
                                let auth = h.get("authorization").and_then(|v| v.to_str().ok());
                                if auth != Some(&format!("Bearer {TOKEN}")) {
                                    return StatusCode::UNAUTHORIZED;
                                }
                                match serde_json::from_slice::<Vec<VolumeFence>>(&body) {
                                    Ok(list) => {
                                        f.lock().expect("lock").extend(list);
                                        StatusCode::OK
                                    }
                                    Err(_) => StatusCode::BAD_REQUEST,
                                }
                            }
                        }),
                    );
                let l = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                axum::serve(l, app)
                    .with_graceful_shutdown(async {
                        let _ = stop_rx.await;
                    })
                    .await
                    .expect("serve");
            })
        });
        FakeNode {
            addr,
            tables,
            fences,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn register(&self, c: &MetaClient, domain: &str) -> NodeId {
        c.register(&RegisterNode {
            node_id: None,
            data_addr: "127.0.0.1:1".into(),
            admin_addr: self.addr.to_string(),
            shards: 2,
            domain: domain.into(),
            disk_uuid: None,
            replace_disk: false,
        })
        .expect("register")
        .node_id
    }

    /// The first pushed table with `epoch >= e`, with its arrival time.
    fn received(&self, e: u64) -> Option<(Instant, RouteTable)> {
        self.tables
            .lock()
            .expect("lock")
            .iter()
            .find(|(_, t)| t.epoch >= e)
            .cloned()
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Heartbeats `id` every `period` until stopped; keeps its epoch current
/// from the replies, as a node does.
struct Heartbeater {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Heartbeater {
    fn start(url: String, id: NodeId, period: Duration) -> Heartbeater {
        Heartbeater::with_figures(url, id, period, Heartbeat::default())
    }

    /// Heartbeats that also carry backfill figures (`beat`; its epoch is
    /// kept current).
    fn with_figures(url: String, id: NodeId, period: Duration, beat: Heartbeat) -> Heartbeater {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let epoch = AtomicU64::new(0);
        let thread = thread::spawn(move || {
            let c = MetaClient::new(&url, TOKEN);
            while !s.load(Ordering::Relaxed) {
                let b = Heartbeat {
                    epoch: epoch.load(Ordering::Relaxed),
                    ..beat.clone()
                };
                if let Ok(r) = c.heartbeat_with(id, &b) {
                    if let Some(t) = r.table {
                        epoch.store(t.epoch, Ordering::Relaxed);
                    }
                }
                thread::sleep(period);
            }
        });
        Heartbeater {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Heartbeater {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn requests_without_the_token_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, c) = start(dir.path(), |_| {});
    let url = server.url();

    for (what, client) in [
        ("wrong token", MetaClient::new(&url, "not-the-secret")),
        ("empty token", MetaClient::new(&url, "")),
    ] {
        let (status, msg) = status_of(client.volumes());
        assert_eq!(status, 401, "{what}");
        assert!(msg.contains("token"), "{what}: {msg}");
        let (status, _) = status_of(client.register(&RegisterNode {
            node_id: None,
            data_addr: "h:1".into(),
            admin_addr: "h:2".into(),
            shards: 1,
            domain: "d".into(),
            disk_uuid: None,
            replace_disk: false,
        }));
        assert_eq!(status, 401, "{what}: register");
    }
    // No Authorization header at all: 401 with a JSON error body.
    let resp = ureq::get(&format!("{url}/v1/status")).call();
    match resp {
        Err(ureq::Error::Status(401, r)) => {
            let body: celer_meta::api::ErrorBody = r.into_json().expect("json error body");
            assert!(body.error.contains("Authorization"), "{}", body.error);
        }
        other => panic!("expected 401, got {other:?}"),
    }
    // Nothing was created by the refused requests.
    assert!(c.volumes().expect("volumes").is_empty());
    assert_eq!(c.status().expect("status").log_seq, 0);
    // /metrics needs no token.
    let m = MetaClient::new(&url, "").metrics().expect("metrics");
    assert!(m.contains("celer_meta_route_epoch"), "{m}");
    assert!(m.contains("celer_meta_http_requests_total"), "{m}");
}

#[test]
fn invalid_input_is_rejected_with_a_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, c) = start(dir.path(), |_| {});

    let cases: Vec<(CreateVolume, &str)> = vec![
        (vol("", 4096), "1 to 63"),
        (vol("Has-Upper", 4096), "lower-case"),
        (vol("-dash", 4096), "starting with"),
        (vol("a/b", 4096), "not valid"),
        (vol(&"x".repeat(64), 4096), "1 to 63"),
        (vol("zero", 0), "positive multiple of 4096"),
        (vol("odd", 4097), "positive multiple of 4096"),
        (vol("huge", (1 << 50) + 4096), "1 PiB"),
        (
            CreateVolume {
                replicas: Some(4),
                ..vol("r4", 4096)
            },
            "replicas",
        ),
        (
            CreateVolume {
                replicas: Some(0),
                ..vol("r0", 4096)
            },
            "replicas",
        ),
        (
            CreateVolume {
                sector_size_bytes: Some(1024),
                ..vol("s1k", 4096)
            },
            "sector size 1024",
        ),
    ];
    for (req, needle) in cases {
        let (status, msg) = status_of(c.create_volume(&req));
        assert_eq!(status, 400, "{req:?}: {msg}");
        assert!(msg.contains(needle), "{req:?}: {msg:?} lacks {needle:?}");
    }
    assert!(c.volumes().expect("list").is_empty());

    c.create_volume(&vol("a", 1 << 20)).expect("create");
    let (status, msg) = status_of(c.create_volume(&vol("a", 1 << 20)));
    assert_eq!(
        (status, msg.contains("already exists")),
        (409, true),
        "{msg}"
    );
    let (status, msg) = status_of(c.resize_volume("a", 4096));
    assert_eq!((status, msg.contains("only grow")), (400, true), "{msg}");
    let (status, msg) = status_of(c.resize_volume("a", (1 << 20) + 1));
    assert_eq!(status, 400, "{msg}");
    let (status, msg) = status_of(c.volume("nope"));
    assert_eq!(
        (status, msg.contains("celer volume list")),
        (404, true),
        "{msg}"
    );
    let (status, _) = status_of(c.delete_volume("nope"));
    assert_eq!(status, 404);
    let (status, _) = status_of(c.volume("a/../b"));
    assert_eq!(status, 404);

    // Nodes: unknown id, bad shards, bad address, id 0.
    let (status, msg) = status_of(c.heartbeat(42, 0));
    assert_eq!(
        (status, msg.contains("register first")),
        (404, true),
        "{msg}"
    );
    let (status, _) = status_of(c.synced(42, 1, &[0]));
    assert_eq!(status, 404);
    let reg = |shards, addr: &str, id| RegisterNode {
        node_id: id,
        data_addr: addr.into(),
        admin_addr: "127.0.0.1:2".into(),
        shards,
        domain: "d".into(),
        disk_uuid: None,
        replace_disk: false,
    };
    for (r, needle) in [
        (reg(3, "127.0.0.1:1", None), "power of two"),
        (
            reg(128, "127.0.0.1:1", None),
            "at most the partition count 64",
        ),
        (reg(1, "nocolon", None), "HOST:PORT"),
        (reg(1, "127.0.0.1:1", Some(0)), "node id 0"),
    ] {
        let (status, msg) = status_of(c.register(&r));
        assert_eq!(status, 400, "{r:?}");
        assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    }
    let (status, msg) = status_of(c.route());
    assert_eq!(
        (status, msg.contains("fewer than 3 nodes")),
        (404, true),
        "{msg}"
    );
    let (status, _) = status_of(c.restore_log(1000));
    assert_eq!(status, 400);

    // Malformed bodies and paths get JSON errors too.
    let url = server.url();
    let agent = ureq::agent();
    let bad = agent
        .post(&format!("{url}/v1/volumes"))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .send_string("{not json");
    match bad {
        Err(ureq::Error::Status(400, r)) => {
            let b: celer_meta::api::ErrorBody = r.into_json().expect("json");
            assert!(b.error.contains("not valid JSON"), "{}", b.error);
        }
        other => panic!("expected 400, got {other:?}"),
    }
    let bad = agent
        .post(&format!("{url}/v1/nodes/abc/heartbeat"))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .send_string("{\"epoch\":0}");
    assert!(matches!(bad, Err(ureq::Error::Status(400, _))), "{bad:?}");
    let bad = agent
        .get(&format!("{url}/v1/log?since=x"))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .call();
    assert!(matches!(bad, Err(ureq::Error::Status(400, _))), "{bad:?}");
    let bad = agent
        .get(&format!("{url}/v1/nowhere"))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .call();
    match bad {
        Err(ureq::Error::Status(404, r)) => {
            let b: celer_meta::api::ErrorBody = r.into_json().expect("json");
            assert!(b.error.contains("no such endpoint"), "{}", b.error);
        }
        other => panic!("expected 404, got {other:?}"),
    }
}

/// The size long poll attachments use: it answers at once when the size
/// already differs, as soon as a resize commits, and after the wait when
/// nothing changes; a deleted volume ends it with 404; bad parameters are
/// refused.
#[test]
fn a_volume_long_poll_wakes_on_resize() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, c) = start(dir.path(), |_| {});
    let url = server.url();
    let other_client = || MetaClient::new(&url, TOKEN);
    c.create_volume(&vol("grow", 1 << 30)).expect("create");
    let wait = Duration::from_secs(5);
    let t = Instant::now();
    let v = c.volume_wait("grow", 4096, wait).expect("differs already");
    assert_eq!(v.size_bytes, 1 << 30);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // A resize by someone else wakes the waiter.
    let resizer = {
        let c = other_client();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            c.resize_volume("grow", 2 << 30).expect("resize")
        })
    };
    let t = Instant::now();
    let v = c.volume_wait("grow", 1 << 30, wait).expect("woken");
    let took = t.elapsed();
    resizer.join().expect("resizer");
    assert_eq!(v.size_bytes, 2 << 30);
    assert!(took < Duration::from_secs(3), "woke after {took:?}");
    println!("long poll woke {took:?} after it started (resize at 300 ms)");
    // Other changes wake it too, but it answers only when the size moved:
    // with none, after the wait.
    let t = Instant::now();
    let other = {
        let c = other_client();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            c.create_volume(&vol("other", 4096)).expect("create other")
        })
    };
    let v = c
        .volume_wait("grow", 2 << 30, Duration::from_millis(1500))
        .expect("timed out");
    other.join().expect("other");
    assert_eq!(v.size_bytes, 2 << 30);
    assert!(
        t.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        t.elapsed()
    );
    // Deleted while waited on: 404.
    let deleter = {
        let c = other_client();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            c.delete_volume("grow").expect("delete")
        })
    };
    let r = c.volume_wait("grow", 2 << 30, wait);
    deleter.join().expect("deleter");
    assert_eq!(status_of(r).0, 404);
    let bad = ureq::get(&format!("{url}/v1/volumes/other?wait_ms=abc"))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .call();
    assert!(matches!(bad, Err(ureq::Error::Status(400, _))), "{bad:?}");
}

#[test]
fn volume_lifecycle_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, c) = start(dir.path(), |_| {});

    let a = c.create_volume(&vol("vm-a", 10 << 30)).expect("create a");
    assert_eq!((a.id, a.replicas, a.size_bytes), (1, 3, 10 << 30));
    assert_eq!(
        a.sector_size_bytes, 512,
        "new volumes default to 512-byte sectors"
    );
    let b = c
        .create_volume(&CreateVolume {
            replicas: Some(2),
            sector_size_bytes: Some(4096),
            ..vol("vm-b", 4096)
        })
        .expect("create b");
    assert_eq!((b.id, b.replicas, b.sector_size_bytes), (2, 2, 4096));
    assert_eq!(c.volume("vm-a").expect("info"), a);
    let grown = c.resize_volume("vm-b", 8192).expect("grow");
    assert_eq!(grown.size_bytes, 8192);
    assert_eq!(c.delete_volume("vm-a").expect("delete").id, 1);
    assert_eq!(status_of(c.volume("vm-a")).0, 404);
    // Ids are never reused, even for a deleted volume's name.
    let a2 = c.create_volume(&vol("vm-a", 4096)).expect("recreate");
    assert_eq!(a2.id, 3);
    let names: Vec<String> = c
        .volumes()
        .expect("list")
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["vm-a", "vm-b"]);

    // Three nodes: a route table exists.
    let (nodes, ids) = register_nodes(&c, 3);
    assert_eq!(ids, [1, 2, 3]);
    let table = c.route().expect("route");
    assert_eq!((table.epoch, table.partition_count()), (1, 64));
    let log = c.log(0).expect("log");
    assert!(log
        .iter()
        .any(|e| matches!(&e.what, Change::VolumeDeleted { id: 1, .. })));
    assert!(log.iter().any(|e| e.who == "operator"));
    assert!(log.iter().any(|e| e.who == "node 2"));
    let seq = c.status().expect("status").log_seq;
    assert_eq!(seq, log.len() as u64);
    drop(server);

    let (_server, c) = start(dir.path(), |_| {});
    let vols = c.volumes().expect("list after restart");
    assert_eq!(vols, vec![a2.clone(), grown]);
    assert_eq!(c.route().expect("route after restart"), table);
    assert_eq!(c.log(0).expect("log after restart"), log);
    assert_eq!(c.nodes().expect("nodes").len(), 3);
    assert_eq!(c.create_volume(&vol("vm-c", 4096)).expect("create").id, 4);
    // A node re-registering with its saved id keeps it; its address may change.
    let r = c
        .register(&RegisterNode {
            node_id: Some(2),
            data_addr: "127.0.0.1:9".into(),
            admin_addr: nodes[1].addr.to_string(),
            shards: 2,
            domain: "host1".into(),
            disk_uuid: None,
            replace_disk: false,
        })
        .expect("re-register");
    assert_eq!(r.node_id, 2);
    let t = c.route().expect("route");
    assert_eq!(t.node(2).expect("node 2").data_addr, "127.0.0.1:9");
    assert!(t.epoch > table.epoch);
    // A new node still gets a fresh id.
    assert_eq!(FakeNode::start().register(&c, "host3"), 4);
}

#[test]
fn lease_expiry_marks_down_bumps_the_epoch_and_pushes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, c) = start(dir.path(), |cfg| {
        // Generous against a loaded CI machine: 20 heartbeats per lease.
        cfg.cluster.heartbeat_ms = 50;
        cfg.cluster.lease_ms = 1000;
        cfg.cluster.replicas = 2;
    });
    let (nodes, ids) = register_nodes(&c, 3);
    let mut beats: Vec<Option<Heartbeater>> = ids
        .iter()
        .map(|id| {
            Some(Heartbeater::start(
                server.url(),
                *id,
                Duration::from_millis(50),
            ))
        })
        .collect();
    // Every node gets the current table pushed.
    let epoch = c.route().expect("route").epoch;
    for n in &nodes {
        wait_for(Duration::from_secs(2), "initial push", || n.received(epoch));
    }
    // Healthy heartbeats for longer than the lease: nobody goes down.
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(c.status().expect("status").nodes_down, 0);
    assert_eq!(c.route().expect("route").epoch, epoch);

    // Node 3 stops heartbeating.
    let stopped = Instant::now();
    beats[2] = None;
    let down = wait_for(Duration::from_secs(3), "node 3 marked down", || {
        let t = c.route().ok()?;
        let down = t.node(ids[2]).is_some_and(|n| !n.up);
        down.then_some(t)
    });
    let took = stopped.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "marked down after {took:?} with a 1000 ms lease"
    );
    assert!(down.epoch > epoch);
    assert!(down
        .partitions
        .iter()
        .all(|p| p.members.iter().all(|m| m.node != ids[2])));
    let s = c.status().expect("status");
    assert_eq!((s.nodes_up, s.nodes_down), (2, 1));
    let listed = c.nodes().expect("nodes");
    assert!(!listed[2].up && listed[0].up);
    assert!(listed[0].last_heartbeat_ms_ago.expect("beat") < 1000);

    // The live nodes receive the new table within a second; the down one not.
    let bumped = Instant::now();
    for n in &nodes[..2] {
        let (at, t) = wait_for(Duration::from_secs(1), "pushed table", || {
            n.received(down.epoch)
        });
        assert!(at.duration_since(bumped) < Duration::from_secs(1));
        assert!(!t.node(ids[2]).expect("node 3 listed").up);
    }
    assert!(nodes[2].received(down.epoch).is_none());
    let log = c.log(0).expect("log");
    assert!(log
        .iter()
        .any(|e| e.what == Change::NodeDown { id: ids[2] } && e.who == "meta"));
    assert!(log
        .iter()
        .any(|e| matches!(&e.what, Change::RouteEpoch { epoch, reason } if *epoch == down.epoch && reason.contains("down"))));

    // Node 3 heartbeats again: it is up, rejoins as a syncing member and
    // its heartbeat reply carries the newer table (the push it missed).
    let r = c.heartbeat(ids[2], epoch).expect("heartbeat");
    let back = r.table.expect("a newer table in the reply");
    assert!(back.epoch > down.epoch && back.node(ids[2]).expect("node").up);
    assert!(back.syncing_on(ids[2]).count() > 0);
    assert!(c
        .log(0)
        .expect("log")
        .iter()
        .any(|e| e.what == Change::NodeUp { id: ids[2] }));
    beats[2] = Some(Heartbeater::start(
        server.url(),
        ids[2],
        Duration::from_millis(50),
    ));
    wait_for(Duration::from_secs(1), "push to node 3", || {
        nodes[2].received(back.epoch)
    });
    // An up-to-date heartbeat gets no table.
    let r = c.heartbeat(ids[0], back.epoch).expect("heartbeat");
    assert_eq!((r.epoch, r.table.is_none()), (back.epoch, true));
    drop(beats);
}

#[test]
fn synced_marks_members_in_sync_and_ignores_stale_reports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, c) = start(dir.path(), |cfg| {
        cfg.cluster.replicas = 2;
        cfg.cluster.lease_ms = 60_000;
        cfg.cluster.max_moves = 8;
    });
    let nodes: Vec<FakeNode> = (0..3).map(|_| FakeNode::start()).collect();
    // The first table (two nodes, replicas 2): everything in sync.
    let old_ids: Vec<NodeId> = nodes[..2]
        .iter()
        .enumerate()
        .map(|(i, n)| n.register(&c, &format!("host{i}")))
        .collect();
    let t1 = c.route().expect("route");
    assert!(t1.partitions.iter().all(|p| p.all_in_sync()));
    let new = nodes[2].register(&c, "host2");
    let t2 = c.route().expect("route");
    let syncing: Vec<u32> = t2.syncing_on(new).collect();
    // Bounded movement: at most max_moves partitions start moving at once.
    assert!(!syncing.is_empty() && syncing.len() <= 8, "{syncing:?}");
    assert_eq!(
        c.status().expect("status").partitions_degraded as usize,
        syncing.len()
    );
    // The node learns its syncing partitions from the pushed table.
    let pushed = wait_for(Duration::from_secs(2), "push to the new node", || {
        nodes[2].received(t2.epoch)
    });
    assert_eq!(pushed.1.syncing_on(new).collect::<Vec<_>>(), syncing);

    // A report from before the node joined is stale: ignored, and since
    // the node is a syncing member now, it is told to backfill again.
    let r = c.synced(new, t1.epoch, &syncing).expect("synced");
    assert!(r.marked.is_empty());
    assert_eq!(r.backfill_again, syncing);
    assert_eq!(c.route().expect("route").epoch, t2.epoch);

    // Half of them, plus an unknown partition and one it is not syncing.
    let half = &syncing[..syncing.len().div_ceil(2)];
    let not_member = (0..t2.partition_count())
        .find(|p| t2.partition(*p).expect("p").member(new).is_none())
        .expect("a partition without the new node");
    let mut report = half.to_vec();
    report.extend([9999, not_member]);
    let r = c.synced(new, t2.epoch, &report).expect("synced");
    assert_eq!(r.marked, half);
    assert!(r.backfill_again.is_empty(), "{:?}", r.backfill_again);
    let t3 = c.route().expect("route");
    assert!(t3.epoch > t2.epoch);
    for p in half {
        let part = t3.partition(*p).expect("partition");
        assert!(part.member(new).expect("member").in_sync);
        // The node that left stays, in sync, after the readers (the
        // targets), until it serves a table where it reads for nobody: a
        // client of t2 may still read from it, and it may not have t3 yet.
        assert_eq!(part.members.len(), 3, "partition {p}: {:?}", part.members);
        let readers: Vec<NodeId> = part.readers(t3.replicas).map(|m| m.node).collect();
        assert_eq!(readers.len(), 2);
        assert!(readers.contains(&new), "{readers:?}");
    }
    // Once both old nodes report they serve t3, the lease check drops the
    // members that left.
    for id in &old_ids {
        c.heartbeat(*id, t3.epoch).expect("heartbeat");
    }
    let t4 = wait_for(
        Duration::from_secs(5),
        "members that left are dropped",
        || {
            let t = c.route().expect("route");
            half.iter()
                .all(|p| t.partition(*p).expect("partition").members.len() == 2)
                .then_some(t)
        },
    );
    assert!(t4.epoch > t3.epoch);
    // The rest: more moves start as the budget frees up, until all done
    // (the old nodes report each table, as their heartbeats would).
    let mut t = t4;
    for _ in 0..100 {
        for id in &old_ids {
            c.heartbeat(*id, t.epoch).expect("heartbeat");
        }
        let todo: Vec<u32> = t.syncing_on(new).collect();
        if todo.is_empty() {
            break;
        }
        c.synced(new, t.epoch, &todo).expect("synced");
        t = c.route().expect("route");
    }
    assert_eq!(t.syncing_on(new).count(), 0);
    let s = c.status().expect("status");
    assert_eq!((s.partitions_degraded, s.partitions_in_sync), (0, 64));
    // Balanced enough: every node holds some partitions.
    for id in 1..=3 {
        let held = t
            .partitions
            .iter()
            .filter(|p| p.member(id).is_some())
            .count();
        assert!(held > 64 * 2 / 3 / 2, "node {id} holds {held}");
    }
}

#[test]
fn split_doubles_partitions_and_moves_only_new_halves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, c) = start(dir.path(), |cfg| {
        cfg.cluster.replicas = 2;
        cfg.cluster.lease_ms = 60_000;
        cfg.cluster.max_moves = 1000;
    });
    let nodes: Vec<FakeNode> = (0..5).map(|_| FakeNode::start()).collect();
    for (i, n) in nodes.iter().enumerate() {
        n.register(&c, &format!("host{i}"));
    }
    // Settle any syncing left from the registrations one by one.
    for id in 1..=5 {
        let t = c.route().expect("route");
        let todo: Vec<u32> = t.syncing_on(id).collect();
        if !todo.is_empty() {
            c.synced(id, t.epoch, &todo).expect("synced");
        }
    }
    let before = c.route().expect("route");
    assert!(before.partitions.iter().all(|p| p.all_in_sync()));
    let after = c.split().expect("split");
    assert_eq!(after.partition_count(), 128);
    let count = before.partition_count();
    let mut moved_new = 0;
    for p in 0..count {
        // Old halves stay exactly where they were.
        assert_eq!(
            after.partitions[p as usize], before.partitions[p as usize],
            "p{p}"
        );
        // New halves keep p's members in sync (nothing moved yet) and may
        // gain syncing targets.
        let new = &after.partitions[(p + count) as usize];
        for m in &before.partitions[p as usize].members {
            assert!(new.member(m.node).expect("old member kept").in_sync);
        }
        if new.members.len() > before.partitions[p as usize].members.len() {
            moved_new += 1;
        }
    }
    assert!(moved_new > 0, "rebalance moved no new half");
    let log = c.log(0).expect("log");
    assert!(log
        .iter()
        .any(|e| e.what == Change::RouteSplit { partition_bits: 7 }));
}

/// A restore puts the volume list back as it was after an entry, except
/// that nothing whose data the nodes may have freed comes back: a volume
/// deleted since stays deleted (and is listed as not brought back), a
/// volume created since is deleted (its id tombstoned, so the nodes free
/// its data), a resize since is undone.
#[test]
fn log_restore_brings_back_an_earlier_volume_list() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, c) = start(dir.path(), |_| {});
    let n = FakeNode::start();
    let node = n.register(&c, "host0");
    let a = c.create_volume(&vol("a", 4096)).expect("a");
    let b = c.create_volume(&vol("b", 8192)).expect("b");
    let point = c.status().expect("status").log_seq;

    let cv = c.create_volume(&vol("c", 4096)).expect("c");
    c.delete_volume("a").expect("delete a");
    c.resize_volume("b", 1 << 20).expect("grow b");

    let r = c.restore_log(point).expect("restore");
    assert_eq!((r.volumes, r.nodes), (1, 1), "{r:?}");
    assert_eq!(
        c.volumes().expect("list"),
        vec![b.clone()],
        "b at its old size"
    );
    assert_eq!(r.not_restored.len(), 1, "{r:?}");
    assert!(r.not_restored[0].contains("volume a"), "{r:?}");
    assert_eq!(r.removed, vec!["volume c".to_string()]);
    let deleted = c.heartbeat(node, 0).expect("heartbeat").deleted_volumes;
    assert!(
        deleted.contains(&a.id) && deleted.contains(&cv.id),
        "a stays tombstoned and c's data is freed: {deleted:?}"
    );
    assert!(!deleted.contains(&b.id), "{deleted:?}");
    let last = c.log(r.seq - 1).expect("log");
    assert!(matches!(&last[0].what, Change::Restored { seq, .. } if *seq == point));
    // Ids are not reused after a restore.
    assert_eq!(c.create_volume(&vol("d", 4096)).expect("d").id, 4);

    // Restoring to a point after a restore replays through it.
    let point2 = c.status().expect("status").log_seq;
    c.delete_volume("b").expect("delete b");
    let r = c.restore_log(point2).expect("restore 2");
    assert!(r.not_restored[0].contains("volume b"), "{r:?}");
    let names: Vec<String> = c
        .volumes()
        .expect("list")
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["d"]);
    // And to the very start: nothing.
    c.restore_log(0).expect("restore to 0");
    assert!(c.volumes().expect("list").is_empty());
    // The restored state persists, tombstones too.
    drop(server);
    let (_server, c) = start(dir.path(), |_| {});
    assert!(c.volumes().expect("list").is_empty());
    let r = c.restore_log(point).expect("restore again after restart");
    assert_eq!(r.volumes, 0, "a and b were deleted: {r:?}");
    assert_eq!(r.not_restored.len(), 2, "{r:?}");
}

/// A restore and snapshots: a snapshot deleted after the restore point is
/// not brought back (its layer is tombstoned); one taken after it is
/// deleted (a layer nothing reads is freed; one the volume still reads
/// through is retired, as a delete does); a clone made after it is
/// deleted and its head freed. The volume's own data is never rewound:
/// it keeps the head it has now.
#[test]
fn a_restore_never_brings_back_a_freed_snapshot_and_frees_what_nothing_reads() {
    use celer_device::layer_key;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, c) = start(dir.path(), |_| {});
    let n = FakeNode::start();
    let node = n.register(&c, "host0");
    let v = c.create_volume(&vol("v", 1 << 30)).expect("v");
    c.create_snapshot("v", "s1").expect("s1");
    c.create_snapshot("v", "s2").expect("s2");
    let point = c.status().expect("status").log_seq;
    let at_point = c.volume("v").expect("v");
    let s2_era = at_point.snapshot("s2").expect("s2").era;

    c.delete_snapshot("v", "s2").expect("delete s2");
    c.create_snapshot("v", "s3").expect("s3");
    let s3 = c
        .volume("v")
        .expect("v")
        .snapshot("s3")
        .expect("s3")
        .clone();
    c.clone_volume("v", "s3", "k").expect("clone k");
    let k = c.volume("k").expect("k");
    c.create_snapshot("v", "s4").expect("s4");
    let now = c.volume("v").expect("v");
    let s4 = now.snapshot("s4").expect("s4").clone();

    let r = c.restore_log(point).expect("restore");
    let back = c.volume("v").expect("v");
    let names: Vec<&str> = back.snapshots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["s1"], "s2 was deleted since, s3 and s4 taken since");
    assert_eq!(
        (back.head_era, &back.under),
        (now.head_era, &now.under),
        "the volume keeps the layers it has now (data is not rewound)"
    );
    assert!(r.not_restored.iter().any(|x| x.contains("v@s2")), "{r:?}");
    for gone in ["volume k", "snapshot v@s3", "snapshot v@s4"] {
        assert!(r.removed.iter().any(|x| x == gone), "{gone}: {r:?}");
    }
    assert!(
        c.volume("k").is_err(),
        "the clone made after the point is gone"
    );
    let reply = c.heartbeat(node, 0).expect("heartbeat");
    let deleted = reply.deleted_volumes;
    let l = v.id;
    // s2's era is still read through (by the head): it stays retired
    // under the era above it, its chunks that era covers freed.
    assert!(
        back.retired.contains(&[s2_era, s3.era]),
        "{:?}",
        back.retired
    );
    assert!(
        deleted.contains(&layer_key(l, k.head_era)) && deleted.contains(&k.id),
        "the clone's head is freed: {deleted:?}"
    );
    // s3 and s4 froze the eras the head then wrote to; the head still reads
    // through them, so they are retired, each under the era directly above.
    assert!(back.under.contains(&s3.era) && back.under.contains(&s4.era));
    assert!(!deleted.contains(&layer_key(l, s3.era)));
    assert!(
        back.retired.contains(&[s4.era, back.head_era]),
        "{:?}",
        back.retired
    );
    let layers = reply
        .layers
        .iter()
        .find(|x| x.volume == v.id)
        .expect("v's layers in the heartbeat");
    assert_eq!(layers.snapshots.len(), 1, "{layers:?}");
}

#[test]
fn a_second_server_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, _c) = start(dir.path(), |_| {});
    let e = MetaServer::start(config(dir.path(), |_| {})).expect_err("second server");
    assert!(e.to_string().contains("already open"), "{e}");
}

#[test]
fn a_rebuilt_control_service_continues_above_the_nodes_epoch() {
    // The nodes come from a cluster whose table was at epoch 41; this
    // control service starts empty (lost or restored metadata).
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, c) = start(dir.path(), |cfg| cfg.cluster.lease_ms = 60_000);
    let nodes: Vec<FakeNode> = (0..3).map(|_| FakeNode::start()).collect();
    for (i, n) in nodes.iter().enumerate() {
        // Their saved ids: adopted, not reassigned.
        let r = c
            .register(&RegisterNode {
                node_id: Some(7 + i as NodeId),
                data_addr: "127.0.0.1:1".into(),
                admin_addr: n.addr.to_string(),
                shards: 2,
                domain: format!("host{i}"),
                disk_uuid: None,
                replace_disk: false,
            })
            .expect("register");
        assert_eq!(r.node_id, 7 + i as NodeId);
        if i < 2 {
            c.heartbeat(r.node_id, 41).expect("heartbeat");
        }
    }
    let t = c.route().expect("route");
    assert_eq!(t.epoch, 42, "the first table starts above the nodes' epoch");
    // A node reporting an even newer epoch raises it again, and gets it.
    let r = c.heartbeat(9, 50).expect("heartbeat");
    assert_eq!(r.epoch, 51);
    assert_eq!(r.table.expect("table").epoch, 51);
    wait_for(Duration::from_secs(2), "push of epoch 51", || {
        nodes[0].received(51)
    });
    assert_eq!(FakeNode::start().register(&c, "host3"), 10);
}

/// Nodes' backfill figures come with their heartbeats: the status sums
/// those of up nodes, the node list shows each, /metrics has the sums, and
/// none of it is a change (no log entry).
#[test]
fn backfill_figures_are_summed_over_up_nodes_and_not_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, c) = start(dir.path(), |cfg| {
        cfg.cluster.heartbeat_ms = 100;
        cfg.cluster.lease_ms = 600;
    });
    let (_nodes, ids) = register_nodes(&c, 3);
    let figures = |done: u64, total: u64, unlisted: u64| Heartbeat {
        epoch: 0,
        backfill_bytes_done: done,
        backfill_bytes_total: total,
        backfill_partitions_unlisted: unlisted,
        failure: None,
        warning: None,
        copy_whole: Vec::new(),
    };
    let period = Duration::from_millis(50);
    let a = Heartbeater::with_figures(server.url(), ids[0], period, figures(10 << 20, 30 << 20, 2));
    let b = Heartbeater::with_figures(server.url(), ids[1], period, figures(5 << 20, 5 << 20, 0));
    // The third sends heartbeats without figures, as an older node does.
    let _c = Heartbeater::start(server.url(), ids[2], period);
    let sums = |c: &MetaClient| {
        let s = c.status().expect("status");
        (
            s.rebalance_bytes_done,
            s.rebalance_bytes_total,
            s.rebalance_partitions_unlisted,
        )
    };
    wait_for(Duration::from_secs(2), "summed figures", || {
        (sums(&c) == (15 << 20, 35 << 20, 2)).then_some(())
    });
    let listed = c.nodes().expect("nodes");
    let of = |id| listed.iter().find(|n| n.id == id).expect("listed");
    assert_eq!(
        (
            of(ids[0]).backfill_bytes_done,
            of(ids[0]).backfill_bytes_total
        ),
        (10 << 20, 30 << 20)
    );
    assert_eq!(of(ids[0]).backfill_partitions_unlisted, 2);
    assert_eq!(of(ids[2]).backfill_bytes_total, 0);
    let m = MetaClient::new(&server.url(), "")
        .metrics()
        .expect("metrics");
    for line in [
        "celer_meta_rebalance_moved_bytes 15728640",
        "celer_meta_rebalance_listed_bytes 36700160",
        "celer_meta_rebalance_unlisted_partitions 2",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} in\n{m}");
    }
    // Progress is not metadata: heartbeats with figures log nothing.
    let seq = c.status().expect("status").log_seq;
    thread::sleep(Duration::from_millis(300));
    assert_eq!(c.status().expect("status").log_seq, seq);
    // A node that goes down leaves the sums (its figures are stale).
    drop(b);
    wait_for(Duration::from_secs(3), "node 2 down", || {
        let s = c.status().expect("status");
        (s.nodes_down == 1).then_some(())
    });
    assert_eq!(sums(&c), (10 << 20, 30 << 20, 2));
    drop(a);
}

/// A registration as a storage node sends it: its disk identity, the id
/// it claims (if any), and the operator's replace flag.
fn node_registration(
    admin: SocketAddr,
    domain: &str,
    id: Option<NodeId>,
    disk: u64,
) -> RegisterNode {
    RegisterNode {
        node_id: id,
        data_addr: "127.0.0.1:1".into(),
        admin_addr: admin.to_string(),
        shards: 2,
        domain: domain.into(),
        disk_uuid: Some(disk),
        replace_disk: false,
    }
}

/// The bug this guards against: two nodes whose disks sat in one
/// directory shared a `node.id`; one restarted, claimed the other's id
/// with its own disk, was accepted ("came back with a different disk") and
/// the running node's partitions moved. Now: 409 naming the node, both
/// disks and what to do, with or without the replace flag, and nothing
/// changes. The node itself (same disk) re-registers fine while running.
#[test]
fn a_registration_claiming_a_running_nodes_id_from_another_disk_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, c) = start(dir.path(), |cfg| {
        cfg.cluster.heartbeat_ms = 50;
        cfg.cluster.lease_ms = 1000;
        cfg.cluster.replicas = 2;
    });
    let nodes: Vec<FakeNode> = (0..2).map(|_| FakeNode::start()).collect();
    let disks = [0xd15c_0000_0000_00a1u64, 0xd15c_0000_0000_00b2];
    let ids: Vec<NodeId> = (0..2)
        .map(|i| {
            c.register(&node_registration(
                nodes[i].addr,
                &format!("host{i}"),
                None,
                disks[i],
            ))
            .expect("register")
            .node_id
        })
        .collect();
    let _beats: Vec<Heartbeater> = ids
        .iter()
        .map(|id| Heartbeater::start(server.url(), *id, Duration::from_millis(50)))
        .collect();
    let table = c.route().expect("route");
    let seq = c.status().expect("status").log_seq;

    // Node 1's disk claims node 0's id (the shared node.id).
    let mut claim = node_registration(nodes[1].addr, "host1", Some(ids[0]), disks[1]);
    let (status, msg) = status_of(c.register(&claim));
    assert_eq!(status, 409, "{msg}");
    for needle in [
        format!("node {} is running", ids[0]),
        "d15c0000000000a1".to_string(),
        "d15c0000000000b2".to_string(),
        "--state-dir".to_string(),
        format!("--replace-disk {}", ids[0]),
    ] {
        assert!(msg.contains(&needle), "`{needle}` not in: {msg}");
    }
    // The replace flag does not take a running node's id either.
    claim.replace_disk = true;
    let (status, msg) = status_of(c.register(&claim));
    assert_eq!(status, 409, "{msg}");
    assert!(msg.contains("is running"), "{msg}");
    // A second process on node 0's disk asking for a new id: refused.
    let (status, msg) =
        status_of(c.register(&node_registration(nodes[1].addr, "host1", None, disks[0])));
    assert_eq!(status, 409, "{msg}");
    assert!(
        msg.contains(&format!("disk d15c0000000000a1 is node {}'s", ids[0]))
            && msg.contains("Two processes"),
        "{msg}"
    );
    // A flag without an id is a bad request; for an unknown id, a refusal.
    let mut bad = node_registration(nodes[1].addr, "host1", None, 0x77);
    bad.replace_disk = true;
    assert_eq!(status_of(c.register(&bad)).0, 400);
    bad.node_id = Some(99);
    let (status, msg) = status_of(c.register(&bad));
    assert_eq!(status, 409, "{msg}");
    assert!(msg.contains("node 99 is not registered"), "{msg}");

    // Nothing changed: same table, no log entry.
    assert_eq!(c.route().expect("route"), table);
    assert_eq!(c.status().expect("status").log_seq, seq);
    // Node 0 itself (its disk) re-registers while running, as after a
    // quick restart: accepted, same id, still in sync everywhere.
    let r = c
        .register(&node_registration(
            nodes[0].addr,
            "host0",
            Some(ids[0]),
            disks[0],
        ))
        .expect("the node itself re-registers");
    assert_eq!(r.node_id, ids[0]);
    let t = c.route().expect("route");
    assert!(t.node(ids[0]).expect("node 0").up);
    assert_eq!(t.partitions, table.partitions);
}

/// A node whose disk was replaced (its lease expired) is refused without
/// the operator's flag, and accepted with it: it rejoins its partitions
/// as a syncing member only. Afterwards the new disk is its disk.
#[test]
fn a_replaced_disk_is_refused_without_the_flag_and_accepted_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, c) = start(dir.path(), |cfg| {
        cfg.cluster.heartbeat_ms = 50;
        cfg.cluster.lease_ms = 600;
        cfg.cluster.replicas = 2;
        cfg.cluster.max_moves = 64;
    });
    let nodes: Vec<FakeNode> = (0..3).map(|_| FakeNode::start()).collect();
    let ids: Vec<NodeId> = (0..3)
        .map(|i| {
            c.register(&node_registration(
                nodes[i].addr,
                &format!("host{i}"),
                None,
                0x100 + i as u64,
            ))
            .expect("register")
            .node_id
        })
        .collect();
    let mut beats: Vec<Option<Heartbeater>> = ids
        .iter()
        .map(|id| {
            Some(Heartbeater::start(
                server.url(),
                *id,
                Duration::from_millis(50),
            ))
        })
        .collect();
    let victim = ids[2];
    // Its disk dies: no more heartbeats; the lease expires.
    beats[2] = None;
    wait_for(Duration::from_secs(5), "victim marked down", || {
        c.route()
            .ok()?
            .node(victim)
            .is_some_and(|n| !n.up)
            .then_some(())
    });

    let new_disk = 0x2222_0000_0000_0001u64;
    let mut req = node_registration(nodes[2].addr, "host2", Some(victim), new_disk);
    let (status, msg) = status_of(c.register(&req));
    assert_eq!(status, 409, "{msg}");
    for needle in [
        format!("node {victim} was registered with disk 0000000000000102"),
        "2222000000000001".to_string(),
        format!("--replace-disk {victim}"),
    ] {
        assert!(msg.contains(&needle), "`{needle}` not in: {msg}");
    }
    assert!(!c.route().expect("route").node(victim).expect("listed").up);

    req.replace_disk = true;
    let r = c.register(&req).expect("replace accepted");
    assert_eq!(r.node_id, victim);
    let t = c.route().expect("route");
    assert!(t.node(victim).expect("victim").up);
    assert!(
        t.partitions
            .iter()
            .filter_map(|p| p.member(victim))
            .all(|m| !m.in_sync),
        "a new disk must not be an in-sync member"
    );
    assert!(c.log(0).expect("log").iter().any(|e| matches!(
        &e.what,
        Change::NodeRegistered { node } if node.id == victim && node.domain == "host2"
    ) && e.who == format!("node {victim}")));
    // The new disk is its disk now: a plain restart needs no flag.
    req.replace_disk = false;
    assert_eq!(c.register(&req).expect("restart").node_id, victim);
}

/// A node that lost its id (an old disk without one, its node.id file
/// gone) but whose disk the service knows gets its id back, not a new one.
#[test]
fn a_known_disk_without_an_id_gets_its_node_id_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, c) = start(dir.path(), |cfg| {
        cfg.cluster.heartbeat_ms = 50;
        cfg.cluster.lease_ms = 300;
    });
    let node = FakeNode::start();
    let req = node_registration(node.addr, "host0", None, 0xc0ffee);
    let id = c.register(&req).expect("register").node_id;
    // While its lease runs, the same disk without an id is a second process.
    assert_eq!(status_of(c.register(&req)).0, 409);
    wait_for(Duration::from_secs(5), "lease expired", || {
        let n = c.nodes().ok()?;
        n.iter().any(|n| n.id == id && !n.up).then_some(())
    });
    assert_eq!(c.register(&req).expect("register again").node_id, id);
    assert_eq!(c.nodes().expect("nodes").len(), 1);
}

/// Roles: a node token registers and heartbeats but manages nothing; an
/// attach token reads a volume, attaches and renews, nothing else; the
/// operator does everything. A capability is signed with the key derived
/// from the node token (the one the nodes hold), not the operator's.
#[test]
fn tokens_have_roles_and_capabilities_follow_the_node_token() {
    use celer_meta::server::parse_tokens;
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens =
        parse_tokens("ops test-secret\nnodes node-secret node\nfront attach-secret attach\n")
            .expect("token file");
    let (server, operator) = start(dir.path(), |cfg| cfg.tokens = tokens);
    let node = MetaClient::new(&server.url(), "node-secret");
    let front = MetaClient::new(&server.url(), "attach-secret");
    // A node token: register and heartbeat yes; volumes, nodes list, split no.
    let fake = FakeNode::start();
    let id = fake.register(&node, "host0");
    node.heartbeat(id, 0).expect("heartbeat");
    for (what, r) in [
        (
            "create a volume",
            status_of(node.create_volume(&vol("a", 1 << 30))).0,
        ),
        ("list nodes", status_of(node.nodes()).0),
        ("split", status_of(node.split()).0),
        ("attach", status_of(node.attach("a", false)).0),
    ] {
        assert_eq!(r, 403, "a node token may not {what}");
    }
    operator
        .create_volume(&vol("a", 1 << 30))
        .expect("operator creates");
    // An attach token: read the volume, attach, renew; nothing else.
    let att = front.attach("a", false).expect("attach");
    front.renew_attachment(att.attachment.id).expect("renew");
    front.volume("a").expect("read the volume");
    let (code, msg) = status_of(front.delete_volume("a"));
    assert_eq!(code, 403, "{msg}");
    assert!(msg.contains("front"), "the refusal names the token: {msg}");
    assert_eq!(status_of(front.resize_volume("a", 2 << 30)).0, 403);
    assert_eq!(status_of(front.detach(att.attachment.id)).0, 403);
    assert_eq!(status_of(front.log(0)).0, 403);
    // The capability verifies with the node token's data key only.
    let cap = celer_proto::auth::Capability::from_hex(&att.capability).expect("capability");
    let now = 0;
    cap.verify(&celer_proto::auth::data_key_from_secret("node-secret"), now)
        .expect("signed with the node token's key");
    assert!(cap
        .verify(&celer_proto::auth::data_key_from_secret("test-secret"), now)
        .is_err());
    // Admin tickets (the nodes' scrub controls): operators only, signed
    // with the node token's data key, naming the operator.
    assert_eq!(status_of(node.admin_ticket()).0, 403);
    assert_eq!(status_of(front.admin_ticket()).0, 403);
    let t = operator.admin_ticket().expect("an operator gets a ticket");
    let nk = celer_proto::auth::data_key_from_secret("node-secret");
    let got = celer_proto::auth::AdminTicket::verify(&nk, &t.ticket, t.expires_unix_ms - 1)
        .expect("signed with the node token's key");
    assert_eq!(got.operator, "ops");
    // Unknown roles are a configuration error that names them.
    let e = parse_tokens("x secret admin\n").expect_err("unknown role");
    assert!(e.to_string().contains("admin"), "{e}");
    operator
        .detach(att.attachment.id)
        .expect("the operator detaches");
}

/// A node that reports a failure is treated as a dead one (marked down
/// within the lease, its partitions move) and the node list says why; a
/// warning is shown as long as heartbeats carry it.
#[test]
fn a_node_that_reports_a_failure_is_taken_out_and_warnings_show() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, c) = start(dir.path(), |cfg| {
        cfg.cluster.heartbeat_ms = 50;
        cfg.cluster.lease_ms = 400;
    });
    let (_nodes, ids) = register_nodes(&c, 4);
    let beat = |id: NodeId, failure: Option<&str>, warning: Option<&str>| {
        c.heartbeat_with(
            id,
            &Heartbeat {
                epoch: 0,
                failure: failure.map(str::to_string),
                warning: warning.map(str::to_string),
                ..Heartbeat::default()
            },
        )
        .expect("heartbeat")
    };
    let t0 = Instant::now();
    let sick = ids[3];
    wait_for(Duration::from_secs(10), "node taken out", || {
        for &id in &ids[..3] {
            beat(
                id,
                None,
                (id == ids[0]).then_some("file system short of room"),
            );
        }
        beat(sick, Some("engine shard 0: No space left on device"), None);
        let nodes = c.nodes().expect("nodes");
        let n = nodes.iter().find(|n| n.id == sick).expect("sick node");
        let t = c.route().ok()?;
        let out = !n.up
            && t.partitions
                .iter()
                .all(|p| p.member(sick).is_none_or(|m| !m.in_sync));
        out.then_some(())
    });
    println!(
        "taken out {:?} after its first failure report",
        t0.elapsed()
    );
    let nodes = c.nodes().expect("nodes");
    let n = nodes.iter().find(|n| n.id == sick).expect("sick node");
    assert_eq!(
        n.failure.as_deref(),
        Some("engine shard 0: No space left on device")
    );
    let w = nodes.iter().find(|n| n.id == ids[0]).expect("warned node");
    assert_eq!(w.warning.as_deref(), Some("file system short of room"));
    assert!(w.up, "a warning does not take a node out");
    // The warning goes when heartbeats stop carrying it.
    beat(ids[0], None, None);
    let nodes = c.nodes().expect("nodes");
    assert_eq!(
        nodes
            .iter()
            .find(|n| n.id == ids[0])
            .and_then(|n| n.warning.clone()),
        None
    );
}

/// Attachments are exclusive by default: a second writer is refused with
/// the holder named; a forced take-over ends the holder and raises the
/// volume's fence generation, which every live node has installed before
/// the attach answers (and which registration and heartbeat replies carry);
/// shared writers share one generation; read-only ones conflict with
/// nobody and raise nothing.
#[test]
fn attach_modes_refuse_second_writers_and_take_overs_fence_on_every_live_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, c) = start(dir.path(), |_| {});
    let fakes: Vec<FakeNode> = (0..2).map(|_| FakeNode::start()).collect();
    let ids: Vec<NodeId> = fakes
        .iter()
        .enumerate()
        .map(|(i, f)| f.register(&c, &format!("host{i}")))
        .collect();
    for id in &ids {
        c.heartbeat(*id, 0).expect("heartbeat");
    }
    let v = c.create_volume(&vol("vm", 1 << 30)).expect("create");
    assert_eq!(v.fence, 0);
    let pushed = |f: &FakeNode| f.fences.lock().expect("lock").last().copied();
    let first = c
        .attach_with(
            "vm",
            &AttachVolume {
                holder: "hostA pid 7 vhost /run/a.sock".into(),
                ..AttachVolume::default()
            },
        )
        .expect("first attach");
    assert_eq!(first.attachment.mode, AttachMode::Exclusive);
    assert_eq!(
        first.attachment.fence, 1,
        "an exclusive attach starts a generation"
    );
    assert_eq!(first.volume.fence, 1);
    for f in &fakes {
        assert_eq!(
            pushed(f),
            Some(VolumeFence {
                volume: v.id,
                fence: 1
            }),
            "pushed to every node before the answer"
        );
    }
    let cap = celer_proto::auth::Capability::from_hex(&first.capability).expect("capability");
    assert_eq!(cap.fence, 1, "the capability carries the generation");

    // A second writer, exclusive or shared, is refused with the holder named.
    let shared = AttachVolume {
        mode: AttachMode::Shared,
        ..AttachVolume::default()
    };
    for req in [AttachVolume::default(), shared.clone()] {
        let (code, msg) = status_of(c.attach_with("vm", &req));
        assert_eq!(code, 409, "{msg}");
        assert!(
            msg.contains(&format!("attachment {}", first.attachment.id))
                && msg.contains("hostA pid 7 vhost /run/a.sock")
                && msg.contains("--force"),
            "the refusal names the holder and the way out: {msg}"
        );
    }
    // Read-only: no conflict, no new generation.
    let ro = c.attach("vm", true).expect("read-only attach");
    assert_eq!(ro.attachment.fence, 1);
    assert_eq!(c.volume("vm").expect("volume").fence, 1);

    // A forced take-over ends the holder and fences it everywhere.
    let second = c
        .attach_with(
            "vm",
            &AttachVolume {
                force: true,
                holder: "hostB".into(),
                ..AttachVolume::default()
            },
        )
        .expect("take-over");
    assert_eq!(second.attachment.fence, 2);
    for f in &fakes {
        assert_eq!(pushed(f).map(|p| p.fence), Some(2));
    }
    let (code, msg) = status_of(c.renew_attachment(first.attachment.id));
    assert_eq!(code, 404, "the old holder cannot renew: {msg}");
    c.renew_attachment(ro.attachment.id)
        .expect("the read-only attachment is not taken over");
    let reply = c.heartbeat(ids[0], 0).expect("heartbeat");
    assert!(
        reply.fences.contains(&VolumeFence {
            volume: v.id,
            fence: 2
        }),
        "heartbeat replies carry the generations: {:?}",
        reply.fences
    );
    let log = c.log(0).expect("log");
    assert!(
        log.iter().any(|e| matches!(&e.what,
            Change::VolumeTakenOver { volume, fence: 2, from } if volume == "vm" && from == &vec![first.attachment.id])),
        "the log records the take-over"
    );

    // Shared writers join one generation; an exclusive one is refused by
    // them and ends them all with force.
    c.detach(second.attachment.id).expect("detach");
    let s1 = c.attach_with("vm", &shared).expect("shared 1");
    let s2 = c.attach_with("vm", &shared).expect("shared 2");
    assert_eq!(
        s1.attachment.fence, 3,
        "the first shared writer starts a generation"
    );
    assert_eq!(s2.attachment.fence, 3, "the next ones join it");
    assert_ne!(s1.attachment.id, s2.attachment.id);
    let (code, msg) = status_of(c.attach("vm", false));
    assert_eq!(code, 409, "{msg}");
    assert!(
        msg.contains(&format!("attachment {}", s1.attachment.id)),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("attachment {}", s2.attachment.id)),
        "{msg}"
    );
    let third = c
        .attach_with(
            "vm",
            &AttachVolume {
                force: true,
                ..AttachVolume::default()
            },
        )
        .expect("take-over from the shared writers");
    assert_eq!(third.attachment.fence, 4);
    let left: Vec<u32> = c
        .attachments()
        .expect("attachments")
        .iter()
        .filter(|a| a.volume_id == v.id)
        .map(|a| a.id)
        .collect();
    assert_eq!(left, vec![ro.attachment.id, third.attachment.id]);

    // A node that is down is not waited for, and learns the generation
    // when it registers again.
    drop(fakes);
    let again = c
        .register(&RegisterNode {
            node_id: Some(ids[1]),
            data_addr: "127.0.0.1:1".into(),
            admin_addr: "127.0.0.1:1".into(),
            shards: 2,
            domain: "host1".into(),
            disk_uuid: None,
            replace_disk: false,
        })
        .expect("register again");
    assert!(again.fences.contains(&VolumeFence {
        volume: v.id,
        fence: 4
    }));
}

/// `POST /v1/volumes/{name}/flatten` cuts a clone off the layers under its
/// head, only for the layers the copy was made for; the parent's snapshot
/// may go once no volume reads it any more, also through a snapshot the
/// clone took before it was flattened.
#[test]
fn flatten_cuts_a_clone_off_its_parent_and_then_the_snapshot_may_go() {
    use celer_meta::api::FlattenVolume;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, c) = start(dir.path(), |_| {});
    c.create_volume(&vol("p", 1 << 30)).expect("create p");
    c.create_snapshot("p", "s").expect("snapshot p@s");
    c.clone_volume("p", "s", "c").expect("clone c");
    let req = |v: &celer_meta::api::Volume| FlattenVolume {
        head_era: v.head_era,
        under: v.under.clone(),
    };
    let pv = c.volume("p").expect("p");
    let (st, msg) = status_of(c.flatten_volume("p", &req(&pv)));
    assert_eq!(st, 409, "{msg}");
    assert!(msg.contains("not a clone"), "{msg}");
    let cv = c.volume("c").expect("c");
    let stale = FlattenVolume {
        head_era: cv.head_era + 100,
        ..req(&cv)
    };
    let (st, msg) = status_of(c.flatten_volume("c", &stale));
    assert_eq!(st, 409, "{msg}");
    assert!(
        msg.contains("changed while it was being flattened"),
        "{msg}"
    );
    // A snapshot of the clone, taken before the flatten, reads p@s too.
    c.create_snapshot("c", "k").expect("snapshot c@k");
    let (st, _) = status_of(c.flatten_volume("c", &req(&cv)));
    assert_eq!(st, 409, "the copy was made for the head before c@k");
    let cv = c.volume("c").expect("c");
    let flat = c.flatten_volume("c", &req(&cv)).expect("flatten c");
    assert!(flat.under.is_empty() && flat.parent.is_none(), "{flat:?}");
    let (st, msg) = status_of(c.flatten_volume("c", &req(&cv)));
    assert_eq!(st, 409, "{msg}");
    assert!(msg.contains("nothing to flatten"), "{msg}");
    let (st, msg) = status_of(c.delete_snapshot("p", "s"));
    assert_eq!(st, 409, "{msg}");
    assert!(msg.contains("volume c reads snapshot p@s"), "{msg}");
    let (st, msg) = status_of(c.delete_volume("p"));
    assert_eq!(st, 409, "{msg}");
    // A clone that is not flattened can go: the parent's layers it reads
    // are the parent's, not its own.
    c.clone_volume("p", "s", "c2").expect("clone c2");
    c.delete_volume("c2")
        .expect("delete a clone whose parent still reads its snapshot");
    c.delete_snapshot("c", "k").expect("delete c@k");
    c.delete_snapshot("p", "s")
        .expect("delete p@s: nobody reads it");
    c.delete_volume("p").expect("delete p");
    assert_eq!(c.volume("c").expect("c").head_era, flat.head_era);
    let log = c.log(0).expect("log");
    assert!(
        log.iter()
            .any(|e| matches!(&e.what, Change::VolumeLayersChanged { what, .. } if what.starts_with("flattened"))),
        "no flatten entry in the change log"
    );
}
