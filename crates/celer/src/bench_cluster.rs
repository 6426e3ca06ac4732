//! `celer bench cluster`: 4 KiB random writes and reads at QD1 and QD32
//! against a real 3-replica cluster on this machine (a control service and
//! three storage-node processes, one disk file each, all on one disk),
//! driven in-process through `celer-client`; in the same run the physical
//! floor (fio: a durable 4K write and a 4K O_DIRECT read on the same disk,
//! plus a loopback TCP round trip) and, with `--ceph`, the Ceph 16 peer
//! (3 BlueStore OSDs, size 3, fio's rbd engine). Celer and Ceph take turns
//! workload by workload, so a noisy neighbour hurts both alike.
//!
//! CPU per I/O counts every process of a side: for Celer the bench process
//! (the client; getrusage) plus the control service and the nodes
//! (/proc/PID/stat utime+stime), for Ceph fio (the librbd client) plus
//! mon, mgr and the OSDs. Every process this starts is stopped when it
//! returns, on error too (`Procs` guard, SIGTERM then SIGKILL; children
//! also get SIGTERM if this process dies).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use celer_device::{DeviceQueue, IoCompletion, IoOp, IoRequest, IoSegment};
use celer_meta::api::CreateVolume;
use celer_meta::client::MetaClient;
use clap::Args;

use crate::fio::{self, Figures};

#[derive(Args, Debug)]
pub struct ClusterBenchArgs {
    /// Directory for the node disks, the control service's data and the
    /// floor's fio file (on the disk to measure). Its `meta` and `node*`
    /// entries are wiped at start.
    #[arg(long, default_value = "/var/tmp/celer-bench-cluster")]
    pub dir: PathBuf,
    /// Seconds per workload (and per floor measurement).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub runtime: u32,
    /// Size of the volume; the random I/O covers all of it (filled first).
    #[arg(long, default_value = "1G", value_parser = celer_device::parse_size)]
    pub volume_size: u64,
    /// Also run the Ceph peer (scripts/peers/ceph/ceph-up.sh brings it up, or
    /// a running one is reused) and print Celer/Ceph ratios.
    #[arg(long)]
    pub ceph: bool,
    /// Run only the workloads whose name contains this (randwrite-qd1,
    /// randread-qd32, randwrite-qd32-2q, ...).
    #[arg(long)]
    pub only: Option<String>,
    /// Format the node disk files here and write zeros into their holes
    /// before the nodes start, so that no measured write allocates blocks in
    /// the file system (as on a block device). Default: sparse files, as
    /// `celer node serve --create` makes them. (Two A/B pairs on this
    /// machine showed no difference beyond its noise.)
    #[arg(long)]
    pub preallocate: bool,
    /// Engine shards (threads) per storage node.
    #[arg(long, default_value_t = 2)]
    pub node_shards: u32,
    /// Client: keep polling this many µs for completions before sleeping in
    /// epoll (0: sleep at once; the two cores here are shared with the nodes).
    #[arg(long, default_value_t = 0)]
    pub poll_us: u64,
    /// Nodes: keep polling this many µs after activity before sleeping
    /// (`celer node serve --busy-poll-us`).
    #[arg(long, default_value_t = 0)]
    pub node_busy_poll_us: u64,
    /// Keep the nodes' buffers on 4 KiB pages (by default they run with
    /// `--hugepages`, and the bench reserves 2 MiB pages for the run when
    /// run as root).
    #[arg(long)]
    pub no_hugepages: bool,
    /// Where ceph-up.sh / ceph-down.sh live (default: scripts/peers/ceph of
    /// this checkout).
    #[arg(long)]
    pub ceph_scripts: Option<PathBuf>,
    /// The Ceph peer's directory (BASE of the scripts).
    #[arg(long, default_value = "/var/tmp/celer-ceph")]
    pub ceph_base: PathBuf,
    /// Leave a Ceph peer this run started running afterwards (one that was
    /// already running is always left running).
    #[arg(long)]
    pub keep_ceph: bool,
    /// After the measurements, with the cluster still up, run this shell
    /// command with CELER_BIN, CELER_META, CELER_TOKEN and CELER_VOLUME set
    /// (e.g. the in-guest benchmark); its failure fails the run.
    #[arg(long)]
    pub exec: Option<String>,
    /// Rounds of the authentication-cost comparison: QD1 4 KiB writes and
    /// reads on this cluster and on a second one whose nodes check no
    /// credential (`--insecure-no-auth`, loopback only), taking turns
    /// (0: skip it).
    #[arg(long, default_value_t = 21)]
    pub auth_rounds: u32,
    /// Rounds of the data-TLS-cost comparison: QD1 4 KiB writes and reads
    /// on two fresh clusters, one whose nodes and client speak data TLS
    /// (certificates made with openssl for the run), one plain, taking
    /// turns (0: skip it).
    #[arg(long, default_value_t = 0)]
    pub tls_rounds: u32,
    /// Length of one round of the authentication and TLS comparisons, per
    /// side and workload.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub side_round_ms: u64,
    /// Rounds of the scrub-cost comparison on this cluster: QD1 4 KiB reads
    /// and writes with the nodes' scrub paused and running at its default
    /// rate, taking turns; prints the latency change and the scrub's
    /// throughput (0: skip it).
    #[arg(long, default_value_t = 0)]
    pub scrub_rounds: u32,
    /// Rounds of the snapshot-cost measurement on this cluster (0: skip
    /// it). Each round times `snapshot create` and `volume clone` on the
    /// filled benchmark volume and on a filled 64 MiB one; QD1 4 KiB writes
    /// to blocks not yet written since the snapshot (copy-on-write: the
    /// first write of a chunk in the new layer allocates its slot), then
    /// the same blocks again; and QD1 reads of a clone's unwritten blocks
    /// beside the same blocks of its parent. Compared with QD1 writes
    /// before any snapshot.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=20))]
    pub snapshot_rounds: u32,
}

/// One workload: `queues` client queues on as many threads, `qd` requests in
/// flight in total (split evenly).
#[derive(Clone, Copy, Debug)]
struct Workload {
    rw: &'static str,
    op: IoOp,
    qd: usize,
    queues: usize,
}

impl Workload {
    fn name(&self) -> String {
        if self.queues == 1 {
            format!("{}-qd{}", self.rw, self.qd)
        } else {
            format!("{}-qd{}-{}q", self.rw, self.qd, self.queues)
        }
    }
    fn label(&self) -> String {
        if self.queues == 1 {
            format!("{} QD{}", self.rw, self.qd)
        } else {
            format!("{} QD{} {}q", self.rw, self.qd, self.queues)
        }
    }
}

const WORKLOADS: [Workload; 6] = [
    Workload {
        rw: "randwrite",
        op: IoOp::Write,
        qd: 1,
        queues: 1,
    },
    Workload {
        rw: "randwrite",
        op: IoOp::Write,
        qd: 32,
        queues: 1,
    },
    Workload {
        rw: "randwrite",
        op: IoOp::Write,
        qd: 32,
        queues: 2,
    },
    Workload {
        rw: "randread",
        op: IoOp::Read,
        qd: 1,
        queues: 1,
    },
    Workload {
        rw: "randread",
        op: IoOp::Read,
        qd: 32,
        queues: 1,
    },
    Workload {
        rw: "randread",
        op: IoOp::Read,
        qd: 32,
        queues: 2,
    },
];

const BLOCK_BYTES: u64 = 4096;
/// QD1 writes per phase of a snapshot round (and reads of the clone).
const SNAPSHOT_WRITES: usize = 2000;
/// The small volume whose snapshot and clone times are compared with the
/// benchmark volume's.
const SNAPSHOT_SMALL_BYTES: u64 = 64 << 20;
const VOLUME_NAME: &str = "bench";
/// Copies of every block the benchmark volumes keep.
const REPLICAS: u8 = 3;
/// Latency samples kept per queue (more I/Os are counted but not sampled).
const SAMPLES_MAX: usize = 8_000_000;
/// Prefill request size and depth.
const FILL_REQUEST_BYTES: u64 = 256 * 1024;
const FILL_DEPTH: usize = 16;
/// How long to wait for a child to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Loopback round trips timed for the floor (after `RTT_WARMUP`).
const RTT_ROUNDS: usize = 20_000;
const RTT_WARMUP: usize = 2_000;
const RTT_MESSAGE_BYTES: usize = 64;

// ---------------------------------------------------------------- processes

/// Child processes this run started; stops them when dropped.
struct Procs {
    children: Vec<(String, Child)>,
    /// The same pids, for the signal handler (Ctrl-C).
    pids: Arc<Mutex<Vec<i32>>>,
}

impl Procs {
    fn new() -> Procs {
        let pids: Arc<Mutex<Vec<i32>>> = Arc::new(Mutex::new(Vec::new()));
        let p = pids.clone();
        crate::on_termination(move || {
            for &pid in p.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                // SAFETY: signals a child we started and have not reaped.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            eprintln!("celer bench cluster: interrupted, stopped the cluster's processes");
            std::process::exit(130);
        });
        Procs {
            children: Vec::new(),
            pids,
        }
    }

