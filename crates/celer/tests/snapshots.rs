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
/// Blocks apart: the writers' blocks spread over 16 MiB (many chunks and
/// partitions).
const STRIDE: u64 = 8;
/// Snapshots taken during the load.
const SNAPSHOTS: usize = 5;

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

/// Checks that `cut` (a snapshot's stamps) is a consistent cut of the
/// writers' logs taken by a command that started at `cmd_start`; returns
/// each writer's last write in it.
fn check_cut(
    logs: &[Vec<Done>],
    cut: &[Vec<Option<u64>>],
    cmd_start: Instant,
    what: &str,
) -> Vec<u64> {
    let mut latest_issue_in: Option<Instant> = None;
    let mut upto = Vec::new();
    for (w, log) in logs.iter().enumerate() {
        let m = cut[w].iter().flatten().copied().max().unwrap_or(0);
        let want = state_after(log, m);
        assert_eq!(
            cut[w], want,
            "{what}: writer {w}'s blocks are not its writes up to seq {m} (a write is missing or one from after it is in)"
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
            "{what}: writer {w}'s write {acked_before} was acknowledged before the command started but is not in it (cut at {m})"
        );
        assert!(
            log.iter().any(|d| d.seq > m),
            "{what}: writer {w} wrote nothing after it: the test does not test the cut"
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
                "{what}: writer {w}'s write {before} completed before a write in it was issued, but is not in it"
            );
        }
    }
    upto
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
    // Every snapshot's era takes a slot per chunk it was written in.
    let opts = ClusterOpts {
        disk_bytes: 640 << 20,
        ..ClusterOpts::default()
    };
    let mut c = Cluster::start(std::path::Path::new(BIN), opts);
    let meta = c.meta_client();
    let vol = create_volume(&meta, "snap", 256 << 20);
    let (writer_att, dev) = attach(&c, &vol, None);
    let stop = Arc::new(AtomicBool::new(false));
    let threads = start_writers(&dev, &stop);
    // Snapshots s1..s5 while the writers write, 300 ms apart.
    let mut taken = Vec::new();
    std::thread::sleep(Duration::from_millis(1000));
    for i in 1..=SNAPSHOTS {
        let cmd_start = Instant::now();
        let snap = meta
            .create_snapshot("snap", &format!("s{i}"))
            .expect("snapshot");
        let ms = cmd_start.elapsed().as_millis();
        assert!(ms < 2000, "snapshot create took {ms} ms");
        taken.push((snap, cmd_start, ms));
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let logs: Vec<Vec<Done>> = threads
        .into_iter()
        .map(|t| t.join().expect("writer"))
        .collect();
    let writes: usize = logs.iter().map(|l| l.len()).sum();
    let times: Vec<u128> = taken.iter().map(|t| t.2).collect();
    println!("{SNAPSHOTS} snapshots taken in {times:?} ms during {writes} writes");

    // The volume holds every writer's last writes.
    let head = read_all(&dev, "volume");
    for (w, log) in logs.iter().enumerate() {
        let want = state_after(log, u64::MAX);
        assert_eq!(head[w], want, "volume: writer {w}'s blocks");
    }
    let vol = meta.volume("snap").expect("volume");
    let diffs = compare_replicas(&c, &vol, None);
    assert!(diffs.is_empty(), "volume copies differ: {diffs:?}");
    // Each snapshot is a consistent cut, identical on every replica.
    let mut cuts = Vec::new();
    let mut readers = Vec::new();
    for (snap, cmd_start, _) in &taken {
        let what = format!("snapshot {}", snap.name);
        let (reader_att, reader) = attach(&c, &vol, Some(&snap.name));
        readers.push(reader_att);
        let cut = read_all(&reader, &what);
        let upto = check_cut(&logs, &cut, *cmd_start, &what);
        println!("{what} (era {}): cut per writer {upto:?}", snap.era);
        let diffs = compare_replicas(&c, &vol, Some(snap.era));
        assert!(diffs.is_empty(), "{what}: copies differ: {diffs:?}");
        cuts.push(cut);
    }
    let cut = cuts[0].clone();

    // Rollback: refused while attached (naming the attachment).
    let refused = meta
        .rollback("snap", "s1")
        .expect_err("rollback while attached");
    assert!(
        refused.to_string().contains("attached"),
        "rollback refusal: {refused}"
    );
    meta.detach(writer_att).expect("detach writer");
    for a in readers {
        meta.detach(a).expect("detach reader");
    }
    drop(dev);
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

/// Starts `WRITERS` threads writing stamped blocks at QD 1 each (QD 8 in
/// all) until `stop`; each returns its log. A write that fails panics its
/// thread (the volume must keep going whatever the test does).
fn start_writers(
    dev: &Arc<Client>,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Vec<Done>>> {
    start_writers_from(dev, stop, 0)
}

/// [`start_writers`] whose sequence numbers start after `after` (a second
/// round of writers on the same blocks).
fn start_writers_from(
    dev: &Arc<Client>,
    stop: &Arc<AtomicBool>,
    after: u64,
) -> Vec<std::thread::JoinHandle<Vec<Done>>> {
    (0..WRITERS)
        .map(|w| {
            let dev = dev.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut q = dev.open_queue(w as usize).expect("queue");
                let mut buf = vec![0u8; BLOCK];
                let mut log = Vec::new();
                let mut seq = after;
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
        .collect()
}

/// Writes `writes` (block index, stamp seq) of writer 0's blocks through
/// `dev`, and applies them to `want` (what `read_all` should return).
fn write_stamps(dev: &Arc<Client>, writes: &[(u64, u64)], want: &mut [Vec<Option<u64>>]) {
    let mut q = dev.open_queue(0).expect("queue");
    let mut buf = vec![0u8; BLOCK];
    for &(j, seq) in writes {
        stamp(&mut buf, 0, seq);
        let at = block_of(0, j) * BLOCK as u64;
        one_request(q.as_mut(), IoOp::Write, at, &mut buf).expect("write");
        want[0][j as usize] = Some(seq);
    }
}

/// Waits until the route has `partitions` partitions, `node` is a member of
/// at least one and every partition has all its replicas in sync; returns
/// the table and how long it took.
fn wait_moved(
    c: &Cluster,
    node: u32,
    partitions: usize,
    what: &str,
) -> (celer_route::RouteTable, Duration) {
    let t0 = Instant::now();
    loop {
        let t = c.wait_healthy(Duration::from_secs(120));
        let holds = t
            .partitions
            .iter()
            .any(|p| p.members.iter().any(|m| m.node == node));
        if t.partitions.len() == partitions && holds {
            return (t, t0.elapsed());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{what}: not done after 120 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Snapshots and clones move with the live data. A volume with a snapshot
/// taken under load, a clone of it with writes of its own, a snapshot of
/// the clone and a clone of that (3 lineage levels) on 3 nodes; then, while
/// 8 writers keep writing to the volume, a 4th node joins (its partitions
/// are backfilled to it) and the partitions are split (the new halves move).
/// Afterwards every snapshot and clone reads exactly what it read before,
/// the volume holds every writer's last writes, and each of them is
/// identical on every replica — the new node's copies included.
#[test]
fn snapshots_and_clones_survive_a_rebalance_and_a_split() {
    let opts = ClusterOpts {
        nodes: 3,
        partition_bits: 4,
        disk_bytes: 640 << 20,
        ..ClusterOpts::default()
    };
    let mut c = Cluster::start(std::path::Path::new(BIN), opts);
    let meta = c.meta_client();
    let vol = create_volume(&meta, "moved", 256 << 20);
    let (_, dev) = attach(&c, &vol, None);
    // s1 under load.
    let stop = Arc::new(AtomicBool::new(false));
    let threads = start_writers(&dev, &stop);
    std::thread::sleep(Duration::from_millis(800));
    let cmd_start = Instant::now();
    meta.create_snapshot("moved", "s1").expect("snapshot");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let mut logs: Vec<Vec<Done>> = threads
        .into_iter()
        .map(|t| t.join().expect("writer"))
        .collect();
    let vol = meta.volume("moved").expect("volume");
    let (_, s1_dev) = attach(&c, &vol, Some("s1"));
    let s1 = read_all(&s1_dev, "s1");
    check_cut(&logs, &s1, cmd_start, "s1");
    drop(s1_dev);
    // A clone of s1 with writes of its own, its snapshot c1, a clone of c1.
    let clone = meta
        .clone_volume("moved", "s1", "moved-clone")
        .expect("clone");
    let (_, clone_dev) = attach(&c, &clone, None);
    let mut clone_want = s1.clone();
    write_stamps(
        &clone_dev,
        &[(1, 1 << 40), (5, (1 << 40) + 1), (9, (1 << 40) + 2)],
        &mut clone_want,
    );
    meta.create_snapshot("moved-clone", "c1")
        .expect("clone snapshot");
    let c1_want = clone_want.clone();
    // The clone's writer learns of c1 at its next write: a write naming the
    // frozen era within the cut window still goes into c1 (the snapshot
    // then holds the clone as its writer saw it a moment later). Writes
    // after the window go to the new head only.
    std::thread::sleep(Duration::from_millis(
        celer_meta::api::SNAPSHOT_CUT_MS + 200,
    ));
    write_stamps(
        &clone_dev,
        &[(5, (1 << 40) + 3), (13, (1 << 40) + 4)],
        &mut clone_want,
    );
    let clone2 = meta
        .clone_volume("moved-clone", "c1", "moved-clone2")
        .expect("clone of a clone");
    let (_, clone2_dev) = attach(&c, &clone2, None);
    let mut clone2_want = c1_want.clone();
    write_stamps(
        &clone2_dev,
        &[(9, (1 << 41)), (17, (1 << 41) + 1)],
        &mut clone2_want,
    );
    assert_eq!(read_all(&clone_dev, "clone"), clone_want);
    assert_eq!(read_all(&clone2_dev, "clone of a clone"), clone2_want);

    // A 4th node joins, then the partitions split, under load.
    let after = logs.iter().flatten().map(|d| d.seq).max().unwrap_or(0);
    let stop = Arc::new(AtomicBool::new(false));
    let threads = start_writers_from(&dev, &stop, after);
    std::thread::sleep(Duration::from_millis(500));
    let new = c.add_node();
    let new_id = c.node_id(new);
    let (t, took) = wait_moved(&c, new_id, 16, "rebalance to the new node");
    let held = t
        .partitions
        .iter()
        .filter(|p| p.members.iter().any(|m| m.node == new_id))
        .count();
    println!("node {new_id} joined: holds {held} of 16 partitions, in sync after {took:?}");
    let split = meta.split().expect("split");
    assert_eq!(split.partitions.len(), 32);
    let (t, took) = wait_moved(&c, new_id, 32, "split");
    let held = t
        .partitions
        .iter()
        .filter(|p| p.members.iter().any(|m| m.node == new_id))
        .count();
    println!("split to 32 partitions: node {new_id} holds {held}, all in sync after {took:?}");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for (w, t) in threads.into_iter().enumerate() {
        logs[w].extend(t.join().expect("writer"));
    }
    let writes: usize = logs.iter().map(|l| l.len()).sum();
    println!("{writes} writes in all");

    // Everything reads as before, on every replica.
    let head = read_all(&dev, "volume");
    for (w, log) in logs.iter().enumerate() {
        assert_eq!(
            head[w],
            state_after(log, u64::MAX),
            "volume: writer {w}'s blocks"
        );
    }
    let vol = meta.volume("moved").expect("volume");
    let s1_era = vol.snapshot("s1").expect("s1").era;
    let (_, s1_dev) = attach(&c, &vol, Some("s1"));
    assert_eq!(read_all(&s1_dev, "s1 after the moves"), s1, "s1 changed");
    let clone = meta.volume("moved-clone").expect("clone");
    let c1_era = clone.snapshot("c1").expect("c1").era;
    let (_, c1_dev) = attach(&c, &clone, Some("c1"));
    assert_eq!(
        read_all(&c1_dev, "c1 after the moves"),
        c1_want,
        "c1 changed"
    );
    assert_eq!(read_all(&clone_dev, "clone after the moves"), clone_want);
    assert_eq!(
        read_all(&clone2_dev, "clone of a clone after the moves"),
        clone2_want
    );
    let clone2 = meta.volume("moved-clone2").expect("clone of a clone");
    // The comparisons below read the new node's copies too.
    let t = c.meta_client().route().expect("route");
    let chunk_blocks = t.chunk_bytes / BLOCK as u64;
    let mut on_new: Vec<u64> = (0..WRITERS)
        .flat_map(|w| (0..BLOCKS_PER_WRITER).map(move |j| block_of(w, j) / chunk_blocks))
        .filter(|&ch| {
            let p = t
                .partition(t.partition_of(vol.lineage(), ch))
                .expect("partition");
            p.members.iter().any(|m| m.node == new_id)
        })
        .collect();
    on_new.sort_unstable();
    on_new.dedup();
    println!(
        "node {new_id} holds {} of the chunks compared",
        on_new.len()
    );
    assert!(!on_new.is_empty(), "node {new_id} holds none of the chunks");
    for (v, era, what) in [
        (&vol, None, "volume"),
        (&vol, Some(s1_era), "s1"),
        (&clone, None, "clone"),
        (&clone, Some(c1_era), "c1"),
        (&clone2, None, "clone of a clone"),
    ] {
        let diffs = compare_replicas(&c, v, era);
        assert!(diffs.is_empty(), "{what}: copies differ: {diffs:?}");
    }
}

/// A member killed during a snapshot create, down (within the grace
/// period) while a second snapshot is taken under an 8-writer load, then
/// back: it catches up what it missed in both
/// snapshots' eras, not only the newest. Writes in flight during each cut
/// land in the era just frozen on the members that stayed, and their
/// writers write them again into the new head; the returning member's
/// catch-up must bring the frozen eras' copies too, also for the first
/// snapshot's era once the second has frozen the head above it. Both
/// snapshots are consistent cuts, identical on every replica, and so is the
/// volume.
#[test]
fn a_member_down_across_two_snapshots_catches_up_both() {
    let opts = ClusterOpts {
        disk_bytes: 640 << 20,
        down_grace_s: 60,
        ..ClusterOpts::default()
    };
    let mut c = Cluster::start(std::path::Path::new(BIN), opts);
    let meta = c.meta_client();
    let vol = create_volume(&meta, "two", 256 << 20);
    let (_, dev) = attach(&c, &vol, None);
    let stop = Arc::new(AtomicBool::new(false));
    let threads = start_writers(&dev, &stop);
    std::thread::sleep(Duration::from_millis(800));
    let id1 = c.node_id(1);
    let mut taken = Vec::new();
    for name in ["s1", "s2"] {
        let cmd_start = Instant::now();
        let snap = if name == "s1" {
            // Node 1 killed 5 ms into the first create: writes in flight
            // to it then are sent again after it is marked down.
            std::thread::scope(|scope| {
                let create = scope.spawn(|| meta.create_snapshot("two", name));
                std::thread::sleep(Duration::from_millis(5));
                c.kill(1);
                create.join().expect("create thread")
            })
        } else {
            meta.create_snapshot("two", name)
        }
        .expect("snapshot");
        taken.push((snap, cmd_start));
        // Past the cut window: the next snapshot freezes a sealed head.
        std::thread::sleep(Duration::from_millis(
            celer_meta::api::SNAPSHOT_CUT_MS + 500,
        ));
    }
    c.restart(1);
    c.wait_healthy(Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let logs: Vec<Vec<Done>> = threads
        .into_iter()
        .map(|t| t.join().expect("writer"))
        .collect();
    let writes: usize = logs.iter().map(|l| l.len()).sum();
    println!("{writes} writes; node {id1} down across two snapshots, then back");
    let vol = meta.volume("two").expect("volume");
    let mut failures = Vec::new();
    for (snap, cmd_start) in &taken {
        let what = format!("snapshot {}", snap.name);
        let (_, reader) = attach(&c, &vol, Some(&snap.name));
        let cut = read_all(&reader, &what);
        check_cut(&logs, &cut, *cmd_start, &what);
        let diffs = compare_replicas(&c, &vol, Some(snap.era));
        println!(
            "{what} (era {}): {} blocks differ between replicas",
            snap.era,
            diffs.len()
        );
        if !diffs.is_empty() {
            failures.push(format!("{what}: {diffs:?}"));
        }
    }
    let head = read_all(&dev, "volume");
    for (w, log) in logs.iter().enumerate() {
        assert_eq!(head[w], state_after(log, u64::MAX), "writer {w}'s blocks");
    }
    let diffs = compare_replicas(&c, &vol, None);
    if !diffs.is_empty() {
        failures.push(format!("the volume: {diffs:?}"));
    }
    assert!(failures.is_empty(), "copies differ: {failures:?}");
}

/// kill -9 of a storage node during a snapshot create, then of another
/// during a snapshot delete, while 8 writers write (QD 8). The create
/// completes; its snapshot is a consistent cut, identical on every
/// replica once the node is back (within the grace period: it catches up
/// what it missed, snapshot eras included). The delete completes; the
/// node killed while the nodes free the snapshot's chunks finishes
/// freeing them after its restart: exactly the chunks the snapshot held
/// alone are freed, and the volume's copies are identical. No write
/// fails.
#[test]
fn a_node_killed_during_snapshot_create_and_delete() {
    let opts = ClusterOpts {
        disk_bytes: 640 << 20,
        down_grace_s: 60,
        ..ClusterOpts::default()
    };
    let mut c = Cluster::start(std::path::Path::new(BIN), opts);
    let meta = c.meta_client();
    let vol = create_volume(&meta, "k9", 256 << 20);
    let (att, dev) = attach(&c, &vol, None);
    let stop = Arc::new(AtomicBool::new(false));
    let threads = start_writers(&dev, &stop);
    std::thread::sleep(Duration::from_millis(1000));

    let (id1, id2) = (c.node_id(1), c.node_id(2));
    // Create, with node 1 killed 5 ms into it.
    let cmd_start = Instant::now();
    let kill_at = cmd_start + Duration::from_millis(5);
    let created = std::thread::scope(|scope| {
        let create = scope.spawn(|| meta.create_snapshot("k9", "s1"));
        std::thread::sleep(kill_at.saturating_duration_since(Instant::now()));
        c.kill(1);
        create.join().expect("create thread")
    });
    let snap = created.expect("snapshot create with a node killed during it");
    println!(
        "snapshot create with node {id1} killed during it: {} ms",
        cmd_start.elapsed().as_millis()
    );
    // Writes go on without node 1; it comes back within the grace period.
    std::thread::sleep(Duration::from_millis(1500));
    c.restart(1);
    c.wait_healthy(Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let logs: Vec<Vec<Done>> = threads
        .into_iter()
        .map(|t| t.join().expect("writer"))
        .collect();
    let writes: usize = logs.iter().map(|l| l.len()).sum();
    println!("{writes} writes during the create, the kill and the restart");
    let vol = meta.volume("k9").expect("volume");
    let (reader_att, reader) = attach(&c, &vol, Some("s1"));
    let cut = read_all(&reader, "snapshot s1");
    check_cut(&logs, &cut, cmd_start, "snapshot s1");
    meta.detach(reader_att).expect("detach reader");
    let diffs = compare_replicas(&c, &vol, Some(snap.era));
    assert!(diffs.is_empty(), "snapshot s1's copies differ: {diffs:?}");
    let head = read_all(&dev, "volume");
    for (w, log) in logs.iter().enumerate() {
        assert_eq!(head[w], state_after(log, u64::MAX), "writer {w}'s blocks");
    }
    let diffs = compare_replicas(&c, &vol, None);
    assert!(diffs.is_empty(), "the volume's copies differ: {diffs:?}");

    // Delete, with node 2 killed right after the command returns, while
    // the nodes free the chunks s1 held alone (those the head covers
    // whole; the usage query counts them).
    std::thread::sleep(Duration::from_millis(1500)); // the chunk counts settle
    let usage = meta.snapshot_usage("k9").expect("usage");
    let alone = usage
        .iter()
        .find(|u| u.name == "s1")
        .and_then(|u| u.alone_chunks)
        .expect("s1's space held alone");
    let before = allocated_chunks(&c);
    let t0 = Instant::now();
    meta.delete_snapshot("k9", "s1").expect("delete s1");
    c.kill(2);
    println!(
        "snapshot delete: {} ms; node {id2} killed after it; {alone} chunk slots held alone, {before} allocated",
        t0.elapsed().as_millis()
    );
    std::thread::sleep(Duration::from_millis(1000));
    c.restart(2);
    c.wait_healthy(Duration::from_secs(60));
    let (now, _) = settle_chunks(
        &c,
        before - alone,
        Duration::from_secs(20),
        &format!("s1's chunks not freed ({before} before, {alone} held alone)"),
    );
    assert_eq!(
        now,
        before - alone,
        "exactly the chunks s1 held alone are freed, on every node"
    );
    let vol = meta.volume("k9").expect("volume");
    let diffs = compare_replicas(&c, &vol, None);
    assert!(
        diffs.is_empty(),
        "the volume's copies differ after the delete: {diffs:?}"
    );
    let after = read_all(&dev, "volume after the delete");
    assert_eq!(after, head, "the delete changed the volume");
    meta.detach(att).expect("detach");
}

/// Creates volume `name` of `size_bytes` (3 replicas, default sectors).
fn create_volume(meta: &celer_meta::client::MetaClient, name: &str, size_bytes: u64) -> Volume {
    meta.create_volume(&CreateVolume {
        name: name.into(),
        size_bytes,
        replicas: None,
        sector_size_bytes: None,
    })
    .unwrap_or_else(|e| panic!("create volume {name}: {e}"))
}

/// Waits up to `within` until the nodes hold at most `want` chunk slots in
/// all (panics with `what` and the count otherwise), then 1 s more for any
/// further change; returns the count then and the time since the call.
fn settle_chunks(c: &Cluster, want: u64, within: Duration, what: &str) -> (u64, Duration) {
    let t0 = Instant::now();
    while allocated_chunks(c) > want {
        assert!(
            t0.elapsed() < within,
            "{what}: {} chunks allocated, want {want}",
            allocated_chunks(c)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1000));
    (allocated_chunks(c), t0.elapsed())
}

/// `GET /v1/status` of a node's admin server, as JSON.
fn node_status(admin: std::net::SocketAddr) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).expect("admin");
    s.write_all(b"GET /v1/status HTTP/1.0\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    let body = text.split("\r\n\r\n").nth(1).expect("body");
    serde_json::from_str(body).expect("status JSON")
}

fn allocated_chunks(c: &Cluster) -> u64 {
    c.nodes
        .iter()
        .map(|n| {
            node_status(n.admin)["allocated_chunks"]
                .as_u64()
                .expect("chunks")
        })
        .sum()
}

/// Deleting a snapshot frees, on every replica, the chunks of its layer
/// that the layer above it covers whole (read by nobody any more), and
/// nothing else; the volume and the later snapshot read the same before
/// and after. A metadata restore to before the delete does not bring the
/// snapshot back, and frees the chunks of a clone made after that point.
#[test]
fn deleting_a_snapshot_frees_the_chunks_only_it_held() {
    const MIB: usize = 1 << 20;
    let c = Cluster::start(std::path::Path::new(BIN), ClusterOpts::default());
    let meta = c.meta_client();
    let vol = create_volume(&meta, "del", 64 << 20);
    let (att, dev) = attach(&c, &vol, None);
    let mut q = dev.open_queue(0).expect("queue");
    let mut a = vec![0xAAu8; MIB];
    for ch in 0..4u64 {
        one_request(q.as_mut(), IoOp::Write, ch * MIB as u64, &mut a).expect("write A");
    }
    meta.create_snapshot("del", "a").expect("snapshot a");
    let mut b = vec![0xBBu8; MIB];
    for ch in 0..2u64 {
        one_request(q.as_mut(), IoOp::Write, ch * MIB as u64, &mut b).expect("write B");
    }
    one_request(q.as_mut(), IoOp::Write, 2 * MIB as u64, &mut b[..MIB / 2]).expect("write half B");
    meta.create_snapshot("del", "b").expect("snapshot b");
    // Let the chunk counts settle (first allocations, the cluster's first rebalance).
    std::thread::sleep(Duration::from_millis(1500));
    let before = allocated_chunks(&c);
    // What each holds alone, as `celer snapshot list` shows it: a, the 6
    // chunk copies the delete frees; b, nothing (the head wrote nothing
    // over it).
    let usage = meta.snapshot_usage("del").expect("snapshot usage");
    let alone = |n: &str| {
        usage
            .iter()
            .find(|u| u.name == n)
            .and_then(|u| u.alone_chunks)
    };
    assert_eq!(alone("a"), Some(6), "{usage:?}");
    assert_eq!(alone("b"), Some(0), "{usage:?}");
    assert_eq!(
        usage[0].alone_bytes,
        Some(6 << 20),
        "6 chunk slots of 1 MiB: {usage:?}"
    );
    let listed = std::process::Command::new(BIN)
        .args(["snapshot", "list", "del"])
        .env("CELER_META", c.meta_url())
        .env("CELER_TOKEN", support::cluster::TOKEN)
        .output()
        .expect("celer snapshot list");
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    println!("{listed}");
    assert!(listed.contains("6.00 MiB in 6 chunks"), "{listed}");
    let before_delete = meta.status().expect("status").log_seq;
    meta.delete_snapshot("del", "a").expect("delete a");
    let (after, took) = settle_chunks(
        &c,
        before - 6,
        Duration::from_secs(15),
        &format!("snapshot a's shadowed chunks not freed ({before} before)"),
    );
    println!(
        "allocated chunks: {before} before deleting snapshot a, {after} after ({} ms)",
        took.as_millis()
    );
    assert_eq!(
        after,
        before - 6,
        "exactly chunks 0 and 1 of snapshot a (on 3 replicas each) are read by nobody"
    );
    let expect = |buf: &[u8], ch: usize| -> bool {
        match ch {
            0 | 1 => buf.iter().all(|&x| x == 0xBB),
            2 => {
                buf[..MIB / 2].iter().all(|&x| x == 0xBB)
                    && buf[MIB / 2..].iter().all(|&x| x == 0xAA)
            }
            _ => buf.iter().all(|&x| x == 0xAA),
        }
    };
    let mut got = vec![0u8; MIB];
    for ch in 0..4usize {
        one_request(q.as_mut(), IoOp::Read, (ch * MIB) as u64, &mut got).expect("read");
        assert!(expect(&got, ch), "volume chunk {ch} changed by the delete");
    }
    let vol = meta.volume("del").expect("volume");
    let (_, snap) = attach(&c, &vol, Some("b"));
    let mut sq = snap.open_queue(0).expect("queue");
    for ch in 0..4usize {
        one_request(sq.as_mut(), IoOp::Read, (ch * MIB) as u64, &mut got).expect("read b");
        assert!(
            expect(&got, ch),
            "snapshot b chunk {ch} changed by the delete"
        );
    }

    // A metadata restore to before the delete does not bring snapshot a
    // back (chunks of it are freed), and frees what a clone made after
    // that point wrote: nothing reads it once the restore deletes it.
    let clone = meta.clone_volume("del", "b", "k").expect("clone k");
    let (katt, kdev) = attach(&c, &clone, None);
    let mut kq = kdev.open_queue(0).expect("clone queue");
    let mut k = vec![0xCCu8; MIB];
    for ch in [1u64, 3] {
        one_request(kq.as_mut(), IoOp::Write, ch * MIB as u64, &mut k).expect("write k");
    }
    drop(kq);
    meta.detach(katt).expect("detach k");
    let with_clone = allocated_chunks(&c);
    assert_eq!(with_clone, after + 6, "the clone's 2 chunks on 3 replicas");
    let out = celer(&c, &["meta", "restore", &before_delete.to_string()]).expect("restore");
    println!("{out}");
    assert!(
        out.contains("not brought back: snapshot del@a (deleted after that point"),
        "{out}"
    );
    assert!(out.contains("deleted (made after entry"), "{out}");
    assert!(out.contains("volume k"), "{out}");
    let (now, took) = settle_chunks(
        &c,
        after,
        Duration::from_secs(15),
        &format!("the removed clone's chunks not freed ({after} before it)"),
    );
    assert_eq!(now, after, "exactly the clone's chunks freed");
    println!(
        "restore: the clone's {} chunk slots freed in {} ms",
        with_clone - after,
        took.as_millis()
    );
    let vol = meta.volume("del").expect("volume");
    let names: Vec<&str> = vol.snapshots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["b"]);
    for ch in 0..4usize {
        one_request(q.as_mut(), IoOp::Read, (ch * MIB) as u64, &mut got).expect("read");
        assert!(expect(&got, ch), "volume chunk {ch} changed by the restore");
        one_request(sq.as_mut(), IoOp::Read, (ch * MIB) as u64, &mut got).expect("read b");
        assert!(
            expect(&got, ch),
            "snapshot b chunk {ch} changed by the restore"
        );
    }
    meta.detach(att).expect("detach");
}

/// Runs `celer ARGS` against the cluster's control service; its output, or
/// a panic naming the command.
fn celer(c: &Cluster, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(BIN)
        .args(args)
        .env("CELER_META", c.meta_url())
        .env("CELER_TOKEN", support::cluster::TOKEN)
        .output()
        .expect("run celer");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("celer {}: {text}", args.join(" ")))
    }
}

/// Incremental backup: a full export of snapshot a plus the diffs a→b and
/// b→c, applied to a new volume, give snapshot c byte for byte — with data
/// rewritten, zeroed and discarded between the snapshots. The diff b→c
/// lists only the chunks written after b; a diff against a snapshot not
/// under the newer one is refused; a damaged or truncated diff file is
/// refused before anything is written.
#[test]
fn a_full_export_and_two_diffs_restore_a_volume() {
    const MIB: u64 = 1 << 20;
    let c = Cluster::start(std::path::Path::new(BIN), ClusterOpts::default());
    let meta = c.meta_client();
    let vol = create_volume(&meta, "src", 32 << 20);
    let (att, dev) = attach(&c, &vol, None);
    let mut q = dev.open_queue(0).expect("queue");
    let pattern = |seed: u64, len: usize| -> Vec<u8> {
        (0..len)
            .map(|i| (i as u64 * 7 + seed * 131 + (i as u64 >> 12) * 13) as u8 | 1)
            .collect()
    };
    // a: chunks 0-7 written.
    for ch in 0..8u64 {
        one_request(
            q.as_mut(),
            IoOp::Write,
            ch * MIB,
            &mut pattern(ch, MIB as usize),
        )
        .expect("write a");
    }
    meta.create_snapshot("src", "a").expect("snapshot a");
    // Each step after the cut window: a write issued within 2 s of a
    // snapshot, before the writer learns of it, may be in it (see
    // docs/architecture.md), and the listings below are exact.
    std::thread::sleep(Duration::from_millis(2500));
    // b: chunk 1 rewritten in part, chunk 2 zeroed in part, chunk 12 new.
    one_request(
        q.as_mut(),
        IoOp::Write,
        MIB + 8192,
        &mut pattern(100, 16384),
    )
    .expect("write b");
    let zero = celer_device::IoRequest {
        op: IoOp::WriteZeroes,
        offset_bytes: 2 * MIB + 4096,
        len_bytes: 65536,
        segments: &[],
        tag: 0,
    };
    // SAFETY: no buffer.
    unsafe { q.submit(&zero) }.expect("zeroes");
    let mut done = None;
    while done.is_none() {
        q.poll(&mut |c| done = Some(c.result));
        std::thread::sleep(Duration::from_micros(50));
    }
    done.expect("completion").expect("zeroes b");
    one_request(
        q.as_mut(),
        IoOp::Write,
        12 * MIB,
        &mut pattern(12, MIB as usize),
    )
    .expect("write b");
    meta.create_snapshot("src", "b").expect("snapshot b");
    std::thread::sleep(Duration::from_millis(2500));
    // c: chunk 3 discarded whole, chunk 20 new.
    let discard = celer_device::IoRequest {
        op: IoOp::Discard,
        offset_bytes: 3 * MIB,
        len_bytes: MIB,
        segments: &[],
        tag: 0,
    };
    // SAFETY: no buffer.
    unsafe { q.submit(&discard) }.expect("discard");
    let mut done = None;
    while done.is_none() {
        q.poll(&mut |c| done = Some(c.result));
        std::thread::sleep(Duration::from_micros(50));
    }
    done.expect("completion").expect("discard c");
    one_request(
        q.as_mut(),
        IoOp::Write,
        20 * MIB + 4096,
        &mut pattern(20, 8192),
    )
    .expect("write c");
    meta.create_snapshot("src", "c").expect("snapshot c");
    // The live volume moves on: the diffs read the snapshots, not it.
    std::thread::sleep(Duration::from_millis(2500));
    one_request(q.as_mut(), IoOp::Write, 0, &mut pattern(999, MIB as usize)).expect("write after");
    drop(q);
    meta.detach(att).expect("detach");

    let dir = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    let t0 = Instant::now();
    celer(&c, &["volume", "export", "src@a", &p("full.raw")]).expect("export a");
    let listed = celer(&c, &["snapshot", "diff", "src@b", "src@c"]).expect("list b..c");
    println!("{listed}");
    let extents: Vec<&str> = listed
        .lines()
        .filter(|l| l.split(' ').count() == 2 && l.split(' ').all(|w| w.parse::<u64>().is_ok()))
        .collect();
    assert_eq!(
        extents,
        vec![format!("{} {MIB}", 3 * MIB), format!("{} {MIB}", 20 * MIB)],
        "b..c changed chunks 3 (discarded) and 20 only"
    );
    let listed = celer(&c, &["snapshot", "diff", "src@a", "src@b"]).expect("list a..b");
    println!("{listed}");
    assert!(
        listed.starts_with(&format!("{MIB} {}\n{} {MIB}\n", 2 * MIB, 12 * MIB)),
        "a..b changed chunks 1, 2 and 12 only"
    );
    let d1 = celer(&c, &["snapshot", "diff", "src@a", "src@b", "-o", &p("d1")]).expect("diff a..b");
    let d2 = celer(&c, &["snapshot", "diff", "src@b", "src@c", "-o", &p("d2")]).expect("diff b..c");
    println!("{d1}{d2}");
    let refused = celer(&c, &["snapshot", "diff", "src@c", "src@a"]).expect_err("c is not under a");
    assert!(refused.contains("is not under"), "{refused}");
    celer(&c, &["volume", "import", &p("full.raw"), "dst"]).expect("import a");
    // A truncated and a damaged copy of d1 are refused and change nothing.
    let d1_bytes = std::fs::read(p("d1")).expect("d1");
    std::fs::write(p("cut"), &d1_bytes[..d1_bytes.len() - 20]).expect("cut");
    let mut bad = d1_bytes.clone();
    let at = bad.len() / 2;
    bad[at] ^= 1;
    std::fs::write(p("bad"), &bad).expect("bad");
    for f in ["cut", "bad"] {
        let e = celer(&c, &["snapshot", "import-diff", &p(f), "dst"]).expect_err("refused");
        assert!(
            e.contains("nothing was applied") || e.contains("end record"),
            "{f}: {e}"
        );
    }
    celer(&c, &["volume", "export", "dst", &p("dst-a.raw")]).expect("export dst");
    assert!(
        std::fs::read(p("dst-a.raw")).expect("dst") == std::fs::read(p("full.raw")).expect("a"),
        "the refused diffs changed the volume"
    );
    celer(&c, &["snapshot", "import-diff", &p("d1"), "dst"]).expect("apply d1");
    celer(&c, &["snapshot", "import-diff", &p("d2"), "dst"]).expect("apply d2");
    println!("export, 2 diffs and 3 imports in {:?}", t0.elapsed());
    celer(&c, &["volume", "export", "dst", &p("dst.raw")]).expect("export dst");
    celer(&c, &["volume", "export", "src@c", &p("c.raw")]).expect("export c");
    let (got, want) = (
        std::fs::read(p("dst.raw")).expect("dst"),
        std::fs::read(p("c.raw")).expect("c"),
    );
    assert_eq!(got.len(), want.len());
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("the restored volume differs from snapshot c at byte {i}");
    }
    // And c is what was written (not a diff of nothing).
    assert!(want[3 * MIB as usize..4 * MIB as usize]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(&want[..MIB as usize], &pattern(0, MIB as usize)[..]);
    assert_eq!(
        &want[MIB as usize + 8192..][..16384],
        &pattern(100, 16384)[..]
    );
    assert!(want[2 * MIB as usize + 4096..][..65536]
        .iter()
        .all(|&b| b == 0));
}
