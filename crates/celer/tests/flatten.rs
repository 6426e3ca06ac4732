//! `celer volume flatten` on a cluster of processes (`celer meta serve` +
//! 4 `celer node serve`, 3 replicas): the real command copies into a clone
//! what it shares with its parent's snapshot while a writer keeps writing
//! the clone; then the snapshot (and the parent) can be deleted, their
//! space is freed, and the clone reads the same, byte for byte, with
//! identical replicas (data and block versions). Interruptions: the
//! command killed with SIGKILL midway and run again; a node killed with
//! SIGKILL during a flatten and restarted within the grace period.

mod support;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celer_client::{Capability, Client, ClientConfig, Credential};
use celer_device::{BlockDevice, DeviceQueue, IoOp};
use celer_meta::api::{AttachVolume, CreateVolume, Volume};
use support::cluster::{Cluster, ClusterOpts, TOKEN};

const BIN: &str = env!("CARGO_BIN_EXE_celer");
const BLOCK: u64 = 4096;
const MIB: u64 = 1 << 20;

/// Block `b`'s content as written with `seed` (0: zeroes).
fn pattern(seed: u64, b: u64, out: &mut [u8]) {
    if seed == 0 {
        out.fill(0);
        return;
    }
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    for w in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
    out[..8].copy_from_slice(&seed.to_le_bytes());
    out[8..16].copy_from_slice(&b.to_le_bytes());
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
        segments: if op == IoOp::Discard {
            &[]
        } else {
            std::slice::from_ref(&seg)
        },
        tag: 0,
    };
    // SAFETY: buf outlives the request: we wait for its completion here.
    unsafe { q.submit(&req) }.map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut done = None;
    while done.is_none() {
        q.poll(&mut |c| done = Some(c.result));
        assert!(Instant::now() < deadline, "a request took more than 60 s");
        std::thread::sleep(Duration::from_micros(50));
    }
    done.expect("a completion").map_err(|e| e.to_string())
}

/// Attaches `vol` as a front end does (exclusive, read-write).
fn attach(c: &Cluster, name: &str) -> (u32, Arc<Client>) {
    let meta = c.meta_client();
    let att = meta
        .attach_with(name, &AttachVolume::default())
        .expect("attach");
    let credential = Credential::Attachment {
        capability: Capability::from_hex(&att.capability).expect("capability"),
        key: celer_proto::auth::key_from_hex(&att.key).expect("key"),
    };
    let v = &att.volume;
    let mut cfg = ClientConfig::new(c.seeds(), v.id, v.size_bytes, credential);
    cfg.request_timeout = Duration::from_millis(300);
    cfg.lineage = v.lineage();
    cfg.era = v.head_era;
    let client = Client::connect(cfg).expect("client connects");
    (att.attachment.id, Arc::new(client))
}

/// What each block of a volume must read: the seed of its last write
/// (absent: the base).
#[derive(Clone, Default)]
struct Model {
    base: HashMap<u64, u64>,
    written: HashMap<u64, u64>,
}

impl Model {
    fn seed(&self, b: u64) -> u64 {
        self.written
            .get(&b)
            .or_else(|| self.base.get(&b))
            .copied()
            .unwrap_or(0)
    }
}

/// Writes `seed` over whole chunks `chunks` (1 MiB requests).
fn write_chunks(
    q: &mut dyn DeviceQueue,
    chunks: std::ops::Range<u64>,
    seed: u64,
    m: &mut HashMap<u64, u64>,
) {
    let mut buf = vec![0u8; MIB as usize];
    for ch in chunks {
        for i in 0..MIB / BLOCK {
            let b = ch * MIB / BLOCK + i;
            pattern(
                seed,
                b,
                &mut buf[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize],
            );
            m.insert(b, seed);
        }
        one_request(q, IoOp::Write, ch * MIB, &mut buf).expect("write a chunk");
    }
}

