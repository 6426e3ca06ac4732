//! An in-memory disk for the engine ([`celer_engine::Disk`]) that models
//! what a real one may do, from a seed:
//!
//! - **reordering**: queued I/O completes in any order, a random share at a
//!   time;
//! - **the volatile cache**: a plain write is readable when it completes
//!   but durable only once an fdatasync *issued after it completed* has
//!   completed; an `RWF_DSYNC` write is durable when it completes;
//! - **crashes** ([`SimDisk::crash`]): every 512-byte sector written and
//!   not yet durable keeps its new content or goes back to its durable one,
//!   each on its own coin; every write still in flight lands on a random
//!   subset of its sectors (torn writes). Reads then see exactly what
//!   survived.
//!
//! Writes copy from the caller's memory when they complete, not when they
//! are queued, so a buffer reused before its write completed shows up as
//! wrong data on disk, as it would with DMA.
//!
//! - **I/O errors** ([`SimDisk::set_io_error_rate`]): a read, write or
//!   fdatasync fails with EIO. A failed write may have landed on some
//!   sectors, not durably. A failed fdatasync leaves the writes it covered
//!   not durable and no later fdatasync covers them (as Linux drops the
//!   pages' dirty state: "fsyncgate"); and the disk's flushes stay broken
//!   until the next power cut: every later fdatasync and `RWF_DSYNC` write
//!   fails too, on every queue. (Without that, a flush failing on one
//!   shard's queue could take another shard's writes with it while that
//!   shard's next flush succeeds: no engine that shares a disk between
//!   independent queues can see that in time. See docs/testing.md.)
//!
//! - **time** ([`SimDisk::set_time`], for a simulator that owns a clock):
//!   each queued I/O takes a random latency of simulated time (reads
//!   15-60 µs, writes 20-100 µs, fdatasyncs 40-200 µs) and completes when
//!   its queue is polled at or after it is due, so I/O queued together
//!   completes out of order. [`SimDisk::next_due`] tells the simulator
//!   when to look again. Without a clock, polling lets a random piece of
//!   time pass instead.
//!
//! Not modelled yet: an intermediate content of a sector written several
//! times between two flushes (a crash leaves the last or the durable one),
//! short transfers, ENOSPC and bit flips.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use celer_engine::{Disk, DiskIo, DiskQueue, EngineError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SECTOR: usize = 512;

/// A simulated disk; clones share it (the engine's handle and the
/// simulator's).
#[derive(Clone)]
pub struct SimDisk {
    state: Arc<Mutex<DiskState>>,
    name: String,
}

/// Counters of what the disk did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskStats {
    pub reads: u64,
    pub writes: u64,
    pub dsync_writes: u64,
    pub fsyncs: u64,
    pub crashes: u64,
    /// Sectors a crash took back to their durable content.
    pub sectors_lost: u64,
    /// Sectors of in-flight writes a crash let land.
    pub torn_sectors_landed: u64,
    /// I/Os failed with EIO.
    pub io_errors: u64,
}

struct DiskState {
    /// What reads see.
    current: Vec<u8>,
    /// What a crash keeps for sure.
    durable: Vec<u8>,
    /// Sectors whose current content is not durable yet, with the write
    /// sequence number of that content.
    dirty: BTreeMap<u64, u64>,
    /// Per sector, the sequence number of its durable content.
    durable_seq: Vec<u64>,
    next_seq: u64,
    /// I/O queued and not completed, of every queue.
    inflight: Vec<Pending>,
    /// Completed, not yet handed to their queue: (queue, user_data, result).
    ready: VecDeque<(u32, u64, i32)>,
    next_queue: u32,
    /// Queues of the engine that crashed: their I/O is gone.
    dead_below: u32,
    rng: StdRng,
    stats: DiskStats,
    /// Chance that a queued I/O fails with EIO.
    io_error_rate: f64,
    /// With `trace`: what each completed write did, for a failure report.
    log: Option<Vec<String>>,
    /// A flush failed: every later one fails, until a power cut.
    flush_broken: bool,
    /// Direct I/O alignment (offset and length): 512, or 4096 for a disk
    /// with 4 KiB logical sectors ([`SimDisk::set_4k_sectors`]).
    align: usize,
    /// One bit per sector whose current content may differ from its
    /// durable one (written not durably since the last power cut): what a
    /// power cut puts back.
    maybe_differs: Vec<u64>,
    /// Simulated time (µs), once the simulator owns the clock
    /// ([`SimDisk::set_time`]); `None`: polling lets time pass.
    now_us: Option<u64>,
}

