//! Newstyle fixed handshake: greeting, client flags, the option haggling.
//! Ends in transmission (OPT_GO, OPT_EXPORT_NAME), in TLS (OPT_STARTTLS:
//! the caller runs the TLS handshake and the haggling again over it), or
//! in a closed connection (OPT_ABORT, EOF, protocol violation).

use std::io::{Read, Write};

use crate::conn::ConnError;
use crate::proto::*;
use crate::Export;

/// Option data larger than this closes the connection (never allocated).
pub(crate) const OPTION_DATA_MAX_BYTES: u32 = 4096;
/// Options one connection may send before transmission (TLS or not).
pub(crate) const OPTIONS_MAX: usize = 64;

/// How the haggling ended.
pub(crate) enum Outcome {
    Transmission,
    Aborted,
    /// STARTTLS was acknowledged: the next bytes are a TLS ClientHello.
    StartTls,
}

/// Where the haggling runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Before TLS, on a server without TLS or where TLS is optional.
    Plain { tls_offered: bool },
    /// Before TLS where TLS is required: every option but STARTTLS and
    /// ABORT gets NBD_REP_ERR_TLS_REQD (EXPORT_NAME, which has no error
    /// reply, closes the connection).
    TlsRequired,
    /// Over TLS (no greeting again; STARTTLS is refused).
    Tls,
    /// Over TLS with a client the server does not authorize: every option
    /// gets NBD_REP_ERR_POLICY (so the client can say why), then the
    /// connection closes.
    Denied,
}

