//! Structured replies, `base:allocation` and BLOCK_STATUS, multi-conn, at
//! the protocol level against the test client (the real-tool tests, with
//! libnbd's nbdinfo and nbdcopy, are in crates/celer/tests/nbd_tools.rs).

mod common;

use std::sync::Arc;

use common::*;

const SIZE: u64 = 16 << 20;

fn be32(d: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(d[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(d: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(d[at..at + 8].try_into().expect("8 bytes"))
}

/// A client with structured replies and `base:allocation` negotiated, in
/// transmission; returns it and the export info.
fn structured_client(sock: &std::path::Path) -> (Client, ExportInfo) {
    let mut c = Client::unix(sock);
    c.structured_replies();
    let set = c.meta_context(10, &["base:allocation"]).expect("SET");
    assert_eq!(set.len(), 1);
    assert_eq!(set[0].1, "base:allocation");
    let info = c.go();
    (c, info)
}

/// Reassembles a structured read reply; returns the bytes and the chunk
/// types in order (data 1, hole 2).
fn read_structured(c: &mut Client, handle: u64, offset: u64, len: usize) -> (Vec<u8>, Vec<u16>) {
    let mut out = vec![0xAAu8; len];
    let mut covered = 0usize;
    let mut types = Vec::new();
    for (typ, d) in c.chunks(handle) {
        types.push(typ);
        match typ {
            CHUNK_OFFSET_DATA => {
                let at = (be64(&d, 0) - offset) as usize;
                out[at..at + d.len() - 8].copy_from_slice(&d[8..]);
                covered += d.len() - 8;
            }
            CHUNK_OFFSET_HOLE => {
                let at = (be64(&d, 0) - offset) as usize;
                let n = be32(&d, 8) as usize;
                out[at..at + n].fill(0);
                covered += n;
            }
            other => panic!("unexpected chunk type {other:#x} in a read reply"),
        }
    }
    assert_eq!(covered, len, "the chunks cover the read exactly");
    (out, types)
}

/// (length, flags) descriptors of a BLOCK_STATUS reply.
fn block_status(c: &mut Client, flags: u16, offset: u64, len: u32) -> Vec<(u32, u32)> {
    c.send(CMD_BLOCK_STATUS, flags, 77, offset, len, &[]);
    let chunks = c.chunks(77);
    assert_eq!(chunks.len(), 1, "one chunk per selected context");
    let (typ, d) = &chunks[0];
    assert_eq!(*typ, CHUNK_BLOCK_STATUS, "{d:?}");
    assert_eq!(
        be32(d, 0),
        1,
        "the id SET_META_CONTEXT gave base:allocation"
    );
    d[4..]
        .chunks_exact(8)
        .map(|e| (be32(e, 0), be32(e, 4)))
        .collect()
}

#[test]
fn negotiation_of_structured_replies_and_meta_contexts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Arc::new(MemDevice::new(SIZE, false));
    let (sock, _, server) = start(dir.path(), dev, false, false, Some(2));

    let mut c = Client::unix(&sock);
    // Metadata contexts need structured replies first.
    assert_eq!(c.meta_context(10, &["base:allocation"]), Err((1 << 31) + 3));
    c.structured_replies();
    // LIST: everything for no query and for `base:`, with the reserved id 0.
    let all = vec![(0, "base:allocation".to_string())];
    assert_eq!(c.meta_context(9, &[]), Ok(all.clone()));
    assert_eq!(c.meta_context(9, &["base:"]), Ok(all.clone()));
    assert_eq!(c.meta_context(9, &["qemu:dirty-bitmap:x"]), Ok(vec![]));
    // SET: `base:` selects nothing, an unknown namespace is ignored.
    assert_eq!(c.meta_context(10, &["base:"]), Ok(vec![]));
    let set = c
        .meta_context(10, &["x-other:thing", "base:allocation"])
        .expect("SET");
    assert_eq!(set.len(), 1);
    assert_ne!(set[0].0, 0, "a selected context has a real id");
    // A malformed query count is refused, not allocated for.
    let mut bad = Vec::new();
    bad.extend_from_slice(&0u32.to_be_bytes());
    bad.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send_opt(10, &bad);
    assert_eq!(c.opt_reply().1, (1 << 31) + 3);
    // That failed SET dropped the selection: BLOCK_STATUS is refused.
    let info = c.go();
    assert_ne!(info.flags & (1 << 7), 0, "SEND_DF with structured replies");
    c.send(CMD_BLOCK_STATUS, 0, 5, 0, 4096, &[]);
    let chunks = c.chunks(5);
    assert_eq!(chunks[0].0, CHUNK_ERROR);
    assert_eq!(be32(&chunks[0].1, 0), EINVAL);
    drop(c);

    // Without structured replies: no SEND_DF.
    let mut c = Client::unix(&sock);
    let info = c.go();
    assert_eq!(
        info.flags & (1 << 7),
        0,
        "no SEND_DF without structured replies"
    );
    drop(c);
    server.join().expect("server");
}

#[test]
fn structured_reads_send_holes_and_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Arc::new(MemDevice::new(SIZE, false));
    let (sock, _, server) = start(dir.path(), dev, false, false, Some(1));
    let (mut c, _) = structured_client(&sock);

    let a = pattern(1, 4096);
    let b = pattern(2, 8192);
    // Writes get simple replies (allowed: no payload).
    assert_eq!(c.call(CMD_WRITE, 0, 0, 4096, &a).0, 0);
    assert_eq!(c.call(CMD_WRITE, 0, 512 << 10, 4096, &b[..4096]).0, 0);
    assert_eq!(
        c.call(CMD_WRITE, 0, (512 << 10) + 8192, 4096, &b[4096..]).0,
        0
    );

    // Data, 500 KiB of zeroes, data with a 4 KiB zero gap (too short
    // for a hole chunk), zeroes.
    let mut expect = vec![0u8; 1 << 20];
    expect[..4096].copy_from_slice(&a);
    expect[512 << 10..(512 << 10) + 4096].copy_from_slice(&b[..4096]);
    expect[(512 << 10) + 8192..(512 << 10) + 12288].copy_from_slice(&b[4096..]);
    c.send(CMD_READ, 0, 9, 0, 1 << 20, &[]);
    let (got, types) = read_structured(&mut c, 9, 0, 1 << 20);
    assert!(got == expect, "structured read differs from the data");
    assert_eq!(
        types,
        [
            CHUNK_OFFSET_DATA,
            CHUNK_OFFSET_HOLE,
            CHUNK_OFFSET_DATA,
            CHUNK_OFFSET_HOLE
        ],
        "data, hole, data, hole (the last marked DONE)"
    );

    // All zeroes: one hole chunk.
    c.send(CMD_READ, 0, 10, 4 << 20, 1 << 20, &[]);
    let (got, types) = read_structured(&mut c, 10, 4 << 20, 1 << 20);
    assert_eq!(types, [CHUNK_OFFSET_HOLE]);
    assert!(got.iter().all(|&x| x == 0));

    // DF: one data chunk, zeroes included.
    c.send(CMD_READ, FLAG_DF, 11, 0, 1 << 20, &[]);
    let (got, types) = read_structured(&mut c, 11, 0, 1 << 20);
    assert_eq!(types, [CHUNK_OFFSET_DATA]);
    assert!(got == expect);

    c.send(CMD_DISC, 0, 1, 0, 0, &[]);
    assert!(c.closed());
    server.join().expect("server");
}

#[test]
fn failed_reads_get_structured_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut dev = MemDevice::new(SIZE, false);
    dev.fail_read_at = Some(3 << 20);
    let (sock, _, server) = start(dir.path(), Arc::new(dev), false, false, Some(1));
    let (mut c, _) = structured_client(&sock);

    // Out of range: an ERROR chunk (no offset: the request itself is
    // wrong), with a message, and the connection goes on.
    c.send(CMD_READ, 0, 20, SIZE - 4096, 8192, &[]);
    let chunks = c.chunks(20);
    assert_eq!(chunks.len(), 1);
    let (typ, d) = &chunks[0];
    assert_eq!(*typ, CHUNK_ERROR);
    assert_eq!(be32(d, 0), EINVAL);
    let msg_len = u16::from_be_bytes([d[4], d[5]]) as usize;
    let msg = String::from_utf8_lossy(&d[6..6 + msg_len]);
    assert!(msg.contains("beyond the end"), "{msg}");
    assert_eq!(d.len(), 6 + msg_len);

    // Misaligned: ERROR too.
    c.send(CMD_READ, 0, 21, 100, 4096, &[]);
    assert_eq!(c.chunks(21)[0].0, CHUNK_ERROR);

    // The device fails a read at a known offset: ERROR_OFFSET names it.
    c.send(CMD_READ, 0, 22, (3 << 20) - 8192, 65536, &[]);
    let chunks = c.chunks(22);
    assert_eq!(chunks.len(), 1);
    let (typ, d) = &chunks[0];
    assert_eq!(*typ, CHUNK_ERROR_OFFSET);
    assert_eq!(be32(d, 0), EIO);
    let msg_len = u16::from_be_bytes([d[4], d[5]]) as usize;
    assert!(String::from_utf8_lossy(&d[6..6 + msg_len]).contains("checksum"));
    assert_eq!(be64(d, 6 + msg_len), 3 << 20, "the failing offset");

    // Still in sync: a good read after the errors.
    c.send(CMD_READ, 0, 23, 0, 4096, &[]);
    let (got, _) = read_structured(&mut c, 23, 0, 4096);
    assert_eq!(got, vec![0u8; 4096]);
    c.send(CMD_DISC, 0, 1, 0, 0, &[]);
    assert!(c.closed());
    server.join().expect("server");
}

