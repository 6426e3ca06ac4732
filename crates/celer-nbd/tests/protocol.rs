//! The NBD server against a small client written here: handshake, every
//! command, pipelining with out-of-order completions, bad input, read-only.

mod common;

use std::io::Write;
use std::sync::Arc;

use common::*;

const SIZE: u64 = 16 << 20;

fn mem(read_only: bool) -> (Arc<MemDevice>, Arc<dyn celer_device::BlockDevice>) {
    let d = Arc::new(MemDevice::new(SIZE, read_only));
    (d.clone(), d)
}

#[test]
fn handshake_and_every_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (m, dev) = mem(false);
    let (sock, _, server) = start(dir.path(), dev, false, false, Some(1));
    let mut c = Client::unix(&sock);
    let info = c.go();
    assert_eq!(info.size, SIZE);
    // HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES, not READ_ONLY.
    assert_eq!(info.flags, 1 | 4 | 8 | 32 | 64);
    assert_eq!(info.block_sizes, Some((512, 4096, 1 << 20)));

    let w = pattern(7, 64 << 10);
    assert_eq!(c.call(CMD_WRITE, 0, 8192, w.len() as u32, &w).0, 0);
    let (err, r) = c.call(CMD_READ, 0, 8192, w.len() as u32, &[]);
    assert_eq!(err, 0);
    assert!(r == w, "read back differs from what was written");
    assert_eq!(m.data.lock().unwrap()[8192..8192 + w.len()], w[..]);

    let w2 = pattern(9, 4096);
    assert_eq!(c.call(CMD_WRITE, FLAG_FUA, 0, 4096, &w2).0, 0, "FUA write");
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).0, 0, "flush");
    assert_eq!(c.call(CMD_READ, 0, 0, 4096, &[]).1, w2);

    // TRIM and WRITE_ZEROES larger than the device's 1 MiB request limit:
    // the server cuts them into pieces.
    assert_eq!(c.call(CMD_TRIM, 0, 0, 3 << 20, &[]).0, 0, "trim 3 MiB");
    assert_eq!(c.call(CMD_READ, 0, 8192, 4096, &[]).1, vec![0u8; 4096]);
    let w3 = pattern(3, 1 << 20);
    assert_eq!(c.call(CMD_WRITE, 0, 4 << 20, 1 << 20, &w3).0, 0);
    assert_eq!(
        c.call(CMD_WRITE_ZEROES, FLAG_FUA, 4 << 20, 1 << 20, &[]).0,
        0
    );
    assert_eq!(
        c.call(CMD_READ, 0, 4 << 20, 1 << 20, &[]).1,
        vec![0u8; 1 << 20]
    );

    c.send(CMD_DISC, 0, 1, 0, 0, &[]);
    assert!(c.closed(), "server closes after NBD_CMD_DISC");
    server
        .join()
        .expect("server stops after its one connection");
}

#[test]
fn option_haggling() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_m, dev) = mem(false);
    let (sock, _, server) = start(dir.path(), dev, false, false, Some(3));

    let mut c = Client::unix(&sock);
    // OPT_LIST: one NBD_REP_SERVER with our name, then ACK.
    c.send_opt(3, &[]);
    let (_, typ, d) = c.opt_reply();
    assert_eq!(typ, 2);
    assert_eq!(&d[4..], EXPORT.as_bytes());
    assert_eq!(c.opt_reply().1, 1);
    // Unknown options (EXTENDED_HEADERS, a made-up one) → ERR_UNSUP.
    c.send_opt(11, &[]);
    assert_eq!(c.opt_reply().1, (1 << 31) + 1);
    c.send_opt(0xdead, b"junk");
    assert_eq!(c.opt_reply().1, (1 << 31) + 1);
    // INFO on a wrong name → ERR_UNKNOWN; malformed INFO → ERR_INVALID.
    assert_eq!(c.info_or_go(6, "nope").err(), Some((1 << 31) + 6));
    c.send_opt(6, &[0, 0, 0, 200, b'x']);
    assert_eq!(c.opt_reply().1, (1 << 31) + 3);
    // INFO then the old-style EXPORT_NAME still works.
    assert_eq!(c.info_or_go(6, EXPORT).expect("info").size, SIZE);
    c.send_opt(1, EXPORT.as_bytes());
    let mut r = [0u8; 10];
    std::io::Read::read_exact(&mut c.s, &mut r).expect("export name reply");
    assert_eq!(u64::from_be_bytes(r[0..8].try_into().unwrap()), SIZE);
    let w = pattern(1, 512);
    assert_eq!(c.call(CMD_WRITE, 0, 512, 512, &w).0, 0);
    assert_eq!(c.call(CMD_READ, 0, 512, 512, &[]).1, w);
    drop(c);

    // ABORT gets an ACK and a closed connection.
    let mut c = Client::unix(&sock);
    c.send_opt(2, &[]);
    assert_eq!(c.opt_reply().1, 1);
    assert!(c.closed());

    // EXPORT_NAME with an unknown name: the protocol says close.
    let mut c = Client::unix(&sock);
    c.send_opt(1, b"other");
    assert!(c.closed());
    server.join().expect("server");
}

