//! System test: a real QEMU (TCG) boots a real Linux guest whose disk is a
//! Celer vhost-user-blk volume on the file device (2 queues); see
//! support/guest_system.rs for the scenario. Skipped when CELER_SKIP_SLOW=1
//! (CI never sets it).

#[path = "support/guest_system.rs"]
mod guest_system;
#[path = "support/migration.rs"]
#[allow(dead_code)] // migrate_peer_guest is the cluster test's
mod migration;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use guest_system::{build_guest, run_guest_system_test, skip_slow, spawn_backend, spawn_guest};
use migration::{migrate_guest, MigrationRun};

#[test]
fn linux_guest_fio_verify_ext4_and_backend_restart() {
    if skip_slow() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let start = |socket: &Path, log: &Path| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_celer-vhost"));
        cmd.args(["serve", "--socket"])
            .arg(socket)
            .arg("--device")
            .arg(format!("file:{}", disk.display()));
        cmd.args(["--queues", "2"]);
        spawn_backend(cmd, socket, log)
    };
    run_guest_system_test(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
        dir.path(),
        &start,
        // A file's writes sit in the host's cache until a flush.
        "write back",
    );
}

/// Kills of the back end while the guest's fio has requests in flight.
const KILLS: usize = 20;
/// Time between a back end's front end connecting and its kill (I/O flows).
const KILL_EVERY: Duration = Duration::from_millis(1500);

/// One back end process's part of the shared log: the heads it resubmitted
/// ((queue, head) → counter) and how often it completed each.
#[derive(Debug, Default)]
struct Incarnation {
    resubmitted: Vec<(u16, u16, u64)>,
    completed: HashMap<(u16, u16), usize>,
}

/// `key=value` of a tracing line (quotes trimmed).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .map(|v| v.trim_matches('"'))
}

fn incarnations(log: &str) -> Vec<Incarnation> {
    let mut out: Vec<Incarnation> = Vec::new();
    for line in log.lines() {
        if line.contains("vhost-user-blk back end ready") {
            out.push(Incarnation::default());
        }
        let Some(cur) = out.last_mut() else { continue };
        let queue = || field(line, "queue").and_then(|q| q.parse::<u16>().ok());
        if line.contains("resubmitting in-flight requests") {
            let q = queue().expect("queue field");
            for hc in field(line, "heads")
                .unwrap_or("")
                .split(',')
                .filter(|s| !s.is_empty())
            {
                let (h, c) = hc.split_once(':').expect("head:counter");
                cur.resubmitted
                    .push((q, h.parse().unwrap(), c.parse().unwrap()));
            }
        } else if line.contains("resubmitted request completed") {
            let q = queue().expect("queue field");
            let h: u16 = field(line, "head").unwrap().parse().unwrap();
            *cur.completed.entry((q, h)).or_insert(0) += 1;
        }
    }
    out
}

