//! Command-line surface for `celer nbd serve`: flatten [`ServeArgs`] into a
//! clap command and call [`run_serve`] (or [`run_serve_with`] for a device
//! the caller opened, such as an engine volume).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use celer_device::{BlockDevice, FileDevice, FileDeviceConfig, NullDevice};
use clap::Args;

use crate::{ConnLimits, NbdConfig};

/// `serve`: export a device over NBD.
#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// Settings file (TOML, keys as the flags with `_`); CELER_NBD_<FLAG>
    /// environment variables override it, flags override both (read by the
    /// `celer` binary before parsing).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// TCP address to listen on, e.g. 127.0.0.1:10809.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Serve Prometheus metrics (requests, bytes, latency per op, queue
    /// depth, route epoch) on `http://ADDR/metrics` (read by the `celer` binary).
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// For a `cluster:` device whose nodes serve data TLS (`celer node
    /// serve --tls-creds`): DIR holds ca-cert.pem, client-cert.pem and
    /// client-key.pem (QEMU's tls-creds-x509 client layout); read by the
    /// `celer` binary.
    #[arg(long, value_name = "DIR")]
    pub data_tls_creds: Option<PathBuf>,
    /// Unix socket to listen on.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Device: `null:SIZE` (e.g. null:1G) or `file:PATH` (file or block device);
    /// `celer nbd serve` also takes `engine:PATH,volume=N,size=SIZE`.
    #[arg(long)]
    pub device: String,
    /// Export name clients ask for (the empty name also gets it).
    #[arg(long, default_value = "celer")]
    pub export_name: String,
    /// Serve the volume read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Stop after this many connections (default: serve forever).
    #[arg(long)]
    pub connections: Option<usize>,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// TLS and client authentication (see docs/security.md).
#[derive(Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// Serve NBD over TLS with the X.509 credentials in this directory, in
    /// qemu's tls-creds-x509 layout: ca-cert.pem, server-cert.pem,
    /// server-key.pem (and ca-crl.pem if present). Clients must start
    /// TLS (NBD_OPT_STARTTLS) and present a certificate signed by the CA.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// Do not ask clients for a certificate: encryption only, any client
    /// may connect (qemu's verify-peer=off).
    #[arg(long, requires = "tls_creds")]
    pub tls_no_verify_peer: bool,
    /// Only clients whose certificate subject is listed in this file may
    /// connect: one subject per line as `openssl x509 -noout -subject
    /// -nameopt RFC2253` prints it (e.g. CN=host1,O=Example), `#` comments.
    /// Read again for every connection.
    #[arg(long, value_name = "FILE", requires = "tls_creds")]
    pub tls_allowed_clients: Option<PathBuf>,
    /// Serve plain NBD on the Unix socket (--socket) as well; its file mode
    /// guards it. By default TLS is required there too.
    #[arg(long, requires = "tls_creds")]
    pub tls_allow_plain_unix: bool,
}

impl TlsArgs {
    /// The TLS settings, or None without --tls-creds.
    pub fn config(&self) -> Option<crate::TlsConfig> {
        let dir = self.tls_creds.clone()?;
        Some(crate::TlsConfig {
            dir,
            verify_peer: !self.tls_no_verify_peer,
            allowed_clients: self.tls_allowed_clients.clone(),
            allow_plain_unix: self.tls_allow_plain_unix,
        })
    }
}

/// Admission caps and timeouts (see the crate doc).
#[derive(Args, Clone, Debug)]
pub struct LimitArgs {
    /// Seconds a client has for the whole handshake (greeting to OPT_GO).
    #[arg(long, default_value_t = crate::HANDSHAKE_TIMEOUT_MS as f64 / 1000.0)]
    pub handshake_timeout: f64,
    /// Close a connection after this many seconds without a request while
    /// nothing is in flight (default: never; the kernel client and qemu
    /// stay connected and silent while the disk is idle).
    #[arg(long)]
    pub idle_timeout: Option<f64>,
    /// Connections open at once; more are closed at accept.
    #[arg(long, default_value_t = crate::CONNECTIONS_OPEN_MAX)]
    pub max_connections: usize,
    /// Connections open at once from one source IP.
    #[arg(long, default_value_t = crate::CONNECTIONS_OPEN_PER_IP_MAX)]
    pub max_connections_per_ip: usize,
}

