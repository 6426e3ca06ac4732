//! System test: a real QEMU (TCG) boots a real Linux guest whose disk is a
//! Celer vhost-user-blk volume on the file device (2 queues); see
//! support/guest_system.rs for the scenario. Skipped when CELER_SKIP_SLOW=1
//! (CI never sets it).

#[path = "support/guest_system.rs"]
mod guest_system;

use std::path::Path;
use std::process::Command;

use guest_system::{run_guest_system_test, skip_slow, spawn_backend};

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
    );
}
