//! [`Client::allocation`](crate::Client): which chunks of a range the
//! storage nodes hold, for the NBD front end's BLOCK_STATUS (backup tools
//! skip holes with it).
//!
//! Granularity is the chunk: a chunk that no node holds a slot for is a
//! hole; a held chunk is reported as data as a whole (the nodes' list does
//! not say which of its blocks were written). For each partition the
//! range's chunks fall in, one `ListChunks` naming this volume goes to an
//! in-sync member (the primary first), which answers with the volume's
//! chunks in that partition; requests to one (node, shard) are pipelined
//! on one blocking connection, kept for the next call. So a call costs one
//! round trip per connection used, whatever the range's size, and never a
//! round trip per block or per extent.
//!
//! Control path: calls are serialized by a mutex and may block up to the
//! client's `op_deadline`; the I/O queues are not involved.
//!
//! Layers (snapshots, clones): the node answers for every layer a read of
//! the volume (or, with `FLAG_SNAPSHOT_READ`, of the snapshot) goes
//! through, so a chunk any layer of the chain holds is data; the
//! partitions are the volume's placement lineage's.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celer_device::{push_extent, Allocation, Extent, IoError};
use celer_proto::auth::{HelloProof, NONCE_BYTES};
use celer_proto::payload::decode_chunk_list;
use celer_proto::{Header, Kind, Op, Status, FLAG_SINCE, FLAG_SNAPSHOT_READ, HEADER_BYTES};
use celer_route::{NodeId, RouteTable};

use crate::{attachment_of, io_error, protocol_error, read_frame, NodeStream, Shared};

/// Pause before asking again after `RouteBehind` or `Busy`.
const RETRY_PAUSE: Duration = Duration::from_millis(5);
/// How long connecting to a node and each answer may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections for chunk lists, per (node, shard); opened on first use.
#[derive(Default)]
pub(crate) struct ChunkLists {
    conns: Mutex<HashMap<(NodeId, u16), NodeStream>>,
}

