//! Newstyle fixed handshake: greeting, client flags, the option haggling.
//! Ends in transmission (OPT_GO, OPT_EXPORT_NAME), in TLS (OPT_STARTTLS:
//! the caller runs the TLS handshake and the haggling again over it), or
//! in a closed connection (OPT_ABORT, EOF, protocol violation).
//!
//! What the haggling turns on for the transmission ([`Negotiated`]):
//! structured replies (OPT_STRUCTURED_REPLY), and the `base:allocation`
//! metadata context (OPT_SET_META_CONTEXT, which needs structured replies
//! first). STARTTLS forgets both, as the spec asks.

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

/// What the client turned on for the transmission phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Negotiated {
    /// NBD_OPT_STRUCTURED_REPLY was acknowledged.
    pub(crate) structured_replies: bool,
    /// The last NBD_OPT_SET_META_CONTEXT selected `base:allocation`.
    pub(crate) base_allocation: bool,
}

impl Negotiated {
    /// The transmission flags this connection sees: NBD_FLAG_SEND_DF only
    /// with structured replies.
    pub(crate) fn transmission_flags(&self, export: &Export) -> u16 {
        if self.structured_replies {
            export.transmission_flags | TF_SEND_DF
        } else {
            export.transmission_flags
        }
    }
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
    negotiated: &mut Negotiated,
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
                *negotiated = Negotiated::default();
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
                r.extend_from_slice(&negotiated.transmission_flags(export).to_be_bytes());
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
                info.extend_from_slice(&negotiated.transmission_flags(export).to_be_bytes());
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
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    reply(
                        s,
                        opt,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY carries no data",
                    )?;
                    continue;
                }
                negotiated.structured_replies = true;
                reply(s, opt, REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(s, opt, data, export, negotiated)?;
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

/// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT: the one
/// context is `base:allocation`. LIST answers it for no query, `base:` or
/// `base:allocation`; SET selects it for `base:allocation` (and replaces
/// any earlier selection, also when it fails). Queries of other
/// namespaces are ignored, as the spec asks.
fn meta_context<S: Write>(
    s: &mut S,
    opt: u32,
    data: &[u8],
    export: &Export,
    negotiated: &mut Negotiated,
) -> Result<(), ConnError> {
    let set = opt == OPT_SET_META_CONTEXT;
    if set {
        negotiated.base_allocation = false;
    }
    if !negotiated.structured_replies {
        let msg = "negotiate NBD_OPT_STRUCTURED_REPLY before metadata contexts";
        return reply(s, opt, REP_ERR_INVALID, msg.as_bytes());
    }
    let Some((name, queries)) = parse_meta_request(data) else {
        return reply(
            s,
            opt,
            REP_ERR_INVALID,
            b"malformed NBD_OPT_LIST/SET_META_CONTEXT data",
        );
    };
    if !name_matches(&name, export) {
        let msg = format!("no export named {name:?}");
        return reply(s, opt, REP_ERR_UNKNOWN, msg.as_bytes());
    }
    let matches = |q: &[u8]| q == BASE_ALLOCATION.as_bytes() || (!set && q == b"base:".as_slice());
    let selected = if queries.is_empty() {
        !set
    } else {
        queries.iter().any(|q| matches(q))
    };
    if selected {
        // LIST answers with id 0 (reserved there, the spec says).
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        let mut d = Vec::with_capacity(4 + BASE_ALLOCATION.len());
        d.extend_from_slice(&id.to_be_bytes());
        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
        reply(s, opt, REP_META_CONTEXT, &d)?;
        negotiated.base_allocation = set;
    }
    reply(s, opt, REP_ACK, &[])
}

/// Meta context request data: u32 name length, name, u32 query count,
/// then per query u32 length and the query.
fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<&[u8]>)> {
    let u32_at = |d: &[u8], at: usize| -> Option<usize> {
        Some(u32::from_be_bytes(d.get(at..at.checked_add(4)?)?.try_into().ok()?) as usize)
    };
    let name_len = u32_at(data, 0)?;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let mut at = 4 + name_len;
    let count = u32_at(data, at)?;
    at += 4;
    // Each query takes at least its 4-byte length: a count beyond what
    // the data holds is malformed (and never allocated for).
    if count > (data.len() - at) / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = u32_at(data, at)?;
        at += 4;
        queries.push(data.get(at..at.checked_add(len)?)?);
        at += len;
    }
    if at != data.len() {
        return None;
    }
    Some((String::from_utf8_lossy(name).into_owned(), queries))
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
