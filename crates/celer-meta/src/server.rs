//! The control service process: the HTTP/JSON API (axum), the lease
//! checker, and the route pushers.
//!
//! Concurrency: one mutex guards the [`Cluster`]; API handlers and the lease
//! checker take it on blocking threads (store writes fsync), never across an
//! await. A new route table is published on a watch channel after the lock
//! is released; one pusher task per node sends the latest table to
//! `PUT http://{admin_addr}/v1/route`, so a slow node delays nobody and a
//! node never receives an older table after a newer one. A failed push only
//! logs: the node's next heartbeat reply carries the table.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{MatchedPath, Path, RawQuery, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use celer_route::{NodeId, RouteTable};
use serde::de::DeserializeOwned;
use tokio::sync::{oneshot, watch};

use crate::api::{
    AttachVolume, Attachment, AttachmentRecord, CloneVolume, CreateSnapshot, CreateVolume,
    ErrorBody, FlattenVolume, Heartbeat, RegisterNode, ResizeVolume, RestoreLog, Rollback, Synced,
    VolumeFence, VolumeLayers, LOG_PAGE_MAX,
};
use crate::http::{constant_time_eq, HttpLimits};
use crate::metrics::Metrics;
use crate::state::{Cluster, ClusterConfig, Pushed, StateError};
use crate::store::{MetaStore, RedbStore, StoreError};

/// The lease checker runs this often.
pub const LEASE_CHECK_MS: u64 = 100;
/// A route push to one node gives up after this long.
pub const PUSH_TIMEOUT_MS: u64 = 1000;
/// Default listen address.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:7700";
/// Default partition count: 2^8.
pub const PARTITION_BITS_DEFAULT: u8 = 8;
/// Default bound on partitions starting a move at once.
pub const MAX_MOVES_DEFAULT: usize = 64;
/// How long a capability handed to an attaching client is valid (1 hour;
/// clients renew it at a third of that).
pub const CAPABILITY_TTL_MS_DEFAULT: u64 = 3_600_000;
/// How long a down node keeps its places before its partitions move
/// (`--down-grace-s`): 5 minutes (Ceph's down-out interval is 10); a
/// process restart or a reboot fits in it.
pub const DOWN_GRACE_MS_DEFAULT: u64 = 300_000;
/// Default cap on API connections open at once.
pub const CONNECTIONS_MAX_DEFAULT: usize = 1024;
/// Default cap on API connections open at once from one source IP (a
/// hypervisor host holds one long poll per attached volume).
pub const CONNECTIONS_PER_IP_MAX_DEFAULT: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}: is another control service running there?")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the control service runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the control service stopped: {0}")]
    Stopped(String),
}

/// A bearer token and the name the change log records for it.
#[derive(Clone)]
pub struct Token {
    pub name: String,
    pub secret: String,
    pub role: TokenRole,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({})", self.name)
    }
}

/// What a token may do at the control service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenRole {
    /// Everything.
    Operator,
    /// What a storage node needs: register, heartbeat, report synced
    /// partitions, read the route. The first node token (or, without one,
    /// the first token) is also what the nodes are given: the cluster data
    /// key derives from it and route pushes carry it.
    Node,
    /// What a front end needs: read a volume and the route, attach, renew
    /// its attachment's capability.
    Attach,
}

impl TokenRole {
    fn parse(s: &str) -> Option<TokenRole> {
        match s {
            "operator" => Some(TokenRole::Operator),
            "node" => Some(TokenRole::Node),
            "attach" => Some(TokenRole::Attach),
            _ => None,
        }
    }

    /// Whether this role may call `method path` (`path` as routed, e.g.
    /// `/v1/volumes/{name}`).
    pub fn allows(self, method: &Method, path: &str) -> bool {
        let get = method == Method::GET;
        let post = method == Method::POST;
        match self {
            TokenRole::Operator => true,
            TokenRole::Node => matches!(
                (post, get, path),
                (true, _, "/v1/nodes/register")
                    | (true, _, "/v1/nodes/{id}/heartbeat")
                    | (true, _, "/v1/nodes/{id}/synced")
                    | (_, true, "/v1/route")
            ),
            TokenRole::Attach => matches!(
                (post, get, path),
                (_, true, "/v1/volumes/{name}")
                    | (_, true, "/v1/route")
                    | (true, _, "/v1/volumes/{name}/attachments")
                    | (true, _, "/v1/attachments/{id}/renew")
            ),
        }
    }
}

/// Parses a token file: one token per line, `SECRET` (named `operator`),
/// `NAME SECRET` (an operator) or `NAME SECRET ROLE` with ROLE one of
/// `operator`, `node`, `attach`; blank lines and `#` comments are skipped.
pub fn parse_tokens(text: &str) -> Result<Vec<Token>, MetaError> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let (name, secret, role) = match words[..] {
            [s] => ("operator", s, TokenRole::Operator),
            [n, s] => (n, s, TokenRole::Operator),
            [n, s, r] => (
                n,
                s,
                TokenRole::parse(r).ok_or_else(|| {
                    MetaError::Config(format!(
                        "token `{n}`: unknown role `{r}` (operator, node or attach)"
                    ))
                })?,
            ),
            _ => {
                return Err(MetaError::Config(
                    "token file lines must be `SECRET`, `NAME SECRET` or `NAME SECRET ROLE`".into(),
                ))
            }
        };
        out.push(Token {
            name: name.to_string(),
            secret: secret.to_string(),
            role,
        });
    }
    if out.is_empty() {
        return Err(MetaError::Config(
            "no token: the token file is empty (put a secret in it)".into(),
        ));
    }
    Ok(out)
}

