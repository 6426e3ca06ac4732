//! Corruption, metadata loss and rebuild, bad input, and several shards
//! driven from their own threads.

mod common;

use std::os::unix::fs::FileExt;

use celer_engine::{
    AlignedBuf, Completion, Engine, EngineError, EngineOp, EngineRequest, FormatOptions,
    OpenOptions, Segment,
};
use common::*;

fn filled(seed: u64, first_block: u64, blocks: usize) -> AlignedBuf {
    let mut b = AlignedBuf::new(blocks);
    for i in 0..blocks {
        pattern(seed, first_block + i as u64, &mut b[i * BS..(i + 1) * BS]);
    }
    b
}

fn expect_pattern(got: &[u8], seed: u64, first_block: u64) {
    let mut want = vec![0u8; BS];
    for (i, blk) in got.chunks(BS).enumerate() {
        pattern(seed, first_block + i as u64, &mut want);
        assert!(blk == &want[..], "block {} differs", first_block + i as u64);
    }
}

#[test]
fn flipped_bytes_on_disk_give_a_checksum_error_not_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk");
    Engine::format(&path, &small_format(1, 8 << 20)).expect("format");
    let mut sh = Engine::open(&path, &OpenOptions::default())
        .expect("open")
        .into_shards()
        .remove(0);
    write(&mut sh, 3, 0, &mut filled(1, 0, 8), 10).expect("write");
    let at = sh.locate(3, 5 * BS as u64).expect("block 5 has data");
    sh.close().expect("close");

    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("raw open");
    let mut b = [0u8; 3];
    f.read_exact_at(&mut b, at + 1000).expect("raw read");
    for x in b.iter_mut() {
        *x ^= 0x5A;
    }
    f.write_all_at(&b, at + 1000).expect("raw write");
    f.sync_all().expect("sync");

    let mut sh = Engine::open(&path, &OpenOptions::default())
        .expect("reopen")
        .into_shards()
        .remove(0);
    match read(&mut sh, 3, 0, 8) {
        Err(EngineError::Checksum {
            volume: 3,
            offset_bytes,
        }) => assert_eq!(offset_bytes, 5 * BS as u64),
        other => panic!("expected a checksum error, got {:?}", other.map(|_| "data")),
    }
    // The intact neighbours still read.
    expect_pattern(&read(&mut sh, 3, 0, 5).expect("blocks 0-4"), 1, 0);
    expect_pattern(
        &read(&mut sh, 3, 6 * BS as u64, 2).expect("blocks 6-7"),
        1,
        6,
    );
    // Rewriting the block heals it.
    write(&mut sh, 3, 5 * BS as u64, &mut filled(2, 5, 1), 11).expect("rewrite");
    expect_pattern(&read(&mut sh, 3, 5 * BS as u64, 1).expect("healed"), 2, 5);
}

