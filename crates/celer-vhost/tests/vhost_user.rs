//! Drives the back end through a real vhost-user socket with the rust-vmm
//! front end (`vhost` crate, `vhost-user-frontend`): negotiation, config
//! space, every request type, multi-queue, bad input, reconnect, idle CPU.

use std::io::Write;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

use celer_device::{BlockDevice, FileDevice, FileDeviceConfig, NullDevice};
use celer_vhost::frontend::{
    req_type, Frontend, FrontendConfig, RawDesc, DESC_F_NEXT, DESC_F_WRITE, GUEST_BASE,
};
use celer_vhost::{serve_backend, VhostConfig, VhostUserBlk};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

struct Server {
    socket: PathBuf,
    backend: Arc<VhostUserBlk>,
    thread: Option<JoinHandle<Result<(), celer_vhost::Error>>>,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(device: Arc<dyn BlockDevice>, queues: usize, connections: usize) -> Server {
        Self::start_pinned(device, queues, connections, Vec::new())
    }

    fn start_pinned(
        device: Arc<dyn BlockDevice>,
        queues: usize,
        connections: usize,
        cpus: Vec<usize>,
    ) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vhost.sock");
        let mut config = VhostConfig::new(&socket);
        config.num_queues = queues;
        config.cpus = cpus;
        config.connections_max = Some(connections);
        let backend = Arc::new(VhostUserBlk::new(&config, &*device).unwrap());
        let b = backend.clone();
        let thread = std::thread::spawn(move || serve_backend(&config, b));
        let s = Server {
            socket,
            backend,
            thread: Some(thread),
            _dir: dir,
        };
        s.wait_listening();
        s
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            // The daemon binds a fresh listener per connection.
            if self.socket.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("back end did not listen on {}", self.socket.display());
    }

    fn connect(&self, queues: usize) -> Frontend {
        self.wait_listening();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Frontend::connect(&self.socket, &cfg(queues)) {
                Ok(f) => return f,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot connect: {e}"),
            }
        }
    }

    fn join(mut self) {
        let r = self
            .thread
            .take()
            .unwrap()
            .join()
            .expect("serve thread panicked");
        r.expect("serve returned an error");
    }
}

fn cfg(queues: usize) -> FrontendConfig {
    FrontendConfig {
        queues,
        queue_size: 256,
        slots: 16,
        buf_bytes: 64 << 10,
        event_idx: true,
        backend_req: true,
    }
}

