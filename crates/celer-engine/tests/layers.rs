//! Layers (snapshots and clones): a read through a chain of layer keys takes
//! each block from the first layer that holds it; zeroes and discards in a
//! layer above era 0 hide the layers under it; a sector write merges into
//! the block of a lower layer; all of it survives a reopen.

mod common;

use celer_device::layer_key;
use celer_engine::{
    AlignedBuf, BlockKind, Completion, Engine, EngineError, EngineOp, EngineRequest, OpenOptions,
    Shard,
};
use common::*;

const CHUNK: u64 = 16 * BS as u64;

fn filled(seed: u64, first_block: u64, blocks: usize) -> AlignedBuf {
    let mut b = AlignedBuf::new(blocks);
    for i in 0..blocks {
        pattern(seed, first_block + i as u64, &mut b[i * BS..(i + 1) * BS]);
    }
    b
}

fn read_chain(sh: &mut Shard, key: u64, chain: &[u64], offset: u64, blocks: usize) -> AlignedBuf {
    let mut buf = AlignedBuf::new(blocks);
    buf.fill(0xEE);
    let s = [seg(&mut buf, 0, blocks * BS)];
    let req = EngineRequest {
        op: EngineOp::Read,
        volume: key,
        offset_bytes: offset,
        len_bytes: 0,
        segments: &s,
        version: 0,
        epoch: 0,
        tag: 9,
        chain,
        block_crc: None,
    };
    run_one(sh, &req).expect("read through layers");
    buf
}

fn sector_write(
    sh: &mut Shard,
    key: u64,
    chain: &[u64],
    offset: u64,
    data: &mut AlignedBuf,
    version: u64,
) {
    let s = [seg(data, 0, 512)];
    let req = EngineRequest {
        op: EngineOp::Write,
        volume: key,
        offset_bytes: offset,
        len_bytes: 512,
        segments: &s,
        version,
        epoch: 1,
        tag: 5,
        chain,
        block_crc: None,
    };
    run_one(sh, &req).expect("sector write");
}

fn block(buf: &AlignedBuf, i: usize) -> &[u8] {
    &buf[i * BS..(i + 1) * BS]
}

/// What every check below expects of the three layers.
fn check(sh: &mut Shard, k0: u64, k1: u64, k2: u64, sector: &[u8]) {
    let base = filled(1, 0, 8);
    // The snapshot (era 0 alone) is untouched by writes above it.
    let snap = read_chain(sh, k0, &[], 0, 8);
    assert!(snap[..] == base[..], "the frozen layer changed");
    // The volume (era 1 over era 0).
    let vol = read_chain(sh, k1, &[k0], 0, 8);
    for i in [0usize, 1, 5, 6, 7] {
        assert!(
            block(&vol, i) == block(&base, i),
            "block {i} not taken from the layer under"
        );
    }
    assert!(
        block(&vol, 2) == block(&filled(2, 2, 1), 0),
        "block 2: the new layer's write"
    );
    assert!(
        block(&vol, 3).iter().all(|&b| b == 0),
        "block 3: zeroed above, must hide the data under"
    );
    let mut merged = block(&base, 4).to_vec();
    merged[1024..1536].copy_from_slice(sector);
    assert!(
        block(&vol, 4) == &merged[..],
        "block 4: the sector merged into the lower layer's block"
    );
    // A whole-chunk discard above hides the chunk below.
    let vol1 = read_chain(sh, k1, &[k0], CHUNK, 8);
    assert!(
        vol1.iter().all(|&b| b == 0),
        "chunk 1 discarded above: must read zeroes"
    );
    let snap1 = read_chain(sh, k0, &[], CHUNK, 8);
    assert!(
        snap1[..] == filled(1, 16, 8)[..],
        "chunk 1 of the frozen layer changed"
    );
    // A clone of the snapshot (era 2 over era 0): its own write, the rest from below.
    let clone = read_chain(sh, k2, &[k0], 0, 8);
    assert!(
        block(&clone, 0) == block(&filled(3, 0, 1), 0),
        "clone's own block"
    );
    for i in 1..8 {
        assert!(
            block(&clone, i) == block(&base, i),
            "clone block {i} not from its parent"
        );
    }
}

