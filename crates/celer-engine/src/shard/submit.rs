//! Building disk I/O from a request's segments, and walking
//! a request's pieces.

use super::*;

/// A shard's disk queue with the counts the shard keeps of it.
pub(super) struct Io<Q> {
    pub(super) queue: Q,
    /// Pushed since the last submit.
    pub(super) unsubmitted: u32,
    /// Pushed and not yet reaped.
    pub(super) inflight: u32,
}

impl<Q: DiskQueue> Io<Q> {
    /// Queues `(io, user_data)`.
    #[inline]
    pub(super) fn push(&mut self, (io, user_data): (DiskIo, u64)) {
        // SAFETY: every buffer and iovec an I/O points to lives in an op,
        // journal buffer or checkpoint that is neither moved nor reused
        // until its completion has been reaped (and, for an op's segments,
        // in caller memory `Shard::submit`'s contract keeps valid).
        unsafe { self.queue.push(&io, user_data) };
        self.unsubmitted += 1;
        self.inflight += 1;
    }

    /// Queues op `id`'s data read or write of bytes `[at, at + len)` of its
    /// segments, at `offset` on the disk, and counts it in `op.pending`.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn push_op_data(
        &mut self,
        op: &mut Op,
        id: u32,
        write: bool,
        at: usize,
        len: usize,
        offset: u64,
        dsync: bool,
    ) {
        let iov_at = op.iov.len();
        slice_segments(&op.segs, at, len, &mut op.iov);
        op.pending += 1;
        self.push((
            rw_io(write, &op.iov[iov_at..], offset, dsync),
            io_ud(UD_DATA, id as u64, len),
        ));
    }
}

/// A read or write of `iov` at `offset`.
#[inline]
pub(super) fn rw_io(write: bool, iov: &[libc::iovec], offset: u64, dsync: bool) -> DiskIo {
    let bufs = IoBufs::of(iov);
    if write {
        DiskIo::Write {
            bufs,
            offset,
            dsync,
        }
    } else {
        DiskIo::Read { bufs, offset }
    }
}

/// A write of one buffer.
#[inline]
pub(super) fn write_io(addr: *const u8, len: u32, offset: u64, dsync: bool) -> DiskIo {
    DiskIo::Write {
        bufs: IoBufs::One {
            addr: addr as *mut u8,
            len,
        },
        offset,
        dsync,
    }
}

/// A read into one buffer.
#[inline]
pub(super) fn read_io(addr: *mut u8, len: u32, offset: u64) -> DiskIo {
    DiskIo::Read {
        bufs: IoBufs::One { addr, len },
        offset,
    }
}

/// End (exclusive) of the run of `action` blocks starting at `i` whose
/// physical blocks are consecutive.
#[inline]
pub(super) fn run_end(plan: &[Planned], i: usize, action: Action) -> usize {
    let mut j = i + 1;
    while j < plan.len()
        && plan[j].action == action
        && plan[j].layer == plan[i].layer
        && plan[j].phys as usize == plan[i].phys as usize + (j - i)
    {
        j += 1;
    }
    j
}

/// Calls `f(address, length)` for each piece of the request's segments that
/// covers bytes `[at, at + len)`, in order.
#[inline]
pub(crate) fn for_each_piece(
    segs: &[Segment],
    mut at: usize,
    mut len: usize,
    mut f: impl FnMut(*mut u8, usize),
) {
    for s in segs {
        if len == 0 {
            break;
        }
        if at >= s.len {
            at -= s.len;
            continue;
        }
        let take = (s.len - at).min(len);
        // SAFETY: at < s.len, so the pointer stays inside the segment.
        f(unsafe { s.addr.add(at) }, take);
        len -= take;
        at = 0;
    }
}

/// Appends iovecs covering bytes `[at, at + len)` of the request's segments.
#[inline]
pub(super) fn slice_segments(segs: &[Segment], at: usize, len: usize, out: &mut Vec<libc::iovec>) {
    for_each_piece(segs, at, len, |addr, take| {
        debug_assert!(
            out.len() < out.capacity(),
            "iovec capacity reserved at start-up"
        );
        out.push(libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: take,
        });
    });
}

/// crc32c of the 4 KiB block at byte `at` of the request's segments.
#[inline]
pub(super) fn crc_of(segs: &[Segment], at: usize) -> u32 {
    let mut crc = 0;
    for_each_piece(segs, at, BLOCK_SIZE, |addr, take| {
        // SAFETY: the submit contract keeps the segment valid for reads.
        let bytes = unsafe { std::slice::from_raw_parts(addr, take) };
        crc = crc32c::crc32c_append(crc, bytes);
    });
    crc
}

#[inline]
pub(super) fn zero_fill(op: &mut Op, at: usize, len: usize) {
    for_each_piece(&op.segs, at, len, |addr, take| {
        // SAFETY: the submit contract keeps the segment valid for writes.
        unsafe { std::ptr::write_bytes(addr, 0, take) };
    });
}
