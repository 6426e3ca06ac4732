//! The per-queue worker: takes requests off one virtqueue, submits them to
//! its own `DeviceQueue`, and puts completions on the used ring, all on one
//! thread (run to completion, no hop).
//!
//! Poll loop: after a wake-up (kick, device completion, or a self-resume) the
//! worker keeps passing over its avail ring and its device queue for as long
//! as work shows up within `poll_window` (or, while requests are in flight
//! on the device, within `inflight_poll_window`: a completion is then seen
//! without an eventfd wake-up); guest notifications stay suppressed
//! meanwhile (with EVENT_IDX the avail event is not advanced).
//! When a window passes without work it re-enables notifications, checks the
//! ring once more (closing the race with a guest that added a request just
//! before), and returns to epoll. Idle, it costs no CPU.
//!
//! With an inflight buffer (INFLIGHT_SHMFD, see [`crate::inflight`]) every
//! head is marked there when popped and cleared when it goes on the used
//! ring; when the ring starts, heads a previous back end left marked are
//! resubmitted before anything new is popped, oldest first.
//!
//! Invariants: a slot is owned by at most one request; its host segments
//! point into the guest-memory snapshot `mem`, which is only replaced when no
//! request is in flight, so every pointer a device holds stays mapped until
//! its completion. Nothing on the request path allocates.

use std::sync::Arc;
use std::time::{Duration, Instant};

use celer_device::{DeviceInfo, DeviceQueue, IoCompletion, IoError, IoOp, IoRequest, IoSegment};
use tracing::{debug, info, warn};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VringMutex, VringState, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::inflight::{ChainWalk, QueueInflight};
use crate::request::{self, RequestType, HOST_SEGMENTS_MAX, ID_BYTES};

/// Guest memory with the front end's dirty log (LOG_SHMFD) behind every
/// region: writes through vm-memory (status bytes, used ring) are logged by
/// it; data the device writes through host pointers is logged by the worker.
pub(crate) type GuestMem = GuestMemoryMmap<BitmapMmapRegion>;
pub(crate) type GuestMemAtomic = GuestMemoryAtomic<GuestMem>;
pub(crate) type Vring = VringMutex<GuestMemAtomic>;

/// Longest time one wake-up may keep the worker busy before it yields to
/// epoll (so vhost-user control messages and exit events get through).
const WAKE_BUDGET: Duration = Duration::from_millis(20);
/// Bad requests logged per worker before logging only every 1024th.
const BAD_REQUEST_LOG_MAX: u64 = 16;

#[derive(Clone, Copy, Default)]
struct Slot {
    head: u16,
    status: u64,
    used_len: u32,
    /// Taken from the inflight buffer after a restart (not the avail ring).
    resubmitted: bool,
    /// Host segments of the request (in `segments`), and whether the device
    /// writes guest memory through them (reads): their pages are logged.
    nsegs: u16,
    writes_guest: bool,
}

/// Counters a worker keeps (read by tests and the bench).
#[derive(Clone, Copy, Debug, Default)]
pub struct WorkerStats {
    pub requests: u64,
    pub bad_requests: u64,
    pub io_errors: u64,
    pub wakeups: u64,
    /// Heads resubmitted from the inflight buffer (a previous back end had
    /// taken them and not completed them).
    pub resubmitted: u64,
    /// Resubmitted heads put on the used ring.
    pub resubmitted_completed: u64,
    /// Heads found on the used ring but still marked in flight (the
    /// previous back end died between the two writes): cleared, not redone.
    pub used_not_cleared: u64,
}

pub(crate) struct Worker {
    pub(crate) index: usize,
    device: Box<dyn DeviceQueue>,
    info: DeviceInfo,
    serial: [u8; ID_BYTES],
    mem_atomic: Option<GuestMemAtomic>,
    /// The snapshot every in-flight request's segments point into.
    mem: Option<Arc<GuestMem>>,
    vring: Option<Vring>,
    slots: Vec<Slot>,
    segments: Vec<IoSegment>,
    free: Vec<u16>,
    poll_window: Duration,
    inflight_poll_window: Duration,
    cpu: Option<usize>,
    resume: (EventConsumer, EventNotifier),
    /// This queue's part of the front end's inflight buffer, if it gave one.
    inflight: Option<QueueInflight>,
    /// Heads (and their counters) to resubmit, oldest first; capacity fixed
    /// at the largest ring.
    resubmit: Vec<(u16, u64)>,
    resubmit_next: usize,
    /// Signal the guest once after the ring starts: a back end that died
    /// after writing the used ring but before the interrupt left it waiting.
    signal_on_start: bool,
    /// The front end asked for dirty logging (VHOST_F_LOG_ALL: migration).
    log_dirty: bool,
    pub(crate) stats: WorkerStats,
}