fn file_device(dir: &Path, read_only: bool) -> Arc<dyn BlockDevice> {
    let path = dir.join("disk.img");
    if !path.exists() {
        std::fs::File::create(&path)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
    }
    Arc::new(
        FileDevice::open(&FileDeviceConfig {
            path,
            read_only,
            direct: true,
        })
        .unwrap(),
    )
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn negotiates_features_and_serves_config_space() {
    let server = Server::start(Arc::new(NullDevice::new(64 << 20, false, false)), 2, 1);
    let fe = server.connect(2);
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert!(fe.features & (1 << bit) != 0, "feature bit {bit} missing");
    }
    // The driver declines INDIRECT_DESC; the back end offered it.
    assert_eq!(fe.features & (1 << VIRTIO_RING_F_INDIRECT_DESC), 0);
    assert_eq!(fe.features & (1 << VIRTIO_BLK_F_RO), 0);
    assert!(fe
        .protocol_features
        .contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
    assert_eq!(fe.backend_queues, 2);
    assert_eq!(fe.capacity_sectors(), Some((64 << 20) / 512));
    assert_eq!(
        fe.config_u32(12),
        Some(celer_vhost::request::SEG_MAX as u32)
    );
    assert_eq!(fe.config_u32(20), Some(512)); // blk_size
                                              // Topology: 4 KiB physical blocks (2^3 logical ones), min I/O 4 KiB,
                                              // optimal 128 KiB, discards aligned to physical blocks.
    assert!(fe.features & (1 << VIRTIO_BLK_F_TOPOLOGY) != 0);
    assert_eq!(fe.config_u16(24).map(|v| v & 0xff), Some(3)); // physical_block_exp
    assert_eq!(fe.config_u16(26), Some(8)); // min_io_size
    assert_eq!(fe.config_u32(28), Some(256)); // opt_io_size
    assert_eq!(fe.config_u32(44), Some(8)); // discard_sector_alignment
    assert_eq!(fe.config_u16(34), Some(2)); // num_queues
    assert_eq!(fe.config_u32(40), Some(1)); // max_discard_seg
    assert!(fe.config_u32(36).unwrap() > 0); // max_discard_sectors
    assert!(fe.config_u32(48).unwrap() > 0); // max_write_zeroes_sectors
    drop(fe);
    server.join();
}

/// The guest is told the truth about the write cache: FLUSH is offered for
/// a device whose completed writes may still be lost (write back), not for
/// one whose writes are durable at completion (write through).
#[test]
fn the_write_cache_is_advertised_as_the_device_has_it() {
    struct Durable(NullDevice);
    impl BlockDevice for Durable {
        fn info(&self) -> celer_device::DeviceInfo {
            self.0.info()
        }
        fn open_queue(
            &self,
            index: usize,
        ) -> Result<Box<dyn celer_device::DeviceQueue>, celer_device::IoError> {
            self.0.open_queue(index)
        }
        fn writes_durable_on_completion(&self) -> bool {
            true
        }
    }
    for (device, flush) in [
        (
            Arc::new(NullDevice::new(64 << 20, false, false)) as Arc<dyn BlockDevice>,
            true,
        ),
        (
            Arc::new(Durable(NullDevice::new(64 << 20, false, false))),
            false,
        ),
    ] {
        let server = Server::start(device, 1, 1);
        let fe = server.connect(1);
        assert_eq!(
            fe.features & (1 << VIRTIO_BLK_F_FLUSH) != 0,
            flush,
            "FLUSH offered: {}",
            !flush
        );
        drop(fe);
        server.join();
    }
}

/// Online resize at the protocol level: `grow` sends a config change on the
/// back-end request channel, the front end re-reads the config space and
/// finds the new capacity; shrinking and odd sizes are refused.
#[test]
fn growing_the_disk_notifies_the_front_end() {
    let server = Server::start(Arc::new(NullDevice::new(64 << 20, false, false)), 1, 1);
    let mut fe = server.connect(1);
    assert!(fe
        .protocol_features
        .contains(VhostUserProtocolFeatures::BACKEND_REQ));
    assert_eq!(fe.capacity_sectors(), Some((64 << 20) / 512));
    let backend = server.backend.clone();
    // The notification waits for the front end's ack: send it from another
    // thread while this one plays the front end.
    let grower = std::thread::spawn(move || backend.grow(96 << 20));
    let changes = fe.wait_config_change(Duration::from_secs(10)).unwrap();
    if changes != 1 {
        // Closing the front end ends the back end's wait for an ack.
        drop(fe);
        panic!(
            "no config change message within 10 s; grow returned {:?}",
            grower.join()
        );
    }
    assert!(
        grower.join().unwrap().expect("grow"),
        "front end not notified"
    );
    fe.refresh_config().unwrap();
    assert_eq!(fe.capacity_sectors(), Some((96 << 20) / 512));
    assert_eq!(server.backend.capacity_bytes(), 96 << 20);
    // Same size: nothing to tell. Smaller or unaligned: refused, unchanged.
    assert!(!server.backend.grow(96 << 20).unwrap());
    let e = server.backend.grow(32 << 20).unwrap_err();
    assert!(e.to_string().contains("cannot shrink"), "{e}");
    let e = server.backend.grow((96 << 20) + 100).unwrap_err();
    assert!(e.to_string().contains("not a multiple"), "{e}");
    fe.refresh_config().unwrap();
    assert_eq!(fe.capacity_sectors(), Some((96 << 20) / 512));
    drop(fe);
    server.join();
}

#[test]
fn every_request_type_on_a_file_device() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(file_device(dir.path(), false), 1, 1);
    let fe = server.connect(1);
    let mut qs = fe.queues().unwrap();
    let q = &mut qs[0];
    let mem = q.mem();

    // OUT then IN: the data comes back.
    let data = pattern(7, 8192);
    mem.write(q.data_off(0), &data);
    assert_eq!(q.request(0, req_type::OUT, 64, 8192).unwrap(), (S_OK, 1));
    mem.write(q.data_off(1), &[0u8; 8192]);
    assert_eq!(q.request(1, req_type::IN, 64, 8192).unwrap(), (S_OK, 8193));
    let mut back = vec![0u8; 8192];
    mem.read(q.data_off(1), &mut back);
    assert_eq!(back, data);

    // FLUSH.
    assert_eq!(q.request(2, req_type::FLUSH, 0, 0).unwrap(), (S_OK, 1));

    // GET_ID: the serial (file name), NUL padded to 20 bytes.
    let (status, len) = q.request(3, req_type::GET_ID, 0, 20).unwrap();
    assert_eq!((status, len), (S_OK, 21));
    let mut id = [0u8; 20];
    mem.read(q.data_off(3), &mut id);
    assert_eq!(&id[..8], b"disk.img");
    assert!(id[8..].iter().all(|&b| b == 0));

    // WRITE_ZEROES over the first 4 KiB of the data, then read it back.
    let mut range = [0u8; 16];
    range[0..8].copy_from_slice(&64u64.to_le_bytes());
    range[8..12].copy_from_slice(&8u32.to_le_bytes());
    mem.write(q.data_off(4), &range);
    assert_eq!(
        q.request(4, req_type::WRITE_ZEROES, 0, 16).unwrap(),
        (S_OK, 1)
    );
    assert_eq!(q.request(1, req_type::IN, 64, 8192).unwrap(), (S_OK, 8193));
    mem.read(q.data_off(1), &mut back);
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert_eq!(back[4096..], data[4096..]);

    // DISCARD.
    range[0..8].copy_from_slice(&0u64.to_le_bytes());
    range[8..12].copy_from_slice(&2048u32.to_le_bytes());
    mem.write(q.data_off(5), &range);
    assert_eq!(q.request(5, req_type::DISCARD, 0, 16).unwrap(), (S_OK, 1));

    drop(qs);
    drop(fe);
    server.join();
}

