//! Data TLS on real daemons over real sockets: 4 `celer node serve
//! --tls-creds` processes (certificates made by openssl here, as
//! celer-nbd's tls test makes them), clients with and without the right
//! certificate, a recording proxy on the wire, and hostile bytes at the
//! handshake. Needs openssl.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use celer_client::celer_tls::DataTls;
use celer_client::{Client, ClientConfig, Credential};
use celer_device::{BlockDevice, DeviceQueue, IoOp};
use celer_meta::api::{AttachMode, AttachVolume, CreateVolume, Volume};
use celer_proto::auth::HelloProof;
use celer_proto::{decode_header, Header, Kind, Op, Status, HEADER_BYTES};
use support::cluster::{Cluster, ClusterOpts, TOKEN};

const BIN: &str = env!("CARGO_BIN_EXE_celer");
const VOLUME_BYTES: u64 = 64 << 20;

fn openssl(args: &[&str]) {
    let o = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (install it): {e}"));
    assert!(
        o.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

struct Ca {
    cert: PathBuf,
    key: PathBuf,
}

fn make_ca(dir: &Path, cn: &str) -> Ca {
    std::fs::create_dir_all(dir).expect("ca dir");
    let (cert, key) = (dir.join("ca-cert.pem"), dir.join("ca-key.pem"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN={cn}"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        key.to_str().expect("utf-8"),
        "-out",
        cert.to_str().expect("utf-8"),
    ]);
    Ca { cert, key }
}

/// `{name}-key.pem` and `{name}-cert.pem` in `dir`, signed by `ca`.
fn issue(ca: &Ca, dir: &Path, name: &str, subject: &str, ext: &str) {
    std::fs::create_dir_all(dir).expect("dir");
    let p = |p: &Path| p.to_str().expect("utf-8").to_string();
    let key = dir.join(format!("{name}-key.pem"));
    let cert = dir.join(format!("{name}-cert.pem"));
    let csr = dir.join(format!("{name}.csr"));
    let ext_file = dir.join(format!("{name}.ext"));
    std::fs::write(&ext_file, ext).expect("ext file");
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        subject,
        "-keyout",
        &p(&key),
        "-out",
        &p(&csr),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&ca.cert),
        "-CAkey",
        &p(&ca.key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &p(&ext_file),
        "-out",
        &p(&cert),
    ]);
}

const SERVER_EXT: &str = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n";
const CLIENT_EXT: &str = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";

struct Pki {
    /// A node's directory: CA, server pair, client pair.
    node: PathBuf,
    /// A front end's: CA and a client pair from the CA.
    client: PathBuf,
    /// The CA, and a client pair from another CA of the same name.
    other_ca: PathBuf,
}

fn make_pki(root: &Path) -> Pki {
    let ca = make_ca(&root.join("ca"), "Celer data CA");
    let other = make_ca(&root.join("other-ca"), "Celer data CA");
    let node = root.join("node");
    issue(&ca, &node, "server", "/CN=celer-node", SERVER_EXT);
    issue(&ca, &node, "client", "/CN=celer-node", CLIENT_EXT);
    std::fs::copy(&ca.cert, node.join("ca-cert.pem")).expect("ca");
    let client = root.join("client");
    issue(&ca, &client, "client", "/CN=vm-host-1", CLIENT_EXT);
    std::fs::copy(&ca.cert, client.join("ca-cert.pem")).expect("ca");
    let other_ca = root.join("other-ca-client");
    issue(&other, &other_ca, "client", "/CN=vm-host-1", CLIENT_EXT);
    std::fs::copy(&ca.cert, other_ca.join("ca-cert.pem")).expect("ca");
    Pki {
        node,
        client,
        other_ca,
    }
}

fn create_volume(c: &Cluster, name: &str) -> Volume {
    c.meta_client()
        .create_volume(&CreateVolume {
            name: name.into(),
            size_bytes: VOLUME_BYTES,
            replicas: None,
            sector_size_bytes: None,
        })
        .expect("create volume")
}

fn credential(c: &Cluster, vol: &Volume) -> Credential {
    let att = c
        .meta_client()
        .attach_with(
            &vol.name,
            &AttachVolume {
                mode: AttachMode::Shared,
                ..AttachVolume::default()
            },
        )
        .expect("attach");
    Credential::Attachment {
        capability: celer_client::Capability::from_hex(&att.capability).expect("capability"),
        key: celer_proto::auth::key_from_hex(&att.key).expect("key"),
    }
}

