//! `celer meta`, `celer volume`, `celer status`: run the control service and
//! talk to it.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use celer_meta::api::{CreateVolume, LogEntry, NodeStatus, Volume};
use celer_meta::config::FileConfig;
use celer_meta::{MetaClient, MetaClientError, MetaConfig};
use clap::{Args, Subcommand};

const META_URL_DEFAULT: &str = "http://127.0.0.1:7700";

#[derive(Subcommand)]
pub enum MetaCommand {
    /// Run the control service (membership, volumes, routes, change log).
    Serve(ServeArgs),
    /// List the change log.
    Log(LogArgs),
    /// Restore volumes and nodes to what they were after change-log entry SEQ.
    Restore(RestoreArgs),
    /// Double the partition count (only the new halves move).
    Split(Conn),
    /// List the storage nodes.
    Nodes(ListArgs),
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:7700].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory (holds meta.redb).
    #[arg(long)]
    data: Option<PathBuf>,
    /// File holding the cluster token (`SECRET` or `NAME SECRET` lines).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The cluster token (or CELER_TOKEN).
    #[arg(long)]
    token: Option<String>,
    /// Heartbeat period told to nodes [default: 200].
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// A node without a heartbeat for this long is marked down [default: 1000].
    #[arg(long)]
    lease_ms: Option<u64>,
    /// log2 of the partition count of the first route table [default: 8].
    #[arg(long)]
    partition_bits: Option<u8>,
    /// Copies of every partition [default: 3].
    #[arg(long)]
    replicas: Option<u8>,
    /// Most partitions moving at once [default: 64].
    #[arg(long)]
    max_moves: Option<usize>,
    /// A node down for less than this many seconds keeps its places in its
    /// partitions (writes go on with the other members, and it copies only
    /// what it missed when it returns); past it, its partitions move to
    /// other nodes. 0: move at once [default: 300].
    #[arg(long)]
    down_grace_s: Option<u64>,
    /// Settings file (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Metadata store: redb (one process, --data) or etcd (several processes, one leader).
    #[arg(long)]
    store: Option<String>,
    /// etcd endpoints, comma-separated (with --store etcd).
    #[arg(long, value_delimiter = ',')]
    etcd: Option<Vec<String>>,
    /// This process's URL for clients and the other control processes
    /// (with --store etcd) [default: http://LISTEN].
    #[arg(long)]
    advertise: Option<String>,
}

#[derive(Args)]
pub struct Conn {
    /// Control service URL(s), comma-separated (or CELER_META) [default: http://127.0.0.1:7700].
    #[arg(long)]
    meta: Option<String>,
    /// The cluster token (or CELER_TOKEN).
    #[arg(long)]
    token: Option<String>,
    /// File holding the cluster token.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub(crate) conn: Conn,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub struct LogArgs {
    #[command(flatten)]
    conn: Conn,
    /// Only entries after this sequence number.
    #[arg(long, default_value_t = 0)]
    since: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// The change-log entry to restore to (see `celer meta log`).
    seq: u64,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Subcommand)]
