//! Large writes through the primary: forwarding a write to the other
//! members, the connections to peer nodes, and their answers.

use super::*;

impl<D: Disk, N: Net> ShardLoop<D, N> {
    /// Sends a primary write to the other members.
    pub(super) fn forward(&mut self, id: usize, p: u32) {
        let me = self.shared.id;
        // The other members, copied to the stack (the loop needs `self`).
        let mut others = [0 as NodeId; 8];
        // (A partition has at most 3 targets and 3 leavers: 5 others.)
        let mut n = 0;
        if let Some(part) = self.table().and_then(|t| t.partition(p)) {
            for m in part.writers().filter(|m| m.node != me).take(others.len()) {
                others[n] = m.node;
                n += 1;
            }
        }
        for &node in &others[..n] {
            let Some(c) = self.peer_conn(node, p) else {
                self.ops[id].status = Status::Unavailable;
                continue;
            };
            let op = &mut self.ops[id];
            let mut h = op.req;
            h.op = Op::Write;
            h.request_id = ((op.gen as u32) << 16) | id as u32;
            // (Clients send sector writes as Write, never here.)
            h.flags = 0;
            let gen = self.conns[c].as_ref().map_or(0, |x| x.gen);
            let conn = self.conns[c].as_mut().expect("peer connection");
            conn.queue(h, &[&op.buf[..op.len]]);
            op.forwards[op.nforwards] = (c, gen);
            op.nforwards += 1;
            op.pending += 1;
            op.deadline = Some(self.net.now() + self.cfg.forward_timeout);
            self.forwards_inflight += 1;
            self.mark_dirty(c);
        }
    }

    /// The connection to `node`'s shard for partition `p`, opened if needed.
    pub(super) fn peer_conn(&mut self, node: NodeId, p: u32) -> Option<usize> {
        let shard = {
            let t = self.table()?;
            t.shard_of(t.node(node)?, p)
        };
        if let Some(&c) = self.peers.get(&(node, shard)) {
            return Some(c);
        }
        let addr = self.table()?.node(node)?.data_addr.clone();
        let sa = addr.to_socket_addrs().ok()?.next()?;
        let stream = match self.net.connect(sa) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(shard = self.id, node, %addr, "cannot connect to peer: {e}");
                return None;
            }
        };
        let wire = match self.shared.tls.as_ref().and_then(|t| t.client.clone()) {
            Some(config) => {
                // The certificate must name the IP dialled (as clients check).
                let name = rustls::pki_types::ServerName::IpAddress(sa.ip().into());
                let tls = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string());
                match tls {
                    Ok(c) => Wire::Tls(Box::new(rustls::Connection::Client(c))),
                    Err(e) => {
                        tracing::warn!(shard = self.id, node, %addr, "cannot start TLS to peer: {e}");
                        return None;
                    }
                }
            }
            None => Wire::Plain,
        };
        let tls = matches!(wire, Wire::Tls(_));
        // Frames queued on it wait for the node's Challenge and our Hello.
        let c = self.new_conn(
            stream,
            wire,
            Some((node, shard)),
            ConnAuth::AwaitChallenge,
            None,
            false,
        );
        self.peers.insert((node, shard), c);
        if tls {
            // The ClientHello goes out as soon as the socket connects.
            self.mark_dirty(c);
        }
        Some(c)
    }

    pub(super) fn on_peer_response(&mut self, c: usize, f: &Frame) {
        let h = f.header;
        let Some(conn) = self.conns[c].as_mut() else {
            return;
        };
        if h.op == Op::Hello {
            let proven = match conn.auth {
                ConnAuth::AwaitAnswer {
                    node_nonce,
                    peer_nonce,
                } => {
                    h.status == Status::Ok
                        && HelloProof::check_answer(
                            &self.shared.data_key,
                            &node_nonce,
                            &peer_nonce,
                            conn.payload(f),
                        )
                }
                _ => false,
            };
            if proven {
                conn.auth = ConnAuth::Verified;
            } else {
                self.close_broken(
                    c,
                    &format!(
                        "peer refused our Hello ({:?}) or did not prove the data key",
                        h.status
                    ),
                );
            }
            return;
        }
        if !matches!(conn.auth, ConnAuth::Verified) {
            self.close_broken(c, "a response before the peer proved the data key");
            return;
        }
        if h.status != Status::OlderVersion && h.version > 0 {
            let v = self.versions.entry(h.volume).or_default();
            *v = (*v).max(h.version);
        }
        if h.request_id & REQ_BACKFILL != 0 {
            let payload = self.conns[c]
                .as_ref()
                .map(|conn| conn.payload(f).to_vec())
                .unwrap_or_default();
            if h.request_id & REQ_COMPARE == REQ_COMPARE {
                self.scrub_compare_response(&h, &payload);
            } else if h.request_id & REQ_REPAIR == REQ_REPAIR {
                self.repair_response(c, &h, &payload);
            } else {
                self.backfill_response(c, &h, &payload);
            }
            return;
        }
        let id = (h.request_id & 0xffff) as usize;
        let gen = (h.request_id >> 16) as u16;
        let conn_gen = self.conns[c].as_ref().map_or(0, |x| x.gen);
        let Some(op) = self.ops.get(id) else { return };
        if !op.busy || op.gen != gen || op.kind != OpKind::Primary {
            return; // a late answer to a forward that already timed out
        }
        let Some(k) = op.forwards[..op.nforwards]
            .iter()
            .position(|x| *x == (c, conn_gen))
        else {
            return;
        };
        let status = match h.status {
            Status::Ok => Status::Ok,
            Status::OlderVersion => {
                let op = &mut self.ops[id];
                op.newer = op.newer.max(h.version);
                Status::OlderVersion
            }
            // The member knows a newer route than ours: we are behind.
            Status::StaleEpoch => {
                self.shared
                    .tell_agent(AgentMsg::NeedRoute(self.shared.hub.epoch() + 1));
                Status::RouteBehind
            }
            s => s,
        };
        self.forward_failed(id, k, status);
    }

    /// Removes forward `k` of op `id` with its outcome.
    pub(super) fn forward_failed(&mut self, id: usize, k: usize, status: Status) {
        let op = &mut self.ops[id];
        op.forwards[k] = op.forwards[op.nforwards - 1];
        op.nforwards -= 1;
        op.pending -= 1;
        self.forwards_inflight -= 1;
        if status != Status::Ok && op.status == Status::Ok {
            op.status = status;
        }
        if op.nforwards == 0 {
            op.deadline = None;
        }
        if op.pending == 0 {
            self.finish_op(id);
        }
    }
}
