//! Secret bytes: in locked memory (`crate::secmem`: mlocked, excluded from core dumps),
//! zeroized on drop, no `Debug` beyond a redacted one, no `Display`, no `Clone`.

use crate::secmem::LockedBytes;

pub struct Secret(LockedBytes);

impl Secret {
    /// Moves `bytes` into locked memory; the vector's heap copy is zeroized.
    pub fn new(bytes: Vec<u8>) -> Secret {
        let bytes = zeroize::Zeroizing::new(bytes);
        Secret(LockedBytes::from_slice(&bytes))
    }
    /// Copies `bytes` into locked memory.
    pub fn from_slice(bytes: &[u8]) -> Secret {
        Secret(LockedBytes::from_slice(bytes))
    }
    pub fn zeroed(len: usize) -> Secret {
        Secret(LockedBytes::zeroed(len))
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    pub fn expose_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
    /// Shortens to `len` bytes, zeroizing the rest (e.g. after an in-place AEAD open).
    pub fn truncate(&mut self, len: usize) {
        self.0.truncate(len);
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret([REDACTED; {}])", self.0.len())
    }
}