pub enum VolumeCommand {
    /// Create a volume.
    Create {
        name: String,
        /// Size (e.g. 10G): a multiple of 4K.
        #[arg(long, value_parser = celer_device::parse_size)]
        size: u64,
        /// Copies (1 to 3) [default: the cluster's].
        #[arg(long)]
        replicas: Option<u8>,
        /// Logical sector size guests see: 512 (disk images, cloud images)
        /// or 4096. Physical blocks are 4096 either way.
        #[arg(long, default_value_t = 512)]
        sector_size: u32,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the volumes.
    List(ListArgs),
    /// Show one volume.
    Info {
        name: String,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Grow a volume.
    Resize {
        name: String,
        /// The new size (larger than the current one).
        #[arg(long, value_parser = celer_device::parse_size)]
        size: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// End a volume's attachments (all, or the one given): no capability
    /// is renewed for them any more. The next exclusive attach fences them.
    Detach {
        name: String,
        /// Only this attachment (see `celer volume info`).
        #[arg(long)]
        attachment: Option<u32>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a volume.
    Delete {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Copy a disk image (raw, qcow2, any format qemu-img reads) into a
    /// volume, creating the volume if it does not exist.
    Import(crate::volume_io::ImportArgs),
    /// Copy a volume, or one of its snapshots (VOLUME@SNAPSHOT), into a
    /// disk image (raw or qcow2).
    Export(crate::volume_io::ExportArgs),
    /// Roll a volume back to one of its snapshots (refused while the
    /// volume is attached).
    Rollback {
        /// VOLUME@SNAPSHOT.
        spec: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Create a volume that starts as a snapshot's content and shares its
    /// blocks until it writes them (no data is copied).
    Clone {
        /// VOLUME@SNAPSHOT.
        spec: String,
        /// The new volume's name.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Copy into a clone every block it still shares with the snapshot it
    /// was cloned from, so that snapshot can be deleted. Safe while a VM
    /// writes the clone; run it again if it was interrupted (nothing is
    /// copied twice).
    Flatten {
        /// The clone.
        name: String,
        /// Ranges filled at once (each on every replica).
        #[arg(long, default_value_t = 4)]
        workers: usize,
        #[command(flatten)]
        conn: Conn,
    },
}

fn read_token_file(path: &PathBuf) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let tokens = celer_meta::server::parse_tokens(&text)
        .with_context(|| format!("token file {}", path.display()))?;
    Ok(tokens[0].secret.clone())
}

impl Conn {
    pub(crate) fn client(&self) -> Result<MetaClient> {
        let (url, token) = self.url_and_token()?;
        Ok(MetaClient::new(&url, &token))
    }

    /// The control service URL(s) and the token, from the flags or the
    /// environment.
    pub(crate) fn url_and_token(&self) -> Result<(String, String)> {
        let url = self
            .meta
            .clone()
            .or_else(|| std::env::var("CELER_META").ok())
            .unwrap_or_else(|| META_URL_DEFAULT.to_string());
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => read_token_file(f)?,
            (None, None) => std::env::var("CELER_TOKEN").map_err(|_| {
                anyhow::anyhow!("no token: pass --token, --token-file or set CELER_TOKEN")
            })?,
        };
        Ok((url, token))
    }
}

/// The server's own message for refused requests; the full story otherwise.
pub(crate) fn human(e: MetaClientError) -> anyhow::Error {
    match e {
        MetaClientError::Status {
            status, message, ..
        } if status < 500 => anyhow::anyhow!("{message}"),
        e => anyhow::anyhow!("{e}"),
    }
}

pub fn run_meta(cmd: MetaCommand) -> Result<()> {
    match cmd {
        MetaCommand::Serve(a) => serve(a),
        MetaCommand::Log(a) => {
            let c = a.conn.client()?;
            let mut entries: Vec<LogEntry> = Vec::new();
            let mut since = a.since;
            loop {
                let page = c.log(since).map_err(human)?;
                let Some(last) = page.last() else { break };
                since = last.seq;
                entries.extend(page);
            }
            if a.json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                println!(
                    "{:>6}  {:<24}  {:<10}  {:>6}  WHAT",
                    "SEQ", "AT (UTC)", "WHO", "EPOCH"
                );
                for e in &entries {
                    println!(
                        "{:>6}  {:<24}  {:<10}  {:>6}  {}",
                        e.seq,
                        utc(e.at),
                        e.who,
                        e.epoch,
                        e.what
                    );
                }
            }
            Ok(())
        }
        MetaCommand::Restore(a) => {
            let r = a.conn.client()?.restore_log(a.seq).map_err(human)?;
            println!(
                "restored to entry {}: {} volumes, {} nodes (recorded as entry {})",
                a.seq, r.volumes, r.nodes, r.seq
            );
            for what in &r.not_restored {
                println!("not brought back: {what}");
            }
            for what in &r.removed {
                println!("deleted (made after entry {}): {what}", a.seq);
            }
            Ok(())
        }
        MetaCommand::Split(conn) => {
            let t = conn.client()?.split().map_err(human)?;
            println!(
                "split: {} partitions, epoch {}",
                t.partition_count(),
                t.epoch
            );
            Ok(())
        }
        MetaCommand::Nodes(a) => {
            let nodes = a.conn.client()?.nodes().map_err(human)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                print_nodes(&nodes);
            }
            Ok(())
        }
    }
}

fn print_nodes(nodes: &[NodeStatus]) {
    println!(
        "{:>4}  {:<5}  {:<22}  {:<22}  {:<12}  {:>6}  {:>9}  BACKFILL",
        "ID", "STATE", "DATA", "ADMIN", "DOMAIN", "EPOCH", "HEARTBEAT"
    );
    for n in nodes {
        println!(
            "{:>4}  {:<5}  {:<22}  {:<22}  {:<12}  {:>6}  {:>9}  {}",
            n.id,
            if n.up { "up" } else { "down" },
            n.data_addr,
            n.admin_addr,
            n.domain,
            n.epoch_acked,
            n.last_heartbeat_ms_ago
                .map_or_else(|| "-".to_string(), |ms| format!("{ms} ms")),
            moved_text(
                n.backfill_bytes_done,
                n.backfill_bytes_total,
                n.backfill_partitions_unlisted
            )
            .unwrap_or_else(|| "-".into()),
        );
        if let Some(f) = &n.failure {
            println!("      node {} cannot serve: {f}", n.id);
        }
        if let Some(w) = &n.warning {
            println!("      node {} warns: {w}", n.id);
        }
    }
}

/// `1.50 MiB of 3.00 MiB moved (2 partitions not yet listed)`, or `None`
/// when nothing is moving.
fn moved_text(done: u64, total: u64, unlisted: u64) -> Option<String> {
    use indicatif::HumanBytes;
    if total == 0 && unlisted == 0 {
        return None;
    }
    let mut t = format!("{} of {} moved", HumanBytes(done), HumanBytes(total));
    if unlisted > 0 {
        let s = if unlisted == 1 { "" } else { "s" };
        t.push_str(&format!(" ({unlisted} partition{s} not yet listed)"));
    }
    Some(t)
}

fn serve(a: ServeArgs) -> Result<()> {
    let file = match &a.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let listen = match (a.listen, &file.listen) {
        (Some(l), _) => l,
        (None, Some(l)) => l
            .parse()
            .with_context(|| format!("config listen `{l}` is not HOST:PORT"))?,
        (None, None) => celer_meta::server::LISTEN_DEFAULT
            .parse()
            .context("default listen address")?,
    };
    let store = a.store.or(file.store).unwrap_or_else(|| "redb".into());
    let data = a.data.or(file.data);
    let store = match store.as_str() {
        "redb" => {
            let Some(dir) = data.clone() else {
                bail!("--data DIR is required (the directory for meta.redb)");
            };
            celer_meta::server::StoreConfig::Redb { dir }
        }
        "etcd" => {
            let endpoints = a.etcd.or(file.etcd).unwrap_or_default();
            if endpoints.is_empty() {
                bail!("--store etcd needs --etcd http://HOST:2379[,...]");
            }
            if listen.ip().is_unspecified() && a.advertise.is_none() && file.advertise.is_none() {
                bail!("listening on {listen}: pass --advertise http://THIS-HOST:PORT so the other control processes can name this one");
            }
            let advertise = a
                .advertise
                .or(file.advertise)
                .unwrap_or_else(|| format!("http://{listen}"));
            celer_meta::server::StoreConfig::Etcd(celer_meta::etcd::EtcdConfig::new(
                endpoints, advertise,
            ))
        }
        other => bail!("unknown --store `{other}`: use redb or etcd"),
    };
    let tokens = match (a.token, a.token_file.or(file.token_file)) {
        (Some(t), _) => vec![celer_meta::server::Token {
            name: "operator".into(),
            secret: t,
            role: celer_meta::server::TokenRole::Operator,
        }],
        (None, Some(f)) => {
            let text = std::fs::read_to_string(&f)
                .with_context(|| format!("cannot read the token file {}", f.display()))?;
            celer_meta::server::parse_tokens(&text)
                .with_context(|| format!("token file {}", f.display()))?
        }
        (None, None) => match std::env::var("CELER_TOKEN") {
            Ok(t) => vec![celer_meta::server::Token {
                name: "operator".into(),
                secret: t,
                role: celer_meta::server::TokenRole::Operator,
            }],
            Err(_) => bail!("a token is required: --token-file FILE, --token or CELER_TOKEN"),
        },
    };
    let mut cfg = MetaConfig::new(listen, data.unwrap_or_default(), "");
    cfg.store = store;
    cfg.tokens = tokens;
    let c = &mut cfg.cluster;
    if let Some(v) = a.heartbeat_ms.or(file.heartbeat_ms) {
        c.heartbeat_ms = v;
    }
    if let Some(v) = a.lease_ms.or(file.lease_ms) {
        c.lease_ms = v;
    }
    if let Some(v) = a.partition_bits.or(file.partition_bits) {
        c.partition_bits = v;
    }
    if let Some(v) = a.replicas.or(file.replicas) {
        c.replicas = v;
    }
    if let Some(v) = a.max_moves.or(file.max_moves) {
        c.max_moves = v;
    }
    if let Some(v) = a.down_grace_s.or(file.down_grace_s) {
        c.down_grace_ms = v.saturating_mul(1000);
    }
    celer_meta::server::serve(cfg)?;
    Ok(())
}

pub fn run_volume(cmd: VolumeCommand) -> Result<()> {
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            replicas,
            sector_size,
            conn,
        } => {
            celer_meta::api::validate_sector_size(sector_size).map_err(anyhow::Error::msg)?;
            let v = conn
                .client()?
                .create_volume(&CreateVolume {
                    name,
                    size_bytes: size,
                    replicas,
                    sector_size_bytes: Some(sector_size),
                })
                .map_err(human)?;
            println!(
                "created volume {} (id {}, {}, {} replicas, {}-byte sectors)",
                v.name,
                v.id,
                size_text(v.size_bytes),
                v.replicas,
                v.sector_size_bytes
            );
        }
        VolumeCommand::List(a) => {
            let vols = a.conn.client()?.volumes().map_err(human)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&vols)?);
            } else {
                print_volumes(&vols);
            }
        }
        VolumeCommand::Info { name, list } => {
            let c = list.conn.client()?;
            let v = c.volume(&name).map_err(human)?;
            let mut atts = c.attachments().map_err(human)?;
            atts.retain(|a| a.volume_id == v.id);
            if list.json {
                let mut j = serde_json::to_value(&v)?;
                j["attachments"] = serde_json::to_value(&atts)?;
                println!("{}", serde_json::to_string_pretty(&j)?);
            } else {
                println!("name:      {}", v.name);
                println!("id:        {}", v.id);
                println!(
                    "size:      {} ({} bytes)",
                    size_text(v.size_bytes),
                    v.size_bytes
                );
                println!("replicas:  {}", v.replicas);
                println!(
                    "sectors:   {} bytes logical, 4096 physical",
                    v.sector_size_bytes
                );
                println!("created:   {}", utc(v.created_at));
                println!("fence:     {}", v.fence);
                if let Some(parent) = &v.parent {
                    println!(
                        "clone of:  {parent} (reads {} layers under its head; `celer volume flatten {}` copies them)",
                        v.under.len(),
                        v.name
                    );
                }
                if atts.is_empty() {
                    println!("attached:  no");
                }
                for a in &atts {
                    use celer_meta::state::{Clock, SystemClock};
                    println!(
                        "attached:  {} (fence {}, since {} UTC)",
                        celer_meta::state::describe(a, SystemClock.unix_ms()),
                        a.fence,
                        utc(a.at)
                    );
                }
            }
        }
        VolumeCommand::Detach {
            name,
            attachment,
            conn,
        } => {
            let c = conn.client()?;
            let v = c.volume(&name).map_err(human)?;
            let atts: Vec<_> = c
                .attachments()
                .map_err(human)?
                .into_iter()
                .filter(|a| a.volume_id == v.id && attachment.is_none_or(|id| id == a.id))
                .collect();
            if let Some(id) = attachment {
                anyhow::ensure!(
                    !atts.is_empty(),
                    "volume `{name}` has no attachment {id} (see `celer volume info {name}`)"
                );
            }
            if atts.is_empty() {
                println!("volume {name} is not attached");
            }
            for a in atts {
                c.detach(a.id).map_err(human)?;
                println!("detached attachment {} of volume {name}", a.id);
            }
        }
        VolumeCommand::Resize { name, size, conn } => {
            let c = conn.client()?;
            let old = c.volume(&name).map_err(human)?;
            let v = c.resize_volume(&name, size).map_err(human)?;
            println!(
                "volume {}: {} -> {}",
                v.name,
                size_text(old.size_bytes),
                size_text(v.size_bytes)
            );
        }
        VolumeCommand::Delete { name, conn } => {
            let v = conn.client()?.delete_volume(&name).map_err(human)?;
            println!("deleted volume {} (id {})", v.name, v.id);
        }
        VolumeCommand::Import(a) => crate::volume_io::import(&a)?,
        VolumeCommand::Export(a) => crate::volume_io::export(&a)?,
        VolumeCommand::Rollback { spec, conn } => crate::snapshot_cmd::rollback(&spec, &conn)?,
        VolumeCommand::Clone { spec, name, conn } => {
            crate::snapshot_cmd::clone(&spec, &name, &conn)?
        }
        VolumeCommand::Flatten {
            name,
            workers,
            conn,
        } => crate::snapshot_cmd::flatten(&name, workers, &conn)?,
    }
    Ok(())
}

