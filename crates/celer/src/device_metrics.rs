//! Prometheus `/metrics` for the front-end daemons (`celer vhost serve`,
//! `celer nbd serve`, `celer up`): a `BlockDevice` wrapper that counts
//! requests and bytes and records latency per op and queue depth, and a
//! small HTTP server that serves the text exposition.
//!
//! Each queue gets its own counters and histograms when it opens (the family
//! lookup takes a lock then, never per I/O); a request's start time goes in
//! a per-queue slot array indexed by a tag of our own, so the wrapper
//! allocates nothing per I/O.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::RawFd;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Instant;

use celer_device::{BlockDevice, DeviceInfo, DeviceQueue, IoCompletion, IoError, IoOp, IoRequest};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    queue: u32,
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpResult {
    queue: u32,
    op: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: u32,
}

const OPS: [IoOp; 5] = [
    IoOp::Read,
    IoOp::Write,
    IoOp::Flush,
    IoOp::Discard,
    IoOp::WriteZeroes,
];

fn op_name(op: IoOp) -> &'static str {
    match op {
        IoOp::Read => "read",
        IoOp::Write => "write",
        IoOp::Flush => "flush",
        IoOp::Discard => "discard",
        IoOp::WriteZeroes => "write_zeroes",
    }
}

fn op_index(op: IoOp) -> usize {
    OPS.iter().position(|o| *o == op).unwrap_or(0)
}

/// The registry and families every queue of a device reports into.
pub struct DeviceMetrics {
    registry: Registry,
    requests: Family<OpResult, Counter>,
    bytes: Family<OpLabel, Counter>,
    latency: Family<OpLabel, Histogram>,
    depth: Family<QueueLabel, Gauge>,
    epoch: Gauge<i64, AtomicI64>,
}

impl DeviceMetrics {
    pub fn new() -> Arc<DeviceMetrics> {
        let mut registry = Registry::with_prefix("celer_volume");
        let requests = Family::<OpResult, Counter>::default();
        let bytes = Family::<OpLabel, Counter>::default();
        let latency = Family::<OpLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(10e-6, 2.0, 20))
        });
        let depth = Family::<QueueLabel, Gauge>::default();
        let epoch = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "requests",
            "Requests completed, by queue, op and result",
            requests.clone(),
        );
        registry.register(
            "bytes",
            "Bytes read or written, by queue and op",
            bytes.clone(),
        );
        registry.register(
            "request_seconds",
            "Request latency seen by the front end (submit to completion), by queue and op",
            latency.clone(),
        );
        registry.register("queue_depth", "Requests in flight, by queue", depth.clone());
        registry.register(
            "route_epoch",
            "Epoch of the newest route table the client holds (0: not a cluster volume)",
            epoch.clone(),
        );
        Arc::new(DeviceMetrics {
            registry,
            requests,
            bytes,
            latency,
            depth,
            epoch,
        })
    }

    pub fn set_route_epoch(&self, epoch: u64) {
        self.epoch.set(epoch as i64);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Serves `GET /metrics` on `addr` from a thread; `refresh` runs before
    /// each scrape (e.g. to read the client's route epoch).
    pub fn serve(
        self: &Arc<Self>,
        addr: SocketAddr,
        refresh: impl Fn(&DeviceMetrics) + Send + 'static,
    ) -> anyhow::Result<SocketAddr> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| anyhow::anyhow!("metrics listener on {addr}: {e}"))?;
        let bound = listener.local_addr()?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("celer-metrics".into())
            .spawn(move || {
                for s in listener.incoming() {
                    let Ok(mut s) = s else { continue };
                    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
                    let mut buf = [0u8; 2048];
                    let n = s.read(&mut buf).unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]);
                    let (status, body) = if req.starts_with("GET /metrics") {
                        refresh(&me);
                        ("200 OK", me.encode())
                    } else {
                        ("404 Not Found", "only GET /metrics is served here\n".to_string())
                    };
                    let _ = write!(
                        s,
                        "HTTP/1.1 {status}\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
            })?;
        Ok(bound)
    }
}

/// A device whose queues report into `DeviceMetrics`.
pub struct MeteredDevice {
    inner: Arc<dyn BlockDevice>,
    metrics: Arc<DeviceMetrics>,
}

