//! `celer bench vhost`: drives vhost-user-blk back ends from the host with
//! the user-space driver in [`crate::frontend`] (no VM, no kernel driver in
//! the way) and prints IOPS, latency and back-end CPU per I/O, for Celer and
//! for qemu-storage-daemon measured in the same run, plus their ratios.
//!
//! Each back end runs as its own process so its CPU time can be read from
//! /proc. 4 KiB random reads and writes, QD 1/32/128, 1 and 2 queues; the
//! file device is also compared with fio (io_uring, O_DIRECT) on the same
//! file. Latency is measured per request from publish to used-ring poll.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use celer_device::{BlockDevice, DelayDevice, FileDevice, FileDeviceConfig, NullDevice};

use crate::frontend::{req_type, DriverQueue, Frontend, FrontendConfig};

/// Bytes per benchmark I/O.
pub const IO_BYTES: u32 = 4096;
/// Ring size the driver asks for (3 descriptors per request).
const BENCH_QUEUE_SIZE: u16 = 512;
/// Latency samples kept per queue and run.
const LATENCY_SAMPLES_MAX: usize = 4 << 20;

#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Measure only this already-running vhost-user-blk socket.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// File for the file-device runs (created and filled, 1 GiB, if missing).
    #[arg(long, default_value = "/tmp/celer-bench/disk.img")]
    pub file: PathBuf,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2)]
    pub seconds: u64,
    /// Queue depths (per queue).
    #[arg(long, value_delimiter = ',', default_value = "1,32,128")]
    pub depths: Vec<usize>,
    /// Queue counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub queues: Vec<usize>,
    /// Workloads: randread, randwrite.
    #[arg(long, value_delimiter = ',', default_value = "randread,randwrite")]
    pub rw: Vec<String>,
    /// Back ends: celer-null, qsd-null, celer-file, qsd-file, fio-file.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "celer-null,qsd-null,celer-file,qsd-file,fio-file"
    )]
    pub targets: Vec<String>,
    /// Runs per point and target (in rotation); the median is reported.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Celer's poll window in µs.
    #[arg(long, default_value_t = 50)]
    pub poll_us: u64,
    /// CPUs for the back-end processes (taskset list, e.g. "1"); empty: any.
    #[arg(long, default_value = "")]
    pub backend_cpus: String,
    /// CPUs for the driver threads, comma separated; empty: any.
    #[arg(long, value_delimiter = ',')]
    pub driver_cpus: Vec<usize>,
}

/// One measurement.
#[derive(Clone, Debug)]
pub struct BenchResult {
    pub target: String,
    pub queues: usize,
    pub depth: usize,
    pub rw: String,
    pub iops: f64,
    pub mean_us: f64,
    pub p99_us: f64,
    /// Back-end CPU µs per I/O (None: not measurable, e.g. fio).
    pub cpu_us_per_io: Option<f64>,
    pub errors: u64,
}

/// The longest `delay:MICROS` (10 s).
pub const DELAY_MAX_MICROS: u64 = 10_000_000;

/// Parses `null:SIZE`, `file:PATH` or `delay:MICROS:DEVICE` (DEVICE's
/// completions reported MICROS late: a test tool) into a device (used by
/// the binaries).
pub fn open_device(
    spec: &str,
    read_only: bool,
    direct: bool,
) -> anyhow::Result<Arc<dyn BlockDevice>> {
    if let Some(rest) = spec.strip_prefix("delay:") {
        let (micros, inner) = rest.split_once(':').ok_or_else(|| {
            anyhow::anyhow!("delay device must be delay:MICROS:DEVICE, got {spec:?}")
        })?;
        let micros: u64 = micros
            .parse()
            .map_err(|e| anyhow::anyhow!("delay:{micros}: not a number of microseconds: {e}"))?;
        // A test tool: beyond a few seconds every guest request times out,
        // and an absurd figure would overflow the clock.
        if micros > DELAY_MAX_MICROS {
            bail!("delay:{micros}: at most {DELAY_MAX_MICROS} microseconds");
        }
        let inner = open_device(inner, read_only, direct)?;
        return Ok(Arc::new(DelayDevice::new(
            inner,
            std::time::Duration::from_micros(micros),
        )));
    }
    if let Some(size) = spec.strip_prefix("null:") {
        return Ok(Arc::new(NullDevice::new(
            celer_device::parse_size(size).map_err(anyhow::Error::msg)?,
            read_only,
            false,
        )));
    }
    if let Some(path) = spec.strip_prefix("file:") {
        let dev = FileDevice::open(&FileDeviceConfig {
            path: path.into(),
            read_only,
            direct,
        })?;
        return Ok(Arc::new(dev));
    }
    bail!("device must be null:SIZE, file:PATH or delay:MICROS:DEVICE, got {spec:?}")
}

