//! The data side of `celer volume flatten`: [`Client::layer_chunks`] lists
//! the chunks the volume's layers hold, [`Client::fill_chunks`] sends a
//! `Fill` (celer-proto) for each of them to every member of its partition
//! that takes writes, like a small write, and waits until all of them
//! answered `Ok` in one route epoch. Each member copies, from its own
//! copies of the layers under the head, what the head lacks (the engine's
//! `Fill`), so the members end identical and a guest may keep writing the
//! volume meanwhile (a fill never changes what the volume reads). A fill
//! of a range already copied finds nothing to do: the whole job can be run
//! again after any interruption.
//!
//! Control path: `FillOptions::workers` threads, each with one request in
//! flight per member connection (blocking sockets with timeouts, opened
//! per (node, shard) and kept). Memory: a frame header per request; the
//! nodes read and write the data, none of it crosses the network.
//!
//! Retries: `StaleEpoch` installs the newer table and sends the piece to
//! its new members; `RouteBehind`, `Busy` (a member of the partition is
//! backfilling or catching up: its lower layers may be incomplete, see
//! celer-node `shard/fill.rs`), `SnapshotBehind`, `Checksum` (a lower
//! block is being repaired) and `Expired` are asked again after a pause; a
//! member that fails (no answer, connection lost, `NotReplica`,
//! `Unavailable`) makes the piece wait for a newer table, fetched from the
//! other nodes, exactly as a write does: a member marked down meanwhile no
//! longer takes writes, and the members that stayed record the fill for
//! its catch-up. A piece that has not completed after
//! `FillOptions::stall_timeout` fails the job; so does `StaleSnapshot` (a
//! snapshot of the volume was taken: its head is another layer now).

use std::collections::HashMap;
use std::io::ErrorKind;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celer_device::{Allocation, IoError};
use celer_proto::payload::decode_fill_answer;
use celer_proto::{Header, Kind, Op, Status};
use celer_route::{NodeId, RouteTable};

use crate::{attachment_of, fence_of, fetch_route, read_frame, Client, ClientError, NodeStream};

/// Largest `Fill` request (a node's engine request limit).
pub const FILL_PIECE_MAX_BYTES: u64 = 1 << 20;
/// How long a member may take to answer one `Fill` (it reads and writes
/// up to 1 MiB on its disk, behind the guest's I/O).
const FILL_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before asking again (`Busy`, `RouteBehind`, a failed member).
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// A node that closes the connection on this many `Fill`s in a row while
/// it stays in the route (it completed the handshake each time) does not
/// know the op: an older build.
const OLD_NODE_CLOSES: u32 = 3;
/// Nodes asked for a newer table after a member failed.
const ROUTE_ASKS_MAX: usize = 3;

/// How [`Client::fill_chunks`] runs.
#[derive(Clone, Debug)]
pub struct FillOptions {
    /// Threads, each with one piece in flight.
    pub workers: usize,
    /// A piece not done after this long fails the job (a member that
    /// stays `Busy`, a partition without members).
    pub stall_timeout: Duration,
}

impl Default for FillOptions {
    fn default() -> Self {
        FillOptions {
            workers: 4,
            stall_timeout: Duration::from_secs(600),
        }
    }
}

/// Where a fill job stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FillProgress {
    /// Bytes of the pieces done (every member answered `Ok`).
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Bytes the members copied (the most any member of a piece copied):
    /// blocks the head lacked; the rest it held already (written by the
    /// guest, or copied by an earlier run).
    pub bytes_copied: u64,
}

/// Why a fill job stopped.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error("the volume's head is no longer era {era}: a snapshot of it was taken during the flatten (storage node {node} says era {now}); run the flatten again")]
    LayersChanged { era: u64, now: u64, node: NodeId },
    #[error("storage node {node} ({addr}) closed the connection on {OLD_NODE_CLOSES} Fill requests in a row without leaving the route: it runs a Celer older than this command (unknown op {}); upgrade it, then run the flatten again", Op::Fill as u8)]
    OldNode { node: NodeId, addr: String },
    #[error("range at byte {offset} not filled within {} s: {why}", stalled.as_secs())]
    Stalled {
        offset: u64,
        stalled: Duration,
        why: String,
    },
    #[error("storage node {node} refused a Fill of the range at byte {offset}: {status:?}")]
    Refused {
        node: NodeId,
        offset: u64,
        status: Status,
    },
    #[error("listing the volume's chunks: {0}")]
    List(IoError),
}

