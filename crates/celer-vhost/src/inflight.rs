//! Inflight I/O tracking (vhost-user `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`,
//! split virtqueues; QEMU docs/interop/vhost-user.rst "Inflight I/O
//! tracking"): the back end records in a buffer shared with the front end
//! which descriptor heads it has taken off each avail ring and not yet put
//! on the used ring. The front end (QEMU) keeps the buffer across back-end
//! restarts; a restarted back end finds there what its predecessor had in
//! flight and resubmits it, exactly once, in the order it was taken.
//!
//! Layout per queue (little endian, each queue `queue_region_bytes` apart):
//! `features u64, version u16, desc_num u16, last_batch_head u16,
//! used_idx u16`, then `desc_num` entries of `inflight u8, padding [u8; 5],
//! next u16, counter u64`.
//!
//! Protocol (as libvhost-user): `mark` when a head is popped (counter, then
//! inflight = 1); to complete, `pre_put` (last_batch_head = head), the used
//! ring write (element, then used idx), `post_put` (inflight = 0, then
//! used_idx = the ring's new used idx). A crash between the used-idx write
//! and the clear leaves the buffer's used_idx one behind the ring's: `recover`
//! then clears `last_batch_head`, which the guest already has.
//!
//! Invariants: every access is an atomic load or store inside the mapping
//! (bounds checked when a queue view is made); the buffer comes from the
//! front end, so nothing read from it is trusted beyond that (heads are
//! bounded by `desc_num`, which must equal the ring size).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Each queue's region is aligned to a cache line (as libvhost-user).
pub const INFLIGHT_ALIGNMENT_BYTES: u64 = 64;
/// Version written into a fresh region.
pub const INFLIGHT_VERSION: u16 = 1;
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const HEADER_BYTES: usize = 16;
const DESC_STATE_BYTES: usize = 16;
const DESC_OFF_COUNTER: usize = 8;

/// Bytes of one queue's region for a ring of `queue_size` entries; the same
/// formula as libvhost-user's `vu_inflight_queue_size`, so a front end may
/// hand the buffer to either implementation.
pub fn queue_region_bytes(queue_size: u16) -> u64 {
    (DESC_STATE_BYTES as u64 * u64::from(queue_size) + 2).next_multiple_of(INFLIGHT_ALIGNMENT_BYTES)
}

/// A shared mapping of the inflight buffer.
#[derive(Debug)]
pub struct InflightMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics;
// each queue's part is written by that queue's worker alone.
unsafe impl Send for InflightMap {}
// SAFETY: as above.
unsafe impl Sync for InflightMap {}

impl InflightMap {
    /// Creates a zeroed, size-sealed memfd for `num_queues` queues of
    /// `queue_size` entries; returns it and its size in bytes.
    pub fn create(num_queues: u16, queue_size: u16) -> std::io::Result<(File, u64)> {
        let size = queue_region_bytes(queue_size) * u64::from(num_queues);
        // SAFETY: memfd_create takes a NUL-terminated name and flags only.
        let fd = unsafe {
            libc::memfd_create(
                c"celer-vhost-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        // SAFETY: fcntl on our own memfd with a plain integer argument.
        let rc = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((file, size))
    }

    /// Maps `len` bytes of `file` at `offset` (read-write, shared).
    pub fn map(file: &File, offset: u64, len: u64) -> std::io::Result<Arc<Self>> {
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string());
        let len = usize::try_from(len).map_err(|_| bad("inflight buffer size does not fit"))?;
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| bad("inflight buffer offset does not fit"))?;
        if len == 0 {
            return Err(bad("inflight buffer is empty"));
        }
        // SAFETY: a new shared mapping (no MAP_FIXED) of a file we were given;
        // checked for MAP_FAILED below. Accesses past the file's end would
        // fault, so the caller checks the size against the file's.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Arc::new(InflightMap {
            ptr: ptr.cast(),
            len,
        }))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for InflightMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// What `recover` found in a queue's region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The region was fresh (never used): nothing to resubmit.
    pub fresh: bool,
    /// A head that was on the used ring but still marked in flight (the
    /// back end died between the two writes): cleared, not resubmitted.
    pub used_not_cleared: Option<u16>,
    /// Heads to resubmit (written to the caller's list, counter order).
    pub resubmit: usize,
}

/// One queue's view of the inflight buffer; owned by that queue's worker.
#[derive(Debug)]
pub struct QueueInflight {
    map: Arc<InflightMap>,
    base: usize,
    desc_num: u16,
    /// Counter given to the next head taken off the avail ring.
    counter: u64,
}

