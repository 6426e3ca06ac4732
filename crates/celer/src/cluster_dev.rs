//! `cluster:VOLUME[,meta=URL]...[,token=SECRET|,token-file=PATH][,mode=exclusive|shared][,force][,attachment-file=PATH]`
//! (`meta=` once per control process, or CELER_META=URL1,URL2): a
//! replicated volume of a Celer cluster as a `BlockDevice`, for `celer
//! vhost serve` and `celer nbd serve`. The control service attaches the
//! volume (exclusive by default: a second writer is refused unless it
//! takes over with `force`, which fences the first) and names the volume's
//! id and size and a few node addresses; from then on the client talks to
//! the nodes only.
//!
//! With `attachment-file`, the attachment (its capability and key, 0600)
//! is kept there and renewed: a front end restarted on the same host
//! resumes it instead of attaching again, also while the control service
//! is down (until the capability expires).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use celer_client::{Capability, Client, ClientConfig, Credential};
use celer_device::BlockDevice;
use celer_meta::api::{AttachMode, AttachVolume, Attachment};
use celer_meta::client::MetaClient;

pub const DEFAULT_META: &str = "http://127.0.0.1:7700";

/// How a front end attaches its volume.
#[derive(Clone, Debug, Default)]
pub struct AttachOptions {
    pub read_only: bool,
    pub mode: AttachMode,
    /// Take the volume over from a conflicting holder (fencing it).
    pub force: bool,
    /// Keep the attachment here, and resume it from here.
    pub state_file: Option<PathBuf>,
    /// What attaches, for `celer volume info` (host and pid are added).
    pub purpose: String,
    /// Read this snapshot of the volume (read-only).
    pub snapshot: Option<String>,
    /// Data TLS credentials (ca-cert.pem, client-cert.pem, client-key.pem)
    /// for nodes started with `--tls-creds`; None: the environment's
    /// CELER_DATA_TLS_CREDS, or plain.
    pub data_tls: Option<PathBuf>,
}

impl AttachOptions {
    /// An exclusive read-write attachment for `purpose`.
    pub fn exclusive(purpose: &str) -> AttachOptions {
        AttachOptions {
            purpose: purpose.to_string(),
            ..AttachOptions::default()
        }
    }
}

/// An open attachment: end it with [`Detach::detach`] when done (a one-shot
/// job); a long-running front end keeps it (see `attachment-file`).
pub struct Detach {
    meta: MetaClient,
    attachment: u32,
    state_file: Option<PathBuf>,
}

impl Detach {
    /// Ends the attachment at the control service and removes its file.
    pub fn detach(self) -> Result<()> {
        if let Some(f) = &self.state_file {
            let _ = std::fs::remove_file(f);
        }
        self.meta
            .detach(self.attachment)
            .with_context(|| format!("detach attachment {}", self.attachment))?;
        Ok(())
    }
}

/// Opens `volume` through the control service at `meta`, for a job that
/// detaches when done.
pub fn open_volume(
    meta: &str,
    token: &str,
    volume: &str,
    opts: &AttachOptions,
) -> Result<(Arc<dyn BlockDevice>, Detach)> {
    let (client, detach) = open_client(meta, token, volume, opts)?;
    Ok((client, detach))
}

/// Who this process is, for the attachment record: host, pid, purpose.
fn holder(purpose: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let mut h = format!("{host} pid {} {purpose}", std::process::id());
    h.truncate(celer_meta::api::HOLDER_MAX_BYTES);
    h
}

/// An attachment file: the attachment and the data addresses of storage
/// nodes to start from when the control service is down.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedAttachment {
    attachment: Attachment,
    seeds: Vec<String>,
}

