//! Multi-unit XTS: several data units per block-cipher call, for small (512-byte) units.
//!
//! One unit at a time, a 512-byte unit is only 32 blocks: the per-call set-up (tweak
//! encryption, IV reset, the wide kernels' prologue and tail) costs as much as the data. Here a
//! run of units is cut into chunks of [`CHUNK_BYTES`]; per chunk:
//!
//! ```text
//!  1. T0[u] = E_K2(plain64(first + u))        one multi-block call for every unit of the chunk
//!  2. T[u][j] = T0[u] * x^j  (GF(2^128))      chains interleaved across units (independent
//!                                             dependency chains keep the shifts pipelined)
//!  3. data ^= T;  wide block-cipher pass (K1) over the whole chunk;  data ^= T
//! ```
//!
//! Step 3's "wide pass" is a callback: RustCrypto's `encrypt_blocks` (VAES where the CPU has it)
//! for the pure-Rust backend, aws-lc's XTS with a fixed IV for the aws-lc backend (see
//! `awslc.rs`: it needs a constant per-unit offset, [`Offsets`]).
//!
//! Secrets: T0 and T are derived from K2; they live on this call's stack and are wiped before
//! it returns ([`Scratch`]'s `Drop`), also on unwind.

use zeroize::Zeroize;

use super::cipher::{UnitSize, plain64_iv};

/// Bytes per chunk: tweaks (one 16-byte block per data block) plus data stay inside L1/L2.
/// 16 KiB measured best of 4/8/16/32 KiB here (docs/benchmarks.md, "Sector cipher").
pub(crate) const CHUNK_BYTES: usize = 16 * 1024;
const CHUNK_BLOCKS: usize = CHUNK_BYTES / 16;
/// Units in a chunk at the smallest unit size.
pub(crate) const MAX_UNITS: usize = CHUNK_BYTES / 512;

/// A 128-bit field element as the XTS spec lays it out: little-endian, `lo` = bytes 0..8.
#[derive(Clone, Copy, Default)]
pub(crate) struct Gf {
    lo: u64,
    hi: u64,
}

impl Gf {
    pub(crate) fn from_bytes(b: &[u8; 16]) -> Gf {
        let (lo, hi) = b.split_at(8);
        Gf {
            lo: u64::from_le_bytes(lo.try_into().expect("8 bytes")),
            hi: u64::from_le_bytes(hi.try_into().expect("8 bytes")),
        }
    }

    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.lo.to_le_bytes());
        b[8..].copy_from_slice(&self.hi.to_le_bytes());
        b
    }

    /// Multiplication by x modulo x^128 + x^7 + x^2 + x + 1 (IEEE 1619 §5.2), 64-bit shifts.
    #[inline(always)]
    pub(crate) fn mul_x(self) -> Gf {
        let carry = ((self.hi as i64) >> 63) as u64 & 0x87;
        Gf {
            lo: (self.lo << 1) ^ carry,
            hi: (self.hi << 1) | (self.lo >> 63),
        }
    }

    /// Multiplication by x^n (n < 64), used for whole-unit strides at set-up only.
    pub(crate) fn mul_x_pow(self, n: usize) -> Gf {
        (0..n).fold(self, |t, _| t.mul_x())
    }

    fn xor(self, o: Gf) -> Gf {
        Gf {
            lo: self.lo ^ o.lo,
            hi: self.hi ^ o.hi,
        }
    }
}

impl Zeroize for Gf {
    fn zeroize(&mut self) {
        self.lo.zeroize();
        self.hi.zeroize();
    }
}

/// Per-unit constants XORed into each chunk's initial tweaks (`awslc.rs`: the chain of the
/// fixed-IV XTS pass that is cancelled out). Index = unit position inside a chunk.
pub(crate) type Offsets = [Gf; MAX_UNITS];

/// One call's tweak buffers, wiped on drop.
struct Scratch {
    t0: [[u8; 16]; MAX_UNITS],
    tweaks: [[u8; 16]; CHUNK_BLOCKS],
    /// Blocks of `tweaks` written so far (the prefix the wipe must cover).
    used: usize,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.t0.as_flattened_mut().zeroize();
        // Only the written prefix: a single 512-byte unit then wipes 512 bytes, not 16 KiB.
        self.tweaks[..self.used].as_flattened_mut().zeroize();
    }
}

