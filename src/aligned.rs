//! Byte buffers whose first byte sits on a 4 KiB boundary.
//!
//! Why: a volume opened with `cache none` (O_DIRECT) hands its buffers to the device, which
//! needs their address, like the offset and length, aligned to its logical block (512 bytes or
//! 4 KiB). A `Vec<u8>` from malloc is 16-byte aligned (large ones sit 16 bytes past a page
//! boundary), so every request would otherwise be copied into a bounce buffer. The server's
//! request and reply buffers (`server/bufpool.rs`) and the volume's scratch are these instead,
//! for every volume: one page of slack per buffer, no copy, and no `unsafe` (the aligned
//! window is a slice of an ordinary, over-allocated `Vec`, whose heap block never moves).

use std::ops::{Deref, DerefMut};

/// The alignment of [`AlignedBuf`]'s data: a page, enough for every direct-I/O device.
pub const ALIGN: usize = 4096;

/// `len` bytes starting at a multiple of [`ALIGN`]; contents are initialised (zeros when new,
/// earlier contents after [`resize`](Self::resize) within capacity).
#[derive(Default)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> AlignedBuf {
        if len == 0 {
            return AlignedBuf::default();
        }
        let raw = vec![0u8; len + ALIGN - 1];
        let start = (ALIGN - (raw.as_ptr() as usize) % ALIGN) % ALIGN;
        AlignedBuf { raw, start, len }
    }

    /// Bytes the buffer can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.raw.len().saturating_sub(self.start)
    }

    /// Sets the length. Within capacity nothing is written (the bytes are whatever they were:
    /// callers overwrite what they use); beyond it a new zeroed buffer replaces this one.
    pub fn resize(&mut self, len: usize) {
        if len <= self.capacity() {
            self.len = len;
        } else {
            *self = AlignedBuf::zeroed(len);
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// Whether `buf` starts on a multiple of `align` (a power of two).
pub fn is_aligned(buf: &[u8], align: usize) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(align)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_at_every_size_and_after_resize() {
        for len in [1, 511, 512, 4095, 4096, 4097, 65536, 1 << 20] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(is_aligned(&b, ALIGN), "len {len}");
            assert!(b.iter().all(|&x| x == 0));
            b[len - 1] = 9;
            let p = b.as_ptr();
            b.resize(len / 2);
            b.resize(len);
            assert_eq!((b.as_ptr(), b[len - 1]), (p, 9), "kept within capacity");
            b.resize(len * 3);
            assert!(is_aligned(&b, ALIGN) && b.len() == len * 3);
        }
        let e = AlignedBuf::zeroed(0);
        assert!(e.is_empty() && e.capacity() == 0);
    }

    #[test]
    fn moving_keeps_the_address() {
        let b = AlignedBuf::zeroed(8192);
        let p = b.as_ptr();
        let v = Box::new([b]);
        assert_eq!(v[0].as_ptr(), p);
    }
}
