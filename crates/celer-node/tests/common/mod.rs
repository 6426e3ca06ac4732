//! Shared by the node tests: nodes in this process on real sockets, a
//! blocking wire client that does the v3 handshake, and small helpers.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use celer_engine::{Engine, FormatOptions};
use celer_node::{Node, NodeConfig};
use celer_proto::auth::{Credential, HelloProof};
use celer_proto::{decode_header, Header, Kind, Op, Status, HEADER_BYTES};
use celer_route::{NodeInfo, RouteTable};

pub const TOKEN: &str = "test-token";

pub fn start_node(dir: &Path, id: u32) -> Node {
    start_node_idle(dir, id, Some(celer_node::IDLE_TIMEOUT_DEFAULT))
}

/// A node whose client connections close after `idle` without input.
pub fn start_node_idle(dir: &Path, id: u32, idle: Option<Duration>) -> Node {
    let disk = dir.join(format!("node{id}.img"));
    if !disk.exists() {
        Engine::format(
            &disk,
            &FormatOptions {
                shard_count: 2,
                journal_blocks: 1024,
                create_size_bytes: Some(96 << 20),
                ..Default::default()
            },
        )
        .expect("format");
    }
    Node::start(NodeConfig {
        disk,
        state_dir: dir.join(format!("state{id}")),
        listen: "127.0.0.1:0".parse().expect("addr"),
        advertise: None,
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        meta_url: None,
        token: TOKEN.into(),
        node_id: Some(id),
        domain: format!("host{id}"),
        route_file: None,
        forward_timeout: Duration::from_millis(500),
        busy_poll: Duration::ZERO,
        insecure_no_auth: false,
        idle_timeout: idle,
        scrub_bytes_per_sec: celer_node::SCRUB_RATE_DEFAULT,
        scrub_interval: celer_node::SCRUB_INTERVAL_DEFAULT,
        tls_creds: None,
        hugepages: false,
    })
    .expect("node starts")
}

pub fn info(n: &Node, up: bool) -> NodeInfo {
    NodeInfo {
        id: n.id(),
        data_addr: n.data_addr().to_string(),
        admin_addr: n.admin_addr().to_string(),
        shards: 2,
        domain: format!("host{}", n.id()),
        up,
    }
}

/// A blocking test client for one node shard.
pub struct Wire {
    pub s: TcpStream,
    pub next_id: u32,
    /// The node's Challenge nonce (a Renew proof is bound to it).
    pub node_nonce: [u8; 32],
}

impl Wire {
    /// A connection that proves the cluster's data key (as a node does):
    /// every op is allowed.
    pub fn connect(n: &Node, shard: u16) -> Wire {
        let key = celer_proto::auth::data_key_from_secret(TOKEN);
        Wire::connect_as(n, shard, &Credential::Node { key }).expect("hello")
    }

    /// Connects and says Hello with `cred`: the node's status on refusal.
    pub fn connect_as(n: &Node, shard: u16, cred: &Credential) -> Result<Wire, Status> {
        let s = TcpStream::connect(n.data_addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut w = Wire {
            s,
            next_id: 1,
            node_nonce: [0; 32],
        };
        let (c, node_nonce) = w.read_frame();
        assert_eq!((c.kind, c.op), (Kind::Request, Op::Challenge));
        let node_nonce: [u8; 32] = node_nonce.try_into().expect("a 32-byte nonce");
        w.node_nonce = node_nonce;
        let peer_nonce = [7u8; 32];
        let proof = HelloProof::build(cred, &node_nonce, &peer_nonce, shard, 99, false);
        let mut h = Header::request(Op::Hello, 0);
        h.offset = shard as u64;
        h.volume = 99;
        let (r, answer) = w.call(h, &proof);
        if r.status != Status::Ok {
            return Err(r.status);
        }
        assert!(
            HelloProof::check_answer(cred.answer_key(), &node_nonce, &peer_nonce, &answer),
            "the node proves the key"
        );
        Ok(w)
    }

    pub fn read_frame(&mut self) -> (Header, Vec<u8>) {
        let mut b = [0u8; HEADER_BYTES];
        self.s.read_exact(&mut b).expect("frame header");
        let r = decode_header(&b).expect("valid").expect("whole");
        let mut p = vec![0u8; r.payload_bytes as usize];
        self.s.read_exact(&mut p).expect("payload");
        r.verify_payload([&p[..]]).expect("payload crc");
        (r, p)
    }

    pub fn call(&mut self, h: Header, payload: &[u8]) -> (Header, Vec<u8>) {
        let h = h.with_payload([payload]);
        self.s.write_all(&h.encode()).expect("send");
        self.s.write_all(payload).expect("send");
        let mut b = [0u8; HEADER_BYTES];
        self.s.read_exact(&mut b).expect("response header");
        let r = decode_header(&b).expect("valid").expect("whole");
        assert_eq!(r.kind, Kind::Response);
        assert_eq!(r.request_id, h.request_id);
        let mut p = vec![0u8; r.payload_bytes as usize];
        self.s.read_exact(&mut p).expect("payload");
        r.verify_payload([&p[..]]).expect("payload crc");
        (r, p)
    }

    pub fn req(&mut self, op: Op, epoch: u64, volume: u64, offset: u64, length: u32) -> Header {
        let mut h = Header::request(op, self.next_id);
        self.next_id += 1;
        h.epoch = epoch;
        h.volume = volume;
        h.offset = offset;
        h.length = length;
        h
    }
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) >> 3) as u8)
        .collect()
}

/// (volume offset, partition) of the first chunks of volume 1 in a partition
/// whose members include/exclude a node, for targeted tests.
pub fn chunk_where(t: &RouteTable, pred: impl Fn(u32) -> bool) -> (u64, u32) {
    (0..10_000u64)
        .map(|c| (c * t.chunk_bytes, t.partition_of(1, c)))
        .find(|(_, p)| pred(*p))
        .expect("a chunk in such a partition")
}

pub fn read_block(n: &Node, t: &RouteTable, offset: u64, len: u32) -> (Status, Vec<u8>) {
    let p = t.partition_at(1, offset);
    let shard = (p % 2) as u16;
    let mut w = Wire::connect(n, shard);
    let h = w.req(Op::Read, t.epoch, 1, offset, len);
    let (r, data) = w.call(h, &[]);
    (r.status, data)
}