/// Transforms `data` (whole units, unit *k* has number `first_unit + k`) in place.
/// `tweak_ecb` encrypts 16-byte blocks in place with K2 (any count up to [`MAX_UNITS`]);
/// `wide` applies the data key to a whole chunk in place (encrypt or decrypt) so that
/// `wide(m ^ D) ^ D` is XTS with tweaks T where D = T ^ offsets-chain (`offsets` all zero:
/// plain ECB).
pub(crate) fn run(
    first_unit: u64,
    unit: UnitSize,
    data: &mut [u8],
    offsets: Option<&Offsets>,
    mut tweak_ecb: impl FnMut(&mut [u8]),
    mut wide: impl FnMut(&mut [u8]),
) {
    let nb = unit.bytes() / 16;
    let per_chunk = CHUNK_BYTES / unit.bytes();
    let mut s = Scratch {
        t0: [[0u8; 16]; MAX_UNITS],
        tweaks: [[0u8; 16]; CHUNK_BLOCKS],
        used: 0,
    };
    let mut unit_no = first_unit;
    for chunk in data.chunks_mut(CHUNK_BYTES) {
        let m = chunk.len() / unit.bytes();
        debug_assert_eq!(chunk.len() % unit.bytes(), 0, "whole units only");
        for (u, t) in s.t0[..m].iter_mut().enumerate() {
            *t = plain64_iv(unit_no.wrapping_add(u as u64));
        }
        unit_no = unit_no.wrapping_add(m as u64);
        tweak_ecb(s.t0[..m].as_flattened_mut());
        let mut cur = [Gf::default(); MAX_UNITS];
        for (u, c) in cur[..m].iter_mut().enumerate() {
            *c = Gf::from_bytes(&s.t0[u]);
            if let Some(off) = offsets {
                *c = c.xor(off[u]);
            }
        }
        // Interleave the m chains: step j of every unit, then step j + 1.
        for j in 0..nb {
            for (u, c) in cur[..m].iter_mut().enumerate() {
                s.tweaks[u * nb + j] = c.to_bytes();
                *c = c.mul_x();
            }
        }
        cur.zeroize();
        s.used = s.used.max(m * nb);
        let (blocks, rest) = chunk.as_chunks_mut::<16>();
        debug_assert!(rest.is_empty());
        xor_into(blocks, &s.tweaks[..m * nb]);
        wide(chunk);
        let (blocks, _) = chunk.as_chunks_mut::<16>();
        xor_into(blocks, &s.tweaks[..m * nb]);
    }
    debug_assert!(per_chunk * unit.bytes() == CHUNK_BYTES);
}

/// XORs each block with its tweak; byte loops over 16-byte arrays vectorise to one SIMD XOR.
#[inline(always)]
fn xor_into(blocks: &mut [[u8; 16]], tweaks: &[[u8; 16]]) {
    for (b, t) in blocks.iter_mut().zip(tweaks) {
        for (x, y) in b.iter_mut().zip(t) {
            *x ^= y;
        }
    }
}

/// The offsets for a wide pass that is itself XTS with a fixed initial tweak `s` restarted at
/// every chunk: unit u of a chunk starts at block `u * nb`, where that chain is `s * x^(u*nb)`.
/// Written into `out` (locked memory at the caller), not returned, so no copy stays behind.
pub(crate) fn chain_offsets(s: Gf, unit: UnitSize, out: &mut Offsets) {
    let nb = unit.bytes() / 16;
    let mut cur = s;
    for o in out.iter_mut().take(CHUNK_BYTES / unit.bytes()) {
        *o = cur;
        // x^nb in steps of at most 63 (nb = 32 or 256).
        let mut left = nb;
        while left > 0 {
            let step = left.min(63);
            cur = cur.mul_x_pow(step);
            left -= step;
        }
    }
    cur.zeroize();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mul_x_matches_u128_reference() {
        let mut x = 0x0123_4567_89ab_cdefu64;
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&x.to_le_bytes());
            b[8..].copy_from_slice(&x.rotate_left(29).to_le_bytes());
            let t = u128::from_le_bytes(b);
            let want = (t << 1) ^ ((t >> 127) * 0x87);
            assert_eq!(Gf::from_bytes(&b).mul_x().to_bytes(), want.to_le_bytes());
        }
    }
}
