//! EngineDevice: an engine volume behind the BlockDevice boundary.

mod common;

use celer_device::{BlockDevice, DeviceQueue, IoCompletion, IoError, IoOp, IoRequest, IoSegment};
use celer_engine::{AlignedBuf, Engine, EngineDevice, EngineDeviceConfig};
use common::*;

fn run(
    q: &mut Box<dyn DeviceQueue>,
    op: IoOp,
    offset: u64,
    len: u64,
    buf: Option<&mut AlignedBuf>,
) -> Result<(), IoError> {
    let segs: Vec<IoSegment> = match buf {
        // Two segments per request, to cross segment and chunk boundaries.
        Some(b) => {
            let half = b.len() / 2;
            let p = b.as_mut_ptr();
            // SAFETY: both halves are inside b.
            vec![
                IoSegment { addr: p, len: half },
                IoSegment {
                    addr: unsafe { p.add(half) },
                    len: b.len() - half,
                },
            ]
        }
        None => vec![],
    };
    let req = IoRequest {
        op,
        offset_bytes: offset,
        len_bytes: len,
        segments: &segs,
        tag: 77,
    };
    // SAFETY: buf outlives the completion we wait for below.
    unsafe { q.submit(&req)? };
    let mut out = None;
    for _ in 0..200_000 {
        q.poll(&mut |c: IoCompletion| out = Some(c.result.clone()));
        if let Some(r) = out.take() {
            return r;
        }
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    panic!("request at {offset} never completed");
}

#[test]
fn engine_volume_behind_the_device_boundary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk");
    // 16-block (64 KiB) chunks, 2 shards: a 256 KiB request spans 4+ chunks
    // on both shards.
    Engine::format(&path, &small_format(2, 32 << 20)).expect("format");
    let cfg = EngineDeviceConfig {
        path: path.clone(),
        volume: 5,
        size_bytes: 8 << 20,
        read_only: false,
    };
    let dev = EngineDevice::open(&cfg).expect("open device");
    assert_eq!(dev.info().size_bytes, 8 << 20);
    let dev: std::sync::Arc<dyn BlockDevice> = std::sync::Arc::new(dev);

    // Two queues on two threads, each on its own region, unaligned to chunks.
    let handles: Vec<_> = (0..2u64)
        .map(|qi| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let mut q = dev.open_queue(qi as usize).expect("queue");
                let base = qi * (2 << 20) + 3 * 4096;
                let mut w = AlignedBuf::new(64);
                for i in 0..64u64 {
                    pattern(qi, i, &mut w[i as usize * BS..(i as usize + 1) * BS]);
                }
                run(&mut q, IoOp::Write, base, 0, Some(&mut w)).expect("write 256K");
                let mut r = AlignedBuf::new(64);
                run(&mut q, IoOp::Read, base, 0, Some(&mut r)).expect("read 256K");
                assert!(r[..] == w[..], "queue {qi}: read back differs");
                run(&mut q, IoOp::Flush, 0, 0, None).expect("flush");
            })
        })
        .collect();
    for h in handles {
        h.join().expect("queue thread");
    }

    let mut q = dev.open_queue(0).expect("queue");
    // Zeroes and discard across a chunk boundary read back as zeroes.
    run(&mut q, IoOp::WriteZeroes, 10 * 4096, 12 * 4096, None).expect("write zeroes");
    run(&mut q, IoOp::Discard, 40 * 4096, 40 * 4096, None).expect("discard");
    let mut r = AlignedBuf::new(80);
    run(&mut q, IoOp::Read, 3 * 4096, 0, Some(&mut r)).expect("read");
    let mut want = vec![0u8; BS];
    for i in 0..80u64 {
        let b = i + 3;
        let zeroed = (10..22).contains(&b) || (40..80).contains(&b) || b >= 67;
        if zeroed {
            want.fill(0);
        } else {
            pattern(0, i, &mut want);
        }
        assert!(
            r[i as usize * BS..(i as usize + 1) * BS] == want[..],
            "block {b}"
        );
    }
    // A discard and a write-zeroes as large as the device says it takes
    // (what vhost-user-blk advertises to a guest), over written chunks.
    let max = dev.info().max_request_bytes;
    let mut w = AlignedBuf::new(16);
    w.fill(0x5a);
    for at in [4u64 << 20, (4 << 20) + (1 << 20)] {
        run(&mut q, IoOp::Write, at, 0, Some(&mut w)).expect("write");
    }
    run(&mut q, IoOp::Discard, 4 << 20, max.min(4 << 20), None)
        .expect("discard of the largest request");
    run(&mut q, IoOp::Write, 4 << 20, 0, Some(&mut w)).expect("write");
    run(&mut q, IoOp::WriteZeroes, 4 << 20, max.min(4 << 20), None)
        .expect("write zeroes of the largest request");
    let mut r = AlignedBuf::new(16);
    run(&mut q, IoOp::Read, 4 << 20, 0, Some(&mut r)).expect("read");
    assert!(r.iter().all(|&b| b == 0), "zeroed");
    // Bad requests: clear errors, nothing submitted.
    let mut one = AlignedBuf::new(1);
    assert!(matches!(
        run(&mut q, IoOp::Read, 8 << 20, 0, Some(&mut one)),
        Err(IoError::OutOfRange { .. })
    ));
    assert!(matches!(
        run(&mut q, IoOp::Read, 512, 0, Some(&mut one)),
        Err(IoError::Misaligned { .. })
    ));
    drop(q);
    drop(dev);

    // Reopen: the data is there, and new writes (whose versions must start
    // above what is on disk) are applied.
    let dev = EngineDevice::open(&cfg).expect("reopen");
    let mut q = dev.open_queue(0).expect("queue");
    let mut r = AlignedBuf::new(2);
    run(&mut q, IoOp::Read, 3 * 4096, 0, Some(&mut r)).expect("read after reopen");
    pattern(0, 0, &mut want);
    assert!(r[..BS] == want[..], "data lost across reopen");
    let mut w = AlignedBuf::new(2);
    w.fill(0x3c);
    run(&mut q, IoOp::Write, 3 * 4096, 0, Some(&mut w)).expect("overwrite after reopen");
    run(&mut q, IoOp::Read, 3 * 4096, 0, Some(&mut r)).expect("read");
    assert!(
        r[..] == w[..],
        "a write after reopen was not applied (versions restarted low?)"
    );
    drop(q);
    drop(dev);

    // Read-only device refuses writes.
    let ro = EngineDevice::open(&EngineDeviceConfig {
        read_only: true,
        ..cfg
    })
    .expect("open read-only");
    let mut q = ro.open_queue(0).expect("queue");
    assert!(matches!(
        run(&mut q, IoOp::Write, 0, 0, Some(&mut w)),
        Err(IoError::ReadOnly)
    ));
}
