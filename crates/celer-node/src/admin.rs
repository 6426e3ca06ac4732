//! The node's admin HTTP server: `PUT /v1/route` (the control service pushes
//! tables here; bearer token required), `GET /v1/status` (including the
//! backfill figures, see `BackfillProgress`), `GET /metrics`.
//!
//! Served with the control service's limits (header and body timeouts,
//! connection caps overall and per source IP, see `celer_http`): its clients
//! are the control service, metrics scrapers and operators.
//!
//! A pushed table is checked before it is installed (see [`check_offered`]):
//! installing a table is what makes a node release chunks, so a table that
//! is well-formed JSON but not one the control service could have made is
//! refused with 400 and changes nothing.

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Path;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use celer_route::RouteTable;
use serde_json::json;

use crate::NodeShared;

/// Admin connections open at once.
pub(crate) const CONNECTIONS_MAX: usize = 256;
/// Admin connections open at once from one source IP.
pub(crate) const CONNECTIONS_PER_IP_MAX: usize = 64;
/// Most a pushed table's epoch may be ahead of the installed one. The
/// control service moves the epoch by one per committed change (a node up
/// or down, a partition in sync, a split): a million is years of churn, far
/// more than a live node can fall behind, while a table far ahead (2^63)
/// would make the node ignore every real table after it, for good. A node
/// further behind (or without a table, in an old cluster) still gets the
/// table from its heartbeat replies, which do not come through here.
pub(crate) const EPOCH_AHEAD_MAX: u64 = 1_000_000;

pub(crate) fn serve(listener: TcpListener, shared: Arc<NodeShared>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("admin server runtime: {e}");
            return;
        }
    };
    rt.block_on(async move {
        if let Err(e) = listener.set_nonblocking(true) {
            tracing::error!("admin server: {e}");
            return;
        }
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("admin server: {e}");
                return;
            }
        };
        let app = Router::new()
            .route("/v1/route", put(put_route))
            .route("/v1/fences", put(put_fences))
            .route("/v1/layers", put(put_layers))
            .route("/v1/layers/usage", post(layer_usage))
            .route("/v1/status", get(status))
            .route("/v1/scrub", get(scrub_status))
            .route("/v1/scrub/{action}", post(scrub_control))
            .route("/metrics", get(metrics))
            .with_state(shared.clone());
        let stop = async move {
            while !shared.stopping.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let limits = celer_http::HttpLimits::with_caps(CONNECTIONS_MAX, CONNECTIONS_PER_IP_MAX);
        celer_http::serve(listener, app, limits, stop).await;
        tracing::info!("admin server stopped");
    });
}

fn authorized(shared: &NodeShared, headers: &HeaderMap) -> bool {
    let want = format!("Bearer {}", shared.token);
    headers
        .get("authorization")
        .is_some_and(|v| celer_http::constant_time_eq(v.as_bytes(), want.as_bytes()))
}

/// Who may use an operator control (the scrub's): the control service
/// (the cluster token) or an operator with an admin ticket from it
/// (`Authorization: Celer-Ticket HEX`, see `celer_proto::auth::AdminTicket`;
/// the node checks its signature with the data key). Returns the caller's
/// name for the log, or why not.
fn operator(shared: &NodeShared, headers: &HeaderMap) -> Result<String, String> {
    if authorized(shared, headers) {
        return Ok("cluster token".into());
    }
    let Some(ticket) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Celer-Ticket "))
    else {
        return Err("missing or wrong credential: present an admin ticket from the control service (`Authorization: Celer-Ticket ...`, as `celer scrub` does) or the cluster token".into());
    };
    celer_proto::auth::AdminTicket::verify(&shared.data_key, ticket.trim(), crate::unix_ms())
        .map(|t| t.operator)
        .map_err(|e| format!("admin ticket refused: {e}"))
}

/// The answer to a request without the cluster token.
fn unauthorized() -> (StatusCode, Json<serde_json::Value>) {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"error": "missing or wrong bearer token: present the cluster token"})),
    )
}

