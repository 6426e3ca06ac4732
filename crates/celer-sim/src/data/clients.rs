//! The simulated clients: they issue a fixed load of writes, sector
//! writes, discards and reads, route them by their own table, speak the
//! protocol over the simulated network (handshake, frames, answers) and
//! send again what a lost or stalled connection carried.

use super::*;

impl DataSim {
    /// A client issues due operations, reads answers and sends what waits.
    /// Whether it did anything.
    pub(super) fn client_step(&mut self, c: usize) -> Result<bool, String> {
        let now = self.now();
        let mut busy = false;
        if self.faults && now >= self.clients[c].next_issue_at {
            let gap = 1_000_000 / self.cfg.ops_per_sec.max(1);
            self.clients[c].next_issue_at = now + self.rng.gen_range(gap / 2..=gap * 3 / 2);
            if self.clients[c].ops.len() < CLIENT_DEPTH {
                self.issue(c);
                busy = true;
            }
        }
        busy |= self.retry_due(c);
        for i in 0..NODES {
            busy |= self.client_conn_io(c, i)?;
        }
        Ok(busy)
    }

    /// Ops whose retry is due: with a newer table than the one they were
    /// sent under (the client asks for the current one first), every leg
    /// goes again as that table says; otherwise the due legs go again.
    pub(super) fn retry_due(&mut self, c: usize) -> bool {
        let now = self.now();
        let due: Vec<u64> = self.clients[c]
            .ops
            .iter()
            .filter(|(_, op)| {
                op.route_at.is_some_and(|t| t <= now)
                    || op
                        .want
                        .iter()
                        .any(|w| matches!(w, Want::RetryAt(t) if *t <= now))
            })
            .map(|(&id, _)| id)
            .collect();
        if due.is_empty() {
            return false;
        }
        self.refresh_table(c);
        let epoch = self.clients[c].table.epoch;
        for id in due {
            let Some(op) = self.clients[c].ops.get_mut(&id) else {
                continue;
            };
            if op.epoch < epoch || op.route_at.is_some() {
                self.route_op(c, id);
            } else {
                for w in &mut op.want {
                    if matches!(w, Want::RetryAt(t) if *t <= now) {
                        *w = Want::Send;
                    }
                }
            }
        }
        true
    }

    /// A new write (2 in 3) or read of 1-4 blocks within one chunk.
    pub(super) fn issue(&mut self, c: usize) {
        let blocks = if self.rng.gen_bool(0.7) {
            1
        } else {
            self.rng.gen_range(2..=4)
        };
        let chunk = self.rng.gen_range(0..CHUNKS);
        let first = chunk * CHUNK_BLOCKS + self.rng.gen_range(0..=CHUNK_BLOCKS - blocks);
        let dice = self.rng.gen_range(0..100);
        if dice < 8 {
            // A discard or write-zeroes: of the whole chunk (a discard
            // frees its slot) or of a range.
            let w = if self.rng.gen_bool(0.5) {
                self.new_write(c, chunk * CHUNK_BLOCKS, CHUNK_BLOCKS, true)
            } else {
                self.new_write(c, first, blocks, true)
            };
            let write_zeroes = self.rng.gen_bool(0.3);
            if let Some(r) = self.writes.get_mut(&w) {
                r.write_zeroes = write_zeroes;
            }
        } else if dice < 18 {
            // A sector write: some of a block's sectors, not all.
            let s = self.rng.gen_range(0..SECTORS as u64);
            let most = SECTORS as u64 - s - u64::from(s == 0);
            let n = self.rng.gen_range(1..=most);
            self.new_write_sectors(c, first, 1, false, Some((s, n)));
        } else if dice < 67 {
            self.new_write(c, first, blocks, false);
        } else {
            self.new_read(c, first, blocks, None, false);
        }
    }

    /// A read of `blocks` blocks from `first` by client `c`, from an
    /// in-sync replica, or from node `target`; `verify`: a final read,
    /// which must find the newest acknowledged write.
    pub(super) fn new_read(
        &mut self,
        c: usize,
        first: u64,
        blocks: u64,
        target: Option<usize>,
        verify: bool,
    ) {
        self.add_op(c, None, first, blocks, false, target, verify);
    }