/// A back-end process we started; killed on drop.
struct Backend {
    name: String,
    child: Child,
    socket: PathBuf,
}

impl Backend {
    fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 of the whole line.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = f.get(11)?.parse().ok()?;
        let stime: f64 = f.get(12)?.parse().ok()?;
        // SAFETY: sysconf has no memory arguments.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Some((utime + stime) / hz)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn wait_for_socket(child: &mut Child, socket: &Path, name: &str) -> anyhow::Result<()> {
    for _ in 0..200 {
        if socket.exists() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "{name} exited with {status} before creating {}",
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("{name} did not create {} in 5 s", socket.display())
}

fn spawn_backend(
    name: &str,
    args: &BenchArgs,
    celer_serve_cmd: &[String],
    dir: &Path,
    queues: usize,
) -> anyhow::Result<Backend> {
    let socket = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&socket);
    let mut cmd_line: Vec<String> = Vec::new();
    if !args.backend_cpus.is_empty() {
        cmd_line.extend(["taskset".into(), "-c".into(), args.backend_cpus.clone()]);
    }
    let file = args.file.display().to_string();
    let sock = socket.display().to_string();
    match name {
        "celer-null" | "celer-file" => {
            cmd_line.extend(celer_serve_cmd.iter().cloned());
            let device = if name == "celer-null" {
                "null:1G".to_string()
            } else {
                format!("file:{file}")
            };
            cmd_line.extend([
                "--socket".into(),
                sock,
                "--device".into(),
                device,
                "--queues".into(),
                queues.to_string(),
                "--poll-us".into(),
                args.poll_us.to_string(),
            ]);
        }
        "qsd-null" | "qsd-file" => {
            let blockdev = if name == "qsd-null" {
                "driver=null-co,node-name=disk,size=1073741824,read-zeroes=off".to_string()
            } else {
                format!("driver=file,node-name=disk,filename={file},cache.direct=on,aio=io_uring")
            };
            cmd_line.extend([
                "qemu-storage-daemon".into(),
                "--blockdev".into(),
                blockdev,
                "--export".into(),
                format!(
                    "type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path={sock},writable=on,num-queues={queues}"
                ),
            ]);
        }
        other => bail!("unknown back end {other}"),
    }
    let mut child = Command::new(&cmd_line[0])
        .args(&cmd_line[1..])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {name}: {}", cmd_line.join(" ")))?;
    wait_for_socket(&mut child, &socket, name)?;
    Ok(Backend {
        name: name.to_string(),
        child,
        socket,
    })
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

struct QueueRun {
    latencies_ns: Vec<u32>,
    ios: u64,
    errors: u64,
}

fn pin_current_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Drives one queue at `depth` for `duration`.
fn drive(
    q: &mut DriverQueue<'_>,
    depth: usize,
    write: bool,
    duration: Duration,
    blocks: u64,
    seed: u64,
) -> anyhow::Result<QueueRun> {
    let depth = depth.min(q.slots());
    let kind = if write { req_type::OUT } else { req_type::IN };
    let mut rng = Rng(seed | 1);
    let sectors_per_io = u64::from(IO_BYTES / 512);
    let mut started = vec![Instant::now(); depth];
    let mut latencies_ns = Vec::with_capacity(LATENCY_SAMPLES_MAX);
    let mut done_slots: Vec<usize> = Vec::with_capacity(depth);
    let mut errors = 0u64;
    let mut ios = 0u64;
    let mut outstanding = depth;
    let start = Instant::now();
    let deadline = start + duration;
    for (slot, t) in started.iter_mut().enumerate() {
        let head = q.prepare(slot, kind, (rng.next() % blocks) * sectors_per_io, IO_BYTES);
        *t = Instant::now();
        q.publish(head);
    }
    q.kick_if_needed()?;
    let hard_stop = deadline + Duration::from_secs(10);
    while outstanding > 0 {
        done_slots.clear();
        q.poll_used(|id, _len| done_slots.push(id as usize / 3));
        if done_slots.is_empty() {
            if Instant::now() > hard_stop {
                bail!("back end stopped answering ({outstanding} requests outstanding)");
            }
            // Give the CPU to the back end if it shares ours.
            std::thread::yield_now();
            continue;
        }
        let now = Instant::now();
        for &slot in &done_slots {
            if q.status(slot) != 0 {
                errors += 1;
            }
            ios += 1;
            if latencies_ns.len() < LATENCY_SAMPLES_MAX {
                let ns = now.duration_since(started[slot]).as_nanos();
                latencies_ns.push(ns.min(u32::MAX as u128) as u32);
            }
            if now < deadline {
                let head = q.prepare(slot, kind, (rng.next() % blocks) * sectors_per_io, IO_BYTES);
                started[slot] = Instant::now();
                q.publish(head);
            } else {
                outstanding -= 1;
            }
        }
        q.kick_if_needed()?;
    }
    Ok(QueueRun {
        latencies_ns,
        ios,
        errors,
    })
}

/// Connects to `socket` and measures one (queues, depth, rw) point.
fn measure_socket(
    socket: &Path,
    queues: usize,
    depth: usize,
    write: bool,
    args: &BenchArgs,
    backend: Option<&Backend>,
) -> anyhow::Result<(f64, f64, f64, Option<f64>, u64)> {
    let slots = depth.min(BENCH_QUEUE_SIZE as usize / 3);
    let fe = Frontend::connect(
        socket,
        &FrontendConfig {
            queues,
            queue_size: BENCH_QUEUE_SIZE,
            slots,
            buf_bytes: IO_BYTES as usize,
            event_idx: true,
            backend_req: false,
        },
    )
    .with_context(|| format!("cannot connect to {}", socket.display()))?;
    let capacity = fe
        .capacity_sectors()
        .context("back end did not report a capacity")?;
    let blocks = (capacity / u64::from(IO_BYTES / 512)).max(1);
    let duration = Duration::from_secs(args.seconds);
    let cpu0 = backend.and_then(Backend::cpu_seconds);
    let t0 = Instant::now();
    let mut qs = fe.queues()?;
    let runs: Vec<anyhow::Result<QueueRun>> = std::thread::scope(|s| {
        let handles: Vec<_> = qs
            .iter_mut()
            .enumerate()
            .map(|(i, q)| {
                let cpu = (!args.driver_cpus.is_empty())
                    .then(|| args.driver_cpus[i % args.driver_cpus.len()]);
                s.spawn(move || {
                    if let Some(cpu) = cpu {
                        pin_current_thread(cpu);
                    }
                    drive(q, depth, write, duration, blocks, 0x9E37_79B9 + i as u64)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("driver thread panicked")))
            })
            .collect()
    });
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu1 = backend.and_then(Backend::cpu_seconds);
    drop(qs);
    drop(fe);
    let mut lat: Vec<u32> = Vec::new();
    let mut ios = 0u64;
    let mut errors = 0u64;
    for r in runs {
        let r = r?;
        ios += r.ios;
        errors += r.errors;
        lat.extend_from_slice(&r.latencies_ns);
    }
    if lat.is_empty() {
        bail!("no I/O completed");
    }
    lat.sort_unstable();
    let mean_us = lat.iter().map(|&x| x as f64).sum::<f64>() / lat.len() as f64 / 1000.0;
    let p99_us = lat[(lat.len() * 99 / 100).min(lat.len() - 1)] as f64 / 1000.0;
    let iops = ios as f64 / elapsed;
    let cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) if ios > 0 => Some((b - a) * 1e6 / ios as f64),
        _ => None,
    };
    Ok((iops, mean_us, p99_us, cpu, errors))
}

