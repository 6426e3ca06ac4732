//! Deterministic simulation of one storage engine (the real
//! `celer_engine::Shard`s, two of them) on a [`SimDisk`]: requests at a
//! changing queue depth, completions in any order, power cuts with I/O in
//! flight, clean restarts. One thread, one seed.
//!
//! The checker keeps a model of every block (its content and version) and
//! of every chunk (whether it holds a slot, and the in-memory floor a
//! whole-chunk discard leaves), applying each mutation when it is
//! acknowledged, by the engine's rules (a block takes a version newer than
//! its own; see `EngineOp`). It checks:
//!
//! * **every read** returns, block by block, the acknowledged content or
//!   the content of a mutation in flight during the read that is newer;
//! * **after every power cut**, every block holds its acknowledged content
//!   and version, or those of a newer mutation that was in flight at the
//!   cut (with the version that mutation carried), read back through the
//!   recovered engine; chunks whose whole-chunk discard or release was in
//!   flight may also be empty;
//! * **after every clean restart**, every block holds exactly its
//!   acknowledged content and version;
//! * every request completes without error, unless the disk failed an I/O
//!   (`io_errors`): then requests may fail and the shard refuses new ones;
//!   the process is restarted, and the failed mutations count as in flight
//!   at a power cut (applied or not, block by block).
//!
//! What a crash leaves is decided by the disk model (see [`crate::disk`]):
//! unsynced sectors kept or lost one by one, in-flight writes torn.
//!
//! The driver keeps the model exact where the engine's outcome depends on
//! timing: on a chunk without a slot only fresh writes run together
//! (whether a zeroing finds the slot a concurrent write allocates is a
//! race), and a whole-chunk discard or release runs alone on its chunk. Whether a
//! whole-chunk discard freed the slot (it does when the chunk is left
//! empty and the journal has room) is read from the engine. A sector write
//! (512-byte sectors of one block, merged by the engine) runs alone on its
//! block. Layers (`chain`, `Fill`) are not generated yet.

use std::collections::VecDeque;