#[test]
fn read_only_volume_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(file_device(dir.path(), true), 1, 1);
    let fe = server.connect(1);
    assert!(fe.features & (1 << VIRTIO_BLK_F_RO) != 0);
    assert_eq!(fe.features & (1 << VIRTIO_BLK_F_DISCARD), 0);
    let mut qs = fe.queues().unwrap();
    let q = &mut qs[0];
    assert_eq!(q.request(0, req_type::OUT, 0, 4096).unwrap().0, S_IOERR);
    let mut range = [0u8; 16];
    range[8..12].copy_from_slice(&8u32.to_le_bytes());
    q.mem().write(q.data_off(1), &range);
    assert_eq!(
        q.request(1, req_type::WRITE_ZEROES, 0, 16).unwrap().0,
        S_IOERR
    );
    assert_eq!(q.request(2, req_type::IN, 0, 4096).unwrap().0, S_OK);
    assert_eq!(q.request(3, req_type::FLUSH, 0, 0).unwrap().0, S_OK);
    drop(qs);
    drop(fe);
    server.join();
}

#[test]
fn two_queues_in_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(file_device(dir.path(), false), 2, 1);
    let fe = server.connect(2);
    let mut qs = fe.queues().unwrap();
    std::thread::scope(|s| {
        for (qi, q) in qs.iter_mut().enumerate() {
            s.spawn(move || {
                for round in 0..50u64 {
                    let slot = (round % 8) as usize;
                    let sector = (qi as u64 * 4096) + round * 8;
                    let data = pattern((qi as u8) * 100 + round as u8, 4096);
                    q.mem().write(q.data_off(slot), &data);
                    assert_eq!(
                        q.request(slot, req_type::OUT, sector, 4096).unwrap().0,
                        S_OK
                    );
                    q.mem().write(q.data_off(slot + 8), &[0u8; 4096]);
                    assert_eq!(
                        q.request(slot + 8, req_type::IN, sector, 4096).unwrap().0,
                        S_OK
                    );
                    let mut back = vec![0u8; 4096];
                    q.mem().read(q.data_off(slot + 8), &mut back);
                    assert_eq!(back, data, "queue {qi} round {round}");
                }
            });
        }
    });
    let stats = server.backend.stats();
    assert!(
        stats[0].requests >= 100 && stats[1].requests >= 100,
        "{stats:?}"
    );
    drop(qs);
    drop(fe);
    server.join();
}