fn write_block(q: &mut dyn DeviceQueue, b: u64, seed: u64, m: &mut HashMap<u64, u64>) {
    let mut buf = vec![0u8; BLOCK as usize];
    pattern(seed, b, &mut buf);
    one_request(q, IoOp::Write, b * BLOCK, &mut buf).expect("write a block");
    m.insert(b, seed);
}

/// Reads the first `bytes` of the volume and checks every block against
/// the model; returns the mismatches (block numbers).
fn verify(dev: &Arc<Client>, bytes: u64, m: &Model, what: &str) -> Vec<u64> {
    let mut q = dev.open_queue(7).expect("queue");
    let mut buf = vec![0u8; MIB as usize];
    let mut want = vec![0u8; BLOCK as usize];
    let mut bad = Vec::new();
    for at in (0..bytes).step_by(MIB as usize) {
        one_request(q.as_mut(), IoOp::Read, at, &mut buf)
            .unwrap_or_else(|e| panic!("{what}: read at {at}: {e}"));
        for i in 0..MIB / BLOCK {
            let b = at / BLOCK + i;
            pattern(m.seed(b), b, &mut want);
            let got = &buf[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize];
            if got != &want[..] {
                if bad.len() < 4 {
                    let word = |at: usize| {
                        let mut w = [0u8; 8];
                        w.copy_from_slice(&got[at..at + 8]);
                        u64::from_le_bytes(w)
                    };
                    eprintln!(
                        "{what}: block {b}: want seed {}, got seed {} block {}{}",
                        m.seed(b),
                        word(0),
                        word(8),
                        if got.iter().all(|&x| x == 0) {
                            " (zeroes)"
                        } else {
                            ""
                        }
                    );
                }
                bad.push(b);
            }
        }
    }
    bad
}

/// `GET /v1/status` of a node's admin server, as JSON.
fn node_status(admin: std::net::SocketAddr) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).ok()?;
    s.write_all(b"GET /v1/status HTTP/1.0\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let body = text.split("\r\n\r\n").nth(1)?;
    serde_json::from_str(body).ok()
}

/// Chunk slots allocated on the nodes that answer.
fn allocated_chunks(c: &Cluster) -> u64 {
    c.nodes
        .iter()
        .filter_map(|n| node_status(n.admin))
        .map(|s| s["allocated_chunks"].as_u64().expect("chunks"))
        .sum()
}

/// Waits until the nodes' allocated chunks stop changing (1 s steady).
fn settled_chunks(c: &Cluster) -> u64 {
    let mut last = allocated_chunks(c);
    let mut since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = allocated_chunks(c);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() > Duration::from_secs(1) {
            return now;
        }
        assert!(Instant::now() < deadline, "chunk counts never settle");
    }
}

fn flatten_cmd(c: &Cluster, name: &str, workers: usize) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["volume", "flatten", name, "--workers", &workers.to_string()])
        .args(["--meta", &c.meta_url(), "--token", TOKEN])
        .env("CELER_LOG", "warn");
    cmd
}

/// Runs the flatten command to its end: (success, stdout + stderr, seconds).
fn flatten(c: &Cluster, name: &str) -> (bool, String, f64) {
    let t = Instant::now();
    let out = flatten_cmd(c, name, 4)
        .output()
        .expect("run celer volume flatten");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text, t.elapsed().as_secs_f64())
}

/// Every chunk of `vol` in its first `bytes`: replicas identical through a
/// read (the node's layers for the volume) and in its head's block states
/// (kinds and versions). Returns the blocks the heads hold as data.
fn check_replicas(c: &Cluster, vol: &Volume, bytes: u64) -> u64 {
    let t = c.meta_client().route().expect("route");
    let head = celer_device::layer_key(vol.lineage(), vol.head_era);
    let mut diffs = Vec::new();
    let mut data = 0;
    for ch in 0..bytes / t.chunk_bytes {
        diffs.extend(support::replicas::compare_chunk_of(
            &t,
            vol.id,
            vol.lineage(),
            ch,
            None,
        ));
        let (d, states) = support::replicas::compare_states_of(&t, head, ch);
        diffs.extend(d);
        data += states.iter().filter(|s| s.0 == 1).count() as u64;
    }
    assert!(
        diffs.is_empty(),
        "volume {}: replicas differ: {} blocks, first {:?}",
        vol.name,
        diffs.len(),
        &diffs[..diffs.len().min(5)]
    );
    data
}