/// Where the metadata lives.
#[derive(Clone, Debug)]
pub enum StoreConfig {
    /// `DIR/meta.redb`.
    Redb { dir: PathBuf },
    /// An etcd cluster shared by several control processes.
    #[cfg(feature = "etcd")]
    Etcd(crate::etcd::EtcdConfig),
}

#[derive(Clone, Debug)]
pub struct MetaConfig {
    pub listen: SocketAddr,
    pub store: StoreConfig,
    pub tokens: Vec<Token>,
    pub cluster: ClusterConfig,
    /// Timeouts and connection caps of the API server.
    pub http: HttpLimits,
}

impl MetaConfig {
    /// Defaults: heartbeat 200 ms, lease 1000 ms, 2^8 partitions, 3
    /// replicas, 64 moves, 1 MiB chunks, a redb store in `data_dir`.
    pub fn new(listen: SocketAddr, data_dir: PathBuf, token: &str) -> MetaConfig {
        MetaConfig {
            listen,
            store: StoreConfig::Redb { dir: data_dir },
            tokens: vec![Token {
                name: "operator".into(),
                secret: token.to_string(),
                role: TokenRole::Operator,
            }],
            cluster: ClusterConfig {
                heartbeat_ms: crate::api::HEARTBEAT_MS_DEFAULT,
                lease_ms: crate::api::LEASE_MS_DEFAULT,
                partition_bits: PARTITION_BITS_DEFAULT,
                replicas: celer_route::REPLICAS_DEFAULT,
                max_moves: MAX_MOVES_DEFAULT,
                chunk_bytes: celer_route::CHUNK_BYTES_DEFAULT,
                capability_ttl_ms: CAPABILITY_TTL_MS_DEFAULT,
                down_grace_ms: DOWN_GRACE_MS_DEFAULT,
            },
            http: HttpLimits::with_caps(CONNECTIONS_MAX_DEFAULT, CONNECTIONS_PER_IP_MAX_DEFAULT),
        }
    }

    pub fn validate(&self) -> Result<(), MetaError> {
        let c = &self.cluster;
        let bad = |m: String| Err(MetaError::Config(m));
        if self.tokens.iter().any(|t| t.secret.is_empty()) || self.tokens.is_empty() {
            return bad("a token is required: --token-file FILE, --token or CELER_TOKEN".into());
        }
        if c.heartbeat_ms == 0 || c.lease_ms < 2 * c.heartbeat_ms {
            return bad(format!(
                "lease {} ms must be at least twice the heartbeat {} ms (and the heartbeat > 0)",
                c.lease_ms, c.heartbeat_ms
            ));
        }
        if c.partition_bits > celer_route::PARTITION_BITS_MAX {
            return bad(format!(
                "--partition-bits {} is above the maximum {}",
                c.partition_bits,
                celer_route::PARTITION_BITS_MAX
            ));
        }
        if !(1..=8).contains(&c.replicas) {
            return bad(format!("--replicas {} must be 1 to 8", c.replicas));
        }
        if c.max_moves == 0 {
            return bad("--max-moves must be at least 1".into());
        }
        let h = &self.http;
        if h.connections_max == 0 || h.connections_per_ip_max == 0 {
            return bad("the API connection caps must be at least 1".into());
        }
        if h.header_read_timeout.is_zero() || h.body_timeout.is_zero() {
            return bad("the API header and body timeouts must be above 0".into());
        }
        Ok(())
    }
}

/// An API error reply: `{"error": ...}` with a status.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    leader: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            leader: None,
        }
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> ApiError {
        let status = match &e {
            StateError::BadRequest(_) => StatusCode::BAD_REQUEST,
            StateError::NotFound(_) => StatusCode::NOT_FOUND,
            StateError::Conflict(_) => StatusCode::CONFLICT,
            StateError::Store(StoreError::Conflict { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            StateError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = match &e {
            StateError::Store(s) => {
                tracing::error!("metadata store: {s}");
                format!("the control service could not save the change ({s}): nothing was changed; check its log and retry")
            }
            e => e.to_string(),
        };
        ApiError::new(status, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
                leader: self.leader,
            }),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Who made the request, for the change log.
#[derive(Clone)]
struct Who(String);

/// Leadership of this process over the store.
pub(crate) enum Role {
    /// Serving: the state is loaded.
    Leader(Box<Cluster>),
    /// Not serving; the leader's base URL when known.
    Follower(Option<String>),
}

pub(crate) struct Shared {
    pub(crate) role: Mutex<Role>,
    pub(crate) store: Arc<dyn MetaStore>,
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) cluster_cfg: ClusterConfig,
    tokens: Vec<Token>,
    /// The latest table, for the pushers.
    routes: watch::Sender<Option<Arc<RouteTable>>>,
    /// Bumped after every committed change: long polls wake on it.
    changed: watch::Sender<u64>,
    /// Set when the server starts to shut down: long polls answer at once.
    closing: watch::Sender<bool>,
    /// Nodes with a pusher task.
    pushers: Mutex<HashSet<NodeId>>,
    push_token: String,
    /// The cluster data key (from the node token): capabilities are signed
    /// with it.
    data_key: celer_proto::auth::Key,
    pub(crate) metrics: Metrics,
    rt: tokio::runtime::Handle,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the state as the last committed
    // change made it (changes are copy-then-swap): keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Publishes a new table and starts pushers for nodes without one.
    pub(crate) fn publish(self: &Arc<Self>, pushed: Pushed, nodes: &[NodeId]) {
        if let Some(t) = pushed {
            self.routes.send_replace(Some(Arc::new(t)));
        }
        let mut pushers = lock(&self.pushers);
        for id in nodes {
            if pushers.insert(*id) {
                let rx = self.routes.subscribe();
                let token = self.push_token.clone();
                self.rt.spawn(push_worker(*id, rx, token));
            }
        }
    }

    /// Runs `f` on the cluster state on a blocking thread, then publishes
    /// any new table.
    async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Cluster, &dyn MetaStore) -> Result<(T, Pushed), StateError> + Send + 'static,
    {
        let me = self.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let mut role = lock(&me.role);
            let cluster = match &mut *role {
                Role::Leader(c) => c,
                Role::Follower(leader) => {
                    return Err(not_leader(leader.clone()));
                }
            };
            let r = f(cluster, me.store.as_ref());
            if let Err(StateError::Store(StoreError::Conflict { .. })) = &r {
                // Someone else appended to the log: we no longer lead.
                tracing::warn!("change log conflict: stepping down");
                *role = Role::Follower(None);
            }
            let (v, pushed) = r?;
            let nodes = cluster_node_ids(&role);
            drop(role);
            me.publish(pushed, &nodes);
            me.changed.send_modify(|n| *n = n.wrapping_add(1));
            Ok(v)
        })
        .await;
        joined.map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("internal error: {e}"),
            )
        })?
    }

    /// Read-only access (no store write, no blocking).
    fn read<T>(&self, f: impl FnOnce(&Cluster) -> Result<T, StateError>) -> Result<T, ApiError> {
        match &*lock(&self.role) {
            Role::Leader(c) => Ok(f(c)?),
            Role::Follower(leader) => Err(not_leader(leader.clone())),
        }
    }
}

