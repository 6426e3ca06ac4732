//! Snapshots, rollback and clones on a cluster of processes (`celer meta
//! serve` + 4 `celer node serve`, 3 replicas), driven through the real
//! client library while it writes.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use celer_client::{Capability, Client, ClientConfig, Credential};
use celer_device::{BlockDevice, DeviceQueue, IoOp};
use celer_meta::api::{AttachVolume, CreateVolume, Volume};
use support::cluster::{Cluster, ClusterOpts};

const BIN: &str = env!("CARGO_BIN_EXE_celer");
const BLOCK: usize = 4096;
const WRITERS: u64 = 8;
const BLOCKS_PER_WRITER: u64 = 64;
/// Blocks apart: the writers' blocks spread over 32 MiB (many chunks and
/// partitions).
const STRIDE: u64 = 16;

/// A block's stamp: which writer wrote it and its sequence number.
fn stamp(buf: &mut [u8], writer: u64, seq: u64) {
    buf[..8].copy_from_slice(&writer.to_le_bytes());
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    let fill = (writer * 31 + seq) as u8;
    buf[16..].fill(fill);
}

/// (writer, seq) of a block, or None for zeroes; panics on a torn block.
fn read_stamp(buf: &[u8], what: &str) -> Option<(u64, u64)> {
    if buf.iter().all(|&b| b == 0) {
        return None;
    }
    let w = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    let s = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
    let fill = (w * 31 + s) as u8;
    assert!(
        buf[16..].iter().all(|&b| b == fill),
        "{what}: block stamped ({w}, {s}) is torn"
    );
    Some((w, s))
}

fn block_of(writer: u64, j: u64) -> u64 {
    (j * WRITERS + writer) * STRIDE
}

fn one_request(
    q: &mut dyn DeviceQueue,
    op: IoOp,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), String> {
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
    unsafe { q.submit(&req) }.map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut done = None;
    while done.is_none() {
        q.poll(&mut |c| done = Some(c.result));
        assert!(Instant::now() < deadline, "a request took more than 30 s");
        std::thread::sleep(Duration::from_micros(50));
    }
    done.expect("a completion").map_err(|e| e.to_string())
}

/// Attaches `vol` as a front end does; with `snapshot`, reads that
/// snapshot (read-only attachment).
fn attach(c: &Cluster, vol: &Volume, snapshot: Option<&str>) -> (u32, Arc<Client>) {
    let meta = c.meta_client();
    let how = AttachVolume {
        read_only: snapshot.is_some(),
        ..AttachVolume::default()
    };
    let att = meta.attach_with(&vol.name, &how).expect("attach");
    let credential = Credential::Attachment {
        capability: Capability::from_hex(&att.capability).expect("capability"),
        key: celer_proto::auth::key_from_hex(&att.key).expect("key"),
    };
    let v = &att.volume;
    let mut cfg = ClientConfig::new(c.seeds(), v.id, v.size_bytes, credential);
    cfg.request_timeout = Duration::from_millis(300);
    cfg.lineage = v.lineage();
    cfg.era = v.head_era;
    cfg.read_snapshot = snapshot.map(|s| v.snapshot(s).expect("snapshot exists").era);
    let client = Client::connect(cfg).expect("client connects");
    (att.attachment.id, Arc::new(client))
}

/// One completed write: (writer, seq, block, issued, completed).
#[derive(Clone, Copy)]
struct Done {
    seq: u64,
    block: u64,
    issued: Instant,
    completed: Instant,
}

/// Every writer's stamps of all its blocks, read through `dev`.
fn read_all(dev: &Arc<Client>, what: &str) -> Vec<Vec<Option<u64>>> {
    let mut q = dev.open_queue(WRITERS as usize + 1).expect("queue");
    let mut buf = vec![0u8; BLOCK];
    (0..WRITERS)
        .map(|w| {
            (0..BLOCKS_PER_WRITER)
                .map(|j| {
                    let b = block_of(w, j);
                    one_request(q.as_mut(), IoOp::Read, b * BLOCK as u64, &mut buf)
                        .unwrap_or_else(|e| panic!("{what}: read block {b}: {e}"));
                    read_stamp(&buf, what).map(|(ww, s)| {
                        assert_eq!(ww, w, "{what}: block {b} holds writer {ww}'s data");
                        s
                    })
                })
                .collect()
        })
        .collect()
}