impl QueueInflight {
    /// The view of queue `index` in a buffer laid out for rings of
    /// `queue_size`; `None` if it does not fit in the mapping.
    pub fn new(map: Arc<InflightMap>, index: u16, queue_size: u16) -> Option<Self> {
        let stride = usize::try_from(queue_region_bytes(queue_size)).ok()?;
        let base = stride.checked_mul(usize::from(index))?;
        let end = base.checked_add(HEADER_BYTES + DESC_STATE_BYTES * usize::from(queue_size))?;
        if end > map.len || queue_size == 0 {
            return None;
        }
        let q = QueueInflight {
            map,
            base,
            desc_num: queue_size,
            counter: 0,
        };
        q.u16_at(OFF_DESC_NUM).store(queue_size, Ordering::Release);
        Some(q)
    }

    pub fn desc_num(&self) -> u16 {
        self.desc_num
    }

    fn ptr(&self, off: usize) -> *mut u8 {
        debug_assert!(self.base + off < self.map.len);
        // SAFETY: `new` checked that the whole queue region lies inside the
        // mapping; every offset used below is inside the queue region.
        unsafe { self.map.ptr.add(self.base + off) }
    }

    fn u8_at(&self, off: usize) -> &AtomicU8 {
        // SAFETY: inside the mapping (see `ptr`), which lives as long as `self`.
        unsafe { &*(self.ptr(off) as *const AtomicU8) }
    }

    fn u16_at(&self, off: usize) -> &AtomicU16 {
        // SAFETY: as `u8_at`; the mapping is page aligned, the region 64-byte
        // aligned, and every u16 field sits at an even offset.
        unsafe { &*(self.ptr(off) as *const AtomicU16) }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        // SAFETY: as `u16_at`; counters sit at 16·i + 24, a multiple of 8.
        unsafe { &*(self.ptr(off) as *const AtomicU64) }
    }

    fn desc_off(&self, head: u16) -> usize {
        HEADER_BYTES + DESC_STATE_BYTES * usize::from(head)
    }

    /// Whether `head` is marked in flight (`false` for a head out of range).
    pub fn is_inflight(&self, head: u16) -> bool {
        head < self.desc_num && self.u8_at(self.desc_off(head)).load(Ordering::Acquire) != 0
    }

    /// The counter recorded for `head`.
    pub fn counter_of(&self, head: u16) -> u64 {
        if head >= self.desc_num {
            return 0;
        }
        u64::from_le(
            self.u64_at(self.desc_off(head) + DESC_OFF_COUNTER)
                .load(Ordering::Acquire),
        )
    }

    /// `head` was taken off the avail ring.
    pub fn mark(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        let off = self.desc_off(head);
        self.u64_at(off + DESC_OFF_COUNTER)
            .store(self.counter.to_le(), Ordering::Release);
        self.counter += 1;
        self.u8_at(off).store(1, Ordering::Release);
    }

    /// Before `head` goes on the used ring.
    pub fn pre_put(&self, head: u16) {
        self.u16_at(OFF_LAST_BATCH_HEAD)
            .store(head.to_le(), Ordering::Release);
    }

    /// After `head` went on the used ring, whose used idx is now `used_idx`.
    pub fn post_put(&self, head: u16, used_idx: u16) {
        if head < self.desc_num {
            self.u8_at(self.desc_off(head)).store(0, Ordering::Release);
        }
        self.u16_at(OFF_USED_IDX)
            .store(used_idx.to_le(), Ordering::Release);
    }

    /// Reconciles the region with the ring, whose used idx is
    /// `ring_used_idx`, when the ring starts; writes the heads still in
    /// flight, with their counters, into `out` in counter order (oldest
    /// first) and continues counting after the newest. `out` is cleared
    /// first and never grows past its capacity (heads beyond it are left
    /// marked: a later start resubmits them).
    pub fn recover(&mut self, ring_used_idx: u16, out: &mut Vec<(u16, u64)>) -> Recovery {
        out.clear();
        let mut r = Recovery::default();
        let version = u16::from_le(self.u16_at(OFF_VERSION).load(Ordering::Acquire));
        if version == 0 {
            // Fresh buffer (zeroed by whoever made it): start tracking.
            self.u16_at(OFF_USED_IDX)
                .store(ring_used_idx.to_le(), Ordering::Release);
            self.u16_at(OFF_VERSION)
                .store(INFLIGHT_VERSION.to_le(), Ordering::Release);
            self.counter = 0;
            r.fresh = true;
            return r;
        }
        let region_used = u16::from_le(self.u16_at(OFF_USED_IDX).load(Ordering::Acquire));
        if region_used != ring_used_idx {
            let head = u16::from_le(self.u16_at(OFF_LAST_BATCH_HEAD).load(Ordering::Acquire));
            if self.is_inflight(head) {
                self.u8_at(self.desc_off(head)).store(0, Ordering::Release);
                r.used_not_cleared = Some(head);
            }
            self.u16_at(OFF_USED_IDX)
                .store(ring_used_idx.to_le(), Ordering::Release);
        }
        for head in 0..self.desc_num {
            if self.is_inflight(head) && out.len() < out.capacity() {
                out.push((head, self.counter_of(head)));
            }
        }
        out.sort_unstable_by_key(|&(_, counter)| counter);
        self.counter = out.last().map_or(0, |&(_, c)| c.wrapping_add(1));
        r.resubmit = out.len();
        r
    }

