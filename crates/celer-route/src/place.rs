//! Rendezvous (highest random weight) placement with failure domains.

use crate::{NodeId, NodeInfo};

/// The weight of `node` for partition `p`: the nodes with the highest
/// weights hold the partition. Adding or removing a node changes only the
/// partitions where it is (or was) among the winners: ≈ 1/N of them.
pub fn rendezvous_score(p: u32, node: NodeId) -> u64 {
    fmix64(fmix64(p as u64 ^ 0x5eed_0000_0000) ^ (node as u64).wrapping_mul(0xa076_1d64_78bd_642f))
}

/// MurmurHash3's 64-bit finalizer: every input bit affects every output bit.
fn fmix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

/// The `replicas` target nodes of partition `p` among `up` nodes, best first:
/// highest weights, one per failure domain while there are unused domains,
/// then the best remaining nodes (fewer domains than replicas).
pub fn target_members(p: u32, up: &[&NodeInfo], replicas: u8) -> Vec<NodeId> {
    let mut ranked: Vec<(u64, &NodeInfo)> =
        up.iter().map(|n| (rendezvous_score(p, n.id), *n)).collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.id.cmp(&b.1.id)));
    let want = replicas as usize;
    let mut chosen: Vec<&NodeInfo> = Vec::with_capacity(want);
    for (_, n) in &ranked {
        if chosen.len() == want {
            break;
        }
        if chosen.iter().all(|c| c.domain != n.domain) {
            chosen.push(n);
        }
    }
    for (_, n) in &ranked {
        if chosen.len() == want {
            break;
        }
        if chosen.iter().all(|c| c.id != n.id) {
            chosen.push(n);
        }
    }
    chosen.into_iter().map(|n| n.id).collect()
}
