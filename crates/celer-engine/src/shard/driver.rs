//! The shard's driver: `poll`/`wait` submit queued I/O and reap
//! completions, `close` drains and checkpoints.

use super::*;

impl<D: Disk> Shard<D> {
    /// Submits queued I/O and hands over every finished request without
    /// blocking. Returns the number handed over.
    pub fn poll(&mut self, done: &mut dyn FnMut(Completion)) -> usize {
        let n = self.reap_and_hand_out(done);
        self.prepare_io();
        self.submit_ring(0);
        n
    }

    /// Like `poll`, but blocks until at least one request finished, if any
    /// is in flight. Submitting and waiting share one system call.
    pub fn wait(&mut self, done: &mut dyn FnMut(Completion)) -> usize {
        loop {
            let n = self.reap_and_hand_out(done);
            self.prepare_io();
            if n > 0 || (self.inflight() == 0 && self.ckpt.is_none() && self.moves_inflight == 0) {
                self.submit_ring(0);
                return n;
            }
            if self.io.inflight == 0 {
                // Only deferred requests and nothing in the kernel that
                // could free what they wait for: hand back control rather
                // than sleep forever (cannot happen while invariants hold).
                debug_assert!(
                    false,
                    "requests deferred with no I/O in flight: {}",
                    self.describe()
                );
                return 0;
            }
            self.submit_ring(1);
        }
    }

    pub(super) fn reap_and_hand_out(&mut self, done: &mut dyn FnMut(Completion)) -> usize {
        self.reap();
        let mut n = 0;
        while let Some(c) = self.done.pop_front() {
            done(c);
            n += 1;
        }
        n
    }

    /// Seals the open journal block, starts a flush and checkpoint work as
    /// needed; the caller submits.
    pub(super) fn prepare_io(&mut self) {
        self.maybe_issue_moves();
        self.flush_journal();
        self.maybe_flush();
        self.maybe_checkpoint();
    }

    /// Drives every request to completion, then checkpoints the shard so the
    /// next open has no journal to replay.
    pub fn close(mut self) -> Result<(), EngineError> {
        let mut sink = |_c: Completion| {};
        while self.inflight() > 0
            || self.ckpt.is_some()
            || self.moves_inflight > 0
            || !self.moves_queued.is_empty()
        {
            self.issue_moves();
            self.wait(&mut sink);
        }
        if self.failed.is_none() && self.next_seq > self.tail {
            self.start_checkpoint();
            while self.ckpt.is_some() {
                self.wait(&mut sink);
            }
        }
        match self.failed {
            Some(e) => Err(EngineError::Os {
                path: "engine".into(),
                what: "close",
                errno_text: e,
            }),
            None => Ok(()),
        }
    }

    pub(super) fn submit_ring(&mut self, want: usize) {
        if self.io.unsubmitted == 0 && want == 0 {
            return;
        }
        loop {
            match self.io.queue.submit(want) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // Completion queue full: reap and retry.
                    self.reap();
                    continue;
                }
                Err(e) => {
                    self.fail(format!("io_uring_enter: {e}"));
                    break;
                }
            }
        }
        self.io.unsubmitted = 0;
    }

    pub(super) fn reap(&mut self) {
        while let Some((ud, res)) = self.io.queue.next_completion() {
            self.io.inflight -= 1;
            let expected = ((ud >> 32) & 0xff_ffff) as i32 * 512;
            let res = checked_result(res, expected, ud & UD_KIND);
            let id = ud & 0xffff_ffff;
            match ud & UD_KIND {
                UD_DATA | UD_META => self.op_io_done(id as u32, res),
                UD_JOURNAL => self.journal_done(id as usize, res),
                UD_CKPT => self.checkpoint_io_done(res),
                UD_FLUSH => self.flush_done(res),
                UD_MOVE => self.move_done(id as usize, res),
                _ => unreachable!("unknown user_data {ud:#x}"),
            }
        }
        if !self.deferred.is_empty() {
            self.retry_deferred();
        }
    }

    pub(super) fn fail(&mut self, why: String) {
        if self.failed.is_none() {
            tracing::error!(
                shard = self.id,
                "engine shard failed: {why}; refusing new requests"
            );
            self.failed = Some(why);
        }
    }
}
