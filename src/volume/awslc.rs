//! AES-256-XTS from aws-lc (EVP interface): the fast default backend.
//!
//! A keyed `EVP_CIPHER_CTX` is not safe to share between threads, so each [`AwsLcXts`] keeps
//! a small pool of keyed encrypt/decrypt contexts; a call takes one, re-sets only the IV per
//! unit (no key schedule), and gives it back. The pool lock is held for a pointer swap, not
//! for the crypto.
#![allow(unsafe_code)]

use std::ptr;
use std::sync::Mutex;

use aws_lc_sys as ffi;

use super::VolumeError;
use super::cipher::{UnitSize, XtsBackend, XtsKey, plain64_iv};

/// One keyed EVP context, owned. Freed (and its key schedule wiped by aws-lc) on drop.
struct Ctx(*mut ffi::EVP_CIPHER_CTX);

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
        let ctx = Ctx(raw);
        // SAFETY: ctx.0 is a fresh context; EVP_aes_256_xts() returns a static cipher; the key
        // pointer is valid for the 64 bytes an AES-256-XTS key has; no IV yet (null is allowed).
        let ok = unsafe {
            ffi::EVP_CipherInit_ex(
                ctx.0,
                ffi::EVP_aes_256_xts(),
                ptr::null_mut(),
                key.bytes().as_ptr(),
                ptr::null(),
                i32::from(encrypt),
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

/// Locks the pages holding `bytes` in RAM, best effort: the first failure (RLIMIT_MEMLOCK too
/// low) logs one warning; keys still work, they may just reach swap.
pub(crate) fn lock_memory(bytes: &[u8]) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    // SAFETY: mlock only reads the address range of a live slice; it does not access memory.
    let r = unsafe { libc::mlock(bytes.as_ptr().cast(), bytes.len()) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        WARNED.call_once(|| tracing::warn!(error = %e, "cannot lock key memory (raise LimitMEMLOCK); keys may be swapped"));
    }
}

/// Unlocks what [`lock_memory`] locked (harmless if it was not locked).
pub(crate) fn unlock_memory(bytes: &[u8]) {
    // SAFETY: as above; munlock of an unlocked range is a no-op.
    unsafe { libc::munlock(bytes.as_ptr().cast(), bytes.len()) };
}
