//! Incremental backup: `celer snapshot diff VOL@A VOL@B [--output FILE]`
//! lists or exports what changed between two snapshots of a volume (like
//! `rbd export-diff`), and `celer snapshot import-diff FILE VOLUME` applies
//! such a file to another volume (like `rbd import-diff`).
//!
//! What changed: the chunks that a layer newer than A holds in B's chain
//! (the nodes list them: `ListChunks` with `FLAG_SINCE`). A must lie in
//! B's chain (taken before B, on the same volume, with no rollback to an
//! older snapshot between them); otherwise the diff is refused. The unit is
//! the chunk (1 MiB by default): a chunk written in one block is exported
//! whole, as B reads it; runs of zero blocks in it go out as zero records,
//! so a discard or a zeroing after A is carried too. Without A, every
//! chunk B reads from any layer is exported (a full diff).
//!
//! The file: a 16-byte magic, a JSON header (length-prefixed: volume,
//! snapshots, size), then records, all integers little-endian:
//! `D` offset u64, length u32, data, crc32c u32 (data); `Z` offset u64,
//! length u64 (zeroes); `E` records u64, data bytes u64 (the end). The
//! import reads the whole file once to check every crc and the end record
//! before it writes anything, so a truncated or damaged file changes
//! nothing; then it writes data records and zeroes the zero records.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use celer_device::{Allocation, BlockDevice, DeviceQueue, Extent, IoOp, IoRequest, IoSegment};
use indicatif::{HumanBytes, ProgressBar};
use serde::{Deserialize, Serialize};

use crate::cluster_dev::{open_client, AttachOptions};
use crate::meta_cmd::{human, Conn};
use crate::snapshot_cmd::split_spec;

const MAGIC: &[u8; 16] = b"CELER-DIFF-V1\n\0\0";
/// Bytes read from the snapshot per request (a chunk at most).
const READ_BYTES: u64 = 1 << 20;
/// Longest header accepted on import.
const HEADER_MAX_BYTES: u32 = 64 << 10;
/// Longest data record accepted on import.
const RECORD_MAX_BYTES: u32 = 16 << 20;
const BLOCK: usize = 4096;

/// What a diff file says it holds.
#[derive(Serialize, Deserialize, Debug)]
struct DiffHeader {
    /// The volume the diff was taken from.
    volume: String,
    /// The older snapshot (None: a full diff).
    from: Option<String>,
    /// The snapshot the data is read from.
    to: String,
    /// B's volume size: a target smaller than this is refused.
    size_bytes: u64,
    chunk_bytes: u64,
}

