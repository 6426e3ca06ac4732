//! `DelayDevice`: another device whose completions are held back by a fixed
//! time, as SPDK's delay bdev does. A test tool: it makes a fast device
//! (a file in the page cache, `null:`) look like a slow disk, so that a
//! back end killed at any moment has requests in flight, or a front end's
//! queue fills.
//!
//! The inner device does the I/O at once; only its completion is reported
//! `delay` after the queue saw it. Nothing about the data changes: a
//! request whose completion is held is in flight for every purpose (a
//! killed back end resubmits it).
//!
//! Each queue wakes its owner with a timerfd: armed for the earliest held
//! completion, or every [`INNER_POLL`] while the inner device has requests
//! of its own in flight (the inner completion fd is not watched, so there
//! is one fd for the owner to sleep on).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{BlockDevice, DeviceInfo, DeviceQueue, Extent, IoCompletion, IoError, IoRequest};

/// How often a queue looks for the inner device's completions while it
/// has requests in flight.
const INNER_POLL: Duration = Duration::from_micros(100);

/// A device whose completions arrive `delay` late.
pub struct DelayDevice {
    inner: Arc<dyn BlockDevice>,
    delay: Duration,
}

impl DelayDevice {
    pub fn new(inner: Arc<dyn BlockDevice>, delay: Duration) -> Self {
        DelayDevice { inner, delay }
    }
}

impl BlockDevice for DelayDevice {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }

    fn open_queue(&self, index: usize) -> Result<Box<dyn DeviceQueue>, IoError> {
        let inner = self.inner.open_queue(index)?;
        // SAFETY: plain syscall; the fd is checked and then owned.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(IoError::Io(format!(
                "timerfd_create: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let timer = unsafe { OwnedFd::from_raw_fd(fd) };
        let held = VecDeque::with_capacity(inner.inflight_max());
        Ok(Box::new(DelayQueue {
            inner,
            delay: self.delay,
            held,
            timer,
            armed_for: None,
        }))
    }

    fn allocation(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        out: &mut Vec<Extent>,
    ) -> Result<(), IoError> {
        self.inner.allocation(offset_bytes, len_bytes, out)
    }

    fn flush_is_device_wide(&self) -> bool {
        self.inner.flush_is_device_wide()
    }

    fn writes_durable_on_completion(&self) -> bool {
        self.inner.writes_durable_on_completion()
    }
}

struct DelayQueue {
    inner: Box<dyn DeviceQueue>,
    delay: Duration,
    /// Completions the inner device returned, oldest first, with the time
    /// they may be handed over (the delay is fixed, so times only grow).
    held: VecDeque<(Instant, IoCompletion)>,
    timer: OwnedFd,
    /// When the timer is set to fire (None: disarmed).
    armed_for: Option<Instant>,
}

impl DelayQueue {
    /// Sets the timer for the next moment something may be ready.
    fn arm(&mut self, now: Instant) {
        let next = match self.held.front() {
            Some(&(at, _)) => Some(at),
            None if self.inner.inflight() > 0 => Some(now + INNER_POLL),
            None => None,
        };
        if next == self.armed_for {
            return;
        }
        let after = next.map_or(Duration::ZERO, |at| {
            // A zero it_value disarms: fire as soon as possible instead.
            at.saturating_duration_since(now)
                .max(Duration::from_nanos(1))
        });
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `spec` is a valid itimerspec; the fd is our timerfd.
        unsafe { libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        self.armed_for = next;
    }
}

impl DeviceQueue for DelayQueue {
    unsafe fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), IoError> {
        if self.inflight() >= self.inflight_max() {
            return Err(IoError::QueueFull {
                inflight_max: self.inflight_max(),
            });
        }
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { self.inner.submit(req)? };
        if self.armed_for.is_none() {
            self.arm(Instant::now());
        }
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(IoCompletion)) -> usize {
        let now = Instant::now();
        let ready_at = now + self.delay;
        let held = &mut self.held;
        self.inner.poll(&mut |c| held.push_back((ready_at, c)));
        let mut n = 0;
        while self.held.front().is_some_and(|&(at, _)| at <= now) {
            if let Some((_, c)) = self.held.pop_front() {
                done(c);
                n += 1;
            }
        }
        // If the timer fired, clear it; `arm` sets it again only when the
        // next deadline differs from the one it is set for.
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into `v` from our non-blocking timerfd.
        let fired = unsafe { libc::read(self.timer.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        if fired == 8 {
            self.armed_for = None;
        }
        self.arm(now);
        n
    }

    fn inflight(&self) -> usize {
        self.inner.inflight() + self.held.len()
    }

    fn inflight_max(&self) -> usize {
        self.inner.inflight_max()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.timer.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IoOp, IoSegment, NullDevice};

    #[test]
    fn completions_arrive_after_the_delay_and_wake_the_timer_fd() {
        let delay = Duration::from_millis(20);
        let dev = DelayDevice::new(Arc::new(NullDevice::new(1 << 20, false, false)), delay);
        let mut q = dev.open_queue(0).unwrap();
        let mut buf = vec![0u8; 4096];
        let seg = [IoSegment {
            addr: buf.as_mut_ptr(),
            len: buf.len(),
        }];
        let start = Instant::now();
        for tag in 0..3 {
            // SAFETY: `buf` outlives the requests (we wait for them below).
            unsafe {
                q.submit(&IoRequest {
                    op: IoOp::Read,
                    offset_bytes: 4096 * tag,
                    len_bytes: 4096,
                    segments: &seg,
                    tag,
                })
                .unwrap()
            };
        }
        let mut tags = Vec::new();
        assert_eq!(
            q.poll(&mut |c| tags.push(c.tag)),
            0,
            "nothing before the delay"
        );
        assert_eq!(q.inflight(), 3);
        let fd = q.completion_fd().unwrap();
        while tags.len() < 3 {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, 1000) };
            assert_eq!(r, 1, "the timer fd must wake the owner");
            q.poll(&mut |c| {
                assert!(c.result.is_ok());
                tags.push(c.tag)
            });
        }
        assert!(start.elapsed() >= delay, "{:?}", start.elapsed());
        assert_eq!(tags, [0, 1, 2]);
        assert_eq!(q.inflight(), 0);
    }
}