/// Why `offered` must not be installed over `installed`, if it must not:
/// [`RouteTable::validate`], then what a table made by the control service
/// always satisfies (the lookups in a table rely on it too).
pub(crate) fn check_offered(
    offered: &RouteTable,
    installed: Option<&RouteTable>,
) -> Result<(), String> {
    offered.validate().map_err(|e| e.to_string())?;
    let t = offered;
    if let Some(w) = t.nodes.windows(2).find(|w| w[0].id >= w[1].id) {
        return Err(format!(
            "nodes must be listed by increasing id ({} before {})",
            w[0].id, w[1].id
        ));
    }
    if t.partitions.len() != t.partition_count() as usize {
        return Err(format!(
            "{} partitions listed where partition_bits {} makes {}",
            t.partitions.len(),
            t.partition_bits,
            t.partition_count()
        ));
    }
    for (p, route) in t.partitions.iter().enumerate() {
        for (i, m) in route.members.iter().enumerate() {
            if t.node(m.node).is_none() {
                return Err(format!(
                    "partition {p} lists member {}, which is not among the table's nodes",
                    m.node
                ));
            }
            if route.members[..i].iter().any(|o| o.node == m.node) {
                return Err(format!("partition {p} lists member {} twice", m.node));
            }
        }
    }
    let current = installed.map_or(0, |i| i.epoch);
    if t.epoch > current.saturating_add(EPOCH_AHEAD_MAX) {
        return Err(format!(
            "epoch {} is more than {EPOCH_AHEAD_MAX} ahead of this node's epoch {current}: \
             a table that far ahead would make the node ignore every real one after it",
            t.epoch
        ));
    }
    // An older table is not installed anyway (the answer says so).
    if let Some(old) = installed.filter(|old| t.epoch > old.epoch) {
        // Partitions only multiply, by splits: one split (a doubling) per
        // epoch at most. Several at once are fine: a push carries only the
        // latest table, so a node can miss the one between two splits.
        let splits = i64::from(t.partition_bits) - i64::from(old.partition_bits);
        if splits < 0 || splits as u64 > t.epoch - old.epoch {
            return Err(format!(
                "{} partitions at epoch {} after {} at epoch {}: the count only \
                 changes by splits, each doubling it in one epoch",
                t.partition_count(),
                t.epoch,
                old.partition_count(),
                old.epoch
            ));
        }
    }
    Ok(())
}

async fn put_route(
    State(shared): State<Arc<NodeShared>>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, Json<serde_json::Value>) {
    if !authorized(&shared, &headers) {
        return unauthorized();
    }
    let table: RouteTable = match serde_json::from_str(&body) {
        Ok(t) => t,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": format!("not a route table: {e}")})),
            )
        }
    };
    let installed = shared.hub.table();
    if let Err(e) = check_offered(&table, installed.as_ref().map(|i| &i.table)) {
        tracing::warn!(offered = table.epoch, "refusing a pushed route table: {e}");
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": format!("route table refused, nothing changed: {e}")})),
        );
    }
    let epoch = table.epoch;
    shared
        .metrics
        .epoch
        .set(epoch.max(shared.hub.epoch()) as i64);
    let installed = shared.hub.install(table);
    (
        StatusCode::OK,
        Json(json!({"epoch": shared.hub.epoch(), "installed": installed, "offered": epoch})),
    )
}

/// How long `PUT /v1/fences` waits for the shards to finish the writes of
/// older generations they accepted (within the control service's
/// `FENCE_PUSH_DEADLINE`, which retries).
const FENCE_WAIT: Duration = Duration::from_secs(3);

/// `PUT /v1/fences`: `[{"volume": V, "fence": F}, ...]` from the control
/// service at a take-over. Answers 200 once every shard refuses mutations
/// of older generations and has none of them in flight.
async fn put_fences(
    State(shared): State<Arc<NodeShared>>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, Json<serde_json::Value>) {
    if !authorized(&shared, &headers) {
        return unauthorized();
    }
    let fences: Vec<celer_meta_api::api::VolumeFence> = match serde_json::from_str(&body) {
        Ok(f) => f,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": format!("not a list of volume fences: {e}")})),
            )
        }
    };
    if fences.len() > FENCES_PUSH_MAX {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"error": format!("{} fences in one push, at most {FENCES_PUSH_MAX}", fences.len())}),
            ),
        );
    }
    let list: Vec<(u64, u32)> = fences.iter().map(|f| (f.volume, f.fence)).collect();
    let hub = shared.clone();
    let r = tokio::task::spawn_blocking(move || hub.hub.set_fences(list, Some(FENCE_WAIT))).await;
    match r {
        Ok(Ok(())) => (StatusCode::OK, Json(json!({"fences": fences.len()}))),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": e}))),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": e.to_string()})),
        ),
    }
}

/// `PUT /v1/layers`: `[VolumeLayers, ...]` from the control service at a
/// snapshot, rollback or clone. Answers 200 once every shard has them and
/// no write it accepted to an era they no longer accept is in flight.
async fn put_layers(
    State(shared): State<Arc<NodeShared>>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, Json<serde_json::Value>) {
    if !authorized(&shared, &headers) {
        return unauthorized();
    }
    let layers: Vec<celer_meta_api::api::VolumeLayers> = match serde_json::from_str(&body) {
        Ok(l) => l,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": format!("not a list of volume layers: {e}")})),
            )
        }
    };
    if let Err(e) = check_layers(&layers) {
        return (StatusCode::BAD_REQUEST, Json(json!({ "error": e })));
    }
    let n = layers.len();
    let hub = shared.clone();
    let r = tokio::task::spawn_blocking(move || hub.hub.set_layers(layers, Some(FENCE_WAIT))).await;
    match r {
        Ok(Ok(())) => (StatusCode::OK, Json(json!({ "layers": n }))),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": e}))),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": e.to_string()})),
        ),
    }
}

