//! Attacks on the data port of real nodes (in this process, real sockets):
//! strangers with no credential, clients whose capability does not allow
//! what they ask, forged and stolen capabilities, version poisoning, slow
//! and greedy connections. Each is refused, and the owner's data is
//! unchanged afterwards.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use celer_node::Node;
use celer_proto::auth::{data_key_from_secret, Capability, Credential, HelloProof};
use celer_proto::{clock_of_unix_ms, Header, Op, Status, HEADER_BYTES, VERSION_DRIFT_MAX_MS};
use celer_route::RouteTable;
use common::*;

const OWNER: u32 = 0x0002_0011;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

fn cap(volume: u64, attachment: u32, read_only: bool, expires: u64) -> Credential {
    let key = data_key_from_secret(TOKEN);
    let capability = Capability::mint(&key, volume, attachment, 0, read_only, expires);
    Credential::Attachment {
        key: capability.attachment_key(&key),
        capability,
    }
}

/// A write version of `attachment` at the current clock (+ `ms`).
fn version(attachment: u32, ms: i64) -> u64 {
    (clock_of_unix_ms(now_ms().saturating_add_signed(ms)) << 16) | (attachment & 0xffff) as u64
}

struct Setup {
    _dir: tempfile::TempDir,
    nodes: Vec<Node>,
    t: RouteTable,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes: Vec<Node> = (1..=3).map(|i| start_node(dir.path(), i)).collect();
    let t = RouteTable::initial(nodes.iter().map(|n| info(n, true)).collect(), 4, 3, 1 << 20)
        .expect("table");
    for n in &nodes {
        assert!(n.install_route(t.clone()));
    }
    Setup {
        _dir: dir,
        nodes,
        t,
    }
}

fn shard_of(t: &RouteTable, volume: u64, offset: u64) -> u16 {
    (t.partition_at(volume, offset) % 2) as u16
}

/// The owner writes `data` at `offset` of `volume` on every node.
fn owner_write(s: &Setup, volume: u64, offset: u64, data: &[u8]) -> u64 {
    let v = version(OWNER, 0);
    for n in &s.nodes {
        let mut w = Wire::connect_as(
            n,
            shard_of(&s.t, volume, offset),
            &cap(volume, OWNER, false, u64::MAX),
        )
        .expect("the owner's capability is accepted");
        let mut h = w.req(Op::Write, s.t.epoch, volume, offset, data.len() as u32);
        h.version = v;
        h.attachment = OWNER;
        assert_eq!(w.call(h, data).0.status, Status::Ok);
    }
    v
}

fn read_on(s: &Setup, n: &Node, volume: u64, offset: u64) -> Vec<u8> {
    let mut w = Wire::connect(n, shard_of(&s.t, volume, offset));
    let h = w.req(Op::Read, s.t.epoch, volume, offset, 4096);
    let (r, data) = w.call(h, &[]);
    assert_eq!(r.status, Status::Ok);
    data
}