/// Writes `a` to `path`, 0600, atomically (a temporary file renamed).
fn save_attachment(path: &Path, a: &Attachment, seeds: &[String]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_vec_pretty(&SavedAttachment {
        attachment: a.clone(),
        seeds: seeds.to_vec(),
    })?;
    let write = || -> std::io::Result<()> {
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().with_context(|| format!("write the attachment file {}", path.display()))
}

/// A capability valid at least this much longer is resumed without asking
/// the control service (renewed right after, in the background): a restart
/// does not wait for a control service that is down or slow.
const RESUME_AS_IS_MS: u64 = 60_000;

/// The attachment kept in `path`, if there is one: used as it is while its
/// capability stays valid for a while (an attachment taken over meanwhile
/// finds its writes fenced, and its background renewal says why), renewed
/// first otherwise.
fn resume(mc: &MetaClient, path: &Path, volume: &str) -> Result<Option<SavedAttachment>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let saved: SavedAttachment = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not an attachment file (remove it to attach anew)",
            path.display()
        )
    })?;
    let att = &saved.attachment;
    anyhow::ensure!(
        att.volume.name == volume,
        "{} holds an attachment of volume `{}`, not `{volume}`: use another attachment-file",
        path.display(),
        att.volume.name
    );
    let id = att.attachment.id;
    if att.expires_unix_ms > unix_ms() + RESUME_AS_IS_MS && !saved.seeds.is_empty() {
        return Ok(Some(saved));
    }
    match mc.renew_attachment(id) {
        Ok(a) => {
            save_attachment(path, &a, &saved.seeds)?;
            Ok(Some(SavedAttachment {
                attachment: a,
                seeds: saved.seeds,
            }))
        }
        Err(e) if e.is_not_found() => anyhow::bail!(
            "attachment {id} of volume `{volume}` (in {}) was ended: taken over by another attachment or detached; its writes are fenced. Remove the file to attach again (with force to take the volume back)",
            path.display()
        ),
        Err(e) if att.expires_unix_ms > unix_ms() + 5_000 => {
            tracing::warn!(
                attachment = id,
                "control service unreachable ({e}): resuming attachment {id} with its capability, valid {} s more",
                att.expires_unix_ms.saturating_sub(unix_ms()) / 1000
            );
            Ok(Some(saved))
        }
        Err(e) => Err(e).with_context(|| {
            format!(
                "attachment {id} in {}: its capability expired and cannot be renewed",
                path.display()
            )
        }),
    }
}

/// The credential in an attachment the control service handed out.
pub fn credential_of(a: &Attachment) -> Result<Credential> {
    let capability = Capability::from_hex(&a.capability)
        .with_context(|| format!("attachment {}: bad capability", a.attachment.id))?;
    let key = celer_proto::auth::key_from_hex(&a.key)
        .with_context(|| format!("attachment {}: bad key", a.attachment.id))?;
    Ok(Credential::Attachment { capability, key })
}

