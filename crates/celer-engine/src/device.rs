//! `EngineDevice`: one volume of a local engine as a `BlockDevice`, so the
//! vhost-user and NBD front ends can serve engine volumes before the
//! distributed client exists.
//!
//! Each engine shard runs on its own thread. A device queue (owned by a
//! front-end worker) cuts a request at chunk boundaries and sends each part
//! to the thread of the shard that owns the chunk; parts come back through
//! the queue's channel and wake the worker through an eventfd. This is one
//! thread hop each way: fine for a local device, and exactly what the
//! distributed client's design avoids (there the worker is the client shard).
//!
//! Versions: the engine applies a write only if its version is newer than
//! the block's. The device numbers writes from one counter shared by its
//! queues, starting above every version found on disk at open.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use celer_device::{
    check_request, push_extent, Allocation, BlockDevice, DeviceInfo, DeviceQueue, Extent,
    IoCompletion, IoError, IoOp, IoRequest, IoSegment,
};

use crate::shard::{
    for_each_piece, shard_for, Completion, EngineOp, EngineRequest, Segment, Shard,
};
use crate::{BlockKind, Engine, EngineError, Geometry, OpenOptions, BLOCK_SIZE};

/// Requests in flight per device queue.
const QUEUE_INFLIGHT_MAX: usize = 256;

#[derive(Clone, Debug)]
pub struct EngineDeviceConfig {
    /// The engine's disk (formatted with `celer engine format`).
    pub path: PathBuf,
    /// Volume id inside the engine.
    pub volume: u64,
    pub size_bytes: u64,
    pub read_only: bool,
}

/// One piece of a request, inside one chunk.
struct Part {
    op: EngineOp,
    volume: u64,
    offset_bytes: u64,
    len_bytes: u64,
    segs: Vec<Segment>,
    version: u64,
    /// Where the answer goes.
    reply: Sender<PartDone>,
    reply_fd: RawFd,
    parent: u32,
}

// SAFETY: segments point into memory the front end keeps valid until the
// request completes (the DeviceQueue::submit contract).
unsafe impl Send for Part {}

struct PartDone {
    parent: u32,
    result: Result<(), IoError>,
}

enum ShardMsg {
    Part(Part),
    /// Which blocks of chunks `first_chunk..=last_chunk` of `volume` hold
    /// data, for the chunks this shard owns and holds a slot for.
    Allocation(AllocationAsk),
    Stop,
}

struct AllocationAsk {
    volume: u64,
    first_chunk: u64,
    last_chunk: u64,
    /// Per chunk held: one bit per block, set where the block holds data.
    reply: Sender<Vec<(u64, Vec<u64>)>>,
}

/// How long [`EngineDevice::allocation`] waits for the shards.
const ALLOCATION_TIMEOUT: Duration = Duration::from_secs(10);

pub struct EngineDevice {
    info: DeviceInfo,
    g: Geometry,
    volume: u64,
    shard_txs: Vec<Sender<ShardMsg>>,
    threads: Vec<JoinHandle<Result<(), EngineError>>>,
    next_version: Arc<AtomicU64>,
}

impl EngineDevice {
    pub fn open(cfg: &EngineDeviceConfig) -> Result<EngineDevice, EngineError> {
        if cfg.size_bytes == 0 || !cfg.size_bytes.is_multiple_of(4096) {
            return Err(EngineError::BadConfig(format!(
                "volume size {} must be a positive multiple of 4096",
                cfg.size_bytes
            )));
        }
        let engine = Engine::open(&cfg.path, &OpenOptions::default())?;
        let g = *engine.geometry();
        let shards = engine.into_shards();
        let max_version = shards.iter().map(|s| s.max_version()).max().unwrap_or(0);
        let mut shard_txs = Vec::new();
        let mut threads = Vec::new();
        for shard in shards {
            let (tx, rx) = mpsc::channel();
            shard_txs.push(tx);
            let name = format!("celer-engine-{}", shard.id());
            let t = std::thread::Builder::new()
                .name(name)
                .spawn(move || run_shard(shard, rx))
                .map_err(|e| EngineError::Os {
                    path: "thread".into(),
                    what: "spawn shard thread",
                    errno_text: e.to_string(),
                })?;
            threads.push(t);
        }
        let info = DeviceInfo {
            size_bytes: cfg.size_bytes,
            block_size_bytes: 4096,
            read_only: cfg.read_only,
            supports_discard: true,
            supports_write_zeroes: true,
            max_request_bytes: 4 << 20,
            serial: format!("celer-{:08x}-{}", g.disk_uuid as u32, cfg.volume),
        };
        Ok(EngineDevice {
            info,
            g,
            volume: cfg.volume,
            shard_txs,
            threads,
            next_version: Arc::new(AtomicU64::new(max_version + 1)),
        })
    }
}

