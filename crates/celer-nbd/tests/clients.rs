//! Real NBD clients against the server: qemu-io, qemu-img and fio's nbd
//! engine, on a FileDevice and on an engine volume. The tools must be
//! installed (qemu-utils, fio); a missing tool fails the test.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use celer_device::{BlockDevice, FileDevice, FileDeviceConfig};
use celer_engine::{Engine, EngineDevice, EngineDeviceConfig, FormatOptions};
use common::*;

fn tool(name: &str, args: &[&str]) -> String {
    let out = Command::new(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name} (install qemu-utils and fio): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{name} {args:?} failed:\n{text}");
    text
}

fn qemu_io(uri: &str, cmd: &str) -> String {
    tool("qemu-io", &["-f", "raw", "-c", cmd, uri])
}

fn file_device(dir: &Path, size: u64) -> Arc<dyn BlockDevice> {
    let path = dir.join("disk.raw");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(size))
        .expect("create disk file");
    Arc::new(
        FileDevice::open(&FileDeviceConfig {
            path,
            read_only: false,
            direct: false,
        })
        .expect("open file device"),
    )
}

fn engine_device(dir: &Path, volume_size: u64) -> Arc<dyn BlockDevice> {
    let path = dir.join("engine.disk");
    Engine::format(
        &path,
        &FormatOptions {
            chunk_blocks: 16,
            spare_blocks: 4,
            shard_count: 2,
            journal_blocks: 64,
            create_size_bytes: Some(4 * volume_size),
        },
    )
    .expect("format engine");
    Arc::new(
        EngineDevice::open(&EngineDeviceConfig {
            path,
            volume: 1,
            size_bytes: volume_size,
            read_only: false,
        })
        .expect("open engine volume"),
    )
}

/// qemu-io writes a pattern over Unix and reads it back over TCP; a wrong
/// pattern is reported as a mismatch.
fn qemu_io_round_trip(device: Arc<dyn BlockDevice>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sock, addr, _server) = start(dir.path(), device, false, true, None);
    let unix = format!("nbd+unix:///{EXPORT}?socket={}", sock.display());
    let tcp = format!(
        "nbd://127.0.0.1:{}/{EXPORT}",
        addr.expect("tcp address").port()
    );
    let out = qemu_io(&unix, "write -P 0xab 0 1M");
    assert!(out.contains("wrote 1048576/1048576"), "{out}");
    let out = qemu_io(&tcp, "read -P 0xab 0 1M");
    assert!(out.contains("read 1048576/1048576"), "{out}");
    assert!(!out.contains("verification failed"), "{out}");
    // Unaligned (for a 4 KiB-block device qemu does read-modify-write).
    let out = qemu_io(&tcp, "write -P 0x5a 1536 1024");
    assert!(out.contains("wrote 1024/1024"), "{out}");
    let out = qemu_io(&unix, "read -P 0x5a 1536 1024");
    assert!(!out.contains("verification failed"), "{out}");
    let out = qemu_io(&unix, "read -P 0xab 0 1536");
    assert!(!out.contains("verification failed"), "{out}");
    // The check can fail: a wrong pattern is reported.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0xcd 0 1M", &unix])
        .output()
        .expect("run qemu-io");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && text.contains("Pattern verification failed"),
        "qemu-io should report the mismatch:\n{text}"
    );
    // Flush, discard and write-zeroes as qemu sends them.
    let out = qemu_io(&unix, "flush");
    assert!(!out.contains("failed"), "{out}");
    let out = qemu_io(&unix, "write -z 0 64k");
    assert!(out.contains("wrote 65536/65536"), "{out}");
    let out = qemu_io(&unix, "read -P 0 0 64k");
    assert!(!out.contains("verification failed"), "{out}");
    let out = qemu_io(&unix, "discard 64k 64k");
    assert!(!out.contains("failed"), "{out}");
    let info = tool("qemu-img", &["info", "-f", "raw", &unix]);
    assert!(info.contains("virtual size: 32 MiB"), "{info}");
}

/// qemu-img convert a random raw image into the export and back; compare.
fn qemu_img_convert_round_trip(device: Arc<dyn BlockDevice>, label: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = device.info().size_bytes as usize;
    let (sock, _, _server) = start(dir.path(), device, false, false, None);
    let uri = format!("nbd+unix:///{EXPORT}?socket={}", sock.display());
    let src = dir.path().join("src.raw");
    let mut data = pattern(0x11, size);
    // Leave holes so convert exercises zero detection (write-zeroes/trim).
    for hole in data.chunks_mut(1 << 20).step_by(3) {
        hole.fill(0);
    }
    std::fs::write(&src, &data).expect("write source image");
    let src_s = src.to_str().expect("utf-8 path");
    let t = Instant::now();
    tool(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri],
    );
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "{label}: qemu-img convert into the export: {} MiB in {secs:.3} s ({:.0} MiB/s)",
        size >> 20,
        (size >> 20) as f64 / secs
    );
    let back = dir.path().join("back.raw");
    let back_s = back.to_str().expect("utf-8 path");
    tool(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, back_s],
    );
    tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, back_s],
    );
    tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
    );
    // compare can fail: change one byte of the source.
    data[size / 2 + 7] ^= 0xff;
    std::fs::write(&src, &data).expect("rewrite source image");
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", src_s, &uri])
        .output()
        .expect("qemu-img compare");
    assert_eq!(
        out.status.code(),
        Some(1),
        "compare must see the difference"
    );
}

/// fio's nbd engine (libnbd): random writes at queue depth 16, then verify.
fn fio_verify(device: Arc<dyn BlockDevice>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sock, _, _server) = start(dir.path(), device, false, false, None);
    let uri = format!("--uri=nbd+unix:///{EXPORT}?socket={}", sock.display());
    let out = tool(
        "fio",
        &[
            "--name=nbdjob",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            // No verify state files left in the working directory.
            "--verify_state_save=0",
        ],
    );
    assert!(out.contains("err= 0"), "{out}");
    assert!(
        !out.contains("verify failed") && !out.contains("bad header"),
        "fio reported a verify failure:\n{out}"
    );
    // The verify pass read back every block written.
    assert!(out.contains("total=4096,4096"), "{out}");
}

#[test]
fn qemu_io_file_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    qemu_io_round_trip(file_device(dir.path(), 32 << 20));
}

#[test]
fn qemu_io_engine_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    qemu_io_round_trip(engine_device(dir.path(), 32 << 20));
}

#[test]
fn qemu_img_convert_file_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    qemu_img_convert_round_trip(file_device(dir.path(), 32 << 20), "file");
}

#[test]
fn qemu_img_convert_engine_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    qemu_img_convert_round_trip(engine_device(dir.path(), 32 << 20), "engine");
}

#[test]
fn fio_verify_file_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    fio_verify(file_device(dir.path(), 32 << 20));
}

#[test]
fn fio_verify_engine_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    fio_verify(engine_device(dir.path(), 32 << 20));
}
