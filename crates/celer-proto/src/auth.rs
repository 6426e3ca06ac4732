//! Credentials of the data path: the cluster data key, per-volume
//! capabilities, and the challenge-response proofs of the handshake.
//!
//! - The **data key** (32 bytes) is known to the control service and the
//!   storage nodes: [`data_key_from_secret`] derives it from the cluster
//!   secret they share. Nodes prove it to each other in their Hello.
//! - A **capability** is what the control service hands an attaching client:
//!   volume id, attachment id, fence generation, read-only or read-write,
//!   expiry, and an HMAC-SHA256 over all of them keyed by the data key. A
//!   node checks the MAC itself: no call to the control service per
//!   connection.
//! - The **attachment key** is HMAC(data key, capability MAC): the control
//!   service gives it to the client beside the capability; a node derives it
//!   from the capability presented. The client proves it holds the key; the
//!   capability alone (seen on the wire) is worth nothing.
//!
//! - An **admin ticket** ([`AdminTicket`]) lets an operator drive a node's
//!   admin controls for a while without holding the node credential.
//!
//! Every MAC is compared in constant time (`hmac`'s `verify_slice`).

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a key (data key, attachment key).
pub const KEY_BYTES: usize = 32;
/// Bytes of a handshake nonce.
pub const NONCE_BYTES: usize = 32;
/// Bytes of a MAC.
pub const MAC_BYTES: usize = 32;

pub type Key = [u8; KEY_BYTES];
pub type Nonce = [u8; NONCE_BYTES];
pub type MacBytes = [u8; MAC_BYTES];

/// Why a credential is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error(
        "the capability's signature does not verify: forged, or minted with another cluster's key"
    )]
    BadCapability,
    #[error("the capability expired at {expires_unix_ms} (now {now_unix_ms})")]
    Expired {
        expires_unix_ms: u64,
        now_unix_ms: u64,
    },
    #[error("the admin ticket's signature does not verify: forged, or minted by another cluster's control service")]
    BadTicket,
    #[error("the proof of the key does not verify: wrong key or replayed handshake")]
    BadProof,
    #[error("unknown credential role {0}")]
    Role(u8),
}

fn mac(key: &[u8], parts: &[&[u8]]) -> MacBytes {
    // HMAC takes keys of any length.
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn verify(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    for p in parts {
        m.update(p);
    }
    m.verify_slice(tag).is_ok()
}

/// The data key of a cluster whose nodes and control service share `secret`
/// (the node credential).
pub fn data_key_from_secret(secret: &str) -> Key {
    mac(secret.as_bytes(), &[b"celer data key v1"])
}

/// A per-volume capability, signed by the control service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    pub volume: u64,
    pub attachment: u32,
    pub fence: u32,
    pub read_only: bool,
    pub expires_unix_ms: u64,
    pub mac: MacBytes,
}

const CAP_FORMAT: u8 = 1;
const CAP_READ_ONLY: u8 = 1;

impl Capability {
    /// Bytes of an encoded capability.
    pub const BYTES: usize = 64;

