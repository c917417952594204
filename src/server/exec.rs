//! Executing one validated request against a [`Backend`]: what both transmission paths
//! (async for TLS, threads for plain sockets) share, from the command to its reply bytes.

use std::io;
use std::ops::Range;
use std::time::Instant;

use super::backend::Backend;
use super::bufpool::BufPool;
use crate::aligned::AlignedBuf;
use crate::metrics::{ConnStats, Op};
use crate::nbd::consts::*;
use crate::nbd::transmission::{Command, ReplyTo, SIMPLE_REPLY_LEN};
use crate::zeroes::is_zero;

/// The `base:allocation` context id this server hands out (its only context).
pub(super) const BASE_ALLOCATION_ID: u32 = 1;

/// A connection's payload budget (`max_buffer_bytes`, at least one maximum-size request), in
/// KiB permits: a client pipelining many 32 MiB requests waits instead of growing memory.
pub(super) fn budget_kib(max_buffer_bytes: usize) -> u32 {
    (max_buffer_bytes / 1024).max(MAX_PAYLOAD as usize / 1024) as u32
}

/// Largest READ or WRITE served on a connection. A client that asked for block sizes
/// (`NBD_INFO_BLOCK_SIZE` in GO) was told [`MAX_PAYLOAD`] and is held to it. One that did
/// not (`NBD_OPT_EXPORT_NAME`, or GO without it: the kernel client, old tools) was promised
/// nothing and may send more, as the reference nbd-server serves: it gets up to its whole
/// buffer budget (`max_buffer_bytes`, 64 MiB by default; at most [`MAX_UNNEGOTIATED`]). The
/// budget already bounds what one connection buffers, so this costs no connection more memory.
pub(super) fn max_payload(asked_block_size: bool, max_buffer_bytes: usize) -> u32 {
    if asked_block_size {
        return MAX_PAYLOAD;
    }
    (u64::from(budget_kib(max_buffer_bytes)) * 1024).min(u64::from(MAX_UNNEGOTIATED)) as u32
}

/// Cap on [`max_payload`] for clients that negotiated no block sizes, whatever the budget.
pub(super) const MAX_UNNEGOTIATED: u32 = 1 << 30;

/// The KiB of that budget `cmd` holds while in flight (READ data, WRITE payload), capped at
/// the whole budget; 0 for requests without data.
pub(super) fn request_kib(cmd: &Command, budget_kib: u32) -> u32 {
    let data_len = match *cmd {
        Command::Read { length, .. } | Command::Write { length, .. } => length,
        _ => 0,
    };
    data_len.div_ceil(1024).min(budget_kib)
}

/// A reply ready for the wire: a header part and an optional data part, sent as `head` then
/// `data` unless `split` says how they interleave.
pub(super) struct Reply {
    pub(super) head: Vec<u8>,
    pub(super) data: Option<AlignedBuf>,
    /// A READ answered in several chunks (data and holes): in order, the end of a stretch of
    /// `head` and the range of `data` that follows it; the rest of `head` comes last. Empty
    /// for every other reply (no allocation on the common path).
    pub(super) split: Vec<(usize, Range<usize>)>,
    /// The NBD error sent (0: success), for the metrics.
    pub(super) errno: u32,
}

/// A request's metrics label and the bytes it moves (READ, WRITE, TRIM, WRITE_ZEROES).
pub(super) fn metric_op(cmd: &Command) -> (Op, u64) {
    match *cmd {
        Command::Read { length, .. } => (Op::Read, u64::from(length)),
        Command::Write { length, .. } => (Op::Write, u64::from(length)),
        Command::Flush | Command::Disconnect => (Op::Flush, 0),
        Command::Trim { length, .. } => (Op::Trim, length),
        Command::WriteZeroes { length, .. } => (Op::WriteZeroes, length),
        Command::BlockStatus { .. } => (Op::BlockStatus, 0),
        Command::Cache { .. } => (Op::Cache, 0),
    }
}

/// A request being counted: taken at arrival, ended once its reply is written.
pub(super) struct Tally {
    op: Op,
    bytes: u64,
    arrived: Instant,
}

impl Tally {
    pub(super) fn begin(stats: &ConnStats, cmd: &Command, arrived: Instant) -> Tally {
        let (op, bytes) = metric_op(cmd);
        stats.begin(op);
        Tally { op, bytes, arrived }
    }
    pub(super) fn end(self, stats: &ConnStats, errno: u32) {
        stats.end(self.op, self.arrived, self.bytes, errno);
    }
}

