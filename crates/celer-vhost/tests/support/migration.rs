//! The live-migration guest scenario, shared by the tests that run it (a
//! file device in celer-vhost, a cluster volume with ownership hand-off in
//! celer): a real Linux guest (QEMU TCG, 512 MiB, 2 vCPUs, 2 virtqueues)
//! runs fio with crc32c verify (tests/guest/migrate.sh) while the host
//! live-migrates it over a Unix socket to a second QEMU, whose disk is
//! served by its own back end; the guest finishes on the destination. The
//! back ends are the caller's: it names each side's disk as run-guest.sh
//! takes it. Bounded by MIGRATION_GUEST_TIMEOUT_S.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::guest_system::KillOnDrop;

/// Guest run limit for a migration run: boot + 30 s fio + migration + final
/// verify.
pub const MIGRATION_GUEST_TIMEOUT_S: u64 = 300;

/// Time fio runs on the source before the migration starts (requests in
/// flight, pages dirtied).
const FIO_BEFORE_MIGRATION: Duration = Duration::from_secs(8);

/// A QMP client (one command at a time; events are skipped).
pub struct Qmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(60);
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "no QMP on {}: {e}",
                        path.display()
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("QMP read timeout");
        let mut q = Qmp {
            reader: std::io::BufReader::new(stream.try_clone().expect("QMP stream")),
            writer: stream,
        };
        q.line(); // greeting
        q.execute("qmp_capabilities", serde_json::json!({}));
        q
    }

    fn line(&mut self) -> serde_json::Value {
        use std::io::BufRead;
        let mut l = String::new();
        let n = self.reader.read_line(&mut l).expect("QMP read");
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad QMP line {l:?}: {e}"))
    }

    /// Asks QEMU to quit, ignoring a QEMU that is already gone. Waits for
    /// its answer or for QEMU closing the socket: QEMU drops the commands
    /// queued on a QMP connection its client closed, so a quit sent just
    /// before our end closes may never run (seen: a source QEMU left in
    /// `postmigrate` until run-guest.sh's 300 s timeout killed it).
    pub fn quit(&mut self) {
        use std::io::{BufRead, Write};
        let msg = format!("{}\n", serde_json::json!({"execute": "quit"}));
        if self.writer.write_all(msg.as_bytes()).is_err() {
            return;
        }
        loop {
            let mut l = String::new();
            match self.reader.read_line(&mut l) {
                Ok(0) | Err(_) => return,
                Ok(_) if l.contains("\"return\"") || l.contains("\"error\"") => return,
                Ok(_) => {}
            }
        }
    }

    pub fn execute(&mut self, cmd: &str, args: serde_json::Value) -> serde_json::Value {
        use std::io::Write;
        let msg = serde_json::json!({"execute": cmd, "arguments": args});
        writeln!(self.writer, "{msg}").expect("QMP write");
        loop {
            let v = self.line();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            assert!(v.get("error").is_none(), "QMP {cmd} failed: {v}");
        }
    }
}

/// One migration run: what each side's disk is (run-guest.sh `--disk`
/// specs; for `vhost:` the caller's back ends listen already) and the
/// logs to show when it fails.
pub struct MigrationRun<'a> {
    pub label: &'a str,
    pub src_disk: String,
    pub dst_disk: String,
    pub logs: Vec<(&'a str, PathBuf)>,
}

/// What a migration run measured.
#[derive(Debug)]
pub struct Migration {
    /// As QEMU's `query-migrate` reports it.
    pub downtime_ms: u64,
    pub total_ms: u64,
    /// Guest RAM sent while the VM was stopped (QEMU's `downtime-bytes`),
    /// and the dirty-log syncs it took.
    pub downtime_bytes: u64,
    pub dirty_syncs: u64,
    /// The destination guest's console, fio output and the logs, for the
    /// caller's own failure messages.
    pub context: String,
}

