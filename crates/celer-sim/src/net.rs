//! A simulated network and clock for the real node core
//! ([`celer_node::net::Net`]), and for the simulator's clients.
//!
//! A connection is a pipe of two byte streams, each with TCP's promises
//! and nothing more: bytes arrive in order, whole or not at all, but cut
//! anywhere (a write takes a random share of what it is given; a read
//! returns a random share of what arrived, spread over the caller's
//! buffers as `readv` does), each piece after a random delay of simulated
//! time. A connection can be reset (both ends get `ConnectionReset`),
//! which is how the simulator models a crashed process, a cut cable or a
//! lost segment that TCP gave up on. Time is simulated microseconds, moved
//! by the simulator only.
//!
//! Everything lives in one [`World`] behind `Rc<RefCell<..>>`: one thread,
//! no locks, and the same seed gives the same bytes in the same order.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::io::{self, IoSliceMut, Read, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Bytes a direction holds unread (sent and in flight, or arrived): a
/// writer that fills it gets `WouldBlock`, as with a full socket buffer.
const PIPE_BYTES: usize = 256 << 10;
/// Wall-clock milliseconds at simulated time zero (capabilities and the
/// version clock need a plausible date).
pub const UNIX_MS_AT_ZERO: u64 = 1_790_000_000_000;

/// How the network behaves.
#[derive(Clone, Copy, Debug)]
pub struct NetConfig {
    /// One-way delay of a piece, uniformly in this range (µs).
    pub delay_us: (u64, u64),
}

/// The simulated network and clock.
pub struct World {
    /// Simulated time (µs).
    pub now_us: u64,
    base: Instant,
    rng: StdRng,
    cfg: NetConfig,
    pipes: Vec<Pipe>,
    /// When the front piece of a direction arrives: (time, pipe, side), at
    /// least one entry per direction with pieces in flight. An entry may
    /// be stale (its piece arrived, was held up, or its pipe was reset):
    /// it then costs one look, and [`World::next_arrival`] may name a time
    /// at which nothing arrives.
    arrivals: BinaryHeap<Reverse<(u64, usize, usize)>>,
    /// Bytes moved end to end.
    pub bytes: u64,
    pub resets: u64,
    /// Connections a node core opened (`Net::connect`), for the simulator
    /// to hand to the listener at the address: (address, listener's end).
    pub accepts: VecDeque<(SocketAddr, SimStream)>,
}

#[derive(Default)]
struct Pipe {
    /// `dirs[s]`: the bytes side `s` writes and side `1 - s` reads.
    dirs: [Dir; 2],
    reset: bool,
}

#[derive(Default)]
struct Dir {
    /// Pieces in flight: (arrival time, bytes).
    flight: VecDeque<(u64, Vec<u8>)>,
    arrived: VecDeque<u8>,
    /// Bytes in flight and arrived.
    held: usize,
    /// The writer's end was dropped: the reader sees EOF once it read all.
    closed: bool,
    /// Arrival time of the last piece (pieces never overtake).
    last_at: u64,
}

impl World {
    pub fn new(seed: u64, cfg: NetConfig) -> Rc<RefCell<World>> {
        Rc::new(RefCell::new(World {
            now_us: 0,
            base: Instant::now(),
            rng: StdRng::seed_from_u64(seed),
            cfg,
            pipes: Vec::new(),
            arrivals: BinaryHeap::new(),
            bytes: 0,
            resets: 0,
            accepts: VecDeque::new(),
        }))
    }

    /// A new connection: its two ends (side 0, side 1).
    pub fn pipe(world: &Rc<RefCell<World>>) -> (SimStream, SimStream) {
        let mut w = world.borrow_mut();
        w.pipes.push(Pipe::default());
        let pipe = w.pipes.len() - 1;
        let end = |side| SimStream {
            world: world.clone(),
            pipe,
            side,
        };
        (end(0), end(1))
    }

    /// Simulated time as an `Instant` (for the node core's timers).
    pub fn instant(&self) -> Instant {
        self.base + Duration::from_micros(self.now_us)
    }

    pub fn unix_ms(&self) -> u64 {
        UNIX_MS_AT_ZERO + self.now_us / 1000
    }

