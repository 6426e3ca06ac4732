//! `celer volume import FILE NAME` and `celer volume export NAME FILE`:
//! disk images into and out of a volume, with a progress bar.
//!
//! Raw images take the direct path: the volume is opened in this process
//! through the distributed client (`cluster_dev::open_volume`) and copied
//! in `REQUEST_BYTES` requests, `QUEUES` device queues (one thread each) at
//! `DEPTH_PER_QUEUE`. Any other format (qcow2, vmdk, ...) goes through
//! `qemu-img convert` against this process's own NBD export of the volume,
//! served on a private Unix socket for exactly one connection.
//!
//! Thin: an all-zero request-sized block of a raw image is not written to a
//! volume created by the import (a new volume reads as zeroes; volume ids
//! are never reused); into an existing volume it becomes a `WriteZeroes`,
//! so old data cannot show through. A raw export leaves all-zero blocks as
//! holes in a regular file.
//!
//! Invariant: a slot's buffer is owned by the device from `submit` until its
//! completion; a worker never returns (or drops its slots) with requests in
//! flight, even after an error.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use celer_device::{BlockDevice, IoCompletion, IoOp, IoRequest, IoSegment};
use celer_meta::api::CreateVolume;
use clap::{Args, ValueEnum};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use crate::meta_cmd::{human, Conn};

/// Bytes per device request (and the unit of zero detection).
const REQUEST_BYTES: u64 = 1 << 20;
/// Device queues, each driven by its own thread.
const QUEUES: usize = 2;
/// Requests in flight per queue: `QUEUES * DEPTH_PER_QUEUE` in all.
const DEPTH_PER_QUEUE: usize = 8;
/// Volume sizes are multiples of this.
const VOLUME_ALIGN_BYTES: u64 = 4096;
/// Longest sleep waiting for completions before polling again.
const POLL_WAIT_MS: i32 = 5;
/// Most bytes of qemu-img's error output kept for the error message.
const QEMU_STDERR_MAX_BYTES: usize = 16 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ImportFormat {
    /// The image's bytes as they are.
    Raw,
    /// A qcow2 image (through qemu-img).
    Qcow2,
    /// Ask `qemu-img info` (any format qemu-img reads).
    Auto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// The volume's bytes; all-zero blocks are holes in a regular file.
    Raw,
    /// A qcow2 image (through qemu-img).
    Qcow2,
}

#[derive(Args)]
pub struct ImportArgs {
    /// The image to import (a file or a block device).
    file: PathBuf,
    /// The volume to write: created if missing, or an existing volume at
    /// least as large as the image.
    name: String,
    /// The image's format.
    #[arg(long, value_enum, default_value_t = ImportFormat::Auto)]
    format: ImportFormat,
    /// Size of the volume to create [default: the image's virtual size,
    /// rounded up to 4K]; at least the image's size.
    #[arg(long, value_parser = celer_device::parse_size)]
    size: Option<u64>,
    /// Logical sector size of a volume the import creates: 512 (what disk
    /// and cloud images are laid out in) or 4096.
    #[arg(long, default_value_t = 512)]
    sector_size: u32,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args)]
pub struct ExportArgs {
    /// The volume to read, or one of its snapshots: VOLUME@SNAPSHOT.
    name: String,
    /// Where to write the image (a regular file is replaced; a block device
    /// must be at least as large as the volume).
    file: PathBuf,
    /// The image's format.
    #[arg(long, value_enum, default_value_t = ExportFormat::Raw)]
    format: ExportFormat,
    #[command(flatten)]
    conn: Conn,
}

/// What `qemu-img info` says about an image.
struct ImageInfo {
    format: String,
    virtual_size_bytes: u64,
}

