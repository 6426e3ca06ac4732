//! celer-engine: one storage engine per disk (a file or a block device).
//!
//! A volume is cut into chunks; a chunk lives in a *chunk slot*, allocated on
//! its first write (thin). Writes never overwrite live data: each block goes
//! to a free physical block of its slot (redirect-on-write) and the new
//! mapping (logical block → physical block, version, crc32c) is recorded in
//! the shard's journal. The data write and the journal write are submitted
//! together with `RWF_DSYNC`, so a durable 4 KiB write costs one disk round
//! trip, and a crash leaves every block with its old or its new content.
//!
//! The engine is sharded: a chunk belongs to one shard (hash of volume and
//! chunk), each shard owns its slots, its journal ring and its io_uring, and
//! a `Shard` is driven by exactly one thread. Nothing is shared between
//! shards after `Engine::open`.
//!
//! Invariants:
//! - a read returns data whose crc32c matches the recorded one, or an error;
//! - a block's version only grows: a write whose version is not newer than
//!   the stored one is acknowledged and not applied;
//! - every acknowledged change is in a durable journal block or checkpoint.

mod aligned;
mod device;
mod disk;
mod layout;
mod recovery;
mod shard;

pub use aligned::{AlignedBuf, BufPool, PageSize, HUGE_PAGE_BYTES};
pub use device::{EngineDevice, EngineDeviceConfig};
pub use disk::{Disk, DiskIo, DiskQueue, FileDisk, IoBufs, UringQueue};
pub use layout::{BlockKind, Geometry, SlotOwner, Superblock, BLOCK_SIZE};
pub use recovery::{
    Engine, EngineStats, FormatOptions, OpenOptions, RebuildReport, LOCK_WAIT_DEFAULT,
};
pub use shard::{
    shard_for, Completion, EngineOp, EngineRequest, Segment, Shard, ShardStats, DISCARDED_KEEP,
    LAYERS_MAX,
};

/// Errors of the engine. Operating errors only; programmer errors assert.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    #[error("{path}: {what}: {errno_text}")]
    Os {
        path: String,
        what: &'static str,
        errno_text: String,
    },
    #[error("{path} is in use by another process (a running `celer node serve`, or another engine command): one process per disk; stop it first (a running node checks its disk online: `celer scrub start`, `celer scrub status`)")]
    InUse { path: String },
    #[error("{path} is not a Celer engine disk (no Celer superblock); format it with `celer engine format`")]
    NotCeler { path: String },
    #[error("{path}: Celer superblock is damaged in both copies")]
    CorruptSuperblock { path: String },
    #[error("{path}: engine format version {found} is not supported (this build reads version {supported})")]
    WrongFormatVersion {
        path: String,
        found: u32,
        supported: u32,
    },
    #[error("{path} is {actual_bytes} bytes but its superblock says {expected_bytes}: truncated or wrong disk")]
    Truncated {
        path: String,
        actual_bytes: u64,
        expected_bytes: u64,
    },
    #[error("disk of {disk_bytes} bytes is too small: at least {needed_bytes} bytes are needed")]
    DiskTooSmall { disk_bytes: u64, needed_bytes: u64 },
    #[error("metadata area of shard {shard} is damaged; run `celer engine rebuild` to rebuild it from the chunk headers")]
    MetadataDamaged { shard: u32 },
    #[error("bad configuration: {0}")]
    BadConfig(String),
    #[error("request at offset {offset_bytes} length {len_bytes}: offset and length must be multiples of 4096 (a write may also cover 512-byte sectors within one 4096-byte block) and buffers 512-byte aligned")]
    Misaligned { offset_bytes: u64, len_bytes: u64 },
    #[error("request at offset {offset_bytes} length {len_bytes} crosses a chunk boundary or exceeds {max_bytes} bytes")]
    BadRange {
        offset_bytes: u64,
        len_bytes: u64,
        max_bytes: u64,
    },
    #[error("request has {count} segments, more than {max}")]
    TooManySegments { count: usize, max: usize },
    #[error("volume {volume} chunk {chunk} belongs to shard {owner}, not shard {shard}")]
    WrongShard {
        volume: u64,
        chunk: u64,
        owner: u32,
        shard: u32,
    },
    #[error("shard queue is full ({inflight_max} requests in flight)")]
    QueueFull { inflight_max: usize },
    #[error("no free chunk slot left in shard {shard}")]
    NoSpace { shard: u32 },
    #[error("checksum mismatch reading volume {volume} offset {offset_bytes}: data not returned")]
    Checksum { volume: u64, offset_bytes: u64 },
    #[error("{path} belongs to storage node {recorded} (its superblock says so), not to node {requested}: a disk keeps the id of the node that took it first; format it (`celer engine format`) to give it to another node")]
    DiskOfAnotherNode {
        path: String,
        recorded: u64,
        requested: u64,
    },
    #[error("disk I/O error on volume {volume} offset {offset_bytes}: {errno_text}")]
    Io {
        volume: u64,
        offset_bytes: u64,
        errno_text: String,
    },
}

pub(crate) fn errno_text(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}
