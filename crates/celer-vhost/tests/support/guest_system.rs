//! The QEMU guest system test, shared by the back ends that run it (the
//! file device in celer-vhost, the engine volume in celer): a real Linux
//! guest (QEMU TCG, 2 vCPUs, 2 virtqueues) writes and verifies data with fio
//! (crc32c); the host kills the back end with SIGKILL and restarts it (QEMU
//! reconnects); the guest re-verifies, then makes, fills, remounts and
//! fscks an ext4 file system. Bounded by GUEST_TIMEOUT_S.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Guest run limit (QEMU is killed after it); boot + fio + mkfs under TCG
/// take about a minute here.
const GUEST_TIMEOUT_S: u64 = 300;

pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a back end (`cmd`, with its serving arguments) logging to `log`,
/// and waits until it listens on `socket`.
pub fn spawn_backend(mut cmd: Command, socket: &Path, log: &Path) -> KillOnDrop {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("back-end log");
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("back-end log"))
        .stderr(log)
        .spawn()
        .expect("cannot start the back end");
    wait_for_socket(socket);
    KillOnDrop(child)
}

/// Waits for a back end to listen on `socket`.
pub fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "back end did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the slow system tests are skipped (CELER_SKIP_SLOW=1, for a
/// developer's quick local run). Under CI (CI=true) skipping is refused: a
/// CI run that skipped them would be green without having run them.
pub fn skip_slow() -> bool {
    if std::env::var("CELER_SKIP_SLOW").as_deref() == Ok("1") {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CELER_SKIP_SLOW=1 with CI=true: CI runs the slow system tests"
        );
        eprintln!("CELER_SKIP_SLOW=1: skipping the QEMU system test");
        return true;
    }
    false
}

/// Installs QEMU 10 / fio / busybox and builds the guest once (cached).
pub fn build_guest(repo: &Path) {
    let status = Command::new("bash")
        .arg(repo.join("scripts/vm/build-guest.sh"))
        .status()
        .expect("cannot run build-guest.sh");
    assert!(status.success(), "build-guest.sh failed");
}

/// Boots the test guest (TCG, 512 MiB, `queues` vCPUs and virtqueues) on the
/// vhost-user-blk back end at `socket` and runs `script` in it; results and
/// `console.log` land in `out`; QEMU is killed after `timeout_s`.
pub fn spawn_guest(
    repo: &Path,
    socket: &Path,
    queues: usize,
    script: &Path,
    out: &Path,
    timeout_s: u64,
) -> KillOnDrop {
    KillOnDrop(
        Command::new("bash")
            .arg(repo.join("scripts/vm/run-guest.sh"))
            .arg("--disk")
            .arg(format!("vhost:{},queues={queues}", socket.display()))
            .args([
                "--smp",
                &queues.to_string(),
                "--mem",
                "512",
                "--accel",
                "tcg",
            ])
            .arg("--cmd")
            .arg(script)
            .arg("--out")
            .arg(out)
            .args(["--timeout", &timeout_s.to_string()])
            .spawn()
            .expect("cannot run run-guest.sh"),
    )
}

/// Runs the guest scenario against the back end `start_backend(socket, log)`
/// starts (listening, 2 queues); `repo` is the repository root and `dir` a
/// scratch directory.
/// `write_cache`: what the guest must read in
/// `/sys/block/vda/queue/write_cache` ("write back" or "write through").
pub fn run_guest_system_test(
    repo: &Path,
    dir: &Path,
    start_backend: &dyn Fn(&Path, &Path) -> KillOnDrop,
    write_cache: &str,
) {
    let root: PathBuf = repo.to_path_buf();
    build_guest(&root);
    let socket = dir.join("vhost.sock");
    let backend_log = dir.join("backend.log");
    let out = dir.join("out");
    let mut backend = start_backend(&socket, &backend_log);
    let mut guest = spawn_guest(
        &root,
        &socket,
        2,
        &root.join("crates/celer-vhost/tests/guest/system.sh"),
        &out,
        GUEST_TIMEOUT_S,
    );

    // Restart the back end (kill -9) once the guest has written its data.
    let console = out.join("console.log");
    let deadline = Instant::now() + Duration::from_secs(GUEST_TIMEOUT_S + 60);
    let mut restarted = false;
    let status = loop {
        if let Some(status) = guest.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "guest run did not end");
        if !restarted
            && std::fs::read_to_string(&console)
                .map(|c| c.contains("CELER-PHASE1-DONE"))
                .unwrap_or(false)
        {
            drop(backend);
            std::thread::sleep(Duration::from_millis(500));
            backend = start_backend(&socket, &backend_log);
            restarted = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let console_text = std::fs::read_to_string(&console).unwrap_or_default();
    let log_text = std::fs::read_to_string(&backend_log).unwrap_or_default();
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
    let context = format!(
        "\n--- console ---\n{}\n--- back end ---\n{}\n--- fio ---\n{}{}\n--- fsck ---\n{}",
        console_text
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n"),
        log_text,
        read("fio-write.txt"),
        read("fio-reverify.txt"),
        read("fsck.txt")
    );
    assert!(status.success(), "guest run failed{context}");
    assert!(restarted, "the guest never reached phase 1{context}");
    assert!(console_text.contains("CELER-PHASE2-DONE"), "{context}");
    assert!(console_text.contains("CELER-SYSTEM-OK"), "{context}");
    assert_eq!(read("hw-queues.txt").trim(), "2", "{context}");
    assert_eq!(read("write-cache.txt").trim(), write_cache, "{context}");
    // Both virtqueues raised interrupts (I/O went through both).
    let irqs = read("interrupts.txt");
    for q in ["req.0", "req.1"] {
        let line = irqs
            .lines()
            .find(|l| l.contains(q))
            .unwrap_or_else(|| panic!("no {q} in interrupts:\n{irqs}"));
        let count: u64 = line
            .split_whitespace()
            .skip(1)
            .take_while(|f| f.chars().all(|c| c.is_ascii_digit()))
            .map(|f| f.parse::<u64>().unwrap())
            .sum();
        assert!(count > 0, "queue {q} saw no interrupts:\n{irqs}");
    }
    assert!(read("fio-write.txt").contains("err= 0"), "{context}");
    assert!(read("fio-reverify.txt").contains("err= 0"), "{context}");
    drop(backend);
}
