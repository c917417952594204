//! Requests that are not served inline: one way for both transmission paths (threads for
//! plain sockets, the async session for TLS) and every backend. [`dispatch`] hands a request
//! to the blocking pool; a backend that can start device I/O without a thread waiting (a
//! volume on RBD: librbd's aio, `volume/rbd/aio.rs`) gets READs and non-FUA WRITEs started
//! that way instead, and the blocking pool runs only their completion.
//!
//! ```text
//!  connection ─┬▶ READ:  backend.start_read (no wait) ·····▶ librbd ─┐ callback: only queues ─┐
//!  thread/task │▶ WRITE: ≤ 64 KiB: backend.start_write (encrypts, no wait) ─▶ librbd ─┘        │
//!              │         larger: blocking pool: start_write ─▶ librbd ─┘                        │
//!              └▶ other (FLUSH, TRIM, ...) or refused by the backend: blocking pool: execute ──┐│
//!  blocking pool: finish (decrypt READ data; fence check) ─▶ reply ─▶ `deliver` ◀──────────────┘┘
//! ```
//!
//! `deliver` is the transmission path's own, the same for a request the pool executed and for
//! one librbd completed: the threaded path writes the reply on the pool thread under the
//! connection's write lock, the TLS path hands it to its writer task. So a request waits for
//! the device in librbd (not on a parked thread), its completion runs on the blocking pool,
//! and the reply is written exactly where a pool-executed request's reply is written.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::runtime::Handle;

use super::backend::Backend;
use super::bufpool::BufPool;
use super::exec::{Reply, error_reply, execute_guarded, nbd_errno, ok_reply, read_reply};
use crate::aligned::AlignedBuf;
use crate::nbd::consts::NBD_EIO;
use crate::nbd::transmission::{Command, ReplyTo};
use crate::volume::store::AioDone;

/// What a transmission path does with a reply: send it and release the request's permits.
pub(super) type Deliver = Box<dyn FnOnce(Reply) + Send>;

/// WRITEs at most this large are encrypted and started on the connection's thread (about
/// 16 µs of XTS at most); larger ones on a pool thread, so that several are encrypted at once.
/// Starting 1 MiB writes inline too was measured (docs/benchmarks.md, "RBD 1 MiB writes:
/// where they waited"): 10–20 % less daemon CPU per request but 20–30 % less throughput on
/// the shared 2 vCPUs, as the connection thread stops reading the next payload meanwhile.
const START_INLINE_MAX: u32 = 64 * 1024;

/// A connection's completions of started requests, run on the blocking pool by at most
/// [`drainers`] threads at once, each taking the next completion queued without a wake-up.
///
/// Why not one `spawn_blocking` per completion: at QD32 librbd calls back in bursts, and
/// waking a pool thread per request made context switches most of the daemon's CPU (perf,
/// docs/benchmarks.md). Per connection, so a client that does not read its replies blocks only
/// its own drainers (in the reply write), as it blocks only its own pool threads otherwise.
pub(super) struct Completions {
    rt: Handle,
    queue: Mutex<VecDeque<(Job, AlignedBuf, io::Result<()>)>>,
    draining: AtomicUsize,
}

/// Drainers of one connection at most: the CPUs (a 1 MiB READ's decryption is the longest
/// completion; more drainers than CPUs would only preempt each other).
fn drainers() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

impl Completions {
    pub(super) fn new(rt: Handle) -> Arc<Completions> {
        Arc::new(Completions {
            rt,
            queue: Mutex::new(VecDeque::new()),
            draining: AtomicUsize::new(0),
        })
    }

    /// Queues a completion (from the device's thread: a push, and a pool task only when
    /// fewer than [`drainers`] run).
    fn push(self: &Arc<Self>, item: (Job, AlignedBuf, io::Result<()>)) {
        self.lock().push_back(item);
        if self.claim() {
            let me = self.clone();
            self.rt.spawn_blocking(move || me.drain());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Job, AlignedBuf, io::Result<()>)>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn claim(&self) -> bool {
        self.draining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < drainers()).then_some(n + 1)
            })
            .is_ok()
    }

    /// On the blocking pool: completes queued requests until none is left.
    fn drain(&self) {
        loop {
            loop {
                let next = self.lock().pop_front();
                let Some((job, buf, r)) = next else { break };
                job.complete(buf, r);
            }
            self.draining.fetch_sub(1, Ordering::AcqRel);
            // A push that saw this drainer still counted started none: look again.
            if self.lock().is_empty() || !self.claim() {
                return;
            }
        }
    }
}

