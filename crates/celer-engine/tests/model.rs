//! Property test: random writes, reads, discards, write-zeroes, overwrites,
//! stale versions, concurrent batches, clean reopen and crash reopen (drop
//! without close), checked against an in-memory model. Writes include sector
//! writes (512-byte sectors within one block, merged by the engine): the
//! model keeps each block's content per sector.

mod common;

use std::collections::{HashMap, HashSet};

use celer_engine::{
    AlignedBuf, BlockKind, Completion, Engine, EngineOp, EngineRequest, OpenOptions, Segment, Shard,
};
use common::*;
use proptest::prelude::*;

const CHUNK_BLOCKS: u64 = 16;
const VOLUMES: u64 = 3;
const CHUNKS: u64 = 6;

#[derive(Clone, Debug)]
enum Step {
    /// A batch of mutations submitted together (QD > 1), completed in any order.
    Batch(Vec<Mutation>),
    Read {
        volume: u64,
        block: u64,
        count: u64,
    },
    Reopen,
    CrashReopen,
}

#[derive(Clone, Debug)]
struct Mutation {
    op: EngineOp,
    volume: u64,
    block: u64,
    count: u64,
    /// Version offset: negative makes a stale write.
    stale: bool,
    seed: u64,
    /// A sector write (count 1): first 512-byte sector and sector count.
    sectors: Option<(u64, u64)>,
}

const SECTORS: usize = 8;
const SECTOR: usize = 512;

fn mutation() -> impl Strategy<Value = Mutation> {
    (
        0..7u8,
        0..VOLUMES,
        0..CHUNKS * CHUNK_BLOCKS,
        1..=CHUNK_BLOCKS,
        prop::bool::weighted(0.15),
        any::<u64>(),
    )
        .prop_map(|(k, volume, block, count, stale, seed)| {
            let op = match k {
                0..=2 => EngineOp::Write,
                3 => EngineOp::WriteZeroes,
                4 => EngineOp::Discard,
                5 => EngineOp::Release,
                _ => EngineOp::Forget,
            };
            if k == 2 {
                let first = seed % SECTORS as u64;
                let n = 1 + (seed >> 8) % (SECTORS as u64 - first);
                return Mutation {
                    op,
                    volume,
                    block,
                    count: 1,
                    stale,
                    seed,
                    sectors: Some((first, n)),
                };
            }
            // Keep inside one chunk.
            let in_chunk = block % CHUNK_BLOCKS;
            let count = if op == EngineOp::Release || (op == EngineOp::Discard && seed % 3 == 0) {
                // Whole-chunk discards release the slot.
                return Mutation {
                    op,
                    volume,
                    block: block - in_chunk,
                    count: CHUNK_BLOCKS,
                    stale,
                    seed,
                    sectors: None,
                };
            } else {
                count.min(CHUNK_BLOCKS - in_chunk)
            };
            Mutation {
                op,
                volume,
                block,
                count,
                stale,
                seed,
                sectors: None,
            }
        })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => prop::collection::vec(mutation(), 1..8).prop_map(|muts| {
            // A whole-chunk discard shares its batch with no other op on its
            // chunk, so whether it releases the slot is deterministic.
            let mut kept: Vec<Mutation> = Vec::new();
            for m in muts {
                let whole = |x: &Mutation| {
                    x.op == EngineOp::Release || (x.op == EngineOp::Discard && x.count == CHUNK_BLOCKS)
                };
                let same = |x: &Mutation| x.volume == m.volume && x.block / CHUNK_BLOCKS == m.block / CHUNK_BLOCKS;
                if kept.iter().any(|k| same(k) && (whole(k) || whole(&m))) {
                    continue;
                }
                kept.push(m);
            }
            Step::Batch(kept)
        }),
        4 => (0..VOLUMES, 0..CHUNKS * CHUNK_BLOCKS, 1..=CHUNK_BLOCKS).prop_map(|(volume, block, count)| {
            let count = count.min(CHUNK_BLOCKS - block % CHUNK_BLOCKS);
            Step::Read { volume, block, count }
        }),
        1 => Just(Step::Reopen),
        1 => Just(Step::CrashReopen),
    ]
}

/// Per block: (version, per 512-byte sector the seed of its content; None =
/// zeroes).
type Model = HashMap<(u64, u64), (u64, [Option<u64>; SECTORS])>;

/// The content the model holds for block `b`.
fn expected(model: &Model, volume: u64, b: u64, want: &mut [u8]) {
    let mut full = vec![0u8; BS];
    for s in 0..SECTORS {
        let part = &mut want[s * SECTOR..(s + 1) * SECTOR];
        match model.get(&(volume, b)).and_then(|e| e.1[s]) {
            Some(seed) => {
                pattern(seed, b, &mut full);
                part.copy_from_slice(&full[s * SECTOR..(s + 1) * SECTOR]);
            }
            None => part.fill(0),
        }
    }
}

