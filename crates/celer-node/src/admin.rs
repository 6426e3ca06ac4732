//! The node's admin HTTP server: `PUT /v1/route` (the control service pushes
//! tables here; bearer token required), `GET /v1/status` (including the
//! backfill figures, see `BackfillProgress`), `GET /metrics`.

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, put};
use axum::{Json, Router};
use celer_route::RouteTable;
use serde_json::json;

use crate::NodeShared;

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
            .route("/v1/status", get(status))
            .route("/metrics", get(metrics))
            .with_state(shared.clone());
        let stop = async move {
            while !shared.stopping.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!("admin server: {e}");
        }
        tracing::info!("admin server stopped");
    });
}

fn authorized(shared: &NodeShared, headers: &HeaderMap) -> bool {
    let want = format!("Bearer {}", shared.token);
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == want)
}

async fn put_route(
    State(shared): State<Arc<NodeShared>>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, Json<serde_json::Value>) {
    if !authorized(&shared, &headers) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "missing or wrong bearer token: present the cluster token"})),
        );
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
    if let Err(e) = table.validate() {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": format!("invalid route table: {e}")})),
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

async fn metrics(State(shared): State<Arc<NodeShared>>) -> (StatusCode, HeaderMap, String) {
    let mut h = HeaderMap::new();
    if let Ok(v) = "application/openmetrics-text; version=1.0.0; charset=utf-8".parse() {
        h.insert("content-type", v);
    }
    (StatusCode::OK, h, shared.metrics.encode())
}
