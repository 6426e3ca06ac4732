//! NBD over TLS with X.509 credentials, as qemu-nbd's `--tls-creds` with a
//! `tls-creds-x509` object: the credentials directory has QEMU's layout
//! (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, optional
//! `ca-crl.pem`), the client upgrades with NBD_OPT_STARTTLS (handshake.rs),
//! and by default it must present a certificate signed by the CA
//! (`verify-peer=on`), whose subject may further have to be on a list (a
//! file with one subject per line, as qemu's `authz-listfile`).
//!
//! The stream is rustls (ring) over the blocking socket, read and written
//! by the connection's own thread. Every socket read and write during the
//! handshake takes only what is left of the handshake deadline, the TLS
//! handshake included, so a ClientHello followed by silence is cut at it.

use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore, ServerConfig, ServerConnection};

use crate::conn::{ConnError, HandshakeDeadline, Stream};

/// TLS settings of a server (see the module doc).
#[derive(Clone, Debug)]
pub struct TlsConfig {
    /// Credentials directory: ca-cert.pem, server-cert.pem, server-key.pem,
    /// and optionally ca-crl.pem.
    pub dir: PathBuf,
    /// Require a client certificate signed by the CA (qemu's
    /// `verify-peer=on`, its default for servers). Off: encryption only,
    /// any client may connect.
    pub verify_peer: bool,
    /// A file of client certificate subjects allowed to connect, one per
    /// line as RFC 4514 prints them (`CN=host1,O=Example`), `#` comments.
    /// Read again for every connection. None: any certificate the CA signed.
    pub allowed_clients: Option<PathBuf>,
    /// Serve plain NBD on the Unix socket too (it then only offers TLS);
    /// the socket file's mode guards it. TCP always requires TLS.
    pub allow_plain_unix: bool,
}

/// The loaded credentials.
pub(crate) struct TlsServer {
    config: Arc<ServerConfig>,
    settings: TlsConfig,
}

/// Errors loading credentials, each naming the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason} (the TLS credentials directory needs ca-cert.pem, server-cert.pem and server-key.pem, as qemu's tls-creds-x509)")]
    Read { path: PathBuf, reason: String },
    #[error("{path} holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks)")]
    NoCertificate { path: PathBuf },
    #[error("{path}: CA certificate not usable: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("{dir}: server certificate and key not usable: {reason}")]
    BadServerCert { dir: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    AllowList { path: PathBuf, reason: String },
}

fn read_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

