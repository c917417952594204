//! Fused AES-256-XTS on VAES + AVX-512: a whole run of data units in one call, every step in
//! registers.
//!
//! `xts_batch` runs three passes over each chunk (tweak chains to memory and XOR, the AES
//! pass, the second XOR); at 512-byte units those passes cost as much as the AES itself. Here,
//! per run:
//!
//! ```text
//!  units by fours:  T0[u] = E_K2(plain64(first + u))   one zmm, encrypted one four ahead
//!  per unit, 16 blocks (4 zmm) at a time:
//!     tweaks  t[i] = T0 * x^(4i .. 4i+3)     (per 128-bit lane: shifts + VPCLMULQDQ by 0x87)
//!     x = data ^ t ^ rk0  (one ternary-logic op);  13 VAES rounds;  last round with key rk14 ^ t
//!     (aesenclast(s, k ^ t) = aesenclast(s, k) ^ t: the second XOR is free)
//!     t *= x^16 for the next 16 blocks (byte shift by 2 + carry-less multiply of the top 16 bits)
//! ```
//!
//! Decryption is the same with the equivalent inverse cipher (VAESDEC, round keys through
//! AESIMC); the tweaks are always encrypted under K2. Units are 512 or 4096 bytes, whole
//! blocks: no ciphertext stealing.
//!
//! Keys: the three schedules (K1 encrypt, K1 decrypt, K2 encrypt; 720 bytes) are expanded with
//! AES-NI straight into locked memory (`secmem::LockedBox`, zeroized on drop); no `Debug`.
//! The kernel reads each round key from that locked memory where it uses it (volatile loads,
//! see `bcast_volatile`); tweaks stay in registers. The compiled kernel has no vector spill
//! to the stack (objdump of the release build at the time of writing): no stack copy of a
//! key or tweak is left to wipe.
//!
//! Used where the CPU has AVX-512F/BW, VAES, VPCLMULQDQ and AES-NI (checked at run time,
//! [`VaesXts::new`] returns `None` elsewhere and the callers keep their portable paths).
#![allow(unsafe_code)]

use super::cipher::{UnitSize, XtsKey};

/// AES-256 round keys: 15 of 16 bytes.
#[cfg(target_arch = "x86_64")]
type Schedule = [[u8; 16]; 15];

/// The key schedules of one XTS key, in locked memory.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct Schedules {
    /// K1, encryption.
    enc: Schedule,
    /// K1, equivalent inverse cipher (decryption).
    dec: Schedule,
    /// K2, encryption (tweaks).
    tweak: Schedule,
}

/// AES-256-XTS keyed for the fused kernel. Built only where [`supported`] holds.
pub(crate) struct VaesXts {
    #[cfg(target_arch = "x86_64")]
    keys: crate::secmem::LockedBox<Schedules>,
}

