//! A random read/write/verify workload through a `BlockDevice` queue, with a
//! model of what every block must hold: used by the cluster tests while
//! nodes are killed, restarted and partitioned.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use celer_device::{BlockDevice, IoCompletion, IoOp, IoRequest, IoSegment};

pub const BLOCK: usize = 4096;

/// The content of block `block` written with `seed`: self-identifying, so a
/// misplaced or stale block is recognised.
pub fn fill(buf: &mut [u8], block: u64, seed: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        let v = block
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(seed.wrapping_mul(0x632B_E59B_D9B4_E019))
            .wrapping_add(i as u64);
        w.copy_from_slice(&v.to_le_bytes());
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockState {
    /// Never written: zeroes.
    Zero,
    Written(u64),
    /// A write failed (error after the deadline): old or new content.
    Either(Option<u64>, u64),
}

#[derive(Default, Debug)]
pub struct Report {
    pub writes: u64,
    pub reads: u64,
    pub errors: u64,
    pub mismatches: Vec<String>,
    /// Longest time any request took (the I/O pause during a failover).
    pub max_latency: Duration,
    pub model: HashMap<u64, BlockState>,
}

struct Slot {
    buf: Vec<u8>,
    op: IoOp,
    block: u64,
    blocks: u64,
    seed: u64,
    started: Instant,
    busy: bool,
}

/// Runs until `stop`: QD `depth`, 4 KiB..64 KiB requests over `blocks`
/// blocks from `first_block`; every read is checked against the model.
pub fn run(
    dev: Arc<dyn BlockDevice>,
    queue_index: usize,
    first_block: u64,
    blocks: u64,
    depth: usize,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> Report {
    let mut q = dev.open_queue(queue_index).expect("open queue");
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut rep = Report::default();
    let mut slots: Vec<Slot> = (0..depth)
        .map(|_| Slot {
            buf: vec![0u8; 16 * BLOCK],
            op: IoOp::Read,
            block: 0,
            blocks: 0,
            seed: 0,
            started: Instant::now(),
            busy: false,
        })
        .collect();
    let mut busy_blocks: HashMap<u64, ()> = HashMap::new();
    let mut write_seq = seed << 32;
    loop {
        let stopping = stop.load(Ordering::Acquire);
        // Fill the queue.
        if !stopping {
            for (i, s) in slots.iter_mut().enumerate() {
                if s.busy {
                    continue;
                }
                let n = 1 + next() % 16;
                let n = if next() % 4 == 0 { n } else { 1 };
                let b = first_block + next() % (blocks - n + 1);
                if (b..b + n).any(|x| busy_blocks.contains_key(&x)) {
                    continue;
                }
                let write = next() % 2 == 0;
                s.op = if write { IoOp::Write } else { IoOp::Read };
                s.block = b;
                s.blocks = n;
                write_seq += 1;
                s.seed = write_seq;
                if write {
                    for k in 0..n as usize {
                        fill(&mut s.buf[k * BLOCK..(k + 1) * BLOCK], b + k as u64, s.seed);
                    }
                }
                let seg = IoSegment {
                    addr: s.buf.as_mut_ptr(),
                    len: n as usize * BLOCK,
                };
                let req = IoRequest {
                    op: s.op,
                    offset_bytes: b * BLOCK as u64,
                    len_bytes: n * BLOCK as u64,
                    segments: &[seg],
                    tag: i as u64,
                };
                s.started = Instant::now();
                // SAFETY: the slot's buffer lives until its completion.
                match unsafe { q.submit(&req) } {
                    Ok(()) => {
                        s.busy = true;
                        for x in b..b + n {
                            busy_blocks.insert(x, ());
                        }
                    }
                    Err(e) => panic!("submit refused: {e}"),
                }
            }
        }
        let mut done: Vec<IoCompletion> = Vec::new();
        q.poll(&mut |c| done.push(c));
        if done.is_empty() {
            if stopping && q.inflight() == 0 {
                break;
            }
            if let Some(fd) = q.completion_fd() {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 5) };
            }
            continue;
        }
        for c in done {
            let s = &mut slots[c.tag as usize];
            s.busy = false;
            rep.max_latency = rep.max_latency.max(s.started.elapsed());
            for x in s.block..s.block + s.blocks {
                busy_blocks.remove(&x);
            }
            match (s.op, c.result) {
                (IoOp::Write, Ok(())) => {
                    rep.writes += 1;
                    for x in s.block..s.block + s.blocks {
                        rep.model.insert(x, BlockState::Written(s.seed));
                    }
                }
                (IoOp::Write, Err(e)) => {
                    rep.errors += 1;
                    eprintln!("write error at block {}: {e}", s.block);
                    for x in s.block..s.block + s.blocks {
                        let old = match rep.model.get(&x) {
                            Some(BlockState::Written(v)) => Some(*v),
                            _ => None,
                        };
                        rep.model.insert(x, BlockState::Either(old, s.seed));
                    }
                }
                (_, Ok(())) => {
                    rep.reads += 1;
                    for k in 0..s.blocks {
                        let x = s.block + k;
                        let got = &s.buf[k as usize * BLOCK..(k as usize + 1) * BLOCK];
                        if let Err(m) = check(&rep.model, x, got) {
                            rep.mismatches.push(m);
                        }
                    }
                }
                (_, Err(e)) => {
                    rep.errors += 1;
                    eprintln!("read error at block {}: {e}", s.block);
                }
            }
        }
    }
    rep
}