/// A one-block write's crc given by the caller (the node passes the
/// client's frame crc) is the one stored: data changed after it was
/// computed reads back as a checksum error, never as good data, also after
/// a restart; a right crc reads back; for a larger write it is ignored.
#[test]
fn a_given_block_crc_is_stored_so_data_changed_after_it_is_caught() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk");
    Engine::format(&path, &small_format(1, 8 << 20)).expect("format");
    let open = || open_one_shard(&path);
    let mut sh = open();
    let write_with = |sh: &mut celer_engine::Shard,
                      block: u64,
                      data: &mut AlignedBuf,
                      crc: u32,
                      version: u64| {
        let len = data.len();
        let s = [seg(data, 0, len)];
        run_one(
            sh,
            &EngineRequest {
                op: EngineOp::Write,
                volume: 4,
                offset_bytes: block * BS as u64,
                len_bytes: len as u64,
                segments: &s,
                version,
                epoch: 1,
                tag: 3,
                chain: &[],
                block_crc: Some(crc),
            },
        )
    };
    // Block 1: the caller's crc, then its buffer changed before the write
    // (as a bad copy would change it).
    let mut good = filled(5, 1, 1);
    let crc = crc32c::crc32c(&good);
    let mut changed = filled(5, 1, 1);
    changed[100] ^= 1;
    write_with(&mut sh, 1, &mut changed, crc, 21).expect("write block 1");
    // Block 2: data and crc agree.
    let mut two = filled(5, 2, 1);
    let two_crc = crc32c::crc32c(&two);
    write_with(&mut sh, 2, &mut two, two_crc, 22).expect("write block 2");
    // Blocks 4-5 in one write: the crc is ignored (it covers neither).
    write_with(&mut sh, 4, &mut filled(5, 4, 2), 0, 24).expect("write blocks 4-5");
    for round in ["before a restart", "after a restart"] {
        match read(&mut sh, 4, BS as u64, 1) {
            Err(EngineError::Checksum { volume: 4, .. }) => {}
            other => panic!(
                "{round}: block 1: expected a checksum error, got {:?}",
                other.map(|_| "data")
            ),
        }
        expect_pattern(&read(&mut sh, 4, 2 * BS as u64, 1).expect("block 2"), 5, 2);
        expect_pattern(
            &read(&mut sh, 4, 4 * BS as u64, 2).expect("blocks 4-5"),
            5,
            4,
        );
        sh.close().expect("close");
        sh = open();
    }
    // Rewritten with its right crc, block 1 heals.
    write_with(&mut sh, 1, &mut good, crc, 30).expect("rewrite block 1");
    expect_pattern(&read(&mut sh, 4, BS as u64, 1).expect("block 1"), 5, 1);
}

/// The one shard of the engine on `path`.
fn open_one_shard(path: &std::path::Path) -> celer_engine::Shard {
    Engine::open(path, &OpenOptions::default())
        .expect("open")
        .into_shards()
        .remove(0)
}

/// Flips bytes of the block stored at `at` on the disk file.
fn flip(path: &std::path::Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("raw open");
    let mut b = [0u8; 3];
    f.read_exact_at(&mut b, at + 1000).expect("raw read");
    for x in b.iter_mut() {
        *x ^= 0x5A;
    }
    f.write_all_at(&b, at + 1000).expect("raw write");
    f.sync_all().expect("sync");
}

fn repair(
    sh: &mut celer_engine::Shard,
    volume: u64,
    offset: u64,
    data: &mut AlignedBuf,
    version: u64,
) -> Result<u32, EngineError> {
    let len = data.len();
    let s = [seg(data, 0, len)];
    run_one(
        sh,
        &EngineRequest {
            op: EngineOp::Repair,
            volume,
            offset_bytes: offset,
            len_bytes: len as u64,
            segments: &s,
            version,
            epoch: 1,
            tag: 7,
            chain: &[],
            block_crc: None,
        },
    )
}

