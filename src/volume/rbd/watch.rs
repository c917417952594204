//! Being seen on a RADOS object: a [`Presence`] is a watch that answers every notify with a
//! short label; [`IoCtx::present`] notifies the object and returns the labels of the watchers
//! that answered. The daemon uses it for RBD snapshots: a host reading `NAME@SNAP` (a
//! read-only attach, an export, a clone's copy) holds a presence on the snapshot's readers
//! object, and `snapshot delete` on any host asks first — librbd itself does not track who
//! reads a snapshot (a read-only open registers no watch).
//!
//! Liveness comes from the OSD: a watch lives while its session pings; a reader that crashed
//! or was cut off stops answering (the notify lists it as timed out, not as an answer) and its
//! watch expires after the watch timeout. So an answer means a live reader, and a dead one
//! never blocks a delete for longer than the notify's own timeout.
//!
//! The callbacks run on librados's finisher threads. Their context ([`Ctx`]) is freed only
//! after `rados_unwatch2` and `rados_watch_flush` (no callback runs or is queued after that),
//! and every callback body runs under `catch_unwind`: nothing unwinds into C.

use std::ffi::CString;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;
use std::time::Duration;

use libc::{c_char, c_int, c_void, size_t};

use super::{IoCtx, check, cstring, ffi};

/// Longest label sent or accepted (bytes): a watcher's answer is any client's input.
pub const MAX_LABEL: usize = 256;

/// What a watch's callbacks use; lives until the watch is gone and flushed.
struct Ctx {
    io: ffi::rados_ioctx_t,
    oid: CString,
    label: Vec<u8>,
}

/// A watch on one object that answers notifies with a label. Dropping it unwatches (bounded
/// by the cluster's operation timeout).
pub struct Presence {
    io: IoCtx,
    cookie: u64,
    ctx: *mut Ctx,
}

// SAFETY: `ctx` is only read by librados's callbacks (shared, immutable) and freed once in
// Drop after the watch is flushed; the ioctx is thread-safe (see IoCtxHandle).
unsafe impl Send for Presence {}
// SAFETY: as above; `&Presence` gives no access to `ctx`.
unsafe impl Sync for Presence {}

unsafe extern "C" fn on_notify(
    arg: *mut c_void,
    notify_id: u64,
    cookie: u64,
    _notifier: u64,
    _data: *mut c_void,
    _len: size_t,
) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `arg` is the Ctx of this watch, alive until after unwatch + flush (Drop).
        let ctx = unsafe { &*(arg as *const Ctx) };
        // SAFETY: live ioctx and NUL-terminated name (the Ctx's); `label` outlives the call
        // (librados copies it) and is at most MAX_LABEL bytes.
        unsafe {
            ffi::rados_notify_ack(
                ctx.io,
                ctx.oid.as_ptr(),
                notify_id,
                cookie,
                ctx.label.as_ptr().cast(),
                ctx.label.len() as c_int,
            )
        };
    }));
}

unsafe extern "C" fn on_error(arg: *mut c_void, _cookie: u64, err: c_int) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: as in on_notify.
        let ctx = unsafe { &*(arg as *const Ctx) };
        tracing::warn!(
            object = %ctx.oid.to_string_lossy(),
            error = %io::Error::from_raw_os_error(err.saturating_abs()),
            "a watch broke: this reader is no longer seen by other hosts"
        );
    }));
}

impl Drop for Presence {
    fn drop(&mut self) {
        // SAFETY: live ioctx; `cookie` came from rados_watch3 and is unwatched once, here.
        let r = unsafe { ffi::rados_unwatch2(self.io.inner.h, self.cookie) };
        if r < 0 {
            tracing::debug!(error = %io::Error::from_raw_os_error(-r), "unwatch failed (the watch expires on its own)");
        }
        // SAFETY: live cluster handle (the ioctx holds it); after this no callback of this
        // watch runs or is queued, so the context can go.
        unsafe { ffi::rados_watch_flush(self.io.inner.cluster.inner.h) };
        // SAFETY: `ctx` came from Box::into_raw in `announce` and is freed once, here.
        drop(unsafe { Box::from_raw(self.ctx) });
    }
}

