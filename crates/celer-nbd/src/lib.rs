//! NBD front end: serves one [`BlockDevice`] as one NBD export over TCP
//! and/or a Unix socket, so `qemu-img`, `qemu-io`, `qemu-nbd -c`, fio's nbd
//! engine and any other NBD client can use a Celer volume.
//!
//! Protocol: newstyle fixed handshake (OPT_GO, OPT_INFO, OPT_EXPORT_NAME,
//! OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_STRUCTURED_REPLY,
//! OPT_LIST/SET_META_CONTEXT with `base:allocation`; everything else gets
//! NBD_REP_ERR_UNSUP). Simple replies, or structured ones when negotiated:
//! reads as OFFSET_DATA/OFFSET_HOLE chunks, errors as ERROR/ERROR_OFFSET
//! chunks with a message. Commands READ, WRITE, FLUSH, TRIM, WRITE_ZEROES,
//! BLOCK_STATUS (from [`BlockDevice::allocation`]), DISC.
//! NBD_FLAG_CAN_MULTI_CONN when [`BlockDevice::flush_is_device_wide`] (or
//! read-only).
//!
//! Threads: one per connection. Each connection opens its own
//! [`celer_device::DeviceQueue`], so connections share nothing but the
//! device. A connection pipelines: it keeps reading requests while earlier
//! ones are in flight on the device, and replies in completion order (each
//! reply carries its request's handle).
//!
//! Buffers: NBD data crosses a socket, so there is no zero copy here; each
//! connection preallocates one buffer per in-flight slot and the payload is
//! read from the socket straight into it (and sent from it, with the reply
//! header in the bytes just before the data, so a read reply is one write).
//!
//! Limits: requests per connection in flight, bytes per connection in flight,
//! request size (the advertised maximum block size), option data size. A
//! write larger than the maximum closes the connection without allocating.
//!
//! Admission ([`ConnLimits`]): a connection costs a thread, so a few idle
//! sockets must not lock everyone out. The whole handshake (greeting to
//! OPT_GO) must finish within `handshake_timeout` (one deadline, not one
//! per read: a client trickling a byte at a time is cut at it). Connections
//! still in the handshake have their own small cap, overall and per source
//! IP, below the cap on open connections, and each source IP may hold at
//! most `open_per_ip_max` connections: a host opening sockets and sending
//! nothing holds at most `handshaking_per_ip_max` slots, for at most the
//! handshake timeout. A connection over a cap is closed at once, with a log
//! line. An established connection with nothing in flight can be closed
//! after `idle_timeout` (off by default: the kernel client and qemu stay
//! connected, silent, while the disk is idle). A request that stops
//! arriving mid-way for 60 s ends its connection.
//! Unix socket connections have no source IP: the socket file's
//! permissions guard them; the overall caps still apply.
//!
//! TLS and authentication ([`TlsConfig`], tls.rs): with a credentials
//! directory in qemu's `tls-creds-x509` layout the server does
//! NBD_OPT_STARTTLS and, on TCP, refuses every other option before it
//! (NBD_REP_ERR_TLS_REQD; NBD_OPT_EXPORT_NAME closes the connection), then
//! runs the rest of the haggling and the whole transmission over TLS
//! (rustls). By default a client must present a certificate signed by the
//! CA (qemu's `verify-peer=on`), and its subject may have to be on an
//! allow-list file. The TLS handshake counts in the handshake deadline and
//! the handshake caps. Without TLS there is no authentication: anyone who
//! can reach the TCP listener can read and write the export, so listen on
//! loopback or a private network, or use the Unix socket.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use admission::Admission;
use celer_device::{BlockDevice, DeviceInfo, IoError};

mod admission;
pub mod cli;
mod conn;
mod handshake;
mod proto;
mod tls;
mod x509;

pub use tls::{TlsConfig, TlsError};

