//! `celer bench engine`: 4 KiB random writes and reads at QD1 and QD32 on a
//! file, through the engine and through fio on the same file with the same
//! flags (O_DIRECT, io_uring, and for writes the same durability: every
//! write durable when acknowledged, RWF_DSYNC in the engine, O_DSYNC in fio).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use celer_engine::{
    AlignedBuf, Completion, Engine, EngineOp, EngineRequest, FormatOptions, OpenOptions, Segment,
    Shard,
};

use crate::fio::{self, Figures};

pub struct BenchArgs {
    pub dir: PathBuf,
    pub file_size_bytes: u64,
    pub volume_size_bytes: u64,
    pub runtime_s: u32,
    pub with_fio: bool,
    /// Run only workloads whose name (e.g. `randread-qd1`) contains this.
    pub only: Option<String>,
    /// Buffers on huge pages (reserved for the run as root).
    pub hugepages: bool,
}

const WORKLOADS: [(&str, EngineOp, u32); 4] = [
    ("randwrite", EngineOp::Write, 1),
    ("randwrite", EngineOp::Write, 32),
    ("randread", EngineOp::Read, 1),
    ("randread", EngineOp::Read, 32),
];

fn cpu_time() -> Duration {
    // SAFETY: rusage is plain integers; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let us = ru.ru_utime.tv_sec as u64 * 1_000_000
        + ru.ru_utime.tv_usec as u64
        + ru.ru_stime.tv_sec as u64 * 1_000_000
        + ru.ru_stime.tv_usec as u64;
    Duration::from_micros(us)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Drives `op` at queue depth `qd` for `runtime` on volume 1.
fn drive(
    shard: &mut Shard,
    op: EngineOp,
    qd: usize,
    volume_blocks: u64,
    runtime: Duration,
    version: &mut u64,
) -> Result<Figures> {
    let mut bufs: Vec<AlignedBuf> = (0..qd).map(|_| AlignedBuf::new(1)).collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        b.fill(i as u8 ^ 0x5c);
    }
    let mut started = vec![Instant::now(); qd];
    let mut lat_ns: Vec<u32> = Vec::with_capacity(4_000_000);
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut free: Vec<usize> = (0..qd).collect();
    let mut done_tags: Vec<usize> = Vec::with_capacity(qd);
    let t0 = Instant::now();
    let cpu0 = cpu_time();
    let mut ios = 0u64;
    let mut failure = None;
    loop {
        let elapsed = t0.elapsed();
        let stop = elapsed >= runtime;
        if !stop {
            while let Some(i) = free.pop() {
                let block = rng.next() % volume_blocks;
                *version += 1;
                let seg = [Segment {
                    addr: bufs[i].as_mut_ptr(),
                    len: 4096,
                }];
                let req = EngineRequest {
                    op,
                    volume: 1,
                    offset_bytes: block * 4096,
                    len_bytes: 4096,
                    segments: &seg,
                    version: *version,
                    epoch: 1,
                    tag: i as u64,
                    chain: &[],
                    block_crc: None,
                };
                started[i] = Instant::now();
                // SAFETY: bufs[i] is left alone until tag i completes.
                unsafe { shard.submit(&req) }.context("submit")?;
            }
        } else if free.len() == qd {
            break;
        }
        shard.wait(&mut |c: Completion| {
            if let Err(e) = c.result {
                failure = Some(e);
            }
            done_tags.push(c.tag as usize);
        });
        let now = Instant::now();
        for &i in done_tags.iter() {
            lat_ns.push((now - started[i]).as_nanos().min(u32::MAX as u128) as u32);
            ios += 1;
            free.push(i);
        }
        done_tags.clear();
        if let Some(e) = failure.take() {
            return Err(e).context("engine I/O failed during the benchmark");
        }
    }
    let wall = t0.elapsed();
    let cpu = cpu_time() - cpu0;
    lat_ns.sort_unstable();
    let mean = lat_ns.iter().map(|&x| x as f64).sum::<f64>() / lat_ns.len().max(1) as f64;
    let p99 = lat_ns.get(lat_ns.len() * 99 / 100).copied().unwrap_or(0) as f64;
    Ok(Figures {
        iops: ios as f64 / wall.as_secs_f64(),
        mean_us: mean / 1000.0,
        p99_us: p99 / 1000.0,
        cpu_us_per_io: cpu.as_secs_f64() * 1e6 / ios.max(1) as f64,
    })
}

