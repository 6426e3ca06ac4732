//! Format, open (recover) and rebuild. All synchronous, before any shard
//! runs: read the superblock, learn which slots are allocated (from the
//! index, or from the slot headers when rebuilding), load each slot's newest
//! valid map copy, replay the journal, and write a checkpoint so the next
//! start has nothing to replay.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use crate::aligned::AlignedBuf;
use crate::disk::{Disk, FileDisk};
use crate::layout::{
    self, BlockEntry, BlockKind, Geometry, IndexHeader, MapHeader, Record, SlotOwner, Superblock,
    SuperblockState, BLOCK_SIZE, BLOCK_SIZE_U64,
};
use crate::shard::{Shard, ShardInit, ShardStats, SlotState};
use crate::EngineError;

mod replay;

use replay::{read_index, recover_shard};

/// Geometry choices for `Engine::format`.
#[derive(Clone, Debug)]
pub struct FormatOptions {
    /// 4 KiB blocks per chunk (power of two); 256 = 1 MiB chunks.
    pub chunk_blocks: u32,
    /// Spare physical blocks per slot for redirect-on-write.
    pub spare_blocks: u32,
    pub shard_count: u32,
    /// Journal ring per shard, in 4 KiB blocks (default 64 MiB).
    pub journal_blocks: u32,
    /// Create (or grow) a regular file of this size first.
    pub create_size_bytes: Option<u64>,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            chunk_blocks: 256,
            spare_blocks: 64,
            shard_count: 1,
            journal_blocks: 16384,
            create_size_bytes: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Requests in flight per shard.
    pub inflight_max: usize,
    /// Give each shard an eventfd that becomes readable when its requests
    /// may have completed (`Shard::completion_fd`), for owners that sleep in
    /// epoll beside other work (the storage node). Without it, completions
    /// are found by `poll`/`wait` only.
    pub completion_eventfd: bool,
    /// How long to wait for the disk's lock (see `open_disk_exclusive`)
    /// before refusing with `InUse`.
    pub lock_wait: std::time::Duration,
    /// Put each shard's fixed buffers (journal blocks, request buffers) on
    /// 2 MiB huge pages when the kernel has them reserved and free; 4 KiB
    /// pages otherwise. Off by default: machines that reserve huge pages
    /// usually reserve them for guest memory (`Shard::buffer_pages` says
    /// which were used).
    pub hugepages: bool,
}

/// How long opening a disk waits for another holder to let it go: a
/// process killed with requests in flight keeps its disk (the kernel's
/// io_uring teardown holds the file) until they complete, a few ms; the
/// new opener must not recover the disk while they can still land.
pub const LOCK_WAIT_DEFAULT: std::time::Duration = std::time::Duration::from_secs(2);

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            inflight_max: crate::shard::INFLIGHT_MAX,
            completion_eventfd: false,
            lock_wait: LOCK_WAIT_DEFAULT,
            hugepages: false,
        }
    }
}

/// What a rebuild found.
#[derive(Clone, Debug, Default)]
pub struct RebuildReport {
    pub slots_scanned: u64,
    pub chunks_found: u64,
    pub maps_loaded: u64,
    pub journal_records_replayed: u64,
    pub journal_records_dropped: u64,
    /// Small writes whose data was still only in the journal's data block
    /// (its move to the slot had not reached the disk): copied there.
    pub journal_data_moved: u64,
}

/// Totals over all shards.
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineStats {
    pub shards: ShardStats,
}

/// An opened engine: its geometry and its shards, ready to be moved to
/// their threads with `into_shards`. On a file or block device unless the
/// simulator gives it another `Disk`.
pub struct Engine<D: Disk = FileDisk> {
    geometry: Geometry,
    /// The storage node this disk belongs to, as its superblock said at open.
    node_id: Option<u64>,
    shards: Vec<Shard<D>>,
    report: RebuildReport,
}

fn os_err(path: &Path, what: &'static str, e: std::io::Error) -> EngineError {
    EngineError::Os {
        path: path.display().to_string(),
        what,
        errno_text: e.to_string(),
    }
}

fn open_disk(path: &Path, create: bool) -> Result<File, EngineError> {
    let mut o = FsOpenOptions::new();
    o.read(true).write(true).custom_flags(libc::O_DIRECT);
    if create {
        o.create(true);
    }
    o.open(path)
        .map_err(|e| os_err(path, "open with O_DIRECT", e))
}

