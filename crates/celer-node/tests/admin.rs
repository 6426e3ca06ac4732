//! The admin server of a real node, over real sockets: pushed route tables
//! that the control service could not have made are refused and leave the
//! node's data in place; half-sent HTTP requests neither stop it answering
//! nor stay open past the header timeout.
//!
//! The data is written to the engine before the node starts and read back
//! from it after the node stops, so these tests do not depend on the data
//! protocol.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use celer_device::{BlockDevice, IoOp, IoRequest, IoSegment};
use celer_engine::{Engine, EngineDevice, EngineDeviceConfig, FormatOptions};
use celer_node::{Node, NodeConfig};
use celer_route::{Member, NodeInfo, RouteTable};

const TOKEN: &str = "admin-test-token";
const CHUNK_BYTES: u64 = 1 << 20;
const DATA_CHUNKS: u64 = 8;

fn start_node(disk: &Path, state: &Path) -> Node {
    Node::start(NodeConfig {
        disk: disk.to_path_buf(),
        state_dir: state.to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        advertise: None,
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        meta_url: None,
        token: TOKEN.into(),
        node_id: Some(1),
        domain: "host1".into(),
        route_file: None,
        forward_timeout: Duration::from_millis(500),
        busy_poll: Duration::ZERO,
        insecure_no_auth: false,
        idle_timeout: Some(celer_node::IDLE_TIMEOUT_DEFAULT),
        scrub_bytes_per_sec: celer_node::SCRUB_RATE_DEFAULT,
        scrub_interval: celer_node::SCRUB_INTERVAL_DEFAULT,
        tls_creds: None,
        hugepages: false,
    })
    .expect("node starts")
}

fn format(disk: &Path) {
    Engine::format(
        disk,
        &FormatOptions {
            shard_count: 2,
            journal_blocks: 1024,
            create_size_bytes: Some(96 << 20),
            ..Default::default()
        },
    )
    .expect("format");
}

/// One 4 KiB read or write of volume 1 straight on the engine.
fn engine_io(disk: &Path, op: IoOp, offset: u64, data: &mut [u8; 4096]) {
    let dev = EngineDevice::open(&EngineDeviceConfig {
        path: disk.to_path_buf(),
        volume: 1,
        size_bytes: DATA_CHUNKS * CHUNK_BYTES,
        read_only: op == IoOp::Read,
    })
    .expect("open the engine");
    let mut q = dev.open_queue(0).expect("queue");
    // 4 KiB-aligned buffer.
    let mut storage = vec![0u8; 8192];
    let start = storage.as_ptr().align_offset(4096);
    let buf = &mut storage[start..start + 4096];
    buf.copy_from_slice(data);
    let seg = [IoSegment {
        addr: buf.as_mut_ptr(),
        len: 4096,
    }];
    for (op, segments) in [(op, &seg[..]), (IoOp::Flush, &[][..])] {
        let len_bytes = if op == IoOp::Flush { 0 } else { 4096 };
        let offset_bytes = if op == IoOp::Flush { 0 } else { offset };
        let req = IoRequest {
            op,
            offset_bytes,
            len_bytes,
            segments,
            tag: 1,
        };
        // SAFETY: the buffer outlives the request: we wait for its completion.
        unsafe { q.submit(&req) }.expect("submit");
        let mut result = None;
        while result.is_none() {
            q.poll(&mut |c| result = Some(c.result));
        }
        result.expect("completed").expect("engine I/O");
    }
    data.copy_from_slice(buf);
}

fn block(seed: u64) -> [u8; 4096] {
    let mut b = [0u8; 4096];
    for (i, x) in b.iter_mut().enumerate() {
        *x = (seed.wrapping_mul(131) as usize + i * 7) as u8;
    }
    b
}

/// A raw HTTP/1.1 request; (status, body).
fn http(addr: SocketAddr, method: &str, path: &str, token: &str, body: &str) -> (u16, String) {
    http_as(addr, method, path, &format!("Bearer {token}"), body)
}

