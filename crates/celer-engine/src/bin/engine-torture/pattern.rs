//! The crash test's block content, shared by the writer (engine-torture)
//! and the checker (tests/crash.rs).

/// Content of (volume, 512-byte sector) at version `v`: a 24-byte header
/// then a stream derived from it.
pub fn pattern(volume: u64, block: u64, v: u64, out: &mut [u8]) {
    out[0..8].copy_from_slice(&volume.to_le_bytes());
    out[8..16].copy_from_slice(&block.to_le_bytes());
    out[16..24].copy_from_slice(&v.to_le_bytes());
    let mut x = volume ^ block.rotate_left(17) ^ v.rotate_left(34) ^ 0xA5A5_A5A5;
    for w in out[24..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
}