/// In the largest unit not above `bytes`: `2 MiB` when it divides exactly,
/// `8.01 MiB` otherwise.
pub(crate) fn bytes_text(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift {
            if bytes.is_multiple_of(1 << shift) {
                return format!("{} {unit}", bytes >> shift);
            }
            return format!("{:.2} {unit}", bytes as f64 / (1u64 << shift) as f64);
        }
    }
    format!("{bytes} B")
}

fn round_up(bytes: u64, align: u64) -> u64 {
    bytes.div_ceil(align) * align
}

/// `qemu-img` was not found, with what to do about it.
fn qemu_img_missing(why: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "qemu-img not found: it is needed {why}; install it (Debian: apt install qemu-utils)"
    )
}

fn qemu_img_info(file: &Path, format: Option<&str>) -> Result<ImageInfo> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["info", "--output=json"]);
    if let Some(f) = format {
        cmd.args(["-f", f]);
    }
    let out = match cmd.arg(file).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(qemu_img_missing(
                "to read the image's format and size (pass --format raw for a raw image)",
            ))
        }
        Err(e) => return Err(e).context("run qemu-img info"),
    };
    if !out.status.success() {
        bail!(
            "qemu-img cannot read {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("qemu-img info printed no JSON")?;
    let format = v["format"]
        .as_str()
        .context("qemu-img info names no format")?
        .to_string();
    let virtual_size_bytes = v["virtual-size"]
        .as_u64()
        .context("qemu-img info gives no virtual size")?;
    Ok(ImageInfo {
        format,
        virtual_size_bytes,
    })
}

/// Length of a regular file or a block device.
fn file_len(file: &File) -> Result<u64> {
    let m = file.metadata()?;
    if m.file_type().is_block_device() {
        use std::io::Seek;
        let mut f = file;
        return Ok(f.seek(std::io::SeekFrom::End(0))?);
    }
    Ok(m.len())
}

pub fn import(a: &ImportArgs) -> Result<()> {
    celer_meta::api::validate_sector_size(a.sector_size).map_err(anyhow::Error::msg)?;
    let file = File::open(&a.file)
        .with_context(|| format!("cannot read the image {}", a.file.display()))?;
    anyhow::ensure!(
        !file.metadata()?.is_dir(),
        "{} is a directory, not an image",
        a.file.display()
    );
    let image = match a.format {
        ImportFormat::Raw => ImageInfo {
            format: "raw".into(),
            virtual_size_bytes: file_len(&file)?,
        },
        ImportFormat::Qcow2 => qemu_img_info(&a.file, Some("qcow2"))?,
        ImportFormat::Auto => qemu_img_info(&a.file, None)?,
    };
    anyhow::ensure!(
        image.virtual_size_bytes > 0,
        "{} is empty: nothing to import",
        a.file.display()
    );
    let image_bytes = round_up(image.virtual_size_bytes, VOLUME_ALIGN_BYTES);
    let want_bytes = match a.size {
        Some(s) => {
            let s = round_up(s, VOLUME_ALIGN_BYTES);
            anyhow::ensure!(
                s >= image_bytes,
                "--size {} is smaller than the image {} ({}, {} bytes)",
                bytes_text(s),
                a.file.display(),
                bytes_text(image_bytes),
                image_bytes
            );
            s
        }
        None => image_bytes,
    };

    let (url, token) = a.conn.url_and_token()?;
    let meta = celer_meta::MetaClient::new(&url, &token);
    let (volume, created) = match meta.volume(&a.name) {
        Ok(v) => {
            anyhow::ensure!(
                v.size_bytes >= want_bytes,
                "volume `{}` holds {} ({} bytes), smaller than the {} ({} bytes) to import: \
                 grow it with `celer volume resize {} --size {}` or import into a new volume",
                v.name,
                bytes_text(v.size_bytes),
                v.size_bytes,
                bytes_text(want_bytes),
                want_bytes,
                v.name,
                want_bytes
            );
            (v, false)
        }
        Err(e) if e.is_not_found() => {
            let v = meta
                .create_volume(&CreateVolume {
                    name: a.name.clone(),
                    size_bytes: want_bytes,
                    replicas: None,
                    sector_size_bytes: Some(a.sector_size),
                })
                .map_err(human)
                .with_context(|| format!("create volume `{}`", a.name))?;
            (v, true)
        }
        Err(e) => return Err(human(e)),
    };
    let (dev, attached) = crate::cluster_dev::open_volume(
        &url,
        &token,
        &volume.name,
        &crate::cluster_dev::AttachOptions::exclusive("volume import"),
    )?;
    let bar = progress_bar(image.virtual_size_bytes, "import");
    let started = Instant::now();
    let result = if image.format == "raw" {
        let job = Job {
            dir: Direction::Import {
                zeroes: if created { Zeroes::Skip } else { Zeroes::Write },
            },
            file: &file,
            total_bytes: image_bytes,
            // qemu-img rounds a raw file's size up to 512 bytes.
            file_bytes: file_len(&file)?.min(image.virtual_size_bytes),
            volume: &volume.name,
        };
        copy(dev, &job, &bar).map(|s| {
            format!(
                "{} written, {} of zeroes {}",
                bytes_text(s.data_bytes),
                bytes_text(s.zero_bytes),
                if created { "skipped" } else { "written" }
            )
        })
    } else {
        let mut args: Vec<String> = ["convert", "-p", "-n", "-W", "-f"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(image.format.clone());
        args.extend(["-O".into(), "raw".into()]);
        if created {
            // Holes of the image are not written to a fresh volume.
            args.push("--target-is-zero".into());
        }
        args.push(a.file.display().to_string());
        qemu_img_over_nbd(dev, false, args, None, &bar, image.virtual_size_bytes)
            .map(|()| "through qemu-img".to_string())
    };
    bar.finish_and_clear();
    if let Err(e) = attached.detach() {
        tracing::warn!("{e:#}");
    }
    let how = result.with_context(|| {
        if created {
            format!(
                "import into volume `{}` failed; the volume was created by this import and \
                 holds part of the image: import again, or `celer volume delete {}`",
                volume.name, volume.name
            )
        } else {
            format!(
                "import into volume `{}` failed; it holds part of the image",
                volume.name
            )
        }
    })?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "imported {} ({}, {}) into volume `{}` ({}, {}): {how}, {:.1} s, {}/s",
        a.file.display(),
        image.format,
        bytes_text(image.virtual_size_bytes),
        volume.name,
        if created { "created" } else { "existing" },
        bytes_text(volume.size_bytes),
        secs,
        HumanBytes((image.virtual_size_bytes as f64 / secs.max(1e-3)) as u64)
    );
    Ok(())
}

pub fn export(a: &ExportArgs) -> Result<()> {
    let (url, token) = a.conn.url_and_token()?;
    let meta = celer_meta::MetaClient::new(&url, &token);
    let (name, snapshot) = match a.name.split_once('@') {
        Some((v, s)) => (v, Some(s.to_string())),
        None => (a.name.as_str(), None),
    };
    let volume = meta.volume(name).map_err(|e| {
        if e.is_not_found() {
            anyhow::anyhow!(
                "volume `{name}` not found at {url} (list them with `celer volume list`)"
            )
        } else {
            human(e)
        }
    })?;
    let (dev, attached) = crate::cluster_dev::open_volume(
        &url,
        &token,
        &volume.name,
        &crate::cluster_dev::AttachOptions {
            read_only: true,
            snapshot,
            ..crate::cluster_dev::AttachOptions::exclusive("volume export")
        },
    )?;
    let size = volume.size_bytes;
    let bar = progress_bar(size, "export");
    let started = Instant::now();
    let result = match a.format {
        ExportFormat::Raw => export_raw(dev, &a.file, &volume.name, size, &bar),
        ExportFormat::Qcow2 => {
            let args: Vec<String> = ["convert", "-p", "-f", "raw", "-O", "qcow2"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            qemu_img_over_nbd(dev, true, args, Some(&a.file), &bar, size)
                .map(|()| "through qemu-img".to_string())
        }
    };
    bar.finish_and_clear();
    if let Err(e) = attached.detach() {
        tracing::warn!("{e:#}");
    }
    let how = result.with_context(|| {
        format!(
            "export of volume `{}` to {} failed",
            volume.name,
            a.file.display()
        )
    })?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "exported volume `{}` ({}) to {} ({}): {how}, {:.1} s, {}/s",
        volume.name,
        bytes_text(size),
        a.file.display(),
        match a.format {
            ExportFormat::Raw => "raw",
            ExportFormat::Qcow2 => "qcow2",
        },
        secs,
        HumanBytes((size as f64 / secs.max(1e-3)) as u64)
    );
    Ok(())
}

fn export_raw(
    dev: Arc<dyn BlockDevice>,
    path: &Path,
    volume: &str,
    size: u64,
    bar: &ProgressBar,
) -> Result<String> {
    let regular = !std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(regular)
        .truncate(regular)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    if regular {
        // Holes where the volume reads as zeroes.
        file.set_len(size)
            .with_context(|| format!("cannot size {} to {size} bytes", path.display()))?;
    } else {
        let have = file_len(&file)?;
        anyhow::ensure!(
            have >= size,
            "{} holds {} bytes, less than the volume's {size}",
            path.display(),
            have
        );
    }
    let job = Job {
        dir: Direction::Export {
            zeroes: if regular { Zeroes::Skip } else { Zeroes::Write },
        },
        file: &file,
        total_bytes: size,
        file_bytes: size,
        volume,
    };
    let s = copy(dev, &job, bar)?;
    file.sync_all()
        .with_context(|| format!("sync {}", path.display()))?;
    Ok(format!(
        "{} of data, {} of zeroes {}",
        bytes_text(s.data_bytes),
        bytes_text(s.zero_bytes),
        if regular { "left as holes" } else { "written" }
    ))
}

pub(crate) fn progress_bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// What an all-zero block becomes on the target.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Zeroes {
    /// Nothing: the target already reads as zeroes there.
    Skip,
    /// Written (a `WriteZeroes` on a volume, zero bytes on a file).
    Write,
}