/// [`http`] with `authorization` as the whole Authorization header value.
fn http_as(
    addr: SocketAddr,
    method: &str,
    path: &str,
    authorization: &str,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("response");
    let status = resp
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {resp:?}"));
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

fn put_route(n: &Node, t: &RouteTable) -> (u16, String) {
    let json = serde_json::to_string(t).expect("json");
    http(n.admin_addr(), "PUT", "/v1/route", TOKEN, &json)
}

fn peer(id: u32) -> NodeInfo {
    NodeInfo {
        id,
        data_addr: format!("127.0.0.1:{}", 1000 + id),
        admin_addr: format!("127.0.0.1:{}", 2000 + id),
        shards: 2,
        domain: format!("host{id}"),
        up: true,
    }
}

fn wait_chunks(n: &Node, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while n.allocated_chunks() != want {
        assert!(
            Instant::now() < deadline,
            "{} chunks, want {want}",
            n.allocated_chunks()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tables_the_control_service_could_not_make_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("node1.img");
    format(&disk);
    for c in 0..DATA_CHUNKS {
        engine_io(&disk, IoOp::Write, c * CHUNK_BYTES, &mut block(c));
    }
    let node = start_node(&disk, &dir.path().join("state"));
    let me = NodeInfo {
        data_addr: node.data_addr().to_string(),
        admin_addr: node.admin_addr().to_string(),
        ..peer(1)
    };
    // Three nodes, three replicas: node 1 holds every partition.
    let t = RouteTable::initial(vec![me, peer(2), peer(3)], 4, 3, CHUNK_BYTES).expect("table");
    assert_eq!(put_route(&node, &t).0, 200, "a good table is installed");
    wait_chunks(&node, DATA_CHUNKS as usize);

    let next = |f: &dyn Fn(&mut RouteTable)| {
        let mut b = t.clone();
        b.epoch += 1;
        f(&mut b);
        b
    };
    let ghosts = [97, 98, 99].map(Member::in_sync);
    let bad: Vec<(&str, RouteTable, &str)> = vec![
        (
            "members that do not exist",
            next(&|b| {
                b.partitions
                    .iter_mut()
                    .for_each(|p| p.members = ghosts.to_vec())
            }),
            "not among the table's nodes",
        ),
        (
            "epoch 2^63",
            next(&|b| b.epoch = 1 << 63),
            "ahead of this node's epoch",
        ),
        (
            "epoch just past the bound",
            next(&|b| b.epoch = t.epoch + 1_000_001),
            "ahead of this node's epoch",
        ),
        (
            "fewer partitions",
            next(&|b| {
                b.partition_bits -= 1;
                b.partitions.truncate(8);
            }),
            "only changes by splits",
        ),
        (
            "two splits in one epoch",
            next(&|b| {
                b.partition_bits += 2;
                let p = b.partitions.clone();
                (0..3).for_each(|_| b.partitions.extend(p.iter().cloned()));
            }),
            "only changes by splits",
        ),
        (
            "partition list shorter than the count",
            next(&|b| {
                b.partitions.pop();
            }),
            "partitions listed",
        ),
        (
            "a member twice",
            next(&|b| b.partitions[0].members[1].node = b.partitions[0].members[0].node),
            "twice",
        ),
        (
            "nodes out of order",
            next(&|b| b.nodes.swap(1, 2)),
            "increasing id",
        ),
        (
            "no replicas (validate)",
            next(&|b| b.replicas = 0),
            "replicas",
        ),
    ];
    for (what, table, why) in &bad {
        let (status, body) = put_route(&node, table);
        println!("{what}: {status} {body}");
        assert_eq!(status, 400, "{what}");
        assert!(body.contains(why), "{what}: {body}");
    }
    let (status, body) = http(node.admin_addr(), "PUT", "/v1/route", "wrong", "{}");
    assert_eq!(status, 401, "wrong token: {body}");
    let (status, _) = http(
        node.admin_addr(),
        "PUT",
        "/v1/route",
        TOKEN,
        "{\"epoch\": 5",
    );
    assert_eq!(status, 400, "not JSON");
    assert_eq!(node.epoch(), t.epoch, "nothing refused was installed");

    // What the control service does make: a split, then a table far ahead
    // but within the bound.
    let split = t.split().expect("split");
    assert_eq!(put_route(&node, &split).0, 200, "a split");
    let mut ahead = split.clone();
    ahead.epoch += 1_000_000;
    assert_eq!(put_route(&node, &ahead).0, 200, "within the bound");
    assert_eq!(node.epoch(), ahead.epoch);

    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        node.allocated_chunks(),
        DATA_CHUNKS as usize,
        "no chunk released"
    );
    let (_, status) = http(node.admin_addr(), "GET", "/v1/status", "", "");
    assert!(!status.contains(TOKEN), "the status says nothing secret");
    // The layer usage query (celer snapshot list): token, JSON and size
    // checked; a real answer counts this node's chunks of volume 1.
    let usage =
        |token: &str, body: &str| http(node.admin_addr(), "POST", "/v1/layers/usage", token, body);
    assert_eq!(usage("wrong", "[[1,0]]").0, 401);
    assert_eq!(usage(TOKEN, "[[1,").0, 400, "not JSON");
    assert_eq!(usage(TOKEN, "[[1,2,3]]").0, 400, "not pairs");
    let many = format!("[{}[1,0]]", "[1,0],".repeat(5000));
    assert_eq!(usage(TOKEN, &many).0, 400, "too many queries");
    let (status, body) = usage(TOKEN, "[[1,0],[99,0]]");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!("[{DATA_CHUNKS},0]")),
        "volume 1's chunks, none of volume 99: {body}"
    );
    node.stop().expect("clean stop");
    for c in 0..DATA_CHUNKS {
        let mut got = [0u8; 4096];
        engine_io(&disk, IoOp::Read, c * CHUNK_BYTES, &mut got);
        assert!(got == block(c), "chunk {c} still holds its data");
    }
    println!(
        "{} bad tables refused with 400; {DATA_CHUNKS} chunks still allocated and read back intact",
        bad.len()
    );
}

