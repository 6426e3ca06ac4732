//! The client's hybrid logical clock: every write carries
//! `version = (hlc << 16) | writer`, `hlc = (ms since 2025-01-01) << 8 |
//! logical`, 48 bits, `writer` the low 16 bits of the attachment id (the
//! layout and the version rule are in celer-proto's doc). The clock is one `AtomicU64` shared by the client's
//! queues (one compare-and-swap per write request, uncontended in the common
//! case), so versions of one client are unique and strictly increasing
//! across its queues. It never runs behind a version a node reported
//! (`observe`), so a write issued after reading or writing a block always
//! carries a newer version than what the block holds, even when the other
//! writer's wall clock is ahead.
//!
//! The clock reads no time itself: its owner passes the wall clock
//! (`unix_ms`, read once per `submit`/`poll` by the queue's driver, or the
//! simulated one), so a simulation drives it as it drives the rest of the
//! queue's core.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use celer_proto::{clock_limit_at, clock_of_unix_ms};
use tracing::warn;

#[cfg(test)]
use celer_proto::HLC_LOGICAL_BITS as LOGICAL_BITS;

/// The clock is 48 bits (the low 16 bits of a version name the writer).
pub(crate) const HLC_MAX: u64 = (1 << 48) - 1;

/// A remote clock value this client does not follow: more than
/// `celer_proto::VERSION_DRIFT_MAX_MS` ahead of its own clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooFarAhead {
    pub(crate) remote: u64,
    pub(crate) limit: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Hlc {
    last: AtomicU64,
    /// Added to the wall clock (tests and simulations of a skewed host).
    skew_ms: i64,
}

impl Hlc {
    #[cfg(test)]
    pub(crate) fn new() -> Hlc {
        Hlc::default()
    }

    /// A clock whose wall clock runs `skew_ms` ahead (negative: behind).
    pub(crate) fn with_skew(skew_ms: i64) -> Hlc {
        Hlc {
            last: AtomicU64::new(0),
            skew_ms,
        }
    }

    /// The wall clock as this host sees it: `unix_ms` plus the skew.
    fn skewed(&self, unix_ms: u64) -> u64 {
        unix_ms.saturating_add_signed(self.skew_ms)
    }

    /// The physical part: ms since 2025-01-01, shifted above the counter.
    fn physical(&self, unix_ms: u64) -> u64 {
        clock_of_unix_ms(self.skewed(unix_ms)).min(HLC_MAX)
    }

    /// A fresh clock value at wall-clock time `unix_ms`, greater than every
    /// value handed out or observed.
    pub(crate) fn tick(&self, unix_ms: u64) -> u64 {
        let physical = self.physical(unix_ms);
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

    /// Keeps the clock at or past `remote` (a clock value: a version
    /// shifted right by 16), unless it is more than the drift bound ahead
    /// of this clock at wall-clock time `unix_ms` (a corrupt or hostile
    /// version must not push every later write to the end of the clock's
    /// range): then `Err`.
    pub(crate) fn observe(&self, remote: u64, unix_ms: u64) -> Result<(), TooFarAhead> {
        if remote <= self.last.load(Ordering::Relaxed) {
            return Ok(());
        }
        let limit = clock_limit_at(self.skewed(unix_ms)).min(HLC_MAX);
        if remote > limit {
            return Err(TooFarAhead { remote, limit });
        }
        self.last.fetch_max(remote, Ordering::AcqRel);
        Ok(())
    }

    /// `observe` for the versions every response carries: one too far
    /// ahead is logged and not followed.
    pub(crate) fn observe_reported(&self, remote: u64, unix_ms: u64) {
        if let Err(e) = self.observe(remote, unix_ms) {
            warn!(
                remote = e.remote,
                limit = e.limit,
                "a node reported a write version far in the future: not followed"
            );
        }
    }

    /// The version of a write issued at clock value `hlc` by `writer`.
    pub(crate) fn version(hlc: u64, writer: u16) -> u64 {
        (hlc << 16) | writer as u64
    }
}

/// The host's wall clock in ms since the Unix epoch (0 if it reads before
/// it), what a driver passes to [`Hlc`].
pub(crate) fn wall_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_strictly_increase_and_follow_observed_versions() {
        let h = Hlc::new();
        let mut last = 0;
        for _ in 0..10_000 {
            let t = h.tick(wall_unix_ms());
            assert!(t > last);
            last = t;
        }
        let ahead = last + (5000 << LOGICAL_BITS);
        h.observe(ahead, wall_unix_ms())
            .expect("5 s ahead is followed");
        assert!(h.tick(wall_unix_ms()) > ahead);
        // Far in the future: refused and not followed.
        assert!(h.observe(HLC_MAX - 1, wall_unix_ms()).is_err());
        assert!(h.tick(wall_unix_ms()) < HLC_MAX - 1);
        // Beyond the drift bound of a clock: refused; within it: followed.
        let skewed = Hlc::with_skew(-2 * celer_proto::VERSION_DRIFT_MAX_MS as i64);
        assert!(skewed
            .observe(h.tick(wall_unix_ms()), wall_unix_ms())
            .is_err());
        let behind = Hlc::with_skew(-(celer_proto::VERSION_DRIFT_MAX_MS as i64) / 2);
        let now = h.tick(wall_unix_ms());
        behind
            .observe(now, wall_unix_ms())
            .expect("within the bound");
        assert!(behind.tick(wall_unix_ms()) > now);
        assert_eq!(Hlc::version(3, 7), (3 << 16) | 7);
    }

    #[test]
    fn shared_between_threads_values_are_unique() {
        let h = std::sync::Arc::new(Hlc::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let h = h.clone();
                std::thread::spawn(move || {
                    (0..5000)
                        .map(|_| h.tick(wall_unix_ms()))
                        .collect::<Vec<_>>()
                })
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
