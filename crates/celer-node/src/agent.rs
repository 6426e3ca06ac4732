//! The node's link to the control service: registration, heartbeats (which
//! carry the node's backfill figures; their replies repair a missed route
//! push), route fetches when a peer shows a newer epoch, and reports of
//! finished backfills.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use celer_meta_api::api::{node_serves_for, Heartbeat, RegisterNode, Registered};
use celer_meta_api::client::{Backoff, MetaClient};

use crate::{AgentMsg, NodeError, NodeShared};

/// Registers, retrying transient failures (control service unreachable or
/// timing out, no leader yet, a 5xx) with exponential backoff, round every
/// control process URL given, for `within` at most. A refusal (4xx: the
/// 409 of an identity conflict, a 401 for a wrong token) fails at once.
/// Also returns when the answered attempt was sent: the node's first lease
/// counts from then (`celer_meta_api::api::node_serves_for`).
pub(crate) fn register(
    client: &MetaClient,
    req: &RegisterNode,
    within: Duration,
) -> Result<(Registered, Instant), NodeError> {
    let start = Instant::now();
    let mut backoff = Backoff::for_control_service();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let sent = Instant::now();
        match client.register(req) {
            Ok(r) => {
                if attempts > 1 {
                    tracing::info!(
                        attempts,
                        after_ms = start.elapsed().as_millis() as u64,
                        "registered with the control service"
                    );
                }
                return Ok((r, sent));
            }
            Err(e) if e.is_transient() => {
                let delay = backoff.next_delay();
                if start.elapsed() + delay > within {
                    return Err(NodeError::Meta(format!(
                        "register with {}: gave up after {attempts} attempts in {:.1} s (--register-timeout-ms {}): {e}",
                        client.base_url(),
                        start.elapsed().as_secs_f64(),
                        within.as_millis()
                    )));
                }
                tracing::info!(
                    attempt = attempts,
                    retry_in_ms = delay.as_millis() as u64,
                    "control service not ready ({e}); retrying"
                );
                client.try_next_process();
                std::thread::sleep(delay);
            }
            Err(e) => {
                let claim = req
                    .node_id
                    .map_or("a new node".to_string(), |id| format!("node {id}"));
                return Err(NodeError::Meta(format!(
                    "registration as {claim} refused (not retried): {e}"
                )));
            }
        }
    }
}