#[derive(Clone, Copy)]
enum Direction {
    /// File to volume.
    Import { zeroes: Zeroes },
    /// Volume to file.
    Export { zeroes: Zeroes },
}

struct Job<'a> {
    dir: Direction,
    file: &'a File,
    /// Bytes of the volume to copy, from offset 0: a multiple of 4K.
    total_bytes: u64,
    /// Bytes of the file that exist; past them an import reads zeroes.
    file_bytes: u64,
    volume: &'a str,
}

#[derive(Default)]
struct CopyStats {
    data_bytes: AtomicU64,
    zero_bytes: AtomicU64,
}

struct Totals {
    data_bytes: u64,
    zero_bytes: u64,
}

/// Copies `job.total_bytes` with `QUEUES` threads; the first error stops all.
fn copy(dev: Arc<dyn BlockDevice>, job: &Job<'_>, bar: &ProgressBar) -> Result<Totals> {
    let stats = CopyStats::default();
    let abort = AtomicBool::new(false);
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..QUEUES)
            .map(|q| {
                let (dev, stats, abort) = (&dev, &stats, &abort);
                std::thread::Builder::new()
                    .name(format!("celer-io-{q}"))
                    .spawn_scoped(s, move || {
                        let r = copy_queue(dev.as_ref(), q, job, stats, abort, bar);
                        if r.is_err() {
                            abort.store(true, Ordering::Release);
                        }
                        r
                    })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| match w {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a copy thread panicked"))),
                Err(e) => Err(anyhow::anyhow!("cannot start a copy thread: {e}")),
            })
            .collect()
    });
    // The queue that failed first explains it; the others only stopped.
    let mut stopped = None;
    for r in results {
        match r {
            Ok(()) => {}
            Err(e) if e.is::<Stopped>() => stopped = Some(e),
            Err(e) => return Err(e),
        }
    }
    if let Some(e) = stopped {
        return Err(e);
    }
    Ok(Totals {
        data_bytes: stats.data_bytes.load(Ordering::Relaxed),
        zero_bytes: stats.zero_bytes.load(Ordering::Relaxed),
    })
}

