//! The `BlockDevice` boundary: the one interface every Celer front end
//! (vhost-user-blk, NBD) drives, and every back end (the distributed client,
//! the local engine, a null device for benchmarks) implements.
//!
//! Model: a device hands out per-queue handles. A `DeviceQueue` is owned by
//! exactly one thread (it is `Send`, never shared): that thread submits
//! requests and polls their completions, so a completion comes back on the
//! thread that submitted it and no lock is shared between queues.
//!
//! Buffers are raw segments (typically guest memory mapped by the vhost
//! front end): the back end reads or writes them in place (zero copy). The
//! caller guarantees they stay valid until the request completes; this is
//! why `submit` is `unsafe`.

use std::os::fd::RawFd;

pub mod delay;
pub mod file;
pub mod null;
mod size;

pub use delay::DelayDevice;
pub use file::{FileDevice, FileDeviceConfig, FileDeviceError};
pub use null::NullDevice;
pub use size::parse_size;

/// Size of a virtio/NBD sector; offsets at the boundary are bytes.
pub const SECTOR_SIZE_BYTES: u64 = 512;

/// What a request asks the device to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

/// One contiguous piece of caller memory, valid until the request completes.
#[derive(Clone, Copy, Debug)]
pub struct IoSegment {
    pub addr: *mut u8,
    pub len: usize,
}

// SAFETY: an IoSegment is only an address range; the submit contract makes the
// caller responsible for keeping the memory valid while a request owns it.
unsafe impl Send for IoSegment {}

/// A request at the boundary. For `Read`/`Write` the length is the sum of the
/// segment lengths; for `Discard`/`WriteZeroes` it is `len_bytes` and there are
/// no segments; `Flush` has neither.
#[derive(Clone, Copy, Debug)]
pub struct IoRequest<'a> {
    pub op: IoOp,
    pub offset_bytes: u64,
    pub len_bytes: u64,
    pub segments: &'a [IoSegment],
    /// Opaque to the device; returned in the completion.
    pub tag: u64,
}

/// The outcome of one request.
#[derive(Debug)]
pub struct IoCompletion {
    pub tag: u64,
    pub result: Result<(), IoError>,
}

/// Typed errors at the boundary. Front ends map them to their protocol's
/// status (virtio IOERR/UNSUPP, NBD errno).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum IoError {
    #[error("request [{offset_bytes}, +{len_bytes}) is outside the device ({size_bytes} bytes)")]
    OutOfRange {
        offset_bytes: u64,
        len_bytes: u64,
        size_bytes: u64,
    },
    #[error("request offset {offset_bytes} or length {len_bytes} is not a multiple of {align_bytes} bytes")]
    Misaligned {
        offset_bytes: u64,
        len_bytes: u64,
        align_bytes: u64,
    },
    #[error("device is read-only")]
    ReadOnly,
    #[error("operation {0:?} is not supported by this device")]
    Unsupported(IoOp),
    #[error("checksum mismatch at offset {offset_bytes}: data not returned")]
    Checksum { offset_bytes: u64 },
    #[error("queue is full ({inflight_max} requests in flight): poll completions and retry")]
    QueueFull { inflight_max: usize },
    #[error("I/O error: {0}")]
    Io(String),
}

/// What a front end needs to describe the device to its peer.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub size_bytes: u64,
    /// Preferred I/O granularity (virtio blk_size); 512 or 4096.
    pub block_size_bytes: u32,
    pub read_only: bool,
    pub supports_discard: bool,
    pub supports_write_zeroes: bool,
    /// Largest single request the device accepts.
    pub max_request_bytes: u64,
    /// Up to 20 bytes, reported by virtio GET_ID.
    pub serial: String,
}

/// Whether a range of a device holds stored data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// Stored data (or the device cannot tell): read it.
    Data,
    /// Nothing stored (never written, discarded or zeroed): reads as
    /// zeroes, and a copy may skip it.
    Hole,
}

/// A run of bytes with one [`Allocation`]; a device's answer is a list of
/// consecutive extents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len_bytes: u64,
    pub allocation: Allocation,
}

/// A block device: hands out per-queue handles.
pub trait BlockDevice: Send + Sync {
    fn info(&self) -> DeviceInfo;
    /// Opens queue `index`. Each queue is then owned by one thread.
    fn open_queue(&self, index: usize) -> Result<Box<dyn DeviceQueue>, IoError>;

    /// Appends to `out` (which the caller empties first) consecutive extents covering `[offset_bytes,
    /// offset_bytes + len_bytes)` (block aligned, inside the device) from
    /// the device's map of what it stores, as of a moment after every
    /// write completed before the call. A control-path call (it may block
    /// for a round trip): backup tools ask it once per large range to skip
    /// holes. The default, for devices that cannot tell, is "all data".
    fn allocation(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        out: &mut Vec<Extent>,
    ) -> Result<(), IoError> {
        let _ = offset_bytes;
        out.push(Extent {
            len_bytes,
            allocation: Allocation::Data,
        });
        Ok(())
    }

    /// True when the device keeps no per-queue cache: a write completed on
    /// one queue is seen by reads on every queue, and a flush on any queue
    /// makes durable every write completed on any queue before it. Front
    /// ends may then let a client spread its I/O over several connections
    /// (NBD_FLAG_CAN_MULTI_CONN). The default is false (not promised).
    fn flush_is_device_wide(&self) -> bool {
        false
    }