/// A fresh one-shard 8 MiB engine disk in `dir`.
fn small_disk(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("disk");
    Engine::format(&path, &small_format(1, 8 << 20)).expect("format");
    path
}

/// Opens the disk at `path` and returns its only shard.
fn open_shard(path: &std::path::Path) -> Shard {
    Engine::open(path, &OpenOptions::default())
        .expect("open")
        .into_shards()
        .remove(0)
}

fn run(steps: Vec<Step>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = small_disk(&dir);
    let mut shard: Option<Shard> = Some(open_shard(&path));
    let mut model: Model = HashMap::new();
    let mut allocated: HashSet<(u64, u64)> = HashSet::new();
    // Per (volume, block) of a chunk with no slot: the version a discard
    // that freed it, or a zeroing over nothing, left there, kept in memory
    // (until a reopen); a later write at or below it on every block it
    // writes is dropped.
    let mut tomb: HashMap<(u64, u64), u64> = HashMap::new();
    // Per block of chunks allocated again after that: the same floor.
    let mut floor: HashMap<(u64, u64), u64> = HashMap::new();
    let chunk_blocks = |chunk: (u64, u64)| {
        (chunk.1 * CHUNK_BLOCKS..(chunk.1 + 1) * CHUNK_BLOCKS).map(move |b| (chunk.0, b))
    };
    // Versions are unique, as the replication layer's (HLC + client id) are:
    // fresh ones count up from 1_000_000, stale ones from 1.
    let mut version = 1_000_000u64;
    let mut stale_version = 0u64;
    let mut bufs: Vec<AlignedBuf> = Vec::new();
    for step in steps {
        let sh = shard.as_mut().expect("shard");
        match step {
            Step::Batch(muts) => {
                bufs.clear();
                let mut segs: Vec<[Segment; 1]> = Vec::new();
                let mut versions = Vec::new();
                for m in &muts {
                    version += 10;
                    // A stale write carries a version older than anything
                    // written in this batch or before.
                    stale_version += 1;
                    let v = if m.stale { stale_version } else { version };
                    versions.push(v);
                    let mut b = AlignedBuf::new(m.count as usize);
                    for i in 0..m.count {
                        pattern(
                            m.seed,
                            m.block + i,
                            &mut b[i as usize * BS..(i as usize + 1) * BS],
                        );
                    }
                    bufs.push(b);
                }
                for (b, m) in bufs.iter_mut().zip(&muts) {
                    let len = b.len();
                    segs.push([match m.sectors {
                        Some((first, n)) => seg(b, first as usize * SECTOR, n as usize * SECTOR),
                        None => seg(b, 0, len),
                    }]);
                }
                for (i, m) in muts.iter().enumerate() {
                    let (at, len) = match m.sectors {
                        Some((first, n)) => (first * SECTOR as u64, n * SECTOR as u64),
                        None => (0, m.count * BS as u64),
                    };
                    let req = EngineRequest {
                        op: m.op,
                        volume: m.volume,
                        offset_bytes: m.block * BS as u64 + at,
                        len_bytes: len,
                        segments: if m.op == EngineOp::Write {
                            &segs[i]
                        } else {
                            &[]
                        },
                        version: versions[i],
                        epoch: 1,
                        tag: i as u64,
                        chain: &[],
                        block_crc: None,
                    };
                    // SAFETY: bufs live until every completion is in.
                    unsafe { sh.submit(&req) }.expect("submit");
                }
                let mut done = 0;
                let mut rounds = 0;
                while done < muts.len() {
                    rounds += 1;
                    assert!(rounds < 100_000, "requests stuck: {}", sh.describe());
                    sh.wait(&mut |c: Completion| {
                        c.result.expect("mutation");
                        done += 1;
                    });
                }
                // Model, in submission order: a write allocates the chunk's
                // slot; a zero/discard of a chunk without a slot writes
                // nothing but keeps its version (`tomb`); per block the highest
                // version wins whatever the completion order. A sector write
                // newer than the block replaces its sectors and keeps the
                // others (the engine merges it after the writes submitted
                // before it, so submission order is the merge order).
                for (i, m) in muts.iter().enumerate() {
                    let chunk = (m.volume, m.block / CHUNK_BLOCKS);
                    if m.op == EngineOp::Release {
                        // Data and versions forgotten, whatever the version.
                        allocated.remove(&chunk);
                        for k in chunk_blocks(chunk) {
                            tomb.remove(&k);
                            floor.remove(&k);
                        }
                        for b in m.block..m.block + m.count {
                            model.remove(&(m.volume, b));
                        }
                        continue;
                    }
                    if m.op == EngineOp::Forget {
                        // Blocks forgotten in a slot, whatever the version;
                        // nothing done without one (its zeroings' versions
                        // stay).
                        if allocated.contains(&chunk) {
                            for b in m.block..m.block + m.count {
                                model.remove(&(m.volume, b));
                                floor.remove(&(m.volume, b));
                            }
                        }
                        continue;
                    }
                    if m.op == EngineOp::Write {
                        if !allocated.contains(&chunk) {
                            let covered = (m.block..m.block + m.count).all(|b| {
                                tomb.get(&(m.volume, b)).is_some_and(|t| versions[i] <= *t)
                            });
                            if covered {
                                continue; // a late write, older than the discard
                            }
                            allocated.insert(chunk);
                            for k in chunk_blocks(chunk) {
                                if let Some(t) = tomb.remove(&k) {
                                    floor.insert(k, t);
                                }
                            }
                        }
                    } else if !allocated.contains(&chunk) {
                        // Zeroes over nothing: the version is kept, for
                        // the blocks zeroed.
                        for b in m.block..m.block + m.count {
                            let t = tomb.entry((m.volume, b)).or_insert(0);
                            *t = (*t).max(versions[i]);
                        }
                        continue;
                    }
                    for b in m.block..m.block + m.count {
                        let fl = floor.get(&(m.volume, b)).copied().unwrap_or(0);
                        let e = model.entry((m.volume, b)).or_insert((0, [None; SECTORS]));
                        if versions[i] > e.0.max(fl) {
                            e.0 = versions[i];
                            let (first, n) = m.sectors.unwrap_or((0, SECTORS as u64));
                            for s in first..first + n {
                                e.1[s as usize] = (m.op == EngineOp::Write).then_some(m.seed);
                            }
                        }
                    }
                }
                // A whole-chunk discard that leaves its chunk empty releases
                // the slot; its highest version stays in memory (`tomb`).
                for m in muts
                    .iter()
                    .filter(|m| m.op == EngineOp::Discard && m.count == CHUNK_BLOCKS)
                {
                    let chunk = (m.volume, m.block / CHUNK_BLOCKS);
                    let empty = (m.block..m.block + m.count).all(|b| {
                        model
                            .get(&(m.volume, b))
                            .is_none_or(|e| e.1.iter().all(|s| s.is_none()))
                    });
                    if allocated.contains(&chunk) && empty {
                        let top = (m.block..m.block + m.count)
                            .map(|b| {
                                let fl = floor.remove(&(m.volume, b)).unwrap_or(0);
                                model.get(&(m.volume, b)).map_or(0, |e| e.0).max(fl)
                            })
                            .max()
                            .unwrap_or(0);
                        for k in chunk_blocks(chunk) {
                            tomb.insert(k, top);
                        }
                        allocated.remove(&chunk);
                        for b in m.block..m.block + m.count {
                            model.remove(&(m.volume, b));
                        }
                    }
                }
            }
            Step::Read {
                volume,
                block,
                count,
            } => {
                let got = read(sh, volume, block * BS as u64, count as usize).expect("read");
                let mut want = vec![0u8; BS];
                for i in 0..count {
                    let b = block + i;
                    expected(&model, volume, b, &mut want);
                    assert!(
                        got[i as usize * BS..(i as usize + 1) * BS] == want[..],
                        "volume {volume} block {b}: content differs from the model"
                    );
                }
            }
            Step::Reopen => {
                tomb.clear();
                floor.clear();
                shard.take().expect("shard").close().expect("close");
                shard = Some(open_shard(&path));
            }
            Step::CrashReopen => {
                tomb.clear();
                floor.clear();
                // Everything acknowledged must survive a drop without close.
                drop(shard.take());
                shard = Some(open_shard(&path));
            }
        }
    }
    // Final full comparison, after a crash reopen.
    drop(shard.take());
    let mut sh = open_shard(&path);
    let mut want = vec![0u8; BS];
    for volume in 0..VOLUMES {
        for chunk in 0..CHUNKS {
            let got = read(
                &mut sh,
                volume,
                chunk * CHUNK_BLOCKS * BS as u64,
                CHUNK_BLOCKS as usize,
            )
            .expect("read");
            for i in 0..CHUNK_BLOCKS {
                let b = chunk * CHUNK_BLOCKS + i;
                expected(&model, volume, b, &mut want);
                assert!(
                    got[i as usize * BS..(i as usize + 1) * BS] == want[..],
                    "final: volume {volume} block {b}"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
    #[test]
    fn engine_matches_model(steps in prop::collection::vec(step(), 1..60)) {
        run(steps);
    }
}

/// Release orders itself between the chunk's ops: a write already running
/// when it arrives is forgotten with the chunk; a write submitted after it
/// (even with an older version) lands on a fresh slot; a partial release is
/// refused; releasing a chunk that holds nothing completes at once. The
/// result survives a crash reopen, and the slot is free for reuse.
#[test]
fn release_forgets_the_chunk_between_the_ops_around_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = small_disk(&dir);
    let mut sh = open_shard(&path);
    let chunk_bytes = sh.geometry().chunk_bytes();
    let (volume, chunk) = (1u64, 2u64);
    let at = chunk * chunk_bytes;
    let mut first = AlignedBuf::new(4);
    let mut second = AlignedBuf::new(4);
    for i in 0..4 {
        pattern(11, i, &mut first[i as usize * BS..(i as usize + 1) * BS]);
        pattern(22, i, &mut second[i as usize * BS..(i as usize + 1) * BS]);
    }
    // The chunk already holds data at a high version.
    let mut old = AlignedBuf::new(1);
    pattern(5, 9, &mut old[..]);
    common::write(&mut sh, volume, at + 9 * BS as u64, &mut old, 5_000).expect("write");
    let allocated = sh.allocated_chunks();
    let s1 = [seg(&mut first, 0, 4 * BS)];
    let s2 = [seg(&mut second, 0, 4 * BS)];
    let reqs = [
        EngineRequest {
            op: EngineOp::Write,
            volume,
            offset_bytes: at,
            len_bytes: 4 * BS as u64,
            segments: &s1,
            version: 6_000,
            epoch: 1,
            tag: 1,
            chain: &[],
            block_crc: None,
        },
        EngineRequest {
            op: EngineOp::Release,
            volume,
            offset_bytes: at,
            len_bytes: chunk_bytes,
            segments: &[],
            version: 0,
            epoch: 1,
            tag: 2,
            chain: &[],
            block_crc: None,
        },
        EngineRequest {
            op: EngineOp::Write,
            volume,
            offset_bytes: at + 4 * BS as u64,
            len_bytes: 4 * BS as u64,
            segments: &s2,
            version: 1, // older than anything the chunk held
            epoch: 1,
            tag: 3,
            chain: &[],
            block_crc: None,
        },
    ];
    for r in &reqs {
        // SAFETY: the buffers outlive the completions awaited below.
        unsafe { sh.submit(r) }.expect("submit");
    }
    let mut done = Vec::new();
    while done.len() < 3 {
        sh.wait(&mut |c: Completion| {
            c.result.as_ref().expect("op");
            done.push(c.tag)
        });
    }
    assert_eq!(sh.allocated_chunks(), allocated, "one slot: the new one");
    let check = |sh: &mut Shard| {
        let got = read(sh, volume, at, 16).expect("read");
        assert!(
            got[..4 * BS].iter().all(|b| *b == 0),
            "the running write went with the chunk"
        );
        assert_eq!(
            &got[4 * BS..8 * BS],
            &second[..],
            "the later write applies at version 1"
        );
        assert!(
            got[8 * BS..].iter().all(|b| *b == 0),
            "the old block is gone"
        );
    };
    check(&mut sh);
    drop(sh); // crash
    let mut sh = open_shard(&path);
    check(&mut sh);
    // Partial releases are refused; an empty chunk releases at once.
    let partial = EngineRequest {
        op: EngineOp::Release,
        volume,
        offset_bytes: at,
        len_bytes: 4 * BS as u64,
        segments: &[],
        version: 0,
        epoch: 1,
        tag: 4,
        chain: &[],
        block_crc: None,
    };
    // SAFETY: no segments.
    assert!(unsafe { sh.submit(&partial) }.is_err());
    let empty = EngineRequest {
        op: EngineOp::Release,
        offset_bytes: 5 * chunk_bytes,
        len_bytes: chunk_bytes,
        ..partial
    };
    common::run_one(&mut sh, &empty).expect("release of nothing");
    let whole = EngineRequest {
        len_bytes: chunk_bytes,
        ..partial
    };
    common::run_one(&mut sh, &whole).expect("release");
    assert_eq!(sh.allocated_chunks(), allocated - 1);
    assert!(read(&mut sh, volume, at, 16)
        .expect("read")
        .iter()
        .all(|b| *b == 0));
}

/// A whole-chunk discard that frees the slot keeps the chunk's highest
/// version in memory: a late write at or below it (a replica's copy of a
/// write the client already retried, then discarded) is dropped, on the
/// freed chunk and on every block of a slot allocated again for it, while
/// newer writes apply. A restart forgets it (every connection, and with
/// them any late write, is gone then).
#[test]
fn a_late_write_after_a_discard_freed_the_chunk_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = small_disk(&dir);
    let mut sh = open_shard(&path);
    let chunk_bytes = sh.geometry().chunk_bytes();
    let at = 3 * chunk_bytes;
    let block = |b: u64| at + b * BS as u64;
    let data = |seed: u64| {
        let mut buf = AlignedBuf::new(1);
        pattern(seed, 0, &mut buf[..]);
        buf
    };
    let write_at = |sh: &mut Shard, b: u64, seed: u64, version: u64| {
        let mut buf = data(seed);
        common::write(sh, 1, block(b), &mut buf, version).expect("write")
    };
    let read_at = |sh: &mut Shard, b: u64| read(sh, 1, block(b), 1).expect("read");
    let before = sh.allocated_chunks();
    assert_eq!(write_at(&mut sh, 0, 1, 100), 1);
    let discard = zeroing(EngineOp::Discard, at, chunk_bytes, 200);
    common::run_one(&mut sh, &discard).expect("discard");
    assert_eq!(sh.allocated_chunks(), before, "the discard freed the slot");
    // Late: dropped, nothing allocated, zeroes read.
    assert_eq!(write_at(&mut sh, 3, 2, 150), 0);
    assert_eq!(sh.allocated_chunks(), before);
    assert!(read_at(&mut sh, 3).iter().all(|b| *b == 0));
    // Newer: applies, in a new slot that still drops the late ones.
    assert_eq!(write_at(&mut sh, 5, 3, 300), 1);
    assert_eq!(
        write_at(&mut sh, 7, 4, 180),
        0,
        "late write on the new slot"
    );
    assert!(read_at(&mut sh, 7).iter().all(|b| *b == 0));
    assert_eq!(write_at(&mut sh, 7, 5, 310), 1);
    assert_eq!(&read_at(&mut sh, 5)[..], &data(3)[..]);
    assert_eq!(&read_at(&mut sh, 7)[..], &data(5)[..]);
    // After a restart the floor is gone (in memory only).
    drop(sh);
    let mut sh = open_shard(&path);
    assert_eq!(write_at(&mut sh, 9, 6, 50), 1);
    assert_eq!(&read_at(&mut sh, 9)[..], &data(6)[..]);
}

/// A discard or zeroing of a chunk that holds no slot keeps its version
/// like a discard that freed the slot: a write older than it that arrives
/// later is dropped, as on a replica where the write came first and the
/// zeroing replaced it. Without it the data-path simulator saw replicas
/// differ: a discard of a chunk already freed raced a write older than it;
/// the replica that got the discard first kept the write. And a write older
/// than a zeroing of a never-written chunk likewise.
#[test]
fn zeroing_a_chunk_without_a_slot_drops_older_writes_that_come_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = small_disk(&dir);
    let mut sh = open_shard(&path);
    let chunk_bytes = sh.geometry().chunk_bytes();
    let write_at = |sh: &mut Shard, at: u64, seed: u64, version: u64| {
        let mut buf = AlignedBuf::new(1);
        pattern(seed, 0, &mut buf[..]);
        common::write(sh, 1, at, &mut buf, version).expect("write")
    };
    let zeroes =
        |sh: &mut Shard, at: u64| read(sh, 1, at, 1).expect("read").iter().all(|b| *b == 0);
    let before = sh.allocated_chunks();
    // A chunk freed by a discard at 200, discarded again at 400.
    let a = 3 * chunk_bytes;
    assert_eq!(write_at(&mut sh, a, 1, 100), 1);
    common::run_one(&mut sh, &zeroing(EngineOp::Discard, a, chunk_bytes, 200)).expect("discard");
    assert_eq!(sh.allocated_chunks(), before);
    common::run_one(&mut sh, &zeroing(EngineOp::Discard, a, chunk_bytes, 400)).expect("discard");
    assert_eq!(
        write_at(&mut sh, a + BS as u64, 2, 300),
        0,
        "older than the second discard"
    );
    assert!(zeroes(&mut sh, a + BS as u64));
    assert_eq!(sh.allocated_chunks(), before);
    // A chunk never written, one block of it zeroed at 500.
    let b = 5 * chunk_bytes;
    common::run_one(&mut sh, &zeroing(EngineOp::WriteZeroes, b, BS as u64, 500)).expect("zeroes");
    assert_eq!(write_at(&mut sh, b, 3, 450), 0, "older than the zeroing");
    assert!(zeroes(&mut sh, b));
    // Newer writes apply.
    assert_eq!(write_at(&mut sh, a + BS as u64, 4, 410), 1);
    assert_eq!(write_at(&mut sh, b, 5, 510), 1);
    assert!(!zeroes(&mut sh, a + BS as u64));
    assert!(!zeroes(&mut sh, b));
}

/// A zeroing (`op`: Discard or WriteZeroes) of volume 1.
fn zeroing(op: EngineOp, at: u64, len: u64, version: u64) -> EngineRequest<'static> {
    EngineRequest {
        op,
        volume: 1,
        offset_bytes: at,
        len_bytes: len,
        segments: &[],
        version,
        epoch: 1,
        tag: 5,
        chain: &[],
        block_crc: None,
    }
}

