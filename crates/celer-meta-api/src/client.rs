//! [`MetaClient`]: the blocking client of the control service's API, for
//! storage nodes (from a plain thread) and the `celer` CLI.
//!
//! The base URL may list several control processes separated by commas
//! (`http://a:7700,http://b:7700`): a request goes to the one that answered
//! last, then to the others when it cannot be reached; a 503 naming the
//! leader is retried once at the leader.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use celer_route::{NodeId, RouteTable};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{
    AttachVolume, Attachment, AttachmentRecord, CreateVolume, ErrorBody, Heartbeat, HeartbeatReply,
    LogEntry, NodeStatus, RegisterNode, Registered, ResizeVolume, RestoreLog, Restored, Status,
    Synced, SyncedReply, Volume,
};

/// Connecting to the control service gives up after this long.
pub const CONNECT_TIMEOUT_MS: u64 = 2000;
/// A whole request (connect, send, receive) gives up after this long.
pub const REQUEST_TIMEOUT_MS: u64 = 10_000;
/// How long a call keeps trying the list while the control processes elect
/// a leader (every one answers "not the leader"): a takeover is ~2-3 s
/// here, longer on a loaded machine.
pub const ELECTION_WAIT: Duration = Duration::from_secs(8);

#[derive(Debug, thiserror::Error)]
pub enum MetaClientError {
    #[error("cannot reach the control service at {url}: {reason}: is `celer meta serve` running?")]
    Unreachable { url: String, reason: String },
    #[error("the control service at {url} answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("the control service at {url} sent a reply that is not valid JSON for this request: {reason}")]
    BadJson { url: String, reason: String },
    #[error("control service URL `{0}` is not valid: use http://HOST:PORT")]
    BadUrl(String),
    #[error("the control process at {url} does not lead{}: retry in a few seconds", leader.as_ref().map(|l| format!(" and its leader {l} cannot be reached")).unwrap_or_default())]
    NotLeader { url: String, leader: Option<String> },
}

impl MetaClientError {
    /// The HTTP status for an error reply.
    pub fn status(&self) -> Option<u16> {
        match self {
            MetaClientError::Status { status, .. } => Some(*status),
            MetaClientError::NotLeader { .. } => Some(503),
            _ => None,
        }
    }
    /// 404: an unknown node (register again), volume, or no route table yet.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }
    /// The control service could not be reached (worth retrying later).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, MetaClientError::Unreachable { .. })
    }
    /// Worth retrying: no control process could be reached (refused,
    /// timed out), none leads yet, or one failed inside (5xx: its store,
    /// e.g. an etcd endpoint not up yet). A 4xx is the service's answer to
    /// this request (bad token, refused registration): retrying cannot
    /// change it. A reply that is not the JSON expected is not retried
    /// either (a different program or version answers).
    pub fn is_transient(&self) -> bool {
        match self {
            MetaClientError::Unreachable { .. } | MetaClientError::NotLeader { .. } => true,
            MetaClientError::Status { status, .. } => *status >= 500,
            MetaClientError::BadJson { .. } | MetaClientError::BadUrl(_) => false,
        }
    }
}

/// Delays between retries of a transient failure: exponential, from
/// `first` doubling up to `max`, each one drawn between half the step and
/// the whole step (jitter: nodes that failed together do not retry
/// together).
#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    step: Duration,
    rng: u64,
}

impl Backoff {
    /// 50 ms doubling to 2 s: what nodes use for registration and heartbeats.
    pub fn for_control_service() -> Backoff {
        Backoff::new(Duration::from_millis(50), Duration::from_secs(2))
    }

    pub fn new(first: Duration, max: Duration) -> Backoff {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ (std::process::id() as u64).rotate_left(32);
        Backoff {
            first,
            max: max.max(first),
            step: first,
            rng: seed | 1,
        }
    }

    /// The next delay; the step doubles (up to `max`) for the one after.
    pub fn next_delay(&mut self) -> Duration {
        // xorshift64: jitter needs no quality, only spread.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let half = step / 2;
        let span = (step - half).as_nanos().max(1) as u64;
        half + Duration::from_nanos(self.rng % span)
    }

