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

/// Bytes per chunk: tweaks (one 16-byte block per data block) plus data, 16 KiB together,
/// stay in L1 (32 KiB here). 8 and 16 KiB measured equal within the noise (docs/benchmarks.md,
/// "Sector cipher in runs of units", runs A and B).
pub(crate) const CHUNK_BYTES: usize = 8 * 1024;
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

/// Tweak buffer of this thread, one chunk's worth (16 KiB): kept between calls so a call does
/// not clear 16 KiB of stack first (measured: 11 % of a single 512-byte unit), and wiped
/// before every call returns ([`Wipe`]).
struct Tweaks([[u8; 16]; CHUNK_BLOCKS]);

thread_local! {
    static TWEAKS: std::cell::RefCell<Box<Tweaks>> =
        std::cell::RefCell::new(Box::new(Tweaks([[0u8; 16]; CHUNK_BLOCKS])));
}

/// Wipes the written prefix of the tweak buffer and the initial tweaks on drop (also on
/// unwind).
struct Wipe<'a> {
    tweaks: &'a mut [[u8; 16]; CHUNK_BLOCKS],
    t0: [[u8; 16]; MAX_UNITS],
    used: usize,
}

impl Drop for Wipe<'_> {
    fn drop(&mut self) {
        self.t0.as_flattened_mut().zeroize();
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
    tweak_ecb: impl FnMut(&mut [u8]),
    wide: impl FnMut(&mut [u8]),
) {
    TWEAKS.with_borrow_mut(|t| run_with(&mut t.0, first_unit, unit, data, offsets, tweak_ecb, wide))
}

fn run_with(
    tweaks: &mut [[u8; 16]; CHUNK_BLOCKS],
    first_unit: u64,
    unit: UnitSize,
    data: &mut [u8],
    offsets: Option<&Offsets>,
    mut tweak_ecb: impl FnMut(&mut [u8]),
    mut wide: impl FnMut(&mut [u8]),
) {
    let nb = unit.bytes() / 16;
    let mut s = Wipe {
        tweaks,
        t0: [[0u8; 16]; MAX_UNITS],
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
        if let Some(off) = offsets {
            for (t, o) in s.t0[..m].iter_mut().zip(off) {
                *t = Gf::from_bytes(t).xor(*o).to_bytes();
            }
        }
        let n = m * nb;
        s.used = s.used.max(n);
        let (blocks, rest) = chunk.as_chunks_mut::<16>();
        debug_assert!(rest.is_empty());
        expand_xor(&s.t0[..m], nb, blocks, &mut s.tweaks[..n]);
        wide(chunk);
        let (blocks, _) = chunk.as_chunks_mut::<16>();
        xor_into(blocks, &s.tweaks[..n]);
    }
}

/// One unit's data blocks, its tweak slots, its initial tweak.
#[cfg(target_arch = "x86_64")]
type UnitSlices<'a> = ((&'a mut [[u8; 16]], &'a mut [[u8; 16]]), &'a [u8; 16]);

