//! `celer`: the command-line front of Celer.

mod bench_cluster;
mod bench_engine;
mod cluster_dev;
mod daemon_config;
mod device_metrics;
mod diff_cmd;
mod engine_cmd;
mod fio;
mod hugepages;
mod libvirt;
mod meta_cmd;
mod migration_probe;
mod node_cmd;
mod scrub_cmd;
mod sim_cmd;
mod snapshot_cmd;
mod up;
mod volume_io;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "celer",
    version,
    about = "Celer: a distributed block store for virtual machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local cluster (control service, 3 storage nodes, a volume) and
    /// serve the volume on a vhost-user-blk socket and over NBD.
    Up(up::UpArgs),
    /// Manage one disk's storage engine.
    #[command(subcommand)]
    Engine(engine_cmd::EngineCommand),
    /// Serve a volume to QEMU over vhost-user-blk.
    #[command(subcommand)]
    Vhost(VhostCommand),
    /// Serve a volume over NBD (qemu-img, qemu-nbd, fio's nbd engine).
    #[command(subcommand)]
    Nbd(NbdCommand),
    /// Benchmarks that print Celer's figures beside a peer's, measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run or query the control service.
    #[command(subcommand)]
    Meta(meta_cmd::MetaCommand),
    /// Create, list, resize and delete volumes.
    #[command(subcommand)]
    Volume(meta_cmd::VolumeCommand),
    /// The cluster at a glance: nodes, route epoch, partitions, volumes.
    Status(meta_cmd::StatusArgs),
    /// Run a storage node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// The storage nodes' background scrub (crc of every block, repair).
    #[command(subcommand)]
    Scrub(scrub_cmd::ScrubCommand),
    /// Snapshots of volumes: create, list, info, delete (rollback and
    /// clone are `celer volume` commands).
    #[command(subcommand)]
    Snapshot(snapshot_cmd::SnapshotCommand),
    /// Deterministic simulation of the control plane: the real control
    /// service on a simulated clock, modelled nodes, faults from a seed,
    /// invariants checked at every step.
    Sim(sim_cmd::SimArgs),
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Serve one engine disk as a storage node of a cluster.
    Serve(node_cmd::NodeServeArgs),
}

#[derive(Subcommand)]
enum VhostCommand {
    /// Listen on a Unix socket and serve a device as a virtio-blk disk.
    Serve(celer_vhost::cli::ServeArgs),
    /// Print libvirt domain XML for a disk on a vhost-user-blk socket.
    LibvirtXml(LibvirtXmlArgs),
}

#[derive(clap::Args)]
struct LibvirtXmlArgs {
    /// The socket `celer vhost serve` listens on.
    #[arg(long)]
    socket: std::path::PathBuf,
    /// Queues (as `celer vhost serve --queues`).
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// The guest's device name.
    #[arg(long, default_value = "vdb")]
    target: String,
    /// Print a whole domain with this name (else the disk and memoryBacking
    /// elements to add to one).
    #[arg(long)]
    domain: Option<String>,
    /// Guest memory of the whole domain, MiB.
    #[arg(long, default_value_t = 1024)]
    memory_mib: u64,
    /// vCPUs of the whole domain.
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
}

