//! A slot's in-memory state (block map, free physical blocks, holds), and
//! the versions of recently discarded chunks.

use super::*;

/// How long the version of a chunk freed by a whole-chunk discard is kept
/// (see `Discarded`): longer than a write can travel late (the client gives
/// up on a request after its deadline, 30 s by default).
pub const DISCARDED_KEEP: std::time::Duration = std::time::Duration::from_secs(120);

/// At most this many such versions are kept (the oldest go first).
pub(super) const DISCARDED_MAX: usize = 1 << 20;

/// Versions of chunks whose slot a whole-chunk discard freed, kept in
/// memory for a while: a write that arrives late (a replica's copy of a
/// write the client already retried, then discarded) and carries a version
/// at or below the discard's is dropped, as it would have been had the slot
/// stayed, instead of bringing old data back on one replica. Not journaled
/// one by one: the shard's discard floor (`Shard::restart_floor`) stands
/// for them after a restart, when clients send their unanswered writes
/// again.
#[derive(Default)]
pub(super) struct Discarded {
    pub(super) versions: HashMap<(u64, u64), Tomb>,
    pub(super) order: VecDeque<(Instant, (u64, u64))>,
    /// Tombs that keep a version per block.
    per_block: usize,
}

/// At most this many chunks keep a version per block (2 KiB each for a
/// 1 MiB chunk); beyond, a zeroing of part of a chunk keeps its version
/// for the whole chunk, as every zeroing did before (which drops older
/// writes to its other blocks too).
const PER_BLOCK_TOMBS_MAX: usize = 4096;

/// The versions kept for a chunk that holds no slot: `whole` for every
/// block (a whole-chunk discard, or a zeroing of all of it), and per block
/// (zeroings of part of it). A block's version is the higher of the two.
pub(super) struct Tomb {
    pub(super) at: Instant,
    whole: u64,
    blocks: Option<Box<[u64]>>,
}

impl Tomb {
    /// The version kept for block `b` of the chunk (0: none).
    #[inline]
    pub(super) fn of(&self, b: usize) -> u64 {
        let per = self.blocks.as_ref().and_then(|v| v.get(b).copied());
        per.unwrap_or(0).max(self.whole)
    }
}

impl Discarded {
    /// Keeps `version` for every block of `chunk` (a whole-chunk discard
    /// freed its slot), in place of what was kept.
    #[inline]
    pub(super) fn insert(&mut self, chunk: (u64, u64), version: u64) {
        self.put(chunk, version, None);
    }

    fn put(&mut self, chunk: (u64, u64), whole: u64, blocks: Option<Box<[u64]>>) {
        let now = Instant::now();
        while let Some(&(at, key)) = self.order.front() {
            if now.duration_since(at) < DISCARDED_KEEP && self.order.len() < DISCARDED_MAX {
                break;
            }
            self.order.pop_front();
            if self.versions.get(&key).is_some_and(|t| t.at == at) {
                self.forget(key);
            }
        }
        self.forget(chunk);
        self.per_block += blocks.is_some() as usize;
        self.versions.insert(
            chunk,
            Tomb {
                at: now,
                whole,
                blocks,
            },
        );
        self.order.push_back((now, chunk));
    }

    /// The live tomb of `chunk`.
    #[inline]
    pub(super) fn get(&self, chunk: (u64, u64)) -> Option<&Tomb> {
        self.versions
            .get(&chunk)
            .filter(|t| t.at.elapsed() < DISCARDED_KEEP)
    }

    /// A zeroing at `version` of blocks `first..first + count` of a chunk
    /// of `chunk_blocks` blocks that holds no slot: each keeps the higher
    /// of its version and this one.
    pub(super) fn raise(
        &mut self,
        chunk: (u64, u64),
        version: u64,
        first: usize,
        count: usize,
        chunk_blocks: usize,
    ) {
        let (whole, blocks) = match self.get(chunk) {
            Some(t) => (t.whole, t.blocks.clone()),
            None => (0, None),
        };
        if whole >= version {
            return;
        }
        let all = first == 0 && count >= chunk_blocks;
        if all || (blocks.is_none() && self.per_block >= PER_BLOCK_TOMBS_MAX) {
            return self.put(chunk, version, blocks);
        }
        let mut per = blocks.unwrap_or_else(|| vec![0; chunk_blocks].into_boxed_slice());
        for v in per.iter_mut().skip(first).take(count) {
            *v = (*v).max(version);
        }
        self.put(chunk, whole, Some(per));
    }

    /// If every block of `first..first + count` keeps a version at or
    /// above `version` (a write there must be dropped), the highest.
    #[inline]
    pub(super) fn covers(
        &self,
        chunk: (u64, u64),
        first: usize,
        count: usize,
        version: u64,
    ) -> Option<u64> {
        let t = self.get(chunk)?;
        let mut top = 0;
        for b in first..first + count.max(1) {
            let v = t.of(b);
            if v < version {
                return None;
            }
            top = top.max(v);
        }
        Some(top)
    }

    #[inline]
    pub(super) fn forget(&mut self, chunk: (u64, u64)) {
        if let Some(t) = self.versions.remove(&chunk) {
            self.per_block -= t.blocks.is_some() as usize;
        }
    }