#[test]
fn deep_queue_many_in_flight() {
    let server = Server::start(Arc::new(NullDevice::new(64 << 20, false, false)), 1, 1);
    let fe = server.connect(1);
    let mut qs = fe.queues().unwrap();
    let q = &mut qs[0];
    for round in 0..20u64 {
        for slot in 0..16 {
            let head = q.prepare(slot, req_type::IN, round * 128 + slot as u64 * 8, 4096);
            q.publish(head);
        }
        q.kick_if_needed().unwrap();
        let used = q.wait_used(16, Duration::from_secs(10));
        assert_eq!(used.len(), 16);
        for (id, len) in used {
            assert_eq!(len, 4097);
            assert_eq!(q.status(id as usize / 3), S_OK);
        }
    }
    drop(qs);
    drop(fe);
    server.join();
}

#[test]
fn bad_requests_get_errors_and_the_back_end_survives() {
    let server = Server::start(Arc::new(NullDevice::new(1 << 20, false, false)), 1, 1);
    let fe = server.connect(1);
    let mut qs = fe.queues().unwrap();
    let q = &mut qs[0];
    let capacity_sectors = (1 << 20) / 512;

    // Out of range sectors, at the end and overflowing.
    assert_eq!(
        q.request(0, req_type::IN, capacity_sectors - 4, 4096)
            .unwrap()
            .0,
        S_IOERR
    );
    assert_eq!(
        q.request(0, req_type::OUT, u64::MAX / 256, 4096).unwrap().0,
        S_IOERR
    );
    // Unknown request type.
    assert_eq!(q.request(1, 0x77, 0, 0).unwrap(), (S_UNSUPP, 1));
    // Unaligned discard length.
    let mut range = [0u8; 16];
    range[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    q.mem().write(q.data_off(2), &range);
    assert_eq!(q.request(2, req_type::DISCARD, 0, 16).unwrap().0, S_IOERR);

    // Data descriptor outside guest memory.
    let head = q.prepare(3, req_type::IN, 0, 4096);
    q.write_desc(
        head + 1,
        RawDesc {
            addr: GUEST_BASE + q.mem().len() as u64 - 512,
            len: 4096,
            flags: DESC_F_NEXT | DESC_F_WRITE,
            next: head + 2,
        },
    );
    assert_eq!(q.submit_head(head).unwrap(), (S_IOERR, 1));

    // Descriptor below guest memory (address 0).
    let head = q.prepare(4, req_type::OUT, 0, 4096);
    q.write_desc(
        head + 1,
        RawDesc {
            addr: 0,
            len: 4096,
            flags: DESC_F_NEXT,
            next: head + 2,
        },
    );
    assert_eq!(q.submit_head(head).unwrap(), (S_IOERR, 1));

    // Chain that is too short: header only, 8 bytes, plus status.
    let head = q.prepare(5, req_type::FLUSH, 0, 0);
    q.write_desc(
        head,
        RawDesc {
            addr: GUEST_BASE + q.data_off(5) as u64,
            len: 8,
            flags: DESC_F_NEXT,
            next: head + 2,
        },
    );
    assert_eq!(q.submit_head(head).unwrap(), (S_IOERR, 1));

    // Status descriptor not writable: no status can be written, used len 0.
    let head = q.prepare(6, req_type::FLUSH, 0, 0);
    q.write_desc(
        head + 2,
        RawDesc {
            addr: GUEST_BASE + q.data_off(6) as u64,
            len: 1,
            flags: 0,
            next: 0,
        },
    );
    let (_, len) = q.submit_head(head).unwrap();
    assert_eq!(len, 0);

    // A chain that loops back on itself ends at the queue size, not forever.
    let head = q.prepare(7, req_type::OUT, 0, 512);
    q.write_desc(
        head + 1,
        RawDesc {
            addr: GUEST_BASE + q.data_off(7) as u64,
            len: 512,
            flags: DESC_F_NEXT,
            next: head,
        },
    );
    let (status, _) = q.submit_head(head).unwrap();
    assert_ne!(status, S_OK);

    // Descriptor index past the queue size.
    let head = q.prepare(8, req_type::IN, 0, 512);
    q.write_desc(
        head + 1,
        RawDesc {
            addr: GUEST_BASE + q.data_off(8) as u64,
            len: 512,
            flags: DESC_F_NEXT | DESC_F_WRITE,
            next: 4000,
        },
    );
    let (status, _) = q.submit_head(head).unwrap();
    assert_ne!(status, S_OK);

    // Still serving good requests.
    assert_eq!(q.request(9, req_type::IN, 0, 4096).unwrap(), (S_OK, 4097));
    assert!(server.backend.stats()[0].bad_requests >= 8);
    drop(qs);
    drop(fe);
    server.join();
}

#[test]
fn reconnects_after_disconnect_and_survives_garbage_messages() {
    let server = Server::start(Arc::new(NullDevice::new(1 << 20, false, false)), 1, 3);
    {
        let fe = server.connect(1);
        let mut qs = fe.queues().unwrap();
        assert_eq!(qs[0].request(0, req_type::IN, 0, 4096).unwrap().0, S_OK);
    }
    // A peer that sends garbage only ends its own connection.
    {
        server.wait_listening();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = loop {
            match UnixStream::connect(&server.socket) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("{e}"),
            }
        };
        // Header: request 0xdead, flags 1 (version), size 0x7fffffff.
        let mut msg = Vec::new();
        msg.extend_from_slice(&0xdeadu32.to_le_bytes());
        msg.extend_from_slice(&1u32.to_le_bytes());
        msg.extend_from_slice(&0x7fff_ffffu32.to_le_bytes());
        msg.extend_from_slice(&[0xa5; 64]);
        let _ = s.write_all(&msg);
        std::thread::sleep(Duration::from_millis(100));
    }
    // Wait for the next listener; the old socket file is replaced.
    std::thread::sleep(Duration::from_millis(200));
    {
        let fe = server.connect(1);
        let mut qs = fe.queues().unwrap();
        for slot in 0..4 {
            assert_eq!(qs[0].request(slot, req_type::OUT, 8, 4096).unwrap().0, S_OK);
        }
    }
    server.join();
}