/// Like `open_volume`, keeping the client's type (for its route table):
/// attaches the volume (the control service assigns the attachment id and
/// hands out a capability), connects, and keeps the capability renewed.
pub fn open_client(
    meta: &str,
    token: &str,
    volume: &str,
    opts: &AttachOptions,
) -> Result<(Arc<Client>, Detach)> {
    let mc = MetaClient::new(meta, token);
    let resumed = match &opts.state_file {
        Some(path) => resume(&mc, path, volume)?,
        None => None,
    };
    let mut saved_seeds = Vec::new();
    let renew_now = resumed.is_some();
    let att = match resumed {
        Some(s) => {
            tracing::info!(
                volume,
                attachment = s.attachment.attachment.id,
                "resumed the attachment"
            );
            saved_seeds = s.seeds;
            s.attachment
        }
        None => {
            let req = AttachVolume {
                read_only: opts.read_only,
                mode: opts.mode,
                force: opts.force,
                holder: holder(&opts.purpose),
            };
            let a = mc.attach_with(volume, &req).with_context(|| {
                format!("attach volume `{volume}` at the control service {meta}")
            })?;
            a
        }
    };
    let vol = &att.volume;
    // Seeds: for a resumed attachment the nodes saved with it (they
    // correct the client's route: a restart does not wait for the control
    // service), otherwise the nodes the control service lists as up.
    let seeds: Vec<String> = if !saved_seeds.is_empty() {
        saved_seeds
    } else {
        mc.route()
            .with_context(|| format!("route table from {meta}: are the storage nodes up?"))?
            .nodes
            .iter()
            .filter(|n| n.up)
            .map(|n| n.data_addr.clone())
            .collect()
    };
    anyhow::ensure!(!seeds.is_empty(), "no storage node is up");
    if let Some(path) = &opts.state_file {
        save_attachment(path, &att, &seeds)?;
    }
    let mut cfg = ClientConfig::new(seeds.clone(), vol.id, vol.size_bytes, credential_of(&att)?);
    cfg.sector_bytes = vol.sector_size_bytes;
    cfg.lineage = vol.lineage();
    cfg.era = vol.head_era;
    let tls_dir = opts
        .data_tls
        .clone()
        .or_else(|| std::env::var_os("CELER_DATA_TLS_CREDS").map(PathBuf::from));
    if let Some(dir) = tls_dir {
        cfg.data_tls = Some(
            celer_client::celer_tls::DataTls::load_client(&dir)
                .with_context(|| format!("data TLS credentials in {}", dir.display()))?,
        );
    }
    if let Some(name) = &opts.snapshot {
        let snap = vol.snapshot(name).ok_or_else(|| {
            anyhow::anyhow!(
                "volume `{volume}` has no snapshot `{name}`: `celer snapshot list {volume}` shows them"
            )
        })?;
        cfg.read_snapshot = Some(snap.era);
    }
    let client = Client::connect(cfg).with_context(|| format!("connect to volume `{volume}`"))?;
    tracing::info!(
        volume,
        attachment = att.attachment.id,
        "attached (capability valid for {} s)",
        att.expires_unix_ms.saturating_sub(unix_ms()) / 1000
    );
    let client = Arc::new(client);
    CapabilityKeeper {
        meta: mc,
        attachment: att.attachment.id,
        client: Arc::downgrade(&client),
        state_file: opts.state_file.clone(),
        seeds,
        renew_now,
    }
    .spawn()?;
    let detach = Detach {
        meta: MetaClient::new(meta, token),
        attachment: att.attachment.id,
        state_file: opts.state_file.clone(),
    };
    Ok((client, detach))
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Renews an attachment's capability at a third of its lifetime, so that a
/// control service outage of up to two thirds of it (40 minutes with the
/// default hour) does not stop I/O; the client presents the new one on its
/// open connections without a pause. Ends when the client is dropped.
struct CapabilityKeeper {
    meta: MetaClient,
    attachment: u32,
    client: std::sync::Weak<Client>,
    /// The attachment file, rewritten with every renewal.
    state_file: Option<PathBuf>,
    seeds: Vec<String>,
    /// Renew at once (a resumed attachment: also learns whether it ended).
    renew_now: bool,
}

impl CapabilityKeeper {
    fn spawn(self) -> Result<()> {
        std::thread::Builder::new()
            .name(format!("celer-cap-{}", self.attachment))
            .spawn(move || self.run())
            .context("start the capability renewal thread")?;
        Ok(())
    }

    fn run(&self) {
        let mut failing = false;
        let mut first = self.renew_now;
        loop {
            let Some(expires) = self.client.upgrade().and_then(|c| c.credential_expiry()) else {
                return;
            };
            let now = unix_ms();
            // Renew when two thirds of what is left remain; retry every
            // second while the control service does not answer.
            let left = expires.saturating_sub(now);
            let wait = if first {
                0
            } else if failing {
                1000
            } else {
                left / 3
            };
            first = false;
            let mut slept = 0;
            while slept < wait {
                let step = (wait - slept).min(500);
                std::thread::sleep(Duration::from_millis(step));
                slept += step;
                if self.client.strong_count() == 0 {
                    return;
                }
            }
            let renewed = self
                .meta
                .renew_attachment(self.attachment)
                .map_err(anyhow::Error::from)
                .and_then(|a| {
                    if let Some(path) = &self.state_file {
                        save_attachment(path, &a, &self.seeds)?;
                    }
                    credential_of(&a)
                });
            let Some(client) = self.client.upgrade() else {
                return;
            };
            match renewed.and_then(|c| client.renew(c).map_err(anyhow::Error::from)) {
                Ok(()) => {
                    if failing {
                        tracing::info!(attachment = self.attachment, "capability renewed again");
                    }
                    failing = false;
                }
                Err(e)
                    if e.downcast_ref::<celer_meta::MetaClientError>()
                        .is_some_and(|m| m.is_not_found()) =>
                {
                    tracing::error!(
                        attachment = self.attachment,
                        "the attachment was ended (taken over by another attachment, or detached): its writes are fenced; stop this front end{}",
                        self.state_file
                            .as_ref()
                            .map(|f| format!(" and remove {}", f.display()))
                            .unwrap_or_default()
                    );
                    return;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(
                            attachment = self.attachment,
                            left_ms = expires.saturating_sub(unix_ms()),
                            "cannot renew the capability (I/O goes on until it expires): {e:#}"
                        );
                    }
                    failing = true;
                }
            }
        }
    }
}