    /// The signed fields: format u8, flags u8, 2 zero, attachment u32,
    /// volume u64, fence u32, 4 zero, expiry u64 (32 bytes).
    fn fields(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0] = CAP_FORMAT;
        b[1] = if self.read_only { CAP_READ_ONLY } else { 0 };
        b[4..8].copy_from_slice(&self.attachment.to_le_bytes());
        b[8..16].copy_from_slice(&self.volume.to_le_bytes());
        b[16..20].copy_from_slice(&self.fence.to_le_bytes());
        b[24..32].copy_from_slice(&self.expires_unix_ms.to_le_bytes());
        b
    }

    /// A capability signed with `data_key` (the control service's job).
    pub fn mint(
        data_key: &Key,
        volume: u64,
        attachment: u32,
        fence: u32,
        read_only: bool,
        expires_unix_ms: u64,
    ) -> Capability {
        let mut c = Capability {
            volume,
            attachment,
            fence,
            read_only,
            expires_unix_ms,
            mac: [0; MAC_BYTES],
        };
        c.mac = mac(data_key, &[b"celer capability v1", &c.fields()]);
        c
    }

    /// The key of the attachment this capability was minted for.
    pub fn attachment_key(&self, data_key: &Key) -> Key {
        mac(data_key, &[b"celer attachment key v1", &self.mac])
    }

    /// Checks the signature and the expiry (at `now_unix_ms`).
    pub fn verify(&self, data_key: &Key, now_unix_ms: u64) -> Result<(), AuthError> {
        if !verify(
            data_key,
            &[b"celer capability v1", &self.fields()],
            &self.mac,
        ) {
            return Err(AuthError::BadCapability);
        }
        if now_unix_ms >= self.expires_unix_ms {
            return Err(AuthError::Expired {
                expires_unix_ms: self.expires_unix_ms,
                now_unix_ms,
            });
        }
        Ok(())
    }

    pub fn encode(&self) -> [u8; Self::BYTES] {
        let mut b = [0u8; Self::BYTES];
        b[..32].copy_from_slice(&self.fields());
        b[32..].copy_from_slice(&self.mac);
        b
    }

    /// Decodes the layout only; [`Capability::verify`] says whether to trust it.
    pub fn decode(b: &[u8]) -> Result<Capability, AuthError> {
        if b.len() != Self::BYTES {
            return Err(AuthError::Malformed("capability: wrong length"));
        }
        if b[0] != CAP_FORMAT {
            return Err(AuthError::Malformed("capability: unknown format"));
        }
        if b[1] & !CAP_READ_ONLY != 0 || b[2..4] != [0, 0] || b[20..24] != [0; 4] {
            return Err(AuthError::Malformed("capability: reserved bits set"));
        }
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(a)
        };
        let mut m = [0u8; MAC_BYTES];
        m.copy_from_slice(&b[32..]);
        Ok(Capability {
            read_only: b[1] & CAP_READ_ONLY != 0,
            attachment: u32_at(4),
            volume: u64_at(8),
            fence: u32_at(16),
            expires_unix_ms: u64_at(24),
            mac: m,
        })
    }

    /// Lower-case hex of the encoded capability (for JSON and files).
    pub fn to_hex(&self) -> String {
        to_hex(&self.encode())
    }

    pub fn from_hex(s: &str) -> Result<Capability, AuthError> {
        let b = from_hex(s).ok_or(AuthError::Malformed("capability: not hex"))?;
        Capability::decode(&b)
    }
}

/// What an operator presents to a node's admin server for its controls
/// (`celer scrub start|pause|resume`): minted by the control service for a
/// caller with an operator token (`POST /v1/admin-ticket`), signed with the
/// data key, valid until `expires_unix_ms`. Operators never hold the node
/// credential, and nodes know no operator token: they check the signature.
/// Layout: expiry u64, name length u8, name (the operator token's name, at
/// most [`AdminTicket::NAME_MAX`] bytes, for the node's log), MAC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminTicket {
    pub operator: String,
    pub expires_unix_ms: u64,
}

impl AdminTicket {
    /// Longest operator name a ticket carries (longer ones are cut).
    pub const NAME_MAX: usize = 64;
    /// How long a ticket is valid.
    pub const TTL_MS: u64 = 10 * 60 * 1000;

    fn signed(name: &[u8], expires_unix_ms: u64) -> Vec<u8> {
        let mut b = Vec::with_capacity(9 + name.len());
        b.extend_from_slice(&expires_unix_ms.to_le_bytes());
        b.push(name.len() as u8);
        b.extend_from_slice(name);
        b
    }

    /// A ticket for `operator` valid until `expires_unix_ms`, as hex (the
    /// control service's job).
    pub fn mint(data_key: &Key, operator: &str, expires_unix_ms: u64) -> String {
        let mut end = operator.len().min(Self::NAME_MAX);
        while !operator.is_char_boundary(end) {
            end -= 1;
        }
        let mut b = Self::signed(&operator.as_bytes()[..end], expires_unix_ms);
        let m = mac(data_key, &[b"celer admin ticket v1", &b]);
        b.extend_from_slice(&m);
        to_hex(&b)
    }

