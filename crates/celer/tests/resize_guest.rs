//! System test: online resize as a Linux guest sees it. `celer up` serves a
//! 256 MiB volume over vhost-user-blk to a real guest (QEMU TCG); while the
//! guest runs, `celer volume resize` grows it to 384 MiB. The guest's
//! virtio-blk driver must see the new capacity (QEMU forwards Celer's config
//! change notification as a config interrupt) and fio must write and verify
//! data past the old end. Skipped when CELER_SKIP_SLOW=1 (CI never sets it).

#[path = "../../celer-vhost/tests/support/guest_system.rs"]
#[allow(dead_code)]
mod guest_system;
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use guest_system::{build_guest, skip_slow, spawn_guest};
use support::up::Up;

const GUEST_TIMEOUT_S: u64 = 240;

#[test]
fn a_linux_guest_sees_the_volume_grow_online() {
    if skip_slow() {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    build_guest(&repo);
    let dir = tempfile::tempdir().expect("tempdir");
    let up = Up::start(&dir.path().join("up"), "256M");
    let out = dir.path().join("out");
    let mut guest = spawn_guest(
        &repo,
        &up.vhost_socket(),
        1,
        &repo.join("crates/celer/tests/guest/resize.sh"),
        &out,
        GUEST_TIMEOUT_S,
    );
    let console = out.join("console.log");
    let deadline = Instant::now() + Duration::from_secs(GUEST_TIMEOUT_S + 60);
    let mut resized_at = None;
    let mut seen = false;
    let status = loop {
        if let Some(status) = guest.0.try_wait().expect("wait for the guest") {
            break status;
        }
        assert!(Instant::now() < deadline, "guest run did not end");
        if resized_at.is_none()
            && std::fs::read_to_string(&console)
                .map(|c| c.contains("CELER-RESIZE-READY"))
                .unwrap_or(false)
        {
            up.volume_ok(&["resize", "default", "--size", "384M"]);
            resized_at = Some(Instant::now());
        }
        if let (Some(t), false) = (resized_at, seen) {
            if std::fs::read_to_string(&console)
                .map(|c| c.contains("CELER-RESIZE-SEEN"))
                .unwrap_or(false)
            {
                println!(
                    "guest saw the new size at most {:.2} s after the resize",
                    t.elapsed().as_secs_f64()
                );
                seen = true;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
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
        read("fio-tail.txt"),
        read("dmesg.txt"),
    );
    assert!(resized_at.is_some(), "the guest never got ready{context}");
    assert!(status.success(), "guest run failed{context}");
    assert!(console_text.contains("CELER-RESIZE-OK"), "{context}");
    assert_eq!(read("size-before.txt").trim(), "524288", "{context}"); // 256 MiB
    assert_eq!(read("size-after.txt").trim(), "786432", "{context}"); // 384 MiB
    assert!(read("fio-tail.txt").contains("err= 0"), "{context}");
    // The kernel logged the change it was told about.
    assert!(read("dmesg.txt").contains("capacity change"), "{context}");
    up.stop();
}
