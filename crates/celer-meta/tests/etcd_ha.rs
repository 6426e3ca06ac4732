//! Several control processes on a real 3-member etcd cluster (Debian's
//! etcd-server, on loopback): one leads, the others answer 503 naming it;
//! when the leader dies a follower takes over within seconds and no
//! metadata is lost. Skipped (with a message) where /usr/bin/etcd is missing.
#![cfg(feature = "etcd")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use celer_meta::api::{CreateVolume, RegisterNode};
use celer_meta::etcd::EtcdConfig;
use celer_meta::server::StoreConfig;
use celer_meta::{MetaClient, MetaConfig, MetaServer};

const TOKEN: &str = "ha-secret";

fn etcd_binary() -> Option<PathBuf> {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A port reserved for this test process (see celer-ports): etcd is
/// told its ports in advance, so no other test may take them meanwhile.
fn free_port() -> u16 {
    celer_ports::reserve()
        .expect("reserve a loopback port")
        .port()
}

/// A 3-member etcd cluster on loopback; killed on drop.
struct Etcd {
    members: Vec<Child>,
    endpoints: Vec<String>,
}

impl Etcd {
    fn start(bin: &Path, dir: &Path) -> Etcd {
        let peers: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let clients: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let initial: Vec<String> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{i}=http://127.0.0.1:{p}"))
            .collect();
        let mut members = Vec::new();
        for i in 0..3 {
            let child = Command::new(bin)
                .arg("--name")
                .arg(format!("m{i}"))
                .arg("--data-dir")
                .arg(dir.join(format!("m{i}")))
                .arg("--listen-client-urls")
                .arg(format!("http://127.0.0.1:{}", clients[i]))
                .arg("--advertise-client-urls")
                .arg(format!("http://127.0.0.1:{}", clients[i]))
                .arg("--listen-peer-urls")
                .arg(format!("http://127.0.0.1:{}", peers[i]))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://127.0.0.1:{}", peers[i]))
                .arg("--initial-cluster")
                .arg(initial.join(","))
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--initial-cluster-token")
                .arg(format!("celer-test-{}", std::process::id()))
                .arg("--max-txn-ops")
                .arg("4096")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn etcd");
            members.push(child);
        }
        let endpoints: Vec<String> = clients
            .iter()
            .map(|c| format!("http://127.0.0.1:{c}"))
            .collect();
        // Healthy once a quorum answers /health.
        let start = Instant::now();
        loop {
            let healthy = endpoints
                .iter()
                .filter(|e| {
                    ureq::get(&format!("{e}/health"))
                        .timeout(Duration::from_millis(500))
                        .call()
                        .ok()
                        .and_then(|r| r.into_string().ok())
                        .is_some_and(|b| b.contains("true"))
                })
                .count();
            if healthy == 3 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "etcd cluster did not become healthy"
            );
            thread::sleep(Duration::from_millis(100));
        }
        Etcd { members, endpoints }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}

fn meta(etcd: &Etcd) -> MetaServer {
    // The listener must know its port before the config names it.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut cfg = MetaConfig::new(
        listen.parse().expect("addr"),
        PathBuf::from("/nonexistent"),
        TOKEN,
    );
    cfg.cluster.partition_bits = 6;
    cfg.cluster.down_grace_ms = 0;
    cfg.cluster.heartbeat_ms = 100;
    cfg.cluster.lease_ms = 1500;
    cfg.store = StoreConfig::Etcd(EtcdConfig::new(
        etcd.endpoints.clone(),
        format!("http://{listen}"),
    ));
    MetaServer::start(cfg).expect("start a control process on etcd")
}

