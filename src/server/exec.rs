//! Executing one validated request against a [`Backend`]: what both transmission paths
//! (async for TLS, threads for plain sockets) share, from the command to its reply bytes.

use std::io;

use super::backend::Backend;
use super::bufpool::BufPool;
use crate::nbd::consts::*;
use crate::nbd::transmission::{self as tx, Command};

/// The `base:allocation` context id this server hands out (its only context).
pub(super) const BASE_ALLOCATION_ID: u32 = 1;

/// A connection's payload budget (`max_buffer_bytes`, at least one maximum-size request), in
/// KiB permits: a client pipelining many 32 MiB requests waits instead of growing memory.
pub(super) fn budget_kib(max_buffer_bytes: usize) -> u32 {
    (max_buffer_bytes / 1024).max(MAX_PAYLOAD as usize / 1024) as u32
}

/// The KiB of that budget `cmd` holds while in flight (READ data, WRITE payload), capped at
/// the whole budget; 0 for requests without data.
pub(super) fn request_kib(cmd: &Command, budget_kib: u32) -> u32 {
    let data_len = match *cmd {
        Command::Read { length, .. } | Command::Write { length, .. } => length,
        _ => 0,
    };
    data_len.div_ceil(1024).min(budget_kib)
}

/// A reply ready for the wire: a small header part and an optional data part.
pub(super) struct Reply {
    pub(super) head: Vec<u8>,
    pub(super) data: Option<Vec<u8>>,
}

fn nbd_errno(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EROFS) | Some(libc::EACCES) => NBD_EPERM,
        Some(libc::ENOMEM) => NBD_ENOMEM,
        Some(libc::EINVAL) => NBD_EINVAL,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => NBD_ENOSPC,
        Some(libc::EOVERFLOW) => NBD_EOVERFLOW,
        Some(libc::ENOTSUP) => NBD_ENOTSUP,
        _ => NBD_EIO,
    }
}

pub(super) fn error_reply(cookie: u64, errno: u32, structured: bool, msg: &str) -> Reply {
    let mut head = Vec::with_capacity(32);
    if structured {
        tx::error_chunk(&mut head, cookie, errno, msg);
    } else {
        head.extend_from_slice(&tx::simple_reply(cookie, errno));
    }
    Reply { head, data: None }
}

fn ok_reply(cookie: u64, structured: bool) -> Reply {
    let mut head = Vec::with_capacity(20);
    if structured {
        tx::done_chunk(&mut head, cookie);
    } else {
        head.extend_from_slice(&tx::simple_reply(cookie, 0));
    }
    Reply { head, data: None }
}

/// Runs one validated command against the backend (blocking: called off the reactor).
fn execute(
    backend: &dyn Backend,
    pool: &BufPool,
    cmd: Command,
    cookie: u64,
    payload: Vec<u8>,
    structured: bool,
) -> Reply {
    let fail = |e: io::Error| error_reply(cookie, nbd_errno(&e), structured, &e.to_string());
    match cmd {
        Command::Read { offset, length, .. } => {
            let mut buf = pool.take(length as usize);
            let r = backend.read(offset, &mut buf);
            read_reply(pool, cookie, structured, offset, buf, r)
        }
        Command::Write { offset, fua, .. } => {
            let mut payload = payload;
            let r = backend.write(offset, &mut payload, fua);
            pool.give(payload);
            match r {
                Ok(()) => ok_reply(cookie, structured),
                Err(e) => fail(e),
            }
        }
        Command::Flush => match backend.flush() {
            Ok(()) => ok_reply(cookie, structured),
            Err(e) => fail(e),
        },
        Command::Trim {
            offset,
            length,
            fua,
        } => match backend.trim(offset, u64::from(length), fua) {
            Ok(()) => ok_reply(cookie, structured),
            Err(e) => fail(e),
        },
        Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole,
            fast,
        } => {
            if fast && no_hole {
                // Allocating zeros costs as much as a write: not fast.
                return error_reply(cookie, NBD_ENOTSUP, structured, "fast zero needs a hole");
            }
            match backend.write_zeroes(offset, u64::from(length), !no_hole, fua) {
                Ok(()) => ok_reply(cookie, structured),
                Err(e) => fail(e),
            }
        }
        Command::Cache { .. } => ok_reply(cookie, structured),
        Command::BlockStatus {
            offset,
            length,
            req_one,
        } => match backend.extents(offset, u64::from(length)) {
            Ok(extents) => {
                let mut descs: Vec<(u32, u32)> = Vec::new();
                let mut covered = 0u64;
                for e in extents {
                    if covered >= u64::from(length) {
                        break;
                    }
                    if e.length == 0 {
                        continue; // descriptors MUST have a nonzero length
                    }
                    let l = e.length.min(u64::from(length) - covered) as u32;
                    let f = if e.hole {
                        NBD_STATE_HOLE | NBD_STATE_ZERO
                    } else {
                        0
                    };
                    descs.push((l, f));
                    covered += u64::from(l);
                    if req_one {
                        break;
                    }
                }
                if descs.is_empty() {
                    descs.push((length, 0));
                }
                let mut head = Vec::with_capacity(24 + 8 * descs.len());
                tx::block_status_chunk(&mut head, cookie, BASE_ALLOCATION_ID, &descs);
                Reply { head, data: None }
            }
            Err(e) => fail(e),
        },
        Command::Disconnect => unreachable!("DISC is handled by the reader"),
    }
}