    /// The ticket `hex` if its signature verifies with `data_key` and it
    /// has not expired at `now_unix_ms`.
    pub fn verify(data_key: &Key, hex: &str, now_unix_ms: u64) -> Result<AdminTicket, AuthError> {
        let b = from_hex(hex).ok_or(AuthError::Malformed("admin ticket: not hex"))?;
        if b.len() < 9 + MAC_BYTES {
            return Err(AuthError::Malformed("admin ticket: too short"));
        }
        let n = b[8] as usize;
        if n > Self::NAME_MAX || b.len() != 9 + n + MAC_BYTES {
            return Err(AuthError::Malformed("admin ticket: wrong length"));
        }
        let (body, tag) = b.split_at(9 + n);
        if !verify(data_key, &[b"celer admin ticket v1", body], tag) {
            return Err(AuthError::BadTicket);
        }
        let mut e = [0u8; 8];
        e.copy_from_slice(&body[..8]);
        let expires_unix_ms = u64::from_le_bytes(e);
        if now_unix_ms >= expires_unix_ms {
            return Err(AuthError::Expired {
                expires_unix_ms,
                now_unix_ms,
            });
        }
        Ok(AdminTicket {
            operator: String::from_utf8_lossy(&body[9..]).into_owned(),
            expires_unix_ms,
        })
    }
}

/// Lower-case hex.
pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes of a hex string (`None` if it is not hex of whole bytes).
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A key from hex (64 hex digits).
pub fn key_from_hex(s: &str) -> Option<Key> {
    from_hex(s)?.try_into().ok()
}

/// What a connection's peer holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// A storage node: the cluster data key.
    Node { key: Key },
    /// A client: a capability and its attachment key.
    Attachment { capability: Capability, key: Key },
}

impl Credential {
    fn role(&self) -> u8 {
        match self {
            Credential::Node { .. } => ROLE_NODE,
            Credential::Attachment { .. } => ROLE_ATTACHMENT,
        }
    }
    fn key(&self) -> &Key {
        match self {
            Credential::Node { key } | Credential::Attachment { key, .. } => key,
        }
    }
}

const ROLE_NODE: u8 = 1;
const ROLE_ATTACHMENT: u8 = 2;

/// The payload of a `Hello` or `Renew`: the peer's nonce, its role, its
/// proof, and its capability (attachments). Layout: nonce 32, role u8,
/// 7 zero, proof 32, capability 64 (attachments only).
pub struct HelloProof;

impl HelloProof {
    /// Bytes of a node's proof payload.
    pub const NODE_BYTES: usize = NONCE_BYTES + 8 + MAC_BYTES;
    /// Bytes of an attachment's proof payload.
    pub const ATTACHMENT_BYTES: usize = Self::NODE_BYTES + Capability::BYTES;
    /// The largest proof payload a node accepts.
    pub const MAX_BYTES: usize = Self::ATTACHMENT_BYTES;

    fn transcript(
        node_nonce: &Nonce,
        peer_nonce: &Nonce,
        role: u8,
        shard: u16,
        sender: u64,
    ) -> [u8; 2 * NONCE_BYTES + 11] {
        let mut t = [0u8; 2 * NONCE_BYTES + 11];
        t[..NONCE_BYTES].copy_from_slice(node_nonce);
        t[NONCE_BYTES..2 * NONCE_BYTES].copy_from_slice(peer_nonce);
        t[2 * NONCE_BYTES] = role;
        t[2 * NONCE_BYTES + 1..2 * NONCE_BYTES + 3].copy_from_slice(&shard.to_le_bytes());
        t[2 * NONCE_BYTES + 3..].copy_from_slice(&sender.to_le_bytes());
        t
    }

    /// The payload proving `cred` to the node that sent `node_nonce`, for a
    /// connection to `shard` by `sender` (the Hello's `offset` and `volume`).
    /// `renew`: for a `Renew` frame rather than a `Hello`.
    pub fn build(
        cred: &Credential,
        node_nonce: &Nonce,
        peer_nonce: &Nonce,
        shard: u16,
        sender: u64,
        renew: bool,
    ) -> Vec<u8> {
        let what: &[u8] = if renew {
            b"celer renew v3"
        } else {
            b"celer hello v3"
        };
        let t = Self::transcript(node_nonce, peer_nonce, cred.role(), shard, sender);
        let proof = mac(cred.key(), &[what, &t]);
        let mut out = Vec::with_capacity(Self::MAX_BYTES);
        out.extend_from_slice(peer_nonce);
        out.push(cred.role());
        out.extend_from_slice(&[0; 7]);
        out.extend_from_slice(&proof);
        if let Credential::Attachment { capability, .. } = cred {
            out.extend_from_slice(&capability.encode());
        }
        out
    }

