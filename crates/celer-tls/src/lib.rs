//! TLS on the node data port: credentials read from a directory in QEMU's
//! `tls-creds-x509` layout (as celer-nbd's `--tls-creds`), and the rustls
//! configurations built from them. Mutual TLS always: a node asks every
//! peer for a certificate signed by the CA, and a connecting side checks
//! that the node's certificate is signed by the CA and names the address
//! it dialled.
//!
//! Layout of `DIR` (a directory may hold both ends, a node's does):
//! - `ca-cert.pem`: the CA(s) trusted, one or more (several while rotating);
//! - `ca-crl.pem` (optional): revoked certificates;
//! - `server-cert.pem`, `server-key.pem`: a node's data port;
//! - `client-cert.pem`, `client-key.pem`: the connecting side (front ends,
//!   and a node's own connections to other nodes).
//!
//! Only loading and error wording live here; the sockets stay with their
//! event loops (celer-node, celer-client), which drive rustls themselves.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore};

pub use rustls;

/// Errors loading credentials, each naming the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason} (the data TLS credentials directory needs ca-cert.pem, and server-cert.pem/server-key.pem on a node, client-cert.pem/client-key.pem on a connecting side, as qemu's tls-creds-x509)")]
    Read { path: PathBuf, reason: String },
    #[error("{path} holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks)")]
    NoCertificate { path: PathBuf },
    #[error("{path}: CA certificate not usable: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("{dir}: certificate and key not usable: {reason}")]
    BadCert { dir: PathBuf, reason: String },
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

fn roots(dir: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let ca_path = dir.join("ca-cert.pem");
    let mut roots = RootCertStore::empty();
    for ca in certificates(&ca_path)? {
        roots.add(ca).map_err(|e| TlsError::BadCa {
            path: ca_path.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

fn crls(dir: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let path = dir.join("ca-crl.pem");
    if !path.exists() {
        return Ok(Vec::new());
    }
    CertificateRevocationListDer::pem_file_iter(&path)
        .map_err(|e| read_err(&path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(&path, e))
}

fn pair(
    dir: &Path,
    role: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = certificates(&dir.join(format!("{role}-cert.pem")))?;
    let key_path = dir.join(format!("{role}-key.pem"));
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| read_err(&key_path, e))?;
    Ok((chain, key))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Credentials of a data port and of the connections a process opens, from
/// one directory (see the module doc).
#[derive(Clone)]
pub struct DataTls {
    pub dir: PathBuf,
    /// Present when the directory holds server-cert.pem (a node).
    pub server: Option<Arc<rustls::ServerConfig>>,
    /// Present when the directory holds client-cert.pem.
    pub client: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for DataTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataTls").field("dir", &self.dir).finish()
    }
}

impl DataTls {
    /// What a node needs: the server pair (mutual TLS) and the client pair
    /// for its own connections to other nodes. Both must be there.
    pub fn load_node(dir: &Path) -> Result<DataTls, TlsError> {
        Ok(DataTls {
            dir: dir.to_path_buf(),
            server: Some(server_config(dir)?),
            client: Some(client_config(dir)?),
        })
    }

    /// What a front end needs: the CA and the client pair.
    pub fn load_client(dir: &Path) -> Result<DataTls, TlsError> {
        Ok(DataTls {
            dir: dir.to_path_buf(),
            server: None,
            client: Some(client_config(dir)?),
        })
    }
}

/// A node's data port: its certificate, and every peer must present one
/// signed by a CA in `ca-cert.pem` (not revoked in `ca-crl.pem`).
pub fn server_config(dir: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let (chain, key) = pair(dir, "server")?;
    let bad = |e: rustls::Error| TlsError::BadCert {
        dir: dir.to_path_buf(),
        reason: e.to_string(),
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(dir)?, provider.clone())
        .with_crls(crls(dir)?)
        .build()
        .map_err(|e| TlsError::BadCa {
            path: dir.join("ca-cert.pem"),
            reason: e.to_string(),
        })?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(bad)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(bad)?;
    Ok(Arc::new(config))
}

/// The connecting side: trusts the CA(s) in `ca-cert.pem` only, and
/// presents `client-cert.pem`.
pub fn client_config(dir: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let (chain, key) = pair(dir, "client")?;
    let bad = |e: rustls::Error| TlsError::BadCert {
        dir: dir.to_path_buf(),
        reason: e.to_string(),
    };
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(dir)?, provider.clone())
        .with_crls(crls(dir)?)
        .build()
        .map_err(|e| TlsError::BadCa {
            path: dir.join("ca-cert.pem"),
            reason: e.to_string(),
        })?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(bad)?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(bad)?;
    Ok(Arc::new(config))
}

/// A TLS failure on a connection to a node, in words a person can act on
/// (`in_handshake`: before the session was up; a malformed record later
/// is corruption or tampering, not a plain node).
pub fn describe_client_error(e: &rustls::Error, dir: &Path, in_handshake: bool) -> String {
    let ca = dir.join("ca-cert.pem");
    match e {
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. }
            if in_handshake =>
        {
            "the node does not speak TLS (its first bytes are not a TLS record): start it with `celer node serve --tls-creds DIR`, or connect without data TLS".to_string()
        }
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => format!("the node's certificate is not signed by the CA in {}", ca.display()),
        rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
        | rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. }) => {
            "the node's certificate does not name the address it was reached at (its subjectAltName must hold the data address's IP or DNS name)".to_string()
        }
        rustls::Error::InvalidCertificate(c) => format!("the node's certificate is refused: {c}"),
        rustls::Error::AlertReceived(a) => format!(
            "the node ended the TLS handshake with the alert {a:?} (is client-cert.pem signed by the CA the node trusts?)"
        ),
        other => format!("TLS: {other}"),
    }
}

