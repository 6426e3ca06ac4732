//! Inflight I/O tracking (INFLIGHT_SHMFD) through a real vhost-user socket
//! with the rust-vmm front end: a restarted back end resubmits, exactly once
//! and oldest first, the requests its predecessor had taken off the avail
//! ring and not completed, including the crash point "on the used ring but
//! not cleared"; and `celer-vhost serve` killed with SIGKILL while requests
//! are in flight completes each of them exactly once after a restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use celer_device::{BlockDevice, FileDevice, FileDeviceConfig, NullDevice};
use celer_vhost::frontend::{req_type, Frontend, FrontendConfig};
use celer_vhost::inflight::{InflightMap, QueueInflight};
use celer_vhost::{serve_backend, VhostConfig, VhostUserBlk};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK;

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const QUEUE_SIZE: u16 = 256;

fn cfg(slots: usize, buf_bytes: usize) -> FrontendConfig {
    FrontendConfig {
        queues: 1,
        queue_size: QUEUE_SIZE,
        slots,
        buf_bytes,
        event_idx: true,
        backend_req: false,
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
        .collect()
}

fn file_device(dir: &Path) -> Arc<dyn BlockDevice> {
    let path = dir.join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    Arc::new(
        FileDevice::open(&FileDeviceConfig {
            path,
            read_only: false,
            direct: true,
        })
        .unwrap(),
    )
}

/// Connects (with retries while the back end starts) and asks for an
/// inflight buffer.
fn connect(socket: &Path, cfg: &FrontendConfig) -> Frontend {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Frontend::connect_with_inflight(socket, cfg) {
            Ok(f) => return f,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("cannot connect to {}: {e}", socket.display()),
        }
    }
}

fn reconnect(f: Frontend, socket: &Path) -> Frontend {
    f.reconnect(socket, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("cannot reconnect to {}: {e}", socket.display()))
}

/// A dead back end's state, prepared by hand: four requests made available
/// (heads 3, 6, 9, 12), taken in the order 6, 3, 12, 9; head 12 went on the
/// used ring and the back end died before clearing its mark. The restarted
/// back end must resubmit 6, 3, 9 (in that order), never 12, and continue
/// after them on the avail ring. Returns what was seen for the caller's
/// checks: the used ring entries after the first request, and the stats.
fn prepared_crash(
    device: Arc<dyn BlockDevice>,
) -> (
    Vec<u16>,
    Vec<u8>,
    Vec<[u8; 4096]>,
    celer_vhost::worker::WorkerStats,
) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vhost.sock");
    let mut config = VhostConfig::new(&socket);
    config.connections_max = Some(2);
    let backend = Arc::new(VhostUserBlk::new(&config, &*device).unwrap());
    let b = backend.clone();
    let server: JoinHandle<_> = std::thread::spawn(move || serve_backend(&config, b));
    let cfg = cfg(8, 4096);
    let f = connect(&socket, &cfg);
    assert!(f
        .protocol_features
        .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    let (info, file) = f.inflight().expect("inflight buffer");
    let (info, file) = (*info, file.try_clone().unwrap());
    let pos;
    {
        let mut qs = f.queues().unwrap();
        let q = &mut qs[0];
        q.mem().write(q.data_off(0), &pattern(1, 4096));
        assert_eq!(q.request(0, req_type::OUT, 0, 4096).unwrap().0, S_OK);
        // Let the worker go back to epoll: nothing kicks it from here on.
        std::thread::sleep(Duration::from_millis(100));
        let reqs = [
            (1, req_type::OUT, 8, 2u8),
            (2, req_type::OUT, 16, 3),
            (3, req_type::IN, 0, 0),
            (4, req_type::OUT, 24, 4),
        ];
        for (slot, kind, sector, seed) in reqs {
            if kind == req_type::OUT {
                q.mem().write(q.data_off(slot), &pattern(seed, 4096));
            } else {
                q.mem().write(q.data_off(slot), &[0u8; 4096]);
            }
            let head = q.prepare(slot, kind, sector, 4096);
            assert_eq!(head as usize, 3 * slot);
            q.publish(head);
        }
        // The dead back end's marks (a fresh view continues the real one's
        // state: nothing in flight, used idx 1).
        let map = InflightMap::map(&file, info.mmap_offset, info.mmap_size).unwrap();
        let mut dead = QueueInflight::new(map, 0, QUEUE_SIZE).unwrap();
        let mut scratch = Vec::with_capacity(QUEUE_SIZE as usize);
        let r = dead.recover(q.used_idx(), &mut scratch);
        assert!(!r.fresh && scratch.is_empty(), "{r:?} {scratch:?}");
        for head in [6, 3, 12, 9] {
            dead.mark(head);
        }
        dead.pre_put(12);
        q.put_used_as_backend(12, 1);
        pos = q.position();
    }
    let f = reconnect(f, &socket);
    let mut qs = f.queues().unwrap();
    let q = &mut qs[0];
    q.resume_at(pos);
    // Head 12 from the dead back end, then the three resubmitted ones.
    let used: Vec<u16> = q
        .wait_used(4, Duration::from_secs(10))
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    // Nothing more may come (no repeat of 12, no second completion).
    std::thread::sleep(Duration::from_millis(300));
    let extra = q.wait_used(1, Duration::from_millis(1));
    assert!(
        extra.is_empty(),
        "unexpected completions {extra:?} after {used:?}"
    );
    let statuses: Vec<u8> = [1usize, 2, 3].iter().map(|&s| q.status(s)).collect();
    // A new request goes after the resubmitted ones on the avail ring.
    q.mem().write(q.data_off(5), &[0u8; 4096]);
    assert_eq!(q.request(5, req_type::IN, 24, 4096).unwrap().0, S_OK);
    let mut sector24 = [0u8; 4096];
    q.mem().read(q.data_off(5), &mut sector24);
    for (i, sector) in [8u64, 16].iter().enumerate() {
        q.mem().write(q.data_off(6 + i), &[0u8; 4096]);
        assert_eq!(
            q.request(6 + i, req_type::IN, *sector, 4096).unwrap().0,
            S_OK
        );
    }
    let mut reads = vec![sector24];
    for slot in [6usize, 7, 3] {
        let mut b = [0u8; 4096];
        q.mem().read(q.data_off(slot), &mut b);
        reads.push(b);
    }
    // Every mark is cleared once the requests are done.
    let map = InflightMap::map(&file, info.mmap_offset, info.mmap_size).unwrap();
    let view = QueueInflight::new(map, 0, QUEUE_SIZE).unwrap();
    for head in [3, 6, 9, 12] {
        assert!(
            !view.is_inflight(head),
            "head {head} still marked in flight"
        );
    }
    drop(qs);
    drop(f);
    server.join().unwrap().unwrap();
    let stats = backend.stats()[0];
    (used, statuses, reads, stats)
}

