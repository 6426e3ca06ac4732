//! A user-space virtio-blk driver on the front-end side of vhost-user: it
//! plays QEMU and the guest at once. Guest memory is a shared memfd mapped in
//! this process; split virtqueues live in it; requests are posted on the
//! avail ring, kicks go through eventfds (only when the back end asks for
//! them, with EVENT_IDX), and completions are polled on the used ring.
//!
//! Used by the integration tests (any chain, including malformed ones) and by
//! the benchmark (`bench`), against Celer or any other vhost-user-blk back end
//! such as qemu-storage-daemon.
//!
//! Invariants: every ring and buffer address handed to the back end lies in
//! the memfd region; each queue is driven by one thread; slot `s` of a queue
//! owns descriptors `3s..3s+3` and its own header, data and status bytes.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{fence, AtomicU16, Ordering};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{
    Frontend as VuFrontend, FrontendReqHandler, HandlerResult, VhostUserFrontend,
    VhostUserFrontendReqHandler,
};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vmm_sys_util::eventfd::EventFd;

/// Descriptor flag: chain continues.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: buffer is an indirect table.
pub const DESC_F_INDIRECT: u16 = 4;
/// Guest-physical address where the driver's memory starts.
pub const GUEST_BASE: u64 = 0x1_0000_0000;

/// Page size of the vhost dirty log (VHOST_LOG_PAGE).
pub const DIRTY_PAGE_BYTES: u64 = 4096;

/// Whether the dirty log `log` (from [`Frontend::start_dirty_log`]) has the
/// page of guest address `gpa`.
pub fn page_dirty(log: &SharedMem, gpa: u64) -> bool {
    let page = gpa / DIRTY_PAGE_BYTES;
    let mut b = [0u8];
    log.read((page / 8) as usize, &mut b);
    b[0] & (1 << (page % 8)) != 0
}