    /// Back to `first` (after a success).
    pub fn reset(&mut self) {
        self.step = self.first;
    }
}

/// A blocking client; cheap to share between threads (`&self` methods).
pub struct MetaClient {
    bases: Vec<String>,
    /// The base that answered last.
    current: AtomicUsize,
    auth: String,
    agent: ureq::Agent,
}

impl std::fmt::Debug for MetaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("MetaClient")
            .field("bases", &self.bases)
            .finish_non_exhaustive()
    }
}

impl MetaClient {
    /// `base_url`: `http://host:port` (or several, comma-separated); `token`:
    /// the cluster token.
    pub fn new(base_url: &str, token: &str) -> MetaClient {
        let mut bases: Vec<String> = base_url
            .split(',')
            .map(|b| b.trim().trim_end_matches('/').to_string())
            .filter(|b| !b.is_empty())
            .collect();
        if bases.is_empty() {
            bases.push(String::new());
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_millis(CONNECT_TIMEOUT_MS))
            .timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
            .redirects(0)
            .build();
        MetaClient {
            bases,
            current: AtomicUsize::new(0),
            auth: format!("Bearer {}", token.trim()),
            agent,
        }
    }

    /// The same client (URLs, token) whose requests give up after
    /// `request` (connecting too): a node's heartbeats use one shorter than
    /// its lease, so a control process that hangs (paused, overloaded)
    /// costs one attempt, and the next goes to another process, while the
    /// node still serves.
    pub fn with_request_timeout(&self, request: Duration) -> MetaClient {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(request.min(Duration::from_millis(CONNECT_TIMEOUT_MS)))
            .timeout(request)
            .redirects(0)
            .build();
        MetaClient {
            bases: self.bases.clone(),
            current: AtomicUsize::new(self.current.load(Ordering::Relaxed)),
            auth: self.auth.clone(),
            agent,
        }
    }

    /// After a failure at the control process that answered last, start
    /// the next call at the next one of the list (a retry then goes round
    /// every URL given).
    pub fn try_next_process(&self) {
        let n = self.bases.len();
        let cur = self.current.load(Ordering::Relaxed);
        self.current.store((cur + 1) % n, Ordering::Relaxed);
    }

    /// The base URL(s) this client talks to, as given.
    pub fn base_url(&self) -> String {
        self.bases.join(",")
    }

    /// `POST /v1/nodes/register`.
    pub fn register(&self, req: &RegisterNode) -> Result<Registered, MetaClientError> {
        self.call("POST", "/v1/nodes/register", &[], Some(req))
    }

    /// `POST /v1/nodes/{id}/heartbeat`: `epoch` is the node's table epoch
    /// (0: none), no backfill figures. A 404 means "register again".
    pub fn heartbeat(&self, node: NodeId, epoch: u64) -> Result<HeartbeatReply, MetaClientError> {
        self.heartbeat_with(
            node,
            &Heartbeat {
                epoch,
                ..Heartbeat::default()
            },
        )
    }

    /// `POST /v1/nodes/{id}/heartbeat` with the node's backfill figures.
    pub fn heartbeat_with(
        &self,
        node: NodeId,
        beat: &Heartbeat,
    ) -> Result<HeartbeatReply, MetaClientError> {
        self.call(
            "POST",
            &format!("/v1/nodes/{node}/heartbeat"),
            &[],
            Some(beat),
        )
    }

    /// `POST /v1/nodes/{id}/synced`: the node finished backfilling
    /// `partitions`, where it was a syncing member in `epoch`.
    pub fn synced(
        &self,
        node: NodeId,
        epoch: u64,
        partitions: &[u32],
    ) -> Result<SyncedReply, MetaClientError> {
        self.call(
            "POST",
            &format!("/v1/nodes/{node}/synced"),
            &[],
            Some(&Synced {
                epoch,
                partitions: partitions.to_vec(),
            }),
        )
    }

