//! `FileDevice`: a raw file or block device served through io_uring.
//!
//! Each queue owns one io_uring, so queues share nothing. The caller's
//! segments (guest memory, for the vhost front end) go straight into
//! `readv`/`writev` SQEs: no bounce buffer, no copy. With `direct` the file
//! is opened `O_DIRECT`, so segments must be aligned to the logical block
//! size (guests align virtio-blk buffers to 512 bytes); a misaligned request
//! fails with an I/O error instead of silently going through the page cache.
//!
//! Invariants: at most `inflight_max` requests per queue; per-request iovec
//! storage is allocated when the queue opens and reused; SQEs are pushed by
//! `submit` and handed to the kernel in one `io_uring_enter` by the next
//! `poll` (a batch costs one syscall). The ring signals an eventfd on every
//! completion, so the owner can sleep in epoll on `completion_fd`.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use io_uring::{opcode, types, IoUring};

use crate::{
    check_request, BlockDevice, DeviceInfo, DeviceQueue, IoCompletion, IoError, IoOp, IoRequest,
};

/// Requests one file queue accepts in flight (also its io_uring size).
pub const FILE_INFLIGHT_MAX: usize = 256;
/// Segments one request may carry (virtio seg_max is below this).
pub const FILE_SEGMENTS_MAX: usize = 256;
/// Largest request, in bytes.
pub const FILE_REQUEST_MAX_BYTES: u64 = 32 << 20;

/// How to open a [`FileDevice`].
#[derive(Clone, Debug)]
pub struct FileDeviceConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Open with `O_DIRECT` (bypass the host page cache).
    pub direct: bool,
}

/// Errors opening a file device.
#[derive(Debug, thiserror::Error)]
pub enum FileDeviceError {
    #[error("cannot open {path}: {source} (O_DIRECT needs a file system that supports it; try --direct=false)")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot get the size of {path}: {source}")]
    Size {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is empty or not a multiple of 512 bytes ({size_bytes} bytes)")]
    BadSize { path: PathBuf, size_bytes: u64 },
}

/// A file or block device; queues open their own io_uring on a shared fd.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    info: DeviceInfo,
}

impl FileDevice {
    pub fn open(config: &FileDeviceConfig) -> Result<Self, FileDeviceError> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!config.read_only);
        if config.direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts
            .open(&config.path)
            .map_err(|source| FileDeviceError::Open {
                path: config.path.clone(),
                source,
            })?;
        let size_bytes = device_size(&file, &config.path)?;
        if size_bytes == 0 || size_bytes % crate::SECTOR_SIZE_BYTES != 0 {
            return Err(FileDeviceError::BadSize {
                path: config.path.clone(),
                size_bytes,
            });
        }
        let serial: String = config
            .path
            .file_name()
            .map(|n| n.to_string_lossy().chars().take(20).collect())
            .unwrap_or_else(|| "celer-file".to_string());
        Ok(FileDevice {
            file,
            info: DeviceInfo {
                size_bytes,
                block_size_bytes: 512,
                read_only: config.read_only,
                supports_discard: true,
                supports_write_zeroes: true,
                max_request_bytes: FILE_REQUEST_MAX_BYTES,
                serial,
            },
        })
    }
}

fn device_size(file: &File, path: &Path) -> Result<u64, FileDeviceError> {
    let err = |source| FileDeviceError::Size {
        path: path.to_path_buf(),
        source,
    };
    let meta = file.metadata().map_err(err)?;
    if !meta.file_type().is_block_device() {
        return Ok(meta.len());
    }
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: the ioctl writes one u64 into `size`, which lives across the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(size)
}

impl BlockDevice for FileDevice {
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    /// Every queue reads and writes the one open file (one page cache, or
    /// none with O_DIRECT), and a flush is an fdatasync of that file, which
    /// covers every write completed through it.
    fn flush_is_device_wide(&self) -> bool {
        true
    }