impl ChunkLists {
    /// Appends the extents of `[offset, offset + len)` of `volume` to `out`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn allocation(
        &self,
        shared: &Arc<Shared>,
        volume: u64,
        layers: Layers,
        offset: u64,
        len: u64,
        deadline: Duration,
        out: &mut Vec<Extent>,
    ) -> Result<(), IoError> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let mut table = shared
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let chunk_bytes = table.chunk_bytes;
        let (first, last) = (offset / chunk_bytes, (end - 1) / chunk_bytes);
        let give_up = Instant::now() + deadline;
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let held = loop {
            match Self::list(&mut conns, shared, &table, volume, layers, first, last) {
                Ok(held) => break held,
                Err(Retry::NewTable(t)) => {
                    let mut newest = shared.table.lock().unwrap_or_else(|e| e.into_inner());
                    if t.epoch > newest.epoch && t.chunk_bytes == newest.chunk_bytes {
                        *newest = Arc::new(t);
                    }
                    table = newest.clone();
                }
                Err(Retry::Later(why)) => {
                    if Instant::now() >= give_up {
                        return Err(IoError::Io(format!(
                            "volume {volume}: chunk lists not available within {} ms: {why}",
                            deadline.as_millis()
                        )));
                    }
                    std::thread::sleep(RETRY_PAUSE);
                }
            }
            if Instant::now() >= give_up {
                return Err(IoError::Io(format!(
                    "volume {volume}: chunk lists not available within {} ms (route changing)",
                    deadline.as_millis()
                )));
            }
        };
        let mut at = offset;
        while at < end {
            let chunk = at / chunk_bytes;
            let next = ((chunk + 1) * chunk_bytes).min(end);
            let allocation = if held.contains(&chunk) {
                Allocation::Data
            } else {
                Allocation::Hole
            };
            push_extent(out, next - at, allocation);
            at = next;
        }
        Ok(())
    }

    /// The chunks in `first..=last` of `volume` that an in-sync member of
    /// their partition holds.
    fn list(
        conns: &mut HashMap<(NodeId, u16), NodeStream>,
        shared: &Arc<Shared>,
        table: &RouteTable,
        volume: u64,
        layers: Layers,
        first: u64,
        last: u64,
    ) -> Result<HashSet<u64>, Retry> {
        let mut partitions = HashSet::new();
        for chunk in first..=last {
            partitions.insert(table.partition_of(layers.placement, chunk));
            if partitions.len() as u32 == table.partition_count() {
                break;
            }
        }
        // Per partition, the in-sync members to ask in turn (primary first).
        let mut attempts: HashMap<u32, usize> = partitions.iter().map(|&p| (p, 0)).collect();
        let mut todo: Vec<u32> = partitions.into_iter().collect();
        let mut held = HashSet::new();
        let mut last_error = String::new();
        while !todo.is_empty() {
            // This round: each partition's current member, grouped by
            // (node, shard), so one connection carries its requests together.
            let mut rounds: BTreeMap<(NodeId, u16), Vec<u32>> = BTreeMap::new();
            for &p in &todo {
                let attempt = attempts.get(&p).copied().unwrap_or(0);
                let member = table
                    .partition(p)
                    .and_then(|r| r.members.iter().filter(|m| m.in_sync).nth(attempt))
                    .map(|m| m.node);
                let Some(node) = member else {
                    return Err(Retry::Later(format!(
                        "no in-sync member of partition {p} answered ({last_error})"
                    )));
                };
                let shard = table.node(node).map_or(0, |info| table.shard_of(info, p));
                rounds.entry((node, shard)).or_default().push(p);
            }
            let mut next_todo = Vec::new();
            for ((node, shard), ps) in rounds {
                match ask(conns, shared, table, node, shard, volume, layers, &ps) {
                    Ok(Answer::Lists(chunks)) => held.extend(
                        chunks
                            .into_iter()
                            .filter(|&(v, c)| v == volume && (first..=last).contains(&c))
                            .map(|(_, c)| c),
                    ),
                    Ok(Answer::NewTable(t)) => return Err(Retry::NewTable(t)),
                    Ok(Answer::Later(why)) => return Err(Retry::Later(why)),
                    Err(why) => {
                        conns.remove(&(node, shard));
                        tracing::debug!(node, shard, "chunk list failed: {why}");
                        last_error = why;
                        for p in ps {
                            *attempts.entry(p).or_default() += 1;
                            next_todo.push(p);
                        }
                    }
                }
            }
            todo = next_todo;
        }
        Ok(held)
    }
}

/// Which layers a list is for: the volume's placement lineage, and the
/// snapshot era it reads instead of the head (`ClientConfig::read_snapshot`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layers {
    pub(crate) placement: u64,
    pub(crate) read_snapshot: Option<u32>,
    /// Only the layers of an era newer than this (`FLAG_SINCE`).
    pub(crate) since: Option<u32>,
}

enum Retry {
    NewTable(RouteTable),
    Later(String),
}

enum Answer {
    /// (volume, chunk) pairs of every partition asked.
    Lists(Vec<(u64, u64)>),
    NewTable(RouteTable),
    Later(String),
}