/// The index of the leading server, once exactly one leads.
fn leader_of(servers: &[Option<MetaServer>], within: Duration) -> usize {
    let start = Instant::now();
    loop {
        let leading: Vec<usize> = servers
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let s = s.as_ref()?;
                // Plain HTTP: MetaClient would follow a 503 to the leader.
                ureq::get(&format!("{}/v1/status", s.url()))
                    .set("Authorization", &format!("Bearer {TOKEN}"))
                    .timeout(Duration::from_millis(500))
                    .call()
                    .ok()
                    .map(|_| i)
            })
            .collect();
        if leading.len() == 1 {
            return leading[0];
        }
        assert!(
            start.elapsed() < within,
            "no single leader after {within:?}: {leading:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn leader_failover_keeps_every_change() {
    let Some(bin) = etcd_binary() else {
        // A CI machine without etcd must not pass this test by skipping it.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "no etcd binary on a CI machine (CI=true): install etcd-server (scripts/install-deps.sh)"
        );
        eprintln!("SKIPPED: no etcd binary (apt-get install -y etcd-server)");
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CELER_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&bin, dir.path());

    let mut servers: Vec<Option<MetaServer>> = (0..3).map(|_| Some(meta(&etcd))).collect();
    let urls: Vec<String> = servers
        .iter()
        .map(|s| s.as_ref().expect("server").url())
        .collect();
    let first = leader_of(&servers, Duration::from_secs(10));

    // A follower names the leader; a client given every URL reaches it.
    let follower = (first + 1) % 3;
    match ureq::get(&format!("{}/v1/volumes", urls[follower]))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .call()
    {
        Err(ureq::Error::Status(503, r)) => {
            let b: celer_meta::api::ErrorBody = r.into_json().expect("json");
            assert_eq!(
                b.leader.as_deref(),
                Some(urls[first].as_str()),
                "{}",
                b.error
            );
        }
        other => panic!("expected 503 naming the leader, got {other:?}"),
    }
    // MetaClient given only the follower follows the 503 to the leader.
    assert!(MetaClient::new(&urls[follower], TOKEN)
        .volumes()
        .expect("via the leader")
        .is_empty());
    // Starting at a follower: the client follows the 503 to the leader.
    let c = MetaClient::new(
        &format!(
            "{},{},{}",
            urls[follower],
            urls[first],
            urls[(first + 2) % 3]
        ),
        TOKEN,
    );
    for i in 0..5 {
        c.create_volume(&CreateVolume {
            name: format!("vol{i}"),
            size_bytes: 1 << 30,
            replicas: None,
            sector_size_bytes: None,
        })
        .expect("create");
    }
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = c
            .register(&RegisterNode {
                node_id: None,
                data_addr: format!("127.0.0.1:{}", 10_000 + i),
                admin_addr: "127.0.0.1:1".into(),
                shards: 1,
                domain: format!("host{i}"),
                disk_uuid: None,
                replace_disk: false,
            })
            .expect("register");
        ids.push(r.node_id);
    }
    // Nodes heartbeat through the failover with every URL.
    let stop = Arc::new(AtomicBool::new(false));
    let beats: Vec<_> = ids
        .iter()
        .map(|&id| {
            let (stop, all) = (stop.clone(), urls.join(","));
            thread::spawn(move || {
                let c = MetaClient::new(&all, TOKEN);
                while !stop.load(Ordering::Relaxed) {
                    let _ = c.heartbeat(id, 0);
                    thread::sleep(Duration::from_millis(100));
                }
            })
        })
        .collect();
    let before_vols = c.volumes().expect("volumes");
    let before_log = c.log(0).expect("log");
    let before_route = c.route().expect("route");
    assert_eq!(before_route.epoch, 1);

    // The leader dies (its etcd lease is not revoked: like a crash).
    let killed = Instant::now();
    servers[first] = None;
    let second = leader_of(&servers, Duration::from_secs(10));
    let took = killed.elapsed();
    assert_ne!(second, first);
    assert!(took < Duration::from_secs(6), "takeover took {took:?}");
    eprintln!("takeover after {took:?}");

    // Nothing lost; the nodes stayed up; the new leader takes changes.
    assert_eq!(c.volumes().expect("volumes"), before_vols);
    assert_eq!(c.log(0).expect("log"), before_log);
    assert_eq!(c.route().expect("route"), before_route);
    let s = c.status().expect("status");
    assert_eq!((s.nodes_up, s.nodes_down), (3, 0));
    let v = c
        .create_volume(&CreateVolume {
            name: "after".into(),
            size_bytes: 4096,
            replicas: None,
            sector_size_bytes: None,
        })
        .expect("create on the new leader");
    assert_eq!(v.id, 6);
    // A restarted process follows the new leader.
    servers[first] = Some(meta(&etcd));
    thread::sleep(Duration::from_millis(500));
    assert_eq!(leader_of(&servers, Duration::from_secs(5)), second);

    stop.store(true, Ordering::Relaxed);
    for b in beats {
        let _ = b.join();
    }
    // Still nobody down after the heartbeats stopped only just now.
    assert_eq!(c.status().expect("status").nodes_down, 0);
}
