//! `celer up` as a user runs it: a child process; qemu-io writes and reads a
//! pattern over its NBD export; `celer status --json` shows 3 healthy nodes;
//! Ctrl-C stops it cleanly; a second `celer up` finds the data again.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_celer");

/// A base port whose ports used by `celer up` (+0, +1, +101..103,
/// +201..203, +299) are free, below the kernel's ephemeral range (32768+),
/// so tests that bind port 0 in parallel cannot take them.
fn base_port() -> u16 {
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0);
    for k in 0..200u64 {
        let p = 20000 + ((seed.wrapping_mul(2654435761).wrapping_add(k * 7919)) % 12000) as u16;
        let offsets = [0u16, 1, 101, 102, 103, 201, 202, 203, 299];
        if offsets
            .iter()
            .all(|o| TcpListener::bind(("127.0.0.1", p + o)).is_ok())
        {
            return p;
        }
    }
    panic!("no free port range below 32768");
}

fn start(dir: &std::path::Path, port: u16) -> Child {
    let mut child = Command::new(BIN)
        .args(["up", "--size", "256M", "--dir"])
        .arg(dir)
        .args(["--base-port", &port.to_string()])
        .args(["--nbd-listen", &format!("127.0.0.1:{}", port + 299)])
        .env("CELER_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn celer up");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("celer up: {line}");
            if line.contains("Press Ctrl-C") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("celer up is ready");
    child
}

fn stop(mut child: Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            assert!(s.success(), "celer up exited with {s}");
            return;
        }
        assert!(Instant::now() < deadline, "celer up did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    }
}

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
    let up = start(dir.path(), port);
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
    stop(up);

    // A second `celer up` reuses the data.
    let up = start(dir.path(), port);
    qemu_io(&uri, &["read -P 0xa7 4096 1M"]);
    stop(up);
}