/// `Repair` rewrites a damaged block at the version a good copy holds (a
/// `Write` of that version is skipped as a retry), refuses an older one,
/// loses to a newer client write, and the repaired block survives a crash
/// (its journal record replays over the checkpointed entry of the same
/// version).
#[test]
fn a_repair_rewrites_a_damaged_block_at_its_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk");
    Engine::format(&path, &small_format(1, 8 << 20)).expect("format");
    let open = || open_one_shard(&path);
    let mut sh = open();
    let b5 = 5 * BS as u64;
    write(&mut sh, 3, 0, &mut filled(1, 0, 8), 10).expect("write");
    write(&mut sh, 3, 6 * BS as u64, &mut filled(1, 6, 1), 12).expect("write");
    let at = sh.locate(3, b5).expect("block 5 has data");
    sh.close().expect("close");
    flip(&path, at);
    let mut sh = open();
    assert!(matches!(
        read(&mut sh, 3, b5, 1),
        Err(EngineError::Checksum { .. })
    ));
    // A Write of the same version is taken for a retry: nothing changes.
    write(&mut sh, 3, b5, &mut filled(1, 5, 1), 10).expect("write");
    assert!(
        matches!(read(&mut sh, 3, b5, 1), Err(EngineError::Checksum { .. })),
        "a Write of an equal version must not apply"
    );
    // An older copy does not apply either.
    let s = [seg(&mut filled(9, 5, 1), 0, BS)];
    let older = EngineRequest {
        op: EngineOp::Repair,
        volume: 3,
        offset_bytes: b5,
        len_bytes: BS as u64,
        segments: &s,
        version: 9,
        epoch: 1,
        tag: 7,
        chain: &[],
        block_crc: None,
    };
    run_one(&mut sh, &older).expect("older repair");
    assert!(matches!(
        read(&mut sh, 3, b5, 1),
        Err(EngineError::Checksum { .. })
    ));
    // The good copy at its version heals it.
    repair(&mut sh, 3, b5, &mut filled(1, 5, 1), 10).expect("repair");
    expect_pattern(&read(&mut sh, 3, b5, 1).expect("repaired"), 1, 5);
    // A block holding a newer version keeps it.
    repair(&mut sh, 3, 6 * BS as u64, &mut filled(8, 6, 1), 11).expect("repair");
    expect_pattern(
        &read(&mut sh, 3, 6 * BS as u64, 1).expect("newer kept"),
        1,
        6,
    );
    // Crash (no checkpoint): the repair replays from the journal over the
    // checkpoint's damaged entry of the same version.
    drop(sh);
    let mut sh = open();
    expect_pattern(&read(&mut sh, 3, 0, 5).expect("blocks 0-4"), 1, 0);
    expect_pattern(&read(&mut sh, 3, b5, 1).expect("still repaired"), 1, 5);
    expect_pattern(&read(&mut sh, 3, 6 * BS as u64, 1).expect("block 6"), 1, 6);
    // A newer client write after a repair applies as usual.
    write(&mut sh, 3, b5, &mut filled(4, 5, 1), 11).expect("newer write");
    expect_pattern(&read(&mut sh, 3, b5, 1).expect("newer"), 4, 5);
    // A repair of a block in a chunk this shard holds nothing of (a write
    // it missed, its chunk's first) allocates the chunk like a write does,
    // and survives a crash.
    let chunk_bytes = sh.geometry().chunk_bytes();
    let elsewhere = 2 * chunk_bytes + 3 * BS as u64;
    let first = elsewhere / BS as u64;
    repair(&mut sh, 3, elsewhere, &mut filled(6, first, 1), 20).expect("repair");
    expect_pattern(&read(&mut sh, 3, elsewhere, 1).expect("copied"), 6, first);
    drop(sh);
    let mut sh = open();
    expect_pattern(
        &read(&mut sh, 3, elsewhere, 1).expect("copied, after a crash"),
        6,
        first,
    );
    sh.close().expect("close");
}

/// Writes a mixed history: several chunks and volumes, overwrites,
/// zeroes, a released chunk. Returns what each (volume, block) must read as.
fn write_history(sh: &mut celer_engine::Shard) -> Vec<(u64, u64, Option<u64>)> {
    let mut expect = Vec::new();
    for volume in 0..2u64 {
        for chunk in 0..5u64 {
            let first = chunk * 16;
            write(
                sh,
                volume,
                first * BS as u64,
                &mut filled(volume * 100 + chunk, first, 16),
                10,
            )
            .expect("write");
        }
        // Overwrite part of chunk 1 (goes to spare blocks).
        write(sh, volume, 18 * BS as u64, &mut filled(7, 18, 3), 20).expect("overwrite");
        zero(sh, EngineOp::WriteZeroes, volume, 40 * BS as u64, 4, 30).expect("zeroes");
        zero(sh, EngineOp::Discard, volume, 64 * BS as u64, 16, 40).expect("discard chunk 4");
        for b in 0..80u64 {
            let seed = match b {
                18..=20 => Some(7),
                40..=43 | 64..=79 => None,
                _ => Some(volume * 100 + b / 16),
            };
            expect.push((volume, b, seed));
        }
    }
    expect
}

