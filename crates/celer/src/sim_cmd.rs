//! `celer sim`: the deterministic simulations (celer-sim): the control
//! plane, with `--engine` one storage engine on a simulated disk, or with
//! `--data` the data path (real node cores, simulated network and disks).

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct SimArgs {
    /// The seed: the same seed replays the same run, line for line.
    #[arg(long)]
    pub seed: u64,
    /// Simulated seconds with faults (a quiet period follows).
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub seconds: u64,
    /// Runs seeds SEED, SEED+1, ... SEED+COUNT-1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub count: u64,
    /// Print the whole trace, not only the summary (the trace replays
    /// exactly; the summary's last line is wall-clock speed).
    #[arg(long)]
    pub trace: bool,
    /// Simulate one storage engine on a simulated disk (power cuts with
    /// I/O in flight, completions out of order) instead of the control
    /// plane; `--steps` sets its length.
    #[arg(long)]
    pub engine: bool,
    /// Engine simulation: driver steps (requests submitted, polls, waits).
    #[arg(long, default_value_t = 4000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub steps: u64,
    /// Simulate the data path instead: three real storage-node cores over
    /// real engines on simulated disks, a simulated network, two clients
    /// writing, discarding and reading one volume, power cuts, resets and
    /// stalled connections; `--millis` sets its length.
    #[arg(long, conflicts_with = "engine")]
    pub data: bool,
    /// Data simulation: simulated milliseconds with load and faults (the
    /// clients then finish what they started and every replica is read).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub millis: u64,
    /// Data simulation: operations each of the two clients issues per
    /// simulated second (writes, sector writes, discards, reads; at most 8
    /// in flight per client).
    #[arg(long, default_value_t = 4_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub ops_per_sec: u64,
    /// Data simulation: power cuts per simulated second (of one of the
    /// three nodes, which restarts on its disk after 2-32 ms). 50 keeps a
    /// node down a quarter of the time, restarting while the clients still
    /// send again what they sent before.
    #[arg(long, default_value_t = 4.0)]
    pub power_cuts_per_sec: f64,
    /// With --data: the control service marks a node that lost power down
    /// after a 6 ms lease, the others record what it misses and it catches
    /// up, or after a 20 ms grace its partitions move and are copied whole.
    #[arg(long)]
    pub route_changes: bool,
    /// With --data --route-changes: operator splits of the partitions per
    /// simulated second (up to 32 partitions, from 4).
    #[arg(long, default_value_t = 0.0)]
    pub splits_per_sec: f64,
    /// With --data --route-changes: the share (0-1) of restarts after a
    /// power cut that come back on a new, empty disk (`--replace-disk`),
    /// when every partition of the node has another member in sync.
    #[arg(long, default_value_t = 0.0)]
    pub new_disk_share: f64,
    /// With --data: take-overs per simulated second. A client attaches the
    /// volume exclusively with --force (as a VM moving host): the control
    /// service raises the fence generation and pushes it to the nodes; the
    /// other client's writes are then refused as fenced.
    #[arg(long, default_value_t = 0.0)]
    pub takeovers_per_sec: f64,
    /// With --data --route-changes: per simulated second, a node's agent
    /// loses the control service for 10-40 ms while clients and peers
    /// still reach the node (the service marks it down past its lease).
    #[arg(long, default_value_t = 0.0)]
    pub control_cuts_per_sec: f64,
}

/// Log time stamps in the data simulation's simulated time.
struct SimTime;

impl tracing_subscriber::fmt::time::FormatTime for SimTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        write!(w, "{:>9} µs", celer_sim::sim_time_us())
    }
}

/// A rate per simulated second as the simulation's chance per simulated
/// millisecond: 0 to 1000 (one chance per millisecond).
fn chance_per_ms(flag: &str, per_sec: f64) -> Result<f64> {
    if !(0.0..=1000.0).contains(&per_sec) {
        bail!("{flag} {per_sec}: between 0 and 1000 (one chance per simulated millisecond)");
    }
    Ok(per_sec / 1000.0)
}