/// Runs `cmd` off the connection's thread (see the module doc); `deliver` gets its reply on a
/// blocking-pool thread.
#[allow(clippy::too_many_arguments, reason = "one request's context")]
pub(super) fn dispatch(
    rt: &Handle,
    completions: &Arc<Completions>,
    backend: &Arc<dyn Backend>,
    pool: &Arc<BufPool>,
    cmd: Command,
    to: ReplyTo,
    payload: AlignedBuf,
    deliver: Deliver,
) {
    let job = Job {
        completions: completions.clone(),
        backend: backend.clone(),
        pool: pool.clone(),
        cmd,
        to,
        deliver,
    };
    match cmd {
        Command::Read { offset, length, .. } if length > 0 => {
            let buf = pool.take(length as usize);
            let done = job.into_done();
            if let Err((buf, done)) = backend.start_read(offset, buf, done) {
                done(buf, Err(not_started()));
            }
        }
        Command::Write {
            offset,
            length,
            fua: false,
        } if length > 0 => {
            if length <= START_INLINE_MAX {
                job.start_write(offset, payload);
            } else {
                rt.spawn_blocking(move || job.start_write(offset, payload));
            }
        }
        _ => {
            rt.spawn_blocking(move || {
                let Job {
                    backend,
                    pool,
                    cmd,
                    to,
                    deliver,
                    ..
                } = job;
                deliver(execute_guarded(&*backend, &pool, cmd, to, payload));
            });
        }
    }
}

/// Marks a request its backend did not start: [`dispatch`]'s own, never a device's error.
#[derive(Debug)]
struct NotStarted;

impl std::fmt::Display for NotStarted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not started")
    }
}

impl std::error::Error for NotStarted {}

fn not_started() -> io::Error {
    io::Error::other(NotStarted)
}

fn is_not_started(r: &io::Result<()>) -> bool {
    matches!(r, Err(e) if e.get_ref().is_some_and(|e| e.is::<NotStarted>()))
}

/// A request between its start and its reply.
struct Job {
    completions: Arc<Completions>,
    backend: Arc<dyn Backend>,
    pool: Arc<BufPool>,
    cmd: Command,
    to: ReplyTo,
    deliver: Deliver,
}

impl Job {
    /// The device's callback: on its thread, only queues [`complete`](Self::complete) for the
    /// connection's drainers on the blocking pool ([`Completions::push`]). A request the
    /// backend declined (called on the connection's thread) is executed on the blocking pool
    /// like any other, not by the drainers: it may wait for a device (a `cache none` file
    /// volume's READs at QD32), and the drainers of a connection are few.
    fn into_done(self) -> AioDone {
        Box::new(move |buf, r| {
            if is_not_started(&r) {
                let rt = self.completions.rt.clone();
                rt.spawn_blocking(move || self.complete(buf, r));
            } else {
                let c = self.completions.clone();
                c.push((self, buf, r));
            }
        })
    }

    fn start_write(self, offset: u64, payload: AlignedBuf) {
        let backend = self.backend.clone();
        let done = self.into_done();
        if let Err((payload, done)) = backend.start_write(offset, payload, done) {
            done(payload, Err(not_started()));
        }
    }

    /// On the blocking pool: finishes a started request, or executes one its backend did not
    /// start, and delivers the reply.
    fn complete(self, buf: AlignedBuf, r: io::Result<()>) {
        let Job {
            backend,
            pool,
            cmd,
            to,
            deliver,
            ..
        } = self;
        if is_not_started(&r) {
            let payload = match cmd {
                Command::Write { .. } => buf,
                _ => {
                    pool.give(buf);
                    AlignedBuf::default()
                }
            };
            return deliver(execute_guarded(&*backend, &pool, cmd, to, payload));
        }
        let finish = || match cmd {
            Command::Read { offset, df, .. } => {
                let mut buf = buf;
                let r = backend.finish_read(offset, &mut buf, r);
                read_reply(&pool, to, offset, df, buf, r)
            }
            _ => {
                pool.give(buf);
                match backend.finish_write(r) {
                    Ok(()) => ok_reply(to),
                    Err(e) => error_reply(to, nbd_errno(&e), &e.to_string()),
                }
            }
        };
        let reply = std::panic::catch_unwind(std::panic::AssertUnwindSafe(finish))
            .unwrap_or_else(|_| error_reply(to, NBD_EIO, "internal error"));
        deliver(reply);
    }
}