impl Drop for EngineDevice {
    fn drop(&mut self) {
        for tx in &self.shard_txs {
            let _ = tx.send(ShardMsg::Stop);
        }
        for t in self.threads.drain(..) {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("engine shard stopped with an error: {e}"),
                Err(_) => tracing::error!("engine shard thread panicked"),
            }
        }
    }
}

/// A shard's thread: takes parts, drives the shard, answers.
fn run_shard(mut shard: Shard, rx: Receiver<ShardMsg>) -> Result<(), EngineError> {
    let mut parts: Vec<Option<Part>> = (0..shard.inflight_max()).map(|_| None).collect();
    let mut free: Vec<usize> = (0..parts.len()).rev().collect();
    let mut waiting: VecDeque<Part> = VecDeque::new();
    let mut stopping = false;
    loop {
        // Idle: sleep until a message comes. Busy: take what is there.
        if shard.inflight() == 0 && waiting.is_empty() {
            if stopping {
                break;
            }
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(m) => take(m, &shard, &mut waiting, &mut stopping),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        while let Ok(m) = rx.try_recv() {
            take(m, &shard, &mut waiting, &mut stopping);
        }
        while let Some(p) = waiting.front() {
            let Some(&slot) = free.last() else { break };
            let req = EngineRequest {
                op: p.op,
                volume: p.volume,
                offset_bytes: p.offset_bytes,
                len_bytes: p.len_bytes,
                segments: &p.segs,
                version: p.version,
                epoch: 0,
                tag: slot as u64,
                chain: &[],
                block_crc: None,
            };
            // SAFETY: the part (and so its segments) stays in `parts` until
            // its completion; the memory behind it is the front end's, valid
            // until we answer.
            match unsafe { shard.submit(&req) } {
                Ok(()) => {
                    free.pop();
                    parts[slot] = waiting.pop_front();
                }
                Err(EngineError::QueueFull { .. }) => break,
                Err(e) => {
                    let p = waiting.pop_front().expect("front exists");
                    answer(&p, Err(to_io_error(e)));
                }
            }
        }
        // Completions. When nothing is ready, sleep until the next disk
        // completion: a part sent meanwhile waits at most that long.
        let mut done = |c: Completion| {
            let slot = c.tag as usize;
            if let Some(p) = parts[slot].take() {
                answer(&p, c.result.map(|_| ()).map_err(to_io_error));
                free.push(slot);
            }
        };
        if shard.poll(&mut done) == 0 && shard.inflight() > 0 {
            shard.wait(&mut done);
        }
    }
    shard.close()
}

fn take(m: ShardMsg, shard: &Shard, waiting: &mut VecDeque<Part>, stopping: &mut bool) {
    match m {
        ShardMsg::Part(p) => waiting.push_back(p),
        ShardMsg::Allocation(ask) => {
            // The map as every part taken before this message left it: a
            // write completed before the ask is in it.
            let _ = ask.reply.send(data_blocks(shard, &ask));
        }
        ShardMsg::Stop => *stopping = true,
    }
}

/// The data-block bitmaps of the asked chunks this shard holds a slot for
/// (a chunk without one is a hole; so are its unwritten and zeroed blocks).
/// One layer: a device reading through a chain of layers (snapshots,
/// clones) must merge the chain's maps here, as its reads do.
fn data_blocks(shard: &Shard, ask: &AllocationAsk) -> Vec<(u64, Vec<u64>)> {
    let g = *shard.geometry();
    let blocks = g.chunk_blocks as usize;
    let mut states = vec![(BlockKind::Unwritten, 0u64); blocks];
    let mut held = Vec::new();
    for chunk in ask.first_chunk..=ask.last_chunk {
        if shard_for(&g, ask.volume, chunk) != shard.id() {
            continue;
        }
        if !shard.block_states(ask.volume, chunk * g.chunk_bytes(), &mut states) {
            continue;
        }
        let mut bits = vec![0u64; blocks.div_ceil(64)];
        for (i, (kind, _)) in states.iter().enumerate() {
            if *kind == BlockKind::Data {
                bits[i / 64] |= 1 << (i % 64);
            }
        }
        held.push((chunk, bits));
    }
    held
}

fn answer(p: &Part, result: Result<(), IoError>) {
    // The queue may be gone (front end disconnected); then nobody waits.
    if p.reply
        .send(PartDone {
            parent: p.parent,
            result,
        })
        .is_ok()
    {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a local to an eventfd.
        unsafe { libc::write(p.reply_fd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

fn to_io_error(e: EngineError) -> IoError {
    match e {
        EngineError::Checksum { offset_bytes, .. } => IoError::Checksum { offset_bytes },
        EngineError::Misaligned {
            offset_bytes,
            len_bytes,
        } => IoError::Misaligned {
            offset_bytes,
            len_bytes,
            align_bytes: 4096,
        },
        other => IoError::Io(other.to_string()),
    }
}

struct Parent {
    tag: u64,
    parts_left: u32,
    error: Option<IoError>,
}

pub struct EngineQueue {
    info: DeviceInfo,
    g: Geometry,
    volume: u64,
    shard_txs: Vec<Sender<ShardMsg>>,
    done_tx: Sender<PartDone>,
    done_rx: Receiver<PartDone>,
    efd: OwnedFd,
    next_version: Arc<AtomicU64>,
    parents: Vec<Parent>,
    free: Vec<u32>,
    ready: VecDeque<IoCompletion>,
}

impl BlockDevice for EngineDevice {
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    /// Every acknowledged write is durable (the engine completes a write
    /// after its journal record is on disk), queues cache nothing and a
    /// flush has nothing left to do: one queue's flush covers them all.
    fn flush_is_device_wide(&self) -> bool {
        true
    }

    /// A write completes after its data and journal record are on the
    /// disk (RWF_DSYNC, or the group commit's fdatasync).
    fn writes_durable_on_completion(&self) -> bool {
        true
    }

    /// From the shards' slot maps: a chunk without a slot is a hole, and
    /// so is a block of a slot that was never written or was zeroed or
    /// discarded. One message to each shard thread (answered between its
    /// I/O batches), none to the disk.
    fn allocation(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        out: &mut Vec<Extent>,
    ) -> Result<(), IoError> {
        if len_bytes == 0 {
            return Ok(());
        }
        let chunk_bytes = self.g.chunk_bytes();
        let end = offset_bytes + len_bytes;
        let (tx, rx) = mpsc::channel();
        let mut asked = 0;
        for shard_tx in &self.shard_txs {
            let ask = AllocationAsk {
                volume: self.volume,
                first_chunk: offset_bytes / chunk_bytes,
                last_chunk: (end - 1) / chunk_bytes,
                reply: tx.clone(),
            };
            if shard_tx.send(ShardMsg::Allocation(ask)).is_err() {
                return Err(IoError::Io("engine shard stopped".into()));
            }
            asked += 1;
        }
        drop(tx);
        let mut held = std::collections::HashMap::new();
        for _ in 0..asked {
            let answer = rx.recv_timeout(ALLOCATION_TIMEOUT).map_err(|e| {
                IoError::Io(format!(
                    "engine shards did not report allocation within {} s: {e}",
                    ALLOCATION_TIMEOUT.as_secs()
                ))
            })?;
            held.extend(answer);
        }
        let block = BLOCK_SIZE as u64;
        let mut at = offset_bytes;
        while at < end {
            let chunk = at / chunk_bytes;
            let chunk_end = ((chunk + 1) * chunk_bytes).min(end);
            let Some(bits) = held.get(&chunk) else {
                push_extent(out, chunk_end - at, Allocation::Hole);
                at = chunk_end;
                continue;
            };
            while at < chunk_end {
                let i = ((at % chunk_bytes) / block) as usize;
                let allocation = if bits[i / 64] & (1 << (i % 64)) != 0 {
                    Allocation::Data
                } else {
                    Allocation::Hole
                };
                let next = ((at / block + 1) * block).min(chunk_end);
                push_extent(out, next - at, allocation);
                at = next;
            }
        }
        Ok(())
    }

    fn open_queue(&self, _index: usize) -> Result<Box<dyn DeviceQueue>, IoError> {
        // SAFETY: plain eventfd creation; the fd is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(IoError::Io(format!(
                "eventfd: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: fd is a fresh descriptor we own.
        let efd = unsafe { OwnedFd::from_raw_fd(fd) };
        let (done_tx, done_rx) = mpsc::channel();
        Ok(Box::new(EngineQueue {
            info: self.info.clone(),
            g: self.g,
            volume: self.volume,
            shard_txs: self.shard_txs.clone(),
            done_tx,
            done_rx,
            efd,
            next_version: self.next_version.clone(),
            parents: (0..QUEUE_INFLIGHT_MAX)
                .map(|_| Parent {
                    tag: 0,
                    parts_left: 0,
                    error: None,
                })
                .collect(),
            free: (0..QUEUE_INFLIGHT_MAX as u32).rev().collect(),
            ready: VecDeque::with_capacity(QUEUE_INFLIGHT_MAX),
        }))
    }
}

impl DeviceQueue for EngineQueue {
    unsafe fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), IoError> {
        check_request(&self.info, req)?;
        let op = match req.op {
            IoOp::Flush => {
                // Every acknowledged write is already durable.
                self.ready.push_back(IoCompletion {
                    tag: req.tag,
                    result: Ok(()),
                });
                return Ok(());
            }
            IoOp::Read => EngineOp::Read,
            IoOp::Write => EngineOp::Write,
            IoOp::Discard => EngineOp::Discard,
            IoOp::WriteZeroes => EngineOp::WriteZeroes,
        };
        let len_bytes = match req.op {
            IoOp::Read | IoOp::Write => req.segments.iter().map(|s| s.len as u64).sum(),
            _ => req.len_bytes,
        };
        if !req.offset_bytes.is_multiple_of(4096) || len_bytes % 4096 != 0 {
            return Err(IoError::Misaligned {
                offset_bytes: req.offset_bytes,
                len_bytes,
                align_bytes: 4096,
            });
        }
        if len_bytes == 0 {
            self.ready.push_back(IoCompletion {
                tag: req.tag,
                result: Ok(()),
            });
            return Ok(());
        }
        let Some(parent) = self.free.pop() else {
            return Err(IoError::QueueFull {
                inflight_max: QUEUE_INFLIGHT_MAX,
            });
        };
        let chunk_bytes = self.g.chunk_bytes();
        let first_chunk = req.offset_bytes / chunk_bytes;
        let last_chunk = (req.offset_bytes + len_bytes - 1) / chunk_bytes;
        let p = &mut self.parents[parent as usize];
        p.tag = req.tag;
        p.parts_left = (last_chunk - first_chunk + 1) as u32;
        p.error = None;
        let version = if op == EngineOp::Read {
            0
        } else {
            self.next_version.fetch_add(1, Ordering::Relaxed)
        };
        let mut at = req.offset_bytes;
        let end = req.offset_bytes + len_bytes;
        while at < end {
            let chunk = at / chunk_bytes;
            let part_end = ((chunk + 1) * chunk_bytes).min(end);
            let mut segs = Vec::new();
            if matches!(op, EngineOp::Read | EngineOp::Write) {
                slice(
                    req.segments,
                    (at - req.offset_bytes) as usize,
                    (part_end - at) as usize,
                    &mut segs,
                );
            }
            let part = Part {
                op,
                volume: self.volume,
                offset_bytes: at,
                len_bytes: part_end - at,
                segs,
                version,
                reply: self.done_tx.clone(),
                reply_fd: self.efd.as_raw_fd(),
                parent,
            };
            let shard = shard_for(&self.g, self.volume, chunk) as usize;
            if self.shard_txs[shard].send(ShardMsg::Part(part)).is_err() {
                // The shard thread is gone: answer this part ourselves.
                let _ = self.done_tx.send(PartDone {
                    parent,
                    result: Err(IoError::Io("engine shard stopped".into())),
                });
            }
            at = part_end;
        }
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(IoCompletion)) -> usize {
        let mut buf = 0u64;
        // SAFETY: reading 8 bytes into a local from our nonblocking eventfd.
        unsafe {
            libc::read(
                self.efd.as_raw_fd(),
                &mut buf as *mut u64 as *mut libc::c_void,
                8,
            )
        };
        let mut n = 0;
        while let Some(c) = self.ready.pop_front() {
            done(c);
            n += 1;
        }
        while let Ok(d) = self.done_rx.try_recv() {
            let p = &mut self.parents[d.parent as usize];
            if let Err(e) = d.result {
                p.error.get_or_insert(e);
            }
            p.parts_left -= 1;
            if p.parts_left == 0 {
                let result = match p.error.take() {
                    Some(e) => Err(e),
                    None => Ok(()),
                };
                done(IoCompletion { tag: p.tag, result });
                self.free.push(d.parent);
                n += 1;
            }
        }
        n
    }

    fn inflight(&self) -> usize {
        QUEUE_INFLIGHT_MAX - self.free.len() + self.ready.len()
    }

    fn inflight_max(&self) -> usize {
        QUEUE_INFLIGHT_MAX
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.efd.as_raw_fd())
    }
}

/// The segments covering bytes `[at, at + len)` of `segs`.
fn slice(segs: &[IoSegment], at: usize, len: usize, out: &mut Vec<Segment>) {
    for_each_piece(segs, at, len, |addr, len| out.push(Segment { addr, len }));
}