/// Raises this process's open-file limit to its hard limit if needed:
/// the test holds a thousand client sockets.
fn raise_nofile(want: u64) {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut l), 0);
        if l.rlim_cur < want {
            l.rlim_cur = want.min(l.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &l), 0, "setrlimit");
        }
    }
}

/// The scrub's controls take an admin ticket that the control service signs
/// with the data key, or the cluster token: an operator's own token, a
/// forged ticket, an expired one, a tampered one and none at all are
/// refused (401, the scrub stays as it was); a valid ticket starts a pass
/// and pauses the scrub.
#[test]
fn scrub_controls_take_an_admin_ticket_and_refuse_anything_else() {
    use celer_proto::auth::{data_key_from_secret, AdminTicket};
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.img");
    format(&disk);
    let n = start_node(&disk, dir.path());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let key = data_key_from_secret(TOKEN);
    let good = AdminTicket::mint(&key, "ops", now + 60_000);
    let mut tampered = good.clone();
    // A later expiry in the ticket's first byte: the MAC no longer matches.
    tampered.replace_range(0..2, "ff");
    let refused = [
        ("no credential", String::new()),
        ("an operator's own token", "Bearer ops-secret".to_string()),
        (
            "a ticket from another cluster",
            format!(
                "Celer-Ticket {}",
                AdminTicket::mint(&data_key_from_secret("other"), "ops", now + 60_000)
            ),
        ),
        (
            "an expired ticket",
            format!("Celer-Ticket {}", AdminTicket::mint(&key, "ops", now - 1)),
        ),
        ("a tampered ticket", format!("Celer-Ticket {tampered}")),
        ("garbage", "Celer-Ticket not-hex".to_string()),
    ];
    for (what, auth) in &refused {
        let (code, body) = http_as(n.admin_addr(), "POST", "/v1/scrub/pause", auth, "");
        assert_eq!(code, 401, "{what}: {body}");
        let (_, status) = http(n.admin_addr(), "GET", "/v1/scrub", "", "");
        assert!(
            status.contains("\"paused\":false"),
            "{what} paused the scrub: {status}"
        );
    }
    let auth = format!("Celer-Ticket {good}");
    let (code, body) = http_as(n.admin_addr(), "POST", "/v1/scrub/start", &auth, "");
    assert_eq!(code, 200, "{body}");
    let (code, body) = http_as(n.admin_addr(), "POST", "/v1/scrub/pause", &auth, "");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"paused\":true"), "{body}");
    // The control service's own credential still works.
    let (code, body) = http(n.admin_addr(), "POST", "/v1/scrub/resume", TOKEN, "");
    assert_eq!(code, 200, "{body}");
    n.stop().expect("node stops");
}