/// Largest NBD request (read or write payload) the server accepts.
pub const REQUEST_MAX_BYTES: u32 = 32 << 20;
/// Preferred block size advertised to clients.
pub const PREFERRED_BLOCK_BYTES: u32 = 4096;
/// Connections served at once; more are accepted and closed with a log line.
pub const CONNECTIONS_OPEN_MAX: usize = 64;
/// Connections from one source IP served at once.
pub const CONNECTIONS_OPEN_PER_IP_MAX: usize = 32;
/// Connections still in the handshake at once.
pub const HANDSHAKING_MAX: usize = 16;
/// Connections from one source IP still in the handshake at once.
pub const HANDSHAKING_PER_IP_MAX: usize = 4;
/// Time a client has for the whole handshake, greeting to OPT_GO.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// Who may hold a connection, and for how long (see the crate doc).
#[derive(Clone, Debug)]
pub struct ConnLimits {
    /// Open connections (handshaking or established).
    pub open_max: usize,
    /// Open connections from one source IP (TCP only).
    pub open_per_ip_max: usize,
    /// Connections still in the handshake.
    pub handshaking_max: usize,
    /// Connections from one source IP still in the handshake (TCP only).
    pub handshaking_per_ip_max: usize,
    /// The whole handshake must finish within this.
    pub handshake_timeout: Duration,
    /// Close an established connection with nothing in flight after this
    /// long without a request (None: never).
    pub idle_timeout: Option<Duration>,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            open_max: CONNECTIONS_OPEN_MAX,
            open_per_ip_max: CONNECTIONS_OPEN_PER_IP_MAX,
            handshaking_max: HANDSHAKING_MAX,
            handshaking_per_ip_max: HANDSHAKING_PER_IP_MAX,
            handshake_timeout: Duration::from_millis(HANDSHAKE_TIMEOUT_MS),
            idle_timeout: None,
        }
    }
}

/// What to serve, and where.
#[derive(Clone, Debug)]
pub struct NbdConfig {
    /// TCP address to listen on (e.g. 127.0.0.1:10809); port 0 picks one.
    pub addr: Option<SocketAddr>,
    /// Unix socket to listen on (a stale socket file there is replaced).
    pub socket: Option<PathBuf>,
    /// Name of the one export; clients asking for "" also get it.
    pub export_name: String,
    /// Serve read-only even if the device is writable.
    pub read_only: bool,
    /// Stop after this many connections have come and gone (None: forever).
    pub connections_max: Option<usize>,
    /// Admission caps and timeouts.
    pub limits: ConnLimits,
    /// TLS credentials and client authentication (None: plain NBD).
    pub tls: Option<TlsConfig>,
}

impl NbdConfig {
    pub fn new(export_name: &str) -> Self {
        NbdConfig {
            addr: None,
            socket: None,
            export_name: export_name.to_string(),
            read_only: false,
            connections_max: None,
            limits: ConnLimits::default(),
            tls: None,
        }
    }
}