/// Errors of the driver.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("vhost-user: {0}")]
    VhostUser(#[from] vhost::Error),
    #[error("vhost-user channel: {0}")]
    VhostUserChannel(#[from] vhost::vhost_user::Error),
    #[error("system call failed: {0}")]
    Sys(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(String),
}

/// Shared memory standing in for guest RAM.
pub struct SharedMem {
    ptr: *mut u8,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory; concurrent access is arbitrated
// by the virtqueue protocol (each queue's areas are touched by one thread).
unsafe impl Send for SharedMem {}
// SAFETY: as above.
unsafe impl Sync for SharedMem {}

impl SharedMem {
    pub fn new(len: usize) -> Result<Self, FrontendError> {
        // SAFETY: memfd_create takes a NUL-terminated name and flags only.
        let fd = unsafe { libc::memfd_create(c"celer-frontend".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: maps `len` bytes of our memfd; checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(SharedMem {
            ptr: ptr.cast(),
            len,
            fd,
        })
    }

    /// Guest-physical address of byte `off`.
    pub fn gpa(&self, off: usize) -> u64 {
        GUEST_BASE + off as u64
    }

    fn host(&self, off: usize, len: usize) -> *mut u8 {
        assert!(off.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: bounds checked above.
        unsafe { self.ptr.add(off) }
    }

    pub fn write(&self, off: usize, data: &[u8]) {
        let p = self.host(off, data.len());
        // SAFETY: `p..p+len` is inside the mapping (checked by `host`).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
    }

    pub fn read(&self, off: usize, out: &mut [u8]) {
        let p = self.host(off, out.len());
        // SAFETY: as in `write`.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
    }

    fn u16_at(&self, off: usize) -> &AtomicU16 {
        assert!(off.is_multiple_of(2));
        let p = self.host(off, 2);
        // SAFETY: aligned, inside the mapping, and the mapping outlives `self`.
        unsafe { &*(p as *const AtomicU16) }
    }

    fn put_u16(&self, off: usize, v: u16) {
        self.write(off, &v.to_le_bytes());
    }

    fn get_u32(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for SharedMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One raw descriptor, as the tests write them.
#[derive(Clone, Copy, Debug)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// virtio-blk request types (virtio_blk_outhdr.type).
pub mod req_type {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Layout of one queue in shared memory.
#[derive(Clone, Copy, Debug)]
struct Layout {
    size: u16,
    desc: usize,
    avail: usize,
    used: usize,
    slots: usize,
    slot_base: usize,
    slot_bytes: usize,
    buf_bytes: usize,
}

const SLOT_HEADER_BYTES: usize = 64;

/// A driver-side virtqueue; owned by one thread.
pub struct DriverQueue<'m> {
    mem: &'m SharedMem,
    l: Layout,
    index: usize,
    kick: EventFd,
    call: EventFd,
    event_idx: bool,
    next_avail: u16,
    kicked_at: u16,
    last_used: u16,
    pub kicks: u64,
}

impl<'m> DriverQueue<'m> {
    pub fn size(&self) -> u16 {
        self.l.size
    }

    /// Slots available (each carries one request of up to `buf_bytes`).
    pub fn slots(&self) -> usize {
        self.l.slots
    }

    pub fn buf_bytes(&self) -> usize {
        self.l.buf_bytes
    }

    fn slot_off(&self, slot: usize) -> usize {
        assert!(slot < self.l.slots);
        self.l.slot_base + slot * self.l.slot_bytes
    }

    /// Offset (in shared memory) of slot `slot`'s data buffer.
    pub fn data_off(&self, slot: usize) -> usize {
        self.slot_off(slot) + SLOT_HEADER_BYTES.max(4096)
    }

    fn hdr_off(&self, slot: usize) -> usize {
        self.slot_off(slot)
    }

    /// Offset (in shared memory) of slot `slot`'s status byte.
    pub fn status_off(&self, slot: usize) -> usize {
        self.slot_off(slot) + 16
    }

    /// Status byte the back end wrote for `slot`.
    pub fn status(&self, slot: usize) -> u8 {
        let mut b = [0u8];
        self.mem.read(self.status_off(slot), &mut b);
        b[0]
    }

    pub fn mem(&self) -> &'m SharedMem {
        self.mem
    }

    /// Writes descriptor `i`.
    pub fn write_desc(&self, i: u16, d: RawDesc) {
        let off = self.l.desc + 16 * (i as usize % self.l.size as usize);
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&d.next.to_le_bytes());
        self.mem.write(off, &b);
    }

    /// Builds the usual header / data / status chain for `slot` (descriptors
    /// 3·slot..), writes the header, and returns the head. `data_len` 0: no
    /// data descriptor.
    pub fn prepare(&self, slot: usize, kind: u32, sector: u64, data_len: u32) -> u16 {
        assert!(data_len as usize <= self.l.buf_bytes);
        let head = (3 * slot) as u16;
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write(self.hdr_off(slot), &hdr);
        self.mem.write(self.status_off(slot), &[0xff]);
        let data_write = matches!(kind, req_type::IN | req_type::GET_ID);
        // The status always sits in the slot's third descriptor; without data
        // the header links straight to it.
        let status_idx = head + 2;
        self.write_desc(
            head,
            RawDesc {
                addr: self.mem.gpa(self.hdr_off(slot)),
                len: 16,
                flags: DESC_F_NEXT,
                next: if data_len > 0 { head + 1 } else { status_idx },
            },
        );
        if data_len > 0 {
            self.write_desc(
                head + 1,
                RawDesc {
                    addr: self.mem.gpa(self.data_off(slot)),
                    len: data_len,
                    flags: DESC_F_NEXT | if data_write { DESC_F_WRITE } else { 0 },
                    next: status_idx,
                },
            );
        }
        self.write_desc(
            status_idx,
            RawDesc {
                addr: self.mem.gpa(self.status_off(slot)),
                len: 1,
                flags: DESC_F_WRITE,
                next: 0,
            },
        );
        head
    }

    /// Puts `head` on the avail ring (no kick).
    pub fn publish(&mut self, head: u16) {
        let size = self.l.size as usize;
        let ring_off = self.l.avail + 4 + 2 * (self.next_avail as usize % size);
        self.mem.put_u16(ring_off, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        fence(Ordering::Release);
        self.mem
            .u16_at(self.l.avail + 2)
            .store(self.next_avail, Ordering::Release);
    }

    /// Kicks the back end if it asked for it (EVENT_IDX) since the last kick.
    pub fn kick_if_needed(&mut self) -> Result<(), FrontendError> {
        fence(Ordering::SeqCst);
        let need = if self.event_idx {
            let avail_event = self
                .mem
                .u16_at(self.l.used + 4 + 8 * self.l.size as usize)
                .load(Ordering::Acquire);
            let new = self.next_avail;
            let old = self.kicked_at;
            new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags = self.mem.u16_at(self.l.used).load(Ordering::Acquire);
            flags & 1 == 0
        };
        if need {
            self.kick.write(1)?;
            self.kicks += 1;
        }
        self.kicked_at = self.next_avail;
        Ok(())
    }

    /// Hands each new used element (id, len) to `f`; returns how many.
    pub fn poll_used(&mut self, mut f: impl FnMut(u16, u32)) -> usize {
        let used_idx = self.mem.u16_at(self.l.used + 2).load(Ordering::Acquire);
        let mut n = 0;
        while self.last_used != used_idx {
            let e = self.l.used + 4 + 8 * (self.last_used as usize % self.l.size as usize);
            let id = self.mem.get_u32(e);
            let len = self.mem.get_u32(e + 4);
            self.last_used = self.last_used.wrapping_add(1);
            f(id as u16, len);
            n += 1;
        }
        if n > 0 && self.event_idx {
            // Ask for no interrupt: we poll. (used_event lives after the avail ring.)
            let off = self.l.avail + 4 + 2 * self.l.size as usize;
            self.mem.put_u16(off, self.last_used.wrapping_sub(1));
        }
        n
    }

    /// Polls until `count` completions arrived or `timeout` passed.
    pub fn wait_used(&mut self, count: usize, timeout: std::time::Duration) -> Vec<(u16, u32)> {
        let deadline = std::time::Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < count && std::time::Instant::now() < deadline {
            if self.poll_used(|id, len| out.push((id, len))) == 0 {
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
        }
        out
    }

    /// Submits and waits for one request in `slot`; returns (status, used len).
    pub fn request(
        &mut self,
        slot: usize,
        kind: u32,
        sector: u64,
        data_len: u32,
    ) -> Result<(u8, u32), FrontendError> {
        let head = self.prepare(slot, kind, sector, data_len);
        self.submit_head(head)
    }

    /// Publishes `head`, kicks, waits for its completion.
    pub fn submit_head(&mut self, head: u16) -> Result<(u8, u32), FrontendError> {
        self.publish(head);
        self.kick.write(1)?;
        self.kicks += 1;
        self.kicked_at = self.next_avail;
        let used = self.wait_used(1, std::time::Duration::from_secs(10));
        let Some(&(id, len)) = used.first() else {
            return Err(FrontendError::Protocol(format!(
                "queue {}: no completion for head {head} within 10 s",
                self.index
            )));
        };
        if id != head {
            return Err(FrontendError::Protocol(format!(
                "queue {}: completion for head {id}, expected {head}",
                self.index
            )));
        }
        Ok((self.status((head / 3) as usize), len))
    }

    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// The driver's own ring positions: (next avail, last used seen).
    pub fn position(&self) -> (u16, u16) {
        (self.next_avail, self.last_used)
    }

    /// Continues from `position` (after a reconnect, on the same memory).
    pub fn resume_at(&mut self, (next_avail, last_used): (u16, u16)) {
        self.next_avail = next_avail;
        self.kicked_at = next_avail;
        self.last_used = last_used;
    }

    /// Offset (in shared memory) of the used ring.
    pub fn used_off(&self) -> usize {
        self.l.used
    }

    /// The used ring's index as the back end last wrote it.
    pub fn used_idx(&self) -> u16 {
        self.mem.u16_at(self.l.used + 2).load(Ordering::Acquire)
    }

    /// Writes a used element and moves the used index, as a back end does
    /// (tests play a back end that died half way with it).
    pub fn put_used_as_backend(&self, head: u16, len: u32) {
        let idx = self.used_idx();
        let e = self.l.used + 4 + 8 * (idx as usize % self.l.size as usize);
        self.mem.write(e, &u32::from(head).to_le_bytes());
        self.mem.write(e + 4, &len.to_le_bytes());
        fence(Ordering::Release);
        self.mem
            .u16_at(self.l.used + 2)
            .store(idx.wrapping_add(1), Ordering::Release);
    }
}

/// The virtio-blk config space (60 bytes), or nothing without CONFIG.
fn read_config(
    vu: &mut VuFrontend,
    protocol_features: VhostUserProtocolFeatures,
) -> Result<Vec<u8>, FrontendError> {
    if !protocol_features.contains(VhostUserProtocolFeatures::CONFIG) {
        return Ok(Vec::new());
    }
    let size = 60u32;
    let (_, payload) = vu.get_config(0, size, VhostUserConfigFlags::WRITABLE, &[0u8; 60])?;
    Ok(payload.to_vec())
}

/// What to negotiate and how to lay out memory.
#[derive(Clone, Debug)]
pub struct FrontendConfig {
    pub queues: usize,
    pub queue_size: u16,
    /// Slots per queue (requests in flight at most); ≤ queue_size / 3.
    pub slots: usize,
    /// Data buffer per slot.
    pub buf_bytes: usize,
    pub event_idx: bool,
    /// Set up the back-end request channel (BACKEND_REQ) when offered, as
    /// QEMU does, so the back end can send config change notifications.
    pub backend_req: bool,
}

/// Counts the back end's config change notifications.
#[derive(Default)]
pub struct ConfigChanges(std::sync::atomic::AtomicU64);

impl ConfigChanges {
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

impl VhostUserFrontendReqHandler for ConfigChanges {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.0.fetch_add(1, Ordering::AcqRel);
        Ok(0)
    }
}

/// A connected, negotiated vhost-user-blk front end.
pub struct Frontend {
    vu: VuFrontend,
    pub mem: SharedMem,
    layouts: Vec<Layout>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    pub features: u64,
    pub protocol_features: VhostUserProtocolFeatures,
    pub backend_queues: u64,
    pub config_space: Vec<u8>,
    event_idx: bool,
    backend_req: Option<(
        FrontendReqHandler<ConfigChanges>,
        std::sync::Arc<ConfigChanges>,
    )>,
    cfg: FrontendConfig,
    /// The inflight buffer (INFLIGHT_SHMFD), kept across reconnects as QEMU does.
    inflight: Option<(VhostUserInflight, std::fs::File)>,
}

/// What a reconnecting front end keeps: guest memory, rings, eventfds and
/// the inflight buffer.
struct Kept {
    mem: SharedMem,
    layouts: Vec<Layout>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    inflight: Option<(VhostUserInflight, std::fs::File)>,
}

impl Frontend {
    /// Connects to `socket` and sets up `cfg.queues` queues.
    pub fn connect(socket: &Path, cfg: &FrontendConfig) -> Result<Self, FrontendError> {
        Self::connect_inner(socket, cfg, false, None, std::time::Duration::ZERO)
    }

    /// Like [`Self::connect`], and asks for an inflight buffer
    /// (INFLIGHT_SHMFD, GET then SET_INFLIGHT_FD) as QEMU's vhost-user-blk does.
    pub fn connect_with_inflight(
        socket: &Path,
        cfg: &FrontendConfig,
    ) -> Result<Self, FrontendError> {
        Self::connect_inner(socket, cfg, true, None, std::time::Duration::ZERO)
    }

    /// Connects again (to a restarted back end) with the same memory, rings
    /// and inflight buffer, as QEMU's reconnect does after the back end died:
    /// each ring restarts at the used index found in memory. Retries for up
    /// to `timeout` while nothing listens on `socket` yet.
    pub fn reconnect(
        self,
        socket: &Path,
        timeout: std::time::Duration,
    ) -> Result<Self, FrontendError> {
        let cfg = self.cfg.clone();
        let want_inflight = self.inflight.is_some();
        let kept = Kept {
            mem: self.mem,
            layouts: self.layouts,
            kicks: self.kicks,
            calls: self.calls,
            inflight: self.inflight,
        };
        drop(self.vu);
        drop(self.backend_req);
        Self::connect_inner(socket, &cfg, want_inflight, Some(kept), timeout)
    }

    /// Starts dirty logging as QEMU does when a migration starts: a log of
    /// one bit per 4 KiB guest page from guest address 0 (SET_LOG_BASE),
    /// then the features again with VHOST_F_LOG_ALL. Returns the log; read
    /// it with [`page_dirty`].
    pub fn start_dirty_log(&mut self) -> Result<SharedMem, FrontendError> {
        if !self
            .protocol_features
            .contains(VhostUserProtocolFeatures::LOG_SHMFD)
        {
            return Err(FrontendError::Protocol(
                "back end does not offer LOG_SHMFD".into(),
            ));
        }
        let pages = (GUEST_BASE + self.mem.len as u64).div_ceil(DIRTY_PAGE_BYTES);
        let bytes = (pages.div_ceil(8) as usize).next_multiple_of(4096);
        let log = SharedMem::new(bytes)?;
        self.vu.set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: bytes as u64,
                mmap_offset: 0,
                mmap_handle: log.fd.as_raw_fd(),
            }),
        )?;
        self.features |= VhostUserVirtioFeatures::LOG_ALL.bits();
        self.vu.set_features(self.features)?;
        Ok(log)
    }

    /// The inflight buffer the back end gave (None without INFLIGHT_SHMFD).
    pub fn inflight(&self) -> Option<&(VhostUserInflight, std::fs::File)> {
        self.inflight.as_ref()
    }

    fn connect_inner(
        socket: &Path,
        cfg: &FrontendConfig,
        want_inflight: bool,
        kept: Option<Kept>,
        timeout: std::time::Duration,
    ) -> Result<Self, FrontendError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut vu = loop {
            match VuFrontend::connect(socket, cfg.queues as u64) {
                Ok(vu) => break vu,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => return Err(e.into()),
            }
        };
        vu.set_owner()?;
        let offered = vu.get_features()?;
        // LOG_ALL only while migrating (`start_dirty_log`), as QEMU does.
        let mut want = offered
            & !(1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            & !VhostUserVirtioFeatures::LOG_ALL.bits();
        if !cfg.event_idx {
            want &= !(1u64 << VIRTIO_RING_F_EVENT_IDX);
        }
        vu.set_features(want)?;
        let mut protocol_features = VhostUserProtocolFeatures::empty();
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let pf = vu.get_protocol_features()?;
            let mut wanted = VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK;
            if cfg.backend_req {
                wanted |= VhostUserProtocolFeatures::BACKEND_REQ;
            }
            if want_inflight {
                wanted |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
            }
            wanted |= VhostUserProtocolFeatures::LOG_SHMFD;
            protocol_features = pf & wanted;
            vu.set_protocol_features(protocol_features)?;
            if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Like QEMU: every request waits for the back end's verdict.
                vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let backend_queues = if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            vu.get_queue_num()?
        } else {
            1
        };
        if (cfg.queues as u64) > backend_queues {
            return Err(FrontendError::Protocol(format!(
                "back end offers {backend_queues} queues, {} wanted",
                cfg.queues
            )));
        }
        let mut backend_req = None;
        if protocol_features.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            let changes = std::sync::Arc::new(ConfigChanges::default());
            let mut handler = FrontendReqHandler::new(changes.clone())?;
            handler.set_reply_ack_flag(
                protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK),
            );
            // The back end gets the other end of the handler's socket pair.
            vu.set_backend_request_fd(&handler.get_tx_raw_fd())?;
            backend_req = Some((handler, changes));
        }
        let config_space = read_config(&mut vu, protocol_features)?;
        let event_idx = want & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;

        let kept = match kept {
            Some(k) => k,
            None => Self::lay_out(cfg)?,
        };
        let Kept {
            mem,
            layouts,
            kicks,
            calls,
            mut inflight,
        } = kept;
        if protocol_features.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            if inflight.is_none() {
                let ask = VhostUserInflight::new(0, 0, cfg.queues as u16, cfg.queue_size);
                inflight = Some(vu.get_inflight_fd(&ask)?);
            }
            if let Some((info, file)) = &inflight {
                vu.set_inflight_fd(info, file.as_raw_fd())?;
            }
        } else if want_inflight {
            return Err(FrontendError::Protocol(
                "back end does not offer INFLIGHT_SHMFD".into(),
            ));
        }
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: GUEST_BASE,
            memory_size: mem.len as u64,
            userspace_addr: mem.ptr as u64,
            mmap_offset: 0,
            mmap_handle: mem.fd.as_raw_fd(),
        };
        vu.set_mem_table(&[region])?;
        for (q, l) in layouts.iter().enumerate() {
            vu.set_vring_num(q, l.size)?;
            vu.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: l.size,
                    queue_size: l.size,
                    flags: 0,
                    desc_table_addr: mem.ptr as u64 + l.desc as u64,
                    used_ring_addr: mem.ptr as u64 + l.used as u64,
                    avail_ring_addr: mem.ptr as u64 + l.avail as u64,
                    log_addr: None,
                },
            )?;
            // A new ring starts at 0; a kept one at its used index (what
            // QEMU restores when the back end died without GET_VRING_BASE).
            let base = mem.u16_at(l.used + 2).load(Ordering::Acquire);
            vu.set_vring_base(q, base)?;
            vu.set_vring_call(q, &calls[q])?;
            vu.set_vring_kick(q, &kicks[q])?;
            if protocol_features.contains(VhostUserProtocolFeatures::MQ)
                || offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
            {
                vu.set_vring_enable(q, true)?;
            }
        }
        Ok(Frontend {
            vu,
            mem,
            layouts,
            kicks,
            calls,
            features: want,
            protocol_features,
            backend_queues,
            config_space,
            event_idx,
            backend_req,
            cfg: cfg.clone(),
            inflight,
        })
    }

    /// Fresh memory, ring layout and eventfds for `cfg`.
    fn lay_out(cfg: &FrontendConfig) -> Result<Kept, FrontendError> {
        // Lay out rings then slots, page aligned.
        let qs = cfg.queue_size as usize;
        assert!(
            cfg.slots * 3 <= qs,
            "slots must fit in the ring (3 descriptors each)"
        );
        let page = 4096;
        let ring_bytes =
            (16 * qs + 6 + 2 * qs).next_multiple_of(page) + (6 + 8 * qs).next_multiple_of(page);
        let slot_bytes = 4096 + cfg.buf_bytes.next_multiple_of(page);
        let per_queue = ring_bytes + cfg.slots * slot_bytes;
        let total = (per_queue * cfg.queues).next_multiple_of(2 << 20);
        let mem = SharedMem::new(total)?;
        let mut layouts = Vec::new();
        let mut kicks = Vec::new();
        let mut calls = Vec::new();
        for q in 0..cfg.queues {
            let base = q * per_queue;
            let desc = base;
            let avail = desc + 16 * qs;
            let used = (avail + 6 + 2 * qs).next_multiple_of(page);
            layouts.push(Layout {
                size: cfg.queue_size,
                desc,
                avail,
                used,
                slots: cfg.slots,
                slot_base: base + ring_bytes,
                slot_bytes,
                buf_bytes: cfg.buf_bytes,
            });
            calls.push(EventFd::new(libc::EFD_NONBLOCK)?);
            kicks.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(Kept {
            mem,
            layouts,
            kicks,
            calls,
            inflight: None,
        })
    }

    /// Waits up to `timeout` for one message on the back-end request
    /// channel and handles it; returns the config changes counted so far.
    pub fn wait_config_change(
        &mut self,
        timeout: std::time::Duration,
    ) -> Result<u64, FrontendError> {
        let Some((handler, changes)) = self.backend_req.as_mut() else {
            return Err(FrontendError::Protocol(
                "no back-end request channel (BACKEND_REQ not negotiated)".into(),
            ));
        };
        let mut pfd = libc::pollfd {
            fd: handler.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        if rc > 0 {
            handler.handle_request()?;
        }
        Ok(changes.count())
    }

    /// Reads the config space again (as QEMU does after a config change).
    pub fn refresh_config(&mut self) -> Result<(), FrontendError> {
        self.config_space = read_config(&mut self.vu, self.protocol_features)?;
        Ok(())
    }

    /// Driver handles for every queue (each to be used by one thread).
    pub fn queues(&self) -> Result<Vec<DriverQueue<'_>>, FrontendError> {
        let mut out = Vec::new();
        for (i, l) in self.layouts.iter().enumerate() {
            out.push(DriverQueue {
                mem: &self.mem,
                l: *l,
                index: i,
                kick: self.kicks[i].try_clone()?,
                call: self.calls[i].try_clone()?,
                event_idx: self.event_idx,
                next_avail: 0,
                kicked_at: 0,
                last_used: 0,
                kicks: 0,
            });
        }
        Ok(out)
    }

    /// Stops queue `q` and returns the back end's next avail index.
    pub fn stop_queue(&mut self, q: usize) -> Result<u32, FrontendError> {
        Ok(self.vu.get_vring_base(q)?)
    }

    /// The raw vhost-user front end, for protocol-level tests.
    pub fn vhost_user(&mut self) -> &mut VuFrontend {
        &mut self.vu
    }

    /// Capacity from the config space, in 512-byte sectors.
    pub fn capacity_sectors(&self) -> Option<u64> {
        let b = self.config_space.get(0..8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    /// A u32 field of the config space at byte `off`.
    pub fn config_u32(&self, off: usize) -> Option<u32> {
        let b = self.config_space.get(off..off + 4)?;
        Some(u32::from_le_bytes(b.try_into().ok()?))
    }

    /// A u16 field of the config space at byte `off`.
    pub fn config_u16(&self, off: usize) -> Option<u16> {
        let b = self.config_space.get(off..off + 2)?;
        Some(u16::from_le_bytes(b.try_into().ok()?))
    }
}