/// How long one long poll of an attachment's size watch waits.
pub const SIZE_WAIT: Duration = Duration::from_secs(5);

/// Follows a volume's size at the control service, so that an attachment
/// sees an online resize (`celer volume resize`): the client accepts the new
/// range, then the front end tells its peer (vhost: a config change
/// notification to QEMU, which interrupts the guest; NBD: new connections
/// get the new size). A long poll: the control service answers as soon as
/// the size changes, or every [`SIZE_WAIT`] with no change.
pub struct SizeWatch {
    meta: MetaClient,
    volume: String,
}

impl SizeWatch {
    pub fn new(meta: &str, token: &str, volume: &str) -> SizeWatch {
        SizeWatch {
            meta: MetaClient::new(meta, token),
            volume: volume.to_string(),
        }
    }

    /// Starts the watch thread; when the volume grew, it grows `client` and
    /// then calls `grown` with the new size.
    pub fn spawn(
        self,
        client: Arc<Client>,
        grown: impl Fn(u64) + Send + 'static,
    ) -> Result<std::thread::JoinHandle<()>> {
        let name = format!("celer-size-{}", self.volume);
        let handle = std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || self.run(&client, &grown))
            .context("start the volume size watcher")?;
        Ok(handle)
    }

    fn run(&self, client: &Client, grown: &dyn Fn(u64)) {
        let mut failing = false;
        // The size the control service last gave: the next poll waits for
        // a change from it (not from the client's, which may differ after a
        // metadata restore shrank the record: that must not spin).
        let mut known = client.size_bytes();
        loop {
            let size_bytes = match self.meta.volume_wait(&self.volume, known, SIZE_WAIT) {
                Ok(v) => v.size_bytes,
                Err(e) => {
                    // Logged once per outage: the control service may be
                    // electing a leader, I/O goes on meanwhile.
                    if !failing {
                        tracing::warn!(volume = self.volume, "cannot read the volume's size: {e}");
                        failing = true;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            if failing {
                tracing::info!(volume = self.volume, "volume size watch works again");
                failing = false;
            }
            known = size_bytes;
            let attached = client.size_bytes();
            if size_bytes < attached {
                tracing::warn!(
                    volume = self.volume,
                    size_bytes,
                    attached,
                    "the control service records a smaller size than attached (a restore?): keeping the attached size"
                );
                continue;
            }
            if size_bytes == attached {
                continue;
            }
            match client.grow(size_bytes) {
                Ok(true) => grown(size_bytes),
                Ok(false) => {}
                Err(e) => tracing::warn!(volume = self.volume, "cannot grow: {e}"),
            }
        }
    }
}

/// Serves `dev` over vhost-user-blk as `a` asks; with `follow` (a cluster
/// volume's client and the watch of its size), the guest is told when the
/// volume grows.
pub fn serve_vhost(
    a: &celer_vhost::cli::ServeArgs,
    dev: Arc<dyn BlockDevice>,
    follow: Option<(Arc<Client>, SizeWatch)>,
) -> Result<()> {
    let config = celer_vhost::cli::serve_config(a);
    let backend = Arc::new(celer_vhost::VhostUserBlk::new(&config, &*dev)?);
    crate::migration_probe::start_fence_probe(&backend, dev.clone())?;
    if let Some((client, watch)) = follow {
        let b = backend.clone();
        watch.spawn(client, move |size_bytes| match b.grow(size_bytes) {
            Ok(true) => tracing::info!(size_bytes, "front end told of the new size"),
            Ok(false) => {}
            Err(e) => tracing::warn!("vhost-user-blk cannot grow: {e}"),
        })?;
    }
    celer_vhost::serve_backend(&config, backend)?;
    Ok(())
}

/// Parses the text after `cluster:` and opens the volume; the watch follows
/// its size.
pub fn open_spec(spec: &str, purpose: &str, data_tls: Option<&Path>) -> Result<Opened> {
    let mut parts = spec.split(',');
    let volume = parts.next().filter(|v| !v.is_empty()).ok_or_else(|| {
        anyhow::anyhow!(
            "cluster device needs a volume name: cluster:NAME[@SNAPSHOT][,meta=URL][,token=SECRET]"
        )
    })?;
    let mut metas: Vec<String> = Vec::new();
    let mut token = std::env::var("CELER_TOKEN").ok();
    let mut opts = AttachOptions::exclusive(purpose);
    opts.data_tls = data_tls.map(Path::to_path_buf);
    // VOLUME@SNAPSHOT: the snapshot, read-only (a shared read-only
    // attachment: the volume's writer keeps writing).
    let volume = match volume.split_once('@') {
        Some((v, s)) => {
            anyhow::ensure!(
                !v.is_empty() && !s.is_empty(),
                "cluster:{volume}: name a volume and a snapshot, VOLUME@SNAPSHOT"
            );
            opts.snapshot = Some(s.to_string());
            opts.read_only = true;
            v
        }
        None => volume,
    };
    let mut handoff = false;
    for kv in parts {
        if kv == "force" {
            opts.force = true;
            continue;
        }
        if kv == "handoff" {
            handoff = true;
            continue;
        }
        match kv.split_once('=') {
            Some(("mode", m)) => opts.mode = m.parse().map_err(anyhow::Error::msg)?,
            Some(("attachment-file", f)) => opts.state_file = Some(PathBuf::from(f)),
            Some(("data-tls-creds", d)) => opts.data_tls = Some(PathBuf::from(d)),
            // Several control processes: meta= once for each.
            Some(("meta", v)) => metas.push(v.to_string()),
            Some(("token", v)) => token = Some(v.to_string()),
            Some(("token-file", v)) => {
                let text =
                    std::fs::read_to_string(v).with_context(|| format!("read token file {v}"))?;
                // `SECRET` or `NAME SECRET` lines: the first one's secret.
                token = text
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty() && !l.starts_with('#'))
                    .and_then(|l| l.split_whitespace().last())
                    .map(str::to_string);
                anyhow::ensure!(token.is_some(), "token file {v} holds no token");
            }
            _ => anyhow::bail!(
                "unknown cluster device option `{kv}`: use meta=URL, token=SECRET, token-file=PATH, mode=exclusive|shared, force, handoff, attachment-file=PATH or data-tls-creds=DIR"
            ),
        }
    }
    let meta = if metas.is_empty() {
        std::env::var("CELER_META").unwrap_or_else(|_| DEFAULT_META.into())
    } else {
        metas.join(",")
    };
    let token = token.ok_or_else(|| {
        anyhow::anyhow!(
            "cluster device needs the cluster token: token=SECRET, token-file=PATH or CELER_TOKEN"
        )
    })?;
    if handoff {
        return Ok(Opened::Handoff(HandoffState::open(
            &meta, &token, volume, opts,
        )?));
    }
    // A long-running front end keeps its attachment (resumed from its file
    // after a restart, or ended with `celer volume detach`).
    let (client, _keep) = open_client(&meta, &token, volume, &opts)?;
    Ok(Opened::Attached(
        client,
        SizeWatch::new(&meta, &token, volume),
    ))
}

/// A cluster device as `open_spec` opened it.
pub enum Opened {
    /// Attached and connected; the watch follows the volume's size.
    Attached(Arc<Client>, SizeWatch),
    /// A migration destination, attaching at its first I/O.
    Handoff(HandoffDevice),
}

/// `cluster:VOLUME,...,handoff`: the device of a live migration's
/// destination. It shows the volume as the source's does (size, serial)
/// from the start, so QEMU can set up the incoming VM, but attaches only
/// at its first I/O, with `force`: the source's attachment is ended and
/// fenced right then (the control service answers once every live node
/// refuses its writes), so ownership passes at the switch-over and never
/// both can write. QEMU stops the source's rings (and the source back end
/// finishes their requests) before the destination's guest runs, so the
/// first I/O comes after the source's last.
///
/// The take-over runs on the first queue that submits (a few ms; up to
/// the control service's fence deadline if a node does not confirm); the
/// other queues then open on the same client.
pub struct HandoffState {
    info: celer_device::DeviceInfo,
    meta: String,
    token: String,
    volume: String,
    opts: AttachOptions,
    /// Set at the first I/O. Locked only when a queue opens its client
    /// queue (once per queue), never per I/O.
    client: std::sync::Mutex<Option<Arc<Client>>>,
    /// The migration test's log of the take-over (a test hook, see
    /// `migration_probe`).
    takeover_log: Option<crate::migration_probe::TakeoverLog>,
}

impl HandoffState {
    /// Reads the volume's record (no attachment yet).
    fn open(
        meta: &str,
        token: &str,
        volume: &str,
        mut opts: AttachOptions,
    ) -> Result<HandoffDevice> {
        let v = MetaClient::new(meta, token)
            .volume(volume)
            .with_context(|| format!("volume `{volume}` at the control service {meta}"))?;
        opts.force = true;
        opts.mode = AttachMode::Exclusive;
        tracing::info!(
            volume,
            "migration destination: the volume is taken over at the first I/O"
        );
        Ok(HandoffDevice(Arc::new(HandoffState {
            info: celer_client::volume_info(
                v.id,
                v.size_bytes,
                v.sector_size_bytes,
                opts.read_only,
            ),
            meta: meta.to_string(),
            token: token.to_string(),
            volume: volume.to_string(),
            opts,
            client: std::sync::Mutex::new(None),
            takeover_log: crate::migration_probe::TakeoverLog::from_env()?,
        })))
    }

    /// The client, attaching (taking over) on the first call.
    fn client(&self) -> Result<Arc<Client>> {
        let mut c = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = c.as_ref() {
            return Ok(c.clone());
        }
        let started = std::time::Instant::now();
        let started_ns = crate::migration_probe::monotonic_ns();
        let (client, _keep) = open_client(&self.meta, &self.token, &self.volume, &self.opts)?;
        if let Some(log) = &self.takeover_log {
            log.takeover(started_ns, crate::migration_probe::monotonic_ns());
        }
        tracing::info!(
            volume = self.volume,
            took_ms = started.elapsed().as_millis() as u64,
            "took the volume over at the first I/O"
        );
        *c = Some(client.clone());
        Ok(client)
    }
}

/// The block device of a [`HandoffState`]: queues that attach at their
/// first I/O.
pub struct HandoffDevice(Arc<HandoffState>);

impl BlockDevice for HandoffDevice {
    fn info(&self) -> celer_device::DeviceInfo {
        self.0.info.clone()
    }

    /// Its queues are the client's once it took over (before, they hold
    /// nothing): as device-wide as the client's.
    fn flush_is_device_wide(&self) -> bool {
        true
    }

    /// Its writes are the client's.
    fn writes_durable_on_completion(&self) -> bool {
        true
    }

    /// The client's answer once the volume is taken over; before, "all
    /// data" (asking must not take the volume over).
    fn allocation(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        out: &mut Vec<celer_device::Extent>,
    ) -> Result<(), celer_device::IoError> {
        let client = self
            .0
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match client {
            Some(c) => c.allocation(offset_bytes, len_bytes, out),
            None => {
                out.push(celer_device::Extent {
                    len_bytes,
                    allocation: celer_device::Allocation::Data,
                });
                Ok(())
            }
        }
    }

    fn open_queue(
        &self,
        index: usize,
    ) -> Result<Box<dyn celer_device::DeviceQueue>, celer_device::IoError> {
        // SAFETY: plain syscall; checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(celer_device::IoError::Io(format!(
                "epoll_create1: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let epfd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Box::new(HandoffQueue {
            dev: self.0.clone(),
            index,
            inner: None,
            epfd,
        }))
    }
}