    /// Checks a proof payload on the node: returns who the peer is and the
    /// peer's nonce (for the node's answer).
    pub fn check(
        payload: &[u8],
        data_key: &Key,
        node_nonce: &Nonce,
        shard: u16,
        sender: u64,
        renew: bool,
        now_unix_ms: u64,
    ) -> Result<(Peer, Nonce), AuthError> {
        if payload.len() < Self::NODE_BYTES {
            return Err(AuthError::Malformed("hello proof: too short"));
        }
        let mut peer_nonce = [0u8; NONCE_BYTES];
        peer_nonce.copy_from_slice(&payload[..NONCE_BYTES]);
        let role = payload[NONCE_BYTES];
        if payload[NONCE_BYTES + 1..NONCE_BYTES + 8] != [0; 7] {
            return Err(AuthError::Malformed("hello proof: reserved bytes set"));
        }
        let proof = &payload[NONCE_BYTES + 8..Self::NODE_BYTES];
        let (peer, key) = match role {
            ROLE_NODE if payload.len() == Self::NODE_BYTES && !renew => {
                (Peer::Node { id: sender }, *data_key)
            }
            ROLE_ATTACHMENT if payload.len() == Self::ATTACHMENT_BYTES => {
                let cap = Capability::decode(&payload[Self::NODE_BYTES..])?;
                cap.verify(data_key, now_unix_ms)?;
                (Peer::Attachment(cap), cap.attachment_key(data_key))
            }
            ROLE_NODE | ROLE_ATTACHMENT => {
                return Err(AuthError::Malformed(
                    "hello proof: wrong length for its role",
                ))
            }
            r => return Err(AuthError::Role(r)),
        };
        let what: &[u8] = if renew {
            b"celer renew v3"
        } else {
            b"celer hello v3"
        };
        let t = Self::transcript(node_nonce, &peer_nonce, role, shard, sender);
        if !verify(&key, &[what, &t], proof) {
            return Err(AuthError::BadProof);
        }
        Ok((peer, peer_nonce))
    }

    /// The node's answer to an accepted Hello: proof that it knows the key.
    pub fn answer(key: &Key, node_nonce: &Nonce, peer_nonce: &Nonce) -> MacBytes {
        mac(key, &[b"celer hello ack v3", peer_nonce, node_nonce])
    }

    /// Checks the node's answer on the peer.
    pub fn check_answer(key: &Key, node_nonce: &Nonce, peer_nonce: &Nonce, answer: &[u8]) -> bool {
        verify(
            key,
            &[b"celer hello ack v3", peer_nonce, node_nonce],
            answer,
        )
    }
}

impl Credential {
    /// The key the node's answer is checked with.
    pub fn answer_key(&self) -> &Key {
        self.key()
    }
}

/// Who a connection's peer proved to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A storage node (the Hello's sender id).
    Node { id: u64 },
    /// A client holding this capability.
    Attachment(Capability),
}