/// How long a peer's destination guest may run after the migration
/// completed before it counts as hung: the guest needs about 25 s of fio
/// and a 32 MiB verified write after the switch-over (about 35 s on a
/// loaded machine); 150 s also lets the guest kernel's hung-task watchdog
/// (120 s) name the stuck task on the console.
const PEER_DESTINATION_GRACE: Duration = Duration::from_secs(150);

/// Boots the guest on `run.src_disk`, starts fio with verify in it,
/// live-migrates it to a second QEMU on `run.dst_disk` (incoming on a Unix
/// socket in `dir`) and lets the guest finish there: fio must find no error
/// before, during and after, and the guest kernel no I/O error.
pub fn migrate_guest(repo: &Path, dir: &Path, run: &MigrationRun<'_>) -> Migration {
    match run_migration(repo, dir, run, None) {
        Ok(m) => m,
        Err(hang) => panic!("{hang}"),
    }
}

/// The same run for a peer's back end measured beside Celer (the baseline
/// of a comparison, not what the test checks): a destination guest that
/// has not finished `PEER_DESTINATION_GRACE` after the migration completed
/// is stopped through QMP (its back end with it) and reported as `Err` with
/// its console, instead of failing the test. qemu-storage-daemon hangs so:
/// its vhost-user export (libvhost-user, QEMU 10.0) answers GET_VRING_BASE
/// at once with the ring's last popped index, without waiting for the
/// requests in flight, so a request popped but not completed when the
/// source stops its rings is never completed on the destination, and the
/// guest waits for it forever. Every other failure still fails the test.
pub fn migrate_peer_guest(
    repo: &Path,
    dir: &Path,
    run: &MigrationRun<'_>,
) -> Result<Migration, String> {
    run_migration(repo, dir, run, Some(PEER_DESTINATION_GRACE))
}

