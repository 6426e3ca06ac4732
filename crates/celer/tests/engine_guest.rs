//! System test: a real Linux guest (QEMU TCG, 2 queues) on a Celer engine
//! volume served by `celer vhost serve --device engine:...`. The guest
//! writes and verifies with fio, the host kills the back end (and with it
//! the engine) with SIGKILL and restarts it: the engine recovers from its
//! journal, QEMU reconnects, the guest re-verifies every block, then makes,
//! fills and fscks ext4. Afterwards `celer engine check` reads every block
//! on the host and finds no checksum error. Skipped when CELER_SKIP_SLOW=1
//! (CI never sets it).

#[path = "../../celer-vhost/tests/support/guest_system.rs"]
mod guest_system;

use std::path::Path;
use std::process::Command;

use guest_system::{run_guest_system_test, skip_slow, spawn_backend};

#[test]
fn linux_guest_on_an_engine_volume_survives_sigkill_of_the_back_end() {
    if skip_slow() {
        return;
    }
    let celer = env!("CARGO_BIN_EXE_celer");
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("engine.img");
    let st = Command::new(celer)
        .args(["engine", "format", "--disk"])
        .arg(&disk)
        .args(["--size", "512M", "--shards", "2", "--journal-size", "16M"])
        .status()
        .expect("celer engine format");
    assert!(st.success(), "format failed");
    let device = format!("engine:{},volume=7,size=256M", disk.display());
    let start = |socket: &Path, log: &Path| {
        let mut cmd = Command::new(celer);
        cmd.args(["vhost", "serve", "--socket"])
            .arg(socket)
            .args(["--device", &device, "--queues", "2"]);
        spawn_backend(cmd, socket, log)
    };
    run_guest_system_test(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
        dir.path(),
        &start,
        // Every engine write is durable when it completes.
        "write through",
    );

    let out = Command::new(celer)
        .args(["engine", "check", "--disk"])
        .arg(&disk)
        .output()
        .expect("check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "engine check failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(" 0 bad"), "{text}");
}