/// Latency of a queued I/O with a simulated clock (µs, uniformly).
const READ_US: (u64, u64) = (15, 60);
const WRITE_US: (u64, u64) = (20, 100);
const FSYNC_US: (u64, u64) = (40, 200);

/// One queued I/O.
struct Pending {
    queue: u32,
    user_data: u64,
    io: DiskIo,
    /// An fsync: the dirty sectors when it was issued, with their content.
    flush: Vec<(u64, u64, [u8; SECTOR])>,
    /// With a simulated clock: when it completes (µs).
    due_us: u64,
}

// SAFETY: the raw pointers in `io` point into memory the engine keeps valid
// until the completion is reaped (the `DiskQueue::push` contract); the
// simulator runs the engine and the disk on one thread.
unsafe impl Send for Pending {}

impl SimDisk {
    /// A zeroed disk of `size_bytes` (a multiple of 512).
    pub fn new(size_bytes: u64, seed: u64) -> SimDisk {
        let sectors = (size_bytes as usize).div_ceil(SECTOR);
        SimDisk {
            state: Arc::new(Mutex::new(DiskState {
                current: vec![0; sectors * SECTOR],
                durable: vec![0; sectors * SECTOR],
                dirty: BTreeMap::new(),
                durable_seq: vec![0; sectors],
                maybe_differs: vec![0; sectors.div_ceil(64)],
                next_seq: 1,
                inflight: Vec::new(),
                ready: VecDeque::new(),
                next_queue: 0,
                dead_below: 0,
                rng: StdRng::seed_from_u64(seed),
                stats: DiskStats::default(),
                io_error_rate: 0.0,
                log: None,
                flush_broken: false,
                align: SECTOR,
                now_us: None,
            })),
            name: format!("simdisk-{seed:x}"),
        }
    }

    fn lock(&self) -> MutexGuard<'_, DiskState> {
        // One thread drives the simulation: a poisoned lock means a panic
        // already failed the run.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Power loss: unsynced sectors survive or not, in-flight writes land
    /// torn or not at all; queued I/O never completes. Call it while the
    /// engine that issued the I/O still exists (its buffers are read here),
    /// then drop that engine without closing it.
    pub fn crash(&self) {
        let mut guard = self.lock();
        let s = &mut *guard;
        s.stats.crashes += 1;
        let inflight = std::mem::take(&mut s.inflight);
        // Unsynced content: kept or lost, sector by sector.
        let dirty = std::mem::take(&mut s.dirty);
        for (&sector, &seq) in dirty.iter() {
            let at = sector as usize * SECTOR;
            if s.rng.gen::<bool>() {
                let (cur, dur) = (&s.current, &mut s.durable);
                dur[at..at + SECTOR].copy_from_slice(&cur[at..at + SECTOR]);
                s.durable_seq[sector as usize] = seq;
            } else {
                s.stats.sectors_lost += 1;
            }
        }
        // In flight: each sector lands or not.
        for p in inflight.iter() {
            if let DiskIo::Write { bufs, offset, .. } = p.io {
                let mut at = offset as usize;
                // SAFETY: the engine that queued it still exists (see above).
                for (addr, len) in unsafe { bufs.pieces() } {
                    for i in (0..len).step_by(SECTOR) {
                        if s.rng.gen::<bool>() {
                            let n = SECTOR.min(len - i);
                            // SAFETY: within the piece the engine provided.
                            let src = unsafe { std::slice::from_raw_parts(addr.add(i), n) };
                            s.durable[at + i..at + i + n].copy_from_slice(src);
                            s.stats.torn_sectors_landed += 1;
                            let sector = (at + i) / SECTOR;
                            s.maybe_differs[sector / 64] |= 1 << (sector % 64);
                        }
                    }
                    at += len;
                }
            }
        }
        // What reads see is what survived: the durable content of every
        // sector that may differ (the others hold it already).
        for word in 0..s.maybe_differs.len() {
            let mut bits = std::mem::take(&mut s.maybe_differs[word]);
            while bits != 0 {
                let sector = word * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let r = sector * SECTOR..(sector + 1) * SECTOR;
                let (cur, dur) = (&mut s.current, &s.durable);
                cur[r.clone()].copy_from_slice(&dur[r]);
            }
        }
        if let Some(log) = s.log.as_mut() {
            log.push("crash".into());
        }
        s.ready.clear();
        s.dead_below = s.next_queue;
        s.flush_broken = false;
    }

