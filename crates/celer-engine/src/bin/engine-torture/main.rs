//! Crash-test workload: writes random blocks to an engine disk at queue
//! depth 16 until killed; a third of the writes are sector writes (512-byte
//! sectors within one block, merged by the engine). Before submitting a
//! write it appends `S volume sector version` for each 512-byte sector to
//! the log; after the write is acknowledged, `A volume sector version`.
//! Every sector written with version v holds `pattern(volume, sector, v)`,
//! which embeds (volume, sector, v), so a checker can tell whole old
//! content, whole new content and a torn mix.
//!
//! Usage: engine-torture DISK LOG SEED

use std::io::Write;
use std::path::PathBuf;

use celer_engine::{AlignedBuf, Completion, Engine, EngineOp, EngineRequest, OpenOptions, Segment};

const QD: usize = 16;
const VOLUMES: u64 = 2;
const BLOCKS_PER_VOLUME: u64 = 512;

mod pattern;

use pattern::pattern;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: engine-torture DISK LOG SEED");
        std::process::exit(2);
    }
    let disk = PathBuf::from(&args[1]);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args[2])
        .expect("open log");
    // The previous run was killed, maybe in the middle of a write to the
    // log: a write that crosses a page of the file can stop between pages
    // when SIGKILL arrives, leaving a cut last line. End it, or this run's
    // first line would be glued to it and lost to the checker, which would
    // then find data of a version "never written" (seen once in CI-like
    // load).
    log.write_all(b"\n").expect("log");
    let mut rng: u64 = args[3].parse().expect("seed");
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let engine = Engine::open(&disk, &OpenOptions::default()).expect("open engine");
    let mut shard = engine.into_shards().remove(0);
    // Versions must grow across runs: start from the time in microseconds.
    let mut version = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_micros() as u64;
    let mut bufs: Vec<AlignedBuf> = (0..QD).map(|_| AlignedBuf::new(4)).collect();
    let mut meta = [(0u64, 0u64, 0u64, 0u64); QD];
    let mut free: Vec<usize> = (0..QD).collect();
    let mut line = String::new();
    loop {
        while let Some(i) = free.pop() {
            let volume = next() % VOLUMES;
            let mut count = 1 + next() % 4;
            let sector_write = next() % 3 == 0;
            if sector_write {
                count = 1;
            }
            let mut block = next() % BLOCKS_PER_VOLUME;
            // Stay within a 16-block chunk.
            block = block.min(block - block % 16 + 16 - count);
            // In 512-byte sectors: the first and how many.
            let (first, n) = if sector_write {
                let s0 = next() % 8;
                (block * 8 + s0, (1 + next() % (8 - s0)).min(7))
            } else {
                (block * 8, count * 8)
            };
            version += 1;
            for k in 0..n {
                pattern(
                    volume,
                    first + k,
                    version,
                    &mut bufs[i][k as usize * 512..(k as usize + 1) * 512],
                );
            }
            line.clear();
            for k in 0..n {
                line.push_str(&format!("S {volume} {} {version}\n", first + k));
            }
            log.write_all(line.as_bytes()).expect("log");
            meta[i] = (volume, first, n, version);
            let seg = [Segment {
                addr: bufs[i].as_mut_ptr(),
                len: n as usize * 512,
            }];
            let req = EngineRequest {
                op: EngineOp::Write,
                volume,
                offset_bytes: first * 512,
                len_bytes: n * 512,
                segments: &seg,
                version,
                epoch: 1,
                tag: i as u64,
                chain: &[],
                block_crc: None,
            };
            // SAFETY: bufs[i] is not touched until tag i completes.
            unsafe { shard.submit(&req) }.expect("submit");
        }
        let mut done = Vec::new();
        shard.wait(&mut |c: Completion| {
            c.result.expect("write");
            // A newer version made it skip (an earlier-submitted write that
            // waited while a later one went ahead): not applied, so not
            // acknowledged (a node refuses it as older).
            done.push((c.tag as usize, c.newer_version == 0));
        });
        line.clear();
        for (i, applied) in done {
            free.push(i);
            if !applied {
                continue;
            }
            let (volume, first, n, v) = meta[i];
            for k in 0..n {
                line.push_str(&format!("A {volume} {} {v}\n", first + k));
            }
        }
        log.write_all(line.as_bytes()).expect("log");
    }
}
