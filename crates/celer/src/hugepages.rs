//! Huge pages for the benchmarks: reserve enough 2 MiB pages for the run
//! (root only; `vm.nr_hugepages` is 0 on a fresh machine) and put the
//! reserve back afterwards.

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// 2 MiB pages neither in use nor promised to a mapping now
/// (`HugePages_Free` − `HugePages_Rsvd`), 0 if unknown.
pub fn free_pages() -> u64 {
    let Ok(t) = std::fs::read_to_string("/proc/meminfo") else {
        return 0;
    };
    let field = |name: &str| -> u64 {
        t.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    field("HugePages_Free:").saturating_sub(field("HugePages_Rsvd:"))
}

/// Huge pages reserved for a run; dropping it restores `vm.nr_hugepages`.
pub struct Reserve {
    restore: Option<u64>,
    /// What was done, for the report.
    pub note: String,
}

impl Reserve {
    /// Makes `pages` 2 MiB pages free if it can: raises `vm.nr_hugepages`
    /// by what is missing when run as root.
    pub fn ensure(pages: u64) -> Reserve {
        let free = free_pages();
        if free >= pages {
            return Reserve {
                restore: None,
                note: format!("{free} huge pages were free"),
            };
        }
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            return Reserve {
                restore: None,
                note: format!("not root: {free} huge pages free, none reserved"),
            };
        }
        let Some(before) = std::fs::read_to_string(NR_HUGEPAGES)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
        else {
            return Reserve {
                restore: None,
                note: format!("cannot read {NR_HUGEPAGES}"),
            };
        };
        let want = before + (pages - free);
        if let Err(e) = std::fs::write(NR_HUGEPAGES, want.to_string()) {
            return Reserve {
                restore: None,
                note: format!("cannot raise {NR_HUGEPAGES}: {e}"),
            };
        }
        Reserve {
            restore: Some(before),
            note: format!(
                "vm.nr_hugepages raised {before} -> {want} for the run ({} free now)",
                free_pages()
            ),
        }
    }
}

impl Drop for Reserve {
    fn drop(&mut self) {
        if let Some(n) = self.restore {
            let _ = std::fs::write(NR_HUGEPAGES, n.to_string());
        }
    }
}
