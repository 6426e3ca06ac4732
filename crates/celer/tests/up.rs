//! `celer up` as a user runs it: a child process; qemu-io writes and reads a
//! pattern over its NBD export; `celer status --json` shows 3 healthy nodes;
//! Ctrl-C stops it cleanly; a second `celer up` finds the data again.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use celer_vhost::frontend::{req_type, Frontend, FrontendConfig};
use support::up::{base_port, Up, BIN};

/// `GET http://addr/metrics`, checked as Prometheus/OpenMetrics text: every
/// line is a `# HELP`/`# TYPE`/`# UNIT` comment, `# EOF` (last), or a
/// sample `name{labels} value` whose family was declared by `# TYPE`.
/// Returns the samples (name with labels → value).
fn scrape(addr: &str) -> std::collections::HashMap<String, f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("no /metrics answer from {addr}: {e}"));
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "{head}"
    );
    let mut families = std::collections::HashSet::new();
    let mut samples = std::collections::HashMap::new();
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "exposition ends with # EOF");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let name = it.next().expect("family name");
            let kind = it.next().expect("family type");
            assert!(
                [
                    "counter",
                    "gauge",
                    "histogram",
                    "summary",
                    "info",
                    "unknown",
                    "stateset",
                    "gaugehistogram"
                ]
                .contains(&kind),
                "{line}"
            );
            families.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment: {line}");
        let (name_labels, value) = line.rsplit_once(' ').expect("sample: name value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("sample value in {line}"));
        let name = name_labels.split('{').next().expect("name");
        if name_labels.contains('{') {
            assert!(name_labels.ends_with('}'), "labels closed: {line}");
        }
        let family = ["_total", "_bucket", "_count", "_sum", "_created"]
            .iter()
            .find_map(|suf| name.strip_suffix(suf))
            .filter(|f| families.contains(*f))
            .unwrap_or(name);
        assert!(
            families.contains(family),
            "sample of an undeclared family: {line}"
        );
        samples.insert(name_labels.to_string(), value);
    }
    samples
}

fn sum_where(
    samples: &std::collections::HashMap<String, f64>,
    prefix: &str,
    needles: &[&str],
) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| k.starts_with(prefix) && needles.iter().all(|n| k.contains(n)))
        .map(|(_, v)| v)
        .sum()
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = c.arg(uri).output().expect("run qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-io failed: {text}");
    text
}

#[test]
fn celer_up_serves_a_replicated_volume_over_nbd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = base_port();
    let up = Up::start_at(dir.path(), port, "256M");
    let uri = format!(
        "nbd+unix:///default?socket={}",
        dir.path().join("nbd.sock").display()
    );
    let w = qemu_io(&uri, &["write -P 0xa7 4096 1M", "read -P 0xa7 4096 1M"]);
    assert!(!w.contains("Pattern verification failed"), "{w}");
    // A wrong pattern must fail (the check is real).
    let bad = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x11 4096 4096"])
        .arg(&uri)
        .output()
        .expect("qemu-io");
    let text =
        String::from_utf8_lossy(&bad.stdout).to_string() + &String::from_utf8_lossy(&bad.stderr);
    assert!(text.contains("Pattern verification failed"), "{text}");

    let token_file = dir.path().join("token");
    let status = Command::new(BIN)
        .args([
            "status",
            "--wait",
            "30",
            "--json",
            "--meta",
            &format!("http://127.0.0.1:{port}"),
            "--token-file",
        ])
        .arg(&token_file)
        .output()
        .expect("celer status");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert_eq!(s["nodes_up"], 3, "{s}");
    assert_eq!(s["nodes_down"], 0, "{s}");
    assert_eq!(s["partitions_in_sync"], s["partitions"], "{s}");

    // Metrics of every daemon parse as Prometheus text and count the I/O.
    let volume = scrape(&format!("127.0.0.1:{}", port + 1));
    assert!(
        sum_where(
            &volume,
            "celer_volume_requests_total",
            &["op=\"write\"", "result=\"ok\""]
        ) >= 1.0,
        "{volume:?}"
    );
    assert!(
        sum_where(
            &volume,
            "celer_volume_request_seconds_count",
            &["op=\"read\""]
        ) >= 1.0
    );
    assert!(sum_where(&volume, "celer_volume_route_epoch", &[]) >= 1.0);
    let mut node_writes = 0.0;
    for i in 0..3 {
        let node = scrape(&format!("127.0.0.1:{}", port + 201 + i));
        assert!(
            sum_where(&node, "celer_node_route_epoch", &[]) >= 1.0,
            "{node:?}"
        );
        node_writes += sum_where(
            &node,
            "celer_node_requests_total",
            &["op=\"write", "result=\"ok\""],
        );
    }
    assert!(
        node_writes >= 3.0,
        "every replica counted writes: {node_writes}"
    );
    let meta = scrape(&format!("127.0.0.1:{port}"));
    assert!(!meta.is_empty());
    scrub_every_node(port, &token_file);

    grow_online(&up, &uri);
    up.stop();

    // A second `celer up` reuses the data, at the new size.
    let up = Up::start_at(dir.path(), port, "256M");
    qemu_io(&uri, &["read -P 0xa7 4096 1M", "read -P 0x5c 300M 64k"]);
    up.stop();
}