/// Writes the whole volume once with large writes, so reads find data and
/// writes are overwrites, as in fio on a laid-out file.
fn fill_volume(shard: &mut Shard, volume_bytes: u64, version: &mut u64) -> Result<()> {
    let chunk = 256 * 4096u64;
    let mut buf = AlignedBuf::new(256);
    buf.fill(0xA7);
    let mut off = 0;
    let mut inflight = 0;
    let mut failure = None;
    while off < volume_bytes || inflight > 0 {
        while off < volume_bytes && inflight < 8 {
            *version += 1;
            let seg = [Segment {
                addr: buf.as_mut_ptr(),
                len: chunk as usize,
            }];
            let req = EngineRequest {
                op: EngineOp::Write,
                volume: 1,
                offset_bytes: off,
                len_bytes: chunk,
                segments: &seg,
                version: *version,
                epoch: 1,
                tag: 0,
                chain: &[],
                block_crc: None,
            };
            // SAFETY: buf outlives every request (we drain before returning).
            unsafe { shard.submit(&req) }.context("fill")?;
            off += chunk;
            inflight += 1;
        }
        shard.wait(&mut |c: Completion| {
            inflight -= 1;
            if let Err(e) = c.result {
                failure = Some(e);
            }
        });
        if let Some(e) = failure.take() {
            return Err(e).context("filling the benchmark volume");
        }
    }
    Ok(())
}

fn prepare_file(path: &Path, size: u64) -> Result<()> {
    // Lay the file out with real data so both fio and the engine overwrite
    // allocated, written extents (no unwritten-extent conversions).
    let status = std::process::Command::new("fio")
        .arg("--name=layout")
        .arg(format!("--filename={}", path.display()))
        .arg(format!("--size={size}"))
        .arg("--rw=write")
        .arg("--bs=1M")
        .arg("--direct=1")
        .arg("--ioengine=io_uring")
        .arg("--iodepth=8")
        .arg("--output=/dev/null")
        .status()
        .context("running fio to lay out the benchmark file")?;
    anyhow::ensure!(status.success(), "fio could not lay out {}", path.display());
    Ok(())
}