/// What a backfill source reports for blocks a discard emptied: `Zero` at
/// the discard's version, for a chunk left without a slot and for the
/// blocks not written since in a slot allocated after it. A member copying
/// the range then zeroes the older data it holds there. Reported as never
/// written (version 0), the copy skipped them and the member kept that
/// data (the data-path simulator with route changes found it).
#[test]
fn block_states_report_blocks_a_discard_emptied_as_zeroed_at_its_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = small_disk(&dir);
    let mut sh = open_shard(&path);
    let chunk_bytes = sh.geometry().chunk_bytes();
    let a = 2 * chunk_bytes;
    let mut buf = AlignedBuf::new(1);
    pattern(1, 0, &mut buf[..]);
    assert_eq!(
        common::write(&mut sh, 1, a, &mut buf, 100).expect("write"),
        1
    );
    let discard = zeroing(EngineOp::Discard, a, chunk_bytes, 200);
    common::run_one(&mut sh, &discard).expect("discard");
    let mut states = [(BlockKind::Unwritten, 0u64); 4];
    assert!(
        !sh.block_states(1, a, &mut states),
        "the discard freed the slot"
    );
    assert_eq!(states, [(BlockKind::Zero, 200); 4]);
    assert!(sh.discarded_chunks().contains(&(1, 2)));
    // A write allocates a slot again: its block is data, the others stay
    // zeroed at the discard's version.
    assert_eq!(
        common::write(&mut sh, 1, a + BS as u64, &mut buf, 300).expect("write"),
        1
    );
    assert!(sh.block_states(1, a, &mut states));
    assert_eq!(
        states,
        [
            (BlockKind::Zero, 200),
            (BlockKind::Data, 300),
            (BlockKind::Zero, 200),
            (BlockKind::Zero, 200)
        ]
    );
    assert!(!sh.discarded_chunks().contains(&(1, 2)));
    // A chunk never written or discarded: never written.
    assert!(!sh.block_states(1, 4 * chunk_bytes, &mut states));
    assert_eq!(states, [(BlockKind::Unwritten, 0); 4]);
}

