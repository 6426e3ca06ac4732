//! The client's hybrid logical clock: every write carries
//! `version = (hlc << 16) | client_id`, `hlc = (ms since 2025-01-01) << 8 |
//! logical`, 48 bits. The clock is one `AtomicU64` shared by the client's
//! queues (one compare-and-swap per write request, uncontended in the common
//! case), so versions of one client are unique and strictly increasing
//! across its queues. It never runs behind a version a node reported
//! (`observe`), so a write issued after reading or writing a block always
//! carries a newer version than what the block holds, even when the other
//! writer's wall clock is ahead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::warn;

/// 2025-01-01T00:00:00Z in ms since the Unix epoch.
const HLC_EPOCH_UNIX_MS: u64 = 1_735_689_600_000;
/// Bits of the logical counter below the milliseconds.
const LOGICAL_BITS: u32 = 8;
/// The clock is 48 bits (the low 16 bits of a version name the client).
pub(crate) const HLC_MAX: u64 = (1 << 48) - 1;
/// A node's clock more than this far ahead of ours is not followed (a
/// corrupt or hostile version must not push every later write to the end
/// of the clock's range).
const DRIFT_MAX: Duration = Duration::from_secs(3600);

#[derive(Debug, Default)]
pub(crate) struct Hlc {
    last: AtomicU64,
}

impl Hlc {
    pub(crate) fn new() -> Hlc {
        Hlc::default()
    }

    /// The physical part: ms since 2025-01-01, shifted above the counter.
    fn physical() -> u64 {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        (unix_ms.saturating_sub(HLC_EPOCH_UNIX_MS) << LOGICAL_BITS).min(HLC_MAX)
    }

    /// A fresh clock value, greater than every value handed out or observed.
    pub(crate) fn tick(&self) -> u64 {
        let physical = Self::physical();
        let mut cur = self.last.load(Ordering::Relaxed);
        loop {
            let next = (cur + 1).max(physical).min(HLC_MAX);
            match self
                .last
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => cur = seen,
            }
        }
    }

    /// Keeps the clock at or past `remote` (a node's highest seen version,
    /// shifted right by 16), unless it is implausibly far ahead.
    pub(crate) fn observe(&self, remote: u64) {
        if remote <= self.last.load(Ordering::Relaxed) {
            return;
        }
        let limit = Self::physical()
            .saturating_add((DRIFT_MAX.as_millis() as u64) << LOGICAL_BITS)
            .min(HLC_MAX);
        if remote > limit {
            warn!(
                remote,
                limit, "a node reported a write version far in the future: not followed"
            );
            return;
        }
        self.last.fetch_max(remote, Ordering::AcqRel);
    }

    /// The version of a write issued at clock value `hlc` by `client_id`.
    pub(crate) fn version(hlc: u64, client_id: u16) -> u64 {
        (hlc << 16) | client_id as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_strictly_increase_and_follow_observed_versions() {
        let h = Hlc::new();
        let mut last = 0;
        for _ in 0..10_000 {
            let t = h.tick();
            assert!(t > last);
            last = t;
        }
        let ahead = last + (5000 << LOGICAL_BITS);
        h.observe(ahead);
        assert!(h.tick() > ahead);
        // Far in the future: ignored.
        h.observe(HLC_MAX - 1);
        assert!(h.tick() < HLC_MAX - 1);
        assert_eq!(Hlc::version(3, 7), (3 << 16) | 7);
    }

    #[test]
    fn shared_between_threads_values_are_unique() {
        let h = std::sync::Arc::new(Hlc::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let h = h.clone();
                std::thread::spawn(move || (0..5000).map(|_| h.tick()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
