//! `celer-vhost`: serve a null or file device over vhost-user-blk, or
//! benchmark vhost-user-blk back ends. The `celer` binary wires the same
//! library functions into `celer vhost serve` and `celer bench vhost`.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "celer-vhost", about = "Celer vhost-user-blk front end")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a device on a vhost-user socket.
    Serve(celer_vhost::cli::ServeArgs),
    /// Benchmark vhost-user-blk back ends (Celer vs qemu-storage-daemon).
    Bench(celer_vhost::bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Serve(a) => celer_vhost::cli::run_serve(&a),
        Cmd::Bench(a) => celer_vhost::cli::run_bench_cli(&a, &["serve"]),
    }
}