#[test]
fn reads_go_through_layers_and_zeroes_above_hide_the_data_under() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk");
    Engine::format(&path, &small_format(1, 16 << 20)).expect("format");
    let mut sh = Engine::open(&path, &OpenOptions::default())
        .expect("open")
        .into_shards()
        .remove(0);
    let (k0, k1, k2) = (layer_key(5, 0), layer_key(5, 1), layer_key(5, 2));
    write(&mut sh, k0, 0, &mut filled(1, 0, 8), 10).expect("write era 0");
    write(&mut sh, k0, CHUNK, &mut filled(1, 16, 8), 10).expect("write era 0 chunk 1");
    // Era 1 goes on over era 0 (a snapshot froze era 0).
    write(&mut sh, k1, 2 * BS as u64, &mut filled(2, 2, 1), 20).expect("write era 1");
    zero(&mut sh, EngineOp::WriteZeroes, k1, 3 * BS as u64, 1, 21).expect("zero era 1");
    let mut sector = AlignedBuf::new(1);
    sector.fill(0xA5);
    sector_write(&mut sh, k1, &[k0], 4 * BS as u64 + 1024, &mut sector, 22);
    // Chunk 1 has no slot in era 1: the discard still records zeroes.
    zero(&mut sh, EngineOp::Discard, k1, CHUNK, 16, 23).expect("discard era 1 chunk 1");
    // A clone of the snapshot: era 2 over era 0.
    write(&mut sh, k2, 0, &mut filled(3, 0, 1), 30).expect("write era 2");
    let sec = sector[..512].to_vec();
    check(&mut sh, k0, k1, k2, &sec);
    sh.close().expect("close");
    let mut sh = Engine::open(&path, &OpenOptions::default())
        .expect("reopen")
        .into_shards()
        .remove(0);
    check(&mut sh, k0, k1, k2, &sec);
    // Era 0 keys keep the old rule: a whole-chunk discard frees the slot.
    zero(&mut sh, EngineOp::Discard, layer_key(6, 0), 0, 16, 5).expect("discard plain volume");
    let before = sh.allocated_chunks();
    write(&mut sh, layer_key(6, 0), 0, &mut filled(4, 0, 1), 6).expect("write plain");
    zero(&mut sh, EngineOp::Discard, layer_key(6, 0), 0, 16, 7).expect("discard plain");
    assert_eq!(
        sh.allocated_chunks(),
        before,
        "a plain volume's emptied chunk is freed"
    );
    sh.close().expect("close");
}

/// `EngineOp::Fill` of `blocks` blocks at `offset` of `key` from `chain`:
/// the blocks copied.
fn fill(sh: &mut Shard, key: u64, chain: &[u64], offset: u64, blocks: usize) -> u32 {
    let mut scratch = AlignedBuf::new(blocks);
    let s = [seg(&mut scratch, 0, blocks * BS)];
    let req = EngineRequest {
        op: EngineOp::Fill,
        volume: key,
        offset_bytes: offset,
        len_bytes: (blocks * BS) as u64,
        segments: &s,
        version: 0,
        epoch: 1,
        tag: 13,
        chain,
        block_crc: None,
    };
    run_one(sh, &req).expect("fill")
}

fn states(sh: &Shard, key: u64, offset: u64, blocks: usize) -> Vec<(BlockKind, u64)> {
    let mut out = vec![(BlockKind::Unwritten, 0); blocks];
    sh.block_states(key, offset, &mut out);
    out
}