fn check_history(sh: &mut celer_engine::Shard, expect: &[(u64, u64, Option<u64>)]) {
    let mut want = vec![0u8; BS];
    for &(volume, b, seed) in expect {
        let got = read(sh, volume, b * BS as u64, 1)
            .unwrap_or_else(|e| panic!("volume {volume} block {b}: {e}"));
        match seed {
            Some(s) => pattern(s, b, &mut want),
            None => want.fill(0),
        }
        assert!(got[..] == want[..], "volume {volume} block {b} differs");
    }
}

fn wipe(path: &std::path::Path, from: u64, to: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("raw open");
    f.write_all_at(&vec![0u8; (to - from) as usize], from)
        .expect("wipe");
    f.sync_all().expect("sync");
}

#[test]
fn rebuild_from_chunk_headers_after_losing_index_and_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk");
    let g = Engine::format(&path, &small_format(2, 16 << 20)).expect("format");
    let engine = Engine::open(&path, &OpenOptions::default()).expect("open");
    let mut expect = Vec::new();
    // Each chunk is written through the shard that owns it.
    let mut shards = engine.into_shards();
    for volume in 0..2u64 {
        for chunk in 0..5u64 {
            let owner = celer_engine::shard_for(&g, volume, chunk) as usize;
            let first = chunk * 16;
            write(
                &mut shards[owner],
                volume,
                first * BS as u64,
                &mut filled(volume * 100 + chunk, first, 16),
                10,
            )
            .expect("write");
            for b in first..first + 16 {
                expect.push((volume, b, Some(volume * 100 + chunk)));
            }
        }
    }
    for s in shards {
        s.close().expect("close");
    }
    // Lose the whole metadata area (both index copies of every shard) and
    // the journal: only superblock and chunk slots remain.
    wipe(&path, 2 * BS as u64, g.slots_start() * BS as u64);
    match Engine::open(&path, &OpenOptions::default()) {
        Err(EngineError::MetadataDamaged { .. }) => {}
        other => panic!(
            "open without metadata must refuse, got {:?}",
            other.map(|_| "engine")
        ),
    }
    let report = Engine::rebuild(&path).expect("rebuild");
    assert_eq!(report.chunks_found, 10, "{report:?}");
    let mut shards = Engine::open(&path, &OpenOptions::default())
        .expect("open after rebuild")
        .into_shards();
    let mut want = vec![0u8; BS];
    for (volume, b, seed) in expect {
        let owner = celer_engine::shard_for(&g, volume, b / 16) as usize;
        let got = read(&mut shards[owner], volume, b * BS as u64, 1).expect("read after rebuild");
        pattern(seed.expect("data"), b, &mut want);
        assert!(
            got[..] == want[..],
            "volume {volume} block {b} differs after rebuild"
        );
    }
}

#[test]
fn rebuild_after_crash_uses_surviving_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk");
    let g = Engine::format(&path, &small_format(1, 8 << 20)).expect("format");
    let mut sh = Engine::open(&path, &OpenOptions::default())
        .expect("open")
        .into_shards()
        .remove(0);
    let expect = write_history(&mut sh);
    // Crash: no close, so recent changes live only in the journal.
    drop(sh);
    // Lose both index copies, keep the journal.
    wipe(&path, g.index_offset(0, 0), g.slots_start() * BS as u64);
    Engine::rebuild(&path).expect("rebuild");
    let mut sh = Engine::open(&path, &OpenOptions::default())
        .expect("open")
        .into_shards()
        .remove(0);
    check_history(&mut sh, &expect);
    // And the clean path: close, wipe index and journal, rebuild.
    sh.close().expect("close");
    wipe(&path, 2 * BS as u64, g.slots_start() * BS as u64);
    Engine::rebuild(&path).expect("rebuild 2");
    let mut sh = Engine::open(&path, &OpenOptions::default())
        .expect("open 2")
        .into_shards()
        .remove(0);
    check_history(&mut sh, &expect);
    // The released chunk's slot went back to the free list.
    assert_eq!(sh.allocated_chunks(), 8);
}

