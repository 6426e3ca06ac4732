//! System tests of a real Linux guest (QEMU TCG, 2 vCPUs, 2 queues) whose
//! disk is a replicated Celer cluster volume (a loopback cluster: `celer
//! meta serve`, 4 `celer node serve`) served by `celer vhost serve`. Both
//! run alone (.config/nextest.toml): the first measures migration
//! downtimes. Skipped when CELER_SKIP_SLOW=1 (CI never sets it).
//!
//! Live migration with ownership hand-off (issue 12): the source QEMU's disk
//! is `celer vhost serve --device cluster:VOL` (an exclusive attachment),
//! the destination's a second `celer vhost serve` of the same volume with
//! `handoff`, which takes the volume over (fencing the source) at its first
//! I/O. fio with verify runs in the guest before, during and after the
//! migration (see celer-vhost/tests/support/migration.rs). The source back
//! end runs the fence probe (`CELER_TEST_FENCE_PROBE`,
//! crates/celer/src/migration_probe.rs), which keeps writing to the
//! volume's last MiB through its own client after QEMU stopped its rings
//! at the switch-over; the destination logs its take-over and first write
//! (`CELER_TEST_TAKEOVER_LOG`). No write of the source may be acknowledged
//! after the destination's first write, and every write the source submits
//! after the take-over must be refused. Afterwards the probe range holds
//! only acknowledged writes. The same run migrates the guest once more with
//! qemu-storage-daemon on a local file on both sides, and prints both
//! downtimes (docs/operations.md).
//!
//! Back-end restarts with an attachment file: the back end is killed with
//! SIGKILL under fio verify and restarted; it resumes its attachment within
//! 1 s, the last time with the control service down.

#[path = "../../celer-vhost/tests/support/guest_system.rs"]
#[allow(dead_code)] // the guest system scenario is another test's
mod guest_system;
#[path = "../../celer-vhost/tests/support/migration.rs"]
mod migration;
mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use celer_meta::api::CreateVolume;
use guest_system::{build_guest, skip_slow, spawn_backend};
use migration::{migrate_guest, migrate_peer_guest, MigrationRun};
use support::cluster::{Cluster, ClusterOpts};

const BIN: &str = env!("CARGO_BIN_EXE_celer");
const VOLUME: &str = "vol-live";
const VOLUME_BYTES: u64 = 256 << 20;
/// The probe's range (the volume's last MiB, see migration_probe.rs).
const PROBE_RANGE_BYTES: u64 = 1 << 20;
const PROBE_WRITE_BYTES: u64 = 4096;
/// How long the probe may take to end after the guest finished.
const PROBE_END_WITHIN: Duration = Duration::from_secs(30);

/// One line of the source's probe log.
#[derive(Debug)]
struct ProbeWrite {
    seq: u64,
    submit_ns: u64,
    done_ns: u64,
    ok: bool,
    error: String,
}

fn probe_writes(log: &str) -> Vec<ProbeWrite> {
    log.lines()
        .filter_map(|l| {
            let mut w = l.splitn(6, ' ');
            if w.next() != Some("write") {
                return None;
            }
            let mut num = || w.next().and_then(|v| v.parse::<u64>().ok());
            let (seq, submit_ns, done_ns) = (num()?, num()?, num()?);
            let ok = w.next()? == "ok";
            Some(ProbeWrite {
                seq,
                submit_ns,
                done_ns,
                ok,
                error: w.next().unwrap_or("").to_string(),
            })
        })
        .collect()
}

/// `NAME VALUE...` lines of the destination's take-over log.
fn takeover_times(log: &str) -> HashMap<String, Vec<u64>> {
    log.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let name = w.next()?.to_string();
            Some((name, w.filter_map(|v| v.parse().ok()).collect()))
        })
        .collect()
}