/// For each unit u (blocks `u*nb ..`): its tweak chain from `t0[u]`, XORed into `data` and
/// stored in `tweaks` for the second XOR. Four units at a time, so four independent chains
/// are in flight (one chain alone is latency-bound: each step needs the previous one).
#[cfg(target_arch = "x86_64")]
fn expand_xor(t0: &[[u8; 16]], nb: usize, data: &mut [[u8; 16]], tweaks: &mut [[u8; 16]]) {
    use sse::{load, mul_x, mul_x4, store, xor_in};
    debug_assert!(data.len() == t0.len() * nb && tweaks.len() == data.len());
    let mut units = data
        .chunks_exact_mut(nb)
        .zip(tweaks.chunks_exact_mut(nb))
        .zip(t0);
    loop {
        let group: [Option<UnitSlices<'_>>; 4] = std::array::from_fn(|_| units.next());
        match group {
            [
                Some(((d0, w0), a)),
                Some(((d1, w1), b)),
                Some(((d2, w2), c)),
                Some(((d3, w3), e)),
            ] => {
                let (mut t0, mut t1, mut t2, mut t3) = (load(a), load(b), load(c), load(e));
                for j in 0..nb {
                    xor_in(&mut d0[j], t0);
                    store(&mut w0[j], t0);
                    xor_in(&mut d1[j], t1);
                    store(&mut w1[j], t1);
                    xor_in(&mut d2[j], t2);
                    store(&mut w2[j], t2);
                    xor_in(&mut d3[j], t3);
                    store(&mut w3[j], t3);
                    (t0, t1, t2, t3) = (mul_x(t0), mul_x(t1), mul_x(t2), mul_x(t3));
                }
            }
            rest => {
                // Fewer than four units left: each unit's chain split in four (blocks j, j+1,
                // j+2, j+3 stepped by x^4), again four chains in flight.
                for ((d, w), a) in rest.into_iter().flatten() {
                    let t = load(a);
                    let mut q = [t, mul_x(t), mul_x(mul_x(t)), mul_x(mul_x(mul_x(t)))];
                    for (d4, w4) in d.chunks_exact_mut(4).zip(w.chunks_exact_mut(4)) {
                        for ((db, wb), qk) in d4.iter_mut().zip(w4.iter_mut()).zip(q.iter_mut()) {
                            xor_in(db, *qk);
                            store(wb, *qk);
                            *qk = mul_x4(*qk);
                        }
                    }
                }
                return;
            }
        }
    }
}

/// Portable version of the above: one chain at a time, 64-bit shifts.
#[cfg(not(target_arch = "x86_64"))]
fn expand_xor(t0: &[[u8; 16]], nb: usize, data: &mut [[u8; 16]], tweaks: &mut [[u8; 16]]) {
    for ((d, w), a) in data
        .chunks_exact_mut(nb)
        .zip(tweaks.chunks_exact_mut(nb))
        .zip(t0)
    {
        let mut t = Gf::from_bytes(a);
        for (db, wb) in d.iter_mut().zip(w.iter_mut()) {
            *wb = t.to_bytes();
            for (x, y) in db.iter_mut().zip(wb.iter()) {
                *x ^= y;
            }
            t = t.mul_x();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod sse {
    use core::arch::x86_64::{
        __m128i, _mm_add_epi64, _mm_and_si128, _mm_loadu_si128, _mm_set_epi32, _mm_set_epi64x,
        _mm_shuffle_epi32, _mm_slli_epi64, _mm_srai_epi32, _mm_srli_epi64, _mm_storeu_si128,
        _mm_xor_si128,
    };
    // SSE2 is part of the x86_64 baseline: these intrinsics exist on every x86_64 CPU; they
    // are `unsafe` only because the compiler does not treat the baseline as a target feature.
    #[inline(always)]
    pub(super) fn mul_x(t: __m128i) -> __m128i {
        // Each 64-bit lane shifted left by one; the bits that fall out (63, 127) come back as
        // 1 into bit 64 and as 0x87 into bits 0..8 (the reduction polynomial).
        // SAFETY: SSE2 register-only operations (x86_64 baseline).
        unsafe {
            let signs = _mm_srai_epi32(t, 31);
            let carry = _mm_and_si128(_mm_shuffle_epi32(signs, 0x13), _mm_set_epi32(0, 1, 0, 0x87));
            _mm_xor_si128(_mm_add_epi64(t, t), carry)
        }
    }
    /// `t * x^4`: each 64-bit lane shifted left by four; the four bits out of the low lane go
    /// into the high one, the four out of the top (h) come back as h * 0x87 (carry-less:
    /// h ^ h<<1 ^ h<<2 ^ h<<7, at most 11 bits, so no further reduction).
    #[inline(always)]
    pub(super) fn mul_x4(t: __m128i) -> __m128i {
        // SAFETY: SSE2 register-only operations (x86_64 baseline).
        unsafe {
            let out = _mm_shuffle_epi32(_mm_srli_epi64(t, 60), 0x4E);
            let h = _mm_and_si128(out, _mm_set_epi64x(0, 0xf));
            let l = _mm_and_si128(out, _mm_set_epi64x(0xf, 0));
            let red = _mm_xor_si128(
                _mm_xor_si128(h, _mm_slli_epi64(h, 1)),
                _mm_xor_si128(_mm_slli_epi64(h, 2), _mm_slli_epi64(h, 7)),
            );
            _mm_xor_si128(_mm_xor_si128(_mm_slli_epi64(t, 4), red), l)
        }
    }
    #[inline(always)]
    pub(super) fn xor(a: __m128i, b: __m128i) -> __m128i {
        // SAFETY: SSE2 register-only operation (x86_64 baseline).
        unsafe { _mm_xor_si128(a, b) }
    }
    #[inline(always)]
    pub(super) fn load(b: &[u8; 16]) -> __m128i {
        // SAFETY: `b` is 16 readable bytes; loadu has no alignment requirement; SSE2 baseline.
        unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
    }
    /// `*b ^= t`.
    #[inline(always)]
    pub(super) fn xor_in(b: &mut [u8; 16], t: __m128i) {
        let v = xor(load(b), t);
        store(b, v);
    }
    #[inline(always)]
    pub(super) fn store(b: &mut [u8; 16], v: __m128i) {
        // SAFETY: `b` is 16 writable bytes; storeu has no alignment requirement; SSE2 baseline.
        unsafe { _mm_storeu_si128(b.as_mut_ptr().cast(), v) }
    }
}

/// XORs each block with its tweak (one SSE2 XOR per block on x86_64).
#[inline(always)]
fn xor_into(blocks: &mut [[u8; 16]], tweaks: &[[u8; 16]]) {
    for (b, t) in blocks.iter_mut().zip(tweaks) {
        #[cfg(target_arch = "x86_64")]
        sse::xor_in(b, sse::load(t));
        #[cfg(not(target_arch = "x86_64"))]
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

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sse_mul_x_and_x4_match_the_scalar_one() {
        let mut x = 0x0fed_cba9_8765_4321u64;
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&x.to_le_bytes());
            b[8..].copy_from_slice(&(!x).rotate_left(61).to_le_bytes());
            let g = Gf::from_bytes(&b);
            let mut out = [0u8; 16];
            sse::store(&mut out, sse::mul_x(sse::load(&b)));
            assert_eq!(out, g.mul_x().to_bytes());
            sse::store(&mut out, sse::mul_x4(sse::load(&b)));
            assert_eq!(out, g.mul_x_pow(4).to_bytes());
        }
    }

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