/// A zeroing of part of a chunk that holds no slot keeps its version for
/// the blocks it zeroed only: an older write to another block of the chunk
/// applies. Kept for the whole chunk, it dropped such a write silently, and
/// a member copying a partition (whose data runs are older than a zeroing
/// of another block) lost them (the data-path simulator, route changes).
#[test]
fn zeroing_part_of_an_empty_chunk_keeps_its_version_for_those_blocks_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = small_disk(&dir);
    let mut sh = open_shard(&path);
    let chunk_bytes = sh.geometry().chunk_bytes();
    let c = 6 * chunk_bytes;
    let zero = zeroing(EngineOp::WriteZeroes, c + 2 * BS as u64, 2 * BS as u64, 500);
    common::run_one(&mut sh, &zero).expect("zeroes");
    let mut states = [(BlockKind::Unwritten, 0u64); 5];
    assert!(!sh.block_states(1, c, &mut states));
    assert_eq!(
        states,
        [
            (BlockKind::Unwritten, 0),
            (BlockKind::Unwritten, 0),
            (BlockKind::Zero, 500),
            (BlockKind::Zero, 500),
            (BlockKind::Unwritten, 0)
        ]
    );
    let mut buf = AlignedBuf::new(1);
    pattern(7, 0, &mut buf[..]);
    // Older than the zeroing, on a zeroed block: dropped.
    assert_eq!(
        common::write(&mut sh, 1, c + 3 * BS as u64, &mut buf, 450).expect("write"),
        0
    );
    // Older than the zeroing, on another block: applied.
    assert_eq!(
        common::write(&mut sh, 1, c, &mut buf, 450).expect("write"),
        1
    );
    assert!(sh.block_states(1, c, &mut states));
    assert_eq!(states[0], (BlockKind::Data, 450));
    assert_eq!(states[2], (BlockKind::Zero, 500));
    assert_eq!(states[3], (BlockKind::Zero, 500));
    // The new slot still drops older writes to the zeroed blocks.
    assert_eq!(
        common::write(&mut sh, 1, c + 2 * BS as u64, &mut buf, 480).expect("write"),
        0
    );
    assert_eq!(
        common::write(&mut sh, 1, c + 2 * BS as u64, &mut buf, 520).expect("write"),
        1
    );
}

