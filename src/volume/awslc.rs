//! AES-256-XTS from aws-lc (EVP interface): the fast default backend.
//!
//! A keyed `EVP_CIPHER_CTX` is not safe to share between threads, so each [`AwsLcXts`] keeps
//! a small pool of keyed encrypt/decrypt context sets; a call takes one, and gives it back.
//! The pool lock is held for a pointer swap, not for the crypto.
//!
//! On a CPU with VAES/AVX-512 every call goes to the fused kernel of `xts_vaes` instead
//! (1.5x openssl for a lone 512-byte unit, 2.0x in runs, 1.8-1.9x at 4 KiB against 1.7-1.8x
//! for aws-lc's own XTS here); the contexts below are then made but serve no call.
//! Elsewhere, two paths (figures: docs/benchmarks.md, "Sector cipher in runs of units"):
//! - 4096-byte units, and a lone 512-byte unit: native EVP XTS per unit (re-set only the IV,
//!   no key schedule); aws-lc's VAES/AVX-512 kernel amortises its set-up over 256 blocks
//!   (1.7-1.9x openssl at 4 KiB, where the batched path's extra passes would only cost).
//! - runs of 512-byte units: [`xts_batch`]: the initial tweaks of a whole chunk of units in
//!   one AES-256-ECB call under K2, then ONE XTS call with a fixed all-zero IV over the chunk
//!   as the wide engine (the VAES kernel over 512 blocks). That pass's own tweak chain,
//!   `S * x^j` with S = E_K2(0), is cancelled by folding `S * x^(u*32)` into unit u's initial
//!   tweak ([`xts_batch::chain_offsets`]). Output is bit-identical to per-unit XTS (tests).
//!   Measured 1.1-1.3x openssl's one-unit figure (before: 1.01x). aws-lc's ECB has no VAES
//!   kernel (AES-NI, 8 blocks; openssl's equivalent ECB ran 7.96 GB/s here against this XTS
//!   kernel's 11.9 on long units), so its XTS kernel serves as the wide pass.
//!
//! Key memory: a context's key schedules live in aws-lc's heap (`cipher_data`, allocated by
//! `EVP_CipherInit_ex`). Each context locks the pages of that block (`secmem::RegionLock`,
//! counted per page) *before* the key is expanded into it, and releases the lock only after
//! `EVP_CIPHER_CTX_free` has wiped and freed it. S and its offsets live in a `LockedBox`.
#![allow(unsafe_code)]

use std::ptr;
use std::sync::Mutex;

use aws_lc_sys as ffi;

use super::VolumeError;
use super::cipher::{UnitSize, XtsBackend, XtsKey, plain64_iv};
use super::xts_batch::{self, Gf, Offsets};
use super::xts_vaes::VaesXts;
use crate::secmem::{LockedBox, RegionLock};

/// Bytes of aws-lc's `EVP_AES_XTS_CTX` (crypto/fipsmodule/modes/internal.h): two `AES_KEY`
/// (60 round-key words + rounds = 244 bytes, in a union with a double: 248 each), an
/// `XTS128_CONTEXT` (four pointers: 32) and a flag byte, padded to 8. The test
/// `key_schedules_lie_in_the_locked_range` checks that both schedules are inside it.
const XTS_CTX_LEN: usize = 2 * 248 + 32 + 8;
/// Bytes of aws-lc's `EVP_AES_KEY` (crypto/fipsmodule/cipher/e_aes.c): one `AES_KEY` in a
/// union with a double (248), the block function and the stream function pointers.
const ECB_CTX_LEN: usize = 248 + 8 + 8;

/// Fewer units than this in one call take the native per-unit path even when the size is
/// batched: a lone unit pays the K2 ECB call and two XOR passes for nothing to amortise.
const MIN_BATCH_UNITS: usize = 2;

/// Unit sizes served by the batched path (see the module doc for the measurement).
fn batched(unit: UnitSize) -> bool {
    unit == UnitSize::B512
}

/// One keyed EVP context, owned. Freed (and its key schedule wiped by aws-lc) on drop, then
/// its pages' lock released (fields drop after `Drop::drop`).
struct Ctx(*mut ffi::EVP_CIPHER_CTX, Option<RegionLock>);