/// `celer snapshot diff`.
pub fn diff(from: &str, to: Option<&str>, output: Option<&Path>, conn: &Conn) -> Result<()> {
    // One spec: a full diff of it; two: from the first to the second.
    let (from, to) = match to {
        Some(to) => (Some(from), to),
        None => (None, from),
    };
    let (volume, to_snap) = split_spec(to)?;
    let from_snap = match from {
        Some(f) => {
            let (v, s) = split_spec(f)?;
            anyhow::ensure!(
                v == volume,
                "`{f}` and `{to}` name different volumes: a diff is between two snapshots of one volume"
            );
            Some(s)
        }
        None => None,
    };
    let (url, token) = conn.url_and_token()?;
    let mc = conn.client()?;
    let vol = mc.volume(volume).map_err(human)?;
    let missing = |s: &str| {
        anyhow::anyhow!(
            "volume {volume} has no snapshot `{s}`: `celer snapshot list {volume}` shows them"
        )
    };
    let b = vol.snapshot(to_snap).ok_or_else(|| missing(to_snap))?;
    let since = match from_snap {
        Some(a_name) => {
            let a = vol.snapshot(a_name).ok_or_else(|| missing(a_name))?;
            anyhow::ensure!(
                a.era != b.era,
                "{volume}@{a_name} and {volume}@{to_snap} are the same snapshot"
            );
            anyhow::ensure!(
                b.under.contains(&a.era),
                "{volume}@{a_name} is not under {volume}@{to_snap} (taken after it, or a rollback lies between them): \
                 no diff from it; take a full diff with `celer snapshot diff {volume}@{to_snap}`"
            );
            Some(a.era)
        }
        None => None,
    };
    let (client, detach) = open_client(
        &url,
        &token,
        volume,
        &AttachOptions {
            read_only: true,
            snapshot: Some(to_snap.to_string()),
            ..AttachOptions::exclusive("snapshot diff")
        },
    )?;
    let result = (|| -> Result<()> {
        let mut extents = Vec::new();
        client
            .chunks_since(since, 0, vol.size_bytes, &mut extents)
            .map_err(|e| anyhow::anyhow!("chunk lists of {to}: {e}"))?;
        let changed: Vec<(u64, u64)> = data_extents(&extents);
        let changed_bytes: u64 = changed.iter().map(|e| e.1).sum();
        let Some(path) = output else {
            for (off, len) in &changed {
                println!("{off} {len}");
            }
            println!(
                "{} extents, {} changed since {} (chunk granularity)",
                changed.len(),
                HumanBytes(changed_bytes),
                from.unwrap_or("the start")
            );
            return Ok(());
        };
        let header = DiffHeader {
            volume: volume.to_string(),
            from: from_snap.map(str::to_string),
            to: to_snap.to_string(),
            size_bytes: vol.size_bytes,
            chunk_bytes: client.route_table().chunk_bytes,
        };
        let started = Instant::now();
        let bar = bar(changed_bytes, "diff");
        let totals = write_diff(client.clone(), &header, &changed, path, &bar)?;
        bar.finish_and_clear();
        println!(
            "wrote {} ({} since {}): {} of data, {} of zeroes, {} records, {:.2} s",
            path.display(),
            to,
            from.unwrap_or("the start"),
            HumanBytes(totals.data),
            HumanBytes(totals.zeroes),
            totals.records,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    })();
    drop(client);
    if let Err(e) = detach.detach() {
        tracing::warn!("{e:#}");
    }
    result
}

/// `(offset, length)` of the data extents of an allocation list.
fn data_extents(extents: &[Extent]) -> Vec<(u64, u64)> {
    let mut at = 0;
    let mut out = Vec::new();
    for e in extents {
        if e.allocation == Allocation::Data {
            out.push((at, e.len_bytes));
        }
        at += e.len_bytes;
    }
    out
}

#[derive(Default)]
struct Totals {
    data: u64,
    zeroes: u64,
    records: u64,
}

fn write_diff(
    dev: Arc<celer_client::Client>,
    header: &DiffHeader,
    changed: &[(u64, u64)],
    path: &Path,
    bar: &ProgressBar,
) -> Result<Totals> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = BufWriter::with_capacity(4 << 20, file);
    let json = serde_json::to_vec(header)?;
    w.write_all(MAGIC)?;
    w.write_all(&(json.len() as u32).to_le_bytes())?;
    w.write_all(&json)?;
    let mut q = dev.open_queue(0).context("open a queue")?;
    let mut buf = vec![0u8; READ_BYTES as usize];
    let mut t = Totals::default();
    for &(start, len) in changed {
        let mut at = start;
        while at < start + len {
            let n = (start + len - at).min(READ_BYTES);
            let b = &mut buf[..n as usize];
            sync_io(q.as_mut(), IoOp::Read, at, b)
                .with_context(|| format!("read {} bytes at {at}", n))?;
            // Runs of zero and non-zero blocks.
            let mut i = 0;
            while i < b.len() {
                let zero = is_zero(&b[i..(i + BLOCK).min(b.len())]);
                let mut j = i;
                while j < b.len() && is_zero(&b[j..(j + BLOCK).min(b.len())]) == zero {
                    j = (j + BLOCK).min(b.len());
                }
                let off = at + i as u64;
                if zero {
                    w.write_all(b"Z")?;
                    w.write_all(&off.to_le_bytes())?;
                    w.write_all(&((j - i) as u64).to_le_bytes())?;
                    t.zeroes += (j - i) as u64;
                } else {
                    let data = &b[i..j];
                    w.write_all(b"D")?;
                    w.write_all(&off.to_le_bytes())?;
                    w.write_all(&(data.len() as u32).to_le_bytes())?;
                    w.write_all(data)?;
                    w.write_all(&crc32c::crc32c(data).to_le_bytes())?;
                    t.data += data.len() as u64;
                }
                t.records += 1;
                i = j;
            }
            at += n;
            bar.inc(n);
        }
    }
    w.write_all(b"E")?;
    w.write_all(&t.records.to_le_bytes())?;
    w.write_all(&t.data.to_le_bytes())?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
        .with_context(|| format!("sync {}", path.display()))?;
    Ok(t)
}