/// Most queries in one `POST /v1/layers/usage`.
const USAGE_QUERIES_MAX: usize = 4096;

/// `POST /v1/layers/usage`: `[[key, above], ...]` (layer keys, `above` 0
/// for none) from the control service (`celer snapshot list`): per query
/// the chunk slots of layer `key` on this node, or with `above` those
/// whose every block `above` also holds (what deleting that snapshot
/// frees here). Bearer token required.
async fn layer_usage(
    State(shared): State<Arc<NodeShared>>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, Json<serde_json::Value>) {
    if !authorized(&shared, &headers) {
        return unauthorized();
    }
    let queries: Vec<[u64; 2]> = match serde_json::from_str(&body) {
        Ok(q) => q,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": format!("not a list of [key, above] pairs: {e}")})),
            )
        }
    };
    if queries.len() > USAGE_QUERIES_MAX {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"error": format!("{} queries, at most {USAGE_QUERIES_MAX}", queries.len())}),
            ),
        );
    }
    let hub = shared.clone();
    let r = tokio::task::spawn_blocking(move || hub.hub.layer_usage(queries, FENCE_WAIT)).await;
    match r {
        Ok(Ok(chunks)) => (StatusCode::OK, Json(json!({ "chunks": chunks }))),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": e}))),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": e.to_string()})),
        ),
    }
}

/// Layers a node can hold: bounded lists, eras and lineages that fit a
/// layer key (`celer_device::layer_key`).
pub(crate) fn check_layers(layers: &[celer_meta_api::api::VolumeLayers]) -> Result<(), String> {
    if layers.len() > FENCES_PUSH_MAX {
        return Err(format!(
            "{} volumes in one push, at most {FENCES_PUSH_MAX}",
            layers.len()
        ));
    }
    let lineage_max = 1u64 << celer_device::LINEAGE_BITS;
    for v in layers {
        let eras = std::iter::once(v.head)
            .chain(v.under.iter().copied())
            .chain(
                v.snapshots
                    .iter()
                    .flat_map(|s| std::iter::once(s.era).chain(s.under.iter().copied())),
            );
        if v.lineage == 0 || v.lineage >= lineage_max || v.volume == 0 || v.volume >= lineage_max {
            return Err(format!(
                "volume {}: lineage {} out of range",
                v.volume, v.lineage
            ));
        }
        if eras.clone().any(|e| e > celer_device::ERA_MAX) {
            return Err(format!(
                "volume {}: an era above {}",
                v.volume,
                celer_device::ERA_MAX
            ));
        }
        let longest = std::iter::once(v.under.len())
            .chain(v.snapshots.iter().map(|s| s.under.len()))
            .max()
            .unwrap_or(0);
        if longest > celer_engine::LAYERS_MAX || v.snapshots.len() > 4096 {
            return Err(format!(
                "volume {}: {} layers under one era or {} snapshots (at most {} and 4096)",
                v.volume,
                longest,
                v.snapshots.len(),
                celer_engine::LAYERS_MAX
            ));
        }
    }
    Ok(())
}

/// Most fences in one `PUT /v1/fences` (the control service sends one).
const FENCES_PUSH_MAX: usize = 65_536;

async fn status(State(shared): State<Arc<NodeShared>>) -> Json<serde_json::Value> {
    let (epoch, syncing) = match shared.hub.table() {
        Some(t) => (
            t.table.epoch,
            t.table.syncing_on(shared.id).collect::<Vec<u32>>(),
        ),
        None => (0, Vec::new()),
    };
    let chunks: usize = shared
        .chunks
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum();
    let p = shared.backfill_progress();
    Json(json!({
        "allocated_chunks": chunks,
        "backfill_bytes_done": p.bytes_done,
        "backfill_bytes_total": p.bytes_total,
        "backfill_partitions_unlisted": p.partitions_unlisted,
        "backfill_bytes_copied": p.bytes_copied,
        "node_id": shared.id,
        "shards": shared.shards,
        "epoch": epoch,
        "syncing_partitions": syncing,
    }))
}

