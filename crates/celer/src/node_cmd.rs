//! `celer node serve`: a storage node daemon.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct NodeServeArgs {
    /// Settings file (TOML, keys as the flags with `_`: `admin_listen = "…"`);
    /// CELER_NODE_<FLAG> environment variables override it, flags override both.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The node's engine disk (a file or a block device).
    #[arg(long)]
    pub disk: PathBuf,
    /// Create and format the disk file with this size if it is not a Celer disk yet.
    #[arg(long, value_parser = celer_device::parse_size)]
    pub create: Option<u64>,
    /// Engine shards when formatting (a power of two; one thread each).
    #[arg(long, default_value_t = 2)]
    pub shards: u32,
    /// Where older releases kept the node id (`node.id`, default: the disk's
    /// directory); read only for a disk that does not record its node yet.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Data listener (celer-proto over TCP).
    #[arg(long, default_value = "127.0.0.1:7800")]
    pub listen: SocketAddr,
    /// Address clients and peers use for the data listener (default: --listen).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Admin HTTP listener: route pushes, /metrics, /v1/status.
    #[arg(long, default_value = "127.0.0.1:7900")]
    pub admin_listen: SocketAddr,
    /// Control service URL (`celer meta serve`).
    #[arg(long, env = "CELER_META")]
    pub meta: Option<String>,
    /// Cluster token (or CELER_TOKEN).
    #[arg(long, env = "CELER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the cluster token (`SECRET` or `NAME SECRET`; the first line is used).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Fixed node id (only without --meta).
    #[arg(long)]
    pub node_id: Option<u32>,
    /// This new disk replaces the lost or swapped disk of node ID: the node
    /// registers as ID and rejoins its partitions empty, copying their data
    /// back. Accepted once node ID's lease has expired (stop it first).
    #[arg(long, value_name = "ID")]
    pub replace_disk: Option<u32>,
    /// Keep retrying the registration this long while the control service
    /// is unreachable or failing (5xx); a refusal (4xx) stops at once.
    #[arg(long, default_value_t = celer_node::REGISTER_TIMEOUT_DEFAULT.as_millis() as u64)]
    pub register_timeout_ms: u64,
    /// Failure domain (host, rack): replicas go to distinct domains.
    #[arg(long, default_value = "default")]
    pub domain: String,
    /// Start with this JSON route table (without a control service).
    #[arg(long)]
    pub route: Option<PathBuf>,
    /// A member that does not answer a forwarded write within this many ms is reported unavailable.
    #[arg(long, default_value_t = 500)]
    pub forward_timeout_ms: u64,
    /// Keep polling this many µs after activity before sleeping (0 on shared cores).
    #[arg(long, default_value_t = 0)]
    pub busy_poll_us: u64,
    /// Close a client connection that sent nothing for this many seconds
    /// while none of its requests is in flight (0: never). Clients ping a
    /// quiet connection every 60 s, so keep it well above that.
    #[arg(long, default_value_t = celer_node::IDLE_TIMEOUT_DEFAULT.as_secs())]
    pub idle_timeout_s: u64,
    /// Serve the data port without checking credentials (any peer may read
    /// and write any volume). Only for measuring what authentication costs
    /// (`celer bench cluster`); refused unless --listen is a loopback address.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Scrub rate: data bytes per second the node reads to check every
    /// block's crc (K/M/G suffixes; 0 turns the scrub off). The default
    /// reads 4 GiB of data in 8.5 minutes.
    #[arg(long, default_value = "8M", value_parser = celer_device::parse_size)]
    pub scrub_rate: u64,
    /// Hours between the starts of two scrub passes (the first starts a
    /// minute after the node; `celer scrub start` starts one now).
    #[arg(long, default_value_t = 24.0)]
    pub scrub_interval_hours: f64,
    /// Data TLS: the data port speaks mutual TLS only. DIR has QEMU's
    /// tls-creds-x509 layout: ca-cert.pem (and ca-crl.pem), server-cert.pem
    /// and server-key.pem for the port, client-cert.pem and client-key.pem
    /// for this node's connections to other nodes. Every node of a cluster
    /// and every front end must then use TLS (see docs/security.md).
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// Put the shards' I/O buffers on 2 MiB huge pages when the kernel has
    /// them reserved and free (`sysctl vm.nr_hugepages`, about 8 MiB per
    /// engine shard); 4 KiB pages otherwise. The node logs which it got.
    #[arg(long)]
    pub hugepages: bool,
}