/// Whether `got` is what the model allows for block `x`.
pub fn check(model: &HashMap<u64, BlockState>, x: u64, got: &[u8]) -> Result<(), String> {
    let mut want = vec![0u8; BLOCK];
    let ok_with = |seed: Option<u64>, want: &mut Vec<u8>| {
        match seed {
            None => want.iter_mut().for_each(|b| *b = 0),
            Some(s) => fill(want, x, s),
        }
        got == &want[..]
    };
    let ok = match model.get(&x).copied().unwrap_or(BlockState::Zero) {
        BlockState::Zero => ok_with(None, &mut want),
        BlockState::Written(s) => ok_with(Some(s), &mut want),
        BlockState::Either(old, new) => ok_with(old, &mut want) || ok_with(Some(new), &mut want),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "block {x}: expected {:?}, got bytes starting {:02x?}",
            model.get(&x),
            &got[..16]
        ))
    }
}

/// Reads every block of the model back through a fresh queue and checks it.
pub fn verify_all(
    dev: &dyn BlockDevice,
    queue_index: usize,
    model: &HashMap<u64, BlockState>,
) -> Vec<String> {
    let mut q = dev.open_queue(queue_index).expect("open queue");
    let mut bad = Vec::new();
    let mut buf = vec![0u8; BLOCK];
    let mut blocks: Vec<u64> = model.keys().copied().collect();
    blocks.sort_unstable();
    for x in blocks {
        let seg = IoSegment {
            addr: buf.as_mut_ptr(),
            len: BLOCK,
        };
        let req = IoRequest {
            op: IoOp::Read,
            offset_bytes: x * BLOCK as u64,
            len_bytes: BLOCK as u64,
            segments: &[seg],
            tag: x,
        };
        // SAFETY: buf outlives the request (we wait for it below).
        unsafe { q.submit(&req) }.expect("submit");
        let mut result = None;
        while result.is_none() {
            q.poll(&mut |c| result = Some(c.result));
            if result.is_none() {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        match result {
            Some(Ok(())) => {
                if let Err(m) = check(model, x, &buf) {
                    bad.push(m);
                }
            }
            Some(Err(e)) => bad.push(format!("block {x}: read error {e}")),
            None => unreachable!(),
        }
    }
    bad
}