fn config(seeds: Vec<String>, vol: &Volume, cred: &Credential, tls: Option<&Path>) -> ClientConfig {
    let mut cfg = ClientConfig::new(seeds, vol.id, vol.size_bytes, cred.clone());
    cfg.request_timeout = Duration::from_millis(500);
    cfg.op_deadline = Duration::from_secs(10);
    cfg.data_tls = tls.map(|d| DataTls::load_client(d).expect("client credentials"));
    cfg
}

fn one_request(q: &mut dyn DeviceQueue, op: IoOp, offset: u64, buf: &mut [u8]) {
    let seg = celer_device::IoSegment {
        addr: buf.as_mut_ptr(),
        len: buf.len(),
    };
    let req = celer_device::IoRequest {
        op,
        offset_bytes: offset,
        len_bytes: buf.len() as u64,
        segments: &[seg],
        tag: 0,
    };
    // SAFETY: buf outlives the request: we wait for its completion here.
    unsafe { q.submit(&req) }.expect("submit");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut done = None;
    while done.is_none() {
        q.poll(&mut |c| done = Some(c.result));
        assert!(Instant::now() < deadline, "a request took more than 30 s");
        std::thread::sleep(Duration::from_micros(50));
    }
    done.expect("a completion")
        .unwrap_or_else(|e| panic!("{op:?} at {offset}: {e}"));
}

/// A block whose bytes say where they belong (and are found nowhere else).
fn pattern(offset: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let x = (offset as usize + i).wrapping_mul(2654435761) >> 7;
            (x as u8) ^ seed ^ (i >> 9) as u8
        })
        .collect()
}

/// What the test writes: 4 KiB blocks over several chunks, and 64 KiB
/// writes (above small_write_max: they go to the primary, which forwards
/// them to the other members over node-to-node TLS).
fn writes() -> Vec<(u64, usize)> {
    let mut w: Vec<(u64, usize)> = (0..24).map(|i| (i * (1 << 20) + 4096 * i, 4096)).collect();
    w.extend((0..8).map(|i| ((40 + i) * (1 << 20) + 8192, 64 << 10)));
    w
}

/// A raw TLS connection to a node shard with the cluster credential (as a
/// node calls another): the replicas are read from each member directly.
fn node_conn(tls: &DataTls, addr: SocketAddr, shard: u16) -> impl Read + Write {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let conn =
        rustls::ClientConnection::new(tls.client.clone().expect("client pair"), name).expect("tls");
    let mut s = rustls::StreamOwned::new(conn, s);
    let (c, nonce) = read_frame(&mut s).expect("the node's Challenge");
    assert_eq!((c.kind, c.op), (Kind::Request, Op::Challenge));
    let nonce: [u8; 32] = nonce.try_into().expect("32-byte nonce");
    let cred = support::wire::node_credential(TOKEN);
    let mine = [0x42u8; 32];
    let proof = HelloProof::build(&cred, &nonce, &mine, shard, 999, false);
    let mut h = Header::request(Op::Hello, u32::MAX);
    h.offset = shard as u64;
    h.volume = 999;
    let (r, answer) = call(&mut s, h, &proof);
    assert_eq!(
        r.status,
        Status::Ok,
        "the node takes the cluster credential"
    );
    assert!(HelloProof::check_answer(
        cred.answer_key(),
        &nonce,
        &mine,
        &answer
    ));
    s
}

fn read_frame(s: &mut impl Read) -> std::io::Result<(Header, Vec<u8>)> {
    let mut b = [0u8; HEADER_BYTES];
    s.read_exact(&mut b)?;
    let h = decode_header(&b)
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .ok_or_else(|| std::io::Error::other("short header"))?;
    let mut p = vec![0u8; h.payload_bytes as usize];
    s.read_exact(&mut p)?;
    h.verify_payload([&p[..]])
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok((h, p))
}

fn call(s: &mut (impl Read + Write), h: Header, payload: &[u8]) -> (Header, Vec<u8>) {
    let h = h.with_payload([payload]);
    s.write_all(&h.encode()).expect("send");
    s.write_all(payload).expect("send");
    let r = read_frame(s).expect("response");
    assert_eq!(r.0.kind, Kind::Response);
    r
}