    /// Holes of a sparse file, from lseek(2) SEEK_DATA/SEEK_HOLE (a block
    /// device, or a file system without them, reports all data).
    fn allocation(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        out: &mut Vec<crate::Extent>,
    ) -> Result<(), IoError> {
        use crate::{push_extent, Allocation};
        let end = offset_bytes + len_bytes;
        let fd = self.file.as_raw_fd();
        let seek = |at: u64, whence: libc::c_int| -> Result<u64, i32> {
            // SAFETY: lseek on our open descriptor; it moves only the file
            // position, which no queue uses (io_uring ops carry offsets).
            let r = unsafe { libc::lseek(fd, at as libc::off_t, whence) };
            if r < 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
            Ok(r as u64)
        };
        let mut at = offset_bytes;
        while at < end {
            let data = match seek(at, libc::SEEK_DATA) {
                Ok(d) => d.min(end),
                // No data from `at` to the end of the file.
                Err(libc::ENXIO) => end,
                // Holes are not reported here: all data.
                Err(_) => at,
            };
            if data > at {
                push_extent(out, data - at, Allocation::Hole);
                at = data;
                continue;
            }
            let hole = match seek(at, libc::SEEK_HOLE) {
                Ok(h) if h > at => h.min(end),
                _ => end,
            };
            push_extent(out, hole - at, Allocation::Data);
            at = hole;
        }
        Ok(())
    }

    fn open_queue(&self, index: usize) -> Result<Box<dyn DeviceQueue>, IoError> {
        let io = |what: &str, e: std::io::Error| IoError::Io(format!("queue {index}: {what}: {e}"));
        let ring = IoUring::new(FILE_INFLIGHT_MAX as u32).map_err(|e| io("io_uring_setup", e))?;
        // SAFETY: eventfd has no memory arguments; the result is checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io("eventfd", std::io::Error::last_os_error()));
        }
        // SAFETY: `efd` is a fresh descriptor that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter()
            .register_eventfd(efd.as_raw_fd())
            .map_err(|e| io("register eventfd", e))?;
        let fd = self.file.try_clone().map_err(|e| io("dup file", e))?;
        ring.submitter()
            .register_files(&[fd.as_raw_fd()])
            .map_err(|e| io("register file", e))?;
        let iovecs = vec![
            libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            };
            FILE_INFLIGHT_MAX * FILE_SEGMENTS_MAX
        ];
        Ok(Box::new(FileQueue {
            info: self.info.clone(),
            ring,
            _file: fd,
            efd,
            iovecs,
            slots: vec![Slot::default(); FILE_INFLIGHT_MAX],
            free: (0..FILE_INFLIGHT_MAX as u32).rev().collect(),
            unsubmitted: 0,
        }))
    }
}

#[derive(Clone, Copy, Default)]
struct Slot {
    tag: u64,
    expect_bytes: u64,
    op_is_rw: bool,
}

struct FileQueue {
    info: DeviceInfo,
    ring: IoUring,
    /// Keeps the registered fd open for the ring's lifetime.
    _file: File,
    efd: OwnedFd,
    /// FILE_SEGMENTS_MAX iovecs per slot; stable while the ring uses them.
    iovecs: Vec<libc::iovec>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    unsubmitted: usize,
}

// SAFETY: the iovecs hold raw pointers into caller memory only while a
// request is in flight; the queue moves between threads only as a whole and
// is used by one thread at a time (DeviceQueue is Send, not Sync).
unsafe impl Send for FileQueue {}

impl FileQueue {
    fn flush_submissions(&mut self) {
        if self.unsubmitted == 0 {
            return;
        }
        // On error (EBUSY/EAGAIN/EINTR: the kernel is short of resources or
        // was interrupted; anything else) the SQEs stay queued and are
        // retried on the next poll rather than dropped.
        if let Ok(n) = self.ring.submit() {
            self.unsubmitted = self.unsubmitted.saturating_sub(n);
        }
    }
}

