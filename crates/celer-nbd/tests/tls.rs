//! NBD over TLS with real peers: QEMU's own NBD client (qemu-io, qemu-img
//! with `--object tls-creds-x509`) against an engine volume, certificates
//! made by openssl in the test. A client without a certificate, with one
//! from another CA, with a subject not on the allow-list, and a plain
//! client are refused and the volume is unchanged; hostile bytes before
//! and inside the TLS handshake are cut at the handshake deadline while an
//! honest client is served. Needs qemu-utils and openssl: a missing tool
//! fails the test.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celer_device::BlockDevice;
use celer_engine::{Engine, EngineDevice, EngineDeviceConfig, FormatOptions};
use celer_nbd::{ConnLimits, NbdConfig, Server, TlsConfig};
use common::*;

const CLIENT_SUBJECT: &str = "CN=vm-host-1,O=Celer test";

/// Server log lines, captured for the assertions about what a refused
/// client leaves in the log.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    /// The process's one log (tests may share a process under cargo test).
    fn install() -> Log {
        static LOG: std::sync::OnceLock<Log> = std::sync::OnceLock::new();
        LOG.get_or_init(|| {
            let log = Log::default();
            let w = log.clone();
            tracing_subscriber::fmt()
                .with_writer(move || w.clone())
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .init();
            log
        })
        .clone()
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log")).into_owned()
    }
    /// Waits (briefly: the server logs as the connection ends) for a line
    /// containing every one of `words`.
    fn wait_for(&self, words: &[&str]) -> String {
        let t0 = Instant::now();
        loop {
            let text = self.text();
            if let Some(line) = text.lines().find(|l| words.iter().all(|w| l.contains(w))) {
                return line.to_string();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "no log line with {words:?}; the log:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs a tool to its end, killed after 60 s (a server that stalls a
/// client must fail the test, not hang it).
fn run(name: &str, args: &[&str]) -> Output {
    let out = tempfile::tempfile().expect("stdout file");
    let err = tempfile::tempfile().expect("stderr file");
    let mut child = Command::new(name)
        .args(args)
        .stdout(out.try_clone().expect("clone"))
        .stderr(err.try_clone().expect("clone"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {name} (install qemu-utils and openssl): {e}"));
    let t0 = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name} {args:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read = |mut f: std::fs::File| {
        use std::io::Seek;
        let mut v = Vec::new();
        f.seek(std::io::SeekFrom::Start(0)).expect("seek");
        f.read_to_end(&mut v).expect("read output");
        v
    };
    Output {
        status,
        stdout: read(out),
        stderr: read(err),
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(name: &str, args: &[&str]) -> String {
    let o = run(name, args);
    assert!(o.status.success(), "{name} {args:?} failed:\n{}", text(&o));
    text(&o)
}

fn openssl(args: &[&str]) {
    ok("openssl", args);
}

/// A CA: its certificate and key in `dir`.
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

/// A key and a certificate signed by `ca`, written as `{name}-key.pem` and
/// `{name}-cert.pem` in `dir`, with the extensions qemu checks.
fn issue(ca: &Ca, dir: &Path, name: &str, subject: &str, ext: &str) {
    std::fs::create_dir_all(dir).expect("dir");
    let key = dir.join(format!("{name}-key.pem"));
    let cert = dir.join(format!("{name}-cert.pem"));
    let csr = dir.join(format!("{name}.csr"));
    let ext_file = dir.join(format!("{name}.ext"));
    std::fs::write(&ext_file, ext).expect("ext file");
    let p = |p: &Path| p.to_str().expect("utf-8").to_string();
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
    std::fs::remove_file(&csr).expect("remove csr");
}

const SERVER_EXT: &str = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n";
const CLIENT_EXT: &str = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";

/// Credentials for one test: the server's directory and one directory per
/// kind of client, in qemu's tls-creds-x509 layout.
struct Pki {
    server: PathBuf,
    /// Certificate from the CA, subject on the allow-list.
    good: PathBuf,
    /// The CA's certificate only (qemu then sends no certificate).
    no_cert: PathBuf,
    /// Certificate from another CA, with the allowed subject.
    other_ca: PathBuf,
    /// Certificate from the CA, subject not on the allow-list.
    not_listed: PathBuf,
    allow_list: PathBuf,
}

fn make_pki(root: &Path) -> Pki {
    let ca = make_ca(&root.join("ca"), "Celer test CA");
    let other = make_ca(&root.join("other-ca"), "Celer test CA");
    let server = root.join("server");
    issue(
        &ca,
        &server,
        "server",
        "/CN=localhost/O=Celer test",
        SERVER_EXT,
    );
    let client_dir = |name: &str, signer: &Ca, subject: Option<&str>| {
        let d = root.join(name);
        std::fs::create_dir_all(&d).expect("client dir");
        // The client trusts the server's CA in every case.
        std::fs::copy(&ca.cert, d.join("ca-cert.pem")).expect("ca copy");
        if let Some(subject) = subject {
            issue(signer, &d, "client", subject, CLIENT_EXT);
        }
        d
    };
    std::fs::copy(&ca.cert, server.join("ca-cert.pem")).expect("ca copy");
    let other_ca = client_dir(
        "other-ca-client",
        &other,
        Some("/O=Celer test/CN=vm-host-1"),
    );
    // qemu checks its own certificate against its CA file before it
    // connects: this client trusts both CAs, the server only its own.
    let both = [
        std::fs::read(&ca.cert).expect("ca"),
        std::fs::read(&other.cert).expect("other ca"),
    ]
    .concat();
    std::fs::write(other_ca.join("ca-cert.pem"), both).expect("both CAs");
    let pki = Pki {
        good: client_dir("good", &ca, Some("/O=Celer test/CN=vm-host-1")),
        no_cert: client_dir("no-cert", &ca, None),
        other_ca,
        not_listed: client_dir("not-listed", &ca, Some("/O=Celer test/CN=vm-host-2")),
        allow_list: root.join("allowed-clients"),
        server,
    };
    // The subject as the server reads it is what openssl prints.
    let printed = ok(
        "openssl",
        &[
            "x509",
            "-noout",
            "-subject",
            "-nameopt",
            "RFC2253",
            "-in",
            pki.good.join("client-cert.pem").to_str().expect("utf-8"),
        ],
    );
    assert_eq!(printed.trim(), format!("subject={CLIENT_SUBJECT}"));
    std::fs::write(
        &pki.allow_list,
        format!("# hosts that may attach\n{CLIENT_SUBJECT}\n\nCN=someone-else\n"),
    )
    .expect("allow list");
    pki
}

fn engine_device(dir: &Path, volume_size: u64) -> Arc<dyn BlockDevice> {
    let path = dir.join("engine.disk");
    Engine::format(
        &path,
        &FormatOptions {
            chunk_blocks: 16,
            spare_blocks: 4,
            shard_count: 2,
            journal_blocks: 64,
            create_size_bytes: Some(4 * volume_size),
        },
    )
    .expect("format engine");
    Arc::new(
        EngineDevice::open(&EngineDeviceConfig {
            path,
            volume: 1,
            size_bytes: volume_size,
            read_only: false,
        })
        .expect("open engine volume"),
    )
}

struct TlsServer {
    addr: SocketAddr,
    socket: PathBuf,
}

fn start(dir: &Path, pki: &Pki, limits: ConnLimits) -> TlsServer {
    let socket = dir.join("nbd.sock");
    let mut config = NbdConfig::new(EXPORT);
    config.addr = Some("127.0.0.1:0".parse().expect("addr"));
    config.socket = Some(socket.clone());
    config.limits = limits;
    config.tls = Some(TlsConfig {
        dir: pki.server.clone(),
        verify_peer: true,
        allowed_clients: Some(pki.allow_list.clone()),
        allow_plain_unix: false,
    });
    let server = Server::bind(config, engine_device(dir, 32 << 20)).expect("bind");
    let addr = server.tcp_addr().expect("tcp address");
    // Serves until the test process exits.
    std::thread::spawn(move || server.run().expect("server run"));
    TlsServer { addr, socket }
}

/// `--image-opts` for the export over TCP with TLS credentials `tls0`.
fn tls_opts(addr: SocketAddr) -> String {
    format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export={EXPORT},tls-creds=tls0",
        addr.port()
    )
}

fn tls_object(dir: &Path) -> String {
    format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        dir.display()
    )
}

/// qemu-io with the client credentials in `creds`.
fn qemu_io_tls(creds: &Path, opts: &str, cmd: &str) -> Output {
    run(
        "qemu-io",
        &[
            "--object",
            &tls_object(creds),
            "--image-opts",
            opts,
            "-c",
            cmd,
        ],
    )
}

fn assert_io_ok(o: &Output, expect: &str) {
    let t = text(o);
    assert!(
        o.status.success() && t.contains(expect) && !t.contains("verification failed"),
        "qemu-io should have succeeded with {expect:?}:\n{t}"
    );
}

#[test]
fn qemu_reads_and_writes_a_celer_volume_over_tls() {
    let _log = Log::install();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(&dir.path().join("pki"));
    let server = start(dir.path(), &pki, ConnLimits::default());
    let opts = tls_opts(server.addr);

    let t0 = Instant::now();
    let o = qemu_io_tls(&pki.good, &opts, "write -P 0xab 0 1M");
    assert_io_ok(&o, "wrote 1048576/1048576");
    let o = qemu_io_tls(&pki.good, &opts, "read -P 0xab 0 1M");
    assert_io_ok(&o, "read 1048576/1048576");
    let o = qemu_io_tls(&pki.good, &opts, "read -P 0 1M 1M");
    assert_io_ok(&o, "read 1048576/1048576");
    let qemu_io_s = t0.elapsed().as_secs_f64();
    // The check can fail: a wrong pattern is reported.
    let o = qemu_io_tls(&pki.good, &opts, "read -P 0xcd 0 4k");
    assert!(
        !o.status.success() && text(&o).contains("Pattern verification failed"),
        "qemu-io should report the mismatch:\n{}",
        text(&o)
    );

    // qemu-img convert, many requests in flight (-m 16 -W): random data
    // in, and back out, over TLS; several requests arrive in one read of
    // the socket and wait decrypted inside the TLS stream.
    let src = dir.path().join("src.raw");
    let back = dir.path().join("back.raw");
    let mut data = vec![0u8; 16 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&src, &data).expect("write source");
    let object = tls_object(&pki.good);
    let t0 = Instant::now();
    ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-m",
            "16",
            "-W",
            "--object",
            &object,
            "-f",
            "raw",
            src.to_str().expect("utf-8"),
            "--target-image-opts",
            &opts,
        ],
    );
    let write_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    ok(
        "qemu-img",
        &[
            "convert",
            "-m",
            "16",
            "--object",
            &object,
            "--image-opts",
            &opts,
            "-O",
            "raw",
            back.to_str().expect("utf-8"),
        ],
    );
    let read_s = t0.elapsed().as_secs_f64();
    let got = std::fs::read(&back).expect("read back");
    assert_eq!(got.len(), 32 << 20);
    assert!(got[..16 << 20] == data[..], "16 MiB read back differ");
    assert!(
        got[16 << 20..].iter().all(|&b| b == 0),
        "the rest of the volume was never written"
    );

    // The Unix socket requires TLS too (the client names the host its
    // certificate must match).
    let unix = format!(
        "driver=nbd,server.type=unix,server.path={},export={EXPORT},tls-creds=tls0,tls-hostname=localhost",
        server.socket.display()
    );
    let o = qemu_io_tls(&pki.good, &unix, "read -P 0 20M 64k");
    assert_io_ok(&o, "read 65536/65536");
    let plain_unix = format!("nbd+unix:///{EXPORT}?socket={}", server.socket.display());
    let o = run("qemu-io", &["-f", "raw", "-c", "read 0 4k", &plain_unix]);
    assert!(
        !o.status.success(),
        "a plain client on the Unix socket must be refused:\n{}",
        text(&o)
    );
    println!(
        "qemu-io over TLS: 3 runs in {qemu_io_s:.2} s; qemu-img convert 16 MiB: in {write_s:.2} s, out (32 MiB) {read_s:.2} s"
    );
}

#[test]
fn clients_without_the_right_certificate_are_refused_and_change_nothing() {
    let log = Log::install();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(&dir.path().join("pki"));
    let server = start(dir.path(), &pki, ConnLimits::default());
    let opts = tls_opts(server.addr);
    assert_io_ok(
        &qemu_io_tls(&pki.good, &opts, "write -P 0x11 0 1M"),
        "wrote 1048576/1048576",
    );

    let attempts = [
        (
            "no certificate",
            &pki.no_cert,
            &["refusing an NBD client", "presented no certificate"][..],
        ),
        (
            "a certificate from another CA",
            &pki.other_ca,
            &["refusing an NBD client", "not signed by the CA"][..],
        ),
        (
            "a subject not on the allow-list",
            &pki.not_listed,
            &[
                "refusing an NBD client",
                "CN=vm-host-2,O=Celer test",
                "is not in",
            ][..],
        ),
    ];
    for (what, creds, words) in attempts {
        let o = qemu_io_tls(creds, &opts, "write -P 0x66 0 1M");
        if creds == &pki.not_listed {
            // Told why, in the protocol (NBD_REP_ERR_POLICY).
            assert!(text(&o).contains("Denied by server"), "{}", text(&o));
        }
        assert!(
            !o.status.success() && !text(&o).contains("wrote"),
            "a client with {what} must be refused:\n{}",
            text(&o)
        );
        let line = log.wait_for(words);
        println!("{what}: qemu-io says {:?}; server: {line}", text(&o).trim());
    }
    // A plain client: qemu's own message says TLS is required.
    let plain = format!("nbd://127.0.0.1:{}/{EXPORT}", server.addr.port());
    let o = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x66 0 1M", &plain],
    );
    assert!(
        !o.status.success() && text(&o).contains("TLS"),
        "a plain client must be refused:\n{}",
        text(&o)
    );
    log.wait_for(&["before STARTTLS: this server requires TLS"]);

    // The protocol as a plain client sees it: every option but STARTTLS
    // gets TLS_REQD, EXPORT_NAME closes, STARTTLS with data is invalid.
    let mut c = Client::tcp(server.addr);
    assert_eq!(c.info_or_go(7, EXPORT).err(), Some((1 << 31) + 5), "GO");
    assert_eq!(c.info_or_go(6, EXPORT).err(), Some((1 << 31) + 5), "INFO");
    c.send_opt(3, &[]);
    assert_eq!(c.opt_reply().1, (1 << 31) + 5, "LIST");
    c.send_opt(5, b"x");
    assert_eq!(c.opt_reply().1, (1 << 31) + 3, "STARTTLS with data");
    c.send_opt(1, EXPORT.as_bytes());
    assert!(c.closed(), "EXPORT_NAME before TLS closes the connection");

    // Nothing of the refused writes reached the volume.
    assert_io_ok(
        &qemu_io_tls(&pki.good, &opts, "read -P 0x11 0 1M"),
        "read 1048576/1048576",
    );
}

/// The bytes of a real ClientHello (rustls, trusting the server's CA).
fn client_hello(ca: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).expect("ca") {
        roots.add(c.expect("ca cert")).expect("add ca");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().expect("name"))
            .expect("client");
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).expect("client hello");
    }
    hello
}

