//! System test: a crash-consistent snapshot of a mounted ext4 file system,
//! as a Linux guest sees it through a clone. `celer up` serves a 128 MiB
//! volume over vhost-user-blk to a real guest (QEMU TCG), which makes an
//! ext4 file system (with a journal), writes files of random content and
//! syncs their md5 list, then keeps a writer going (each file synced before
//! its md5 line is appended to a list); meanwhile the host runs `celer
//! snapshot create default@snap`, and the guest powers off with the file
//! system still mounted. `celer volume clone default@snap clone` is served
//! by `celer vhost serve --device cluster:clone` to a second guest run:
//! e2fsck must replay the journal (the snapshot holds a mounted file
//! system) and then find it clean, every synced file must read back
//! intact, including every writer file whose md5 line is in the snapshot
//! (a write that completed before one in the snapshot was issued is in it
//! too), and the clone must take a new file. The snapshot and the parent
//! must read the same, byte for byte, before and after the clone's run.
//! Skipped when CELER_SKIP_SLOW=1 (CI never sets it).

#[path = "../../celer-vhost/tests/support/guest_system.rs"]
#[allow(dead_code)]
mod guest_system;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use guest_system::{build_guest, skip_slow, spawn_backend, spawn_guest};
use support::up::Up;

/// Per guest run (QEMU is killed after it); each takes well under a minute
/// under TCG here.
const GUEST_TIMEOUT_S: u64 = 120;

/// `crates/celer/tests/guest/snapshot.sh` with `PHASE=phase` set, as the
/// guest's command file.
fn phase_script(repo: &Path, dir: &Path, phase: &str) -> PathBuf {
    let body = std::fs::read_to_string(repo.join("crates/celer/tests/guest/snapshot.sh"))
        .expect("read guest/snapshot.sh");
    let path = dir.join(format!("snapshot-{phase}.sh"));
    std::fs::write(&path, format!("#!/bin/sh\nPHASE={phase}\n{body}"))
        .expect("write the guest script");
    path
}

/// The guest's console and result files of one run.
struct Run {
    out: PathBuf,
    status: ExitStatus,
    secs: f64,
}

impl Run {
    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.out.join(name)).unwrap_or_default()
    }

    fn console(&self) -> String {
        self.read("console.log")
    }

    /// The console's end and the result files, for assertion messages.
    fn context(&self, files: &[&str]) -> String {
        let console = self.console();
        let lines: Vec<&str> = console.lines().collect();
        let mut s = format!(
            "\n--- console (end) ---\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        );
        for f in files {
            s.push_str(&format!("\n--- {f} ---\n{}", self.read(f)));
        }
        s
    }
}

