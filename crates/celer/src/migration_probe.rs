//! Test hooks of the live-migration guest test
//! (`crates/celer/tests/cluster_guest.rs`), off unless their environment
//! variable is set; nothing in a deployment sets them.
//!
//! - [`FENCE_PROBE_ENV`] (`CELER_TEST_FENCE_PROBE=PATH`), on a migration's
//!   source `celer vhost serve`: once QEMU has stopped every ring (the
//!   switch-over), and for as long as none runs, the back end keeps writing
//!   through a device queue of its own to the volume's last MiB (the guest
//!   test does not use it), one 4 KiB write at a time, as a source that
//!   ignored the switch-over would. Each write is one line in PATH:
//!   `write SEQ SUBMIT_NS DONE_NS ok|refused [ERROR]`, times from
//!   CLOCK_MONOTONIC (comparable between processes of one machine).
//! - [`TAKEOVER_LOG_ENV`] (`CELER_TEST_TAKEOVER_LOG=PATH`), on a `handoff`
//!   destination: `takeover START_NS DONE_NS` once its first I/O has taken
//!   the volume over, and `first-write NS` when its first write is
//!   submitted.
//!
//! The test then checks what fencing promises: no write of the source is
//! acknowledged after the destination's first write, and every write the
//! source submits after the take-over is refused.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use anyhow::{Context, Result};
use celer_device::{BlockDevice, DeviceQueue, IoOp, IoRequest, IoSegment};

/// See the module documentation.
pub const FENCE_PROBE_ENV: &str = "CELER_TEST_FENCE_PROBE";
/// See the module documentation.
pub const TAKEOVER_LOG_ENV: &str = "CELER_TEST_TAKEOVER_LOG";

/// The probe's queue index (above any vhost queue: `--queues` ≤ 64).
const PROBE_QUEUE_INDEX: usize = 64;
const PROBE_WRITE_BYTES: usize = 4096;
/// The probe writes in the volume's last MiB, cycling over its blocks.
const PROBE_RANGE_BYTES: u64 = 1 << 20;
/// Pause between two probe writes (one at a time).
const PROBE_PAUSE: Duration = Duration::from_millis(2);
/// The probe ends after this many refused writes...
const PROBE_REFUSED_MAX: u32 = 20;
/// ...or this many writes in all.
const PROBE_WRITES_MAX: u64 = 20_000;
/// One probe write's completion is awaited at most this long.
const PROBE_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// CLOCK_MONOTONIC in ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// An append-only line log shared by threads.
pub struct TestLog(Mutex<std::fs::File>);

impl TestLog {
    /// The log named by environment variable `var`, if it is set.
    pub fn from_env(var: &str) -> Result<Option<TestLog>> {
        let Some(path) = std::env::var_os(var) else {
            return Ok(None);
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("{var}: open {}", Path::new(&path).display()))?;
        tracing::warn!(
            "{var} is set: test hook on, logging to {}",
            Path::new(&path).display()
        );
        Ok(Some(TestLog(Mutex::new(file))))
    }

    /// Appends one line (a test hook: failures are ignored).
    pub fn line(&self, text: std::fmt::Arguments<'_>) {
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(f, "{text}");
    }
}

/// A migration destination's log of its take-over and first write.
pub struct TakeoverLog {
    log: TestLog,
    first_write_logged: AtomicBool,
}

impl TakeoverLog {
    pub fn from_env() -> Result<Option<TakeoverLog>> {
        Ok(TestLog::from_env(TAKEOVER_LOG_ENV)?.map(|log| TakeoverLog {
            log,
            first_write_logged: AtomicBool::new(false),
        }))
    }

    pub fn takeover(&self, start_ns: u64, done_ns: u64) {
        self.log.line(format_args!("takeover {start_ns} {done_ns}"));
    }

    /// Called before each request is submitted; logs the first write.
    pub fn submitting(&self, op: IoOp) {
        if op == IoOp::Write && !self.first_write_logged.swap(true, Ordering::AcqRel) {
            self.log
                .line(format_args!("first-write {}", monotonic_ns()));
        }
    }
}