/// Sends one `ListChunks` per partition on the (node, shard) connection
/// and reads every answer. `Err`: this member failed (try another).
#[allow(clippy::too_many_arguments)]
fn ask(
    conns: &mut HashMap<(NodeId, u16), NodeStream>,
    shared: &Arc<Shared>,
    table: &RouteTable,
    node: NodeId,
    shard: u16,
    volume: u64,
    layers: Layers,
    partitions: &[u32],
) -> Result<Answer, String> {
    let addr = table
        .node(node)
        .map(|n| n.data_addr.clone())
        .ok_or_else(|| format!("node {node} not in the table"))?;
    let s = match conns.entry((node, shard)) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => e.insert(
            open(
                &addr,
                &shared.credential().0,
                shard,
                shared.data_tls.as_ref(),
            )
            .map_err(|e| e.to_string())?,
        ),
    };
    let mut out = Vec::with_capacity(partitions.len() * HEADER_BYTES);
    for (i, &p) in partitions.iter().enumerate() {
        let mut h = Header::request(Op::ListChunks, i as u32 + 1);
        h.epoch = table.epoch;
        h.volume = volume;
        h.offset = u64::from(p);
        if let Some(era) = layers.read_snapshot {
            h.flags |= FLAG_SNAPSHOT_READ;
            h.snapshot = u64::from(era);
        }
        if let Some(era) = layers.since {
            h.flags |= FLAG_SINCE;
            h.version = u64::from(era);
        }
        out.extend_from_slice(&h.encode());
    }
    std::io::Write::write_all(s, &out).map_err(|e| format!("{addr}: send: {e}"))?;
    let mut lists = Vec::new();
    let mut later = None;
    let mut newer = None;
    for _ in partitions {
        let (h, payload) = read_frame(s, &addr).map_err(|e| e.to_string())?;
        if h.kind != Kind::Response || h.op != Op::ListChunks {
            return Err(format!("{addr}: unexpected {:?} {:?}", h.kind, h.op));
        }
        match h.status {
            Status::Ok => match decode_chunk_list(&payload) {
                Ok(chunks) => lists.extend(chunks),
                Err(e) => return Err(format!("{addr}: {e}")),
            },
            Status::StaleEpoch if !payload.is_empty() => {
                newer = RouteTable::decode(&payload).ok();
            }
            Status::RouteBehind | Status::Busy | Status::SnapshotBehind => {
                later = Some(format!("{addr}: {:?}", h.status))
            }
            other => return Err(format!("{addr}: ListChunks answered {other:?}")),
        }
    }
    Ok(match (newer, later) {
        (Some(t), _) => Answer::NewTable(t),
        (None, Some(why)) => Answer::Later(why),
        (None, None) => Answer::Lists(lists),
    })
}

/// A blocking connection to `shard` of the node at `addr`, past the
/// Challenge/Hello exchange (the node proved it knows the key).
pub(crate) fn open(
    addr: &str,
    credential: &celer_proto::auth::Credential,
    shard: u16,
    tls: Option<&celer_tls::DataTls>,
) -> Result<NodeStream, crate::ClientError> {
    let (io, protocol) = (io_error(addr), protocol_error(addr));
    let mut s = NodeStream::dial(addr, ANSWER_TIMEOUT, tls)?;
    let (challenge, node_nonce) = read_frame(&mut s, addr)?;
    if challenge.op != Op::Challenge || node_nonce.len() != NONCE_BYTES {
        return Err(protocol("expected the node's Challenge".into()));
    }
    let mut nn = [0u8; NONCE_BYTES];
    nn.copy_from_slice(&node_nonce);
    let mut pn = [0u8; NONCE_BYTES];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut pn);
    let sender = attachment_of(credential) as u64;
    let proof = HelloProof::build(credential, &nn, &pn, shard, sender, false);
    let mut hello = Header::request(Op::Hello, 0).with_payload([proof.as_slice()]);
    hello.offset = u64::from(shard);
    hello.volume = sender;
    let mut out = hello.encode().to_vec();
    out.extend_from_slice(&proof);
    std::io::Write::write_all(&mut s, &out).map_err(io)?;
    let (h, payload) = read_frame(&mut s, addr)?;
    if h.op != Op::Hello || h.status != Status::Ok {
        return Err(protocol(format!("hello refused: {:?}", h.status)));
    }
    if !HelloProof::check_answer(credential.answer_key(), &nn, &pn, &payload) {
        return Err(protocol(
            "the node did not prove it knows the credential's key".into(),
        ));
    }
    Ok(s)
}
