//! AES-256-XTS from aws-lc (EVP interface): the fast default backend.
//!
//! A keyed `EVP_CIPHER_CTX` is not safe to share between threads, so each [`AwsLcXts`] keeps
//! a small pool of keyed encrypt/decrypt contexts; a call takes one, re-sets only the IV per
//! unit (no key schedule), and gives it back. The pool lock is held for a pointer swap, not
//! for the crypto.
//!
//! Key memory: a context's key schedules live in aws-lc's heap (`cipher_data`, allocated by
//! `EVP_CipherInit_ex`). Each context locks the pages of that block (`secmem::RegionLock`,
//! counted per page) *before* the key is expanded into it, and releases the lock only after
//! `EVP_CIPHER_CTX_free` has wiped and freed it.
#![allow(unsafe_code)]

use std::ptr;
use std::sync::Mutex;

use aws_lc_sys as ffi;

use super::VolumeError;
use super::cipher::{UnitSize, XtsBackend, XtsKey, plain64_iv};
use crate::secmem::RegionLock;

/// Bytes of aws-lc's `EVP_AES_XTS_CTX` (crypto/fipsmodule/modes/internal.h): two `AES_KEY`
/// (60 round-key words + rounds = 244 bytes, in a union with a double: 248 each), an
/// `XTS128_CONTEXT` (four pointers: 32) and a flag byte, padded to 8. The test
/// `key_schedules_lie_in_the_locked_range` checks that both schedules are inside it.
const XTS_CTX_LEN: usize = 2 * 248 + 32 + 8;

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
    fn new(key: &XtsKey, encrypt: bool) -> Result<Ctx, VolumeError> {
        // SAFETY: plain constructor; a null return is handled.
        let raw = unsafe { ffi::EVP_CIPHER_CTX_new() };
        if raw.is_null() {
            return Err(VolumeError::Crypto("EVP_CIPHER_CTX_new failed"));
        }
        let mut ctx = Ctx(raw, None);
        // Step 1, no key: aws-lc allocates the cipher's state block (`cipher_data`) only.
        // SAFETY: ctx.0 is a fresh context; EVP_aes_256_xts() returns a static cipher; key and
        // IV null are allowed (the XTS init does nothing without them).
        let ok = unsafe {
            ffi::EVP_CipherInit_ex(
                ctx.0,
                ffi::EVP_aes_256_xts(),
                ptr::null_mut(),
                ptr::null(),
                ptr::null(),
                i32::from(encrypt),
            )
        };
        if ok != 1 {
            return Err(VolumeError::Crypto("EVP_CipherInit_ex failed"));
        }
        // SAFETY: ctx.0 is a valid context (read of a plain field of the public struct).
        let data = unsafe { (*ctx.0).cipher_data };
        if data.is_null() {
            return Err(VolumeError::Crypto("aws-lc XTS context has no state"));
        }
        ctx.1 = Some(RegionLock::new(data.cast(), XTS_CTX_LEN));
        // Step 2: expand the key into the now locked block (cipher null keeps it).
        // SAFETY: the context has its cipher; the key pointer is valid for the 64 bytes an
        // AES-256-XTS key has; no IV yet.
        let ok = unsafe {
            ffi::EVP_CipherInit_ex(
                ctx.0,
                ptr::null(),
                ptr::null_mut(),
                key.bytes().as_ptr(),
                ptr::null(),
                -1,
            )
        };
        if ok != 1 {
            return Err(VolumeError::Crypto("EVP_CipherInit_ex rejected the key"));
        }
        Ok(ctx)
    }

    /// Transforms `data` (whole units) in place.
    fn run(&mut self, first_unit: u64, unit: UnitSize, data: &mut [u8]) {
        let n = unit.bytes();
        for (k, chunk) in data.chunks_exact_mut(n).enumerate() {
            let iv = plain64_iv(first_unit.wrapping_add(k as u64));
            let mut outl: i32 = 0;
            // SAFETY: the context is keyed (Ctx::new); cipher and key null keep them; the IV is
            // 16 bytes as XTS needs. In-place update (out == in) is supported by aws-lc's XTS;
            // the chunk is `n` <= 4096 bytes, which fits in an i32.
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
                        chunk.as_mut_ptr(),
                        &mut outl,
                        chunk.as_ptr(),
                        n as i32,
                    ) == 1
            };
            // Our invariant: a keyed XTS context accepts any whole unit of 512 or 4096 bytes.
            assert!(
                ok && outl as usize == n,
                "aws-lc XTS update failed on a whole unit"
            );
        }
    }
}

pub struct AwsLcXts {
    enc: Mutex<Vec<Ctx>>,
    dec: Mutex<Vec<Ctx>>,
    key: XtsKeyCopy,
}

/// The key kept to make more contexts on demand (zeroized with the backend).
struct XtsKeyCopy(XtsKey);

impl AwsLcXts {
    pub fn new(key: &XtsKey) -> Result<AwsLcXts, VolumeError> {
        let copy = XtsKey::new(key.bytes())?;
        // Check the key once up front so later context creation cannot fail on it.
        let first = Ctx::new(key, true)?;
        Ok(AwsLcXts {
            enc: Mutex::new(vec![first]),
            dec: Mutex::new(Vec::new()),
            key: XtsKeyCopy(copy),
        })
    }

    fn with_ctx(&self, encrypt: bool, f: impl FnOnce(&mut Ctx)) {
        let pool = if encrypt { &self.enc } else { &self.dec };
        let taken = pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut ctx = match taken {
            Some(c) => c,
            None => Ctx::new(&self.key.0, encrypt).expect("key was accepted at construction"),
        };
        f(&mut ctx);
        pool.lock().unwrap_or_else(|e| e.into_inner()).push(ctx);
    }
}

impl XtsBackend for AwsLcXts {
    fn encrypt(&self, first_unit: u64, unit: UnitSize, data: &mut [u8]) {
        self.with_ctx(true, |c| c.run(first_unit, unit, data));
    }
    fn decrypt(&self, first_unit: u64, unit: UnitSize, data: &mut [u8]) {
        self.with_ctx(false, |c| c.run(first_unit, unit, data));
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
        let ctx = Ctx::new(&key, true).unwrap();
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
    }
}
