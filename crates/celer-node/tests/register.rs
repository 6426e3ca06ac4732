//! A node joining its control service: registration retries what may pass
//! (unreachable, 5xx) with backoff across every URL given and stops at
//! once on a refusal (4xx); heartbeats retry after failures; the node's id
//! comes from its disk and is recorded there.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celer_engine::{Engine, FormatOptions};
use celer_meta::{MetaConfig, MetaServer};
use celer_node::{JoinOptions, Node, NodeConfig};

const TOKEN: &str = "test-token";

fn new_disk(dir: &Path, name: &str) -> PathBuf {
    let disk = dir.join(name);
    Engine::format(
        &disk,
        &FormatOptions {
            shard_count: 2,
            journal_blocks: 256,
            create_size_bytes: Some(64 << 20),
            ..Default::default()
        },
    )
    .expect("format");
    disk
}

fn config(disk: PathBuf, state_dir: PathBuf, meta_url: &str) -> NodeConfig {
    NodeConfig {
        disk,
        state_dir,
        listen: "127.0.0.1:0".parse().expect("addr"),
        advertise: None,
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        meta_url: Some(meta_url.to_string()),
        token: TOKEN.into(),
        node_id: None,
        domain: "host0".into(),
        route_file: None,
        forward_timeout: Duration::from_millis(500),
        busy_poll: Duration::ZERO,
        insecure_no_auth: false,
        idle_timeout: Some(celer_node::IDLE_TIMEOUT_DEFAULT),
        scrub_bytes_per_sec: celer_node::SCRUB_RATE_DEFAULT,
        scrub_interval: celer_node::SCRUB_INTERVAL_DEFAULT,
        tls_creds: None,
        hugepages: false,
    }
}

/// One request as the fake control service saw it.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    path: String,
    status: u16,
}

/// A fake control service: `register` and `heartbeat` give the (status,
/// body) to answer for the n-th request (0-based) of each kind.
struct Fake {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

type Script = Box<dyn Fn(usize) -> (u16, String) + Send>;

impl Fake {
    fn start(register: Script, heartbeat: Script) -> Fake {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        std::thread::spawn(move || {
            let (mut registers, mut beats) = (0, 0);
            for s in l.incoming().map_while(Result::ok) {
                let Some(path) = read_request(&s) else {
                    continue;
                };
                let (status, body) = if path.ends_with("/register") {
                    registers += 1;
                    register(registers - 1)
                } else if path.ends_with("/heartbeat") {
                    beats += 1;
                    heartbeat(beats - 1)
                } else {
                    (404, r#"{"error":"not here"}"#.to_string())
                };
                log.lock().expect("lock").push(Seen {
                    at: Instant::now(),
                    path,
                    status,
                });
                let mut s = s;
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Fake { url, seen }
    }

    fn seen(&self, suffix: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.path.ends_with(suffix))
            .cloned()
            .collect()
    }
}

/// Reads one HTTP request (head and body); returns its path.
fn read_request(s: &TcpStream) -> Option<String> {
    let mut s = s;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut b).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&b[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut b).ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&b[..n]);
    }
    head.split_whitespace().nth(1).map(str::to_string)
}

const REGISTERED: &str = r#"{"node_id":5,"heartbeat_ms":100,"lease_ms":1000}"#;
const BEAT_OK: &str = r#"{"epoch":0,"table":null,"deleted_volumes":[]}"#;
const FAILED: &str = r#"{"error":"the control service could not save the change (etcd: connection refused): nothing was changed; check its log and retry"}"#;

/// The CI flake: one 500 at start-up (an etcd endpoint not up yet) made the
/// node exit. Now 500s are retried with backoff (50 ms doubling), across
/// every control URL given (the first one here refuses connections), and
/// failed heartbeats are retried after a backoff too.
#[test]
fn registration_and_heartbeats_retry_500s_with_backoff() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Fake::start(
        Box::new(|n| {
            if n < 3 {
                (500, FAILED.into())
            } else {
                (200, REGISTERED.into())
            }
        }),
        Box::new(|n| {
            if (1..4).contains(&n) {
                (500, FAILED.into())
            } else {
                (200, BEAT_OK.into())
            }
        }),
    );
    let disk = new_disk(dir.path(), "disk.img");
    // A control URL nobody listens on, then the fake.
    let urls = format!("http://127.0.0.1:1,{}", fake.url);
    let t0 = Instant::now();
    let node = Node::start(config(disk.clone(), dir.path().into(), &urls)).expect("node starts");
    let took = t0.elapsed();
    assert_eq!(node.id(), 5);
    let regs = fake.seen("/register");
    let gaps: Vec<Duration> = regs.windows(2).map(|w| w[1].at - w[0].at).collect();
    println!(
        "registered after {took:?}: {} attempts, gaps {gaps:?}",
        regs.len()
    );
    assert_eq!(regs.len(), 4, "{regs:?}");
    assert_eq!(
        regs.iter().map(|r| r.status).collect::<Vec<_>>(),
        [500, 500, 500, 200]
    );
    // Backoff: each gap at least half its step (25, 50, 100 ms).
    for (gap, step_ms) in gaps.iter().zip([50u64, 100, 200]) {
        assert!(
            *gap >= Duration::from_millis(step_ms / 2),
            "gap {gap:?} for a {step_ms} ms step"
        );
    }
    // The id the control service gave is on the disk now.
    assert_eq!(Engine::node_id_of(&disk).expect("read"), Some(5));
    assert!(
        !dir.path().join("node.id").exists(),
        "node.id is not written any more"
    );