fn cluster_node_ids(role: &Role) -> Vec<NodeId> {
    match role {
        Role::Leader(c) => c.node_ids(),
        Role::Follower(_) => Vec::new(),
    }
}

fn not_leader(leader: Option<String>) -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: match &leader {
            Some(l) => format!("this control process does not lead: send requests to {l}"),
            None => "this control process does not lead and no leader is known yet: retry in a few seconds".into(),
        },
        leader,
    }
}

/// Sends the latest table to node `id` whenever it changes.
async fn push_worker(id: NodeId, mut rx: watch::Receiver<Option<Arc<RouteTable>>>, token: String) {
    loop {
        let table = rx.borrow_and_update().clone();
        if let Some(t) = table {
            let target = t.node(id).filter(|n| n.up).map(|n| n.admin_addr.clone());
            if let Some(addr) = target {
                let token = token.clone();
                let epoch = t.epoch;
                let r = tokio::task::spawn_blocking(move || push_route(&addr, &token, &t)).await;
                match r {
                    Ok(Ok(())) => tracing::debug!(node = id, epoch, "route pushed"),
                    Ok(Err(e)) => tracing::info!(
                        node = id,
                        epoch,
                        "route push failed (the next heartbeat reply carries it): {e}"
                    ),
                    Err(e) => tracing::warn!(node = id, "route push task failed: {e}"),
                }
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn push_route(admin_addr: &str, token: &str, t: &RouteTable) -> Result<(), String> {
    let url = format!("http://{admin_addr}/v1/route");
    ureq::AgentBuilder::new()
        .timeout(Duration::from_millis(PUSH_TIMEOUT_MS))
        .redirects(0)
        .build()
        .put(&url)
        .set("Authorization", &format!("Bearer {token}"))
        .send_json(t)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("request body is not valid JSON for this request: {e}"),
        )
    })
}

fn parse_node_id(s: &str) -> Result<NodeId, ApiError> {
    s.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("`{s}` is not a node id (a number)"),
        )
    })
}

async fn auth(
    State(st): State<Arc<Shared>>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing `Authorization: Bearer TOKEN`: pass the cluster token (--token or CELER_TOKEN)",
        ));
    };
    // Every token is compared, matching or not: the time taken does not
    // tell which one matched or how far a guess got.
    let mut found = None;
    for t in &st.tokens {
        if constant_time_eq(t.secret.as_bytes(), presented.as_bytes()) && found.is_none() {
            found = Some(t);
        }
    }
    let Some(token) = found else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the token is not valid for this cluster: check --token or CELER_TOKEN",
        ));
    };
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("", |p| p.as_str());
    if !token.role.allows(req.method(), path) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "token `{}` ({:?}) may not {} {path}: use an operator token",
                token.name,
                token.role,
                req.method()
            ),
        ));
    }
    req.extensions_mut().insert(Who(token.name.clone()));
    Ok(next.run(req).await)
}

async fn count_requests(State(st): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    st.metrics
        .http_request(method, path, resp.status().as_u16());
    resp
}

async fn register(State(st): State<Arc<Shared>>, body: Bytes) -> ApiResult<crate::api::Registered> {
    let req: RegisterNode = parse_body(&body)?;
    st.run(move |c, s| c.register(s, req)).await.map(Json)
}