fn run_migration(
    repo: &Path,
    dir: &Path,
    run: &MigrationRun<'_>,
    peer_grace: Option<Duration>,
) -> Result<Migration, String> {
    let label = run.label;
    let script = repo.join("crates/celer-vhost/tests/guest/migrate.sh");
    let mig_sock = dir.join("mig.sock");
    let (out_a, qmp_a) = (dir.join("src-out"), dir.join("src.qmp"));
    let (out_b, qmp_b) = (dir.join("dst-out"), dir.join("dst.qmp"));
    let guest = |spec: &str, out: &Path, qmp: &Path, incoming: Option<&Path>| {
        let mut cmd = Command::new("bash");
        cmd.arg(repo.join("scripts/vm/run-guest.sh"))
            .args([
                "--disk", spec, "--smp", "2", "--mem", "512", "--accel", "tcg",
            ])
            .arg("--cmd")
            .arg(&script)
            .arg("--out")
            .arg(out)
            .arg("--qmp")
            .arg(qmp)
            .args(["--timeout", &MIGRATION_GUEST_TIMEOUT_S.to_string()]);
        if let Some(sock) = incoming {
            cmd.arg("--incoming")
                .arg(format!("unix:{}", sock.display()));
        }
        KillOnDrop(cmd.spawn().expect("run-guest.sh"))
    };
    // The destination waits for the migration stream first.
    let mut dst = guest(&run.dst_disk, &out_b, &qmp_b, Some(&mig_sock));
    let mut dst_qmp = Qmp::connect(&qmp_b);
    let _ = dst_qmp.execute("query-status", serde_json::json!({}));
    let mut src = guest(&run.src_disk, &out_a, &qmp_a, None);
    let console_a = out_a.join("console.log");
    let deadline = Instant::now() + Duration::from_secs(MIGRATION_GUEST_TIMEOUT_S);
    while !std::fs::read_to_string(&console_a)
        .map(|c| c.contains("CELER-MIGRATE-START"))
        .unwrap_or(false)
    {
        assert!(
            src.0.try_wait().expect("wait").is_none(),
            "{label}: source guest ended early: {}",
            std::fs::read_to_string(&console_a).unwrap_or_default()
        );
        assert!(
            Instant::now() < deadline,
            "{label}: source guest did not start fio"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(FIO_BEFORE_MIGRATION);
    let ended = |g: &mut KillOnDrop, out: &Path, what: &str| {
        if let Some(status) = g.0.try_wait().expect("wait") {
            let logs: String = run
                .logs
                .iter()
                .map(|(name, path)| {
                    format!(
                        "\n--- {name} ---\n{}",
                        std::fs::read_to_string(path).unwrap_or_default()
                    )
                })
                .collect();
            panic!(
                "{label}: the {what} guest ended ({status}) before the migration:\n--- console ---\n{}\n--- fio ---\n{}{logs}",
                std::fs::read_to_string(out.join("console.log")).unwrap_or_default(),
                std::fs::read_to_string(out.join("fio-mig.txt")).unwrap_or_default(),
            );
        }
    };
    ended(&mut src, &out_a, "source");
    ended(&mut dst, &out_b, "destination");
    let mut qmp = Qmp::connect(&qmp_a);
    qmp.execute(
        "migrate-set-parameters",
        serde_json::json!({"max-bandwidth": 1u64 << 30}),
    );
    qmp.execute(
        "migrate",
        serde_json::json!({"uri": format!("unix:{}", mig_sock.display())}),
    );
    let info = loop {
        let r = qmp.execute("query-migrate", serde_json::json!({}));
        match r["status"].as_str() {
            Some("completed") => break r,
            Some("failed") | Some("cancelled") => panic!("{label}: migration failed: {r}"),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "{label}: migration did not complete: {r}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // The source may close its QMP socket once the migration completed.
    qmp.quit();
    drop(qmp);
    let _ = src.0.wait();
    let migrated = Instant::now();
    let dst_deadline = match peer_grace {
        Some(grace) => deadline.min(migrated + grace),
        None => deadline,
    };
    let read = |name: &str| std::fs::read_to_string(out_b.join(name)).unwrap_or_default();
    let status = loop {
        if let Some(s) = dst.0.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() >= dst_deadline {
            // Stop the destination QEMU through QMP: run-guest.sh then
            // ends on its own and stops its back end (killing the script
            // would leave both running).
            dst_qmp.quit();
            let _ = dst.0.wait();
            let console = read("console.log");
            let tail: Vec<&str> = console.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!(
                "{label}: destination guest did not end {:.0} s after the migration completed (stopped); its console (end):\n{}",
                migrated.elapsed().as_secs_f64(),
                tail.join("\n")
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut context = format!(
        "\n--- {label} destination console (end) ---\n{}\n--- fio ---\n{}{}",
        read("console.log")
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n"),
        read("fio-mig.txt"),
        read("fio-final.txt"),
    );
    for (name, path) in &run.logs {
        context.push_str(&format!(
            "\n--- {name} ---\n{}",
            std::fs::read_to_string(path).unwrap_or_default()
        ));
    }
    assert!(status.success(), "destination guest run failed{context}");
    assert!(
        read("console.log").contains("CELER-MIGRATE-OK"),
        "{context}"
    );
    assert_eq!(
        read("fio-mig.txt").matches("err= 0").count(),
        2,
        "{context}"
    );
    assert_eq!(
        read("fio-final.txt").matches("err= 0").count(),
        1,
        "{context}"
    );
    assert!(
        !read("dmesg.txt").contains("I/O error"),
        "guest I/O errors{context}"
    );
    Ok(Migration {
        downtime_ms: info["downtime"].as_u64().expect("downtime"),
        total_ms: info["total-time"].as_u64().expect("total-time"),
        downtime_bytes: info["ram"]["downtime-bytes"].as_u64().unwrap_or(0),
        dirty_syncs: info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
        context,
    })
}