#[test]
fn pipelined_requests_complete_out_of_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_m, dev) = mem(false);
    let (sock, _, server) = start(dir.path(), dev, false, false, Some(1));
    let mut c = Client::unix(&sock);
    c.go();
    // 24 writes in one burst: more than the device's 8 in flight.
    let n = 24u64;
    let mut burst = Vec::new();
    for i in 0..n {
        let w = pattern(i as u8, 4096);
        burst.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        burst.extend_from_slice(&0u16.to_be_bytes());
        burst.extend_from_slice(&CMD_WRITE.to_be_bytes());
        burst.extend_from_slice(&(100 + i).to_be_bytes());
        burst.extend_from_slice(&(i * 4096).to_be_bytes());
        burst.extend_from_slice(&4096u32.to_be_bytes());
        burst.extend_from_slice(&w);
    }
    c.s.write_all(&burst).expect("burst");
    let mut order = Vec::new();
    for _ in 0..n {
        let (h, err, _) = c.reply();
        assert_eq!(err, 0);
        order.push(h);
    }
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        (100..100 + n).collect::<Vec<_>>(),
        "one reply per handle"
    );
    assert_ne!(order, sorted, "completions should come back out of order");

    for i in 0..n {
        c.send(CMD_READ, 0, 200 + i, i * 4096, 4096, &[]);
    }
    let mut seen = 0;
    for _ in 0..n {
        let (h, err, d) = c.reply();
        assert_eq!(err, 0);
        assert_eq!(d, pattern((h - 200) as u8, 4096), "data for handle {h}");
        seen += 1;
    }
    assert_eq!(seen, n);
    c.send(CMD_DISC, 0, 1, 0, 0, &[]);
    server.join().expect("server");
}

#[test]
fn bad_requests_get_errors_and_the_connection_survives() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (m, dev) = mem(false);
    let (sock, _, server) = start(dir.path(), dev, false, false, Some(1));
    let mut c = Client::unix(&sock);
    c.go();
    assert_eq!(c.call(99, 0, 0, 512, &[]).0, EINVAL, "unknown command");
    assert_eq!(
        c.call(CMD_READ, 0, 100, 512, &[]).0,
        EINVAL,
        "misaligned offset"
    );
    assert_eq!(
        c.call(CMD_READ, 0, 0, 100, &[]).0,
        EINVAL,
        "misaligned length"
    );
    assert_eq!(c.call(CMD_READ, 0, 0, 0, &[]).0, EINVAL, "zero length");
    assert_eq!(
        c.call(CMD_READ, 0, SIZE, 512, &[]).0,
        EINVAL,
        "read past the end"
    );
    assert_eq!(
        c.call(CMD_READ, 0, u64::MAX - 511, 512, &[]).0,
        EINVAL,
        "offset overflow"
    );
    assert_eq!(
        c.call(CMD_READ, 0, 0, 2 << 20, &[]).0,
        EOVERFLOW,
        "read over max block"
    );
    assert_eq!(
        c.call(CMD_READ, 0x100, 0, 512, &[]).0,
        EINVAL,
        "unknown flag"
    );
    let w = pattern(5, 512);
    assert_eq!(
        c.call(CMD_WRITE, 0, SIZE, 512, &w).0,
        ENOSPC,
        "write past the end"
    );
    assert_eq!(
        c.call(CMD_WRITE, 0, 3, 512, &w).0,
        EINVAL,
        "misaligned write"
    );
    assert_eq!(
        c.call(CMD_TRIM, 0, SIZE - 512, 1024, &[]).0,
        ENOSPC,
        "trim past the end"
    );
    assert!(
        m.data.lock().unwrap().iter().all(|&b| b == 0),
        "refused writes wrote nothing"
    );
    // Still in sync: a good request works.
    assert_eq!(c.call(CMD_WRITE, 0, 0, 512, &w).0, 0);
    assert_eq!(c.call(CMD_READ, 0, 0, 512, &[]).1, w);
    // A write larger than the advertised maximum closes the connection
    // (payload never sent, never allocated).
    c.send(CMD_WRITE, 0, 7, 0, u32::MAX, &[]);
    assert!(c.closed(), "oversized write closes the connection");
    server.join().expect("server");
}

