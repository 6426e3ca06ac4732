//! Runs fio as the peer in benchmarks and reads its JSON output.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// One workload's figures, from fio or from Celer's own driver.
#[derive(Clone, Copy, Debug, Default)]
pub struct Figures {
    pub iops: f64,
    pub mean_us: f64,
    pub p99_us: f64,
    /// CPU time (user + system) per I/O, in microseconds.
    pub cpu_us_per_io: f64,
}

/// Runs one fio job on `file` and returns its figures. `sync_dsync` opens
/// the file with O_DSYNC so every write is durable when it completes.
pub fn run(
    file: &Path,
    rw: &str,
    iodepth: u32,
    runtime_s: u32,
    size_bytes: u64,
    sync_dsync: bool,
) -> Result<Figures> {
    let mut cmd = Command::new("fio");
    cmd.arg("--name=peer")
        .arg(format!("--filename={}", file.display()))
        .arg("--ioengine=io_uring")
        .arg("--direct=1")
        .arg("--bs=4k")
        .arg(format!("--rw={rw}"))
        .arg(format!("--iodepth={iodepth}"))
        .arg(format!("--size={size_bytes}"))
        .arg(format!("--runtime={runtime_s}"))
        .arg("--time_based=1")
        .arg("--randrepeat=0")
        .arg("--norandommap=1")
        .arg("--lat_percentiles=1")
        .arg("--output-format=json");
    if sync_dsync {
        cmd.arg("--sync=dsync");
    }
    let out = cmd
        .output()
        .context("running fio (is it installed? scripts/install-deps.sh installs it)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing fio JSON")?;
    let job = &v["jobs"][0];
    let side = if rw.contains("write") {
        &job["write"]
    } else {
        &job["read"]
    };
    let ios = side["total_ios"].as_f64().unwrap_or(0.0);
    if ios == 0.0 {
        bail!("fio did no I/O: {}", String::from_utf8_lossy(&out.stdout));
    }
    let runtime_ms = job["job_runtime"]
        .as_f64()
        .unwrap_or(runtime_s as f64 * 1000.0);
    let cpu_frac =
        (job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0)) / 100.0;
    Ok(Figures {
        iops: side["iops"].as_f64().unwrap_or(0.0),
        mean_us: side["clat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1000.0,
        p99_us: side["clat_ns"]["percentile"]["99.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1000.0,
        cpu_us_per_io: cpu_frac * runtime_ms * 1000.0 / ios,
    })
}
