//! librbd's asynchronous reads and writes (`rbd_aio_read2`/`rbd_aio_write2` with a completion
//! callback): an I/O is started and no thread waits for the OSDs; librbd calls back once it is
//! done, on one of its own threads (Ceph 16.2: the image's API strand, one callback at a time).
//!
//! What the callback may do: hand the buffer and the result to the caller's [`AioDone`],
//! which must only signal (the server queues the request's completion on its blocking pool:
//! `server/exec.rs`). It decrypts nothing, writes no socket and cannot unwind into C: its
//! body runs under `catch_unwind`.
//!
//! **Buffer lifetime.** The buffer is owned by the operation's state (`Op`), which is leaked to
//! librbd as the callback's argument when the I/O is started and taken back only by the
//! callback, which librbd calls exactly once for every started I/O, whatever happens:
//! completion, error, or `rados_osd_op_timeout` on a lost cluster (ETIMEDOUT). Nothing frees
//! or reuses the buffer before that, so librbd never writes into freed memory; a request whose
//! client is gone still waits for its callback (bounded by the op timeout) before its buffer
//! is released. `rbd_close` waits for started I/O, and the server keeps the image open while
//! an operation's completion still holds the volume.

use std::ffi::c_void;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;

use super::{Image, MAX_IO, check_len, ffi};
use crate::aligned::AlignedBuf;
use crate::volume::store::AioDone;

/// One started I/O: its buffer and who to tell.
struct Op {
    buf: AlignedBuf,
    done: AioDone,
    /// A read must return exactly this many bytes (callers read only within the image).
    want: usize,
    read: bool,
}

/// librbd's completion callback for every [`Op`].
unsafe extern "C" fn complete(c: ffi::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `c` is the completion this callback was registered on; librbd calls the callback
    // once, after the I/O is finished, so its return value is final. Released once, here: no
    // other code keeps the completion after starting the I/O.
    let r = unsafe { ffi::rbd_aio_get_return_value(c) };
    // SAFETY: as above; the return value was read first.
    unsafe { ffi::rbd_aio_release(c) };
    // SAFETY: `arg` is the `Box<Op>` leaked by `start` for this completion (only started I/O
    // registers it), taken back exactly once: here.
    let op = unsafe { Box::from_raw(arg.cast::<Op>()) };
    // Nothing may unwind into librbd; a panic in `done` loses only that notification.
    let _ = catch_unwind(AssertUnwindSafe(move || {
        let Op {
            buf,
            done,
            want,
            read,
        } = *op;
        let r = match check_len(r) {
            Ok(n) if read && n != want => Err(io::Error::from_raw_os_error(libc::EIO)),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        done(buf, r);
    }));
}

impl Image {
    /// Starts reading `buf.len()` bytes at `offset` (which must lie within the image) into
    /// `buf`; `done` gets the buffer and the result from librbd's thread. `Err` gives both
    /// back, nothing started (too long, or librbd refused to start it).
    pub fn aio_read(
        &self,
        buf: AlignedBuf,
        offset: u64,
        done: AioDone,
    ) -> Result<(), (AlignedBuf, AioDone)> {
        self.start(buf, offset, done, true)
    }

    /// Starts writing `buf` at `offset` (the range within the image); `done` as for
    /// [`aio_read`](Self::aio_read).
    pub fn aio_write(
        &self,
        buf: AlignedBuf,
        offset: u64,
        done: AioDone,
    ) -> Result<(), (AlignedBuf, AioDone)> {
        self.start(buf, offset, done, false)
    }

    fn start(
        &self,
        buf: AlignedBuf,
        offset: u64,
        done: AioDone,
        read: bool,
    ) -> Result<(), (AlignedBuf, AioDone)> {
        let want = buf.len();
        if want == 0 || want > MAX_IO {
            return Err((buf, done));
        }
        let op = Box::into_raw(Box::new(Op {
            buf,
            done,
            want,
            read,
        }));
        let give_back = |op: *mut Op| {
            // SAFETY: `op` came from Box::into_raw above and librbd does not hold it (no I/O
            // was started with it): taken back once, on this failure path only.
            let op = unsafe { Box::from_raw(op) };
            let Op { buf, done, .. } = *op;
            Err((buf, done))
        };
        let mut c: ffi::rbd_completion_t = ptr::null_mut();
        // SAFETY: `c` is a valid out pointer; `complete` matches rbd_callback_t and `op` is
        // the live state it takes back.
        if unsafe { ffi::rbd_aio_create_completion(op.cast(), complete, &mut c) } < 0 {
            return give_back(op);
        }
        // SAFETY: `op` is live and not yet shared with librbd; the buffer's heap block (an
        // AlignedBuf never moves its data) stays where it is until the callback takes `op`
        // back, so the pointer stays valid for the whole I/O.
        let data = unsafe { (*op).buf.as_mut_ptr() };
        // SAFETY: open image; `data` is valid for `want` bytes (reads: writes into it) until
        // the callback runs (see above); `c` is a fresh completion used for this I/O only.
        let r = unsafe {
            if read {
                ffi::rbd_aio_read2(self.h, offset, want, data.cast(), c, 0)
            } else {
                ffi::rbd_aio_write2(self.h, offset, want, data.cast(), c, 0)
            }
        };
        if r < 0 {
            // librbd's C calls report a failure either here, before the completion is queued,
            // or through the completion, never both (Ceph 16.2 only ever returns 0 here).
            // SAFETY: not queued, so never called back: released once, here.
            unsafe { ffi::rbd_aio_release(c) };
            return give_back(op);
        }
        Ok(())
    }
}