/// Greets the client (except over TLS) and haggles until an outcome.
/// `no_zeroes` carries the client's flag across STARTTLS; `options_left`
/// counts options across it.
pub(crate) fn negotiate<S: Read + Write>(
    s: &mut S,
    export: &Export,
    phase: Phase,
    no_zeroes: &mut bool,
    options_left: &mut usize,
) -> Result<Outcome, ConnError> {
    if matches!(phase, Phase::Plain { .. } | Phase::TlsRequired) {
        *no_zeroes = greet(s)?;
    }
    let no_zeroes = *no_zeroes;
    let tls_offered = match phase {
        Phase::Plain { tls_offered } => tls_offered,
        Phase::TlsRequired => true,
        Phase::Tls | Phase::Denied => false,
    };
    let mut data = [0u8; OPTION_DATA_MAX_BYTES as usize];
    let mut warned = false;
    while *options_left > 0 {
        *options_left -= 1;
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let magic = u64::from_be_bytes(h[0..8].try_into().expect("8 bytes"));
        let opt = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
        if magic != IHAVEOPT {
            return Err(ConnError::Protocol(format!(
                "bad option magic {magic:#x} (expected IHAVEOPT)"
            )));
        }
        if len > OPTION_DATA_MAX_BYTES {
            return Err(ConnError::Protocol(format!(
                "option {opt} carries {len} bytes (limit {OPTION_DATA_MAX_BYTES})"
            )));
        }
        let data = &mut data[..len as usize];
        s.read_exact(data)?;
        if phase == Phase::TlsRequired && opt != OPT_STARTTLS && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Err(ConnError::Tls(
                    "NBD_OPT_EXPORT_NAME before STARTTLS on a server that requires TLS".into(),
                ));
            }
            let msg = format!("TLS is required: send NBD_OPT_STARTTLS before option {opt}");
            reply(s, opt, REP_ERR_TLS_REQD, msg.as_bytes())?;
            if !warned {
                warned = true;
                tracing::warn!(
                    opt,
                    "refusing NBD option {opt} before STARTTLS: this server requires TLS"
                );
            }
            continue;
        }
        if phase == Phase::Denied {
            if opt == OPT_ABORT {
                let _ = reply(s, opt, REP_ACK, &[]);
            }
            if opt == OPT_ABORT || opt == OPT_EXPORT_NAME {
                return Ok(Outcome::Aborted);
            }
            reply(
                s,
                opt,
                REP_ERR_POLICY,
                b"this client certificate is not allowed on this server",
            )?;
            continue;
        }
        match opt {
            OPT_STARTTLS if tls_offered => {
                if len != 0 {
                    reply(s, opt, REP_ERR_INVALID, b"NBD_OPT_STARTTLS carries no data")?;
                    continue;
                }
                reply(s, opt, REP_ACK, &[])?;
                return Ok(Outcome::StartTls);
            }
            OPT_STARTTLS if phase == Phase::Tls => {
                reply(s, opt, REP_ERR_INVALID, b"TLS is already on")?;
            }
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(data);
                if !name_matches(&name, export) {
                    // No error reply exists for this option: the spec says close.
                    return Err(ConnError::Protocol(format!(
                        "NBD_OPT_EXPORT_NAME asks for unknown export {name:?}"
                    )));
                }
                let mut r = Vec::with_capacity(10 + 124);
                r.extend_from_slice(&export.size_bytes.to_be_bytes());
                r.extend_from_slice(&export.transmission_flags.to_be_bytes());
                if !no_zeroes {
                    r.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&r)?;
                return Ok(Outcome::Transmission);
            }
            OPT_ABORT => {
                // The client may already be gone; the ack is a courtesy.
                let _ = reply(s, opt, REP_ACK, &[]);
                return Ok(Outcome::Aborted);
            }
            OPT_LIST => {
                if len != 0 {
                    reply(s, opt, REP_ERR_INVALID, b"NBD_OPT_LIST carries no data")?;
                    continue;
                }
                let mut d = Vec::with_capacity(4 + export.name.len());
                d.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                d.extend_from_slice(export.name.as_bytes());
                reply(s, opt, REP_SERVER, &d)?;
                reply(s, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let Some(name) = parse_info_request(data) else {
                    reply(s, opt, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO data")?;
                    continue;
                };
                if !name_matches(&name, export) {
                    let msg = format!("no export named {name:?}");
                    reply(s, opt, REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                }
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&export.size_bytes.to_be_bytes());
                info.extend_from_slice(&export.transmission_flags.to_be_bytes());
                reply(s, opt, REP_INFO, &info)?;
                // Sent whether asked or not (the spec allows it): clients
                // that ignore it and send misaligned requests get EINVAL.
                let mut bs = Vec::with_capacity(14);
                bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                bs.extend_from_slice(&export.min_block_bytes.to_be_bytes());
                bs.extend_from_slice(&export.preferred_block_bytes.to_be_bytes());
                bs.extend_from_slice(&export.max_block_bytes.to_be_bytes());
                reply(s, opt, REP_INFO, &bs)?;
                reply(s, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(Outcome::Transmission);
                }
            }
            _ => {
                let msg = format!("option {opt} is not supported");
                reply(s, opt, REP_ERR_UNSUP, msg.as_bytes())?;
            }
        }
    }
    Err(ConnError::Protocol(format!(
        "more than {OPTIONS_MAX} options without starting transmission"
    )))
}

/// Sends the greeting and reads the client's flags; returns NO_ZEROES.
fn greet<S: Read + Write>(s: &mut S) -> Result<bool, ConnError> {
    let mut hello = [0u8; 18];
    hello[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    hello[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(ConnError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    Ok(client_flags & CLIENT_NO_ZEROES != 0)
}

fn name_matches(name: &str, export: &Export) -> bool {
    name.is_empty() || name == export.name
}

/// OPT_INFO/OPT_GO data: u32 name length, name, u16 count, count × u16.
fn parse_info_request(data: &[u8]) -> Option<String> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    if rest.len() != 2 + 2 * count {
        return None;
    }
    Some(String::from_utf8_lossy(name).into_owned())
}

fn reply<S: Write>(s: &mut S, opt: u32, rep: u32, data: &[u8]) -> Result<(), ConnError> {
    let mut r = Vec::with_capacity(20 + data.len());
    r.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    r.extend_from_slice(&opt.to_be_bytes());
    r.extend_from_slice(&rep.to_be_bytes());
    r.extend_from_slice(&(data.len() as u32).to_be_bytes());
    r.extend_from_slice(data);
    s.write_all(&r)?;
    Ok(())
}
