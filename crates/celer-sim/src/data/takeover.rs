//! Take-overs (`DataSimConfig::takeover_per_ms`), as a VM moving to
//! another host does it: a client attaches the volume exclusively with
//! `--force` at the real control service, which ends every other writer's
//! attachment, raises the volume's fence generation and names the nodes it
//! counts up. The generation is pushed to each of them (`PUT /v1/fences`:
//! `NodeCore::push_fences`), which answers once it refuses older
//! generations and none of their writes it accepted is still in flight. A
//! node that lost power meanwhile gets the generation with its
//! registration, before it serves again (`register_node`); one the service
//! marks down is not waited for. Once every push is answered, the client
//! gets its new attachment: whatever it had in flight under the old one is
//! given up (the guest moved; none of it was acknowledged), its write
//! clock starts again from a wall clock of its own (another host's), and
//! its connections open again with the new capability. The other client keeps
//! its old capability, as a source host that did not notice: the nodes
//! refuse its writes (`Fenced`), which fail; its reads go on.
//!
//! The checker: no write issued after a newer fence generation was
//! confirmed is acknowledged, or read from any replica. A write given up or refused is never
//! acknowledged, and some replicas may hold it while others do not; at the
//! end, a block may hold such a write where it is newer than the newest
//! acknowledged one (`check_sector`).

use std::sync::mpsc::{Receiver, TryRecvError};

use super::*;

/// A take-over whose fence push is not answered by every node yet.
pub(super) struct Takeover {
    client: usize,
    attachment: u32,
    fence: u32,
    /// Per node the push waits for: (node, the push's answer once it got
    /// through, the node's start count when the take-over began).
    waits: Vec<(usize, Option<Receiver<u16>>, u64)>,
}

impl DataSim {
    /// Client `c` takes the volume over: the control service raises the
    /// fence generation and the push starts.
    pub(super) fn take_over(&mut self, c: usize) -> Result<(), String> {
        if self.takeover.is_some() {
            return Ok(());
        }
        let a = self.control.attach(
            format!("client {c} (take-over)"),
            AttachMode::Exclusive,
            true,
        )?;
        let fence = a.volume.fence;
        let targets = a.fenced.unwrap_or_default();
        let mut waits = Vec::new();
        for (node, _) in targets {
            let Some(i) = index_of(node) else {
                return Err(format!("the control service names unknown node {node}"));
            };
            waits.push((i, None, self.nodes[i].starts));
        }
        self.log(format!(
            "client {} takes the volume over: attachment {}, fence generation {fence} (ended {:?}), pushed to nodes {:?}",
            self.clients[c].attachment,
            a.attachment.id,
            a.taken_over,
            waits.iter().map(|w| node_id(w.0)).collect::<Vec<_>>()
        ));
        self.takeover = Some(Takeover {
            client: c,
            attachment: a.attachment.id,
            fence,
            waits,
        });
        Ok(())
    }

    /// Collects the push's answers; with all of them, hands the client
    /// its new attachment. Whether the take-over finished.
    pub(super) fn takeover_step(&mut self) -> bool {
        let Some(mut t) = self.takeover.take() else {
            return false;
        };
        let fence = t.fence;
        t.waits.retain_mut(|(i, rx, starts)| {
            let i = *i;
            if self.nodes[i].starts != *starts {
                // Started again since: its registration installed the
                // generation before it served.
                return false;
            }
            if let Some(r) = rx {
                match r.try_recv() {
                    Ok(_) => return false,
                    Err(TryRecvError::Empty) => return true,
                    // The core is gone (a power cut): push again.
                    Err(TryRecvError::Disconnected) => *rx = None,
                }
            }
            // The push gets through to a running node the service can
            // reach; it is retried until then, or until the service marks
            // the node down (it gets the generation when it registers or
            // beats again).
            let reachable = !self.control_cut(i);
            match self.nodes[i].core.as_mut() {
                Some(core) if reachable => {
                    let _node = tracing::info_span!("node", id = i + 1).entered();
                    *rx = Some(core.push_fences(vec![(VOLUME, fence)]));
                    true
                }
                _ => self.control.node_up(i),
            }
        });
        if !t.waits.is_empty() {
            self.takeover = Some(t);
            return false;
        }
        let now = self.now();
        self.fences_confirmed.push((t.fence, now));
        self.report.takeovers += 1;
        let c = t.client;
        let old = self.clients[c].attachment;
        // What it had in flight under the old attachment is given up.
        let ops = std::mem::take(&mut self.clients[c].ops);
        self.clients[c].reqs.clear();
        for op in ops.values() {
            if let Some(w) = op.write {
                self.give_up(w);
                self.report.given_up += 1;
            }
        }
        // A new process on another host: its write clock starts from its
        // own wall clock, which may be behind the versions the old one
        // wrote (the nodes' answers move it on).
        let m = self.cfg.clock_offset_max_ms as i64;
        let offset = self.rng.gen_range(-m..=m);
        let cl = &mut self.clients[c];
        cl.hlc = 0;
        cl.clock_offset_ms = offset;
        cl.attachment = t.attachment;
        cl.fence = t.fence;
        cl.cap = Capability::mint(&DATA_KEY, VOLUME, t.attachment, t.fence, false, u64::MAX);
        for i in 0..NODES {
            self.drop_conn(c, i);
        }
        self.log(format!(
            "every node confirmed fence generation {}: client {old} is now attachment {} ({} requests given up)",
            t.fence,
            t.attachment,
            ops.len()
        ));
        true
    }

    /// Write `w` will never be acknowledged (refused as fenced, or given
    /// up at a take-over).
    pub(super) fn give_up(&mut self, w: u64) {
        if let Some(r) = self.writes.get_mut(&w) {
            if r.acked_at.is_none() {
                r.given_up = true;
            }
        }
    }

    /// The fence generation every node confirmed before write `w` was
    /// issued, and when, if newer than the write's own: then every node
    /// must have refused it.
    pub(super) fn fenced_before(&self, w: u64) -> Option<(u32, u64)> {
        let rec = self.writes.get(&w)?;
        self.fences_confirmed
            .iter()
            .find(|&&(f, at)| f > rec.fence && at < rec.issued_at)
            .copied()
    }

    /// The checker, at an acknowledgement: a write issued after a newer
    /// fence generation was confirmed by every node must have been
    /// refused.
    pub(super) fn check_fence(&self, c: usize, w: u64) -> Result<(), String> {
        match self.fenced_before(w) {
            Some((f, at)) => Err(format!(
                "write {w} of client {c} (fence generation {}) issued at {} µs was acknowledged, though every node confirmed fence generation {f} at {at} µs",
                self.writes[&w].fence,
                self.writes[&w].issued_at
            )),
            None => Ok(()),
        }
    }
}