/// What the worker threads share.
struct Job<'a> {
    pieces: &'a [(u64, u32)],
    next: AtomicUsize,
    stop: AtomicBool,
    done: AtomicU64,
    copied: AtomicU64,
    total: u64,
    error: Mutex<Option<FillError>>,
    progress: &'a (dyn Fn(FillProgress) + Sync),
}

/// One member's answer to one `Fill`.
enum Leg {
    Ok(u32),
    Status(Status, Header, Vec<u8>),
    /// No answer: the connection failed (`closed`: the node closed it
    /// after a completed handshake).
    Lost {
        closed: bool,
        why: String,
    },
}

impl Client {
    /// The chunks the volume's layers hold (its head and every layer
    /// under it), from one in-sync member of each partition (`ListChunks`,
    /// as for block status): a superset of what a fill may copy.
    pub fn layer_chunks(&self) -> Result<Vec<u64>, IoError> {
        let size = self.size_bytes();
        let chunk_bytes = self.route_table().chunk_bytes;
        let mut extents = Vec::new();
        celer_device::BlockDevice::allocation(self, 0, size, &mut extents)?;
        let mut out = Vec::new();
        let mut at = 0u64;
        for e in extents {
            if e.allocation == Allocation::Data {
                let mut c = at / chunk_bytes;
                while c * chunk_bytes < at + e.len_bytes {
                    if out.last() != Some(&c) {
                        out.push(c);
                    }
                    c += 1;
                }
            }
            at += e.len_bytes;
        }
        Ok(out)
    }

