//! Whole RADOS objects with versions: read one with the version it had, replace one only if
//! its version is still the one read (a compare-and-swap done by the OSD: `assert_version` +
//! `write_full` in one write op). Used for the daemon's shared key records
//! (`src/daemon/ceph_kms.rs`).
//!
//! `rados_get_last_version` reports the version seen by the *last operation on the ioctx*, so
//! the caller must not run object operations on the same [`IoCtx`] from several threads at
//! once (the key records use an `IoCtx` of their own behind a mutex). Every call is bounded
//! by the cluster's `rados_osd_op_timeout` (`ETIMEDOUT`).

use std::io;
use std::ptr;

use super::{IoCtx, check, cstring, ffi};

/// An object's bytes and the version it had when read.
pub struct ObjectRead {
    pub bytes: Vec<u8>,
    pub version: u64,
}

/// A conditional write lost: the object's version is no longer the expected one (or it
/// exists when it was expected not to, or is gone).
#[derive(Debug)]
pub struct VersionMismatch;

/// Objects larger than this are refused (the key records are kilobytes).
const MAX_OBJECT: u64 = 64 << 20;

impl IoCtx {
    /// The object `oid`, or `None` when it does not exist.
    pub fn read_object(&self, oid: &str) -> io::Result<Option<ObjectRead>> {
        let name = cstring(oid)?;
        let mut size = 0u64;
        // SAFETY: live ioctx; `name` NUL-terminated; `size` a valid out pointer; a null mtime
        // pointer is allowed (not reported).
        match check(unsafe {
            ffi::rados_stat(self.inner.h, name.as_ptr(), &mut size, ptr::null_mut())
        }) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        }
        // The object may grow between stat and read: read with room to spare, and again
        // with more when the buffer came back full.
        let mut cap = size.saturating_add(4096);
        loop {
            if cap > MAX_OBJECT {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("object {oid} is larger than {MAX_OBJECT} bytes"),
                ));
            }
            let len = usize::try_from(cap).map_err(|_| io::Error::other("object size"))?;
            let mut buf = vec![0u8; len];
            // SAFETY: live ioctx; `buf` is writable for `len` bytes and outlives the call.
            let n = unsafe {
                ffi::rados_read(self.inner.h, name.as_ptr(), buf.as_mut_ptr().cast(), len, 0)
            };
            let n = match check(n) {
                Ok(n) => n as usize,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
                Err(e) => return Err(e),
            };
            // SAFETY: live ioctx; reads the version of this ioctx's last operation (the read
            // above; the caller runs no other operation on this ioctx meanwhile).
            let version = unsafe { ffi::rados_get_last_version(self.inner.h) };
            if n < len {
                buf.truncate(n);
                return Ok(Some(ObjectRead {
                    bytes: buf,
                    version,
                }));
            }
            cap = cap.saturating_mul(2);
        }
    }

    /// Replaces object `oid` with `bytes` if its version is still `expected` (`None`: only if
    /// it does not exist yet), atomically in one OSD write op. Returns the new version.
    pub fn write_object_if(
        &self,
        oid: &str,
        bytes: &[u8],
        expected: Option<u64>,
    ) -> io::Result<Result<u64, VersionMismatch>> {
        let name = cstring(oid)?;
        // SAFETY: no arguments; returns a new op (released below on every path) or null.
        let op = unsafe { ffi::rados_create_write_op() };
        if op.is_null() {
            return Err(io::Error::other("rados_create_write_op failed"));
        }
        match expected {
            // SAFETY: `op` is live; the category is deprecated and may be null.
            None => unsafe {
                ffi::rados_write_op_create(op, ffi::LIBRADOS_CREATE_EXCLUSIVE, ptr::null())
            },
            // SAFETY: `op` is live.
            Some(v) => unsafe { ffi::rados_write_op_assert_version(op, v) },
        }
        // SAFETY: `op` is live; librados copies `bytes` into the op before returning.
        unsafe { ffi::rados_write_op_write_full(op, bytes.as_ptr().cast(), bytes.len()) };
        // SAFETY: live op and ioctx, NUL-terminated name; a null mtime means "now"; blocks at
        // most rados_osd_op_timeout.
        let r = unsafe {
            ffi::rados_write_op_operate(op, self.inner.h, name.as_ptr(), ptr::null_mut(), 0)
        };
        // SAFETY: live ioctx; the version of the write just done (see read_object).
        let version = unsafe { ffi::rados_get_last_version(self.inner.h) };
        // SAFETY: `op` came from rados_create_write_op and is released exactly once.
        unsafe { ffi::rados_release_write_op(op) };
        match check(r) {
            Ok(_) => Ok(Ok(version)),
            // assert_version: ERANGE (object newer), EOVERFLOW (older); exclusive create:
            // EEXIST; an asserted object that is gone: ENOENT.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ERANGE | libc::EOVERFLOW | libc::EEXIST | libc::ENOENT)
                ) =>
            {
                Ok(Err(VersionMismatch))
            }
            Err(e) => Err(e),
        }
    }
}