#[test]
fn bad_requests_get_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk");
    let g = Engine::format(&path, &small_format(2, 8 << 20)).expect("format");
    let mut shards = Engine::open(&path, &OpenOptions::default())
        .expect("open")
        .into_shards();
    let own = celer_engine::shard_for(&g, 1, 0) as usize;
    let sh = &mut shards[own];
    let mut buf = AlignedBuf::new(32);
    let req = |op, offset_bytes, segments: &'static [Segment]| EngineRequest {
        op,
        volume: 1,
        offset_bytes,
        len_bytes: 4096,
        segments,
        version: 5,
        epoch: 1,
        tag: 1,
        chain: &[],
        block_crc: None,
    };
    let leak = |s: Vec<Segment>| -> &'static [Segment] { Box::leak(s.into_boxed_slice()) };
    let base = buf.as_mut_ptr();
    let cases: Vec<(&str, EngineRequest<'static>)> = vec![
        (
            "offset not 4K aligned",
            req(
                EngineOp::Write,
                512,
                leak(vec![Segment {
                    addr: base,
                    len: 4096,
                }]),
            ),
        ),
        (
            "length not a 512-byte multiple",
            req(
                EngineOp::Write,
                0,
                leak(vec![Segment {
                    addr: base,
                    len: 1000,
                }]),
            ),
        ),
        // SAFETY (pointer arithmetic only): inside buf.
        (
            "buffer not 512 aligned",
            req(
                EngineOp::Write,
                0,
                leak(vec![Segment {
                    addr: unsafe { base.add(3) },
                    len: 4096,
                }]),
            ),
        ),
        (
            "crosses a chunk",
            req(
                EngineOp::Write,
                15 * 4096,
                leak(vec![Segment {
                    addr: base,
                    len: 8192,
                }]),
            ),
        ),
        ("empty", req(EngineOp::Read, 0, leak(vec![]))),
        (
            "too many segments",
            req(
                EngineOp::Read,
                0,
                leak(vec![Segment { addr: base, len: 0 }; 300]),
            ),
        ),
    ];
    for (what, r) in cases {
        // SAFETY: rejected requests never touch their buffers; valid ones
        // would stay within buf, which outlives this loop.
        let res = unsafe { sh.submit(&r) };
        assert!(res.is_err(), "{what}: accepted");
        let msg = res.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(!msg.is_empty(), "{what}: no message");
    }
    // A chunk owned by the other shard.
    let other = (0..100u64)
        .find(|c| celer_engine::shard_for(&g, 1, *c) as usize != own)
        .expect("other chunk");
    let r = req(
        EngineOp::Read,
        other * 16 * 4096,
        leak(vec![Segment {
            addr: base,
            len: 4096,
        }]),
    );
    // SAFETY: rejected before use.
    assert!(matches!(
        unsafe { sh.submit(&r) },
        Err(EngineError::WrongShard { .. })
    ));
    // Chunk offsets far out in the u64 range are just chunks: thin, read zero.
    let last_chunk = u64::MAX / (16 * 4096);
    let far = (last_chunk - 64..=last_chunk)
        .rev()
        .find(|c| celer_engine::shard_for(&g, 1, *c) as usize == own)
        .expect("far chunk of this shard");
    let got = read(sh, 1, far * 16 * 4096 + 15 * 4096, 1).expect("far read");
    assert!(got.iter().all(|&b| b == 0));
    drop(buf);
}