fn fio_file(
    file: &Path,
    queues: usize,
    depth: usize,
    write: bool,
    seconds: u64,
) -> anyhow::Result<(f64, f64, f64)> {
    let rw = if write { "randwrite" } else { "randread" };
    let out = Command::new("fio")
        .args([
            "--name=celer-bench",
            &format!("--filename={}", file.display()),
            "--ioengine=io_uring",
            "--direct=1",
            &format!("--rw={rw}"),
            "--bs=4k",
            &format!("--iodepth={depth}"),
            &format!("--numjobs={queues}"),
            "--time_based=1",
            &format!("--runtime={seconds}"),
            "--group_reporting=1",
            "--randrepeat=0",
            "--norandommap=1",
            "--output-format=json",
        ])
        .output()
        .context("cannot run fio (install the fio package)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio JSON")?;
    let d = &v["jobs"][0][if write { "write" } else { "read" }];
    let iops = d["iops"].as_f64().context("fio iops")?;
    let mean_us = d["lat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1000.0;
    let p99_us = d["clat_ns"]["percentile"]["99.000000"]
        .as_f64()
        .unwrap_or(0.0)
        / 1000.0;
    Ok((iops, mean_us, p99_us))
}

/// Bytes of the benchmark file.
const BENCH_FILE_BYTES: u64 = 1 << 30;

/// Creates the benchmark file filled with data (not holes or unwritten
/// extents, which the file system would answer without touching the disk),
/// so every back end and fio read real blocks whatever ran before.
fn ensure_file(path: &Path) -> anyhow::Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == BENCH_FILE_BYTES) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut rng = Rng(0x5eed);
    for _ in 0..BENCH_FILE_BYTES / chunk.len() as u64 {
        for w in chunk.chunks_exact_mut(8) {
            w.copy_from_slice(&rng.next().to_le_bytes());
        }
        std::io::Write::write_all(&mut f, &chunk)?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Runs the benchmark and prints the table and the ratios.
/// `celer_serve_cmd`: program and arguments that start Celer's vhost server
/// (e.g. `["/usr/bin/celer", "vhost", "serve"]`); the bench appends
/// `--socket S --device D --queues N --poll-us P`.
pub fn run_bench(args: &BenchArgs, celer_serve_cmd: &[String]) -> anyhow::Result<()> {
    let results = collect(args, celer_serve_cmd)?;
    print_results(&results);
    Ok(())
}

/// Runs every measurement and returns the results (printed as they come).
pub fn collect(args: &BenchArgs, celer_serve_cmd: &[String]) -> anyhow::Result<Vec<BenchResult>> {
    let mut results = Vec::new();
    let max_queues = args.queues.iter().copied().max().unwrap_or(1);
    println!(
        "{:<12} {:>2} {:>4} {:<9} {:>10} {:>9} {:>9} {:>12} {:>6}",
        "target", "q", "qd", "rw", "IOPS", "mean_us", "p99_us", "cpu_us/io", "errors"
    );
    let mut record = |r: BenchResult| {
        println!(
            "{:<12} {:>2} {:>4} {:<9} {:>10.0} {:>9.1} {:>9.1} {:>12} {:>6}",
            r.target,
            r.queues,
            r.depth,
            r.rw,
            r.iops,
            r.mean_us,
            r.p99_us,
            r.cpu_us_per_io
                .map(|c| format!("{c:.2}"))
                .unwrap_or_else(|| "-".into()),
            r.errors
        );
        results.push(r);
    };
    let points = || {
        let mut v = Vec::new();
        for rw in &args.rw {
            for &q in &args.queues {
                for &d in &args.depths {
                    v.push((rw.clone(), q, d));
                }
            }
        }
        v
    };
    if let Some(socket) = &args.socket {
        for (rw, q, d) in points() {
            let (iops, mean_us, p99_us, cpu, errors) =
                measure_socket(socket, q, d, rw == "randwrite", args, None)?;
            record(BenchResult {
                target: "socket".into(),
                queues: q,
                depth: d,
                rw,
                iops,
                mean_us,
                p99_us,
                cpu_us_per_io: cpu,
                errors,
            });
        }
        return Ok(results);
    }
    let dir = std::env::temp_dir().join(format!("celer-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    if args.targets.iter().any(|t| t.ends_with("-file")) {
        ensure_file(&args.file)?;
    }
    // Every back end runs for the whole bench (idle ones cost nothing); each
    // point is measured on every target back to back, `repeat` times in
    // rotation, and the median (by IOPS) is kept: drift in the host (its
    // disk, other processes) then hits all targets alike.
    let mut backends = Vec::new();
    for target in &args.targets {
        if target == "fio-file" {
            continue;
        }
        match spawn_backend(target, args, celer_serve_cmd, &dir, max_queues) {
            Ok(b) => backends.push(b),
            Err(e) => eprintln!("skipping {target}: {e:#}"),
        }
    }
    for (rw, q, d) in points() {
        let write = rw == "randwrite";
        for target in &args.targets {
            let mut runs: Vec<BenchResult> = Vec::new();
            for _ in 0..args.repeat.max(1) {
                let r = if target == "fio-file" {
                    fio_file(&args.file, q, d, write, args.seconds)
                        .map(|(iops, mean_us, p99_us)| (iops, mean_us, p99_us, None, 0))
                } else if let Some(b) = backends.iter().find(|b| &b.name == target) {
                    let r = measure_socket(&b.socket, q, d, write, args, Some(b));
                    // Let the back end notice the disconnect before the next run.
                    std::thread::sleep(Duration::from_millis(100));
                    r
                } else {
                    break;
                };
                match r {
                    Ok((iops, mean_us, p99_us, cpu_us_per_io, errors)) => runs.push(BenchResult {
                        target: target.clone(),
                        queues: q,
                        depth: d,
                        rw: rw.clone(),
                        iops,
                        mean_us,
                        p99_us,
                        cpu_us_per_io,
                        errors,
                    }),
                    Err(e) => eprintln!("{target} q={q} qd={d} {rw}: {e:#}"),
                }
            }
            if runs.is_empty() {
                continue;
            }
            runs.sort_by(|a, b| a.iops.total_cmp(&b.iops));
            let median = runs.swap_remove(runs.len() / 2);
            record(median);
        }
    }
    drop(backends);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(results)
}

/// Prints the ratios the targets are stated in.
pub fn print_results(results: &[BenchResult]) {
    let key = |r: &BenchResult| (r.target.clone(), r.queues, r.depth, r.rw.clone());
    let by: BTreeMap<_, _> = results.iter().map(|r| (key(r), r)).collect();
    let get =
        |t: &str, q: usize, d: usize, rw: &str| by.get(&(t.to_string(), q, d, rw.to_string()));
    println!();
    println!("ratios (same run):");
    for r in results.iter().filter(|r| r.target.starts_with("celer-")) {
        let peer = r.target.replace("celer-", "qsd-");
        if let Some(p) = get(&peer, r.queues, r.depth, &r.rw) {
            println!(
                "  {:<10} q={} qd={:<3} {:<9} latency {:.2}x {peer}, IOPS {:.2}x {peer}",
                r.target,
                r.queues,
                r.depth,
                r.rw,
                r.mean_us / p.mean_us,
                r.iops / p.iops
            );
        }
        if r.target == "celer-file" {
            if let Some(f) = get("fio-file", r.queues, r.depth, &r.rw) {
                println!(
                    "  {:<10} q={} qd={:<3} {:<9} IOPS {:.2}x fio on the same file, latency {:.2}x",
                    r.target,
                    r.queues,
                    r.depth,
                    r.rw,
                    r.iops / f.iops,
                    r.mean_us / f.mean_us
                );
            }
        }
        if r.queues == 2 {
            if let Some(one) = get(&r.target, 1, r.depth, &r.rw) {
                println!(
                    "  {:<10} qd={:<3} {:<9} 2 queues = {:.2}x 1 queue (IOPS)",
                    r.target,
                    r.depth,
                    r.rw,
                    r.iops / one.iops
                );
            }
        }
    }
}
