//! Shared by the NBD tests: an in-memory device whose completions come back
//! out of order, a small NBD client, and server start-up.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use celer_device::{
    check_request, BlockDevice, DeviceInfo, DeviceQueue, IoCompletion, IoError, IoOp, IoRequest,
};
use celer_nbd::{NbdConfig, Server};

/// A memory-backed device. Its queues hold completions back and hand them
/// over newest first once `batch` are waiting (or after a few idle polls),
/// so a front end sees completions out of submission order.
pub struct MemDevice {
    pub info: DeviceInfo,
    pub data: Arc<Mutex<Vec<u8>>>,
    pub batch: usize,
    pub inflight_max: usize,
    /// Flushes submitted to any queue.
    pub flushes: Arc<AtomicU64>,
    /// What `flush_is_device_wide` says.
    pub device_wide: bool,
    /// A read covering this offset fails with a checksum error naming it.
    pub fail_read_at: Option<u64>,
}

impl MemDevice {
    pub fn new(size_bytes: u64, read_only: bool) -> MemDevice {
        MemDevice {
            info: DeviceInfo {
                size_bytes,
                block_size_bytes: 512,
                read_only,
                supports_discard: true,
                supports_write_zeroes: true,
                max_request_bytes: 1 << 20,
                serial: "mem".into(),
            },
            data: Arc::new(Mutex::new(vec![0u8; size_bytes as usize])),
            batch: 4,
            inflight_max: 8,
            flushes: Arc::new(AtomicU64::new(0)),
            device_wide: false,
            fail_read_at: None,
        }
    }
}

impl BlockDevice for MemDevice {
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }
    fn open_queue(&self, _index: usize) -> Result<Box<dyn DeviceQueue>, IoError> {
        Ok(Box::new(MemQueue {
            info: self.info.clone(),
            data: self.data.clone(),
            batch: self.batch,
            inflight_max: self.inflight_max,
            held: Vec::new(),
            idle_polls: 0,
            flushes: self.flushes.clone(),
            fail_read_at: self.fail_read_at,
        }))
    }
    fn flush_is_device_wide(&self) -> bool {
        self.device_wide
    }
    /// 4 KiB blocks of zeroes are holes (a thin device's view).
    fn allocation(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        out: &mut Vec<celer_device::Extent>,
    ) -> Result<(), IoError> {
        let data = self.data.lock().expect("lock");
        let mut at = offset_bytes;
        let end = offset_bytes + len_bytes;
        while at < end {
            let next = ((at / 4096 + 1) * 4096).min(end);
            let zero = data[at as usize..next as usize].iter().all(|&b| b == 0);
            let a = if zero {
                celer_device::Allocation::Hole
            } else {
                celer_device::Allocation::Data
            };
            celer_device::push_extent(out, next - at, a);
            at = next;
        }
        Ok(())
    }
}

struct MemQueue {
    info: DeviceInfo,
    data: Arc<Mutex<Vec<u8>>>,
    batch: usize,
    inflight_max: usize,
    held: Vec<IoCompletion>,
    idle_polls: u32,
    flushes: Arc<AtomicU64>,
    fail_read_at: Option<u64>,
}

