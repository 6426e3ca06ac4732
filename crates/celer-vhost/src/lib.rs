//! celer-vhost: serves a Celer [`BlockDevice`] to a QEMU guest as a
//! virtio-blk disk over the vhost-user protocol.
//!
//! Entry points: [`serve`] (listen on a Unix socket, serve one front end at a
//! time, accept the next one after a disconnect) and [`bench::run_bench`]
//! (a host-side virtio-blk driver that measures any vhost-user-blk socket).
//! The guest's requests are parsed in [`request`], executed by one worker per
//! virtqueue ([`worker`]), and the vhost-user plumbing is in [`blk`].

pub mod bench;
pub mod blk;
pub mod cli;
pub mod frontend;
pub mod inflight;
pub mod request;
pub mod worker;

use std::path::PathBuf;
use std::sync::Arc;

use celer_device::BlockDevice;
use tracing::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use blk::{Error, VhostUserBlk};

/// How to serve a device.
#[derive(Clone, Debug)]
pub struct VhostConfig {
    /// Unix socket to listen on (replaced if it exists).
    pub socket: PathBuf,
    /// Virtqueues offered (the guest may use fewer); one worker thread each.
    pub num_queues: usize,
    /// Largest virtqueue size accepted; also bounds requests in flight per queue.
    pub queue_size_max: u16,
    /// CPUs to pin workers to: worker i runs on `cpus[i % len]`; empty: no pinning.
    pub cpus: Vec<usize>,
    /// How long a worker keeps polling after its last piece of work, in µs.
    pub poll_us: u64,
    /// How long a worker keeps polling while requests are in flight on the
    /// device (catches completions without an eventfd wake-up), in µs. 0 by
    /// default: it pays only on dedicated cores.
    pub poll_inflight_us: u64,
    /// Connections to serve before returning; `None`: forever.
    pub connections_max: Option<usize>,
}

impl VhostConfig {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        VhostConfig {
            socket: socket.into(),
            num_queues: 1,
            queue_size_max: 1024,
            cpus: Vec::new(),
            poll_us: 50,
            poll_inflight_us: 0,
            connections_max: None,
        }
    }
}

/// Serves `device` on `config.socket`: one front end at a time; after a
/// front end disconnects, in-flight requests are finished and the next
/// connection is accepted (QEMU's `reconnect=` finds the socket again).
/// Returns after `connections_max` connections, or on an error that makes
/// serving impossible (socket cannot be bound, threads cannot start).
pub fn serve(config: VhostConfig, device: Arc<dyn BlockDevice>) -> Result<(), Error> {
    let backend = Arc::new(VhostUserBlk::new(&config, &*device)?);
    serve_backend(&config, backend)
}

/// Like [`serve`], with a back end built by the caller (tests read its stats).
pub fn serve_backend(config: &VhostConfig, backend: Arc<VhostUserBlk>) -> Result<(), Error> {
    let socket = config.socket.display().to_string();
    // One listener for the whole life of the server: a front end that
    // reconnects while the previous connection is being torn down waits in
    // the backlog instead of finding no socket (or a dead one).
    let mut listener = Listener::new(&config.socket, true).map_err(|e| Error::Serve {
        socket: socket.clone(),
        reason: format!("cannot listen: {e}"),
    })?;
    let mut served = 0usize;
    loop {
        if config.connections_max.is_some_and(|max| served >= max) {
            return Ok(());
        }
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("celer-vhost".to_string(), backend.clone(), mem)
            .map_err(|e| Error::Daemon(e.to_string()))?;
        backend.register_worker_fds(&daemon.get_epoll_handlers())?;
        info!(socket, "waiting for a vhost-user front end");
        daemon.start(&mut listener).map_err(|e| Error::Serve {
            socket: socket.clone(),
            reason: e.to_string(),
        })?;
        info!(socket, "front end connected");
        let result = daemon.wait();
        served += 1;
        // Dropping the daemon stops and joins its worker threads.
        drop(daemon);
        backend.disconnect();
        match result {
            Ok(()) => info!(socket, "front end disconnected"),
            Err(vhost_user_backend::Error::HandleRequest(
                e @ (vhost::vhost_user::Error::Disconnected
                | vhost::vhost_user::Error::PartialMessage),
            )) => info!(socket, reason = %e, "front end disconnected"),
            // A front end that sends garbage only ends its own connection.
            Err(e) => warn!(socket, error = %e, "front end connection ended with an error"),
        }
    }
}
