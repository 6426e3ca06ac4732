//! The vhost-user-blk back end: what it offers (features, config space),
//! and how vhost-user events reach the per-queue workers.
//!
//! One worker thread per virtqueue (`queues_per_thread` = one bit each).
//! Each worker's state sits behind its own mutex, taken by that worker's
//! thread on every wake-up and by the control thread only for control
//! messages (memory table, ring stop): no lock is shared between queues.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use celer_device::{BlockDevice, DeviceInfo, IoError};
use tracing::{debug, info, warn};
use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::Backend;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::request::SEG_MAX;

use crate::worker::{GuestMemAtomic, Vring, Wake, Worker};
use crate::VhostConfig;

/// Bytes of the virtio-blk config space we fill (up to write_zeroes_may_unmap).
pub const CONFIG_SPACE_BYTES: usize = 60;
/// Largest virtqueue we accept.
pub const QUEUE_SIZE_MAX: usize = 1024;
/// Largest single data segment advertised as `size_max`, for devices that
/// take requests of 32 MiB (a file): with `seg_max` segments a request
/// stays within 31.5 MiB. A device with a smaller request limit (a
/// cluster volume, an engine: 4 MiB) gets smaller segments, so a guest
/// never builds a request the device must refuse (`segment_max_bytes`).
pub const SEGMENT_MAX_BYTES: u32 = 256 << 10;
const _: () = assert!(
    SEG_MAX as u64 * SEGMENT_MAX_BYTES as u64 <= celer_device::file::FILE_REQUEST_MAX_BYTES
);
/// Largest discard / write-zeroes range, in sectors (1 GiB), for devices
/// whose request limit allows it; otherwise that limit (`range_max_sectors`).
pub const RANGE_MAX_SECTORS: u32 = 1 << 21;

/// `size_max` for `info`: `SEGMENT_MAX_BYTES`, or less so that `seg_max`
/// segments fit the device's largest request (whole 4 KiB pages).
pub fn segment_max_bytes(info: &DeviceInfo) -> u32 {
    let fit = (info.max_request_bytes / SEG_MAX as u64) / 4096 * 4096;
    (fit.min(u64::from(SEGMENT_MAX_BYTES)) as u32).max(4096)
}

/// `max_discard_sectors` and `max_write_zeroes_sectors` for `info`: at most
/// the device's largest request, in whole physical blocks. A guest splits
/// larger ranges (Linux issued 128 MiB discards from mkfs, which a cluster
/// volume refused as larger than its 4 MiB request limit: I/O errors in the
/// guest).
pub fn range_max_sectors(info: &DeviceInfo) -> u32 {
    let sector = celer_device::SECTOR_SIZE_BYTES;
    let physical = u64::from(info.block_size_bytes.max(PHYSICAL_BLOCK_BYTES));
    let fit = info.max_request_bytes / physical * physical / sector;
    fit.min(u64::from(RANGE_MAX_SECTORS)) as u32
}
/// The physical block the config space advertises (VIRTIO_BLK_F_TOPOLOGY):
/// Celer stores and versions 4 KiB blocks.
pub const PHYSICAL_BLOCK_BYTES: u32 = 4096;
/// The optimal I/O size advertised: large enough that the client sends a
/// request to the primary alone (writes over 4 KiB), small enough for
/// readahead and file-system stripe hints to stay ordinary.
const OPT_IO_BYTES: u32 = 128 << 10;

/// Errors of the vhost-user-blk back end.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("num_queues must be between 1 and 64, got {0}")]
    QueueCount(usize),
    #[error("cannot open device queue {index}: {source}")]
    OpenQueue { index: usize, source: IoError },
    #[error("cannot create worker {index}: {source}")]
    Worker {
        index: usize,
        source: std::io::Error,
    },
    #[error("cannot create the vhost-user daemon: {0}")]
    Daemon(String),
    #[error("cannot register fd of worker {index} with its epoll loop: {source}")]
    RegisterFd {
        index: usize,
        source: std::io::Error,
    },
    #[error("serving {socket} failed: {reason}")]
    Serve { socket: String, reason: String },
    #[error("cannot shrink the disk from {size_bytes} to {new_size_bytes} bytes: only growing is supported")]
    Shrink {
        size_bytes: u64,
        new_size_bytes: u64,
    },
    #[error("new disk size {0} bytes is not a multiple of the block size")]
    GrowUnaligned(u64),
}

