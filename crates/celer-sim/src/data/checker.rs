//! The checker: every read against the writes acknowledged before it, and
//! at the end every block on every member of its partition.

use super::*;

impl DataSim {
    /// The newest write acknowledged before `at` that covers the sector.
    pub(super) fn newest_acked(&self, block: u64, sector: u64, before: u64) -> Option<Newest> {
        let list = &self.acked[block as usize * SECTORS + sector as usize];
        // Acknowledgements come in time order: the last one before `before`
        // carries the newest so far.
        let k = list.partition_point(|&(t, _)| t < before);
        k.checked_sub(1).map(|k| list[k].1)
    }

    /// Whether a discard of `block` newer than `version` was sent.
    pub(super) fn discard_after(&self, block: u64, version: u64) -> bool {
        self.by_block[block as usize]
            .iter()
            .filter_map(|id| self.writes.get(id))
            .any(|w| w.zero && w.version > version)
    }

    /// Whether a discard that was given up (never acknowledged, see
    /// `takeover.rs`) and is newer than `version` covers the sector: a
    /// replica may hold it at the end where others do not.
    fn given_up_discard_after(&self, block: u64, sector: u64, version: u64) -> bool {
        self.by_block[block as usize]
            .iter()
            .filter_map(|id| self.writes.get(id))
            .any(|w| w.zero && w.given_up && w.version > version && covers(w, block, sector))
    }

    pub(super) fn check_read(
        &mut self,
        c: usize,
        i: usize,
        op: &ClientOp,
        data: &[u8],
    ) -> Result<(), String> {
        if data.len() != op.blocks as usize * BS {
            return Err(format!(
                "node {} returned {} bytes for a read of {} blocks",
                node_id(i),
                data.len(),
                op.blocks
            ));
        }
        let before = if op.verify { u64::MAX } else { op.issued_at };
        let mut want = vec![0u8; SECTOR];
        for b in 0..op.blocks {
            let block = op.first + b;
            for sector in 0..SECTORS as u64 {
                let at = b as usize * BS + sector as usize * SECTOR;
                let got = &data[at..at + SECTOR];
                self.check_sector(c, i, op.verify, block, sector, before, got, &mut want)?;
            }
        }
        self.report.reads_checked += 1;
        if op.verify {
            self.report.blocks_verified += op.blocks;
        }
        Ok(())
    }

    /// One sector of a read (see `check_read`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn check_sector(
        &self,
        c: usize,
        i: usize,
        verify: bool,
        block: u64,
        sector: u64,
        before: u64,
        got: &[u8],
        want: &mut [u8],
    ) -> Result<(), String> {
        let wid = u64::from_le_bytes(got[..8].try_into().expect("8 bytes"));
        let newest = self.newest_acked(block, sector, before);
        let who = format!(
            "client {} read of block {block} sector {sector} from node {}",
            self.clients[c].attachment,
            node_id(i)
        );
        if wid == 0 {
            if got.iter().any(|&x| x != 0) {
                return Err(format!("{who}: neither zeroes nor a write"));
            }
            match newest {
                Some((v, w, false))
                    if (verify && !self.given_up_discard_after(block, sector, v))
                        || (!verify && !self.discard_after(block, v)) =>
                {
                    return Err(format!(
                        "{who}: zeroes, but write {w} (version {v}) was acknowledged before{}",
                        if verify {
                            " (at the end)"
                        } else {
                            " and no newer discard sent"
                        }
                    ));
                }
                _ => {}
            }
            return Ok(());
        }
        let Some(rec) = self.writes.get(&wid) else {
            return Err(format!("{who}: names write {wid}, never sent"));
        };
        if !covers(rec, block, sector) {
            return Err(format!("{who}: holds write {wid}, which did not cover it"));
        }
        fill_sector(wid, rec.version, block, sector, want);
        if got != want {
            return Err(format!("{who}: write {wid}'s sector is corrupt"));
        }
        if rec.zero {
            return Err(format!("{who}: holds data naming discard {wid}"));
        }
        if let Some((f, at)) = self.fenced_before(wid) {
            return Err(format!(
                "{who}: holds write {wid} (fence generation {}), issued at {} µs, after every node confirmed fence generation {f} at {at} µs",
                rec.fence, rec.issued_at
            ));
        }
        match newest {
            Some((v, w, _)) if rec.version < v => Err(format!(
                "{who}: write {wid} (version {}), older than write {w} (version {v}) acknowledged before the read",
                rec.version
            )),
            // A write given up (never acknowledged) may stay on some
            // replicas where it is newer than every acknowledged one.
            Some((v, _, _)) if verify && rec.given_up && rec.version > v => Ok(()),
            Some((v, w, _)) if verify && rec.version != v => Err(format!(
                "{who} at the end: write {wid} (version {}), not the newest acknowledged, write {w} (version {v})",
                rec.version
            )),
            None if verify && !rec.given_up => Err(format!(
                "{who} at the end: write {wid}, never acknowledged, where no write was"
            )),
            _ => Ok(()),
        }
    }

    /// At the end: every block from every member of its partition,
    /// through client 1.
    pub(super) fn verify(&mut self) -> Result<(), String> {
        self.log("verifying every block on every replica".into());
        self.refresh_table(0);
        let t = self.clients[0].table.clone();
        for first in (0..BLOCKS).step_by(4) {
            let p = t.partition_at(VOLUME, first * BS as u64);
            let members: Vec<usize> = t
                .partition(p)
                .map(|r| r.members.iter().filter_map(|m| index_of(m.node)).collect())
                .unwrap_or_default();
            for target in members {
                self.new_read(0, first, 4, Some(target), true);
            }
        }
        let mut rounds = 0u64;
        while !self.clients[0].ops.is_empty() {
            rounds += 1;
            if rounds > 5_000_000 {
                return Err("the final reads never finished".into());
            }
            let busy = self.drive_nodes()? | self.client_step(0)?;
            self.step_time(busy);
        }
        Ok(())
    }
}
