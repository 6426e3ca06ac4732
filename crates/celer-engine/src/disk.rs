//! Where an engine keeps its bytes. The shards are generic over it: a file
//! or block device driven through io_uring in production ([`FileDisk`]), an
//! in-memory disk that models latency, reordering and what survives a crash
//! in the simulator (`celer-sim`). Static dispatch: the shard's I/O calls
//! compile to the io_uring code they always were.
//!
//! Two faces:
//! - synchronous reads and writes for format, recovery and rebuild, which
//!   run before any shard does ([`Disk`]);
//! - one asynchronous queue per shard ([`DiskQueue`]): I/O is pushed with a
//!   `user_data`, submitted, and completes as `(user_data, result)` pairs in
//!   any order, as io_uring CQEs do.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use io_uring::{opcode, types, IoUring};

use crate::EngineError;

/// The memory an I/O reads into or writes from. Raw pointers: the shard
/// keeps them valid until the I/O's completion has been reaped.
#[derive(Clone, Copy, Debug)]
pub enum IoBufs {
    One { addr: *mut u8, len: u32 },
    Many { iov: *const libc::iovec, count: u32 },
}

impl IoBufs {
    /// `iov` as one buffer when it has one entry (cheaper in the kernel).
    #[inline]
    pub fn of(iov: &[libc::iovec]) -> IoBufs {
        match iov {
            [one] => IoBufs::One {
                addr: one.iov_base as *mut u8,
                len: one.iov_len as u32,
            },
            _ => IoBufs::Many {
                iov: iov.as_ptr(),
                count: iov.len() as u32,
            },
        }
    }

    /// The pieces, in order.
    ///
    /// # Safety
    /// The pointers must still be valid (before the I/O completed).
    pub unsafe fn pieces(&self) -> impl Iterator<Item = (*mut u8, usize)> + '_ {
        let (one, many): (Option<(*mut u8, usize)>, &[libc::iovec]) = match *self {
            IoBufs::One { addr, len } => (Some((addr, len as usize)), &[]),
            IoBufs::Many { iov, count } => (
                None,
                // SAFETY: the caller keeps the iovec array valid.
                unsafe { std::slice::from_raw_parts(iov, count as usize) },
            ),
        };
        one.into_iter()
            .chain(many.iter().map(|v| (v.iov_base as *mut u8, v.iov_len)))
    }
}

/// One asynchronous disk operation.
#[derive(Clone, Copy, Debug)]
pub enum DiskIo {
    Read {
        bufs: IoBufs,
        offset: u64,
    },
    /// With `dsync`, durable when it completes (RWF_DSYNC); otherwise once
    /// a later `Fsync`, issued after it completed, completes.
    Write {
        bufs: IoBufs,
        offset: u64,
        dsync: bool,
    },
    /// fdatasync: every write completed before it was issued is durable
    /// when it completes.
    Fsync,
}

/// A shard's asynchronous I/O queue (an io_uring in production).
pub trait DiskQueue: Send {
    /// Queues `io`; it reaches the disk at the next `submit`. Never fails:
    /// the shard bounds its I/O in flight within the queue's capacity.
    ///
    /// # Safety
    /// Every buffer and iovec `io` points to stays valid, unmoved and
    /// unused by anyone else until its completion has been returned by
    /// `next_completion`.
    unsafe fn push(&mut self, io: &DiskIo, user_data: u64);
    /// Hands queued I/O to the disk and waits until at least `want`
    /// completions are ready (0: do not wait). EINTR is retried here;
    /// EBUSY (completion queue full) is returned for the caller to reap.
    fn submit(&mut self, want: usize) -> std::io::Result<()>;
    /// The next completion: (user_data, result: bytes or -errno).
    fn next_completion(&mut self) -> Option<(u64, i32)>;
    /// A nonblocking eventfd readable when completions may be ready, if the
    /// queue was made with one.
    fn completion_fd(&self) -> Option<RawFd>;
}

/// A disk an engine can live on.
pub trait Disk: Send + Sync + 'static {
    type Queue: DiskQueue;
    /// What error messages call it (its path).
    fn name(&self) -> &str;
    fn size(&self) -> std::io::Result<u64>;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// Written, not yet durable: `sync` makes it so.
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    /// fdatasync.
    fn sync(&self) -> std::io::Result<()>;
    /// A fresh queue for one shard; with `completion_eventfd`, one whose
    /// `completion_fd` an owner can sleep on.
    fn queue(&self, completion_eventfd: bool) -> Result<Self::Queue, EngineError>;
    /// Direct I/O may start at any multiple of 512 bytes of the disk and of
    /// memory, and be any multiple of 512 long (not only of 4 KiB): the
    /// compact journal entries of format 3 (4.5 KiB) need that.
    fn dio_512(&self) -> bool;
}

/// A file or block device opened with O_DIRECT.
pub struct FileDisk {
    file: File,
    name: String,
}

impl FileDisk {
    pub fn new(file: File, path: &Path) -> FileDisk {
        FileDisk {
            file,
            name: path.display().to_string(),
        }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(&self.name)
    }
}

