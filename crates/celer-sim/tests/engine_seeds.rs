//! The engine simulation in CI: the real engine shards on the simulated
//! disk, a fixed set of seeds, a few random ones, and replay. A seed of
//! 4000 steps takes about 0.03 s in a release build.

use std::time::Instant;

use celer_sim::{run_engine, EngineSimConfig};

/// Seeds CI runs every time. With them the simulator finds the engine bugs
/// listed in docs/testing.md when their fixes are reverted (6 to 99 of
/// these seeds each).
const FIXED_SEEDS: std::ops::Range<u64> = 0..600;

fn check(seed: u64) -> Result<(), String> {
    let started = Instant::now();
    let r = run_engine(&EngineSimConfig::new(seed), false);
    match r.violation {
        None => Ok(()),
        Some(_) => Err(format!(
            "{}replay: celer sim --engine --seed {seed} --trace",
            r.render(started.elapsed())
        )),
    }
}

#[test]
fn the_fixed_engine_seeds_lose_nothing_acknowledged() {
    let started = Instant::now();
    let mut verified = 0;
    let mut crashes = 0;
    let mut failed = Vec::new();
    for seed in FIXED_SEEDS {
        let r = run_engine(&EngineSimConfig::new(seed), false);
        verified += r.blocks_verified;
        crashes += r.crashes;
        if r.violation.is_some() {
            failed.push(format!(
                "{}replay: celer sim --engine --seed {seed} --trace",
                r.render(started.elapsed())
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} seed(s) failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    // The runs must actually cut the power and check blocks after it.
    assert!(crashes > 10 * FIXED_SEEDS.end, "{crashes} power cuts");
    assert!(
        verified > 1000 * FIXED_SEEDS.end,
        "{verified} blocks verified"
    );
    println!(
        "{} engine seeds, {crashes} power cuts, {verified} blocks verified after them, in {:.1} s",
        FIXED_SEEDS.end - FIXED_SEEDS.start,
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn random_engine_seeds_lose_nothing_acknowledged() {
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id()) << 32;
    for k in 0..20u64 {
        let seed = base.wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        println!("random engine seed {seed}");
        if let Err(e) = check(seed) {
            panic!("random engine seed {seed} failed:\n{e}");
        }
    }
}

#[test]
fn an_engine_seed_replays_line_for_line() {
    let a = run_engine(&EngineSimConfig::new(3), true);
    let b = run_engine(&EngineSimConfig::new(3), true);
    assert!(a.violation.is_none(), "{:?}", a.violation);
    assert!(a.trace.len() > 1000, "a trace of {} lines", a.trace.len());
    assert_eq!(a.trace, b.trace, "seed 3 ran two different ways");
    assert_eq!(a.disk, b.disk);
    let c = run_engine(&EngineSimConfig::new(4), true);
    assert_ne!(a.trace, c.trace, "seeds 3 and 4 ran the same way");
}