#[test]
fn half_sent_requests_do_not_stop_the_admin_server() {
    raise_nofile(4096);
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("node1.img");
    format(&disk);
    let node = start_node(&disk, &dir.path().join("state"));
    let addr = node.admin_addr();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let attackers = 1000;
    let t0 = Instant::now();
    let waits: Vec<_> = (0..attackers)
        .map(|_| {
            rt.spawn(half_sent_request(
                "127.0.0.2:0".parse().expect("addr"),
                addr,
            ))
        })
        .collect();
    // Meanwhile, a normal client from 127.0.0.1 keeps being answered.
    let mut lat_ms = Vec::new();
    while t0.elapsed() < Duration::from_secs(3) {
        let t = Instant::now();
        let (status, body) = http(addr, "GET", "/v1/status", "", "");
        lat_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(status, 200, "{body}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let closed: Vec<(usize, f64)> = rt.block_on(async {
        let mut v = Vec::new();
        for w in waits {
            v.push(w.await.expect("task"));
        }
        v
    });
    report_and_check(&closed, &mut lat_ms, Duration::from_secs(10), 64);
    node.stop().expect("clean stop");
}

/// Connects from `from`, sends half a request, and waits for the server to
/// close: (bytes received, seconds from connected to closed).
async fn half_sent_request(from: SocketAddr, to: SocketAddr) -> (usize, f64) {
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.bind(from).expect("bind 127.0.0.2");
    let s = s.connect(to).await.expect("connect");
    let t0 = Instant::now();
    // A few bytes fit any socket buffer; the server may have closed it
    // already (over a cap), which the read below sees.
    let _ = s.try_write(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n");
    let mut got = 0;
    let mut b = [0u8; 512];
    let wait = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if s.readable().await.is_err() {
                break;
            }
            match s.try_read(&mut b) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
        }
    });
    wait.await.expect("the server closed the half-sent request");
    (got, t0.elapsed().as_secs_f64())
}

fn report_and_check(closed: &[(usize, f64)], lat_ms: &mut [f64], timeout: Duration, held: usize) {
    lat_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| lat_ms[((lat_ms.len() - 1) as f64 * p).round() as usize];
    let late: Vec<f64> = closed.iter().map(|c| c.1).filter(|&s| s > 1.0).collect();
    let early = closed.len() - late.len();
    let (lo, hi) = late
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &s| (lo.min(s), hi.max(s)));
    println!(
        "{} half-sent requests from 127.0.0.2: {early} closed at accept (within 1 s), {} held and closed {lo:.2}..{hi:.2} s after connecting (header timeout {} s)",
        closed.len(),
        late.len(),
        timeout.as_secs_f64()
    );
    println!(
        "GET /v1/status from 127.0.0.1 meanwhile: {} requests, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat_ms.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    assert_eq!(late.len(), held, "the per-source cap holds this many");
    let t = timeout.as_secs_f64();
    assert!(
        lo >= t - 0.1 && hi < t + 2.0,
        "closed at the header timeout"
    );
}
