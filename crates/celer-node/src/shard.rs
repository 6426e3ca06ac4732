//! One node shard: a thread that owns an engine shard, its connections and
//! its partitions, and runs everything to completion in one epoll loop.
//!
//! Per loop turn: read every readable socket and handle whole frames
//! (submitting engine requests and forwards), let the engine submit and
//! reap, send responses, check forward timeouts, advance backfill, then
//! sleep in epoll (or keep polling for `busy_poll` after activity).

use std::collections::HashMap;
use std::net::ToSocketAddrs;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use celer_engine::{
    AlignedBuf, BlockKind, BufPool, Completion, Disk, EngineError, EngineOp, EngineRequest,
    Segment, Shard, BLOCK_SIZE,
};

mod backfill;
mod catch_up;
mod conns;
mod event_loop;
mod fill;
mod forward;
mod layers;
mod repair;
mod requests;
mod route;
use catch_up::{catch_up_ranges, CatchUp};
use celer_proto::auth::{Credential, HelloProof, Peer, NONCE_BYTES};
use celer_proto::payload::{self, BlockKind as WireBlockKind};
use celer_proto::{
    clock_limit_at, version_clock, version_writer, Header, Kind, Op, Status, FLAG_CATCH_UP,
    FLAG_SECTORS, FLAG_SINCE, FLAG_STATES_ONLY, SECTOR_BYTES,
};
use celer_route::NodeId;
pub(crate) use repair::RepairResult;
use repair::{Repair, REQ_REPAIR, TAG_REPAIR};
mod scrub;
pub(crate) use event_loop::run;
use scrub::{Scrub, REQ_COMPARE, TAG_SCRUB};
pub(crate) use scrub::{ScrubCell, ScrubShared};

use crate::conn::{Conn, ConnAuth, Frame, Next, Wire, SEND_HIGH_BYTES, SEND_LOW_BYTES};
use crate::handshake::{Adopted, ConnTicket};
use crate::metrics::ShardCounters;
use crate::net::Net;
use crate::{AgentMsg, BackfillProgress, Installed, NodeError, NodeShared, ShardMsg};

pub(crate) struct ShardConfig {
    pub(crate) forward_timeout: Duration,
    pub(crate) busy_poll: Duration,
    pub(crate) idle_timeout: Option<Duration>,
    /// This shard's share of the node's scrub rate (0: off).
    pub(crate) scrub_bytes_per_sec: u64,
    pub(crate) scrub_interval: Duration,
    /// Request buffers on huge pages if the kernel has them.
    pub(crate) hugepages: bool,
}