    /// Fills chunks `chunks` of the volume (see the module doc), calling
    /// `progress` after each piece; returns the final figures.
    pub fn fill_chunks(
        &self,
        chunks: &[u64],
        opts: &FillOptions,
        progress: &(dyn Fn(FillProgress) + Sync),
    ) -> Result<FillProgress, FillError> {
        let size = self.size_bytes();
        let chunk_bytes = self.route_table().chunk_bytes;
        let piece = chunk_bytes.min(FILL_PIECE_MAX_BYTES);
        let mut pieces = Vec::new();
        for &c in chunks {
            let mut at = c * chunk_bytes;
            let end = ((c + 1) * chunk_bytes).min(size);
            while at < end {
                let len = piece.min(end - at);
                pieces.push((at, len as u32));
                at += len;
            }
        }
        let job = Job {
            pieces: &pieces,
            next: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            done: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            total: pieces.iter().map(|p| p.1 as u64).sum(),
            error: Mutex::new(None),
            progress,
        };
        std::thread::scope(|s| {
            for w in 0..opts.workers.max(1) {
                let job = &job;
                s.spawn(move || self.fill_worker(w, job, opts));
            }
        });
        if let Some(e) = job.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(e);
        }
        Ok(FillProgress {
            bytes_done: job.done.load(Ordering::Acquire),
            bytes_total: job.total,
            bytes_copied: job.copied.load(Ordering::Acquire),
        })
    }

    fn fill_worker(&self, worker: usize, job: &Job<'_>, opts: &FillOptions) {
        let mut conns: HashMap<(NodeId, u16), NodeStream> = HashMap::new();
        let mut closes: HashMap<NodeId, u32> = HashMap::new();
        let mut request_id = 0u32;
        while !job.stop.load(Ordering::Acquire) {
            let i = job.next.fetch_add(1, Ordering::AcqRel);
            let Some(&(offset, len)) = job.pieces.get(i) else {
                break;
            };
            let r = self.fill_piece(
                worker,
                job,
                opts,
                &mut conns,
                &mut closes,
                &mut request_id,
                offset,
                len,
            );
            match r {
                Ok(copied) => {
                    let done = job.done.fetch_add(len as u64, Ordering::AcqRel) + len as u64;
                    let copied = job.copied.fetch_add(copied, Ordering::AcqRel) + copied;
                    (job.progress)(FillProgress {
                        bytes_done: done,
                        bytes_total: job.total,
                        bytes_copied: copied,
                    });
                }
                Err(None) => break, // another worker failed
                Err(Some(e)) => {
                    let mut slot = job.error.lock().unwrap_or_else(|e| e.into_inner());
                    if slot.is_none() {
                        *slot = Some(e);
                    }
                    job.stop.store(true, Ordering::Release);
                    break;
                }
            }
        }
    }

    /// One piece, until every member that takes writes answered `Ok` in
    /// one epoch: the bytes copied. `Err(None)`: the job stopped.
    #[allow(clippy::too_many_arguments)]
    fn fill_piece(
        &self,
        worker: usize,
        job: &Job<'_>,
        opts: &FillOptions,
        conns: &mut HashMap<(NodeId, u16), NodeStream>,
        closes: &mut HashMap<NodeId, u32>,
        request_id: &mut u32,
        offset: u64,
        len: u32,
    ) -> Result<u64, Option<FillError>> {
        let started = Instant::now();
        let placement = if self.cfg.lineage == 0 {
            self.cfg.volume
        } else {
            self.cfg.lineage
        };
        let mut why = String::new();
        loop {
            if job.stop.load(Ordering::Acquire) {
                return Err(None);
            }
            if started.elapsed() > opts.stall_timeout {
                return Err(Some(FillError::Stalled {
                    offset,
                    stalled: opts.stall_timeout,
                    why,
                }));
            }
            let table = self.route_table();
            let p = table.partition_at(placement, offset);
            let writers: Vec<NodeId> = table
                .partition(p)
                .map(|part| part.writers().map(|m| m.node).collect())
                .unwrap_or_default();
            if writers.is_empty() {
                why = format!("partition {p} has no member that takes writes");
                self.refresh_route(&table, &[], worker);
                std::thread::sleep(RETRY_PAUSE);
                continue;
            }
            let (credential, _) = self.shared.credential();
            let mut h = Header::request(Op::Fill, 0);
            h.epoch = table.epoch;
            h.volume = self.cfg.volume;
            h.offset = offset;
            h.length = len;
            h.snapshot = self.shared.era.load(Ordering::Acquire);
            h.attachment = attachment_of(&credential);
            h.fence = fence_of(&credential);
            // Send to every member first, then read the answers.
            let mut sent: Vec<(NodeId, u16, u32, Option<String>)> = Vec::new();
            for &node in &writers {
                let shard = table.node(node).map_or(0, |n| table.shard_of(n, p));
                *request_id = request_id.wrapping_add(1);
                h.request_id = *request_id;
                let err = self
                    .send_fill(conns, &table, node, shard, &h, &credential)
                    .err();
                sent.push((node, shard, *request_id, err));
            }
            let mut legs = Vec::with_capacity(sent.len());
            for (node, shard, id, err) in sent {
                let leg = match err {
                    Some(why) => Leg::Lost { closed: false, why },
                    None => recv_fill(conns, node, shard, id),
                };
                legs.push((node, leg));
            }
            let mut copied = 0u64;
            let mut all_ok = true;
            let mut newer_table = false;
            let mut failed_nodes = Vec::new();
            for (node, leg) in legs {
                match leg {
                    Leg::Ok(n) => {
                        closes.remove(&node);
                        copied = copied.max(n as u64 * crate::BLOCK_BYTES);
                    }
                    Leg::Status(status, rh, payload) => {
                        all_ok = false;
                        why = format!("node {node}: {status:?}");
                        match status {
                            Status::StaleEpoch => {
                                if let Ok(t) = RouteTable::decode(&payload) {
                                    newer_table |= self.install_route(t);
                                }
                            }
                            Status::RouteBehind
                            | Status::Busy
                            | Status::SnapshotBehind
                            | Status::Checksum => {}
                            Status::Expired => {
                                // Reconnect with the renewed capability.
                                conns.retain(|k, _| k.0 != node);
                            }
                            Status::NotReplica | Status::Unavailable | Status::NotInSync => {
                                failed_nodes.push(node)
                            }
                            Status::StaleSnapshot => {
                                return Err(Some(FillError::LayersChanged {
                                    era: h.snapshot,
                                    now: rh.snapshot,
                                    node,
                                }))
                            }
                            status => {
                                return Err(Some(FillError::Refused {
                                    node,
                                    offset,
                                    status,
                                }))
                            }
                        }
                    }
                    Leg::Lost { closed, why: w } => {
                        all_ok = false;
                        why = format!("node {node}: {w}");
                        failed_nodes.push(node);
                        if closed {
                            let n = closes.entry(node).or_default();
                            *n += 1;
                            if *n >= OLD_NODE_CLOSES {
                                let addr = table
                                    .node(node)
                                    .map(|n| n.data_addr.clone())
                                    .unwrap_or_default();
                                return Err(Some(FillError::OldNode { node, addr }));
                            }
                        }
                    }
                }
            }
            if all_ok {
                return Ok(copied);
            }
            if newer_table {
                continue;
            }
            if !failed_nodes.is_empty() && self.refresh_route(&table, &failed_nodes, worker) {
                // The failed members' connections go with the old table.
                conns.retain(|k, _| !failed_nodes.contains(&k.0));
                continue;
            }
            std::thread::sleep(RETRY_PAUSE);
        }
    }

    /// Sends `h` on the (node, shard) connection, opening it if needed.
    fn send_fill(
        &self,
        conns: &mut HashMap<(NodeId, u16), NodeStream>,
        table: &RouteTable,
        node: NodeId,
        shard: u16,
        h: &Header,
        credential: &crate::Credential,
    ) -> Result<(), String> {
        let s = match conns.entry((node, shard)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let addr = table
                    .node(node)
                    .map(|n| n.data_addr.clone())
                    .ok_or_else(|| format!("node {node} not in the table"))?;
                let s = crate::allocation::open(
                    &addr,
                    credential,
                    shard,
                    self.shared.data_tls.as_ref(),
                )
                .map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(FILL_ANSWER_TIMEOUT))
                    .map_err(|e| e.to_string())?;
                e.insert(s)
            }
        };
        if let Err(e) = std::io::Write::write_all(s, &h.encode()) {
            conns.remove(&(node, shard));
            return Err(format!("send: {e}"));
        }
        Ok(())
    }

    /// Installs `t` if it is newer than the client's table.
    fn install_route(&self, t: RouteTable) -> bool {
        let mut newest = self.shared.table.lock().unwrap_or_else(|e| e.into_inner());
        if t.epoch > newest.epoch && t.chunk_bytes == newest.chunk_bytes {
            tracing::info!(epoch = t.epoch, "flatten: newer route table");
            *newest = Arc::new(t);
            return true;
        }
        false
    }

    /// Asks a few nodes other than `failed` for their table; true when a
    /// newer one was installed.
    fn refresh_route(&self, table: &RouteTable, failed: &[NodeId], worker: usize) -> bool {
        if self.route_table().epoch > table.epoch {
            return true; // another worker found it
        }
        let (credential, _) = self.shared.credential();
        let n = table.nodes.len();
        let mut asked = 0;
        for k in 0..n {
            let node = &table.nodes[(worker + k) % n];
            if failed.contains(&node.id) || !node.up {
                continue;
            }
            if asked == ROUTE_ASKS_MAX {
                break;
            }
            asked += 1;
            if let Ok(t) = fetch_route(
                &node.data_addr,
                &credential,
                RETRY_PAUSE * 10,
                self.shared.data_tls.as_ref(),
            ) {
                if self.install_route(t) {
                    return true;
                }
            }
        }
        false
    }
}