/// Boots the guest on `socket` with `script` and waits for it to end;
/// `on_console` is called with the console text every 100 ms meanwhile.
fn run_guest(
    repo: &Path,
    socket: &Path,
    script: &Path,
    out: &Path,
    on_console: &mut dyn FnMut(&str),
) -> Run {
    let started = Instant::now();
    let mut guest = spawn_guest(repo, socket, 1, script, out, GUEST_TIMEOUT_S);
    let console = out.join("console.log");
    let deadline = started + Duration::from_secs(GUEST_TIMEOUT_S + 60);
    let status = loop {
        if let Some(status) = guest.0.try_wait().expect("wait for the guest") {
            break status;
        }
        assert!(Instant::now() < deadline, "guest run did not end");
        on_console(&std::fs::read_to_string(&console).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    };
    let secs = started.elapsed().as_secs_f64();
    println!("guest run {} took {secs:.0} s", out.display());
    Run {
        out: out.to_path_buf(),
        status,
        secs,
    }
}

/// The number after `marker` on the console, if it was printed.
fn marker_number(console: &str, marker: &str) -> Option<u64> {
    let rest = &console[console.find(marker)? + marker.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

fn file_number(run: &Run, name: &str) -> u64 {
    run.read(name)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{name}: not a number{}", run.context(&[])))
}

/// `celer volume export SPEC` into `dir/file`; returns the image's bytes.
fn export(up: &Up, spec: &str, dir: &Path, file: &str) -> Vec<u8> {
    let path = dir.join(file);
    up.volume_ok(&["export", spec, path.to_str().expect("UTF-8 path")]);
    let bytes = std::fs::read(&path).expect("read the exported image");
    std::fs::remove_file(&path).expect("remove the exported image");
    bytes
}

/// `dumpe2fs -h` of an ext4 image, or None without dumpe2fs on the host.
fn dumpe2fs_header(image: &[u8], dir: &Path) -> Option<String> {
    let path = dir.join("dumpe2fs.img");
    std::fs::write(&path, image).expect("write the image for dumpe2fs");
    let out = Command::new("dumpe2fs")
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .arg("-h")
        .arg(&path)
        .output();
    let _ = std::fs::remove_file(&path);
    match out {
        Ok(o) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => panic!("dumpe2fs failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "dumpe2fs is missing ({e}): ./scripts/install-deps.sh installs it (e2fsprogs)"
            );
            eprintln!("dumpe2fs missing ({e}): not checking the snapshot's superblock");
            None
        }
    }
}

#[test]
fn a_clone_of_a_snapshot_of_a_mounted_ext4_mounts_clean_in_a_linux_guest() {
    if skip_slow() {
        return;
    }
    let t0 = Instant::now();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    build_guest(&repo);
    let dir = tempfile::tempdir().expect("tempdir");
    let up = Up::start(&dir.path().join("up"), "128M");

    // Run 1: ext4 on the volume, the snapshot taken while a writer writes.
    let mut snapped: Option<(Instant, f64, String)> = None;
    let mut writer_done_before_snapshot = false;
    let make = run_guest(
        &repo,
        &up.vhost_socket(),
        &phase_script(&repo, dir.path(), "make"),
        &dir.path().join("out-make"),
        &mut |console| {
            if snapped.is_none() && console.contains("CELER-SNAP-READY") {
                let t = Instant::now();
                let said = up.snapshot_ok(&["create", "default@snap"]);
                let secs = t.elapsed().as_secs_f64();
                // Still writing once the snapshot is taken (read again: the
                // console may have moved on while the command ran).
                writer_done_before_snapshot =
                    std::fs::read_to_string(dir.path().join("out-make/console.log"))
                        .unwrap_or_default()
                        .contains("CELER-SNAP-WRITER-DONE");
                snapped = Some((t, secs, said));
            }
        },
    );
    let ctx = make.context(&[
        "jbd2.txt",
        "sums-count.txt",
        "wlist-at-end.txt",
        "dmesg.txt",
    ]);
    assert!(make.status.success(), "guest run 1 failed{ctx}");
    // mkfs discards the whole device and zeroes ranges: the back end
    // advertises ranges the cluster volume takes, so none fails.
    assert!(
        !make.read("dmesg.txt").contains("I/O error"),
        "the guest saw I/O errors{ctx}"
    );
    let console = make.console();
    let (_, snap_secs, snap_said) = snapped.expect("the guest never got ready for the snapshot");
    assert!(
        !writer_done_before_snapshot,
        "the writer stopped before the snapshot was taken{ctx}"
    );
    assert!(snap_said.contains("taken"), "{snap_said}");
    assert!(make.read("jbd2.txt").contains("vda"), "no journal{ctx}");
    let at_marker = marker_number(&console, "CELER-SNAP-READY").expect("READY count");
    let at_end = marker_number(&console, "CELER-SNAP-WRITER-DONE").expect("DONE count");
    let files = file_number(&make, "sums-count.txt");
    assert_eq!(files, 208, "8 data files and 200 small ones{ctx}");

    // The snapshot holds a mounted file system: its journal needs recovery.
    let snap_before = export(&up, "default@snap", dir.path(), "snap.img");
    if let Some(h) = dumpe2fs_header(&snap_before, dir.path()) {
        let features = h
            .lines()
            .find(|l| l.starts_with("Filesystem features:"))
            .unwrap_or_default()
            .to_string();
        assert!(features.contains("has_journal"), "{h}");
        assert!(
            features.contains("needs_recovery"),
            "the snapshot's file system is not marked mounted: {h}"
        );
        println!("snapshot superblock: {features}");
    }
    let parent_before = export(&up, "default", dir.path(), "parent.img");

    // Run 2: the clone, served on its own vhost-user socket.
    let t = Instant::now();
    up.volume_ok(&["clone", "default@snap", "clone"]);
    let clone_secs = t.elapsed().as_secs_f64();
    let socket = dir.path().join("clone.sock");
    let backend = spawn_backend(
        up.vhost_serve("clone", &socket),
        &socket,
        &dir.path().join("vhost.log"),
    );
    let check = run_guest(
        &repo,
        &socket,
        &phase_script(&repo, dir.path(), "clone"),
        &dir.path().join("out-clone"),
        &mut |_| {},
    );
    drop(backend);
    let ctx = check.context(&[
        "fsck-repair.txt",
        "fsck-check.txt",
        "sums-check.txt",
        "wlist-check.txt",
        "fsck-final.txt",
        "dmesg.txt",
    ]);
    let console = check.console();
    assert!(
        !console.contains("CELER-CLONE-FAIL"),
        "the clone's check failed{ctx}"
    );
    assert!(check.status.success(), "guest run 2 failed{ctx}");
    assert!(
        !check.read("dmesg.txt").contains("I/O error"),
        "the guest saw I/O errors{ctx}"
    );
    assert!(console.contains("CELER-CLONE-OK"), "{ctx}");
    assert!(
        check.read("fsck-repair.txt").contains("recovering journal"),
        "{ctx}"
    );
    assert_eq!(file_number(&check, "sums-count.txt"), files, "{ctx}");
    let in_snapshot = file_number(&check, "wlist-count.txt");
    assert!(
        in_snapshot >= at_marker,
        "the snapshot lost writer files synced before it was taken: \
         {in_snapshot} < {at_marker}{ctx}"
    );
    assert!(
        in_snapshot < at_end,
        "the snapshot holds every writer file, even those written after it: \
         {in_snapshot} of {at_end}{ctx}"
    );

    // The clone's run changed neither the snapshot nor the parent.
    assert!(
        export(&up, "default@snap", dir.path(), "snap.img") == snap_before,
        "the snapshot changed while the clone was written"
    );
    assert!(
        export(&up, "default", dir.path(), "parent.img") == parent_before,
        "the parent volume changed while the clone was written"
    );
    assert!(
        export(&up, "clone", dir.path(), "clone.img") != snap_before,
        "the clone's writes are not in the clone"
    );
    println!(
        "the clone's first e2fsck -f -y (rc {}):\n{}",
        check.read("fsck-repair-rc.txt").trim(),
        check.read("fsck-repair.txt").trim()
    );
    println!(
        "snapshot create {snap_secs:.2} s ({}), clone {clone_secs:.2} s; \
         {files} files synced before the snapshot intact, writer files: {at_marker} \
         synced at the marker, {in_snapshot} in the snapshot, {at_end} written; \
         guest runs {:.0} s + {:.0} s; total {:.0} s",
        snap_said.trim(),
        make.secs,
        check.secs,
        t0.elapsed().as_secs_f64()
    );
    up.stop();
}