    /// `GET /v1/nodes`.
    pub fn nodes(&self) -> Result<Vec<NodeStatus>, MetaClientError> {
        self.call::<(), _>("GET", "/v1/nodes", &[], None)
    }

    /// `GET /v1/route`: the current table (404 before there is one).
    pub fn route(&self) -> Result<RouteTable, MetaClientError> {
        self.call::<(), _>("GET", "/v1/route", &[], None)
    }

    /// `POST /v1/route/split`: doubles the partition count.
    pub fn split(&self) -> Result<RouteTable, MetaClientError> {
        self.call::<(), _>("POST", "/v1/route/split", &[], None)
    }

    /// `POST /v1/admin-ticket`: a ticket for the nodes' admin controls
    /// (operator tokens only).
    pub fn admin_ticket(&self) -> Result<crate::api::AdminTicketReply, MetaClientError> {
        self.call::<(), _>("POST", "/v1/admin-ticket", &[], None)
    }

    /// `POST /v1/volumes`.
    pub fn create_volume(&self, req: &CreateVolume) -> Result<Volume, MetaClientError> {
        self.call("POST", "/v1/volumes", &[], Some(req))
    }

    /// `GET /v1/volumes`.
    pub fn volumes(&self) -> Result<Vec<Volume>, MetaClientError> {
        self.call::<(), _>("GET", "/v1/volumes", &[], None)
    }

    /// `GET /v1/volumes/{name}`.
    pub fn volume(&self, name: &str) -> Result<Volume, MetaClientError> {
        self.call::<(), _>(
            "GET",
            &format!("/v1/volumes/{}", path_escape(name)),
            &[],
            None,
        )
    }

    /// `GET /v1/volumes/{name}?size=N&wait_ms=M`: the volume as soon as its
    /// size differs from `known_size`, or after `wait` (capped at
    /// [`crate::api::VOLUME_WAIT_MS_MAX`]) as it is.
    pub fn volume_wait(
        &self,
        name: &str,
        known_size: u64,
        wait: Duration,
    ) -> Result<Volume, MetaClientError> {
        self.call::<(), _>(
            "GET",
            &format!("/v1/volumes/{}", path_escape(name)),
            &[
                ("size", known_size.to_string()),
                ("wait_ms", wait.as_millis().to_string()),
            ],
            None,
        )
    }

    /// `POST /v1/volumes/{name}/resize` (grow only).
    pub fn resize_volume(&self, name: &str, size_bytes: u64) -> Result<Volume, MetaClientError> {
        self.call(
            "POST",
            &format!("/v1/volumes/{}/resize", path_escape(name)),
            &[],
            Some(&ResizeVolume { size_bytes }),
        )
    }

    /// `POST /v1/volumes/{name}/attachments`: a new attachment and its
    /// capability.
    /// An exclusive attach (or a read-only one); see [`MetaClient::attach_with`].
    pub fn attach(&self, name: &str, read_only: bool) -> Result<Attachment, MetaClientError> {
        self.attach_with(
            name,
            &AttachVolume {
                read_only,
                ..AttachVolume::default()
            },
        )
    }

    /// `POST /v1/volumes/{name}/attachments`: an attachment, its capability
    /// and key. A take-over (`force`) answers once every live node fences
    /// the attachments it ended.
    pub fn attach_with(
        &self,
        name: &str,
        req: &AttachVolume,
    ) -> Result<Attachment, MetaClientError> {
        self.call(
            "POST",
            &format!("/v1/volumes/{}/attachments", path_escape(name)),
            &[],
            Some(req),
        )
    }

    /// `POST /v1/attachments/{id}/renew`: a fresh capability for it.
    pub fn renew_attachment(&self, id: u32) -> Result<Attachment, MetaClientError> {
        self.call::<(), _>("POST", &format!("/v1/attachments/{id}/renew"), &[], None)
    }

    /// `GET /v1/attachments`.
    pub fn attachments(&self) -> Result<Vec<AttachmentRecord>, MetaClientError> {
        self.call::<(), _>("GET", "/v1/attachments", &[], None)
    }

