//! System test: a real QEMU (TCG) boots a real Linux guest whose disk is a
//! Celer vhost-user-blk volume on the file device (2 queues); see
//! support/guest_system.rs for the scenario. Skipped when CELER_SKIP_SLOW=1
//! (CI never sets it).

#[path = "support/guest_system.rs"]
mod guest_system;

use std::path::Path;
use std::process::{Command, Stdio};

use guest_system::{run_guest_system_test, skip_slow, wait_for_socket, KillOnDrop};

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
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_celer-vhost"))
            .args(["serve", "--socket"])
            .arg(socket)
            .arg("--device")
            .arg(format!("file:{}", disk.display()))
            .args(["--queues", "2"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start celer-vhost");
        wait_for_socket(socket);
        KillOnDrop(child)
    };
    run_guest_system_test(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
        dir.path(),
        &start,
    );
}