use celer_engine::{
    AlignedBuf, BlockKind, Completion, Engine, EngineOp, EngineRequest, FormatOptions, OpenOptions,
    Segment, Shard,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::disk::{DiskStats, SimDisk};

const BS: usize = 4096;
const CHUNK_BLOCKS: u64 = 16;
const VOLUMES: u64 = 2;
const CHUNKS: u64 = 6;
const DISK_BYTES: u64 = 8 << 20;
/// Trace lines kept for a report.
const TRACE_KEEP: usize = 80;
/// Stale versions count up from 1 and stay at or below this; fresh ones
/// start above it.
const STALE_MAX: u64 = 1_000_000;
/// Queue depths the driver moves between.
const DEPTHS: [usize; 6] = [1, 1, 2, 4, 8, 16];

/// What a run does.
#[derive(Clone, Debug)]
pub struct EngineSimConfig {
    pub seed: u64,
    /// Driver steps: a submit, a poll or a wait each.
    pub steps: u64,
    /// Per step, the chance of a power cut.
    pub crash: f64,
    /// Per step, the chance of a clean restart (drain, close, open).
    pub restart: f64,
    /// Per disk I/O, the chance that it fails with EIO. The shard then
    /// fails its requests and refuses new ones; the simulator restarts the
    /// process (as after a power cut) and checks that nothing acknowledged
    /// was lost.
    pub io_errors: f64,
}

impl EngineSimConfig {
    pub fn new(seed: u64) -> EngineSimConfig {
        EngineSimConfig {
            seed,
            steps: 4000,
            crash: 0.004,
            restart: 0.001,
            // One seed in three has a disk that fails now and then.
            io_errors: if seed.is_multiple_of(3) { 0.002 } else { 0.0 },
        }
    }
}

/// What a run did and found.
#[derive(Debug, Default)]
pub struct EngineReport {
    pub seed: u64,
    /// The disk took direct I/O in whole 4 KiB only.
    pub sectors_4k: bool,
    pub steps: u64,
    /// Requests acknowledged, reads checked, power cuts, restarts.
    pub acked: u64,
    pub reads_checked: u64,
    pub crashes: u64,
    pub restarts: u64,
    /// Blocks checked after power cuts and restarts.
    pub blocks_verified: u64,
    pub disk: DiskStats,
    /// The first thing found wrong, if any (the run stops there).
    pub violation: Option<String>,
    /// The last trace lines (all of them with `trace`).
    pub trace: Vec<String>,
    /// With `trace`: the disk's own log (writes, fsyncs, errors, crashes).
    pub disk_log: Vec<String>,
}

impl EngineReport {
    pub fn render(&self, wall: std::time::Duration) -> String {
        let mut out = String::new();
        match &self.violation {
            None => out.push_str(&format!(
                "engine seed {}: ok, {} steps, {} requests acknowledged, {} reads checked, {} power cuts, {} restarts, {} blocks verified after them; disk{}: {} writes ({} dsync), {} fsyncs, {} I/O errors, {} unsynced sectors lost, {} torn sectors landed; {:.2} s\n",
                self.seed,
                self.steps,
                self.acked,
                self.reads_checked,
                self.crashes,
                self.restarts,
                self.blocks_verified,
                if self.sectors_4k { " (4 KiB sectors)" } else { "" },
                self.disk.writes,
                self.disk.dsync_writes,
                self.disk.fsyncs,
                self.disk.io_errors,
                self.disk.sectors_lost,
                self.disk.torn_sectors_landed,
                wall.as_secs_f64(),
            )),
            Some(v) => {
                out.push_str(&format!(
                    "engine seed {}: VIOLATION at step {}: {v}\ntrace up to the failing step:\n",
                    self.seed, self.steps
                ));
                for l in &self.trace {
                    out.push_str("  ");
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }
}

/// Runs one seed. With `trace`, every line is kept (not only the last).
pub fn run_engine(cfg: &EngineSimConfig, trace: bool) -> EngineReport {
    let mut sim = match EngineSim::new(cfg, trace) {
        Ok(s) => s,
        Err(e) => {
            return EngineReport {
                seed: cfg.seed,
                violation: Some(format!("the engine could not start: {e}")),
                ..EngineReport::default()
            }
        }
    };
    let violation = sim.run().err();
    let mut r = sim.report;
    r.violation = violation;
    r.disk = sim.disk.stats();
    r.disk_log = sim.disk.log();
    r.trace = sim.trace.into_iter().collect();
    r
}

const SECTOR: usize = 512;
const SECTORS: usize = BS / SECTOR;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Content {
    Zero,
    /// Data; per 512-byte sector, the request whose data it holds
    /// (`pattern(id, volume, block)`'s bytes there), or zeroes (`None`: a
    /// sector write merged into a block without data).
    Data([Option<u64>; SECTORS]),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Block {
    content: Content,
    version: u64,
}

const UNWRITTEN: Block = Block {
    content: Content::Zero,
    version: 0,
};

#[derive(Clone, Copy, Debug, Default)]
struct ChunkModel {
    slot: bool,
    /// Per block, while the chunk has no slot: set to the highest version
    /// when a whole-chunk discard freed the slot, raised for the blocks a
    /// zeroing or discard covers while it had none (0: nothing kept).
    tomb: [u64; CHUNK_BLOCKS as usize],
    /// Per block, a slot allocated after a tomb drops writes at or below
    /// this.
    floor: [u64; CHUNK_BLOCKS as usize],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Write,
    Zeroes,
    Discard,
    Release,
    /// Forgets some blocks of a chunk (`EngineOp::Forget`).
    Forget,
    Read,
}

struct InFlight {
    id: u64,
    kind: Kind,
    volume: u64,
    /// First block (in the volume) and count, within one chunk.
    first: u64,
    count: u64,
    version: u64,
    /// A sector write (count 1): first sector and sector count.
    sectors: Option<(usize, usize)>,
    /// Kept alive (and unmoved: heap memory) until completion.
    buf: AlignedBuf,
    /// Reads: per block, the contents it may return.
    allowed: Vec<Vec<Block>>,
}

impl InFlight {
    fn chunk(&self) -> u64 {
        self.first / CHUNK_BLOCKS
    }
    fn whole_chunk(&self) -> bool {
        matches!(self.kind, Kind::Release)
            || (self.kind == Kind::Discard && self.count == CHUNK_BLOCKS)
    }
    /// Runs alone on its chunk (whether the ops around it came before or
    /// after it is a race the model does not follow).
    fn alone(&self) -> bool {
        self.whole_chunk() || self.kind == Kind::Forget
    }
    fn mutates(&self) -> bool {
        self.kind != Kind::Read
    }
    fn covers(&self, volume: u64, block: u64) -> bool {
        self.volume == volume && block >= self.first && block < self.first + self.count
    }
    /// What the mutation leaves in a block that holds `base` when it
    /// applies (a sector write merges into it).
    fn effect(&self, base: Block) -> Block {
        match self.kind {
            Kind::Write => {
                let mut sectors = [Some(self.id); SECTORS];
                if let Some((first, n)) = self.sectors {
                    sectors = match base.content {
                        Content::Data(s) => s,
                        Content::Zero => [None; SECTORS],
                    };
                    for s in sectors.iter_mut().skip(first).take(n) {
                        *s = Some(self.id);
                    }
                }
                Block {
                    content: Content::Data(sectors),
                    version: self.version,
                }
            }
            Kind::Release | Kind::Forget => UNWRITTEN,
            _ => Block {
                content: Content::Zero,
                version: self.version,
            },
        }
    }
}

struct EngineSim {
    cfg: EngineSimConfig,
    rng: StdRng,
    disk: SimDisk,
    shards: Vec<Shard<SimDisk>>,
    blocks: Vec<Block>,
    /// Per block, other states it may be in: a mutation acknowledged while
    /// a newer one on the block was in flight took the block or not,
    /// depending on which the engine planned first (the older one then
    /// completes with `newer_version`). Cleared when a mutation newer than
    /// all of them is acknowledged.
    maybe: Vec<Vec<Block>>,
    chunks: Vec<ChunkModel>,
    inflight: Vec<InFlight>,
    /// Mutations that failed after a disk error: applied or not.
    failed: Vec<InFlight>,
    /// A disk error failed a shard: restart before anything else.
    must_restart: bool,
    /// Drives in a row in which nothing completed, requests in flight.
    idle_drives: u64,
    /// The disk's error count when the engine was last opened.
    errors_at_open: u64,
    next_id: u64,
    fresh_version: u64,
    stale_version: u64,
    depth: usize,
    step: u64,
    trace: VecDeque<String>,
    keep_all: bool,
    report: EngineReport,
}

fn open_options() -> OpenOptions {
    OpenOptions {
        inflight_max: 32,
        completion_eventfd: false,
        lock_wait: std::time::Duration::ZERO,
        hugepages: false,
    }
}

/// Deterministic content of block `block` of `volume` written by request `id`.
fn pattern(id: u64, volume: u64, block: u64, out: &mut [u8]) {
    let mut x = id.wrapping_mul(0x2545_F491_4F6C_DD1D)
        ^ (volume << 48)
        ^ block.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ 0x5555;
    for w in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
}

fn seg(buf: &mut AlignedBuf) -> [Segment; 1] {
    [Segment {
        addr: buf.as_mut_ptr(),
        len: buf.len(),
    }]
}

impl EngineSim {
    fn new(cfg: &EngineSimConfig, keep_all: bool) -> Result<EngineSim, String> {
        let disk = SimDisk::new(DISK_BYTES, cfg.seed ^ 0xD15C);
        if keep_all {
            disk.keep_log();
        }
        // One seed in four: a disk of 4 KiB logical sectors, where the
        // engine writes no compact journal entries.
        let sectors_4k = cfg.seed % 4 == 3;
        if sectors_4k {
            disk.set_4k_sectors();
        }
        let opts = FormatOptions {
            chunk_blocks: CHUNK_BLOCKS as u32,
            spare_blocks: 4,
            shard_count: 2,
            journal_blocks: 32,
            create_size_bytes: None,
        };
        Engine::format_on(&disk, &opts, cfg.seed | 1).map_err(|e| e.to_string())?;
        let shards = Engine::open_on(disk.clone(), &open_options())
            .map_err(|e| e.to_string())?
            .into_shards();
        Ok(EngineSim {
            cfg: cfg.clone(),
            rng: StdRng::seed_from_u64(cfg.seed),
            disk,
            shards,
            blocks: vec![UNWRITTEN; (VOLUMES * CHUNKS * CHUNK_BLOCKS) as usize],
            maybe: vec![Vec::new(); (VOLUMES * CHUNKS * CHUNK_BLOCKS) as usize],
            chunks: vec![ChunkModel::default(); (VOLUMES * CHUNKS) as usize],
            inflight: Vec::new(),
            failed: Vec::new(),
            must_restart: false,
            idle_drives: 0,
            errors_at_open: 0,
            next_id: 1,
            fresh_version: STALE_MAX,
            stale_version: 0,
            depth: 1,
            step: 0,
            trace: VecDeque::new(),
            keep_all,
            report: EngineReport {
                seed: cfg.seed,
                sectors_4k,
                ..EngineReport::default()
            },
        })
    }

    fn log(&mut self, line: String) {
        if !self.keep_all && self.trace.len() == TRACE_KEEP {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("[{:>5}] {line}", self.step));
    }

    fn block_index(volume: u64, block: u64) -> usize {
        (volume * CHUNKS * CHUNK_BLOCKS + block) as usize
    }

    fn chunk_index(volume: u64, chunk: u64) -> usize {
        (volume * CHUNKS + chunk) as usize
    }

    fn shard_of(&self, volume: u64, chunk: u64) -> usize {
        celer_engine::shard_for(self.shards[0].geometry(), volume, chunk) as usize
    }

    fn run(&mut self) -> Result<(), String> {
        while self.step < self.cfg.steps {
            self.step += 1;
            self.report.steps = self.step;
            if self.step % 200 == 1 {
                self.depth = DEPTHS[self.rng.gen_range(0..DEPTHS.len())];
            }
            if self.must_restart {
                self.log("restart after a disk error".into());
                self.power_cut()?;
                continue;
            }
            let r: f64 = self.rng.gen();
            if r < self.cfg.crash {
                self.power_cut()?;
            } else if r < self.cfg.crash + self.cfg.restart {
                self.restart()?;
            } else if self.inflight.len() < self.depth && self.rng.gen_bool(0.6) {
                self.submit_random()?;
            } else {
                let wait = !self.inflight.is_empty() && self.rng.gen_bool(0.5);
                self.drive(wait)?;
            }
        }
        // The end: drain, cut the power, and check everything.
        while !self.inflight.is_empty() {
            self.drive(true)?;
        }
        self.power_cut()
    }

    /// Polls every shard (or waits on one with requests in flight) and
    /// checks what completes.
    fn drive(&mut self, wait: bool) -> Result<(), String> {
        let mut done: Vec<Completion> = Vec::new();
        let busy: Vec<usize> = (0..self.shards.len())
            .filter(|&s| self.shards[s].inflight() > 0)
            .collect();
        if wait && !busy.is_empty() {
            let s = busy[self.rng.gen_range(0..busy.len())];
            self.shards[s].wait(&mut |c| done.push(c));
        } else {
            for s in self.shards.iter_mut() {
                s.poll(&mut |c| done.push(c));
            }
        }
        if done.is_empty() && !self.inflight.is_empty() {
            self.idle_drives += 1;
            if self.idle_drives > 100_000 {
                let shards: Vec<String> = self.shards.iter().map(|s| s.describe()).collect();
                return Err(format!(
                    "{} requests stuck: nothing completes ({})",
                    self.inflight.len(),
                    shards.join("; ")
                ));
            }
        } else {
            self.idle_drives = 0;
        }
        for c in done {
            self.completed(c)?;
        }
        Ok(())
    }

    fn submit_random(&mut self) -> Result<(), String> {
        let mut volume = self.rng.gen_range(0..VOLUMES);
        let mut chunk = self.rng.gen_range(0..CHUNKS);
        // A third of the time, a chunk without a slot if there is one: new
        // areas get bursts of writes (several in flight while the first
        // allocates the slot).
        let empty: Vec<usize> = (0..self.chunks.len())
            .filter(|&c| !self.chunks[c].slot)
            .collect();
        if !empty.is_empty() && self.rng.gen_bool(0.33) {
            let c = empty[self.rng.gen_range(0..empty.len())] as u64;
            (volume, chunk) = (c / CHUNKS, c % CHUNKS);
        }
        let kind = match self.rng.gen_range(0..100) {
            0..=54 => Kind::Write,
            55..=64 => Kind::Zeroes,
            65..=76 => Kind::Discard,
            77..=79 => Kind::Release,
            80..=81 => Kind::Forget,
            _ => Kind::Read,
        };
        let whole = kind == Kind::Release || (kind == Kind::Discard && self.rng.gen_bool(0.4));
        let (first, count) = if whole {
            (0, CHUNK_BLOCKS)
        } else {
            let first = self.rng.gen_range(0..CHUNK_BLOCKS);
            let count = self.rng.gen_range(1..=(CHUNK_BLOCKS - first).min(6));
            (first, count)
        };
        // Keep the model exact (see the module's notes).
        let on_chunk: Vec<&InFlight> = self
            .inflight
            .iter()
            .filter(|f| f.volume == volume && f.chunk() == chunk)
            .collect();
        let alone = whole || kind == Kind::Forget;
        if on_chunk.iter().any(|f| f.alone()) || (alone && !on_chunk.is_empty()) {
            return Ok(());
        }
        let slot = self.chunks[Self::chunk_index(volume, chunk)].slot;
        let others_mutate = on_chunk.iter().any(|f| f.mutates());
        let others_fresh_writes = on_chunk
            .iter()
            .filter(|f| f.mutates())
            .all(|f| f.kind == Kind::Write && f.version > STALE_MAX);
        let first = chunk * CHUNK_BLOCKS + first;
        // No mutation joins a sector write in flight on its block.
        let merging = self.inflight.iter().any(|m| {
            m.sectors.is_some() && m.volume == volume && m.first >= first && m.first < first + count
        });
        if kind != Kind::Read && merging {
            return Ok(());
        }
        // A stale write, or a sector write, only where its outcome is
        // certain: no mutation in flight over its blocks, no block in two
        // possible states.
        let settled = (first..first + count).all(|b| {
            self.maybe[Self::block_index(volume, b)].is_empty()
                && !self
                    .inflight
                    .iter()
                    .any(|m| m.mutates() && m.covers(volume, b))
        });
        let sectors = (kind == Kind::Write && settled && self.rng.gen_bool(0.2)).then(|| {
            let first = self.rng.gen_range(0..SECTORS);
            (first, self.rng.gen_range(1..=SECTORS - first))
        });
        let count = if sectors.is_some() { 1 } else { count };
        let stale = kind == Kind::Write && settled && self.rng.gen_bool(0.15);
        // On a chunk without a slot, fresh writes may run together (the
        // first one planned allocates the slot, whichever it is: the same
        // outcome); anything else runs alone there (whether a zeroing finds
        // the slot a concurrent write allocates is a race).
        let fresh_write = kind == Kind::Write && !stale;
        if kind != Kind::Read && !slot && others_mutate && !(fresh_write && others_fresh_writes) {
            return Ok(());
        }
        let version = if stale {
            self.stale_version += 1;
            self.stale_version
        } else {
            self.fresh_version += 1;
            self.fresh_version
        };
        let id = self.next_id;
        self.next_id += 1;
        let mut buf = AlignedBuf::new(if matches!(kind, Kind::Write | Kind::Read) {
            count as usize
        } else {
            1
        });
        if kind == Kind::Write {
            for i in 0..count {
                pattern(
                    id,
                    volume,
                    first + i,
                    &mut buf[i as usize * BS..(i as usize + 1) * BS],
                );
            }
        }
        let mut f = InFlight {
            id,
            kind,
            volume,
            first,
            count,
            version,
            sectors,
            buf,
            allowed: Vec::new(),
        };
        if kind == Kind::Read {
            for b in first..first + count {
                let now = self.blocks[Self::block_index(volume, b)];
                let mut allowed = vec![now];
                allowed.extend_from_slice(&self.maybe[Self::block_index(volume, b)]);
                for m in self
                    .inflight
                    .iter()
                    .filter(|m| m.mutates() && m.covers(volume, b))
                {
                    if m.version > now.version || matches!(m.kind, Kind::Release | Kind::Forget) {
                        allowed.push(m.effect(now));
                    }
                }
                f.allowed.push(allowed);
            }
        } else {
            // Reads in flight over these blocks may see this mutation.
            for b in first..first + count {
                let effect = f.effect(self.blocks[Self::block_index(volume, b)]);
                for r in self.inflight.iter_mut().filter(|r| r.kind == Kind::Read) {
                    if r.covers(volume, b) {
                        r.allowed[(b - r.first) as usize].push(effect);
                    }
                }
            }
        }
        let op = match kind {
            Kind::Write => EngineOp::Write,
            Kind::Zeroes => EngineOp::WriteZeroes,
            Kind::Discard => EngineOp::Discard,
            Kind::Release => EngineOp::Release,
            Kind::Forget => EngineOp::Forget,
            Kind::Read => EngineOp::Read,
        };
        let (at, len) = match sectors {
            Some((s, n)) => (s * SECTOR, n * SECTOR),
            None => (0, count as usize * BS),
        };
        let segs = [Segment {
            // SAFETY: `at + len` is within the buffer (one block for a
            // sector write).
            addr: unsafe { f.buf.as_mut_ptr().add(at) },
            len,
        }];
        let req = EngineRequest {
            op,
            volume,
            offset_bytes: first * BS as u64 + at as u64,
            len_bytes: len as u64,
            segments: if matches!(kind, Kind::Write | Kind::Read) {
                &segs
            } else {
                &[]
            },
            version,
            epoch: 1,
            tag: id,
            chain: &[],
            block_crc: None,
        };
        let s = self.shard_of(volume, chunk);
        // SAFETY: `f.buf` (heap memory) lives in `self.inflight` until the
        // completion for `id` is handled, or until the shard is dropped.
        if let Err(e) = unsafe { self.shards[s].submit(&req) } {
            if self.disk_failed() {
                self.log(format!("submit #{id} refused after a disk error: {e}"));
                self.must_restart = true;
                return Ok(());
            }
            return Err(format!("request {id} refused: {e}"));
        }
        self.log(format!(
            "submit #{id} {kind:?} volume {volume} blocks {first}+{count}{} version {version}{} (shard {s})",
            match sectors {
                Some((s, n)) => format!(" sectors {s}+{n}"),
                None => String::new(),
            },
            if stale { " (stale)" } else { "" }
        ));
        self.inflight.push(f);
        Ok(())
    }

    fn completed(&mut self, c: Completion) -> Result<(), String> {
        let Some(i) = self.inflight.iter().position(|f| f.id == c.tag) else {
            return Err(format!("completion for unknown request {}", c.tag));
        };
        let f = self.inflight.swap_remove(i);
        let applied = match c.result {
            Ok(n) => n,
            Err(e) if self.disk_failed() => {
                self.log(format!(
                    "done #{} {:?}: failed after a disk error: {e}",
                    f.id, f.kind
                ));
                self.must_restart = true;
                if f.mutates() {
                    self.failed.push(f);
                }
                return Ok(());
            }
            Err(e) => return Err(format!("request #{} ({:?}) failed: {e}", f.id, f.kind)),
        };
        self.report.acked += 1;
        self.log(format!("done #{} {:?}: {applied} blocks", f.id, f.kind));
        if f.kind == Kind::Read {
            return self.check_read(&f);
        }
        self.apply(&f);
        Ok(())
    }

    /// Whether the disk failed an I/O since the engine was opened.
    fn disk_failed(&self) -> bool {
        self.disk.stats().io_errors > self.errors_at_open
    }

    fn check_read(&mut self, f: &InFlight) -> Result<(), String> {
        let mut want = vec![0u8; BS];
        for i in 0..f.count {
            let b = f.first + i;
            let got = &f.buf[i as usize * BS..(i as usize + 1) * BS];
            let ok = f.allowed[i as usize].iter().any(|a| {
                fill(a.content, f.volume, b, &mut want);
                got == &want[..]
            });
            if !ok {
                return Err(format!(
                    "read #{} of volume {} block {b} returned {}, expected one of {:?}",
                    f.id,
                    f.volume,
                    self.identify(f.volume, b, got),
                    f.allowed[i as usize]
                ));
            }
        }
        self.report.reads_checked += 1;
        Ok(())
    }

    /// Names what a block's bytes are, for messages.
    fn identify(&self, volume: u64, block: u64, got: &[u8]) -> String {
        if got.iter().all(|b| *b == 0) {
            return "zeroes".into();
        }
        let mut want = vec![0u8; BS];
        for id in 1..self.next_id {
            pattern(id, volume, block, &mut want);
            if got == &want[..] {
                return format!("the data of request #{id}");
            }
        }
        "bytes no request wrote there".into()
    }

    /// An acknowledged mutation, by the engine's rules.
    fn apply(&mut self, f: &InFlight) {
        let ci = Self::chunk_index(f.volume, f.chunk());
        let ch = &mut self.chunks[ci];
        let blocks = f.first..f.first + f.count;
        match f.kind {
            Kind::Release => {
                *ch = ChunkModel::default();
                for b in f.chunk() * CHUNK_BLOCKS..(f.chunk() + 1) * CHUNK_BLOCKS {
                    self.blocks[Self::block_index(f.volume, b)] = UNWRITTEN;
                    self.maybe[Self::block_index(f.volume, b)].clear();
                }
                return;
            }
            Kind::Forget => {
                // Whatever the version, in a slot; nothing without one.
                if ch.slot {
                    let base = f.chunk() * CHUNK_BLOCKS;
                    for b in blocks {
                        ch.floor[(b - base) as usize] = 0;
                        self.blocks[Self::block_index(f.volume, b)] = UNWRITTEN;
                        self.maybe[Self::block_index(f.volume, b)].clear();
                    }
                }
                return;
            }
            Kind::Write if !ch.slot => {
                let base = f.chunk() * CHUNK_BLOCKS;
                if blocks
                    .clone()
                    .all(|b| f.version <= ch.tomb[(b - base) as usize])
                {
                    return; // a late write, older than the discard that freed the chunk
                }
                ch.slot = true;
                ch.floor = std::mem::take(&mut ch.tomb);
            }
            Kind::Zeroes | Kind::Discard if !ch.slot => {
                // Nothing stored, but the version is kept for the blocks
                // zeroed: an older write to them after it is dropped.
                let base = f.chunk() * CHUNK_BLOCKS;
                for b in blocks {
                    let t = &mut ch.tomb[(b - base) as usize];
                    *t = (*t).max(f.version);
                }
                return;
            }
            _ => {}
        }
        let floor = ch.floor;
        let base = f.chunk() * CHUNK_BLOCKS;
        for b in blocks {
            let i = Self::block_index(f.volume, b);
            if f.version <= self.blocks[i].version.max(floor[(b - base) as usize]) {
                continue;
            }
            // A sector write ran alone on its block: `now` was its base.
            let effect = f.effect(self.blocks[i]);
            let newer_in_flight = self
                .inflight
                .iter()
                .any(|n| n.mutates() && n.covers(f.volume, b) && n.version > f.version);
            let newest = self.maybe[i].iter().all(|m| m.version < f.version);
            if newer_in_flight || !newest {
                self.maybe[i].push(effect);
            } else {
                self.blocks[i] = effect;
                self.maybe[i].clear();
            }
        }
        if f.whole_chunk() {
            // Freed if it left the chunk empty and the journal had room:
            // ask the engine which.
            let s = self.shard_of(f.volume, f.chunk());
            let mut states = vec![(BlockKind::Unwritten, 0u64); CHUNK_BLOCKS as usize];
            let has_slot = self.shards[s].block_states(
                f.volume,
                f.chunk() * CHUNK_BLOCKS * BS as u64,
                &mut states,
            );
            if !has_slot {
                let range = f.chunk() * CHUNK_BLOCKS..(f.chunk() + 1) * CHUNK_BLOCKS;
                let top = range
                    .clone()
                    .map(|b| self.blocks[Self::block_index(f.volume, b)].version)
                    .max()
                    .unwrap_or(0)
                    .max(self.chunks[ci].floor.iter().copied().max().unwrap_or(0));
                self.chunks[ci] = ChunkModel {
                    slot: false,
                    tomb: [top; CHUNK_BLOCKS as usize],
                    floor: [0; CHUNK_BLOCKS as usize],
                };
                for b in range {
                    self.blocks[Self::block_index(f.volume, b)] = UNWRITTEN;
                    self.maybe[Self::block_index(f.volume, b)].clear();
                }
                self.log(format!(
                    "  chunk {} of volume {} freed (tomb {top})",
                    f.chunk(),
                    f.volume
                ));
            }
        }
    }

    fn power_cut(&mut self) -> Result<(), String> {
        self.report.crashes += 1;
        self.log(format!(
            "POWER CUT with {} requests in flight",
            self.inflight.len()
        ));
        self.disk.crash();
        // The engine dies with the power; then its buffers may go.
        self.shards.clear();
        let mut lost = std::mem::take(&mut self.inflight);
        lost.append(&mut self.failed);
        self.must_restart = false;
        self.reopen("power cut", &lost)
    }

    fn restart(&mut self) -> Result<(), String> {
        while !self.inflight.is_empty() {
            self.drive(true)?;
        }
        if self.must_restart {
            return Ok(()); // a disk error: the next step restarts uncleanly
        }
        self.report.restarts += 1;
        self.log("clean restart".into());
        for s in std::mem::take(&mut self.shards) {
            if let Err(e) = s.close() {
                if !self.disk_failed() {
                    return Err(format!("close: {e}"));
                }
                // The disk failed a checkpoint write: close says so, and
                // the process goes down without it.
                self.log(format!("close failed after a disk error: {e}"));
                self.disk.crash();
                self.shards.clear();
                return self.reopen("power cut", &[]);
            }
        }
        self.reopen("restart", &[])
    }

    /// Opens the engine again (`after` a power cut or a restart) and checks
    /// every block against the model and the mutations `lost` in flight;
    /// the model then takes what it found.
    fn reopen(&mut self, after: &str, lost: &[InFlight]) -> Result<(), String> {
        // The disk behaves while the checker reads it back.
        self.disk.set_io_error_rate(0.0);
        self.shards = Engine::open_on(self.disk.clone(), &open_options())
            .map_err(|e| format!("open after the {after}: {e}"))?
            .into_shards();
        let mut want = vec![0u8; BS];
        let mut states = vec![(BlockKind::Unwritten, 0u64); CHUNK_BLOCKS as usize];
        for volume in 0..VOLUMES {
            for chunk in 0..CHUNKS {
                let s = self.shard_of(volume, chunk);
                let offset = chunk * CHUNK_BLOCKS * BS as u64;
                let has_slot = self.shards[s].block_states(volume, offset, &mut states);
                let data = self.read_now(s, volume, offset)?;
                let freed_maybe = lost
                    .iter()
                    .any(|f| f.volume == volume && f.chunk() == chunk && f.whole_chunk());
                for i in 0..CHUNK_BLOCKS {
                    let b = chunk * CHUNK_BLOCKS + i;
                    let model = self.blocks[Self::block_index(volume, b)];
                    let mut allowed = vec![model];
                    allowed.extend_from_slice(&self.maybe[Self::block_index(volume, b)]);
                    for m in lost.iter().filter(|m| m.mutates() && m.covers(volume, b)) {
                        if m.version > model.version || m.kind == Kind::Forget {
                            allowed.push(m.effect(model));
                        }
                    }
                    if freed_maybe {
                        allowed.push(UNWRITTEN);
                    }
                    let got = &data[i as usize * BS..(i as usize + 1) * BS];
                    let (kind, version) = states[i as usize];
                    let found = allowed.iter().find(|a| {
                        fill(a.content, volume, b, &mut want);
                        let kind_ok = match a.content {
                            Content::Data(_) => kind == BlockKind::Data,
                            Content::Zero => kind != BlockKind::Data,
                        };
                        got == &want[..] && kind_ok && a.version == version
                    });
                    let Some(found) = found.copied() else {
                        return Err(format!(
                            "after the {after}: volume {volume} block {b} holds {} at version {version} ({kind:?}); expected one of {allowed:?}",
                            self.identify(volume, b, got),
                        ));
                    };
                    self.blocks[Self::block_index(volume, b)] = found;
                    self.maybe[Self::block_index(volume, b)].clear();
                    self.report.blocks_verified += 1;
                }
                // Tombs and floors live in memory: gone with the process.
                self.chunks[Self::chunk_index(volume, chunk)] = ChunkModel {
                    slot: has_slot,
                    ..ChunkModel::default()
                };
            }
        }
        self.log("reopened: every block checked".into());
        self.disk.set_io_error_rate(self.cfg.io_errors);
        self.errors_at_open = self.disk.stats().io_errors;
        Ok(())
    }

    /// Reads a whole chunk through shard `s`, waiting for it.
    fn read_now(&mut self, s: usize, volume: u64, offset: u64) -> Result<AlignedBuf, String> {
        let mut buf = AlignedBuf::new(CHUNK_BLOCKS as usize);
        let segs = seg(&mut buf);
        let tag = u64::MAX;
        let req = EngineRequest {
            op: EngineOp::Read,
            volume,
            offset_bytes: offset,
            len_bytes: CHUNK_BLOCKS * BS as u64,
            segments: &segs,
            version: 0,
            epoch: 1,
            tag,
            chain: &[],
            block_crc: None,
        };
        // SAFETY: `buf` outlives the wait for this request's completion.
        unsafe { self.shards[s].submit(&req) }.map_err(|e| format!("check read refused: {e}"))?;
        let mut result = None;
        while result.is_none() {
            self.shards[s].wait(&mut |c| {
                if c.tag == tag {
                    result = Some(c.result);
                }
            });
        }
        match result {
            Some(Ok(_)) => Ok(buf),
            Some(Err(e)) => {
                let mut at = String::new();
                for b in 0..CHUNK_BLOCKS {
                    if let Some(d) = self.shards[s].locate(volume, offset + b * BS as u64) {
                        at.push_str(&format!(" {b}:{d:#x}"));
                    }
                }
                Err(format!(
                    "check read of volume {volume} at {offset}: {e} (blocks on disk:{at})"
                ))
            }
            None => Err("check read never completed".into()),
        }
    }
}

/// The bytes `content` puts in block `block` of `volume`.
fn fill(content: Content, volume: u64, block: u64, out: &mut [u8]) {
    let sectors = match content {
        Content::Zero => [None; SECTORS],
        Content::Data(s) => s,
    };
    let mut whole = [0u8; BS];
    for (s, owner) in sectors.iter().enumerate() {
        let part = &mut out[s * SECTOR..(s + 1) * SECTOR];
        match owner {
            Some(id) => {
                pattern(*id, volume, block, &mut whole);
                part.copy_from_slice(&whole[s * SECTOR..(s + 1) * SECTOR]);
            }
            None => part.fill(0),
        }
    }
}
