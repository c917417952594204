//! Per-export QoS: two token buckets (I/O operations per second, bytes per second) shared by
//! every connection of an export. A request over the limit waits in its connection's reader
//! (never fails) until the buckets have paid for it; the reader reads nothing more from that
//! client meanwhile, so the wait is also TCP/socket backpressure.
//!
//! ```text
//!  reader: header ─▶ validate ─▶ Qos::admit ─┬▶ None (unlimited, or tokens left) ─▶ payload ─▶ …
//!                                            └▶ Ticket ─▶ Qos::wait (sleep until paid; ends on
//!                                               detach/shutdown; re-priced when limits change)
//! ```
//!
//! Cost when unlimited: one relaxed load of a flag. When limited: a short mutex section
//! (refill, take, compute the wait) and a clock read per request; nobody holds the mutex
//! while waiting.
//!
//! The buckets run on debt: a request takes its cost at once and, if that leaves a bucket
//! below zero, waits until the refill has paid the debt back. Waiters are thereby served in
//! the order they arrived, and over any interval T at most `rate * T + burst` is admitted.
//! Burst: [`BURST`] worth of the rate (at least one operation / one byte), a full bucket at
//! attach and after every change of the limits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::nbd::transmission::Command;

/// How much of a second's worth of the rate may be taken at once after a quiet spell.
/// Small, so that a limit holds over seconds (a 1 s burst would let a 10 s run through at
/// 1.1x its limit), yet enough to absorb scheduling jitter of the client and the server.
pub const BURST: Duration = Duration::from_millis(100);

/// A volume's limits; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QosLimits {
    /// Requests per second (READ, WRITE, TRIM, WRITE_ZEROES count one each).
    #[serde(default)]
    pub iops: u64,
    /// Bytes per second (READ and WRITE data, WRITE_ZEROES without a hole).
    #[serde(default)]
    pub bandwidth: u64,
}

impl QosLimits {
    pub fn is_unlimited(&self) -> bool {
        self.iops == 0 && self.bandwidth == 0
    }
}

/// What `cmd` costs: (operations, bytes). FLUSH, CACHE and BLOCK_STATUS are free: they move
/// no data the limit is about, and a throttled FLUSH would only delay durability.
pub fn cost(cmd: &Command) -> (u64, u64) {
    match *cmd {
        Command::Read { length, .. } | Command::Write { length, .. } => (1, u64::from(length)),
        Command::WriteZeroes {
            length,
            no_hole: true,
            ..
        } => (1, length),
        Command::WriteZeroes { .. } | Command::Trim { .. } => (1, 0),
        _ => (0, 0),
    }
}

struct Bucket {
    /// Tokens per second; 0 = unlimited.
    rate: f64,
    burst: f64,
    /// Below zero: debt the next requests wait for.
    tokens: f64,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        let rate = rate as f64;
        let burst = (rate * BURST.as_secs_f64()).max(1.0);
        Bucket {
            rate,
            burst,
            tokens: burst,
        }
    }

    /// Refills for `dt` seconds and takes `cost`; the seconds until the debt is paid.
    fn take(&mut self, dt: f64, cost: u64) -> f64 {
        if self.rate == 0.0 {
            return 0.0;
        }
        self.tokens = (self.tokens + self.rate * dt).min(self.burst) - cost as f64;
        if self.tokens >= 0.0 {
            0.0
        } else {
            -self.tokens / self.rate
        }
    }
}

struct State {
    limits: QosLimits,
    iops: Bucket,
    bytes: Bucket,
    last: Instant,
    /// Bumped by every [`Qos::set`]: tickets of an older generation are re-priced.
    generation: u64,
}

impl State {
    fn new(limits: QosLimits, generation: u64) -> State {
        State {
            limits,
            iops: Bucket::new(limits.iops),
            bytes: Bucket::new(limits.bandwidth),
            last: Instant::now(),
            generation,
        }
    }
}

/// The limits of one export and their buckets.
pub struct Qos {
    /// Mirrors `!state.limits.is_unlimited()`: the fast path reads only this.
    limited: AtomicBool,
    state: Mutex<State>,
    /// Wakes waiters when the limits change.
    changed: Notify,
}

/// A request admitted on credit: it may go at `until`.
#[must_use = "a ticket must be waited for"]
pub struct Ticket {
    until: Instant,
    generation: u64,
    ops: u64,
    bytes: u64,
}

