//! A shard's connections: adopting one from the handshake thread, reading
//! whole frames off it (with the shared receive-buffer budget), sending,
//! and closing.

use super::*;

impl<D: Disk, N: Net> ShardLoop<D, N> {
    pub(super) fn new_conn(
        &mut self,
        stream: N::Stream,
        wire: Wire,
        peer: Option<(NodeId, u16)>,
        auth: ConnAuth,
        ticket: Option<ConnTicket>,
        out: bool,
    ) -> usize {
        self.conn_gen = self.conn_gen.wrapping_add(1);
        // A closed connection's landing buffer first (it may be on huge
        // pages, from the shard's pool).
        let landing = self.landings.pop().unwrap_or_else(|| AlignedBuf::new(1));
        let now = self.net.now();
        let conn = Conn::new(
            stream,
            wire,
            self.conn_gen,
            peer,
            auth,
            ticket,
            landing,
            now,
        );
        let idx = match self.free_conns.pop() {
            Some(i) => {
                self.conns[i] = Some(conn);
                i
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        if let Some(c) = self.conns[idx].as_mut() {
            c.want_out = out;
            self.net.watch(idx, &c.stream, true, out);
        }
        idx
    }

    /// Takes an authenticated connection: answers its Hello with the
    /// node's proof.
    pub(crate) fn adopt(&mut self, stream: N::Stream, hs: Adopted) {
        let hello = hs.hello;
        let (auth, volume) = match hs.peer {
            Peer::Node { .. } => (ConnAuth::Node, None),
            Peer::Attachment(cap) => {
                self.counters.client_connected();
                (
                    ConnAuth::Attachment {
                        cap,
                        node_nonce: hs.node_nonce,
                        shard: hello.offset as u16,
                        sender: hello.volume,
                    },
                    Some(cap.volume),
                )
            }
        };
        let tls = matches!(hs.wire, Wire::Tls(_));
        let idx = self.new_conn(stream, hs.wire, None, auth, hs.ticket, false);
        let mut r = Header::response_to(&hello, Status::Ok);
        r.version = volume.map_or(0, |v| self.volume_version(v));
        if let Some(c) = self.conns[idx].as_mut() {
            c.queue(r, &[&hs.answer]);
        }
        self.mark_dirty(idx);
        if tls {
            // Requests pipelined after the Hello may already sit in the
            // TLS session, where epoll does not see them.
            self.process_frames(idx);
        }
    }

    /// EPOLLIN unless reading is paused, EPOLLOUT while output waits.
    pub(super) fn arm(&mut self, c: usize) {
        let Some(conn) = self.conns[c].as_mut() else {
            return;
        };
        let want_in = !conn.send_blocked && !conn.starved;
        let want_out = conn.has_output();
        if want_in == conn.want_in && want_out == conn.want_out {
            return;
        }
        conn.want_in = want_in;
        conn.want_out = want_out;
        self.net.rewatch(c, &conn.stream, want_in, want_out);
    }

    /// The budget runs short: takes back the room lent to connections
    /// that hold no partial frame (all but `except`).
    pub(super) fn reclaim(&mut self, except: usize) {
        let mut back = 0;
        for (i, conn) in self.conns.iter_mut().enumerate() {
            if i != except {
                if let Some(conn) = conn.as_mut() {
                    back += conn.shrink();
                }
            }
        }
        self.give_back(back);
    }

    /// Gives back lent receive room and lets starved connections go on.
    pub(super) fn give_back(&mut self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.rbuf_lent -= bytes;
        for c in std::mem::take(&mut self.starved) {
            if let Some(conn) = self.conns[c].as_mut() {
                conn.starved = false;
                self.arm(c);
                if !self.backlog.contains(&c) {
                    self.backlog.push(c);
                }
            }
        }
    }

    pub(super) fn mark_dirty(&mut self, c: usize) {
        if !self.dirty.contains(&c) {
            self.dirty.push(c);
        }
    }

    /// Closes a connection whose peer broke the protocol (counted in
    /// `celer_node_protocol_errors_total`).
    pub(super) fn close_broken(&mut self, c: usize, why: &str) {
        self.counters.protocol_error();
        self.close_conn(c, why);
    }

    pub(super) fn close_conn(&mut self, c: usize, why: &str) {
        let Some(mut conn) = self.conns[c].take() else {
            return;
        };
        self.landings.extend(conn.take_landing());
        if let Some(peer) = conn.peer {
            tracing::warn!(shard = self.id, peer = ?peer, "peer connection closed: {why}");
            self.peers.retain(|_, v| *v != c);
        } else if why != "peer closed" {
            let addr = self.net.describe(&conn.stream);
            tracing::warn!(shard = self.id, %addr, "closing connection: {why}");
        }
        self.net.unwatch(c, &conn.stream);
        self.free_conns.push(c);
        self.dirty.retain(|d| *d != c);
        self.backlog.retain(|d| *d != c);
        self.starved.retain(|d| *d != c);
        self.give_back(conn.borrowed);
        // Forwards waiting on this connection fail now.
        let gen = conn.gen;
        for id in 0..self.ops.len() {
            let op = &self.ops[id];
            if !op.busy || op.kind != OpKind::Primary {
                continue;
            }
            if let Some(k) = op.forwards[..op.nforwards]
                .iter()
                .position(|f| *f == (c, gen))
            {
                self.forward_failed(id, k, Status::Unavailable);
            }
        }
        for i in 0..self.backfills.len() {
            let b = &mut self.backfills[i];
            if b.conn.is_some_and(|(bc, bg)| bc == c && bg == gen) {
                b.conn = None;
                if b.stage == BfStage::Waiting {
                    b.stage = if b.bytes_total.is_none() {
                        BfStage::List
                    } else {
                        BfStage::Read
                    };
                }
                b.retry_at = Some(self.net.now() + Duration::from_millis(50));
                if b.catch_up && b.bytes_total.is_some() {
                    // The source may have restarted: the blocks it freed by
                    // discards it no longer remembers (in memory) would
                    // read as never written, and this member would keep
                    // what it held there.
                    self.copy_whole_instead(i, "lost the connection to the source");
                }
            }
        }
    }

    pub(super) fn on_readable(&mut self, c: usize) {
        let Some(conn) = self.conns[c].as_mut() else {
            return;
        };
        conn.last_input = self.woke_at;
        if matches!(conn.wire, Wire::Tls(_)) {
            // Reading may have advanced the TLS handshake or a key update,
            // whose records go out with the next flush.
            self.mark_dirty(c);
        }
        let Some(conn) = self.conns[c].as_mut() else {
            return;
        };
        match conn.fill() {
            Ok(true) => {}
            Ok(false) => {
                self.process_frames(c);
                self.close_conn(c, "peer closed");
                return;
            }
            Err(e) => {
                let hs = matches!(&conn.wire, Wire::Tls(t) if t.is_handshaking());
                let why = match (celer_tls::wire::tls_error(&e), &self.shared.tls) {
                    (Some(t), Some(creds)) if conn.peer.is_some() => {
                        celer_tls::describe_client_error(t, &creds.dir, hs)
                    }
                    (Some(t), Some(creds)) => celer_tls::describe_server_error(t, &creds.dir, hs),
                    _ => e.to_string(),
                };
                self.close_conn(c, &why);
                return;
            }
        }
        self.process_frames(c);
    }

    pub(super) fn process_frames(&mut self, c: usize) {
        loop {
            let Some(conn) = self.conns[c].as_mut() else {
                return;
            };
            if conn.send_blocked || conn.starved {
                return;
            }
            let frame = match conn.next_frame(self.woke_at) {
                Ok(Next::Frame(f)) => f,
                Ok(Next::More) => match conn.pull_buffered() {
                    Ok(true) => continue,
                    Ok(false) => return,
                    Err(e) => {
                        self.close_conn(c, &e.to_string());
                        return;
                    }
                },
                Ok(Next::Grow(total)) => {
                    let extra = total - crate::conn::RBUF_INITIAL - conn.borrowed;
                    if self.rbuf_lent + extra > RBUF_BUDGET_BYTES {
                        self.reclaim(c);
                    }
                    let Some(conn) = self.conns[c].as_mut() else {
                        return;
                    };
                    if self.rbuf_lent + extra <= RBUF_BUDGET_BYTES {
                        self.rbuf_lent += extra;
                        conn.grow(total);
                        // Read the rest of the frame into the room.
                        if let Err(e) = conn.fill() {
                            self.close_conn(c, &e.to_string());
                            return;
                        }
                        continue;
                    }
                    conn.starved = true;
                    self.starved.push(c);
                    self.arm(c);
                    return;
                }
                Err(e) => {
                    self.close_broken(c, &format!("corrupt frame: {e}"));
                    return;
                }
            };
            let is_peer = conn.peer.is_some();
            if frame.header.kind == Kind::Response {
                if is_peer {
                    self.on_peer_response(c, &frame);
                } else {
                    self.close_broken(c, "a client sent a response frame");
                    return;
                }
            } else if is_peer {
                if frame.header.op != Op::Challenge {
                    self.close_broken(c, "a peer we called sent a request");
                    return;
                }
                self.on_challenge(c, &frame);
            } else {
                let needs_op = matches!(
                    frame.header.op,
                    Op::Read
                        | Op::Write
                        | Op::WritePrimary
                        | Op::WriteZeroes
                        | Op::Discard
                        | Op::BackfillRead
                        | Op::Fill
                );
                let large = large_bytes(&frame.header);
                if needs_op
                    && (self.free_ops.is_empty()
                        || conn.ops >= CONN_OPS_MAX
                        || (large > 0
                            && self.large_inflight > 0
                            && self.large_inflight + large > OP_LARGE_BUDGET_BYTES))
                {
                    // Out of ops: leave the frame for later (backpressure).
                    if !self.backlog.contains(&c) {
                        self.backlog.push(c);
                    }
                    return;
                }
                if conn.unsent() > SEND_HIGH_BYTES {
                    // Its answers are not being read: read no more of it
                    // until they are (flush_conn lets it go on).
                    conn.send_blocked = true;
                    self.arm(c);
                    return;
                }
                self.on_request(c, &frame);
            }
            if let Some(conn) = self.conns[c].as_mut() {
                conn.consume(&frame);
            }
        }
    }

    /// The node we called sent its Challenge: our Hello goes first.
    pub(super) fn on_challenge(&mut self, c: usize, f: &Frame) {
        let Some(conn) = self.conns[c].as_mut() else {
            return;
        };
        let payload = conn.payload(f);
        if !matches!(conn.auth, ConnAuth::AwaitChallenge) || payload.len() != NONCE_BYTES {
            self.close_broken(c, "unexpected Challenge from a peer");
            return;
        }
        let mut node_nonce = [0u8; NONCE_BYTES];
        node_nonce.copy_from_slice(payload);
        let mut peer_nonce = [0u8; NONCE_BYTES];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut peer_nonce);
        let shard = conn.peer.map_or(0, |p| p.1);
        let me = self.shared.id as u64;
        let proof = HelloProof::build(
            &Credential::Node {
                key: self.shared.data_key,
            },
            &node_nonce,
            &peer_nonce,
            shard,
            me,
            false,
        );
        let mut hello = Header::request(Op::Hello, 0);
        hello.offset = shard as u64;
        hello.volume = me;
        conn.queue_first(hello, &proof);
        conn.auth = ConnAuth::AwaitAnswer {
            node_nonce,
            peer_nonce,
        };
        self.mark_dirty(c);
    }

    pub(super) fn flush_conn(&mut self, c: usize) {
        let Some(conn) = self.conns[c].as_mut() else {
            return;
        };
        if let Err(e) = conn.flush() {
            self.close_conn(c, &format!("send: {e}"));
            return;
        }
        if conn.send_blocked && conn.unsent() <= SEND_LOW_BYTES {
            // Its answers are being read again: go on with its requests.
            conn.send_blocked = false;
            if !self.backlog.contains(&c) {
                self.backlog.push(c);
            }
        }
        self.arm(c);
    }

    pub(super) fn flush_dirty(&mut self) {
        while let Some(c) = self.dirty.pop() {
            self.flush_conn(c);
        }
    }
}