    /// `DELETE /v1/attachments/{id}`.
    pub fn detach(&self, id: u32) -> Result<AttachmentRecord, MetaClientError> {
        self.call::<(), _>("DELETE", &format!("/v1/attachments/{id}"), &[], None)
    }

    /// `DELETE /v1/volumes/{name}`: returns the deleted volume.
    pub fn delete_volume(&self, name: &str) -> Result<Volume, MetaClientError> {
        self.call::<(), _>(
            "DELETE",
            &format!("/v1/volumes/{}", path_escape(name)),
            &[],
            None,
        )
    }

    /// `POST /v1/volumes/{name}/snapshots`: a crash-consistent snapshot,
    /// cut on every live node before it returns.
    pub fn create_snapshot(
        &self,
        name: &str,
        snapshot: &str,
    ) -> Result<crate::api::Snapshot, MetaClientError> {
        self.call(
            "POST",
            &format!("/v1/volumes/{}/snapshots", path_escape(name)),
            &[],
            Some(&crate::api::CreateSnapshot {
                name: snapshot.to_string(),
            }),
        )
    }

    /// `DELETE /v1/volumes/{name}/snapshots/{snapshot}`.
    /// `GET /v1/volumes/{name}/snapshot-usage`: the space each snapshot
    /// alone holds (what deleting it frees).
    pub fn snapshot_usage(
        &self,
        name: &str,
    ) -> Result<Vec<crate::api::SnapshotUsage>, MetaClientError> {
        self.call::<(), _>(
            "GET",
            &format!("/v1/volumes/{}/snapshot-usage", path_escape(name)),
            &[],
            None,
        )
    }

    pub fn delete_snapshot(&self, name: &str, snapshot: &str) -> Result<Volume, MetaClientError> {
        self.call::<(), _>(
            "DELETE",
            &format!(
                "/v1/volumes/{}/snapshots/{}",
                path_escape(name),
                path_escape(snapshot)
            ),
            &[],
            None,
        )
    }

    /// `POST /v1/volumes/{name}/rollback`.
    pub fn rollback(&self, name: &str, snapshot: &str) -> Result<Volume, MetaClientError> {
        self.call(
            "POST",
            &format!("/v1/volumes/{}/rollback", path_escape(name)),
            &[],
            Some(&crate::api::Rollback {
                snapshot: snapshot.to_string(),
            }),
        )
    }

    /// `POST /v1/volumes/{name}/clone`: volume `new_name` over `name@snapshot`.
    pub fn clone_volume(
        &self,
        name: &str,
        snapshot: &str,
        new_name: &str,
    ) -> Result<Volume, MetaClientError> {
        self.call(
            "POST",
            &format!("/v1/volumes/{}/clone", path_escape(name)),
            &[],
            Some(&crate::api::CloneVolume {
                snapshot: snapshot.to_string(),
                name: new_name.to_string(),
            }),
        )
    }

    /// `POST /v1/volumes/{name}/flatten`: the copy for `req`'s layers is
    /// done on every member; cut the volume off the layers under its head.
    pub fn flatten_volume(
        &self,
        name: &str,
        req: &crate::api::FlattenVolume,
    ) -> Result<Volume, MetaClientError> {
        self.call(
            "POST",
            &format!("/v1/volumes/{}/flatten", path_escape(name)),
            &[],
            Some(req),
        )
    }

    /// `GET /v1/log?since=N`: entries with `seq > since`, oldest first, at
    /// most [`crate::api::LOG_PAGE_MAX`] per call.
    pub fn log(&self, since: u64) -> Result<Vec<LogEntry>, MetaClientError> {
        self.call::<(), _>("GET", "/v1/log", &[("since", since.to_string())], None)
    }

