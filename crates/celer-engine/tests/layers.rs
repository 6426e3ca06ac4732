//! Layers (snapshots and clones): a read through a chain of layer keys takes
//! each block from the first layer that holds it; zeroes and discards in a
//! layer above era 0 hide the layers under it; a sector write merges into
//! the block of a lower layer; all of it survives a reopen.

mod common;

use celer_device::layer_key;
use celer_engine::{AlignedBuf, Engine, EngineOp, EngineRequest, OpenOptions, Shard};
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
