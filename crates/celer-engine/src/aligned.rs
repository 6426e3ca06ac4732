//! Block-aligned buffers for O_DIRECT I/O, allocated at start-up: one by
//! one on the heap, or carved from a [`BufPool`] whose memory is on 2 MiB
//! pages when the machine has them reserved (`vm.nr_hugepages`), on 4 KiB
//! pages otherwise.
//!
//! Why huge pages: the buffers of a shard are touched on every I/O (the
//! node's payloads, the engine's journal blocks); on 2 MiB pages a shard's
//! few MiB of them take 2-3 TLB entries instead of ~1 000, and the kernel
//! pins each in one piece when it maps it for the device.

use std::sync::Arc;

use crate::layout::BLOCK_SIZE;

/// 2 MiB: the huge page size this pool asks for (x86-64 and arm64 default).
pub const HUGE_PAGE_BYTES: usize = 2 << 20;

/// Which pages a pool's memory is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    /// 2 MiB huge pages (from the kernel's reserved pool).
    Huge2M,
    /// Ordinary 4 KiB pages (no huge pages reserved or free, or not asked).
    Base4K,
}

impl PageSize {
    pub fn name(self) -> &'static str {
        match self {
            PageSize::Huge2M => "2 MiB huge pages",
            PageSize::Base4K => "4 KiB pages",
        }
    }
}

/// One anonymous mapping that pooled buffers point into; unmapped when the
/// pool and every buffer carved from it are gone.
struct Region {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; each buffer carved from it is a
// disjoint range owned by one `AlignedBuf`.
unsafe impl Send for Region {}
// SAFETY: as above: the region itself is never read or written through.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: mapped in `BufPool::new` with this length.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Memory for a shard's fixed buffers, mapped once. [`BufPool::take`]
/// carves zeroed, block-aligned buffers from it; when it is used up, or
/// could not be mapped at all, buffers come from the heap.
pub struct BufPool {
    region: Option<Arc<Region>>,
    used: usize,
    pages: PageSize,
}

impl BufPool {
    /// A pool of `bytes`, on 2 MiB pages if `hugepages` and the kernel can
    /// give that many (the mapping is refused, not faulted later, when the
    /// reserve is short: hugetlb mappings reserve their pages up front),
    /// else on 4 KiB pages.
    pub fn new(bytes: usize, hugepages: bool) -> BufPool {
        let bytes = bytes.max(BLOCK_SIZE).next_multiple_of(BLOCK_SIZE);
        if hugepages {
            let len = bytes.next_multiple_of(HUGE_PAGE_BYTES);
            // Faulted in now: no page fault on the I/O path later.
            if let Some(r) = map(len, libc::MAP_HUGETLB | MAP_HUGE_2MB | libc::MAP_POPULATE) {
                return BufPool {
                    region: Some(Arc::new(r)),
                    used: 0,
                    pages: PageSize::Huge2M,
                };
            }
        }
        BufPool {
            region: map(bytes, 0).map(Arc::new),
            used: 0,
            pages: PageSize::Base4K,
        }
    }

    /// Which pages the pool is on.
    pub fn pages(&self) -> PageSize {
        self.pages
    }

    /// Bytes mapped for the pool (0 if mapping failed and buffers come from
    /// the heap).
    pub fn bytes(&self) -> usize {
        self.region.as_ref().map_or(0, |r| r.len)
    }

    /// A zeroed buffer of `blocks` blocks, from the pool while it lasts.
    pub fn take(&mut self, blocks: usize) -> AlignedBuf {
        let len = blocks.max(1) * BLOCK_SIZE;
        match &self.region {
            Some(r) if r.len - self.used >= len => {
                // SAFETY: `used + len <= r.len`: inside the mapping.
                let ptr = unsafe { r.ptr.add(self.used) };
                self.used += len;
                AlignedBuf {
                    ptr,
                    len,
                    region: Some(Arc::clone(r)),
                }
            }
            _ => AlignedBuf::new(blocks),
        }
    }
}

/// `MAP_HUGE_2MB` (21 << MAP_HUGE_SHIFT): the page size a hugetlb mapping
/// asks for, in case the machine's default huge page is another size.
const MAP_HUGE_2MB: libc::c_int = 21 << 26;

fn map(len: usize, flags: libc::c_int) -> Option<Region> {
    // SAFETY: a fresh private anonymous mapping; checked.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return None;
    }
    Some(Region {
        ptr: ptr.cast(),
        len,
    })
}

/// A zeroed buffer aligned to 4096 bytes, a whole number of blocks long.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    /// The pool mapping it was carved from; `None`: a heap allocation.
    region: Option<Arc<Region>>,
}

// SAFETY: the buffer is uniquely owned memory (heap, or a disjoint range of
// a pool mapping kept alive by the Arc).
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(blocks: usize) -> AlignedBuf {
        let len = blocks.max(1) * BLOCK_SIZE;
        let layout =
            std::alloc::Layout::from_size_align(len, BLOCK_SIZE).expect("block-aligned layout");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf {
            ptr,
            len,
            region: None,
        }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }
    /// Whether it was carved from a pool (not allocated alone).
    pub fn pooled(&self) -> bool {
        self.region.is_some()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.region.is_some() {
            // Pool memory: the region's Arc unmaps it with the last user.
            return;
        }
        let layout = std::alloc::Layout::from_size_align(self.len, BLOCK_SIZE)
            .expect("block-aligned layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_buffers_are_disjoint_zeroed_and_outlive_the_pool() {
        let mut pool = BufPool::new(3 * BLOCK_SIZE, false);
        assert_eq!(pool.pages(), PageSize::Base4K);
        assert_eq!(pool.bytes(), 3 * BLOCK_SIZE);
        let mut a = pool.take(1);
        let mut b = pool.take(2);
        // Used up: the next one comes from the heap.
        let c = pool.take(1);
        assert!(a.pooled() && b.pooled() && !c.pooled());
        assert_eq!((a.len(), b.len()), (BLOCK_SIZE, 2 * BLOCK_SIZE));
        assert!(a.iter().chain(b.iter()).all(|&x| x == 0));
        assert_eq!(a.as_ptr() as usize % BLOCK_SIZE, 0);
        assert_eq!(b.as_ptr() as usize, a.as_ptr() as usize + BLOCK_SIZE);
        drop(pool);
        a.fill(1);
        b.fill(2);
        assert!(a.iter().all(|&x| x == 1) && b.iter().all(|&x| x == 2));
    }
}