impl TlsServer {
    /// Loads and checks the credentials (and the allow-list once, so a
    /// typo in its path fails at start-up, not at the first client).
    pub(crate) fn load(settings: &TlsConfig) -> Result<TlsServer, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let dir = &settings.dir;
        let chain = certificates(&dir.join("server-cert.pem"))?;
        let key_path = dir.join("server-key.pem");
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| read_err(&key_path, e))?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::BadServerCert {
                dir: dir.clone(),
                reason: e.to_string(),
            })?;
        let builder = if settings.verify_peer {
            let ca_path = dir.join("ca-cert.pem");
            let mut roots = RootCertStore::empty();
            // Several CAs may be listed (an old and a new one while
            // rotating): each is trusted.
            for ca in certificates(&ca_path)? {
                roots.add(ca).map_err(|e| TlsError::BadCa {
                    path: ca_path.clone(),
                    reason: e.to_string(),
                })?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let crl_path = dir.join("ca-crl.pem");
            if crl_path.exists() {
                let crls: Vec<CertificateRevocationListDer<'static>> =
                    CertificateRevocationListDer::pem_file_iter(&crl_path)
                        .map_err(|e| read_err(&crl_path, e))?
                        .collect::<Result<_, _>>()
                        .map_err(|e| read_err(&crl_path, e))?;
                verifier = verifier.with_crls(crls);
            }
            let verifier = verifier.build().map_err(|e| TlsError::BadCa {
                path: ca_path.clone(),
                reason: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::BadServerCert {
                dir: dir.clone(),
                reason: e.to_string(),
            })?;
        if let Some(path) = &settings.allowed_clients {
            if !settings.verify_peer {
                return Err(TlsError::AllowList {
                    path: path.clone(),
                    reason: "an allow-list of client certificates needs verify-peer on".into(),
                });
            }
            allowed_subjects(path)?;
        }
        Ok(TlsServer {
            config: Arc::new(config),
            settings: settings.clone(),
        })
    }

    pub(crate) fn allows_plain_unix(&self) -> bool {
        self.settings.allow_plain_unix
    }

    /// Runs the TLS handshake on `sock` before `deadline` and checks the
    /// client's identity. Returns the stream and who the client is.
    pub(crate) fn accept<S: Stream>(
        &self,
        mut sock: S,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(TlsStream<S>, Identity), ConnError> {
        let mut conn = ServerConnection::new(self.config.clone())
            .map_err(|e| ConnError::Tls(format!("cannot start TLS: {e}")))?;
        {
            let mut io = HandshakeDeadline {
                s: &mut sock,
                deadline,
                timeout,
            };
            while conn.is_handshaking() {
                match conn.complete_io(&mut io) {
                    Ok((0, 0)) => {
                        return Err(ConnError::Tls(
                            "the client closed the connection in the TLS handshake".into(),
                        ))
                    }
                    Ok(_) => {}
                    Err(e) => return Err(handshake_error(e, &self.settings.dir)),
                }
            }
        }
        let mut identity = Identity {
            subject: None,
            denied: None,
        };
        if self.settings.verify_peer {
            let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) else {
                // rustls refuses this in the handshake; never serve without.
                return Err(ConnError::Tls("the client presented no certificate".into()));
            };
            let subject = crate::x509::subject(leaf.as_ref()).ok_or_else(|| {
                ConnError::Tls("cannot read the subject of the client's certificate".into())
            })?;
            if let Some(path) = &self.settings.allowed_clients {
                identity.denied = match allowed_subjects(path) {
                    Ok(allowed) if allowed.contains(&subject) => None,
                    Ok(_) => Some(format!(
                        "client certificate subject {subject:?} is not in {}",
                        path.display()
                    )),
                    Err(e) => Some(format!("refusing every client: {e}")),
                };
            }
            identity.subject = Some(subject);
        }
        Ok((
            TlsStream {
                conn,
                sock,
                deadline: Some((deadline, timeout)),
            },
            identity,
        ))
    }
}

/// Who a TLS client is.
pub(crate) struct Identity {
    /// The certificate's subject (None without verify-peer).
    pub(crate) subject: Option<String>,
    /// Why the client may not use the export (not on the allow-list).
    pub(crate) denied: Option<String>,
}

/// The allow-list: one subject per line, blank lines and `#` comments
/// ignored, surrounding white space trimmed.
fn allowed_subjects(path: &Path) -> Result<Vec<String>, TlsError> {
    let text = std::fs::read_to_string(path).map_err(|e| read_err(path, e))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

/// A clear reason for a failed TLS handshake.
fn handshake_error(e: std::io::Error, dir: &Path) -> ConnError {
    if matches!(e.kind(), ErrorKind::TimedOut) {
        return ConnError::Io(e);
    }
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return ConnError::Tls(format!("TLS handshake failed: {e}"));
    };
    let ca = dir.join("ca-cert.pem");
    ConnError::Tls(match tls {
        rustls::Error::NoCertificatesPresented => format!(
            "the client presented no certificate: a certificate signed by the CA in {} is required (qemu: client-cert.pem and client-key.pem in the client's tls-creds-x509 directory)",
            ca.display()
        ),
        // BadSignature: an issuer of the same name as our CA signed it.
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => format!(
            "the client's certificate is not signed by the CA in {}",
            ca.display()
        ),
        rustls::Error::InvalidCertificate(c) => {
            format!("the client's certificate is refused: {c}")
        }
        rustls::Error::AlertReceived(a) => format!(
            "the client ended the TLS handshake with the alert {a:?} (does it trust the CA that signed server-cert.pem?)"
        ),
        other => format!("TLS handshake failed: {other}"),
    })
}

/// A server-side TLS stream over a blocking socket.
pub(crate) struct TlsStream<S: Stream> {
    conn: ServerConnection,
    sock: S,
    /// While set (the NBD option haggling), socket reads and writes take
    /// only what is left of the handshake deadline.
    deadline: Option<(Instant, Duration)>,
}

impl<S: Stream> TlsStream<S> {
    /// The handshake is over: socket timeouts are the caller's again.
    pub(crate) fn end_deadline(&mut self) {
        self.deadline = None;
    }

    fn read_tls(&mut self) -> std::io::Result<usize> {
        match self.deadline {
            Some((deadline, timeout)) => self.conn.read_tls(&mut HandshakeDeadline {
                s: &mut self.sock,
                deadline,
                timeout,
            }),
            None => self.conn.read_tls(&mut self.sock),
        }
    }

    fn write_tls(&mut self) -> std::io::Result<()> {
        while self.conn.wants_write() {
            let n = match self.deadline {
                Some((deadline, timeout)) => self.conn.write_tls(&mut HandshakeDeadline {
                    s: &mut self.sock,
                    deadline,
                    timeout,
                }),
                None => self.conn.write_tls(&mut self.sock),
            }?;
            if n == 0 {
                return Err(ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }
}

impl<S: Stream> Read for TlsStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                // The peer closed TCP without close_notify: NBD frames its
                // own messages, so this is the same EOF as without TLS.
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            self.read_tls()?;
            let processed = self.conn.process_new_packets();
            // An alert to send (or a key update to answer) goes out now.
            let written = self.write_tls();
            processed.map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))?;
            written?;
        }
    }
}

impl<S: Stream> Write for TlsStream<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.conn.writer().write(buf)?;
        self.write_tls()?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.write_tls()?;
        self.sock.flush()
    }
}

impl<S: Stream> std::os::fd::AsRawFd for TlsStream<S> {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.sock.as_raw_fd()
    }
}

impl<S: Stream> Stream for TlsStream<S> {
    fn set_send_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.sock.set_send_timeout(t)
    }
    fn set_receive_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.sock.set_receive_timeout(t)
    }
    fn has_buffered_input(&mut self) -> bool {
        // Decrypted bytes wait inside rustls, where poll(2) cannot see
        // them. An error is reported by the next read.
        self.conn
            .process_new_packets()
            .map_or(true, |s| s.plaintext_bytes_to_read() > 0)
    }
}
