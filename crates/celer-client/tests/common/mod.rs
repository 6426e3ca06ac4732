//! A scriptable storage node that speaks celer-proto over TCP, for client
//! tests: it stores 4 KiB blocks per (volume, offset) honouring versions,
//! checks epochs, membership and shards like the real node, forwards
//! `WritePrimary` to the other members (straight into their stores), and can
//! be told to stay silent, answer `RouteBehind`/`Busy`, send a corrupt frame,
//! close the connection, fail reads, or die (listener closed: refused).

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celer_client::Credential;
use celer_device::{DeviceQueue, IoCompletion, IoError, IoOp, IoRequest, IoSegment};
use celer_proto::auth::{data_key_from_secret, HelloProof, Peer};
use celer_proto::{decode_header, Header, Kind, Op, Status, HEADER_BYTES};
use celer_route::{NodeId, NodeInfo, RouteTable};

pub const BLOCK: usize = 4096;
/// The fake cluster's secret: nodes derive the data key from it, tests mint
/// their credentials with it.
pub const SECRET: &str = "fake-cluster-secret";
/// The attachment id of [`cred`]'s capabilities (the low 16 bits of every
/// write version).
pub const ATTACHMENT: u32 = 9;

/// A credential for `volume` that the fake nodes accept.
pub fn cred(volume: u64) -> Credential {
    celer_client::mint_credential(SECRET, volume, ATTACHMENT, false, Duration::from_secs(3600))
}

#[derive(Clone, Debug)]
pub struct Logged {
    pub op: Op,
    pub offset: u64,
    pub length: u32,
    pub version: u64,
    pub epoch: u64,
    pub shard: u16,
    pub conn: u32,
}

#[derive(Default, Clone)]
pub struct Script {
    /// Read every frame, answer none (but Hello).
    pub silent: bool,
    /// Answer the next N data requests with a corrupt frame.
    pub corrupt_next: u32,
    /// Close the connection on the next N data requests.
    pub close_next: u32,
    pub route_behind_next: u32,
    pub busy_next: u32,
    /// Answer the next N reads with this status.
    pub read_status: Option<(Status, u32)>,
    /// Added to the version reported in responses.
    pub version_boost: u64,
    /// Answer the next N reads with a payload whose checksum is wrong.
    pub bad_payload_next: u32,
    pub delay: Duration,
    /// Close the connection on every `Fill`, as a node built before the
    /// op does (it cannot decode the frame).
    pub unknown_fill: bool,
}

pub struct Inner {
    pub table: RouteTable,
    pub store: HashMap<(u64, u64), (u64, Vec<u8>)>,
    pub log: Vec<Logged>,
    pub max_version: u64,
    pub script: Script,
    pub conns: Vec<TcpStream>,
    pub accepted: u32,
}

pub struct FakeNode {
    pub id: NodeId,
    pub addr: String,
    pub shards: u16,
    pub inner: Mutex<Inner>,
    dead: AtomicBool,
    peers: Mutex<Vec<Arc<FakeNode>>>,
}

impl FakeNode {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    pub fn set_table(&self, t: &RouteTable) {
        self.lock().table = t.clone();
    }

    pub fn script(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.lock().script);
    }

    pub fn log(&self) -> Vec<Logged> {
        self.lock().log.clone()
    }

    pub fn data_log(&self) -> Vec<Logged> {
        self.log()
            .into_iter()
            .filter(|l| !matches!(l.op, Op::RouteTable | Op::Hello))
            .collect()
    }

    pub fn clear_log(&self) {
        self.lock().log.clear();
    }

    pub fn block(&self, volume: u64, offset: u64) -> Option<(u64, Vec<u8>)> {
        self.lock().store.get(&(volume, offset)).cloned()
    }

    /// Closes the listener (connections are refused) and every connection.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        for c in self.lock().conns.drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    fn apply(
        &self,
        st: &mut Inner,
        volume: u64,
        offset: u64,
        data: Option<&[u8]>,
        len: u32,
        version: u64,
    ) {
        st.max_version = st.max_version.max(version);
        for b in 0..(len as usize / BLOCK) {
            let key = (volume, offset + (b * BLOCK) as u64);
            let newer = st.store.get(&key).is_none_or(|(v, _)| version > *v);
            if newer {
                let bytes = match data {
                    Some(d) => d[b * BLOCK..(b + 1) * BLOCK].to_vec(),
                    None => vec![0; BLOCK],
                };
                st.store.insert(key, (version, bytes));
            }
        }
    }
}