impl Qos {
    pub fn new(limits: QosLimits) -> Qos {
        Qos {
            limited: AtomicBool::new(!limits.is_unlimited()),
            state: Mutex::new(State::new(limits, 0)),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn limits(&self) -> QosLimits {
        self.lock().limits
    }

    /// New limits, in force at once: the buckets start full, and requests waiting under the
    /// old limits are priced again under the new ones.
    pub fn set(&self, limits: QosLimits) {
        {
            let mut s = self.lock();
            let generation = s.generation.wrapping_add(1);
            *s = State::new(limits, generation);
            self.limited
                .store(!limits.is_unlimited(), Ordering::Relaxed);
        }
        self.changed.notify_waiters();
    }

    /// `None`: `cmd` may run now. `Some`: it must [`wait`](Self::wait) for the ticket first.
    #[inline]
    pub fn admit(&self, cmd: &Command) -> Option<Ticket> {
        // A stale `false` lets one request through unthrottled around a `set`; nothing worse.
        if !self.limited.load(Ordering::Relaxed) {
            return None;
        }
        let (ops, bytes) = cost(cmd);
        if ops == 0 && bytes == 0 {
            return None;
        }
        self.reserve(ops, bytes)
    }

    fn reserve(&self, ops: u64, bytes: u64) -> Option<Ticket> {
        let mut s = self.lock();
        if s.limits.is_unlimited() {
            return None;
        }
        let now = Instant::now();
        let dt = now.saturating_duration_since(s.last).as_secs_f64();
        s.last = now;
        let wait = s.iops.take(dt, ops).max(s.bytes.take(dt, bytes));
        if wait <= 0.0 {
            return None;
        }
        // Absurd limits (1 byte/s under many 32 MiB requests) could owe millennia: a year
        // stands for "never", and keeps the deadline inside what tokio's timer takes.
        const NEVER: f64 = 365.0 * 86_400.0;
        let until = now + Duration::from_secs_f64(wait.min(NEVER));
        Some(Ticket {
            until,
            generation: s.generation,
            ops,
            bytes,
        })
    }

    /// Waits until the ticket's time; when the limits change meanwhile, the request is priced
    /// again under the new ones (and may go at once). Cancel-safe: dropping it (detach,
    /// shutdown) leaves the buckets as they are.
    pub async fn wait(&self, mut t: Ticket) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the generation is read: a `set` after that read wakes us.
            changed.as_mut().enable();
            if self.lock().generation != t.generation {
                match self.reserve(t.ops, t.bytes) {
                    None => return,
                    Some(n) => t = n,
                }
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(t.until.into()) => return,
                _ = changed => {}
            }
        }
    }

    /// [`wait`](Self::wait), or `false` as soon as `stop` holds `true` (the connection stops).
    pub(super) async fn wait_unless(&self, t: Ticket, stop: &mut watch::Receiver<bool>) -> bool {
        tokio::select! {
            biased;
            _ = super::session::wait_true(stop) => false,
            _ = self.wait(t) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(len: u32) -> Command {
        Command::Read {
            offset: 0,
            length: len,
            df: false,
        }
    }

    #[test]
    fn unlimited_never_waits() {
        let q = Qos::new(QosLimits::default());
        assert!((0..10_000).all(|_| q.admit(&read(1 << 20)).is_none()));
    }

    #[test]
    fn the_burst_goes_at_once_then_requests_wait_their_share() {
        // 1000 IOPS: a burst of 100, then each further request 1 ms later than the one before.
        let q = Qos::new(QosLimits {
            iops: 1000,
            bandwidth: 0,
        });
        let admitted = (0..100).filter(|_| q.admit(&read(4096)).is_none()).count();
        assert!(admitted >= 99, "burst: {admitted}");
        let t1 = q.admit(&read(4096)).expect("over the burst");
        let t2 = q.admit(&read(4096)).expect("over the burst");
        let gap = t2.until.duration_since(t1.until);
        assert!(
            gap >= Duration::from_micros(900) && gap <= Duration::from_micros(1100),
            "{gap:?}"
        );
    }

    #[test]
    fn bandwidth_debt_scales_with_size() {
        // 1 MiB/s: burst 104857.6 bytes; a 1 MiB read then owes ~0.9 s.
        let q = Qos::new(QosLimits {
            iops: 0,
            bandwidth: 1 << 20,
        });
        let t = q.admit(&read(1 << 20)).expect("over the burst");
        let wait = t.until.duration_since(Instant::now());
        assert!(wait > Duration::from_millis(500) && wait <= Duration::from_millis(900));
        // Metadata costs nothing, whatever the debt.
        assert!(q.admit(&Command::Flush).is_none());
    }

    #[test]
    fn absurd_debt_is_capped_not_a_panic() {
        let q = Qos::new(QosLimits {
            iops: 0,
            bandwidth: 1,
        });
        let mut last = None;
        for _ in 0..1000 {
            last = q.admit(&read(32 << 20));
        }
        let t = last.expect("deep in debt");
        assert!(t.until.duration_since(Instant::now()) <= Duration::from_secs(365 * 86_400));
    }

    #[tokio::test]
    async fn raising_the_limit_releases_waiters() {
        let q = std::sync::Arc::new(Qos::new(QosLimits {
            iops: 1,
            bandwidth: 0,
        }));
        assert!(q.admit(&read(512)).is_none());
        for _ in 0..100 {
            let _ = q.admit(&read(512));
        }
        let t = q.admit(&read(512)).expect("behind 100 s of debt");
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.wait(t).await });
        tokio::task::yield_now().await;
        q.set(QosLimits::default());
        tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .expect("released by the change")
            .unwrap();
    }
}