impl Disk for FileDisk {
    type Queue = UringQueue;

    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> std::io::Result<u64> {
        use std::io::{Seek, SeekFrom};
        let mut f = &self.file;
        f.seek(SeekFrom::End(0))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    fn queue(&self, completion_eventfd: bool) -> Result<UringQueue, EngineError> {
        UringQueue::new(self.file.as_raw_fd(), completion_eventfd)
    }

    /// From `statx(STATX_DIOALIGN)` (Linux 6.1+, ext4, xfs, block devices):
    /// a disk with 4 KiB logical sectors says 4096. Unknown: no.
    fn dio_512(&self) -> bool {
        // SAFETY: statx is plain integers; all-zero is a valid value.
        let mut st: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: a valid fd, an empty path with AT_EMPTY_PATH, and a
        // statx we own.
        let rc = unsafe {
            libc::statx(
                self.file.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                libc::STATX_DIOALIGN,
                &mut st,
            )
        };
        rc == 0
            && st.stx_mask & libc::STATX_DIOALIGN != 0
            && (1..=512).contains(&st.stx_dio_offset_align)
            && (1..=512).contains(&st.stx_dio_mem_align)
    }
}

/// Completion queue entries: bounds the I/O in flight so the CQ never
/// overflows (the shard keeps `CQ_ENTRIES - 64` at most in flight).
pub(crate) const CQ_ENTRIES: u32 = 16384;

/// An io_uring on one file descriptor (owned by the `FileDisk`, which the
/// shard keeps alive as long as the queue).
pub struct UringQueue {
    ring: IoUring,
    fd: RawFd,
    completion_fd: Option<OwnedFd>,
}

impl UringQueue {
    fn new(fd: RawFd, completion_eventfd: bool) -> Result<UringQueue, EngineError> {
        let os = |what: &'static str, e: std::io::Error| EngineError::Os {
            path: "io_uring".into(),
            what,
            errno_text: e.to_string(),
        };
        let mut builder = IoUring::builder();
        builder.setup_cqsize(CQ_ENTRIES);
        if !completion_eventfd {
            // No inter-processor interrupt per completion: the owning thread
            // runs completion work when it enters the kernel anyway. (Not
            // with an eventfd: an owner asleep in epoll must be woken.)
            builder.setup_coop_taskrun();
        }
        let ring = builder.build(512).map_err(|e| os("io_uring_setup", e))?;
        let completion_fd = if completion_eventfd {
            // SAFETY: plain syscall; the result is checked before use.
            let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if efd < 0 {
                return Err(EngineError::Os {
                    path: "eventfd".into(),
                    what: "eventfd",
                    errno_text: std::io::Error::last_os_error().to_string(),
                });
            }
            // SAFETY: efd is a fresh descriptor owned by nobody else.
            let efd = unsafe { OwnedFd::from_raw_fd(efd) };
            ring.submitter()
                .register_eventfd(efd.as_raw_fd())
                .map_err(|e| os("register eventfd", e))?;
            Some(efd)
        } else {
            None
        };
        Ok(UringQueue {
            ring,
            fd,
            completion_fd,
        })
    }
}

// `#[inline]` on the per-I/O methods: the shards are generic, so they are
// compiled in the crates that drive them (celer-node), and without it these
// calls would not be inlined across the crate boundary.
impl DiskQueue for UringQueue {
    #[inline]
    unsafe fn push(&mut self, io: &DiskIo, user_data: u64) {
        let fd = types::Fd(self.fd);
        let sqe = match *io {
            DiskIo::Read {
                bufs: IoBufs::One { addr, len },
                offset,
            } => opcode::Read::new(fd, addr, len).offset(offset).build(),
            DiskIo::Read {
                bufs: IoBufs::Many { iov, count },
                offset,
            } => opcode::Readv::new(fd, iov, count).offset(offset).build(),
            DiskIo::Write {
                bufs: IoBufs::One { addr, len },
                offset,
                dsync,
            } => opcode::Write::new(fd, addr, len)
                .offset(offset)
                .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
            DiskIo::Write {
                bufs: IoBufs::Many { iov, count },
                offset,
                dsync,
            } => opcode::Writev::new(fd, iov, count)
                .offset(offset)
                .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
            DiskIo::Fsync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(user_data);
        loop {
            // SAFETY: the caller keeps every buffer and iovec valid until
            // the CQE has been reaped (this function's contract).
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                break;
            }
            // Submission queue full: hand it to the kernel. The CQ budget
            // keeps completions from overflowing, so this cannot fail with
            // EBUSY.
            match self.ring.submit() {
                Ok(_) => {}
                // Interrupted, or the kernel is short of memory: try again.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {
                    std::thread::yield_now()
                }
                // Anything else means a bad SQE or ring: a programming error.
                Err(e) => panic!("io_uring_enter failed with an in-budget queue: {e}"),
            }
        }
    }

    #[inline]
    fn submit(&mut self, want: usize) -> std::io::Result<()> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    #[inline]
    fn next_completion(&mut self) -> Option<(u64, i32)> {
        self.ring
            .completion()
            .next()
            .map(|c| (c.user_data(), c.result()))
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.completion_fd.as_ref().map(|f| f.as_raw_fd())
    }
}