#[test]
fn bad_disks_get_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Too small to format.
    let small = dir.path().join("small");
    std::fs::write(&small, vec![0u8; 64 * 1024]).expect("write");
    let e = Engine::format(&small, &small_format(1, 0)).expect_err("too small");
    assert!(matches!(e, EngineError::DiskTooSmall { .. }), "{e}");
    // Foreign content.
    let foreign = dir.path().join("foreign");
    std::fs::write(&foreign, vec![0x42u8; 4 << 20]).expect("write");
    let e = Engine::open(&foreign, &OpenOptions::default())
        .err()
        .expect("foreign");
    assert!(matches!(e, EngineError::NotCeler { .. }), "{e}");
    assert!(e.to_string().contains("celer engine format"), "{e}");
    // Truncated after format.
    let trunc = dir.path().join("trunc");
    Engine::format(&trunc, &small_format(1, 8 << 20)).expect("format");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&trunc)
        .expect("open")
        .set_len(4 << 20)
        .expect("truncate");
    let e = Engine::open(&trunc, &OpenOptions::default())
        .err()
        .expect("truncated");
    assert!(matches!(e, EngineError::Truncated { .. }), "{e}");
    // Tiny file (shorter than a superblock).
    let tiny = dir.path().join("tiny");
    std::fs::write(&tiny, b"hello").expect("write");
    assert!(Engine::open(&tiny, &OpenOptions::default()).is_err());
    // Missing file.
    let e = Engine::open(&dir.path().join("absent"), &OpenOptions::default())
        .err()
        .expect("absent");
    assert!(e.to_string().contains("absent"), "{e}");
    // Damaged superblock (both copies).
    let sb = dir.path().join("sb");
    Engine::format(&sb, &small_format(1, 8 << 20)).expect("format");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&sb)
        .expect("open");
    f.write_all_at(b"XX", 100).expect("w");
    f.write_all_at(b"XX", 4096 + 100).expect("w");
    drop(f);
    let e = Engine::open(&sb, &OpenOptions::default())
        .err()
        .expect("corrupt sb");
    assert!(matches!(e, EngineError::CorruptSuperblock { .. }), "{e}");
    // Bad geometry.
    let e = Engine::format(
        &sb,
        &FormatOptions {
            chunk_blocks: 100,
            ..small_format(1, 0)
        },
    )
    .expect_err("geometry");
    assert!(matches!(e, EngineError::BadConfig(_)), "{e}");
}

#[test]
fn shards_run_on_their_own_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk");
    let g = Engine::format(&path, &small_format(4, 64 << 20)).expect("format");
    let shards = Engine::open(&path, &OpenOptions::default())
        .expect("open")
        .into_shards();
    let handles: Vec<_> = shards
        .into_iter()
        .map(|mut sh| {
            std::thread::spawn(move || {
                let id = sh.id();
                let mine: Vec<u64> = (0..64u64)
                    .filter(|c| celer_engine::shard_for(&g, 9, *c) == id)
                    .collect();
                for round in 0..3u64 {
                    for &c in &mine {
                        write(
                            &mut sh,
                            9,
                            c * 16 * BS as u64,
                            &mut filled(round * 1000 + c, c * 16, 16),
                            10 + round,
                        )
                        .expect("write");
                    }
                }
                for &c in &mine {
                    expect_pattern(
                        &read(&mut sh, 9, c * 16 * BS as u64, 16).expect("read"),
                        2000 + c,
                        c * 16,
                    );
                }
                sh.close().expect("close");
                mine.len()
            })
        })
        .collect();
    let per_shard: Vec<usize> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    // Every shard had chunks of its own to write on its thread.
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "chunks per shard: {per_shard:?}"
    );
    // What each thread wrote through its shard is on disk where the shard
    // map says: reopened, every chunk reads back from the shard that owns
    // it, all on this one thread now.
    let mut shards = Engine::open(&path, &OpenOptions::default())
        .expect("reopen")
        .into_shards();
    for c in 0..64u64 {
        let id = celer_engine::shard_for(&g, 9, c);
        let sh = shards
            .iter_mut()
            .find(|s| s.id() == id)
            .expect("the owning shard");
        expect_pattern(
            &read(sh, 9, c * 16 * BS as u64, 16).expect("read after reopen"),
            2000 + c,
            c * 16,
        );
    }
    for sh in shards {
        sh.close().expect("close");
    }
}