/// A queue of a [`HandoffDevice`]: empty until its first request, then the
/// client's queue. Its completion fd is an epoll set that holds the client
/// queue's once there is one, so the front end's wait works before and
/// after.
struct HandoffQueue {
    dev: Arc<HandoffState>,
    index: usize,
    inner: Option<Box<dyn celer_device::DeviceQueue>>,
    epfd: std::os::fd::OwnedFd,
}

impl HandoffQueue {
    fn open_inner(
        &mut self,
    ) -> Result<&mut Box<dyn celer_device::DeviceQueue>, celer_device::IoError> {
        use std::os::fd::AsRawFd;
        if self.inner.is_none() {
            let client = self.dev.client().map_err(|e| {
                celer_device::IoError::Io(format!("take-over at the first I/O: {e:#}"))
            })?;
            let q = client.open_queue(self.index)?;
            if let Some(fd) = q.completion_fd() {
                let mut ev = libc::epoll_event {
                    events: libc::EPOLLIN as u32,
                    u64: 0,
                };
                // SAFETY: both descriptors are open; `ev` is a local.
                let r = unsafe {
                    libc::epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev)
                };
                if r < 0 {
                    return Err(celer_device::IoError::Io(format!(
                        "epoll_ctl: {}",
                        std::io::Error::last_os_error()
                    )));
                }
            }
            self.inner = Some(q);
        }
        self.inner
            .as_mut()
            .ok_or_else(|| celer_device::IoError::Io("no client queue".into()))
    }
}

impl celer_device::DeviceQueue for HandoffQueue {
    unsafe fn submit(
        &mut self,
        req: &celer_device::IoRequest<'_>,
    ) -> Result<(), celer_device::IoError> {
        self.open_inner()?;
        if let Some(log) = &self.dev.takeover_log {
            log.submitting(req.op);
        }
        let q = self.open_inner()?;
        // SAFETY: the caller's guarantee, passed on.
        unsafe { q.submit(req) }
    }

    fn poll(&mut self, done: &mut dyn FnMut(celer_device::IoCompletion)) -> usize {
        self.inner.as_mut().map_or(0, |q| q.poll(done))
    }

    fn inflight(&self) -> usize {
        self.inner.as_ref().map_or(0, |q| q.inflight())
    }

    fn inflight_max(&self) -> usize {
        celer_client::INFLIGHT_MAX
    }

    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.epfd.as_raw_fd())
    }
}
