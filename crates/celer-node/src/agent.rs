//! The node's link to the control service: registration, heartbeats (which
//! carry the node's backfill figures; their replies repair a missed route
//! push), route fetches when a peer shows a newer epoch, and reports of
//! finished backfills.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use celer_meta::api::{Heartbeat, RegisterNode, Registered};
use celer_meta::client::MetaClient;
use celer_route::NodeId;

use crate::{AgentMsg, NodeError, NodeShared};

/// Registers, retrying for up to 30 s while the control service is unreachable.
pub(crate) fn register(
    client: &MetaClient,
    node_id: Option<NodeId>,
    data_addr: &str,
    admin_addr: &str,
    shards: u16,
    domain: &str,
    disk_uuid: u64,
) -> Result<Registered, NodeError> {
    let req = RegisterNode {
        node_id,
        data_addr: data_addr.to_string(),
        admin_addr: admin_addr.to_string(),
        shards,
        domain: domain.to_string(),
        disk_uuid: Some(disk_uuid),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.register(&req) {
            Ok(r) => return Ok(r),
            // Unreachable, or no leader yet (an HA control service electing
            // one): wait and retry.
            Err(e)
                if (e.is_unreachable() || e.status() == Some(503)) && Instant::now() < deadline =>
            {
                tracing::info!("control service not ready yet ({e}); retrying");
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(e) => {
                return Err(NodeError::Meta(format!(
                    "register with {}: {e}",
                    client.base_url()
                )))
            }
        }
    }
}

pub(crate) fn run(
    client: MetaClient,
    mut reg: Registered,
    rx: Receiver<AgentMsg>,
    shared: Arc<NodeShared>,
) {
    let id = shared.id;
    let mut next_beat = Instant::now();
    let mut last_fetch = Instant::now() - Duration::from_secs(1);
    let mut synced: Vec<(u32, u64)> = Vec::new();
    let mut last_deleted: Vec<u64> = Vec::new();
    // A message taken while gathering Synced reports, handled next.
    let mut pending: Option<AgentMsg> = None;
    // Heartbeats failed in a row (an outage of the control service).
    let mut beat_failures = 0u64;
    loop {
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let now = Instant::now();
        let wait = next_beat.saturating_duration_since(now);
        let msg = match pending.take() {
            Some(m) => Ok(m),
            None => rx.recv_timeout(wait),
        };
        match msg {
            Ok(AgentMsg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Ok(AgentMsg::NeedRoute(epoch)) => {
                if epoch > shared.hub.epoch() && last_fetch.elapsed() >= Duration::from_millis(20) {
                    last_fetch = Instant::now();
                    match client.route() {
                        Ok(t) => {
                            shared.metrics.epoch.set(t.epoch as i64);
                            shared.hub.install(t);
                        }
                        Err(e) => tracing::warn!("fetch route table: {e}"),
                    }
                }
            }
            Ok(AgentMsg::Synced { partition, epoch }) => {
                synced.push((partition, epoch));
                // Gather what the other shards finish at the same moment.
                // Anything else (Stop!) is kept for the next turn, not lost.
                loop {
                    match rx.recv_timeout(Duration::from_millis(2)) {
                        Ok(AgentMsg::Synced { partition, epoch }) => {
                            synced.push((partition, epoch))
                        }
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                report_synced(&client, &shared, &mut synced, beat_failures > 0);
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() >= next_beat {
            next_beat = Instant::now() + Duration::from_millis(reg.heartbeat_ms.max(10));
            let p = shared.backfill_progress();
            let beat = Heartbeat {
                epoch: shared.hub.epoch(),
                backfill_bytes_done: p.bytes_done,
                backfill_bytes_total: p.bytes_total,
                backfill_partitions_unlisted: p.partitions_unlisted,
            };
            let result = client.heartbeat_with(id, &beat);
            match &result {
                Err(e) if !e.is_not_found() => {
                    if beat_failures == 0 {
                        // Once per outage: the node serves I/O meanwhile.
                        tracing::warn!("heartbeat: {e} (logged once until it works again)");
                    }
                    beat_failures += 1;
                }
                _ if beat_failures > 0 => {
                    tracing::info!(
                        failed = beat_failures,
                        "heartbeats reach the control service again"
                    );
                    beat_failures = 0;
                }
                _ => {}
            }
            match result {
                Ok(r) => {
                    if let Some(t) = r.table {
                        shared.metrics.epoch.set(t.epoch as i64);
                        shared.hub.install(t);
                    }
                    let mut deleted = r.deleted_volumes;
                    deleted.sort_unstable();
                    if deleted != last_deleted {
                        shared.hub.set_deleted(deleted.clone());
                        last_deleted = deleted;
                    }
                }
                Err(e) if e.is_not_found() => {
                    tracing::warn!("control service forgot this node; registering again");
                    if let Some(t) = shared.hub.table() {
                        if let Some(n) = t.table.node(id) {
                            if let Ok(r) = register(
                                &client,
                                Some(id),
                                &n.data_addr,
                                &n.admin_addr,
                                shared.shards,
                                &n.domain,
                                shared.disk_uuid,
                            ) {
                                reg = r;
                            }
                        }
                    }
                }
                Err(_) => {}
            }
            if !synced.is_empty() {
                report_synced(&client, &shared, &mut synced, beat_failures > 0);
            }
        }
    }
}

/// Reports finished backfills, grouped by epoch; keeps what could not be
/// sent (from the first failure on: the control service is unreachable or
/// electing). `outage`: heartbeats already fail, the failure was logged.
/// Reports from before the node rejoined a partition go back to its shard.
fn report_synced(
    client: &MetaClient,
    shared: &NodeShared,
    synced: &mut Vec<(u32, u64)>,
    outage: bool,
) {
    synced.sort_unstable_by_key(|x| (x.1, x.0));
    let mut keep = Vec::new();
    for chunk in synced.chunk_by(|a, b| a.1 == b.1) {
        if !keep.is_empty() {
            keep.extend_from_slice(chunk);
            continue;
        }
        let epoch = chunk[0].1;
        let parts: Vec<u32> = chunk.iter().map(|x| x.0).collect();
        match client.synced(shared.id, epoch, &parts) {
            Ok(r) => {
                if r.marked.is_empty() {
                    // Already in sync there, or no longer ours: nothing to do
                    // (repeated on every new table while the report stands).
                    tracing::debug!(epoch, partitions = ?parts, "backfill report changed nothing");
                } else {
                    tracing::info!(epoch, marked = ?r.marked, "reported backfilled partitions");
                }
                if !r.backfill_again.is_empty() {
                    tracing::warn!(
                        epoch,
                        partitions = ?r.backfill_again,
                        "rejoined these partitions after that epoch: backfilling them again"
                    );
                    shared.hub.backfill_again(epoch, &r.backfill_again);
                }
            }
            Err(e) => {
                if outage {
                    tracing::debug!("report synced partitions: {e}; will retry");
                } else {
                    tracing::warn!("report synced partitions: {e}; will retry");
                }
                keep.extend_from_slice(chunk);
            }
        }
    }
    *synced = keep;
}
