//! Transmission on a plain socket (Unix, or TCP without TLS): one thread per connection reads
//! requests with blocking socket calls, nbdkit's model. The async session ([`super::session`])
//! still does the handshake, and all of transmission under TLS.
//!
//! ```text
//!  socket ─▶ connection thread: header ─▶ validate ─▶ payload ─┬▶ inline (small): reply queued ─┐
//!                                                              └▶ blocking pool: backend ──┐    │
//!  socket ◀──────────── one vectored write of (queued replies + this reply) ◀──────────────┘◀───┘
//!                                                              (queue sent when the thread is about to wait)
//! ```
//!
//! Why a thread and blocking reads rather than the reactor: a QD1 round trip on the async path
//! costs an `epoll_wait`, a wake of the worker and a `recv`; a blocked `recv` is woken by the
//! kernel straight into the thread that serves the request. A 1 MiB payload arrives in a loop of
//! blocking reads instead of a read/EAGAIN/epoll cycle per socket-buffer fill. (Measured in
//! `docs/benchmarks.md`: QD1 and sequential writes were the two jobs the async path lost to
//! `nbdkit file`.) The price is a thread per connection in transmission, parked in `recv`:
//! a few pages of stack each.
//!
//! Stopping (detach, shutdown): the session task marks the connection stopped and shuts the
//! socket's read side, which wakes the blocked read with EOF. Requests in flight still reply for
//! [`super::session::DRAIN_AFTER_STOP`]; then the write side is shut as well, which fails any
//! write blocked on a client that does not read, and the session ends.

use std::any::Any;
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};

use super::ServerConfig;
use super::backend::OpenExport;
use super::bufpool::BufPool;
use super::demote::Demotion;
use super::dispatch::{Completions, Deliver, dispatch};
use super::exec::{
    Reply, Tally, budget_kib, error_reply, execute_guarded, execute_inline, request_kib,
    runs_inline,
};
use super::session::{BoxStream, DRAIN_AFTER_STOP, Terms, invalid, wait_true};
use super::streaming;
use crate::aligned::AlignedBuf;
use crate::nbd::DecodeError;
use crate::nbd::transmission::{self as tx, Command, ExportLimits, ReplyTo};

/// A plain connected socket in blocking mode.
pub(super) enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Sock {
    fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
        })
    }

    /// Errors are ignored: the peer may have closed already (ENOTCONN), which is the point.
    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Sock::Unix(s) => s.shutdown(how),
            Sock::Tcp(s) => s.shutdown(how),
        };
    }

    fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Sock::Unix(s) => s.set_read_timeout(t),
            Sock::Tcp(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for &Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => (&*s).read(buf),
            Sock::Tcp(s) => (&*s).read(buf),
        }
    }
}

