//! The nodes' acceptors: a connection a client or a node core opens gets
//! the Challenge, its Hello read (exactly: what follows stays for the
//! shard) and checked with `HelloProof::check`, as `celer-node`'s acceptor
//! does, and goes to its node's core.

use super::*;

impl DataSim {
    /// Node `i`'s acceptor takes a new connection.
    pub(super) fn accept(&mut self, i: usize, stream: SimStream) {
        let mut nonce = [0u8; NONCE_BYTES];
        self.rng.fill(&mut nonce[..]);
        self.accepting.push(Accepting {
            node: i,
            stream,
            nonce,
            challenged: false,
            got: Vec::new(),
        });
    }

    /// Acceptors: connections node cores opened go to the node at their
    /// address; every pending one gets its Challenge, its Hello read and
    /// checked (`HelloProof::check`, as `celer-node`'s acceptor does), and
    /// goes to its node's core. Whether anything moved.
    pub(super) fn accept_step(&mut self) -> Result<bool, String> {
        let mut busy = false;
        let opened: Vec<_> = self.world.borrow_mut().accepts.drain(..).collect();
        for (addr, stream) in opened {
            busy = true;
            let to = (0..NODES).find(|&i| control::data_addr(i).parse().ok() == Some(addr));
            match to {
                Some(i) if self.nodes[i].core.is_some() => self.accept(i, stream),
                // Connection refused.
                _ => self.world.borrow_mut().reset(stream.pipe),
            }
        }
        let mut k = 0;
        while k < self.accepting.len() {
            let a = &mut self.accepting[k];
            let pipe = a.stream.pipe;
            if self.world.borrow().is_reset(pipe) || self.nodes[a.node].core.is_none() {
                self.world.borrow_mut().reset(pipe);
                self.accepting.swap_remove(k);
                continue;
            }
            if !a.challenged {
                let h = Header::request(Op::Challenge, 0).with_payload([&a.nonce[..]]);
                let mut out = h.encode().to_vec();
                out.extend_from_slice(&a.nonce);
                let mut at = 0;
                while at < out.len() {
                    match a.stream.write(&out[at..]) {
                        Ok(n) => at += n,
                        Err(e) => return Err(format!("acceptor: Challenge not sent: {e}")),
                    }
                }
                a.challenged = true;
                busy = true;
            }
            // Exactly the Hello: its header, then its payload.
            let need = if a.got.len() < HEADER_BYTES {
                HEADER_BYTES
            } else {
                match decode_header(&a.got[..HEADER_BYTES]) {
                    Ok(Some(h)) if h.kind == Kind::Request && h.op == Op::Hello => {
                        HEADER_BYTES + (h.payload_bytes as usize).min(HelloProof::MAX_BYTES)
                    }
                    other => {
                        return Err(format!(
                            "acceptor of node {}: first frame is not a Hello: {other:?}",
                            node_id(a.node)
                        ))
                    }
                }
            };
            let have = a.got.len();
            if have < need {
                a.got.resize(need, 0);
                match a.stream.read(&mut a.got[have..need]) {
                    Ok(0) => {
                        self.accepting.swap_remove(k);
                        continue;
                    }
                    Ok(n) => {
                        a.got.truncate(have + n);
                        busy = true;
                    }
                    Err(_) => a.got.truncate(have),
                }
                // The header alone, or not all of it: read on.
                if a.got.len() <= HEADER_BYTES || a.got.len() < need {
                    k += 1;
                    continue;
                }
            }
            let a = self.accepting.swap_remove(k);
            let Ok(Some(h)) = decode_header(&a.got[..HEADER_BYTES]) else {
                return Err("acceptor: the Hello's header went bad".into());
            };
            if h.verify_payload([&a.got[HEADER_BYTES..]]).is_err() {
                return Err(format!(
                    "acceptor of node {} (pipe {}): a Hello with a bad crc: {h:?}, {} bytes",
                    node_id(a.node),
                    a.stream.pipe,
                    a.got.len()
                ));
            }
            let unix_ms = self
                .world
                .borrow()
                .unix_ms()
                .saturating_add_signed(self.nodes[a.node].clock_offset_ms);
            let (peer, peer_nonce) = HelloProof::check(
                &a.got[HEADER_BYTES..],
                &DATA_KEY,
                &a.nonce,
                h.offset as u16,
                h.volume,
                false,
                unix_ms,
            )
            .map_err(|e| format!("acceptor of node {}: Hello refused: {e}", node_id(a.node)))?;
            let answer = HelloProof::answer(&peer.key(&DATA_KEY), &a.nonce, &peer_nonce);
            if let Some(core) = self.nodes[a.node].core.as_mut() {
                core.adopt(a.stream, h, peer, a.nonce, answer);
            }
            busy = true;
        }
        Ok(busy)
    }
}