/// `celer scrub start` on every node of the cluster, then `celer scrub
/// status --json` until each node finished a pass that read the 1 MiB
/// written (3 replicas: every node holds it); none finds a damaged block.
fn scrub_every_node(port: u16, token_file: &std::path::Path) {
    let meta = format!("http://127.0.0.1:{port}");
    let celer = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .args(["--meta", &meta, "--token-file"])
            .arg(token_file)
            .output()
            .expect("celer scrub");
        assert!(
            out.status.success(),
            "celer {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let started = celer(&["scrub", "start"]);
    assert_eq!(started.matches("node ").count(), 3, "{started}");
    let t = Instant::now();
    loop {
        let out = celer(&["scrub", "status", "--json"]);
        let nodes: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).expect("status JSON"))
            .collect();
        assert_eq!(nodes.len(), 3, "{out}");
        let done = nodes
            .iter()
            .all(|n| n["passes"].as_u64() >= Some(1) && n["bytes"].as_u64() >= Some(1 << 20));
        if done {
            for n in &nodes {
                assert_eq!(n["damaged_blocks"], 0, "{n}");
            }
            println!("scrub pass on 3 nodes in {:?}", t.elapsed());
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no scrub pass: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = celer(&["scrub", "status"]);
    assert_eq!(
        text.lines()
            .filter(|l| l.contains(": idle, 1 passes") && l.contains("0 damaged blocks found"))
            .count(),
        3,
        "{text}"
    );
    // `celer status` sums them up.
    let text = celer(&["status"]);
    assert!(
        text.contains("scrub:      3 of 3 nodes answered: 0 running, 1 passes done per node, 0 damaged blocks found"),
        "{text}"
    );
    // A wrong token cannot start or pause it.
    let bad = Command::new(BIN)
        .args(["scrub", "pause", "--meta", &meta, "--token", "wrong"])
        .output()
        .expect("celer scrub pause");
    assert!(!bad.status.success(), "a wrong token paused the scrub");
}

/// CPU time of each `vring_worker` thread of process `pid` (schedstat, ns).
fn vring_workers_cpu(pid: u32) -> Vec<(String, Duration)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks of celer up") {
        let dir = task.expect("task").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != "vring_worker" {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(dir.join("schedstat")) else {
            continue; // exited meanwhile
        };
        let ns: u64 = stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .expect("schedstat");
        out.push((dir.display().to_string(), Duration::from_nanos(ns)));
    }
    out.sort();
    out
}

/// A cluster volume's vhost-user queue workers sleep when the front end
/// is connected but idle: the workers of `celer up` (and the client queues
/// they drive) use next to no CPU over a second.
fn idle_workers_use_no_cpu(pid: u32) {
    std::thread::sleep(Duration::from_millis(100));
    let before = vring_workers_cpu(pid);
    assert!(!before.is_empty(), "celer up has no vring_worker thread");
    std::thread::sleep(Duration::from_secs(1));
    let after = vring_workers_cpu(pid);
    let mut used = Duration::ZERO;
    for (task, t) in &after {
        if let Some((_, b)) = before.iter().find(|(k, _)| k == task) {
            used += t.saturating_sub(*b);
        }
    }
    println!(
        "idle cluster-volume workers ({}) used {used:?} of CPU in 1 s",
        after.len()
    );
    assert!(
        used < Duration::from_millis(20),
        "idle vhost-user workers of a cluster volume used {used:?} of CPU in 1 s"
    );
}

/// `celer volume resize` while a vhost-user front end is attached: within a
/// few seconds the front end gets a config change message, re-reads the
/// config space and finds the new capacity, and I/O past the old end works
/// through it; a new NBD connection sees the new size too.
fn grow_online(up: &Up, nbd_uri: &str) {
    const OLD: u64 = 256 << 20;
    const NEW: u64 = 512 << 20;
    let cfg = FrontendConfig {
        queues: 1,
        queue_size: 64,
        slots: 4,
        buf_bytes: 64 << 10,
        event_idx: true,
        backend_req: true,
    };
    let mut fe = Frontend::connect(&up.vhost_socket(), &cfg).expect("vhost-user connect");
    assert_eq!(fe.capacity_sectors(), Some(OLD / 512));
    let past_old_end = (OLD + (4 << 20)) / 512;
    up.volume_ok(&["resize", "default", "--size", "512M"]);
    let t = Instant::now();
    let mut changes = 0;
    while changes == 0 && t.elapsed() < Duration::from_secs(15) {
        changes = fe
            .wait_config_change(Duration::from_millis(500))
            .expect("back-end channel");
    }
    assert_eq!(changes, 1, "no config change within 15 s of the resize");
    println!(
        "config change {:.2} s after the resize",
        t.elapsed().as_secs_f64()
    );
    fe.refresh_config().unwrap();
    assert_eq!(fe.capacity_sectors(), Some(NEW / 512));
    {
        // (Queues are set up once per connection: their ring indices start
        // at 0.)
        let mut qs = fe.queues().expect("queues");
        let (status, _) = qs[0].request(0, req_type::OUT, past_old_end, 4096).unwrap();
        assert_eq!(status, 0, "a write past the old end works after the resize");
        let (status, _) = qs[0].request(1, req_type::IN, NEW / 512, 4096).unwrap();
        assert_eq!(status, 1, "a read past the new end fails");
        for i in 0..50 {
            let (status, _) = qs[0].request(2, req_type::IN, i * 8, 4096).unwrap();
            assert_eq!(status, 0);
        }
        idle_workers_use_no_cpu(up.pid());
    }
    drop(fe);
    // NBD: a new connection is exported at the new size.
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", nbd_uri])
        .output()
        .expect("qemu-img info");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("qemu-img info: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(info["virtual-size"], NEW, "{info}");
    let w = qemu_io(
        nbd_uri,
        &["write -P 0x5c 300M 64k", "read -P 0x5c 300M 64k"],
    );
    assert!(!w.contains("Pattern verification failed"), "{w}");
}