/// Runs `reqs` all in flight at once (submitted in order, none waited for
/// before the last is in): their results by position.
fn run_together(sh: &mut Shard, reqs: &[EngineRequest<'_>]) -> Vec<Result<u32, EngineError>> {
    for r in reqs {
        // SAFETY: the caller's buffers outlive the waits below.
        unsafe { sh.submit(r).expect("submit") };
    }
    let mut out: Vec<Option<Result<u32, EngineError>>> = (0..reqs.len()).map(|_| None).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while out.iter().any(|o| o.is_none()) {
        assert!(
            std::time::Instant::now() < deadline,
            "requests stuck: {}",
            sh.describe()
        );
        sh.wait(&mut |c: Completion| {
            let i = reqs.iter().position(|r| r.tag == c.tag).expect("known tag");
            out[i] = Some(c.result);
        });
    }
    out.into_iter().map(|o| o.expect("done")).collect()
}

#[test]
fn fill_copies_what_the_layer_reads_from_under_it_and_keeps_its_own_blocks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk");
    Engine::format(&path, &small_format(1, 16 << 20)).expect("format");
    let mut sh = Engine::open(&path, &OpenOptions::default())
        .expect("open")
        .into_shards()
        .remove(0);
    // A parent's era 0 and era 1 (its snapshot's layers), and a clone's
    // head (era 2) over both.
    let (k0, k1, k2) = (layer_key(5, 0), layer_key(5, 1), layer_key(5, 2));
    let chain = [k1, k0];
    write(&mut sh, k0, 0, &mut filled(1, 0, 16), 10).expect("era 0 chunk 0");
    write(&mut sh, k0, CHUNK, &mut filled(1, 16, 8), 11).expect("era 0 chunk 1");
    write(&mut sh, k1, BS as u64, &mut filled(2, 1, 1), 20).expect("era 1 block 1");
    zero(&mut sh, EngineOp::WriteZeroes, k1, 2 * BS as u64, 1, 21).expect("era 1 zeroes");
    // The clone's own: data, zeroes, a discard, a sector merged from below,
    // at versions below the lower layers' (the clone's writer has a clock
    // behind the parent's): still the clone's, never replaced by a fill.
    write(&mut sh, k2, 3 * BS as u64, &mut filled(3, 3, 1), 3).expect("clone block 3");
    zero(&mut sh, EngineOp::WriteZeroes, k2, 4 * BS as u64, 1, 4).expect("clone zeroes");
    zero(&mut sh, EngineOp::Discard, k2, 5 * BS as u64, 1, 5).expect("clone discard");
    let mut sector = AlignedBuf::new(1);
    sector.fill(0x5A);
    sector_write(&mut sh, k2, &chain, 6 * BS as u64 + 512, &mut sector, 6);
    let before0 = read_chain(&mut sh, k2, &chain, 0, 16);
    let before1 = read_chain(&mut sh, k2, &chain, CHUNK, 16);

    let started = std::time::Instant::now();
    // Chunk 0: blocks 0, 1 and 7..16 come from below; 2 reads zeroes from
    // era 1 (nothing to copy); 3..7 are the clone's own.
    assert_eq!(fill(&mut sh, k2, &chain, 0, 16), 2 + 9, "blocks copied");
    // Chunk 1: the clone has no slot there; 8 blocks below.
    assert_eq!(fill(&mut sh, k2, &chain, CHUNK, 16), 8, "blocks copied");
    println!("fill of 2 chunks took {:?}", started.elapsed());
    let expect0 = |i: usize| match i {
        0 | 7..=15 => (BlockKind::Data, 10),
        1 => (BlockKind::Data, 20),
        2 => (BlockKind::Unwritten, 0),
        3 => (BlockKind::Data, 3),
        4 => (BlockKind::Zero, 4),
        5 => (BlockKind::Zero, 5),
        6 => (BlockKind::Data, 6),
        _ => unreachable!(),
    };
    let check_filled = |sh: &mut Shard| {
        let s0 = states(sh, k2, 0, 16);
        for (i, s) in s0.iter().enumerate() {
            assert_eq!(*s, expect0(i), "chunk 0 block {i}: kind and version");
        }
        let s1 = states(sh, k2, CHUNK, 16);
        for (i, s) in s1.iter().enumerate() {
            let want = if i < 8 {
                (BlockKind::Data, 11)
            } else {
                (BlockKind::Unwritten, 0)
            };
            assert_eq!(*s, want, "chunk 1 block {i}: kind and version");
        }
        // The layer alone now reads what it read through the chain.
        assert!(
            read_chain(sh, k2, &[], 0, 16)[..] == before0[..],
            "chunk 0 without the chain differs from chunk 0 through it"
        );
        assert!(
            read_chain(sh, k2, &[], CHUNK, 16)[..] == before1[..],
            "chunk 1 without the chain differs from chunk 1 through it"
        );
        // The layers under it are untouched.
        assert!(read_chain(sh, k0, &[], 0, 16)[..] == filled(1, 0, 16)[..]);
    };
    check_filled(&mut sh);
    // Again: nothing left to copy, and no I/O for it.
    assert_eq!(
        fill(&mut sh, k2, &chain, 0, 16),
        0,
        "second fill of chunk 0"
    );
    assert_eq!(
        fill(&mut sh, k2, &chain, CHUNK, 16),
        0,
        "second fill of chunk 1"
    );
    sh.close().expect("close");
    let mut sh = Engine::open(&path, &OpenOptions::default())
        .expect("reopen")
        .into_shards()
        .remove(0);
    check_filled(&mut sh);

    // A write newer than the fill wins, whichever comes first.
    for c in 2..6u64 {
        write(&mut sh, k0, c * CHUNK, &mut filled(7, c * 16, 16), 10).expect("era 0");
    }
    // Fill first, then the write.
    assert_eq!(fill(&mut sh, k2, &chain, 2 * CHUNK, 16), 16);
    write(&mut sh, k2, 2 * CHUNK, &mut filled(8, 32, 1), 40).expect("write after fill");
    // The write first, then the fill.
    write(&mut sh, k2, 3 * CHUNK, &mut filled(8, 48, 1), 40).expect("write before fill");
    assert_eq!(fill(&mut sh, k2, &chain, 3 * CHUNK, 16), 15);
    // Both in flight at once, in both submission orders: the write is
    // planned while the fill reads (the fill then leaves the block), or
    // after the fill planned it (the write's newer version wins).
    let mut scratch = AlignedBuf::new(16);
    let mut w4 = filled(8, 64, 2);
    let mut w5 = filled(8, 80, 2);
    let s4 = [seg(&mut scratch, 0, 16 * BS)];
    let ws4 = [seg(&mut w4, 0, 2 * BS)];
    let f4 = EngineRequest {
        op: EngineOp::Fill,
        volume: k2,
        offset_bytes: 4 * CHUNK,
        len_bytes: CHUNK,
        segments: &s4,
        version: 0,
        epoch: 1,
        tag: 1,
        chain: &chain,
        block_crc: None,
    };
    let wr4 = EngineRequest {
        op: EngineOp::Write,
        volume: k2,
        offset_bytes: 4 * CHUNK + BS as u64,
        len_bytes: 2 * BS as u64,
        segments: &ws4,
        version: 41,
        epoch: 1,
        tag: 2,
        chain: &chain,
        block_crc: None,
    };
    let r = run_together(&mut sh, &[f4, wr4]);
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    let mut scratch5 = AlignedBuf::new(16);
    let s5 = [seg(&mut scratch5, 0, 16 * BS)];
    let ws5 = [seg(&mut w5, 0, 2 * BS)];
    let wr5 = EngineRequest {
        segments: &ws5,
        offset_bytes: 5 * CHUNK + BS as u64,
        tag: 3,
        ..wr4
    };
    let f5 = EngineRequest {
        segments: &s5,
        offset_bytes: 5 * CHUNK,
        tag: 4,
        ..f4
    };
    let r = run_together(&mut sh, &[wr5, f5]);
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    // A sector write in flight with a fill, both orders: it merges into
    // the block from under (the same data the fill copies) and wins.
    let mut sec = AlignedBuf::new(1);
    sec.fill(0xC3);
    for (c, fill_first) in [(6u64, true), (7, false)] {
        write(&mut sh, k0, c * CHUNK, &mut filled(7, c * 16, 16), 10).expect("era 0");
        let mut scratch = AlignedBuf::new(16);
        let fs = [seg(&mut scratch, 0, 16 * BS)];
        let ss = [seg(&mut sec, 0, 512)];
        let f = EngineRequest {
            segments: &fs,
            offset_bytes: c * CHUNK,
            tag: 5,
            ..f4
        };
        let w = EngineRequest {
            op: EngineOp::Write,
            segments: &ss,
            offset_bytes: c * CHUNK + 3 * BS as u64 + 1024,
            len_bytes: 512,
            version: 42,
            tag: 6,
            ..f4
        };
        let reqs = if fill_first { [f, w] } else { [w, f] };
        let r = run_together(&mut sh, &reqs);
        assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    }
    let check_sectors = |sh: &mut Shard| {
        for c in [6u64, 7] {
            let got = read_chain(sh, k2, &[], c * CHUNK, 16);
            let st = states(sh, k2, c * CHUNK, 16);
            let under = filled(7, c * 16, 16);
            let mut want3 = block(&under, 3).to_vec();
            want3[1024..1536].fill(0xC3);
            for i in 0..16 {
                if i == 3 {
                    assert!(block(&got, 3) == &want3[..], "chunk {c}: sector not merged");
                    assert_eq!(st[3], (BlockKind::Data, 42), "chunk {c} block 3");
                } else {
                    assert!(block(&got, i) == block(&under, i), "chunk {c} block {i}");
                    assert_eq!(st[i], (BlockKind::Data, 10), "chunk {c} block {i}");
                }
            }
        }
    };
    check_sectors(&mut sh);
    let check_writes = |sh: &mut Shard| {
        for (c, first, n, seed_block) in [
            (2u64, 0usize, 1usize, 32u64),
            (3, 0, 1, 48),
            (4, 1, 2, 64),
            (5, 1, 2, 80),
        ] {
            let got = read_chain(sh, k2, &[], c * CHUNK, 16);
            let st = states(sh, k2, c * CHUNK, 16);
            let mine = filled(8, seed_block, n);
            let under = filled(7, c * 16, 16);
            for (i, s) in st.iter().enumerate() {
                if (first..first + n).contains(&i) {
                    assert!(
                        block(&got, i) == block(&mine, i - first),
                        "chunk {c} block {i}: the newer write lost to the fill"
                    );
                    assert_eq!(s.1, if c < 4 { 40 } else { 41 }, "chunk {c} block {i}");
                } else {
                    assert!(
                        block(&got, i) == block(&under, i),
                        "chunk {c} block {i}: not copied from under"
                    );
                    assert_eq!(*s, (BlockKind::Data, 10), "chunk {c} block {i}");
                }
            }
        }
    };
    check_writes(&mut sh);
    sh.close().expect("close");
    let mut sh = Engine::open(&path, &OpenOptions::default())
        .expect("reopen")
        .into_shards()
        .remove(0);
    check_writes(&mut sh);
    check_sectors(&mut sh);
    check_filled(&mut sh);
    sh.close().expect("close");
}
