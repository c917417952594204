//! Test data shared by the volume and store tests: deterministic pseudo-random bytes.
#![allow(dead_code)]

use cryptvol::volume::XtsKey;

/// A fixed, valid 64-byte XTS key (its halves differ).
pub fn key() -> XtsKey {
    XtsKey::new(
        &(0..64u8)
            .map(|i| i.wrapping_mul(29) ^ 0x5c)
            .collect::<Vec<_>>(),
    )
    .unwrap()
}

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