/// Whether this CPU runs the fused kernel (std caches the detection: an atomic load).
pub(crate) fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("vaes")
            && std::arch::is_x86_feature_detected!("vpclmulqdq")
            && std::arch::is_x86_feature_detected!("aes")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl VaesXts {
    /// The schedules of `key`, or `None` where the CPU lacks a feature the kernel needs.
    pub(crate) fn new(key: &XtsKey) -> Option<VaesXts> {
        if !supported() {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let mut keys = crate::secmem::LockedBox::new(Schedules {
                enc: [[0; 16]; 15],
                dec: [[0; 16]; 15],
                tweak: [[0; 16]; 15],
            });
            let (k1, k2) = key.bytes().split_at(32);
            let s = &mut *keys;
            // SAFETY: supported() checked AES-NI, the only feature the expansion uses.
            unsafe {
                x86::expand(k1, &mut s.enc);
                x86::expand(k2, &mut s.tweak);
                x86::invert(&s.enc, &mut s.dec);
            }
            Some(VaesXts { keys })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = key;
            None
        }
    }

    /// Transforms whole units of `data` in place, unit *k* with tweak `first_unit + k`. A
    /// trailing partial unit (callers never pass one) is left untouched.
    pub(crate) fn apply(&self, encrypt: bool, first_unit: u64, unit: UnitSize, data: &mut [u8]) {
        let p = data.as_mut_ptr();
        // SAFETY: `p` is valid for reads and writes of `data.len()` bytes (one slice).
        unsafe { self.run(encrypt, first_unit, unit, p, p, data.len()) }
    }

    /// As [`apply`](Self::apply) from `src` into `dst` (same length) in one pass: e.g.
    /// straight out of a file's mapping into a reply (`super::mapped`).
    pub(crate) fn apply_to(
        &self,
        encrypt: bool,
        first_unit: u64,
        unit: UnitSize,
        src: &[u8],
        dst: &mut [u8],
    ) {
        assert_eq!(
            src.len(),
            dst.len(),
            "XTS source and destination differ in length"
        );
        // SAFETY: `src` is readable and `dst` writable for their common length; a shared and
        // a unique slice never overlap.
        unsafe {
            self.run(
                encrypt,
                first_unit,
                unit,
                src.as_ptr(),
                dst.as_mut_ptr(),
                dst.len(),
            )
        }
    }

    /// # Safety
    /// `src` readable and `dst` writable for `len` bytes; they are the same or do not overlap.
    unsafe fn run(
        &self,
        encrypt: bool,
        first_unit: u64,
        unit: UnitSize,
        src: *const u8,
        dst: *mut u8,
        len: usize,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            let k = &*self.keys;
            // SAFETY: a VaesXts exists only where supported() held (new), which covers every
            // feature the kernel enables; the pointers are the caller's contract.
            unsafe {
                if encrypt {
                    x86::xts::<true>(&k.enc, &k.tweak, first_unit, unit.bytes(), src, dst, len);
                } else {
                    x86::xts::<false>(&k.dec, &k.tweak, first_unit, unit.bytes(), src, dst, len);
                }
                x86::clear_vector_registers();
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (encrypt, first_unit, unit, src, dst, len);
            unreachable!("VaesXts is never built off x86_64");
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use super::Schedule;

    /// Round key `r` in all four 128-bit lanes, loaded from the locked schedule at each use:
    /// a volatile load cannot be hoisted out of the loops, where the compiler then spilled
    /// the keys to the stack for lack of registers (15 round keys each for K1 and K2 beside
    /// the data, tweaks and constants). Costs ~7 % on long runs against keys held in
    /// registers (and spilled), measured; the key loads are not on the critical path.
    #[inline(always)]
    unsafe fn bcast_volatile(s: &Schedule, r: usize) -> __m512i {
        debug_assert_eq!(s[r].as_ptr() as usize % 16, 0);
        // SAFETY: s[r] is 16 readable bytes, 16-byte aligned (Schedules is align(64) and every
        // round key starts at a multiple of 16), as read_volatile of an __m128i needs.
        unsafe {
            let k = core::ptr::read_volatile(s[r].as_ptr().cast::<__m128i>());
            _mm512_broadcast_i32x4(k)
        }
    }

    /// `a ^ b ^ c` in one instruction.
    #[inline(always)]
    unsafe fn xor3(a: __m512i, b: __m512i, c: __m512i) -> __m512i {
        // SAFETY: register-only AVX-512F operation, enabled in the calling kernel.
        unsafe { _mm512_ternarylogic_epi64::<0x96>(a, b, c) }
    }

    /// Each 128-bit lane times x^k in GF(2^128) (XTS layout, little-endian), k per lane in
    /// `k` (both 64-bit halves of a lane hold its k, 0 <= k < 16). The bits shifted out of
    /// the low half enter the high half; those out of the top (h, k bits) come back as
    /// h * 0x87 (at most 22 bits: no second reduction).
    #[inline(always)]
    unsafe fn mul_xk(t: __m512i, k: __m512i) -> __m512i {
        // SAFETY: register-only AVX-512F/VPCLMULQDQ operations, enabled in the calling kernel.
        unsafe {
            let shifted = _mm512_sllv_epi64(t, k);
            // srlv by 64 gives 0 (k = 0 has no carry).
            let out = _mm512_srlv_epi64(t, _mm512_sub_epi64(_mm512_set1_epi64(64), k));
            // Swap the halves: low half <- bits out of the top, high half <- bits out of low.
            let out = _mm512_shuffle_epi32::<0x4E>(out);
            let red = _mm512_clmulepi64_epi128::<0x00>(out, _mm512_set1_epi64(0x87));
            let carry = _mm512_and_si512(out, _mm512_set_epi64(-1, 0, -1, 0, -1, 0, -1, 0));
            xor3(shifted, red, carry)
        }
    }

    /// Each 128-bit lane times x^16: a 2-byte shift; the top 16 bits come back times 0x87.
    #[inline(always)]
    unsafe fn mul_x16(t: __m512i) -> __m512i {
        // SAFETY: register-only AVX-512BW/VPCLMULQDQ operations, enabled in the calling kernel.
        unsafe {
            let top = _mm512_bsrli_epi128::<14>(t);
            let red = _mm512_clmulepi64_epi128::<0x00>(top, _mm512_set1_epi64(0x87));
            _mm512_xor_si512(_mm512_bslli_epi128::<2>(t), red)
        }
    }

    /// Initial tweaks of units `n .. n + 4` in one zmm: lane l is E_K2(plain64(n + l)) (unit
    /// numbers wrap like u64).
    #[inline(always)]
    unsafe fn initial_tweaks(tk: &Schedule, n: u64) -> __m512i {
        // SAFETY: AVX-512F/VAES register operations and key loads (bcast_volatile), enabled in
        // the calling kernel.
        unsafe {
            let lo = _mm512_add_epi64(
                _mm512_set1_epi64(n as i64),
                _mm512_set_epi64(0, 3, 0, 2, 0, 1, 0, 0),
            );
            // High halves zero: plain64 is the unit number in the low 8 bytes.
            let iv = _mm512_and_si512(lo, _mm512_set_epi64(0, -1, 0, -1, 0, -1, 0, -1));
            let mut v = _mm512_xor_si512(iv, bcast_volatile(tk, 0));
            for round in 1..14 {
                v = _mm512_aesenc_epi128(v, bcast_volatile(tk, round));
            }
            _mm512_aesenclast_epi128(v, bcast_volatile(tk, 14))
        }
    }

    /// XTS over the whole units of `ub` bytes (512 or 4096) of the `len` bytes at `src`, into
    /// `dst`, unit k with tweak number `first + k`; a trailing partial unit is not touched.
    /// `ks` is the data key's schedule for the direction (`ENC`: encryption schedule, else the
    /// equivalent-inverse one), `tk` the tweak key's encryption schedule.
    ///
    /// # Safety
    /// The CPU has AVX-512F, AVX-512BW, VAES, VPCLMULQDQ and AES-NI; `src` is readable and
    /// `dst` writable for `len` bytes, and they are equal (in place) or do not overlap.
    #[target_feature(enable = "avx512f,avx512bw,vaes,vpclmulqdq,aes")]
    #[allow(
        clippy::too_many_arguments,
        reason = "one kernel: keys, position, two buffers"
    )]
    pub(super) unsafe fn xts<const ENC: bool>(
        ks: &Schedule,
        tk: &Schedule,
        first: u64,
        ub: usize,
        src: *const u8,
        dst: *mut u8,
        len: usize,
    ) {
        debug_assert!(ub == 512 || ub == 4096, "unit size {ub}");
        debug_assert_eq!(len % ub, 0, "whole units only");
        // SAFETY: (whole body) register operations need the features this function enables
        // (the caller's contract); every load is of 64 bytes at `src + off` and every store
        // at `dst + off` with off + 64 <= units * ub <= len, so in bounds of both buffers;
        // a 256-byte step is loaded whole before any of it is stored, so in place is sound;
        // loadu/storeu need no alignment.
        unsafe {
            let lane_k = |base: i64| {
                _mm512_set_epi64(
                    base + 3,
                    base + 3,
                    base + 2,
                    base + 2,
                    base + 1,
                    base + 1,
                    base,
                    base,
                )
            };
            let k_lo = [lane_k(0), lane_k(4), lane_k(8), lane_k(12)];
            // Units go by fours (one zmm of initial tweaks); the next four's tweaks are
            // encrypted before this four's data, so their latency hides behind its AES work.
            let units = len / ub;
            let mut cur = initial_tweaks(tk, first);
            for q in 0..units.div_ceil(4) {
                let next_first = first.wrapping_add(4 * q as u64 + 4);
                let more = 4 * (q + 1) < units;
                let next = if more {
                    initial_tweaks(tk, next_first)
                } else {
                    _mm512_setzero_si512()
                };
                for u in 0..(units - 4 * q).min(4) {
                    let unit_off = (4 * q + u) * ub;
                    // Lane u of `cur` in all four lanes.
                    let l = 2 * u as i64;
                    let pick = _mm512_set_epi64(l + 1, l, l + 1, l, l + 1, l, l + 1, l);
                    let t = _mm512_permutexvar_epi64(pick, cur);
                    let mut tw = [
                        mul_xk(t, k_lo[0]),
                        mul_xk(t, k_lo[1]),
                        mul_xk(t, k_lo[2]),
                        mul_xk(t, k_lo[3]),
                    ];
                    for step in (0..ub).step_by(256) {
                        let (ip, op) = (src.add(unit_off + step), dst.add(unit_off + step));
                        let mut x = [_mm512_setzero_si512(); 4];
                        for i in 0..4 {
                            let d = _mm512_loadu_si512(ip.add(64 * i).cast());
                            x[i] = xor3(d, tw[i], bcast_volatile(ks, 0));
                        }
                        for r in 1..14 {
                            let key = bcast_volatile(ks, r);
                            for xi in x.iter_mut() {
                                *xi = if ENC {
                                    _mm512_aesenc_epi128(*xi, key)
                                } else {
                                    _mm512_aesdec_epi128(*xi, key)
                                };
                            }
                        }
                        let k14 = bcast_volatile(ks, 14);
                        for i in 0..4 {
                            let last = _mm512_xor_si512(k14, tw[i]);
                            let y = if ENC {
                                _mm512_aesenclast_epi128(x[i], last)
                            } else {
                                _mm512_aesdeclast_epi128(x[i], last)
                            };
                            _mm512_storeu_si512(op.add(64 * i).cast(), y);
                            tw[i] = mul_x16(tw[i]);
                        }
                    }
                }
                cur = next;
            }
        }
    }

    /// Zeroes every vector register (zmm0-31, hence all xmm/ymm): the kernel leaves round
    /// keys, tweaks and plaintext in them, and nothing else would overwrite zmm16-31 soon
    /// (compiled code outside AVX-512 kernels never touches them; `vzeroupper` spares them).
    /// Defence in depth, as the key schedules live in locked memory: ~20 instructions a call.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn clear_vector_registers() {
        // SAFETY: register-only instructions (AVX and AVX-512F, the caller's contract); every
        // register written is declared clobbered, so the compiler keeps nothing live in them.
        unsafe {
            core::arch::asm!(
                "vzeroall",
                "vpxord zmm16, zmm16, zmm16",
                "vpxord zmm17, zmm17, zmm17",
                "vpxord zmm18, zmm18, zmm18",
                "vpxord zmm19, zmm19, zmm19",
                "vpxord zmm20, zmm20, zmm20",
                "vpxord zmm21, zmm21, zmm21",
                "vpxord zmm22, zmm22, zmm22",
                "vpxord zmm23, zmm23, zmm23",
                "vpxord zmm24, zmm24, zmm24",
                "vpxord zmm25, zmm25, zmm25",
                "vpxord zmm26, zmm26, zmm26",
                "vpxord zmm27, zmm27, zmm27",
                "vpxord zmm28, zmm28, zmm28",
                "vpxord zmm29, zmm29, zmm29",
                "vpxord zmm30, zmm30, zmm30",
                "vpxord zmm31, zmm31, zmm31",
                out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
                out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
                out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
                out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _,
                out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
                options(nomem, nostack, preserves_flags),
            );
        }
    }

    /// Whether every vector register reads zero (the test of [`clear_vector_registers`]).
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[cfg(test)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn vector_registers_zero() -> bool {
        let mut any: u64;
        // SAFETY: register-only AVX-512F instructions; zmm0 and k1 are declared clobbered
        // (zmm0 is ORed last, so it holds the OR of every register before the test).
        unsafe {
            core::arch::asm!(
                "vpord zmm0, zmm0, zmm1", "vpord zmm0, zmm0, zmm2", "vpord zmm0, zmm0, zmm3",
                "vpord zmm0, zmm0, zmm4", "vpord zmm0, zmm0, zmm5", "vpord zmm0, zmm0, zmm6",
                "vpord zmm0, zmm0, zmm7", "vpord zmm0, zmm0, zmm8", "vpord zmm0, zmm0, zmm9",
                "vpord zmm0, zmm0, zmm10", "vpord zmm0, zmm0, zmm11", "vpord zmm0, zmm0, zmm12",
                "vpord zmm0, zmm0, zmm13", "vpord zmm0, zmm0, zmm14", "vpord zmm0, zmm0, zmm15",
                "vpord zmm0, zmm0, zmm16", "vpord zmm0, zmm0, zmm17", "vpord zmm0, zmm0, zmm18",
                "vpord zmm0, zmm0, zmm19", "vpord zmm0, zmm0, zmm20", "vpord zmm0, zmm0, zmm21",
                "vpord zmm0, zmm0, zmm22", "vpord zmm0, zmm0, zmm23", "vpord zmm0, zmm0, zmm24",
                "vpord zmm0, zmm0, zmm25", "vpord zmm0, zmm0, zmm26", "vpord zmm0, zmm0, zmm27",
                "vpord zmm0, zmm0, zmm28", "vpord zmm0, zmm0, zmm29", "vpord zmm0, zmm0, zmm30",
                "vpord zmm0, zmm0, zmm31",
                "vptestmq k1, zmm0, zmm0",
                "kmovq {any}, k1",
                any = out(reg) any,
                out("zmm0") _, out("k1") _,
                options(nomem, nostack),
            );
        }
        any == 0
    }

    /// `t ^ (t << 32) ^ (t << 64) ^ (t << 96)`: the running XOR of a key-expansion step.
    #[inline(always)]
    unsafe fn spread(t: __m128i) -> __m128i {
        // SAFETY: SSE2 register operations (x86_64 baseline).
        unsafe {
            let t = _mm_xor_si128(t, _mm_slli_si128::<4>(t));
            let t = _mm_xor_si128(t, _mm_slli_si128::<4>(t));
            _mm_xor_si128(t, _mm_slli_si128::<4>(t))
        }
    }

    /// AES-256 key expansion (FIPS 197 §5.2) of the 32 bytes `key` into `out`, with
    /// AESKEYGENASSIST; round keys go straight to `out` (locked memory at the caller).
    ///
    /// # Safety
    /// The CPU has AES-NI.
    #[target_feature(enable = "aes")]
    pub(super) unsafe fn expand(key: &[u8], out: &mut Schedule) {
        debug_assert_eq!(key.len(), 32);
        // SAFETY: key has 32 readable bytes (both halves of an XtsKey, split at 32); out[i]
        // is 16 writable bytes; AES-NI per the caller's contract.
        unsafe {
            let mut a = _mm_loadu_si128(key.as_ptr().cast());
            let mut b = _mm_loadu_si128(key.as_ptr().add(16).cast());
            _mm_storeu_si128(out[0].as_mut_ptr().cast(), a);
            _mm_storeu_si128(out[1].as_mut_ptr().cast(), b);
            // Even round keys: from the previous odd one's SubWord(RotWord) and the round
            // constant; odd ones: from the new even one's SubWord, no constant.
            macro_rules! even {
                ($i:expr, $rcon:expr) => {
                    let t = _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(b));
                    a = _mm_xor_si128(spread(a), t);
                    _mm_storeu_si128(out[$i].as_mut_ptr().cast(), a);
                };
            }
            macro_rules! odd {
                ($i:expr) => {
                    let t = _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(a));
                    b = _mm_xor_si128(spread(b), t);
                    _mm_storeu_si128(out[$i].as_mut_ptr().cast(), b);
                };
            }
            even!(2, 0x01);
            odd!(3);
            even!(4, 0x02);
            odd!(5);
            even!(6, 0x04);
            odd!(7);
            even!(8, 0x08);
            odd!(9);
            even!(10, 0x10);
            odd!(11);
            even!(12, 0x20);
            odd!(13);
            even!(14, 0x40);
        }
    }

    /// The equivalent inverse cipher's schedule (FIPS 197 §5.3.5) from the encryption one:
    /// reversed, the middle round keys through InvMixColumns (AESIMC).
    ///
    /// # Safety
    /// The CPU has AES-NI.
    #[target_feature(enable = "aes")]
    pub(super) unsafe fn invert(enc: &Schedule, dec: &mut Schedule) {
        dec[0] = enc[14];
        dec[14] = enc[0];
        for r in 1..14 {
            // SAFETY: 16-byte loads and stores of array elements; AES-NI per the contract.
            unsafe {
                let k = _mm_aesimc_si128(_mm_loadu_si128(enc[14 - r].as_ptr().cast()));
                _mm_storeu_si128(dec[r].as_mut_ptr().cast(), k);
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// After a call the vector registers hold nothing of the key, the tweaks or the data; the
    /// kernel alone leaves them full (so the check can fail).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_registers_are_cleared_after_a_call() {
        if !supported() {
            return;
        }
        let key = XtsKey::new(&(0..64u8).collect::<Vec<_>>()).unwrap();
        let x = VaesXts::new(&key).unwrap();
        let mut data = vec![0x3cu8; 8192];
        let k = &*x.keys;
        let mut scratch = data.clone();
        // SAFETY: supported() holds; scratch is one slice, in place.
        let zero_after_kernel = unsafe {
            let p = scratch.as_mut_ptr();
            x86::xts::<true>(&k.enc, &k.tweak, 9, 4096, p, p, 8192);
            x86::vector_registers_zero()
        };
        assert!(
            !zero_after_kernel,
            "the raw kernel leaves its registers (the check sees them)"
        );
        x.apply(true, 9, UnitSize::B4096, &mut data);
        // SAFETY: supported() holds.
        let zero = unsafe { x86::vector_registers_zero() };
        assert!(zero, "registers after apply");
        let mut out = vec![0u8; 8192];
        x.apply_to(false, 9, UnitSize::B4096, &data, &mut out);
        // SAFETY: supported() holds.
        let zero = unsafe { x86::vector_registers_zero() };
        assert!(zero, "registers after apply_to");
        assert!(out.iter().all(|&b| b == 0x3c));
    }

    /// FIPS 197 Appendix A.3: the AES-256 expansion of 603deb10...14dff4 ends with the round
    /// key fe4890d1 e6188d0b 046df344 706c631e; and the inverse schedule is the reverse with
    /// its middle keys through InvMixColumns (first and last unchanged).
    #[test]
    fn key_expansion_matches_fips_197() {
        if !supported() {
            return;
        }
        let key = hex::decode("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
            .unwrap();
        let mut enc = [[0u8; 16]; 15];
        let mut dec = [[0u8; 16]; 15];
        // SAFETY: supported() checked AES-NI.
        unsafe {
            x86::expand(&key, &mut enc);
            x86::invert(&enc, &mut dec);
        }
        assert_eq!(enc[0][..], key[..16]);
        assert_eq!(enc[1][..], key[16..]);
        assert_eq!(hex::encode(enc[14]), "fe4890d1e6188d0b046df344706c631e");
        assert_eq!(hex::encode(enc[2]), "9ba354118e6925afa51a8b5f2067fcde");
        assert_eq!(dec[0], enc[14]);
        assert_eq!(dec[14], enc[0]);
        assert_ne!(dec[1], enc[13]);
    }
}