/// The back end shared (behind `Arc`) by the vhost-user handler threads.
pub struct VhostUserBlk {
    info: DeviceInfo,
    num_queues: usize,
    features: u64,
    /// The config space as built at start; `capacity` is read from
    /// `capacity_bytes` instead (it grows online).
    config_space: [u8; CONFIG_SPACE_BYTES],
    capacity_bytes: AtomicU64,
    /// The back-end request channel of the current front end, if it set one
    /// up (BACKEND_REQ): how a config change reaches it.
    backend_req: Mutex<Option<Backend>>,
    acked_features: AtomicU64,
    workers: Vec<Mutex<Worker>>,
    /// Rings started and not stopped since (bit per queue).
    rings_running: AtomicU64,
    /// Called when the front end has stopped every ring it started
    /// (GET_VRING_BASE, after the drain): see [`Self::on_rings_stopped`].
    rings_stopped_hook: Mutex<Option<RingsStoppedHook>>,
}

/// See [`VhostUserBlk::on_rings_stopped`].
pub type RingsStoppedHook = Box<dyn Fn() + Send + Sync>;

impl VhostUserBlk {
    pub fn new(config: &VhostConfig, device: &dyn BlockDevice) -> Result<Self, Error> {
        if config.num_queues == 0 || config.num_queues > 64 {
            return Err(Error::QueueCount(config.num_queues));
        }
        let info = device.info();
        let mut workers = Vec::with_capacity(config.num_queues);
        for index in 0..config.num_queues {
            let queue = device
                .open_queue(index)
                .map_err(|source| Error::OpenQueue { index, source })?;
            let cpu = (!config.cpus.is_empty()).then(|| config.cpus[index % config.cpus.len()]);
            let w = Worker::new(
                index,
                queue,
                info.clone(),
                config.queue_size_max as usize,
                Duration::from_micros(config.poll_us),
                Duration::from_micros(config.poll_inflight_us),
                cpu,
            )
            .map_err(|source| Error::Worker { index, source })?;
            workers.push(Mutex::new(w));
        }
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            // Dirty logging for live migration (LOG_SHMFD): see worker.rs.
            | VhostUserVirtioFeatures::LOG_ALL.bits();
        // The guest is told the truth about the write cache: a device
        // whose writes are durable at completion (Celer's) is write-through
        // (no FLUSH feature: Linux shows `write through` and sends no
        // flushes); any other is write-back, and the guest flushes.
        let write_back = !device.writes_durable_on_completion();
        if write_back {
            features |= 1 << VIRTIO_BLK_F_FLUSH;
        }
        if info.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            if info.supports_discard {
                features |= 1 << VIRTIO_BLK_F_DISCARD;
            }
            if info.supports_write_zeroes {
                features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
            }
        }
        let config_space = config_space(&info, config.num_queues as u16);
        info!(
            size_bytes = info.size_bytes,
            read_only = info.read_only,
            queues = config.num_queues,
            poll_us = config.poll_us,
            poll_inflight_us = config.poll_inflight_us,
            write_cache = if write_back {
                "write back"
            } else {
                "write through"
            },
            "vhost-user-blk back end ready"
        );
        Ok(VhostUserBlk {
            capacity_bytes: AtomicU64::new(info.size_bytes),
            info,
            num_queues: config.num_queues,
            features,
            config_space,
            backend_req: Mutex::new(None),
            acked_features: AtomicU64::new(0),
            workers,
            rings_running: AtomicU64::new(0),
            rings_stopped_hook: Mutex::new(None),
        })
    }

    fn worker(&self, index: usize) -> MutexGuard<'_, Worker> {
        // A worker that panicked leaves its state consistent enough to drain.
        lock(&self.workers[index])
    }

    /// Event id of worker `index`'s device completion fd in its epoll loop.
    fn completion_event(&self, index: usize) -> u64 {
        (self.num_queues + 1 + 2 * index) as u64
    }

    fn resume_event(&self, index: usize) -> u64 {
        self.completion_event(index) + 1
    }

    /// Registers each worker's completion and resume fds with its epoll
    /// loop. Called once per connection (each connection has new loops).
    pub(crate) fn register_worker_fds(
        &self,
        handlers: &[Arc<VringEpollHandler<Arc<VhostUserBlk>>>],
    ) -> Result<(), Error> {
        for (index, handler) in handlers.iter().enumerate() {
            let w = self.worker(index);
            if let Some(fd) = w.completion_fd() {
                handler
                    .register_listener(fd, EventSet::IN, self.completion_event(index))
                    .map_err(|source| Error::RegisterFd { index, source })?;
            }
            handler
                .register_listener(w.resume_fd(), EventSet::IN, self.resume_event(index))
                .map_err(|source| Error::RegisterFd { index, source })?;
        }
        Ok(())
    }

    /// The front end went away: finish what is in flight, forget the rings.
    pub(crate) fn disconnect(&self) {
        for i in 0..self.num_queues {
            self.worker(i).detach();
            self.worker(i).set_log_dirty(false);
        }
        self.rings_running.store(0, Ordering::Release);
        *lock(&self.backend_req) = None;
    }

    /// Current capacity in bytes (grows with [`Self::grow`]).
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes.load(Ordering::Acquire)
    }

    /// The device grew to `size_bytes` (online resize): the config space
    /// reports the new capacity from now on, and a connected front end that
    /// set up the back-end request channel is told with a config change
    /// message (QEMU re-reads the config space and interrupts the guest,
    /// whose virtio-blk driver then sees the new size). Returns whether the
    /// front end was notified. The device itself must already accept
    /// requests up to `size_bytes`. Must not be called from the vhost-user
    /// handler thread (the front end answers the notification with a
    /// GET_CONFIG on the main channel).
    pub fn grow(&self, size_bytes: u64) -> Result<bool, Error> {
        let old = self.capacity_bytes();
        if size_bytes < old {
            return Err(Error::Shrink {
                size_bytes: old,
                new_size_bytes: size_bytes,
            });
        }
        if !size_bytes.is_multiple_of(u64::from(self.info.block_size_bytes)) {
            return Err(Error::GrowUnaligned(size_bytes));
        }
        if size_bytes == old {
            return Ok(false);
        }
        self.capacity_bytes.store(size_bytes, Ordering::Release);
        info!(old, size_bytes, "disk grew");
        // Clone the handle: sending waits for the front end's ack, and
        // `disconnect` must not wait behind it.
        let Some(backend) = lock(&self.backend_req).clone() else {
            info!("no back-end request channel: the front end sees the new size when it re-reads the config");
            return Ok(false);
        };
        match backend.send_config_change() {
            Ok(_) => Ok(true),
            Err(e) => {
                warn!(error = %e, "config change notification failed; the front end sees the new size when it re-reads the config");
                Ok(false)
            }
        }
    }

    /// Checks a GET/SET_INFLIGHT_FD request against what we serve.
    fn check_inflight(&self, inflight: &VhostUserInflight) -> std::io::Result<(u16, u16)> {
        let (num_queues, queue_size) = (inflight.num_queues, inflight.queue_size);
        if num_queues == 0 || usize::from(num_queues) > self.num_queues {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "inflight buffer for {num_queues} queues asked, we serve 1 to {}",
                    self.num_queues
                ),
            ));
        }
        if queue_size == 0 || usize::from(queue_size) > QUEUE_SIZE_MAX {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("inflight buffer for rings of {queue_size} asked, we accept 1 to {QUEUE_SIZE_MAX}"),
            ));
        }
        Ok((num_queues, queue_size))
    }

    /// Calls `hook` each time the front end has stopped every ring it had
    /// started (GET_VRING_BASE on each; QEMU does it when the VM stops, and
    /// at the switch-over of a live migration). By then every request taken
    /// off the rings is complete and its pages logged, and no new request is
    /// taken until a ring starts again: from here this back end issues no
    /// write for the guest. The place to hand the volume's attachment (and
    /// its fence) to a migration's destination. Runs on the vhost-user
    /// thread, before the front end gets its answer.
    pub fn on_rings_stopped(&self, hook: RingsStoppedHook) {
        *lock(&self.rings_stopped_hook) = Some(hook);
    }

    /// Whether any ring is started (requests may be taken off it).
    pub fn rings_running(&self) -> bool {
        self.rings_running.load(Ordering::Acquire) != 0
    }

    /// Per-queue counters, for tests and benchmarks.
    pub fn stats(&self) -> Vec<crate::worker::WorkerStats> {
        (0..self.num_queues).map(|i| self.worker(i).stats).collect()
    }

    pub fn device_info(&self) -> &DeviceInfo {
        &self.info
    }
}