// SAFETY: `segments` holds raw pointers into guest memory that is kept mapped
// by `mem`; the worker is used by one thread at a time (behind its own mutex).
unsafe impl Send for Worker {}

impl Worker {
    pub(crate) fn new(
        index: usize,
        device: Box<dyn DeviceQueue>,
        info: DeviceInfo,
        slots_max: usize,
        poll_window: Duration,
        inflight_poll_window: Duration,
        cpu: Option<usize>,
    ) -> std::io::Result<Self> {
        let nslots = slots_max
            .min(device.inflight_max())
            .clamp(1, u16::MAX as usize);
        let mut serial = [0u8; ID_BYTES];
        let s = info.serial.as_bytes();
        let n = s.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&s[..n]);
        Ok(Worker {
            index,
            device,
            info,
            serial,
            mem_atomic: None,
            mem: None,
            vring: None,
            slots: vec![Slot::default(); nslots],
            segments: vec![
                IoSegment {
                    addr: std::ptr::null_mut(),
                    len: 0
                };
                nslots * HOST_SEGMENTS_MAX
            ],
            free: (0..nslots as u16).rev().collect(),
            poll_window,
            inflight_poll_window,
            cpu,
            resume: new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?,
            inflight: None,
            resubmit: Vec::with_capacity(crate::blk::QUEUE_SIZE_MAX),
            resubmit_next: 0,
            signal_on_start: false,
            log_dirty: false,
            stats: WorkerStats::default(),
        })
    }

    pub(crate) fn completion_fd(&self) -> Option<i32> {
        self.device.completion_fd()
    }

    pub(crate) fn resume_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.resume.0.as_raw_fd()
    }

    pub(crate) fn set_memory(&mut self, mem: GuestMemAtomic) {
        self.mem_atomic = Some(mem);
        if self.inflight() == 0 {
            self.mem = None;
        }
    }

    /// Logs pages the device writes from now on (`VHOST_F_LOG_ALL` acked).
    pub(crate) fn set_log_dirty(&mut self, on: bool) {
        self.log_dirty = on;
    }

    /// Tracks this queue's in-flight heads in `inflight` from now on.
    pub(crate) fn set_inflight(&mut self, inflight: Option<QueueInflight>) {
        self.inflight = inflight;
        self.resubmit.clear();
        self.resubmit_next = 0;
    }

    /// The front end started the ring (`vring`: size, base, addresses and
    /// memory set; not yet ready, so nothing processes it concurrently).
    /// With an inflight buffer: reconcile it with the used ring, queue the
    /// heads still in flight for resubmission, and move the next avail index
    /// past them (used idx + heads in flight: every head popped before is
    /// either on the used ring or in flight). Then wake the worker through
    /// the kick eventfd, which it sees once the ring is enabled.
    pub(crate) fn start_queue(&mut self, vring: &Vring) {
        self.vring = Some(vring.clone());
        self.signal_on_start = true;
        self.resubmit.clear();
        self.resubmit_next = 0;
        let mut guard = vring.get_mut();
        let state: &mut VringState<GuestMemAtomic> = &mut guard;
        let index = self.index;
        if let (Some(mut f), Some(atomic)) = (self.inflight.take(), self.mem_atomic.clone()) {
            if self.reconcile(state, &mut f, &atomic) {
                self.inflight = Some(f);
            }
        }
        // Wake the worker as soon as the ring is enabled, like a guest kick.
        if let Some(kick) = state.get_kick() {
            use std::os::fd::AsRawFd;
            let one = 1u64;
            // SAFETY: writes 8 bytes from `one` to the kick eventfd, which the
            // vring owns and keeps open while we hold its lock.
            let rc = unsafe { libc::write(kick.as_raw_fd(), (&one as *const u64).cast(), 8) };
            if rc != 8 {
                debug!(queue = index, "cannot kick our own ring");
            }
        }
    }

    /// `start_queue`'s work on the inflight buffer; returns whether to keep
    /// tracking this queue in it.
    fn reconcile(
        &mut self,
        state: &mut VringState<GuestMemAtomic>,
        f: &mut QueueInflight,
        atomic: &GuestMemAtomic,
    ) -> bool {
        let index = self.index;
        let mem = atomic.memory();
        let queue = state.get_queue();
        let size = queue.size();
        if size != f.desc_num() {
            warn!(
                queue = index,
                ring_size = size,
                inflight_size = f.desc_num(),
                "inflight buffer is laid out for another ring size: not tracking this queue"
            );
            return false;
        }
        let base = queue.next_avail();
        let (used, avail) = match (
            queue.used_idx(&*mem, std::sync::atomic::Ordering::Acquire),
            queue.avail_idx(&*mem, std::sync::atomic::Ordering::Acquire),
        ) {
            (Ok(u), Ok(a)) => (u.0, a.0),
            (Err(e), _) | (_, Err(e)) => {
                warn!(queue = index, error = %e, "cannot read the ring indexes: not tracking this queue");
                return false;
            }
        };
        let r = f.recover(used, &mut self.resubmit);
        if let Some(head) = r.used_not_cleared {
            self.stats.used_not_cleared += 1;
            info!(
                queue = index,
                head, "head was on the used ring but still marked in flight: not resubmitted"
            );
        }
        if r.fresh {
            return true;
        }
        // Heads a timed-out drain left in our slots are still ours: their
        // completion goes on this ring; they are not resubmitted.
        let slots = &self.slots;
        let free = &self.free;
        let owned = |head: u16| {
            (0..slots.len() as u16).any(|s| !free.contains(&s) && slots[s as usize].head == head)
        };
        self.resubmit.retain(|&(head, _)| !owned(head));
        let inuse = self.resubmit.len() + self.inflight();
        if inuse > usize::from(avail.wrapping_sub(used)) {
            warn!(
                queue = index,
                used_idx = used,
                avail_idx = avail,
                inflight = inuse,
                "inflight buffer does not match the ring (more in flight than made available): ignoring it"
            );
            f.clear_all();
            self.resubmit.clear();
            return true;
        }
        let next_avail = used.wrapping_add(inuse as u16);
        state.get_queue_mut().set_next_avail(next_avail);
        if !self.resubmit.is_empty() || next_avail != base {
            let heads: Vec<String> = self
                .resubmit
                .iter()
                .map(|(h, c)| format!("{h}:{c}"))
                .collect();
            info!(
                queue = index,
                used_idx = used,
                next_avail,
                front_end_base = base,
                resubmit = self.resubmit.len(),
                heads = heads.join(","),
                "resubmitting in-flight requests (head:counter, oldest first)"
            );
        }
        true
    }

    pub(crate) fn inflight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn pin(&mut self) {
        // Each connection brings new worker threads: pin each thread once.
        thread_local! {
            static PINNED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        }
        if PINNED.with(|p| p.replace(true)) {
            return;
        }
        let Some(cpu) = self.cpu else { return };
        // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it and
        // sched_setaffinity(0, ..) only reads it for the calling thread.
        let rc = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        if rc != 0 {
            warn!(
                queue = self.index,
                cpu,
                error = %std::io::Error::last_os_error(),
                "cannot pin worker to its CPU; running unpinned"
            );
        } else {
            debug!(queue = self.index, cpu, "worker pinned");
        }
    }

    fn drain_fd(fd: i32) {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into `v`; the fd is a non-blocking eventfd we own
        // or that the device owns for its lifetime.
        unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    }

    /// Handles one wake-up: `event` says what woke the worker.
    pub(crate) fn wake(&mut self, vring: &Vring, event: Wake) {
        self.pin();
        self.stats.wakeups += 1;
        match event {
            Wake::Completion => {
                if let Some(fd) = self.device.completion_fd() {
                    Self::drain_fd(fd);
                }
            }
            Wake::Resume => Self::drain_fd(self.resume_fd()),
            Wake::Kick => {}
        }
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        if self.mem_atomic.is_none() {
            // No front end (`detach` forgets its memory): the device must
            // still handle its own events (a node connection closing, a
            // late completion), or its completion fd stays readable and
            // epoll wakes this worker in a loop. (`pass` does the same for
            // a ring that is not ready.)
            self.poll_device_detached();
            return;
        }
        if self.mem.is_none() || self.inflight() == 0 {
            let Some(atomic) = &self.mem_atomic else {
                return;
            };
            self.mem = Some(atomic.memory().into_inner());
        }
        let start = Instant::now();
        let mut last_work = start;
        let _ = vring.disable_notification();
        loop {
            let work = self.pass(vring);
            let now = Instant::now();
            if work > 0 {
                last_work = now;
            } else if now.duration_since(last_work)
                >= if self.inflight() > 0 {
                    self.inflight_poll_window.max(self.poll_window)
                } else {
                    self.poll_window
                }
            {
                match vring.enable_notification() {
                    Ok(true) => {
                        // The guest added requests while notifications were off.
                        let _ = vring.disable_notification();
                        last_work = now;
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => warn!(queue = self.index, error = %e, "cannot enable notifications"),
                }
                // Completions of a device without a completion fd are visible
                // on the next poll: keep going until they are out.
                if self.device.completion_fd().is_none() && self.device.inflight() > 0 {
                    continue;
                }
                return;
            }
            if now.duration_since(start) >= WAKE_BUDGET {
                // Come back right after epoll has had a look at other events.
                let _ = self.resume.1.notify();
                return;
            }
            if work == 0 {
                // Polling with nothing to do: let a thread that shares this
                // CPU (the guest's vCPU, another queue) run; returns at once
                // when the CPU is ours alone.
                std::thread::yield_now();
            }
        }
    }

    /// One pass: take what the avail ring has (as far as slots allow), submit
    /// it, then hand device completions to the used ring. Returns work done.
    fn pass(&mut self, vring: &Vring) -> usize {
        let Some(mem) = self.mem.clone() else {
            return 0;
        };
        let mut guard = vring.get_mut();
        let state: &mut VringState<GuestMemAtomic> = &mut guard;
        if !state.get_queue().ready() {
            // Stopped (GET_VRING_BASE clears "ready" before the drain takes
            // this worker's lock) while the memory is still the front
            // end's: completions of requests taken before go on the used
            // ring, as the drain does. Dropping them here (as for a front
            // end that is gone) lost them: the base the front end got
            // counted them as taken, and the used ring never had them (the
            // dirty-log test failed one run in many on this).
            drop(guard);
            return self.pass_completions_only(vring);
        }
        let mut work = 0;
        let mut used = 0;
        // Heads a previous back end left in flight go first, oldest first.
        while self.resubmit_next < self.resubmit.len() && !self.free.is_empty() {
            let (head, counter) = self.resubmit[self.resubmit_next];
            self.resubmit_next += 1;
            work += 1;
            self.stats.requests += 1;
            self.stats.resubmitted += 1;
            debug!(
                queue = self.index,
                head, counter, "resubmitting in-flight request"
            );
            let queue = state.get_queue();
            let walk = ChainWalk::new(&*mem, GuestAddress(queue.desc_table()), queue.size(), head);
            if self.take(state, &mem, head, walk, true) {
                used += 1;
            }
        }
        while !self.free.is_empty() {
            let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&*mem) else {
                break;
            };
            work += 1;
            self.stats.requests += 1;
            let head = chain.head_index();
            if let Some(f) = self.inflight.as_mut() {
                f.mark(head);
            }
            if self.take(state, &mem, head, chain, false) {
                used += 1;
            }
        }
        // Submitted requests go to the kernel inside poll (one syscall per pass).
        let slots = &mut self.slots;
        let free = &mut self.free;
        let stats = &mut self.stats;
        let index = self.index;
        let inflight = self.inflight.as_ref();
        let segments = &self.segments;
        let log_dirty = self.log_dirty;
        work += self.device.poll(&mut |c: IoCompletion| {
            let Some(slot) = u16::try_from(c.tag)
                .ok()
                .filter(|&s| (s as usize) < slots.len())
            else {
                warn!(
                    queue = index,
                    tag = c.tag,
                    "device completed an unknown tag"
                );
                return;
            };
            let s = slots[slot as usize];
            if log_dirty && s.writes_guest {
                log_segments(&mem, slot_segments(segments, slot, s.nsegs));
            }
            let (status, used_len) = match &c.result {
                Ok(()) => (VIRTIO_BLK_S_OK, s.used_len),
                Err(e) => {
                    stats.io_errors += 1;
                    if stats.io_errors <= BAD_REQUEST_LOG_MAX
                        || stats.io_errors.is_multiple_of(1024)
                    {
                        warn!(queue = index, error = %e, "request failed");
                    }
                    (status_for(e), 1)
                }
            };
            let _ = mem.write_obj(status as u8, GuestAddress(s.status));
            put_used(index, state, inflight, s.head, used_len);
            if s.resubmitted {
                stats.resubmitted_completed += 1;
                info!(
                    queue = index,
                    head = s.head,
                    "resubmitted request completed"
                );
            }
            free.push(slot);
            used += 1;
        });
        if self.signal_on_start && state.get_call().is_some() {
            self.signal_on_start = false;
            if let Err(e) = state.signal_used_queue() {
                debug!(queue = self.index, error = %e, "cannot signal the guest");
            }
        } else if used > 0 {
            match state.needs_notification() {
                Ok(true) | Err(_) => {
                    if let Err(e) = state.signal_used_queue() {
                        debug!(queue = self.index, error = %e, "cannot signal the guest");
                    }
                }
                Ok(false) => {}
            }
        }
        work
    }

    /// Parses the chain at `head` and submits it in the next free slot
    /// (there must be one). Returns whether it finished at once (it is then
    /// on the used ring).
    fn take(
        &mut self,
        state: &mut VringState<GuestMemAtomic>,
        mem: &GuestMem,
        head: u16,
        descs: impl IntoIterator<Item = Descriptor>,
        resubmitted: bool,
    ) -> bool {
        let Some(&slot) = self.free.last() else {
            return false;
        };
        let seg_base = slot as usize * HOST_SEGMENTS_MAX;
        let segs = &mut self.segments[seg_base..seg_base + HOST_SEGMENTS_MAX];
        let used_len = match request::parse(mem, descs, segs) {
            Err(bad) => {
                self.stats.bad_requests += 1;
                if self.stats.bad_requests <= BAD_REQUEST_LOG_MAX
                    || self.stats.bad_requests.is_multiple_of(1024)
                {
                    warn!(queue = self.index, head, error = %bad.error,
                        bad_requests = self.stats.bad_requests, "bad request from the guest");
                }
                let status = if bad.error.is_unsupported() {
                    VIRTIO_BLK_S_UNSUPP
                } else {
                    VIRTIO_BLK_S_IOERR
                };
                match bad.status_addr {
                    Some(addr) => {
                        let _ = mem.write_obj(status as u8, addr);
                        1
                    }
                    None => 0,
                }
            }
            Ok(req) => match self.submit(slot, head, &req, resubmitted) {
                Ok(()) => return false,
                Err(status) => {
                    let _ = mem.write_obj(status, req.status_addr);
                    if req.kind == RequestType::GetId && status == VIRTIO_BLK_S_OK as u8 {
                        req.data_bytes.min(ID_BYTES as u32) + 1
                    } else {
                        1
                    }
                }
            },
        };
        put_used(self.index, state, self.inflight.as_ref(), head, used_len);
        if resubmitted {
            self.stats.resubmitted_completed += 1;
            info!(queue = self.index, head, "resubmitted request completed");
        }
        true
    }

    /// Submits a parsed request in `slot`. `Ok`: in flight. `Err(status)`:
    /// finished at once with that status.
    fn submit(
        &mut self,
        slot: u16,
        head: u16,
        req: &request::Request,
        resubmitted: bool,
    ) -> Result<(), u8> {
        let op = match req.kind {
            RequestType::In => IoOp::Read,
            RequestType::Out => IoOp::Write,
            RequestType::Flush => IoOp::Flush,
            RequestType::Discard => IoOp::Discard,
            RequestType::WriteZeroes => IoOp::WriteZeroes,
            RequestType::GetId => {
                let seg_base = slot as usize * HOST_SEGMENTS_MAX;
                let mut left = &self.serial[..];
                for s in &self.segments[seg_base..seg_base + req.segments] {
                    let n = s.len.min(left.len());
                    // SAFETY: the parser produced `s` from a device-writable
                    // descriptor inside guest memory, which `mem` keeps mapped.
                    unsafe { std::ptr::copy_nonoverlapping(left.as_ptr(), s.addr, n) };
                    left = &left[n..];
                }
                if self.log_dirty {
                    if let Some(mem) = &self.mem {
                        log_segments(mem, &self.segments[seg_base..seg_base + req.segments]);
                    }
                }
                return Err(VIRTIO_BLK_S_OK as u8);
            }
        };
        let Some(offset_bytes) = req.sector.checked_mul(celer_device::SECTOR_SIZE_BYTES) else {
            self.log_reject(
                head,
                &IoError::OutOfRange {
                    offset_bytes: u64::MAX,
                    len_bytes: u64::from(req.data_bytes),
                    size_bytes: self.info.size_bytes,
                },
            );
            return Err(VIRTIO_BLK_S_IOERR as u8);
        };
        let seg_base = slot as usize * HOST_SEGMENTS_MAX;
        let len_bytes = u64::from(req.range_sectors) * celer_device::SECTOR_SIZE_BYTES;
        // Offsets are in 512-byte units; the device's logical block (blk_size,
        // 512 or 4096) is the unit a request must be aligned to.
        let align_bytes = u64::from(self.info.block_size_bytes.max(512));
        let io_bytes = match op {
            IoOp::Read | IoOp::Write => u64::from(req.data_bytes),
            _ => len_bytes,
        };
        if !offset_bytes.is_multiple_of(align_bytes) || !io_bytes.is_multiple_of(align_bytes) {
            let e = IoError::Misaligned {
                offset_bytes,
                len_bytes: io_bytes,
                align_bytes,
            };
            self.log_reject(head, &e);
            return Err(VIRTIO_BLK_S_IOERR as u8);
        }
        let io = IoRequest {
            op,
            offset_bytes,
            len_bytes,
            segments: &self.segments[seg_base..seg_base + req.segments],
            tag: u64::from(slot),
        };
        // SAFETY: the segments point into guest memory held mapped by
        // `self.mem`, which is not replaced while this request is in flight
        // (see `wake`); their direction was checked by the parser.
        match unsafe { self.device.submit(&io) } {
            Ok(()) => {
                self.slots[slot as usize] = Slot {
                    head,
                    status: req.status_addr.0,
                    used_len: if req.kind == RequestType::In {
                        req.data_bytes + 1
                    } else {
                        1
                    },
                    resubmitted,
                    nsegs: req.segments as u16,
                    writes_guest: req.kind == RequestType::In,
                };
                self.free.pop();
                Ok(())
            }
            Err(e) => {
                self.log_reject(head, &e);
                Err(status_for(&e) as u8)
            }
        }
    }

    fn log_reject(&mut self, head: u16, e: &IoError) {
        self.stats.bad_requests += 1;
        if self.stats.bad_requests <= BAD_REQUEST_LOG_MAX
            || self.stats.bad_requests.is_multiple_of(1024)
        {
            warn!(queue = self.index, head, error = %e, "request rejected");
        }
    }

    /// Waits (bounded) for every in-flight request and puts it on the used
    /// ring; called when the front end stops the ring or goes away.
    pub(crate) fn drain(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let Some(vring) = self.vring.clone() else {
            return;
        };
        while self.inflight() > 0 && Instant::now() < deadline {
            if self.pass_completions_only(&vring) == 0 {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        if self.inflight() > 0 {
            warn!(
                queue = self.index,
                inflight = self.inflight(),
                "device did not complete in-flight requests in time"
            );
        }
    }

    fn pass_completions_only(&mut self, vring: &Vring) -> usize {
        let Some(mem) = self.mem.clone() else {
            return 0;
        };
        let mut guard = vring.get_mut();
        let state: &mut VringState<GuestMemAtomic> = &mut guard;
        let slots = &mut self.slots;
        let free = &mut self.free;
        let stats = &mut self.stats;
        let index = self.index;
        let inflight = self.inflight.as_ref();
        let segments = &self.segments;
        let log_dirty = self.log_dirty;
        let mut n = 0;
        self.device.poll(&mut |c| {
            let Some(slot) = u16::try_from(c.tag)
                .ok()
                .filter(|&s| (s as usize) < slots.len())
            else {
                return;
            };
            let s = slots[slot as usize];
            if log_dirty && s.writes_guest {
                log_segments(&mem, slot_segments(segments, slot, s.nsegs));
            }
            let status = match &c.result {
                Ok(()) => VIRTIO_BLK_S_OK,
                Err(e) => status_for(e),
            };
            let _ = mem.write_obj(status as u8, GuestAddress(s.status));
            put_used(index, state, inflight, s.head, s.used_len);
            if s.resubmitted {
                stats.resubmitted_completed += 1;
                info!(
                    queue = index,
                    head = s.head,
                    "resubmitted request completed"
                );
            }
            free.push(slot);
            n += 1;
        });
        if n > 0 {
            let _ = state.signal_used_queue();
        }
        n
    }

    /// Lets the device make progress while no ring is served. A completion
    /// that arrives now has no ring to go to (its front end left after the
    /// drain timed out): its slot is freed and the completion dropped.
    fn poll_device_detached(&mut self) {
        let slots = self.slots.len();
        let free = &mut self.free;
        let index = self.index;
        self.device
            .poll(&mut |c: IoCompletion| match u16::try_from(c.tag)
                .ok()
                .filter(|&s| (s as usize) < slots)
            {
                Some(slot) => {
                    debug!(
                        queue = index,
                        slot, "completion after the front end left: dropped"
                    );
                    free.push(slot);
                }
                None => warn!(
                    queue = index,
                    tag = c.tag,
                    "device completed an unknown tag"
                ),
            });
    }

    /// Forgets the ring (front end gone); in-flight requests must be drained.
    pub(crate) fn detach(&mut self) {
        self.drain(Duration::from_secs(5));
        self.vring = None;
        self.mem_atomic = None;
        // The buffer belongs to the front end: the next one hands it over again.
        self.inflight = None;
        self.resubmit.clear();
        self.resubmit_next = 0;
        if self.inflight() == 0 {
            self.mem = None;
        }
    }
}

/// What woke a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wake {
    Kick,
    Completion,
    Resume,
}

