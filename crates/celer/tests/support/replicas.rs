//! Compares the replicas of every chunk block by block, straight from each
//! member node (raw celer-proto reads), after a test's faults have healed.

#![allow(dead_code)]

use celer_proto::payload::StateCrcTable;
use celer_proto::{Header, Op, Status};
use celer_route::RouteTable;

use super::cluster::TOKEN;
use super::wire::{call, connect, node_credential};

/// Reads chunk `chunk` of `volume` from every member of its partition and
/// returns a description of every difference (empty: the replicas agree).
pub fn compare_chunk(t: &RouteTable, volume: u64, chunk: u64) -> Vec<String> {
    compare_chunk_of(t, volume, volume, chunk, None)
}

/// [`compare_chunk`] for a volume placed by `lineage` (a clone's is its
/// parent's), of its snapshot with era `snapshot` when given.
pub fn compare_chunk_of(
    t: &RouteTable,
    volume: u64,
    lineage: u64,
    chunk: u64,
    snapshot: Option<u32>,
) -> Vec<String> {
    let p = t.partition_of(lineage, chunk);
    let part = t.partition(p).expect("partition");
    let mut copies = Vec::new();
    for m in &part.members {
        let n = t.node(m.node).expect("member node");
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&n.data_addr)
            .expect("address")
            .next()
            .expect("an address");
        let mut s = connect(addr, t.shard_of(n, p), &node_credential(TOKEN))
            .expect("the node accepts the cluster credential");
        let mut h = Header::request(Op::Read, 2);
        h.epoch = t.epoch;
        h.volume = volume;
        h.offset = chunk * t.chunk_bytes;
        h.length = t.chunk_bytes as u32;
        if let Some(era) = snapshot {
            h.flags = celer_proto::FLAG_SNAPSHOT_READ;
            h.snapshot = era as u64;
        }
        let (r, data) = call(&mut s, h, &[]);
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
                    "volume {volume} chunk {chunk} block {b}: node {n0} and node {n} differ (first bytes {:02x?} and {:02x?})",
                    &x[..16],
                    &y[..16]
                ));
            }
        }
    }
    diffs
}

/// Compares the block states (kind, version and crc per block, a
/// `BackfillRead` with `FLAG_STATES_ONLY`) of engine key `key` (a layer,
/// placed by its lineage) in chunk `chunk` on every member of its
/// partition; returns a description of every difference. Also returns the
/// states of the first member, as (kind byte, version) per block.
pub fn compare_states_of(t: &RouteTable, key: u64, chunk: u64) -> (Vec<String>, Vec<(u8, u64)>) {
    let p = t.partition_of(key, chunk);
    let part = t.partition(p).expect("partition");
    let mut copies = Vec::new();
    for m in &part.members {
        let n = t.node(m.node).expect("member node");
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&n.data_addr)
            .expect("address")
            .next()
            .expect("an address");
        let mut s = connect(addr, t.shard_of(n, p), &node_credential(TOKEN))
            .expect("the node accepts the cluster credential");
        let mut h = Header::request(Op::BackfillRead, 3);
        h.epoch = t.epoch;
        h.volume = key;
        h.offset = chunk * t.chunk_bytes;
        h.length = t.chunk_bytes as u32;
        h.flags = celer_proto::FLAG_STATES_ONLY;
        let (r, table) = call(&mut s, h, &[]);
        assert_eq!(
            r.status,
            Status::Ok,
            "states of chunk {chunk} from node {}",
            m.node
        );
        let blocks = (t.chunk_bytes / celer_proto::BLOCK_BYTES) as usize;
        let states: Vec<(u8, u64, u32)> = StateCrcTable::parse(&table, blocks)
            .expect("a states-only answer for the whole chunk")
            .iter()
            .map(|(kind, version, crc)| (kind as u8, version, crc))
            .collect();
        copies.push((m.node, states));
    }
    let mut diffs = Vec::new();
    let (n0, first) = &copies[0];
    for (n, c) in &copies[1..] {
        for (b, (x, y)) in first.iter().zip(c).enumerate() {
            if x != y {
                diffs.push(format!(
                    "key {key:#x} chunk {chunk} block {b}: node {n0} holds {x:?}, node {n} {y:?}"
                ));
            }
        }
    }
    let states = copies.swap_remove(0).1;
    (diffs, states.into_iter().map(|(k, v, _)| (k, v)).collect())
}
