//! System test: a disk image laid out in 512-byte sectors, as a Linux guest
//! sees it on a Celer volume. A GPT image with two partitions (made with
//! sfdisk; the second starts at an odd sector, so the guest's 4 KiB writes
//! there cover parts of two physical blocks) and an ext4 file system (made
//! with mke2fs on the host) is imported with `celer volume import` into the
//! new volume of a `celer up` cluster (512-byte logical sectors, the
//! default), exported back unchanged, served by `celer vhost serve --device
//! cluster:VOL`, and then a real guest (QEMU TCG) must show both partitions
//! with 512-byte logical / 4096-byte physical blocks, mount the ext4 file
//! system and find the host's file, write, remount and fsck it, and pass fio
//! with block sizes from 512 B to 128 KiB and crc32c verification.
//! Skipped when CELER_SKIP_SLOW=1 (CI never sets it); a missing sfdisk or
//! mke2fs fails the test under CI=true.

#[path = "../../celer-vhost/tests/support/guest_system.rs"]
#[allow(dead_code)]
mod guest_system;
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use guest_system::{build_guest, skip_slow, spawn_backend, spawn_guest};
use support::up::Up;

const GUEST_TIMEOUT_S: u64 = 300;
const MIB: u64 = 1 << 20;
/// The image: 64 MiB and three sectors (512-aligned, not 4 KiB-aligned).
const IMAGE_BYTES: u64 = 64 * MIB + 3 * 512;
/// Partition 2 starts at this (odd) sector and holds the ext4 file system.
const P2_START: u64 = 34821;

fn tool(name: &str) -> bool {
    let found = Command::new("sh")
        .args([
            "-c",
            &format!("command -v {name} || test -x /sbin/{name} || test -x /usr/sbin/{name}"),
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found && std::env::var("CI").as_deref() == Ok("true") {
        panic!("{name} is missing: ./scripts/install-deps.sh installs it (Debian package fdisk / e2fsprogs)");
    }
    found
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The GPT image: two Linux partitions, ext4 with `hello.bin` on the second.
/// Returns the md5 of `hello.bin`.
fn make_image(dir: &Path, image: &Path) -> String {
    let f = std::fs::File::create(image).expect("image");
    f.set_len(IMAGE_BYTES).expect("image size");
    drop(f);
    let layout = format!(
        "label: gpt\nunit: sectors\nsector-size: 512\n\
         start=2048, size=32768, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=aligned\n\
         start={P2_START}, size=61440, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=odd\n"
    );
    let mut child = Command::new("sfdisk")
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .args(["--no-reread", "--no-tell-kernel", "-q"])
        .arg(image)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), layout.as_bytes())
        .expect("sfdisk input");
    let out = child.wait_with_output().expect("sfdisk");
    assert!(
        out.status.success(),
        "sfdisk failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let src = dir.join("fs-src");
    std::fs::create_dir_all(&src).expect("fs source");
    let data: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(src.join("hello.bin"), &data).expect("hello.bin");
    run(Command::new("mke2fs")
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&src)
        .arg("-E")
        .arg(format!("offset={}", P2_START * 512))
        .arg(image)
        .arg("30M"));
    let sum = run(Command::new("md5sum").arg(src.join("hello.bin")));
    sum.split_whitespace().next().expect("md5").to_string()
}

#[test]
fn a_gpt_image_shows_its_partitions_and_ext4_in_the_guest() {
    if skip_slow() || !tool("sfdisk") || !tool("mke2fs") {
        eprintln!("skipping: CELER_SKIP_SLOW=1, or sfdisk/mke2fs missing outside CI");
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    build_guest(&repo);
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("gpt.img");
    let md5 = make_image(dir.path(), &image);
    // `celer up` holds its own volume (`default`, attached exclusively);
    // the image goes into a new one.
    let up = Up::start(&dir.path().join("up"), "64M");
    let out = up.volume_ok(&[
        "import",
        image.to_str().unwrap(),
        "gpt",
        "--format",
        "raw",
        "--size",
        "256M",
    ]);
    assert!(out.contains("gpt"), "{out}");
    let info = up.volume_ok(&["info", "gpt"]);
    assert!(info.contains("512 bytes logical"), "{info}");
    // Export: the image's bytes come back, zeroes after them.
    let back = dir.path().join("back.img");
    up.volume_ok(&["export", "gpt", back.to_str().unwrap()]);
    let (a, b) = (
        std::fs::read(&image).unwrap(),
        std::fs::read(&back).unwrap(),
    );
    assert_eq!(b.len() as u64, 256 * MIB);
    assert!(
        a[..] == b[..a.len()],
        "the export differs from the imported image"
    );
    assert!(b[a.len()..].iter().all(|x| *x == 0));
    drop((a, b));

    let socket = dir.path().join("gpt.sock");
    let _backend = spawn_backend(
        up.vhost_serve("gpt", &socket),
        &socket,
        &dir.path().join("vhost.log"),
    );
    let out = dir.path().join("out");
    let mut guest = spawn_guest(
        &repo,
        &socket,
        1,
        &repo.join("crates/celer/tests/guest/sectors.sh"),
        &out,
        GUEST_TIMEOUT_S,
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs(GUEST_TIMEOUT_S + 60);
    let status = loop {
        if let Some(status) = guest.0.try_wait().expect("wait for the guest") {
            break status;
        }
        assert!(Instant::now() < deadline, "guest run did not end");
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("guest ran {:.0} s", started.elapsed().as_secs_f64());
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
    let console = read("console.log");
    let context = format!(
        "\n--- console (end) ---\n{}\n--- fio ---\n{}\n--- fsck ---\n{}",
        console
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n"),
        read("fio.txt"),
        read("fsck.txt"),
    );
    assert_eq!(
        read("partitions.txt").trim(),
        "2",
        "both partitions{context}"
    );
    assert_eq!(
        read("vda2-start.txt").trim(),
        P2_START.to_string(),
        "{context}"
    );
    assert_eq!(read("logical.txt").trim(), "512", "{context}");
    assert_eq!(read("physical.txt").trim(), "4096", "{context}");
    assert_eq!(read("min-io.txt").trim(), "4096", "{context}");
    assert!(
        read("host-file.md5").contains(&md5),
        "the host's file{context}"
    );
    assert!(status.success(), "guest run failed{context}");
    assert!(console.contains("CELER-SECTORS-EXT4-OK"), "{context}");
    assert!(console.contains("CELER-SECTORS-OK"), "{context}");
    let fio = read("fio.txt");
    assert_eq!(
        fio.matches("err= 0").count(),
        3,
        "three fio jobs without error{context}"
    );
    up.stop();
}