#[test]
fn bogus_vring_messages_are_refused_without_harm() {
    let server = Server::start(Arc::new(NullDevice::new(1 << 20, false, false)), 1, 2);
    {
        let mut fe = server.connect(1);
        let vu = fe.vhost_user();
        // Queue index past the queues the back end has.
        assert!(vu.set_vring_num(7, 256).is_err());
        assert!(vu.set_vring_enable(9, true).is_err());
    }
    {
        let mut fe = server.connect(1);
        // Ring addresses outside every memory region.
        let r = fe.vhost_user().set_vring_addr(
            0,
            &vhost::VringConfigData {
                queue_max_size: 256,
                queue_size: 256,
                flags: 0,
                desc_table_addr: 0xdead_0000_0000,
                used_ring_addr: 0xdead_0001_0000,
                avail_ring_addr: 0xdead_0002_0000,
                log_addr: None,
            },
        );
        assert!(r.is_err(), "ring outside guest memory must be refused");
    }
    server.join();
}

/// The thread that serves a queue, as seen from inside the device: its id
/// and the CPUs it may run on, recorded at each submit. It measures the
/// back end's own workers, whatever else runs in the test process (other
/// tests under `cargo test`).
#[derive(Clone, Default, Debug, PartialEq)]
struct Seen {
    tid: i32,
    cpus: Vec<usize>,
}