impl Sock {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Sock::Unix(s) => s.as_fd(),
            Sock::Tcp(s) => s.as_fd(),
        }
    }

    /// One `recv` that does not wait: `WouldBlock` when nothing is there.
    fn recv_nowait(&self, buf: &mut [u8]) -> io::Result<usize> {
        // std offers no per-call MSG_DONTWAIT, and toggling O_NONBLOCK would cost two more
        // syscalls per wait.
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call,
        // and the fd is owned by `self`, open for as long as `self` lives.
        let n = unsafe {
            libc::recv(
                self.fd().as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// How long the connection thread polls for the next request before it sleeps in `recv`.
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// The connection thread's read side: polls briefly, then blocks.
///
/// Why poll: on a virtual machine, waking a sleeping thread on an idle vCPU costs tens of
/// microseconds (the vCPU halted; the wake is an IPI through the hypervisor), more than a 4 KiB
/// request takes to serve. A QD1 client sends its next request a few tens of microseconds
/// after our reply; while we poll, that request is picked up at once and the client's `send`
/// wakes nobody. Bounded by [`SPIN`] per wait, so an idle connection costs one short poll; and
/// only when no request of this connection is on the blocking pool, whose threads need the CPU
/// more than we do (measured: polling during 1 MiB reads cost 10% of sequential read speed).
/// And not for the header that follows a large WRITE ([`spins_after`]): a client streaming
/// large payloads is limited by bandwidth, not by the wake-up, and each poll is a `recv`
/// syscall that finds nothing. Measured before this rule, 1 MiB writes on 2 connections:
/// ~150 `recv` calls per MiB, nearly all of them `EAGAIN` polls, on CPUs the client and the
/// other connection needed (`docs/benchmarks.md`, multi-connection).
struct SpinRead {
    sock: Sock,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    /// Set by the connection thread: whether the next wait may poll (see above).
    spin: bool,
}

/// Requests that move at most this much data are "small": the header after one may be
/// polled for.
const SPIN_AFTER_MAX: u32 = 64 * 1024;

/// Whether the wait for the request after `cmd` may poll ([`SpinRead`]). After a READ of any
/// size it may, as before this rule: with 1 MiB READs on 4 connections, not polling cost
/// 10 % more CPU per byte in two A/B runs (the wake-ups cost more than the polls).
fn spins_after(cmd: &Command) -> bool {
    match *cmd {
        Command::Write { length, .. } => length <= SPIN_AFTER_MAX,
        _ => true,
    }
}

/// Whether `cmd` moves more than a small request's data (a connection sending these counts
/// as streaming, `streaming.rs`).
fn streams(cmd: &Command) -> bool {
    match *cmd {
        Command::Read { length, .. } | Command::Write { length, .. } => length > SPIN_AFTER_MAX,
        _ => false,
    }
}

impl Read for SpinRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.spin || self.in_flight.available_permits() < self.max_in_flight {
            return (&self.sock).read(buf);
        }
        let start = std::time::Instant::now();
        loop {
            match self.sock.recv_nowait(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
            if start.elapsed() >= SPIN {
                return (&self.sock).read(buf);
            }
            std::hint::spin_loop();
        }
    }
}

impl Write for &Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => (&*s).write(buf),
            Sock::Tcp(s) => (&*s).write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => (&*s).write_vectored(bufs),
            Sock::Tcp(s) => (&*s).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Replies queued at most before the queue is sent regardless.
const QUEUE_MAX: usize = 64 * 1024;

/// What the connection thread and the pool threads serving its requests share.
struct Conn {
    /// Writes and shutdowns; the connection thread reads through its own handle.
    sock: Sock,
    /// Replies of inline requests not sent yet. Its lock is also the write lock: every send
    /// takes the queue along, so replies never interleave and none waits behind a later one.
    queued: Mutex<Vec<u8>>,
    pool: Arc<BufPool>,
    /// `true` once the connection takes no more requests (detach, shutdown, broken peer).
    stopped: watch::Sender<bool>,
}

impl Conn {
    fn stopping(&self) -> bool {
        *self.stopped.borrow()
    }

    /// Takes no more requests: the connection thread's read returns EOF, its waits end.
    fn stop(&self) {
        self.stopped.send_replace(true);
        self.sock.shutdown(Shutdown::Read);
    }

    /// The peer is gone or will not read: nothing more can be answered.
    fn abandon(&self) {
        self.stopped.send_replace(true);
        self.sock.shutdown(Shutdown::Both);
    }

    /// Sends the queue, then `r`, in one vectored write. A failed write abandons the connection.
    fn send(&self, r: Option<Reply>) -> io::Result<()> {
        let mut q = self.queued.lock().unwrap_or_else(PoisonError::into_inner);
        let sent = match &r {
            Some(r) if !r.split.is_empty() => {
                // A READ in data and hole chunks.
                let mut v = vec![IoSlice::new(&q)];
                v.extend(r.pieces().into_iter().map(IoSlice::new));
                write_all_vectored(&self.sock, &mut v)
            }
            _ => {
                let (head, data) = match &r {
                    Some(r) => (&r.head[..], r.data.as_deref().unwrap_or_default()),
                    None => (&[][..], &[][..]),
                };
                write_all_vectored(
                    &self.sock,
                    &mut [IoSlice::new(&q), IoSlice::new(head), IoSlice::new(data)],
                )
            }
        };
        q.clear();
        drop(q);
        if let Some(Reply { data: Some(d), .. }) = r {
            self.pool.give(d);
        }
        if sent.is_err() {
            self.abandon();
        }
        sent
    }

    /// Queues a small reply for the next send; sends at once when the queue would outgrow
    /// [`QUEUE_MAX`].
    fn queue(&self, r: Reply) -> io::Result<()> {
        let mut q = self.queued.lock().unwrap_or_else(PoisonError::into_inner);
        if q.len() + r.len() > QUEUE_MAX {
            drop(q);
            return self.send(Some(r));
        }
        if r.split.is_empty() {
            q.extend_from_slice(&r.head);
            if let Some(d) = &r.data {
                q.extend_from_slice(d);
            }
        } else {
            for p in r.pieces() {
                q.extend_from_slice(p);
            }
        }
        drop(q);
        if let Some(d) = r.data {
            self.pool.give(d);
        }
        Ok(())
    }

    /// Sends the queue, if anything is in it.
    fn flush(&self) -> io::Result<()> {
        let empty = self
            .queued
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty();
        if empty { Ok(()) } else { self.send(None) }
    }
}

/// `Write::write_all_vectored` is unstable; this is it, for a socket.
fn write_all_vectored(mut w: &Sock, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The plain socket under `stream`, in blocking mode; `Err(stream)` when it is not a bare
/// Unix or TCP socket (TLS).
pub(super) fn into_plain(stream: BoxStream) -> Result<io::Result<Sock>, BoxStream> {
    fn blocking<S: IntoStd + 'static>(s: Box<dyn Any + Send>) -> io::Result<S::Std> {
        let s = s.downcast::<S>().expect("type checked by the caller");
        s.into_blocking()
    }
    let any = stream.as_any();
    if any.is::<tokio::net::UnixStream>() {
        Ok(blocking::<tokio::net::UnixStream>(stream.into_any()).map(Sock::Unix))
    } else if any.is::<tokio::net::TcpStream>() {
        Ok(blocking::<tokio::net::TcpStream>(stream.into_any()).map(Sock::Tcp))
    } else {
        Err(stream)
    }
}

/// A tokio socket taken off the reactor, as its std socket in blocking mode.
trait IntoStd {
    type Std;
    fn into_blocking(self: Box<Self>) -> io::Result<Self::Std>;
}

impl IntoStd for tokio::net::UnixStream {
    type Std = UnixStream;
    fn into_blocking(self: Box<Self>) -> io::Result<UnixStream> {
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        Ok(s)
    }
}

impl IntoStd for tokio::net::TcpStream {
    type Std = TcpStream;
    fn into_blocking(self: Box<Self>) -> io::Result<TcpStream> {
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        Ok(s)
    }
}

/// Serves transmission on `sock` until the client disconnects, the export is detached or the
/// server shuts down.
pub(super) async fn transmission(
    sock: Sock,
    export: OpenExport,
    terms: Terms,
    cfg: Arc<ServerConfig>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let rd = sock.try_clone()?;
    // SO_RCVTIMEO: a read that waits this long fails with EAGAIN (the idle timeout).
    rd.set_read_timeout(cfg.idle_timeout)?;
    let conn = Arc::new(Conn {
        sock,
        queued: Mutex::new(Vec::with_capacity(QUEUE_MAX)),
        pool: Arc::new(BufPool::default()),
        stopped: watch::Sender::new(false),
    });
    let mut detached = export.detached.clone();
    let (done_tx, mut done_rx) = oneshot::channel();
    let (c, rt) = (conn.clone(), Handle::current());
    std::thread::Builder::new()
        .name("nbd-conn".into())
        .spawn(move || {
            let r = serve_requests(&c, rd, export, terms, &cfg, &rt);
            let _ = done_tx.send(r);
        })?;
    let mut stopped = conn.stopped.subscribe();
    tokio::select! {
        r = &mut done_rx => return r.unwrap_or(Ok(())),
        _ = wait_true(&mut detached) => {}
        _ = wait_true(&mut shutdown) => {}
        _ = wait_true(&mut stopped) => {}
    }
    conn.stop();
    match tokio::time::timeout(DRAIN_AFTER_STOP, &mut done_rx).await {
        Ok(r) => r.unwrap_or(Ok(())),
        Err(_) => {
            // Replies not taken after detach/shutdown: writes blocked on this client fail now,
            // and the thread ends on its own once its requests have.
            tracing::debug!("replies not taken after detach/shutdown; closing");
            conn.abandon();
            Ok(())
        }
    }
}

/// Large writes of one connection encrypted and stored at once, at most: one less than the
/// CPUs this process may use, at least one. While they run, the connection thread is busy too,
/// copying the next payload off the socket; more writers than the remaining CPUs only preempt
/// each other and the client. Measured on 2 vCPUs, 1 MiB writes at QD8: 2516 MiB/s with all
/// eight on the pool at once, 2763 with two, 3275 with one (nbdkit file: 2548). Reads are not
/// capped: their connection thread is idle, and the same cap cost them 20 %. FUA writes and
/// everything that waits for the device rather than a CPU are not capped either.
fn write_parallelism() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get().saturating_sub(1))
            .max(1)
    })
}

