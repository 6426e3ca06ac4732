//! `cluster:VOLUME[,meta=URL]...[,token=SECRET|,token-file=PATH]` (`meta=`
//! once per control process, or CELER_META=URL1,URL2): a replicated volume of a
//! Celer cluster as a `BlockDevice`, for `celer vhost serve` and `celer nbd
//! serve`. The control service names the volume's id and size and a few
//! node addresses; from then on the client talks to the nodes only.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use celer_client::{Capability, Client, ClientConfig, Credential};
use celer_device::BlockDevice;
use celer_meta::api::Attachment;
use celer_meta::client::MetaClient;

pub const DEFAULT_META: &str = "http://127.0.0.1:7700";

/// Opens `volume` through the control service at `meta`.
pub fn open_volume(meta: &str, token: &str, volume: &str) -> Result<Arc<dyn BlockDevice>> {
    Ok(open_client(meta, token, volume)?)
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
pub fn open_client(meta: &str, token: &str, volume: &str) -> Result<Arc<Client>> {
    let mc = MetaClient::new(meta, token);
    let att = mc.attach(volume, false).with_context(|| {
        format!(
            "attach volume `{volume}` at the control service {meta} (list them with `celer volume list`)"
        )
    })?;
    let vol = &att.volume;
    let route = mc
        .route()
        .with_context(|| format!("route table from {meta}: are the storage nodes up?"))?;
    let seeds: Vec<String> = route
        .nodes
        .iter()
        .filter(|n| n.up)
        .map(|n| n.data_addr.clone())
        .collect();
    anyhow::ensure!(!seeds.is_empty(), "no storage node is up");
    let mut cfg = ClientConfig::new(seeds, vol.id, vol.size_bytes, credential_of(&att)?);
    cfg.sector_bytes = vol.sector_size_bytes;
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
    }
    .spawn()?;
    Ok(client)
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
        loop {
            let Some(expires) = self.client.upgrade().and_then(|c| c.credential_expiry()) else {
                return;
            };
            let now = unix_ms();
            // Renew when two thirds of what is left remain; retry every
            // second while the control service does not answer.
            let left = expires.saturating_sub(now);
            let wait = if failing { 1000 } else { left / 3 };
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
                .and_then(|a| credential_of(&a));
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
pub fn open_spec(spec: &str) -> Result<(Arc<Client>, SizeWatch)> {
    let mut parts = spec.split(',');
    let volume = parts.next().filter(|v| !v.is_empty()).ok_or_else(|| {
        anyhow::anyhow!(
            "cluster device needs a volume name: cluster:NAME[,meta=URL][,token=SECRET]"
        )
    })?;
    let mut metas: Vec<String> = Vec::new();
    let mut token = std::env::var("CELER_TOKEN").ok();
    for kv in parts {
        match kv.split_once('=') {
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
                "unknown cluster device option `{kv}`: use meta=URL, token=SECRET or token-file=PATH"
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
    let client = open_client(&meta, &token, volume)?;
    Ok((client, SizeWatch::new(&meta, &token, volume)))
}
