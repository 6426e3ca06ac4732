#![allow(dead_code)]
//! A fault-injecting TCP proxy for tests (the kernel here has no netem):
//! every byte between a node and the rest of the cluster passes through
//! one, which can add delay or stall traffic both ways (a partition: the
//! connections stay open, bytes wait, as TCP retransmits would) until healed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
}

struct ProxyState {
    target: SocketAddr,
    stalled: AtomicBool,
    delay_us: AtomicU64,
    stop: AtomicBool,
    /// While set, every byte forwarded is recorded, one stream per
    /// connection and direction (up to RECORD_MAX_BYTES each).
    recording: AtomicBool,
    recorded: Mutex<Vec<Vec<u8>>>,
}

const RECORD_MAX_BYTES: usize = 64 << 20;

impl FaultProxy {
    /// Listens on an ephemeral loopback port and forwards to `target`.
    pub fn start(target: SocketAddr) -> FaultProxy {
        Self::start_on("127.0.0.1:0".parse().expect("addr"), target)
    }

    pub fn start_on(listen: SocketAddr, target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind(listen).expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let state = Arc::new(ProxyState {
            target,
            stalled: AtomicBool::new(false),
            delay_us: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            recording: AtomicBool::new(false),
            recorded: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                if st.stop.load(Ordering::Acquire) {
                    return;
                }
                let Ok(a) = s else { continue };
                let st = st.clone();
                std::thread::spawn(move || {
                    // A partition also keeps new connections from getting through.
                    while st.stalled.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    let Ok(b) = TcpStream::connect(st.target) else {
                        return;
                    };
                    let _ = a.set_nodelay(true);
                    let _ = b.set_nodelay(true);
                    let (a2, b2) = match (a.try_clone(), b.try_clone()) {
                        (Ok(a2), Ok(b2)) => (a2, b2),
                        _ => return,
                    };
                    let st2 = st.clone();
                    std::thread::spawn(move || pump(a, b, st));
                    std::thread::spawn(move || pump(b2, a2, st2));
                });
            }
        });
        FaultProxy { addr, state }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// Stall (true) or heal (false) all traffic through the proxy.
    pub fn partition(&self, on: bool) {
        self.state.stalled.store(on, Ordering::Release);
    }
    /// Delays every chunk of bytes by a random time up to `max`, drawn
    /// per connection: bytes on one connection stay in order, different
    /// connections overtake each other.
    pub fn set_jitter(&self, max: Duration) {
        self.state
            .delay_us
            .store(max.as_micros() as u64, Ordering::Release);
    }
}

impl FaultProxy {
    /// Starts (true) or stops recording the bytes forwarded, both ways.
    pub fn record(&self, on: bool) {
        self.state.recording.store(on, Ordering::Release);
    }
    /// The byte streams recorded so far, one per connection and
    /// direction (and forgets them).
    pub fn take_recorded(&self) -> Vec<Vec<u8>> {
        let mut r = self.state.recorded.lock().expect("recorded");
        r.iter_mut().map(std::mem::take).collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Release);
        self.state.stalled.store(false, Ordering::Release);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(100));
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, st: Arc<ProxyState>) {
    let mut buf = vec![0u8; 256 << 10];
    let stream = {
        let mut r = st.recorded.lock().expect("recorded");
        r.push(Vec::new());
        r.len() - 1
    };
    let mut rng = (&buf as *const _ as u64) | 1;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while st.stalled.load(Ordering::Acquire) {
            if st.stop.load(Ordering::Acquire) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let d = st.delay_us.load(Ordering::Acquire);
        if d > 0 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            std::thread::sleep(Duration::from_micros(rng % d));
        }
        if st.recording.load(Ordering::Acquire) {
            let mut r = st.recorded.lock().expect("recorded");
            if r[stream].len() + n <= RECORD_MAX_BYTES {
                r[stream].extend_from_slice(&buf[..n]);
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}