// SAFETY: an EVP_CIPHER_CTX has no thread affinity; it is used by one thread at a time because
// `Ctx` is only reachable through `&mut` (taken out of the pool under its mutex).
unsafe impl Send for Ctx {}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: self.0 came from EVP_CIPHER_CTX_new and is freed exactly once, here.
        // EVP_CIPHER_CTX_free cleanses the cipher data (key schedule) before freeing.
        unsafe { ffi::EVP_CIPHER_CTX_free(self.0) }
    }
}

impl Ctx {
    /// An XTS context keyed with the whole 64-byte key.
    fn xts(key: &XtsKey, encrypt: bool) -> Result<Ctx, VolumeError> {
        // SAFETY: a static cipher object.
        let cipher = unsafe { ffi::EVP_aes_256_xts() };
        Ctx::new(cipher, XTS_CTX_LEN, &key.bytes()[..], encrypt)
    }

    /// An AES-256-ECB encryption context keyed with the tweak key K2, no padding.
    fn tweak_ecb(key: &XtsKey) -> Result<Ctx, VolumeError> {
        // SAFETY: a static cipher object.
        let cipher = unsafe { ffi::EVP_aes_256_ecb() };
        let ctx = Ctx::new(cipher, ECB_CTX_LEN, &key.bytes()[32..], true)?;
        // SAFETY: ctx.0 is a live keyed context.
        unsafe { ffi::EVP_CIPHER_CTX_set_padding(ctx.0, 0) };
        Ok(ctx)
    }

    /// `key` is exactly the cipher's key length (64 for XTS, 32 for ECB; callers pass slices
    /// of an `XtsKey`).
    fn new(
        cipher: *const ffi::EVP_CIPHER,
        lock_len: usize,
        key: &[u8],
        encrypt: bool,
    ) -> Result<Ctx, VolumeError> {
        // SAFETY: plain constructor; a null return is handled.
        let raw = unsafe { ffi::EVP_CIPHER_CTX_new() };
        if raw.is_null() {
            return Err(VolumeError::Crypto("EVP_CIPHER_CTX_new failed"));
        }
        let mut ctx = Ctx(raw, None);
        // Step 1, no key: aws-lc allocates the cipher's state block (`cipher_data`) only.
        // SAFETY: ctx.0 is a fresh context; `cipher` is a static aws-lc cipher; key and IV
        // null are allowed (the AES inits do nothing without a key).
        let ok = unsafe {
            ffi::EVP_CipherInit_ex(
                ctx.0,
                cipher,
                ptr::null_mut(),
                ptr::null(),
                ptr::null(),
                i32::from(encrypt),
            )
        };
        if ok != 1 {
            return Err(VolumeError::Crypto("EVP_CipherInit_ex failed"));
        }
        // SAFETY: ctx.0 is a valid context (read of plain fields of the public struct).
        let (data, key_len) = unsafe { ((*ctx.0).cipher_data, (*ctx.0).key_len) };
        if data.is_null() {
            return Err(VolumeError::Crypto("aws-lc cipher context has no state"));
        }
        if key_len as usize != key.len() {
            return Err(VolumeError::BadKey("key length does not fit the cipher"));
        }
        ctx.1 = Some(RegionLock::new(data.cast(), lock_len));
        // Step 2: expand the key into the now locked block (cipher null keeps it).
        // SAFETY: the context has its cipher; the key pointer is valid for the cipher's key
        // length (checked above); no IV yet.
        let ok = unsafe {
            ffi::EVP_CipherInit_ex(
                ctx.0,
                ptr::null(),
                ptr::null_mut(),
                key.as_ptr(),
                ptr::null(),
                -1,
            )
        };
        if ok != 1 {
            return Err(VolumeError::Crypto("EVP_CipherInit_ex rejected the key"));
        }
        Ok(ctx)
    }