    // Heartbeats 2-4 fail; they go on, and the one after the first failure
    // comes sooner than a period would have it... or at least they resume.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.seen("/heartbeat").len() < 7 {
        assert!(
            Instant::now() < deadline,
            "heartbeats stopped: {:?}",
            fake.seen("/heartbeat")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let beats = fake.seen("/heartbeat");
    let gaps: Vec<Duration> = beats.windows(2).map(|w| w[1].at - w[0].at).collect();
    println!(
        "heartbeats: {:?}, gaps {gaps:?}",
        beats.iter().map(|b| b.status).collect::<Vec<_>>()
    );
    assert_eq!(
        beats[..6].iter().map(|b| b.status).collect::<Vec<_>>(),
        [200, 500, 500, 500, 200, 200]
    );
    // The retry after the first failed beat: 25-50 ms, well under the
    // 100 ms period (slack for a loaded machine).
    assert!(
        gaps[1] < Duration::from_millis(90),
        "retry after {:?}",
        gaps[1]
    );
    node.stop().expect("stop");
}

/// A refusal (409, 401) is an answer: the node stops at once with the
/// control service's message, after one attempt.
#[test]
fn a_refused_registration_fails_at_once_with_its_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (status, message) in [
        (409, "node 5 is running with disk 00000000000000aa: refused"),
        (401, "wrong token: use the cluster token"),
    ] {
        let body = format!(r#"{{"error":"{message}"}}"#);
        let fake = Fake::start(
            Box::new(move |_| (status, body.clone())),
            Box::new(|_| (200, BEAT_OK.into())),
        );
        let disk = new_disk(dir.path(), &format!("disk{status}.img"));
        let t0 = Instant::now();
        let e = match Node::start(config(disk.clone(), dir.path().into(), &fake.url)) {
            Ok(_) => panic!("a {status} was taken for a registration"),
            Err(e) => e.to_string(),
        };
        println!("{status}: failed after {:?}: {e}", t0.elapsed());
        assert!(t0.elapsed() < Duration::from_secs(2), "{status} retried");
        assert_eq!(fake.seen("/register").len(), 1, "{status} retried");
        assert!(e.contains(message) && e.contains("not retried"), "{e}");
        assert_eq!(Engine::node_id_of(&disk).expect("read"), None);
    }
}

/// The control service starts 2 s after the node (connections refused
/// meanwhile): the node waits for it; with a registration timeout shorter
/// than that it gives up, saying so.
#[test]
fn registration_waits_for_a_control_service_that_starts_late() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr: SocketAddr = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let url = format!("http://{addr}");

