//! The all-zero test shared by the volume (the thin rule: a unit stored as zeros is a hole)
//! and the server (holes in READ replies). No dependencies: both sides of the crate's
//! dependency graph use it.
#![forbid(unsafe_code)]

/// Whether `b` is all zeros. Ciphertext and real data are almost never zero at their start,
/// so most blocks are decided on the first 16 bytes; otherwise the whole block is ORed
/// together (vectorised, no branch per 16 bytes).
pub fn is_zero(b: &[u8]) -> bool {
    let (chunks, rest) = b.as_chunks::<16>();
    match chunks.split_first() {
        Some((first, _)) if u128::from_ne_bytes(*first) != 0 => false,
        _ => {
            chunks
                .iter()
                .fold(0u128, |a, c| a | u128::from_ne_bytes(*c))
                == 0
                && rest.iter().all(|&x| x == 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn zero_and_not() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 4096]));
        assert!(is_zero(&[0u8; 37]));
        for at in [0usize, 15, 16, 4095, 36] {
            let mut b = vec![0u8; if at == 36 { 37 } else { 4096 }];
            b[at] = 1;
            assert!(!is_zero(&b), "byte {at}");
        }
    }
}
