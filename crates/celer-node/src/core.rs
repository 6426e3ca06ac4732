//! The storage node's shard core as a library type, for drivers other than
//! the node's own threads: `celer-sim` runs real node shards over a
//! simulated network, clock and disk with it.
//!
//! A [`NodeCore`] is one shard of a one-shard node. It does nothing by
//! itself: the driver hands it connections ([`NodeCore::adopt`]), tells it
//! which are ready ([`NodeCore::ready`]) and calls [`NodeCore::turn`]
//! between waits of at most [`NodeCore::wait`], exactly what the
//! production loop (`shard/event_loop.rs`) does around epoll. What is not
//! in it: the acceptor (a driver sends the Challenge, checks the Hello with
//! `HelloProof::check` and adopts the connection), the agent, the admin
//! API and TLS.

use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use celer_engine::{Disk, Shard};
use celer_proto::auth::{Key, MacBytes, Nonce, Peer};
use celer_proto::{Header, Op};
use celer_route::{NodeId, RouteTable};

use crate::conn::Wire;
use crate::handshake::Adopted;
use crate::hub::{AgentMsg, Installed};
use crate::net::Net;
use crate::shard::{ShardConfig, ShardLoop};
use crate::{NodeError, NodeShared, ShardMsg};

/// How a [`NodeCore`] is set up.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub node: NodeId,
    /// The cluster data key (node-to-node proofs).
    pub data_key: Key,
    /// A forwarded write not answered in this long fails (`Unavailable`).
    pub forward_timeout: Duration,
}

/// What the core asks of the node's agent, which talks to the control
/// service for it (`celer-node`'s agent thread; a simulator's model of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentNote {
    /// A peer named this newer route epoch: fetch the table and install it.
    NeedRoute(u64),
    /// The backfill (or catch-up) of `partition` finished while the shard
    /// held table `epoch`: report it to the control service (`synced`).
    Synced { partition: u32, epoch: u64 },
    /// The catch-up of `partition` copies it whole instead: report it to
    /// the control service (`Heartbeat::copy_whole`); the table that
    /// records it lets the shard drop what it held and copy.
    CopyWhole { partition: u32 },
}

/// One node shard's core over its engine shard `D` and its network `N`.
pub struct NodeCore<D: Disk, N: Net> {
    inner: ShardLoop<D, N>,
    agent: Receiver<AgentMsg>,
}

impl<D: Disk, N: Net> NodeCore<D, N> {
    pub fn new(cfg: &CoreConfig, engine: Shard<D>, net: N) -> NodeCore<D, N> {
        let (tx, agent) = mpsc::channel();
        let shared = NodeShared::detached(cfg.node, cfg.data_key);
        *shared.agent.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        let shared = Arc::new(shared);
        let scfg = ShardConfig {
            forward_timeout: cfg.forward_timeout,
            busy_poll: Duration::ZERO,
            idle_timeout: None,
            scrub_bytes_per_sec: 0,
            scrub_interval: Duration::from_secs(3600),
            hugepages: false,
        };
        NodeCore {
            inner: ShardLoop::new(engine, shared, scfg, net),
            agent,
        }
    }

    /// Drops the restart floor (`celer_engine::Shard::restart_floor`): the
    /// core then applies a client's resent write older than a discard its
    /// engine applied before the restart. Only to show that the simulator
    /// finds the bug the floor fixes; a node never runs without it.
    #[doc(hidden)]
    pub fn without_restart_floor(&mut self) {
        self.inner.drop_restart_floor();
    }

    /// Lets a client write with a fence generation older than the
    /// volume's: the core then applies a taken-over writer's writes. Only
    /// to show that the simulator finds what the fence check prevents; a
    /// node never runs without it.
    #[doc(hidden)]
    pub fn without_fence_check(&mut self) {
        self.inner.drop_fence_check();
    }

    /// The control service renewed the node's lease (a registration or a
    /// heartbeat answered): the core serves until `until`
    /// (`celer_meta_api::api::node_serves_for` after the request was
    /// sent), then answers `Unavailable` until the next renewal.
    pub fn renew_lease(&mut self, until: Instant) {
        self.inner.on_msg(ShardMsg::Lease(until));
    }

