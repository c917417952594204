//! Test data shared by the volume and store tests: deterministic pseudo-random bytes.
#![allow(dead_code)]

/// `len` xorshift64 bytes from `seed` (any seed, 0 included): incompressible, never long
/// zero runs, so a unit of it is never taken for a hole by the thin rule.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