/// A queue stopped because another one failed.
#[derive(Debug)]
struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stopped: another queue failed")
    }
}

impl std::error::Error for Stopped {}

struct Slot {
    buf: Vec<u8>,
    offset_bytes: u64,
    len_bytes: u64,
    op: IoOp,
    busy: bool,
}

fn is_zero(buf: &[u8]) -> bool {
    // Fold 4K at a time (vectorises), stop at the first non-zero block.
    buf.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, b| acc | b) == 0)
}

/// Reads `buf.len()` bytes at `offset` of an image `file_bytes` long;
/// past its end the buffer is zero.
fn read_image(file: &File, file_bytes: u64, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let have = file_bytes.saturating_sub(offset).min(buf.len() as u64) as usize;
    file.read_exact_at(&mut buf[..have], offset)?;
    buf[have..].fill(0);
    Ok(())
}

/// One queue's share of the copy: requests `q`, `q + QUEUES`, ...
fn copy_queue(
    dev: &dyn BlockDevice,
    q: usize,
    job: &Job<'_>,
    stats: &CopyStats,
    abort: &AtomicBool,
    bar: &ProgressBar,
) -> Result<()> {
    let requests = job.total_bytes.div_ceil(REQUEST_BYTES);
    let mut next = q as u64;
    // Declared before the queue so they are dropped after it.
    let mut slots: Vec<Slot> = (0..DEPTH_PER_QUEUE)
        .map(|_| Slot {
            buf: vec![0u8; REQUEST_BYTES as usize],
            offset_bytes: 0,
            len_bytes: 0,
            op: IoOp::Read,
            busy: false,
        })
        .collect();
    let mut queue = dev
        .open_queue(q)
        .with_context(|| format!("open queue {q} of volume `{}`", job.volume))?;
    let mut failed: Option<anyhow::Error> = None;
    let mut done: Vec<IoCompletion> = Vec::with_capacity(DEPTH_PER_QUEUE);
    loop {
        if failed.is_none() && abort.load(Ordering::Acquire) {
            failed = Some(Stopped.into());
        }
        // Fill the idle slots.
        for (i, s) in slots.iter_mut().enumerate() {
            if s.busy {
                continue;
            }
            while failed.is_none() && next < requests {
                let offset = next * REQUEST_BYTES;
                let len = REQUEST_BYTES.min(job.total_bytes - offset);
                next += QUEUES as u64;
                let buf = &mut s.buf[..len as usize];
                let op = match job.dir {
                    Direction::Import { zeroes } => {
                        if let Err(e) = read_image(job.file, job.file_bytes, offset, buf) {
                            failed =
                                Some(anyhow::anyhow!("read the image at offset {offset}: {e}"));
                            break;
                        }
                        match (is_zero(buf), zeroes) {
                            (false, _) => IoOp::Write,
                            (true, Zeroes::Write) => IoOp::WriteZeroes,
                            (true, Zeroes::Skip) => {
                                stats.zero_bytes.fetch_add(len, Ordering::Relaxed);
                                bar.inc(len);
                                continue;
                            }
                        }
                    }
                    Direction::Export { .. } => IoOp::Read,
                };
                let seg = [IoSegment {
                    addr: buf.as_mut_ptr(),
                    len: len as usize,
                }];
                let segments: &[IoSegment] = if op == IoOp::WriteZeroes { &[] } else { &seg };
                let req = IoRequest {
                    op,
                    offset_bytes: offset,
                    len_bytes: len,
                    segments,
                    tag: i as u64,
                };
                // SAFETY: the slot's buffer is neither touched nor dropped
                // until this request's completion (the loop drains every
                // request before returning).
                match unsafe { queue.submit(&req) } {
                    Ok(()) => {
                        s.offset_bytes = offset;
                        s.len_bytes = len;
                        s.op = op;
                        s.busy = true;
                    }
                    Err(e) => {
                        failed = Some(anyhow::anyhow!(
                            "{op:?} at offset {offset} of volume `{}` refused: {e}",
                            job.volume
                        ))
                    }
                }
                break;
            }
        }
        if slots.iter().all(|s| !s.busy) && (failed.is_some() || next >= requests) {
            break;
        }
        done.clear();
        queue.poll(&mut |c| done.push(c));
        if done.is_empty() {
            if let Some(fd) = queue.completion_fd() {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut p, 1, POLL_WAIT_MS) };
            }
            continue;
        }
        for c in done.drain(..) {
            let s = &mut slots[c.tag as usize];
            assert!(s.busy, "completion for idle slot {}", c.tag);
            s.busy = false;
            let (offset, len) = (s.offset_bytes, s.len_bytes);
            if let Err(e) = c.result {
                failed.get_or_insert_with(|| {
                    anyhow::anyhow!(
                        "{:?} at offset {offset} (+{len}) of volume `{}`: {e}",
                        s.op,
                        job.volume
                    )
                });
                continue;
            }
            if failed.is_some() {
                continue;
            }
            match job.dir {
                Direction::Import { .. } if s.op == IoOp::WriteZeroes => {
                    stats.zero_bytes.fetch_add(len, Ordering::Relaxed);
                }
                Direction::Import { .. } => {
                    stats.data_bytes.fetch_add(len, Ordering::Relaxed);
                }
                Direction::Export { zeroes } => {
                    let buf = &s.buf[..len as usize];
                    let zero = is_zero(buf);
                    if zero {
                        stats.zero_bytes.fetch_add(len, Ordering::Relaxed);
                    } else {
                        stats.data_bytes.fetch_add(len, Ordering::Relaxed);
                    }
                    if !zero || zeroes == Zeroes::Write {
                        if let Err(e) = job.file.write_all_at(buf, offset) {
                            failed =
                                Some(anyhow::anyhow!("write the image at offset {offset}: {e}"));
                            continue;
                        }
                    }
                }
            }
            bar.inc(len);
        }
    }
    debug_assert_eq!(queue.inflight(), 0);
    if let Some(e) = failed {
        return Err(e);
    }
    if matches!(job.dir, Direction::Import { .. }) {
        flush(queue.as_mut(), job.volume)?;
    }
    Ok(())
}

