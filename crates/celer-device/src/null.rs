//! `NullDevice`: a device that completes every valid request at once without
//! touching storage (reads leave the caller's buffers as they are, like
//! QEMU's `null-co` with `read-zeroes=off`). It exists to measure a front
//! end's own cost. Invariant: completions come back in submission order on
//! the next `poll`, from a ring allocated when the queue is opened.

use std::collections::VecDeque;
use std::os::fd::RawFd;

use crate::{
    check_request, BlockDevice, DeviceInfo, DeviceQueue, IoCompletion, IoError, IoOp, IoRequest,
};

/// Requests one null queue accepts in flight.
pub const NULL_INFLIGHT_MAX: usize = 1024;

/// A device of `size_bytes` that stores nothing.
#[derive(Debug, Clone)]
pub struct NullDevice {
    info: DeviceInfo,
    read_zeroes: bool,
}

impl NullDevice {
    /// `read_zeroes`: fill read buffers with zeroes (costs a memset per read).
    pub fn new(size_bytes: u64, read_only: bool, read_zeroes: bool) -> Self {
        NullDevice {
            info: DeviceInfo {
                size_bytes,
                block_size_bytes: 512,
                read_only,
                supports_discard: true,
                supports_write_zeroes: true,
                max_request_bytes: 32 << 20,
                serial: "celer-null".to_string(),
            },
            read_zeroes,
        }
    }
}

impl BlockDevice for NullDevice {
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    /// Nothing is stored, so there is no cache to share either.
    fn flush_is_device_wide(&self) -> bool {
        true
    }

    fn open_queue(&self, _index: usize) -> Result<Box<dyn DeviceQueue>, IoError> {
        Ok(Box::new(NullQueue {
            info: self.info.clone(),
            read_zeroes: self.read_zeroes,
            done: VecDeque::with_capacity(NULL_INFLIGHT_MAX),
        }))
    }
}

struct NullQueue {
    info: DeviceInfo,
    read_zeroes: bool,
    /// Tags of submitted requests; capacity fixed at open (no per-I/O allocation).
    done: VecDeque<u64>,
}

impl DeviceQueue for NullQueue {
    unsafe fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), IoError> {
        check_request(&self.info, req)?;
        if req.len_bytes > self.info.max_request_bytes
            || (matches!(req.op, IoOp::Read | IoOp::Write)
                && req.segments.iter().map(|s| s.len as u64).sum::<u64>()
                    > self.info.max_request_bytes)
        {
            return Err(IoError::Io(format!(
                "request larger than {} bytes",
                self.info.max_request_bytes
            )));
        }
        if self.done.len() >= NULL_INFLIGHT_MAX {
            return Err(IoError::QueueFull {
                inflight_max: NULL_INFLIGHT_MAX,
            });
        }
        if self.read_zeroes && req.op == IoOp::Read {
            for s in req.segments {
                // SAFETY: the submit contract guarantees each segment is valid
                // for writes of `len` bytes until the completion is returned.
                unsafe { std::ptr::write_bytes(s.addr, 0, s.len) };
            }
        }
        self.done.push_back(req.tag);
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(IoCompletion)) -> usize {
        let n = self.done.len();
        while let Some(tag) = self.done.pop_front() {
            done(IoCompletion {
                tag,
                result: Ok(()),
            });
        }
        n
    }

    fn inflight(&self) -> usize {
        self.done.len()
    }

    fn inflight_max(&self) -> usize {
        NULL_INFLIGHT_MAX
    }

    fn completion_fd(&self) -> Option<RawFd> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IoSegment;

    #[test]
    fn completes_in_order_and_checks_geometry() {
        let dev = NullDevice::new(1 << 20, false, true);
        let mut q = dev.open_queue(0).unwrap();
        let mut buf = vec![0xffu8; 4096];
        let seg = [IoSegment {
            addr: buf.as_mut_ptr(),
            len: buf.len(),
        }];
        for tag in 0..3 {
            let req = IoRequest {
                op: IoOp::Read,
                offset_bytes: tag * 4096,
                len_bytes: 0,
                segments: &seg,
                tag,
            };
            // SAFETY: `buf` outlives the request (completed by poll below).
            unsafe { q.submit(&req).unwrap() };
        }
        assert_eq!(q.inflight(), 3);
        let mut tags = Vec::new();
        assert_eq!(q.poll(&mut |c| tags.push((c.tag, c.result))), 3);
        assert_eq!(tags, vec![(0, Ok(())), (1, Ok(())), (2, Ok(()))]);
        assert!(buf.iter().all(|&b| b == 0), "read_zeroes fills the buffer");

        let bad = IoRequest {
            op: IoOp::Read,
            offset_bytes: (1 << 20) - 512,
            len_bytes: 0,
            segments: &seg,
            tag: 9,
        };
        // SAFETY: rejected before touching memory; buf is valid anyway.
        let err = unsafe { q.submit(&bad) }.unwrap_err();
        assert!(matches!(err, IoError::OutOfRange { .. }));
        assert_eq!(q.inflight(), 0);
    }

    #[test]
    fn read_only_rejects_writes() {
        let dev = NullDevice::new(1 << 20, true, false);
        let mut q = dev.open_queue(0).unwrap();
        let req = IoRequest {
            op: IoOp::WriteZeroes,
            offset_bytes: 0,
            len_bytes: 4096,
            segments: &[],
            tag: 1,
        };
        // SAFETY: no segments.
        assert_eq!(unsafe { q.submit(&req) }, Err(IoError::ReadOnly));
    }
}