/// The virtio-blk config space (VIRTIO 1.2 §5.2.4), little endian.
fn config_space(info: &DeviceInfo, num_queues: u16) -> [u8; CONFIG_SPACE_BYTES] {
    let mut c = [0u8; CONFIG_SPACE_BYTES];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    let sector_bytes = celer_device::SECTOR_SIZE_BYTES;
    put(0, &(info.size_bytes / sector_bytes).to_le_bytes()); // capacity
    put(8, &segment_max_bytes(info).to_le_bytes()); // size_max
    put(12, &(SEG_MAX as u32).to_le_bytes()); // seg_max
    put(20, &info.block_size_bytes.to_le_bytes()); // blk_size
                                                   // Topology: physical blocks of PHYSICAL_BLOCK_BYTES (what the storage
                                                   // versions and stores; smaller writes are merged on the nodes), so the
                                                   // guest aligns its file systems and I/O to them. Counts are in logical
                                                   // blocks (blk_size).
    let blk = info.block_size_bytes.max(512);
    let per_physical = (PHYSICAL_BLOCK_BYTES / blk).max(1);
    put(24, &[per_physical.trailing_zeros() as u8]); // physical_block_exp
    put(25, &[0]); // alignment_offset
    put(26, &(per_physical as u16).to_le_bytes()); // min_io_size
    put(28, &(OPT_IO_BYTES / blk).to_le_bytes()); // opt_io_size
    put(34, &num_queues.to_le_bytes()); // num_queues
                                        // Discards of whole physical blocks: a partial one costs a merge.
    let align_sectors =
        (info.block_size_bytes.max(PHYSICAL_BLOCK_BYTES) as u64 / sector_bytes) as u32;
    if info.supports_discard {
        put(36, &range_max_sectors(info).to_le_bytes()); // max_discard_sectors
        put(40, &1u32.to_le_bytes()); // max_discard_seg
        put(44, &align_sectors.to_le_bytes()); // discard_sector_alignment
    }
    if info.supports_write_zeroes {
        put(48, &range_max_sectors(info).to_le_bytes()); // max_write_zeroes_sectors
        put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[0]); // write_zeroes_may_unmap
    }
    c
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl VhostUserBackend for VhostUserBlk {
    type Bitmap = vhost_user_backend::bitmap::BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE_MAX
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
        let log = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        for i in 0..self.num_queues {
            self.worker(i).set_log_dirty(log);
        }
        if log {
            info!("dirty logging on (migration): pages the back end writes are logged");
        }
        debug!(features = format_args!("{features:#x}"), "features acked");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn get_inflight_fd(
        &self,
        inflight: &VhostUserInflight,
    ) -> std::io::Result<(VhostUserInflight, std::fs::File)> {
        let (num_queues, queue_size) = self.check_inflight(inflight)?;
        let (file, size) = crate::inflight::InflightMap::create(num_queues, queue_size)?;
        info!(
            num_queues,
            queue_size,
            bytes = size,
            "inflight buffer created"
        );
        Ok((
            VhostUserInflight::new(size, 0, num_queues, queue_size),
            file,
        ))
    }

    fn set_inflight_fd(
        &self,
        inflight: &VhostUserInflight,
        file: std::fs::File,
    ) -> std::io::Result<()> {
        let (num_queues, queue_size) = self.check_inflight(inflight)?;
        let invalid = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, msg);
        let need = crate::inflight::queue_region_bytes(queue_size) * u64::from(num_queues);
        let file_bytes = file.metadata()?.len();
        if inflight.mmap_size < need
            || inflight
                .mmap_offset
                .checked_add(inflight.mmap_size)
                .is_none_or(|end| end > file_bytes)
        {
            return Err(invalid(format!(
                "inflight buffer of {} bytes at offset {} (file {file_bytes} bytes) cannot hold {num_queues} queues of {queue_size} ({need} bytes)",
                inflight.mmap_size, inflight.mmap_offset
            )));
        }
        for i in 0..self.num_queues {
            if self.worker(i).inflight() > 0 {
                return Err(invalid(format!(
                    "inflight buffer set while queue {i} has requests in flight"
                )));
            }
        }
        let map =
            crate::inflight::InflightMap::map(&file, inflight.mmap_offset, inflight.mmap_size)?;
        for i in 0..self.num_queues {
            let view = (i < usize::from(num_queues))
                .then(|| crate::inflight::QueueInflight::new(map.clone(), i as u16, queue_size))
                .flatten();
            self.worker(i).set_inflight(view);
        }
        info!(
            num_queues,
            queue_size, "tracking in-flight requests in the front end's buffer"
        );
        Ok(())
    }

    fn queue_started(&self, queue_index: u32, vring: &Vring) -> std::io::Result<()> {
        if let Some(w) = self.workers.get(queue_index as usize) {
            lock(w).start_queue(vring);
            self.rings_running
                .fetch_or(1 << queue_index, Ordering::AcqRel);
        }
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        debug!("back-end request channel set up");
        *lock(&self.backend_req) = Some(backend);
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings carry the flag themselves (set by the handler).
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The front end asks for its own idea of the struct's size (newer
        // QEMUs know more fields); answer exactly `size` bytes, zero past ours.
        let mut space = self.config_space;
        let sectors = self.capacity_bytes() / celer_device::SECTOR_SIZE_BYTES;
        space[..8].copy_from_slice(&sectors.to_le_bytes());
        let mut out = vec![0u8; size as usize];
        let start = offset as usize;
        if start < CONFIG_SPACE_BYTES {
            let n = (CONFIG_SPACE_BYTES - start).min(out.len());
            out[..n].copy_from_slice(&space[start..start + n]);
        }
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
        // Only `wce` (offset 32) is writable in virtio-blk; we do not offer
        // CONFIG_WCE, so every write is refused.
        warn!(
            offset,
            len = buf.len(),
            "front end tried to write the config space"
        );
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "virtio-blk config space is read-only",
        ))
    }

    fn update_memory(&self, mem: GuestMemAtomic) -> std::io::Result<()> {
        for i in 0..self.num_queues {
            self.worker(i).set_memory(mem.clone());
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        if let Some(w) = self.workers.get(queue_index as usize) {
            let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
            let inflight = w.inflight();
            let started = std::time::Instant::now();
            w.drain(Duration::from_secs(5));
            drop(w);
            // What the drain costs a migration's downtime (QEMU waits).
            info!(
                queue = queue_index,
                inflight,
                drain_us = started.elapsed().as_micros() as u64,
                "ring stopped"
            );
            let bit = 1u64 << queue_index;
            let before = self.rings_running.fetch_and(!bit, Ordering::AcqRel);
            if before == bit {
                info!("every ring stopped: this back end takes no request until one starts again");
                if let Some(hook) = lock(&self.rings_stopped_hook).as_ref() {
                    hook();
                }
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> std::io::Result<()> {
        // An error here would end the worker's epoll loop for good; an odd
        // event set (HUP/ERR on an eventfd) is logged and handled as a wake-up.
        if evset != EventSet::IN {
            debug!(
                thread_id,
                device_event,
                ?evset,
                "unexpected epoll event set"
            );
        }
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        let event = u64::from(device_event);
        let wake = if event == 0 {
            Wake::Kick
        } else if event == self.completion_event(thread_id) {
            Wake::Completion
        } else if event == self.resume_event(thread_id) {
            Wake::Resume
        } else {
            warn!(thread_id, device_event, "unknown event");
            return Ok(());
        };
        let mut w = self.worker(thread_id);
        w.wake(vring, wake);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(max_request_bytes: u64, block_size_bytes: u32) -> DeviceInfo {
        DeviceInfo {
            size_bytes: 1 << 30,
            block_size_bytes,
            read_only: false,
            supports_discard: true,
            supports_write_zeroes: true,
            max_request_bytes,
            serial: String::new(),
        }
    }

    fn u32_at(c: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(c[off..off + 4].try_into().expect("4 bytes"))
    }

    /// The config space never lets a guest build a request larger than
    /// the device takes: data (seg_max x size_max), discard, write zeroes.
    #[test]
    fn advertised_limits_fit_the_devices_largest_request() {
        for (max, block) in [
            (4u64 << 20, 512),
            (4 << 20, 4096),
            (32 << 20, 512),
            (1 << 30, 4096),
        ] {
            let c = config_space(&info(max, block), 1);
            let (size_max, seg_max) = (u32_at(&c, 8), u32_at(&c, 12));
            assert!(u64::from(size_max) * u64::from(seg_max) <= max, "{max}");
            assert!(size_max >= 4096 && size_max % 4096 == 0, "{size_max}");
            for off in [36, 48] {
                let sectors = u64::from(u32_at(&c, off));
                assert!(sectors > 0 && sectors * 512 <= max, "{max} at {off}");
                assert_eq!(sectors % 8, 0, "whole 4 KiB blocks");
            }
        }
        // A cluster volume (4 MiB requests): 32 KiB segments, 4 MiB ranges.
        let c = config_space(&info(4 << 20, 512), 1);
        assert_eq!(u32_at(&c, 8), 32 << 10);
        assert_eq!(u32_at(&c, 36), (4 << 20) / 512);
        // A file (32 MiB): as before.
        let c = config_space(&info(32 << 20, 512), 1);
        assert_eq!(u32_at(&c, 8), SEGMENT_MAX_BYTES);
        assert_eq!(u32_at(&c, 36), (32 << 20) / 512);
    }
}