fn timeout_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl IoCtx {
    /// Creates object `oid` if it is missing and watches it, answering every notify with
    /// `label` (cut to [`MAX_LABEL`] bytes). `timeout`: how long the OSD keeps the watch of a
    /// session it no longer hears from.
    pub fn announce(&self, oid: &str, label: &str, timeout: Duration) -> io::Result<Presence> {
        let name = cstring(oid)?;
        // SAFETY: no arguments; returns a new op (released below) or null.
        let op = unsafe { ffi::rados_create_write_op() };
        if op.is_null() {
            return Err(io::Error::other("rados_create_write_op failed"));
        }
        // SAFETY: `op` is live; the category is deprecated and may be null.
        unsafe { ffi::rados_write_op_create(op, ffi::LIBRADOS_CREATE_IDEMPOTENT, ptr::null()) };
        // SAFETY: live op and ioctx, NUL-terminated name; null mtime = now; bounded by
        // rados_osd_op_timeout.
        let r = unsafe {
            ffi::rados_write_op_operate(op, self.inner.h, name.as_ptr(), ptr::null_mut(), 0)
        };
        // SAFETY: `op` came from rados_create_write_op and is released exactly once.
        unsafe { ffi::rados_release_write_op(op) };
        check(r)?;
        let mut bytes = label.as_bytes().to_vec();
        bytes.truncate(MAX_LABEL);
        let ctx = Box::into_raw(Box::new(Ctx {
            io: self.inner.h,
            oid: name,
            label: bytes,
        }));
        let mut cookie = 0u64;
        let secs = u32::try_from(timeout.as_secs().max(1)).unwrap_or(u32::MAX);
        // SAFETY: live ioctx; the name is the Ctx's (alive as long as the watch); `cookie` a
        // valid out pointer; the callbacks match librados's types and get `ctx`, which stays
        // valid until Drop has unwatched and flushed.
        let r = unsafe {
            ffi::rados_watch3(
                self.inner.h,
                (*ctx).oid.as_ptr(),
                &mut cookie,
                on_notify,
                on_error,
                secs,
                ctx.cast(),
            )
        };
        if let Err(e) = check(r) {
            // SAFETY: the watch was not registered: no callback can see `ctx`.
            drop(unsafe { Box::from_raw(ctx) });
            return Err(e);
        }
        Ok(Presence {
            io: self.clone(),
            cookie,
            ctx,
        })
    }

    /// Notifies object `oid`'s watchers and returns the labels of those that answered
    /// within `timeout` (each cut to [`MAX_LABEL`] bytes); no object: none. Watchers that
    /// did not answer (dead sessions whose watch has not expired yet) are not counted.
    pub fn present(&self, oid: &str, timeout: Duration) -> io::Result<Vec<String>> {
        let name = cstring(oid)?;
        let mut reply: *mut c_char = ptr::null_mut();
        let mut reply_len: size_t = 0;
        // SAFETY: live ioctx, NUL-terminated name, no payload; `reply`/`reply_len` valid out
        // pointers (the buffer librados allocates is freed below).
        let r = unsafe {
            ffi::rados_notify2(
                self.inner.h,
                name.as_ptr(),
                ptr::null(),
                0,
                timeout_ms(timeout),
                &mut reply,
                &mut reply_len,
            )
        };
        let result = match check(r) {
            Ok(_) => decode(reply, reply_len),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Vec::new()),
            // Some watcher did not answer: the reply still lists those that did.
            Err(e) if e.raw_os_error() == Some(libc::ETIMEDOUT) && !reply.is_null() => {
                decode(reply, reply_len)
            }
            Err(e) => Err(e),
        };
        if !reply.is_null() {
            // SAFETY: allocated by rados_notify2, freed once.
            unsafe { ffi::rados_buffer_free(reply) };
        }
        result
    }

    /// Removes object `oid`; a missing one is not an error.
    pub fn remove_object(&self, oid: &str) -> io::Result<()> {
        let name = cstring(oid)?;
        // SAFETY: live ioctx, NUL-terminated name; bounded by rados_osd_op_timeout.
        match check(unsafe { ffi::rados_remove(self.inner.h, name.as_ptr()) }) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The answers' labels of a notify reply.
fn decode(reply: *mut c_char, len: size_t) -> io::Result<Vec<String>> {
    if reply.is_null() {
        return Ok(Vec::new());
    }
    let mut acks: *mut ffi::notify_ack_t = ptr::null_mut();
    let mut n_acks: size_t = 0;
    let mut timeouts: *mut ffi::notify_timeout_t = ptr::null_mut();
    let mut n_timeouts: size_t = 0;
    // SAFETY: `reply` holds `len` bytes from rados_notify2; the out pointers are valid; what
    // librados allocates is freed below with rados_free_notify_response.
    check(unsafe {
        ffi::rados_decode_notify_response(
            reply,
            len,
            &mut acks,
            &mut n_acks,
            &mut timeouts,
            &mut n_timeouts,
        )
    })?;
    let mut labels = Vec::with_capacity(n_acks.min(1024));
    if !acks.is_null() {
        // SAFETY: librados decoded `n_acks` entries at `acks`.
        let all = unsafe { std::slice::from_raw_parts(acks, n_acks) };
        for a in all {
            let n = usize::try_from(a.payload_len)
                .unwrap_or(usize::MAX)
                .min(MAX_LABEL);
            let bytes = if a.payload.is_null() || n == 0 {
                &[][..]
            } else {
                // SAFETY: `payload` holds `payload_len` ≥ n bytes (librados's decode).
                unsafe { std::slice::from_raw_parts(a.payload.cast::<u8>(), n) }
            };
            labels.push(String::from_utf8_lossy(bytes).into_owned());
        }
    }
    // SAFETY: both arrays came from rados_decode_notify_response and are freed once.
    unsafe { ffi::rados_free_notify_response(acks, n_acks, timeouts) };
    Ok(labels)
}