impl MeteredDevice {
    pub fn wrap(inner: Arc<dyn BlockDevice>, metrics: Arc<DeviceMetrics>) -> Arc<dyn BlockDevice> {
        Arc::new(MeteredDevice { inner, metrics })
    }
}

impl BlockDevice for MeteredDevice {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }

    fn allocation(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        out: &mut Vec<celer_device::Extent>,
    ) -> Result<(), IoError> {
        self.inner.allocation(offset_bytes, len_bytes, out)
    }

    fn flush_is_device_wide(&self) -> bool {
        self.inner.flush_is_device_wide()
    }

    fn writes_durable_on_completion(&self) -> bool {
        self.inner.writes_durable_on_completion()
    }

    fn open_queue(&self, index: usize) -> Result<Box<dyn DeviceQueue>, IoError> {
        let inner = self.inner.open_queue(index)?;
        let queue = index as u32;
        let m = &self.metrics;
        let slots = inner.inflight_max();
        let get = |op: IoOp, result: &'static str| {
            m.requests
                .get_or_create(&OpResult {
                    queue,
                    op: op_name(op),
                    result,
                })
                .clone()
        };
        Ok(Box::new(MeteredQueue {
            ok: OPS.iter().map(|o| get(*o, "ok")).collect(),
            err: OPS.iter().map(|o| get(*o, "error")).collect(),
            bytes: OPS
                .iter()
                .map(|o| {
                    m.bytes
                        .get_or_create(&OpLabel {
                            queue,
                            op: op_name(*o),
                        })
                        .clone()
                })
                .collect(),
            latency: OPS
                .iter()
                .map(|o| {
                    m.latency
                        .get_or_create(&OpLabel {
                            queue,
                            op: op_name(*o),
                        })
                        .clone()
                })
                .collect(),
            depth: m.depth.get_or_create(&QueueLabel { queue }).clone(),
            slots: vec![None; slots],
            free: (0..slots).rev().collect(),
            inner,
        }))
    }
}

#[derive(Clone, Copy)]
struct InFlight {
    tag: u64,
    op: IoOp,
    bytes: u64,
    started: Instant,
}

struct MeteredQueue {
    inner: Box<dyn DeviceQueue>,
    ok: Vec<Counter>,
    err: Vec<Counter>,
    bytes: Vec<Counter>,
    latency: Vec<Histogram>,
    depth: Gauge,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
}

impl DeviceQueue for MeteredQueue {
    unsafe fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), IoError> {
        let Some(slot) = self.free.pop() else {
            return Err(IoError::QueueFull {
                inflight_max: self.slots.len(),
            });
        };
        let bytes = match req.op {
            IoOp::Read | IoOp::Write => req.segments.iter().map(|s| s.len as u64).sum(),
            IoOp::Discard | IoOp::WriteZeroes => req.len_bytes,
            IoOp::Flush => 0,
        };
        let mut ours = *req;
        ours.tag = slot as u64;
        // SAFETY: the caller's contract carries over unchanged.
        match unsafe { self.inner.submit(&ours) } {
            Ok(()) => {
                self.slots[slot] = Some(InFlight {
                    tag: req.tag,
                    op: req.op,
                    bytes,
                    started: Instant::now(),
                });
                self.depth.inc();
                Ok(())
            }
            Err(e) => {
                self.free.push(slot);
                self.err[op_index(req.op)].inc();
                Err(e)
            }
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(IoCompletion)) -> usize {
        let Self {
            inner,
            ok,
            err,
            bytes,
            latency,
            depth,
            slots,
            free,
        } = self;
        inner.poll(&mut |c: IoCompletion| {
            let slot = c.tag as usize;
            let Some(f) = slots.get_mut(slot).and_then(Option::take) else {
                return; // not ours: cannot happen with a correct device
            };
            free.push(slot);
            depth.dec();
            let i = op_index(f.op);
            latency[i].observe(f.started.elapsed().as_secs_f64());
            if c.result.is_ok() {
                ok[i].inc();
                bytes[i].inc_by(f.bytes);
            } else {
                err[i].inc();
            }
            done(IoCompletion {
                tag: f.tag,
                result: c.result,
            });
        })
    }

    fn inflight(&self) -> usize {
        self.inner.inflight()
    }

    fn inflight_max(&self) -> usize {
        self.slots.len()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.inner.completion_fd()
    }
}
