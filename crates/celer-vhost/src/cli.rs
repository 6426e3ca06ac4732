//! Command-line surface shared by the `celer-vhost` binary and the `celer`
//! binary (`celer vhost serve`, `celer bench vhost`): flatten [`ServeArgs`]
//! or [`crate::bench::BenchArgs`] into a clap command and call [`run_serve`]
//! or [`run_bench_cli`].

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::VhostConfig;

/// `serve`: export a device on a vhost-user-blk socket.
#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// Settings file (TOML, keys as the flags with `_`); CELER_VHOST_<FLAG>
    /// environment variables override it, flags override both (read by the
    /// `celer` binary before parsing).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Unix socket to listen on.
    #[arg(long)]
    pub socket: PathBuf,
    /// Serve Prometheus metrics (requests, bytes, latency per op, queue
    /// depth, route epoch) on `http://ADDR/metrics` (read by the `celer` binary).
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// For a `cluster:` device whose nodes serve data TLS (`celer node
    /// serve --tls-creds`): DIR holds ca-cert.pem, client-cert.pem and
    /// client-key.pem (QEMU's tls-creds-x509 client layout); read by the
    /// `celer` binary.
    #[arg(long, value_name = "DIR")]
    pub data_tls_creds: Option<PathBuf>,
    /// Device: `null:SIZE` (e.g. null:1G), `file:PATH` (file or block
    /// device), or `delay:MICROS:DEVICE`, a test tool that reports the
    /// completions of DEVICE that many microseconds late (a slow disk).
    #[arg(long)]
    pub device: String,
    /// Virtqueues (one worker thread each).
    #[arg(long, default_value_t = 1)]
    pub queues: usize,
    /// CPUs to pin workers to, comma separated (worker i → cpus[i % n]).
    #[arg(long, value_delimiter = ',')]
    pub cpus: Vec<usize>,
    /// Poll window after the last request, in µs (0: no polling). Default:
    /// 50 when workers are pinned (--cpus) or fewer than the machine's CPUs
    /// (a core is left for spinning), 0 otherwise, where a spinning worker
    /// takes CPU from the guest. Measured in-guest on 2 cores, Celer / qsd
    /// IOPS medians: 1 queue qd1 read 1.38x with 50 vs 0.84x with 0;
    /// 2 queues 0.83-0.94x with 50 vs 0.97-1.18x with 0.
    #[arg(long)]
    pub poll_us: Option<u64>,
    /// Poll window while requests are in flight on the device, in µs. Off by
    /// default: spinning while the disk works only pays on a core of its own
    /// (use with --cpus on dedicated cores, e.g. 1000); on shared cores it
    /// takes CPU from the guest (measured: in-guest IOPS 0.46-0.63x qsd's
    /// with 1000 on 2 shared cores, 0.90-2.0x with 0).
    #[arg(long, default_value_t = 0)]
    pub poll_inflight_us: u64,
    /// Serve the volume read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Open file devices with O_DIRECT.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub direct: bool,
    /// Stop after this many connections (default: serve forever).
    #[arg(long)]
    pub connections: Option<usize>,
}

/// The idle poll window when none is given: spin only where a core is left
/// for it (workers pinned to their own CPUs, or fewer workers than CPUs).
fn default_poll_us(pinned: bool, queues: usize, cpus: usize) -> u64 {
    if pinned || queues < cpus {
        50
    } else {
        0
    }
}

/// Runs `serve` until its connections are used up (forever by default).
pub fn run_serve(a: &ServeArgs) -> anyhow::Result<()> {
    let device = crate::bench::open_device(&a.device, a.read_only, a.direct)?;
    run_serve_with(a, device)
}

/// Like [`run_serve`], for a device the caller opened (e.g. an engine volume).
pub fn run_serve_with(
    a: &ServeArgs,
    device: std::sync::Arc<dyn celer_device::BlockDevice>,
) -> anyhow::Result<()> {
    crate::serve(serve_config(a), device)?;
    Ok(())
}

/// The serving configuration `a` asks for (for callers that build the back
/// end themselves, e.g. to grow it online).
pub fn serve_config(a: &ServeArgs) -> VhostConfig {
    let mut config = VhostConfig::new(&a.socket);
    config.num_queues = a.queues;
    config.cpus = a.cpus.clone();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    config.poll_us = a
        .poll_us
        .unwrap_or_else(|| default_poll_us(!a.cpus.is_empty(), a.queues, cpus));
    config.poll_inflight_us = a.poll_inflight_us;
    config.connections_max = a.connections;
    config
}

/// Runs the benchmark; `serve_subcommand` is how this executable is told to
/// serve (e.g. `["vhost", "serve"]` for `celer`), followed by [`ServeArgs`].
pub fn run_bench_cli(a: &crate::bench::BenchArgs, serve_subcommand: &[&str]) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find our own executable")?;
    let mut cmd = vec![exe.display().to_string()];
    cmd.extend(serve_subcommand.iter().map(|s| s.to_string()));
    crate::bench::run_bench(a, &cmd)
}

#[cfg(test)]
mod tests {
    use super::default_poll_us;

    #[test]
    fn polls_only_where_a_core_is_left() {
        assert_eq!(default_poll_us(false, 1, 2), 50);
        assert_eq!(default_poll_us(false, 2, 2), 0);
        assert_eq!(default_poll_us(false, 4, 2), 0);
        assert_eq!(default_poll_us(true, 2, 2), 50);
        assert_eq!(default_poll_us(false, 1, 1), 0);
    }
}
