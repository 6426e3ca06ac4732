//! Whether the host file system under a disk *file* can still hold what the
//! engine may write into it. A sparse disk file grows as chunks are first
//! written; if the file system fills first, writes fail with ENOSPC (and
//! the node is taken out). This says so beforehand, in heartbeats and
//! `celer status`. A block device does not grow: nothing to check.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Bytes free for unprivileged use on the file system holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is valid; the call fills it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path, `st` a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// A warning when the file system under the disk file `disk` has less room
/// than the file may still take (its size less what is allocated).
pub(crate) fn warning(disk: &Path) -> Option<String> {
    let meta = std::fs::metadata(disk).ok()?;
    if !meta.file_type().is_file() {
        return None;
    }
    let may_grow = meta.len().saturating_sub(meta.blocks() * 512);
    let free = free_bytes(disk)?;
    (free < may_grow).then(|| {
        format!(
            "the file system under {} has {} MiB free and the disk file may still grow by {} MiB: writes will fail with ENOSPC before the engine is full",
            disk.display(),
            free >> 20,
            may_grow >> 20
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_file_larger_than_the_free_space_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let small = dir.path().join("small.img");
        std::fs::File::create(&small)
            .and_then(|f| f.set_len(1 << 20))
            .expect("small sparse file");
        assert_eq!(warning(&small), None, "1 MiB fits");
        let free = free_bytes(dir.path()).expect("statvfs");
        let big = dir.path().join("big.img");
        // Sparse: takes no room, may grow past what is free.
        std::fs::File::create(&big)
            .and_then(|f| f.set_len(free + (1 << 30)))
            .expect("big sparse file");
        let w = warning(&big).expect("reported");
        assert!(w.contains("ENOSPC"), "{w}");
        assert_eq!(warning(&dir.path().join("missing")), None);
    }
}