impl Reply {
    fn head(head: Vec<u8>) -> Reply {
        Reply {
            head,
            data: None,
            split: Vec::new(),
            errno: 0,
        }
    }

    /// The reply's bytes in wire order, for a reply with a `split` (else: `head`, `data`).
    pub(super) fn pieces(&self) -> Vec<&[u8]> {
        let data = self.data.as_deref().unwrap_or_default();
        if self.split.is_empty() {
            return vec![&self.head, data];
        }
        let mut v = Vec::with_capacity(2 * self.split.len() + 1);
        let mut h = 0;
        for (end, r) in &self.split {
            v.push(&self.head[h..*end]);
            v.push(&data[r.clone()]);
            h = *end;
        }
        v.push(&self.head[h..]);
        v
    }

    /// Bytes on the wire.
    pub(super) fn len(&self) -> usize {
        let data = if self.split.is_empty() {
            self.data.as_ref().map_or(0, |d| d.len())
        } else {
            self.split.iter().map(|(_, r)| r.len()).sum()
        };
        self.head.len() + data
    }
}

pub(super) fn nbd_errno(e: &io::Error) -> u32 {
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

pub(super) fn error_reply(to: ReplyTo, errno: u32, msg: &str) -> Reply {
    let mut head = Vec::with_capacity(40 + msg.len().min(64));
    to.error(&mut head, errno, msg);
    Reply {
        errno,
        ..Reply::head(head)
    }
}

pub(super) fn ok_reply(to: ReplyTo) -> Reply {
    let mut head = Vec::with_capacity(32);
    to.ok(&mut head);
    Reply::head(head)
}

/// Most descriptors in one block status reply (16 bytes each with extended headers): a
/// fragmented export answers a huge query with its first part, and the client asks again
/// from there, as the spec allows.
const MAX_DESCRIPTORS: usize = 1 << 14;

/// Runs one validated command against the backend (blocking: called off the reactor).
fn execute(
    backend: &dyn Backend,
    pool: &BufPool,
    cmd: Command,
    to: ReplyTo,
    payload: AlignedBuf,
) -> Reply {
    let fail = |e: io::Error| error_reply(to, nbd_errno(&e), &e.to_string());
    match cmd {
        Command::Read { offset, length, df } => {
            let mut buf = pool.take(length as usize);
            let r = backend.read(offset, &mut buf);
            read_reply(pool, to, offset, df, buf, r)
        }
        Command::Write { offset, fua, .. } => {
            let mut payload = payload;
            let r = backend.write(offset, &mut payload, fua);
            pool.give(payload);
            match r {
                Ok(()) => ok_reply(to),
                Err(e) => fail(e),
            }
        }
        Command::Flush => match backend.flush() {
            Ok(()) => ok_reply(to),
            Err(e) => fail(e),
        },
        Command::Trim {
            offset,
            length,
            fua,
        } => match backend.trim(offset, length, fua) {
            Ok(()) => ok_reply(to),
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
                return error_reply(to, NBD_ENOTSUP, "fast zero needs a hole");
            }
            match backend.write_zeroes(offset, length, !no_hole, fua) {
                Ok(()) => ok_reply(to),
                Err(e) => fail(e),
            }
        }
        Command::Cache { .. } => ok_reply(to),
        Command::BlockStatus {
            offset,
            length,
            req_one,
        } => match block_status(backend, offset, length, req_one) {
            Ok(descs) => {
                let mut head = Vec::with_capacity(40 + 16 * descs.len());
                to.block_status(&mut head, BASE_ALLOCATION_ID, &descs);
                Reply::head(head)
            }
            Err(e) => fail(e),
        },
        Command::Disconnect => unreachable!("DISC is handled by the reader"),
    }
}

/// Most bytes asked of the backend's allocation map at once. Extended headers let one
/// BLOCK_STATUS span the export (2^64 bytes on the wire); the map is read in windows of what
/// a compact request could ask, so a fragmented volume costs at most one window's extents in
/// memory, and the reply stops at [`MAX_DESCRIPTORS`].
const EXTENTS_WINDOW: u64 = 4 << 30;