impl DeviceQueue for MemQueue {
    unsafe fn submit(&mut self, req: &IoRequest<'_>) -> Result<(), IoError> {
        check_request(&self.info, req)?;
        assert!(
            req.len_bytes <= self.info.max_request_bytes,
            "front end sent {} bytes, over the device maximum",
            req.len_bytes
        );
        if self.held.len() >= self.inflight_max {
            return Err(IoError::QueueFull {
                inflight_max: self.inflight_max,
            });
        }
        if let Some(bad) = self.fail_read_at {
            let len: u64 = req.segments.iter().map(|s| s.len as u64).sum();
            if req.op == IoOp::Read && (req.offset_bytes..req.offset_bytes + len).contains(&bad) {
                self.held.push(IoCompletion {
                    tag: req.tag,
                    result: Err(IoError::Checksum { offset_bytes: bad }),
                });
                return Ok(());
            }
        }
        let mut data = self.data.lock().expect("lock");
        let mut off = req.offset_bytes as usize;
        match req.op {
            IoOp::Read | IoOp::Write => {
                for s in req.segments {
                    // SAFETY: the submit contract: the segment is valid for its length.
                    let buf = unsafe { std::slice::from_raw_parts_mut(s.addr, s.len) };
                    if req.op == IoOp::Read {
                        buf.copy_from_slice(&data[off..off + s.len]);
                    } else {
                        data[off..off + s.len].copy_from_slice(buf);
                    }
                    off += s.len;
                }
            }
            IoOp::Discard | IoOp::WriteZeroes => {
                data[off..off + req.len_bytes as usize].fill(0);
            }
            IoOp::Flush => {
                self.flushes.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.held.push(IoCompletion {
            tag: req.tag,
            result: Ok(()),
        });
        Ok(())
    }
    fn poll(&mut self, done: &mut dyn FnMut(IoCompletion)) -> usize {
        if self.held.is_empty() {
            return 0;
        }
        self.idle_polls += 1;
        if self.held.len() < self.batch && self.idle_polls < 5 {
            return 0;
        }
        self.idle_polls = 0;
        let n = self.held.len();
        while let Some(c) = self.held.pop() {
            done(c);
        }
        n
    }
    fn inflight(&self) -> usize {
        self.held.len()
    }
    fn inflight_max(&self) -> usize {
        self.inflight_max
    }
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }
}

pub const EXPORT: &str = "celer";

/// Starts a server on a Unix socket (and TCP on 127.0.0.1:0 when `tcp`);
/// returns the socket path, the TCP address and the server thread.
pub fn start(
    dir: &Path,
    device: Arc<dyn BlockDevice>,
    read_only: bool,
    tcp: bool,
    connections_max: Option<usize>,
) -> (
    std::path::PathBuf,
    Option<std::net::SocketAddr>,
    std::thread::JoinHandle<()>,
) {
    let socket = dir.join("nbd.sock");
    let config = NbdConfig {
        addr: tcp.then(|| "127.0.0.1:0".parse().expect("addr")),
        socket: Some(socket.clone()),
        export_name: EXPORT.into(),
        read_only,
        connections_max,
        limits: Default::default(),
        tls: None,
    };
    let server = Server::bind(config, device).expect("bind");
    let addr = server.tcp_addr();
    let t = std::thread::spawn(move || server.run().expect("server run"));
    (socket, addr, t)
}

// Wire constants the client needs.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const FLAG_DF: u16 = 1 << 2;
pub const FLAG_REQ_ONE: u16 = 1 << 3;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR: u16 = (1 << 15) + 1;
pub const CHUNK_ERROR_OFFSET: u16 = (1 << 15) + 2;
pub const EIO: u32 = 5;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const FLAG_FUA: u16 = 1;
pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;

pub trait Sock: Read + Write {}
impl<T: Read + Write> Sock for T {}

/// What OPT_GO/OPT_INFO told us.
#[derive(Debug, Default)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub block_sizes: Option<(u32, u32, u32)>,
}

/// A minimal NBD client for tests: panics on anything unexpected.
pub struct Client {
    pub s: Box<dyn Sock>,
    /// Handle → read length, for replies that carry data.
    reads: HashMap<u64, usize>,
}

impl Client {
    /// Connects and does the greeting (fixed newstyle, no zeroes).
    pub fn unix(path: &Path) -> Client {
        Self::greet(Box::new(UnixStream::connect(path).expect("connect")))
    }

    pub fn tcp(addr: std::net::SocketAddr) -> Client {
        Self::greet(Box::new(
            std::net::TcpStream::connect(addr).expect("connect"),
        ))
    }