/// A real Linux guest (TCG, 2 vCPUs, 2 queues) runs fio with verify at
/// queue depth 16 per queue while the host kills `celer-vhost serve` with
/// SIGKILL and restarts it on the same socket within 1 s, 20 times (its
/// file device reports completions 1 ms late, `delay:`, so that each kill
/// finds requests in flight, as it would on a real disk): fio
/// finds no error, the guest does not hang, and the back ends' logs show
/// each request found in flight resubmitted and completed exactly once.
#[test]
fn linux_guest_fio_survives_backend_kills_with_requests_in_flight() {
    if skip_slow() {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    build_guest(&repo);
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let socket = dir.path().join("vhost.sock");
    let log = dir.path().join("backend.log");
    let start = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_celer-vhost"));
        cmd.args(["serve", "--socket"])
            .arg(&socket)
            .arg("--device")
            // Completions 1 ms late: the back end always has requests in
            // flight while fio runs, so every kill tests resubmission
            // (a file in the page cache completes in microseconds, and
            // kills at fixed times found requests in flight only 2-12
            // times in 20, depending on the machine's load).
            .arg(format!("delay:{KILLS_DELAY_US}:file:{}", disk.display()))
            .args(["--queues", "2"])
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info");
        spawn_backend(cmd, &socket, &log)
    };
    let connected = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("front end connected")
            .count()
    };
    let out = dir.path().join("out");
    let console = out.join("console.log");
    let mut backend = start();
    let mut guest = spawn_guest(
        &repo,
        &socket,
        2,
        &repo.join("crates/celer-vhost/tests/guest/kills.sh"),
        &out,
        KILLS_GUEST_TIMEOUT_S,
    );
    let console_has = |what: &str| {
        std::fs::read_to_string(&console)
            .map(|c| c.contains(what))
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(KILLS_GUEST_TIMEOUT_S + 60);
    while !console_has("CELER-KILLS-START") {
        assert!(
            guest.0.try_wait().unwrap().is_none(),
            "guest ended before fio started"
        );
        assert!(Instant::now() < deadline, "guest did not start fio");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut restart_ms = Vec::new();
    for kill in 0..KILLS {
        let before = connected();
        std::thread::sleep(KILL_EVERY);
        assert!(
            !console_has("CELER-FIO-DONE"),
            "fio ended after {kill} kills: make its runtime longer"
        );
        let t0 = Instant::now();
        drop(backend); // SIGKILL, reaped
        let _ = std::fs::remove_file(&socket);
        backend = start(); // returns once the new back end listens
        restart_ms.push(t0.elapsed().as_millis());
        // QEMU (reconnect=1) finds the new back end within about a second.
        let wait = Instant::now() + Duration::from_secs(15);
        while connected() <= before {
            assert!(
                Instant::now() < wait,
                "QEMU did not reconnect after kill {kill}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let status = loop {
        if let Some(status) = guest.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "guest run did not end");
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(backend);
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let console_text = read("console.log");
    let context = format!(
        "\n--- console (end) ---\n{}\n--- fio ---\n{}\n--- dmesg ---\n{}",
        console_text
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n"),
        read("fio-kills.txt"),
        read("dmesg.txt"),
    );
    assert!(status.success(), "guest run failed{context}");
    assert!(console_text.contains("CELER-KILLS-OK"), "{context}");
    let fio = read("fio-kills.txt");
    assert_eq!(fio.matches("err= 0").count(), 2, "fio errors{context}");
    let dmesg = read("dmesg.txt");
    for bad in [
        "I/O error",
        "is not a head",
        "blk_update_request",
        "hung_task",
    ] {
        assert!(
            !dmesg.lines().any(|l| l.contains(bad)),
            "guest kernel reported {bad:?}{context}"
        );
    }
    assert_eq!(
        read("inflight.txt").split_whitespace().collect::<Vec<_>>(),
        ["0", "0"]
    );
    assert!(
        restart_ms.iter().all(|&ms| ms < 1000),
        "restarts took {restart_ms:?} ms"
    );
    // Counters: every incarnation completed each head it resubmitted exactly
    // once (heads are resubmitted right after the restart; the next kill
    // comes seconds later).
    let incs = incarnations(&log_text);
    assert_eq!(incs.len(), KILLS + 1, "back end incarnations in the log");
    let mut resubmitted = 0;
    let mut found_inflight = 0;
    for (i, inc) in incs.iter().enumerate() {
        resubmitted += inc.resubmitted.len();
        found_inflight += usize::from(!inc.resubmitted.is_empty());
        for &(q, h, c) in &inc.resubmitted {
            assert_eq!(
                inc.completed.get(&(q, h)),
                Some(&1),
                "incarnation {i}: queue {q} head {h} (counter {c}) resubmitted, completed {:?} times",
                inc.completed.get(&(q, h))
            );
        }
        let done: usize = inc.completed.values().sum();
        assert_eq!(done, inc.resubmitted.len(), "incarnation {i}: {inc:?}");
    }
    eprintln!(
        "{KILLS} kills: {found_inflight} found requests in flight, {resubmitted} resubmitted and completed once each; restart (kill to listening) {restart_ms:?} ms"
    );
    // With completions held 1 ms, a kill finds requests in flight unless
    // fio is between phases.
    assert!(
        found_inflight >= KILLS * 3 / 4,
        "only {found_inflight} of {KILLS} kills found requests in flight"
    );
}

/// How late the kill test's back end reports completions, in µs.
const KILLS_DELAY_US: u64 = 1000;

/// Guest run limit for the kill test: boot (~30 s) + fio (75 s) + slack.
const KILLS_GUEST_TIMEOUT_S: u64 = 300;

/// Live migration of a running Linux guest between two QEMU processes, each
/// with its own `celer-vhost serve` of the same file, with fio verify
/// running across it (support/migration.rs). The cluster-volume variant,
/// with ownership hand-off and the qemu-storage-daemon baseline, is
/// crates/celer/tests/cluster_guest.rs.
#[test]
fn linux_guest_live_migrates_with_fio_verify() {
    if skip_slow() {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    build_guest(&repo);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disk = d.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let start = |name: &str| {
        let socket = d.join(format!("{name}.sock"));
        let log = d.join(format!("{name}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_celer-vhost"));
        cmd.args(["serve", "--socket"])
            .arg(&socket)
            .arg("--device")
            // Completions 1 ms late: the back end always has requests in
            // flight while fio runs, so every kill tests resubmission
            // (a file in the page cache completes in microseconds, and
            // kills at fixed times found requests in flight only 2-12
            // times in 20, depending on the machine's load).
            .arg(format!("delay:{KILLS_DELAY_US}:file:{}", disk.display()))
            .args(["--queues", "2"])
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info");
        let backend = spawn_backend(cmd, &socket, &log);
        (backend, socket, log)
    };
    let (src, src_sock, src_log) = start("src");
    let (dst, dst_sock, dst_log) = start("dst");
    let m = migrate_guest(
        &repo,
        d,
        &MigrationRun {
            label: "celer-vhost file device",
            src_disk: format!("vhost:{},queues=2", src_sock.display()),
            dst_disk: format!("vhost:{},queues=2", dst_sock.display()),
            logs: vec![
                ("source back end", src_log.clone()),
                ("destination back end", dst_log),
            ],
        },
    );
    let src_text = std::fs::read_to_string(&src_log).unwrap_or_default();
    assert!(src_text.contains("dirty logging on"), "{}", m.context);
    assert!(src_text.contains("every ring stopped"), "{}", m.context);
    drop((src, dst));
    eprintln!(
        "migration downtime (file device): {} ms (total {} ms, {} KiB of RAM sent in the downtime, {} dirty-log syncs)",
        m.downtime_ms,
        m.total_ms,
        m.downtime_bytes >> 10,
        m.dirty_syncs
    );
}