/// The `base:allocation` descriptors (length, flags) for `[offset, offset + length)`:
/// consecutive, nonzero, neighbours of equal status merged, at most [`MAX_DESCRIPTORS`]
/// (one with REQ_ONE), covering at most `length`.
fn block_status(
    backend: &dyn Backend,
    offset: u64,
    length: u64,
    req_one: bool,
) -> io::Result<Vec<(u64, u32)>> {
    let mut descs: Vec<(u64, u32)> = Vec::new();
    let mut covered = 0u64;
    'windows: while covered < length {
        let window = (length - covered).min(EXTENTS_WINDOW);
        let mut got = 0u64;
        for e in backend.extents(offset + covered, window)? {
            if got >= window {
                break;
            }
            if e.length == 0 {
                continue; // descriptors MUST have a nonzero length
            }
            let l = e.length.min(window - got);
            let f = if e.hole {
                NBD_STATE_HOLE | NBD_STATE_ZERO
            } else {
                0
            };
            let n = descs.len();
            match descs.last_mut() {
                // Same status as the one before: one descriptor (the spec asks for
                // different values between neighbours where feasible).
                Some(d) if d.1 == f => d.0 += l,
                _ if n == MAX_DESCRIPTORS => break 'windows,
                _ => descs.push((l, f)),
            }
            got += l;
        }
        if got == 0 {
            break; // the backend said nothing about this window
        }
        covered += got;
        if req_one && (got < window || descs.len() > 1) {
            break;
        }
    }
    if req_one {
        descs.truncate(1);
    }
    if descs.is_empty() {
        // Nothing known: "allocated, contents unknown" is always true.
        descs.push((length, 0));
    }
    Ok(descs)
}

/// Granule of the holes a structured READ reply reports: 4 KiB, aligned to the export.
const HOLE_GRANULE: usize = 4096;
/// Holes reported in one READ reply, at most (the rest goes as data).
const MAX_HOLES: usize = 256;

/// The all-zero stretches of READ data `buf` read at `offset`: whole [`HOLE_GRANULE`]s
/// aligned to the export, merged, at most [`MAX_HOLES`].
///
/// What it costs, and why the data rather than the allocation map: a hole chunk means
/// "reads as zeros", which the bytes just read prove; asking the backend for its extents
/// would cost a lookup (a `SEEK_DATA` on a volume) on every READ, for nothing the data does
/// not already say. Data that is not zero is told apart on the first 16 bytes of each
/// granule: one compare for a 4 KiB READ, 256 for 1 MiB.
fn zero_runs(buf: &[u8], offset: u64) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    let g = HOLE_GRANULE;
    let mut s = (g - (offset % g as u64) as usize) % g;
    while s + g <= buf.len() {
        if is_zero(&buf[s..s + g]) {
            let n = runs.len();
            match runs.last_mut() {
                Some(r) if r.end == s => r.end = s + g,
                _ if n == MAX_HOLES => break,
                _ => runs.push(s..s + g),
            }
        }
        s += g;
    }
    runs
}