async fn heartbeat(
    State(st): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<crate::api::HeartbeatReply> {
    let id = parse_node_id(&id)?;
    let req: Heartbeat = parse_body(&body)?;
    st.run(move |c, s| c.heartbeat(s, id, &req)).await.map(Json)
}

async fn synced(
    State(st): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<crate::api::SyncedReply> {
    let id = parse_node_id(&id)?;
    let req: Synced = parse_body(&body)?;
    st.run(move |c, s| c.synced(s, id, req.epoch, &req.partitions))
        .await
        .map(Json)
}

async fn nodes(State(st): State<Arc<Shared>>) -> ApiResult<Vec<crate::api::NodeStatus>> {
    st.read(|c| Ok(c.nodes())).map(Json)
}

async fn route(State(st): State<Arc<Shared>>) -> ApiResult<RouteTable> {
    st.read(|c| {
        c.table().cloned().ok_or_else(|| {
            StateError::NotFound(format!(
                "no route table yet: fewer than {} nodes registered",
                c.config().replicas
            ))
        })
    })
    .map(Json)
}

/// `POST /v1/admin-ticket` (operators only): a ticket for the nodes' admin
/// controls (`celer scrub`), signed with the data key, naming the caller's
/// token (see `celer_proto::auth::AdminTicket`).
async fn admin_ticket(
    State(st): State<Arc<Shared>>,
    Extension(who): Extension<Who>,
) -> Json<crate::api::AdminTicketReply> {
    let expires_unix_ms = crate::state::unix_ms() + celer_proto::auth::AdminTicket::TTL_MS;
    let ticket = celer_proto::auth::AdminTicket::mint(&st.data_key, &who.0, expires_unix_ms);
    tracing::info!(operator = %who.0, "admin ticket issued");
    Json(crate::api::AdminTicketReply {
        ticket,
        expires_unix_ms,
    })
}

async fn split(
    State(st): State<Arc<Shared>>,
    Extension(who): Extension<Who>,
) -> ApiResult<RouteTable> {
    st.run(move |c, s| c.split(s, &who.0)).await.map(Json)
}

async fn create_volume(
    State(st): State<Arc<Shared>>,
    Extension(who): Extension<Who>,
    body: Bytes,
) -> Result<(StatusCode, Json<crate::api::Volume>), ApiError> {
    let req: CreateVolume = parse_body(&body)?;
    let v = st
        .run(move |c, s| Ok((c.create_volume(s, &who.0, req)?, None)))
        .await?;
    Ok((StatusCode::CREATED, Json(v)))
}

async fn volumes(State(st): State<Arc<Shared>>) -> ApiResult<Vec<crate::api::Volume>> {
    st.read(|c| Ok(c.volumes())).map(Json)
}

/// `GET /v1/volumes/{name}`; with `?size=N&wait_ms=M` a long poll: answers
/// as soon as the volume's size is not N (it was resized), or after M ms
/// (at most [`crate::api::VOLUME_WAIT_MS_MAX`]) with the volume as it is.
/// How attachments follow an online resize without polling.
async fn volume(
    State(st): State<Arc<Shared>>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<crate::api::Volume> {
    let (mut known, mut wait_ms) = (None, 0u64);
    for (k, n) in numeric_query(q.as_deref(), &["size", "wait_ms"])? {
        match k {
            "size" => known = Some(n),
            _ => wait_ms = n.min(crate::api::VOLUME_WAIT_MS_MAX),
        }
    }
    let mut changed = st.changed.subscribe();
    let mut closing = st.closing.subscribe();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(wait_ms);
    loop {
        let v = st.read(|c| c.volume(&name))?;
        if known.is_none_or(|k| k != v.size_bytes) || wait_ms == 0 || *closing.borrow() {
            return Ok(Json(v));
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return Ok(Json(v)) },
            _ = closing.changed() => return Ok(Json(v)),
            _ = tokio::time::sleep_until(deadline) => return Ok(Json(v)),
        }
    }
}

async fn resize_volume(
    State(st): State<Arc<Shared>>,
    Extension(who): Extension<Who>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<crate::api::Volume> {
    let req: ResizeVolume = parse_body(&body)?;
    st.run(move |c, s| Ok((c.resize_volume(s, &who.0, &name, req.size_bytes)?, None)))
        .await
        .map(Json)
}

/// A capability for `a`, valid for the configured time from now.
fn mint(st: &Shared, v: crate::api::Volume, a: AttachmentRecord) -> Attachment {
    let expires_unix_ms = crate::state::unix_ms() + st.cluster_cfg.capability_ttl_ms;
    let cap = celer_proto::auth::Capability::mint(
        &st.data_key,
        v.id,
        a.id,
        a.fence,
        a.read_only,
        expires_unix_ms,
    );
    Attachment {
        capability: cap.to_hex(),
        key: celer_proto::auth::to_hex(&cap.attachment_key(&st.data_key)),
        expires_unix_ms,
        attachment: a,
        volume: v,
    }
}

async fn attach_volume(
    State(st): State<Arc<Shared>>,
    Extension(who): Extension<Who>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Attachment> {
    let req: AttachVolume = if body.is_empty() {
        AttachVolume::default()
    } else {
        parse_body(&body)?
    };
    let at = st
        .run(move |c, s| Ok((c.attach(s, &who.0, &name, &req)?, None)))
        .await?;
    if let Some(targets) = at.fenced {
        let fence = VolumeFence {
            volume: at.volume.id,
            fence: at.volume.fence,
        };
        if let Err(e) = push_fence(&st, fence, targets).await {
            // Not handed out: the caller retries (raising the generation
            // again). The generation stays raised: nobody holds it.
            let id = at.attachment.id;
            let who = format!("fence push of attachment {id}");
            let _ = st.run(move |c, s| Ok((c.detach(s, &who, id)?, None))).await;
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "volume `{}`: fence generation {} not confirmed by every live node, not attached: {e}; retry",
                    at.volume.name, fence.fence
                ),
            ));
        }
        tracing::info!(
            volume = %at.volume.name,
            fence = fence.fence,
            taken_over = ?at.taken_over,
            attachment = at.attachment.id,
            "fence generation raised on every live node"
        );
    }
    Ok(Json(mint(&st, at.volume, at.attachment)))
}

/// How long an attach waits for the live nodes to confirm a new fence
/// generation (a node that stops answering is marked down within its
/// lease, and then no longer waited for).
pub const FENCE_PUSH_DEADLINE: Duration = Duration::from_secs(8);

/// Installs `fence` on every node of `targets` (`PUT /v1/fences`); a node
/// answers once it refuses older generations and its writes of them
/// already accepted are done. Retried until [`FENCE_PUSH_DEADLINE`]; a
/// node marked down meanwhile is skipped (it gets the generation with its
/// registration or next heartbeat reply, before it serves again).
async fn push_fence(
    st: &Arc<Shared>,
    fence: VolumeFence,
    targets: Vec<(NodeId, String)>,
) -> Result<(), String> {
    push_to_live_nodes(st, targets, "fence generation", move |a, t| {
        put_fences(a, t, &[fence])
    })
    .await
}

/// Installs volume layers on every node of `targets` (`PUT /v1/layers`),
/// as [`push_fence`]: a node answers once it refuses writes to eras the
/// layers no longer accept (except `cutting`) and its writes to them
/// already accepted are done.
async fn push_layers(
    st: &Arc<Shared>,
    layers: VolumeLayers,
    targets: Vec<(NodeId, String)>,
) -> Result<(), String> {
    push_to_live_nodes(st, targets, "volume layers", move |a, t| {
        put_admin(a, t, "/v1/layers", std::slice::from_ref(&layers))
    })
    .await
}

/// Runs `put(admin address, token)` against every node of `targets` in
/// parallel, each retried until [`FENCE_PUSH_DEADLINE`]; a node marked
/// down meanwhile is skipped (it gets the state with its registration or
/// next heartbeat reply, before it serves again).
async fn push_to_live_nodes<F>(
    st: &Arc<Shared>,
    targets: Vec<(NodeId, String)>,
    what: &'static str,
    put: F,
) -> Result<(), String>
where
    F: Fn(&str, &str) -> Result<(), String> + Clone + Send + Sync + 'static,
{
    let deadline = tokio::time::Instant::now() + FENCE_PUSH_DEADLINE;
    let mut tasks = tokio::task::JoinSet::new();
    for (id, addr) in targets {
        let st = st.clone();
        let token = st.push_token.clone();
        let put = put.clone();
        tasks.spawn(async move {
            loop {
                let (a, t, put) = (addr.clone(), token.clone(), put.clone());
                let last = match tokio::task::spawn_blocking(move || put(&a, &t)).await {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(e)) => e,
                    Err(e) => e.to_string(),
                };
                if !st.read(|c| Ok(c.node_up(id))).unwrap_or(true) {
                    tracing::info!(
                        node = id,
                        "node went down during a push of {what}: it gets them when it comes back"
                    );
                    return Ok(());
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!("node {id} ({addr}): {last}"));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    let mut failed = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed.push(e),
            Err(e) => failed.push(e.to_string()),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

fn put_fences(admin_addr: &str, token: &str, fences: &[VolumeFence]) -> Result<(), String> {
    put_admin(admin_addr, token, "/v1/fences", fences)
}

fn put_admin<T: serde::Serialize + ?Sized>(
    admin_addr: &str,
    token: &str,
    path: &str,
    body: &T,
) -> Result<(), String> {
    let url = format!("http://{admin_addr}{path}");
    ureq::AgentBuilder::new()
        .timeout(Duration::from_millis(PUSH_TIMEOUT_MS * 10))
        .redirects(0)
        .build()
        .put(&url)
        .set("Authorization", &format!("Bearer {token}"))
        .send_json(body)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// POSTs `body` as JSON to a node's admin API and returns its JSON answer.
fn post_admin<T: serde::Serialize + ?Sized, R: serde::de::DeserializeOwned>(
    admin_addr: &str,
    token: &str,
    path: &str,
    body: &T,
) -> Result<R, String> {
    let url = format!("http://{admin_addr}{path}");
    ureq::AgentBuilder::new()
        .timeout(Duration::from_millis(PUSH_TIMEOUT_MS * 10))
        .redirects(0)
        .build()
        .post(&url)
        .set("Authorization", &format!("Bearer {token}"))
        .send_json(body)
        .map_err(|e| e.to_string())?
        .into_json()
        .map_err(|e| e.to_string())
}

/// Pushes a volume's changed layers to every live node. After a snapshot
/// they name the era being cut (writes naming it still land in it, so
/// every replica that receives one puts it in the snapshot) for
/// `SNAPSHOT_CUT_MS`; the heartbeat replies after that seal it. Err: a live
/// node did not confirm (the change stays recorded: nodes get it with
/// their next heartbeat reply; the caller says so).
async fn install_layers(st: &Arc<Shared>, v: &crate::api::Volume) -> Result<(), ApiError> {
    let (targets, now_unix_ms) = st.read(|c| Ok((c.fence_targets(), c.clock().unix_ms())))?;
    let layers = v.layers_at(now_unix_ms);
    let unconfirmed = |e: String| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "volume `{}`: the new layers are recorded but not confirmed by every live node ({e}); nodes get them with their next heartbeat",
                v.name
            ),
        )
    };
    push_layers(st, layers, targets).await.map_err(unconfirmed)
}

async fn create_snapshot(
    State(st): State<Arc<Shared>>,
    Extension(who): Extension<Who>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<crate::api::Snapshot> {
    let req: CreateSnapshot = parse_body(&body)?;
    let (v, snap) = st
        .run(move |c, s| Ok((c.create_snapshot(s, &who.0, &name, &req.name)?, None)))
        .await?;
    install_layers(&st, &v).await?;
    tracing::info!(volume = %v.name, snapshot = %snap.name, era = snap.era, head = v.head_era, "snapshot taken");
    Ok(Json(snap))
}

async fn delete_snapshot(
    State(st): State<Arc<Shared>>,
    Extension(who): Extension<Who>,
    Path((name, snap)): Path<(String, String)>,
) -> ApiResult<crate::api::Volume> {
    let v = st
        .run(move |c, s| Ok((c.delete_snapshot(s, &who.0, &name, &snap)?, None)))
        .await?;
    install_layers(&st, &v).await?;
    Ok(Json(v))
}

/// `GET /v1/volumes/{name}/snapshot-usage`: asks every live node for the
/// chunk slots each snapshot alone holds (`POST /v1/layers/usage`) and
/// sums them. 503 naming the node when one does not answer.
async fn snapshot_usage(
    State(st): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> ApiResult<Vec<crate::api::SnapshotUsage>> {
    let (snaps, targets, chunk_bytes) = st.read(move |c| {
        Ok((
            c.snapshot_usage_queries(&name)?,
            c.fence_targets(),
            c.table().map_or(0, |t| t.chunk_bytes),
        ))
    })?;
    let queries: Vec<[u64; 2]> = snaps.iter().filter_map(|(_, q)| *q).collect();
    let token = st.push_token.clone();
    let mut tasks = tokio::task::JoinSet::new();
    for (id, addr) in targets {
        let (q, t) = (queries.clone(), token.clone());
        tasks.spawn_blocking(move || {
            post_admin::<_, serde_json::Value>(&addr, &t, "/v1/layers/usage", &q)
                .and_then(|v| {
                    serde_json::from_value::<Vec<u64>>(v["chunks"].clone())
                        .map_err(|e| e.to_string())
                })
                .and_then(|c| {
                    if c.len() == q.len() {
                        Ok(c)
                    } else {
                        Err(format!("{} counts for {} queries", c.len(), q.len()))
                    }
                })
                .map_err(|e| format!("node {id} ({addr}): {e}"))
        });
    }
    let mut sums = vec![0u64; queries.len()];
    while let Some(r) = tasks.join_next().await {
        let counts = r
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e))?;
        for (s, c) in sums.iter_mut().zip(counts) {
            *s += c;
        }
    }
    let mut sums = sums.into_iter();
    Ok(Json(
        snaps
            .into_iter()
            .map(|(s, q)| {
                let alone = q.and_then(|_| sums.next());
                crate::api::SnapshotUsage {
                    name: s.name,
                    era: s.era,
                    alone_chunks: alone,
                    alone_bytes: alone.map(|c| c * chunk_bytes),
                }
            })
            .collect(),
    ))
}

async fn rollback_volume(
    State(st): State<Arc<Shared>>,
    Extension(who): Extension<Who>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<crate::api::Volume> {
    let req: Rollback = parse_body(&body)?;
    let v = st
        .run(move |c, s| Ok((c.rollback(s, &who.0, &name, &req.snapshot)?, None)))
        .await?;
    install_layers(&st, &v).await?;
    Ok(Json(v))
}

async fn clone_volume(
    State(st): State<Arc<Shared>>,
    Extension(who): Extension<Who>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<crate::api::Volume> {
    let req: CloneVolume = parse_body(&body)?;
    let v = st
        .run(move |c, s| Ok((c.clone_volume(s, &who.0, &name, &req)?, None)))
        .await?;
    install_layers(&st, &v).await?;
    Ok(Json(v))
}

async fn flatten_volume(
    State(st): State<Arc<Shared>>,
    Extension(who): Extension<Who>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<crate::api::Volume> {
    let req: FlattenVolume = parse_body(&body)?;
    let v = st
        .run(move |c, s| Ok((c.flatten_volume(s, &who.0, &name, &req)?, None)))
        .await?;
    install_layers(&st, &v).await?;
    tracing::info!(volume = %v.name, head = v.head_era, "volume flattened");
    Ok(Json(v))
}

async fn renew_attachment(
    State(st): State<Arc<Shared>>,
    Path(id): Path<u32>,
) -> ApiResult<Attachment> {
    let (v, a) = st.run(move |c, _| Ok((c.attachment(id)?, None))).await?;
    Ok(Json(mint(&st, v, a)))
}

async fn attachments(State(st): State<Arc<Shared>>) -> ApiResult<Vec<AttachmentRecord>> {
    st.run(move |c, _| Ok((c.attachments(), None)))
        .await
        .map(Json)
}

async fn detach(
    State(st): State<Arc<Shared>>,
    Extension(who): Extension<Who>,
    Path(id): Path<u32>,
) -> ApiResult<AttachmentRecord> {
    st.run(move |c, s| Ok((c.detach(s, &who.0, id)?, None)))
        .await
        .map(Json)
}

async fn delete_volume(
    State(st): State<Arc<Shared>>,
    Extension(who): Extension<Who>,
    Path(name): Path<String>,
) -> ApiResult<crate::api::Volume> {
    st.run(move |c, s| Ok((c.delete_volume(s, &who.0, &name)?, None)))
        .await
        .map(Json)
}

/// Parses a query string of `name=N` pairs, each name one of `names`; an
/// unknown name or a value that is not a number is a 400 that says what to
/// use. Returns the pairs in order, names as given in `names`.
fn numeric_query<'n>(q: Option<&str>, names: &[&'n str]) -> Result<Vec<(&'n str, u64)>, ApiError> {
    let mut out = Vec::new();
    for kv in q.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let Some(name) = names.iter().find(|n| **n == k) else {
            let usage: Vec<String> = names.iter().map(|n| format!("{n}=N")).collect();
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("unknown query parameter `{k}`: use {}", usage.join(" and ")),
            ));
        };
        let n = v.parse::<u64>().map_err(|_| {
            ApiError::new(StatusCode::BAD_REQUEST, format!("{k}={v}: not a number"))
        })?;
        out.push((*name, n));
    }
    Ok(out)
}

async fn log(
    State(st): State<Arc<Shared>>,
    RawQuery(q): RawQuery,
) -> ApiResult<Vec<crate::api::LogEntry>> {
    let (mut since, mut limit) = (0u64, LOG_PAGE_MAX);
    for (k, n) in numeric_query(q.as_deref(), &["since", "limit"])? {
        match k {
            "since" => since = n,
            _ => limit = n.min(LOG_PAGE_MAX as u64) as usize,
        }
    }
    st.run(move |c, s| Ok((c.log(s, since, limit)?, None)))
        .await
        .map(Json)
}

async fn restore(
    State(st): State<Arc<Shared>>,
    Extension(who): Extension<Who>,
    body: Bytes,
) -> ApiResult<crate::api::Restored> {
    let req: RestoreLog = parse_body(&body)?;
    st.run(move |c, s| c.restore(s, &who.0, req.seq))
        .await
        .map(Json)
}

async fn status(State(st): State<Arc<Shared>>) -> ApiResult<crate::api::Status> {
    st.read(|c| Ok(c.status())).map(Json)
}

async fn metrics(State(st): State<Arc<Shared>>) -> Response {
    let text = {
        let role = lock(&st.role);
        let (status, leader) = match &*role {
            Role::Leader(c) => (Some(c.status()), true),
            Role::Follower(_) => (None, false),
        };
        st.metrics.encode(status.as_ref(), leader)
    };
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {method} {uri} (see the API in celer_meta::api)"),
    )
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

pub(crate) fn router(st: Arc<Shared>) -> Router {
    let v1 = Router::new()
        .route("/v1/nodes/register", post(register))
        .route("/v1/nodes/{id}/heartbeat", post(heartbeat))
        .route("/v1/nodes/{id}/synced", post(synced))
        .route("/v1/nodes", get(nodes))
        .route("/v1/route", get(route))
        .route("/v1/route/split", post(split))
        .route("/v1/admin-ticket", post(admin_ticket))
        .route("/v1/volumes", post(create_volume).get(volumes))
        .route("/v1/volumes/{name}", get(volume).delete(delete_volume))
        .route("/v1/volumes/{name}/resize", post(resize_volume))
        .route("/v1/volumes/{name}/attachments", post(attach_volume))
        .route("/v1/volumes/{name}/snapshots", post(create_snapshot))
        .route(
            "/v1/volumes/{name}/snapshots/{snap}",
            delete(delete_snapshot),
        )
        .route("/v1/volumes/{name}/snapshot-usage", get(snapshot_usage))
        .route("/v1/volumes/{name}/rollback", post(rollback_volume))
        .route("/v1/volumes/{name}/clone", post(clone_volume))
        .route("/v1/volumes/{name}/flatten", post(flatten_volume))
        .route("/v1/attachments", get(attachments))
        .route("/v1/attachments/{id}", delete(detach))
        .route("/v1/attachments/{id}/renew", post(renew_attachment))
        .route("/v1/log", get(log))
        .route("/v1/log/restore", post(restore))
        .route("/v1/status", get(status))
        .route_layer(axum::middleware::from_fn_with_state(st.clone(), auth));
    Router::new()
        .merge(v1)
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            st.clone(),
            count_requests,
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(st)
}

/// Marks down nodes whose lease expired, every [`LEASE_CHECK_MS`].
async fn lease_checker(st: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(LEASE_CHECK_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let me = st.clone();
        let r = tokio::task::spawn_blocking(move || {
            let mut role = lock(&me.role);
            let Role::Leader(c) = &mut *role else {
                return;
            };
            match c.expire_leases(me.store.as_ref()) {
                Ok(pushed) => {
                    let nodes = c.node_ids();
                    drop(role);
                    me.publish(pushed, &nodes);
                }
                Err(StateError::Store(StoreError::Conflict { .. })) => {
                    tracing::warn!("change log conflict: stepping down");
                    *role = Role::Follower(None);
                }
                Err(e) => tracing::error!("lease check failed: {e}"),
            }
        })
        .await;
        if let Err(e) = r {
            tracing::error!("lease check task failed: {e}");
        }
    }
}

/// A running control service (its own thread and runtime). Dropping it
/// stops it.
#[derive(Debug)]
pub struct MetaServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), MetaError>>>,
}

