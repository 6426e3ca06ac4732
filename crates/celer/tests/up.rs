//! `celer up` as a user runs it: a child process; qemu-io writes and reads a
//! pattern over its NBD export; `celer status --json` shows 3 healthy nodes;
//! Ctrl-C stops it cleanly; a second `celer up` finds the data again.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_celer");

/// A base port with the 300 ports above it free (best effort).
fn base_port() -> u16 {
    for _ in 0..50 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let p = l.local_addr().expect("addr").port();
        drop(l);
        if p < 60000
            && [0u16, 101, 102, 103, 201, 202, 203]
                .iter()
                .all(|o| TcpListener::bind(("127.0.0.1", p + o)).is_ok())
        {
            return p;
        }
    }
    panic!("no free port range");
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
    stop(up);

    // A second `celer up` reuses the data.
    let up = start(dir.path(), port);
    qemu_io(&uri, &["read -P 0xa7 4096 1M"]);
    stop(up);
}