    pub fn greet(mut s: Box<dyn Sock>) -> Client {
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).expect("greeting");
        assert_eq!(&hello[0..8], b"NBDMAGIC");
        assert_eq!(
            u64::from_be_bytes(hello[8..16].try_into().unwrap()),
            IHAVEOPT
        );
        assert_eq!(
            u16::from_be_bytes([hello[16], hello[17]]),
            3,
            "FIXED_NEWSTYLE|NO_ZEROES"
        );
        s.write_all(&3u32.to_be_bytes()).expect("client flags");
        Client {
            s,
            reads: HashMap::new(),
        }
    }

    pub fn send_opt(&mut self, opt: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).expect("send option");
    }

    /// One option reply: (option, type, data).
    pub fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("option reply");
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).expect("option reply data");
        (opt, typ, d)
    }

    pub fn info_request(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// OPT_INFO (6) or OPT_GO (7); Err(reply type) if refused.
    pub fn info_or_go(&mut self, opt: u32, name: &str) -> Result<ExportInfo, u32> {
        self.send_opt(opt, &Self::info_request(name, &[3]));
        let mut info = ExportInfo::default();
        loop {
            let (o, typ, d) = self.opt_reply();
            assert_eq!(o, opt);
            match typ {
                1 => return Ok(info),
                3 => match u16::from_be_bytes([d[0], d[1]]) {
                    0 => {
                        info.size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                        info.flags = u16::from_be_bytes([d[10], d[11]]);
                    }
                    3 => {
                        let u = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
                        info.block_sizes = Some((u(2), u(6), u(10)));
                    }
                    other => panic!("unexpected info type {other}"),
                },
                t if t & (1 << 31) != 0 => return Err(t),
                t => panic!("unexpected reply type {t}"),
            }
        }
    }

    pub fn go(&mut self) -> ExportInfo {
        self.info_or_go(7, EXPORT).expect("OPT_GO")
    }

    pub fn send(&mut self, cmd: u16, flags: u16, handle: u64, offset: u64, len: u32, data: &[u8]) {
        let mut m = Vec::with_capacity(28 + data.len());
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&cmd.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).expect("send request");
        if cmd == CMD_READ {
            self.reads.insert(handle, len as usize);
        }
    }

    /// One reply: (handle, error, data for a successful read).
    pub fn reply(&mut self) -> (u64, u32, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("reply header");
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), REPLY_MAGIC);
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = self.reads.remove(&handle).unwrap_or(0);
        let mut d = Vec::new();
        if err == 0 && len > 0 {
            d = vec![0u8; len];
            self.s.read_exact(&mut d).expect("read reply data");
        }
        (handle, err, d)
    }

    /// Sends one request and waits for its reply; returns (error, data).
    pub fn call(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> (u32, Vec<u8>) {
        self.send(cmd, flags, 42, offset, len, data);
        let (h, err, d) = self.reply();
        assert_eq!(h, 42);
        (err, d)
    }

    /// OPT_STRUCTURED_REPLY; panics unless acknowledged.
    pub fn structured_replies(&mut self) {
        self.send_opt(8, &[]);
        assert_eq!(
            self.opt_reply(),
            (8, 1, vec![]),
            "STRUCTURED_REPLY acknowledged"
        );
    }

    /// OPT_LIST_META_CONTEXT (9) or OPT_SET_META_CONTEXT (10) for the
    /// export with `queries`: the (id, name) replies, or Err(error type).
    pub fn meta_context(&mut self, opt: u32, queries: &[&str]) -> Result<Vec<(u32, String)>, u32> {
        let mut d = Vec::new();
        d.extend_from_slice(&(EXPORT.len() as u32).to_be_bytes());
        d.extend_from_slice(EXPORT.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        self.send_opt(opt, &d);
        let mut contexts = Vec::new();
        loop {
            let (o, typ, d) = self.opt_reply();
            assert_eq!(o, opt);
            match typ {
                1 => return Ok(contexts),
                4 => contexts.push((
                    u32::from_be_bytes(d[0..4].try_into().unwrap()),
                    String::from_utf8(d[4..].to_vec()).expect("utf-8 name"),
                )),
                t if t & (1 << 31) != 0 => return Err(t),
                t => panic!("unexpected reply type {t}"),
            }
        }
    }

    /// One structured reply chunk: (flags, type, handle, payload).
    pub fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("chunk header");
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            STRUCTURED_REPLY_MAGIC,
            "a structured reply chunk"
        );
        let flags = u16::from_be_bytes([h[4], h[5]]);
        let typ = u16::from_be_bytes([h[6], h[7]]);
        let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).expect("chunk payload");
        (flags, typ, handle, d)
    }

    /// Every chunk of one structured reply, up to the one marked DONE
    /// (which must be the last, and only the last).
    pub fn chunks(&mut self, handle: u64) -> Vec<(u16, Vec<u8>)> {
        let mut all = Vec::new();
        loop {
            let (flags, typ, h, d) = self.chunk();
            assert_eq!(h, handle, "chunk of another request");
            all.push((typ, d));
            if flags & 1 != 0 {
                return all;
            }
        }
    }

    /// True when the server has closed the connection.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

/// Deterministic bytes for a (seed, offset) pair.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[0] ^ seed)
        .collect()
}

/// A TCP connection to `to` whose source address is `from`.
pub fn connect_from(from: std::net::Ipv4Addr, to: std::net::SocketAddr) -> std::net::TcpStream {
    let std::net::SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    let sockaddr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns (the
    // TcpStream closes it), with sockaddr_in values that outlive the calls.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let src = sockaddr(from, 0);
        let rc = libc::bind(fd, &src as *const _ as *const libc::sockaddr, len);
        assert_eq!(rc, 0, "bind {from}: {}", std::io::Error::last_os_error());
        let dst = sockaddr(*to.ip(), to.port());
        let rc = libc::connect(fd, &dst as *const _ as *const libc::sockaddr, len);
        assert_eq!(rc, 0, "connect {to}: {}", std::io::Error::last_os_error());
        stream
    }
}