pub fn config(a: &NodeServeArgs) -> Result<celer_node::NodeConfig> {
    let token = match (&a.token, &a.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("read the token file {}", f.display()))?
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .and_then(|l| l.split_whitespace().last())
            .map(str::to_string)
            .ok_or_else(|| {
                anyhow::anyhow!("{} is empty: put the cluster token in it", f.display())
            })?,
        (None, None) => {
            anyhow::bail!("the cluster token is required: --token, --token-file or CELER_TOKEN")
        }
    };
    anyhow::ensure!(
        a.meta.is_some() || a.node_id.is_some(),
        "give --meta URL (a control service assigns the id) or --node-id N"
    );
    anyhow::ensure!(
        a.idle_timeout_s == 0 || a.idle_timeout_s >= 180,
        "--idle-timeout-s {}: give 0 (never) or at least 180: clients ping a quiet connection every {} s",
        a.idle_timeout_s,
        celer_client::KEEPALIVE_DEFAULT.as_secs()
    );
    if let Some(size) = a.create {
        let is_celer = celer_engine::Engine::identify(&a.disk).is_ok();
        if !is_celer {
            anyhow::ensure!(
                a.shards.is_power_of_two(),
                "--shards {} must be a power of two",
                a.shards
            );
            if let Some(dir) = a.disk.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("create {}", dir.display()))?;
            }
            let exists_nonempty = std::fs::metadata(&a.disk).is_ok_and(|m| m.len() > 0);
            anyhow::ensure!(
                !exists_nonempty,
                "{} exists and is not a Celer disk: refusing to format it (remove it or use `celer engine format --force`)",
                a.disk.display()
            );
            celer_engine::Engine::format(
                &a.disk,
                &celer_engine::FormatOptions {
                    shard_count: a.shards,
                    create_size_bytes: Some(size),
                    ..Default::default()
                },
            )
            .with_context(|| format!("format {}", a.disk.display()))?;
        }
    }
    anyhow::ensure!(
        a.create.is_some() || a.disk.exists(),
        "{} does not exist: give --create SIZE to make a new disk file, or point --disk at a formatted disk (`celer engine format`)",
        a.disk.display()
    );
    let state_dir = match &a.state_dir {
        Some(d) => d.clone(),
        None => a
            .disk
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    Ok(celer_node::NodeConfig {
        disk: a.disk.clone(),
        state_dir,
        listen: a.listen,
        advertise: a.advertise.clone(),
        admin_listen: a.admin_listen,
        meta_url: a.meta.clone(),
        token,
        node_id: a.node_id,
        domain: a.domain.clone(),
        route_file: a.route.clone(),
        forward_timeout: Duration::from_millis(a.forward_timeout_ms),
        busy_poll: Duration::from_micros(a.busy_poll_us),
        insecure_no_auth: a.insecure_no_auth,
        idle_timeout: (a.idle_timeout_s > 0).then(|| Duration::from_secs(a.idle_timeout_s)),
        scrub_bytes_per_sec: a.scrub_rate,
        scrub_interval: scrub_interval(a.scrub_interval_hours)?,
        tls_creds: a.tls_creds.clone(),
        hugepages: a.hugepages,
    })
}

fn scrub_interval(hours: f64) -> Result<Duration> {
    anyhow::ensure!(
        hours.is_finite() && hours > 0.0 && hours <= 24.0 * 365.0,
        "--scrub-interval-hours {hours}: give a number of hours above 0, at most a year"
    );
    Ok(Duration::from_secs_f64(hours * 3600.0))
}

/// How the node joins its cluster (`--replace-disk`, `--register-timeout-ms`).
pub fn join_options(a: &NodeServeArgs) -> celer_node::JoinOptions {
    celer_node::JoinOptions {
        replace_disk: a.replace_disk,
        register_timeout: Duration::from_millis(a.register_timeout_ms),
    }
}

pub fn run(a: &NodeServeArgs) -> Result<()> {
    let node = celer_node::Node::start_with(config(a)?, join_options(a))?;
    let stop = node.stopper();
    crate::on_termination(stop);
    node.wait()?;
    Ok(())
}