impl Peer {
    /// The key the node answers with.
    pub fn key(&self, data_key: &Key) -> Key {
        match self {
            Peer::Node { .. } => *data_key,
            Peer::Attachment(cap) => cap.attachment_key(data_key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn attach(key: &Key) -> Credential {
        let capability = Capability::mint(key, 7, 42, 0, false, NOW + 1000);
        Credential::Attachment {
            key: capability.attachment_key(key),
            capability,
        }
    }

    #[test]
    fn an_admin_ticket_verifies_until_it_expires_and_no_tampering_passes() {
        let dk = data_key_from_secret("s3cret");
        let t = AdminTicket::mint(&dk, "alice", NOW + 1000);
        let got = AdminTicket::verify(&dk, &t, NOW).expect("valid");
        assert_eq!(got.operator, "alice");
        assert_eq!(got.expires_unix_ms, NOW + 1000);
        assert!(matches!(
            AdminTicket::verify(&dk, &t, NOW + 1000),
            Err(AuthError::Expired { .. })
        ));
        let other = data_key_from_secret("another cluster");
        assert_eq!(
            AdminTicket::verify(&other, &t, NOW),
            Err(AuthError::BadTicket)
        );
        // Every flipped bit fails (a later expiry, another name, the MAC).
        let b = from_hex(&t).expect("hex");
        for bit in 0..b.len() * 8 {
            let mut c = b.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(
                AdminTicket::verify(&dk, &to_hex(&c), NOW).is_err(),
                "bit {bit} flipped and still valid"
            );
        }
        assert!(AdminTicket::verify(&dk, "zz", NOW).is_err());
        assert!(AdminTicket::verify(&dk, &t[..t.len() - 2], NOW).is_err());
        // A long name is cut at a character boundary, not refused.
        let long = "é".repeat(40);
        let t = AdminTicket::mint(&dk, &long, NOW + 1);
        let got = AdminTicket::verify(&dk, &t, NOW).expect("valid");
        assert_eq!(got.operator, "é".repeat(32));
    }

    #[test]
    fn a_valid_hello_passes_and_every_tampering_fails() {
        let dk = data_key_from_secret("s3cret");
        let cred = attach(&dk);
        let (nn, pn) = ([1u8; 32], [2u8; 32]);
        let p = HelloProof::build(&cred, &nn, &pn, 3, 9, false);
        let (peer, got) = HelloProof::check(&p, &dk, &nn, 3, 9, false, NOW).expect("valid");
        assert_eq!(got, pn);
        let Peer::Attachment(cap) = peer else {
            panic!("not an attachment")
        };
        assert_eq!((cap.volume, cap.attachment), (7, 42));
        // Any flipped bit of the payload fails.
        for bit in 0..p.len() * 8 {
            let mut q = p.clone();
            q[bit / 8] ^= 1 << (bit % 8);
            assert!(
                HelloProof::check(&q, &dk, &nn, 3, 9, false, NOW).is_err(),
                "bit {bit}"
            );
        }
        // Another node nonce (replay), shard, sender, or purpose fails.
        assert!(HelloProof::check(&p, &dk, &[3; 32], 3, 9, false, NOW).is_err());
        assert!(HelloProof::check(&p, &dk, &nn, 4, 9, false, NOW).is_err());
        assert!(HelloProof::check(&p, &dk, &nn, 3, 8, false, NOW).is_err());
        assert!(HelloProof::check(&p, &dk, &nn, 3, 9, true, NOW).is_err());
        // Another cluster's key fails; an expired capability fails.
        let other = data_key_from_secret("other");
        assert_eq!(
            HelloProof::check(&p, &other, &nn, 3, 9, false, NOW).unwrap_err(),
            AuthError::BadCapability
        );
        assert!(matches!(
            HelloProof::check(&p, &dk, &nn, 3, 9, false, NOW + 1000),
            Err(AuthError::Expired { .. })
        ));
        // The node's answer checks with the attachment key only.
        let a = HelloProof::answer(&peer.key(&dk), &nn, &pn);
        assert!(HelloProof::check_answer(cred.answer_key(), &nn, &pn, &a));
        assert!(!HelloProof::check_answer(&dk, &nn, &pn, &a));
    }

    #[test]
    fn a_capability_alone_proves_nothing_and_a_node_key_is_needed_for_a_node_hello() {
        let dk = data_key_from_secret("s3cret");
        let Credential::Attachment { capability, .. } = attach(&dk) else {
            unreachable!()
        };
        // Someone who saw the capability on the wire but lacks its key.
        let thief = Credential::Attachment {
            capability,
            key: [0; 32],
        };
        let p = HelloProof::build(&thief, &[1; 32], &[2; 32], 0, 0, false);
        assert_eq!(
            HelloProof::check(&p, &dk, &[1; 32], 0, 0, false, NOW).unwrap_err(),
            AuthError::BadProof
        );
        let node = Credential::Node { key: dk };
        let p = HelloProof::build(&node, &[1; 32], &[2; 32], 1, 5, false);
        assert_eq!(
            HelloProof::check(&p, &dk, &[1; 32], 1, 5, false, NOW)
                .unwrap()
                .0,
            Peer::Node { id: 5 }
        );
        let wrong = Credential::Node { key: [9; 32] };
        let p = HelloProof::build(&wrong, &[1; 32], &[2; 32], 1, 5, false);
        assert!(HelloProof::check(&p, &dk, &[1; 32], 1, 5, false, NOW).is_err());
    }

    #[test]
    fn capabilities_round_trip_and_refuse_reserved_bits() {
        let dk = data_key_from_secret("x");
        let c = Capability::mint(&dk, u64::MAX, u32::MAX, 3, true, 99);
        assert_eq!(Capability::from_hex(&c.to_hex()).unwrap(), c);
        let mut b = c.encode();
        b[2] = 1;
        assert!(Capability::decode(&b).is_err());
        assert!(Capability::decode(&b[..10]).is_err());
        assert_eq!(key_from_hex(&to_hex(&dk)), Some(dk));
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex("abc"), None);
    }
}