pub struct Cluster {
    pub nodes: Vec<Arc<FakeNode>>,
    pub table: RouteTable,
}

pub fn node_info(id: NodeId, addr: &str, shards: u16, up: bool) -> NodeInfo {
    NodeInfo {
        id,
        data_addr: addr.to_string(),
        admin_addr: String::new(),
        shards,
        domain: format!("host{id}"),
        up,
    }
}

impl Cluster {
    /// `n` nodes with ids 1..=n; the first table has the nodes in `up` up.
    pub fn start(
        n: u32,
        up: &[NodeId],
        shards: u16,
        partition_bits: u8,
        chunk_bytes: u64,
    ) -> Cluster {
        let listeners: Vec<TcpListener> = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let infos: Vec<NodeInfo> = listeners
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let id = i as NodeId + 1;
                node_info(
                    id,
                    &l.local_addr().unwrap().to_string(),
                    shards,
                    up.contains(&id),
                )
            })
            .collect();
        let table = RouteTable::initial(infos.clone(), partition_bits, 3, chunk_bytes).unwrap();
        let nodes: Vec<Arc<FakeNode>> = infos
            .iter()
            .map(|info| {
                Arc::new(FakeNode {
                    id: info.id,
                    addr: info.data_addr.clone(),
                    shards,
                    inner: Mutex::new(Inner {
                        table: table.clone(),
                        store: HashMap::new(),
                        log: Vec::new(),
                        max_version: 0,
                        script: Script::default(),
                        conns: Vec::new(),
                        accepted: 0,
                    }),
                    dead: AtomicBool::new(false),
                    peers: Mutex::new(Vec::new()),
                })
            })
            .collect();
        for n in &nodes {
            *n.peers.lock().unwrap() = nodes.clone();
        }
        for (l, node) in listeners.into_iter().zip(nodes.iter().cloned()) {
            std::thread::spawn(move || accept_loop(l, node));
        }
        Cluster { nodes, table }
    }

    pub fn node(&self, id: NodeId) -> &Arc<FakeNode> {
        &self.nodes[id as usize - 1]
    }

    pub fn set_table(&self, t: &RouteTable, on: &[NodeId]) {
        for id in on {
            self.node(*id).set_table(t);
        }
    }

    /// The next table: `down` nodes down, `up` nodes up (rebalanced).
    pub fn next_table(&self, from: &RouteTable, up: &[NodeId]) -> RouteTable {
        let nodes = from
            .nodes
            .iter()
            .map(|n| NodeInfo {
                up: up.contains(&n.id),
                ..n.clone()
            })
            .collect();
        from.rebalance(nodes, usize::MAX)
    }

    pub fn seeds(&self) -> Vec<String> {
        vec![self.nodes[0].addr.clone()]
    }
}