fn run_data(a: &SimArgs) -> Result<()> {
    let crash_per_ms = chance_per_ms("--power-cuts-per-sec", a.power_cuts_per_sec)?;
    let split_per_ms = chance_per_ms("--splits-per-sec", a.splits_per_sec)?;
    let takeover_per_ms = chance_per_ms("--takeovers-per-sec", a.takeovers_per_sec)?;
    let control_cut_per_ms = chance_per_ms("--control-cuts-per-sec", a.control_cuts_per_sec)?;
    if !(0.0..=1.0).contains(&a.new_disk_share) {
        bail!("--new-disk-share {}: between 0 and 1", a.new_disk_share);
    }
    if a.control_cuts_per_sec > 0.0 && !a.route_changes {
        bail!("--control-cuts-per-sec needs --route-changes (leases long enough to lapse)");
    }
    if a.new_disk_share > 0.0 && !a.route_changes {
        bail!("--new-disk-share needs --route-changes (the control service moves the copies)");
    }
    if a.splits_per_sec > 0.0 && !a.route_changes {
        bail!("--splits-per-sec needs --route-changes (the control service places the partitions)");
    }
    let mut failed = Vec::new();
    for seed in a.seed..a.seed.saturating_add(a.count) {
        let mut cfg = celer_sim::DataSimConfig::new(seed);
        cfg.split_per_ms = split_per_ms;
        cfg.replace_disk = a.new_disk_share;
        cfg.duration_us = a.millis * 1000;
        cfg.ops_per_sec = a.ops_per_sec;
        cfg.crash_per_ms = crash_per_ms;
        cfg.route_changes = a.route_changes;
        cfg.takeover_per_ms = takeover_per_ms;
        cfg.control_cut_per_ms = control_cut_per_ms;
        let started = Instant::now();
        // The node cores log as real nodes do (CELER_LOG shows them, with
        // the simulator's own trace lines at debug, stamped with simulated
        // time).
        let report = match std::env::var("CELER_LOG") {
            Err(_) => tracing::subscriber::with_default(
                tracing::subscriber::NoSubscriber::default(),
                || celer_sim::run_data(&cfg, a.trace),
            ),
            Ok(filter) => {
                let logs = tracing_subscriber::fmt()
                    .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                    .with_writer(std::io::stderr)
                    .with_ansi(false)
                    .with_timer(SimTime)
                    .finish();
                tracing::subscriber::with_default(logs, || celer_sim::run_data(&cfg, a.trace))
            }
        };
        let wall = started.elapsed();
        if a.trace && report.violation.is_none() {
            for line in &report.trace {
                println!("{line}");
            }
        }
        print!("{}", report.render(wall));
        if report.violation.is_some() {
            failed.push(seed);
        }
    }
    if !failed.is_empty() {
        bail!("{} seed(s) broke an invariant: {failed:?}", failed.len());
    }
    Ok(())
}

fn run_engine(a: &SimArgs) -> Result<()> {
    let mut failed = Vec::new();
    for seed in a.seed..a.seed.saturating_add(a.count) {
        let mut cfg = celer_sim::EngineSimConfig::new(seed);
        cfg.steps = a.steps;
        let started = Instant::now();
        let report =
            tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
                celer_sim::run_engine(&cfg, a.trace)
            });
        let wall = started.elapsed();
        if a.trace && report.violation.is_none() {
            for line in &report.trace {
                println!("{line}");
            }
        }
        if a.trace {
            for line in &report.disk_log {
                println!("disk: {line}");
            }
        }
        print!("{}", report.render(wall));
        if report.violation.is_some() {
            failed.push(seed);
        }
    }
    if !failed.is_empty() {
        bail!("{} seed(s) broke an invariant: {failed:?}", failed.len());
    }
    Ok(())
}

pub fn run(a: &SimArgs) -> Result<()> {
    if a.engine {
        return run_engine(a);
    }
    if a.data {
        return run_data(a);
    }
    let mut failed = Vec::new();
    for seed in a.seed..a.seed.saturating_add(a.count) {
        let mut cfg = celer_sim::SimConfig::new(seed);
        cfg.seconds = a.seconds;
        let started = Instant::now();
        // The simulated control service logs as the real one does; its
        // lines would drown the trace (CELER_LOG shows them).
        let report = if std::env::var_os("CELER_LOG").is_none() {
            tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
                celer_sim::run(&cfg)
            })
        } else {
            celer_sim::run(&cfg)
        };
        let wall = started.elapsed();
        if a.trace {
            for line in &report.trace {
                println!("{line}");
            }
        }
        print!("{}", celer_sim::render(&report, wall));
        if report.violation.is_some() {
            failed.push(seed);
        }
    }
    if !failed.is_empty() {
        bail!("{} seed(s) broke an invariant: {failed:?}", failed.len());
    }
    Ok(())
}