impl DeviceQueue for FileQueue {
    unsafe fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), IoError> {
        check_request(&self.info, req)?;
        let data_bytes: u64 = req.segments.iter().map(|s| s.len as u64).sum();
        if data_bytes > self.info.max_request_bytes || req.len_bytes > self.info.max_request_bytes {
            return Err(IoError::Io(format!(
                "request of {} bytes is larger than {} bytes",
                data_bytes.max(req.len_bytes),
                self.info.max_request_bytes
            )));
        }
        if req.segments.len() > FILE_SEGMENTS_MAX {
            return Err(IoError::Io(format!(
                "request has {} segments, at most {FILE_SEGMENTS_MAX} allowed",
                req.segments.len()
            )));
        }
        let Some(slot_index) = self.free.pop() else {
            return Err(IoError::QueueFull {
                inflight_max: FILE_INFLIGHT_MAX,
            });
        };
        let si = slot_index as usize;
        let fixed = types::Fixed(0);
        let iov_base = si * FILE_SEGMENTS_MAX;
        for (i, s) in req.segments.iter().enumerate() {
            self.iovecs[iov_base + i] = libc::iovec {
                iov_base: s.addr.cast(),
                iov_len: s.len,
            };
        }
        let iov_ptr = self.iovecs[iov_base..].as_ptr();
        let nseg = req.segments.len() as u32;
        let entry = match req.op {
            IoOp::Read => opcode::Readv::new(fixed, iov_ptr, nseg)
                .offset(req.offset_bytes)
                .build(),
            IoOp::Write => opcode::Writev::new(fixed, iov_ptr, nseg)
                .offset(req.offset_bytes)
                .build(),
            IoOp::Flush => opcode::Fsync::new(fixed)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoOp::Discard => opcode::Fallocate::new(fixed, req.len_bytes)
                .offset(req.offset_bytes)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            IoOp::WriteZeroes => opcode::Fallocate::new(fixed, req.len_bytes)
                .offset(req.offset_bytes)
                .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        }
        .user_data(slot_index as u64);
        self.slots[si] = Slot {
            tag: req.tag,
            expect_bytes: data_bytes,
            op_is_rw: matches!(req.op, IoOp::Read | IoOp::Write),
        };
        // The SQ has FILE_INFLIGHT_MAX entries and at most that many slots
        // exist, so a full SQ means unsubmitted entries: hand them over first.
        if self.ring.submission().is_full() {
            self.flush_submissions();
        }
        // SAFETY: the iovecs live in `self.iovecs` (never reallocated) until the
        // completion; the segment memory is valid per this function's contract.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            self.free.push(slot_index);
            return Err(IoError::QueueFull {
                inflight_max: FILE_INFLIGHT_MAX,
            });
        }
        self.unsubmitted += 1;
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(IoCompletion)) -> usize {
        self.flush_submissions();
        let mut n = 0;
        // Completions are taken one by one so the CQ borrow ends before `done`.
        loop {
            let Some(cqe) = self.ring.completion().next() else {
                break;
            };
            let si = cqe.user_data() as usize;
            let slot = self.slots[si];
            let res = cqe.result();
            let result = if res < 0 {
                Err(IoError::Io(
                    std::io::Error::from_raw_os_error(-res).to_string(),
                ))
            } else if slot.op_is_rw && res as u64 != slot.expect_bytes {
                Err(IoError::Io(format!(
                    "short transfer: {res} of {} bytes",
                    slot.expect_bytes
                )))
            } else {
                Ok(())
            };
            self.free.push(si as u32);
            done(IoCompletion {
                tag: slot.tag,
                result,
            });
            n += 1;
        }
        n
    }

    fn inflight(&self) -> usize {
        FILE_INFLIGHT_MAX - self.free.len()
    }

    fn inflight_max(&self) -> usize {
        FILE_INFLIGHT_MAX
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.efd.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IoSegment;

    #[repr(align(4096))]
    struct Page([u8; 4096]);

    #[test]
    fn allocation_reports_the_holes_of_a_sparse_file() {
        use crate::{Allocation, Extent};
        use std::os::unix::fs::FileExt;
        let f = tempfile::NamedTempFile::new().expect("temp file");
        f.as_file().set_len(8 << 20).expect("size");
        f.as_file()
            .write_all_at(&[7u8; 4096], 3 << 20)
            .expect("write");
        f.as_file().sync_all().expect("sync");
        let dev = FileDevice::open(&FileDeviceConfig {
            path: f.path().into(),
            read_only: true,
            direct: false,
        })
        .expect("open");
        let mut out = Vec::new();
        dev.allocation(0, 8 << 20, &mut out).expect("allocation");
        let total: u64 = out.iter().map(|e| e.len_bytes).sum();
        assert_eq!(total, 8 << 20, "{out:?}");
        // The file system may allocate around the write; the written block
        // is data, and the start and end are holes.
        let mut at = 0;
        let mut data_at_write = false;
        for e in &out {
            if e.allocation == Allocation::Data && at <= 3 << 20 && (3 << 20) < at + e.len_bytes {
                data_at_write = true;
            }
            at += e.len_bytes;
        }
        assert!(data_at_write, "{out:?}");
        assert_eq!(
            out.first().map(|e| e.allocation),
            Some(Allocation::Hole),
            "{out:?}"
        );
        assert_eq!(
            out.last().map(|e| e.allocation),
            Some(Allocation::Hole),
            "{out:?}"
        );
        // A range inside a hole.
        out.clear();
        dev.allocation(1 << 20, 4096, &mut out).expect("allocation");
        assert_eq!(
            out,
            [Extent {
                len_bytes: 4096,
                allocation: Allocation::Hole
            }]
        );
    }

    fn wait_all(q: &mut Box<dyn DeviceQueue>) -> Vec<IoCompletion> {
        let mut out = Vec::new();
        for _ in 0..10_000 {
            q.poll(&mut |c| out.push(c));
            if q.inflight() == 0 {
                return out;
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        panic!("requests did not complete");
    }

    #[test]
    fn write_read_flush_discard_zeroes_round_trip() {
        let tmp = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
        tmp.as_file().set_len(1 << 20).unwrap();
        let dev = FileDevice::open(&FileDeviceConfig {
            path: tmp.path().to_path_buf(),
            read_only: false,
            direct: true,
        })
        .unwrap();
        assert_eq!(dev.info().size_bytes, 1 << 20);
        let mut q = dev.open_queue(0).unwrap();
        assert!(q.completion_fd().is_some());

        let mut w = Box::new(Page([0; 4096]));
        for (i, b) in w.0.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let wseg = [IoSegment {
            addr: w.0.as_mut_ptr(),
            len: 4096,
        }];
        let write = IoRequest {
            op: IoOp::Write,
            offset_bytes: 8192,
            len_bytes: 0,
            segments: &wseg,
            tag: 7,
        };
        // SAFETY: `w` outlives the request (waited for below).
        unsafe { q.submit(&write).unwrap() };
        let flush = IoRequest {
            op: IoOp::Flush,
            offset_bytes: 0,
            len_bytes: 0,
            segments: &[],
            tag: 8,
        };
        // SAFETY: no segments.
        unsafe { q.submit(&flush).unwrap() };
        let c = wait_all(&mut q);
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|c| c.result.is_ok()), "{c:?}");

        let mut r = Box::new(Page([0; 4096]));
        let rseg = [IoSegment {
            addr: r.0.as_mut_ptr(),
            len: 4096,
        }];
        let read = IoRequest {
            op: IoOp::Read,
            offset_bytes: 8192,
            len_bytes: 0,
            segments: &rseg,
            tag: 9,
        };
        // SAFETY: `r` outlives the request.
        unsafe { q.submit(&read).unwrap() };
        let c = wait_all(&mut q);
        assert_eq!(c[0].tag, 9);
        assert!(c[0].result.is_ok());
        assert_eq!(r.0[..], w.0[..]);

        let zero = IoRequest {
            op: IoOp::WriteZeroes,
            offset_bytes: 8192,
            len_bytes: 4096,
            segments: &[],
            tag: 10,
        };
        // SAFETY: no segments.
        unsafe { q.submit(&zero).unwrap() };
        let c = wait_all(&mut q);
        assert!(c[0].result.is_ok(), "{:?}", c[0]);
        // SAFETY: `r` outlives the request.
        unsafe { q.submit(&read).unwrap() };
        wait_all(&mut q);
        assert!(r.0.iter().all(|&b| b == 0));

        let discard = IoRequest {
            op: IoOp::Discard,
            offset_bytes: 0,
            len_bytes: 65536,
            segments: &[],
            tag: 11,
        };
        // SAFETY: no segments.
        unsafe { q.submit(&discard).unwrap() };
        assert!(wait_all(&mut q)[0].result.is_ok());
    }

    #[test]
    fn rejects_out_of_range_and_read_only_writes() {
        let tmp = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
        tmp.as_file().set_len(1 << 20).unwrap();
        let dev = FileDevice::open(&FileDeviceConfig {
            path: tmp.path().to_path_buf(),
            read_only: true,
            direct: false,
        })
        .unwrap();
        let mut q = dev.open_queue(0).unwrap();
        let mut p = Box::new(Page([0; 4096]));
        let seg = [IoSegment {
            addr: p.0.as_mut_ptr(),
            len: 4096,
        }];
        let mut req = IoRequest {
            op: IoOp::Write,
            offset_bytes: 0,
            len_bytes: 0,
            segments: &seg,
            tag: 1,
        };
        // SAFETY: rejected before use; `p` is valid anyway.
        assert_eq!(unsafe { q.submit(&req) }, Err(IoError::ReadOnly));
        req.op = IoOp::Read;
        req.offset_bytes = 1 << 20;
        // SAFETY: as above.
        let e = unsafe { q.submit(&req) }.unwrap_err();
        assert!(matches!(e, IoError::OutOfRange { .. }));
        assert_eq!(q.inflight(), 0);
    }
}