    /// One XTS data unit (any whole number of blocks up to 16 KiB) in place with `iv`.
    fn xts_unit(&mut self, iv: &[u8; 16], data: &mut [u8]) {
        let n = data.len();
        let mut outl: i32 = 0;
        // SAFETY: the context is a keyed XTS context (Ctx::xts); cipher and key null keep them;
        // the IV is 16 bytes as XTS needs. In-place update (out == in) is supported by aws-lc's
        // XTS; callers pass at most CHUNK_BYTES (16 KiB), which fits in an i32.
        let ok = unsafe {
            ffi::EVP_CipherInit_ex(
                self.0,
                ptr::null(),
                ptr::null_mut(),
                ptr::null(),
                iv.as_ptr(),
                -1,
            ) == 1
                && ffi::EVP_CipherUpdate(
                    self.0,
                    data.as_mut_ptr(),
                    &mut outl,
                    data.as_ptr(),
                    n as i32,
                ) == 1
        };
        // Our invariant: a keyed XTS context accepts any whole number of blocks <= 16 KiB.
        assert!(
            ok && outl as usize == n,
            "aws-lc XTS update failed on whole blocks"
        );
    }

    /// ECB over whole blocks in place (the K2 context: initial tweaks).
    fn ecb(&mut self, blocks: &mut [u8]) {
        debug_assert_eq!(blocks.len() % 16, 0);
        // SAFETY: a keyed ECB context without padding; EVP_Cipher on a block cipher without a
        // custom-cipher flag processes exactly `len` bytes (a multiple of the block size) and
        // supports out == in. Callers pass at most MAX_UNITS * 16 bytes.
        let ok =
            unsafe { ffi::EVP_Cipher(self.0, blocks.as_mut_ptr(), blocks.as_ptr(), blocks.len()) };
        assert!(ok == 1, "aws-lc ECB failed on whole blocks");
    }
}

/// The contexts one call uses: XTS (K1, K2) for one direction, ECB encrypt under K2.
struct CtxSet {
    xts: Ctx,
    tweak: Ctx,
}

impl CtxSet {
    fn new(key: &XtsKey, encrypt: bool) -> Result<CtxSet, VolumeError> {
        Ok(CtxSet {
            xts: Ctx::xts(key, encrypt)?,
            tweak: Ctx::tweak_ecb(key)?,
        })
    }

    fn run(&mut self, first_unit: u64, unit: UnitSize, data: &mut [u8], offsets: &Offsets) {
        if !batched(unit) || data.len() < MIN_BATCH_UNITS * unit.bytes() {
            for (k, chunk) in data.chunks_exact_mut(unit.bytes()).enumerate() {
                self.xts
                    .xts_unit(&plain64_iv(first_unit.wrapping_add(k as u64)), chunk);
            }
            return;
        }
        let CtxSet { xts, tweak } = self;
        xts_batch::run(
            first_unit,
            unit,
            data,
            Some(offsets),
            |t0| tweak.ecb(t0),
            |chunk| xts.xts_unit(&[0u8; 16], chunk),
        );
    }
}

pub struct AwsLcXts {
    /// The fused VAES kernel where the CPU runs it, for the unit sizes [`fused_for`] names.
    fused: Option<VaesXts>,
    enc: Mutex<Vec<CtxSet>>,
    dec: Mutex<Vec<CtxSet>>,
    key: XtsKeyCopy,
    /// Offsets of the fixed-IV chain per chunk position, 512-byte units (S = E_K2(0) * x^(32u)).
    offsets: LockedBox<Offsets>,
}

/// The key kept to make more contexts on demand (zeroized with the backend).
struct XtsKeyCopy(XtsKey);

/// Unit sizes where the fused kernel beats aws-lc's own XTS: both, lone units and runs
/// (docs/benchmarks.md, "Sector cipher in runs of units").
fn fused_for(unit: UnitSize) -> bool {
    matches!(unit, UnitSize::B512 | UnitSize::B4096)
}

impl AwsLcXts {
    /// aws-lc, with the fused kernel where the CPU runs it ([`fused_for`]).
    pub fn new(key: &XtsKey) -> Result<AwsLcXts, VolumeError> {
        let mut x = AwsLcXts::portable(key)?;
        x.fused = VaesXts::new(key);
        Ok(x)
    }