/// Starts the fence probe when [`FENCE_PROBE_ENV`] is set: `backend`'s
/// rings-stopped hook wakes a thread that writes through `dev` while no
/// ring runs.
pub fn start_fence_probe(
    backend: &Arc<celer_vhost::VhostUserBlk>,
    dev: Arc<dyn BlockDevice>,
) -> Result<()> {
    let Some(log) = TestLog::from_env(FENCE_PROBE_ENV)? else {
        return Ok(());
    };
    let stopped = Arc::new((Mutex::new(false), Condvar::new()));
    let wake = stopped.clone();
    backend.on_rings_stopped(Box::new(move || {
        *wake.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        wake.1.notify_all();
    }));
    let backend = Arc::downgrade(backend);
    std::thread::Builder::new()
        .name("celer-test-probe".into())
        .spawn(move || {
            let (flag, cv) = &*stopped;
            let mut s = flag.lock().unwrap_or_else(|p| p.into_inner());
            while !*s {
                s = cv.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            drop(s);
            if let Err(e) = run_probe(&backend, &*dev, &log) {
                log.line(format_args!("error {e:#}"));
            }
            log.line(format_args!("end"));
        })
        .context("start the fence probe thread")?;
    Ok(())
}

fn run_probe(
    backend: &Weak<celer_vhost::VhostUserBlk>,
    dev: &dyn BlockDevice,
    log: &TestLog,
) -> Result<()> {
    let size = dev.info().size_bytes;
    anyhow::ensure!(
        size >= PROBE_RANGE_BYTES,
        "volume smaller than the probe range"
    );
    let base = size - PROBE_RANGE_BYTES;
    let blocks = PROBE_RANGE_BYTES / PROBE_WRITE_BYTES as u64;
    let mut queue = dev
        .open_queue(PROBE_QUEUE_INDEX)
        .map_err(|e| anyhow::anyhow!("open the probe queue: {e}"))?;
    let mut buf = vec![0u8; PROBE_WRITE_BYTES];
    let mut refused = 0;
    let mut seq = 1;
    while seq < PROBE_WRITES_MAX && refused < PROBE_REFUSED_MAX {
        // Writes only while no ring runs (the rings also stop and start
        // again when the guest resets the device, e.g. at boot).
        let Some(b) = backend.upgrade() else { break };
        let running = b.rings_running();
        drop(b);
        if running {
            std::thread::sleep(PROBE_PAUSE);
            continue;
        }
        for (i, word) in buf.chunks_mut(8).enumerate() {
            word.copy_from_slice(&(seq ^ ((i as u64) << 48)).to_le_bytes());
        }
        let seg = [IoSegment {
            addr: buf.as_mut_ptr(),
            len: buf.len(),
        }];
        let req = IoRequest {
            op: IoOp::Write,
            offset_bytes: base + (seq % blocks) * PROBE_WRITE_BYTES as u64,
            len_bytes: PROBE_WRITE_BYTES as u64,
            segments: &seg,
            tag: seq,
        };
        let submit_ns = monotonic_ns();
        // SAFETY: `buf` outlives the request: its completion is awaited,
        // or `buf` is leaked with the queue.
        let result = match unsafe { queue.submit(&req) } {
            Err(e) => Err(e.to_string()),
            Ok(()) => match wait_one(&mut *queue) {
                Some(r) => r,
                None => {
                    std::mem::forget(queue);
                    std::mem::forget(buf);
                    anyhow::bail!("probe write {seq} did not complete in {PROBE_WRITE_TIMEOUT:?}");
                }
            },
        };
        let done_ns = monotonic_ns();
        match result {
            Ok(()) => log.line(format_args!("write {seq} {submit_ns} {done_ns} ok")),
            Err(e) => {
                refused += 1;
                log.line(format_args!(
                    "write {seq} {submit_ns} {done_ns} refused {e}"
                ))
            }
        }
        seq += 1;
        std::thread::sleep(PROBE_PAUSE);
    }
    Ok(())
}

/// Waits for the one request in flight on `queue`; `None` after
/// [`PROBE_WRITE_TIMEOUT`].
fn wait_one(queue: &mut dyn DeviceQueue) -> Option<Result<(), String>> {
    let started = std::time::Instant::now();
    loop {
        let mut out = None;
        queue.poll(&mut |c| out = Some(c.result.map_err(|e| e.to_string())));
        if let Some(r) = out {
            return Some(r);
        }
        if started.elapsed() > PROBE_WRITE_TIMEOUT {
            return None;
        }
        if let Some(fd) = queue.completion_fd() {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, 100) };
        } else {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}