pub fn run(args: &BenchArgs) -> Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let file = args.dir.join("engine-bench.img");
    println!(
        "celer bench engine: file {} ({} MiB), volume {} MiB, {} s per workload, 4 KiB blocks",
        file.display(),
        args.file_size_bytes >> 20,
        args.volume_size_bytes >> 20,
        args.runtime_s
    );
    prepare_file(&file, args.file_size_bytes)?;
    // One shard: a pool of 2.25 MiB takes two 2 MiB pages.
    let reserve = args.hugepages.then(|| crate::hugepages::Reserve::ensure(2));
    let mut pages = None;
    let runtime = Duration::from_secs(args.runtime_s as u64);

    // fio and the engine take turns on the same file, workload by workload,
    // so that a noisy neighbour hurts both alike. Before each engine run the
    // file is formatted afresh and the volume filled, as fio's is laid out.
    let mut fio_figs = Vec::new();
    let mut eng_figs = Vec::new();
    let mut amp = Vec::new();
    let mut totals = celer_engine::ShardStats::default();
    let selected: Vec<_> = WORKLOADS
        .iter()
        .copied()
        .filter(|(rw, _, qd)| {
            args.only
                .as_ref()
                .is_none_or(|o| format!("{rw}-qd{qd}").contains(o.as_str()))
        })
        .collect();
    anyhow::ensure!(
        !selected.is_empty(),
        "--only matches none of randwrite-qd1, randwrite-qd32, randread-qd1, randread-qd32"
    );
    for &(rw, op, qd) in &selected {
        if args.with_fio {
            let f = fio::run(
                &file,
                rw,
                qd,
                args.runtime_s,
                args.volume_size_bytes,
                rw.contains("write"),
            )?;
            fio_figs.push(f);
        }
        Engine::format(
            &file,
            &FormatOptions {
                shard_count: 1,
                ..FormatOptions::default()
            },
        )?;
        let engine = Engine::open(
            &file,
            &OpenOptions {
                hugepages: args.hugepages,
                ..OpenOptions::default()
            },
        )?;
        let mut shard = engine.into_shards().remove(0);
        pages = Some(shard.buffer_pages());
        let mut version = 1u64;
        fill_volume(&mut shard, args.volume_size_bytes, &mut version)?;
        let s0 = shard.stats();
        let f = drive(
            &mut shard,
            op,
            qd as usize,
            args.volume_size_bytes / 4096,
            runtime,
            &mut version,
        )?;
        let s1 = shard.stats();
        let user = (s1.user_bytes_written - s0.user_bytes_written) as f64;
        let disk = (s1.data_bytes_written + s1.journal_bytes_written + s1.meta_bytes_written
            - s0.data_bytes_written
            - s0.journal_bytes_written
            - s0.meta_bytes_written) as f64;
        amp.push(if user > 0.0 { disk / user } else { 0.0 });
        totals.data_bytes_written += s1.data_bytes_written - s0.data_bytes_written;
        totals.journal_bytes_written += s1.journal_bytes_written - s0.journal_bytes_written;
        totals.meta_bytes_written += s1.meta_bytes_written - s0.meta_bytes_written;
        totals.checkpoints += s1.checkpoints - s0.checkpoints;
        totals.flushes += s1.flushes - s0.flushes;
        totals.journal_data_writes += s1.journal_data_writes - s0.journal_data_writes;
        totals.ops += s1.ops - s0.ops;
        eng_figs.push(f);
        shard.close()?;
    }

    println!();
    if let Some((p, bytes)) = pages {
        println!(
            "engine buffers: {} KiB on {}{}",
            bytes >> 10,
            p.name(),
            reserve
                .as_ref()
                .map_or(" (--no-hugepages)".to_string(), |r| format!(
                    " ({})",
                    r.note
                ))
        );
    }
    drop(reserve);
    println!(
        "{:<16} {:>10} {:>9} {:>9} {:>9} {:>6} | {:>10} {:>9} {:>9} {:>9} | {:>9} {:>9}",
        "workload",
        "IOPS",
        "mean µs",
        "p99 µs",
        "CPU µs/IO",
        "WA",
        "fio IOPS",
        "mean µs",
        "p99 µs",
        "CPU µs/IO",
        "lat ×fio",
        "IOPS ×fio"
    );
    for (i, (rw, _, qd)) in selected.iter().enumerate() {
        let e = eng_figs[i];
        let name = format!("{rw} QD{qd}");
        let wa = if amp[i] > 0.0 {
            format!("{:.2}", amp[i])
        } else {
            "-".into()
        };
        match fio_figs.get(i) {
            Some(f) => println!(
                "{:<16} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>6} | {:>10.0} {:>9.1} {:>9.1} {:>9.1} | {:>9.2} {:>9.2}",
                name,
                e.iops,
                e.mean_us,
                e.p99_us,
                e.cpu_us_per_io,
                wa,
                f.iops,
                f.mean_us,
                f.p99_us,
                f.cpu_us_per_io,
                e.mean_us / f.mean_us,
                e.iops / f.iops
            ),
            None => println!(
                "{:<16} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>6}",
                name, e.iops, e.mean_us, e.p99_us, e.cpu_us_per_io, wa
            ),
        }
    }
    println!();
    for (i, (rw, _, qd)) in selected.iter().enumerate() {
        if let (1, Some(f)) = (*qd, fio_figs.get(i)) {
            let e = eng_figs[i];
            println!(
                "{rw} QD1 time per I/O (1/IOPS, everything included): engine {:.1} µs, fio {:.1} µs, ratio {:.2}",
                1e6 / e.iops,
                1e6 / f.iops,
                f.iops / e.iops
            );
        }
    }
    println!(
        "engine disk writes during the measured runs: data {} MiB, journal {} MiB, checkpoints/headers {} MiB; {} checkpoints, {} flushes for {} requests; {} writes alone in their shard went to disk as one write with their journal block (then moved)",
        totals.data_bytes_written >> 20,
        totals.journal_bytes_written >> 20,
        totals.meta_bytes_written >> 20,
        totals.checkpoints,
        totals.flushes,
        totals.ops,
        totals.journal_data_writes
    );
    println!("targets: engine QD1 latency <= 1.15x fio, QD32 IOPS >= 0.9x fio; WA = disk bytes written / user bytes written");
    Ok(())
}
