//! Backup tools over `celer nbd serve` (libnbd's nbdinfo and nbdcopy,
//! Debian package libnbd-bin): structured replies, `base:allocation` and
//! multi-conn are negotiated; `nbdinfo --map` of a mostly empty 4 GiB
//! volume shows exactly the written extents and holes; `nbdcopy` to a
//! file is byte-identical and takes time in proportion to the data (8 vs
//! 64 MiB), far below reading all 4 GiB (`nbdcopy --no-extents`). For an
//! engine device (block granularity) and a cluster volume of `celer up`
//! (chunk granularity; a snapshot taken half-way, so the volume reads
//! through two layers).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::up::{Up, BIN};

const VOLUME_BYTES: u64 = 4 << 30;
const MIB: u64 = 1 << 20;

fn tool(name: &str) -> &str {
    let found = Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{name} is missing: install libnbd-bin (scripts/install-deps.sh)"
    );
    name
}

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// Runs a command (bounded by `timeout`), which must succeed; returns
/// stdout and how long it took.
fn run(cmd: &mut Command, timeout: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = started.elapsed();
    let out = child.wait_with_output().expect("output");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (String::from_utf8_lossy(&out.stdout).into_owned(), took)
}

/// `celer nbd serve --device SPEC --socket SOCK`, killed when dropped.
struct Server(Child);

impl Server {
    fn start(spec: &str, sock: &Path, log: &Path) -> Server {
        let child = Command::new(BIN)
            .args(["nbd", "serve", "--device", spec, "--socket"])
            .arg(sock)
            .env("CELER_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log"))
            .spawn()
            .expect("spawn celer nbd serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "celer nbd serve did not listen: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Server(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes `len` bytes of `byte` at `offset` with qemu-io.
fn write(sock: &Path, offset: u64, len: u64, byte: u8) {
    run(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            &format!("write -P {byte} {offset} {len}"),
            &uri(sock),
        ]),
        Duration::from_secs(60),
    );
}

/// `nbdinfo --map` as (offset, length, type) rows.
fn map(sock: &Path) -> Vec<(u64, u64, u32)> {
    let (out, _) = run(
        Command::new(tool("nbdinfo")).args(["--map", &uri(sock)]),
        Duration::from_secs(60),
    );
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().expect("offset"),
                f[1].parse().expect("length"),
                f[2].parse().expect("type"),
            )
        })
        .collect()
}

