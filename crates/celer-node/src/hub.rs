//! Messages to the shard threads, and the route hub that hands route
//! tables, fences and layers to them. Control path only.

use std::time::Instant;

use super::*;

/// A route table as shards hold it, with its encoded form ready to hand out.
pub(crate) struct Installed {
    pub(crate) table: RouteTable,
    pub(crate) encoded: Vec<u8>,
}

pub(crate) enum ShardMsg {
    /// An authenticated connection whose Hello named this shard.
    Conn(Box<handshake::Handshaken>),
    Route(Arc<Installed>),
    /// Deleted volumes (sorted): free their chunks, refuse their I/O.
    Deleted(Arc<Vec<u64>>),
    /// Partitions whose finished backfill was reported for this epoch, from
    /// before the node rejoined them (the control service said so): copy
    /// again.
    BackfillAgain(u64, Vec<u32>),
    /// Volume fence generations (volume, generation): a shard raises its
    /// own to them (never lowers) and refuses mutations of older ones; with
    /// a sender, it answers its id once no mutation of an older generation
    /// it accepted is still in flight (see `RouteHub::set_fences`).
    Fences(Arc<Vec<(u64, u32)>>, Option<Sender<u16>>),
    /// Volume layers (snapshots, clones): a shard installs the newer ones;
    /// with a sender, it answers its id once no accepted write to an era
    /// they no longer accept is in flight (see `RouteHub::set_layers`).
    Layers(Arc<Vec<VolumeLayers>>, Option<Sender<u16>>),
    /// The control service renewed the node's lease: serve until then
    /// (see `lease` in `shard.rs`). Sent after the table and fences of the
    /// same reply, so a shard never serves on the renewal with an older
    /// table than the one the renewing reply carried.
    Lease(Instant),
    /// Space held by layers: per query `[key, above]`, the chunk slots of
    /// layer `key` this shard holds (all of them with `above` 0, else those
    /// whose every block layer `above` also holds); answered on the sender.
    LayerUsage(Arc<Vec<[u64; 2]>>, Sender<Vec<u64>>),
    Stop,
}

pub(crate) enum AgentMsg {
    /// A peer presented this newer epoch: fetch the table now.
    NeedRoute(u64),
    /// Backfill of a partition finished while the node held `epoch`.
    Synced {
        partition: u32,
        epoch: u64,
    },
    /// A catch-up of `partition` copies the partition whole instead: ask
    /// the control service to record it (`Heartbeat::copy_whole`).
    CopyWhole {
        partition: u32,
    },
    Stop,
}

/// A channel plus an eventfd that wakes the shard's epoll.
pub(crate) struct ShardMailbox {
    pub(crate) tx: Sender<ShardMsg>,
    pub(crate) wake: Arc<OwnedFd>,
}

impl ShardMailbox {
    pub(crate) fn send(&self, m: ShardMsg) {
        if self.tx.send(m).is_ok() {
            wake(self.wake.as_raw_fd());
        }
    }
}

pub(crate) fn wake(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a local to an eventfd we own.
    unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
}