    /// aws-lc alone, whatever the CPU (tests compare it with the fused kernel).
    pub fn portable(key: &XtsKey) -> Result<AwsLcXts, VolumeError> {
        let copy = XtsKey::new(key.bytes())?;
        // Check the key once up front so later context creation cannot fail on it.
        let mut first = CtxSet::new(key, true)?;
        let mut offsets = LockedBox::new([Gf::default(); xts_batch::MAX_UNITS]);
        let mut s = [0u8; 16];
        first.tweak.ecb(&mut s);
        xts_batch::chain_offsets(Gf::from_bytes(&s), UnitSize::B512, &mut offsets);
        zeroize::Zeroize::zeroize(&mut s);
        Ok(AwsLcXts {
            fused: None,
            enc: Mutex::new(vec![first]),
            dec: Mutex::new(Vec::new()),
            key: XtsKeyCopy(copy),
            offsets,
        })
    }

    fn with_ctx(&self, encrypt: bool, f: impl FnOnce(&mut CtxSet)) {
        let pool = if encrypt { &self.enc } else { &self.dec };
        let taken = pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut ctx = match taken {
            Some(c) => c,
            None => CtxSet::new(&self.key.0, encrypt).expect("key was accepted at construction"),
        };
        f(&mut ctx);
        pool.lock().unwrap_or_else(|e| e.into_inner()).push(ctx);
    }
}

impl XtsBackend for AwsLcXts {
    fn encrypt(&self, first_unit: u64, unit: UnitSize, data: &mut [u8]) {
        match &self.fused {
            Some(f) if fused_for(unit) => f.apply(true, first_unit, unit, data),
            _ => self.with_ctx(true, |c| c.run(first_unit, unit, data, &self.offsets)),
        }
    }
    fn decrypt(&self, first_unit: u64, unit: UnitSize, data: &mut [u8]) {
        match &self.fused {
            Some(f) if fused_for(unit) => f.apply(false, first_unit, unit, data),
            _ => self.with_ctx(false, |c| c.run(first_unit, unit, data, &self.offsets)),
        }
    }
    fn decrypt_to(&self, first_unit: u64, unit: UnitSize, src: &[u8], dst: &mut [u8]) {
        match &self.fused {
            Some(f) if fused_for(unit) => f.apply_to(false, first_unit, unit, src, dst),
            _ => {
                dst.copy_from_slice(src);
                self.decrypt(first_unit, unit, dst);
            }
        }
    }
    fn fused(&self) -> bool {
        self.fused.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the first round key of `k` (16 bytes) sits in `mem`: aws-lc's AES-NI expansion
    /// stores it as the key bytes, the portable one as big-endian words.
    fn find_round_key0(mem: &[u8], k: &[u8]) -> Option<usize> {
        let swapped: Vec<u8> = k[..16]
            .chunks(4)
            .flat_map(|w| w.iter().rev().copied())
            .collect();
        mem.windows(16)
            .position(|w| w == &k[..16] || w == &swapped[..])
    }

    #[test]
    fn key_schedules_lie_in_the_locked_range() {
        let bytes: Vec<u8> = (0..64u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(11))
            .collect();
        let key = XtsKey::new(&bytes).unwrap();
        let ctx = Ctx::xts(&key, true).unwrap();
        // SAFETY: ctx.0 is a live keyed context; cipher_data points to XTS_CTX_LEN bytes of
        // aws-lc's EVP_AES_XTS_CTX (the claim this test checks), read only while ctx lives.
        let mem =
            unsafe { std::slice::from_raw_parts((*ctx.0).cipher_data as *const u8, XTS_CTX_LEN) };
        let k1 = find_round_key0(mem, &bytes[..32]).expect("data key schedule in range");
        let k2 = find_round_key0(mem, &bytes[32..]).expect("tweak key schedule in range");
        // Each schedule is 244 bytes from its first round key.
        assert!(
            k1 + 244 <= XTS_CTX_LEN && k2 + 244 <= XTS_CTX_LEN,
            "{k1} {k2}"
        );
        assert!(ctx.1.is_some());
        // The K2 ECB context of the batched path: its one schedule inside its locked range.
        let ecb = Ctx::tweak_ecb(&key).unwrap();
        // SAFETY: as above, for ECB_CTX_LEN bytes of aws-lc's EVP_AES_KEY.
        let mem =
            unsafe { std::slice::from_raw_parts((*ecb.0).cipher_data as *const u8, ECB_CTX_LEN) };
        let k2 = find_round_key0(mem, &bytes[32..]).expect("tweak key schedule in range");
        assert!(k2 + 244 <= ECB_CTX_LEN, "{k2}");
        assert!(ecb.1.is_some());
    }
}