/// The reply to a READ of `buf.len()` bytes at `offset` that ended with `r`.
fn read_reply(
    pool: &BufPool,
    cookie: u64,
    structured: bool,
    offset: u64,
    buf: Vec<u8>,
    r: io::Result<()>,
) -> Reply {
    match r {
        Ok(()) if structured && !buf.is_empty() => Reply {
            head: tx::offset_data_header(cookie, true, offset, buf.len() as u32).to_vec(),
            data: Some(buf),
        },
        Ok(()) if structured => ok_reply(cookie, true),
        Ok(()) => Reply {
            head: tx::simple_reply(cookie, 0).to_vec(),
            data: Some(buf),
        },
        Err(e) => {
            pool.give(buf);
            error_reply(cookie, nbd_errno(&e), structured, &e.to_string())
        }
    }
}

/// Serves a request [`runs_inline`] picked, on the connection's own thread, unless it would
/// wait for a device: a READ whose data is not in the page cache comes back as `Err(cmd)`,
/// for the blocking pool. (On a real disk, serving cold reads inline would turn a QD32
/// client into a QD1 one against the device.)
pub(super) fn execute_inline(
    backend: &dyn Backend,
    pool: &BufPool,
    cmd: Command,
    cookie: u64,
    payload: Vec<u8>,
    structured: bool,
) -> Result<Reply, Command> {
    let Command::Read { offset, length, .. } = cmd else {
        return Ok(execute_guarded(
            backend, pool, cmd, cookie, payload, structured,
        ));
    };
    let mut buf = pool.take(length as usize);
    let tried = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        backend.try_read(offset, &mut buf)
    }));
    match tried {
        Ok(Ok(false)) => {
            pool.give(buf);
            Err(cmd)
        }
        Ok(r) => Ok(read_reply(
            pool,
            cookie,
            structured,
            offset,
            buf,
            r.map(drop),
        )),
        Err(_) => Ok(error_reply(cookie, NBD_EIO, structured, "internal error")),
    }
}

/// [`execute`], with a panicking backend answered by EIO rather than a hanging request.
pub(super) fn execute_guarded(
    backend: &dyn Backend,
    pool: &BufPool,
    cmd: Command,
    cookie: u64,
    payload: Vec<u8>,
    structured: bool,
) -> Reply {
    let run = || execute(backend, pool, cmd, cookie, payload, structured);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
        .unwrap_or_else(|_| error_reply(cookie, NBD_EIO, structured, "internal error"))
}

/// Requests served on the session task: small, and never waiting for the disk (no FLUSH, no
/// FUA). Everything else goes to the blocking pool so a slow disk never stalls the reactor.
pub(super) fn runs_inline(cmd: &Command) -> bool {
    const INLINE_MAX: u32 = 64 * 1024;
    match *cmd {
        Command::Read { length, .. } => length <= INLINE_MAX,
        Command::Write { length, fua, .. } => length <= INLINE_MAX && !fua,
        Command::Cache { .. } => true,
        _ => false,
    }
}
