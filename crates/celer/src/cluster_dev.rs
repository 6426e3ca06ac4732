//! `cluster:VOLUME[,meta=URL]...[,token=SECRET|,token-file=PATH]` (`meta=`
//! once per control process, or CELER_META=URL1,URL2): a replicated volume of a
//! Celer cluster as a `BlockDevice`, for `celer vhost serve` and `celer nbd
//! serve`. The control service names the volume's id and size and a few
//! node addresses; from then on the client talks to the nodes only.

use std::sync::Arc;

use anyhow::{Context, Result};
use celer_client::{Client, ClientConfig};
use celer_device::BlockDevice;
use celer_meta::client::MetaClient;

pub const DEFAULT_META: &str = "http://127.0.0.1:7700";

/// A client id for the write versions of this attachment: random, so two
/// attachments of one volume (multi-attach) differ with probability
/// 65535/65536. (The control service does not hand out ids yet.)
pub fn random_client_id() -> u16 {
    let mut b = [0u8; 2];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1);
        b = ((t ^ std::process::id()) as u16).to_le_bytes();
    }
    u16::from_le_bytes(b).max(1)
}

/// Opens `volume` through the control service at `meta`.
pub fn open_volume(meta: &str, token: &str, volume: &str) -> Result<Arc<dyn BlockDevice>> {
    Ok(open_client(meta, token, volume)?)
}

/// Like `open_volume`, keeping the client's type (for its route table).
pub fn open_client(meta: &str, token: &str, volume: &str) -> Result<Arc<Client>> {
    let mc = MetaClient::new(meta, token);
    let vol = mc.volume(volume).with_context(|| {
        format!(
            "volume `{volume}` at the control service {meta} (list them with `celer volume list`)"
        )
    })?;
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
    let cfg = ClientConfig::new(seeds, vol.id, vol.size_bytes, random_client_id());
    let client = Client::connect(cfg).with_context(|| format!("connect to volume `{volume}`"))?;
    Ok(Arc::new(client))
}

/// Parses the text after `cluster:` and opens the volume.
pub fn open_spec(spec: &str) -> Result<Arc<Client>> {
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
    open_client(&meta, &token, volume)
}