/// What a writer's blocks hold after its writes up to `upto` (in order).
fn state_after(log: &[Done], upto: u64) -> Vec<Option<u64>> {
    let mut s = vec![None; BLOCKS_PER_WRITER as usize];
    for d in log.iter().filter(|d| d.seq <= upto) {
        s[d.block as usize] = Some(d.seq);
    }
    s
}

fn compare_replicas(c: &Cluster, vol: &Volume, snapshot: Option<u32>) -> Vec<String> {
    let t = c.meta_client().route().expect("route");
    let chunk_blocks = t.chunk_bytes / BLOCK as u64;
    let mut chunks: Vec<u64> = (0..WRITERS)
        .flat_map(|w| (0..BLOCKS_PER_WRITER).map(move |j| block_of(w, j) / chunk_blocks))
        .collect();
    chunks.sort_unstable();
    chunks.dedup();
    chunks
        .iter()
        .flat_map(|&ch| {
            support::replicas::compare_chunk_of(&t, vol.id, vol.lineage(), ch, snapshot)
        })
        .collect()
}

/// A snapshot taken while 8 writers write (QD 8): it holds exactly a
/// consistent cut (each writer's writes up to some point, and every write
/// that completed before a write in it was issued), every write
/// acknowledged before the command started, and its copies are identical
/// on every replica. Then: a rollback restores it byte for byte, also with
/// a node down during the rollback that comes back afterwards; a clone
/// reads the snapshot and diverges without touching it.
#[test]
fn a_snapshot_under_load_is_a_consistent_cut_and_rollback_and_clone_work() {
    let mut c = Cluster::start(std::path::Path::new(BIN), ClusterOpts::default());
    let meta = c.meta_client();
    let vol = meta
        .create_volume(&CreateVolume {
            name: "snap".into(),
            size_bytes: 256 << 20,
            replicas: None,
            sector_size_bytes: None,
        })
        .expect("create volume");
    let (writer_att, dev) = attach(&c, &vol, None);
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let dev = dev.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut q = dev.open_queue(w as usize).expect("queue");
                let mut buf = vec![0u8; BLOCK];
                let mut log = Vec::new();
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let j = (seq * 7) % BLOCKS_PER_WRITER;
                    stamp(&mut buf, w, seq);
                    let issued = Instant::now();
                    one_request(
                        q.as_mut(),
                        IoOp::Write,
                        block_of(w, j) * BLOCK as u64,
                        &mut buf,
                    )
                    .unwrap_or_else(|e| panic!("writer {w} seq {seq}: {e}"));
                    log.push(Done {
                        seq,
                        block: j,
                        issued,
                        completed: Instant::now(),
                    });
                }
                log
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let cmd_start = Instant::now();
    let snap = meta.create_snapshot("snap", "s1").expect("snapshot");
    let create_ms = cmd_start.elapsed().as_millis();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let logs: Vec<Vec<Done>> = threads
        .into_iter()
        .map(|t| t.join().expect("writer"))
        .collect();
    let writes: usize = logs.iter().map(|l| l.len()).sum();
    println!(
        "snapshot s1 (era {}) taken in {create_ms} ms during {writes} writes",
        snap.era
    );
    assert!(create_ms < 2000, "snapshot create took {create_ms} ms");

    // The volume holds every writer's last writes.
    let head = read_all(&dev, "volume");
    for (w, log) in logs.iter().enumerate() {
        let want = state_after(log, u64::MAX);
        assert_eq!(head[w], want, "volume: writer {w}'s blocks");
    }
    // The snapshot is a consistent cut.
    let vol = meta.volume("snap").expect("volume");
    let (reader_att, reader) = attach(&c, &vol, Some("s1"));
    let cut = read_all(&reader, "snapshot");
    let mut latest_issue_in: Option<Instant> = None;
    let mut upto = Vec::new();
    for (w, log) in logs.iter().enumerate() {
        let m = cut[w].iter().flatten().copied().max().unwrap_or(0);
        let want = state_after(log, m);
        assert_eq!(
            cut[w], want,
            "snapshot: writer {w}'s blocks are not its writes up to seq {m} (a write is missing or one from after it is in)"
        );
        if let Some(d) = log.iter().find(|d| d.seq == m) {
            latest_issue_in = Some(latest_issue_in.map_or(d.issued, |t| t.max(d.issued)));
        }
        upto.push(m);
        let acked_before = log
            .iter()
            .filter(|d| d.completed < cmd_start)
            .map(|d| d.seq)
            .max()
            .unwrap_or(0);
        assert!(
            m >= acked_before,
            "snapshot: writer {w}'s write {acked_before} was acknowledged before the command started but is not in it (cut at {m})"
        );
        assert!(
            log.iter().any(|d| d.seq > m),
            "writer {w} wrote nothing after the snapshot: the test does not test the cut"
        );
    }
    if let Some(t) = latest_issue_in {
        for (w, log) in logs.iter().enumerate() {
            let before = log
                .iter()
                .filter(|d| d.completed < t)
                .map(|d| d.seq)
                .max()
                .unwrap_or(0);
            assert!(
                upto[w] >= before,
                "snapshot: writer {w}'s write {before} completed before a write in the snapshot was issued, but is not in it"
            );
        }
    }
    println!("cut per writer: {upto:?}");
    let diffs = compare_replicas(&c, &vol, Some(snap.era));
    assert!(diffs.is_empty(), "snapshot copies differ: {diffs:?}");
    let diffs = compare_replicas(&c, &vol, None);
    assert!(diffs.is_empty(), "volume copies differ: {diffs:?}");

    // Rollback: refused while attached (naming the attachment).
    let refused = meta
        .rollback("snap", "s1")
        .expect_err("rollback while attached");
    assert!(
        refused.to_string().contains("attached"),
        "rollback refusal: {refused}"
    );
    meta.detach(writer_att).expect("detach writer");
    meta.detach(reader_att).expect("detach reader");
    drop(dev);
    drop(reader);
    // A node down during the rollback, back afterwards with the rolled-back
    // blocks on its disk: they must not come back.
    let id0 = c.node_id(0);
    c.kill(0);
    c.wait_down(id0, Duration::from_secs(10));
    meta.rollback("snap", "s1").expect("rollback");
    c.restart(0);
    c.wait_healthy(Duration::from_secs(60));
    let vol = meta.volume("snap").expect("volume");
    let (_, dev) = attach(&c, &vol, None);
    let back = read_all(&dev, "volume after the rollback");
    assert_eq!(back, cut, "the rollback did not restore the snapshot");
    let diffs = compare_replicas(&c, &vol, None);
    assert!(
        diffs.is_empty(),
        "volume copies differ after the rollback: {diffs:?}"
    );

    // A clone reads the snapshot, and its writes do not reach the parent.
    let started = Instant::now();
    let clone = meta
        .clone_volume("snap", "s1", "snap-clone")
        .expect("clone");
    println!("clone created in {} ms", started.elapsed().as_millis());
    let (_, cdev) = attach(&c, &clone, None);
    assert_eq!(
        read_all(&cdev, "clone"),
        cut,
        "the clone does not read the snapshot"
    );
    let mut q = cdev.open_queue(0).expect("queue");
    let mut buf = vec![0u8; BLOCK];
    stamp(&mut buf, 0, 1_000_000);
    one_request(
        q.as_mut(),
        IoOp::Write,
        block_of(0, 3) * BLOCK as u64,
        &mut buf,
    )
    .expect("clone write");
    let mut got = vec![0u8; BLOCK];
    one_request(
        q.as_mut(),
        IoOp::Read,
        block_of(0, 3) * BLOCK as u64,
        &mut got,
    )
    .expect("clone read");
    assert_eq!(read_stamp(&got, "clone"), Some((0, 1_000_000)));
    assert_eq!(
        read_all(&dev, "volume after the clone's write"),
        cut,
        "a clone's write reached its parent"
    );
    let vol = meta.volume("snap").expect("volume");
    let (_, snap_dev) = attach(&c, &vol, Some("s1"));
    assert_eq!(read_all(&snap_dev, "snapshot after the clone's write"), cut);
    let diffs = compare_replicas(&c, &clone, None);
    assert!(diffs.is_empty(), "clone copies differ: {diffs:?}");
    // A snapshot a clone reads cannot be deleted.
    let refused = meta
        .delete_snapshot("snap", "s1")
        .expect_err("delete a cloned snapshot");
    assert!(
        refused.to_string().contains("snap-clone"),
        "delete refusal: {refused}"
    );
}