    fn spawn(&mut self, name: &str, mut cmd: Command, log: &Path) -> Result<u32> {
        let log_file =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        cmd.stdout(Stdio::null()).stderr(log_file);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to send
        // SIGTERM to the child when this process exits (even by SIGKILL).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("start {name}"))?;
        let pid = child.id();
        self.pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pid as i32);
        self.children.push((name.to_string(), child));
        Ok(pid)
    }

    /// Fails if a child has exited (it should run until we stop it).
    fn check_alive(&mut self, logs: &Path) -> Result<()> {
        for (name, c) in &mut self.children {
            if let Ok(Some(st)) = c.try_wait() {
                bail!("{name} exited ({st}); its log is in {}", logs.display());
            }
        }
        Ok(())
    }

    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|(_, c)| c.id()).collect()
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        // Nodes first (they checkpoint on SIGTERM), the control service last.
        for (_, c) in self.children.iter_mut().rev() {
            // SAFETY: signals a child we started and have not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for (name, c) in self.children.iter_mut().rev() {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        eprintln!("{name} did not stop after SIGTERM: SIGKILL");
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        self.pids.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// A port for a daemon of the bench, reserved while the bench runs (see
/// celer-ports): the daemon binds it after this returns.
fn free_port() -> Result<SocketAddr> {
    celer_ports::reserve().context("reserve a loopback port")
}

fn random_token() -> Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("read /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// A running cluster: control service + 3 nodes as child processes.
struct Cluster {
    procs: Procs,
    meta_url: String,
    token: String,
    /// The nodes' admin listeners (`/metrics`).
    admins: Vec<SocketAddr>,
    /// The block device the nodes' disk files live on (its
    /// `/sys/dev/block/MAJ:MIN/stat`), when there is one.
    disk_stat: Option<PathBuf>,
}

/// Counters of the block device under the nodes' disks
/// (`/sys/dev/block/MAJ:MIN/stat`): (writes completed, sectors written,
/// flushes completed).
fn disk_counters(stat: &Path) -> Option<(u64, u64, u64)> {
    let s = std::fs::read_to_string(stat).ok()?;
    let f: Vec<u64> = s
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // Fields (Documentation/block/stat.rst): reads 0-3, writes 4-7, in
    // flight, io and queue ticks, discards 11-14, flushes 15-16.
    Some((*f.get(4)?, *f.get(6)?, f.get(15).copied().unwrap_or(0)))
}

/// The stat file of the block device holding `dir`.
fn disk_stat_of(dir: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).ok()?.dev();
    let p = PathBuf::from(format!(
        "/sys/dev/block/{}:{}/stat",
        libc::major(dev),
        libc::minor(dev)
    ));
    p.exists().then_some(p)
}

/// Voluntary + involuntary context switches of every thread of `pid`
/// (`/proc/PID/task/*/status`; a process's own status counts only its
/// first thread).
fn ctx_switches(pid: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|s| {
            s.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// How a benchmark cluster's data port runs.
enum DataPort {
    /// Authenticated, plain TCP (what a cluster runs by default).
    Auth,
    /// `--insecure-no-auth`: no credential checked.
    NoAuth,
    /// `--tls-creds DIR` on the nodes, and the client's data TLS from DIR.
    Tls(PathBuf),
}

fn start_cluster(args: &ClusterBenchArgs, dir: &Path, port: &DataPort) -> Result<Cluster> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    for entry in ["meta", "node0", "node1", "node2"] {
        let p = dir.join(entry);
        if p.exists() {
            std::fs::remove_dir_all(&p).with_context(|| format!("remove {}", p.display()))?;
        }
    }
    let exe = std::env::current_exe().context("locate the celer binary")?;
    let token = random_token()?;
    let meta_addr = free_port()?;
    let meta_url = format!("http://{meta_addr}");
    let mut procs = Procs::new();
    let mut meta = Command::new(&exe);
    // A long lease: a benchmark on a loaded 2-core machine is no failure test,
    // and a node marked down mid-run would measure fail-over instead.
    meta.args([
        "meta",
        "serve",
        "--listen",
        &meta_addr.to_string(),
        "--data",
    ])
    .arg(dir.join("meta"))
    .args(["--heartbeat-ms", "500", "--lease-ms", "10000"])
    .env("CELER_TOKEN", &token)
    .env("CELER_LOG", "warn");
    procs.spawn("control service", meta, &dir.join("meta.log"))?;
    let mc = MetaClient::new(&meta_url, &token);
    let deadline = Instant::now() + Duration::from_secs(30);
    while mc.nodes().is_err() {
        procs.check_alive(dir)?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "the control service did not answer within 30 s (log: {}/meta.log)",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Each node holds a full copy (3 nodes, 3 replicas): the volume, the
    // engine's spare blocks and journals; with snapshot rounds, the chunk
    // slots their writes allocate in new layers and the 64 MiB volume.
    let snapshot_bytes = u64::from(args.snapshot_rounds)
        * args.volume_size.min(SNAPSHOT_WRITES as u64 * (1 << 20))
        + 2 * SNAPSHOT_SMALL_BYTES;
    let disk_bytes = (args.volume_size + args.volume_size / 3 + (512 << 20) + snapshot_bytes)
        .next_multiple_of(1 << 20);
    let mut admins = Vec::new();
    for i in 0..3 {
        let admin = free_port()?;
        admins.push(admin);
        let disk = dir.join(format!("node{i}/disk.img"));
        if args.preallocate {
            format_allocated(&disk, disk_bytes, args.node_shards)?;
        }
        let mut node = Command::new(&exe);
        node.args(["node", "serve", "--disk"])
            .arg(&disk)
            .args(["--create", &disk_bytes.to_string()])
            .args(["--shards", &args.node_shards.to_string()])
            .args(["--busy-poll-us", &args.node_busy_poll_us.to_string()])
            .args(if args.no_hugepages {
                &[][..]
            } else {
                &["--hugepages"][..]
            })
            .args(["--listen", &free_port()?.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--meta", &meta_url])
            .args(["--domain", &format!("host{i}")])
            .args(match port {
                DataPort::Auth => vec![],
                DataPort::NoAuth => vec![std::ffi::OsStr::new("--insecure-no-auth")],
                DataPort::Tls(d) => vec![std::ffi::OsStr::new("--tls-creds"), d.as_os_str()],
            })
            .env("CELER_TOKEN", &token)
            .env("CELER_LOG", "warn");
        procs.spawn(
            &format!("storage node {i}"),
            node,
            &dir.join(format!("node{i}.log")),
        )?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        procs.check_alive(dir)?;
        if let Ok(t) = mc.route() {
            let up = t.nodes.iter().filter(|n| n.up).count();
            let synced = t
                .partitions
                .iter()
                .all(|p| p.all_in_sync() && p.members.len() == 3);
            if up == 3 && synced && !t.partitions.is_empty() {
                break;
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the cluster did not form within 60 s (logs in {})",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    mc.create_volume(&CreateVolume {
        name: VOLUME_NAME.into(),
        size_bytes: args.volume_size,
        replicas: Some(REPLICAS),
        sector_size_bytes: None,
    })
    .context("create the benchmark volume")?;
    Ok(Cluster {
        procs,
        meta_url,
        token,
        admins,
        disk_stat: disk_stat_of(dir),
    })
}

/// Formats `disk` as `celer node serve --create` would, then writes zeros
/// into every hole (holes read as zeros: the content does not change), so
/// that no write of the benchmark allocates blocks in the file system.
fn format_allocated(disk: &Path, size: u64, shards: u32) -> Result<()> {
    if let Some(parent) = disk.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    celer_engine::Engine::format(
        disk,
        &celer_engine::FormatOptions {
            shard_count: shards,
            create_size_bytes: Some(size),
            ..Default::default()
        },
    )
    .with_context(|| format!("format {}", disk.display()))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .with_context(|| format!("open {}", disk.display()))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let zeros = vec![0u8; FILL_REQUEST_BYTES as usize * 4];
    let mut off: i64 = 0;
    let end = size as i64;
    while off < end {
        // SAFETY: lseek on a file descriptor we own.
        let hole = unsafe { libc::lseek(fd, off, libc::SEEK_HOLE) };
        if hole < 0 || hole >= end {
            break;
        }
        // SAFETY: as above.
        let data = unsafe { libc::lseek(fd, hole, libc::SEEK_DATA) };
        let hole_end = if data < 0 { end } else { data.min(end) };
        let mut at = hole;
        while at < hole_end {
            let n = (hole_end - at).min(zeros.len() as i64) as usize;
            std::os::unix::fs::FileExt::write_all_at(&file, &zeros[..n], at as u64)
                .with_context(|| format!("write zeros into {}", disk.display()))?;
            at += n as i64;
        }
        off = hole_end;
    }
    file.sync_all()
        .with_context(|| format!("sync {}", disk.display()))?;
    Ok(())
}

// ---------------------------------------------------------------- CPU time

fn self_cpu_s() -> f64 {
    rusage_s(libc::RUSAGE_SELF)
}

/// CPU of terminated, waited-for children (fio runs) so far.
fn children_cpu_s() -> f64 {
    rusage_s(libc::RUSAGE_CHILDREN)
}

fn rusage_s(who: libc::c_int) -> f64 {
    // SAFETY: rusage is plain integers; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// utime + stime of a live process (all its threads), in seconds.
fn proc_cpu_s(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at field 3;
    // utime and stime are fields 14 and 15.
    let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) else {
        return 0.0;
    };
    let mut f = rest.split_whitespace().skip(11);
    let utime: f64 = f.next().and_then(|x| x.parse().ok()).unwrap_or(0.0);
    let stime: f64 = f.next().and_then(|x| x.parse().ok()).unwrap_or(0.0);
    (utime + stime) / clock_ticks_per_s()
}

/// (busy, total) jiffies over all CPUs (busy excludes idle and iowait).
fn host_ticks() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn ncpus() -> f64 {
    std::thread::available_parallelism()
        .map(|n| n.get() as f64)
        .unwrap_or(1.0)
}

/// CPU snapshot of one side: `pids` (live daemons), this process, and the
/// children we have waited for (fio), plus the whole machine.
struct CpuSnap {
    daemons_s: f64,
    self_s: f64,
    children_s: f64,
    host: (u64, u64),
    at: Instant,
}

impl CpuSnap {
    fn take(pids: &[u32]) -> CpuSnap {
        CpuSnap {
            daemons_s: pids.iter().map(|&p| proc_cpu_s(p)).sum(),
            self_s: self_cpu_s(),
            children_s: children_cpu_s(),
            host: host_ticks(),
            at: Instant::now(),
        }
    }
}

/// CPU used between two snapshots: (seconds of the side's processes,
/// cores busy with anything else on the machine over the interval).
fn cpu_between(a: &CpuSnap, b: &CpuSnap, include_self: bool) -> (f64, f64) {
    let side = (b.daemons_s - a.daemons_s)
        + (b.children_s - a.children_s)
        + if include_self {
            b.self_s - a.self_s
        } else {
            0.0
        };
    let wall = (b.at - a.at).as_secs_f64().max(1e-9);
    let (busy, total) = (b.host.0 - a.host.0, b.host.1 - a.host.1);
    let busy_cores = if total > 0 {
        busy as f64 / total as f64 * ncpus()
    } else {
        0.0
    };
    (side, (busy_cores - side / wall).max(0.0))
}

// ---------------------------------------------------------------- Celer side

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What one queue measured.
struct QueueRun {
    ios: u64,
    lat_ns: Vec<u32>,
    wall: Duration,
}

/// Waits until `fd` is readable or `timeout_ms` passes.
fn wait_readable(fd: RawFd, timeout_ms: i32) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd we own.
    unsafe { libc::poll(&mut p, 1, timeout_ms) };
}

/// Keeps `qd` requests of `op` in flight on `q` at random 4 KiB blocks of
/// the volume for `runtime`, timing each from submit to completion.
fn drive_queue(
    q: &mut dyn DeviceQueue,
    op: IoOp,
    qd: usize,
    volume_blocks: u64,
    runtime: Duration,
    poll_us: u64,
    seed: u64,
) -> Result<QueueRun> {
    let fd = q
        .completion_fd()
        .context("the client queue has no completion fd")?;
    let mut bufs: Vec<Vec<u8>> = (0..qd)
        .map(|i| vec![(i as u8) ^ 0x5c; BLOCK_BYTES as usize])
        .collect();
    let mut started = vec![Instant::now(); qd];
    let mut lat_ns: Vec<u32> = Vec::with_capacity(SAMPLES_MAX);
    let mut rng = Rng(seed | 1);
    let mut free: Vec<usize> = (0..qd).collect();
    let mut done_tags: Vec<usize> = Vec::with_capacity(qd);
    let mut failure = None;
    let mut ios = 0u64;
    let t0 = Instant::now();
    let mut idle_since: Option<Instant> = None;
    loop {
        let stop = t0.elapsed() >= runtime;
        if !stop {
            while let Some(i) = free.pop() {
                let block = rng.next() % volume_blocks;
                let seg = [IoSegment {
                    addr: bufs[i].as_mut_ptr(),
                    len: BLOCK_BYTES as usize,
                }];
                let req = IoRequest {
                    op,
                    offset_bytes: block * BLOCK_BYTES,
                    len_bytes: BLOCK_BYTES,
                    segments: &seg,
                    tag: i as u64,
                };
                started[i] = Instant::now();
                // SAFETY: bufs[i] is left alone until tag i completes (it is
                // only pushed back to `free` by its completion).
                unsafe { q.submit(&req) }.map_err(|e| anyhow::anyhow!("submit: {e}"))?;
            }
        } else if free.len() == qd {
            break;
        }
        let n = q.poll(&mut |c: IoCompletion| {
            if let Err(e) = c.result {
                failure = Some(e);
            }
            done_tags.push(c.tag as usize);
        });
        if n == 0 {
            let now = Instant::now();
            let since = *idle_since.get_or_insert(now);
            if (now - since).as_micros() as u64 >= poll_us {
                wait_readable(fd, 100);
            }
            continue;
        }
        idle_since = None;
        let now = Instant::now();
        for &i in &done_tags {
            if lat_ns.len() < SAMPLES_MAX {
                lat_ns.push((now - started[i]).as_nanos().min(u32::MAX as u128) as u32);
            }
            ios += 1;
            free.push(i);
        }
        done_tags.clear();
        if let Some(e) = failure.take() {
            bail!("a {op:?} failed during the benchmark: {e}");
        }
    }
    Ok(QueueRun {
        ios,
        lat_ns,
        wall: t0.elapsed(),
    })
}

/// Writes the whole volume once with large writes, so that reads hit data
/// and writes are overwrites.
fn fill_volume(q: &mut dyn DeviceQueue, volume_bytes: u64) -> Result<()> {
    let fd = q
        .completion_fd()
        .context("the client queue has no completion fd")?;
    let mut buf = vec![0xA7u8; FILL_REQUEST_BYTES as usize];
    let mut off = 0;
    let mut inflight = 0;
    let mut failure = None;
    let t0 = Instant::now();
    while off < volume_bytes || inflight > 0 {
        while off < volume_bytes && inflight < FILL_DEPTH {
            let len = FILL_REQUEST_BYTES.min(volume_bytes - off);
            let seg = [IoSegment {
                addr: buf.as_mut_ptr(),
                len: len as usize,
            }];
            let req = IoRequest {
                op: IoOp::Write,
                offset_bytes: off,
                len_bytes: len,
                segments: &seg,
                tag: off,
            };
            // SAFETY: every request only reads `buf`, which outlives them
            // all (the loop drains before returning).
            unsafe { q.submit(&req) }.map_err(|e| anyhow::anyhow!("fill: {e}"))?;
            off += len;
            inflight += 1;
        }
        let n = q.poll(&mut |c: IoCompletion| {
            inflight -= 1;
            if let Err(e) = c.result {
                failure = Some(e);
            }
        });
        if let Some(e) = failure.take() {
            bail!("filling the benchmark volume: {e}");
        }
        if n == 0 {
            wait_readable(fd, 100);
        }
    }
    let s = t0.elapsed().as_secs_f64();
    eprintln!(
        "filled the volume ({} MiB) in {s:.1} s ({:.0} MiB/s of user data, ×3 on disk)",
        volume_bytes >> 20,
        (volume_bytes >> 20) as f64 / s
    );
    Ok(())
}

fn percentile_us(sorted_ns: &[u32], pct: usize) -> f64 {
    sorted_ns
        .get((sorted_ns.len() * pct / 100).min(sorted_ns.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0) as f64
        / 1000.0
}

/// One side's figures for one workload, plus the other load on the machine.
/// What one I/O of a workload cost beyond time, Celer only.
#[derive(Clone, Copy, Debug, Default)]
struct PerIo {
    /// Writes the disk under the nodes completed per client I/O, and its
    /// flushes (all replicas are on this one disk: a client write's floor
    /// is one device write per replica).
    device_writes: Option<f64>,
    device_flushes: Option<f64>,
    /// Bytes the disk wrote per byte a replica wrote (writes only; the
    /// client's bytes times the replicas).
    write_amplification: Option<f64>,
    /// Context switches per I/O: the client (this process: the driving
    /// thread and the client library's), and all nodes together.
    ctx_client: f64,
    ctx_nodes: f64,
}

type DiskCounters = Option<(u64, u64, u64)>;

impl PerIo {
    fn between(
        ios: u64,
        disk: (DiskCounters, DiskCounters),
        ctx: ((u64, u64), (u64, u64)),
    ) -> PerIo {
        let n = ios.max(1) as f64;
        let d = match disk {
            (Some(a), Some(b)) => Some((b.0 - a.0, b.1 - a.1, b.2 - a.2)),
            _ => None,
        };
        PerIo {
            device_writes: d.map(|d| d.0 as f64 / n),
            device_flushes: d.map(|d| d.2 as f64 / n),
            write_amplification: d
                .map(|d| d.1 as f64 * 512.0 / (n * REPLICAS as f64 * BLOCK_BYTES as f64)),
            ctx_client: (ctx.1 .0 - ctx.0 .0) as f64 / n,
            ctx_nodes: (ctx.1 .1 - ctx.0 .1) as f64 / n,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Measured {
    fig: Figures,
    /// Cores busy with processes outside the measured side (noise).
    other_cores: f64,
    /// Celer only: mean time a request spent inside a node (from its frame
    /// to its response: engine and, for forwarded writes, the forwards).
    node_mean_us: Option<f64>,
    /// Celer only: mean time of a request's engine part in a node (submit
    /// to completion: the engine and the disk).
    engine_mean_us: Option<f64>,
    per_io: Option<PerIo>,
}

/// Sum and count of `METRIC{op=OP}` (a histogram) over every node and shard
/// (the nodes' Prometheus histograms).
fn node_latency(admins: &[SocketAddr], metric: &str, op: &str) -> (f64, f64) {
    let (mut sum, mut count) = (0.0, 0.0);
    let (sum_name, count_name) = (format!("{metric}_sum"), format!("{metric}_count"));
    for a in admins {
        let Ok(text) = http_get(*a, "/metrics") else {
            continue;
        };
        let want = format!("op=\"{op}\"");
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if !name.contains(&want) {
                continue;
            }
            let v: f64 = value.parse().unwrap_or(0.0);
            if name.starts_with(&sum_name) {
                sum += v;
            } else if name.starts_with(&count_name) {
                count += v;
            }
        }
    }
    (sum, count)
}

/// The nodes' `celer_node_buffer_bytes`: how many MiB of their fixed I/O
/// buffers are on which pages.
fn buffer_pages(admins: &[SocketAddr]) -> String {
    let (mut huge, mut base) = (0.0, 0.0);
    for a in admins {
        let Ok(text) = http_get(*a, "/metrics") else {
            continue;
        };
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let v: f64 = value.parse().unwrap_or(0.0);
            if name == "celer_node_buffer_bytes{pages=\"2M\"}" {
                huge += v;
            } else if name == "celer_node_buffer_bytes{pages=\"4K\"}" {
                base += v;
            }
        }
    }
    let mib = |b: f64| b / f64::from(1 << 20);
    format!(
        "{:.1} MiB on 2 MiB huge pages, {:.1} MiB on 4 KiB pages",
        mib(huge),
        mib(base)
    )
}

/// A plain HTTP/1.1 GET on loopback (the body; no redirects, no TLS).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// The nodes' histograms of a client request's time: inside the node, and
/// its engine part.
const REQUEST_SECONDS: &str = "celer_node_request_seconds";
const ENGINE_SECONDS: &str = "celer_node_engine_seconds";

fn run_celer(
    w: Workload,
    queues: &mut [Box<dyn DeviceQueue>],
    volume_blocks: u64,
    runtime: Duration,
    poll_us: u64,
    cluster: &Cluster,
) -> Result<Measured> {
    let per_queue = w.qd / w.queues;
    let cluster_pids = cluster.procs.pids();
    let node_op = if w.op == IoOp::Write { "write" } else { "read" };
    let node0 = node_latency(&cluster.admins, REQUEST_SECONDS, node_op);
    let engine0 = node_latency(&cluster.admins, ENGINE_SECONDS, node_op);
    let node_pids: Vec<String> = cluster_pids.iter().skip(1).map(|p| p.to_string()).collect();
    let disk0 = cluster.disk_stat.as_deref().and_then(disk_counters);
    let ctx0 = (
        ctx_switches("self"),
        node_pids.iter().map(|p| ctx_switches(p)).sum::<u64>(),
    );
    let before = CpuSnap::take(&cluster_pids);
    let runs: Vec<Result<QueueRun>> = if w.queues == 1 {
        vec![drive_queue(
            queues[0].as_mut(),
            w.op,
            per_queue,
            volume_blocks,
            runtime,
            poll_us,
            0x2545_F491_4F6C_DD1D,
        )]
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = queues[..w.queues]
                .iter_mut()
                .enumerate()
                .map(|(i, q)| {
                    std::thread::Builder::new()
                        .name(format!("bench-queue-{i}"))
                        .spawn_scoped(s, move || {
                            drive_queue(
                                q.as_mut(),
                                w.op,
                                per_queue,
                                volume_blocks,
                                runtime,
                                poll_us,
                                0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i as u64 + 1),
                            )
                        })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| match h {
                    Ok(h) => h
                        .join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a benchmark thread panicked"))),
                    Err(e) => Err(anyhow::anyhow!("spawn a benchmark thread: {e}")),
                })
                .collect()
        })
    };
    let after = CpuSnap::take(&cluster_pids);
    let ctx1 = (
        ctx_switches("self"),
        node_pids.iter().map(|p| ctx_switches(p)).sum::<u64>(),
    );
    let disk1 = cluster.disk_stat.as_deref().and_then(disk_counters);
    let node1 = node_latency(&cluster.admins, REQUEST_SECONDS, node_op);
    let engine1 = node_latency(&cluster.admins, ENGINE_SECONDS, node_op);
    let node_requests = node1.1 - node0.1;
    let engine_requests = engine1.1 - engine0.1;
    let mut lat: Vec<u32> = Vec::new();
    let mut ios = 0u64;
    let mut wall = Duration::ZERO;
    for r in runs {
        let r = r?;
        ios += r.ios;
        wall = wall.max(r.wall);
        lat.extend_from_slice(&r.lat_ns);
    }
    lat.sort_unstable();
    let mean_ns = lat.iter().map(|&x| x as f64).sum::<f64>() / lat.len().max(1) as f64;
    let (cpu_s, other_cores) = cpu_between(&before, &after, true);
    Ok(Measured {
        fig: Figures {
            iops: ios as f64 / wall.as_secs_f64(),
            mean_us: mean_ns / 1000.0,
            p99_us: percentile_us(&lat, 99),
            cpu_us_per_io: cpu_s * 1e6 / ios.max(1) as f64,
        },
        other_cores,
        node_mean_us: (node_requests > 0.0).then(|| (node1.0 - node0.0) / node_requests * 1e6),
        engine_mean_us: (engine_requests > 0.0)
            .then(|| (engine1.0 - engine0.0) / engine_requests * 1e6),
        per_io: Some(PerIo::between(ios, (disk0, disk1), (ctx0, ctx1))),
    })
}

// ---------------------------------------------------------------- auth

/// QD1 4 KiB latency with authentication on and off: two fresh clusters
/// with the same history, one whose nodes check no credential
/// (`--insecure-no-auth`), compared by [`side_by_side`]. What
/// authentication adds per request is a few comparisons on the node (the
/// capability's volume, mode, attachment and expiry); the
/// challenge-response runs once per connection, before anything is timed.
fn auth_cost(args: &ClusterBenchArgs, dir: &Path) -> Result<()> {
    eprintln!("authentication cost: two fresh clusters, with and without authentication");
    let sides = [("auth-on", DataPort::Auth), ("auth-off", DataPort::NoAuth)];
    side_by_side(args, dir, "authentication cost", &sides, args.auth_rounds)
}

/// QD1 4 KiB latency and CPU time per I/O with data TLS on and off: two
/// fresh clusters with the same history, `tls_rounds` alternating rounds
/// each, as [`auth_cost`] runs them. With TLS every frame is encrypted and
/// decrypted once on each side (AES-GCM with ring), copied once through
/// rustls's buffers each way, and rustls allocates per record; the TLS
/// handshake runs once per connection, before anything is timed.
fn tls_cost(args: &ClusterBenchArgs, dir: &Path) -> Result<()> {
    eprintln!("data TLS cost: two fresh clusters, with and without data TLS");
    let creds = dir.join("tls-creds");
    make_tls_creds(&creds)?;
    let sides = [
        ("tls-on", DataPort::Tls(creds)),
        ("tls-off", DataPort::Auth),
    ];
    side_by_side(args, dir, "data TLS cost", &sides, args.tls_rounds)
}

/// A CA and a node's credentials (server pair naming 127.0.0.1, client
/// pair, CA) in `dir`, made with openssl as docs/security.md shows.
fn make_tls_creds(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let run = |args: &[&str]| -> Result<()> {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("run openssl (needed by --tls-rounds to make certificates)")?;
        anyhow::ensure!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(())
    };
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &key[..],
        &[
            "-days",
            "2",
            "-subj",
            "/CN=Celer bench CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
        ][..],
    ]
    .concat())?;
    for (role, ext) in [
        (
            "server",
            "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1",
        ),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        std::fs::write(
            dir.join(format!("{role}.ext")),
            format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n{ext}\n"),
        )?;
        let (k, csr, cert, extf) = (
            format!("{role}-key.pem"),
            format!("{role}.csr"),
            format!("{role}-cert.pem"),
            format!("{role}.ext"),
        );
        run(&[
            &["req"][..],
            &key[..],
            &["-subj", "/CN=celer-bench", "-keyout", &k, "-out", &csr][..],
        ]
        .concat())?;
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &extf,
            "-out",
            &cert,
        ])?;
    }
    Ok(())
}

/// Two fresh clusters with the same history (filled, then the same
/// rounds), `rounds` alternating rounds of `--side-round-ms` each (who goes
/// first alternates too) for three QD1 workloads: writes and reads of the
/// filled volume, and reads of a volume never written (holes: no disk I/O,
/// only the path a request takes through client, network and node, so the
/// disk's noise does not hide a small difference). Printed per workload:
/// each side's median and spread of the mean latency, the median of the
/// paired differences (round by round, which cancels the machine's slow
/// drifts) with its middle half, and each side's CPU time per I/O (client
/// and nodes).
fn side_by_side(
    args: &ClusterBenchArgs,
    dir: &Path,
    title: &str,
    ports: &[(&str, DataPort); 2],
    rounds: u32,
) -> Result<()> {
    const HOLES: &str = "bench-holes";
    let mut sides = Vec::new();
    for (name, port) in ports {
        let cluster = start_cluster(args, &dir.join(name), port)?;
        let attach = crate::cluster_dev::AttachOptions {
            data_tls: match port {
                DataPort::Tls(d) => Some(d.clone()),
                _ => None,
            },
            ..crate::cluster_dev::AttachOptions::exclusive("bench")
        };
        let (device, _attached) = crate::cluster_dev::open_volume(
            &cluster.meta_url,
            &cluster.token,
            VOLUME_NAME,
            &attach,
        )?;
        let mut filled: Vec<Box<dyn DeviceQueue>> = vec![device
            .open_queue(0)
            .map_err(|e| anyhow::anyhow!("open a client queue: {e}"))?];
        fill_volume(filled[0].as_mut(), args.volume_size)?;
        MetaClient::new(&cluster.meta_url, &cluster.token)
            .create_volume(&CreateVolume {
                name: HOLES.into(),
                size_bytes: args.volume_size,
                replicas: Some(REPLICAS),
                sector_size_bytes: None,
            })
            .context("create the volume of holes")?;
        let (holes_dev, _holes_attached) =
            crate::cluster_dev::open_volume(&cluster.meta_url, &cluster.token, HOLES, &attach)?;
        let holes: Vec<Box<dyn DeviceQueue>> = vec![holes_dev
            .open_queue(0)
            .map_err(|e| anyhow::anyhow!("open a client queue: {e}"))?];
        sides.push((cluster, [(device, filled), (holes_dev, holes)]));
    }
    let volume_blocks = args.volume_size / BLOCK_BYTES;
    let round = Duration::from_millis(args.side_round_ms);
    let qd1 = |rw: &str| {
        WORKLOADS
            .iter()
            .find(|w| w.qd == 1 && w.queues == 1 && w.rw == rw)
            .copied()
    };
    let runs = [
        ("randwrite", qd1("randwrite"), 0),
        ("randread", qd1("randread"), 0),
        ("randread-holes", qd1("randread"), 1),
    ];
    println!();
    println!(
        "{title}, QD1 4 KiB, mean latency per round ({rounds} rounds of {} ms each, alternating; CPU: client and nodes):",
        round.as_millis()
    );
    let (on_name, off_name) = (ports[0].0, ports[1].0);
    for (name, w, vol) in runs {
        let Some(w) = w else { continue };
        if rounds == 0 {
            break;
        }
        // [side] -> (mean µs, CPU µs per I/O) per round.
        let mut fig: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
        for r in 0..rounds as usize {
            for side in [r % 2, 1 - r % 2] {
                let (c, volumes) = &mut sides[side];
                let q = &mut volumes[vol].1;
                let m = run_celer(w, q, volume_blocks, round, args.poll_us, c)?;
                fig[side].push((m.fig.mean_us, m.fig.cpu_us_per_io));
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let lat = |side: usize| fig[side].iter().map(|f| f.0).collect::<Vec<f64>>();
        let (mut on, mut off) = (lat(0), lat(1));
        let mut paired: Vec<f64> = on
            .iter()
            .zip(&off)
            .map(|(a, b)| (a - b) / b * 100.0)
            .collect();
        let cpu = |side: usize| median(&mut fig[side].iter().map(|f| f.1).collect());
        let (cpu_on, cpu_off) = (cpu(0), cpu(1));
        let (mon, moff) = (median(&mut on), median(&mut off));
        let n = paired.len();
        let mp = median(&mut paired);
        println!(
            "  {name:<15} {on_name}: median {mon:.1} µs ({:.1}-{:.1})   {off_name}: median {moff:.1} µs ({:.1}-{:.1})   paired: median {mp:+.2} % (middle half {:+.2} to {:+.2} %)   CPU per I/O {cpu_on:.1} vs {cpu_off:.1} µs",
            on[0],
            on[n - 1],
            off[0],
            off[n - 1],
            paired[n / 4],
            paired[(3 * n) / 4],
        );
    }
    drop(sides);
    Ok(())
}

/// POSTs `/v1/scrub/{action}` to every node.
fn scrub_all(cluster: &Cluster, action: &str) -> Result<()> {
    use std::io::{Read, Write};
    for a in &cluster.admins {
        let mut s = std::net::TcpStream::connect_timeout(a, Duration::from_secs(5))
            .with_context(|| format!("node admin {a}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "POST /v1/scrub/{action} HTTP/1.0\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\n\r\n",
            cluster.token
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        anyhow::ensure!(
            text.starts_with("HTTP/1.0 200"),
            "scrub {action} on {a}: {}",
            text.lines().last().unwrap_or("")
        );
    }
    Ok(())
}

/// Data bytes the nodes' scrubs have read (their metrics).
fn scrub_bytes(cluster: &Cluster) -> f64 {
    let mut total = 0.0;
    for a in &cluster.admins {
        if let Ok(text) = http_get(*a, "/metrics") {
            total += text
                .lines()
                .filter(|l| l.starts_with("celer_node_scrub_bytes_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
    }
    total
}

/// QD1 4 KiB latency with the scrub paused and running (default rate),
/// alternating rounds on the filled volume; the scrub's throughput.
fn scrub_cost(
    args: &ClusterBenchArgs,
    cluster: &Cluster,
    queues: &mut [Box<dyn DeviceQueue>],
) -> Result<()> {
    eprintln!("scrub cost: QD1 rounds with the scrub paused and running");
    let volume_blocks = args.volume_size / BLOCK_BYTES;
    let runtime = Duration::from_secs(args.runtime as u64);
    scrub_all(cluster, "start")?;
    scrub_all(cluster, "pause")?;
    // [workload][paused, running] mean latencies; scrub bytes/s per running round.
    let mut figures: Vec<[Vec<f64>; 2]> = vec![[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    let mut rates = Vec::new();
    for (k, w) in WORKLOADS
        .iter()
        .filter(|w| w.qd == 1 && w.queues == 1)
        .enumerate()
    {
        for round in 0..args.scrub_rounds as usize {
            for side in [round % 2, 1 - round % 2] {
                scrub_all(cluster, if side == 1 { "start" } else { "pause" })?;
                let (b0, t0) = (scrub_bytes(cluster), Instant::now());
                let m = run_celer(*w, queues, volume_blocks, runtime, args.poll_us, cluster)?;
                if side == 1 {
                    rates.push((scrub_bytes(cluster) - b0) / t0.elapsed().as_secs_f64());
                }
                figures[k][side].push(m.fig.mean_us);
            }
        }
    }
    scrub_all(cluster, "pause")?;
    println!();
    println!(
        "scrub cost, QD1 4 KiB, mean latency per round ({} rounds of {} s each, alternating; the nodes' default scrub rate):",
        args.scrub_rounds,
        runtime.as_secs()
    );
    let median = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    };
    for (k, w) in WORKLOADS
        .iter()
        .filter(|w| w.qd == 1 && w.queues == 1)
        .enumerate()
    {
        let (off, on) = (&figures[k][0], &figures[k][1]);
        let (moff, mon) = (median(off), median(on));
        println!(
            "  {:<14} scrub paused: median {moff:.1} µs   running: median {mon:.1} µs   change {:+.1} %",
            w.name(),
            (mon - moff) / moff * 100.0
        );
    }
    let mib = |b: f64| b / (1 << 20) as f64;
    println!(
        "  scrub throughput, all nodes: median {:.1} MiB/s (per round {:?})",
        mib(median(&rates)),
        rates
            .iter()
            .map(|r| (mib(*r) * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
    Ok(())
}

// ---------------------------------------------------------------- snapshots

/// QD1 `op` of one 4 KiB block at each of `blocks`, in order; each one's
/// latency in ns.
fn qd1_blocks(q: &mut dyn DeviceQueue, op: IoOp, blocks: &[u64]) -> Result<Vec<u32>> {
    let fd = q
        .completion_fd()
        .context("the client queue has no completion fd")?;
    let mut buf = vec![0x3cu8; BLOCK_BYTES as usize];
    let mut lat = Vec::with_capacity(blocks.len());
    for &b in blocks {
        let seg = [IoSegment {
            addr: buf.as_mut_ptr(),
            len: BLOCK_BYTES as usize,
        }];
        let req = IoRequest {
            op,
            offset_bytes: b * BLOCK_BYTES,
            len_bytes: BLOCK_BYTES,
            segments: &seg,
            tag: b,
        };
        let t0 = Instant::now();
        // SAFETY: `buf` is left alone until the request completes (waited
        // for below).
        unsafe { q.submit(&req) }.map_err(|e| anyhow::anyhow!("submit: {e}"))?;
        let mut result = None;
        while result.is_none() {
            if q.poll(&mut |c: IoCompletion| result = Some(c.result)) == 0 {
                wait_readable(fd, 100);
            }
        }
        if let Some(Err(e)) = result {
            bail!("a {op:?} of block {b} failed: {e}");
        }
        lat.push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32);
    }
    Ok(lat)
}

fn mean_us(ns: &[u32]) -> f64 {
    if ns.is_empty() {
        return 0.0;
    }
    ns.iter().map(|&x| x as f64).sum::<f64>() / ns.len() as f64 / 1000.0
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

/// `snapshot_rounds` rounds on the filled benchmark volume and a filled
/// 64 MiB one (see `ClusterBenchArgs::snapshot_rounds`); prints the
/// figures against the targets. Every snapshot and clone it makes
/// is deleted again.
fn snapshot_cost(
    args: &ClusterBenchArgs,
    cluster: &Cluster,
    queues: &mut [Box<dyn DeviceQueue>],
) -> Result<()> {
    eprintln!("snapshot cost: {} rounds", args.snapshot_rounds);
    let mc = MetaClient::new(&cluster.meta_url, &cluster.token);
    const SMALL: &str = "bench-small";
    mc.create_volume(&CreateVolume {
        name: SMALL.into(),
        size_bytes: SNAPSHOT_SMALL_BYTES,
        replicas: Some(REPLICAS),
        sector_size_bytes: None,
    })
    .context("create the 64 MiB volume")?;
    {
        let (small, detach) = crate::cluster_dev::open_volume(
            &cluster.meta_url,
            &cluster.token,
            SMALL,
            &crate::cluster_dev::AttachOptions::exclusive("bench"),
        )?;
        let mut q = small
            .open_queue(0)
            .map_err(|e| anyhow::anyhow!("open a client queue: {e}"))?;
        fill_volume(q.as_mut(), SNAPSHOT_SMALL_BYTES)?;
        drop(q);
        drop(small);
        detach.detach()?;
    }
    let volume_blocks = args.volume_size / BLOCK_BYTES;
    let mut rng = Rng(0x5eed_5eed);
    let mut random_blocks =
        |n: usize| -> Vec<u64> { (0..n).map(|_| rng.next() % volume_blocks).collect() };
    // The baseline of each round: writes to blocks the head already holds
    // (the filled volume's at first, then the last round's blocks), right
    // before the snapshot; as a write without snapshots.
    let q = queues[0].as_mut();
    qd1_blocks(q, IoOp::Write, &random_blocks(200))?;
    let mut held = random_blocks(SNAPSHOT_WRITES);
    let mut plain = Vec::new();
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    // Per round: create and clone times (big, small); first writes (chunk
    // allocated by it, not), rewrites; clone and parent reads.
    let (mut create_big, mut create_small, mut clone_big, mut clone_small) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut first_alloc, mut first_other, mut first_all, mut again) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut clone_read, mut parent_read) = (Vec::new(), Vec::new());
    let chunk_blocks = (1u64 << 20) / BLOCK_BYTES;
    for round in 0..args.snapshot_rounds {
        let snap = format!("r{round}");
        let lat = qd1_blocks(queues[0].as_mut(), IoOp::Write, &held)?;
        plain.push(mean_us(&lat));
        let t = Instant::now();
        mc.create_snapshot(VOLUME_NAME, &snap)
            .context("snapshot the benchmark volume")?;
        create_big.push(ms(t));
        let t = Instant::now();
        mc.create_snapshot(SMALL, &snap)
            .context("snapshot the 64 MiB volume")?;
        create_small.push(ms(t));
        let t = Instant::now();
        mc.clone_volume(VOLUME_NAME, &snap, "bench-clone")
            .context("clone the benchmark volume")?;
        clone_big.push(ms(t));
        let t = Instant::now();
        mc.clone_volume(SMALL, &snap, "bench-small-clone")
            .context("clone the 64 MiB volume")?;
        clone_small.push(ms(t));

        // First writes since the snapshot, then the same blocks again.
        let blocks = random_blocks(SNAPSHOT_WRITES);
        let lat = qd1_blocks(queues[0].as_mut(), IoOp::Write, &blocks)?;
        let mut seen = std::collections::HashSet::new();
        let (mut alloc, mut other) = (Vec::new(), Vec::new());
        for (b, l) in blocks.iter().zip(&lat) {
            if seen.insert(b / chunk_blocks) {
                alloc.push(*l);
            } else {
                other.push(*l);
            }
        }
        first_all.push(mean_us(&lat));
        first_alloc.push(mean_us(&alloc));
        first_other.push(mean_us(&other));
        let lat = qd1_blocks(queues[0].as_mut(), IoOp::Write, &blocks)?;
        again.push(mean_us(&lat));
        held = blocks;

        // A clone's unwritten blocks beside the same blocks of its parent,
        // taking turns.
        let (clone, detach) = crate::cluster_dev::open_volume(
            &cluster.meta_url,
            &cluster.token,
            "bench-clone",
            &crate::cluster_dev::AttachOptions::exclusive("bench"),
        )?;
        let mut cq = clone
            .open_queue(0)
            .map_err(|e| anyhow::anyhow!("open a clone queue: {e}"))?;
        let reads = random_blocks(SNAPSHOT_WRITES);
        qd1_blocks(cq.as_mut(), IoOp::Read, &reads[..100])?;
        let (mut c_lat, mut p_lat) = (Vec::new(), Vec::new());
        for (i, part) in reads.chunks(SNAPSHOT_WRITES / 10).enumerate() {
            let mut c = || qd1_blocks(cq.as_mut(), IoOp::Read, part);
            if i % 2 == 0 {
                c_lat.extend(c()?);
                p_lat.extend(qd1_blocks(queues[0].as_mut(), IoOp::Read, part)?);
            } else {
                p_lat.extend(qd1_blocks(queues[0].as_mut(), IoOp::Read, part)?);
                c_lat.extend(c()?);
            }
        }
        clone_read.push(mean_us(&c_lat));
        parent_read.push(mean_us(&p_lat));
        drop(cq);
        drop(clone);
        detach.detach()?;
        mc.delete_volume("bench-clone")
            .context("delete the clone")?;
        mc.delete_volume("bench-small-clone")
            .context("delete the small clone")?;
        mc.delete_snapshot(VOLUME_NAME, &snap)
            .context("delete the snapshot")?;
        mc.delete_snapshot(SMALL, &snap)
            .context("delete the small snapshot")?;
    }
    let round = |v: &[f64]| {
        v.iter()
            .map(|x| (x * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    };
    println!();
    println!(
        "snapshots ({} rounds; QD1 4 KiB; {SNAPSHOT_WRITES} I/Os per phase; medians of the rounds):",
        args.snapshot_rounds
    );
    let (cb, cs) = (median(&create_big), median(&create_small));
    let (kb, ks) = (median(&clone_big), median(&clone_small));
    let worst = create_big
        .iter()
        .chain(&create_small)
        .chain(&clone_big)
        .chain(&clone_small)
        .copied()
        .fold(0.0, f64::max);
    println!(
        "  snapshot create: {} MiB volume {cb:.1} ms, 64 MiB volume {cs:.1} ms (ratio {:.2}; per round {:?} / {:?})",
        args.volume_size >> 20,
        ratio(cb, cs),
        round(&create_big),
        round(&create_small)
    );
    println!(
        "  volume clone:    {} MiB volume {kb:.1} ms, 64 MiB volume {ks:.1} ms (ratio {:.2}; per round {:?} / {:?})",
        args.volume_size >> 20,
        ratio(kb, ks),
        round(&clone_big),
        round(&clone_small)
    );
    println!(
        "  target: create and clone <= 100 ms whatever the size: slowest {worst:.1} ms  {}",
        verdict(worst <= 100.0)
    );
    let (fa, fo, fall, ag) = (
        median(&first_alloc),
        median(&first_other),
        median(&first_all),
        median(&again),
    );
    let plain_us = median(&plain);
    println!(
        "  write to a block the head holds:     mean {plain_us:.1} µs (per round {:?}; right before each snapshot)",
        round(&plain)
    );
    println!(
        "  first write after a snapshot:        mean {fall:.1} µs = {:.2} x  (first of its chunk in the new layer {fa:.1} µs = {:.2} x, other blocks {fo:.1} µs = {:.2} x; per round {:?})",
        ratio(fall, plain_us),
        ratio(fa, plain_us),
        ratio(fo, plain_us),
        round(&first_all)
    );
    println!(
        "  the same blocks again:               mean {ag:.1} µs = {:.2} x (per round {:?})",
        ratio(ag, plain_us),
        round(&again)
    );
    println!(
        "  target: first write <= 1.2 x  {}   later writes unchanged (<= 1.1 x)  {}",
        verdict(fall <= 1.2 * plain_us),
        verdict(ag <= 1.1 * plain_us)
    );
    let (cr, pr) = (median(&clone_read), median(&parent_read));
    println!(
        "  read of a clone's unwritten blocks:  mean {cr:.1} µs; the parent's same blocks {pr:.1} µs: {:.2} x  target <= 1.2 x  {}",
        ratio(cr, pr),
        verdict(cr <= 1.2 * pr)
    );
    mc.delete_volume(SMALL)
        .context("delete the 64 MiB volume")?;
    Ok(())
}

// ---------------------------------------------------------------- floor

struct Floor {
    write: Figures,
    /// Three durable QD1 writers at once (one per replica, as the three
    /// nodes share this disk): per-write latency.
    write3: Figures,
    read: Figures,
    rtt_median_us: f64,
    rtt_p99_us: f64,
}

/// Median (and p99) of 64-byte ping-pongs over loopback TCP between two
/// threads of this process: the network part of one replica round trip.
fn loopback_rtt() -> Result<(f64, f64)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind loopback")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; RTT_MESSAGE_BYTES];
        loop {
            if s.read_exact(&mut b).is_err() {
                return Ok(());
            }
            s.write_all(&b)?;
        }
    });
    let mut c = TcpStream::connect(addr).context("connect loopback")?;
    c.set_nodelay(true)?;
    let mut b = [0x42u8; RTT_MESSAGE_BYTES];
    let mut rtt: Vec<u32> = Vec::with_capacity(RTT_ROUNDS);
    for i in 0..RTT_WARMUP + RTT_ROUNDS {
        let t = Instant::now();
        c.write_all(&b)?;
        c.read_exact(&mut b)?;
        if i >= RTT_WARMUP {
            rtt.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        }
    }
    drop(c);
    let _ = server.join();
    rtt.sort_unstable();
    Ok((percentile_us(&rtt, 50), percentile_us(&rtt, 99)))
}

/// Writes `path` through once (1 MiB O_DIRECT writes) unless it already has
/// `size` bytes, so the floor's writes are overwrites of allocated extents.
fn lay_out(path: &Path, size: u64) -> Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == size) {
        return Ok(());
    }
    let status = Command::new("fio")
        .arg("--name=layout")
        .arg(format!("--filename={}", path.display()))
        .arg(format!("--size={size}"))
        .args(["--rw=write", "--bs=1M", "--direct=1", "--ioengine=io_uring"])
        .args(["--iodepth=8", "--output=/dev/null"])
        .status()
        .context(
            "running fio to lay out the floor's file (scripts/install-deps.sh installs fio)",
        )?;
    anyhow::ensure!(status.success(), "fio could not lay out {}", path.display());
    Ok(())
}

fn measure_floor(dir: &Path, size: u64, runtime_s: u32) -> Result<Floor> {
    let file = dir.join("floor.img");
    lay_out(&file, size)?;
    // Same flags as `celer bench engine`'s peer: io_uring, O_DIRECT, and for
    // writes O_DSYNC (durable at completion, as a Celer write is).
    let write = fio::run(&file, "randwrite", 1, runtime_s, size, true)?;
    let region = size / 3 / BLOCK_BYTES * BLOCK_BYTES;
    let mut three = Command::new("fio");
    three
        .arg("--name=floor3")
        .arg(format!("--filename={}", file.display()))
        .args(["--ioengine=io_uring", "--direct=1", "--sync=dsync"])
        .args(["--rw=randwrite", "--bs=4k", "--iodepth=1", "--numjobs=3"])
        .arg(format!("--size={region}"))
        .arg(format!("--offset_increment={region}"))
        .arg(format!("--runtime={runtime_s}"));
    let write3 = run_fio_json(three, "randwrite", &[])?.fig;
    let read = fio::run(&file, "randread", 1, runtime_s, size, false)?;
    let (rtt_median_us, rtt_p99_us) = loopback_rtt()?;
    Ok(Floor {
        write,
        write3,
        read,
        rtt_median_us,
        rtt_p99_us,
    })
}

/// Runs a time-based fio job (group-reported) and returns its total
/// latency figures; CPU per I/O counts fio itself plus `daemon_pids`.
fn run_fio_json(mut cmd: Command, rw: &str, daemon_pids: &[u32]) -> Result<Measured> {
    cmd.args(["--time_based=1", "--randrepeat=0", "--norandommap=1"])
        .args(["--group_reporting=1", "--lat_percentiles=1"])
        .arg("--output-format=json");
    let before = CpuSnap::take(daemon_pids);
    let out = cmd
        .output()
        .context("running fio (scripts/install-deps.sh installs it)")?;
    let after = CpuSnap::take(daemon_pids);
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing fio's JSON")?;
    let side = &v["jobs"][0][if rw.contains("write") {
        "write"
    } else {
        "read"
    }];
    let ios = side["total_ios"].as_f64().unwrap_or(0.0);
    anyhow::ensure!(
        ios > 0.0,
        "fio did no I/O: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let lat = &side["lat_ns"];
    let (cpu_s, other_cores) = cpu_between(&before, &after, false);
    Ok(Measured {
        fig: Figures {
            iops: side["iops"].as_f64().unwrap_or(0.0),
            mean_us: lat["mean"].as_f64().unwrap_or(0.0) / 1000.0,
            p99_us: lat["percentile"]["99.000000"].as_f64().unwrap_or(0.0) / 1000.0,
            cpu_us_per_io: cpu_s * 1e6 / ios,
        },
        other_cores,
        node_mean_us: None,
        engine_mean_us: None,
        per_io: None,
    })
}

// ---------------------------------------------------------------- Ceph side

struct Ceph {
    scripts: PathBuf,
    base: PathBuf,
    /// Started by this run (stopped at the end unless --keep-ceph).
    started_here: bool,
    keep: bool,
}

impl Ceph {
    fn conf(&self) -> PathBuf {
        self.base.join("ceph.conf")
    }

    /// Live daemons of this peer: pid files whose process names our conf.
    fn daemon_pids(&self) -> Vec<u32> {
        let conf = self.conf().display().to_string();
        let Ok(rd) = std::fs::read_dir(self.base.join("run")) else {
            return Vec::new();
        };
        let mut pids = Vec::new();
        for e in rd.flatten() {
            if e.path().extension().is_none_or(|x| x != "pid") {
                continue;
            }
            let Some(pid) = std::fs::read_to_string(e.path())
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&conf) {
                pids.push(pid);
            }
        }
        pids
    }

    fn up(args: &ClusterBenchArgs) -> Result<Ceph> {
        let scripts = match &args.ceph_scripts {
            Some(s) => s.clone(),
            None => default_ceph_scripts()?,
        };
        let mut ceph = Ceph {
            scripts,
            base: args.ceph_base.clone(),
            started_here: false,
            keep: args.keep_ceph,
        };
        let running = ceph.daemon_pids().len();
        eprintln!(
            "Ceph peer: {} ({} daemons running before)",
            ceph.base.display(),
            running
        );
        ceph.started_here = running == 0;
        let status = Command::new("bash")
            .arg(ceph.scripts.join("ceph-up.sh"))
            .env("BASE", &ceph.base)
            .env("IMAGE_SIZE", args.volume_size.to_string())
            .stdout(std::io::stderr())
            .status()
            .context("run ceph-up.sh")?;
        anyhow::ensure!(
            status.success(),
            "ceph-up.sh failed (logs in {}/log)",
            ceph.base.display()
        );
        Ok(ceph)
    }

    fn run_fio(&self, rw: &str, qd: usize, runtime_s: u32, size: u64) -> Result<Measured> {
        let pids = self.daemon_pids();
        anyhow::ensure!(
            pids.len() >= 4,
            "the Ceph peer's daemons are not running (found {})",
            pids.len()
        );
        let mut cmd = Command::new("fio");
        cmd.env("CEPH_CONF", self.conf())
            .args(["--name=ceph", "--ioengine=rbd", "--clientname=admin"])
            .args(["--pool=rbd", "--rbdname=peer", "--invalidate=0"])
            .arg(format!("--rw={rw}"))
            .args(["--bs=4k", "--numjobs=1"])
            .arg(format!("--iodepth={qd}"))
            .arg(format!("--size={size}"))
            .arg(format!("--runtime={runtime_s}"));
        run_fio_json(cmd, rw, &pids)
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        if !self.started_here || self.keep {
            eprintln!(
                "Ceph peer left running (stop it with BASE={} {}/ceph-down.sh)",
                self.base.display(),
                self.scripts.display()
            );
            return;
        }
        eprintln!("stopping the Ceph peer this run started");
        let _ = Command::new("bash")
            .arg(self.scripts.join("ceph-down.sh"))
            .env("BASE", &self.base)
            .stdout(std::io::stderr())
            .status();
    }
}

fn default_ceph_scripts() -> Result<PathBuf> {
    let candidates = [
        PathBuf::from("scripts/peers/ceph"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/peers/ceph"),
    ];
    candidates
        .iter()
        .find(|p| p.join("ceph-up.sh").is_file())
        .cloned()
        .context("scripts/peers/ceph/ceph-up.sh not found: run from the repository or pass --ceph-scripts")
}

// ---------------------------------------------------------------- report

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn print_report(
    selected: &[Workload],
    celer: &[Measured],
    ceph: &[Option<Measured>],
    floor: &Floor,
) {
    println!();
    println!(
        "physical floor, same disk, same run (fio io_uring O_DIRECT, O_DSYNC writes; loopback: 64 B ping-pong between two threads):"
    );
    println!(
        "  durable 4K write QD1 {:.1} µs mean (p99 {:.0}); 4K read QD1 {:.1} µs mean (p99 {:.0}); loopback TCP round trip {:.1} µs median (p99 {:.1})",
        floor.write.mean_us,
        floor.write.p99_us,
        floor.read.mean_us,
        floor.read.p99_us,
        floor.rtt_median_us,
        floor.rtt_p99_us
    );
    println!(
        "  three durable 4K writers at once (QD1 each, as three replicas on this one disk): {:.1} µs mean per write (p99 {:.0}), {:.0} writes/s in all",
        floor.write3.mean_us, floor.write3.p99_us, floor.write3.iops
    );
    println!();
    println!(
        "{:<20} {:>9} {:>8} {:>8} {:>8} {:>9} {:>6} | {:>8} {:>8} {:>8} {:>9} {:>6} | {:>9} {:>9}",
        "workload",
        "IOPS",
        "mean µs",
        "p99 µs",
        "node µs",
        "CPU µs/IO",
        "other",
        "Ceph IOPS",
        "mean µs",
        "p99 µs",
        "CPU µs/IO",
        "other",
        "IOPS ×Ceph",
        "lat ÷Ceph"
    );
    for (i, w) in selected.iter().enumerate() {
        let c = celer[i];
        let left = format!(
            "{:<20} {:>9.0} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>6.2}",
            w.label(),
            c.fig.iops,
            c.fig.mean_us,
            c.fig.p99_us,
            c.node_mean_us.unwrap_or(0.0),
            c.fig.cpu_us_per_io,
            c.other_cores
        );
        match ceph[i] {
            Some(p) => println!(
                "{left} | {:>9.0} {:>8.1} {:>8.1} {:>9.1} {:>6.2} | {:>10.2} {:>9.2}",
                p.fig.iops,
                p.fig.mean_us,
                p.fig.p99_us,
                p.fig.cpu_us_per_io,
                p.other_cores,
                ratio(c.fig.iops, p.fig.iops),
                ratio(p.fig.mean_us, c.fig.mean_us)
            ),
            None => println!("{left}"),
        }
    }
    println!(
        "(mean/p99: submit to completion; node µs: mean time inside a node, from its request frame to its response; CPU µs/IO: all of a side's processes; other: cores busy with anything else on the machine meanwhile; lat ÷Ceph: how many times lower Celer's mean latency is)"
    );
    println!();
    println!(
        "Celer per I/O: device writes and flushes (the disk under the nodes, /sys/dev/block/*/stat; all 3 replicas are on it, so the floor for a write is 3: one per replica; anything else writing to that disk meanwhile counts too), write amplification (bytes the disk wrote per byte a replica wrote), context switches (client process; 3 nodes together):"
    );
    println!(
        "{:<20} {:>10} {:>10} {:>8} {:>10} {:>10}",
        "workload", "dev writes", "flushes", "WA", "ctx client", "ctx nodes"
    );
    for (i, w) in selected.iter().enumerate() {
        let Some(p) = celer[i].per_io else { continue };
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let writes = w.op == IoOp::Write;
        println!(
            "{:<20} {:>10} {:>10} {:>8} {:>10.2} {:>10.2}",
            w.label(),
            opt(p.device_writes),
            opt(p.device_flushes),
            opt(p.write_amplification.filter(|_| writes)),
            p.ctx_client,
            p.ctx_nodes
        );
    }
    println!();
    println!(
        "Celer latency budget at QD1 (means, µs, from the bench's and the nodes' own clocks): client = submit to completion in the client; node = a request's time in a node, frame in to response queued; engine = its engine part, submit to completion; disk = the floor above (writes: three writers at once, as the replicas share this disk)"
    );
    println!(
        "{:<20} {:>8} {:>16} {:>14} {:>16} {:>8}",
        "workload", "client", "net+wake+client", "node's own", "engine's own", "disk"
    );
    for (i, w) in selected.iter().enumerate() {
        let c = celer[i];
        let (Some(node), Some(engine)) = (c.node_mean_us, c.engine_mean_us) else {
            continue;
        };
        if w.qd != 1 {
            continue;
        }
        let disk = if w.op == IoOp::Write {
            floor.write3.mean_us
        } else {
            floor.read.mean_us
        };
        println!(
            "{:<20} {:>8.1} {:>16.1} {:>14.1} {:>16.1} {:>8.1}",
            w.label(),
            c.fig.mean_us,
            c.fig.mean_us - node,
            node - engine,
            engine - disk,
            disk
        );
    }
    println!(
        "(net+wake+client = client - node: the wire both ways, every wake-up, the client's own work and the wait for the slowest replica; node's own = node - engine: frame handling, forwards; engine's own = engine - disk: may be negative when the replicas' writes did not all overlap)"
    );
    println!();
    println!("targets (issue 13):");
    let find13 = |rw: &str, qd: usize| {
        selected
            .iter()
            .position(|w| w.rw == rw && w.qd == qd && w.queues == 1)
    };
    if let Some(i) = find13("randwrite", 1) {
        let base = floor.write3.mean_us + floor.rtt_median_us;
        let x = ratio(celer[i].fig.mean_us, base);
        println!(
            "  write QD1 mean <= 1.3x (three writers {:.1} + RTT {:.1} = {:.1} µs): {:.1} µs = {:.2}x  {}",
            floor.write3.mean_us,
            floor.rtt_median_us,
            base,
            celer[i].fig.mean_us,
            x,
            verdict(x <= 1.3)
        );
        let cpu = celer[i].fig.cpu_us_per_io;
        println!(
            "  CPU per replicated write at QD1 <= 60 µs (all processes): {cpu:.1} µs  {}",
            verdict(cpu <= 60.0)
        );
        if let Some(p) = ceph[i] {
            println!(
                "  write QD1: {:.2}x lower than Ceph's mean",
                ratio(p.fig.mean_us, celer[i].fig.mean_us)
            );
        }
    }
    if let Some(i) = find13("randread", 1) {
        let base = floor.read.mean_us + floor.rtt_median_us;
        let x = ratio(celer[i].fig.mean_us, base);
        println!(
            "  read QD1 mean <= 1.5x (read {:.1} + RTT {:.1} = {:.1} µs): {:.1} µs = {:.2}x  {}",
            floor.read.mean_us,
            floor.rtt_median_us,
            base,
            celer[i].fig.mean_us,
            x,
            verdict(x <= 1.5)
        );
    }
    println!();
    println!("targets (issue 4):");
    let find = |rw: &str, qd: usize, queues: usize| {
        selected
            .iter()
            .position(|w| w.rw == rw && w.qd == qd && w.queues == queues)
    };
    let floor_write = floor.write.mean_us + floor.rtt_median_us;
    if let Some(i) = find("randwrite", 1, 1) {
        let x = ratio(celer[i].fig.mean_us, floor_write);
        println!(
            "  write QD1 latency <= 1.5x floor (durable write {:.1} + RTT {:.1} = {:.1} µs): {:.1} µs = {:.2}x  {}",
            floor.write.mean_us,
            floor.rtt_median_us,
            floor_write,
            celer[i].fig.mean_us,
            x,
            verdict(x <= 1.5)
        );
    }
    let vs_ceph = |what: &str, rw: &str, qd: usize, want: f64, iops: bool| {
        for queues in [1, 2] {
            let Some(i) = find(rw, qd, queues) else {
                continue;
            };
            let Some(p) = find(rw, qd, 1).and_then(|j| ceph[j]) else {
                println!(
                    "  {what} {}: no Ceph figures (run with --ceph)",
                    qlabel(queues)
                );
                continue;
            };
            let x = if iops {
                ratio(celer[i].fig.iops, p.fig.iops)
            } else {
                ratio(p.fig.mean_us, celer[i].fig.mean_us)
            };
            println!(
                "  {what} {}: {x:.2}x  {}",
                qlabel(queues),
                verdict(x >= want)
            );
        }
    };
    vs_ceph(
        "write QD1 latency >= 10x lower than Ceph's",
        "randwrite",
        1,
        10.0,
        false,
    );
    vs_ceph(
        "read QD1 latency >= 4x lower than Ceph's",
        "randread",
        1,
        4.0,
        false,
    );
    vs_ceph("write QD32 IOPS >= 10x Ceph's", "randwrite", 32, 10.0, true);
    vs_ceph("read QD32 IOPS >= 4x Ceph's", "randread", 32, 4.0, true);
}

fn qlabel(queues: usize) -> &'static str {
    if queues == 1 {
        "(1 queue)"
    } else {
        "(2 queues x 16)"
    }
}

// ---------------------------------------------------------------- run

pub fn run(args: &ClusterBenchArgs) -> Result<()> {
    anyhow::ensure!(
        args.volume_size >= 16 << 20 && args.volume_size.is_multiple_of(1 << 20),
        "--volume-size must be a multiple of 1M, at least 16M"
    );
    anyhow::ensure!(
        args.node_shards.is_power_of_two(),
        "--node-shards must be a power of two"
    );
    let selected: Vec<Workload> = WORKLOADS
        .iter()
        .copied()
        .filter(|w| {
            args.only
                .as_ref()
                .is_none_or(|o| w.name().contains(o.as_str()))
        })
        .collect();
    anyhow::ensure!(
        !selected.is_empty(),
        "--only matches none of {}",
        WORKLOADS
            .iter()
            .map(|w| w.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    std::fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    let dir = args.dir.canonicalize().context("resolve --dir")?;
    let runtime = Duration::from_secs(args.runtime as u64);
    println!(
        "celer bench cluster: control service + 3 storage nodes ({} shards each) as processes, 3 replicas, disks in {} ({}); volume {} MiB; {} s per workload, 4 KiB random I/O; {} CPUs",
        args.node_shards,
        dir.display(),
        if args.preallocate { "files fully allocated" } else { "sparse files" },
        args.volume_size >> 20,
        args.runtime,
        ncpus()
    );

    // The peer first: its bring-up is the slowest part and may fail.
    let ceph = if args.ceph {
        Some(Ceph::up(args)?)
    } else {
        None
    };
    // Per node shard: the engine's pool (2 pages) and the node's (1); twice
    // over for the authentication and TLS comparisons' second clusters.
    let reserve = (!args.no_hugepages)
        .then(|| crate::hugepages::Reserve::ensure(2 * 3 * 3 * u64::from(args.node_shards)));
    let cluster = start_cluster(args, &dir, &DataPort::Auth)?;
    println!(
        "I/O buffers of the nodes: {}{}",
        buffer_pages(&cluster.admins),
        reserve
            .as_ref()
            .map_or(" (--no-hugepages)".to_string(), |r| format!(
                " ({})",
                r.note
            ))
    );
    let (device, attached) = crate::cluster_dev::open_volume(
        &cluster.meta_url,
        &cluster.token,
        VOLUME_NAME,
        &crate::cluster_dev::AttachOptions::exclusive("bench"),
    )?;
    let mut queues: Vec<Box<dyn DeviceQueue>> = (0..2)
        .map(|i| device.open_queue(i))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("open a client queue: {e}"))?;
    fill_volume(queues[0].as_mut(), args.volume_size)?;
    let volume_blocks = args.volume_size / BLOCK_BYTES;
    // Open every queue's connections before anything is timed.
    for q in queues.iter_mut() {
        drive_queue(
            q.as_mut(),
            IoOp::Read,
            8,
            volume_blocks,
            Duration::from_millis(500),
            0,
            7,
        )?;
    }

    eprintln!("measuring the physical floor");
    let floor = measure_floor(&dir, args.volume_size, args.runtime)?;

    let mut celer = Vec::new();
    let mut peer = Vec::new();
    let mut ceph_runs = 0;
    for w in &selected {
        let with_ceph = ceph.as_ref().filter(|_| w.queues == 1);
        // Alternate who goes first, so neither always meets a disk the
        // other has just loaded.
        let ceph_first = ceph_runs % 2 == 1;
        ceph_runs += usize::from(with_ceph.is_some());
        let mut p = None;
        if let (Some(c), true) = (with_ceph, ceph_first) {
            eprintln!("{}: Ceph", w.label());
            p = Some(c.run_fio(w.rw, w.qd, args.runtime, args.volume_size)?);
        }
        eprintln!("{}: Celer", w.label());
        let c = run_celer(
            *w,
            &mut queues,
            volume_blocks,
            runtime,
            args.poll_us,
            &cluster,
        )?;
        celer.push(c);
        if let (Some(c), false) = (with_ceph, ceph_first) {
            eprintln!("{}: Ceph", w.label());
            p = Some(c.run_fio(w.rw, w.qd, args.runtime, args.volume_size)?);
        }
        peer.push(p);
    }
    print_report(&selected, &celer, &peer, &floor);
    if args.scrub_rounds > 0 {
        scrub_cost(args, &cluster, &mut queues)?;
    }
    if args.snapshot_rounds > 0 {
        snapshot_cost(args, &cluster, &mut queues)?;
    }
    if args.auth_rounds > 0 {
        auth_cost(args, &dir)?;
    }
    if args.tls_rounds > 0 {
        tls_cost(args, &dir)?;
    }

    drop(queues);
    drop(device);
    // The volume is attached exclusively: the --exec command (the guest's
    // front end) attaches it next.
    attached.detach()?;
    if let Some(cmd) = &args.exec {
        println!();
        println!("running --exec with the cluster up: {cmd}");
        let exe = std::env::current_exe()?;
        let status = Command::new("sh")
            .args(["-c", cmd])
            .env("CELER_BIN", exe)
            .env("CELER_META", &cluster.meta_url)
            .env("CELER_TOKEN", &cluster.token)
            .env("CELER_VOLUME", VOLUME_NAME)
            .status()
            .context("run --exec")?;
        anyhow::ensure!(status.success(), "--exec command failed ({status})");
    }
    drop(cluster);
    drop(ceph);
    drop(reserve);
    Ok(())
}