/// Large reads and writes running their CPU part (copy, cipher, copy) at once in the whole
/// process, across connections: as many as the CPUs this process may use. Without it, nbdcopy's
/// 4 connections × 64 requests in flight put ~250 reads on the blocking pool at once: threads
/// preempting each other on 2 vCPUs (scheduling and wake-ups were 13 % of the daemon's time),
/// and buffers far beyond what each connection's [`BufPool`] parks, so most reads got a freshly
/// allocated, zeroed, page-faulted buffer (about 7 %). A request holds its slot while the
/// backend runs and gives it back before its reply is sent: a client that does not read its
/// replies holds no slot that other connections need. Measured with 128 KiB pieces in the
/// volume and serving on the connection thread when no slot is free (issue 16, 2 GiB in
/// /dev/shm, 2 vCPUs at load 9–15, six rounds): server CPU per GiB −16 % on `nbdcopy URI
/// null:`, −21 % on 1 MiB reads with 4 connections, unchanged on writes with 4 connections
/// and `nbdcopy IMAGE URI` (docs/benchmarks.md).
fn cpu_slots() -> &'static Arc<Semaphore> {
    static S: std::sync::OnceLock<Arc<Semaphore>> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        Arc::new(Semaphore::new(n))
    })
}

/// The connection thread: reads and dispatches requests until EOF or stop, then waits for the
/// requests still in flight and sends what is queued.
fn serve_requests(
    conn: &Arc<Conn>,
    rd: Sock,
    export: OpenExport,
    terms: Terms,
    cfg: &ServerConfig,
    rt: &Handle,
) -> io::Result<()> {
    let max_in_flight = cfg.max_in_flight.max(1);
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    let mut rd = BufReader::with_capacity(
        64 * 1024,
        SpinRead {
            sock: rd,
            in_flight: in_flight.clone(),
            max_in_flight,
            spin: true,
        },
    );
    let backend = export.backend.clone();
    // This connection's metrics shard, found once.
    let counted = crate::metrics::VolumeStats::connect_opt(export.stats.as_ref());
    let stats = counted.stats().clone();
    let lim = ExportLimits {
        size: backend.size(),
        read_only: export.read_only,
        framing: terms.framing,
        meta_allocation: terms.meta_allocation,
        max_payload: terms.max_payload,
    };
    let header_len = terms.framing.request_header_len();
    // Payload bytes buffered per connection (requests being read, replies not yet sent).
    let budget_kib = budget_kib(cfg.max_buffer_bytes);
    let buffered = Arc::new(Semaphore::new(budget_kib as usize));
    let write_workers = Arc::new(Semaphore::new(write_parallelism()));
    let completions = Completions::new(rt.clone());
    let mut stop = conn.stopped.subscribe();
    let (qos, mut qos_stop) = (export.qos.clone(), conn.stopped.subscribe());
    let mut demotion = Demotion::new();
    // A permit, or `None` once the connection stops; the queue goes out before any real wait.
    let mut acquire = |sem: &Arc<Semaphore>, n: u32| -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = sem.clone().try_acquire_many_owned(n) {
            return Some(p);
        }
        conn.flush().ok()?;
        rt.block_on(async {
            tokio::select! {
                biased;
                p = sem.clone().acquire_many_owned(n) => p.ok(),
                _ = wait_true(&mut stop) => None,
            }
        })
    };
    let mut spin_next = true;
    let mut streamer = streaming::Streamer::default();
    let result = loop {
        if conn.stopping() {
            break Ok(());
        }
        // About to wait for the client: what we owe it goes out first, and this connection
        // stops counting as streaming until its next large request.
        if rd.buffer().len() < header_len {
            streamer.set(false);
            if let Err(e) = conn.flush() {
                break Err(e);
            }
        }
        // Polls for the header only after a small request; never for a payload.
        rd.get_mut().spin = spin_next;
        let mut hdr_buf = [0u8; tx::EXTENDED_REQUEST_HEADER_LEN];
        let hdr = &mut hdr_buf[..header_len];
        match rd.read_exact(hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e)
                if cfg.idle_timeout.is_some()
                    && matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
            {
                tracing::debug!("idle timeout");
                break Ok(());
            }
            Err(e) => break Err(e),
        }
        let arrived = std::time::Instant::now();
        // A request already buffered when the stop came is not served either.
        if conn.stopping() {
            break Ok(());
        }
        let h = match tx::parse_request(hdr, terms.framing) {
            Ok(h) => h,
            // Bad magic: the stream is out of sync; nothing sensible can follow.
            Err(e) => break Err(invalid(e)),
        };
        let to = ReplyTo {
            framing: terms.framing,
            cookie: h.cookie,
            offset: h.offset,
        };
        rd.get_mut().spin = false;
        let cmd = match tx::validate(&h, &lim) {
            Ok(c) => {
                spin_next = spins_after(&c);
                streamer.set(streams(&c));
                c
            }
            Err(rej) => {
                if rej.skip_payload > tx::MAX_SKIP {
                    // A payload this large is not worth reading to stay in sync.
                    break Err(invalid(DecodeError::Invalid("refused payload too large")));
                }
                if rej.skip_payload > 0 {
                    // Skip the payload we refuse, to stay in sync, without buffering it.
                    let skip = rej.skip_payload;
                    match io::copy(&mut (&mut rd).take(skip), &mut io::sink()) {
                        Ok(n) if n == skip => {}
                        Ok(_) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                }
                stats.refused(rej.errno);
                let reply = error_reply(to, rej.errno, "request rejected");
                if let Err(e) = conn.queue(reply) {
                    break Err(e);
                }
                continue;
            }
        };
        if cmd == Command::Disconnect {
            break Ok(());
        }
        // Over the volume's QoS limit: wait here, replies owed sent first (server/qos.rs).
        if let Some(q) = &qos {
            if let Some(ticket) = q.admit(&cmd) {
                if let Err(e) = conn.flush() {
                    break Err(e);
                }
                // Throttled: other volumes' requests go first (server/demote.rs).
                demotion.waited();
                if !rt.block_on(q.wait_unless(ticket, &mut qos_stop)) {
                    break Ok(());
                }
            } else {
                demotion.went();
            }
        }
        let tally = Tally::begin(&stats, &cmd, arrived);
        let budget = match request_kib(&cmd, budget_kib) {
            0 => None,
            kib => match acquire(&buffered, kib) {
                Some(p) => Some(p),
                None => break Ok(()),
            },
        };
        let payload = if let Command::Write { length, .. } = cmd {
            if rd.buffer().len() < length as usize
                && let Err(e) = conn.flush()
            {
                break Err(e);
            }
            let mut p = conn.pool.take(length as usize);
            match rd.read_exact(&mut p) {
                Ok(()) => p,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => break Err(e),
            }
        } else {
            AlignedBuf::default()
        };
        // Set when a small READ was found to wait for the device: it is not tried again.
        let mut cold = false;
        let (cmd, payload) = if runs_inline(&*backend, &cmd) {
            match execute_inline(&*backend, &conn.pool, cmd, to, payload) {
                Ok(reply) => {
                    drop(budget);
                    let errno = reply.errno;
                    // A client that stops reading blocks this send (once the queue is full),
                    // and so stops us reading more requests: that is the backpressure.
                    if let Err(e) = conn.queue(reply) {
                        break Err(e);
                    }
                    tally.end(&stats, errno);
                    continue;
                }
                // A READ that would wait for the device: to the pool like a large one.
                Err(cmd) => {
                    cold = true;
                    (cmd, AlignedBuf::default())
                }
            }
        } else {
            (cmd, payload)
        };
        // A large READ, or WRITE without FUA, on a store that does not wait for a device: work
        // for a CPU. A WRITE first waits for one of its connection's write slots (see
        // [`write_parallelism`]). Then it goes to the pool if one of the process's CPU slots is
        // free: this thread goes on reading requests meanwhile. When none is, other
        // connections keep every CPU busy, and this thread would only wait; it serves the
        // request itself, which saves the hand-off to a pool thread and its wake-up (nbdcopy's
        // 4 connections: most requests).
        let cpu_bound = !cold
            && !backend.writes_wait()
            && matches!(
                cmd,
                Command::Read { .. } | Command::Write { fua: false, .. }
            );
        let mut slots = None;
        let (cmd, payload) = if cpu_bound {
            // A WRITE while twice as many connections stream as there are CPUs: this thread
            // stores it itself (no hand-off, no wait for a write slot; see `streaming.rs`).
            let mut crowded = matches!(cmd, Command::Write { .. }) && streaming::crowded();
            let writer = match cmd {
                // Its write slots busy while other connections stream too: this thread stores
                // the WRITE itself rather than wait for a slot (`streaming::shared`).
                Command::Write { .. } if !crowded && streaming::shared() => {
                    match write_workers.clone().try_acquire_owned() {
                        Ok(p) => Some(p),
                        Err(_) => {
                            crowded = true;
                            None
                        }
                    }
                }
                Command::Write { .. } if !crowded => match acquire(&write_workers, 1) {
                    Some(p) => Some(p),
                    None => break Ok(()),
                },
                _ => None,
            };
            // A throttled connection serves its CPU work itself, at its lowered priority:
            // a pool thread would run it at full priority, beside the volumes that are not
            // throttled, and on every CPU at once (server/demote.rs).
            let slot = if crowded || demotion.is_demoted() {
                None
            } else {
                cpu_slots().clone().try_acquire_owned().ok()
            };
            match slot {
                Some(s) => {
                    slots = Some((writer, s));
                    (cmd, payload)
                }
                None => {
                    drop(writer);
                    let served = match cmd {
                        Command::Read { .. } => {
                            execute_inline(&*backend, &conn.pool, cmd, to, payload)
                        }
                        _ => Ok(execute_guarded(&*backend, &conn.pool, cmd, to, payload)),
                    };
                    match served {
                        Ok(reply) => {
                            drop(budget);
                            let errno = reply.errno;
                            if let Err(e) = conn.queue(reply) {
                                break Err(e);
                            }
                            tally.end(&stats, errno);
                            continue;
                        }
                        // A READ that would wait for the disk: to the pool, without a slot.
                        Err(cmd) => (cmd, AlignedBuf::default()),
                    }
                }
            }
        } else {
            (cmd, payload)
        };
        let Some(permit) = acquire(&in_flight, 1) else {
            break Ok(());
        };
        let (cpu, slot) = match slots {
            Some((w, s)) => (w, Some(s)),
            None => (None, None),
        };
        let (c, stats) = (conn.clone(), stats.clone());
        // On a blocking-pool thread, whether the pool executed the request or librbd completed
        // it (server/dispatch.rs): the reply goes out from there.
        let deliver: Deliver = Box::new(move |reply: Reply| {
            let errno = reply.errno;
            // A failed send abandons the connection, which stops the connection thread.
            if c.send(Some(reply)).is_ok() {
                tally.end(&stats, errno);
            }
            drop((budget, permit, cpu));
        });
        let Some(slot) = slot else {
            // Not CPU work for this process (device or network I/O, FUA, FLUSH, ...).
            dispatch(
                rt,
                &completions,
                &backend,
                &conn.pool,
                cmd,
                to,
                payload,
                deliver,
            );
            continue;
        };
        let (backend, pool) = (backend.clone(), conn.pool.clone());
        rt.spawn_blocking(move || {
            let reply = if matches!(cmd, Command::Read { .. }) {
                // A read keeps its slot only while its data is in memory: one that would wait
                // for the device gives it back first, so cold reads from a disk stay as many
                // in flight as the client sends.
                let r = execute_inline(&*backend, &pool, cmd, to, payload);
                drop(slot);
                r.unwrap_or_else(|cmd| {
                    execute_guarded(&*backend, &pool, cmd, to, AlignedBuf::default())
                })
            } else {
                let r = execute_guarded(&*backend, &pool, cmd, to, payload);
                // The CPU part is done: the slot is free before the reply waits for the client.
                drop(slot);
                r
            };
            deliver(reply);
        });
    };
    // Requests in flight finish (their replies still go out), then the queue, then close.
    let _ = rt.block_on(in_flight.acquire_many(max_in_flight as u32));
    let flushed = conn.flush();
    conn.sock.shutdown(Shutdown::Write);
    drop(export);
    result.and(flushed)
}