    /// From now on, each queued I/O fails with EIO with chance `rate`.
    pub fn set_io_error_rate(&self, rate: f64) {
        self.lock().io_error_rate = rate;
    }

    /// From now on the disk takes direct I/O only in whole 4 KiB (as one
    /// with 4 KiB logical sectors): anything else fails with EINVAL.
    pub fn set_4k_sectors(&self) {
        self.lock().align = 4096;
    }

    /// Keeps a line per completed write, fsync and crash ([`SimDisk::log`]).
    pub fn keep_log(&self) {
        self.lock().log.get_or_insert_with(Vec::new);
    }

    /// The lines kept since `keep_log`.
    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone().unwrap_or_default()
    }

    pub fn stats(&self) -> DiskStats {
        self.lock().stats
    }

    /// Simulated time is now `now_us` (µs): from the first call on, queued
    /// I/O completes when due, not when polling happens to let time pass.
    pub fn set_time(&self, now_us: u64) {
        self.lock().now_us = Some(now_us);
    }

    /// With a simulated clock: when the next queued I/O of a live queue is
    /// due (µs).
    pub fn next_due(&self) -> Option<u64> {
        let s = self.lock();
        s.inflight
            .iter()
            .filter(|p| p.queue >= s.dead_below)
            .map(|p| p.due_us)
            .min()
    }

    /// Reads what the disk holds now (for checks outside the engine).
    pub fn peek(&self, offset: u64, out: &mut [u8]) {
        let s = self.lock();
        out.copy_from_slice(&s.current[offset as usize..offset as usize + out.len()]);
    }
}

impl DiskState {
    /// In range, and aligned as O_DIRECT needs on this disk's logical
    /// sectors (EINVAL otherwise, as the kernel answers).
    fn check_range(&self, offset: u64, len: usize) -> Result<(), i32> {
        if !offset.is_multiple_of(self.align as u64) || !len.is_multiple_of(self.align) {
            return Err(-libc::EINVAL);
        }
        match (offset as usize).checked_add(len) {
            Some(end) if end <= self.current.len() => Ok(()),
            _ => Err(-libc::EINVAL),
        }
    }

    /// Completes in-flight I/O number `i`: its effect on the disk and its
    /// result.
    fn complete(&mut self, i: usize) {
        let p = self.inflight.swap_remove(i);
        let flushes = matches!(p.io, DiskIo::Fsync | DiskIo::Write { dsync: true, .. });
        if (self.io_error_rate > 0.0 && self.rng.gen_bool(self.io_error_rate))
            || (flushes && self.flush_broken)
        {
            return self.fail(p);
        }
        let res = match p.io {
            DiskIo::Read { bufs, offset } => {
                self.stats.reads += 1;
                let mut at = offset as usize;
                let mut total = 0usize;
                // SAFETY: the engine keeps the buffers valid until reaped.
                for (addr, len) in unsafe { bufs.pieces() } {
                    if self.check_range(at as u64, len).is_err() {
                        total = usize::MAX;
                        break;
                    }
                    // SAFETY: the engine's buffer, valid for `len` bytes.
                    unsafe {
                        std::ptr::copy_nonoverlapping(self.current.as_ptr().add(at), addr, len)
                    };
                    at += len;
                    total += len;
                }
                if total == usize::MAX {
                    -libc::EINVAL
                } else {
                    total as i32
                }
            }
            DiskIo::Write {
                bufs,
                offset,
                dsync,
            } => {
                self.stats.writes += 1;
                if dsync {
                    self.stats.dsync_writes += 1;
                }
                let mut at = offset as usize;
                let mut total = 0usize;
                let mut bad = false;
                // SAFETY: the engine keeps the buffers valid until reaped.
                for (addr, len) in unsafe { bufs.pieces() } {
                    if self.check_range(at as u64, len).is_err() {
                        bad = true;
                        break;
                    }
                    // SAFETY: the engine's buffer, valid for `len` bytes.
                    let src = unsafe { std::slice::from_raw_parts(addr, len) };
                    self.write(at, src, dsync);
                    at += len;
                    total += len;
                }
                if bad {
                    -libc::EINVAL
                } else {
                    total as i32
                }
            }
            DiskIo::Fsync => {
                self.stats.fsyncs += 1;
                for (sector, seq, data) in p.flush.iter() {
                    let s = *sector as usize;
                    if self.durable_seq[s] < *seq {
                        self.durable[s * SECTOR..(s + 1) * SECTOR].copy_from_slice(data);
                        self.durable_seq[s] = *seq;
                    }
                    if self.dirty.get(sector) == Some(seq) {
                        self.dirty.remove(sector);
                    }
                }
                0
            }
        };
        if let Some(log) = self.log.as_mut() {
            match p.io {
                DiskIo::Write { offset, dsync, .. } => log.push(format!(
                    "q{} write {offset:#x} {res} bytes{}",
                    p.queue,
                    if dsync { " dsync" } else { "" }
                )),
                DiskIo::Fsync => {
                    log.push(format!("q{} fsync ({} sectors)", p.queue, p.flush.len()))
                }
                DiskIo::Read { .. } => {}
            }
        }
        self.ready.push_back((p.queue, p.user_data, res));
    }