/// Engine tags at or above this are backfill writes.
const TAG_BACKFILL: u64 = 1 << 40;
/// Engine tags at or above this (and below TAG_BACKFILL) release chunks this
/// node no longer holds for the cluster.
const TAG_PURGE: u64 = 1 << 39;
/// A release of a chunk held from before a partition was joined.
const TAG_JOIN_RELEASE: u64 = TAG_PURGE | 1;
/// How long a member back from down holds the partition's writes while it
/// waits for its source to say whether it recorded what it missed.
const CATCH_UP_ANSWER_WAIT: Duration = Duration::from_secs(2);
/// Chunk releases in flight per shard: one, so freeing space never crowds
/// out client I/O.
const PURGE_INFLIGHT_MAX: usize = 1;
/// Rescans after a purge list ran out: chunks written just before the
/// volume was deleted or the partition left (a late write) are found too.
const PURGE_RESCANS: u32 = 5;
/// Request ids with this bit are the backfill's own requests.
const REQ_BACKFILL: u32 = 1 << 31;
/// Generations of an op slot wrap below this, so a forward's request id
/// (`gen << 16 | slot`) never has the bits of backfill or repair requests
/// (`REQ_BACKFILL`, `REQ_REPAIR`) set.
const OP_GEN_MASK: u16 = 0x3fff;
/// Ops kept for client requests; the engine has a few more for backfill.
const CLIENT_OPS: usize = 224;
const BACKFILL_WRITES_MAX: usize = 16;
/// ListChunks in flight per shard: every queued backfill is listed soon
/// after a route change (so its bytes are known), without a burst of list
/// requests on the sources.
const BACKFILL_LISTS_MAX: usize = 4;
/// A backfill request not answered in this long is sent again (a silent
/// source must not hold a list slot for good).
const BACKFILL_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest BackfillRead piece.
const BACKFILL_PIECE_BYTES: u64 = 1 << 20;
/// Receive-buffer room a shard lends to connections receiving frames
/// larger than `conn::RBUF_INITIAL` (large writes). A connection that needs
/// room the budget lacks waits, not read, until some is given back.
const RBUF_BUDGET_BYTES: usize = 64 << 20;
/// Requests of one connection served at once: one peer cannot take every op
/// (and its buffer) of the shard.
const CONN_OPS_MAX: usize = 64;
/// Requests whose buffer is larger than this are large: their buffers
/// count against `OP_LARGE_BUDGET_BYTES`.
const OP_LARGE_BYTES: usize = 256 << 10;
/// Bytes of large requests a shard serves at once (a large request that
/// does not fit waits), and of large op buffers it keeps between requests
/// (above it, a finished op gives its buffer back). So a peer asking for
/// 4 MiB reads it never takes cannot make the shard hold 224 × 4 MiB.
const OP_LARGE_BUDGET_BYTES: usize = 32 << 20;
/// A frame whose header arrived must be whole within this (a peer that
/// announces a large payload and trickles it is cut).
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum OpKind {
    Read,
    /// Write, WriteZeroes, Discard applied locally.
    Mutate,
    /// WritePrimary: local write plus forwards.
    Primary,
    /// Serving a backfill read: state table then data.
    BackfillServe,
    /// A fill (flatten): the head copies what it reads from under it.
    Fill,
}

struct NodeOp {
    busy: bool,
    gen: u16,
    kind: OpKind,
    conn: usize,
    conn_gen: u32,
    req: Header,
    buf: AlignedBuf,
    /// Bytes of `buf` the response carries.
    len: usize,
    /// A read of sectors: where in `buf` (whole blocks) the requested range
    /// starts.
    at: usize,
    /// Engine request + forwards not yet answered.
    pending: u32,
    status: Status,
    /// Forwards in flight: (conn, conn gen).
    forwards: [(usize, u32); 8],
    nforwards: usize,
    deadline: Option<Instant>,
    started: Instant,
    /// When its engine request was submitted (`celer_node_engine_seconds`).
    engine_at: Instant,
    /// A member (this node or a forward) holds a newer version than the
    /// write's: the highest such (answered with `OlderVersion`).
    newer: u64,
    /// A fill: the blocks it copied (its answer's payload).
    copied: u32,
}

/// One partition this shard backfills. Every queued backfill is listed
/// early (`List` → `Waiting` → `Read`), then they copy one at a time, the
/// first in `ShardLoop::backfills` (`Read` → `Waiting` → `Apply` → `Read`...).
struct Backfill {
    /// Tags its engine writes, so a restarted backfill ignores old ones.
    serial: u32,
    partition: u32,
    /// The epoch it started in (reported when done): this node has been a
    /// syncing member since then, unless the control service knows better.
    epoch: u64,
    source: NodeId,
    conn: Option<(usize, u32)>,
    /// Ask the source for only what this member missed while it was down
    /// (`FLAG_CATCH_UP`); cleared when the source did not record it all.
    catch_up: bool,
    /// What to copy: (volume, byte offset, bytes), within one chunk each:
    /// whole chunks, or the runs of blocks written while we were down.
    ranges: Vec<(u64, u64, u64)>,
    next_range: usize,
    /// Offset within the current range of the next piece.
    piece: u64,
    stage: BfStage,
    retry_at: Option<Instant>,
    /// The request it waits for (from the shard-wide `backfill_seq`, so a
    /// response finds its backfill among several in flight).
    seq: u32,
    /// When that request went out.
    sent_at: Instant,
    buf: AlignedBuf,
    states: Vec<(BlockKind, u64)>,
    writes_pending: usize,
    /// Runs of the current piece still to submit: (first block, count).
    runs: Vec<(usize, usize, BlockKind, u64)>,
    next_run: usize,
    /// Length of the piece being read or applied.
    piece_len: u64,
    /// A write of the current piece failed: read and apply it again.
    piece_failed: bool,
    started: Instant,
    /// Bytes of the ranges listed (less those of volumes deleted since);
    /// `None` until the source's list came back.
    bytes_total: Option<u64>,
    /// Bytes of pieces written (all their runs done).
    bytes_done: u64,
}