    /// True when a write is durable once it completes (on every replica,
    /// for a replicated device): the device has no volatile write cache
    /// and a Flush has nothing to do. Front ends then tell the guest the
    /// disk is write-through (virtio-blk without VIRTIO_BLK_F_FLUSH: Linux
    /// shows `write through` in `queue/write_cache` and sends no flushes).
    /// The default is false: the guest is told to flush.
    fn writes_durable_on_completion(&self) -> bool {
        false
    }
}

/// Appends `len_bytes` of `allocation` to `out`, merged with the last
/// extent when it has the same allocation.
pub fn push_extent(out: &mut Vec<Extent>, len_bytes: u64, allocation: Allocation) {
    if len_bytes == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.allocation == allocation => last.len_bytes += len_bytes,
        _ => out.push(Extent {
            len_bytes,
            allocation,
        }),
    }
}

/// One queue of a device, owned by one thread.
pub trait DeviceQueue: Send {
    /// Submits a request. An `Err` means it was rejected at once and no
    /// completion will follow; `Ok` means exactly one completion will.
    ///
    /// # Safety
    /// Every segment must point to memory valid for reads (Write) or writes
    /// (Read) of its length until the completion for `req.tag` is returned.
    unsafe fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), IoError>;

    /// Hands every available completion to `done` without blocking; returns
    /// how many it handed over.
    fn poll(&mut self, done: &mut dyn FnMut(IoCompletion)) -> usize;

    /// Requests submitted and not yet completed.
    fn inflight(&self) -> usize;

    /// The most requests this queue accepts in flight.
    fn inflight_max(&self) -> usize;

    /// A file descriptor that becomes readable when completions may be
    /// available, so the owner can sleep in epoll. `None`: completions are
    /// immediate (visible on the next `poll` after `submit`).
    fn completion_fd(&self) -> Option<RawFd>;
}

/// Checks a request against the device geometry; shared by every back end so
/// that all of them reject bad requests with the same errors.
pub fn check_request(info: &DeviceInfo, req: &IoRequest<'_>) -> Result<(), IoError> {
    let len_bytes = match req.op {
        IoOp::Read | IoOp::Write => req.segments.iter().map(|s| s.len as u64).sum(),
        IoOp::Discard | IoOp::WriteZeroes => req.len_bytes,
        IoOp::Flush => return Ok(()),
    };
    if info.read_only && req.op != IoOp::Read {
        return Err(IoError::ReadOnly);
    }
    if (req.op == IoOp::Discard && !info.supports_discard)
        || (req.op == IoOp::WriteZeroes && !info.supports_write_zeroes)
    {
        return Err(IoError::Unsupported(req.op));
    }
    let align_bytes = SECTOR_SIZE_BYTES;
    if !req.offset_bytes.is_multiple_of(align_bytes) || !len_bytes.is_multiple_of(align_bytes) {
        return Err(IoError::Misaligned {
            offset_bytes: req.offset_bytes,
            len_bytes,
            align_bytes,
        });
    }
    let end = req.offset_bytes.checked_add(len_bytes);
    if end.is_none_or(|end| end > info.size_bytes) {
        return Err(IoError::OutOfRange {
            offset_bytes: req.offset_bytes,
            len_bytes,
            size_bytes: info.size_bytes,
        });
    }
    Ok(())
}

/// The placement hash of a chunk: every layer agrees on it. The engine picks
/// a chunk's shard as `chunk_hash % shards`, the route table its partition
/// as `chunk_hash & (partitions - 1)`; with power-of-two counts, partition
/// `p` then lives in engine shard `p % shards` on every node.
///
/// The hash takes the *lineage* of a layer key (see [`layer_key`]): every
/// layer of a volume (its snapshots' eras, its clones) places a chunk on the
/// same partition and engine shard, so a read through a chain of layers is
/// local to one shard.
pub fn chunk_hash(volume: u64, chunk: u64) -> u64 {
    let volume = lineage_of(volume);
    let mut x =
        volume.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ chunk.wrapping_add(0x632B_E59B_D9B4_E019);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    x
}

/// Bits of a layer key that hold the lineage (the id of the volume a chain
/// of layers started from). Volume ids are assigned from 1 up and stay far
/// below 2^40.
pub const LINEAGE_BITS: u32 = 40;
/// The largest era a layer key can hold (24 bits).
pub const ERA_MAX: u32 = (1 << (64 - LINEAGE_BITS)) - 1;

/// The key under which the engine stores one layer of a lineage: a volume
/// that was never snapshotted or cloned is its own lineage at era 0, so its
/// key is its id (disks written before snapshots existed read unchanged).
/// A snapshot freezes the volume's current era and the volume goes on in a
/// new one; a clone is a new era of its parent's lineage. Eras of one
/// lineage never repeat.
pub fn layer_key(lineage: u64, era: u32) -> u64 {
    debug_assert!(lineage < 1 << LINEAGE_BITS);
    lineage | (era as u64) << LINEAGE_BITS
}

/// The lineage of a layer key.
pub fn lineage_of(key: u64) -> u64 {
    key & ((1 << LINEAGE_BITS) - 1)
}

/// The era of a layer key.
pub fn era_of(key: u64) -> u32 {
    (key >> LINEAGE_BITS) as u32
}
