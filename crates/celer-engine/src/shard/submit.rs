//! Building io_uring submissions from a request's segments, and walking
//! a request's pieces.

use super::*;

/// Submits `sqe`, making room in the submission queue first if needed.
pub(super) fn push_sqe(
    ring: &mut IoUring,
    unsubmitted: &mut u32,
    inflight: &mut u32,
    sqe: &io_uring::squeue::Entry,
) {
    loop {
        // SAFETY: every buffer and iovec an SQE points to lives in an op,
        // journal buffer or checkpoint that is neither moved nor reused
        // until its CQE has been reaped.
        if unsafe { ring.submission().push(sqe) }.is_ok() {
            break;
        }
        // Submission queue full: hand it to the kernel. The CQ budget keeps
        // completions from overflowing, so this cannot fail with EBUSY.
        match ring.submit() {
            Ok(_) => *unsubmitted = 0,
            // Interrupted, or the kernel is short of memory: try again.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {
                std::thread::yield_now()
            }
            // Anything else means a bad SQE or ring: a programming error.
            Err(e) => panic!("io_uring_enter failed with an in-budget queue: {e}"),
        }
    }
    *unsubmitted += 1;
    *inflight += 1;
}

/// A read or write of `iov` at `offset`: the plain opcode for one buffer
/// (cheaper in the kernel), the vectored one otherwise.
pub(super) fn rw_sqe(
    write: bool,
    fd: i32,
    iov: &[libc::iovec],
    offset: u64,
    rw_flags: i32,
) -> io_uring::squeue::Entry {
    let fd = types::Fd(fd);
    match (write, iov) {
        (false, [one]) => opcode::Read::new(fd, one.iov_base as *mut u8, one.iov_len as u32)
            .offset(offset)
            .build(),
        (true, [one]) => opcode::Write::new(fd, one.iov_base as *const u8, one.iov_len as u32)
            .offset(offset)
            .rw_flags(rw_flags)
            .build(),
        (false, _) => opcode::Readv::new(fd, iov.as_ptr(), iov.len() as u32)
            .offset(offset)
            .build(),
        (true, _) => opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32)
            .offset(offset)
            .rw_flags(rw_flags)
            .build(),
    }
}

/// End (exclusive) of the run of `action` blocks starting at `i` whose
/// physical blocks are consecutive.
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
pub(super) fn crc_of(segs: &[Segment], at: usize) -> u32 {
    let mut crc = 0;
    for_each_piece(segs, at, BLOCK_SIZE, |addr, take| {
        // SAFETY: the submit contract keeps the segment valid for reads.
        let bytes = unsafe { std::slice::from_raw_parts(addr, take) };
        crc = crc32c::crc32c_append(crc, bytes);
    });
    crc
}

pub(super) fn zero_fill(op: &mut Op, at: usize, len: usize) {
    for_each_piece(&op.segs, at, len, |addr, take| {
        // SAFETY: the submit contract keeps the segment valid for writes.
        unsafe { std::ptr::write_bytes(addr, 0, take) };
    });
}