impl MetaServer {
    /// Opens the store, binds the listener and starts serving; returns once
    /// requests can be sent (`listen` port 0 picks a free port: see
    /// [`MetaServer::addr`]).
    pub fn start(cfg: MetaConfig) -> Result<MetaServer, MetaError> {
        cfg.validate()?;
        let listener =
            std::net::TcpListener::bind(cfg.listen).map_err(|source| MetaError::Listen {
                addr: cfg.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| MetaError::Listen {
            addr: cfg.listen,
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| MetaError::Listen { addr, source })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("celer-meta")
            .enable_all()
            .build()
            .map_err(MetaError::Runtime)?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), MetaError>>();
        let thread = std::thread::Builder::new()
            .name("celer-meta".into())
            .spawn(move || rt.block_on(run_server(cfg, listener, addr, stop_rx, ready_tx)))
            .map_err(MetaError::Runtime)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(MetaServer {
                addr,
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => match thread.join() {
                Ok(Err(e)) => Err(e),
                _ => Err(MetaError::Stopped(
                    "the server thread exited at start".into(),
                )),
            },
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and waits for the server thread.
    pub fn stop(mut self) -> Result<(), MetaError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), MetaError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(MetaError::Stopped("the server thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for MetaServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            tracing::warn!("control service stopped with: {e}");
        }
    }
}

async fn run_server(
    cfg: MetaConfig,
    listener: std::net::TcpListener,
    addr: SocketAddr,
    stop: oneshot::Receiver<()>,
    ready: std::sync::mpsc::Sender<Result<(), MetaError>>,
) -> Result<(), MetaError> {
    let started = async {
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|source| MetaError::Listen { addr, source })?;
        #[cfg(feature = "etcd")]
        let mut etcd_store = None;
        let (store, role): (Arc<dyn MetaStore>, Role) = match &cfg.store {
            StoreConfig::Redb { dir } => {
                let dir = dir.clone();
                let cc = cfg.cluster.clone();
                tokio::task::spawn_blocking(move || {
                    let store = RedbStore::open_dir(&dir)?;
                    let cluster = Cluster::load(cc, &store, Arc::new(crate::state::SystemClock))?;
                    Ok::<_, MetaError>((
                        Arc::new(store) as Arc<dyn MetaStore>,
                        Role::Leader(Box::new(cluster)),
                    ))
                })
                .await
                .map_err(|e| MetaError::Stopped(e.to_string()))??
            }
            #[cfg(feature = "etcd")]
            StoreConfig::Etcd(e) => {
                let store = Arc::new(crate::etcd::EtcdStore::connect(e).await?);
                etcd_store = Some(store.clone());
                (store as Arc<dyn MetaStore>, Role::Follower(None))
            }
        };
        // What the nodes are given: the first node token, else the first.
        let push_token = cfg
            .tokens
            .iter()
            .find(|t| t.role == TokenRole::Node)
            .or(cfg.tokens.first())
            .map(|t| t.secret.clone())
            .unwrap_or_default();
        let (routes, _) = watch::channel(None);
        let (changed, _) = watch::channel(0);
        let (closing, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            role: Mutex::new(role),
            store,
            cluster_cfg: cfg.cluster.clone(),
            tokens: cfg.tokens.clone(),
            routes,
            changed,
            closing,
            pushers: Mutex::new(HashSet::new()),
            data_key: celer_proto::auth::data_key_from_secret(&push_token),
            push_token,
            metrics: Metrics::new(),
            rt: tokio::runtime::Handle::current(),
        });
        // Pushers for the nodes known at start: they get the current table.
        let (table, nodes) = match &*lock(&shared.role) {
            Role::Leader(c) => (c.table().cloned(), c.node_ids()),
            Role::Follower(_) => (None, Vec::new()),
        };
        shared.publish(table, &nodes);
        #[cfg(not(feature = "etcd"))]
        let etcd_store: Option<()> = None;
        Ok::<_, MetaError>((listener, shared, etcd_store))
    }
    .await;
    let (listener, shared, _etcd_store) = match started {
        Ok(v) => v,
        Err(e) => {
            let _ = ready.send(Err(MetaError::Stopped(e.to_string())));
            return Err(e);
        }
    };
    let _ = ready.send(Ok(()));
    tracing::info!(%addr, "control service listening");
    let checker = tokio::spawn(lease_checker(shared.clone()));
    #[cfg(feature = "etcd")]
    let elector = match (&cfg.store, _etcd_store) {
        (StoreConfig::Etcd(e), Some(store)) => Some(tokio::spawn(crate::etcd::lead(
            shared.clone(),
            store,
            e.clone(),
        ))),
        _ => None,
    };
    let app = router(shared.clone());
    let closing = shared.clone();
    let checker_abort = checker.abort_handle();
    crate::http::serve(listener, app, cfg.http.clone(), async move {
        let _ = stop.await;
        // A control service on its way out decides nothing: while the
        // server drains, heartbeats are no longer taken, and the lease
        // checker would mark every node down and reroute (the next
        // start would then re-copy every partition).
        checker_abort.abort();
        // Long polls answer now instead of holding the drain.
        closing.closing.send_replace(true);
    })
    .await;
    checker.abort();
    #[cfg(feature = "etcd")]
    if let Some(e) = elector {
        e.abort();
    }
    Ok(())
}

/// `celer meta serve`: serves until SIGINT or SIGTERM.
pub fn serve(cfg: MetaConfig) -> Result<(), MetaError> {
    let server = MetaServer::start(cfg)?;
    tracing::info!("control service at {}", server.url());
    wait_for_signal()?;
    tracing::info!("stopping");
    server.stop()
}

fn wait_for_signal() -> Result<(), MetaError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(MetaError::Runtime)?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(MetaError::Runtime)?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.map_err(MetaError::Runtime),
            _ = term.recv() => Ok(()),
        }
    })
}