#[test]
fn linux_guest_live_migrates_on_a_cluster_volume_and_hands_it_over() {
    if skip_slow() {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    build_guest(&repo);
    let c = Cluster::start(Path::new(BIN), ClusterOpts::default());
    let meta = c.meta_client();
    let vol = meta
        .create_volume(&CreateVolume {
            name: VOLUME.into(),
            size_bytes: VOLUME_BYTES,
            replicas: None,
            sector_size_bytes: None,
        })
        .expect("create the volume");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let spec = format!(
        "cluster:{VOLUME},meta={},token={}",
        c.meta_url(),
        support::cluster::TOKEN
    );
    let (src_sock, src_log, probe_log) =
        (d.join("src.sock"), d.join("src.log"), d.join("probe.log"));
    let (dst_sock, dst_log, takeover_log) = (
        d.join("dst.sock"),
        d.join("dst.log"),
        d.join("takeover.log"),
    );
    let serve = |socket: &Path, device: &str| {
        let mut cmd = Command::new(BIN);
        cmd.args(["vhost", "serve", "--queues", "2", "--socket"])
            .arg(socket)
            .args(["--device", device])
            .env("NO_COLOR", "1")
            .env("CELER_LOG", "info");
        cmd
    };
    let mut src_cmd = serve(&src_sock, &spec);
    src_cmd.env("CELER_TEST_FENCE_PROBE", &probe_log);
    let src = spawn_backend(src_cmd, &src_sock, &src_log);
    let mut dst_cmd = serve(&dst_sock, &format!("{spec},handoff"));
    dst_cmd.env("CELER_TEST_TAKEOVER_LOG", &takeover_log);
    let dst = spawn_backend(dst_cmd, &dst_sock, &dst_log);
    let attachments = || -> Vec<u32> {
        meta.attachments()
            .expect("attachments")
            .iter()
            .filter(|a| a.volume_id == vol.id)
            .map(|a| a.id)
            .collect()
    };
    let before = attachments();
    assert_eq!(before.len(), 1, "the source alone is attached: {before:?}");

    let cluster_dir = d.join("cluster-run");
    std::fs::create_dir_all(&cluster_dir).expect("mkdir");
    let celer = migrate_guest(
        &repo,
        &cluster_dir,
        &MigrationRun {
            label: "celer cluster volume",
            src_disk: format!("vhost:{},queues=2", src_sock.display()),
            dst_disk: format!("vhost:{},queues=2", dst_sock.display()),
            logs: vec![
                ("source back end", src_log.clone()),
                ("destination back end", dst_log.clone()),
                ("probe", probe_log.clone()),
                ("take-over", takeover_log.clone()),
            ],
        },
    );
    let context = &celer.context;
    let src_text = std::fs::read_to_string(&src_log).unwrap_or_default();
    assert!(src_text.contains("dirty logging on"), "{context}");
    assert!(src_text.contains("every ring stopped"), "{context}");
    let stops: Vec<&str> = src_text
        .lines()
        .filter(|l| l.contains("ring stopped") && l.contains("drain_us="))
        .collect();
    println!("source rings stopped (the last ones at the switch-over): {stops:?}");
    let after = attachments();
    assert_eq!(after.len(), 1, "one attachment: {after:?}");
    assert_ne!(after, before, "the destination's replaced the source's");

    // The probe ends after its 20th refused write (checked below, after
    // what the writes it logged show).
    let deadline = Instant::now() + PROBE_END_WITHIN;
    let probe_text = loop {
        let t = std::fs::read_to_string(&probe_log).unwrap_or_default();
        if t.lines().any(|l| l == "end") || Instant::now() > deadline {
            break t;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(src);
    drop(dst);
    let times = takeover_times(&std::fs::read_to_string(&takeover_log).unwrap_or_default());
    let (takeover_start_ns, takeover_done_ns) = times
        .get("takeover")
        .and_then(|t| Some((*t.first()?, *t.get(1)?)))
        .unwrap_or_else(|| panic!("no take-over logged{context}"));
    let first_write_ns = times
        .get("first-write")
        .and_then(|t| t.first().copied())
        .unwrap_or_else(|| panic!("no first write logged{context}"));
    let writes = probe_writes(&probe_text);
    assert!(
        !probe_text.lines().any(|l| l.starts_with("error")),
        "{probe_text}"
    );
    let acked: Vec<&ProbeWrite> = writes.iter().filter(|w| w.ok).collect();
    let refused: Vec<&ProbeWrite> = writes.iter().filter(|w| !w.ok).collect();
    // The probe wrote on both sides of the take-over.
    assert!(
        !acked.is_empty(),
        "no probe write acknowledged before the take-over{context}"
    );
    for w in &acked {
        assert!(
            w.done_ns < first_write_ns,
            "the source's write {} was acknowledged {} µs after the destination's first write{context}",
            w.seq,
            (w.done_ns - first_write_ns) / 1000
        );
    }
    for w in writes.iter().filter(|w| w.submit_ns > takeover_done_ns) {
        assert!(
            !w.ok && w.error.contains("fenced"),
            "the source's write {} submitted {} µs after the take-over: {w:?}{context}",
            w.seq,
            (w.submit_ns - takeover_done_ns) / 1000
        );
    }
    assert!(
        probe_text.lines().any(|l| l == "end"),
        "the source's probe did not end within {PROBE_END_WITHIN:?}{context}"
    );
    assert_eq!(refused.len(), 20, "{probe_text}");
    let ms = |a: u64, b: u64| (a as f64 - b as f64) / 1e6;
    let last_acked_ns = acked.iter().map(|w| w.done_ns).max().unwrap_or(0);
    let first_refused_ns = refused.iter().map(|w| w.done_ns).min().unwrap_or(0);
    println!(
        "fence probe: the destination's take-over at its first I/O took {:.1} ms; {} writes of the source acknowledged after its rings stopped, the last {:.1} ms before the take-over returned ({:.1} ms before the destination's first write); then {} refused (fenced), the first {:.1} ms before the take-over returned",
        ms(takeover_done_ns, takeover_start_ns),
        acked.len(),
        ms(takeover_done_ns, last_acked_ns),
        ms(first_write_ns, last_acked_ns),
        refused.len(),
        ms(takeover_done_ns, first_refused_ns),
    );
    // The probe range holds no write submitted after the take-over: each
    // block's stamp is the last acknowledged write to it (or zeros), or a
    // later write that was refused while the fence was being installed
    // (submitted before the take-over returned): some replicas had the
    // new generation and refused it, others not yet and took it, so like
    // any failed write it left its range undefined.
    let export = d.join("probe-range.img");
    let o = Command::new(BIN)
        .args(["volume", "export", VOLUME])
        .arg(&export)
        .args(["--meta", &c.meta_url(), "--token", support::cluster::TOKEN])
        .output()
        .expect("celer volume export");
    assert!(
        o.status.success(),
        "export: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let image = std::fs::read(&export).expect("read the export");
    let blocks = PROBE_RANGE_BYTES / PROBE_WRITE_BYTES;
    let base = (VOLUME_BYTES - PROBE_RANGE_BYTES) as usize;
    let mut refused_but_landed = Vec::new();
    for b in 0..blocks {
        let at = base + (b * PROBE_WRITE_BYTES) as usize;
        let stamp = u64::from_le_bytes(image[at..at + 8].try_into().expect("8 bytes"));
        let last_acked = acked
            .iter()
            .filter(|w| w.seq % blocks == b)
            .map(|w| w.seq)
            .max()
            .unwrap_or(0);
        if stamp == last_acked {
            continue;
        }
        let during_fence = refused
            .iter()
            .any(|w| w.seq == stamp && w.seq > last_acked && w.submit_ns < takeover_done_ns);
        assert!(
            during_fence,
            "probe block {b}: holds write {stamp}, the last acknowledged is {last_acked}: {probe_text}"
        );
        refused_but_landed.push(stamp);
    }
    // Not asserted (a limit of fencing, reported): such a write may leave
    // the replicas of its block different.
    let t = c.route();
    let diffs: Vec<String> = (base as u64 / t.chunk_bytes..VOLUME_BYTES / t.chunk_bytes)
        .flat_map(|ch| support::replicas::compare_chunk(&t, vol.id, ch))
        .collect();
    println!(
        "probe range: every block holds its last acknowledged write, except refused writes submitted during the fence install that reached some replicas: {refused_but_landed:?}; replica differences in the probe range: {diffs:?}"
    );

    // Baseline: qemu-storage-daemon on a local file on both sides.
    let qsd_dir = d.join("qsd-run");
    std::fs::create_dir_all(&qsd_dir).expect("mkdir");
    let disk = qsd_dir.join("disk.img");
    std::fs::File::create(&disk)
        .expect("disk")
        .set_len(VOLUME_BYTES)
        .expect("size");
    let qsd_disk = |side: &str| {
        format!(
            "qsd:{},queues=2,locking=off,sock={}",
            disk.display(),
            qsd_dir.join(format!("{side}-qsd.sock")).display()
        )
    };
    let qsd = migrate_peer_guest(
        &repo,
        &qsd_dir,
        &MigrationRun {
            label: "qemu-storage-daemon",
            src_disk: qsd_disk("src"),
            dst_disk: qsd_disk("dst"),
            logs: Vec::new(),
        },
    );
    let celer_figures = format!(
        "celer cluster volume {} ms (total {} ms, {} KiB of RAM sent in the downtime, {} dirty-log syncs)",
        celer.downtime_ms,
        celer.total_ms,
        celer.downtime_bytes >> 10,
        celer.dirty_syncs,
    );
    match qsd {
        Ok(qsd) => println!(
            "migration downtime: {celer_figures}, qemu-storage-daemon on a file {} ms (total {} ms, {} KiB, {} syncs)",
            qsd.downtime_ms,
            qsd.total_ms,
            qsd.downtime_bytes >> 10,
            qsd.dirty_syncs
        ),
        // The baseline's own defect (see migrate_peer_guest), reported,
        // not Celer's: the Celer run above drained its rings first.
        Err(hang) => println!(
            "migration downtime: {celer_figures}; no qemu-storage-daemon baseline this run: {hang}"
        ),
    }
}

/// Starts a back end (`cmd`) logging to `log` and returns once it listens
/// on `socket`; fails with its log if it exits or does not listen within
/// 10 s.
fn serve_until_listening(mut cmd: Command, socket: &Path, log: &Path) -> guest_system::KillOnDrop {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("back-end log");
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone().expect("back-end log"))
        .stderr(file)
        .spawn()
        .expect("start the back end");
    let mut child = guest_system::KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        let exited = child.0.try_wait().expect("wait");
        assert!(
            exited.is_none() && Instant::now() < deadline,
            "the back end did not listen ({exited:?}):\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

/// Kills of the cluster volume's back end under the guest's fio; the last
/// one with the control service down.
const KILLS: usize = 3;
/// Time between QEMU's reconnect and the next kill (I/O flows).
const KILL_EVERY: Duration = Duration::from_millis(2000);
/// fio's runtime in the guest: covers the kills and their reconnects.
const KILLS_FIO_RUNTIME_S: u64 = 20;
/// Guest run limit: boot + fio + slack.
const KILLS_GUEST_TIMEOUT_S: u64 = 200;
/// The bound: a restarted back end serves again within this.
const RESUME_WITHIN: Duration = Duration::from_secs(1);

/// `celer vhost serve` of a cluster volume with `attachment-file` is killed
/// with SIGKILL 3 times while the guest's fio writes and verifies at queue
/// depth 16 on each of 2 queues, and restarted at once: it resumes its
/// attachment (the same one: an exclusive attach again would be refused)
/// and listens within 1 s, the third time with the control service killed
/// before (started again once QEMU reconnected: the nodes serve only while
/// their lease holds); QEMU reconnects, fio finds no error, the guest no
/// I/O error.
#[test]
fn linux_guest_on_a_cluster_volume_survives_back_end_kills_resuming_its_attachment() {
    if skip_slow() {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    build_guest(&repo);
    let mut c = Cluster::start(Path::new(BIN), ClusterOpts::default());
    c.meta_client()
        .create_volume(&CreateVolume {
            name: "vol-kills".into(),
            size_bytes: VOLUME_BYTES,
            replicas: None,
            sector_size_bytes: None,
        })
        .expect("create the volume");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (socket, log, out) = (d.join("vhost.sock"), d.join("backend.log"), d.join("out"));
    let spec = format!(
        "cluster:vol-kills,meta={},token={},attachment-file={}",
        c.meta_url(),
        support::cluster::TOKEN,
        d.join("attachment.json").display()
    );
    let start = || {
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new(BIN);
        cmd.args(["vhost", "serve", "--queues", "2", "--socket"])
            .arg(&socket)
            .args(["--device", &spec])
            .env("NO_COLOR", "1")
            .env("CELER_LOG", "info");
        serve_until_listening(cmd, &socket, &log)
    };
    let connected = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("front end connected")
            .count()
    };
    let mut backend = start();
    let mut guest = guest_system::KillOnDrop(
        Command::new("bash")
            .arg(repo.join("scripts/vm/run-guest.sh"))
            .arg("--disk")
            .arg(format!("vhost:{},queues=2", socket.display()))
            .args(["--smp", "2", "--mem", "512", "--accel", "tcg", "--append"])
            .arg(format!("celer.fio_runtime={KILLS_FIO_RUNTIME_S}"))
            .arg("--cmd")
            .arg(repo.join("crates/celer-vhost/tests/guest/kills.sh"))
            .arg("--out")
            .arg(&out)
            .args(["--timeout", &KILLS_GUEST_TIMEOUT_S.to_string()])
            .spawn()
            .expect("run-guest.sh"),
    );
    let console = out.join("console.log");
    let console_has = |what: &str| {
        std::fs::read_to_string(&console)
            .map(|c| c.contains(what))
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(KILLS_GUEST_TIMEOUT_S + 30);
    while !console_has("CELER-KILLS-START") {
        assert!(
            guest.0.try_wait().expect("wait").is_none(),
            "guest ended before fio started"
        );
        assert!(Instant::now() < deadline, "guest did not start fio");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut resume = Vec::new();
    let mut reconnect = Vec::new();
    for kill in 0..KILLS {
        std::thread::sleep(KILL_EVERY);
        assert!(
            !console_has("CELER-FIO-DONE"),
            "fio ended after {kill} kills: make its runtime longer"
        );
        if kill == KILLS - 1 {
            c.kill_meta();
        }
        let before = connected();
        let t0 = Instant::now();
        drop(backend); // SIGKILL, reaped
        backend = start(); // returns once the new back end listens
        resume.push(t0.elapsed());
        let wait = Instant::now() + Duration::from_secs(15);
        while connected() <= before {
            assert!(
                Instant::now() < wait,
                "QEMU did not reconnect after kill {kill}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        reconnect.push(t0.elapsed());
        if kill == KILLS - 1 {
            // The nodes stopped serving 3/4 of their lease after their last
            // answered heartbeat: the guest's I/O waits until the service
            // is back and renews them.
            c.restart_meta();
        }
    }
    let status = loop {
        if let Some(status) = guest.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "guest run did not end");
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(backend);
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let context = format!(
        "\n--- console (end) ---\n{}\n--- fio ---\n{}\n--- dmesg ---\n{}\n--- back end ---\n{log_text}",
        read("console.log")
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n"),
        read("fio-kills.txt"),
        read("dmesg.txt"),
    );
    assert!(status.success(), "guest run failed{context}");
    assert!(read("console.log").contains("CELER-KILLS-OK"), "{context}");
    assert_eq!(
        read("fio-kills.txt").matches("err= 0").count(),
        2,
        "fio errors{context}"
    );
    assert!(
        !read("dmesg.txt").contains("I/O error"),
        "guest I/O errors{context}"
    );
    // One attachment throughout: attached once, resumed after each kill.
    let attachment_ids: Vec<&str> = log_text
        .lines()
        .filter(|l| l.contains("attached (capability valid"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("attachment="))
        })
        .collect();
    assert_eq!(attachment_ids.len(), KILLS + 1, "{context}");
    assert!(
        attachment_ids.iter().all(|id| *id == attachment_ids[0]),
        "attachments {attachment_ids:?}{context}"
    );
    assert_eq!(
        log_text.matches("resumed the attachment").count(),
        KILLS,
        "{context}"
    );
    let ms = |v: &[Duration]| v.iter().map(|d| d.as_millis()).collect::<Vec<_>>();
    println!(
        "{KILLS} kills (the last with the control service down): kill to listening again {:?} ms, kill to QEMU reconnected {:?} ms; {} of them found requests in flight, {} resubmitted requests completed",
        ms(&resume),
        ms(&reconnect),
        log_text.matches("resubmitting in-flight requests").count(),
        log_text.matches("resubmitted request completed").count(),
    );
    assert!(
        resume.iter().all(|d| *d < RESUME_WITHIN),
        "a restarted back end resumes within {RESUME_WITHIN:?}: {:?} ms",
        ms(&resume)
    );
}
