//! Runs one data-path seed: `data_one SEED [LAST]` (every seed of
//! SEED..=LAST, printing failures). Environment: TRACE=1 prints the trace,
//! CRASH_PER_MS / STALL_PER_MS / CLOCK_STEP_PER_MS / CLOCK_OFFSET_MAX_MS
//! override the faults; NO_RESTART_FLOOR=1 runs the nodes without their
//! restart floor (to see the bug it prevents); ROUTES=1 turns on route
//! changes (nodes marked down, catch-up, partitions moved), and with it
//! SPLIT_PER_MS=0.002 operator splits of the partitions and REPLACE_DISK=0.2
//! restarts on new disks.
fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let arg = |n: usize| std::env::args().nth(n).and_then(|s| s.parse::<u64>().ok());
    let first = arg(1).unwrap_or(1);
    let last = arg(2).unwrap_or(first);
    let env = |k: &str| std::env::var(k).ok().and_then(|s| s.parse::<f64>().ok());
    let mut failed = 0;
    for seed in first..=last {
        let mut cfg = celer_sim::DataSimConfig::new(seed);
        if let Some(v) = env("CRASH_PER_MS") {
            cfg.crash_per_ms = v;
        }
        if let Some(v) = env("STALL_PER_MS") {
            cfg.stall_per_ms = v;
        }
        if let Some(v) = env("CLOCK_STEP_PER_MS") {
            cfg.clock_step_per_ms = v;
        }
        if let Some(v) = env("CLOCK_OFFSET_MAX_MS") {
            cfg.clock_offset_max_ms = v as u64;
        }
        if std::env::var_os("ROUTES").is_some() {
            cfg.route_changes = true;
        }
        if let Some(v) = env("REPLACE_DISK") {
            cfg.replace_disk = v;
        }
        if let Some(v) = env("SPLIT_PER_MS") {
            cfg.split_per_ms = v;
        }
        if std::env::var_os("NO_RESTART_FLOOR").is_some() {
            cfg.restart_floor = false;
        }
        let t = std::time::Instant::now();
        let r = celer_sim::run_data(&cfg, std::env::var("TRACE").is_ok());
        if first == last || r.violation.is_some() {
            print!("{}", r.render(t.elapsed()));
        }
        failed += r.violation.is_some() as u32;
    }
    if first != last {
        println!("{failed} of {} seeds failed", last - first + 1);
    }
}
