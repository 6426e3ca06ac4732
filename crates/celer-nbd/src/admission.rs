//! Who gets a connection thread: the caps of [`ConnLimits`], counted at
//! accept and given back when the connection's [`Ticket`] is dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::ConnLimits;

/// Connections open and in the handshake, overall and per source IP.
pub(crate) struct Admission {
    limits: ConnLimits,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    open: usize,
    handshaking: usize,
    /// (open, handshaking) per source IP; entries at (0, 0) are removed.
    per_ip: HashMap<IpAddr, (usize, usize)>,
}

/// One admitted connection's place in the counts.
pub(crate) struct Ticket {
    admission: Arc<Admission>,
    ip: Option<IpAddr>,
    handshaking: bool,
}

impl Admission {
    pub(crate) fn new(limits: ConnLimits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            counts: Mutex::new(Counts::default()),
        })
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        // The counts are updated whole under the lock: a panic elsewhere
        // cannot leave them half-done.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ticket for a new connection from `ip` (None: a Unix socket), or
    /// why it must be closed.
    pub(crate) fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Ticket, String> {
        let l = &self.limits;
        let mut c = self.counts();
        if c.open >= l.open_max {
            return Err(format!("{} connections already open", l.open_max));
        }
        if c.handshaking >= l.handshaking_max {
            return Err(format!(
                "{} connections already in the handshake",
                l.handshaking_max
            ));
        }
        if let Some(ip) = ip {
            let (open, handshaking) = c.per_ip.get(&ip).copied().unwrap_or((0, 0));
            if open >= l.open_per_ip_max {
                return Err(format!(
                    "{} connections already open from {ip}",
                    l.open_per_ip_max
                ));
            }
            if handshaking >= l.handshaking_per_ip_max {
                return Err(format!(
                    "{} connections from {ip} already in the handshake",
                    l.handshaking_per_ip_max
                ));
            }
            c.per_ip.insert(ip, (open + 1, handshaking + 1));
        }
        c.open += 1;
        c.handshaking += 1;
        Ok(Ticket {
            admission: self.clone(),
            ip,
            handshaking: true,
        })
    }
}

impl Ticket {
    /// The handshake is over (either way): the slot leaves the handshake caps.
    pub(crate) fn handshake_done(&mut self) {
        if !self.handshaking {
            return;
        }
        self.handshaking = false;
        let mut c = self.admission.counts();
        c.handshaking -= 1;
        if let Some(ip) = self.ip {
            if let Some(e) = c.per_ip.get_mut(&ip) {
                e.1 -= 1;
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.handshake_done();
        let mut c = self.admission.counts();
        c.open -= 1;
        if let Some(ip) = self.ip {
            if let Some(e) = c.per_ip.get_mut(&ip) {
                e.0 -= 1;
                if e.0 == 0 {
                    c.per_ip.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_and_give_back() {
        let a = Admission::new(ConnLimits {
            open_max: 5,
            open_per_ip_max: 3,
            handshaking_max: 4,
            handshaking_per_ip_max: 2,
            ..ConnLimits::default()
        });
        let x: IpAddr = [10, 0, 0, 1].into();
        let y: IpAddr = [10, 0, 0, 2].into();
        let mut t1 = a.admit(Some(x)).expect("first");
        let _t2 = a.admit(Some(x)).expect("second");
        assert!(a.admit(Some(x)).is_err(), "two in the handshake from x");
        t1.handshake_done();
        let _t3 = a.admit(Some(x)).expect("a handshake slot came back");
        let e = a.admit(Some(x)).err().expect("three open from x");
        assert!(e.contains("from 10.0.0.1"), "{e}");
        let _t4 = a.admit(Some(y)).expect("y");
        let mut t5 = a.admit(None).expect("unix");
        let e = a.admit(None).err().expect("five open in all");
        assert!(e.contains("5 connections already open"), "{e}");
        drop(t1);
        let e = a.admit(None).err().expect("four in the handshake");
        assert!(e.contains("4 connections already in the handshake"), "{e}");
        t5.handshake_done();
        let _t6 = a.admit(Some(y)).expect("slots came back");
    }
}