    /// Pieces due by now arrive.
    pub fn deliver(&mut self) {
        let now = self.now_us;
        while let Some(&Reverse((at, pipe, side))) = self.arrivals.peek() {
            if at > now {
                break;
            }
            self.arrivals.pop();
            let d = &mut self.pipes[pipe].dirs[side];
            while d.flight.front().is_some_and(|(at, _)| *at <= now) {
                if let Some((_, bytes)) = d.flight.pop_front() {
                    d.arrived.extend(bytes);
                }
            }
            if let Some(&(next, _)) = d.flight.front() {
                self.arrivals.push(Reverse((next, pipe, side)));
            }
        }
    }

    /// The earliest arrival still in flight (or a stale entry's time,
    /// which is earlier: the caller looks once more for nothing).
    pub fn next_arrival(&self) -> Option<u64> {
        self.arrivals.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Resets a connection: both ends fail from now on.
    pub fn reset(&mut self, pipe: usize) {
        if let Some(p) = self.pipes.get_mut(pipe) {
            if !p.reset {
                p.reset = true;
                p.dirs = Default::default();
                self.resets += 1;
            }
        }
    }

    /// Holds up what is in flight on `pipe`, both ways, by `extra_us` (and
    /// what is sent after it: pieces never overtake): a connection that
    /// stalls, retransmitting, while its ends still hold it.
    pub fn stall(&mut self, pipe: usize, extra_us: u64) {
        let now = self.now_us;
        if let Some(p) = self.pipes.get_mut(pipe) {
            for (side, d) in p.dirs.iter_mut().enumerate() {
                for piece in &mut d.flight {
                    piece.0 += extra_us;
                }
                d.last_at = d.last_at.max(now) + extra_us;
                if let Some(&(at, _)) = d.flight.front() {
                    self.arrivals.push(Reverse((at, pipe, side)));
                }
            }
        }
    }

    /// Whether side `side` of `pipe` has something to read (bytes, EOF or
    /// a reset).
    pub fn readable(&self, pipe: usize, side: usize) -> bool {
        let p = &self.pipes[pipe];
        let d = &p.dirs[1 - side];
        p.reset || !d.arrived.is_empty() || (d.closed && d.flight.is_empty())
    }

    /// Whether side `side` of `pipe` may write (room, or a reset to learn).
    pub fn writable(&self, pipe: usize, side: usize) -> bool {
        let p = &self.pipes[pipe];
        p.reset || p.dirs[side].held < PIPE_BYTES
    }

    pub fn is_reset(&self, pipe: usize) -> bool {
        self.pipes[pipe].reset
    }

    /// A random number from the network's own stream.
    pub fn rand_below(&mut self, n: u64) -> u64 {
        self.rng.gen_range(0..n.max(1))
    }
}

/// One end of a simulated connection.
pub struct SimStream {
    world: Rc<RefCell<World>>,
    pub pipe: usize,
    pub side: usize,
}

impl SimStream {
    fn read_into(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let mut w = self.world.borrow_mut();
        let w = &mut *w;
        let p = &mut w.pipes[self.pipe];
        if p.reset {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        let d = &mut p.dirs[1 - self.side];
        if d.arrived.is_empty() {
            if d.closed && d.flight.is_empty() {
                return Ok(0);
            }
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let room: usize = bufs.iter().map(|b| b.len()).sum();
        if room == 0 {
            return Ok(0);
        }
        // A random share of what arrived (at least one byte).
        let avail = d.arrived.len().min(room);
        let n = if w.rng.gen_bool(0.7) {
            avail
        } else {
            w.rng.gen_range(1..=avail)
        };
        let mut left = n;
        for b in bufs.iter_mut() {
            if left == 0 {
                break;
            }
            let k = left.min(b.len());
            // Both halves of the ring when it wraps.
            d.arrived.read_exact(&mut b[..k])?;
            left -= k;
        }
        d.held -= n;
        Ok(n)
    }
}

impl Read for SimStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_into(&mut [IoSliceMut::new(buf)])
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        self.read_into(bufs)
    }
}

impl Write for SimStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut w = self.world.borrow_mut();
        let w = &mut *w;
        let now = w.now_us;
        let (lo, hi) = w.cfg.delay_us;
        let p = &mut w.pipes[self.pipe];
        if p.reset {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        let d = &mut p.dirs[self.side];
        if d.closed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let room = PIPE_BYTES - d.held;
        if room == 0 || buf.is_empty() {
            return if buf.is_empty() {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let avail = buf.len().min(room);
        // A random share of it (a short write), sent as one or two pieces.
        let n = if w.rng.gen_bool(0.8) {
            avail
        } else {
            w.rng.gen_range(1..=avail)
        };
        let cut = if n > 1 && w.rng.gen_bool(0.3) {
            w.rng.gen_range(1..n)
        } else {
            n
        };
        for piece in [&buf[..cut], &buf[cut..n]] {
            if piece.is_empty() {
                continue;
            }
            let at = (now + w.rng.gen_range(lo..=hi)).max(d.last_at);
            d.last_at = at;
            if d.flight.is_empty() {
                w.arrivals.push(Reverse((at, self.pipe, self.side)));
            }
            d.flight.push_back((at, piece.to_vec()));
        }
        d.held += n;
        w.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SimStream {
    fn drop(&mut self) {
        if let Ok(mut w) = self.world.try_borrow_mut() {
            if let Some(p) = w.pipes.get_mut(self.pipe) {
                p.dirs[self.side].closed = true;
            }
        }
    }
}

/// A node core's network: its end of each connection, what it watches,
/// and the simulated clock.
pub struct SimNet {
    world: Rc<RefCell<World>>,
    /// Connection index → (pipe, side, read, write).
    watched: BTreeMap<usize, (usize, usize, bool, bool)>,
    /// How far this node's wall clock is off the simulated one (ms; the
    /// monotonic clock, `now`, is not).
    clock_offset_ms: i64,
}

impl SimNet {
    pub fn new(world: &Rc<RefCell<World>>) -> SimNet {
        SimNet {
            world: world.clone(),
            watched: BTreeMap::new(),
            clock_offset_ms: 0,
        }
    }

    /// Sets this node's wall clock `ms` off the simulated one (a wrong
    /// clock, or NTP stepping it).
    pub fn set_clock_offset_ms(&mut self, ms: i64) {
        self.clock_offset_ms = ms;
    }

    /// Connections ready now: (index, readable, writable), in index order.
    pub fn ready(&self) -> Vec<(usize, bool, bool)> {
        let w = self.world.borrow();
        self.watched
            .iter()
            .filter_map(|(&c, &(pipe, side, r, wr))| {
                let readable = r && w.readable(pipe, side);
                let writable = wr && w.writable(pipe, side);
                (readable || writable).then_some((c, readable, writable))
            })
            .collect()
    }

    /// The pipes of its connections (to reset them when the node crashes).
    pub fn pipes(&self) -> Vec<usize> {
        self.watched.values().map(|v| v.0).collect()
    }
}

impl celer_node::net::Net for SimNet {
    type Stream = SimStream;

    fn now(&self) -> Instant {
        self.world.borrow().instant()
    }

    fn unix_ms(&self) -> u64 {
        self.world
            .borrow()
            .unix_ms()
            .saturating_add_signed(self.clock_offset_ms)
    }

    fn connect(&mut self, addr: SocketAddr) -> io::Result<SimStream> {
        // The simulator gives the other end to whoever listens at `addr`
        // (or resets it: connection refused).
        let (mine, theirs) = World::pipe(&self.world);
        self.world.borrow_mut().accepts.push_back((addr, theirs));
        Ok(mine)
    }

    fn watch(&mut self, c: usize, s: &SimStream, read: bool, write: bool) {
        self.watched.insert(c, (s.pipe, s.side, read, write));
    }

    fn rewatch(&mut self, c: usize, s: &SimStream, read: bool, write: bool) {
        self.watched.insert(c, (s.pipe, s.side, read, write));
    }

    fn unwatch(&mut self, c: usize, _s: &SimStream) {
        self.watched.remove(&c);
    }

    fn describe(&self, s: &SimStream) -> String {
        format!("sim pipe {}", s.pipe)
    }
}