/// Every member's copy of `[offset, offset + len)`, read over TLS, under
/// one table (read again from the start when the table changes meanwhile:
/// the cluster may still be settling its first moves).
fn replica_copies(
    c: &Cluster,
    tls: &DataTls,
    vol: &Volume,
    offset: u64,
    len: usize,
) -> Vec<(u32, Vec<u8>)> {
    let start = std::time::Instant::now();
    loop {
        if let Some(copies) = replica_copies_once(c, tls, vol, offset, len) {
            return copies;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "the route table kept changing"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `replica_copies` under the current table; `None` when a node holds
/// another one (`StaleEpoch`, `RouteBehind`).
fn replica_copies_once(
    c: &Cluster,
    tls: &DataTls,
    vol: &Volume,
    offset: u64,
    len: usize,
) -> Option<Vec<(u32, Vec<u8>)>> {
    let t = c.route();
    let chunk = offset / t.chunk_bytes;
    let p = t.partition_of(vol.id, chunk);
    let part = t.partition(p).expect("partition");
    part.members
        .iter()
        .map(|m| {
            let n = t.node(m.node).expect("member");
            let addr = n
                .data_addr
                .to_socket_addrs()
                .expect("address")
                .next()
                .expect("an address");
            let mut s = node_conn(tls, addr, t.shard_of(n, p));
            let mut h = Header::request(Op::Read, 2);
            h.epoch = t.epoch;
            h.volume = vol.id;
            h.offset = offset;
            h.length = len as u32;
            let (r, data) = call(&mut s, h, &[]);
            if matches!(r.status, Status::StaleEpoch | Status::RouteBehind) {
                return None;
            }
            assert_eq!(r.status, Status::Ok, "read from node {}", m.node);
            Some((m.node, data))
        })
        .collect()
}

fn node_log(c: &Cluster, i: usize) -> String {
    std::fs::read_to_string(&c.nodes[i].log).unwrap_or_default()
}

#[test]
fn a_tls_cluster_serves_a_tls_client_and_refuses_plain_and_foreign_ones() {
    let pki_dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(pki_dir.path());
    let mut c = Cluster::start(
        Path::new(BIN),
        ClusterOpts {
            tls_creds: Some(pki.node.clone()),
            ..ClusterOpts::default()
        },
    );
    let vol = create_volume(&c, "tls");
    let cred = credential(&c, &vol);
    let client = Client::connect(config(c.seeds(), &vol, &cred, Some(&pki.client)))
        .expect("a TLS client with a certificate from the CA connects");
    let mut q = client.open_queue(0).expect("queue");
    for &(off, len) in &writes() {
        let mut b = pattern(off, len, 1);
        one_request(q.as_mut(), IoOp::Write, off, &mut b);
    }
    for &(off, len) in &writes() {
        let mut b = vec![0u8; len];
        one_request(q.as_mut(), IoOp::Read, off, &mut b);
        assert!(b == pattern(off, len, 1), "read back at {off}");
    }
    // Every member holds the same bytes (the 64 KiB writes reached the
    // secondaries through the primary's TLS connections to them).
    let node_tls = DataTls::load_node(&pki.node).expect("node credentials");
    for &(off, len) in &writes() {
        let copies = replica_copies(&c, &node_tls, &vol, off, len);
        assert_eq!(copies.len(), 3, "3 replicas");
        for (node, data) in &copies {
            assert!(*data == pattern(off, len, 1), "node {node}'s copy at {off}");
        }
    }

    // A plain client: refused with a clear error, after the probe timeout.
    let seed = vec![c.nodes[0].data_proxy.addr().to_string()];
    let t0 = Instant::now();
    let e = Client::connect(config(seed.clone(), &vol, &cred, None))
        .expect_err("a plain client is refused by a TLS node")
        .to_string();
    eprintln!("plain client: {e} after {:?}", t0.elapsed());
    assert!(
        e.contains("data TLS") && e.contains("--data-tls-creds"),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // The node says why in its log once its handshake deadline passes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node_log(&c, 0).contains("this data port requires TLS") {
        assert!(
            Instant::now() < deadline,
            "node 0 logged no refusal of the plain client:\n{}",
            node_log(&c, 0)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A client whose certificate another CA signed: refused. (The node
    // logs at most one refusal a second: let the last one's second pass.)
    std::thread::sleep(Duration::from_millis(1100));
    let e = Client::connect(config(seed, &vol, &cred, Some(&pki.other_ca)))
        .expect_err("a certificate from another CA is refused")
        .to_string();
    eprintln!("other CA: {e}");
    assert!(e.contains("data TLS") && e.contains("alert"), "{e}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node_log(&c, 0).contains("not signed by the CA") {
        assert!(
            Instant::now() < deadline,
            "node 0 logged no refusal of the foreign certificate:\n{}",
            node_log(&c, 0)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Nothing changed.
    for &(off, len) in &writes() {
        let mut b = vec![0u8; len];
        one_request(q.as_mut(), IoOp::Read, off, &mut b);
        assert!(b == pattern(off, len, 1), "unchanged at {off}");
    }

    // A 5th node joins: the partitions moved to it are backfilled over
    // node-to-node TLS, and its copies equal the others.
    let i = c.add_node();
    let id = c.node_id(i);
    let t0 = Instant::now();
    loop {
        let t = c.wait_healthy(Duration::from_secs(120));
        if t.partitions
            .iter()
            .any(|p| p.members.iter().any(|m| m.node == id))
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "node {id} got no partition"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut on_new = 0;
    for &(off, len) in &writes() {
        let copies = replica_copies(&c, &node_tls, &vol, off, len);
        for (node, data) in &copies {
            assert!(
                *data == pattern(off, len, 1),
                "node {node}'s copy at {off} after the join"
            );
            on_new += usize::from(*node == id);
        }
    }
    eprintln!(
        "{on_new} of the writes were backfilled to the new node {id} in {:?}",
        t0.elapsed()
    );
    assert!(
        on_new > 0,
        "the new node holds none of the writes: the backfill was not exercised"
    );
}

/// Writes a distinctive 4 KiB block through a client while every node's
/// data proxy records; whether the block shows up in the recordings.
fn pattern_on_the_wire(c: &Cluster, tls: Option<&Path>) -> (bool, usize) {
    let vol = create_volume(c, "wire");
    let cred = credential(c, &vol);
    let client = Client::connect(config(c.seeds(), &vol, &cred, tls)).expect("client");
    let mut q = client.open_queue(0).expect("queue");
    // Connections open first (the Hello), then the recording.
    let mut warm = vec![0u8; 4096];
    one_request(q.as_mut(), IoOp::Read, 3 << 20, &mut warm);
    for n in &c.nodes {
        n.data_proxy.record(true);
    }
    let secret: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(0x9E37_79B9) >> 13) as u8 ^ 0xA5)
        .collect();
    let mut b = secret.clone();
    one_request(q.as_mut(), IoOp::Write, 3 << 20, &mut b);
    let mut r = vec![0u8; 4096];
    one_request(q.as_mut(), IoOp::Read, 3 << 20, &mut r);
    assert!(r == secret);
    let mut streams = Vec::new();
    for n in &c.nodes {
        n.data_proxy.record(false);
        streams.extend(n.data_proxy.take_recorded());
    }
    let bytes: usize = streams.iter().map(Vec::len).sum();
    let found = streams
        .iter()
        .any(|s| s.windows(secret.len()).any(|w| w == secret.as_slice()));
    (found, bytes)
}

#[test]
fn tls_hides_the_data_on_the_wire_and_plain_shows_it() {
    let pki_dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(pki_dir.path());
    {
        let c = Cluster::start(
            Path::new(BIN),
            ClusterOpts {
                tls_creds: Some(pki.node.clone()),
                ..ClusterOpts::default()
            },
        );
        let (found, bytes) = pattern_on_the_wire(&c, Some(&pki.client));
        eprintln!("TLS: {bytes} bytes recorded, pattern found: {found}");
        assert!(
            bytes > 3 * 4096,
            "the recording saw the write ({bytes} bytes)"
        );
        assert!(
            !found,
            "the 4 KiB written crossed the wire in clear with TLS on"
        );
    }
    let c = Cluster::start(Path::new(BIN), ClusterOpts::default());
    let (found, bytes) = pattern_on_the_wire(&c, None);
    eprintln!("plain: {bytes} bytes recorded, pattern found: {found}");
    assert!(
        found,
        "without TLS the recording must show the block (else the check proves nothing)"
    );

    // A TLS client to a plain node: a clear error at once, no hang.
    let vol = create_volume(&c, "tls-to-plain");
    let cred = credential(&c, &vol);
    let t0 = Instant::now();
    let e = Client::connect(config(
        vec![c.nodes[0].data_proxy.addr().to_string()],
        &vol,
        &cred,
        Some(&pki.client),
    ))
    .expect_err("a TLS client cannot use a plain node")
    .to_string();
    eprintln!("TLS client to a plain node: {e} after {:?}", t0.elapsed());
    assert!(e.contains("does not speak TLS"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
}

/// A real ClientHello for a node at `addr`, with the client pair of `dir`.
fn client_hello(dir: &Path, addr: SocketAddr) -> Vec<u8> {
    let tls = DataTls::load_client(dir).expect("client credentials");
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut conn = rustls::ClientConnection::new(tls.client.expect("pair"), name).expect("client");
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).expect("client hello");
    }
    hello
}

/// Reads until the node closes the socket; seconds since `t0`.
fn closed_after(mut s: TcpStream, t0: Instant, limit: Duration) -> f64 {
    s.set_read_timeout(Some(limit)).expect("timeout");
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return t0.elapsed().as_secs_f64(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return t0.elapsed().as_secs_f64()
            }
            Err(e) => panic!("the node kept the socket open for {limit:?}: {e}"),
        }
    }
}

#[test]
fn the_handshake_deadline_cuts_silent_and_trickled_tls_and_serves_others() {
    let pki_dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(pki_dir.path());
    let c = Cluster::start(
        Path::new(BIN),
        ClusterOpts {
            nodes: 3,
            tls_creds: Some(pki.node.clone()),
            ..ClusterOpts::default()
        },
    );
    let vol = create_volume(&c, "deadline");
    let cred = credential(&c, &vol);
    let target = c.nodes[0].listen;
    let hello = client_hello(&pki.client, target);
    let t0 = Instant::now();
    // Silence after connecting.
    let silent = TcpStream::connect(target).expect("connect");
    // Silence after a whole ClientHello.
    let mut after_hello = TcpStream::connect(target).expect("connect");
    after_hello.write_all(&hello).expect("hello");
    // A ClientHello trickled a byte per 0.9 s.
    let trickle = TcpStream::connect(target).expect("connect");
    let mut tw = trickle.try_clone().expect("clone");
    let hello2 = hello.clone();
    let trickler = std::thread::spawn(move || {
        for b in hello2.iter().take(10) {
            if tw.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(900));
        }
    });
    let waits: Vec<_> = [silent, after_hello, trickle]
        .into_iter()
        .map(|s| std::thread::spawn(move || closed_after(s, t0, Duration::from_secs(8))))
        .collect();
    // Meanwhile an honest TLS client connects, again and again.
    let tls = DataTls::load_client(&pki.client).expect("client credentials");
    let mut longest = Duration::ZERO;
    while t0.elapsed() < Duration::from_millis(3500) {
        let t = Instant::now();
        celer_client::probe_route_with(&target.to_string(), &cred, Some(&tls))
            .expect("an honest TLS client gets the route");
        longest = longest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    let cut: Vec<f64> = waits
        .into_iter()
        .map(|w| w.join().expect("waiter"))
        .collect();
    trickler.join().expect("trickler");
    eprintln!("cut after {cut:?} s; longest honest probe {longest:?}");
    for (what, t) in ["silent", "silent after ClientHello", "trickled"]
        .iter()
        .zip(&cut)
    {
        assert!((2.9..4.0).contains(t), "{what} connection cut after {t} s");
    }
    assert!(longest < Duration::from_millis(500), "{longest:?}");
    // The node still serves afterwards.
    let client =
        Client::connect(config(c.seeds(), &vol, &cred, Some(&pki.client))).expect("client");
    let mut q = client.open_queue(0).expect("queue");
    let mut b = pattern(0, 4096, 7);
    one_request(q.as_mut(), IoOp::Write, 0, &mut b);
}
