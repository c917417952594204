//! What an accept loop does when `accept()` fails: back off when the process or system is out
//! of descriptors or memory (the pending connection stays in the backlog, so retrying at once
//! would spin), and log at most one line per second, counting the failures left unlogged.
//! Shared by the NBD listeners and the control socket.

use std::io;
use std::time::{Duration, Instant};

/// First pause after a resource error; doubled on each further one, up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At most one log line per this.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// The failure state of one accept loop.
#[derive(Debug)]
pub struct AcceptFailures {
    what: &'static str,
    backoff: Duration,
    last_log: Option<Instant>,
    suppressed: u64,
}

impl AcceptFailures {
    /// `what` names the listener in log lines (e.g. "control", "nbd").
    pub fn new(what: &'static str) -> AcceptFailures {
        AcceptFailures {
            what,
            backoff: MIN_BACKOFF,
            last_log: None,
            suppressed: 0,
        }
    }

    /// Records a failed accept; returns how long to wait before the next one.
    pub fn failed(&mut self, e: &io::Error) -> Duration {
        self.failed_at(e, Instant::now())
    }

    fn failed_at(&mut self, e: &io::Error, now: Instant) -> Duration {
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
        {
            let (listener, suppressed) = (self.what, self.suppressed);
            tracing::warn!(listener, error = %e, suppressed, "accept failed");
            self.last_log = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        if is_resource_error(e) {
            let wait = self.backoff;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            wait
        } else {
            // A connection that died in the backlog (ECONNABORTED) and the like: the next
            // one may be fine.
            Duration::ZERO
        }
    }

    /// Records a successful accept: the back-off starts over; failures not logged yet are,
    /// within the same one line per second (else the next line counts them).
    pub fn succeeded(&mut self) {
        self.succeeded_at(Instant::now());
    }

    fn succeeded_at(&mut self, now: Instant) {
        self.backoff = MIN_BACKOFF;
        if self.suppressed > 0
            && self
                .last_log
                .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
        {
            let (listener, suppressed) = (self.what, self.suppressed);
            tracing::warn!(listener, suppressed, "accept failures not logged");
            self.last_log = Some(now);
            self.suppressed = 0;
        }
    }
}

/// Out of descriptors (process or system), buffers or memory: only time helps.
fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Waits for a free slot of `slots`, then accepts one connection with `accept`, backing off
/// on resource errors (EMFILE: the connection stays queued; retrying at once would spin).
/// `None` once `shutdown` is set. The slot is released when the returned permit drops. The
/// control socket and the metrics listener share it; the NBD listeners count connections
/// in handshake and established ones apart and keep their own loop.
pub async fn accept_in_slot<S, F, Fut>(
    slots: &std::sync::Arc<tokio::sync::Semaphore>,
    failures: &mut AcceptFailures,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    mut accept: F,
) -> Option<(S, tokio::sync::OwnedSemaphorePermit)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = io::Result<S>>,
{
    loop {
        let slot = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = shutdown.wait_for(|v| *v) => return None,
        };
        let accepted = tokio::select! {
            r = accept() => r,
            _ = shutdown.wait_for(|v| *v) => return None,
        };
        match accepted {
            Ok(s) => {
                failures.succeeded();
                return Some((s, slot));
            }
            Err(e) => {
                let wait = failures.failed(&e);
                drop(slot);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait_for(|v| *v) => return None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_on_resource_errors_only() {
        let mut f = AcceptFailures::new("t");
        let t0 = Instant::now();
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let waits: Vec<_> = (0..7).map(|_| f.failed_at(&emfile, t0)).collect();
        assert_eq!(
            waits,
            [50, 100, 200, 400, 800, 1000, 1000].map(Duration::from_millis)
        );
        let aborted = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(f.failed_at(&aborted, t0), Duration::ZERO);
        f.succeeded_at(t0);
        assert_eq!(f.failed_at(&emfile, t0), MIN_BACKOFF);
    }

    #[test]
    fn logs_once_per_second_and_counts_the_rest() {
        let mut f = AcceptFailures::new("t");
        let t0 = Instant::now();
        let e = io::Error::from_raw_os_error(libc::ENFILE);
        f.failed_at(&e, t0);
        assert_eq!(f.suppressed, 0, "the first failure is logged");
        for i in 1..=1000 {
            f.failed_at(&e, t0 + Duration::from_micros(i));
        }
        assert_eq!(f.suppressed, 1000);
        f.failed_at(&e, t0 + LOG_EVERY);
        assert_eq!(f.suppressed, 0, "a second later: logged, with the count");
        let t1 = t0 + LOG_EVERY + Duration::from_millis(1);
        f.failed_at(&e, t1);
        assert_eq!(f.suppressed, 1);
        // Success logs the count, but not within the second of the last line.
        f.succeeded_at(t1);
        assert_eq!(f.suppressed, 1);
        f.succeeded_at(t0 + 2 * LOG_EVERY);
        assert_eq!(f.suppressed, 0);
    }
}
