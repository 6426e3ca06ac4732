//! Parses one virtio-blk request out of a descriptor chain.
//!
//! Layout (VIRTIO 1.2 §5.2.6, any layout allowed): the chain is one byte
//! stream; its first 16 bytes are the device-readable header (type, reserved,
//! sector), its last byte is the device-writable status, and the bytes in
//! between are the data. Data descriptors are translated to host pointers in
//! guest memory (zero copy), split where a range crosses memory regions.
//!
//! Invariants: nothing here trusts the guest. Every address is checked
//! against the guest memory map before a pointer is produced; a chain longer
//! than `CHAIN_DESCRIPTORS_MAX`, a header or status in the wrong direction,
//! data in the wrong direction, or a range outside guest memory is an error
//! that names what was wrong. No allocation: segments go into the caller's
//! fixed slice.

use celer_device::IoSegment;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

/// Data segments one request may carry (advertised as virtio `seg_max`).
pub const SEG_MAX: usize = 126;
/// Descriptors one chain may have: header + data + status, with slack for
/// drivers that split the header or put the status in its own descriptor.
pub const CHAIN_DESCRIPTORS_MAX: usize = SEG_MAX + 2;
/// Host segments one request may produce after splitting at region edges.
pub const HOST_SEGMENTS_MAX: usize = SEG_MAX + 8;
/// Bytes of the request header.
pub const HEADER_BYTES: u32 = 16;
/// Bytes of one discard / write-zeroes range descriptor.
pub const RANGE_BYTES: u32 = 16;
/// Bytes of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// The one flag a write-zeroes range may carry.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// What the guest asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

impl RequestType {
    fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            _ => return None,
        })
    }

    /// Whether the data part is written by the device.
    fn data_is_device_writable(self) -> bool {
        matches!(self, RequestType::In | RequestType::GetId)
    }
}

/// A parsed request. Its data segments are in the slice given to [`parse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    /// Header sector (512-byte units) for IN/OUT; for DISCARD/WRITE_ZEROES the
    /// range's first sector.
    pub sector: u64,
    /// For DISCARD/WRITE_ZEROES: sectors in the range.
    pub range_sectors: u32,
    /// Guest address of the status byte.
    pub status_addr: GuestAddress,
    /// Bytes of data between header and status.
    pub data_bytes: u32,
    /// Host segments written into the caller's slice (IN/OUT/GET_ID).
    pub segments: usize,
}

/// Why a chain is not a valid request. Every variant maps to a virtio status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("descriptor chain is empty or its descriptor table is unreadable")]
    Empty,
    #[error("descriptor chain has more than {CHAIN_DESCRIPTORS_MAX} descriptors")]
    TooLong,
    #[error("chain of {total_bytes} bytes is shorter than header + status ({} bytes)", HEADER_BYTES + 1)]
    TooShort { total_bytes: u64 },
    #[error("the last descriptor (status) is not device-writable")]
    StatusNotWritable,
    #[error("status byte at {addr:#x} is outside guest memory")]
    StatusOutsideMemory { addr: u64 },
    #[error("header is not device-readable")]
    HeaderNotReadable,
    #[error("header at {addr:#x} is outside guest memory")]
    HeaderOutsideMemory { addr: u64 },
    #[error("unknown request type {0}")]
    UnknownType(u32),
    #[error("{kind:?} data descriptor at {addr:#x} has the wrong direction")]
    DataDirection { kind: RequestType, addr: u64 },
    #[error("data range [{addr:#x}, +{len}) is outside guest memory")]
    DataOutsideMemory { addr: u64, len: u32 },
    #[error("request needs more than {HOST_SEGMENTS_MAX} host segments")]
    TooManySegments,
    #[error("{kind:?} needs {want} data bytes, chain has {got}")]
    DataLength {
        kind: RequestType,
        want: String,
        got: u32,
    },
    #[error("{kind:?} range carries unsupported flags {flags:#x}")]
    RangeFlags { kind: RequestType, flags: u32 },
}

impl ParseError {
    /// Whether the guest should see UNSUPP (else IOERR).
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self,
            ParseError::UnknownType(_) | ParseError::RangeFlags { .. }
        )
    }
}

/// A failed parse: the reason, and where to write the status if the chain
/// has a usable status byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadRequest {
    pub error: ParseError,
    pub status_addr: Option<GuestAddress>,
}

#[derive(Clone, Copy, Default)]
struct Desc {
    addr: u64,
    len: u32,
    write: bool,
}