#[test]
fn resubmits_in_flight_heads_oldest_first_and_never_a_used_one() {
    // The null device completes in submission order: the used ring shows
    // the order of resubmission.
    let (used, statuses, _, stats) =
        prepared_crash(Arc::new(NullDevice::new(16 << 20, false, true)));
    assert_eq!(used, vec![12, 6, 3, 9], "used ring after the restart");
    assert_eq!(statuses, vec![S_OK; 3]);
    assert_eq!(stats.resubmitted, 3, "{stats:?}");
    assert_eq!(stats.resubmitted_completed, 3, "{stats:?}");
    assert_eq!(stats.used_not_cleared, 1, "{stats:?}");
}

#[test]
fn resubmitted_requests_move_the_data_and_the_used_one_is_not_redone() {
    let dir = tempfile::tempdir().unwrap();
    let (mut used, statuses, reads, stats) = prepared_crash(file_device(dir.path()));
    assert_eq!(used[0], 12);
    used[1..].sort_unstable();
    assert_eq!(used, vec![12, 3, 6, 9]);
    assert_eq!(statuses, vec![S_OK; 3]);
    // Head 12 (a write to sector 24) was on the used ring: not executed again.
    assert!(reads[0].iter().all(|&b| b == 0), "sector 24 was written");
    assert_eq!(reads[1].to_vec(), pattern(2, 4096), "sector 8");
    assert_eq!(reads[2].to_vec(), pattern(3, 4096), "sector 16");
    // The resubmitted read of sector 0 returned the first write.
    assert_eq!(reads[3].to_vec(), pattern(1, 4096), "read of sector 0");
    assert_eq!(
        (
            stats.resubmitted,
            stats.resubmitted_completed,
            stats.used_not_cleared
        ),
        (3, 3, 1),
        "{stats:?}"
    );
}

struct Backend {
    child: Child,
}