/// Reads everything a connection gets until the node closes it (or 5 s).
fn drain(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// The status of the frame after the Challenge in `bytes` (None: no answer).
fn answer_after_challenge(bytes: &[u8]) -> Option<Status> {
    let at = HEADER_BYTES + 32;
    let h = celer_proto::decode_header(bytes.get(at..)?).ok()??;
    Some(h.status)
}

#[test]
fn strangers_get_nothing_and_change_nothing() {
    let s = setup();
    let data = pattern(1, 4096);
    owner_write(&s, 1, 0, &data);
    let key_elsewhere = data_key_from_secret("another cluster");
    for n in &s.nodes {
        for shard in 0..2u16 {
            // Every op a stranger might send first, with no credential.
            for op in [
                Op::Hello,
                Op::RouteTable,
                Op::Read,
                Op::Write,
                Op::ListChunks,
                Op::BackfillRead,
                Op::Ping,
            ] {
                let mut c = TcpStream::connect(n.data_addr()).expect("connect");
                let mut h = Header::request(op, 1);
                h.offset = if op == Op::Hello { shard as u64 } else { 0 };
                h.volume = 1;
                h.length = 4096;
                h.epoch = s.t.epoch;
                h.version = u64::MAX;
                let payload = if op == Op::Write {
                    vec![0xEE; 4096]
                } else {
                    vec![]
                };
                let h = h.with_payload([payload.as_slice()]);
                c.write_all(&h.encode()).expect("send");
                let _ = c.write_all(&payload);
                let got = drain(&mut c);
                assert_eq!(
                    answer_after_challenge(&got),
                    Some(Status::Unauthorized),
                    "{op:?} as a first frame on node {} shard {shard}",
                    n.id()
                );
                assert_eq!(
                    got.len(),
                    HEADER_BYTES + 32 + HEADER_BYTES,
                    "nothing but the refusal"
                );
            }
            // A capability signed with another cluster's key, and a real
            // capability without its key (seen on the wire).
            let forged = {
                let capability = Capability::mint(&key_elsewhere, 1, 5, 0, false, u64::MAX);
                Credential::Attachment {
                    key: capability.attachment_key(&key_elsewhere),
                    capability,
                }
            };
            assert_eq!(
                Wire::connect_as(n, shard, &forged).err(),
                Some(Status::Unauthorized)
            );
            let Credential::Attachment { capability, .. } = cap(1, 5, false, u64::MAX) else {
                unreachable!()
            };
            let stolen = Credential::Attachment {
                capability,
                key: [0; 32],
            };
            assert_eq!(
                Wire::connect_as(n, shard, &stolen).err(),
                Some(Status::Unauthorized)
            );
            // Another cluster's node key; an expired capability.
            let other_node = Credential::Node { key: key_elsewhere };
            assert_eq!(
                Wire::connect_as(n, shard, &other_node).err(),
                Some(Status::Unauthorized)
            );
            assert_eq!(
                Wire::connect_as(n, shard, &cap(1, 5, false, now_ms() - 1)).err(),
                Some(Status::Unauthorized)
            );
        }
    }
    for n in &s.nodes {
        assert_eq!(read_on(&s, n, 1, 0), data, "node {} keeps the data", n.id());
    }
}

#[test]
fn a_capability_allows_its_volume_its_mode_and_its_attachment_only() {
    let s = setup();
    let a = pattern(2, 4096);
    let b = pattern(3, 4096);
    owner_write(&s, 1, 0, &a);
    owner_write(&s, 2, 0, &b);
    let n = &s.nodes[0];
    let for_a = cap(1, OWNER, false, u64::MAX);
    // Volume B through a capability for A: no read, no write.
    let mut w = Wire::connect_as(n, shard_of(&s.t, 2, 0), &for_a).expect("hello");
    let h = w.req(Op::Read, s.t.epoch, 2, 0, 4096);
    let (r, p) = w.call(h, &[]);
    assert_eq!((r.status, p.len()), (Status::Unauthorized, 0));
    let mut h = w.req(Op::Write, s.t.epoch, 2, 0, 4096);
    h.version = version(OWNER, 1);
    h.attachment = OWNER;
    assert_eq!(w.call(h, &a).0.status, Status::Unauthorized);
    // ListChunks names a volume: another's is refused.
    let mut h = w.req(Op::ListChunks, s.t.epoch, 2, 0, 0);
    h.offset = s.t.partition_at(2, 0) as u64;
    assert_eq!(w.call(h, &[]).0.status, Status::Unauthorized);
    // Node-only op.
    let h = w.req(Op::BackfillRead, s.t.epoch, 2, 0, 4096);
    assert_eq!(w.call(h, &[]).0.status, Status::Unauthorized);

    // ListChunks of its own volume: that volume's chunks and no other's
    // (the partition of B's chunk 0 holds it, and is asked too).
    for chunk_of in [1u64, 2] {
        let p = s.t.partition_at(chunk_of, 0);
        let mut w = Wire::connect_as(n, (p % 2) as u16, &for_a).expect("hello");
        let mut h = w.req(Op::ListChunks, s.t.epoch, 1, 0, 0);
        h.offset = p as u64;
        let (r, list) = w.call(h, &[]);
        assert_eq!(r.status, Status::Ok, "ListChunks of its own volume");
        let pairs: Vec<(u64, u64)> = celer_proto::payload::decode_chunk_list(&list)
            .expect("a chunk list of whole entries")
            .collect();
        assert!(
            pairs.iter().all(|&(v, _)| v == 1),
            "a client's chunk list names another volume: {pairs:?}"
        );
        if chunk_of == 1 {
            assert!(
                pairs.contains(&(1, 0)),
                "its own chunk is listed: {pairs:?}"
            );
        }
    }

    let shard_a = shard_of(&s.t, 1, 0);
    let mut w = Wire::connect_as(n, shard_a, &for_a).expect("hello");
    // A version naming another attachment, or a header naming one.
    let mut h = w.req(Op::Write, s.t.epoch, 1, 0, 4096);
    h.version = version(OWNER + 1, 1);
    h.attachment = OWNER;
    assert_eq!(w.call(h, &b).0.status, Status::Unauthorized);
    let mut h = w.req(Op::Write, s.t.epoch, 1, 0, 4096);
    h.version = version(OWNER, 1);
    h.attachment = OWNER + 0x1_0000; // same low 16 bits, another id
    assert_eq!(w.call(h, &b).0.status, Status::Unauthorized);
    // Read-only: reads yes, writes no.
    let mut ro = Wire::connect_as(n, shard_a, &cap(1, OWNER + 1, true, u64::MAX)).expect("hello");
    let h = ro.req(Op::Read, s.t.epoch, 1, 0, 4096);
    let (r, got) = ro.call(h, &[]);
    assert_eq!((r.status, &got), (Status::Ok, &a));
    let mut h = ro.req(Op::Write, s.t.epoch, 1, 0, 4096);
    h.version = version(OWNER + 1, 1);
    h.attachment = OWNER + 1;
    assert_eq!(ro.call(h, &b).0.status, Status::ReadOnly);
    let mut h = ro.req(Op::Discard, s.t.epoch, 1, 0, 4096);
    h.version = version(OWNER + 1, 1);
    h.attachment = OWNER + 1;
    assert_eq!(ro.call(h, &[]).0.status, Status::ReadOnly);
    for n in &s.nodes {
        assert_eq!(read_on(&s, n, 1, 0), a);
        assert_eq!(read_on(&s, n, 2, 0), b);
    }
}

#[test]
fn a_renewed_capability_replaces_the_old_one_on_the_connection() {
    let s = setup();
    let n = &s.nodes[0];
    let shard = shard_of(&s.t, 1, 0);
    let short = cap(1, OWNER, false, now_ms() + 1500);
    let mut w = Wire::connect_as(n, shard, &short).expect("hello");
    let mut h = w.req(Op::Write, s.t.epoch, 1, 0, 4096);
    h.version = version(OWNER, 0);
    h.attachment = OWNER;
    assert_eq!(w.call(h, &pattern(4, 4096)).0.status, Status::Ok);
    std::thread::sleep(Duration::from_millis(1600));
    let h = w.req(Op::Read, s.t.epoch, 1, 0, 4096);
    assert_eq!(w.call(h, &[]).0.status, Status::Expired);
    // A Renew must be proven with the new capability's key, bound to this
    // connection's Challenge: a proof for another connection fails.
    let longer = cap(1, OWNER, false, now_ms() + 60_000);
    let bad = HelloProof::build(&longer, &[0; 32], &[1; 32], shard, 99, true);
    let h = w.req(Op::Renew, 0, 0, 0, 0);
    assert_eq!(w.call(h, &bad).0.status, Status::Unauthorized);
    // Another volume's capability cannot be swapped in.
    let other = cap(2, OWNER, false, now_ms() + 60_000);
    let p = HelloProof::build(&other, &w.node_nonce, &[1; 32], shard, 99, true);
    let h = w.req(Op::Renew, 0, 0, 0, 0);
    assert_eq!(w.call(h, &p).0.status, Status::Unauthorized);
    let p = HelloProof::build(&longer, &w.node_nonce, &[1; 32], shard, 99, true);
    let h = w.req(Op::Renew, 0, 0, 0, 0);
    assert_eq!(w.call(h, &p).0.status, Status::Ok);
    let h = w.req(Op::Read, s.t.epoch, 1, 0, 4096);
    assert_eq!(w.call(h, &[]).0.status, Status::Ok);
}

#[test]
fn version_poisoning_is_refused_and_no_acknowledged_write_is_lost() {
    let s = setup();
    let owner = cap(1, OWNER, false, u64::MAX);
    let first = pattern(5, 4096);
    let v1 = owner_write(&s, 1, 0, &first);
    for n in &s.nodes {
        let mut w = Wire::connect_as(n, shard_of(&s.t, 1, 0), &owner).expect("hello");
        // The highest version there is, and one a bit past the bound.
        for (v, what) in [
            ((u64::MAX << 16) | (OWNER & 0xffff) as u64, "u64::MAX"),
            (
                version(OWNER, VERSION_DRIFT_MAX_MS as i64 + 60_000),
                "bound + 1 min",
            ),
        ] {
            let mut h = w.req(Op::Write, s.t.epoch, 1, 0, 4096);
            h.version = v;
            h.attachment = OWNER;
            assert_eq!(
                w.call(h, &pattern(6, 4096)).0.status,
                Status::VersionAhead,
                "{what}"
            );
        }
        // An older version is refused, not acknowledged, and says which
        // version the block holds.
        let mut h = w.req(Op::Write, s.t.epoch, 1, 0, 4096);
        h.version = v1 - (1 << 16);
        h.attachment = OWNER;
        let (r, _) = w.call(h, &pattern(7, 4096));
        assert_eq!((r.status, r.version), (Status::OlderVersion, v1));
        // Responses report versions per volume: volume 2 saw none.
        let h = w.req(Op::Read, s.t.epoch, 2, 0, 4096);
        let (r, _) = w.call(h, &[]);
        assert_eq!(r.version, 0, "another volume's versions do not leak");
    }
    // The owner's next write (newer, as its clock moved on) applies.
    let second = pattern(8, 4096);
    let v2 = owner_write(&s, 1, 0, &second);
    assert!(v2 > v1);
    for n in &s.nodes {
        assert_eq!(read_on(&s, n, 1, 0), second);
    }
}

#[test]
fn slow_and_greedy_connections_are_cut_and_others_are_served() {
    let s = setup();
    let n = &s.nodes[0];
    let addr: SocketAddr = n.data_addr();
    // A byte every 0.9 s on fresh connections: cut at the handshake
    // deadline (3 s), however steady the trickle.
    let slow: Vec<std::thread::JoinHandle<Duration>> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut c = TcpStream::connect(addr).expect("connect");
                let hello = Header::request(Op::Hello, 1).encode();
                for b in hello.iter() {
                    if c.write_all(&[*b]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(900));
                    let mut probe = [0u8; 1];
                    c.set_nonblocking(true).expect("nonblocking");
                    let closed = matches!(c.peek(&mut probe), Ok(0));
                    c.set_nonblocking(false).expect("blocking");
                    if closed || start.elapsed() > Duration::from_secs(20) {
                        break;
                    }
                    // Skip the Challenge bytes still unread.
                    let mut sink = [0u8; 256];
                    c.set_read_timeout(Some(Duration::from_millis(1)))
                        .expect("timeout");
                    let _ = c.read(&mut sink);
                }
                start.elapsed()
            })
        })
        .collect();
    // Connections that open and say nothing, from another address, far
    // more than one address may hold in its handshake.
    let idle: Vec<TcpStream> = (0..200)
        .filter_map(|_| {
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            sock.bind(&"127.0.0.2:0".parse::<SocketAddr>().expect("addr").into())
                .expect("bind 127.0.0.2");
            sock.connect(&addr.into()).ok()?;
            Some(sock.into())
        })
        .collect();
    // An authenticated peer that announces a 4 MiB write and never sends it.
    let mut greedy = Vec::new();
    for _ in 0..8 {
        let mut w = Wire::connect_as(n, 0, &cap(1, OWNER, false, u64::MAX)).expect("hello");
        let mut h = w.req(Op::Write, s.t.epoch, 1, 0, 4 << 20);
        h.version = version(OWNER, 0);
        h.attachment = OWNER;
        let h = h.with_payload([&vec![0u8; 4 << 20][..]]);
        w.s.write_all(&h.encode()).expect("header");
        w.s.write_all(&[1u8; 1000]).expect("a little of it");
        greedy.push(w);
    }
    // Meanwhile a normal client connects and is served at once.
    let t0 = Instant::now();
    let mut w = Wire::connect(n, shard_of(&s.t, 1, 0));
    let connect = t0.elapsed();
    let mut worst = Duration::ZERO;
    for i in 0..50u64 {
        let t = Instant::now();
        let h = w.req(Op::Read, s.t.epoch, 1, i * 4096, 4096);
        assert_eq!(w.call(h, &[]).0.status, Status::Ok);
        worst = worst.max(t.elapsed());
    }
    println!("during the attack: connect + handshake {connect:?}, longest of 50 reads {worst:?}");
    assert!(connect < Duration::from_secs(1), "{connect:?}");
    assert!(worst < Duration::from_secs(1), "{worst:?}");
    for t in slow {
        let took = t.join().expect("slow thread");
        println!("a byte every 0.9 s: cut after {took:?}");
        assert!(
            took >= Duration::from_millis(2500) && took < Duration::from_secs(6),
            "{took:?}"
        );
    }
    // The idle ones are closed at the deadline too.
    for mut c in idle {
        let got = drain(&mut c);
        assert!(
            got.len() <= HEADER_BYTES + 32,
            "idle socket got {} bytes",
            got.len()
        );
    }
    // The greedy ones are cut when their frame does not complete in 10 s.
    let t = Instant::now();
    for mut w in greedy {
        let got = drain_for(&mut w.s, Duration::from_secs(15));
        assert!(got.is_empty(), "no answer to a frame never sent whole");
    }
    println!("greedy frames cut after {:?} more", t.elapsed());
}

