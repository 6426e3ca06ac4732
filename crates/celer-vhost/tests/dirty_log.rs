//! Dirty logging for live migration (LOG_SHMFD, VHOST_F_LOG_ALL) through a
//! real vhost-user socket: every guest page the back end writes (read data,
//! written by the device through host pointers; GET_ID data; status bytes;
//! the used ring) is marked in the front end's log, pages it only reads are
//! not, and GET_VRING_BASE returns only after the requests taken off the
//! ring completed and were logged, then fires the rings-stopped hook.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use celer_device::{BlockDevice, FileDevice, FileDeviceConfig};
use celer_vhost::frontend::{page_dirty, req_type, Frontend, FrontendConfig, DIRTY_PAGE_BYTES};
use celer_vhost::{serve_backend, VhostConfig, VhostUserBlk};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK;

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const BUF: usize = 16 << 10;
const BIG: usize = 1 << 20;

/// Guest addresses of the pages of `[gpa, gpa + len)`.
fn pages(gpa: u64, len: usize) -> Vec<u64> {
    (0..len.div_ceil(DIRTY_PAGE_BYTES as usize))
        .map(|i| gpa + i as u64 * DIRTY_PAGE_BYTES)
        .collect()
}

#[test]
fn pages_the_back_end_writes_are_logged_and_stopping_drains() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let device: Arc<dyn BlockDevice> = Arc::new(
        FileDevice::open(&FileDeviceConfig {
            path,
            read_only: false,
            direct: true,
        })
        .unwrap(),
    );
    let socket = dir.path().join("vhost.sock");
    let mut config = VhostConfig::new(&socket);
    config.connections_max = Some(1);
    let backend = Arc::new(VhostUserBlk::new(&config, &*device).unwrap());
    let stopped = Arc::new(AtomicU64::new(0));
    let s = stopped.clone();
    backend.on_rings_stopped(Box::new(move || {
        s.fetch_add(1, Ordering::AcqRel);
    }));
    let b = backend.clone();
    let server = std::thread::spawn(move || serve_backend(&config, b));
    let cfg = FrontendConfig {
        queues: 1,
        queue_size: 256,
        slots: 8,
        buf_bytes: BIG,
        event_idx: true,
        backend_req: false,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut f = loop {
        match Frontend::connect(&socket, &cfg) {
            Ok(f) => break f,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("{e}"),
        }
    };
    assert!(f
        .protocol_features
        .contains(VhostUserProtocolFeatures::LOG_SHMFD));
    assert_eq!(f.features & VhostUserVirtioFeatures::LOG_ALL.bits(), 0);
    let log = f.start_dirty_log().unwrap();
    let mut qs = f.queues().unwrap();
    let q = &mut qs[0];
    let slot0 = pages(q.mem().gpa(q.data_off(0)), BUF);
    let slot1 = pages(q.mem().gpa(q.data_off(1)), BUF);
    let slot2 = pages(q.mem().gpa(q.data_off(2)), 4096);
    let slot3 = pages(q.mem().gpa(q.data_off(3)), BUF);
    let status1 = q.mem().gpa(q.status_off(1));
    let used = q.mem().gpa(q.used_off());
    // A write: the device only reads slot 0's data.
    q.mem().write(q.data_off(0), &vec![0x5a; BUF]);
    assert_eq!(q.request(0, req_type::OUT, 0, BUF as u32).unwrap().0, S_OK);
    // A read: the device writes slot 1's data (zero copy).
    q.mem().write(q.data_off(1), &vec![0u8; BUF]);
    assert_eq!(q.request(1, req_type::IN, 0, BUF as u32).unwrap().0, S_OK);
    let mut back = vec![0u8; BUF];
    q.mem().read(q.data_off(1), &mut back);
    assert!(back.iter().all(|&b| b == 0x5a));
    // GET_ID: the back end copies the serial into slot 2.
    assert_eq!(q.request(2, req_type::GET_ID, 0, 20).unwrap().0, S_OK);
    for gpa in slot1.iter().chain(&slot2) {
        assert!(
            page_dirty(&log, *gpa),
            "page {gpa:#x} written by the back end is not logged"
        );
    }
    assert!(page_dirty(&log, status1), "status byte page not logged");
    assert!(page_dirty(&log, used), "used ring page not logged");
    for gpa in slot0.iter().chain(&slot3) {
        assert!(
            !page_dirty(&log, *gpa),
            "page {gpa:#x} only read (or untouched) is logged"
        );
    }
    // Requests taken off the ring complete (and are logged) before
    // GET_VRING_BASE answers: 1 MiB reads of written blocks, stopped at once.
    for slot in 4..8 {
        q.mem().write(q.data_off(slot), &vec![slot as u8; BIG]);
        let sector = 2048 * slot as u64;
        assert_eq!(
            q.request(slot, req_type::OUT, sector, BIG as u32)
                .unwrap()
                .0,
            S_OK
        );
    }
    for slot in 4..8 {
        q.mem().write(q.data_off(slot), &vec![0u8; BIG]);
        let head = q.prepare(slot, req_type::IN, 2048 * slot as u64, BIG as u32);
        q.publish(head);
    }
    q.kick_if_needed().unwrap();
    let used_before_stop = q.used_idx();
    drop(qs);
    assert_eq!(stopped.load(Ordering::Acquire), 0);
    let base = f.stop_queue(0).unwrap();
    let qs = f.queues().unwrap();
    let q = &qs[0];
    assert_eq!(
        q.used_idx(),
        base as u16,
        "GET_VRING_BASE answered {base} with requests still in flight (used idx {}, {used_before_stop} before)",
        q.used_idx()
    );
    let taken = base as usize - 7; // 7 requests before these four
    for slot in 4..4 + taken {
        for gpa in pages(q.mem().gpa(q.data_off(slot)), BIG) {
            assert!(
                page_dirty(&log, gpa),
                "slot {slot}: page {gpa:#x} not logged"
            );
        }
    }
    assert_eq!(stopped.load(Ordering::Acquire), 1, "rings-stopped hook");
    assert!(!backend.rings_running());
    drop(qs);
    drop(f);
    server.join().unwrap().unwrap();
}