impl Default for LimitArgs {
    fn default() -> Self {
        let d = crate::ConnLimits::default();
        LimitArgs {
            handshake_timeout: d.handshake_timeout.as_secs_f64(),
            idle_timeout: None,
            max_connections: d.open_max,
            max_connections_per_ip: d.open_per_ip_max,
        }
    }
}

impl LimitArgs {
    /// The limits, or what is wrong with the flags.
    pub fn limits(&self) -> anyhow::Result<ConnLimits> {
        let seconds = |flag: &str, v: f64| {
            Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| !d.is_zero())
                .with_context(|| format!("--{flag} {v}: give a positive number of seconds"))
        };
        anyhow::ensure!(
            self.max_connections > 0 && self.max_connections_per_ip > 0,
            "--max-connections and --max-connections-per-ip must be at least 1"
        );
        let d = ConnLimits::default();
        Ok(ConnLimits {
            open_max: self.max_connections,
            open_per_ip_max: self.max_connections_per_ip,
            // The handshake caps stay below the open caps, so connections
            // that never finish their handshake cannot take every slot.
            handshaking_max: d.handshaking_max.min(self.max_connections.div_ceil(4)),
            handshaking_per_ip_max: d
                .handshaking_per_ip_max
                .min(self.max_connections_per_ip.div_ceil(4)),
            handshake_timeout: seconds("handshake-timeout", self.handshake_timeout)?,
            idle_timeout: match self.idle_timeout {
                Some(v) => Some(seconds("idle-timeout", v)?),
                None => None,
            },
        })
    }
}

/// Opens the device named by `--device` and serves it.
pub fn run_serve(a: &ServeArgs) -> anyhow::Result<()> {
    let device = open_device(&a.device, a.read_only)?;
    run_serve_with(a, device)
}

/// Like [`run_serve`], for a device the caller opened.
pub fn run_serve_with(a: &ServeArgs, device: Arc<dyn BlockDevice>) -> anyhow::Result<()> {
    let config = NbdConfig {
        addr: a.listen,
        socket: a.socket.clone(),
        export_name: a.export_name.clone(),
        read_only: a.read_only,
        connections_max: a.connections,
        limits: a.limits.limits()?,
        tls: a.tls.config(),
    };
    crate::serve(config, device)?;
    Ok(())
}

/// `null:SIZE` or `file:PATH` (files are opened without O_DIRECT).
pub fn open_device(spec: &str, read_only: bool) -> anyhow::Result<Arc<dyn BlockDevice>> {
    if let Some(size) = spec.strip_prefix("null:") {
        let size_bytes = celer_device::parse_size(size)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("device {spec}"))?;
        anyhow::ensure!(
            size_bytes > 0 && size_bytes.is_multiple_of(512),
            "null device size must be a positive multiple of 512 bytes"
        );
        return Ok(Arc::new(NullDevice::new(size_bytes, read_only, true)));
    }
    if let Some(path) = spec.strip_prefix("file:") {
        let dev = FileDevice::open(&FileDeviceConfig {
            path: path.into(),
            read_only,
            direct: false,
        })?;
        return Ok(Arc::new(dev));
    }
    anyhow::bail!("unknown device `{spec}`: use null:SIZE or file:PATH")
}

#[cfg(test)]
mod tests {
    use super::open_device;

    #[test]
    fn device_specs() {
        assert_eq!(
            open_device("null:1M", false)
                .expect("null")
                .info()
                .size_bytes,
            1 << 20
        );
        assert!(open_device("null:1M", true).expect("null").info().read_only);
        for bad in [
            "null:ten",
            "null:1000",
            "null:0",
            "disk:/x",
            "file:/nonexistent/celer",
        ] {
            let e = open_device(bad, false).err();
            assert!(e.is_some(), "{bad} should be refused");
        }
        let f = tempfile::NamedTempFile::new().expect("temp file");
        f.as_file().set_len(4 << 20).expect("size");
        let spec = format!("file:{}", f.path().display());
        assert_eq!(
            open_device(&spec, false).expect("file").info().size_bytes,
            4 << 20
        );
    }
}