/// The map `nbdinfo --map` must print for `written` (offset, len) ranges,
/// rounded out to `granularity`: data 0, hole+zero 3, merged.
fn expected_map(written: &[(u64, u64, u8)], granularity: u64) -> Vec<(u64, u64, u32)> {
    let mut data: Vec<(u64, u64)> = written
        .iter()
        .map(|&(o, l, _)| {
            (
                o / granularity * granularity,
                (o + l).div_ceil(granularity) * granularity,
            )
        })
        .collect();
    data.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in data {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let mut rows = Vec::new();
    let mut at = 0;
    for (s, e) in merged {
        if s > at {
            rows.push((at, s - at, 3));
        }
        rows.push((s, e - s, 0));
        at = e;
    }
    if at < VOLUME_BYTES {
        rows.push((at, VOLUME_BYTES - at, 3));
    }
    rows
}

/// Checks that `file` holds `written` (later ranges win) and zeroes
/// elsewhere, reading 8 MiB at a time.
fn check_file(file: &Path, written: &[(u64, u64, u8)]) {
    use std::io::Read;
    let mut f = std::fs::File::open(file).expect("open copy");
    assert_eq!(f.metadata().expect("meta").len(), VOLUME_BYTES);
    let mut buf = vec![0u8; 8 << 20];
    let mut at = 0u64;
    while at < VOLUME_BYTES {
        f.read_exact(&mut buf).expect("read copy");
        let end = at + buf.len() as u64;
        let mut expect = vec![0u8; buf.len()];
        for &(o, l, byte) in written {
            let (s, e) = (o.max(at), (o + l).min(end));
            if s < e {
                expect[(s - at) as usize..(e - at) as usize].fill(byte);
            }
        }
        if buf != expect {
            let i = buf
                .iter()
                .zip(&expect)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!(
                "{} differs from the volume at byte {}: {} instead of {}",
                file.display(),
                at + i as u64,
                buf[i],
                expect[i]
            );
        }
        at = end;
    }
}

/// The shortest of 3 nbdcopy runs with block status (a copy of little
/// data is short enough for a stray scheduling delay to double it).
fn nbdcopy_best_of_3(sock: &Path, out: &Path) -> Duration {
    (0..3)
        .map(|_| nbdcopy(sock, out, true))
        .min()
        .expect("3 runs")
}

/// nbdcopy of the export to `out`; returns how long it took.
fn nbdcopy(sock: &Path, out: &Path, extents: bool) -> Duration {
    let _ = std::fs::remove_file(out);
    let mut cmd = Command::new(tool("nbdcopy"));
    if !extents {
        cmd.arg("--no-extents");
    }
    cmd.arg(uri(sock)).arg(out);
    run(&mut cmd, Duration::from_secs(300)).1
}

/// The whole check on an export of a 4 GiB volume: negotiation, map at
/// `granularity`, copies of 8 and 64 MiB of data against reading it all.
/// `between` runs after the first 8 MiB are checked, before the rest is
/// written (a snapshot, for a cluster volume).
fn backup_tools_on(sock: &Path, dir: &Path, granularity: u64, what: &str, between: &dyn Fn()) {
    let (info, _) = run(
        Command::new(tool("nbdinfo")).arg(uri(sock)),
        Duration::from_secs(60),
    );
    println!("{what}: nbdinfo:\n{info}");
    assert!(info.contains("using structured packets"), "{info}");
    assert!(info.contains("base:allocation"), "{info}");
    assert!(info.contains("can_multi_conn: true"), "{info}");
    assert!(info.contains("can_df: true"), "{info}");

    // 8 MiB in pieces: whole chunks, blocks inside a chunk, the last block.
    let mut written: Vec<(u64, u64, u8)> = vec![
        (MIB, 4 * MIB, 0x55),
        (100 * MIB + 8192, 8192, 0x77),
        (100 * MIB + 64 * 1024, 4096, 0x78),
        (3 << 30, 4 * MIB - 16384, 0x66),
        (VOLUME_BYTES - 4096, 4096, 0x99),
    ];
    for &(o, l, b) in &written {
        write(sock, o, l, b);
    }
    let started = Instant::now();
    let rows = map(sock);
    println!(
        "{what}: nbdinfo --map of 4 GiB: {:.3} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        rows,
        expected_map(&written, granularity),
        "{what}: nbdinfo --map"
    );

    let copy = dir.join("copy.img");
    let t8 = nbdcopy_best_of_3(sock, &copy);
    check_file(&copy, &written);

    between();
    // 56 MiB more, in 8 MiB pieces spread over the volume.
    for i in 0..7u64 {
        let o = (i * 512 + 200) * MIB;
        write(sock, o, 8 * MIB, 0x10 + i as u8);
        written.push((o, 8 * MIB, 0x10 + i as u8));
    }
    assert_eq!(
        map(sock),
        expected_map(&written, granularity),
        "{what}: map after 64 MiB"
    );
    let t64 = nbdcopy_best_of_3(sock, &copy);
    check_file(&copy, &written);
    let full = dir.join("full.img");
    let t_all = nbdcopy(sock, &full, false);
    check_file(&full, &written);
    std::fs::remove_file(&full).expect("remove");
    println!(
        "{what}: nbdcopy of a 4 GiB volume (best of 3): 8 MiB of data {:.3} s, \
         64 MiB {:.3} s; reading all 4 GiB (--no-extents) {:.3} s",
        t8.as_secs_f64(),
        t64.as_secs_f64(),
        t_all.as_secs_f64()
    );
    assert!(
        t8 * 5 < t_all && t64 * 3 < t_all,
        "{what}: copying skips holes: 8 MiB {t8:?}, 64 MiB {t64:?}, all {t_all:?}"
    );
}

#[test]
fn backup_tools_read_only_the_data_of_an_engine_volume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("engine.img");
    run(
        Command::new(BIN)
            .args(["engine", "format", "--disk"])
            .arg(&disk)
            .args(["--size", "1G", "--shards", "2"])
            .env("CELER_LOG", "warn"),
        Duration::from_secs(60),
    );
    let sock = dir.path().join("nbd.sock");
    let spec = format!("engine:{},volume=3,size=4G", disk.display());
    let _server = Server::start(&spec, &sock, &dir.path().join("nbd.log"));
    backup_tools_on(&sock, dir.path(), 4096, "engine volume", &|| {});
}

#[test]
fn backup_tools_read_only_the_data_of_a_cluster_volume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up_dir: PathBuf = dir.path().join("up");
    let up = Up::start(&up_dir, "4G");
    let token = std::fs::read_to_string(&up.token_file).expect("token");
    let meta = celer_meta::client::MetaClient::new(&up.meta, token.trim());
    // Chunks are 1 MiB: the nodes list chunks, not blocks. A snapshot
    // after the first 8 MiB: the rest is written in the volume's new era,
    // over the snapshot's layer, and the map and copies hold both.
    backup_tools_on(&up.nbd_socket(), dir.path(), MIB, "cluster volume", &|| {
        meta.create_snapshot("default", "s1")
            .expect("snapshot create");
    });
    up.stop();
}