impl Backend {
    fn start(socket: &Path, disk: &Path, log: &Path) -> Backend {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_celer-vhost"))
            .args(["serve", "--socket"])
            .arg(socket)
            .arg("--device")
            .arg(format!("file:{}", disk.display()))
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start celer-vhost");
        Backend { child }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `key=value` fields of the log lines containing `what`.
fn log_fields(log: &str, what: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    log.lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(&prefix))
                .map(|v| v.trim_matches('"').to_string())
        })
        .collect()
}

#[test]
fn sigkill_with_requests_in_flight_completes_each_exactly_once() {
    const ROUNDS: u64 = 16;
    const DEPTH: usize = 16;
    const BYTES: usize = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let socket: PathBuf = dir.path().join("vhost.sock");
    let disk = dir.path().join("disk.img");
    let log = dir.path().join("backend.log");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(ROUNDS * (DEPTH * BYTES) as u64)
        .unwrap();
    let cfg = cfg(DEPTH, BYTES);
    let mut backend = Backend::start(&socket, &disk, &log);
    let mut f = connect(&socket, &cfg);
    let mut pos = (0u16, 0u16);
    // Completions of every head, per round.
    let mut seen: Vec<HashMap<u16, usize>> = Vec::new();
    for round in 0..ROUNDS {
        {
            let mut qs = f.queues().unwrap();
            let q = &mut qs[0];
            q.resume_at(pos);
            for slot in 0..DEPTH {
                let sector = (round * DEPTH as u64 + slot as u64) * (BYTES as u64 / 512);
                q.mem().write(
                    q.data_off(slot),
                    &pattern((round * 17 + slot as u64) as u8, BYTES),
                );
                let head = q.prepare(slot, req_type::OUT, sector, BYTES as u32);
                q.publish(head);
            }
            q.kick_if_needed().unwrap();
            // Kill at a different point of the round each time.
            std::thread::sleep(Duration::from_micros(150 * (round % 8)));
            pos = q.position();
        }
        drop(backend);
        backend = Backend::start(&socket, &disk, &log);
        f = reconnect(f, &socket);
        let mut qs = f.queues().unwrap();
        let q = &mut qs[0];
        q.resume_at(pos);
        let used = q.wait_used(DEPTH, Duration::from_secs(10));
        let mut counts = HashMap::new();
        for (id, _) in &used {
            *counts.entry(*id).or_insert(0usize) += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
        let extra = q.wait_used(1, Duration::from_millis(1));
        assert!(
            extra.is_empty(),
            "round {round}: extra completions {extra:?}"
        );
        for slot in 0..DEPTH {
            let head = (3 * slot) as u16;
            assert_eq!(
                counts.get(&head),
                Some(&1),
                "round {round}: head {head} completed {:?} times; used {used:?}",
                counts.get(&head)
            );
            assert_eq!(q.status(slot), S_OK, "round {round} slot {slot}");
        }
        pos = q.position();
        seen.push(counts);
    }
    // Every write landed.
    {
        let mut qs = f.queues().unwrap();
        let q = &mut qs[0];
        q.resume_at(pos);
        for round in 0..ROUNDS {
            for slot in 0..DEPTH {
                let sector = (round * DEPTH as u64 + slot as u64) * (BYTES as u64 / 512);
                q.mem().write(q.data_off(0), &vec![0u8; BYTES]);
                assert_eq!(
                    q.request(0, req_type::IN, sector, BYTES as u32).unwrap().0,
                    S_OK
                );
                let mut back = vec![0u8; BYTES];
                q.mem().read(q.data_off(0), &mut back);
                assert!(
                    back == pattern((round * 17 + slot as u64) as u8, BYTES),
                    "round {round} slot {slot}: data differs"
                );
            }
        }
    }
    drop(f);
    drop(backend);
    let text = std::fs::read_to_string(&log).unwrap();
    let resubmitted: usize = log_fields(&text, "resubmitting in-flight requests", "resubmit")
        .iter()
        .map(|n| n.parse::<usize>().unwrap())
        .sum();
    let completed = text.matches("resubmitted request completed").count();
    eprintln!(
        "{ROUNDS} kills: {resubmitted} heads resubmitted, {completed} completed, {} on the used ring but not cleared",
        text.matches("still marked in flight").count()
    );
    // The kills hit requests in flight (else this test proves nothing), and
    // every resubmitted head completed once.
    assert!(
        resubmitted > 0,
        "no kill found a request in flight:\n{text}"
    );
    assert_eq!(resubmitted, completed, "{text}");
}
