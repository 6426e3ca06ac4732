//! The etcd [`MetaStore`] and leader election: several control processes
//! share one etcd cluster; one leads and serves, the others answer 503
//! naming the leader and take over when its etcd lease expires.
//!
//! Keys (under `prefix`, default `/celer/meta/`): `kv/{key}` the metadata,
//! `log/{seq:020}` the change log, `log_last` its last sequence number,
//! `leader` the leader's URL, attached to its lease.
//!
//! Fencing: every write is one etcd transaction that also compares the
//! `leader` key's create revision with the one this process created when it
//! won, and `log_last` with the sequence it expects. A process that lost the
//! lease (paused, partitioned) cannot write once another has won, even if it
//! has not noticed yet; it gets [`StoreError::Conflict`] and steps down.
//! Reads it serves in that window may be stale by at most one lease TTL.
//!
//! Limits: one change is one etcd transaction, so it must fit etcd's
//! `--max-txn-ops` (default 128: a restore of many volumes needs more) and
//! `--max-request-bytes` (default 1.5 MiB: a route table of 2^16 partitions
//! does not fit).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};

use crate::server::{MetaError, Role, Shared};
use crate::state::Cluster;
use crate::store::{check_consecutive, KeyValues, MetaStore, Op, StoreError};

/// Default leader lease: a dead leader is replaced after about this long.
pub const LEASE_TTL_S_DEFAULT: i64 = 2;
/// A follower re-reads the leader key this often.
const FOLLOWER_POLL_MS: u64 = 300;
/// etcd requests give up after this long.
const ETCD_TIMEOUT_MS: u64 = 3000;

#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// `http://host:port` of the etcd members.
    pub endpoints: Vec<String>,
    /// Key prefix (one control cluster per prefix).
    pub prefix: String,
    /// This process's base URL as clients and the other processes reach it.
    pub advertise: String,
    /// Leader lease TTL in seconds.
    pub lease_ttl_s: i64,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>, advertise: String) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: "/celer/meta/".into(),
            advertise,
            lease_ttl_s: LEASE_TTL_S_DEFAULT,
        }
    }
}

pub struct EtcdStore {
    client: Client,
    /// The store's own runtime: the etcd client's connections run here, so
    /// a store call made (with `block_on`) by a thread holding the state
    /// lock never waits for the server's workers, which may be blocked on
    /// that same lock (a deadlock seen under load with 2 workers).
    rt: tokio::runtime::Handle,
    own_rt: Option<tokio::runtime::Runtime>,
    prefix: Vec<u8>,
    /// The create revision of our `leader` key while we lead.
    fence: Mutex<Option<i64>>,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Allowed from an async context, unlike dropping a runtime.
        if let Some(rt) = self.own_rt.take() {
            rt.shutdown_background();
        }
    }
}

fn etcd_err(e: etcd_client::Error) -> StoreError {
    StoreError::Etcd(e.to_string())
}

impl EtcdStore {
    pub async fn connect(cfg: &EtcdConfig) -> Result<EtcdStore, MetaError> {
        if cfg.endpoints.is_empty() {
            return Err(MetaError::Config(
                "--etcd needs at least one endpoint (http://host:2379)".into(),
            ));
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(ETCD_TIMEOUT_MS))
            .with_timeout(Duration::from_millis(ETCD_TIMEOUT_MS));
        let own_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("celer-etcd")
            .enable_all()
            .build()
            .map_err(MetaError::Runtime)?;
        let endpoints = cfg.endpoints.clone();
        let client = own_rt
            .spawn(async move { Client::connect(&endpoints, Some(opts)).await })
            .await
            .map_err(|e| MetaError::Store(StoreError::Etcd(format!("etcd connect task: {e}"))))?
            .map_err(|e| {
                MetaError::Store(StoreError::Etcd(format!(
                    "cannot connect to etcd at {}: {e}",
                    cfg.endpoints.join(",")
                )))
            })?;
        Ok(EtcdStore {
            client,
            rt: own_rt.handle().clone(),
            own_rt: Some(own_rt),
            prefix: cfg.prefix.as_bytes().to_vec(),
            fence: Mutex::new(None),
        })
    }

    fn key(&self, part: &str, rest: &[u8]) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(part.as_bytes());
        k.extend_from_slice(rest);
        k
    }

    fn log_key(&self, seq: u64) -> Vec<u8> {
        self.key(&format!("log/{seq:020}"), b"")
    }

    fn fence(&self) -> Option<i64> {
        *self.fence.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_fence(&self, rev: Option<i64>) {
        *self.fence.lock().unwrap_or_else(|e| e.into_inner()) = rev;
    }

    async fn last_seq_async(&self) -> Result<u64, StoreError> {
        let mut c = self.client.clone();
        let r = c
            .get(self.key("log_last", b""), None)
            .await
            .map_err(etcd_err)?;
        match r.kvs().first() {
            None => Ok(0),
            Some(kv) => std::str::from_utf8(kv.value())
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| StoreError::Corrupt {
                    key: "log_last".into(),
                    reason: "not a number".into(),
                }),
        }
    }
}