/// `lease_until`: the end of the lease the registration gave (already
/// handed to the shards).
pub(crate) fn run(
    client: MetaClient,
    mut reg: Registered,
    mut lease_until: Instant,
    rx: Receiver<AgentMsg>,
    shared: Arc<NodeShared>,
) {
    let id = shared.id;
    let mut serves_for = node_serves_for(reg.lease_ms);
    // Heartbeats give up after half the time the node serves on its lease
    // (a hung control process would otherwise hold them for the client's
    // 10 s while the lease runs out), and the next goes to another process.
    let mut beat_client = client.with_request_timeout(serves_for / 2);
    // Whether the lease ran out (logged once until renewed).
    let mut lease_lapsed = false;
    let mut next_beat = Instant::now();
    let mut last_fetch = Instant::now() - Duration::from_secs(1);
    let mut synced: Vec<(u32, u64)> = Vec::new();
    // Partitions whose catch-up copies whole instead: sent with the next
    // heartbeat (at once), until one is answered.
    let mut copy_whole: Vec<u32> = Vec::new();
    let mut last_deleted: Vec<u64> = Vec::new();
    let mut last_fences: Vec<(u64, u32)> = Vec::new();
    let mut last_layers: Vec<celer_meta_api::api::VolumeLayers> = Vec::new();
    // A message taken while gathering Synced reports, handled next.
    let mut pending: Option<AgentMsg> = None;
    // Heartbeats failed in a row (an outage of the control service).
    let mut beat_failures = 0u64;
    // Whether the disk file's file system is short of room (logged on change).
    let mut space_warned = false;
    // After a failed heartbeat the next one comes after this backoff, 50
    // ms doubling up to the heartbeat period: a single 5xx costs ~50 ms,
    // not a period. Capped at the period, not at 2 s: after an outage (a
    // control leader takeover) every node must heartbeat again within its
    // fresh lease, or they are all marked down at once.
    let beat_period = |reg: &Registered| Duration::from_millis(reg.heartbeat_ms.max(10));
    let mut beat_backoff = Backoff::new(
        Duration::from_millis(50).min(beat_period(&reg)),
        beat_period(&reg),
    );
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
            Ok(AgentMsg::CopyWhole { partition }) => {
                if !copy_whole.contains(&partition) {
                    copy_whole.push(partition);
                    next_beat = Instant::now();
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
            let period = beat_period(&reg);
            let p = shared.backfill_progress();
            // The epoch every shard serves, not the hub's latest: the
            // control service drops a member that left a partition once the
            // node reports the table that says so.
            let beat = Heartbeat {
                epoch: shared.served_epoch(),
                backfill_bytes_done: p.bytes_done,
                backfill_bytes_total: p.bytes_total,
                backfill_partitions_unlisted: p.partitions_unlisted,
                failure: shared.failure(),
                warning: crate::space::warning(&shared.disk),
                copy_whole: copy_whole.clone(),
            };
            if beat.warning.is_some() != space_warned {
                space_warned = beat.warning.is_some();
                match &beat.warning {
                    Some(w) => tracing::warn!("{w}"),
                    None => tracing::info!("the disk file's file system has room again"),
                }
            }
            let sent = Instant::now();
            let result = beat_client.heartbeat_with(id, &beat);
            next_beat = match &result {
                Ok(_) => {
                    // Recorded, or moot (the table moved on); a shard that
                    // still waits asks again.
                    copy_whole.clear();
                    beat_backoff.reset();
                    Instant::now() + period
                }
                Err(e) => {
                    if e.is_transient() {
                        beat_client.try_next_process();
                        client.try_next_process();
                    }
                    Instant::now() + beat_backoff.next_delay()
                }
            };
            match &result {
                Err(e) if !e.is_not_found() => {
                    if beat_failures == 0 {
                        tracing::warn!(
                            "heartbeat: {e} (logged once until it works again); the node serves I/O for {} ms after its last answered heartbeat",
                            serves_for.as_millis()
                        );
                    }
                    beat_failures += 1;
                    if !lease_lapsed && Instant::now() >= lease_until {
                        lease_lapsed = true;
                        tracing::error!(
                            "lease expired: no heartbeat answered for {} ms; the node serves no I/O until the control service answers (it may mark this node down)",
                            serves_for.as_millis()
                        );
                    }
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
                    // Fences before the table: a node back from an outage
                    // must refuse fenced writers before it serves again.
                    let mut fences: Vec<(u64, u32)> =
                        r.fences.iter().map(|f| (f.volume, f.fence)).collect();
                    fences.sort_unstable();
                    if fences != last_fences {
                        shared.hub.set_fences(fences.clone(), None).ok();
                        last_fences = fences;
                    }
                    if r.layers != last_layers && crate::admin::check_layers(&r.layers).is_ok() {
                        shared.hub.set_layers(r.layers.clone(), None).ok();
                        last_layers = r.layers;
                    }
                    if let Some(t) = r.table {
                        shared.metrics.epoch.set(t.epoch as i64);
                        shared.hub.install(t);
                    }
                    // Renewed after the table and fences above (the shards
                    // take them in order); not for a node that reported it
                    // cannot serve (the service does not renew it either).
                    if beat.failure.is_none() {
                        lease_until = sent + serves_for;
                        shared.hub.set_lease(lease_until);
                        if lease_lapsed {
                            lease_lapsed = false;
                            tracing::info!("lease renewed: the node serves I/O again");
                        }
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
                            let req = RegisterNode {
                                node_id: Some(id),
                                data_addr: n.data_addr.clone(),
                                admin_addr: n.admin_addr.clone(),
                                shards: shared.shards,
                                domain: n.domain.clone(),
                                disk_uuid: Some(shared.disk_uuid),
                                replace_disk: false,
                            };
                            // Short: heartbeats wait meanwhile; the next
                            // 404 tries again.
                            match register(&client, &req, Duration::from_secs(5)) {
                                Ok((r, sent)) => {
                                    let f = r.fences.iter().map(|f| (f.volume, f.fence));
                                    shared.hub.set_fences(f.collect(), None).ok();
                                    if crate::admin::check_layers(&r.layers).is_ok() {
                                        shared.hub.set_layers(r.layers.clone(), None).ok();
                                    }
                                    serves_for = node_serves_for(r.lease_ms);
                                    beat_client = client.with_request_timeout(serves_for / 2);
                                    lease_until = sent + serves_for;
                                    shared.hub.set_lease(lease_until);
                                    reg = r
                                }
                                Err(e) => tracing::error!("{e}"),
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