/// The reply to a READ of `buf.len()` bytes at `offset` that ended with `r`. Structured
/// replies report the zero stretches as holes, so the client neither receives nor (nbdcopy,
/// `qemu-img convert`) writes them; with DF, only a READ that is all hole is sent as one.
pub(super) fn read_reply(
    pool: &BufPool,
    to: ReplyTo,
    offset: u64,
    df: bool,
    buf: AlignedBuf,
    r: io::Result<()>,
) -> Reply {
    if let Err(e) = r {
        pool.give(buf);
        return error_reply(to, nbd_errno(&e), &e.to_string());
    }
    if !to.framing.structured() {
        let mut head = Vec::with_capacity(SIMPLE_REPLY_LEN);
        to.data(&mut head, true, offset, buf.len() as u32);
        return Reply {
            head,
            data: Some(buf),
            split: Vec::new(),
            errno: 0,
        };
    }
    if buf.is_empty() {
        pool.give(buf);
        return ok_reply(to);
    }
    let runs = if buf.len() >= HOLE_GRANULE {
        zero_runs(&buf, offset)
    } else {
        Vec::new()
    };
    let all_hole = runs.len() == 1 && runs[0] == (0..buf.len());
    if all_hole {
        let len = buf.len() as u32;
        pool.give(buf);
        let mut head = Vec::with_capacity(44);
        to.hole(&mut head, true, offset, len);
        return Reply::head(head);
    }
    if runs.is_empty() || df {
        let mut head = Vec::with_capacity(40);
        to.data(&mut head, true, offset, buf.len() as u32);
        return Reply {
            head,
            data: Some(buf),
            split: Vec::new(),
            errno: 0,
        };
    }
    // Data and holes, in order; the last chunk carries DONE.
    let mut parts: Vec<(bool, Range<usize>)> = Vec::with_capacity(2 * runs.len() + 1);
    let mut at = 0;
    for r in runs {
        if r.start > at {
            parts.push((false, at..r.start));
        }
        at = r.end;
        parts.push((true, r));
    }
    if at < buf.len() {
        parts.push((false, at..buf.len()));
    }
    let mut head = Vec::with_capacity(44 * parts.len());
    let mut split = Vec::with_capacity(parts.len());
    let last = parts.len() - 1;
    for (i, (hole, r)) in parts.into_iter().enumerate() {
        let (o, n) = (offset + r.start as u64, r.len() as u32);
        if hole {
            to.hole(&mut head, i == last, o, n);
        } else {
            to.data(&mut head, i == last, o, n);
            split.push((head.len(), r));
        }
    }
    Reply {
        head,
        data: Some(buf),
        split,
        errno: 0,
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
    to: ReplyTo,
    payload: AlignedBuf,
) -> Result<Reply, Command> {
    let Command::Read { offset, length, df } = cmd else {
        return Ok(execute_guarded(backend, pool, cmd, to, payload));
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
        Ok(r) => Ok(read_reply(pool, to, offset, df, buf, r.map(drop))),
        Err(_) => Ok(error_reply(to, NBD_EIO, "internal error")),
    }
}

/// [`execute`], with a panicking backend answered by EIO rather than a hanging request.
pub(super) fn execute_guarded(
    backend: &dyn Backend,
    pool: &BufPool,
    cmd: Command,
    to: ReplyTo,
    payload: AlignedBuf,
) -> Reply {
    let run = || execute(backend, pool, cmd, to, payload);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
        .unwrap_or_else(|_| error_reply(to, NBD_EIO, "internal error"))
}

/// Requests served on the session task: small, and never waiting for the disk (no FLUSH, no
/// FUA). Everything else goes to the blocking pool so a slow disk never stalls the reactor.
pub(super) fn runs_inline(backend: &dyn Backend, cmd: &Command) -> bool {
    const INLINE_MAX: u32 = 64 * 1024;
    match *cmd {
        Command::Read { length, .. } => length <= INLINE_MAX,
        Command::Write { length, fua, .. } => {
            length <= INLINE_MAX && !fua && !backend.writes_wait()
        }
        Command::Cache { .. } => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::transmission::Framing;

    #[test]
    fn zero_runs_are_aligned_granules() {
        let mut b = vec![0u8; 6 * 4096];
        b[4096] = 1; // granule 1 has data
        b[5 * 4096 + 4095] = 1; // so has the last, by its last byte only
        assert_eq!(zero_runs(&b, 0), [0..4096, 8192..5 * 4096]);
        // read at an unaligned offset: granules follow the export, not the buffer
        let runs = zero_runs(&b[100..], 100);
        assert_eq!((runs.len(), &runs[0]), (1, &(8092..5 * 4096 - 100)));
        assert!(zero_runs(&[1u8; 8192], 0).is_empty());
        assert!(zero_runs(&[0u8; 4095], 0).is_empty(), "no whole granule");
    }

    #[test]
    fn read_reply_chunks_in_order() {
        let pool = BufPool::default();
        let to = ReplyTo {
            framing: Framing::Structured,
            cookie: 1,
            offset: 0,
        };
        let mut b = AlignedBuf::zeroed(3 * 4096);
        b[4096..8192].fill(7);
        let r = read_reply(&pool, to, 0, false, b, Ok(()));
        let wire: Vec<u8> = r.pieces().concat();
        // hole (32 bytes), data header (28) + 4096 bytes, final hole (32)
        assert_eq!(wire.len(), 32 + 28 + 4096 + 32);
        assert_eq!(&wire[6..8], &NBD_REPLY_TYPE_OFFSET_HOLE.to_be_bytes());
        assert_eq!(&wire[4..6], &[0, 0], "not done");
        assert_eq!(
            &wire[32 + 6..32 + 8],
            &NBD_REPLY_TYPE_OFFSET_DATA.to_be_bytes()
        );
        assert_eq!(&wire[32 + 20..32 + 28], &4096u64.to_be_bytes());
        assert!(wire[60..60 + 4096].iter().all(|x| *x == 7));
        let last = &wire[60 + 4096..];
        assert_eq!(&last[4..6], &NBD_REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&last[20..28], &8192u64.to_be_bytes());
        assert_eq!(r.len(), wire.len());
        // simple framing: the data as read, zeros included
        let simple = ReplyTo {
            framing: Framing::Simple,
            ..to
        };
        let r = read_reply(&pool, simple, 0, false, AlignedBuf::zeroed(8192), Ok(()));
        assert_eq!(r.pieces().concat().len(), 16 + 8192);
    }
}