/// Reads until the node closes (or `limit`).
fn drain_for(s: &mut TcpStream, limit: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(limit)).expect("timeout");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// How long until the node closes `s` (reading and dropping what it
/// sends), or None if it is still open after `limit`.
fn closed_within(mut s: TcpStream, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut b = [0u8; 256];
    loop {
        let left = limit.checked_sub(t0.elapsed())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        match s.read(&mut b) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(t0.elapsed()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// The idle timeout: a client connection that sends nothing is closed once
/// it has been silent that long; one that pings stays (also once its
/// capability expired: a Ping needs no valid capability, so a renewal that
/// comes late does not cost the connection), and so does a node's
/// connection (node connections are not timed out).
#[test]
fn silent_client_connections_are_closed_at_the_idle_timeout_and_others_stay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let idle = Duration::from_secs(1);
    let n = start_node_idle(dir.path(), 1, Some(idle));
    let owner = cap(1, 5, false, u64::MAX);
    let silent = Wire::connect_as(&n, 0, &owner).expect("hello");
    let expires = now_ms() + 1000;
    let mut pinging = Wire::connect_as(&n, 0, &cap(1, 5, false, expires)).expect("hello");
    let mut node = Wire::connect(&n, 1);
    let closed = std::thread::spawn(move || closed_within(silent.s, Duration::from_secs(5)));
    let t0 = Instant::now();
    let mut pings = 0;
    while t0.elapsed() < Duration::from_millis(2500) {
        let id = pinging.next_id;
        pinging.next_id += 1;
        let (r, _) = pinging.call(Header::request(Op::Ping, id), &[]);
        assert_eq!(r.status, Status::Ok, "ping {pings}");
        pings += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(now_ms() > expires + 1000, "pinged past the expiry");
    let h = pinging.req(Op::Read, 0, 1, 0, 4096);
    let (r, _) = pinging.call(h, &[]);
    assert_eq!(r.status, Status::Expired, "a read needs a valid capability");
    let after = closed
        .join()
        .expect("silent")
        .expect("the silent client connection was closed within 5 s");
    println!(
        "idle timeout {idle:?}: the silent client connection closed after {after:?}; {pings} pings kept the other open for {:?}",
        t0.elapsed()
    );
    assert!(
        after >= idle && after < idle + Duration::from_millis(500),
        "closed after {after:?}, the idle timeout is {idle:?}"
    );
    let (r, _) = node.call(Header::request(Op::Ping, 900), &[]);
    assert_eq!(
        r.status,
        Status::Ok,
        "the node connection, silent 2.5 s, stays"
    );
    n.stop().expect("stop");
}

/// A half-open connection (no Hello) is bounded by the handshake deadline
/// (3 s), not by the idle timeout: closed at 3 s with the idle timeout off.
#[test]
fn a_connection_without_a_hello_is_closed_at_the_handshake_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = start_node_idle(dir.path(), 1, None);
    let s = TcpStream::connect(n.data_addr()).expect("connect");
    let after = closed_within(s, Duration::from_secs(10))
        .expect("a connection without a Hello is closed within 10 s");
    println!("no Hello: closed after {after:?}");
    assert!(
        after >= Duration::from_millis(2900) && after < Duration::from_millis(3500),
        "closed after {after:?}; the handshake deadline is 3 s"
    );
    n.stop().expect("stop");
}

/// GET /metrics from the node's admin port (open to scrapers).
fn metrics(n: &Node) -> String {
    let mut s = TcpStream::connect(n.admin_addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("response");
    resp
}

/// The counter's value for `shard` in a /metrics page (0 if absent).
fn protocol_errors(page: &str, shard: u16) -> u64 {
    let want = format!("celer_node_protocol_errors_total{{shard=\"{shard}\"}} ");
    page.lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A proven peer that then sends a corrupt frame (a flipped bit in the
/// header) or a response where a request belongs is cut off, and the shard
/// counts it in `celer_node_protocol_errors_total`: on a healthy network
/// that stays 0 (the data-path simulator checks so), so a rising count says
/// someone sends garbage. A peer that just hangs up is not counted.
#[test]
fn a_corrupt_or_out_of_turn_frame_closes_the_connection_and_is_counted() {
    let s = setup();
    let n = &s.nodes[0];
    assert_eq!(protocol_errors(&metrics(n), 0), 0);
    let closed = |mut w: Wire| {
        let mut buf = [0u8; 256];
        match w.s.read(&mut buf) {
            Ok(0) => true,
            Ok(k) => panic!("{k} bytes instead of the connection's end"),
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };
    // A corrupt frame.
    let mut w = Wire::connect(n, 0);
    let mut h = Header::request(Op::Ping, 9).encode();
    h[40] ^= 0x04;
    w.s.write_all(&h).expect("send");
    assert!(
        closed(w),
        "the node keeps a connection that sent a corrupt frame"
    );
    // A response frame from a client.
    let mut w = Wire::connect(n, 0);
    let r = Header::response_to(&Header::request(Op::Ping, 3), Status::Ok).encode();
    w.s.write_all(&r).expect("send");
    assert!(
        closed(w),
        "the node keeps a connection that sent a response"
    );
    // A peer that hangs up.
    drop(Wire::connect(n, 0));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let counted = protocol_errors(&metrics(n), 0);
        if counted == 2 || Instant::now() > deadline {
            assert_eq!(counted, 2, "{}", metrics(n));
            // And the hang-up, long handled by now, did not add to it.
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(protocol_errors(&metrics(n), 0), 2);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The other shard saw nothing.
    assert_eq!(protocol_errors(&metrics(n), 1), 0);
}