    /// Forgets every mark (the region does not match the ring).
    pub fn clear_all(&mut self) {
        for head in 0..self.desc_num {
            self.u8_at(self.desc_off(head)).store(0, Ordering::Release);
        }
    }
}

/// Walks the descriptor chain starting at `head` of a split ring (as
/// virtio-queue's `DescriptorChain`, whose constructor is private): follows
/// `next` at most `queue_size` times, enters one indirect table, and stops
/// at anything it cannot read. The parser bounds the chain's length.
pub struct ChainWalk<'m, M: GuestMemory + ?Sized> {
    mem: &'m M,
    table: GuestAddress,
    table_size: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    yielded_bytes: u32,
}

impl<'m, M: GuestMemory + ?Sized> ChainWalk<'m, M> {
    pub fn new(mem: &'m M, desc_table: GuestAddress, queue_size: u16, head: u16) -> Self {
        ChainWalk {
            mem,
            table: desc_table,
            table_size: queue_size,
            next: head,
            ttl: queue_size,
            indirect: false,
            yielded_bytes: 0,
        }
    }
}

impl<M: GuestMemory + ?Sized> Iterator for ChainWalk<'_, M> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.table_size {
                return None;
            }
            let addr = self
                .table
                .checked_add(u64::from(self.next) * DESC_STATE_BYTES as u64)?;
            let desc: Descriptor = self.mem.read_obj(addr).ok()?;
            if desc.refers_to_indirect_table() {
                // One level only, a whole number of descriptors, ≤ 65535 of them.
                if self.indirect || !desc.len().is_multiple_of(DESC_STATE_BYTES as u32) {
                    return None;
                }
                let n = u16::try_from(desc.len() / DESC_STATE_BYTES as u32).ok()?;
                self.table = desc.addr();
                self.table_size = n;
                self.ttl = n;
                self.next = 0;
                self.indirect = true;
                continue;
            }
            self.yielded_bytes = self.yielded_bytes.checked_add(desc.len())?;
            if desc.has_next() {
                self.next = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::GuestMemoryMmap;

    fn region(queues: u16, size: u16) -> (File, Arc<InflightMap>) {
        let (file, len) = InflightMap::create(queues, size).unwrap();
        let map = InflightMap::map(&file, 0, len).unwrap();
        (file, map)
    }

    #[test]
    fn region_size_matches_libvhost_user() {
        // ALIGN_UP(16 * n + 2, 64)
        assert_eq!(queue_region_bytes(256), 4160);
        assert_eq!(queue_region_bytes(128), 2112);
        assert_eq!(queue_region_bytes(1), 64);
        for n in [1u16, 2, 3, 5, 7, 255, 1024] {
            assert!(queue_region_bytes(n) >= (16 + 16 * n as u64));
        }
    }

    #[test]
    fn fresh_region_starts_tracking_then_recovers_in_counter_order() {
        let (_f, map) = region(2, 8);
        let mut q = QueueInflight::new(map.clone(), 1, 8).unwrap();
        let mut out = Vec::with_capacity(8);
        let r = q.recover(5, &mut out);
        assert!(r.fresh);
        // Take 4, 2, 6 (in that order), complete 2.
        for h in [4, 2, 6] {
            q.mark(h);
        }
        q.pre_put(2);
        q.post_put(2, 6);
        // A new back end on the same buffer.
        let mut q2 = QueueInflight::new(map.clone(), 1, 8).unwrap();
        let r = q2.recover(6, &mut out);
        assert_eq!(r.used_not_cleared, None);
        assert_eq!(out, vec![(4, 0), (6, 2)]);
        // New heads count after the newest.
        q2.mark(1);
        assert_eq!(q2.counter_of(1), 3);
        // Queue 0's region is untouched.
        let mut q0 = QueueInflight::new(map, 0, 8).unwrap();
        assert!(q0.recover(0, &mut out).fresh);
    }

    #[test]
    fn a_head_on_the_used_ring_but_not_cleared_is_not_resubmitted() {
        let (_f, map) = region(1, 8);
        let mut q = QueueInflight::new(map.clone(), 0, 8).unwrap();
        let mut out = Vec::with_capacity(8);
        q.recover(0, &mut out);
        q.mark(3);
        q.mark(5);
        // Crash after the used ring got head 5 (used idx 0 -> 1), before the clear.
        q.pre_put(5);
        let mut q2 = QueueInflight::new(map.clone(), 0, 8).unwrap();
        let r = q2.recover(1, &mut out);
        assert_eq!(r.used_not_cleared, Some(5));
        assert_eq!(out, vec![(3, 0)]);
        // Same buffer, ring did not advance: head 5 would have been resubmitted.
        let (_f, map) = region(1, 8);
        let mut q = QueueInflight::new(map.clone(), 0, 8).unwrap();
        q.recover(0, &mut out);
        q.mark(3);
        q.mark(5);
        q.pre_put(5);
        let r = QueueInflight::new(map, 0, 8).unwrap().recover(0, &mut out);
        assert_eq!(r.used_not_cleared, None);
        assert_eq!(out, vec![(3, 0), (5, 1)]);
    }

    #[test]
    fn views_outside_the_mapping_are_refused() {
        let (_f, map) = region(2, 8);
        assert!(QueueInflight::new(map.clone(), 2, 8).is_none());
        assert!(QueueInflight::new(map.clone(), 0, 1024).is_none());
        assert!(QueueInflight::new(map, 0, 0).is_none());
    }

    #[test]
    fn chain_walk_matches_the_queue_s_own_chains() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let descs = [
            Descriptor::new(0x1000, 16, 1, 1),
            Descriptor::new(0x2000, 4096, 1 | 2, 2),
            Descriptor::new(0x3000, 1, 2, 0),
        ];
        vq.add_desc_chains(&descs.map(RawDescriptor::from), 0)
            .unwrap();
        let mut queue: virtio_queue::Queue = vq.create_queue().unwrap();
        let chain = queue.pop_descriptor_chain(&mem).unwrap();
        let head = chain.head_index();
        let want: Vec<_> = chain.map(|d| (d.addr().0, d.len(), d.flags())).collect();
        let got: Vec<_> = ChainWalk::new(&mem, GuestAddress(queue.desc_table()), 16, head)
            .map(|d| (d.addr().0, d.len(), d.flags()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(got.len(), 3);
        // A loop ends after queue_size descriptors.
        let looped = [Descriptor::new(0x1000, 16, 1, 0)];
        let vq = MockSplitQueue::new(&mem, 4);
        vq.add_desc_chains(&looped.map(RawDescriptor::from), 0)
            .unwrap();
        let queue: virtio_queue::Queue = vq.create_queue().unwrap();
        assert_eq!(
            ChainWalk::new(&mem, GuestAddress(queue.desc_table()), 4, 0).count(),
            4
        );
        // A head outside the table yields nothing.
        assert_eq!(
            ChainWalk::new(&mem, GuestAddress(queue.desc_table()), 4, 4).count(),
            0
        );
    }

    #[test]
    fn chain_walk_follows_one_indirect_table() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let table = GuestAddress(0x8000);
        let inner = [
            Descriptor::new(0x1000, 16, 1, 1),
            Descriptor::new(0x2000, 512, 1, 2),
            Descriptor::new(0x3000, 1, 2, 0),
        ];
        for (i, d) in inner.iter().enumerate() {
            mem.write_obj(*d, table.unchecked_add(16 * i as u64))
                .unwrap();
        }
        let desc_table = GuestAddress(0x10000);
        mem.write_obj(Descriptor::new(table.0, 48, 4, 0), desc_table)
            .unwrap();
        let got: Vec<_> = ChainWalk::new(&mem, desc_table, 8, 0)
            .map(|d| d.addr().0)
            .collect();
        assert_eq!(got, vec![0x1000, 0x2000, 0x3000]);
        // An indirect descriptor inside an indirect table ends the chain.
        mem.write_obj(Descriptor::new(table.0, 48, 4, 0), table)
            .unwrap();
        assert_eq!(ChainWalk::new(&mem, desc_table, 8, 0).count(), 0);
    }
}