/// One record of a diff file.
enum Record {
    Data { offset: u64, data: Vec<u8> },
    Zeroes { offset: u64, len: u64 },
    End { records: u64, data: u64 },
}

/// Reads a diff file's header and records.
struct DiffReader {
    r: BufReader<File>,
    path: PathBuf,
}

impl DiffReader {
    fn open(path: &Path) -> Result<(DiffReader, DiffHeader)> {
        let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut r = BufReader::with_capacity(4 << 20, f);
        let mut magic = [0u8; 16];
        r.read_exact(&mut magic)
            .with_context(|| format!("{}: too short for a diff file", path.display()))?;
        anyhow::ensure!(
            &magic == MAGIC,
            "{}: not a Celer diff file (made by `celer snapshot diff --output`)",
            path.display()
        );
        let mut n = [0u8; 4];
        r.read_exact(&mut n)?;
        let n = u32::from_le_bytes(n);
        anyhow::ensure!(
            n <= HEADER_MAX_BYTES,
            "{}: header of {n} bytes",
            path.display()
        );
        let mut json = vec![0u8; n as usize];
        r.read_exact(&mut json)?;
        let header: DiffHeader = serde_json::from_slice(&json)
            .with_context(|| format!("{}: bad header", path.display()))?;
        Ok((
            DiffReader {
                r,
                path: path.to_path_buf(),
            },
            header,
        ))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b).map_err(|e| self.cut(e))?;
        Ok(u64::from_le_bytes(b))
    }

    fn cut(&self, e: std::io::Error) -> anyhow::Error {
        anyhow::anyhow!(
            "{}: truncated or unreadable ({e}); nothing was applied",
            self.path.display()
        )
    }

    /// The next record, its crc checked (`data` is reused).
    fn next(&mut self, data: &mut Vec<u8>) -> Result<Record> {
        let mut tag = [0u8; 1];
        self.r.read_exact(&mut tag).map_err(|e| self.cut(e))?;
        match &tag {
            b"D" => {
                let offset = self.u64()?;
                let mut n = [0u8; 4];
                self.r.read_exact(&mut n).map_err(|e| self.cut(e))?;
                let n = u32::from_le_bytes(n);
                anyhow::ensure!(
                    n > 0 && n <= RECORD_MAX_BYTES,
                    "{}: a data record of {n} bytes",
                    self.path.display()
                );
                data.resize(n as usize, 0);
                self.r.read_exact(data).map_err(|e| self.cut(e))?;
                let mut c = [0u8; 4];
                self.r.read_exact(&mut c).map_err(|e| self.cut(e))?;
                anyhow::ensure!(
                    crc32c::crc32c(data) == u32::from_le_bytes(c),
                    "{}: the data record at volume offset {offset} fails its crc32c; nothing was applied",
                    self.path.display()
                );
                Ok(Record::Data {
                    offset,
                    data: std::mem::take(data),
                })
            }
            b"Z" => {
                let offset = self.u64()?;
                let len = self.u64()?;
                Ok(Record::Zeroes { offset, len })
            }
            b"E" => {
                let records = self.u64()?;
                let data = self.u64()?;
                Ok(Record::End { records, data })
            }
            other => bail!(
                "{}: unknown record type {:#04x}; nothing was applied",
                self.path.display(),
                other[0]
            ),
        }
    }
}

/// Checks every record of the file (crc, bounds, the end record) and
/// returns the bytes it would write.
fn check_file(path: &Path, size_bytes: u64) -> Result<(DiffHeader, u64)> {
    let (mut r, header) = DiffReader::open(path)?;
    let (mut records, mut data_bytes, mut total) = (0u64, 0u64, 0u64);
    let mut buf = Vec::new();
    loop {
        let rec = r.next(&mut buf)?;
        let (offset, len) = match &rec {
            Record::Data { offset, data } => (*offset, data.len() as u64),
            Record::Zeroes { offset, len } => (*offset, *len),
            Record::End {
                records: n,
                data: d,
            } => {
                anyhow::ensure!(
                    *n == records && *d == data_bytes,
                    "{}: the end record counts {n} records and {d} data bytes, the file holds {records} and {data_bytes}",
                    path.display()
                );
                return Ok((header, total));
            }
        };
        if let Record::Data { data, .. } = rec {
            data_bytes += len;
            buf = data;
        }
        anyhow::ensure!(
            offset % BLOCK as u64 == 0
                && len % BLOCK as u64 == 0
                && offset.checked_add(len).is_some_and(|e| e <= size_bytes),
            "{}: a record at {offset} of {len} bytes lies outside the target's {size_bytes} bytes or off 4 KiB",
            path.display()
        );
        records += 1;
        total += len;
    }
}