/// A flush on `queue`, waited for (no buffers involved).
fn flush(queue: &mut dyn celer_device::DeviceQueue, volume: &str) -> Result<()> {
    let req = IoRequest {
        op: IoOp::Flush,
        offset_bytes: 0,
        len_bytes: 0,
        segments: &[],
        tag: u64::MAX,
    };
    // SAFETY: a flush carries no memory.
    unsafe { queue.submit(&req) }.map_err(|e| anyhow::anyhow!("flush volume `{volume}`: {e}"))?;
    loop {
        let mut result = None;
        queue.poll(&mut |c| result = Some(c.result));
        if let Some(r) = result {
            return r.map_err(|e| anyhow::anyhow!("flush volume `{volume}`: {e}"));
        }
        if let Some(fd) = queue.completion_fd() {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut p, 1, POLL_WAIT_MS) };
        }
    }
}

/// `s` with every byte outside the URI-safe set percent-encoded.
fn uri_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The percentage in qemu-img's `-p` output, `    (12.34/100%)`.
fn parse_progress(line: &str) -> Option<f64> {
    let inner = line.trim().strip_prefix('(')?;
    let (pct, _) = inner.split_once('/')?;
    pct.trim().parse().ok()
}

/// Serves `dev` on a private NBD socket for one connection and runs
/// `qemu-img ARGS URI [DST]`, the URI being the source (`source` true) or
/// the target; qemu-img's `-p` percentage drives `bar`.
fn qemu_img_over_nbd(
    dev: Arc<dyn BlockDevice>,
    source: bool,
    mut args: Vec<String>,
    dst: Option<&Path>,
    bar: &ProgressBar,
    total_bytes: u64,
) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("celer-io-")
        .tempdir()
        .context("create a temporary directory for the NBD socket")?;
    let socket = dir.path().join("nbd.sock");
    let mut config = celer_nbd::NbdConfig::new("celer");
    config.socket = Some(socket.clone());
    config.read_only = source;
    config.connections_max = Some(1);
    let server = celer_nbd::Server::bind(config, dev).context("start the NBD export")?;
    let serving = std::thread::Builder::new()
        .name("celer-io-nbd".into())
        .spawn(move || server.run())
        .context("start the NBD thread")?;
    let uri = format!(
        "nbd+unix:///celer?socket={}",
        uri_escape(&socket.display().to_string())
    );
    args.push(uri);
    if let Some(d) = dst {
        args.push(d.display().to_string());
    }
    let mut child = match Command::new("qemu-img")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(qemu_img_missing("for images that are not raw"))
        }
        Err(e) => return Err(e).context("run qemu-img"),
    };
    let mut stderr = child.stderr.take().context("qemu-img stderr")?;
    let errors = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = (&mut stderr)
            .take(QEMU_STDERR_MAX_BYTES as u64)
            .read_to_end(&mut text);
        // Drain the rest so qemu-img never blocks on a full pipe.
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        String::from_utf8_lossy(&text).trim().to_string()
    });
    let mut stdout = child.stdout.take().context("qemu-img stdout")?;
    let mut pending = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let n = match stdout.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        pending.extend_from_slice(&chunk[..n]);
        while let Some(end) = pending.iter().position(|b| *b == b'\r' || *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if let Some(pct) = parse_progress(&String::from_utf8_lossy(&line)) {
                bar.set_position((pct.clamp(0.0, 100.0) / 100.0 * total_bytes as f64) as u64);
            }
        }
    }
    let status = child.wait().context("wait for qemu-img")?;
    let errors = errors.join().unwrap_or_default();
    if !status.success() {
        // The NBD thread stops by itself once a connection has come and
        // gone; if qemu-img never connected it ends with this process.
        bail!("qemu-img {} failed ({status}): {errors}", args.join(" "));
    }
    match serving.join() {
        Ok(r) => r.context("NBD export")?,
        Err(_) => bail!("the NBD thread panicked"),
    }
    bar.set_position(total_bytes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(round_up(1, 4096), 4096);
        assert_eq!(bytes_text(2 << 20), "2 MiB");
        assert_eq!(bytes_text((8 << 20) + 8192), "8.01 MiB");
        assert_eq!(bytes_text(6152 << 10), "6.01 MiB");
        assert_eq!(bytes_text(0), "0 B");
        assert_eq!(round_up(8192, 4096), 8192);
        assert_eq!(parse_progress("    (12.50/100%)"), Some(12.5));
        assert_eq!(parse_progress("(100.00/100%)"), Some(100.0));
        assert_eq!(parse_progress("qemu-img: oops"), None);
        assert_eq!(uri_escape("/tmp/a b/x.sock"), "/tmp/a%20b/x.sock");
        let mut z = vec![0u8; 10_000];
        assert!(is_zero(&z));
        z[9_999] = 1;
        assert!(!is_zero(&z));
    }
}