    /// `POST /v1/log/restore`: volumes and nodes as they were after `seq`.
    pub fn restore_log(&self, seq: u64) -> Result<Restored, MetaClientError> {
        self.call("POST", "/v1/log/restore", &[], Some(&RestoreLog { seq }))
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Result<Status, MetaClientError> {
        self.call::<(), _>("GET", "/v1/status", &[], None)
    }

    /// `GET /metrics` (Prometheus text).
    pub fn metrics(&self) -> Result<String, MetaClientError> {
        let base = &self.bases[self.current.load(Ordering::Relaxed) % self.bases.len()];
        let url = format!("{base}/metrics");
        match self.agent.get(&url).call() {
            Ok(resp) => resp.into_string().map_err(|e| MetaClientError::BadJson {
                url,
                reason: e.to_string(),
            }),
            Err(e) => Err(error_of(&url, e)),
        }
    }

    fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, String)],
        body: Option<&B>,
    ) -> Result<T, MetaClientError> {
        let n = self.bases.len();
        // While an election is in progress (some process answers "not the
        // leader"), keep trying the list for a few seconds.
        let deadline = std::time::Instant::now() + ELECTION_WAIT;
        loop {
            let start = self.current.load(Ordering::Relaxed) % n;
            let mut last = None;
            let mut election = false;
            for i in 0..n {
                let at = (start + i) % n;
                match self.call_at(&self.bases[at], method, path, query, body) {
                    Err(e @ MetaClientError::Unreachable { .. }) => last = Some(e),
                    // A follower naming its leader: try there (it may be in
                    // the list or not), then go on with the list.
                    Err(MetaClientError::NotLeader {
                        url,
                        leader: Some(leader),
                    }) => {
                        election = true;
                        match self.call_at(&leader, method, path, query, body) {
                            Err(MetaClientError::Unreachable { .. })
                            | Err(MetaClientError::NotLeader { .. }) => {
                                last = Some(MetaClientError::NotLeader {
                                    url,
                                    leader: Some(leader),
                                })
                            }
                            r => {
                                if let Some(k) = self.bases.iter().position(|b| *b == leader) {
                                    self.current.store(k, Ordering::Relaxed);
                                }
                                return r;
                            }
                        }
                    }
                    Err(e @ MetaClientError::NotLeader { leader: None, .. }) => {
                        election = true;
                        last = Some(e)
                    }
                    r => {
                        self.current.store(at, Ordering::Relaxed);
                        return r;
                    }
                }
            }
            if !election || std::time::Instant::now() >= deadline {
                return Err(last.unwrap_or_else(|| MetaClientError::BadUrl(self.base_url())));
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    fn call_at<B: Serialize, T: DeserializeOwned>(
        &self,
        base: &str,
        method: &str,
        path: &str,
        query: &[(&str, String)],
        body: Option<&B>,
    ) -> Result<T, MetaClientError> {
        if !base.starts_with("http://") {
            return Err(MetaClientError::BadUrl(base.to_string()));
        }
        let url = format!("{base}{path}");
        let mut req = self
            .agent
            .request(method, &url)
            .set("Authorization", &self.auth);
        for (k, v) in query {
            req = req.query(k, v);
        }
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match resp {
            Ok(resp) => resp.into_json::<T>().map_err(|e| MetaClientError::BadJson {
                url,
                reason: e.to_string(),
            }),
            Err(e) => Err(error_of(&url, e)),
        }
    }
}

fn error_of(url: &str, e: ureq::Error) -> MetaClientError {
    match e {
        ureq::Error::Status(status, resp) => {
            let text = resp.into_string().unwrap_or_default();
            let message = match serde_json::from_str::<ErrorBody>(&text) {
                // A control process answers 503 only when it does not lead
                // (a follower, or a leader that just stepped down): with or
                // without a leader to name, the caller tries elsewhere and
                // waits out the election.
                Ok(ErrorBody { leader, .. }) if status == 503 => {
                    return MetaClientError::NotLeader {
                        url: url.to_string(),
                        leader,
                    }
                }
                Ok(b) => b.error,
                Err(_) if text.trim().is_empty() => "(no message)".to_string(),
                Err(_) => text.chars().take(200).collect(),
            };
            MetaClientError::Status {
                url: url.to_string(),
                status,
                message,
            }
        }
        ureq::Error::Transport(t) => match t.kind() {
            ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme => {
                MetaClientError::BadUrl(url.to_string())
            }
            _ => MetaClientError::Unreachable {
                url: url.to_string(),
                reason: t
                    .message()
                    .map(str::to_string)
                    .or_else(|| std::error::Error::source(&t).map(|s| s.to_string()))
                    .unwrap_or_else(|| t.kind().to_string()),
            },
        },
    }
}

/// Percent-escapes everything but `[A-Za-z0-9._-]` (volume names are
/// validated by the server; a bad one must still reach it in one piece).
fn path_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers every request on a loopback port with `status` and `body`.
    fn canned_http(status: &'static str, body: String) -> String {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut s in l.incoming().map_while(Result::ok) {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        format!("http://{addr}")
    }

    /// A process that does not lead and knows no leader (503 without a
    /// `leader`) sends the caller on down the list, not back with an error
    /// (the etcd failover test's flake: a CLI call failed at once).
    #[test]
    fn a_503_without_a_leader_moves_on_to_the_next_process() {
        let follower = canned_http(
            "503 Service Unavailable",
            r#"{"error":"this control process does not lead and no leader is known yet"}"#.into(),
        );
        let status = r#"{"nodes_up":3,"nodes_down":0,"epoch":7,"partitions":256,"partitions_in_sync":256,"partitions_degraded":0,"volumes":1,"log_seq":9,"leader":true}"#;
        let leader = canned_http("200 OK", status.into());
        let c = MetaClient::new(&format!("{follower},{leader}"), "t");
        assert_eq!(c.status().unwrap().epoch, 7);
        // Alone, the follower's answer is a NotLeader error (after the
        // election wait), which says to retry.
        let c = MetaClient::new(&follower, "t");
        let t = std::time::Instant::now();
        let e = c.status().unwrap_err();
        assert!(
            matches!(e, MetaClientError::NotLeader { leader: None, .. }),
            "{e}"
        );
        assert!(
            t.elapsed() >= ELECTION_WAIT,
            "gave up after {:?}",
            t.elapsed()
        );
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::for_control_service();
        let steps_ms = [50u64, 100, 200, 400, 800, 1600, 2000, 2000, 2000];
        let mut delays = Vec::new();
        for step in steps_ms {
            let d = b.next_delay();
            let step = Duration::from_millis(step);
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} outside [{:?}, {step:?}]",
                step / 2
            );
            delays.push(d);
        }
        // Jitter: not every capped delay is the same.
        let mut b2 = Backoff::new(Duration::from_secs(2), Duration::from_secs(2));
        let spread: std::collections::BTreeSet<Duration> =
            (0..16).map(|_| b2.next_delay()).collect();
        assert!(spread.len() > 1, "no jitter: {spread:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(50));
    }

    #[test]
    fn transient_errors_are_unreachable_no_leader_and_5xx() {
        let status = |status| MetaClientError::Status {
            url: "u".into(),
            status,
            message: "m".into(),
        };
        assert!(status(500).is_transient());
        assert!(status(502).is_transient());
        assert!(MetaClientError::NotLeader {
            url: "u".into(),
            leader: None
        }
        .is_transient());
        assert!(MetaClientError::Unreachable {
            url: "u".into(),
            reason: "refused".into()
        }
        .is_transient());
        for permanent in [400, 401, 404, 409] {
            assert!(!status(permanent).is_transient(), "{permanent}");
        }
        assert!(!MetaClientError::BadUrl("x".into()).is_transient());
    }

    #[test]
    fn escapes_paths() {
        assert_eq!(path_escape("vm-1.d_0"), "vm-1.d_0");
        assert_eq!(path_escape("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn refused_connection_is_unreachable() {
        // Port 1 on loopback: nothing listens there.
        let c = MetaClient::new("http://127.0.0.1:1", "t");
        let e = c.status().expect_err("nothing listens");
        assert!(e.is_unreachable(), "{e}");
        assert!(e.to_string().contains("celer meta serve"), "{e}");
    }

    #[test]
    fn bad_url() {
        let c = MetaClient::new("127.0.0.1:7700", "t");
        assert!(matches!(c.status(), Err(MetaClientError::BadUrl(_))));
    }
}
