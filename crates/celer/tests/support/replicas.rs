//! Compares the replicas of every chunk block by block, straight from each
//! member node (raw celer-proto reads), after a test's faults have healed.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use celer_proto::{decode_header, Header, Op, Status, HEADER_BYTES};
use celer_route::RouteTable;

fn call(s: &mut TcpStream, h: Header) -> (Header, Vec<u8>) {
    s.write_all(&h.encode()).expect("send");
    let mut b = [0u8; HEADER_BYTES];
    s.read_exact(&mut b).expect("response");
    let r = decode_header(&b).expect("valid").expect("whole");
    let mut p = vec![0u8; r.payload_bytes as usize];
    s.read_exact(&mut p).expect("payload");
    r.verify_payload([&p[..]]).expect("payload crc");
    (r, p)
}

/// Reads chunk `chunk` of `volume` from every member of its partition and
/// returns a description of every difference (empty: the replicas agree).
pub fn compare_chunk(t: &RouteTable, volume: u64, chunk: u64) -> Vec<String> {
    let p = t.partition_of(volume, chunk);
    let part = t.partition(p).expect("partition");
    let mut copies = Vec::new();
    for m in &part.members {
        let n = t.node(m.node).expect("member node");
        let mut s = TcpStream::connect(&n.data_addr).expect("connect member");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut hello = Header::request(Op::Hello, 1);
        hello.offset = t.shard_of(n, p) as u64;
        assert_eq!(call(&mut s, hello).0.status, Status::Ok);
        let mut h = Header::request(Op::Read, 2);
        h.epoch = t.epoch;
        h.volume = volume;
        h.offset = chunk * t.chunk_bytes;
        h.length = t.chunk_bytes as u32;
        let (r, data) = call(&mut s, h);
        assert_eq!(
            r.status,
            Status::Ok,
            "read chunk {chunk} from node {}",
            m.node
        );
        copies.push((m.node, data));
    }
    let mut diffs = Vec::new();
    let (n0, first) = &copies[0];
    for (n, c) in &copies[1..] {
        for (b, (x, y)) in first.chunks(4096).zip(c.chunks(4096)).enumerate() {
            if x != y {
                diffs.push(format!(
                    "volume {volume} chunk {chunk} block {b}: node {n0} and node {n} differ"
                ));
            }
        }
    }
    diffs
}