/// A NullDevice whose queues record which thread submits to them.
struct Probe {
    inner: NullDevice,
    /// Per queue index, the last submitting thread.
    seen: Arc<std::sync::Mutex<Vec<Seen>>>,
}

impl Probe {
    fn new(queues: usize) -> Probe {
        Probe {
            inner: NullDevice::new(1 << 20, false, false),
            seen: Arc::new(std::sync::Mutex::new(vec![Seen::default(); queues])),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

struct ProbeQueue {
    inner: Box<dyn celer_device::DeviceQueue>,
    index: usize,
    seen: Arc<std::sync::Mutex<Vec<Seen>>>,
}

/// The calling thread's id and allowed CPUs.
fn this_thread() -> Seen {
    // SAFETY: sched_getaffinity writes into the zeroed set we pass; gettid
    // has no arguments.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
            0
        );
        let cpus = (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect();
        Seen {
            tid: libc::gettid(),
            cpus,
        }
    }
}

impl BlockDevice for Probe {
    fn info(&self) -> celer_device::DeviceInfo {
        self.inner.info()
    }
    fn open_queue(
        &self,
        index: usize,
    ) -> Result<Box<dyn celer_device::DeviceQueue>, celer_device::IoError> {
        Ok(Box::new(ProbeQueue {
            inner: self.inner.open_queue(index)?,
            index,
            seen: self.seen.clone(),
        }))
    }
}

impl celer_device::DeviceQueue for ProbeQueue {
    unsafe fn submit(
        &mut self,
        req: &celer_device::IoRequest<'_>,
    ) -> Result<(), celer_device::IoError> {
        self.seen.lock().unwrap()[self.index] = this_thread();
        // SAFETY: the caller's contract, passed on.
        unsafe { self.inner.submit(req) }
    }
    fn poll(&mut self, done: &mut dyn FnMut(celer_device::IoCompletion)) -> usize {
        self.inner.poll(done)
    }
    fn inflight(&self) -> usize {
        self.inner.inflight()
    }
    fn inflight_max(&self) -> usize {
        self.inner.inflight_max()
    }
    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.completion_fd()
    }
}

/// CPUs this process may use (the pinning test needs two).
fn allowed_cpus() -> Vec<usize> {
    this_thread().cpus
}

/// Workers are pinned on every connection (each brings new threads), queue
/// `i` to `cpus[i]`: each queue's requests are submitted from a thread
/// allowed on exactly its CPU. With two CPUs the two queues get different
/// ones, so a wrong queue-to-CPU mapping fails.
#[test]
fn workers_are_pinned_on_every_connection() {
    let allowed = allowed_cpus();
    // The last two allowed CPUs, in reverse order: queue 0 must not land on
    // the first CPU by accident.
    let cpus: Vec<usize> = allowed.iter().rev().take(2).copied().collect();
    if cpus.len() < 2 {
        assert!(
            std::env::var("CI").is_err(),
            "CI: the pinning test needs two CPUs, this process may use {allowed:?}"
        );
        eprintln!("only one CPU ({allowed:?}): queues mapped to it alone");
    }
    let probe = Arc::new(Probe::new(2));
    let server = Server::start_pinned(probe.clone(), 2, 2, cpus.clone());
    for round in 0..2 {
        let fe = server.connect(2);
        let mut qs = fe.queues().unwrap();
        for q in qs.iter_mut() {
            assert_eq!(q.request(0, req_type::IN, 0, 4096).unwrap().0, S_OK);
        }
        let seen = probe.seen();
        for (i, s) in seen.iter().enumerate() {
            assert_eq!(
                s.cpus,
                vec![cpus[i % cpus.len()]],
                "connection {round}: queue {i} served by thread {} allowed on {:?}, pinned to {cpus:?}",
                s.tid,
                s.cpus
            );
        }
        println!("connection {round}: queue threads {seen:?}");
    }
    server.join();
}

/// CPU time of thread `tid` of this process (its schedstat, ns).
fn thread_cpu(tid: i32) -> Duration {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .unwrap_or_else(|e| panic!("schedstat of thread {tid}: {e}"));
    let ns: u64 = text
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("schedstat: time on CPU");
    Duration::from_nanos(ns)
}

/// An idle back end sleeps: once the poll window after the last request
/// has passed, its queue workers (the threads that served the requests)
/// use no CPU while the front end stays connected. Measured per thread, so
/// other tests in the process do not count.
#[test]
fn idle_workers_use_no_cpu() {
    let probe = Arc::new(Probe::new(2));
    let server = Server::start(probe.clone(), 2, 1);
    let fe = server.connect(2);
    let mut qs = fe.queues().unwrap();
    for q in qs.iter_mut() {
        for i in 0..100 {
            assert_eq!(q.request(i % 8, req_type::IN, 0, 4096).unwrap().0, S_OK);
        }
    }
    let workers: Vec<i32> = probe.seen().iter().map(|s| s.tid).collect();
    // Past the poll window the workers sleep in epoll.
    std::thread::sleep(Duration::from_millis(50));
    let before: Duration = workers.iter().map(|&t| thread_cpu(t)).sum();
    std::thread::sleep(Duration::from_millis(1000));
    let used = workers.iter().map(|&t| thread_cpu(t)).sum::<Duration>() - before;
    println!("idle workers {workers:?} used {used:?} of CPU in 1 s");
    assert!(
        used < Duration::from_millis(20),
        "idle back end used {used:?} of CPU in 1 s"
    );
    drop(qs);
    drop(fe);
    server.join();
}

/// A device with 4096-byte logical blocks (a Celer volume created with
/// `--sector-size 4096`): NullDevice itself accepts any 512-byte multiple.
struct Blocks4k(NullDevice);

impl BlockDevice for Blocks4k {
    fn info(&self) -> celer_device::DeviceInfo {
        celer_device::DeviceInfo {
            block_size_bytes: 4096,
            ..self.0.info()
        }
    }
    fn open_queue(
        &self,
        index: usize,
    ) -> Result<Box<dyn celer_device::DeviceQueue>, celer_device::IoError> {
        self.0.open_queue(index)
    }
}

/// The logical block is the unit of every request: with 4096-byte blocks
/// the config space says so (one logical block per physical one) and the
/// back end refuses a request not aligned to it, whatever the device would
/// take; aligned ones are served.
#[test]
fn requests_are_checked_against_the_logical_block_size() {
    let server = Server::start(
        Arc::new(Blocks4k(NullDevice::new(64 << 20, false, false))),
        1,
        1,
    );
    let fe = server.connect(1);
    assert_eq!(fe.config_u32(20), Some(4096)); // blk_size
    assert_eq!(fe.config_u16(24).map(|v| v & 0xff), Some(0)); // physical_block_exp
    assert_eq!(fe.config_u16(26), Some(1)); // min_io_size
    assert_eq!(fe.config_u32(28), Some(32)); // opt_io_size
    let mut qs = fe.queues().unwrap();
    let q = &mut qs[0];
    assert_eq!(q.request(0, req_type::IN, 8, 4096).unwrap().0, S_OK);
    assert_eq!(q.request(1, req_type::IN, 1, 4096).unwrap().0, S_IOERR);
    assert_eq!(q.request(2, req_type::OUT, 8, 512).unwrap().0, S_IOERR);
    let mut range = [0u8; 16];
    range[0..8].copy_from_slice(&4u64.to_le_bytes());
    range[8..12].copy_from_slice(&8u32.to_le_bytes());
    q.mem().write(q.data_off(3), &range);
    assert_eq!(
        q.request(3, req_type::WRITE_ZEROES, 0, 16).unwrap().0,
        S_IOERR
    );
    assert_eq!(q.request(4, req_type::OUT, 16, 8192).unwrap().0, S_OK);
    drop(qs);
    drop(fe);
    server.join();
}