/// Parses the chain `descs` (as yielded by a `DescriptorChain`) in `mem`,
/// writing host segments into `out`.
pub fn parse<M, I>(mem: &M, descs: I, out: &mut [IoSegment]) -> Result<Request, BadRequest>
where
    M: GuestMemory + Bytes<GuestAddress> + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let mut chain = [Desc::default(); CHAIN_DESCRIPTORS_MAX];
    let mut n = 0usize;
    let mut too_long = false;
    let mut last = None;
    let mut total_bytes: u64 = 0;
    for d in descs {
        let desc = Desc {
            addr: d.addr().0,
            len: d.len(),
            write: d.is_write_only(),
        };
        if n < CHAIN_DESCRIPTORS_MAX {
            chain[n] = desc;
            n += 1;
        } else {
            too_long = true;
        }
        total_bytes += u64::from(desc.len);
        last = Some(desc);
    }
    let Some(last) = last else {
        return Err(BadRequest {
            error: ParseError::Empty,
            status_addr: None,
        });
    };

    // Status first, so that every later error can be reported to the guest.
    let status_addr = if !last.write || last.len == 0 {
        None
    } else {
        last.addr
            .checked_add(u64::from(last.len) - 1)
            .map(GuestAddress)
            .filter(|a| mem.check_range(*a, 1, Permissions::Write))
    };
    let fail = |error| Err(BadRequest { error, status_addr });
    if !last.write {
        return fail(ParseError::StatusNotWritable);
    }
    let Some(status) = status_addr else {
        return fail(ParseError::StatusOutsideMemory {
            addr: last
                .addr
                .wrapping_add(u64::from(last.len).saturating_sub(1)),
        });
    };
    if too_long {
        return fail(ParseError::TooLong);
    }
    if total_bytes < u64::from(HEADER_BYTES) + 1 {
        return fail(ParseError::TooShort { total_bytes });
    }
    let chain = &chain[..n];

    // Header: the first 16 bytes, device-readable, possibly across descriptors.
    let mut header = [0u8; HEADER_BYTES as usize];
    let mut got = 0usize;
    for d in chain {
        if got == header.len() {
            break;
        }
        if d.len == 0 {
            continue;
        }
        if d.write {
            return fail(ParseError::HeaderNotReadable);
        }
        let take = (header.len() - got).min(d.len as usize);
        if mem
            .read_slice(&mut header[got..got + take], GuestAddress(d.addr))
            .is_err()
        {
            return fail(ParseError::HeaderOutsideMemory { addr: d.addr });
        }
        got += take;
    }
    let raw_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let Some(kind) = RequestType::from_raw(raw_type) else {
        return fail(ParseError::UnknownType(raw_type));
    };

    // Data: bytes [16, total - 1).
    let data_end = total_bytes - 1;
    let data_bytes = data_end - u64::from(HEADER_BYTES);
    let Ok(data_bytes) = u32::try_from(data_bytes) else {
        return fail(ParseError::DataLength {
            kind,
            want: "< 4 GiB".into(),
            got: u32::MAX,
        });
    };
    let want_write = kind.data_is_device_writable();
    let access = if want_write {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let mut segments = 0usize;
    let mut range = [0u8; RANGE_BYTES as usize];
    let mut range_got = 0usize;
    let mut pos: u64 = 0;
    for d in chain {
        let start = pos.max(u64::from(HEADER_BYTES));
        let end = (pos + u64::from(d.len)).min(data_end);
        pos += u64::from(d.len);
        if start >= end {
            continue;
        }
        if d.write != want_write {
            return fail(ParseError::DataDirection { kind, addr: d.addr });
        }
        let offset_in_desc = start - (pos - u64::from(d.len));
        let Some(addr) = d.addr.checked_add(offset_in_desc) else {
            return fail(ParseError::DataOutsideMemory {
                addr: d.addr,
                len: d.len,
            });
        };
        let len = (end - start) as usize;
        let outside = ParseError::DataOutsideMemory {
            addr,
            len: len as u32,
        };
        match kind {
            RequestType::Discard | RequestType::WriteZeroes => {
                // Only the first range is read (max_discard_seg = 1); the
                // length check below rejects more.
                let take = (range.len() - range_got).min(len);
                if take > 0
                    && mem
                        .read_slice(&mut range[range_got..range_got + take], GuestAddress(addr))
                        .is_err()
                {
                    return fail(outside);
                }
                range_got += take;
            }
            RequestType::Flush => {}
            RequestType::In | RequestType::Out | RequestType::GetId => {
                if !mem.check_range(GuestAddress(addr), len, access) {
                    return fail(outside);
                }
                let Ok(slices) = mem.get_slices(GuestAddress(addr), len, access) else {
                    return fail(outside);
                };
                for s in slices {
                    let Ok(s) = s else {
                        return fail(outside);
                    };
                    if segments >= out.len() || segments >= HOST_SEGMENTS_MAX {
                        return fail(ParseError::TooManySegments);
                    }
                    out[segments] = IoSegment {
                        addr: s.ptr_guard_mut().as_ptr(),
                        len: s.len(),
                    };
                    segments += 1;
                }
            }
        }
    }

    let mut range_sectors = 0u32;
    match kind {
        RequestType::In | RequestType::Out => {
            if data_bytes == 0 {
                return fail(ParseError::DataLength {
                    kind,
                    want: "> 0".into(),
                    got: 0,
                });
            }
        }
        RequestType::GetId => {}
        RequestType::Flush => {
            if data_bytes != 0 {
                return fail(ParseError::DataLength {
                    kind,
                    want: "0".into(),
                    got: data_bytes,
                });
            }
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            if data_bytes != RANGE_BYTES {
                return fail(ParseError::DataLength {
                    kind,
                    want: format!("{RANGE_BYTES} (one range)"),
                    got: data_bytes,
                });
            }
            sector = u64::from_le_bytes([
                range[0], range[1], range[2], range[3], range[4], range[5], range[6], range[7],
            ]);
            range_sectors = u32::from_le_bytes([range[8], range[9], range[10], range[11]]);
            let flags = u32::from_le_bytes([range[12], range[13], range[14], range[15]]);
            let allowed = if kind == RequestType::WriteZeroes {
                WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if flags & !allowed != 0 {
                return fail(ParseError::RangeFlags { kind, flags });
            }
        }
    }
    Ok(Request {
        kind,
        sector,
        range_sectors,
        status_addr: status,
        data_bytes,
        segments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const W: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const MEM_END: u64 = 0x100_0000;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_END as usize)]).unwrap()
    }

    fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn header(m: &GuestMemoryMmap<()>, at: u64, kind: u32, sector: u64) {
        m.write_obj(kind.to_le(), GuestAddress(at)).unwrap();
        m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        m.write_obj(sector.to_le(), GuestAddress(at + 8)).unwrap();
    }

    fn range(m: &GuestMemoryMmap<()>, at: u64, sector: u64, sectors: u32, flags: u32) {
        m.write_obj(sector.to_le(), GuestAddress(at)).unwrap();
        m.write_obj(sectors.to_le(), GuestAddress(at + 8)).unwrap();
        m.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
    }

    fn run(m: &GuestMemoryMmap<()>, descs: &[RawDescriptor]) -> Result<Request, BadRequest> {
        let q = MockSplitQueue::new(m, 256);
        let chain = q.build_desc_chain(descs).unwrap();
        let mut out = [IoSegment {
            addr: std::ptr::null_mut(),
            len: 0,
        }; HOST_SEGMENTS_MAX];
        parse(m, chain, &mut out)
    }

    fn err(r: Result<Request, BadRequest>) -> BadRequest {
        r.expect_err("chain must be rejected")
    }

    #[test]
    fn read_request() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_IN, 8);
        let r = run(&m, &[d(HDR, 16, 0), d(DATA, 4096, W), d(STATUS, 1, W)]).unwrap();
        assert_eq!(r.kind, RequestType::In);
        assert_eq!(r.sector, 8);
        assert_eq!(r.data_bytes, 4096);
        assert_eq!(r.segments, 1);
        assert_eq!(r.status_addr, GuestAddress(STATUS));
    }

    #[test]
    fn write_request_with_several_segments() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_OUT, 16);
        let r = run(
            &m,
            &[
                d(HDR, 16, 0),
                d(DATA, 512, 0),
                d(DATA + 4096, 3584, 0),
                d(STATUS, 1, W),
            ],
        )
        .unwrap();
        assert_eq!(
            (r.kind, r.data_bytes, r.segments),
            (RequestType::Out, 4096, 2)
        );
    }

    #[test]
    fn flush_get_id_discard_write_zeroes() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
        let r = run(&m, &[d(HDR, 16, 0), d(STATUS, 1, W)]).unwrap();
        assert_eq!((r.kind, r.data_bytes), (RequestType::Flush, 0));

        header(&m, HDR, VIRTIO_BLK_T_GET_ID, 0);
        let r = run(&m, &[d(HDR, 16, 0), d(DATA, 20, W), d(STATUS, 1, W)]).unwrap();
        assert_eq!(
            (r.kind, r.data_bytes, r.segments),
            (RequestType::GetId, 20, 1)
        );

        header(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
        range(&m, DATA, 64, 128, 0);
        let r = run(&m, &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)]).unwrap();
        assert_eq!(
            (r.kind, r.sector, r.range_sectors),
            (RequestType::Discard, 64, 128)
        );

        header(&m, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        range(&m, DATA, 8, 16, WRITE_ZEROES_FLAG_UNMAP);
        let r = run(&m, &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)]).unwrap();
        assert_eq!(
            (r.kind, r.sector, r.range_sectors),
            (RequestType::WriteZeroes, 8, 16)
        );
    }

    #[test]
    fn any_layout_header_split_and_status_merged_with_data() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_IN, 3);
        // Header in two pieces, data and status in one writable descriptor.
        let r = run(&m, &[d(HDR, 8, 0), d(HDR + 8, 8, 0), d(DATA, 4097, W)]).unwrap();
        assert_eq!((r.kind, r.sector, r.data_bytes), (RequestType::In, 3, 4096));
        assert_eq!(r.status_addr, GuestAddress(DATA + 4096));
    }

    #[test]
    fn unknown_type_is_unsupported_with_status() {
        let m = mem();
        header(&m, HDR, 0x1234, 0);
        let e = err(run(&m, &[d(HDR, 16, 0), d(STATUS, 1, W)]));
        assert_eq!(e.error, ParseError::UnknownType(0x1234));
        assert!(e.error.is_unsupported());
        assert_eq!(e.status_addr, Some(GuestAddress(STATUS)));
    }

    #[test]
    fn too_short_chain() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_IN, 0);
        let e = err(run(&m, &[d(HDR, 8, 0), d(STATUS, 1, W)]));
        assert_eq!(e.error, ParseError::TooShort { total_bytes: 9 });
        assert!(!e.error.is_unsupported());
        assert_eq!(e.status_addr, Some(GuestAddress(STATUS)));
    }

    #[test]
    fn too_long_chain() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
        let mut descs = vec![d(HDR, 16, 0)];
        for i in 0..CHAIN_DESCRIPTORS_MAX as u64 {
            descs.push(d(DATA + 512 * i, 512, 0));
        }
        descs.push(d(STATUS, 1, W));
        let e = err(run(&m, &descs));
        assert_eq!(e.error, ParseError::TooLong);
        assert_eq!(e.status_addr, Some(GuestAddress(STATUS)));
    }

    #[test]
    fn status_not_writable_or_outside_memory() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_IN, 0);
        let e = err(run(&m, &[d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, 0)]));
        assert_eq!(e.error, ParseError::StatusNotWritable);
        assert_eq!(e.status_addr, None);

        let e = err(run(
            &m,
            &[d(HDR, 16, 0), d(DATA, 512, W), d(MEM_END + 8, 1, W)],
        ));
        assert_eq!(
            e.error,
            ParseError::StatusOutsideMemory { addr: MEM_END + 8 }
        );
        assert_eq!(e.status_addr, None);

        let e = err(run(&m, &[d(HDR, 16, 0), d(u64::MAX, 2, W)]));
        assert!(matches!(e.error, ParseError::StatusOutsideMemory { .. }));
    }

    #[test]
    fn header_in_wrong_direction_or_outside_memory() {
        let m = mem();
        let e = err(run(&m, &[d(HDR, 16, W), d(STATUS, 1, W)]));
        assert_eq!(e.error, ParseError::HeaderNotReadable);
        let e = err(run(&m, &[d(MEM_END - 8, 16, 0), d(STATUS, 1, W)]));
        assert_eq!(
            e.error,
            ParseError::HeaderOutsideMemory { addr: MEM_END - 8 }
        );
    }

    #[test]
    fn data_in_wrong_direction() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_IN, 0);
        let e = err(run(&m, &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)]));
        assert_eq!(
            e.error,
            ParseError::DataDirection {
                kind: RequestType::In,
                addr: DATA
            }
        );
        header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
        let e = err(run(&m, &[d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)]));
        assert!(matches!(e.error, ParseError::DataDirection { .. }));
    }

    #[test]
    fn data_outside_guest_memory() {
        let m = mem();
        for kind in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
            header(&m, HDR, kind, 0);
            let flags = if kind == VIRTIO_BLK_T_IN { W } else { 0 };
            let e = err(run(
                &m,
                &[
                    d(HDR, 16, 0),
                    d(MEM_END - 512, 4096, flags),
                    d(STATUS, 1, W),
                ],
            ));
            assert!(
                matches!(e.error, ParseError::DataOutsideMemory { .. }),
                "{e:?}"
            );
            let e = err(run(
                &m,
                &[
                    d(HDR, 16, 0),
                    d(u64::MAX - 100, 512, flags),
                    d(STATUS, 1, W),
                ],
            ));
            assert!(
                matches!(e.error, ParseError::DataOutsideMemory { .. }),
                "{e:?}"
            );
        }
        header(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
        let e = err(run(
            &m,
            &[d(HDR, 16, 0), d(MEM_END - 8, 16, 0), d(STATUS, 1, W)],
        ));
        assert!(
            matches!(e.error, ParseError::DataOutsideMemory { .. }),
            "{e:?}"
        );
    }

    #[test]
    fn wrong_data_lengths() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_IN, 0);
        let e = err(run(&m, &[d(HDR, 16, 0), d(STATUS, 1, W)]));
        assert!(matches!(e.error, ParseError::DataLength { got: 0, .. }));
        header(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
        let e = err(run(&m, &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)]));
        assert!(matches!(e.error, ParseError::DataLength { got: 512, .. }));
        header(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
        let e = err(run(&m, &[d(HDR, 16, 0), d(DATA, 32, 0), d(STATUS, 1, W)]));
        assert!(matches!(e.error, ParseError::DataLength { got: 32, .. }));
    }

    #[test]
    fn range_flags() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
        range(&m, DATA, 0, 8, WRITE_ZEROES_FLAG_UNMAP);
        let e = err(run(&m, &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)]));
        assert!(e.error.is_unsupported());
        header(&m, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        range(&m, DATA, 0, 8, 0x80);
        let e = err(run(&m, &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)]));
        assert_eq!(
            e.error,
            ParseError::RangeFlags {
                kind: RequestType::WriteZeroes,
                flags: 0x80
            }
        );
    }

    #[test]
    fn data_across_two_regions_is_split() {
        let half = MEM_END / 2;
        let m: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), half as usize),
            (GuestAddress(half), half as usize),
        ])
        .unwrap();
        header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
        let r = run(
            &m,
            &[d(HDR, 16, 0), d(half - 512, 4096, 0), d(STATUS, 1, W)],
        )
        .unwrap();
        assert_eq!((r.segments, r.data_bytes), (2, 4096));
    }

    #[test]
    fn segment_slice_overflow() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
        let q = MockSplitQueue::new(&m, 256);
        let chain = q
            .build_desc_chain(&[
                d(HDR, 16, 0),
                d(DATA, 512, 0),
                d(DATA + 4096, 512, 0),
                d(STATUS, 1, W),
            ])
            .unwrap();
        let mut out = [IoSegment {
            addr: std::ptr::null_mut(),
            len: 0,
        }; 1];
        let e = parse(&m, chain, &mut out).unwrap_err();
        assert_eq!(e.error, ParseError::TooManySegments);
    }

    #[test]
    fn indirect_chain_is_followed() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_IN, 5);
        let q = MockSplitQueue::new(&m, 16);
        // Indirect table at 0x40_0000 with header/data/status.
        let table = 0x40_0000u64;
        let entries = [
            SplitDescriptor::new(HDR, 16, 1, 1),
            SplitDescriptor::new(DATA, 4096, W | 1, 2),
            SplitDescriptor::new(STATUS, 1, W, 0),
        ];
        for (i, e) in entries.iter().enumerate() {
            m.write_obj(RawDescriptor::from(*e), GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let indirect = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
        let chain = q.build_desc_chain(&[d(table, 48, indirect)]).unwrap();
        let mut out = [IoSegment {
            addr: std::ptr::null_mut(),
            len: 0,
        }; HOST_SEGMENTS_MAX];
        let r = parse(&m, chain, &mut out).unwrap();
        assert_eq!((r.kind, r.sector, r.data_bytes), (RequestType::In, 5, 4096));
    }
}
