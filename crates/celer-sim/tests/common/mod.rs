//! Set-up shared by the engine tests on a simulated disk.

use celer_engine::{Engine, FormatOptions, OpenOptions, Shard};
use celer_sim::disk::SimDisk;

/// Open options for a test engine: `inflight_max` requests, no eventfd,
/// no wait for the disk's lock, 4 KiB pages.
pub fn open_options(inflight_max: usize) -> OpenOptions {
    OpenOptions {
        inflight_max,
        completion_eventfd: false,
        lock_wait: std::time::Duration::ZERO,
        hugepages: false,
    }
}

/// Formats `disk` as one shard (chunks of 16 blocks, 4 spare blocks per
/// chunk, a journal of `journal_blocks`) and opens it.
pub fn one_shard(
    disk: &SimDisk,
    seed: u64,
    journal_blocks: u32,
    inflight_max: usize,
) -> Shard<SimDisk> {
    let format = FormatOptions {
        chunk_blocks: 16,
        spare_blocks: 4,
        shard_count: 1,
        journal_blocks,
        create_size_bytes: None,
    };
    Engine::format_on(disk, &format, seed | 1).expect("format");
    Engine::open_on(disk.clone(), &open_options(inflight_max))
        .expect("open")
        .into_shards()
        .remove(0)
}
