//! Admission under attack, over real TCP sockets: idle sockets from one
//! host must not lock out another host, a handshake has one deadline for
//! the whole of it (a client trickling bytes is cut at it), and the idle
//! timeout closes silent established connections only.
//!
//! The attacking sockets are bound to 127.0.0.2 before connecting (Linux
//! loopback accepts any 127/8 source), the honest client comes from
//! 127.0.0.1, so the per-source caps see two hosts.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use celer_nbd::{ConnLimits, NbdConfig, Server};
use common::*;

/// Reads until the server closes; (bytes received, seconds since `t0`).
fn wait_closed(mut s: TcpStream, t0: Instant, limit: Duration) -> (usize, f64) {
    s.set_read_timeout(Some(limit)).expect("read timeout");
    let mut got = 0;
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server did not close the socket within {limit:?}: {e}"),
        }
    }
    (got, t0.elapsed().as_secs_f64())
}

fn start_tcp(limits: ConnLimits) -> (SocketAddr, Arc<MemDevice>) {
    let mut mem = MemDevice::new(16 << 20, false);
    // Completions at once: the latencies printed are the server's.
    mem.batch = 1;
    let mem = Arc::new(mem);
    let mut config = NbdConfig::new(EXPORT);
    config.addr = Some("127.0.0.1:0".parse().expect("addr"));
    config.limits = limits;
    let server = Server::bind(config, mem.clone()).expect("bind");
    let addr = server.tcp_addr().expect("tcp address");
    // Serves until the test process exits.
    std::thread::spawn(move || server.run().expect("server run"));
    (addr, mem)
}

