//! Crash consistency: a child process writes at queue depth 16 (whole
//! blocks and sector writes, which the engine merges) and is killed with
//! SIGKILL at random moments, many rounds on the same disk. After each kill
//! the engine is opened (recovery) and every 512-byte sector must hold
//! exactly the content of one version that was submitted for it, never a
//! mix, and never older than its last acknowledged version (a merge that
//! lost a neighbour's acknowledged sector shows as an older version).

mod common;
#[path = "../src/bin/engine-torture/pattern.rs"]
mod pattern;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::Duration;

use celer_engine::{Engine, OpenOptions};
use common::*;
use pattern::pattern;

const VOLUMES: u64 = 2;
const BLOCKS_PER_VOLUME: u64 = 512;

#[test]
fn sigkill_under_load_loses_no_acknowledged_write() {
    let rounds: u64 = std::env::var("CELER_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk");
    let log = dir.path().join("log");
    // Small journal and few spare blocks: checkpoints and multi-phase
    // writes happen all the time, so kills land in every state.
    Engine::format(&disk, &small_format(1, 64 << 20)).expect("format");
    let mut seed = 0x1234_5678_9abc_def1u64;
    let mut submitted: HashMap<(u64, u64), HashSet<u64>> = HashMap::new();
    let mut acked: HashMap<(u64, u64), u64> = HashMap::new();
    let mut total_acked = 0usize;
    for round in 0..rounds {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut child = Command::new(env!("CARGO_BIN_EXE_engine-torture"))
            .arg(&disk)
            .arg(&log)
            .arg((seed | 1).to_string())
            .spawn()
            .expect("spawn torture child");
        let ms = 30 + (seed >> 33) % 400;
        std::thread::sleep(Duration::from_millis(ms));
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let status = child.wait().expect("wait child");
        assert!(
            status.code().is_none(),
            "round {round}: child exited by itself: {status}"
        );

        let text = std::fs::read_to_string(&log).expect("read log");
        submitted.clear();
        acked.clear();
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() != 4 {
                continue; // a line cut by the kill
            }
            let (Ok(v0), Ok(b), Ok(v)) = (
                f[1].parse::<u64>(),
                f[2].parse::<u64>(),
                f[3].parse::<u64>(),
            ) else {
                continue;
            };
            match f[0] {
                "S" => {
                    submitted.entry((v0, b)).or_default().insert(v);
                }
                "A" => {
                    let e = acked.entry((v0, b)).or_insert(0);
                    *e = (*e).max(v);
                }
                _ => {}
            }
        }
        total_acked = acked.len();

        let engine = Engine::open(&disk, &OpenOptions::default()).expect("open after kill");
        let mut shard = engine.into_shards().remove(0);
        let mut want = vec![0u8; 512];
        for volume in 0..VOLUMES {
            for chunk in 0..BLOCKS_PER_VOLUME / 16 {
                let got =
                    read(&mut shard, volume, chunk * 16 * BS as u64, 16).unwrap_or_else(|e| {
                        panic!("round {round}: read volume {volume} chunk {chunk}: {e}")
                    });
                for i in 0..16 * (BS as u64 / 512) {
                    let block = chunk * 16 * 8 + i; // a 512-byte sector
                    let data = &got[i as usize * 512..(i as usize + 1) * 512];
                    let min = acked.get(&(volume, block)).copied().unwrap_or(0);
                    if data.iter().all(|&b| b == 0) {
                        assert_eq!(min, 0, "round {round}: volume {volume} sector {block}: acked v{min} lost (zeroes)");
                        continue;
                    }
                    let v = u64::from_le_bytes(data[16..24].try_into().expect("8 bytes"));
                    pattern(volume, block, v, &mut want);
                    assert!(
                        data == &want[..],
                        "round {round}: volume {volume} sector {block}: torn or foreign content"
                    );
                    assert!(
                        submitted.get(&(volume, block)).is_some_and(|s| s.contains(&v)),
                        "round {round}: volume {volume} sector {block}: version {v} was never written"
                    );
                    assert!(v >= min, "round {round}: volume {volume} sector {block}: v{v} older than acked v{min}");
                }
            }
        }
        drop(shard);
    }
    assert!(
        total_acked > 200,
        "the workload acknowledged too little to prove anything ({total_acked} blocks)"
    );
}