/// A writer that keeps writing (and reading back) random 4 KiB blocks of
/// the first `bytes` of a volume, as a VM would, until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    model: Arc<Mutex<HashMap<u64, u64>>>,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

impl Writer {
    fn start(dev: Arc<Client>, bytes: u64, seed0: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let model = Arc::new(Mutex::new(HashMap::new()));
        let (s, w, m) = (stop.clone(), writes.clone(), model.clone());
        let thread = std::thread::spawn(move || -> Result<(), String> {
            let mut q = dev.open_queue(1).map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; BLOCK as usize];
            let mut back = vec![0u8; BLOCK as usize];
            let mut x = seed0 | 1;
            let mut seed = seed0;
            while !s.load(Ordering::Acquire) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b = x % (bytes / BLOCK);
                seed += 1;
                pattern(seed, b, &mut buf);
                one_request(q.as_mut(), IoOp::Write, b * BLOCK, &mut buf)
                    .map_err(|e| format!("write block {b}: {e}"))?;
                m.lock().expect("model").insert(b, seed);
                one_request(q.as_mut(), IoOp::Read, b * BLOCK, &mut back)
                    .map_err(|e| format!("read block {b}: {e}"))?;
                if back != buf {
                    return Err(format!(
                        "block {b} read back differs from the write just acknowledged"
                    ));
                }
                w.fetch_add(1, Ordering::AcqRel);
            }
            Ok(())
        });
        Writer {
            stop,
            writes,
            model,
            thread,
        }
    }

    fn stop(self) -> (u64, HashMap<u64, u64>) {
        self.stop.store(true, Ordering::Release);
        let r = self.thread.join().expect("writer thread");
        if let Err(e) = r {
            panic!("the writer failed: {e}");
        }
        let m = self.model.lock().expect("model").clone();
        (self.writes.load(Ordering::Acquire), m)
    }
}

fn create(c: &Cluster, name: &str, size: u64) -> Volume {
    c.meta_client()
        .create_volume(&CreateVolume {
            name: name.into(),
            size_bytes: size,
            replicas: None,
            sector_size_bytes: Some(4096),
        })
        .expect("create volume")
}

