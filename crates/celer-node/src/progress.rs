//! Backfill progress: per shard, written by its thread, read whole by
//! the agent and the admin server.

use super::*;

/// A node's backfill figures for the rebalance under way (see
/// [`Node::backfill_progress`]).
///
/// A rebalance, as a node sees it, lasts while its route table has a
/// syncing member in any partition. The figures cover this node's backfills
/// of that rebalance: running and queued ones, and finished ones (done =
/// total) until it ends, so the sums over the cluster never go back while
/// other nodes are still copying. A backfill that is dropped (the partition
/// moved elsewhere) or restarted (its source changed) leaves both figures:
/// nothing is counted twice. When the table has no syncing member left,
/// both return to 0. `bytes_done <= bytes_total` in every read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackfillProgress {
    /// Bytes applied by those backfills, counted per piece as it is written.
    pub bytes_done: u64,
    /// Bytes those backfills copy: listed chunks × chunk size. A backfill
    /// counts from the moment its source's chunk list came back.
    pub bytes_total: u64,
    /// Backfills whose chunk list has not come back yet (not in `bytes_total`).
    pub partitions_unlisted: u64,
    /// Bytes ever backfilled by this process, restarted backfills included
    /// (also the `celer_node_backfill_bytes_total` counter).
    pub bytes_copied: u64,
}

impl std::ops::Add for BackfillProgress {
    type Output = BackfillProgress;
    fn add(self, o: BackfillProgress) -> BackfillProgress {
        BackfillProgress {
            bytes_done: self.bytes_done + o.bytes_done,
            bytes_total: self.bytes_total + o.bytes_total,
            partitions_unlisted: self.partitions_unlisted + o.partitions_unlisted,
            bytes_copied: self.bytes_copied + o.bytes_copied,
        }
    }
}

/// One shard's [`BackfillProgress`]: written by its shard thread only, read
/// whole by the agent and the admin server. A sequence lock: the writer
/// never waits; a reader retries while a write is under way, so it never
/// sees `done` of one write with `total` of another.
#[derive(Default)]
pub(crate) struct ProgressCell {
    /// Odd while a write is under way.
    seq: AtomicU64,
    done: AtomicU64,
    total: AtomicU64,
    unlisted: AtomicU64,
    copied: AtomicU64,
}

impl ProgressCell {
    /// Single writer: the owning shard thread.
    pub(crate) fn store(&self, p: BackfillProgress) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        // Keeps the field stores below after the odd sequence number.
        fence(Ordering::Release);
        self.done.store(p.bytes_done, Ordering::Relaxed);
        self.total.store(p.bytes_total, Ordering::Relaxed);
        self.unlisted
            .store(p.partitions_unlisted, Ordering::Relaxed);
        self.copied.store(p.bytes_copied, Ordering::Relaxed);
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }

    pub(crate) fn load(&self) -> BackfillProgress {
        loop {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let p = BackfillProgress {
                bytes_done: self.done.load(Ordering::Relaxed),
                bytes_total: self.total.load(Ordering::Relaxed),
                partitions_unlisted: self.unlisted.load(Ordering::Relaxed),
                bytes_copied: self.copied.load(Ordering::Relaxed),
            };
            // Keeps the field loads above before the second sequence load.
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == s1 {
                return p;
            }
        }
    }
}
