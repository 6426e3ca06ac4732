//! Prometheus metrics of a node. Each shard gets its own counters and
//! histograms (atomics and a per-instance lock nobody else takes on the I/O
//! path); the admin server encodes the registry on scrape.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use celer_engine::PageSize;
use celer_proto::{Op, Status};

use crate::shard::RepairResult;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    shard: u16,
    op: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpOnly {
    shard: u16,
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabel {
    shard: u16,
}

const OPS: [&str; 8] = [
    "read",
    "write",
    "write_primary",
    "write_zeroes",
    "discard",
    "backfill_read",
    "fill",
    "other",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RepairLabels {
    shard: u16,
    result: &'static str,
}

/// Labels of `RepairResult`, in its order.
const REPAIR_RESULTS: [&str; 4] = ["repaired", "superseded", "unrepairable", "dropped"];

fn op_index(op: Op) -> usize {
    match op {
        Op::Read => 0,
        Op::Write => 1,
        Op::WritePrimary => 2,
        Op::WriteZeroes => 3,
        Op::Discard => 4,
        Op::BackfillRead => 5,
        Op::Fill => 6,
        _ => 7,
    }
}

pub struct NodeMetrics {
    registry: Registry,
    requests: Family<OpLabels, Counter>,
    bytes: Family<OpOnly, Counter>,
    latency: Family<OpOnly, Histogram>,
    engine_latency: Family<OpOnly, Histogram>,
    syncing: Family<ShardLabel, Gauge>,
    backfill_bytes: Family<ShardLabel, Counter>,
    backfill_moved: Family<ShardLabel, Gauge>,
    backfill_listed: Family<ShardLabel, Gauge>,
    backfill_unlisted: Family<ShardLabel, Gauge>,
    client_conns: Family<ShardLabel, Counter>,
    idle_closed: Family<ShardLabel, Counter>,
    protocol_errors: Family<ShardLabel, Counter>,
    repairs: Family<RepairLabels, Counter>,
    scrub_bytes: Family<ShardLabel, Counter>,
    scrub_damaged: Family<ShardLabel, Counter>,
    scrub_differences: Family<DifferenceLabels, Counter>,
    pub(crate) epoch: Gauge<i64, AtomicI64Shim>,
    buffers: Family<PagesLabel, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PagesLabel {
    pages: &'static str,
}

/// prometheus-client's default gauge is i64 over AtomicI64.
pub(crate) type AtomicI64Shim = std::sync::atomic::AtomicI64;

/// The handles one shard updates.
pub(crate) struct ShardCounters {
    ok: Vec<Counter>,
    err: Vec<Counter>,
    bytes: Vec<Counter>,
    latency: Vec<Histogram>,
    engine_latency: Vec<Histogram>,
    syncing: Gauge,
    backfill_bytes: Counter,
    backfill_moved: Gauge,
    backfill_listed: Gauge,
    backfill_unlisted: Gauge,
    client_conns: Counter,
    idle_closed: Counter,
    protocol_errors: Counter,
    /// By `RepairResult` (in its order).
    repairs: [Counter; 4],
    scrub_bytes: Counter,
    scrub_damaged: Counter,
    /// By `ScrubDifference` (in its order).
    scrub_differences: [Counter; 3],
}

/// How a copy the scrub compared differed from the other members'.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum ScrubDifference {
    /// A member holds a newer version (copied from it).
    Behind,
    /// Same version, other crc, the other members agree (copied from them).
    Mismatched,
    /// Same version, no two copies agree (reported only).
    Divergent,
}

const SCRUB_DIFFERENCES: [&str; 3] = ["behind", "mismatched", "divergent"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DifferenceLabels {
    shard: u16,
    kind: &'static str,
}

impl NodeMetrics {
    pub(crate) fn new(_shards: u16) -> NodeMetrics {
        let mut registry = Registry::with_prefix("celer_node");
        let requests = Family::<OpLabels, Counter>::default();
        let bytes = Family::<OpOnly, Counter>::default();
        let latency = Family::<OpOnly, Histogram>::new_with_constructor(|| {
            // 10 µs .. ~2.6 s
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                10e-6, 2.0, 19,
            ))
        });
        let engine_latency = Family::<OpOnly, Histogram>::new_with_constructor(|| {
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                10e-6, 2.0, 19,
            ))
        });
        let syncing = Family::<ShardLabel, Gauge>::default();
        let backfill_bytes = Family::<ShardLabel, Counter>::default();
        let backfill_moved = Family::<ShardLabel, Gauge>::default();
        let backfill_listed = Family::<ShardLabel, Gauge>::default();
        let backfill_unlisted = Family::<ShardLabel, Gauge>::default();
        let client_conns = Family::<ShardLabel, Counter>::default();
        let idle_closed = Family::<ShardLabel, Counter>::default();
        let protocol_errors = Family::<ShardLabel, Counter>::default();
        let repairs = Family::<RepairLabels, Counter>::default();
        let scrub_bytes = Family::<ShardLabel, Counter>::default();
        let scrub_damaged = Family::<ShardLabel, Counter>::default();
        registry.register(
            "scrub_bytes",
            "Data bytes read and crc-checked by the scrub",
            scrub_bytes.clone(),
        );
        registry.register(
            "scrub_damaged_blocks",
            "Blocks the scrub found damaged (each queued for repair)",
            scrub_damaged.clone(),
        );
        let scrub_differences = Family::<DifferenceLabels, Counter>::default();
        registry.register(
            "scrub_differences",
            "Blocks whose copy here the scrub found different from the other in-sync members': behind (a member holds a newer version; copied), mismatched (same version, other crc, the others agree; copied), divergent (same version, no two copies agree; reported only)",
            scrub_differences.clone(),
        );
        let epoch = Gauge::<i64, AtomicI64Shim>::default();
        registry.register(
            "repairs",
            "Damaged blocks (crc failed here) by outcome: repaired from another member, superseded by a newer write, unrepairable (no member holds a good copy), dropped (repair queue full)",
            repairs.clone(),
        );
        registry.register(
            "requests",
            "Requests served, by op and result",
            requests.clone(),
        );
        registry.register("bytes", "Bytes read or written, by op", bytes.clone());
        registry.register(
            "request_seconds",
            "Request latency inside the node (engine and forwards), by op",
            latency.clone(),
        );
        registry.register(
            "engine_seconds",
            "Time a client request's engine part took, submit to completion (disk and engine), by op: request_seconds minus this is the node's own time and the forwards'",
            engine_latency.clone(),
        );
        registry.register(
            "backfill_partitions",
            "Partitions this shard is backfilling (recovery in progress)",
            syncing.clone(),
        );
        registry.register(
            "backfill_bytes",
            "Bytes copied by backfills, counted per piece as it is written (restarted backfills included)",
            backfill_bytes.clone(),
        );
        registry.register(
            "backfill_moved_bytes",
            "Bytes copied by this shard's backfills of the rebalance under way (finished ones included until it ends)",
            backfill_moved.clone(),
        );
        registry.register(
            "backfill_listed_bytes",
            "Bytes this shard's backfills of the rebalance under way copy in all, as their sources listed them",
            backfill_listed.clone(),
        );
        registry.register(
            "backfill_unlisted_partitions",
            "Backfills of this shard whose chunk list has not come back yet (not in backfill_listed_bytes)",
            backfill_unlisted.clone(),
        );
        registry.register(
            "client_connections",
            "Client (attachment) connections this shard took over after their Hello (a client reconnecting counts again)",
            client_conns.clone(),
        );
        registry.register(
            "idle_closed_connections",
            "Client connections this shard closed because they sent nothing for the idle timeout",
            idle_closed.clone(),
        );
        registry.register(
            "protocol_errors",
            "Connections this shard closed because the peer broke the protocol (a corrupt frame, a frame out of turn, a failed node proof)",
            protocol_errors.clone(),
        );
        registry.register(
            "route_epoch",
            "Epoch of the installed route table",
            epoch.clone(),
        );
        let buffers = Family::<PagesLabel, Gauge>::default();
        registry.register(
            "buffer_bytes",
            "Bytes mapped for the shards' fixed I/O buffers (engine journal and request buffers, node request buffers), by page size (2M: huge pages)",
            buffers.clone(),
        );
        NodeMetrics {
            registry,
            buffers,
            requests,
            bytes,
            latency,
            engine_latency,
            syncing,
            backfill_bytes,
            backfill_moved,
            backfill_listed,
            backfill_unlisted,
            client_conns,
            idle_closed,
            protocol_errors,
            repairs,
            scrub_bytes,
            scrub_damaged,
            scrub_differences,
            epoch,
        }
    }

    /// Adds `bytes` of fixed buffers mapped on `pages`.
    pub(crate) fn buffer_bytes(&self, pages: PageSize, bytes: u64) {
        let pages = match pages {
            PageSize::Huge2M => "2M",
            PageSize::Base4K => "4K",
        };
        self.buffers
            .get_or_create(&PagesLabel { pages })
            .inc_by(bytes as i64);
    }

    pub(crate) fn shard(&self, shard: u16) -> ShardCounters {
        let get = |op: &'static str, result: &'static str| {
            self.requests
                .get_or_create(&OpLabels { shard, op, result })
                .clone()
        };
        ShardCounters {
            ok: OPS.iter().map(|op| get(op, "ok")).collect(),
            err: OPS.iter().map(|op| get(op, "error")).collect(),
            bytes: OPS
                .iter()
                .map(|op| self.bytes.get_or_create(&OpOnly { shard, op }).clone())
                .collect(),
            latency: OPS
                .iter()
                .map(|op| self.latency.get_or_create(&OpOnly { shard, op }).clone())
                .collect(),
            engine_latency: OPS
                .iter()
                .map(|op| {
                    self.engine_latency
                        .get_or_create(&OpOnly { shard, op })
                        .clone()
                })
                .collect(),
            syncing: self.syncing.get_or_create(&ShardLabel { shard }).clone(),
            backfill_bytes: self
                .backfill_bytes
                .get_or_create(&ShardLabel { shard })
                .clone(),
            backfill_moved: self
                .backfill_moved
                .get_or_create(&ShardLabel { shard })
                .clone(),
            backfill_listed: self
                .backfill_listed
                .get_or_create(&ShardLabel { shard })
                .clone(),
            backfill_unlisted: self
                .backfill_unlisted
                .get_or_create(&ShardLabel { shard })
                .clone(),
            client_conns: self
                .client_conns
                .get_or_create(&ShardLabel { shard })
                .clone(),
            idle_closed: self
                .idle_closed
                .get_or_create(&ShardLabel { shard })
                .clone(),
            protocol_errors: self
                .protocol_errors
                .get_or_create(&ShardLabel { shard })
                .clone(),
            repairs: REPAIR_RESULTS.map(|result| {
                self.repairs
                    .get_or_create(&RepairLabels { shard, result })
                    .clone()
            }),
            scrub_bytes: self
                .scrub_bytes
                .get_or_create(&ShardLabel { shard })
                .clone(),
            scrub_damaged: self
                .scrub_damaged
                .get_or_create(&ShardLabel { shard })
                .clone(),
            scrub_differences: SCRUB_DIFFERENCES.map(|kind| {
                self.scrub_differences
                    .get_or_create(&DifferenceLabels { shard, kind })
                    .clone()
            }),
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl ShardCounters {
    pub(crate) fn record(&self, op: Op, status: Status, bytes: u64, took: Duration) {
        let i = op_index(op);
        if status == Status::Ok {
            self.ok[i].inc();
            self.bytes[i].inc_by(bytes);
        } else {
            self.err[i].inc();
        }
        self.latency[i].observe(took.as_secs_f64());
    }
    pub(crate) fn record_engine(&self, op: Op, took: Duration) {
        self.engine_latency[op_index(op)].observe(took.as_secs_f64());
    }
    pub(crate) fn set_syncing(&self, n: usize) {
        self.syncing.set(n as i64);
    }
    pub(crate) fn add_backfill_bytes(&self, n: u64) {
        self.backfill_bytes.inc_by(n);
    }
    pub(crate) fn client_connected(&self) {
        self.client_conns.inc();
    }
    pub(crate) fn idle_closed(&self) {
        self.idle_closed.inc();
    }

    pub(crate) fn protocol_error(&self) {
        self.protocol_errors.inc();
    }

    /// Connections closed for protocol errors so far.
    pub(crate) fn protocol_errors(&self) -> u64 {
        self.protocol_errors.get()
    }
    pub(crate) fn add_scrub_bytes(&self, n: u64) {
        self.scrub_bytes.inc_by(n);
    }
    pub(crate) fn add_scrub_damaged(&self) {
        self.scrub_damaged.inc();
    }
    pub(crate) fn add_scrub_difference(&self, d: ScrubDifference) {
        self.scrub_differences[d as usize].inc();
    }
    pub(crate) fn repair(&self, result: RepairResult) {
        self.repairs[result as usize].inc();
    }
    pub(crate) fn set_backfill_progress(&self, moved: u64, listed: u64, unlisted: u64) {
        self.backfill_moved.set(moved as i64);
        self.backfill_listed.set(listed as i64);
        self.backfill_unlisted.set(unlisted as i64);
    }
}

#[allow(dead_code)]
fn _assert_send(_: &AtomicU64) {}
