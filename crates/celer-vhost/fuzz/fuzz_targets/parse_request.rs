//! Fuzzes the virtio-blk request parser: the input supplies a descriptor
//! chain (addresses, lengths, flags, next indices, possibly indirect or
//! looping) and the guest memory it points into. The parser must never
//! panic, and every host segment it returns must lie inside guest memory.
#![no_main]

use celer_device::IoSegment;
use celer_vhost::request::{parse, HOST_SEGMENTS_MAX};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM_BYTES: usize = 1 << 20;
/// Guest memory the fuzz input may fill (after the ring area).
const DATA_BASE: u64 = 0x8_0000;

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let count = (count as usize % 24) + 1;
    if rest.len() < count * 16 {
        return;
    }
    let (desc_bytes, payload) = rest.split_at(count * 16);
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).unwrap();
    let payload = &payload[..payload.len().min(MEM_BYTES - DATA_BASE as usize)];
    mem.write_slice(payload, GuestAddress(DATA_BASE)).unwrap();
    let descs: Vec<RawDescriptor> = desc_bytes
        .chunks_exact(16)
        .map(|c| {
            // Keep most addresses near guest memory so chains get parsed deep.
            let raw = u64::from_le_bytes(c[0..8].try_into().unwrap());
            let addr = if c[15] & 0x80 == 0 {
                DATA_BASE + raw % (2 * MEM_BYTES as u64)
            } else {
                raw
            };
            let len = u32::from_le_bytes(c[8..12].try_into().unwrap()) % 0x2_0000;
            let flags = u16::from_le_bytes(c[12..14].try_into().unwrap()) & 0x7;
            let next = u16::from(c[14]) % 32;
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
        })
        .collect();
    let q = MockSplitQueue::new(&mem, 32);
    let Ok(chain) = q.build_multiple_desc_chains(&descs) else {
        return;
    };
    let mut out = [IoSegment {
        addr: std::ptr::null_mut(),
        len: 0,
    }; HOST_SEGMENTS_MAX];
    if let Ok(req) = parse(&mem, chain, &mut out) {
        let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        for s in &out[..req.segments] {
            let a = s.addr as usize;
            assert!(a >= base && a + s.len <= base + MEM_BYTES, "segment outside guest memory");
        }
    }
});