pub(crate) fn new_eventfd() -> Result<OwnedFd, NodeError> {
    // SAFETY: plain syscall; checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(NodeError::Io {
            what: "eventfd".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Where route tables come in (agent, admin API, route file) and go out to
/// the shards. Control path only.
pub(crate) struct RouteHub {
    pub(crate) current: Mutex<Option<Arc<Installed>>>,
    pub(crate) epoch: AtomicU64,
    pub(crate) shards: Vec<ShardMailbox>,
}

impl RouteHub {
    /// Installs `table` if it is newer than the current one.
    pub(crate) fn install(&self, table: RouteTable) -> bool {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.as_ref().is_some_and(|c| c.table.epoch >= table.epoch) {
            return false;
        }
        tracing::info!(epoch = table.epoch, "route table installed");
        let inst = Arc::new(Installed {
            encoded: table.encode(),
            table,
        });
        self.epoch.store(inst.table.epoch, Ordering::Release);
        *cur = Some(inst.clone());
        for s in &self.shards {
            s.send(ShardMsg::Route(inst.clone()));
        }
        true
    }
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }
    /// Hands partitions to backfill again to the shards that own them.
    pub(crate) fn backfill_again(&self, epoch: u64, partitions: &[u32]) {
        let n = self.shards.len() as u32;
        for (s, mailbox) in self.shards.iter().enumerate() {
            let mine: Vec<u32> = partitions
                .iter()
                .copied()
                .filter(|p| p % n == s as u32)
                .collect();
            if !mine.is_empty() {
                mailbox.send(ShardMsg::BackfillAgain(epoch, mine));
            }
        }
    }
    /// Tells every shard which volumes are deleted (sorted ids).
    pub(crate) fn set_deleted(&self, ids: Vec<u64>) {
        let ids = Arc::new(ids);
        for s in &self.shards {
            s.send(ShardMsg::Deleted(ids.clone()));
        }
    }
    /// Hands every shard the end of the lease the control service just
    /// renewed (see `ShardMsg::Lease`).
    pub(crate) fn set_lease(&self, until: Instant) {
        for s in &self.shards {
            s.send(ShardMsg::Lease(until));
        }
    }
    /// Installs volume fence generations on every shard. With `wait`, also
    /// waits (that long at most) until every shard has finished the
    /// mutations of older generations it had accepted: from then on no
    /// write of an old holder reaches this node's disk. Err: the shards
    /// that did not answer in time.
    pub(crate) fn set_fences(
        &self,
        fences: Vec<(u64, u32)>,
        wait: Option<Duration>,
    ) -> Result<(), String> {
        let fences = Arc::new(fences);
        self.tell_shards(
            |reply| ShardMsg::Fences(fences.clone(), reply),
            wait,
            "writes of an older fence generation",
        )
    }
    /// Installs volume layers on every shard; with `wait`, as
    /// [`RouteHub::set_fences`] for writes to eras no longer accepted.
    pub(crate) fn set_layers(
        &self,
        layers: Vec<VolumeLayers>,
        wait: Option<Duration>,
    ) -> Result<(), String> {
        let layers = Arc::new(layers);
        self.tell_shards(
            |reply| ShardMsg::Layers(layers.clone(), reply),
            wait,
            "writes to an era no longer accepted",
        )
    }
    /// Sums the shards' answers to `ShardMsg::LayerUsage` (control path:
    /// `POST /v1/layers/usage`).
    pub(crate) fn layer_usage(
        &self,
        queries: Vec<[u64; 2]>,
        wait: Duration,
    ) -> Result<Vec<u64>, String> {
        let queries = Arc::new(queries);
        let (tx, rx) = mpsc::channel();
        for s in &self.shards {
            s.send(ShardMsg::LayerUsage(queries.clone(), tx.clone()));
        }
        drop(tx);
        let deadline = std::time::Instant::now() + wait;
        let mut sum = vec![0u64; queries.len()];
        for _ in &self.shards {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let counts = rx
                .recv_timeout(left)
                .map_err(|_| format!("a shard did not count its chunks within {wait:?}"))?;
            for (s, c) in sum.iter_mut().zip(counts) {
                *s += c;
            }
        }
        Ok(sum)
    }

    /// Sends every shard `msg`; with `wait`, waits (that long at most)
    /// until each answered on the reply channel. Err: the shards that did
    /// not answer in time (still finishing `what`).
    fn tell_shards(
        &self,
        msg: impl Fn(Option<Sender<u16>>) -> ShardMsg,
        wait: Option<Duration>,
        what: &str,
    ) -> Result<(), String> {
        let Some(wait) = wait else {
            for s in &self.shards {
                s.send(msg(None));
            }
            return Ok(());
        };
        let (tx, rx) = mpsc::channel();
        for s in &self.shards {
            s.send(msg(Some(tx.clone())));
        }
        drop(tx);
        let deadline = std::time::Instant::now() + wait;
        let mut answered = vec![false; self.shards.len()];
        while answered.iter().any(|a| !a) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(shard) => {
                    if let Some(a) = answered.get_mut(shard as usize) {
                        *a = true;
                    }
                }
                Err(_) => {
                    let late: Vec<usize> = (0..answered.len()).filter(|&i| !answered[i]).collect();
                    return Err(format!(
                        "shards {late:?} still finish {what} after {} ms",
                        wait.as_millis()
                    ));
                }
            }
        }
        Ok(())
    }
    pub(crate) fn table(&self) -> Option<Arc<Installed>> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
