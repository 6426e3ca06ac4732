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
    pub(super) versions: HashMap<(u64, u64), (u64, Instant)>,
    pub(super) order: VecDeque<(Instant, (u64, u64))>,
}

impl Discarded {
    #[inline]
    pub(super) fn insert(&mut self, chunk: (u64, u64), version: u64) {
        let now = Instant::now();
        while let Some(&(at, key)) = self.order.front() {
            if now.duration_since(at) < DISCARDED_KEEP && self.order.len() < DISCARDED_MAX {
                break;
            }
            self.order.pop_front();
            if self.versions.get(&key).is_some_and(|(_, t)| *t == at) {
                self.versions.remove(&key);
            }
        }
        self.versions.insert(chunk, (version, now));
        self.order.push_back((now, chunk));
    }

    /// Keeps `version` for a chunk with no slot unless a higher one is kept.
    #[inline]
    pub(super) fn raise(&mut self, chunk: (u64, u64), version: u64) {
        if self.covers(chunk, version).is_none() {
            self.insert(chunk, version);
        }
    }

    /// The discard's version if a write at `version` must be dropped.
    #[inline]
    pub(super) fn covers(&self, chunk: (u64, u64), version: u64) -> Option<u64> {
        self.versions
            .get(&chunk)
            .filter(|(v, at)| version <= *v && at.elapsed() < DISCARDED_KEEP)
            .map(|(v, _)| *v)
    }

    #[inline]
    pub(super) fn forget(&mut self, chunk: (u64, u64)) {
        self.versions.remove(&chunk);
    }

    /// Removes and returns the chunk's discard version (a new slot carries
    /// it from now on).
    #[inline]
    pub(super) fn take(&mut self, chunk: (u64, u64)) -> Option<u64> {
        self.versions
            .remove(&chunk)
            .filter(|(_, at)| at.elapsed() < DISCARDED_KEEP)
            .map(|(v, _)| v)
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
    /// The version of the discard that freed this chunk's previous slot
    /// (0: none kept): blocks not written since read as zeroed at it
    /// (`Shard::block_states`), so a member copying them drops the older
    /// data it holds there. In memory, as `Discarded`.
    pub(super) discarded_at: u64,
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
            discarded_at: 0,
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
