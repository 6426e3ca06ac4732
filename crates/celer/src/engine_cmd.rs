//! `celer engine ...`: format, inspect, scrub and rebuild one disk.

use std::path::PathBuf;

use anyhow::{Context, Result};
use celer_engine::{
    AlignedBuf, Completion, Engine, EngineOp, EngineRequest, FormatOptions, OpenOptions, Segment,
};
use clap::{Args, Subcommand};

use celer_device::parse_size;

#[derive(Subcommand)]
pub enum EngineCommand {
    /// Write a fresh engine onto a file or block device (its data is forgotten).
    Format(FormatArgs),
    /// Print the geometry and how many chunks each shard holds.
    Info(DiskArg),
    /// Read every allocated block and verify its crc32c.
    Check(DiskArg),
    /// Rebuild the metadata area (index) from the chunk slot headers.
    Rebuild(DiskArg),
    /// Print where on the disk a volume's block lives.
    Locate(LocateArgs),
}

#[derive(Args)]
pub struct DiskArg {
    /// The engine's file or block device.
    #[arg(long)]
    disk: PathBuf,
}

#[derive(Args)]
pub struct FormatArgs {
    #[arg(long)]
    disk: PathBuf,
    /// Create (or grow) a regular file of this size first, e.g. 10G.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Chunk size: the thin-allocation unit (power of two, 64K..64M).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    chunk_size: u64,
    /// Spare 4 KiB blocks per chunk slot for redirect-on-write.
    #[arg(long, default_value_t = 64)]
    spare_blocks: u32,
    /// Shards (one thread each).
    #[arg(long, default_value_t = 1)]
    shards: u32,
    /// Journal size per shard.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    journal_size: u64,
    /// Format even if the disk holds data (a Celer engine or anything else).
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct LocateArgs {
    #[arg(long)]
    disk: PathBuf,
    #[arg(long)]
    volume: u64,
    /// Byte offset within the volume.
    #[arg(long, value_parser = parse_size)]
    offset: u64,
}

pub fn run(cmd: EngineCommand) -> Result<()> {
    match cmd {
        EngineCommand::Format(a) => {
            anyhow::ensure!(
                a.chunk_size % 4096 == 0,
                "--chunk-size must be a multiple of 4K"
            );
            anyhow::ensure!(
                a.journal_size % 4096 == 0,
                "--journal-size must be a multiple of 4K"
            );
            let opts = FormatOptions {
                chunk_blocks: u32::try_from(a.chunk_size / 4096)
                    .context("--chunk-size is too large")?,
                spare_blocks: a.spare_blocks,
                shard_count: a.shards,
                journal_blocks: u32::try_from(a.journal_size / 4096)
                    .context("--journal-size is too large")?,
                create_size_bytes: a.size,
            };
            if !a.force {
                refuse_if_in_use(&a.disk)?;
            }
            let g = Engine::format(&a.disk, &opts)?;
            println!(
                "formatted {}: {} chunk slots of {} KiB ({} spare blocks), {} shard(s), journal {} MiB per shard, uuid {:016x}",
                a.disk.display(),
                g.slot_count,
                g.chunk_bytes() >> 10,
                g.spare_blocks,
                g.shard_count,
                (g.journal_blocks as u64 * 4096) >> 20,
                g.disk_uuid
            );
        }
        EngineCommand::Info(a) => {
            let engine = Engine::open(&a.disk, &OpenOptions::default())?;
            let g = *engine.geometry();
            let r = engine.recovery_report().clone();
            let node = engine
                .node_id()
                .map_or("none yet".to_string(), |id| id.to_string());
            println!(
                "disk {}  uuid {:016x}  node {node}",
                a.disk.display(),
                g.disk_uuid
            );
            println!(
                "chunk {} KiB, spare {} blocks, {} slots, {} shard(s), journal {} blocks per shard ({})",
                g.chunk_bytes() >> 10,
                g.spare_blocks,
                g.slot_count,
                g.shard_count,
                g.journal_blocks,
                match (g.journal_data, g.compact_journal) {
                    (true, true) => "format 3: a record block and a data block per sequence number; a small write's record and data in one 4.5 KiB entry",
                    (true, false) => "format 2: a record block and a data block per sequence number",
                    _ => "format 1: no data in the journal",
                }
            );
            println!(
                "recovery at open: {} journal records replayed, {} dropped (unacknowledged), {} writes moved from the journal",
                r.journal_records_replayed, r.journal_records_dropped, r.journal_data_moved
            );
            for s in engine.into_shards() {
                println!(
                    "shard {}: {} chunks allocated, {} slots free",
                    s.id(),
                    s.allocated_chunks(),
                    s.free_slot_count()
                );
                s.close()?;
            }
        }
        EngineCommand::Check(a) => check(&a.disk)?,
        EngineCommand::Rebuild(a) => {
            let r = Engine::rebuild(&a.disk)?;
            println!(
                "rebuilt {}: scanned {} slots, found {} chunks ({} with a map), replayed {} journal records, dropped {}",
                a.disk.display(),
                r.slots_scanned,
                r.chunks_found,
                r.maps_loaded,
                r.journal_records_replayed,
                r.journal_records_dropped
            );
        }
        EngineCommand::Locate(a) => {
            let engine = Engine::open(&a.disk, &OpenOptions::default())?;
            let chunk = a.offset / engine.geometry().chunk_bytes();
            let owner = engine.shard_for(a.volume, chunk) as usize;
            let shards = engine.into_shards();
            match shards[owner].locate(a.volume, a.offset) {
                Some(at) => println!(
                    "volume {} offset {} -> shard {owner}, disk offset {at}",
                    a.volume, a.offset
                ),
                None => println!(
                    "volume {} offset {} holds no data (reads as zeroes)",
                    a.volume, a.offset
                ),
            }
            for s in shards {
                s.close()?;
            }
        }
    }
    Ok(())
}

/// Formatting forgets everything on the disk: refuse when its start holds
/// anything but zeroes (a Celer engine, a file system, a partition table).
fn refuse_if_in_use(disk: &std::path::Path) -> Result<()> {
    use std::io::Read;
    let Ok(mut f) = std::fs::File::open(disk) else {
        return Ok(()); // does not exist yet: --size creates it
    };
    let mut head = vec![0u8; 64 << 10];
    let n = f
        .read(&mut head)
        .with_context(|| format!("reading {}", disk.display()))?;
    if head[..n].iter().all(|&b| b == 0) {
        return Ok(());
    }
    match Engine::identify(disk) {
        Ok(g) => anyhow::bail!(
            "{} already holds a Celer engine (uuid {:016x}, {} chunk slots); formatting forgets all its volumes. Add --force to format anyway",
            disk.display(),
            g.disk_uuid,
            g.slot_count
        ),
        Err(_) => anyhow::bail!(
            "{} holds data (not zeroes at its start: a file system, a partition table or another engine?). Add --force to format anyway",
            disk.display()
        ),
    }
}

/// Reads every allocated chunk through the engine (which verifies every
/// block's crc32c) and reports the bad blocks.
fn check(disk: &std::path::Path) -> Result<()> {
    let engine = Engine::open(disk, &OpenOptions::default())?;
    let chunk_bytes = engine.geometry().chunk_bytes();
    let mut bad = 0u64;
    let mut blocks = 0u64;
    let mut buf = AlignedBuf::new(1);
    for mut shard in engine.into_shards() {
        let mut chunks = shard.chunks();
        chunks.sort_unstable();
        for (volume, chunk) in chunks {
            for b in 0..chunk_bytes / 4096 {
                let offset_bytes = chunk * chunk_bytes + b * 4096;
                let seg = [Segment {
                    addr: buf.as_mut_ptr(),
                    len: 4096,
                }];
                let req = EngineRequest {
                    op: EngineOp::Read,
                    volume,
                    offset_bytes,
                    len_bytes: 4096,
                    segments: &seg,
                    version: 0,
                    epoch: 0,
                    tag: 0,
                    chain: &[],
                    block_crc: None,
                };
                // SAFETY: buf outlives the request; we wait for it below.
                unsafe { shard.submit(&req) }?;
                let mut result = None;
                while result.is_none() {
                    shard.wait(&mut |c: Completion| result = Some(c.result));
                }
                blocks += 1;
                if let Some(Err(e)) = result {
                    bad += 1;
                    println!("volume {volume} offset {offset_bytes}: {e}");
                }
            }
        }
        shard.close()?;
    }
    println!("checked {blocks} blocks: {bad} bad");
    anyhow::ensure!(bad == 0, "{bad} blocks failed their checksum");
    Ok(())
}