impl MetaStore for EtcdStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let mut c = self.client.clone();
        let k = self.key("kv/", key);
        self.rt.block_on(async move {
            let r = c.get(k, None).await.map_err(etcd_err)?;
            Ok(r.kvs().first().map(|kv| kv.value().to_vec()))
        })
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<KeyValues, StoreError> {
        let mut c = self.client.clone();
        let k = self.key("kv/", prefix);
        let strip = self.key("kv/", b"").len();
        self.rt.block_on(async move {
            let r = c
                .get(k, Some(GetOptions::new().with_prefix()))
                .await
                .map_err(etcd_err)?;
            Ok(r.kvs()
                .iter()
                .map(|kv| (kv.key()[strip..].to_vec(), kv.value().to_vec()))
                .collect())
        })
    }

    fn apply(&self, ops: &[Op], log: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        check_consecutive(log);
        let Some(rev) = self.fence() else {
            return Err(StoreError::Conflict {
                want: log.first().map_or(0, |e| e.0),
                last: 0,
            });
        };
        let leader_key = self.key("leader", b"");
        let last_key = self.key("log_last", b"");
        let mut when = vec![Compare::create_revision(
            leader_key.clone(),
            CompareOp::Equal,
            rev,
        )];
        let mut then: Vec<TxnOp> = Vec::with_capacity(ops.len() + log.len() + 1);
        for op in ops {
            then.push(match op {
                Op::Put { key, value } => TxnOp::put(self.key("kv/", key), value.clone(), None),
                Op::Delete { key } => TxnOp::delete(self.key("kv/", key), None),
            });
        }
        if let (Some((first, _)), Some((last, _))) = (log.first(), log.last()) {
            let expect = first - 1;
            when.push(if expect == 0 {
                Compare::version(last_key.clone(), CompareOp::Equal, 0)
            } else {
                Compare::value(last_key.clone(), CompareOp::Equal, expect.to_string())
            });
            for (seq, entry) in log {
                then.push(TxnOp::put(self.log_key(*seq), entry.clone(), None));
            }
            then.push(TxnOp::put(last_key, last.to_string(), None));
        }
        let want = log.first().map_or(0, |e| e.0);
        let mut c = self.client.clone();
        self.rt.block_on(async {
            let r = c
                .txn(Txn::new().when(when).and_then(then))
                .await
                .map_err(etcd_err)?;
            if r.succeeded() {
                return Ok(());
            }
            let last = self.last_seq_async().await?;
            tracing::warn!(
                want,
                last,
                "etcd write refused: the change log moved or this process no longer leads"
            );
            Err(StoreError::Conflict { want, last })
        })
    }

    fn last_seq(&self) -> Result<u64, StoreError> {
        self.rt.block_on(self.last_seq_async())
    }

    fn log_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let Some(from) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let mut c = self.client.clone();
        let start = self.log_key(from);
        // Every log key sorts below "log0" ('0' follows '/').
        let end = self.key("log0", b"");
        let strip = self.key("log/", b"").len();
        self.rt.block_on(async move {
            let r = c
                .get(
                    start,
                    Some(
                        GetOptions::new()
                            .with_range(end)
                            .with_limit(limit.min(i64::MAX as usize) as i64),
                    ),
                )
                .await
                .map_err(etcd_err)?;
            r.kvs()
                .iter()
                .map(|kv| {
                    let seq = std::str::from_utf8(&kv.key()[strip..])
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                        .ok_or_else(|| StoreError::Corrupt {
                            key: String::from_utf8_lossy(kv.key()).into_owned(),
                            reason: "not a log key".into(),
                        })?;
                    Ok((seq, kv.value().to_vec()))
                })
                .collect()
        })
    }
}

enum Campaign {
    /// We lead: our lease and the leader key's create revision.
    Won { lease: i64, rev: i64 },
    /// Someone else leads (their URL).
    Lost(Option<String>),
}

