//! `celer volume import` / `export` as a user runs them, against `celer up`
//! running as a child process: raw images round-trip byte for byte (holes
//! included, also into an existing volume whose old data must not show
//! through), qcow2 images round-trip through qemu-img, and bad arguments
//! fail with a message that says what is wrong.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

use support::up::{Up, BIN};

const MIB: u64 = 1 << 20;

/// `len` bytes of a pattern that differs per 4K block and per `seed`.
fn pattern(len: u64, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    for (i, w) in v.chunks_mut(8).enumerate() {
        let x = (i as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(seed.wrapping_mul(0x632B_E59B_D9B4_E019))
            | 1;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
    v
}

fn write_file(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).expect("create");
    f.write_all(data).expect("write");
}

fn qemu_img(args: &[&str]) -> Output {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn assert_fails(out: &Output, wanted: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {err}");
    assert!(
        err.contains(wanted),
        "error should mention `{wanted}`: {err}"
    );
}

#[test]
fn raw_import_export_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = Up::start(&dir.path().join("up"), "64M");
    // 8 MiB + 5000 bytes: a 2 MiB hole, data, a tail that is not a whole
    // 4K block (the volume rounds up to 8 MiB + 8 KiB).
    let len = 8 * MIB + 5000;
    let mut image = pattern(len, 1);
    image[2 * MIB as usize..4 * MIB as usize].fill(0);
    let raw = dir.path().join("disk.raw");
    write_file(&raw, &image);

    let out = up.volume_ok(&["import", s(&raw), "vm1", "--format", "raw"]);
    assert!(out.contains("created"), "{out}");
    assert!(
        out.contains("2 MiB of zeroes skipped"),
        "the 2 MiB hole is not written: {out}"
    );
    assert_eq!(up.volume_size("vm1"), 8 * MIB + 8192);

    let back = dir.path().join("back.raw");
    up.volume_ok(&["export", "vm1", s(&back)]);
    let got = std::fs::read(&back).expect("read export");
    assert_eq!(got.len() as u64, 8 * MIB + 8192);
    assert!(got[..len as usize] == image[..], "exported bytes differ");
    assert!(got[len as usize..].iter().all(|b| *b == 0), "tail not zero");

    // Into an existing volume with other data: the hole must be written
    // as zeroes, not skipped (auto-detects raw through qemu-img info).
    let other = dir.path().join("other.raw");
    write_file(&other, &pattern(len, 2));
    up.volume_ok(&["import", s(&other), "vm2"]);
    let out = up.volume_ok(&["import", s(&raw), "vm2"]);
    assert!(out.contains("existing"), "{out}");
    assert!(out.contains("2 MiB of zeroes written"), "{out}");
    up.volume_ok(&["export", "vm2", s(&back)]);
    let got = std::fs::read(&back).expect("read export");
    assert!(got[..len as usize] == image[..], "old data shows through");

    // --size makes a larger volume; a smaller existing volume is refused.
    up.volume_ok(&["import", s(&raw), "vm3", "--size", "12M"]);
    assert_eq!(up.volume_size("vm3"), 12 * MIB);
    up.volume_ok(&["create", "small", "--size", "4M"]);
    assert_fails(
        &up.volume(&["import", s(&raw), "small"]),
        "celer volume resize small",
    );
    assert_fails(
        &up.volume(&["import", s(&raw), "vm4", "--size", "1M"]),
        "is smaller than the image",
    );
    assert_fails(
        &up.volume(&["export", "nosuch", s(&back)]),
        "volume `nosuch` not found",
    );
    assert_fails(
        &up.volume(&["import", s(&dir.path().join("missing.raw")), "vm5"]),
        "No such file",
    );
}

#[test]
fn qcow2_import_export_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = Up::start(&dir.path().join("up"), "64M");
    let mut image = pattern(16 * MIB, 3);
    image[5 * MIB as usize..9 * MIB as usize].fill(0);
    let raw = dir.path().join("disk.raw");
    write_file(&raw, &image);
    let qcow2 = dir.path().join("disk.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&qcow2)]);

    let out = up.volume_ok(&["import", s(&qcow2), "q1"]);
    assert!(out.contains("(qcow2, 16 MiB)"), "{out}");
    assert_eq!(up.volume_size("q1"), 16 * MIB);

    let back = dir.path().join("back.qcow2");
    up.volume_ok(&["export", "q1", s(&back), "--format", "qcow2"]);
    let info: serde_json::Value =
        serde_json::from_slice(&qemu_img(&["info", "--output=json", s(&back)]).stdout)
            .expect("JSON");
    assert_eq!(info["format"], "qcow2", "{info}");
    qemu_img(&["compare", s(&qcow2), s(&back)]);
    // The raw export of the same volume holds the same bytes.
    let back_raw = dir.path().join("back.raw");
    up.volume_ok(&["export", "q1", s(&back_raw), "--format", "raw"]);
    assert!(std::fs::read(&back_raw).expect("read") == image);

    // --format qcow2 on a file that is not qcow2.
    assert_fails(
        &up.volume(&["import", s(&raw), "q2", "--format", "qcow2"]),
        "qemu-img cannot read",
    );
}

#[test]
fn bad_arguments_fail_with_a_helpful_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("disk.raw");
    write_file(&raw, &pattern(MIB, 4));
    let run = |args: &[&str], env_token: bool| {
        let mut c = Command::new(BIN);
        c.arg("volume")
            .args(args)
            .env_remove("CELER_TOKEN")
            .env_remove("CELER_META");
        if env_token {
            c.env("CELER_TOKEN", "secret");
        }
        c.output().expect("run celer")
    };
    // The control service is not there (port 1 on loopback refuses).
    assert_fails(
        &run(
            &["import", s(&raw), "v", "--meta", "http://127.0.0.1:1"],
            true,
        ),
        "cannot reach the control service",
    );
    assert_fails(
        &run(
            &[
                "export",
                "v",
                s(&dir.path().join("out")),
                "--meta",
                "http://127.0.0.1:1",
            ],
            true,
        ),
        "cannot reach the control service",
    );
    assert_fails(&run(&["import", s(&raw), "v"], false), "no token");
    assert_fails(
        &run(&["import", s(&raw), "v", "--format", "vmdk"], true),
        "possible values: raw, qcow2, auto",
    );
    assert_fails(
        &run(&["export", "v", "out", "--format", "vmdk"], true),
        "possible values: raw, qcow2",
    );
    assert_fails(
        &run(&["import", s(&dir.path().join("nope.qcow2")), "v"], true),
        "cannot read the image",
    );
    assert_fails(&run(&["import", s(&raw)], true), "<NAME>");
    assert_fails(
        &run(&["import", s(&raw), "v", "--size", "ten"], true),
        "--size",
    );
    let empty = dir.path().join("empty.raw");
    write_file(&empty, &[]);
    assert_fails(
        &run(&["import", s(&empty), "v", "--format", "raw"], true),
        "nothing to import",
    );
}