/// A TLS failure on a connection a node accepted, for its log (see
/// [`describe_client_error`] for `in_handshake`).
pub fn describe_server_error(e: &rustls::Error, dir: &Path, in_handshake: bool) -> String {
    let ca = dir.join("ca-cert.pem");
    match e {
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. }
            if in_handshake =>
        {
            "the peer does not speak TLS (not a TLS record) and this data port requires TLS (--tls-creds): give the client --data-tls-creds".to_string()
        }
        rustls::Error::NoCertificatesPresented => format!(
            "the peer presented no certificate: one signed by the CA in {} is required",
            ca.display()
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => format!("the peer's certificate is not signed by the CA in {}", ca.display()),
        rustls::Error::InvalidCertificate(c) => format!("the peer's certificate is refused: {c}"),
        rustls::Error::AlertReceived(a) => format!(
            "the peer ended the TLS handshake with the alert {a:?} (does it trust the CA that signed server-cert.pem?)"
        ),
        other => format!("TLS: {other}"),
    }
}

/// Driving a rustls connection on a non-blocking socket from an epoll
/// loop, at the loop's socket boundary. Plaintext crosses rustls's
/// buffers once each way (one copy), and rustls allocates per record.
/// After a read, rustls may hold decrypted bytes the socket no longer
/// signals (epoll sees the socket, not rustls): a caller keeps reading
/// while [`has_plaintext`] says so. While `wants_write()`, the caller
/// keeps EPOLLOUT armed.
pub mod wire {
    use std::io::{self, IoSlice, Read, Write};

    use rustls::Connection;

    /// Sends what rustls holds for the socket. `Err(WouldBlock)`: the
    /// socket is full; the rest waits for EPOLLOUT.
    pub fn send_pending<S: Write>(tls: &mut Connection, sock: &mut S) -> io::Result<()> {
        while tls.wants_write() {
            match tls.write_tls(sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads plaintext into `buf`, pulling records from the socket as
    /// needed (the handshake included: its answers are sent as far as the
    /// socket takes them). `Ok(0)`: the peer closed. `Err(WouldBlock)`:
    /// nothing more now. A TLS failure is `InvalidData` wrapping the
    /// `rustls::Error` (an alert is sent first).
    pub fn read_plain<S: Read + Write>(
        tls: &mut Connection,
        sock: &mut S,
        buf: &mut [u8],
    ) -> io::Result<usize> {
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            match tls.read_tls(sock) {
                Ok(0) => return Ok(0),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if let Err(e) = tls.process_new_packets() {
                let _ = send_pending(tls, sock);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            match send_pending(tls, sock) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Encrypts as much of `bufs` as rustls takes and sends what the
    /// socket takes. Returns the plaintext bytes taken (they are the
    /// connection's now); `Err(WouldBlock)` when records are still waiting
    /// for the socket and nothing was taken.
    pub fn write_plain<S: Write>(
        tls: &mut Connection,
        sock: &mut S,
        bufs: &[IoSlice<'_>],
    ) -> io::Result<usize> {
        send_pending(tls, sock)?;
        let n = tls.writer().write_vectored(bufs)?;
        match send_pending(tls, sock) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    /// Whether rustls holds decrypted bytes not read yet (see the module doc).
    pub fn has_plaintext(tls: &mut Connection) -> bool {
        tls.process_new_packets()
            .is_ok_and(|s| s.plaintext_bytes_to_read() > 0)
    }

    /// The rustls error inside an I/O error of these functions, if any.
    pub fn tls_error(e: &io::Error) -> Option<&rustls::Error> {
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
    }
}