async fn campaign(store: &EtcdStore, cfg: &EtcdConfig) -> Result<Campaign, StoreError> {
    let mut c = store.client.clone();
    let leader_key = store.key("leader", b"");
    let lease = c
        .lease_grant(cfg.lease_ttl_s, None)
        .await
        .map_err(etcd_err)?
        .id();
    let txn = Txn::new()
        .when([Compare::create_revision(
            leader_key.clone(),
            CompareOp::Equal,
            0,
        )])
        .and_then([TxnOp::put(
            leader_key.clone(),
            cfg.advertise.clone(),
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else([TxnOp::get(leader_key, None)]);
    let r = c.txn(txn).await.map_err(etcd_err)?;
    if r.succeeded() {
        let rev = r.header().map(|h| h.revision()).unwrap_or(0);
        return Ok(Campaign::Won { lease, rev });
    }
    let _ = c.lease_revoke(lease).await;
    let leader = r.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(g) => g
            .kvs()
            .first()
            .and_then(|kv| kv.value_str().ok().map(str::to_string)),
        _ => None,
    });
    Ok(Campaign::Lost(leader))
}

fn set_role(shared: &Shared, role: Role) {
    *shared.role.lock().unwrap_or_else(|e| e.into_inner()) = role;
}

fn is_leader(shared: &Shared) -> bool {
    matches!(
        &*shared.role.lock().unwrap_or_else(|e| e.into_inner()),
        Role::Leader(_)
    )
}

/// Campaigns forever: leads while the lease holds, follows otherwise.
pub(crate) async fn lead(shared: Arc<Shared>, store: Arc<EtcdStore>, cfg: EtcdConfig) {
    let poll = Duration::from_millis(FOLLOWER_POLL_MS);
    loop {
        let (lease, rev) = match campaign(&store, &cfg).await {
            Ok(Campaign::Won { lease, rev }) => (lease, rev),
            Ok(Campaign::Lost(leader)) => {
                set_role(&shared, Role::Follower(leader));
                tokio::time::sleep(poll).await;
                continue;
            }
            Err(e) => {
                tracing::warn!("leader election: {e}");
                set_role(&shared, Role::Follower(None));
                tokio::time::sleep(poll).await;
                continue;
            }
        };
        store.set_fence(Some(rev));
        let loaded = {
            let st = shared.clone();
            tokio::task::spawn_blocking(move || {
                Cluster::load(
                    st.cluster_cfg.clone(),
                    st.store.as_ref(),
                    Arc::new(crate::state::SystemClock),
                )
            })
            .await
        };
        match loaded {
            Ok(Ok(cluster)) => {
                let (table, nodes) = (cluster.table().cloned(), cluster.node_ids());
                tracing::info!(
                    advertise = %cfg.advertise,
                    epoch = cluster.epoch(),
                    "leading the control service"
                );
                set_role(&shared, Role::Leader(Box::new(cluster)));
                shared.publish(table, &nodes);
            }
            Ok(Err(e)) => tracing::error!("cannot load the metadata from etcd: {e}"),
            Err(e) => tracing::error!("metadata load task failed: {e}"),
        }
        if is_leader(&shared) {
            let ttl = Duration::from_secs(cfg.lease_ttl_s.max(1) as u64);
            keep_lease(&shared, &store, lease, ttl).await;
        }
        tracing::warn!("no longer leading");
        store.set_fence(None);
        set_role(&shared, Role::Follower(None));
        let mut c = store.client.clone();
        let _ = c.lease_revoke(lease).await;
        tokio::time::sleep(poll).await;
    }
}

/// Keeps the leader lease alive until it is lost or we step down.
///
/// Leads as long as the lease is known to be valid: each keep-alive answer
/// extends it to (time the request was sent + TTL), which is never later
/// than etcd's own expiry. A slow answer (a loaded machine) does not end
/// the leadership while the lease still holds; no answer before the lease
/// runs out (minus a margin), a lost lease or a broken stream does. Writes
/// are fenced by the leader key's revision anyway (`set_fence`): a leader
/// that missed its expiry cannot write.
async fn keep_lease(shared: &Shared, store: &EtcdStore, lease: i64, ttl: Duration) {
    // Four keep-alives per TTL.
    let every = ttl / 4;
    let mut c = store.client.clone();
    let Ok((mut keeper, mut stream)) = c.lease_keep_alive(lease).await else {
        return;
    };
    let margin = every / 2;
    // Unknown how long the metadata load took since the grant: the first
    // keep-alive goes out at once and its answer says.
    let mut valid_until = Instant::now() + ttl;
    loop {
        if !is_leader(shared) {
            return; // Stepped down after a refused write.
        }
        let sent = Instant::now();
        if keeper.keep_alive().await.is_err() {
            return;
        }
        let left = valid_until
            .saturating_duration_since(Instant::now())
            .saturating_sub(margin);
        match tokio::time::timeout(left, stream.message()).await {
            Ok(Ok(Some(r))) if r.ttl() > 0 => {
                valid_until = sent + Duration::from_secs(r.ttl() as u64);
            }
            Ok(Ok(Some(_))) => {
                tracing::warn!("leader lease expired in etcd");
                return;
            }
            Ok(Ok(None)) | Ok(Err(_)) => {
                tracing::warn!("leader lease keep-alive stream ended");
                return;
            }
            Err(_) => {
                tracing::warn!("no keep-alive answer before the leader lease ran out");
                return;
            }
        }
        tokio::time::sleep(every).await;
    }
}