/// `celer snapshot import-diff FILE VOLUME`.
pub fn import_diff(path: &Path, volume: &str, conn: &Conn) -> Result<()> {
    let (url, token) = conn.url_and_token()?;
    let vol = conn.client()?.volume(volume).map_err(human)?;
    let (header, total) = check_file(path, vol.size_bytes)?;
    anyhow::ensure!(
        header.size_bytes <= vol.size_bytes,
        "the diff is of a {}-byte volume; {volume} holds {} bytes: grow it first (celer volume resize)",
        header.size_bytes,
        vol.size_bytes
    );
    let (client, detach) = open_client(
        &url,
        &token,
        volume,
        &AttachOptions::exclusive("snapshot import-diff"),
    )?;
    let started = Instant::now();
    let bar = bar(total, "import-diff");
    let result = (|| -> Result<Totals> {
        let (mut r, _) = DiffReader::open(path)?;
        let mut q = client.open_queue(0).context("open a queue")?;
        let mut buf = Vec::new();
        let mut t = Totals::default();
        loop {
            match r.next(&mut buf)? {
                Record::Data { offset, mut data } => {
                    sync_io(q.as_mut(), IoOp::Write, offset, &mut data)
                        .with_context(|| format!("write {} bytes at {offset}", data.len()))?;
                    t.data += data.len() as u64;
                    bar.inc(data.len() as u64);
                    buf = data;
                }
                Record::Zeroes { offset, len } => {
                    let mut at = offset;
                    while at < offset + len {
                        // One request stays within a chunk.
                        let n = (offset + len - at).min(READ_BYTES - at % READ_BYTES);
                        zeroes(q.as_mut(), at, n)
                            .with_context(|| format!("zero {n} bytes at {at}"))?;
                        at += n;
                    }
                    t.zeroes += len;
                    bar.inc(len);
                }
                Record::End { .. } => break,
            }
            t.records += 1;
        }
        let mut none = [0u8; 0];
        sync_io(q.as_mut(), IoOp::Flush, 0, &mut none).context("flush")?;
        Ok(t)
    })();
    bar.finish_and_clear();
    drop(client);
    if let Err(e) = detach.detach() {
        tracing::warn!("{e:#}");
    }
    let t = result.with_context(|| {
        format!(
            "applying {} to volume {volume} stopped part way: apply the same file again (it writes the same data)",
            path.display()
        )
    })?;
    println!(
        "applied {} ({}@{} since {}) to volume {volume}: {} of data, {} of zeroes, {} records, {:.2} s",
        path.display(),
        header.volume,
        header.to,
        header.from.as_deref().unwrap_or("the start"),
        HumanBytes(t.data),
        HumanBytes(t.zeroes),
        t.records,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
        "{what} {{bar:40}} {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}"
    )) {
        bar.set_style(style);
    }
    bar
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// One request on `q`, waited for.
fn sync_io(q: &mut dyn DeviceQueue, op: IoOp, offset: u64, buf: &mut [u8]) -> Result<()> {
    let seg = [IoSegment {
        addr: buf.as_mut_ptr(),
        len: buf.len(),
    }];
    let req = IoRequest {
        op,
        offset_bytes: offset,
        len_bytes: buf.len() as u64,
        segments: if buf.is_empty() { &[] } else { &seg },
        tag: 1,
    };
    wait(q, &req)
}

fn zeroes(q: &mut dyn DeviceQueue, offset: u64, len: u64) -> Result<()> {
    let req = IoRequest {
        op: IoOp::WriteZeroes,
        offset_bytes: offset,
        len_bytes: len,
        segments: &[],
        tag: 1,
    };
    wait(q, &req)
}

fn wait(q: &mut dyn DeviceQueue, req: &IoRequest<'_>) -> Result<()> {
    // SAFETY: the request's buffers outlive it: we wait for its completion.
    unsafe { q.submit(req) }.map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut done = None;
    while done.is_none() {
        if q.poll(&mut |c| done = Some(c.result)) == 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    match done {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(anyhow::anyhow!("{e}")),
        None => bail!("no completion"),
    }
}
