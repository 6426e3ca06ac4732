//! Raw celer-proto v3 connections for tests: the handshake (the node's
//! Challenge, a Hello with a credential's proof, the node's proof back) and
//! blocking calls, for replica comparison and for attacks.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use celer_proto::auth::{data_key_from_secret, Credential, HelloProof};
use celer_proto::{decode_header, Header, Kind, Op, Status, HEADER_BYTES};

/// The cluster credential of a test cluster whose secret is `secret` (what
/// nodes prove to each other).
pub fn node_credential(secret: &str) -> Credential {
    Credential::Node {
        key: data_key_from_secret(secret),
    }
}

/// Reads one whole frame.
pub fn read_frame(s: &mut TcpStream) -> std::io::Result<(Header, Vec<u8>)> {
    let mut b = [0u8; HEADER_BYTES];
    s.read_exact(&mut b)?;
    let h = decode_header(&b)
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .ok_or_else(|| std::io::Error::other("short header"))?;
    let mut p = vec![0u8; h.payload_bytes as usize];
    s.read_exact(&mut p)?;
    h.verify_payload([&p[..]])
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok((h, p))
}

/// Sends a frame and reads the answer.
pub fn call(s: &mut TcpStream, h: Header, payload: &[u8]) -> (Header, Vec<u8>) {
    let h = h.with_payload([payload]);
    s.write_all(&h.encode()).expect("send");
    s.write_all(payload).expect("send");
    let r = read_frame(s).expect("response");
    assert_eq!(r.0.kind, Kind::Response);
    r
}

/// Connects to a node shard and proves `cred`: the stream, or the status
/// the node refused the Hello with.
pub fn connect(addr: SocketAddr, shard: u16, cred: &Credential) -> Result<TcpStream, Status> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.set_nodelay(true).expect("nodelay");
    let (c, nonce) = read_frame(&mut s).expect("the node's Challenge");
    assert_eq!((c.kind, c.op), (Kind::Request, Op::Challenge));
    let nonce: [u8; 32] = nonce.try_into().expect("32-byte nonce");
    let mine = [0x42u8; 32];
    let sender = match cred {
        Credential::Attachment { capability, .. } => capability.attachment as u64,
        Credential::Node { .. } => 999,
    };
    let proof = HelloProof::build(cred, &nonce, &mine, shard, sender, false);
    let mut h = Header::request(Op::Hello, u32::MAX);
    h.offset = shard as u64;
    h.volume = sender;
    let (r, answer) = call(&mut s, h, &proof);
    if r.status != Status::Ok {
        return Err(r.status);
    }
    assert!(
        HelloProof::check_answer(cred.answer_key(), &nonce, &mine, &answer),
        "the node proves it knows the key"
    );
    Ok(s)
}