    /// Raises volume fence generations (volume, generation), as the agent
    /// does with those of a registration or heartbeat reply.
    pub fn set_fences(&mut self, fences: Vec<(u64, u32)>) {
        self.inner.on_msg(ShardMsg::Fences(Arc::new(fences), None));
    }

    /// Raises volume fence generations as the control service's push
    /// does (`PUT /v1/fences`): the shard's id arrives on the receiver
    /// once the core refuses older generations and none of their writes
    /// it accepted is still in flight (the push's answer).
    pub fn push_fences(&mut self, fences: Vec<(u64, u32)>) -> Receiver<u16> {
        let (tx, rx) = mpsc::channel();
        self.inner
            .on_msg(ShardMsg::Fences(Arc::new(fences), Some(tx)));
        rx
    }

    /// Installs a route table (as a push from the control service does).
    pub fn install_route(&mut self, table: RouteTable) {
        let inst = Arc::new(Installed {
            encoded: table.encode(),
            table,
        });
        self.inner.on_msg(ShardMsg::Route(inst));
    }

    /// The epoch of the route table the core serves (0: none yet).
    pub fn route_epoch(&self) -> u64 {
        self.inner.route_epoch()
    }

    /// What the core asked of its agent since the last call, in order.
    pub fn agent_notes(&mut self) -> Vec<AgentNote> {
        let mut out = Vec::new();
        while let Ok(m) = self.agent.try_recv() {
            match m {
                AgentMsg::NeedRoute(e) => out.push(AgentNote::NeedRoute(e)),
                AgentMsg::Synced { partition, epoch } => {
                    out.push(AgentNote::Synced { partition, epoch })
                }
                AgentMsg::CopyWhole { partition } => out.push(AgentNote::CopyWhole { partition }),
                AgentMsg::Stop => {}
            }
        }
        out
    }

    /// The control service refused a `Synced` report for `partitions`
    /// (this node rejoined them after `epoch`): copy them again, as the
    /// agent has the shards do.
    pub fn backfill_again(&mut self, epoch: u64, partitions: Vec<u32>) {
        self.inner
            .on_msg(ShardMsg::BackfillAgain(epoch, partitions));
    }

    /// Takes a connection whose Hello the driver checked, as the node's
    /// acceptor does (`celer_proto::auth::HelloProof::check`): `peer` is
    /// who it proved to be, `node_nonce` the Challenge's nonce and `answer`
    /// the node's proof (`HelloProof::answer`). The shard answers the Hello
    /// and serves the connection.
    pub fn adopt(
        &mut self,
        stream: N::Stream,
        hello: Header,
        peer: Peer,
        node_nonce: Nonce,
        answer: MacBytes,
    ) {
        debug_assert_eq!(hello.op, Op::Hello);
        self.inner.adopt(
            stream,
            Adopted {
                wire: Wire::Plain,
                hello,
                peer,
                node_nonce,
                answer,
                ticket: None,
            },
        );
    }

    /// One turn's work; whether the engine did anything.
    pub fn turn(&mut self) -> bool {
        self.inner.turn()
    }

    /// The longest the driver may wait for input before the next turn.
    pub fn wait(&self) -> Duration {
        Duration::from_millis(self.inner.wait_ms().max(0) as u64)
    }

    /// Input arrives: the time of what [`NodeCore::ready`] reports next.
    pub fn woke(&mut self) {
        self.inner.woke();
    }

    /// Connection `c` (the index the core gave its `Net::watch`) is
    /// readable (or closed) and/or writable.
    pub fn ready(&mut self, c: usize, readable: bool, writable: bool) {
        self.inner.on_ready(c, readable, writable);
    }

    pub fn net(&self) -> &N {
        self.inner.net()
    }

    pub fn net_mut(&mut self) -> &mut N {
        self.inner.net_mut()
    }

    /// Connections the core closed because the peer broke the protocol (a
    /// corrupt frame, a frame out of turn, a failed node proof).
    pub fn protocol_errors(&self) -> u64 {
        self.inner.protocol_errors()
    }

    /// Requests in the engine.
    pub fn engine_inflight(&self) -> usize {
        self.inner.engine_inflight()
    }

    /// A clean stop: the engine finishes what it has and checkpoints.
    pub fn close(self) -> Result<(), NodeError> {
        self.inner.finish()
    }
}