impl Backfill {
    /// Back to `stage`, not before `after` from now (a refused or malformed
    /// answer, a failed write).
    fn retry(&mut self, stage: BfStage, after: Duration, now: Instant) {
        self.stage = stage;
        self.retry_at = Some(now + after);
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum BfStage {
    List,
    /// Waiting for the answer to request `seq`.
    Waiting,
    /// Listed: reads the next piece when its turn comes.
    Read,
    Apply,
}

/// A fence install (volume, generation pairs) and where to answer once
/// the older generations' mutations are done.
type FenceWait = (Arc<Vec<(u64, u32)>>, Sender<u16>);

/// A node shard's core: everything but the thread's loop (`event_loop.rs`
/// in production, `celer-sim` in the simulator). `D`: the engine's disk;
/// `N`: sockets, readiness and the clock (see `crate::net`).
pub(crate) struct ShardLoop<D: Disk, N: Net> {
    id: u16,
    engine: Shard<D>,
    shared: Arc<NodeShared>,
    cfg: ShardConfig,
    net: N,
    conns: Vec<Option<Conn<N::Stream>>>,
    free_conns: Vec<usize>,
    conn_gen: u32,
    peers: HashMap<(NodeId, u16), usize>,
    ops: Vec<NodeOp>,
    free_ops: Vec<usize>,
    route: Option<Arc<Installed>>,
    /// Per volume, the highest write version accepted or stored here.
    versions: HashMap<u64, u64>,
    /// The engine shard's discard floor at open, and until when client
    /// mutations at or below it are refused as older (see
    /// `Shard::restart_floor`): a late write resent after a restart must
    /// not undo a discard the engine acknowledged before it.
    restart_floor: Option<(u64, Instant)>,
    /// Per volume, the fence generation: mutations of older ones are
    /// refused (`Fenced`). Raised, never lowered (see `set_fences`).
    fences: HashMap<u64, u32>,
    /// Off only in a simulation that shows what the check prevents
    /// (`NodeCore::without_fence_check`).
    fence_check: bool,
    /// Until when the control service's lease lets this node serve: the
    /// service marks a node down (and acknowledges writes without it) only
    /// once its lease expired, so a node cut off from the service stops
    /// serving first, and no client that has not learned of the newer
    /// table reads an older block from it. `None`: no lease (a node
    /// without a control service, or before one was given: a node with a
    /// service is handed the lease of its registration before its shards
    /// start).
    lease_until: Option<Instant>,
    /// Fence installs that wait for older-generation mutations in flight.
    fence_waits: Vec<FenceWait>,
    /// Layered volumes (snapshots, clones): see `layers.rs`.
    layers: HashMap<u64, Arc<layers::Layered>>,
    /// Deleted snapshots' era keys still read through, and the key of the
    /// era above each (see `layers::shadowed`).
    trims: HashMap<u64, u64>,
    /// Layer installs that wait for writes to eras no longer accepted.
    layer_waits: Vec<(Arc<Vec<celer_meta_api::api::VolumeLayers>>, Sender<u16>)>,
    /// Receive-buffer room lent to connections (see RBUF_BUDGET_BYTES).
    rbuf_lent: usize,
    /// Connections waiting for room.
    starved: Vec<usize>,
    /// Bytes of large requests being served (see OP_LARGE_BUDGET_BYTES).
    large_inflight: usize,
    /// Bytes of large op buffers allocated (busy or idle).
    large_kept: usize,
    /// Connections with unprocessed frames (stalled for lack of ops).
    backlog: Vec<usize>,
    /// Connections with output to send.
    dirty: Vec<usize>,
    forwards_inflight: usize,
    /// When epoll_wait last returned: the input time of the connections it
    /// reported (the idle timeout), one clock read per wake-up rather than
    /// one per readable connection.
    woke_at: Instant,
    /// When the timeouts were last checked (every 5 ms).
    last_timer: Instant,
    backfills: Vec<Backfill>,
    /// Dropped backfills whose engine writes are still in flight: their
    /// buffers must outlive those writes.
    retired: Vec<Backfill>,
    /// Landing buffers of closed connections, for the next ones.
    landings: Vec<AlignedBuf>,
    backfill_serial: u32,
    /// Request ids of backfill requests (with `REQ_BACKFILL`).
    backfill_seq: u32,
    /// Bytes of backfills finished in the rebalance under way (until the
    /// route table has no syncing member): they stay in the figures.
    round_bytes: u64,
    /// Bytes ever backfilled (every piece written).
    copied_bytes: u64,
    completions: Vec<Completion>,
    /// Partitions whose backfill finished and was reported: (epoch, bytes).
    reported: HashMap<u32, (u64, u64)>,
    counters: ShardCounters,
    pub(crate) stopping: bool,
    /// Deleted volumes (sorted): their I/O is refused.
    deleted: Arc<Vec<u64>>,
    /// Chunks to release (deleted volumes, partitions that moved away), and
    /// releases in flight.
    purge: Vec<(u64, u64)>,
    purging: usize,
    /// Partitions this shard just joined as a new member copying them
    /// whole, and the chunks it held of them from before (stale: the
    /// partition went on without it), released before the partition's
    /// writes and its backfill start here (`join_release_step`).
    joining: Vec<u32>,
    join_release: Vec<StaleRange>,
    /// Of them, releases submitted and not completed.
    join_inflight: usize,
    /// The blocks this shard took a write of as a syncing member since it
    /// last joined or came back to their partition, per (engine key,
    /// chunk), one bit per block: a catch-up that falls back to a full copy
    /// forgets every other block it holds of the partition (they may be
    /// stale) and keeps these (see `release_partition`). Kept for the
    /// partitions this shard syncs only.
    took_writes: HashMap<(u64, u64), Vec<u64>>,
    /// Rescans left (see PURGE_RESCANS).
    purge_rescans: u32,
    /// Damaged blocks being repaired from another member (see `repair`).
    repairs: Vec<Repair>,
    /// Blocks found unrepairable lately: (volume, offset, quiet until).
    unrepairable: Vec<(u64, u64, Instant)>,
    repair_serial: u32,
    repair_seq: u32,
    scrub: Scrub,
    compare_seq: u32,
    /// What down members of our partitions miss (see `catch_up`).
    catch_ups: Vec<CatchUp>,
}

/// What a member about to copy a partition whole drops first: (engine
/// key, chunk, blocks), where `None` releases the chunk and `Some((first,
/// count))` forgets those blocks of it (`release_partition`).
type StaleRange = (u64, u64, Option<(u16, u16)>);

/// The op buffer a request needs if it is large (see OP_LARGE_BYTES), else 0.
fn large_bytes(h: &Header) -> usize {
    let bytes = match h.op {
        // A read of sectors reads the whole blocks around them.
        Op::Read => {
            (h.offset as usize % BLOCK_SIZE + h.length as usize).next_multiple_of(BLOCK_SIZE)
        }
        Op::Write | Op::WritePrimary | Op::Fill => h.length as usize,
        // State table and data.
        Op::BackfillRead => {
            h.length as usize + h.length as usize / BLOCK_SIZE * payload::STATE_BYTES
        }
        _ => 0,
    };
    if bytes > OP_LARGE_BYTES {
        bytes
    } else {
        0
    }
}

fn engine_status(e: &EngineError) -> Status {
    match e {
        EngineError::Misaligned { .. } | EngineError::BadRange { .. } => Status::Invalid,
        EngineError::TooManySegments { .. } | EngineError::WrongShard { .. } => Status::Invalid,
        EngineError::QueueFull { .. } => Status::Busy,
        EngineError::NoSpace { .. } => Status::NoSpace,
        EngineError::Checksum { .. } => Status::Checksum,
        _ => Status::Io,
    }
}

impl<D: Disk, N: Net> ShardLoop<D, N> {
    fn table(&self) -> Option<&celer_route::RouteTable> {
        self.route.as_ref().map(|r| &r.table)
    }

    /// The epoch of the table this shard serves (0: none yet).
    pub(crate) fn route_epoch(&self) -> u64 {
        self.table().map_or(0, |t| t.epoch)
    }

    /// The highest write version this shard knows for `volume`.
    fn fence_of(&self, volume: u64) -> u32 {
        self.fences.get(&volume).copied().unwrap_or(0)
    }

    /// Raises fence generations (see `ShardMsg::Fences`); with `reply`,
    /// answers once no accepted mutation of an older one is in flight.
    fn set_fences(&mut self, fences: Arc<Vec<(u64, u32)>>, reply: Option<Sender<u16>>) {
        for &(volume, fence) in fences.iter() {
            if fence > self.fence_of(volume) {
                tracing::info!(shard = self.id, volume, fence, "fence generation raised");
                self.fences.insert(volume, fence);
            }
        }
        if let Some(reply) = reply {
            self.fence_waits.push((fences, reply));
            self.answer_fence_waits();
        }
    }

    /// Answers the fence installs whose older-generation mutations are all
    /// done. A few entries at most, and only while a take-over is under way.
    fn answer_fence_waits(&mut self) {
        let ops = &self.ops;
        let id = self.id;
        self.fence_waits.retain(|(fences, reply)| {
            let busy = ops.iter().any(|op| {
                op.busy
                    && matches!(op.kind, OpKind::Mutate | OpKind::Primary)
                    && fences
                        .iter()
                        .any(|&(v, f)| op.req.volume == v && op.req.fence < f)
            });
            if !busy {
                let _ = reply.send(id);
            }
            busy
        });
    }

    fn volume_version(&self, volume: u64) -> u64 {
        self.versions.get(&volume).copied().unwrap_or(0)
    }

    fn respond(&mut self, c: usize, req: &Header, status: Status, payload: &[&[u8]]) {
        let version = self.volume_version(req.volume);
        self.respond_naming(c, req, status, version, payload);
    }

    /// `respond`, naming `version` instead of the volume's highest (an
    /// `OlderVersion` names the version that refused the write).
    fn respond_naming(
        &mut self,
        c: usize,
        req: &Header,
        status: Status,
        version: u64,
        payload: &[&[u8]],
    ) {
        let mut h = Header::response_to(req, status);
        h.version = version;
        h.snapshot = self.head_era(req.volume);
        if let Some(conn) = self.conns[c].as_mut() {
            conn.queue(h, payload);
        }
        self.mark_dirty(c);
    }

    /// Checks the sender's epoch and that this node serves the partition.
    /// On success: the partition, whether this node is an in-sync member,
    /// and whether it is the primary. Allocates nothing.
    fn check_route(&mut self, h: &Header) -> Result<(u32, bool, bool), Status> {
        self.check_lease()?;
        let Some(t) = self.table() else {
            self.shared.tell_agent(AgentMsg::NeedRoute(h.epoch));
            return Err(Status::RouteBehind);
        };
        if h.epoch < t.epoch {
            return Err(Status::StaleEpoch);
        }
        if h.epoch > t.epoch {
            self.shared.tell_agent(AgentMsg::NeedRoute(h.epoch));
            return Err(Status::RouteBehind);
        }
        if self.deleted.binary_search(&h.volume).is_ok() {
            return Err(Status::Invalid);
        }
        let chunk_bytes = t.chunk_bytes;
        let len = h.length as u64;
        if len == 0 || h.offset % chunk_bytes + len > chunk_bytes {
            return Err(Status::Invalid);
        }
        let p = t.partition_at(self.placement_volume(h.volume), h.offset);
        if p % self.shared.shards as u32 != self.id as u32 {
            return Err(Status::Invalid);
        }
        let part = t.partition(p).ok_or(Status::Invalid)?;
        let Some(me) = part.member(self.shared.id) else {
            return Err(Status::NotReplica);
        };
        Ok((p, me.in_sync, part.primary() == Some(self.shared.id)))
    }

    /// `Unavailable` once the control service's lease ran out (the client
    /// asks for routes and tries another member, or waits).
    fn check_lease(&self) -> Result<(), Status> {
        match self.lease_until {
            Some(until) if self.net.now() >= until => Err(Status::Unavailable),
            _ => Ok(()),
        }
    }

    /// A renewal from the control service (`ShardMsg::Lease`); the agent
    /// logs an expiry and the renewal after it, once for all shards.
    fn renew_lease(&mut self, until: Instant) {
        if self.lease_until.is_none_or(|u| until > u) {
            self.lease_until = Some(until);
        }
    }

    fn reject(&mut self, c: usize, req: &Header, status: Status) {
        if status == Status::StaleEpoch {
            if let Some(r) = self.route.clone() {
                self.respond(c, req, status, &[&r.encoded]);
                return;
            }
        }
        self.respond(c, req, status, &[]);
    }

    /// What the connection's credential allows: a node, everything; a
    /// client, its capability's volume only, writes only with a read-write
    /// capability and a version naming its attachment, no node-only op.
    fn authorize(&self, c: usize, h: &Header) -> Result<(), Status> {
        let Some(conn) = self.conns[c].as_ref() else {
            return Err(Status::Unauthorized);
        };
        let cap = match &conn.auth {
            ConnAuth::Node => {
                return match h.op {
                    Op::Hello | Op::Challenge | Op::Renew => Err(Status::Invalid),
                    _ => Ok(()),
                }
            }
            ConnAuth::Attachment { cap, .. } => cap,
            _ => return Err(Status::Unauthorized),
        };
        match h.op {
            Op::Ping | Op::Flush | Op::RouteTable | Op::Renew => return Ok(()),
            // ListChunks from a client: its own volume's chunks only (see
            // serve_list_chunks), for the NBD front end's block status.
            // Fill: the volume reads the same after it (a read-only
            // capability may send it, and it is not fenced).
            Op::Read
            | Op::ListChunks
            | Op::Fill
            | Op::Write
            | Op::WritePrimary
            | Op::WriteZeroes
            | Op::Discard => {}
            Op::BackfillRead | Op::Hello | Op::Challenge => return Err(Status::Unauthorized),
        }
        if h.volume != cap.volume {
            return Err(Status::Unauthorized);
        }
        if self.net.unix_ms() >= cap.expires_unix_ms {
            return Err(Status::Expired);
        }
        if !matches!(h.op, Op::Read | Op::ListChunks | Op::Fill) {
            if cap.read_only {
                return Err(Status::ReadOnly);
            }
            if h.attachment != cap.attachment
                || version_writer(h.version) != cap.attachment as u16
                || h.fence != cap.fence
            {
                return Err(Status::Unauthorized);
            }
        }
        Ok(())
    }

    /// `Renew`: a newer capability for the connection, proven like the
    /// Hello; the same volume and attachment only.
    fn renew(&mut self, c: usize, f: &Frame) {
        let h = f.header;
        let Some(conn) = self.conns[c].as_ref() else {
            return;
        };
        let ConnAuth::Attachment {
            cap,
            node_nonce,
            shard,
            sender,
        } = &conn.auth
        else {
            return self.respond(c, &h, Status::Unauthorized, &[]);
        };
        let checked = HelloProof::check(
            conn.payload(f),
            &self.shared.data_key,
            node_nonce,
            *shard,
            *sender,
            true,
            self.net.unix_ms(),
        );
        let status = match checked {
            Ok((Peer::Attachment(new), _))
                if new.volume == cap.volume && new.attachment == cap.attachment =>
            {
                if let Some(ConnAuth::Attachment { cap, .. }) =
                    self.conns[c].as_mut().map(|x| &mut x.auth)
                {
                    *cap = new;
                }
                Status::Ok
            }
            Ok(_) => Status::Unauthorized,
            Err(celer_proto::auth::AuthError::Expired { .. }) => Status::Expired,
            Err(e) => {
                tracing::warn!(shard = self.id, "capability renewal refused: {e}");
                Status::Unauthorized
            }
        };
        self.respond(c, &h, status, &[]);
    }

    fn on_request(&mut self, c: usize, f: &Frame) {
        let h = f.header;
        if let Err(s) = self.authorize(c, &h) {
            return self.respond(c, &h, s, &[]);
        }
        match h.op {
            Op::Hello | Op::Challenge => self.respond(c, &h, Status::Invalid, &[]),
            Op::Renew => self.renew(c, f),
            Op::Ping | Op::Flush => self.respond(c, &h, Status::Ok, &[]),
            Op::RouteTable => match self.table().map(|t| t.epoch) {
                Some(e) if h.epoch < e => self.reject(c, &h, Status::StaleEpoch),
                Some(e) if h.epoch == e => self.respond(c, &h, Status::Ok, &[]),
                _ => {
                    self.shared.tell_agent(AgentMsg::NeedRoute(h.epoch));
                    self.respond(c, &h, Status::RouteBehind, &[]);
                }
            },
            Op::ListChunks => self.serve_list_chunks(c, &h),
            Op::Read => self.start_read(c, &h, OpKind::Read),
            Op::BackfillRead => self.start_read(c, &h, OpKind::BackfillServe),
            Op::Write | Op::WritePrimary | Op::WriteZeroes | Op::Discard => {
                self.start_mutation(c, f)
            }
            Op::Fill => self.start_fill(c, &h),
        }
    }

    fn check_timeouts(&mut self, now: Instant) {
        for c in 0..self.conns.len() {
            let late = self.conns[c].as_ref().is_some_and(|x| {
                x.partial_since
                    .is_some_and(|t| now.duration_since(t) > FRAME_TIMEOUT)
            });
            if late {
                self.close_conn(
                    c,
                    &format!("a frame was not received whole within {FRAME_TIMEOUT:?}"),
                );
            }
            // Attachments only: node connections are few and their ends
            // reconnect on their own. A connection we stopped reading
            // (blocked sending, starved of buffer room) is not idle.
            let idle = self.cfg.idle_timeout.filter(|&idle| {
                self.conns[c].as_ref().is_some_and(|x| {
                    matches!(x.auth, ConnAuth::Attachment { .. })
                        && x.ops == 0
                        && x.unsent() == 0
                        && !x.send_blocked
                        && !x.starved
                        && now.duration_since(x.last_input) > idle
                })
            });
            if let Some(idle) = idle {
                self.counters.idle_closed();
                self.close_conn(c, &format!("sent nothing for {idle:?} (idle timeout)"));
            }
        }
        if self.forwards_inflight > 0 {
            for id in 0..self.ops.len() {
                let op = &self.ops[id];
                if op.busy && op.deadline.is_some_and(|d| d <= now) {
                    tracing::warn!(
                        shard = self.id,
                        "forwarded write not answered in {:?}: Unavailable",
                        self.cfg.forward_timeout
                    );
                    // Close the silent connections: late answers are dropped.
                    let conns: Vec<usize> =
                        op.forwards[..op.nforwards].iter().map(|f| f.0).collect();
                    for c in conns {
                        self.close_conn(c, "forwarded write timed out");
                    }
                }
            }
        }
        for b in &mut self.backfills {
            if b.retry_at.is_some_and(|t| t <= now) {
                b.retry_at = None;
            }
            if b.stage == BfStage::Waiting
                && now.duration_since(b.sent_at) > BACKFILL_ANSWER_TIMEOUT
            {
                // Sent again with a new id: a late answer is ignored.
                tracing::warn!(
                    shard = self.id,
                    partition = b.partition,
                    "backfill request not answered in {BACKFILL_ANSWER_TIMEOUT:?}; sending it again"
                );
                b.stage = if b.bytes_total.is_none() {
                    BfStage::List
                } else {
                    BfStage::Read
                };
            }
        }
    }

    /// Whether writes of an epoch older than `epoch` are in flight here.
    fn older_writes_in_flight(&self, epoch: u64) -> bool {
        self.ops.iter().any(|o| {
            o.busy
                && matches!(o.kind, OpKind::Mutate | OpKind::Primary | OpKind::Fill)
                && o.req.epoch < epoch
        })
    }
}

/// An engine block kind as the answers' state tables carry it (see
/// `celer_proto::payload`).
fn wire_kind(kind: BlockKind) -> WireBlockKind {
    match kind {
        BlockKind::Unwritten => WireBlockKind::Unwritten,
        BlockKind::Data => WireBlockKind::Data,
        BlockKind::Zero => WireBlockKind::Zero,
    }
}

/// A block kind received in a state table as the engine's.
fn engine_kind(kind: WireBlockKind) -> BlockKind {
    match kind {
        WireBlockKind::Unwritten => BlockKind::Unwritten,
        WireBlockKind::Data => BlockKind::Data,
        WireBlockKind::Zero => BlockKind::Zero,
    }
}

/// Sets, in `bits` (one per block of a chunk of `chunk_bytes`), the whole
/// blocks around the `len` bytes at `offset` (within one chunk). For the
/// per-block records of a catch-up and of `took_writes`.
fn mark_blocks(bits: &mut [u64], chunk_bytes: u64, offset: u64, len: u64) {
    let blocks = (chunk_bytes / BLOCK_SIZE as u64) as usize;
    let first = ((offset % chunk_bytes) / BLOCK_SIZE as u64) as usize;
    let last = ((offset % chunk_bytes + len.max(1) - 1) / BLOCK_SIZE as u64) as usize;
    for b in first..=last.min(blocks - 1) {
        bits[b / 64] |= 1 << (b % 64);
    }
}

/// The next generation of an op slot (see `OP_GEN_MASK`).
fn next_op_gen(gen: u16) -> u16 {
    gen.wrapping_add(1) & OP_GEN_MASK
}

fn new_backfill(serial: u32, partition: u32, epoch: u64, source: NodeId, now: Instant) -> Backfill {
    Backfill {
        serial,
        partition,
        epoch,
        source,
        conn: None,
        catch_up: false,
        ranges: Vec::new(),
        next_range: 0,
        piece: 0,
        stage: BfStage::List,
        retry_at: None,
        seq: 0,
        sent_at: now,
        buf: AlignedBuf::new(1),
        states: Vec::new(),
        writes_pending: 0,
        runs: Vec::new(),
        next_run: 0,
        piece_len: 0,
        piece_failed: false,
        started: now,
        bytes_total: None,
        bytes_done: 0,
    }
}

/// Partition `p` of `t` is healthy without `me`: every member in sync and
/// up, as many as the replicas, `me` not among them. Our copy, if any,
/// serves no one. (A partition whose copies are all down keeps its members
/// in the table: it is not healthy, and an old copy here is left alone.)
fn left_for_good(t: &celer_route::RouteTable, p: u32, me: NodeId) -> bool {
    t.partition(p).is_some_and(|r| {
        r.member(me).is_none()
            && r.members.len() >= t.replicas as usize
            && r.members
                .iter()
                .all(|m| m.in_sync && t.node(m.node).is_some_and(|n| n.up))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine's kinds travel as the bytes they always did (their
    /// discriminants) and come back as themselves.
    #[test]
    fn block_kinds_keep_their_bytes() {
        for k in [BlockKind::Unwritten, BlockKind::Data, BlockKind::Zero] {
            assert_eq!(wire_kind(k) as u8, k as u8);
            assert_eq!(engine_kind(wire_kind(k)), k);
        }
    }

    /// A forward's request id never looks like a backfill's or a repair's,
    /// whatever the op slot's generation: with plain 16-bit generations,
    /// every answer to a forward from a slot past 32767 uses went to the
    /// backfill code and the large write timed out.
    #[test]
    fn forward_request_ids_never_carry_backfill_bits() {
        let mut gen = 0u16;
        for _ in 0..200_000 {
            gen = next_op_gen(gen);
            let id = ((gen as u32) << 16) | (CLIENT_OPS as u32 - 1);
            assert_eq!(id & REQ_BACKFILL, 0, "gen {gen}");
            assert_eq!(id & REQ_REPAIR, 0, "gen {gen}");
            assert_eq!((id >> 16) as u16, gen, "the gen comes back out");
        }
    }
}