/// The versions of chunks left without a slot live in memory; the shard's
/// discard floor stands for them across a restart (the storage node
/// refuses client writes at or below it for a while, see
/// `Shard::restart_floor`). After a crash (the journal's Free and Floor
/// records) and after the journal was reused (the checkpoint's index), a
/// reopened shard's floor covers every such discard it acknowledged; a
/// zeroing of an empty chunk journals a floor only when the one already
/// durable does not cover it.
#[test]
fn the_discard_floor_survives_crashes_and_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = small_disk(&dir);
    let mut sh = open_shard(&path);
    assert_eq!(sh.restart_floor(), 0, "a fresh disk has no floor");
    let chunk_bytes = sh.geometry().chunk_bytes();
    let chunk_blocks = (chunk_bytes / BS as u64) as usize;
    let discard = |sh: &mut Shard, chunk: u64, version: u64| {
        common::zero(
            sh,
            EngineOp::Discard,
            1,
            chunk * chunk_bytes,
            chunk_blocks,
            version,
        )
        .expect("discard");
    };
    let write_at = |sh: &mut Shard, at: u64, seed: u64, version: u64| {
        let mut buf = AlignedBuf::new(1);
        pattern(seed, 0, &mut buf[..]);
        common::write(sh, 1, at, &mut buf, version).expect("write")
    };
    // A discard that frees a slot: its Free record carries the version.
    assert_eq!(write_at(&mut sh, 2 * chunk_bytes, 1, 100), 1);
    let allocated = sh.allocated_chunks();
    discard(&mut sh, 2, 200);
    assert_eq!(sh.allocated_chunks(), allocated - 1, "the slot is freed");
    drop(sh); // crash
    let mut sh = open_shard(&path);
    assert_eq!(sh.restart_floor(), 200, "the Free record's version");
    // A zeroing of a chunk that holds no slot journals its version.
    let journal = sh.stats().journal_bytes_written;
    discard(&mut sh, 4, 5_000);
    assert!(
        sh.stats().journal_bytes_written > journal,
        "the floor was journaled"
    );
    assert_eq!(sh.discard_floor(), 5_000);
    // One at or under the durable floor journals nothing.
    let journal = sh.stats().journal_bytes_written;
    discard(&mut sh, 5, 4_000);
    discard(&mut sh, 4, 5_000);
    assert_eq!(sh.stats().journal_bytes_written, journal);
    // A newer one does.
    discard(&mut sh, 5, 6_000);
    assert!(sh.stats().journal_bytes_written > journal);
    let floor = sh.discard_floor();
    assert_eq!(floor, 6_000);
    drop(sh); // crash
    let mut sh = open_shard(&path);
    assert_eq!(sh.restart_floor(), floor, "the Floor record");
    // Writes until the journal ring was reused several times (checkpoints
    // move its tail): the floor is the index's now.
    let before = sh.stats().checkpoints;
    for i in 0..400u64 {
        assert_eq!(write_at(&mut sh, (i % 32) * 4096, i, 10_000 + i), 1);
    }
    assert!(sh.stats().checkpoints >= before + 3, "the ring was reused");
    drop(sh); // crash
    let sh = open_shard(&path);
    assert_eq!(sh.restart_floor(), floor, "the checkpoint's index");
    sh.close().expect("close");
    let mut sh = open_shard(&path);
    assert_eq!(sh.restart_floor(), floor, "after a clean close");
    // A trim of 64 empty chunks submitted together (a client at depth 64):
    // their Floor records share journal blocks.
    let journal = sh.stats().journal_bytes_written;
    let trim: Vec<EngineRequest> = (0..64u64)
        .map(|c| EngineRequest {
            op: EngineOp::Discard,
            volume: 2,
            offset_bytes: c * chunk_bytes,
            len_bytes: chunk_bytes,
            segments: &[],
            version: 20_000 + c,
            epoch: 1,
            tag: c,
            chain: &[],
            block_crc: None,
        })
        .collect();
    for req in &trim {
        // SAFETY: no buffers.
        unsafe { sh.submit(req).expect("submit") };
    }
    let mut done = 0;
    while done < trim.len() {
        sh.wait(&mut |c: Completion| {
            assert!(c.result.is_ok(), "{c:?}");
            done += 1;
        });
    }
    let blocks = (sh.stats().journal_bytes_written - journal) / 4096;
    assert!(blocks <= 2, "{blocks} journal blocks for 64 zeroings");
    drop(sh); // crash
    let sh = open_shard(&path);
    assert_eq!(sh.restart_floor(), 20_063);
}