#[test]
fn broken_frames_close_only_their_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_m, dev) = mem(false);
    let (sock, _, server) = start(dir.path(), dev, false, false, Some(7));

    // Bad request magic.
    let mut c = Client::unix(&sock);
    c.go();
    c.s.write_all(&[0xffu8; 28]).expect("send");
    assert!(c.closed(), "bad magic closes");

    // Truncated request header, then EOF.
    let mut c = Client::unix(&sock);
    c.go();
    c.s.write_all(&0x2560_9513u32.to_be_bytes()).expect("send");
    drop(c);

    // Truncated write payload, then EOF.
    let mut c = Client::unix(&sock);
    c.go();
    c.send(CMD_WRITE, 0, 1, 0, 4096, &[1u8; 100]);
    drop(c);

    // Bad option magic; oversized option data.
    let mut c = Client::unix(&sock);
    c.s.write_all(&[0u8; 16]).expect("send");
    assert!(c.closed(), "bad option magic closes");
    let mut c = Client::unix(&sock);
    let mut h = Vec::new();
    h.extend_from_slice(&IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&7u32.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&h).expect("send");
    assert!(c.closed(), "huge option closes");

    // Unknown client flags.
    let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
    let mut hello = [0u8; 18];
    std::io::Read::read_exact(&mut s, &mut hello).expect("hello");
    s.write_all(&0xffu32.to_be_bytes()).expect("flags");
    let mut b = [0u8; 1];
    assert_eq!(
        std::io::Read::read(&mut s, &mut b).unwrap_or(0),
        0,
        "bad flags close"
    );

    // The server is still serving.
    let mut c = Client::unix(&sock);
    c.go();
    let w = pattern(2, 4096);
    assert_eq!(c.call(CMD_WRITE, 0, 0, 4096, &w).0, 0);
    assert_eq!(c.call(CMD_READ, 0, 0, 4096, &[]).1, w);
    c.send(CMD_DISC, 0, 1, 0, 0, &[]);
    server.join().expect("server");
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (m, dev) = mem(false);
    m.data.lock().unwrap()[..512].copy_from_slice(&pattern(4, 512));
    let (sock, _, server) = start(dir.path(), dev, true, false, Some(1));
    let mut c = Client::unix(&sock);
    let info = c.go();
    assert_eq!(
        info.flags,
        1 | 2 | 4 | 8 | 256,
        "HAS_FLAGS|READ_ONLY|SEND_FLUSH|SEND_FUA|CAN_MULTI_CONN"
    );
    let w = pattern(5, 512);
    assert_eq!(c.call(CMD_WRITE, 0, 0, 512, &w).0, EPERM);
    assert_eq!(c.call(CMD_TRIM, 0, 0, 512, &[]).0, EPERM);
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, 0, 512, &[]).0, EPERM);
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).0, 0);
    assert_eq!(c.call(CMD_READ, 0, 0, 512, &[]).1, pattern(4, 512));
    c.send(CMD_DISC, 0, 1, 0, 0, &[]);
    server.join().expect("server");
}

#[test]
fn tcp_and_unix_clients_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_m, dev) = mem(false);
    let (sock, addr, server) = start(dir.path(), dev, false, true, Some(4));
    let addr = addr.expect("tcp address");
    let threads: Vec<_> = (0..4u64)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut c = if i % 2 == 0 {
                    Client::tcp(addr)
                } else {
                    Client::unix(&sock)
                };
                c.go();
                for k in 0..20u64 {
                    let off = (i * 64 + k) * 4096;
                    let w = pattern((i * 20 + k) as u8, 4096);
                    assert_eq!(c.call(CMD_WRITE, 0, off, 4096, &w).0, 0);
                    assert_eq!(c.call(CMD_READ, 0, off, 4096, &[]).1, w);
                }
                c.send(CMD_DISC, 0, 1, 0, 0, &[]);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client");
    }
    server.join().expect("server");
}

#[test]
fn large_trim_is_cut_into_device_pieces_and_fua_flushes() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 64 KiB device requests, 256 in flight, completions held until 200
    // are waiting: one poll returns far more completions than slots.
    let mut d = MemDevice::new(SIZE, false);
    d.info.max_request_bytes = 64 << 10;
    d.inflight_max = 256;
    d.batch = 200;
    d.data.lock().unwrap().fill(0xee);
    let m = Arc::new(d);
    let (sock, _, server) = start(dir.path(), m.clone(), false, false, Some(1));
    let mut c = Client::unix(&sock);
    let info = c.go();
    assert_eq!(info.block_sizes, Some((512, 4096, 64 << 10)));
    // 16 MiB = 256 pieces of 64 KiB, with a neighbour in flight.
    c.send(CMD_TRIM, 0, 1, 0, SIZE as u32 - 8192, &[]);
    c.send(CMD_WRITE_ZEROES, 0, 2, SIZE - 8192, 8192, &[]);
    let mut handles = [c.reply(), c.reply()].map(|(h, err, _)| {
        assert_eq!(err, 0);
        h
    });
    handles.sort();
    assert_eq!(handles, [1, 2]);
    assert!(
        m.data.lock().unwrap().iter().all(|&b| b == 0),
        "all trimmed"
    );
    let before = m.flushes.load(std::sync::atomic::Ordering::Relaxed);
    let w = pattern(8, 4096);
    assert_eq!(c.call(CMD_WRITE, 0, 0, 4096, &w).0, 0);
    assert_eq!(
        m.flushes.load(std::sync::atomic::Ordering::Relaxed),
        before,
        "plain write"
    );
    assert_eq!(c.call(CMD_WRITE, FLAG_FUA, 0, 4096, &w).0, 0);
    assert_eq!(
        m.flushes.load(std::sync::atomic::Ordering::Relaxed),
        before + 1,
        "a FUA write is followed by a device flush before its reply"
    );
    c.send(CMD_DISC, 0, 1, 0, 0, &[]);
    server.join().expect("server");
}
