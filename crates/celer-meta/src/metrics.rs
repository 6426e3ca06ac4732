//! The control service's Prometheus metrics (`GET /metrics`, no auth).
//! Gauges are set from the cluster state at scrape time; only the request
//! counter is updated on the request path.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::api::Status;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: String,
    path: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeStateLabels {
    state: String,
}

pub(crate) struct Metrics {
    registry: Registry,
    epoch: Gauge,
    nodes: Family<NodeStateLabels, Gauge>,
    volumes: Gauge,
    partitions: Gauge,
    partitions_degraded: Gauge,
    partitions_down_member: Gauge,
    partitions_write_blocked: Gauge,
    log_seq: Gauge,
    leader: Gauge,
    rebalance_moved: Gauge,
    rebalance_listed: Gauge,
    rebalance_unlisted: Gauge,
    http: Family<HttpLabels, Counter>,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("celer_meta");
        let m = Metrics {
            epoch: Gauge::default(),
            nodes: Family::default(),
            volumes: Gauge::default(),
            partitions: Gauge::default(),
            partitions_degraded: Gauge::default(),
            partitions_down_member: Gauge::default(),
            partitions_write_blocked: Gauge::default(),
            log_seq: Gauge::default(),
            leader: Gauge::default(),
            rebalance_moved: Gauge::default(),
            rebalance_listed: Gauge::default(),
            rebalance_unlisted: Gauge::default(),
            http: Family::default(),
            registry: Registry::default(),
        };
        registry.register("route_epoch", "Current route table epoch", m.epoch.clone());
        registry.register(
            "nodes",
            "Storage nodes by state (up, down)",
            m.nodes.clone(),
        );
        registry.register("volumes", "Volumes", m.volumes.clone());
        registry.register(
            "partitions",
            "Partitions in the route table",
            m.partitions.clone(),
        );
        registry.register(
            "partitions_degraded",
            "Partitions with a syncing member or fewer members than replicas",
            m.partitions_degraded.clone(),
        );
        registry.register(
            "partitions_down_member",
            "Partitions with a member down within the grace period (writing with the others; it catches up when back)",
            m.partitions_down_member.clone(),
        );
        registry.register(
            "partitions_write_blocked",
            "Partitions with fewer members up than a write must reach (min_copies): their writes wait",
            m.partitions_write_blocked.clone(),
        );
        registry.register("log_seq", "Last change-log entry", m.log_seq.clone());
        registry.register("leader", "1 when this process leads", m.leader.clone());
        registry.register(
            "rebalance_moved_bytes",
            "Bytes copied by the rebalance under way (sum over up nodes; 0 when no partition is syncing)",
            m.rebalance_moved.clone(),
        );
        registry.register(
            "rebalance_listed_bytes",
            "Bytes the rebalance under way copies in all, as listed so far (sum over up nodes)",
            m.rebalance_listed.clone(),
        );
        registry.register(
            "rebalance_unlisted_partitions",
            "Backfills whose size is not known yet (not in rebalance_listed_bytes)",
            m.rebalance_unlisted.clone(),
        );
        registry.register("http_requests", "HTTP requests served", m.http.clone());
        Metrics { registry, ..m }
    }

    pub(crate) fn http_request(&self, method: String, path: String, status: u16) {
        self.http
            .get_or_create(&HttpLabels {
                method,
                path,
                status,
            })
            .inc();
    }

    /// The text exposition, with gauges from `status` (a leader's).
    pub(crate) fn encode(&self, status: Option<&Status>, leader: bool) -> String {
        self.leader.set(leader as i64);
        if let Some(s) = status {
            self.epoch.set(s.epoch as i64);
            let state = |s: &str| NodeStateLabels { state: s.into() };
            self.nodes
                .get_or_create(&state("up"))
                .set(s.nodes_up as i64);
            self.nodes
                .get_or_create(&state("down"))
                .set(s.nodes_down as i64);
            self.volumes.set(s.volumes as i64);
            self.partitions.set(s.partitions as i64);
            self.partitions_degraded.set(s.partitions_degraded as i64);
            self.partitions_down_member
                .set(s.partitions_down_member as i64);
            self.partitions_write_blocked
                .set(s.partitions_write_blocked as i64);
            self.log_seq.set(s.log_seq as i64);
            self.rebalance_moved.set(s.rebalance_bytes_done as i64);
            self.rebalance_listed.set(s.rebalance_bytes_total as i64);
            self.rebalance_unlisted
                .set(s.rebalance_partitions_unlisted as i64);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