/// One process per disk: while an engine is open, a second open, a
/// format and a rebuild of the same disk are refused (also from another
/// process, as `celer engine check` on a running node's disk); after the
/// engine closes (or its process dies) the disk opens again.
#[test]
fn a_disk_in_use_is_refused_to_a_second_opener() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk");
    Engine::format(&path, &small_format(2, 64 << 20)).expect("format");
    let engine = Engine::open(&path, &OpenOptions::default()).expect("open");
    let in_use = |r: Result<(), EngineError>, what: &str| match r {
        Err(EngineError::InUse { path: p }) => assert!(p.ends_with("disk"), "{p}"),
        other => panic!("{what} of a disk in use: {other:?}"),
    };
    let t0 = std::time::Instant::now();
    in_use(
        Engine::open(&path, &OpenOptions::default()).map(|_| ()),
        "a second open",
    );
    assert!(
        t0.elapsed() >= celer_engine::LOCK_WAIT_DEFAULT,
        "it waited for the holder first"
    );
    in_use(
        Engine::format(&path, &small_format(2, 64 << 20)).map(|_| ()),
        "a format",
    );
    in_use(Engine::rebuild(&path).map(|_| ()), "a rebuild");
    // Another process: `celer engine check` would be `flock` from outside.
    let out = std::process::Command::new("flock")
        .args(["--nonblock", "--exclusive"])
        .arg(&path)
        .arg("true")
        .output()
        .expect("flock(1)");
    assert!(
        !out.status.success(),
        "another process got the disk's lock while the engine holds it"
    );
    let msg = EngineError::InUse { path: "d".into() }.to_string();
    assert!(msg.contains("another process"), "{msg}");
    engine.close().expect("close");
    // Released with the engine.
    let again = Engine::open(&path, &OpenOptions::default()).expect("open after close");
    again.close().expect("close");
}

/// Whole-chunk zeroing and discards, many in flight, on a small journal:
/// each phase journals at most what its room check counted. A zeroing of a
/// whole chunk used to journal every block's record in one phase (256
/// with 1 MiB chunks) after checking room for spare + 2 (18 here), and
/// the shard panicked ("journal_room checked") once the journal was nearly
/// full: a guest's mkfs discards through vhost-user-blk did it.
#[test]
fn many_whole_chunk_zeroings_in_flight_fit_the_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk");
    // 1 MiB chunks (256 records to zero one), a small journal.
    let format = FormatOptions {
        chunk_blocks: 256,
        spare_blocks: 16,
        shard_count: 1,
        journal_blocks: 32,
        create_size_bytes: Some(64 << 20),
    };
    Engine::format(&path, &format).expect("format");
    let mut sh = Engine::open(&path, &OpenOptions::default())
        .expect("open")
        .into_shards()
        .remove(0);
    let chunk = sh.geometry().chunk_bytes();
    let chunks = 32u64;
    for c in 0..chunks {
        write(&mut sh, 1, c * chunk, &mut filled(c, c * 256, 16), 10).expect("write");
    }
    let mut version = 20;
    for round in 0..6u64 {
        let mut inflight = 0;
        for c in 0..chunks {
            let op = if (c + round) % 2 == 0 {
                EngineOp::WriteZeroes
            } else {
                EngineOp::Discard
            };
            version += 1;
            let req = EngineRequest {
                op,
                volume: 1,
                offset_bytes: c * chunk,
                len_bytes: chunk,
                segments: &[],
                version,
                epoch: 1,
                tag: c,
                chain: &[],
                block_crc: None,
            };
            // SAFETY: no buffers.
            match unsafe { sh.submit(&req) } {
                Ok(()) => inflight += 1,
                Err(EngineError::QueueFull { .. }) => break,
                Err(e) => panic!("submit: {e}"),
            }
        }
        while inflight > 0 {
            sh.wait(&mut |c: Completion| {
                c.result.expect("zeroing");
                inflight -= 1;
            });
        }
        // Data again, so the next round zeroes written blocks.
        for c in 0..chunks {
            version += 1;
            write(
                &mut sh,
                1,
                c * chunk,
                &mut filled(round, c * 256, 16),
                version,
            )
            .expect("write");
        }
    }
    let got = read(&mut sh, 1, 0, 16).expect("read");
    expect_pattern(&got, 5, 0);
    sh.close().expect("close");
}
