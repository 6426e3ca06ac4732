//! `celer snapshot create|list|info|delete`, `celer volume rollback` and
//! `celer volume clone`: a volume's snapshots through the control service
//! (see celer-proto, "Snapshots", and docs/architecture.md).

use anyhow::Result;
use clap::Subcommand;

use crate::meta_cmd::{human, Conn, ListArgs};

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Take a crash-consistent snapshot of a volume, also while a VM writes
    /// it: every write acknowledged before the command started is in it,
    /// and none the writer issued after one that is not. No data is copied.
    Create {
        /// VOLUME@SNAPSHOT.
        spec: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// List a volume's snapshots, oldest first.
    List {
        volume: String,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Show one snapshot.
    Info {
        /// VOLUME@SNAPSHOT.
        spec: String,
        #[command(flatten)]
        list: ListArgs,
    },
    /// List or export what changed between two snapshots of a volume
    /// (incremental backup, like `rbd export-diff`): `VOL@A VOL@B`, or one
    /// snapshot for everything it holds. Chunk granularity (1 MiB).
    Diff {
        /// VOLUME@FROM (older), or the only snapshot for a full diff.
        from: String,
        /// VOLUME@TO (newer).
        to: Option<String>,
        /// Write the diff to this file (without: list the changed extents).
        #[arg(long, short)]
        output: Option<std::path::PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Apply a file made by `celer snapshot diff --output` to a volume
    /// (restore: the volume must hold the diff's older snapshot's content,
    /// e.g. a full diff or export applied before). The whole file is
    /// checked before anything is written.
    ImportDiff {
        file: std::path::PathBuf,
        volume: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a snapshot (refused while a clone reads it: flatten or
    /// delete the clone first).
    Delete {
        /// VOLUME@SNAPSHOT.
        spec: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `VOLUME@SNAPSHOT` in two.
pub fn split_spec(spec: &str) -> Result<(&str, &str)> {
    match spec.split_once('@') {
        Some((v, s)) if !v.is_empty() && !s.is_empty() => Ok((v, s)),
        _ => anyhow::bail!("`{spec}`: name a volume and a snapshot as VOLUME@SNAPSHOT"),
    }
}

pub fn run(cmd: SnapshotCommand) -> Result<()> {
    match cmd {
        SnapshotCommand::Create { spec, conn } => {
            let (volume, snap) = split_spec(&spec)?;
            let started = std::time::Instant::now();
            let s = conn
                .client()?
                .create_snapshot(volume, snap)
                .map_err(human)?;
            println!(
                "snapshot {volume}@{} taken (era {}) in {} ms",
                s.name,
                s.era,
                started.elapsed().as_millis()
            );
        }
        SnapshotCommand::List { volume, list } => {
            let c = list.conn.client()?;
            let v = c.volume(&volume).map_err(human)?;
            // What each holds alone: asked of every node (it may fail while
            // one is unreachable; the list is shown without it then).
            let usage = if v.snapshots.is_empty() {
                Ok(Vec::new())
            } else {
                c.snapshot_usage(&volume)
            };
            let alone = |name: &str| -> Option<&celer_meta::api::SnapshotUsage> {
                usage.as_ref().ok()?.iter().find(|u| u.name == name)
            };
            if list.json {
                let j: Vec<serde_json::Value> = v
                    .snapshots
                    .iter()
                    .map(|s| {
                        let mut j = serde_json::to_value(s).unwrap_or_default();
                        if let Some(u) = alone(&s.name) {
                            j["alone_chunks"] = serde_json::json!(u.alone_chunks);
                            j["alone_bytes"] = serde_json::json!(u.alone_bytes);
                        }
                        j
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&j)?);
            } else if v.snapshots.is_empty() {
                println!("volume {volume} has no snapshot");
            } else {
                println!(
                    "{:<24} {:>8} {:>15} {:>22}",
                    "SNAPSHOT", "ERA", "CREATED (unix ms)", "HELD ALONE (ALL COPIES)"
                );
                for s in &v.snapshots {
                    let held = match alone(&s.name).map(|u| (u.alone_chunks, u.alone_bytes)) {
                        Some((Some(n), Some(b))) => {
                            format!("{} in {n} chunks", indicatif::HumanBytes(b))
                        }
                        Some(_) => "shared".to_string(),
                        None => "?".to_string(),
                    };
                    println!(
                        "{:<24} {:>8} {:>15} {:>22}",
                        s.name, s.era, s.created_at, held
                    );
                }
                if let Err(e) = usage {
                    eprintln!("space held alone unknown: {:#}", human(e));
                }
            }
        }
        SnapshotCommand::Info { spec, list } => {
            let (volume, snap) = split_spec(&spec)?;
            let c = list.conn.client()?;
            let v = c.volume(volume).map_err(human)?;
            let s = v.snapshot(snap).ok_or_else(|| {
                anyhow::anyhow!(
                    "volume {volume} has no snapshot `{snap}`: `celer snapshot list {volume}` shows them"
                )
            })?;
            let clones: Vec<String> = c
                .volumes()
                .map_err(human)?
                .into_iter()
                .filter(|c| c.parent.as_deref() == Some(spec.as_str()))
                .map(|c| c.name)
                .collect();
            if list.json {
                let j = serde_json::json!({
                    "volume": volume,
                    "snapshot": s,
                    "size_bytes": v.size_bytes,
                    "clones": clones,
                });
                println!("{}", serde_json::to_string_pretty(&j)?);
            } else {
                println!("snapshot {spec}");
                println!("  era {} over {} layers", s.era, s.under.len());
                println!("  created {} (unix ms)", s.created_at);
                println!("  size {} bytes", v.size_bytes);
                if clones.is_empty() {
                    println!("  clones: none");
                } else {
                    println!("  clones: {}", clones.join(", "));
                }
            }
        }
        SnapshotCommand::Diff {
            from,
            to,
            output,
            conn,
        } => crate::diff_cmd::diff(&from, to.as_deref(), output.as_deref(), &conn)?,
        SnapshotCommand::ImportDiff { file, volume, conn } => {
            crate::diff_cmd::import_diff(&file, &volume, &conn)?
        }
        SnapshotCommand::Delete { spec, conn } => {
            let (volume, snap) = split_spec(&spec)?;
            conn.client()?
                .delete_snapshot(volume, snap)
                .map_err(human)?;
            println!("deleted snapshot {spec}");
        }
    }
    Ok(())
}

/// `celer volume rollback VOLUME@SNAPSHOT`.
pub fn rollback(spec: &str, conn: &Conn) -> Result<()> {
    let (volume, snap) = split_spec(spec)?;
    let v = conn.client()?.rollback(volume, snap).map_err(human)?;
    println!(
        "volume {volume} rolled back to snapshot {snap} (new era {})",
        v.head_era
    );
    Ok(())
}

/// `celer volume clone VOLUME@SNAPSHOT NEW`.
pub fn clone(spec: &str, name: &str, conn: &Conn) -> Result<()> {
    let (volume, snap) = split_spec(spec)?;
    let started = std::time::Instant::now();
    let v = conn
        .client()?
        .clone_volume(volume, snap, name)
        .map_err(human)?;
    println!(
        "created volume {} (id {}) as a clone of {spec} in {} ms",
        v.name,
        v.id,
        started.elapsed().as_millis()
    );
    Ok(())
}

/// `celer volume flatten NAME`: copies into the clone's head every block
/// it still reads from the layers under it (on every member, while a VM
/// may keep writing it), then has the control service cut it off them, so
/// the snapshot it was cloned from can be deleted. Run it again after any
/// interruption: what was copied stays, and is not copied twice.
pub fn flatten(name: &str, workers: usize, conn: &Conn) -> Result<()> {
    use celer_client::{FillOptions, FillProgress};
    use indicatif::HumanBytes;

    let (url, token) = conn.url_and_token()?;
    let meta = celer_meta::MetaClient::new(&url, &token);
    let v = meta.volume(name).map_err(human)?;
    if v.under.is_empty() {
        println!(
            "volume {name} reads no layer under its head: nothing to flatten (flattened already, or not a clone)"
        );
        return Ok(());
    }
    let Some(parent) = v.parent.clone() else {
        anyhow::bail!(
            "volume {name} is not a clone: the layers under its head are its own snapshots (deleting them frees their space)"
        );
    };
    wait_for_cuts(&meta, &v)?;
    let (client, attached) = crate::cluster_dev::open_client(
        &url,
        &token,
        name,
        &crate::cluster_dev::AttachOptions {
            // A fill changes nothing the volume reads: a read-only
            // attachment, beside the VM's.
            read_only: true,
            ..crate::cluster_dev::AttachOptions::exclusive("volume flatten")
        },
    )?;
    let result = (|| -> Result<()> {
        // The layers the copy is for: those the attachment saw.
        let v = meta.volume(name).map_err(human)?;
        anyhow::ensure!(
            v.head_era == client.config().era && !v.under.is_empty(),
            "the layers of volume {name} changed while the flatten started (a snapshot of it, or another flatten): run it again"
        );
        let started = std::time::Instant::now();
        let chunks = client
            .layer_chunks()
            .map_err(|e| anyhow::anyhow!("list the chunks of volume {name}: {e}"))?;
        let listed_ms = started.elapsed().as_millis();
        let chunk_bytes = client.route_table().chunk_bytes;
        let total = (chunks.len() as u64 * chunk_bytes).min(v.size_bytes);
        let bar = crate::volume_io::progress_bar(total, &format!("flatten {name}"));
        let progress = |p: FillProgress| {
            bar.set_position(p.bytes_done);
            bar.set_message(format!(
                "flatten {name}: {} copied",
                HumanBytes(p.bytes_copied)
            ));
        };
        let opts = FillOptions {
            workers,
            ..FillOptions::default()
        };
        let done = client.fill_chunks(&chunks, &opts, &progress);
        bar.finish_and_clear();
        let done = done.map_err(|e| {
            anyhow::anyhow!(
                "flatten of volume {name} stopped: {e}. What was copied stays: run `celer volume flatten {name}` again to finish"
            )
        })?;
        let fill_s = started.elapsed().as_secs_f64();
        let req = celer_meta::api::FlattenVolume {
            head_era: v.head_era,
            under: v.under.clone(),
        };
        meta.flatten_volume(name, &req).map_err(human)?;
        println!(
            "flattened volume {name}: {} in {} chunks checked (listed in {listed_ms} ms), {} copied into its head in {:.1} s ({}/s); it no longer reads {parent}",
            crate::volume_io::bytes_text(done.bytes_done),
            chunks.len(),
            crate::volume_io::bytes_text(done.bytes_copied),
            fill_s,
            HumanBytes((done.bytes_copied as f64 / fill_s.max(1e-3)) as u64),
        );
        Ok(())
    })();
    if let Err(e) = attached.detach() {
        tracing::warn!("{e:#}");
    }
    result
}

/// Waits while a snapshot under the volume's head is still being cut: its
/// writer may still add blocks to it for `SNAPSHOT_CUT_MS` (2 s).
fn wait_for_cuts(meta: &celer_meta::MetaClient, v: &celer_meta::api::Volume) -> Result<()> {
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let until = meta
            .volumes()
            .map_err(human)?
            .iter()
            .filter(|w| w.lineage() == v.lineage())
            .filter_map(|w| w.cutting)
            .filter(|c| v.under.contains(&c.era) && c.until_unix_ms > now)
            .map(|c| c.until_unix_ms)
            .max();
        let Some(until) = until else {
            return Ok(());
        };
        std::thread::sleep(std::time::Duration::from_millis(until - now + 100));
    }
}
