fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let seed: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let t = std::time::Instant::now();
    let r = celer_sim::run_data(
        &celer_sim::DataSimConfig::new(seed),
        std::env::var("TRACE").is_ok(),
    );
    print!("{}", r.render(t.elapsed()));
}