    /// Gives client `c` a new operation, routed by its table.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn add_op(
        &mut self,
        c: usize,
        write: Option<u64>,
        first: u64,
        blocks: u64,
        primary: bool,
        target: Option<usize>,
        verify: bool,
    ) {
        let now = self.now();
        let cl = &mut self.clients[c];
        let id = cl.next_op;
        cl.next_op += 1;
        cl.ops.insert(
            id,
            ClientOp {
                write,
                first,
                blocks,
                want: [Want::Done; NODES],
                acks: 0,
                epoch: 0,
                route_at: None,
                target,
                primary,
                issued_at: now,
                verify,
            },
        );
        self.route_op(c, id);
    }

    /// Client `c` sends op `id` (again, every leg) as its table says: a
    /// write to every member that takes writes, or to the primary for a
    /// `WritePrimary`; a read to one in-sync member. With nobody to send
    /// it to, the op waits for a newer table.
    pub(super) fn route_op(&mut self, c: usize, id: u64) {
        let now = self.now();
        let cl = &self.clients[c];
        let Some(op) = cl.ops.get(&id) else { return };
        let t = &cl.table;
        let r = t
            .partition(t.partition_at(VOLUME, op.first * BS as u64))
            .cloned()
            .unwrap_or_default();
        let mut want = [Want::Done; NODES];
        let (write, target, primary) = (op.write, op.target, op.primary);
        let epoch = t.epoch;
        match (write, target) {
            (_, Some(i)) => want[i] = Want::Send,
            (Some(_), None) if primary => {
                if let Some(i) = r.primary().and_then(index_of) {
                    want[i] = Want::Send;
                }
            }
            (Some(_), None) => {
                for i in r.writers().filter_map(|m| index_of(m.node)) {
                    want[i] = Want::Send;
                }
            }
            (None, None) => {
                // Any of the readers, as `ReadPolicy::AnyInSync` (never a
                // member kept after it left: `RouteTable::keep_leavers`).
                let in_sync: Vec<usize> = r
                    .readers(t.replicas)
                    .filter_map(|m| index_of(m.node))
                    .collect();
                if !in_sync.is_empty() {
                    want[in_sync[self.rng.gen_range(0..in_sync.len())]] = Want::Send;
                }
            }
        }
        let none = want.iter().all(|w| *w == Want::Done);
        self.forget_requests(c, id);
        if let Some(op) = self.clients[c].ops.get_mut(&id) {
            op.want = want;
            op.acks = 0;
            op.epoch = epoch;
            op.route_at = none.then_some(now + RETRY_US);
        }
    }

    /// Client `c` asks for the current table (a node with a newer one would
    /// answer a probe with it; the control service has the newest).
    pub(super) fn refresh_table(&mut self, c: usize) {
        if let Some(t) = self.control.table() {
            if t.epoch > self.clients[c].table.epoch {
                self.clients[c].table = t.clone();
            }
        }
    }

    pub(super) fn new_write(&mut self, c: usize, first: u64, blocks: u64, zero: bool) -> u64 {
        self.new_write_sectors(c, first, blocks, zero, None)
    }

    pub(super) fn new_write_sectors(
        &mut self,
        c: usize,
        first: u64,
        blocks: u64,
        zero: bool,
        sectors: Option<(u64, u64)>,
    ) -> u64 {
        let unix_ms = self.world.borrow().unix_ms();
        let cl = &mut self.clients[c];
        let unix_ms = unix_ms.saturating_add_signed(cl.clock_offset_ms);
        cl.hlc = (cl.hlc + 1).max(clock_of_unix_ms(unix_ms));
        let version = (cl.hlc << 16) | cl.attachment as u64;
        let fence = cl.fence;
        let wid = self.next_write;
        self.next_write += 1;
        self.writes.insert(
            wid,
            WriteRec {
                version,
                first,
                blocks,
                sectors,
                zero,
                write_zeroes: false,
                issued_at: self.world.borrow().now_us,
                acked_at: None,
                fence,
                given_up: false,
            },
        );
        for b in first..first + blocks {
            self.by_block[b as usize].push(wid);
        }
        // Writes of more than a block go to the partition's primary, which
        // writes and forwards them to the other members (as the client
        // sends writes above 4 KiB); the rest to every member.
        let primary = !zero && blocks > 1 && sectors.is_none();
        self.add_op(c, Some(wid), first, blocks, primary, None, false);
        wid
    }

    /// Connects client `c` to node `i` if the node runs: the node adopts
    /// the connection as the acceptor would after a valid Hello.
    pub(super) fn connect(&mut self, c: usize, i: usize) -> bool {
        if self.clients[c].conns[i].is_some() {
            return true;
        }
        if self.nodes[i].core.is_none() {
            return false;
        }
        let (client_end, node_end) = World::pipe(&self.world);
        self.accept(i, node_end);
        let pipe = client_end.pipe;
        self.clients[c].conns[i] = Some(ClientConn {
            stream: client_end,
            pipe,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            held: Vec::new(),
            hs: ClientHs::AwaitChallenge,
        });
        true
    }

    pub(super) fn client_conn_io(&mut self, c: usize, i: usize) -> Result<bool, String> {
        let now = self.now();
        let mut busy = false;
        // A lost connection: forget it (requests are sent again on the
        // next one).
        if let Some(conn) = &self.clients[c].conns[i] {
            if self.world.borrow().is_reset(conn.pipe) {
                self.drop_conn(c, i);
            }
        }
        // Queue what must be sent to node i.
        let ids: Vec<u64> = self.clients[c]
            .ops
            .iter()
            .filter(|(_, op)| op.want[i] == Want::Send)
            .map(|(&id, _)| id)
            .collect();
        if !ids.is_empty() {
            if self.connect(c, i) {
                for id in ids {
                    self.send(c, i, id);
                    busy = true;
                }
            } else {
                // Refused (the node is down): try again later, maybe under
                // a table where it is marked down.
                for id in ids {
                    if let Some(op) = self.clients[c].ops.get_mut(&id) {
                        op.want[i] = Want::RetryAt(now + RETRY_US);
                    }
                }
            }
        }
        let Some(conn) = self.clients[c].conns[i].as_mut() else {
            return Ok(busy);
        };
        // Send.
        while !conn.wbuf.is_empty() {
            match conn.stream.write(&conn.wbuf) {
                Ok(n) => {
                    conn.wbuf.drain(..n);
                    busy = true;
                }
                Err(_) => break,
            }
        }
        // Receive.
        loop {
            match conn.stream.read(&mut self.scratch) {
                Ok(0) => {
                    self.drop_conn(c, i);
                    return Ok(true);
                }
                Ok(n) => {
                    conn.rbuf.extend_from_slice(&self.scratch[..n]);
                    busy = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.drop_conn(c, i);
                    return Ok(true);
                }
            }
        }
        while let Some(conn) = self.clients[c].conns[i].as_mut() {
            let h = match decode_header(&conn.rbuf) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return Err(format!("node {} sent a corrupt frame: {e}", node_id(i))),
            };
            let total = HEADER_BYTES + h.payload_bytes as usize;
            if conn.rbuf.len() < total {
                break;
            }
            let payload: Vec<u8> = conn.rbuf[HEADER_BYTES..total].to_vec();
            conn.rbuf.drain(..total);
            if h.verify_payload([&payload[..]]).is_err() {
                return Err(format!("node {} sent a payload with a bad crc", node_id(i)));
            }
            if h.kind == Kind::Request
                && h.op == Op::Challenge
                && conn.hs == ClientHs::AwaitChallenge
            {
                let node_nonce: Nonce = payload[..].try_into().map_err(|_| {
                    format!(
                        "node {}: a Challenge of {} bytes",
                        node_id(i),
                        payload.len()
                    )
                })?;
                let mut peer_nonce = [0u8; NONCE_BYTES];
                self.rng.fill(&mut peer_nonce[..]);
                let cl = &self.clients[c];
                let cred = Credential::Attachment {
                    capability: cl.cap,
                    key: cl.cap.attachment_key(&DATA_KEY),
                };
                let sender = cl.attachment as u64;
                let proof = HelloProof::build(&cred, &node_nonce, &peer_nonce, 0, sender, false);
                let mut hello = Header::request(Op::Hello, 0);
                hello.offset = 0;
                hello.volume = sender;
                let hello = hello.with_payload([&proof[..]]);
                let Some(conn) = self.clients[c].conns[i].as_mut() else {
                    break;
                };
                conn.wbuf.extend_from_slice(&hello.encode());
                conn.wbuf.extend_from_slice(&proof);
                // Requests go right behind the Hello (the acceptor reads
                // exactly the Hello; the shard reads what follows).
                let held = std::mem::take(&mut conn.held);
                conn.wbuf.extend_from_slice(&held);
                conn.hs = ClientHs::AwaitAnswer {
                    node_nonce,
                    peer_nonce,
                };
                busy = true;
                continue;
            }
            if h.kind != Kind::Response {
                return Err(format!("node {} sent a request {:?}", node_id(i), h.op));
            }
            if h.op == Op::Hello {
                let ClientHs::AwaitAnswer {
                    node_nonce,
                    peer_nonce,
                } = conn.hs
                else {
                    return Err(format!("node {}: a Hello answer out of turn", node_id(i)));
                };
                let key = self.clients[c].cap.attachment_key(&DATA_KEY);
                if h.status != Status::Ok
                    || !HelloProof::check_answer(&key, &node_nonce, &peer_nonce, &payload)
                {
                    return Err(format!(
                        "node {} refused the Hello ({:?}) or did not prove the key",
                        node_id(i),
                        h.status
                    ));
                }
                if let Some(conn) = self.clients[c].conns[i].as_mut() {
                    conn.hs = ClientHs::Ready;
                }
                continue;
            }
            self.answer(c, i, &h, &payload)?;
        }
        Ok(busy)
    }

    pub(super) fn send(&mut self, c: usize, i: usize, id: u64) {
        let detail = self.detail();
        let cl = &mut self.clients[c];
        let Some(op) = cl.ops.get_mut(&id) else {
            return;
        };
        let epoch = op.epoch;
        let q = cl.next_req;
        cl.next_req = cl.next_req.wrapping_add(1).max(1);
        op.want[i] = Want::Sent(q);
        cl.reqs.insert(q, (id, i));
        let (zero, write_zeroes) = op
            .write
            .and_then(|w| self.writes.get(&w))
            .map_or((false, false), |r| (r.zero, r.write_zeroes));
        let mut h = Header::request(
            match op.write {
                Some(_) if write_zeroes => Op::WriteZeroes,
                Some(_) if zero => Op::Discard,
                Some(_) if op.primary => Op::WritePrimary,
                Some(_) => Op::Write,
                None => Op::Read,
            },
            q,
        );
        h.volume = VOLUME;
        h.offset = op.first * BS as u64;
        h.length = (op.blocks * BS as u64) as u32;
        h.epoch = epoch;
        let mut data = Vec::new();
        if let Some(w) = op.write {
            let rec = &self.writes[&w];
            h.version = rec.version;
            h.attachment = cl.attachment;
            h.fence = cl.fence;
            let (s, n) = rec.sectors.unwrap_or((0, SECTORS as u64));
            if let Some((s, n)) = rec.sectors {
                h.flags = FLAG_SECTORS;
                h.offset += s * SECTOR as u64;
                h.length = (n * SECTOR as u64) as u32;
            }
            if !rec.zero {
                data = vec![0u8; h.length as usize];
                let mut at = 0;
                for b in 0..op.blocks {
                    for sector in s..s + n {
                        let block = op.first + b;
                        fill_sector(w, rec.version, block, sector, &mut data[at..at + SECTOR]);
                        at += SECTOR;
                    }
                }
            }
        }
        let h = h.with_payload([&data[..]]);
        let pipe = cl.conns[i].as_ref().map(|c| c.pipe);
        if detail {
            let line = format!(
                "client {} sends request {q} ({:?} blocks {}+{}, partition {} at epoch {}) to node {} on pipe {pipe:?}",
                cl.attachment,
                h.op,
                op.first,
                op.blocks,
                cl.table.partition_at(VOLUME, op.first * BS as u64),
                h.epoch,
                node_id(i)
            );
            self.log(line);
        }
        let cl = &mut self.clients[c];
        if let Some(conn) = cl.conns[i].as_mut() {
            let out = if conn.hs == ClientHs::AwaitChallenge {
                &mut conn.held
            } else {
                &mut conn.wbuf
            };
            out.extend_from_slice(&h.encode());
            out.extend_from_slice(&data);
        }
    }

    pub(super) fn answer(
        &mut self,
        c: usize,
        i: usize,
        h: &Header,
        payload: &[u8],
    ) -> Result<(), String> {
        let now = self.now();
        if self.detail() {
            self.log(format!(
                "client {} answer {} {:?} from node {}",
                self.clients[c].attachment,
                h.request_id,
                h.status,
                node_id(i)
            ));
        }
        if h.status != Status::OlderVersion {
            // Every answer names the highest version the node saw for the
            // volume: the clock follows it unless it is beyond the drift
            // bound of this client's own clock (as `Hlc::observe_reported`).
            let limit = self.clock_limit(c);
            let seen = celer_proto::version_clock(h.version);
            if seen <= limit {
                let cl = &mut self.clients[c];
                cl.hlc = cl.hlc.max(seen);
            }
        }
        let Some((id, r)) = self.clients[c].reqs.remove(&h.request_id) else {
            return Ok(()); // an answer to a request given up
        };
        debug_assert_eq!(r, i);
        let Some(op) = self.clients[c].ops.get_mut(&id) else {
            return Ok(());
        };
        if op.want[i] != Want::Sent(h.request_id) {
            return Ok(());
        }
        match (op.write, h.status) {
            (Some(w), Status::Ok) => {
                op.want[i] = Want::Done;
                op.acks += 1;
                let zeroing = self.writes.get(&w).is_some_and(|r| r.zero);
                if zeroing && self.faults && self.rng.gen_bool(self.cfg.crash_after_discard) {
                    let at = now + self.rng.gen_range(0..100);
                    self.due_crashes.push((at, i));
                }
                let Some(op) = self.clients[c].ops.get_mut(&id) else {
                    return Ok(());
                };
                if op.want.iter().all(|w| *w == Want::Done) {
                    let op = self.clients[c].ops.remove(&id).expect("present");
                    let w = op.write.expect("a write");
                    self.check_fence(c, w)?;
                    // Every write reaches `min_copies` replicas (the nodes
                    // refuse one their table sends to fewer writers).
                    let min = self.clients[c].table.min_copies();
                    if !op.primary && op.acks < min {
                        return Err(format!(
                            "client {} write {w} (blocks {}+{}) acknowledged by {} replica(s) at epoch {}: fewer than {min}",
                            self.clients[c].attachment, op.first, op.blocks, op.acks, op.epoch
                        ));
                    }
                    if let Some(rec) = self.writes.get_mut(&w) {
                        rec.acked_at = Some(now);
                        let (s0, n) = rec.sectors.unwrap_or((0, SECTORS as u64));
                        let this = (rec.version, w, rec.zero);
                        for b in rec.first..rec.first + rec.blocks {
                            for sector in s0..s0 + n {
                                let list = &mut self.acked[b as usize * SECTORS + sector as usize];
                                let newest = list.last().map_or(this, |&(_, m)| m.max(this));
                                list.push((now, newest));
                            }
                        }
                        if rec.zero {
                            self.report.discards_acked += 1;
                        } else {
                            self.report.writes_acked += 1;
                            self.report.primary_writes += op.primary as u64;
                            self.report.sector_writes += rec.sectors.is_some() as u64;
                        }
                    }
                    self.log(format!(
                        "client {} write {w} acked (blocks {}+{})",
                        self.clients[c].attachment, op.first, op.blocks
                    ));
                }
            }
            (Some(w), Status::OlderVersion) => {
                // A newer write holds some block (or the node restarted
                // and refuses what may be older than a discard it forgot):
                // move the clock past the version it names and write the
                // range again with a newer version (as the client does).
                let limit = self.clock_limit(c);
                let cl = &mut self.clients[c];
                let stored = celer_proto::version_clock(h.version);
                if stored > cl.hlc && stored > limit {
                    // The client fails such a write (a writer's clock is
                    // wrong); the offsets here stay far within the bound.
                    return Err(format!(
                        "node {} holds version {:#x}, beyond the drift bound of client {}'s clock",
                        node_id(i),
                        h.version,
                        cl.attachment
                    ));
                }
                cl.hlc = cl.hlc.max(stored);
                let op = cl.ops.remove(&id).expect("present");
                self.forget_requests(c, id);
                let (zero, sectors, write_zeroes) =
                    self.writes.get(&w).map_or((false, None, false), |r| {
                        (r.zero, r.sectors, r.write_zeroes)
                    });
                // This write is never acknowledged (the rewrite may be,
                // or may itself be given up at a take-over).
                self.give_up(w);
                let newer = self.new_write_sectors(c, op.first, op.blocks, zero, sectors);
                if let Some(r) = self.writes.get_mut(&newer) {
                    r.write_zeroes = write_zeroes;
                }
                self.report.rewrites += 1;
                self.log(format!(
                    "client {} write {w}: OlderVersion from node {}, rewritten as {newer}",
                    self.clients[c].attachment,
                    node_id(i)
                ));
            }
            (Some(w), Status::Fenced) => {
                // The volume was taken over from this attachment: the
                // write fails (the guest would see an I/O error).
                self.clients[c].ops.remove(&id);
                self.forget_requests(c, id);
                self.give_up(w);
                self.report.fenced += 1;
                self.log(format!(
                    "client {} write {w}: Fenced from node {}, failed",
                    self.clients[c].attachment,
                    node_id(i)
                ));
            }
            (None, Status::Ok) => {
                let op = self.clients[c].ops.remove(&id).expect("present");
                self.check_read(c, i, &op, payload)?;
            }
            (_, Status::StaleEpoch) => {
                // The node has a newer table, in the payload: take it and
                // send the op again as it says (same version).
                self.report.stale_epochs += 1;
                let t = RouteTable::decode(payload).map_err(|e| {
                    format!("node {}: StaleEpoch with a bad table: {e}", node_id(i))
                })?;
                if t.epoch <= op.epoch {
                    return Err(format!(
                        "node {} answered StaleEpoch with epoch {} to a request of epoch {}",
                        node_id(i),
                        t.epoch,
                        op.epoch
                    ));
                }
                if t.epoch > self.clients[c].table.epoch {
                    self.clients[c].table = t;
                }
                self.route_op(c, id);
            }
            (_, Status::RouteBehind) => {
                // The node fetches the newer table; ask again shortly.
                op.want[i] = Want::RetryAt(now + RETRY_US / 2);
            }
            (None, Status::NotInSync) => {
                // Not in sync in the node's table: another replica.
                op.want[i] = Want::RetryAt(now + RETRY_US);
            }
            (_, Status::Busy | Status::Io | Status::Unavailable) => {
                op.want[i] = Want::RetryAt(now + RETRY_US);
            }
            (_, s) => {
                return Err(format!(
                    "node {} answered {:?} to a {:?} of blocks {}+{}",
                    node_id(i),
                    s,
                    h.op,
                    op.first,
                    op.blocks
                ))
            }
        }
        Ok(())
    }

    /// Client `c`'s connection to node `i` is gone: what was sent on it is
    /// sent again on the next one, with the same version.
    pub(super) fn drop_conn(&mut self, c: usize, i: usize) {
        if let Some(conn) = &self.clients[c].conns[i] {
            self.world.borrow_mut().reset(conn.pipe);
        }
        self.abandon_conn(c, i);
    }

    /// Client `c` gives up its connection to node `i` without a reset: the
    /// node still reads what it carried, then its end. What was sent on it
    /// is sent again on the next one.
    pub(super) fn abandon_conn(&mut self, c: usize, i: usize) {
        if self.keep_all {
            self.log(format!(
                "client {} leaves its connection to node {}",
                self.clients[c].attachment,
                node_id(i)
            ));
        }
        let cl = &mut self.clients[c];
        cl.conns[i] = None;
        let ops = &mut cl.ops;
        cl.reqs.retain(|&q, &mut (op, r)| {
            if r != i {
                return true;
            }
            if let Some(op) = ops.get_mut(&op) {
                if op.want[i] == Want::Sent(q) {
                    op.want[i] = Want::Send;
                }
            }
            false
        });
    }

    /// The clients' unfinished requests, for a report.
    pub(super) fn describe_ops(&self) -> String {
        let mut out = Vec::new();
        for c in &self.clients {
            for op in c.ops.values() {
                out.push(format!(
                    "client {} {} blocks {}+{} issued at {} µs, replicas {:?}",
                    c.attachment,
                    match op.write {
                        Some(w) => format!("write {w}"),
                        None => "read".into(),
                    },
                    op.first,
                    op.blocks,
                    op.issued_at,
                    op.want
                ));
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(core) = &n.core {
                out.push(format!(
                    "node {}: {} engine requests in flight, {} connections watched",
                    node_id(i),
                    core.engine_inflight(),
                    core.net().pipes().len()
                ));
            }
        }
        out.join("; ")
    }

    pub(super) fn forget_requests(&mut self, c: usize, op: u64) {
        self.clients[c].reqs.retain(|_, (o, _)| *o != op);
    }
}