fn print_volumes(vols: &[Volume]) {
    println!(
        "{:>6}  {:<24}  {:>10}  {:>8}  {:>6}  CREATED (UTC)",
        "ID", "NAME", "SIZE", "REPLICAS", "SECTOR"
    );
    for v in vols {
        println!(
            "{:>6}  {:<24}  {:>10}  {:>8}  {:>6}  {}",
            v.id,
            v.name,
            size_text(v.size_bytes),
            v.replicas,
            v.sector_size_bytes,
            utc(v.created_at)
        );
    }
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    list: ListArgs,
    /// Follow recovery and rebalancing with a progress bar (bytes moved out
    /// of bytes to move, as listed so far) until every partition is in sync
    /// and every node up, or until this many seconds pass (then exit 1).
    #[arg(long, value_name = "SECONDS")]
    wait: Option<u64>,
}

/// `celer status --wait`: a progress bar of bytes moved out of bytes to
/// move (both as the nodes' heartbeats report them; the total grows while
/// partitions are still being listed or deferred moves start), until every
/// partition is in sync.
fn wait_healthy(c: &celer_meta::client::MetaClient, seconds: u64) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} rebalance [{bar:40}] {bytes}/{total_bytes} moved, {msg} ({elapsed})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    // The figures return to 0 shortly after the last partition is in sync;
    // the finished bar shows the last total seen.
    let mut last_total = 0;
    loop {
        let s = c.status().map_err(human)?;
        if s.rebalance_bytes_total > 0 {
            last_total = s.rebalance_bytes_total;
        }
        bar.set_length(s.rebalance_bytes_total);
        bar.set_position(s.rebalance_bytes_done.min(s.rebalance_bytes_total));
        let unlisted = match s.rebalance_partitions_unlisted {
            0 => String::new(),
            n => format!(", {n} not yet listed"),
        };
        bar.set_message(format!(
            "{}/{} partitions in sync{unlisted}, epoch {}, {} node(s) down",
            s.partitions_in_sync, s.partitions, s.epoch, s.nodes_down
        ));
        if s.epoch > 0 && s.partitions_degraded == 0 && s.nodes_down == 0 {
            if s.rebalance_bytes_total == 0 {
                bar.set_length(last_total);
            }
            bar.finish();
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bar.abandon();
            anyhow::bail!(
                "not healthy after {seconds} s: {} of {} partitions degraded, {} node(s) down (see `celer meta nodes`)",
                s.partitions_degraded,
                s.partitions,
                s.nodes_down
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

pub fn run_status(a: StatusArgs) -> Result<()> {
    let c = a.list.conn.client()?;
    if let Some(seconds) = a.wait {
        wait_healthy(&c, seconds)?;
    }
    let s = c.status().map_err(human)?;
    if a.list.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!("control service: {}", c.base_url());
    println!("nodes:      {} up, {} down", s.nodes_up, s.nodes_down);
    if s.epoch == 0 {
        println!("route:      no table yet (waiting for enough nodes)");
    } else {
        println!(
            "route:      epoch {}, {} partitions: {} in sync, {} degraded",
            s.epoch, s.partitions, s.partitions_in_sync, s.partitions_degraded
        );
    }
    if s.partitions_write_blocked > 0 {
        println!(
            "blocked:    {} partition(s) have fewer members up than a write must reach: their writes wait for a member back or a stand-in",
            s.partitions_write_blocked
        );
    }
    for (node, left) in &s.down_grace_left_s {
        println!(
            "down:       node {node}, its places kept {left} s more ({} partition(s) write without a down member; it copies only what it missed when it returns)",
            s.partitions_down_member
        );
    }
    if let Some(t) = moved_text(
        s.rebalance_bytes_done,
        s.rebalance_bytes_total,
        s.rebalance_partitions_unlisted,
    ) {
        println!("rebalance:  {t}");
    }
    println!("volumes:    {}", s.volumes);
    println!("change log: {} entries", s.log_seq);
    // Nodes that said why they cannot serve (a full or failed disk).
    if let Ok(nodes) = c.nodes() {
        let up: Vec<&str> = nodes
            .iter()
            .filter(|n| n.up)
            .map(|n| n.admin_addr.as_str())
            .collect();
        if let Some(t) = scrub_text(&up) {
            println!("scrub:      {t}");
        }
        for n in nodes.iter().filter(|n| n.failure.is_some()) {
            println!(
                "failed:     node {} ({}): {}",
                n.id,
                n.data_addr,
                n.failure.as_deref().unwrap_or_default()
            );
        }
        for n in nodes.iter().filter(|n| n.warning.is_some()) {
            println!(
                "warning:    node {} ({}): {}",
                n.id,
                n.data_addr,
                n.warning.as_deref().unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// One line on the up nodes' scrubs (their `GET /v1/scrub`, no token):
/// passes, how many run now, what they found. None without nodes.
fn scrub_text(admins: &[&str]) -> Option<String> {
    if admins.is_empty() {
        return None;
    }
    let agent = ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(2))
        .build();
    let answers: Vec<serde_json::Value> = admins
        .iter()
        .filter_map(|a| {
            agent
                .get(&format!("http://{a}/v1/scrub"))
                .call()
                .ok()?
                .into_json()
                .ok()
        })
        .collect();
    let u = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    let sum = |k: &str| answers.iter().map(|v| u(v, k)).sum::<u64>();
    let passes = answers.iter().map(|v| u(v, "passes"));
    let (lo, hi) = (passes.clone().min()?, passes.max()?);
    let running = answers
        .iter()
        .filter(|v| v["running"].as_bool() == Some(true))
        .count();
    Some(format!(
        "{} of {} nodes answered: {running} running, {} passes done per node, {} damaged blocks found, copies differing {} behind / {} mismatched (both copied), {} divergent{}",
        answers.len(),
        admins.len(),
        if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") },
        sum("damaged_blocks"),
        sum("behind_blocks"),
        sum("mismatched_blocks"),
        sum("divergent_blocks"),
        if sum("divergent_blocks") > 0 {
            " (no majority: see the nodes' logs)"
        } else {
            ""
        }
    ))
}

/// `10 GiB`, `4 KiB`, `1536 MiB`: the largest unit that divides exactly.
fn size_text(bytes: u64) -> String {
    for (shift, unit) in [
        (50, "PiB"),
        (40, "TiB"),
        (30, "GiB"),
        (20, "MiB"),
        (10, "KiB"),
    ] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} B")
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS.mmm`, UTC.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_times() {
        assert_eq!(size_text(10 << 30), "10 GiB");
        assert_eq!(size_text(1536 << 20), "1536 MiB");
        assert_eq!(size_text(4096), "4 KiB");
        assert_eq!(size_text(100), "100 B");
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(951_782_400_123), "2000-02-29 00:00:00.123");
        assert_eq!(utc(1_700_000_000_000), "2023-11-14 22:13:20.000");
    }

    #[test]
    fn rebalance_progress_text() {
        assert_eq!(moved_text(0, 0, 0), None);
        assert_eq!(
            moved_text(3 << 19, 3 << 20, 2).as_deref(),
            Some("1.50 MiB of 3.00 MiB moved (2 partitions not yet listed)")
        );
        assert_eq!(
            moved_text(0, 0, 1).as_deref(),
            Some("0 B of 0 B moved (1 partition not yet listed)")
        );
        assert_eq!(
            moved_text(10 << 30, 10 << 30, 0).as_deref(),
            Some("10.00 GiB of 10.00 GiB moved")
        );
    }
}
