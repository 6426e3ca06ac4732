//! `celer-vhost`: serve a null or file device over vhost-user-blk, or
//! benchmark vhost-user-blk back ends. The `celer` binary wires the same
//! library functions into `celer vhost serve` and `celer bench vhost`.

use std::path::PathBuf;

use anyhow::Context;
use celer_vhost::VhostConfig;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "celer-vhost", about = "Celer vhost-user-blk front end")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a device on a vhost-user socket.
    Serve(ServeArgs),
    /// Benchmark vhost-user-blk back ends (Celer vs qemu-storage-daemon).
    Bench(celer_vhost::bench::BenchArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Unix socket to listen on.
    #[arg(long)]
    socket: PathBuf,
    /// Device: `null:SIZE` (e.g. null:1G) or `file:PATH`.
    #[arg(long)]
    device: String,
    /// Virtqueues (one worker thread each).
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// CPUs to pin workers to, comma separated (worker i → cpus[i % n]).
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// Poll window after the last request, in µs (0: no polling).
    #[arg(long, default_value_t = 50)]
    poll_us: u64,
    /// Poll window while requests are in flight on the device, in µs.
    #[arg(long, default_value_t = 1000)]
    poll_inflight_us: u64,
    /// Serve the volume read-only.
    #[arg(long)]
    read_only: bool,
    /// Open file devices with O_DIRECT.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    direct: bool,
    /// Stop after this many connections (default: serve forever).
    #[arg(long)]
    connections: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Serve(a) => {
            let device = celer_vhost::bench::open_device(&a.device, a.read_only, a.direct)?;
            let mut config = VhostConfig::new(a.socket);
            config.num_queues = a.queues;
            config.cpus = a.cpus;
            config.poll_us = a.poll_us;
            config.poll_inflight_us = a.poll_inflight_us;
            config.connections_max = a.connections;
            celer_vhost::serve(config, device)?;
            Ok(())
        }
        Cmd::Bench(a) => {
            let exe = std::env::current_exe().context("cannot find our own executable")?;
            let serve_cmd = vec![exe.display().to_string(), "serve".to_string()];
            celer_vhost::bench::run_bench(&a, &serve_cmd)
        }
    }
}