/// The scrub's state and figures: paused or not, and per shard the pass
/// under way (chunks done of listed, data bytes), passes finished, the last
/// one's duration and bytes, blocks found damaged.
pub(crate) fn scrub_json(shared: &NodeShared) -> serde_json::Value {
    let r = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let shards: Vec<serde_json::Value> = shared
        .scrub
        .shards
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "shard": i,
                "running": r(&c.running) == 1,
                "chunks_done": r(&c.chunks_done),
                "chunks_total": r(&c.chunks_total),
                "pass_bytes": r(&c.pass_bytes),
                "passes": r(&c.passes),
                "last_pass_ms": r(&c.last_pass_ms),
                "last_pass_bytes": r(&c.last_pass_bytes),
                "bytes": r(&c.bytes),
                "damaged_blocks": r(&c.damaged),
                "behind_blocks": r(&c.behind),
                "mismatched_blocks": r(&c.mismatched),
                "divergent_blocks": r(&c.divergent),
            })
        })
        .collect();
    let sum =
        |f: fn(&crate::shard::ScrubCell) -> u64| -> u64 { shared.scrub.shards.iter().map(f).sum() };
    json!({
        "node_id": shared.id,
        "paused": shared.scrub.paused.load(Ordering::Acquire),
        "running": sum(|c| c.running.load(Ordering::Relaxed)) > 0,
        "passes": shared.scrub.shards.iter().map(|c| r(&c.passes)).min().unwrap_or(0),
        "bytes": sum(|c| c.bytes.load(Ordering::Relaxed)),
        "damaged_blocks": sum(|c| c.damaged.load(Ordering::Relaxed)),
        "behind_blocks": sum(|c| c.behind.load(Ordering::Relaxed)),
        "mismatched_blocks": sum(|c| c.mismatched.load(Ordering::Relaxed)),
        "divergent_blocks": sum(|c| c.divergent.load(Ordering::Relaxed)),
        "shards": shards,
    })
}

async fn scrub_status(State(shared): State<Arc<NodeShared>>) -> Json<serde_json::Value> {
    Json(scrub_json(&shared))
}

/// Most layer keys a scrub start may name.
const SCRUB_KEYS_MAX: usize = 4096;

/// `POST /v1/scrub/start` (a pass now, on every shard not in one; with a
/// body `{"keys": [...]}` over those layer keys' chunks only: one volume),
/// `/v1/scrub/pause`, `/v1/scrub/resume`; an admin ticket or the cluster
/// token required (see [`operator`]).
async fn scrub_control(
    State(shared): State<Arc<NodeShared>>,
    Path(action): Path<String>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, Json<serde_json::Value>) {
    let who = match operator(&shared, &headers) {
        Ok(who) => who,
        Err(e) => {
            tracing::warn!("scrub {action} refused: {e}");
            return (StatusCode::UNAUTHORIZED, Json(json!({ "error": e })));
        }
    };
    match action.as_str() {
        "start" => {
            #[derive(serde::Deserialize)]
            struct Only {
                keys: Vec<u64>,
            }
            let only = if body.trim().is_empty() {
                None
            } else {
                match serde_json::from_str::<Only>(&body) {
                    Ok(o) if o.keys.len() <= SCRUB_KEYS_MAX => Some(Arc::new(o.keys)),
                    Ok(o) => {
                        return (
                            StatusCode::BAD_REQUEST,
                            Json(
                                json!({"error": format!("{} keys, at most {SCRUB_KEYS_MAX}", o.keys.len())}),
                            ),
                        )
                    }
                    Err(e) => {
                        return (
                            StatusCode::BAD_REQUEST,
                            Json(
                                json!({"error": format!("expected {{\"keys\": [layer keys]}} or nothing: {e}")}),
                            ),
                        )
                    }
                }
            };
            *shared
                .scrub
                .start_only
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = only;
            shared.scrub.paused.store(false, Ordering::Release);
            shared.scrub.start_requests.fetch_add(1, Ordering::AcqRel);
        }
        "pause" => shared.scrub.paused.store(true, Ordering::Release),
        "resume" => shared.scrub.paused.store(false, Ordering::Release),
        other => {
            return (
                StatusCode::NOT_FOUND,
                Json(
                    json!({"error": format!("unknown scrub action `{other}`: start, pause or resume")}),
                ),
            )
        }
    }
    tracing::info!(action, operator = %who, "scrub control");
    (StatusCode::OK, Json(scrub_json(&shared)))
}

async fn metrics(State(shared): State<Arc<NodeShared>>) -> (StatusCode, HeaderMap, String) {
    let mut h = HeaderMap::new();
    if let Ok(v) = "application/openmetrics-text; version=1.0.0; charset=utf-8".parse() {
        h.insert("content-type", v);
    }
    (StatusCode::OK, h, shared.metrics.encode())
}