    /// Completes `p` with EIO: a write lands on some sectors, not durably;
    /// an fdatasync makes nothing durable, and what it covered is no longer
    /// dirty (no later fdatasync covers it).
    fn fail(&mut self, p: Pending) {
        self.stats.io_errors += 1;
        match p.io {
            DiskIo::Read { .. } => {}
            DiskIo::Write { bufs, offset, .. } => {
                let mut at = offset as usize;
                // SAFETY: the engine keeps the buffers valid until reaped.
                for (addr, len) in unsafe { bufs.pieces() } {
                    if self.check_range(at as u64, len).is_err() {
                        break;
                    }
                    for i in (0..len).step_by(SECTOR) {
                        if self.rng.gen::<bool>() {
                            let n = SECTOR.min(len - i);
                            // SAFETY: within the piece the engine provided.
                            let src = unsafe { std::slice::from_raw_parts(addr.add(i), n) };
                            self.write(at + i, src, false);
                        }
                    }
                    at += len;
                }
            }
            DiskIo::Fsync => {
                self.flush_broken = true;
                for (sector, seq, _) in p.flush.iter() {
                    if self.dirty.get(sector) == Some(seq) {
                        self.dirty.remove(sector);
                    }
                }
            }
        }
        if let DiskIo::Write { dsync: true, .. } = p.io {
            self.flush_broken = true;
        }
        if let Some(log) = self.log.as_mut() {
            let what = match p.io {
                DiskIo::Write { offset, .. } => format!("write {offset:#x}"),
                DiskIo::Fsync => format!("fsync ({} sectors)", p.flush.len()),
                DiskIo::Read { offset, .. } => format!("read {offset:#x}"),
            };
            log.push(format!("q{} {what} EIO", p.queue));
        }
        self.ready.push_back((p.queue, p.user_data, -libc::EIO));
    }

    fn write(&mut self, at: usize, src: &[u8], dsync: bool) {
        self.current[at..at + src.len()].copy_from_slice(src);
        if dsync {
            self.durable[at..at + src.len()].copy_from_slice(src);
        }
        let first = at / SECTOR;
        let last = (at + src.len()).div_ceil(SECTOR);
        for sector in first..last {
            let seq = self.next_seq;
            self.next_seq += 1;
            if dsync {
                self.durable_seq[sector] = seq;
            } else {
                self.dirty.insert(sector as u64, seq);
                self.maybe_differs[sector / 64] |= 1 << (sector % 64);
            }
        }
        if dsync && !self.dirty.is_empty() {
            let durable: Vec<u64> = self
                .dirty
                .range(first as u64..last as u64)
                .map(|(&k, _)| k)
                .collect();
            for k in durable {
                self.dirty.remove(&k);
            }
        }
    }

    /// Lets a random piece of time pass for `queue`: completes one of its
    /// in-flight I/Os, if it has any (with a simulated clock, one that is
    /// due; `force`: the earliest, due or not, for a caller that blocks).
    fn progress(&mut self, queue: u32, force: bool) -> bool {
        let pick = match self.now_us {
            None => {
                let mine: Vec<usize> = (0..self.inflight.len())
                    .filter(|&i| self.inflight[i].queue == queue)
                    .collect();
                if mine.is_empty() {
                    return false;
                }
                mine[self.rng.gen_range(0..mine.len())]
            }
            Some(now) => {
                let mine = || (0..self.inflight.len()).filter(|&i| self.inflight[i].queue == queue);
                let due = mine().filter(|&i| self.inflight[i].due_us <= now).count();
                if due > 0 {
                    let k = self.rng.gen_range(0..due);
                    match mine().filter(|&i| self.inflight[i].due_us <= now).nth(k) {
                        Some(i) => i,
                        None => return false,
                    }
                } else if force {
                    match mine().min_by_key(|&i| self.inflight[i].due_us) {
                        Some(i) => i,
                        None => return false,
                    }
                } else {
                    return false;
                }
            }
        };
        self.complete(pick);
        true
    }