/// Reads the answer to request `id` on the (node, shard) connection.
fn recv_fill(
    conns: &mut HashMap<(NodeId, u16), NodeStream>,
    node: NodeId,
    shard: u16,
    id: u32,
) -> Leg {
    let Some(s) = conns.get_mut(&(node, shard)) else {
        return Leg::Lost {
            closed: false,
            why: "no connection".into(),
        };
    };
    let addr = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let leg = match read_frame(s, &addr) {
        Err(ClientError::Io { source, .. }) => Leg::Lost {
            closed: matches!(
                source.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ),
            why: source.to_string(),
        },
        Err(e) => Leg::Lost {
            closed: false,
            why: e.to_string(),
        },
        Ok((h, _)) if h.kind != Kind::Response || h.op != Op::Fill || h.request_id != id => {
            Leg::Lost {
                closed: false,
                why: format!(
                    "unexpected {:?} {:?} {} for Fill request {id}",
                    h.kind, h.op, h.request_id
                ),
            }
        }
        Ok((h, payload)) if h.status == Status::Ok => match decode_fill_answer(&payload) {
            Ok(copied) => Leg::Ok(copied),
            Err(e) => Leg::Lost {
                closed: false,
                why: e.to_string(),
            },
        },
        Ok((h, payload)) => Leg::Status(h.status, h, payload),
    };
    if matches!(leg, Leg::Lost { .. }) {
        // Whatever it still sends belongs to a request given up on.
        conns.remove(&(node, shard));
    }
    leg
}