/// Errors starting or running the server. Errors of one connection are
/// logged and end that connection only.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("nothing to listen on: give a TCP address (--listen) and/or a Unix socket (--socket)")]
    NoListener,
    #[error("cannot listen on TCP {addr}: {source}")]
    BindTcp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on Unix socket {path}: {source} (is another server using it?)")]
    BindUnix {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("device size {size_bytes} is not a multiple of its block size {block_bytes}")]
    BadDevice { size_bytes: u64, block_bytes: u32 },
    #[error("cannot open a device queue: {0}")]
    Queue(#[from] IoError),
    #[error("waiting for connections failed: {0}")]
    Accept(std::io::Error),
    #[error("cannot start a connection thread: {0}")]
    Spawn(std::io::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The export as a client sees it; fixed for the server's life.
#[derive(Clone, Debug)]
pub(crate) struct Export {
    pub name: String,
    pub size_bytes: u64,
    pub read_only: bool,
    pub transmission_flags: u16,
    pub min_block_bytes: u32,
    pub preferred_block_bytes: u32,
    pub max_block_bytes: u32,
    /// Largest TRIM/WRITE_ZEROES piece handed to the device at once.
    pub device_piece_bytes: u64,
}

impl Export {
    /// `flush_is_device_wide`: the device's [`BlockDevice::flush_is_device_wide`].
    pub(crate) fn new(
        name: &str,
        info: &DeviceInfo,
        read_only: bool,
        flush_is_device_wide: bool,
    ) -> Result<Export, Error> {
        use proto::*;
        let min = info.block_size_bytes.max(512);
        if !info.size_bytes.is_multiple_of(u64::from(min)) || !min.is_power_of_two() {
            return Err(Error::BadDevice {
                size_bytes: info.size_bytes,
                block_bytes: min,
            });
        }
        let read_only = read_only || info.read_only;
        let device_max = info.max_request_bytes.min(u64::from(REQUEST_MAX_BYTES)) as u32;
        let max = (device_max / min * min).max(min);
        let mut flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA;
        // Multi-conn: a flush on one connection must cover writes completed
        // on the others, and a write completed on one must be seen by
        // reads on the others. Each connection has its own device queue
        // and the server caches nothing, so this holds when the device
        // says so (and trivially when nothing is written).
        if read_only || flush_is_device_wide {
            flags |= TF_CAN_MULTI_CONN;
        }
        if read_only {
            flags |= TF_READ_ONLY;
        } else {
            if info.supports_discard {
                flags |= TF_SEND_TRIM;
            }
            if info.supports_write_zeroes {
                flags |= TF_SEND_WRITE_ZEROES;
            }
        }
        Ok(Export {
            name: name.to_string(),
            size_bytes: info.size_bytes,
            read_only,
            transmission_flags: flags,
            min_block_bytes: min,
            preferred_block_bytes: PREFERRED_BLOCK_BYTES.max(min).min(max),
            max_block_bytes: max,
            device_piece_bytes: u64::from(max),
        })
    }
}

/// A server with its listeners bound; [`Server::run`] serves.
pub struct Server {
    config: NbdConfig,
    device: Arc<dyn BlockDevice>,
    export: Export,
    tcp: Option<TcpListener>,
    unix: Option<UnixListener>,
    tls: Option<Arc<tls::TlsServer>>,
}

impl Server {
    /// Binds the listeners named in `config`.
    pub fn bind(config: NbdConfig, device: Arc<dyn BlockDevice>) -> Result<Server, Error> {
        if config.addr.is_none() && config.socket.is_none() {
            return Err(Error::NoListener);
        }
        let export = Export::new(
            &config.export_name,
            &device.info(),
            config.read_only,
            device.flush_is_device_wide(),
        )?;
        let tls = match &config.tls {
            Some(t) => Some(Arc::new(tls::TlsServer::load(t)?)),
            None => None,
        };
        let tcp = match config.addr {
            Some(addr) => {
                Some(TcpListener::bind(addr).map_err(|source| Error::BindTcp { addr, source })?)
            }
            None => None,
        };
        let unix = match &config.socket {
            Some(path) => {
                use std::os::unix::fs::FileTypeExt;
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    let _ = std::fs::remove_file(path);
                }
                Some(UnixListener::bind(path).map_err(|source| Error::BindUnix {
                    path: path.clone(),
                    source,
                })?)
            }
            None => None,
        };
        Ok(Server {
            config,
            device,
            export,
            tcp,
            unix,
            tls,
        })
    }

    /// The bound TCP address (useful with port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Accepts connections until `connections_max` have been served (then
    /// waits for them to end), or forever.
    pub fn run(self) -> Result<(), Error> {
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut accepted = 0usize;
        let result = self.accept_loop(&mut threads, &mut accepted);
        for t in threads {
            if t.join().is_err() {
                tracing::error!("an NBD connection thread panicked");
            }
        }
        if let Some(path) = &self.config.socket {
            let _ = std::fs::remove_file(path);
        }
        result
    }

    fn accept_loop(
        &self,
        threads: &mut Vec<JoinHandle<()>>,
        accepted: &mut usize,
    ) -> Result<(), Error> {
        let admission = Admission::new(self.config.limits.clone());
        tracing::info!(
            export = %self.export.name,
            tcp = ?self.tcp_addr(),
            socket = ?self.config.socket,
            size_bytes = self.export.size_bytes,
            read_only = self.export.read_only,
            tls = ?self.config.tls.as_ref().map(|t| &t.dir),
            client_certificates = self.config.tls.as_ref().is_some_and(|t| t.verify_peer),
            "NBD server listening"
        );
        while self.config.connections_max.is_none_or(|n| *accepted < n) {
            let mut fds = Vec::with_capacity(2);
            if let Some(l) = &self.tcp {
                fds.push(libc::pollfd {
                    fd: l.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            if let Some(l) = &self.unix {
                fds.push(libc::pollfd {
                    fd: l.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            // SAFETY: `fds` is a live array of `fds.len()` pollfds.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Accept(e));
            }
            threads.retain(|t| !t.is_finished());
            let mut i = 0;
            if let Some(l) = &self.tcp {
                if fds[i].revents != 0 {
                    match l.accept() {
                        Ok((s, peer)) => match admission.admit(Some(peer.ip())) {
                            Ok(ticket) => {
                                let _ = s.set_nodelay(true);
                                threads.push(self.spawn(
                                    s,
                                    peer.to_string(),
                                    *accepted,
                                    ticket,
                                    self.tls.is_some(),
                                )?);
                                *accepted += 1;
                            }
                            // Dropping the stream closes it.
                            Err(why) => {
                                tracing::warn!(%peer, "refusing an NBD connection: {why}")
                            }
                        },
                        Err(e) => tracing::warn!("TCP accept failed: {e}"),
                    }
                }
                i += 1;
            }
            if let Some(l) = &self.unix {
                if fds[i].revents != 0 && self.config.connections_max.is_none_or(|n| *accepted < n)
                {
                    match l.accept() {
                        Ok((s, _)) => match admission.admit(None) {
                            Ok(ticket) => {
                                let tls_required =
                                    self.tls.as_ref().is_some_and(|t| !t.allows_plain_unix());
                                threads.push(self.spawn(
                                    s,
                                    "unix".to_string(),
                                    *accepted,
                                    ticket,
                                    tls_required,
                                )?);
                                *accepted += 1;
                            }
                            Err(why) => {
                                tracing::warn!(peer = "unix", "refusing an NBD connection: {why}")
                            }
                        },
                        Err(e) => tracing::warn!("Unix accept failed: {e}"),
                    }
                }
            }
        }
        Ok(())
    }

    fn spawn<S: conn::Stream + 'static>(
        &self,
        stream: S,
        peer: String,
        index: usize,
        ticket: admission::Ticket,
        tls_required: bool,
    ) -> Result<JoinHandle<()>, Error> {
        let device = self.device.clone();
        let tls = self.tls.clone();
        let limits = self.config.limits.clone();
        let mut export = self.export.clone();
        // A volume that grew online is exported at its new size to each
        // new connection (NBD cannot tell a connected client; it reconnects).
        let size_bytes = device.info().size_bytes;
        if size_bytes > export.size_bytes
            && size_bytes.is_multiple_of(u64::from(export.min_block_bytes))
        {
            export.size_bytes = size_bytes;
        }
        std::thread::Builder::new()
            .name(format!("celer-nbd-{index}"))
            .spawn(move || {
                let cx = conn::ConnContext {
                    peer: &peer,
                    index,
                    device: device.as_ref(),
                    export: &export,
                    limits: &limits,
                    tls: tls.as_deref(),
                    tls_required,
                };
                conn::run(stream, &cx, ticket)
            })
            .map_err(Error::Spawn)
    }
}

/// Loads TLS credentials as a server would, to report a mistake early.
pub fn check_tls(config: &TlsConfig) -> Result<(), TlsError> {
    tls::TlsServer::load(config).map(drop)
}

/// Serves `device` as configured; blocks (see [`Server::run`]).
pub fn serve(config: NbdConfig, device: Arc<dyn BlockDevice>) -> Result<(), Error> {
    Server::bind(config, device)?.run()
}