    /// Removes and returns the chunk's versions, one per block of its
    /// `chunk_blocks` (a new slot carries them from now on).
    #[inline]
    pub(super) fn take(&mut self, chunk: (u64, u64), chunk_blocks: usize) -> Option<Vec<u64>> {
        let live = self
            .get(chunk)
            .map(|t| (0..chunk_blocks).map(|b| t.of(b)).collect());
        self.forget(chunk);
        live
    }
}

/// In-memory state of an allocated slot.
pub(crate) struct SlotState {
    pub(crate) owner: SlotOwner,
    pub(crate) alloc_seq: u64,
    pub(crate) entries: Vec<BlockEntry>,
    /// Per block, the highest version planned (journaled) so far. A request
    /// applies only above it, so per block the journal order is the version
    /// order and replay reaches the state the in-memory commits reach.
    pub(super) planned_version: Vec<u64>,
    /// Per block, the version of the discard or zeroing that left the
    /// chunk without a slot before this one (empty: none kept): blocks not
    /// written since read as zeroed at it (`Shard::block_states`), so a
    /// member copying them drops the older data it holds there. In memory,
    /// as `Discarded`.
    pub(super) discarded_at: Vec<u64>,
    pub(crate) map_generation: u64,
    pub(crate) dirty: bool,
    pub(super) free_phys: Vec<u64>,
    pub(super) pending_free: Vec<u16>,
    pub(super) reads_inflight: u32,
    pub(super) ops_inflight: u32,
    /// Data moves from the journal in flight (each also counts as a read,
    /// so no block of the slot is reused under it): reads of the slot wait,
    /// the block they would read is not written yet.
    pub(super) moves_inflight: u32,
    /// Allocated since the last checkpoint: its two headers are written by
    /// the next checkpoint that covers its Alloc record (until then the
    /// journal's Alloc record describes the slot; see `alloc_slot`).
    pub(crate) header_due: bool,
    pub(super) freeing: bool,
    /// A Release op holds the slot: ops that start after it wait.
    pub(super) releasing: Option<u32>,
    /// Blocks held by a sector write between its read and its commit: no
    /// other mutation of them is planned meanwhile (bit per logical block).
    pub(super) held: Vec<u64>,
}

impl SlotState {
    pub(crate) fn new(
        g: &Geometry,
        owner: SlotOwner,
        alloc_seq: u64,
        entries: Vec<BlockEntry>,
        gen: u64,
    ) -> Self {
        let phys = g.phys_blocks() as usize;
        let mut free_phys = vec![0u64; phys.div_ceil(64)];
        for p in 0..phys {
            free_phys[p / 64] |= 1 << (p % 64);
        }
        let planned_version = entries.iter().map(|e| e.version).collect();
        let mut s = SlotState {
            owner,
            alloc_seq,
            entries,
            planned_version,
            discarded_at: Vec::new(),
            map_generation: gen,
            dirty: false,
            free_phys,
            pending_free: Vec::with_capacity(phys),
            reads_inflight: 0,
            ops_inflight: 0,
            moves_inflight: 0,
            header_due: false,
            freeing: false,
            releasing: None,
            held: vec![0; (g.chunk_blocks as usize).div_ceil(64)],
        };
        for i in 0..s.entries.len() {
            let e = s.entries[i];
            if e.kind == BlockKind::Data {
                s.take_phys(e.phys);
            }
        }
        s
    }
    #[inline]
    pub(super) fn take_phys(&mut self, p: u16) {
        let p = p as usize;
        self.free_phys[p / 64] &= !(1 << (p % 64));
    }
    #[inline]
    pub(super) fn is_free(&self, p: usize) -> bool {
        p / 64 < self.free_phys.len() && self.free_phys[p / 64] & (1 << (p % 64)) != 0
    }
    #[inline]
    pub(super) fn find_free(&self) -> Option<u16> {
        for (w, bits) in self.free_phys.iter().enumerate() {
            if *bits != 0 {
                return Some((w * 64 + bits.trailing_zeros() as usize) as u16);
            }
        }
        None
    }
    #[inline]
    pub(super) fn is_held(&self, logical: u16) -> bool {
        let l = logical as usize;
        self.held[l / 64] & (1 << (l % 64)) != 0
    }
    #[inline]
    pub(super) fn set_held(&mut self, logical: u16, on: bool) {
        let l = logical as usize;
        if on {
            self.held[l / 64] |= 1 << (l % 64);
        } else {
            self.held[l / 64] &= !(1 << (l % 64));
        }
    }
    /// A read (or a move) of the slot is over: the blocks released while
    /// it ran are free once none is left.
    pub(super) fn end_read(&mut self) {
        self.reads_inflight = self.reads_inflight.saturating_sub(1);
        if self.reads_inflight == 0 {
            while let Some(p) = self.pending_free.pop() {
                let p = p as usize;
                self.free_phys[p / 64] |= 1 << (p % 64);
            }
        }
    }
    /// Reads of the slot must wait: a block the map names may not be
    /// written yet (its data is moving from the journal).
    #[inline]
    pub(super) fn moving(&self) -> bool {
        self.moves_inflight > 0
    }
    #[inline]
    pub(super) fn release_phys(&mut self, p: u16) {
        if self.reads_inflight > 0 {
            self.pending_free.push(p);
        } else {
            let p = p as usize;
            self.free_phys[p / 64] |= 1 << (p % 64);
        }
    }
}
