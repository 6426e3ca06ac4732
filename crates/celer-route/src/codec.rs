//! The binary form of a route table: what a node hands a client in a
//! `StaleEpoch` response. Little-endian, length-prefixed strings, crc32c at
//! the end; decoding checks every length against what is left.

use crate::{Member, NodeInfo, PartitionRoute, RouteError, RouteTable};

const MAGIC: &[u8; 4] = b"CRT1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteDecodeError {
    #[error("route table truncated at byte {0}")]
    Truncated(usize),
    #[error("not a route table (bad magic)")]
    Magic,
    #[error("route table checksum mismatch")]
    Checksum,
    #[error("route table string is not UTF-8")]
    Utf8,
    #[error("route table has {0} partitions, its header says {1}")]
    PartitionCount(usize, u32),
    #[error("route table is inconsistent: {0}")]
    Invalid(#[from] RouteError),
    #[error("{0} trailing bytes after the route table")]
    Trailing(usize),
}

impl RouteTable {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.nodes.len() * 64 + self.partitions.len() * 16);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.epoch.to_le_bytes());
        b.extend_from_slice(&self.chunk_bytes.to_le_bytes());
        b.push(self.partition_bits);
        b.push(self.replicas);
        b.extend_from_slice(&(self.nodes.len() as u32).to_le_bytes());
        for n in &self.nodes {
            b.extend_from_slice(&n.id.to_le_bytes());
            b.extend_from_slice(&n.shards.to_le_bytes());
            b.push(n.up as u8);
            for s in [&n.data_addr, &n.admin_addr, &n.domain] {
                b.extend_from_slice(&(s.len() as u16).to_le_bytes());
                b.extend_from_slice(s.as_bytes());
            }
        }
        for p in &self.partitions {
            b.push(p.members.len() as u8);
            for m in &p.members {
                b.extend_from_slice(&m.node.to_le_bytes());
                let flags = m.in_sync as u8
                    | (m.down as u8) << 1
                    | ((m.catch_up_since != 0) as u8) << 2
                    | (m.displaced as u8) << 3;
                b.push(flags);
                if m.catch_up_since != 0 {
                    b.extend_from_slice(&m.catch_up_since.to_le_bytes());
                }
            }
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<RouteTable, RouteDecodeError> {
        if b.len() < 8 {
            return Err(RouteDecodeError::Truncated(b.len()));
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err(RouteDecodeError::Checksum);
        }
        let mut r = Reader { b: body, at: 0 };
        if r.take(4)? != MAGIC {
            return Err(RouteDecodeError::Magic);
        }
        let epoch = r.u64()?;
        let chunk_bytes = r.u64()?;
        let partition_bits = r.u8()?;
        let replicas = r.u8()?;
        let node_count = r.u32()? as usize;
        let mut nodes = Vec::with_capacity(node_count.min(body.len() / 8));
        for _ in 0..node_count {
            let id = r.u32()?;
            let shards = r.u16()?;
            let up = r.u8()? != 0;
            let data_addr = r.string()?;
            let admin_addr = r.string()?;
            let domain = r.string()?;
            nodes.push(NodeInfo {
                id,
                data_addr,
                admin_addr,
                shards,
                domain,
                up,
            });
        }
        if partition_bits > crate::PARTITION_BITS_MAX {
            return Err(RouteError::PartitionBits(partition_bits).into());
        }
        let count = 1u32 << partition_bits;
        let mut partitions = Vec::with_capacity(count as usize);
        while r.at < body.len() {
            let n = r.u8()? as usize;
            let mut members = Vec::with_capacity(n);
            for _ in 0..n {
                let node = r.u32()?;
                let flags = r.u8()?;
                let catch_up_since = if flags & 4 != 0 { r.u64()? } else { 0 };
                members.push(Member {
                    node,
                    in_sync: flags & 1 != 0,
                    down: flags & 2 != 0,
                    catch_up_since,
                    displaced: flags & 8 != 0,
                });
            }
            partitions.push(PartitionRoute { members });
            if partitions.len() > count as usize {
                break;
            }
        }
        if partitions.len() != count as usize {
            return Err(RouteDecodeError::PartitionCount(partitions.len(), count));
        }
        if r.at != body.len() {
            return Err(RouteDecodeError::Trailing(body.len() - r.at));
        }
        let t = RouteTable {
            epoch,
            chunk_bytes,
            partition_bits,
            replicas,
            nodes,
            partitions,
        };
        t.validate()?;
        Ok(t)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RouteDecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or(RouteDecodeError::Truncated(self.at))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, RouteDecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, RouteDecodeError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, RouteDecodeError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, RouteDecodeError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self) -> Result<String, RouteDecodeError> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| RouteDecodeError::Utf8)
    }
}
