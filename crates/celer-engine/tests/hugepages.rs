//! A shard's fixed buffers on 2 MiB huge pages: taken from the kernel's
//! reserve when asked and available, 4 KiB pages otherwise, and data
//! written through them reads back after a restart.
//!
//! Reserving huge pages needs root (`vm.nr_hugepages`); the test restores
//! the reserve when it ends, panicking or not. No other test asks for huge
//! pages (`OpenOptions::hugepages` is off by default), so the pages it
//! reserves are its own while it runs.

mod common;

use celer_engine::{AlignedBuf, BufPool, Engine, OpenOptions, PageSize, HUGE_PAGE_BYTES};
use common::*;

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

fn meminfo(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("read /proc/meminfo");
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.trim().strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/meminfo"))
}

/// Huge pages neither in use nor promised to a mapping.
fn free_huge_pages() -> u64 {
    meminfo("HugePages_Free") - meminfo("HugePages_Rsvd")
}

/// Puts `vm.nr_hugepages` back as it was.
struct Reserve(String);

impl Reserve {
    fn raise_by(pages: u64) -> Reserve {
        let before = std::fs::read_to_string(NR_HUGEPAGES).expect("read nr_hugepages");
        let n: u64 = before.trim().parse().expect("nr_hugepages is a number");
        std::fs::write(NR_HUGEPAGES, (n + pages).to_string()).expect("raise nr_hugepages");
        Reserve(before)
    }
}

impl Drop for Reserve {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.0.trim());
    }
}

#[test]
fn shard_buffers_use_reserved_huge_pages_and_fall_back_to_base_pages() {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: reserving huge pages needs root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = temp_disk(dir.path(), "disk");
    Engine::format(&disk, &small_format(2, 64 << 20)).expect("format");
    let huge = OpenOptions {
        hugepages: true,
        ..OpenOptions::default()
    };

    // Without enough free huge pages: 4 KiB pages, and the I/O works.
    let short = BufPool::new((free_huge_pages() as usize + 1) * HUGE_PAGE_BYTES, true);
    assert_eq!(short.pages(), PageSize::Base4K);
    drop(short);

    {
        let _reserve = Reserve::raise_by(16);
        let free_before = free_huge_pages();
        assert!(
            free_before >= 16,
            "the kernel reserved only {free_before} free huge pages"
        );
        let engine = Engine::open(&disk, &huge).expect("open with huge pages");
        let mut shards = engine.into_shards();
        let mut mapped = 0;
        for s in &shards {
            let (pages, bytes) = s.buffer_pages();
            assert_eq!(pages, PageSize::Huge2M, "shard {}", s.id());
            assert_eq!(bytes % HUGE_PAGE_BYTES, 0);
            mapped += bytes;
        }
        assert_eq!(
            free_before - free_huge_pages(),
            (mapped / HUGE_PAGE_BYTES) as u64,
            "the shards' pools are what the reserve lost"
        );
        // A QD1 write goes through a journal buffer on those pages.
        let mut data = AlignedBuf::new(1);
        pattern(1, 0, &mut data);
        write(&mut shards[0], 5, 0, &mut data, 10).expect("write");
        assert_eq!(&read(&mut shards[0], 5, 0, 1).expect("read")[..], &data[..]);
        for s in shards {
            s.close().expect("close");
        }
        assert_eq!(free_huge_pages(), free_before, "closing gives them back");

        // Not asked: 4 KiB pages although huge ones are free.
        let engine = Engine::open(&disk, &OpenOptions::default()).expect("open");
        let mut shards = engine.into_shards();
        assert_eq!(shards[0].buffer_pages().0, PageSize::Base4K);
        assert_eq!(&read(&mut shards[0], 5, 0, 1).expect("read")[..], &data[..]);
        for s in shards {
            s.close().expect("close");
        }
    }
}