fn accept_loop(l: TcpListener, node: Arc<FakeNode>) {
    l.set_nonblocking(true).unwrap();
    loop {
        if node.dead.load(Ordering::SeqCst) {
            return; // drops the listener: connections are refused
        }
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_nodelay(true).unwrap();
                let conn = {
                    let mut st = node.lock();
                    st.accepted += 1;
                    st.conns.push(s.try_clone().unwrap());
                    st.accepted
                };
                let node = node.clone();
                std::thread::spawn(move || serve(s, node, conn));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn respond(s: &mut TcpStream, req: &Header, status: Status, payload: &[u8], version: u64) -> bool {
    let mut h = Header::response_to(req, status).with_payload([payload]);
    h.version = version;
    let mut out = h.encode().to_vec();
    out.extend_from_slice(payload);
    s.write_all(&out).is_ok()
}

fn serve(mut s: TcpStream, node: Arc<FakeNode>, conn: u32) {
    let mut shard: Option<u16> = None;
    // The real node's handshake: a Challenge first, a Hello with a proof.
    let mut nonce = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
    let challenge = Header::request(Op::Challenge, 0).with_payload([&nonce[..]]);
    let mut out = challenge.encode().to_vec();
    out.extend_from_slice(&nonce);
    if s.write_all(&out).is_err() {
        return;
    }
    let data_key = data_key_from_secret(SECRET);
    loop {
        let mut hb = [0u8; HEADER_BYTES];
        if s.read_exact(&mut hb).is_err() {
            return;
        }
        let Ok(Some(h)) = decode_header(&hb) else {
            return;
        };
        let mut payload = vec![0u8; h.payload_bytes as usize];
        if s.read_exact(&mut payload).is_err() {
            return;
        }
        if node.dead.load(Ordering::SeqCst) {
            return;
        }
        assert_eq!(h.kind, Kind::Request);
        if h.verify_payload([payload.as_slice()]).is_err() {
            respond(&mut s, &h, Status::Checksum, &[], 0);
            continue;
        }
        let mut st = node.lock();
        st.log.push(Logged {
            op: h.op,
            offset: h.offset,
            length: h.length,
            version: h.version,
            epoch: h.epoch,
            shard: shard.unwrap_or(u16::MAX),
            conn,
        });
        let version = st.max_version + st.script.version_boost;
        if h.op == Op::Hello {
            shard = Some(h.offset as u16);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            let checked = HelloProof::check(
                &payload,
                &data_key,
                &nonce,
                h.offset as u16,
                h.volume,
                false,
                now,
            );
            drop(st);
            let (peer, peer_nonce) = match checked {
                Ok(x) if h.offset < node.shards as u64 => x,
                Ok(_) => {
                    respond(&mut s, &h, Status::Invalid, &[], version);
                    continue;
                }
                Err(_) => {
                    respond(&mut s, &h, Status::Unauthorized, &[], version);
                    return;
                }
            };
            let key = match peer {
                Peer::Attachment(cap) => cap.attachment_key(&data_key),
                Peer::Node { .. } => data_key,
            };
            let answer = HelloProof::answer(&key, &nonce, &peer_nonce);
            respond(&mut s, &h, Status::Ok, &answer, version);
            continue;
        }
        if st.script.silent {
            continue;
        }
        let delay = st.script.delay;
        if h.op == Op::RouteTable {
            let (status, body) = if st.table.epoch > h.epoch {
                (Status::StaleEpoch, st.table.encode())
            } else {
                (Status::Ok, Vec::new())
            };
            drop(st);
            respond(&mut s, &h, status, &body, version);
            continue;
        }
        if st.script.close_next > 0 || (h.op == Op::Fill && st.script.unknown_fill) {
            st.script.close_next = st.script.close_next.saturating_sub(1);
            let _ = s.shutdown(Shutdown::Both);
            return;
        }
        if st.script.corrupt_next > 0 {
            st.script.corrupt_next -= 1;
            drop(st);
            let mut bad = Header::response_to(&h, Status::Ok).encode();
            bad[57] ^= 0xff; // header crc
            let _ = s.write_all(&bad);
            continue;
        }
        let bad_payload = h.op == Op::Read && st.script.bad_payload_next > 0;
        if bad_payload {
            st.script.bad_payload_next -= 1;
        }
        let (mut status, mut body, forward) = handle(&node, &mut st, &h, &payload, shard);
        let version = st.max_version + st.script.version_boost;
        drop(st);
        // Forward a WritePrimary with no lock of ours held (two primaries
        // forwarding to each other must not deadlock).
        let peers = node.peers.lock().unwrap().clone();
        for m in forward {
            let peer = &peers[m as usize - 1];
            let mut ps = peer.lock();
            if ps.script.silent || peer.dead.load(Ordering::SeqCst) {
                status = Status::Unavailable;
                continue;
            }
            peer.apply(
                &mut ps,
                h.volume,
                h.offset,
                Some(&payload),
                h.length,
                h.version,
            );
        }
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        if bad_payload && !body.is_empty() {
            // The checksum of the right data, the data with one bit flipped.
            let mut rh = Header::response_to(&h, status).with_payload([body.as_slice()]);
            rh.version = version;
            body[100] ^= 1;
            let mut out = rh.encode().to_vec();
            out.extend_from_slice(&body);
            let _ = s.write_all(&out);
            continue;
        }
        if !respond(&mut s, &h, status, &body, version) {
            return;
        }
    }
}

type Handled = (Status, Vec<u8>, Vec<NodeId>);

fn handle(
    node: &Arc<FakeNode>,
    st: &mut Inner,
    h: &Header,
    payload: &[u8],
    shard: Option<u16>,
) -> Handled {
    if st.script.route_behind_next > 0 {
        st.script.route_behind_next -= 1;
        return (Status::RouteBehind, Vec::new(), Vec::new());
    }
    if st.script.busy_next > 0 {
        st.script.busy_next -= 1;
        return (Status::Busy, Vec::new(), Vec::new());
    }
    if h.epoch < st.table.epoch {
        return (Status::StaleEpoch, st.table.encode(), Vec::new());
    }
    if h.epoch > st.table.epoch {
        return (Status::RouteBehind, Vec::new(), Vec::new());
    }
    let p = st.table.partition_at(h.volume, h.offset);
    if shard != Some((p % node.shards as u32) as u16) {
        return (Status::Invalid, Vec::new(), Vec::new());
    }
    // A request must lie in one chunk.
    let cb = st.table.chunk_bytes;
    if h.offset / cb != (h.offset + h.length as u64 - 1) / cb
        || !(h.length as usize).is_multiple_of(BLOCK)
    {
        return (Status::Invalid, Vec::new(), Vec::new());
    }
    let route = st.table.partition(p).unwrap().clone();
    let Some(me) = route.member(node.id).copied() else {
        return (Status::NotReplica, Vec::new(), Vec::new());
    };
    match h.op {
        Op::Write | Op::WritePrimary => {
            if payload.len() != h.length as usize {
                return (Status::Invalid, Vec::new(), Vec::new());
            }
            if h.op == Op::WritePrimary && route.primary() != Some(node.id) {
                return (Status::NotReplica, Vec::new(), Vec::new());
            }
            node.apply(st, h.volume, h.offset, Some(payload), h.length, h.version);
            let forward = if h.op == Op::WritePrimary {
                route
                    .members
                    .iter()
                    .map(|m| m.node)
                    .filter(|&n| n != node.id)
                    .collect()
            } else {
                Vec::new()
            };
            (Status::Ok, Vec::new(), forward)
        }
        Op::WriteZeroes | Op::Discard => {
            node.apply(st, h.volume, h.offset, None, h.length, h.version);
            (Status::Ok, Vec::new(), Vec::new())
        }
        Op::Read => {
            if let Some((s, n)) = st.script.read_status {
                if n > 0 {
                    st.script.read_status = if n > 1 { Some((s, n - 1)) } else { None };
                    return (s, Vec::new(), Vec::new());
                }
            }
            if !me.in_sync {
                return (Status::NotInSync, Vec::new(), Vec::new());
            }
            let mut out = Vec::with_capacity(h.length as usize);
            for b in 0..(h.length as usize / BLOCK) {
                match st.store.get(&(h.volume, h.offset + (b * BLOCK) as u64)) {
                    Some((_, d)) => out.extend_from_slice(d),
                    None => out.extend_from_slice(&[0; BLOCK]),
                }
            }
            (Status::Ok, out, Vec::new())
        }
        // Nothing to copy in a fake store: every block counts as copied.
        Op::Fill => (
            Status::Ok,
            (h.length / BLOCK as u32).to_le_bytes().to_vec(),
            Vec::new(),
        ),
        _ => (Status::Invalid, Vec::new(), Vec::new()),
    }
}

// ---- driving a queue ----

/// Polls until `n` completions arrived (sleeping on the completion fd).
pub fn wait_n(q: &mut Box<dyn DeviceQueue>, n: usize, timeout: Duration) -> Vec<IoCompletion> {
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < n {
        q.poll(&mut |c| out.push(c));
        if out.len() >= n {
            break;
        }
        assert!(
            start.elapsed() < timeout,
            "{} of {n} completions after {timeout:?}",
            out.len()
        );
        let mut pfd = libc::pollfd {
            fd: q.completion_fd().unwrap(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut pfd, 1, 20) };
    }
    out
}

pub fn seg(buf: &mut [u8]) -> IoSegment {
    IoSegment {
        addr: buf.as_mut_ptr(),
        len: buf.len(),
    }
}

/// Submits and waits for one request over `segs`.
pub fn run(
    q: &mut Box<dyn DeviceQueue>,
    op: IoOp,
    offset: u64,
    len: u64,
    segs: &[IoSegment],
) -> Result<(), IoError> {
    let req = IoRequest {
        op,
        offset_bytes: offset,
        len_bytes: len,
        segments: segs,
        tag: 42,
    };
    // SAFETY: the segments' buffers outlive the wait below.
    unsafe { q.submit(&req)? };
    let c = wait_n(q, 1, Duration::from_secs(20));
    assert_eq!(c[0].tag, 42);
    c.into_iter().next().unwrap().result
}

pub fn write(q: &mut Box<dyn DeviceQueue>, offset: u64, data: &mut [u8]) -> Result<(), IoError> {
    let s = [seg(data)];
    run(q, IoOp::Write, offset, 0, &s)
}

pub fn read(q: &mut Box<dyn DeviceQueue>, offset: u64, len: usize) -> Result<Vec<u8>, IoError> {
    let mut buf = vec![0xEEu8; len];
    let s = [seg(&mut buf)];
    run(q, IoOp::Read, offset, 0, &s)?;
    Ok(buf)
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}