    fn take_ready(&mut self, queue: u32) -> Option<(u64, i32)> {
        let i = self.ready.iter().position(|r| r.0 == queue)?;
        self.ready.remove(i).map(|(_, ud, res)| (ud, res))
    }
}

/// One engine shard's queue on a [`SimDisk`].
pub struct SimQueue {
    disk: SimDisk,
    id: u32,
}

impl DiskQueue for SimQueue {
    unsafe fn push(&mut self, io: &DiskIo, user_data: u64) {
        let mut s = self.disk.lock();
        if self.id < s.dead_below {
            return; // a crashed engine's queue: nothing reaches the disk
        }
        let flush = match io {
            DiskIo::Fsync => {
                let dirty: Vec<(u64, u64)> = s.dirty.iter().map(|(a, b)| (*a, *b)).collect();
                dirty
                    .into_iter()
                    .map(|(sector, seq)| {
                        let at = sector as usize * SECTOR;
                        let mut data = [0u8; SECTOR];
                        data.copy_from_slice(&s.current[at..at + SECTOR]);
                        (sector, seq, data)
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        let (lo, hi) = match io {
            DiskIo::Read { .. } => READ_US,
            DiskIo::Write { .. } => WRITE_US,
            DiskIo::Fsync => FSYNC_US,
        };
        // Drawn only with a clock: runs without one keep their course.
        let due_us = match s.now_us {
            Some(now) => now + s.rng.gen_range(lo..=hi),
            None => 0,
        };
        s.inflight.push(Pending {
            queue: self.id,
            user_data,
            io: *io,
            flush,
            due_us,
        });
    }

    fn submit(&mut self, want: usize) -> std::io::Result<()> {
        let mut s = self.disk.lock();
        if self.id < s.dead_below {
            return Ok(());
        }
        let mut got = s.ready.iter().filter(|r| r.0 == self.id).count();
        if s.now_us.is_some() {
            // What is due completes; a caller that waits for `want` gets
            // the earliest (its wait is time the simulator does not see).
            while s.progress(self.id, got < want) {
                got += 1;
            }
            return Ok(());
        }
        // Some time passes: a random share of the I/O in flight completes,
        // at least `want` of it.
        loop {
            let more = got < want || s.rng.gen_bool(0.5);
            if !more || !s.progress(self.id, false) {
                break;
            }
            got += 1;
        }
        Ok(())
    }

    fn next_completion(&mut self) -> Option<(u64, i32)> {
        let mut s = self.disk.lock();
        if self.id < s.dead_below {
            return None;
        }
        if let Some(r) = s.take_ready(self.id) {
            return Some(r);
        }
        if s.now_us.is_some() {
            // What is due completes.
            return if s.progress(self.id, false) {
                s.take_ready(self.id)
            } else {
                None
            };
        }
        // Polling also lets time pass, now and then.
        if s.rng.gen_bool(0.3) && s.progress(self.id, false) {
            return s.take_ready(self.id);
        }
        None
    }

    fn completion_fd(&self) -> Option<RawFd> {
        None
    }
}

impl Disk for SimDisk {
    type Queue = SimQueue;

    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> std::io::Result<u64> {
        Ok(self.lock().current.len() as u64)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let s = self.lock();
        s.check_range(offset, buf.len())
            .map_err(|e| std::io::Error::from_raw_os_error(-e))?;
        buf.copy_from_slice(&s.current[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut s = self.lock();
        s.check_range(offset, buf.len())
            .map_err(|e| std::io::Error::from_raw_os_error(-e))?;
        s.write(offset as usize, buf, false);
        Ok(())
    }

    fn sync(&self) -> std::io::Result<()> {
        let mut guard = self.lock();
        let s = &mut *guard;
        let dirty = std::mem::take(&mut s.dirty);
        for (&sector, &seq) in dirty.iter() {
            let r = sector as usize * SECTOR..(sector as usize + 1) * SECTOR;
            let (cur, dur) = (&s.current, &mut s.durable);
            dur[r.clone()].copy_from_slice(&cur[r]);
            s.durable_seq[sector as usize] = seq;
        }
        Ok(())
    }

    fn dio_512(&self) -> bool {
        self.lock().align == SECTOR
    }

    fn queue(&self, _completion_eventfd: bool) -> Result<SimQueue, EngineError> {
        let mut s = self.lock();
        let id = s.next_queue;
        s.next_queue += 1;
        Ok(SimQueue {
            disk: self.clone(),
            id,
        })
    }
}