/// Segments of `slot` (the first `n` of its share of `segments`).
fn slot_segments(segments: &[IoSegment], slot: u16, n: u16) -> &[IoSegment] {
    let base = slot as usize * HOST_SEGMENTS_MAX;
    &segments[base..base + (n as usize).min(HOST_SEGMENTS_MAX)]
}

/// Marks the guest pages under `segs` dirty in the front end's log: the
/// device wrote them through host pointers (zero copy, io_uring or socket
/// reads), which vm-memory's own tracking does not see. A segment never
/// crosses a region (the parser splits there).
fn log_segments(mem: &GuestMem, segs: &[IoSegment]) {
    for s in segs {
        let addr = s.addr as usize;
        for region in mem.iter() {
            let base = region.as_ptr() as usize;
            if addr >= base && addr - base < region.len() as usize {
                region.bitmap().mark_dirty(addr - base, s.len);
                break;
            }
        }
    }
}

/// Puts `head` on the used ring, with the inflight buffer's protocol around
/// it when there is one (see [`crate::inflight`]).
fn put_used(
    queue: usize,
    state: &mut VringState<GuestMemAtomic>,
    inflight: Option<&QueueInflight>,
    head: u16,
    len: u32,
) {
    if let Some(f) = inflight {
        f.pre_put(head);
    }
    if let Err(e) = state.add_used(head, len) {
        warn!(queue, head, error = %e, "cannot add to the used ring");
    }
    if let Some(f) = inflight {
        f.post_put(head, state.get_queue().next_used());
    }
}

fn status_for(e: &IoError) -> u32 {
    match e {
        IoError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
        _ => VIRTIO_BLK_S_IOERR,
    }
}
