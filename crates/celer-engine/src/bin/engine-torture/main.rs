//! Crash-test workload: writes random blocks to an engine disk at queue
//! depth 16 until killed. Before submitting a write it appends
//! `S volume block version` to the log; after the write is acknowledged it
//! appends `A volume block version`. Every block written with version v
//! holds `pattern(volume, block, v)`, which embeds (volume, block, v), so a
//! checker can tell whole old content, whole new content and a torn mix.
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
            let count = 1 + next() % 4;
            let mut block = next() % BLOCKS_PER_VOLUME;
            // Stay within a 16-block chunk.
            block = block.min(block - block % 16 + 16 - count);
            version += 1;
            for k in 0..count {
                pattern(
                    volume,
                    block + k,
                    version,
                    &mut bufs[i][k as usize * 4096..(k as usize + 1) * 4096],
                );
            }
            line.clear();
            for k in 0..count {
                line.push_str(&format!("S {volume} {} {version}\n", block + k));
            }
            log.write_all(line.as_bytes()).expect("log");
            meta[i] = (volume, block, count, version);
            let seg = [Segment {
                addr: bufs[i].as_mut_ptr(),
                len: count as usize * 4096,
            }];
            let req = EngineRequest {
                op: EngineOp::Write,
                volume,
                offset_bytes: block * 4096,
                len_bytes: count * 4096,
                segments: &seg,
                version,
                epoch: 1,
                tag: i as u64,
            };
            // SAFETY: bufs[i] is not touched until tag i completes.
            unsafe { shard.submit(&req) }.expect("submit");
        }
        let mut done = Vec::new();
        shard.wait(&mut |c: Completion| {
            c.result.expect("write");
            done.push(c.tag as usize);
        });
        line.clear();
        for i in done {
            let (volume, block, count, v) = meta[i];
            for k in 0..count {
                line.push_str(&format!("A {volume} {} {v}\n", block + k));
            }
            free.push(i);
        }
        log.write_all(line.as_bytes()).expect("log");
    }
}