/// A clone of a snapshot, flattened by the command while a writer keeps
/// writing it; then the snapshot and the parent are deleted: their chunks
/// are freed, exactly, and the clone reads the same byte for byte, with
/// identical replicas.
#[test]
fn a_clone_flattened_under_a_writer_no_longer_needs_its_parent() {
    const VOL: u64 = 64 * MIB;
    const DATA_CHUNKS: u64 = 32;
    let c = Cluster::start(std::path::Path::new(BIN), ClusterOpts::default());
    let meta = c.meta_client();
    create(&c, "p", VOL);
    let mut base = HashMap::new();
    {
        let (att, dev) = attach(&c, "p");
        write_chunks(
            dev.open_queue(0).expect("queue").as_mut(),
            0..DATA_CHUNKS,
            1,
            &mut base,
        );
        meta.detach(att).expect("detach p");
    }
    meta.create_snapshot("p", "s").expect("snapshot");
    meta.clone_volume("p", "s", "c").expect("clone");
    // The parent goes on and rewrites everything (attached anew: a writer
    // that learns of the snapshot from its first write puts that write
    // in the snapshot too, see the cut): its snapshot's layer is then read
    // by nobody once the clone no longer needs it.
    let (patt, pdev) = attach(&c, "p");
    let mut pq = pdev.open_queue(0).expect("queue");
    let mut pmodel = HashMap::new();
    write_chunks(pq.as_mut(), 0..DATA_CHUNKS, 2, &mut pmodel);
    let (catt, cdev) = attach(&c, "c");
    let mut model = Model {
        base: base.clone(),
        ..Model::default()
    };
    {
        let mut q = cdev.open_queue(0).expect("queue");
        for b in (0..8 * MIB / BLOCK).step_by(7) {
            write_block(q.as_mut(), b, 3, &mut model.written);
        }
        // A discard: the clone's head records zeroes over the parent's data.
        let mut none = vec![0u8; (16 * BLOCK) as usize];
        one_request(q.as_mut(), IoOp::Discard, 3 * MIB + 16 * BLOCK, &mut none).expect("discard");
        for b in (3 * MIB + 16 * BLOCK) / BLOCK..(3 * MIB + 32 * BLOCK) / BLOCK {
            model.written.insert(b, 0);
        }
    }
    let conflict = meta
        .delete_snapshot("p", "s")
        .expect_err("snapshot a clone reads");
    assert!(conflict.to_string().contains("flatten"), "{conflict}");
    meta.delete_volume("p")
        .expect_err("the clone reads the parent's layers");

    let bad = verify(&cdev, VOL, &model, "before flatten");
    assert!(
        bad.is_empty(),
        "clone blocks wrong before flatten: {}",
        bad.len()
    );
    let writer = Writer::start(cdev.clone(), DATA_CHUNKS * MIB, 1000);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, out, secs) = flatten(&c, "c");
    assert!(ok, "flatten failed: {out}");
    std::thread::sleep(Duration::from_millis(300));
    let (writes, written) = writer.stop();
    println!("{}", out.trim());
    println!(
        "flatten of {DATA_CHUNKS} MiB took {secs:.2} s (command, with attach and list), {writes} writes (each read back) by the writer meanwhile"
    );
    assert!(writes > 0, "the writer made no progress during the flatten");
    model.written.extend(written);
    let cv = meta.volume("c").expect("clone");
    assert!(cv.under.is_empty() && cv.parent.is_none(), "{cv:?}");
    let log = meta.log(0).expect("log");
    assert!(
        log.iter()
            .any(|e| format!("{:?}", e.what).contains("flattened")),
        "no flatten entry in the change log"
    );
    let (again, out2, _) = flatten(&c, "c");
    assert!(again && out2.contains("nothing to flatten"), "{out2}");
    let bad = verify(&cdev, VOL, &model, "after flatten");
    assert!(
        bad.is_empty(),
        "clone blocks wrong after flatten: {} (first {:?})",
        bad.len(),
        &bad[..bad.len().min(8)]
    );
    let data_blocks = check_replicas(&c, &cv, DATA_CHUNKS * MIB);
    println!(
        "the clone's head holds {data_blocks} data blocks of {}",
        DATA_CHUNKS * MIB / BLOCK
    );

    // Now the snapshot can go, and its layer is read by nobody: freed.
    let before = settled_chunks(&c);
    let t0 = Instant::now();
    meta.delete_snapshot("p", "s")
        .expect("delete the snapshot after the flatten");
    let freed_snapshot = DATA_CHUNKS * 3;
    while allocated_chunks(&c) > before - freed_snapshot {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "snapshot s not freed: {} chunks, {before} before",
            allocated_chunks(&c)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let after_snapshot = settled_chunks(&c);
    println!(
        "deleting p@s: {before} -> {after_snapshot} allocated chunks in {} ms",
        t0.elapsed().as_millis()
    );
    assert_eq!(
        after_snapshot,
        before - freed_snapshot,
        "exactly the snapshot's chunks on 3 replicas"
    );
    // And the parent itself: only the clone's chunks stay.
    meta.detach(patt).expect("detach p");
    drop(pq);
    meta.delete_volume("p")
        .expect("delete the parent after the flatten");
    let t1 = Instant::now();
    while allocated_chunks(&c) > DATA_CHUNKS * 3 {
        assert!(
            t1.elapsed() < Duration::from_secs(20),
            "parent not freed: {} chunks",
            allocated_chunks(&c)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = settled_chunks(&c);
    println!("deleting p: {after_snapshot} -> {left} allocated chunks (the clone's {DATA_CHUNKS} on 3 replicas)");
    assert_eq!(left, DATA_CHUNKS * 3);
    let bad = verify(&cdev, VOL, &model, "after deleting the parent");
    assert!(
        bad.is_empty(),
        "clone blocks wrong without its parent: {} (first {:?})",
        bad.len(),
        &bad[..bad.len().min(8)]
    );
    check_replicas(&c, &meta.volume("c").expect("clone"), DATA_CHUNKS * MIB);
    meta.detach(catt).expect("detach c");
}

/// Polls until the nodes hold `at_least` chunks, then kills `child`
/// (SIGKILL); panics if the child exits first.
fn kill_midway(c: &Cluster, child: &mut Child, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while allocated_chunks(c) < at_least {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the flatten ended ({st}) before it could be killed midway");
        }
        assert!(Instant::now() < deadline, "the flatten made no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().expect("kill -9 the flatten");
    let _ = child.wait();
}

/// A clone of a clone, flattened by a command killed with SIGKILL midway
/// and run again; then the first clone, flattened while one of the nodes
/// is killed with SIGKILL and restarted within the grace period. Every
/// block reads as written, replicas identical (data and versions), and the
/// snapshots can be deleted in turn.
#[test]
fn flatten_survives_kill_9_of_the_command_and_of_a_node() {
    const VOL: u64 = 48 * MIB;
    const DATA_CHUNKS: u64 = 48;
    let opts = ClusterOpts {
        down_grace_s: 120,
        disk_bytes: 400 << 20,
        ..ClusterOpts::default()
    };
    let mut c = Cluster::start(std::path::Path::new(BIN), opts);
    let meta = c.meta_client();
    create(&c, "p", VOL);
    let (patt, pdev) = attach(&c, "p");
    let mut base = HashMap::new();
    write_chunks(
        pdev.open_queue(0).expect("queue").as_mut(),
        0..DATA_CHUNKS,
        1,
        &mut base,
    );
    meta.detach(patt).expect("detach p");
    meta.create_snapshot("p", "s").expect("snapshot");
    meta.clone_volume("p", "s", "c1").expect("clone c1");
    let (att1, dev1) = attach(&c, "c1");
    let mut m1 = Model {
        base,
        ..Model::default()
    };
    {
        let mut q = dev1.open_queue(0).expect("queue");
        // Chunks 0-3 (its head is then frozen by snapshot k).
        for b in (0..4 * MIB / BLOCK).step_by(13) {
            write_block(q.as_mut(), b, 5, &mut m1.written);
        }
    }
    meta.detach(att1).expect("detach c1");
    meta.create_snapshot("c1", "k")
        .expect("snapshot of the clone");
    meta.clone_volume("c1", "k", "c2")
        .expect("clone of the clone");
    let (att2, dev2) = attach(&c, "c2");
    let mut m2 = m1.clone();
    {
        let mut q = dev2.open_queue(0).expect("queue");
        // Chunks 2-5: the flatten allocates the head's other chunks,
        // which is how the test sees its progress.
        for b in (2 * MIB / BLOCK..6 * MIB / BLOCK).step_by(29) {
            write_block(q.as_mut(), b, 6, &mut m2.written);
        }
    }
    // The clone of the clone reads three layers (its parent's snapshot,
    // and the grandparent's under it).
    let v2 = meta.volume("c2").expect("c2");
    assert_eq!(v2.under.len(), 2, "{v2:?}");
    let start_chunks = settled_chunks(&c);

    // 1. kill -9 of the command midway, then again to the end.
    let mut child = flatten_cmd(&c, "c2", 1)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn flatten");
    // A third of the 42 chunks to allocate, on 3 replicas.
    kill_midway(&c, &mut child, start_chunks + 42);
    let partial = allocated_chunks(&c) - start_chunks;
    assert!(
        !meta.volume("c2").expect("c2").under.is_empty(),
        "the killed flatten finished anyway"
    );
    let (ok, out, secs) = flatten(&c, "c2");
    assert!(ok, "flatten after the kill failed: {out}");
    println!("{}", out.trim());
    println!(
        "flatten of c2 ({DATA_CHUNKS} MiB over 2 layers) killed after {partial} of {} chunk copies; run again: {secs:.2} s",
        (DATA_CHUNKS - 4) * 3
    );
    let v2 = meta.volume("c2").expect("c2");
    assert!(v2.under.is_empty() && v2.parent.is_none(), "{v2:?}");
    let bad = verify(&dev2, VOL, &m2, "c2 after flatten");
    assert!(
        bad.is_empty(),
        "c2 blocks wrong: {} (first {:?})",
        bad.len(),
        &bad[..bad.len().min(8)]
    );
    check_replicas(&c, &v2, VOL);

    // 2. kill -9 of a node during the flatten of c1, back within the grace.
    let victim = 1;
    let victim_id = c.node_id(victim);
    let before = allocated_chunks(&c);
    let child = flatten_cmd(&c, "c1", 1)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flatten");
    let t = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    while allocated_chunks(&c) < before + 30 {
        assert!(
            Instant::now() < deadline,
            "the flatten of c1 made no progress"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    c.kill(victim);
    let killed_at = t.elapsed();
    c.wait_down(victim_id, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    c.restart(victim);
    let out = child.wait_with_output().expect("flatten of c1");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "flatten of c1 with node {victim_id} killed {} ms in and restarted 2 s after it was marked down: {} in {:.2} s: {}",
        killed_at.as_millis(),
        if out.status.success() { "completed" } else { "failed" },
        t.elapsed().as_secs_f64(),
        text.trim()
    );
    if !out.status.success() {
        assert!(
            text.contains("run `celer volume flatten c1` again") || text.contains("again"),
            "not a clean failure: {text}"
        );
        let (ok, out, _) = flatten(&c, "c1");
        assert!(ok, "flatten of c1 after the node came back failed: {out}");
    }
    let healthy = Instant::now();
    c.wait_healthy(Duration::from_secs(120));
    println!(
        "cluster healthy {} ms after the flatten",
        healthy.elapsed().as_millis()
    );
    let v1 = meta.volume("c1").expect("c1");
    assert!(v1.under.is_empty() && v1.parent.is_none(), "{v1:?}");
    let (att1, dev1) = attach(&c, "c1");
    let bad = verify(&dev1, VOL, &m1, "c1 after flatten");
    assert!(
        bad.is_empty(),
        "c1 blocks wrong: {} (first {:?})",
        bad.len(),
        &bad[..bad.len().min(8)]
    );
    check_replicas(&c, &v1, VOL);
    check_replicas(&c, &v2, VOL);

    // The snapshots go in turn: c1@k (c2 no longer reads it), then p@s.
    meta.delete_snapshot("c1", "k")
        .expect("delete c1@k after flattening c2");
    meta.delete_snapshot("p", "s")
        .expect("delete p@s after flattening c1");
    meta.delete_volume("p").expect("delete p");
    std::thread::sleep(Duration::from_secs(2));
    let bad = verify(&dev1, VOL, &m1, "c1 without p");
    assert!(bad.is_empty(), "c1 blocks wrong without p: {}", bad.len());
    let bad = verify(&dev2, VOL, &m2, "c2 without p");
    assert!(bad.is_empty(), "c2 blocks wrong without p: {}", bad.len());
    meta.detach(att1).expect("detach c1");
    meta.detach(att2).expect("detach c2");
}