fn percentile(sorted_ms: &[f64], p: f64) -> f64 {
    sorted_ms[((sorted_ms.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn idle_sockets_from_one_host_do_not_lock_out_another() {
    let deadline = Duration::from_secs(3);
    let limits = ConnLimits {
        handshake_timeout: deadline,
        ..ConnLimits::default()
    };
    let per_ip = limits.handshaking_per_ip_max;
    let (addr, _mem) = start_tcp(limits);
    let attackers = 80;
    let t0 = Instant::now();
    let idle: Vec<_> = (0..attackers)
        .map(|_| {
            let s = connect_from(Ipv4Addr::new(127, 0, 0, 2), addr);
            std::thread::spawn(move || wait_closed(s, t0, Duration::from_secs(10)))
        })
        .collect();
    let opened_s = t0.elapsed().as_secs_f64();

    // While they are open, a client from another address gets in and works.
    let t = Instant::now();
    let mut c = Client::greet(Box::new(connect_from(Ipv4Addr::LOCALHOST, addr)));
    let info = c.go();
    let handshake_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(info.size, 16 << 20);
    let mut lat_ms = Vec::new();
    for i in 0..200u64 {
        let data = pattern(i as u8, 4096);
        let off = (i % 64) * 4096;
        let t = Instant::now();
        assert_eq!(c.call(CMD_WRITE, 0, off, 4096, &data).0, 0, "write");
        let (err, got) = c.call(CMD_READ, 0, off, 4096, &[]);
        lat_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(err, 0, "read");
        assert_eq!(got, data, "read back what was written");
    }
    let during_s = t0.elapsed().as_secs_f64();
    assert!(
        during_s < deadline.as_secs_f64(),
        "the honest client finished at {during_s:.2} s, after the attackers' deadline: the test proves nothing"
    );
    lat_ms.sort_by(f64::total_cmp);

    let closed: Vec<(usize, f64)> = idle
        .into_iter()
        .map(|t| t.join().expect("idle socket thread"))
        .collect();
    // Admitted ones got the 18-byte greeting and were cut at the deadline;
    // the others were closed at accept without a byte.
    let admitted: Vec<f64> = closed.iter().filter(|c| c.0 > 0).map(|c| c.1).collect();
    let refused: Vec<f64> = closed.iter().filter(|c| c.0 == 0).map(|c| c.1).collect();
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let min = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
    println!(
        "{attackers} idle sockets from 127.0.0.2 opened in {opened_s:.3} s: {} admitted, closed at {:.2}..{:.2} s (handshake deadline {} s); {} refused, closed by {:.3} s",
        admitted.len(),
        min(&admitted),
        max(&admitted),
        deadline.as_secs(),
        refused.len(),
        max(&refused),
    );
    println!(
        "client from 127.0.0.1 meanwhile: handshake {handshake_ms:.2} ms; 200 × (4 KiB write + read): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        percentile(&lat_ms, 0.5),
        percentile(&lat_ms, 0.99),
        percentile(&lat_ms, 1.0)
    );
    assert_eq!(admitted.len(), per_ip, "the per-source handshake cap");
    assert!(
        refused.iter().all(|&s| s < 1.0),
        "refused sockets are closed at once"
    );
    assert!(
        admitted
            .iter()
            .all(|&s| s >= deadline.as_secs_f64() - 0.05 && s < deadline.as_secs_f64() + 1.5),
        "admitted idle sockets are closed at the deadline: {admitted:?}"
    );

    // The deadline is the handshake's only: the honest connection lives on.
    let (err, _) = c.call(CMD_READ, 0, 0, 4096, &[]);
    assert_eq!(err, 0, "read after the deadline passed");
    c.send(CMD_DISC, 0, 1, 0, 0, &[]);
    assert!(c.closed());
}

#[test]
fn a_client_trickling_its_handshake_is_cut_at_the_deadline() {
    let deadline = Duration::from_secs(3);
    let (addr, _mem) = start_tcp(ConnLimits {
        handshake_timeout: deadline,
        ..ConnLimits::default()
    });
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("greeting");
    // Client flags, then OPT_GO: a valid handshake, one byte every 0.9 s
    // (no single read waits more than 0.9 s).
    let mut msg = 3u32.to_be_bytes().to_vec();
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&7u32.to_be_bytes());
    let go = Client::info_request(EXPORT, &[]);
    msg.extend_from_slice(&(go.len() as u32).to_be_bytes());
    msg.extend_from_slice(&go);
    let reader = s.try_clone().expect("clone");
    let closed = std::thread::spawn(move || wait_closed(reader, t0, Duration::from_secs(10)));
    let mut sent = 0;
    for b in &msg {
        if s.write_all(&[*b]).is_err() || closed.is_finished() {
            break;
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(900));
    }
    let (_, closed_s) = closed.join().expect("reader");
    println!(
        "trickling client (1 byte / 0.9 s): cut at {closed_s:.2} s after connecting, {sent} of {} handshake bytes sent (deadline {} s)",
        msg.len(),
        deadline.as_secs()
    );
    assert!(sent < msg.len(), "the handshake must not have finished");
    assert!(
        closed_s >= deadline.as_secs_f64() - 0.05 && closed_s < deadline.as_secs_f64() + 1.0,
        "cut at the deadline, not per read: {closed_s:.2} s"
    );
}

#[test]
fn idle_timeout_closes_silent_connections_only() {
    let idle = Duration::from_millis(1500);
    let (addr, _mem) = start_tcp(ConnLimits {
        idle_timeout: Some(idle),
        ..ConnLimits::default()
    });
    let t0 = Instant::now();
    let silent_sock = TcpStream::connect(addr).expect("connect");
    let mut watch = silent_sock.try_clone().expect("clone");
    let mut silent = Client::greet(Box::new(silent_sock));
    silent.go();
    let mut busy = Client::tcp(addr);
    busy.go();
    let closed = std::thread::spawn(move || {
        let mut b = [0u8; 1];
        let r = watch.read(&mut b);
        (r.map_err(|e| e.kind()), t0.elapsed().as_secs_f64())
    });
    // The busy one asks every 300 ms, for longer than the idle timeout.
    while t0.elapsed() < idle * 2 {
        assert_eq!(busy.call(CMD_READ, 0, 0, 4096, &[]).0, 0);
        std::thread::sleep(Duration::from_millis(300));
    }
    let (r, closed_s) = closed.join().expect("silent reader");
    println!(
        "idle timeout {} ms: the silent connection closed at {closed_s:.2} s; the busy one still answers at {:.2} s",
        idle.as_millis(),
        t0.elapsed().as_secs_f64()
    );
    assert!(matches!(r, Ok(0)), "closed by the server: {r:?}");
    assert!(closed_s >= idle.as_secs_f64() - 0.05 && closed_s < idle.as_secs_f64() + 1.5);
    assert_eq!(busy.call(CMD_READ, 0, 0, 4096, &[]).0, 0);
}