/// Sector writes of one block, submitted together as several writers would
/// (QD > 1, each a different 512-byte sector, versions in submission
/// order), all survive: each merges into the block after the writes before
/// it, including a whole-block write still in flight. An older sector write
/// is not applied and names the newer version. All of it survives a crash
/// reopen. (Breaking the hold, e.g. merging without waiting for the block's
/// running writes, makes sectors go missing here.)
#[test]
fn sector_writes_of_one_block_merge_and_all_survive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = small_disk(&dir);
    let mut sh = open_shard(&path);
    let at = 2 * sh.geometry().chunk_bytes() + 5 * BS as u64;
    let mut whole = AlignedBuf::new(1);
    pattern(1, 0, &mut whole[..]);
    let sectors = [1usize, 3, 4, 6, 7];
    let mut bufs: Vec<AlignedBuf> = sectors
        .iter()
        .map(|&s| {
            let mut b = AlignedBuf::new(1);
            pattern(10 + s as u64, 0, &mut b[..]);
            b
        })
        .collect();
    for round in 0..3u64 {
        let base = 1_000 * (round + 1);
        // New content every round: a merge into a stale base shows.
        pattern(1 + round, 0, &mut whole[..]);
        for (b, &s) in bufs.iter_mut().zip(&sectors) {
            pattern(10 + s as u64 + 100 * round, 0, &mut b[..]);
        }
        let mut segs: Vec<[Segment; 1]> = vec![[seg(&mut whole, 0, BS)]];
        for (b, &s) in bufs.iter_mut().zip(&sectors) {
            segs.push([seg(b, s * SECTOR, SECTOR)]);
        }
        let mut reqs = Vec::new();
        for (i, sg) in segs.iter().enumerate() {
            let (off, len) = if i == 0 {
                (0, BS as u64)
            } else {
                ((sectors[i - 1] * SECTOR) as u64, SECTOR as u64)
            };
            reqs.push(EngineRequest {
                op: EngineOp::Write,
                volume: 1,
                offset_bytes: at + off,
                len_bytes: len,
                segments: sg,
                version: base + i as u64,
                epoch: 1,
                tag: i as u64,
                chain: &[],
                block_crc: None,
            });
        }
        for r in &reqs {
            // SAFETY: the buffers outlive the completions awaited below.
            unsafe { sh.submit(r) }.expect("submit");
        }
        let mut done = 0;
        while done < reqs.len() {
            sh.wait(&mut |c: Completion| {
                assert_eq!(c.result.expect("write"), 1, "tag {} applied", c.tag);
                assert_eq!(c.newer_version, 0);
                done += 1;
            });
        }
        // An older sector write (sector 2): not applied, the newer version named.
        let mut old = AlignedBuf::new(1);
        let stale = EngineRequest {
            op: EngineOp::Write,
            volume: 1,
            offset_bytes: at + 2 * SECTOR as u64,
            len_bytes: SECTOR as u64,
            segments: &[seg(&mut old, 0, SECTOR)],
            version: base - 1,
            epoch: 1,
            tag: 99,
            chain: &[],
            block_crc: None,
        };
        // SAFETY: `old` outlives the wait.
        unsafe { sh.submit(&stale) }.expect("submit");
        let mut newer = None;
        while newer.is_none() {
            sh.wait(&mut |c: Completion| {
                assert_eq!(c.result.expect("stale write"), 0);
                newer = Some(c.newer_version);
            });
        }
        assert_eq!(newer, Some(base + sectors.len() as u64));
        // A sector write, then a whole-block write of another writer whose
        // clock is behind (an older version) while the merge runs: the
        // whole write must not be acknowledged as applied (the merge holds
        // the block; its base did not include it) but refused as older.
        let mut late = AlignedBuf::new(1);
        pattern(7_000 + round, 0, &mut late[..]);
        let mut sec0 = AlignedBuf::new(1);
        pattern(8_000 + round, 0, &mut sec0[..]);
        let merge = EngineRequest {
            op: EngineOp::Write,
            volume: 1,
            offset_bytes: at,
            len_bytes: SECTOR as u64,
            segments: &[seg(&mut sec0, 0, SECTOR)],
            version: base + 500,
            epoch: 1,
            tag: 1,
            chain: &[],
            block_crc: None,
        };
        let behind = EngineRequest {
            op: EngineOp::Write,
            volume: 1,
            offset_bytes: at,
            len_bytes: BS as u64,
            segments: &[seg(&mut late, 0, BS)],
            version: base + 400,
            epoch: 1,
            tag: 2,
            chain: &[],
            block_crc: None,
        };
        // SAFETY: the buffers outlive the wait.
        unsafe {
            sh.submit(&merge).expect("submit");
            sh.submit(&behind).expect("submit");
        }
        let mut results = Vec::new();
        while results.len() < 2 {
            sh.wait(&mut |c: Completion| {
                results.push((c.tag, c.result.expect("write"), c.newer_version))
            });
        }
        results.sort();
        assert_eq!(results, vec![(1, 1, 0), (2, 0, base + 500)]);
        let sector0 = sec0[..SECTOR].to_vec();
        let check = |sh: &mut Shard| {
            let got = read(sh, 1, at, 1).expect("read");
            for s in 0..SECTORS {
                let want = match sectors.iter().position(|&x| x == s) {
                    Some(i) => &bufs[i][s * SECTOR..(s + 1) * SECTOR],
                    None if s == 0 => &sector0[..],
                    None => &whole[s * SECTOR..(s + 1) * SECTOR],
                };
                assert!(
                    &got[s * SECTOR..(s + 1) * SECTOR] == want,
                    "round {round}: sector {s} lost"
                );
            }
        };
        check(&mut sh);
        drop(sh); // crash
        sh = open_shard(&path);
        check(&mut sh);
    }
    // Misaligned sector writes and sector writes across blocks are refused.
    let mut b = AlignedBuf::new(2);
    for (off, len) in [(256u64, 512usize), (3584, 1024), (0, 4096 + 512)] {
        let r = EngineRequest {
            op: EngineOp::Write,
            volume: 1,
            offset_bytes: at + off,
            len_bytes: len as u64,
            segments: &[seg(&mut b, 0, len)],
            version: 10_000,
            epoch: 1,
            tag: 7,
            chain: &[],
            block_crc: None,
        };
        // SAFETY: refused before anything is queued.
        assert!(unsafe { sh.submit(&r) }.is_err(), "{off} +{len} refused");
    }
}