/// Opens `path` for one process only: a block device with O_EXCL (the
/// kernel refuses it while another opener holds it so, or it is mounted),
/// a file with an exclusive `flock` (released when every descriptor of
/// this open is closed, also when the process dies). `format`, `open` and
/// `rebuild` take it; quick peeks at the superblock (`identify`) do not.
fn open_disk_exclusive(path: &Path, wait: std::time::Duration) -> Result<File, EngineError> {
    use std::os::unix::fs::FileTypeExt;
    let block_device = std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    if block_device {
        return FsOpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_EXCL)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EBUSY) => EngineError::InUse {
                    path: path.display().to_string(),
                },
                _ => os_err(path, "open with O_DIRECT|O_EXCL", e),
            });
    }
    let f = open_disk(path, false)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let deadline = std::time::Instant::now() + wait;
    loop {
        // SAFETY: flock on a descriptor we own; no memory involved.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(f);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(os_err(path, "lock (flock)", e));
        }
        if std::time::Instant::now() >= deadline {
            return Err(EngineError::InUse {
                path: path.display().to_string(),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn disk_err(disk: &impl Disk, what: &'static str, e: std::io::Error) -> EngineError {
    EngineError::Os {
        path: disk.name().to_string(),
        what,
        errno_text: e.to_string(),
    }
}

fn read_at(disk: &impl Disk, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
    disk.read_at(buf, offset)
        .map_err(|e| disk_err(disk, "read", e))
}

fn write_at(disk: &impl Disk, buf: &[u8], offset: u64) -> Result<(), EngineError> {
    disk.write_at(buf, offset)
        .map_err(|e| disk_err(disk, "write", e))
}

fn sync(disk: &impl Disk) -> Result<(), EngineError> {
    disk.sync().map_err(|e| disk_err(disk, "fdatasync", e))
}

fn read_superblock(disk: &impl Disk) -> Result<Superblock, EngineError> {
    let path = disk.name();
    let size = disk.size().map_err(|e| disk_err(disk, "size", e))?;
    if size < 2 * BLOCK_SIZE_U64 {
        return Err(EngineError::NotCeler {
            path: path.to_string(),
        });
    }
    let mut buf = AlignedBuf::new(2);
    read_at(disk, &mut buf, 0)?;
    let mut corrupt = false;
    for copy in 0..2 {
        match layout::decode_superblock(&buf[copy * BLOCK_SIZE..(copy + 1) * BLOCK_SIZE]) {
            SuperblockState::Valid(sb) => {
                let g = &sb.geometry;
                if g.total_bytes() > size {
                    return Err(EngineError::Truncated {
                        path: path.to_string(),
                        actual_bytes: size,
                        expected_bytes: g.total_bytes(),
                    });
                }
                return Ok(sb);
            }
            SuperblockState::WrongVersion(found) => {
                return Err(EngineError::WrongFormatVersion {
                    path: path.to_string(),
                    found,
                    supported: layout::FORMAT_VERSION,
                })
            }
            SuperblockState::Corrupt => corrupt = true,
            SuperblockState::Foreign => {}
        }
    }
    if corrupt {
        Err(EngineError::CorruptSuperblock {
            path: path.to_string(),
        })
    } else {
        Err(EngineError::NotCeler {
            path: path.to_string(),
        })
    }
}

/// A slot's alloc seq and owner, if allocated.
type SlotEntry = Option<(u64, SlotOwner)>;

/// Where one shard's recovery starts from.
struct ShardStart {
    /// Per local slot: alloc seq and owner, if allocated.
    owners: Vec<Option<(u64, SlotOwner)>>,
    /// Per local slot: records at or below this seq are already reflected.
    base: Vec<u64>,
    index_generation: u64,
    /// The discard floor the index carries.
    discard_floor: u64,
}

impl Engine {
    /// Writes a fresh engine onto `path`. Existing data is forgotten.
    pub fn format(path: &Path, opts: &FormatOptions) -> Result<Geometry, EngineError> {
        if let Some(size) = opts.create_size_bytes {
            let f = FsOpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| os_err(path, "create", e))?;
            let cur = f.metadata().map_err(|e| os_err(path, "stat", e))?.len();
            if cur < size {
                f.set_len(size).map_err(|e| os_err(path, "set length", e))?;
            }
        }
        let disk = FileDisk::new(open_disk_exclusive(path, LOCK_WAIT_DEFAULT)?, path);
        Engine::format_on(&disk, opts, random_u64())
    }

    /// Reads the geometry of an existing engine disk without opening it;
    /// errors like `open` if `path` is not a (valid) Celer engine disk.
    pub fn identify(path: &Path) -> Result<Geometry, EngineError> {
        let disk = FileDisk::new(open_disk(path, false)?, path);
        Ok(read_superblock(&disk)?.geometry)
    }

    /// The storage node `path` belongs to (`None`: no node took it yet, or
    /// it was formatted before disks recorded their node), without opening
    /// the engine.
    pub fn node_id_of(path: &Path) -> Result<Option<u64>, EngineError> {
        let disk = FileDisk::new(open_disk(path, false)?, path);
        Ok(read_superblock(&disk)?.node_id)
    }

    /// Records in the superblock of `path` that it belongs to storage node
    /// `node_id`, durably: copy 0 is written and synced before copy 1, so a
    /// crash in between leaves one valid copy (the new or the old one).
    /// Safe while the engine is open (shards never write the superblock).
    /// Nothing is written when the disk already names `node_id`; a disk
    /// that names another node is refused (`DiskOfAnotherNode`).
    pub fn record_node_id(path: &Path, node_id: u64) -> Result<(), EngineError> {
        let disk = FileDisk::new(open_disk(path, false)?, path);
        let mut sb = read_superblock(&disk)?;
        match sb.node_id {
            Some(id) if id == node_id => return Ok(()),
            Some(recorded) => {
                return Err(EngineError::DiskOfAnotherNode {
                    path: path.display().to_string(),
                    recorded,
                    requested: node_id,
                })
            }
            None => {}
        }
        sb.node_id = Some(node_id);
        let mut block = AlignedBuf::new(1);
        layout::encode_superblock(&sb, &mut block[..BLOCK_SIZE]);
        for copy in 0..2u64 {
            write_at(&disk, &block, copy * BLOCK_SIZE_U64)?;
            sync(&disk)?;
        }
        Ok(())
    }

    /// Opens an engine: loads the index and maps, replays the journal.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Engine, EngineError> {
        let disk = FileDisk::new(open_disk_exclusive(path, opts.lock_wait)?, path);
        Engine::open_on(disk, opts)
    }

    /// Rebuilds the index from the chunk slot headers alone (for a damaged
    /// or lost metadata area), then recovers as `open` does, and writes a
    /// fresh index. The journal is replayed where it is still valid.
    pub fn rebuild(path: &Path) -> Result<RebuildReport, EngineError> {
        let disk = FileDisk::new(open_disk_exclusive(path, LOCK_WAIT_DEFAULT)?, path);
        Engine::rebuild_on(disk)
    }
}

impl<D: Disk> Engine<D> {
    /// Writes a fresh engine with disk id `uuid` onto `disk` (see `format`).
    pub fn format_on(disk: &D, opts: &FormatOptions, uuid: u64) -> Result<Geometry, EngineError> {
        let size = disk.size().map_err(|e| disk_err(disk, "size", e))?;
        let g = Geometry::for_disk(
            uuid,
            size,
            opts.chunk_blocks,
            opts.spare_blocks,
            opts.shard_count,
            opts.journal_blocks,
        )?;
        // Journal: zeroed, so nothing of an earlier format is ever replayed
        // (the uuid check would reject it anyway).
        let zero = AlignedBuf::new(256);
        let journal_bytes = g.shard_count as u64 * g.journal_blocks as u64 * BLOCK_SIZE_U64;
        let mut at = 0;
        while at < journal_bytes {
            let n = (journal_bytes - at).min(zero.len() as u64) as usize;
            write_at(disk, &zero[..n], g.journal_start() * BLOCK_SIZE_U64 + at)?;
            at += n as u64;
        }
        let mut index = AlignedBuf::new(g.index_blocks() as usize);
        let entries = vec![None; g.slots_per_shard() as usize];
        for shard in 0..g.shard_count {
            layout::encode_index(
                uuid,
                shard,
                &IndexHeader {
                    generation: 1,
                    journal_tail: 1,
                    discard_floor: 0,
                },
                &entries,
                &mut index,
            );
            write_at(disk, &index, g.index_offset(shard, 1))?;
            // Copy 0 is left invalid: generation 1 lives in copy 1.
            let blank = AlignedBuf::new(g.index_blocks() as usize);
            write_at(disk, &blank, g.index_offset(shard, 0))?;
        }
        let mut sb = AlignedBuf::new(2);
        layout::encode_superblock(
            &Superblock {
                geometry: g,
                node_id: None,
            },
            &mut sb[..BLOCK_SIZE],
        );
        let (a, b) = sb.split_at_mut(BLOCK_SIZE);
        b.copy_from_slice(a);
        write_at(disk, &sb, 0)?;
        sync(disk)?;
        Ok(g)
    }

    /// Opens an engine on `disk` (see `open`; the caller holds the disk
    /// for this process alone).
    pub fn open_on(disk: D, opts: &OpenOptions) -> Result<Engine<D>, EngineError> {
        let sb = read_superblock(&disk)?;
        let g = sb.geometry;
        let mut starts = Vec::new();
        for shard in 0..g.shard_count {
            starts.push(read_index(&disk, &g, shard)?);
        }
        let mut engine = Engine::recover(disk, g, starts, opts)?;
        engine.node_id = sb.node_id;
        Ok(engine)
    }

    /// Rebuilds `disk`'s index from its slot headers (see `rebuild`).
    pub fn rebuild_on(disk: D) -> Result<RebuildReport, EngineError> {
        let g = read_superblock(&disk)?.geometry;
        let per = g.slots_per_shard() as usize;
        let mut starts: Vec<ShardStart> = (0..g.shard_count)
            .map(|_| ShardStart {
                owners: vec![None; per],
                base: vec![0; per],
                index_generation: 0,
                // The index is lost with the floor it kept: the journal's
                // records give what they still hold (see
                // docs/architecture.md, "Versions of chunks without a slot").
                discard_floor: 0,
            })
            .collect();
        let mut hdr = AlignedBuf::new(1);
        let mut scanned = 0;
        for slot in 0..g.slot_count {
            scanned += 1;
            let mut best: Option<(u64, Option<SlotOwner>)> = None;
            for copy in 0..2 {
                read_at(&disk, &mut hdr, g.header_offset(slot, copy))?;
                if let Some(h) = layout::decode_slot_header(g.disk_uuid, slot, &hdr) {
                    if best.is_none_or(|b| h.0 > b.0) {
                        best = Some(h);
                    }
                }
            }
            let st = &mut starts[g.shard_of_slot(slot) as usize];
            let local = (slot / g.shard_count as u64) as usize;
            match best {
                Some((seq, Some(owner))) => {
                    st.owners[local] = Some((seq, owner));
                    st.base[local] = seq - 1;
                }
                Some((seq, None)) => st.base[local] = seq,
                None => {}
            }
        }
        // Both index copies are rewritten by the recovery checkpoint; start
        // from a generation above anything a damaged copy might hold.
        for s in starts.iter_mut() {
            s.index_generation = u64::MAX / 4;
        }
        let engine = Engine::recover(
            disk,
            g,
            starts,
            &OpenOptions {
                inflight_max: 1,
                ..OpenOptions::default()
            },
        )?;
        let mut report = engine.report.clone();
        report.slots_scanned = scanned;
        for s in engine.shards {
            s.close()?;
        }
        Ok(report)
    }

    fn recover(
        disk: D,
        g: Geometry,
        starts: Vec<ShardStart>,
        opts: &OpenOptions,
    ) -> Result<Engine<D>, EngineError> {
        let disk = Arc::new(disk);
        let mut shards = Vec::new();
        let mut report = RebuildReport::default();
        for (shard, start) in starts.into_iter().enumerate() {
            let init = recover_shard(&disk, &g, shard as u32, start, opts, &mut report)?;
            shards.push(Shard::new(init)?);
        }
        sync(&*disk)?;
        Ok(Engine {
            geometry: g,
            node_id: None,
            shards,
            report,
        })
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }
    /// The storage node this disk belongs to, as its superblock said at
    /// open (`None`: none yet; see [`Engine::record_node_id`]).
    pub fn node_id(&self) -> Option<u64> {
        self.node_id
    }
    /// The shard that owns (volume, chunk).
    pub fn shard_for(&self, volume: u64, chunk: u64) -> u32 {
        crate::shard::shard_for(&self.geometry, volume, chunk)
    }
    pub fn shards_mut(&mut self) -> &mut [Shard<D>] {
        &mut self.shards
    }
    pub fn into_shards(self) -> Vec<Shard<D>> {
        self.shards
    }
    /// What recovery did at open.
    pub fn recovery_report(&self) -> &RebuildReport {
        &self.report
    }
    /// Closes every shard (drain, checkpoint).
    pub fn close(self) -> Result<(), EngineError> {
        for s in self.shards {
            s.close()?;
        }
        Ok(())
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // The uuid only has to differ between formats: urandom, mixed with the
    // clock and pid in case urandom cannot be read.
    if let Ok(mut f) = File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    u64::from_le_bytes(b) ^ t ^ (std::process::id() as u64) << 32
}