    let disk = new_disk(dir.path(), "early.img");
    let t0 = Instant::now();
    let e = match Node::start_with(
        config(disk, dir.path().join("s0"), &url),
        JoinOptions {
            register_timeout: Duration::from_millis(500),
            ..JoinOptions::default()
        },
    ) {
        Ok(_) => panic!("registered with nobody"),
        Err(e) => e.to_string(),
    };
    println!("gave up after {:?}: {e}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(
        e.contains("gave up after") && e.contains("cannot reach"),
        "{e}"
    );

    let meta_dir = dir.path().join("meta");
    let server = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        MetaServer::start(MetaConfig::new(addr, meta_dir, TOKEN)).expect("control service")
    });
    let disk = new_disk(dir.path(), "disk.img");
    let t0 = Instant::now();
    let node = Node::start(config(disk.clone(), dir.path().join("s1"), &url)).expect("node starts");
    let took = t0.elapsed();
    println!("registered {took:?} after start");
    assert!(took >= Duration::from_millis(1900), "{took:?}");
    assert!(took < Duration::from_secs(6), "slow to notice: {took:?}");
    assert_eq!(
        Engine::node_id_of(&disk).expect("read"),
        Some(node.id() as u64)
    );
    node.stop().expect("stop");
    drop(server.join().expect("server thread"));
}

/// Two disks in one directory (state_dir shared): each node keeps its own
/// id across a restart. Before, both wrote `node.id` there and the node
/// restarted second took the other's id.
#[test]
fn two_nodes_with_disks_in_one_directory_keep_their_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = MetaServer::start(MetaConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        dir.path().join("meta"),
        TOKEN,
    ))
    .expect("control service");
    let shared = dir.path().join("disks");
    std::fs::create_dir_all(&shared).expect("mkdir");
    let disks = [new_disk(&shared, "a.img"), new_disk(&shared, "b.img")];
    let mut nodes: Vec<Option<Node>> = disks
        .iter()
        .map(|d| {
            Some(Node::start(config(d.clone(), shared.clone(), &server.url())).expect("start"))
        })
        .collect();
    let ids: Vec<u32> = nodes.iter().flatten().map(Node::id).collect();
    assert_ne!(ids[0], ids[1]);
    // Restart the first node (before, `node.id` held the second's id).
    for i in [0, 1, 0] {
        nodes[i].take().expect("running").stop().expect("stop");
        let n =
            Node::start(config(disks[i].clone(), shared.clone(), &server.url())).expect("restart");
        assert_eq!(
            n.id(),
            ids[i],
            "node on {} took another id",
            disks[i].display()
        );
        nodes[i] = Some(n);
    }
    for (d, id) in disks.iter().zip(&ids) {
        assert_eq!(Engine::node_id_of(d).expect("read"), Some(*id as u64));
    }
    for n in nodes.into_iter().flatten() {
        n.stop().expect("stop");
    }
}

/// A disk from before disks recorded their node: the id saved in
/// `node.id` by the older release is claimed, and then written to the disk.
#[test]
fn an_old_disk_takes_its_id_from_node_id_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = MetaServer::start(MetaConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        dir.path().join("meta"),
        TOKEN,
    ))
    .expect("control service");
    let disk = new_disk(dir.path(), "old.img");
    std::fs::write(dir.path().join("node.id"), "7\n").expect("write node.id");
    let node = Node::start(config(disk.clone(), dir.path().into(), &server.url())).expect("start");
    assert_eq!(node.id(), 7);
    assert_eq!(Engine::node_id_of(&disk).expect("read"), Some(7));
    node.stop().expect("stop");
    // From now on the disk decides: a stale node.id is ignored.
    std::fs::write(dir.path().join("node.id"), "9\n").expect("write node.id");
    let node = Node::start(config(disk, dir.path().into(), &server.url())).expect("restart");
    assert_eq!(node.id(), 7);
    node.stop().expect("stop");
}
