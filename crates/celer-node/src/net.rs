//! What a node shard's core needs from outside besides its engine shard:
//! byte streams to peers, readiness interest per connection, and the
//! clock. The shard logic (`shard.rs` and `shard/`) reaches sockets and
//! time only through a [`Net`], the way the engine reaches its disk only
//! through `celer_engine::Disk`: in production an [`EpollNet`] (nonblocking
//! TCP sockets in the shard thread's epoll set, the system clock); in
//! `celer-sim` a simulated network and clock, so the same shard code runs
//! in a deterministic simulation.
//!
//! Static generics, no dynamic dispatch: the production shard is
//! `ShardLoop<UringDisk, EpollNet>`, and each call is the syscall it
//! replaced.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

/// The shard's window on the network and the clock.
pub trait Net {
    /// One connection's byte stream (nonblocking: `WouldBlock` when empty
    /// or full).
    type Stream: Read + Write;
    /// The current time.
    fn now(&self) -> Instant;
    /// Wall-clock milliseconds since the Unix epoch (capability expiry, the
    /// version clock's bound).
    fn unix_ms(&self) -> u64;
    /// Starts a connection to `addr`; it becomes writable once connected.
    fn connect(&mut self, addr: SocketAddr) -> io::Result<Self::Stream>;
    /// Reports readiness of connection `c` (the shard's index) from now on.
    fn watch(&mut self, c: usize, s: &Self::Stream, read: bool, write: bool);
    /// Changes what is reported for `c`.
    fn rewatch(&mut self, c: usize, s: &Self::Stream, read: bool, write: bool);
    /// Stops reporting `c` (it is closing; the stream is dropped next).
    fn unwatch(&mut self, c: usize, s: &Self::Stream);
    /// The peer's address, for logs.
    fn describe(&self, s: &Self::Stream) -> String;
}

/// Production: TCP sockets registered in the shard thread's epoll set (the
/// connection's index is its token), and the system clock.
pub struct EpollNet {
    pub(crate) epfd: OwnedFd,
}

impl EpollNet {
    pub(crate) fn new() -> io::Result<EpollNet> {
        // SAFETY: plain syscall; checked.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor.
        Ok(EpollNet {
            epfd: unsafe { OwnedFd::from_raw_fd(epfd) },
        })
    }

    /// Adds a descriptor that is not a connection (mailbox, engine).
    pub(crate) fn add(&self, fd: RawFd, token: u64) {
        epoll_ctl(
            self.epfd.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd,
            token,
            libc::EPOLLIN as u32,
        );
    }
}

fn bits(read: bool, write: bool) -> u32 {
    let mut bits = libc::EPOLLRDHUP as u32;
    if read {
        bits |= libc::EPOLLIN as u32;
    }
    if write {
        bits |= libc::EPOLLOUT as u32;
    }
    bits
}

fn epoll_ctl(epfd: RawFd, op: libc::c_int, fd: RawFd, token: u64, events: u32) {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: valid fds and event struct.
    unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) };
}

impl Net for EpollNet {
    type Stream = TcpStream;

    #[inline]
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn unix_ms(&self) -> u64 {
        crate::unix_ms()
    }

    fn connect(&mut self, addr: SocketAddr) -> io::Result<TcpStream> {
        connect_nonblocking(addr)
    }

    fn watch(&mut self, c: usize, s: &TcpStream, read: bool, write: bool) {
        let fd = s.as_raw_fd();
        epoll_ctl(
            self.epfd.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd,
            c as u64,
            bits(read, write),
        );
    }

    fn rewatch(&mut self, c: usize, s: &TcpStream, read: bool, write: bool) {
        let fd = s.as_raw_fd();
        epoll_ctl(
            self.epfd.as_raw_fd(),
            libc::EPOLL_CTL_MOD,
            fd,
            c as u64,
            bits(read, write),
        );
    }

    fn unwatch(&mut self, _c: usize, s: &TcpStream) {
        // SAFETY: removing a registered fd.
        unsafe {
            libc::epoll_ctl(
                self.epfd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                s.as_raw_fd(),
                std::ptr::null_mut(),
            )
        };
    }

    fn describe(&self, s: &TcpStream) -> String {
        s.peer_addr().map(|a| a.to_string()).unwrap_or_default()
    }
}

/// Starts a nonblocking connect; the socket becomes writable when connected.
fn connect_nonblocking(addr: SocketAddr) -> io::Result<TcpStream> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall; checked.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor, owned from here on.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let (storage, len) = sockaddr(addr);
    // SAFETY: storage holds a valid sockaddr of `len` bytes.
    let r = unsafe { libc::connect(fd, &storage as *const _ as *const libc::sockaddr, len) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            (
                storage,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            (
                storage,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}
