//! Loopback ports for daemons that tests and benches start as child
//! processes, reserved so that no other test can take them.
//!
//! A child daemon is told its port on the command line, so the port is
//! chosen before the daemon binds it. Checking that a port is free and
//! letting it go is a race: a test running beside this one (nextest runs
//! each test in its own process) could pick the same port in between, or
//! take it while a killed node is down and before it restarts. That is how
//! a cluster test once failed with "bind 127.0.0.1:21539: Address already
//! in use".
//!
//! [`reserve`] closes the race among the processes that use it: each port
//! it hands out is locked (`flock` on `$TMPDIR/celer-ports/PORT`) for the
//! rest of the calling process's life, and the kernel drops the lock when
//! that process exits, however it exits. Ports come from below the kernel's
//! ephemeral range, so an outgoing connection never takes one either.
//! Ports bound by anything else are skipped: each candidate must also bind.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Mutex;

/// The lock files held by this process: one per reserved port.
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// Ports below this many under the ephemeral range's start are used.
const SPAN: u16 = 12000;

/// A loopback address whose port no other [`reserve`] caller gets while
/// this process lives, free to bind now. The daemon given it binds it
/// itself (with `SO_REUSEADDR`, as Rust's `TcpListener` does, so it can
/// bind it again after a restart).
pub fn reserve() -> io::Result<SocketAddr> {
    let base = reserve_block_scanning_from(&[0], start_offset())?;
    Ok(SocketAddr::from(([127, 0, 0, 1], base)))
}

/// A base port `p` such that every `p + offset` is reserved as by
/// [`reserve`], for a program that takes a base port and derives the rest
/// (`celer up --base-port`).
pub fn reserve_block(offsets: &[u16]) -> io::Result<u16> {
    reserve_block_scanning_from(offsets, start_offset())
}

/// [`reserve_block`], trying the bases in order from the `start`th
/// candidate.
fn reserve_block_scanning_from(offsets: &[u16], start: u64) -> io::Result<u16> {
    let (low, high) = candidate_range();
    let widest = offsets.iter().copied().max().unwrap_or(0);
    if widest >= high - low {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a block {widest} ports wide does not fit in {low}..{high}"),
        ));
    }
    let dir = lock_dir();
    std::fs::create_dir_all(&dir)?;
    let span = u64::from(high - low - widest);
    for k in 0..span {
        let base = low + ((start + k) % span) as u16;
        let mut locks = Vec::with_capacity(offsets.len());
        for &o in offsets {
            match take(&dir, base + o)? {
                Some(lock) => locks.push(lock),
                None => break, // the locks taken so far go with `locks`
            }
        }
        if locks.len() == offsets.len() {
            HELD.lock().unwrap_or_else(|e| e.into_inner()).extend(locks);
            return Ok(base);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no block of loopback ports in {low}..{high} is both unreserved and free"),
    ))
}

/// The lock of `port` if no process holds it and the port binds now.
fn take(dir: &std::path::Path, port: u16) -> io::Result<Option<File>> {
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(port.to_string()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Ok(None); // reserved by another process, or earlier by this one
    }
    if TcpListener::bind(("127.0.0.1", port)).is_err() {
        return Ok(None); // bound by something that does not reserve
    }
    Ok(Some(lock))
}

/// `SPAN` ports just below the ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`; 32768 if unreadable).
fn candidate_range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|&p| p > 2048)
        .unwrap_or(32768);
    let low = ephemeral_low.saturating_sub(SPAN).max(1024);
    (low, ephemeral_low)
}

fn lock_dir() -> PathBuf {
    std::env::temp_dir().join("celer-ports")
}

/// Where this process starts its scan: spread so that processes starting
/// together rarely contend for the same locks (contention is safe, only
/// slower).
fn start_offset() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    (u64::from(std::process::id()) << 20 ^ nanos).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 17
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// The tests of this module reserve ports in one process: one at a time.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn lockable_now(path: &std::path::Path) -> bool {
        let Ok(f) = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
        else {
            return false;
        };
        // SAFETY: flock on a descriptor owned here; closing `f` unlocks.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    }

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let (_, high) = candidate_range();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let a = reserve().expect("reserve");
            assert!(a.port() < high, "{a} is in the ephemeral range");
            assert!(seen.insert(a.port()), "{a} handed out twice");
            TcpListener::bind(a).expect("a reserved port binds");
        }
    }

    #[test]
    fn a_port_locked_by_another_process_is_skipped_until_that_process_exits() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        // flock(1) in another process holds the lock of the first port
        // this scan would try: one nobody holds now.
        let (low, high) = candidate_range();
        let dir = lock_dir();
        std::fs::create_dir_all(&dir).expect("dir");
        let start = (0..u64::from(high - low))
            .map(|k| k + u64::from(std::process::id()))
            .find(|s| {
                lockable_now(&dir.join((low + (s % u64::from(high - low)) as u16).to_string()))
            })
            .expect("some port nobody holds");
        let first = low + (start % u64::from(high - low)) as u16;
        let path = dir.join(first.to_string());
        let mut holder = Command::new("flock")
            .args(["--exclusive", "--no-fork"])
            .arg(&path)
            .args(["sleep", "60"])
            .spawn()
            .expect("flock(1)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if !lockable_now(&path) {
                break; // the holder has it
            }
            assert!(
                std::time::Instant::now() < deadline,
                "flock(1) never took the lock"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let a = reserve_block_scanning_from(&[0], start).expect("reserve");
        assert_ne!(a, first, "a port locked by another process was handed out");
        // The holder dies without unlocking: the kernel releases its lock.
        holder.kill().expect("kill");
        holder.wait().expect("wait");
        let b = reserve_block_scanning_from(&[0], start).expect("reserve");
        assert_eq!(b, first, "the lock of a dead process still held its port");
    }

    #[test]
    fn a_block_is_reserved_whole_and_never_overlaps_a_reserved_port() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let offsets = [0u16, 1, 101, 102, 103, 299];
        let mut taken = std::collections::HashSet::new();
        for _ in 0..10 {
            let single = reserve().expect("reserve");
            assert!(taken.insert(single.port()));
            let base = reserve_block(&offsets).expect("block");
            for o in offsets {
                assert!(taken.insert(base + o), "port {} handed out twice", base + o);
                TcpListener::bind(("127.0.0.1", base + o)).expect("a reserved port binds");
            }
        }
        assert!(
            reserve_block(&[0, 20000]).is_err(),
            "a block wider than the range"
        );
    }
}