#[derive(Subcommand)]
enum NbdCommand {
    /// Listen on TCP and/or a Unix socket and serve a device as an NBD export.
    Serve(celer_nbd::cli::ServeArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// 4 KiB random write/read at QD1 and QD32: the engine vs fio on the same file.
    Engine(BenchEngineArgs),
    /// A user-space virtio-blk driver against vhost-user-blk back ends: Celer vs qemu-storage-daemon.
    Vhost(celer_vhost::bench::BenchArgs),
    /// 4 KiB random write/read at QD1 and QD32 on a 3-replica cluster of processes: Celer vs Ceph vs the disk's floor.
    Cluster(bench_cluster::ClusterBenchArgs),
}

#[derive(Args)]
struct BenchEngineArgs {
    /// Directory for the benchmark file (on the disk to measure).
    #[arg(long, default_value = "/var/tmp/celer-bench")]
    dir: PathBuf,
    /// Size of the benchmark file.
    #[arg(long, default_value = "2G", value_parser = celer_device::parse_size)]
    file_size: u64,
    /// Size of the region the random I/O covers.
    #[arg(long, default_value = "1G", value_parser = celer_device::parse_size)]
    volume_size: u64,
    /// Seconds per workload.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=3600))]
    runtime: u32,
    /// Skip the fio peer.
    #[arg(long)]
    no_fio: bool,
    /// Keep the engine's buffers on 4 KiB pages (by default they go on
    /// 2 MiB huge pages, reserved for the run when run as root).
    #[arg(long)]
    no_hugepages: bool,
    /// Run only the workloads whose name contains this (randwrite-qd1, randread-qd32, ...).
    #[arg(long)]
    only: Option<String>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CELER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = match parse_cli() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Parses the command line after folding in daemon settings files and
/// environment overrides (see `daemon_config`).
fn parse_cli() -> Result<Cli> {
    use clap::{CommandFactory, FromArgMatches};
    fn override_self(c: clap::Command) -> clap::Command {
        let c = c.args_override_self(true);
        let names: Vec<String> = c
            .get_subcommands()
            .map(|s| s.get_name().to_string())
            .collect();
        names
            .iter()
            .fold(c, |c, n| c.mut_subcommand(n, override_self))
    }
    let cmd = override_self(Cli::command());
    let argv = daemon_config::expand(&cmd, std::env::args_os().collect())?;
    let matches = cmd.try_get_matches_from(argv).unwrap_or_else(|e| e.exit());
    Cli::from_arg_matches(&matches).map_err(|e| e.exit())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Engine(c) => engine_cmd::run(c),
        Command::Meta(c) => meta_cmd::run_meta(c),
        Command::Volume(c) => meta_cmd::run_volume(c),
        Command::Status(a) => meta_cmd::run_status(a),
        Command::Scrub(c) => scrub_cmd::run(c),
        Command::Snapshot(c) => snapshot_cmd::run(c),
        Command::Node(NodeCommand::Serve(a)) => node_cmd::run(&a),
        Command::Up(a) => up::run(&a),
        Command::Sim(a) => sim_cmd::run(&a),
        Command::Vhost(VhostCommand::Serve(a)) => {
            let purpose = format!("vhost {}", a.socket.display());
            let tls = a.data_tls_creds.as_deref();
            let (dev, cluster) = match device_spec(&a.device, a.read_only, &purpose, tls)? {
                Some(x) => x,
                None => (
                    celer_vhost::bench::open_device(&a.device, a.read_only, a.direct)?,
                    None,
                ),
            };
            let client = cluster.as_ref().map(|c| c.0.clone());
            let dev = with_metrics(dev, client, a.metrics_listen)?;
            // The guest is told when the volume grows.
            cluster_dev::serve_vhost(&a, dev, cluster)
        }
        Command::Vhost(VhostCommand::LibvirtXml(a)) => {
            anyhow::ensure!(
                (1..=64).contains(&a.queues),
                "--queues {}: 1 to 64",
                a.queues
            );
            match &a.domain {
                Some(name) => print!(
                    "{}",
                    libvirt::domain_xml(
                        name,
                        a.memory_mib,
                        a.vcpus,
                        &a.socket,
                        a.queues,
                        &a.target
                    )
                ),
                None => print!(
                    "{}{}",
                    libvirt::MEMORY_BACKING,
                    libvirt::disk_xml(&a.socket, a.queues, &a.target, "")
                ),
            }
            Ok(())
        }
        Command::Nbd(NbdCommand::Serve(a)) => {
            let tls = a.data_tls_creds.as_deref();
            let (dev, cluster) = match device_spec(&a.device, a.read_only, "nbd", tls)? {
                Some(x) => x,
                None => (celer_nbd::cli::open_device(&a.device, a.read_only)?, None),
            };
            let client = cluster.as_ref().map(|c| c.0.clone());
            let dev = with_metrics(dev, client, a.metrics_listen)?;
            if let Some((client, watch)) = cluster {
                // NBD cannot tell a connected client: new connections get
                // the new size.
                watch.spawn(client, |size_bytes| {
                    tracing::info!(
                        size_bytes,
                        "volume grew: new NBD connections see the new size"
                    )
                })?;
            }
            celer_nbd::cli::run_serve_with(&a, dev)
        }
        Command::Bench(BenchCommand::Vhost(a)) => {
            celer_vhost::cli::run_bench_cli(&a, &["vhost", "serve"])
        }
        Command::Bench(BenchCommand::Cluster(a)) => bench_cluster::run(&a),
        Command::Bench(BenchCommand::Engine(a)) => {
            anyhow::ensure!(
                a.volume_size >= 256 * 4096 && a.volume_size % (256 * 4096) == 0,
                "--volume-size must be a positive multiple of 1M"
            );
            anyhow::ensure!(
                a.file_size >= a.volume_size + a.volume_size / 2,
                "--file-size must be at least 1.5x --volume-size (room for engine metadata and spare blocks)"
            );
            bench_engine::run(&bench_engine::BenchArgs {
                dir: a.dir,
                file_size_bytes: a.file_size,
                volume_size_bytes: a.volume_size,
                runtime_s: a.runtime,
                with_fio: !a.no_fio,
                only: a.only,
                hugepages: !a.no_hugepages,
            })
        }
    }
}

type OpenedDevice = (
    std::sync::Arc<dyn celer_device::BlockDevice>,
    Option<(std::sync::Arc<celer_client::Client>, cluster_dev::SizeWatch)>,
);

/// The devices the `celer` binary adds to the front ends' own (`null:`,
/// `file:`): `engine:` (a local engine volume) and `cluster:` (a replicated
/// volume, with its client for metrics and the watch of its size). `None`:
/// a spec the front end opens.
fn device_spec(
    spec: &str,
    read_only: bool,
    purpose: &str,
    data_tls: Option<&std::path::Path>,
) -> Result<Option<OpenedDevice>> {
    if let Some(s) = spec.strip_prefix("engine:") {
        return Ok(Some((open_engine_device(s, read_only)?, None)));
    }
    if let Some(s) = spec.strip_prefix("cluster:") {
        anyhow::ensure!(
            !read_only,
            "read-only cluster volumes are not supported yet"
        );
        return Ok(Some(match cluster_dev::open_spec(s, purpose, data_tls)? {
            cluster_dev::Opened::Attached(client, watch) => (client.clone(), Some((client, watch))),
            cluster_dev::Opened::Handoff(dev) => (std::sync::Arc::new(dev), None),
        }));
    }
    Ok(None)
}

/// With `--metrics-listen ADDR`: the device behind a metering wrapper and
/// `GET /metrics` served on ADDR.
fn with_metrics(
    dev: std::sync::Arc<dyn celer_device::BlockDevice>,
    client: Option<std::sync::Arc<celer_client::Client>>,
    listen: Option<std::net::SocketAddr>,
) -> Result<std::sync::Arc<dyn celer_device::BlockDevice>> {
    let Some(addr) = listen else {
        return Ok(dev);
    };
    let metrics = device_metrics::DeviceMetrics::new();
    let bound = metrics.serve(addr, move |m| {
        if let Some(c) = &client {
            m.set_route_epoch(c.route_table().epoch);
        }
    })?;
    tracing::info!("metrics on http://{bound}/metrics");
    Ok(device_metrics::MeteredDevice::wrap(dev, metrics))
}

/// The engine volume an `engine:` device spec names, for any front end.
fn open_engine_device(
    spec: &str,
    read_only: bool,
) -> Result<std::sync::Arc<dyn celer_device::BlockDevice>> {
    let device = celer_engine::EngineDevice::open(&engine_device_config(spec, read_only)?)?;
    Ok(std::sync::Arc::new(device))
}

/// `PATH,volume=N,size=SIZE` (after `engine:`): a volume of a local engine.
fn engine_device_config(spec: &str, read_only: bool) -> Result<celer_engine::EngineDeviceConfig> {
    let mut parts = spec.split(',');
    let path = parts.next().filter(|p| !p.is_empty());
    let Some(path) = path else {
        anyhow::bail!("engine device needs a path: engine:PATH,volume=N,size=SIZE");
    };
    let (mut volume, mut size) = (None, None);
    for kv in parts {
        match kv.split_once('=') {
            Some(("volume", v)) => {
                volume = Some(
                    v.parse::<u64>()
                        .map_err(|_| anyhow::anyhow!("volume={v}: not a number"))?,
                )
            }
            Some(("size", v)) => {
                size = Some(celer_device::parse_size(v).map_err(anyhow::Error::msg)?)
            }
            _ => anyhow::bail!("unknown engine device option `{kv}`: use volume=N and size=SIZE"),
        }
    }
    Ok(celer_engine::EngineDeviceConfig {
        path: path.into(),
        volume: volume.unwrap_or(1),
        size_bytes: size
            .ok_or_else(|| anyhow::anyhow!("engine device needs size=SIZE (e.g. size=10G)"))?,
        read_only,
    })
}

static TERMINATED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    TERMINATED.store(true, std::sync::atomic::Ordering::Release);
}

/// Calls `f` once, from a helper thread, after SIGINT or SIGTERM.
pub(crate) fn on_termination(f: impl FnOnce() + Send + 'static) {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    std::thread::spawn(move || {
        while !TERMINATED.load(std::sync::atomic::Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        tracing::info!("stopping (signal)");
        f();
    });
}