/// Greeting, client flags, NBD_OPT_STARTTLS and its ack, on a raw socket.
fn start_tls(s: &mut TcpStream) {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("greeting");
    s.write_all(&3u32.to_be_bytes()).expect("flags");
    let mut opt = Vec::new();
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&5u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&opt).expect("STARTTLS");
    let mut r = [0u8; 20];
    s.read_exact(&mut r).expect("STARTTLS reply");
    assert_eq!(
        u32::from_be_bytes(r[12..16].try_into().expect("4")),
        1,
        "ACK"
    );
}

/// Reads until the server closes the socket; seconds since `t0`.
fn closed_after(mut s: TcpStream, t0: Instant, limit: Duration) -> f64 {
    s.set_read_timeout(Some(limit)).expect("timeout");
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return t0.elapsed().as_secs_f64(),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return t0.elapsed().as_secs_f64(),
            Err(e) => panic!("the server kept the socket open for {limit:?}: {e}"),
        }
    }
}

#[test]
fn hostile_bytes_before_and_inside_tls_do_not_stall_others() {
    let log = Log::install();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(&dir.path().join("pki"));
    let deadline = Duration::from_secs(2);
    let server = start(
        dir.path(),
        &pki,
        ConnLimits {
            handshake_timeout: deadline,
            ..ConnLimits::default()
        },
    );
    let opts = tls_opts(server.addr);
    let hello = client_hello(&pki.server.join("ca-cert.pem"));
    let attacker = Ipv4Addr::new(127, 0, 0, 2);
    let t0 = Instant::now();
    let mut cut_at_deadline = Vec::new();

    // Silent after a ClientHello, and trickling one, hold their slots until
    // the deadline; so does one that stops after STARTTLS.
    let mut silent_hello = connect_from(attacker, server.addr);
    start_tls(&mut silent_hello);
    silent_hello.write_all(&hello).expect("hello");
    let mut after_starttls = connect_from(attacker, server.addr);
    start_tls(&mut after_starttls);
    let mut trickle = connect_from(attacker, server.addr);
    start_tls(&mut trickle);
    let trickler = {
        let mut s = trickle.try_clone().expect("clone");
        let hello = hello.clone();
        std::thread::spawn(move || {
            for b in &hello {
                if s.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    // Garbage in place of a TLS record, TLS in place of NBD options, and
    // garbage in place of the client flags: closed at once. (From another
    // address: 127.0.0.2 has 3 of its 4 handshake slots taken.)
    let attacker = Ipv4Addr::new(127, 0, 0, 3);
    let mut garbage_tls = connect_from(attacker, server.addr);
    start_tls(&mut garbage_tls);
    garbage_tls.write_all(&[0xff; 64]).expect("garbage");
    let mut tls_first = connect_from(attacker, server.addr);
    let mut g = [0u8; 18];
    tls_first.read_exact(&mut g).expect("greeting");
    tls_first.write_all(&3u32.to_be_bytes()).expect("flags");
    tls_first.write_all(&hello).expect("hello as options");
    let mut garbage_flags = connect_from(attacker, server.addr);
    garbage_flags.read_exact(&mut g).expect("greeting");
    garbage_flags.write_all(&[0xa5; 64]).expect("garbage");

    // Meanwhile an honest client from another address works.
    let honest_t0 = Instant::now();
    assert_io_ok(
        &qemu_io_tls(&pki.good, &opts, "write -P 0x42 0 64k"),
        "wrote 65536/65536",
    );
    assert_io_ok(
        &qemu_io_tls(&pki.good, &opts, "read -P 0x42 0 64k"),
        "read 65536/65536",
    );
    let honest_s = honest_t0.elapsed().as_secs_f64();
    assert!(
        honest_s < deadline.as_secs_f64(),
        "the honest client waited {honest_s:.2} s, as long as the handshake deadline"
    );

    let limit = Duration::from_secs(6);
    let quick = [
        ("garbage inside TLS", garbage_tls),
        ("a ClientHello in place of NBD options", tls_first),
        ("garbage in place of the client flags", garbage_flags),
    ];
    for (what, s) in quick {
        let at = closed_after(s, t0, limit);
        println!("{what}: closed after {at:.3} s");
        assert!(at < 1.0, "{what}: closed only after {at:.2} s");
    }
    for (what, s) in [
        ("silence after a ClientHello", silent_hello),
        ("silence after STARTTLS", after_starttls),
        ("a ClientHello at a byte per 0.3 s", trickle),
    ] {
        let at = closed_after(s, t0, limit);
        println!("{what}: closed after {at:.3} s (deadline {deadline:?})");
        cut_at_deadline.push(at);
        assert!(
            at >= deadline.as_secs_f64() - 0.1 && at < deadline.as_secs_f64() + 1.0,
            "{what}: closed after {at:.2} s, the deadline is {deadline:?}"
        );
    }
    trickler.join().expect("trickler");
    log.wait_for(&["handshake not finished within 2000 ms"]);

    // The server survived all of it.
    assert_io_ok(
        &qemu_io_tls(&pki.good, &opts, "read -P 0x42 0 64k"),
        "read 65536/65536",
    );
    println!("honest client under attack: write+read in {honest_s:.3} s");
}

/// The flags of `celer nbd serve`: --tls-creds with --tls-allowed-clients
/// and --tls-allow-plain-unix, and --tls-no-verify-peer (encryption only).
#[test]
fn serve_flags_turn_tls_and_its_options_on() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: celer_nbd::cli::ServeArgs,
    }
    let _log = Log::install();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(&dir.path().join("pki"));
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(8 << 20))
        .expect("disk");
    let serve = |name: &str, extra: &[&str]| -> (SocketAddr, PathBuf) {
        // Reserved (celer-ports): the child binds it after this returns.
        let addr: SocketAddr = celer_ports::reserve().expect("reserve a loopback port");
        let sock = dir.path().join(format!("{name}.sock"));
        let device = format!("file:{}", disk.display());
        let listen = addr.to_string();
        let mut argv = vec![
            "serve",
            "--device",
            &device,
            "--listen",
            &listen,
            "--socket",
            sock.to_str().expect("utf-8"),
            "--tls-creds",
            pki.server.to_str().expect("utf-8"),
        ];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).expect("flags parse");
        std::thread::spawn(move || celer_nbd::cli::run_serve(&cli.serve).expect("serve"));
        let t0 = Instant::now();
        while !sock.exists() {
            assert!(t0.elapsed() < Duration::from_secs(10), "server not up");
            std::thread::sleep(Duration::from_millis(10));
        }
        (addr, sock)
    };
    let list = pki.allow_list.to_str().expect("utf-8").to_string();
    let (addr, sock) = serve(
        "listed",
        &["--tls-allowed-clients", &list, "--tls-allow-plain-unix"],
    );
    let opts = tls_opts(addr);
    assert_io_ok(
        &qemu_io_tls(&pki.good, &opts, "write -P 0x77 0 64k"),
        "wrote 65536/65536",
    );
    let o = qemu_io_tls(&pki.not_listed, &opts, "read 0 4k");
    assert!(!o.status.success(), "not listed:\n{}", text(&o));
    let plain_tcp = format!("nbd://127.0.0.1:{}/{EXPORT}", addr.port());
    let o = run("qemu-io", &["-f", "raw", "-c", "read 0 4k", &plain_tcp]);
    assert!(!o.status.success(), "plain TCP:\n{}", text(&o));
    // --tls-allow-plain-unix: the Unix socket serves plain NBD.
    let plain_unix = format!("nbd+unix:///{EXPORT}?socket={}", sock.display());
    let o = run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x77 0 64k", &plain_unix],
    );
    assert_io_ok(&o, "read 65536/65536");

    // --tls-no-verify-peer: encrypted, but any client, with or without a
    // certificate.
    let (addr, _) = serve("anyone", &["--tls-no-verify-peer"]);
    let opts = tls_opts(addr);
    assert_io_ok(
        &qemu_io_tls(&pki.no_cert, &opts, "read -P 0x77 0 64k"),
        "read 65536/65536",
    );
    let plain_tcp = format!("nbd://127.0.0.1:{}/{EXPORT}", addr.port());
    let o = run("qemu-io", &["-f", "raw", "-c", "read 0 4k", &plain_tcp]);
    assert!(!o.status.success(), "plain TCP:\n{}", text(&o));
    // An allow-list needs client certificates.
    let cli = Cli::try_parse_from([
        "serve",
        "--device",
        "null:1M",
        "--listen",
        "127.0.0.1:0",
        "--tls-creds",
        pki.server.to_str().expect("utf-8"),
        "--tls-no-verify-peer",
        "--tls-allowed-clients",
        &list,
    ])
    .expect("flags parse");
    let e = celer_nbd::cli::run_serve(&cli.serve).expect_err("refused");
    assert!(format!("{e:#}").contains("needs verify-peer"), "{e:#}");
}