#[test]
fn block_status_reports_holes_and_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Arc::new(MemDevice::new(SIZE, false));
    let (sock, _, server) = start(dir.path(), dev, false, false, Some(1));
    let (mut c, _) = structured_client(&sock);
    let hole = 1 | 2; // NBD_STATE_HOLE | NBD_STATE_ZERO
    assert_eq!(
        block_status(&mut c, 0, 0, SIZE as u32),
        [(SIZE as u32, hole)]
    );

    assert_eq!(c.call(CMD_WRITE, 0, 1 << 20, 8192, &pattern(3, 8192)).0, 0);
    assert_eq!(c.call(CMD_WRITE, 0, 5 << 20, 4096, &pattern(4, 4096)).0, 0);
    assert_eq!(
        block_status(&mut c, 0, 0, SIZE as u32),
        [
            (1 << 20, hole),
            (8192, 0),
            ((4 << 20) - 8192, hole),
            (4096, 0),
            ((11 << 20) - 4096, hole),
        ]
    );
    // From inside an extent; REQ_ONE: one descriptor, within the length.
    assert_eq!(
        block_status(&mut c, 0, (1 << 20) + 4096, 8192),
        [(4096, 0), (4096, hole)]
    );
    assert_eq!(
        block_status(&mut c, FLAG_REQ_ONE, 0, 65536),
        [(65536, hole)]
    );
    // Past the end: EINVAL, as an error chunk.
    c.send(CMD_BLOCK_STATUS, 0, 78, SIZE - 4096, 8192, &[]);
    let chunks = c.chunks(78);
    assert_eq!((chunks[0].0, be32(&chunks[0].1, 0)), (CHUNK_ERROR, EINVAL));

    c.send(CMD_DISC, 0, 1, 0, 0, &[]);
    assert!(c.closed());
    server.join().expect("server");
}

#[test]
fn multi_conn_only_where_flush_is_device_wide() {
    let dir = tempfile::tempdir().expect("tempdir");
    let multi_conn = |dev: MemDevice, read_only: bool| {
        let d = tempfile::tempdir_in(dir.path()).expect("tempdir");
        let (sock, _, server) = start(d.path(), Arc::new(dev), read_only, false, Some(1));
        let mut c = Client::unix(&sock);
        let flags = c.go().flags;
        c.send(CMD_DISC, 0, 1, 0, 0, &[]);
        assert!(c.closed());
        server.join().expect("server");
        flags & (1 << 8) != 0
    };
    assert!(!multi_conn(MemDevice::new(SIZE, false), false));
    let mut wide = MemDevice::new(SIZE, false);
    wide.device_wide = true;
    assert!(multi_conn(wide, false));
    assert!(
        multi_conn(MemDevice::new(SIZE, false), true),
        "read-only exports are safe for multi-conn"
    );
}
