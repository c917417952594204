//! Whether the Ceph cluster is worth waiting for: a gate in front of every new cluster
//! session of the daemon (`ceph.rs`).
//!
//! Connecting to an unreachable cluster blocks for the whole connect timeout (up to 10 s).
//! Without a gate every caller pays it, one after the other: a `volume list` or a file
//! volume's `create` (which asks the cluster whether an RBD volume holds the name) behind the
//! re-attach thread's attempt. With it, once a connect has failed:
//!
//! - at most one caller at a time *probes* (connects for real);
//! - everyone else fails at once with the last failure, until a probe succeeds;
//! - a new probe is let through only [`REPROBE_AFTER`] after the last one ended, so a caller
//!   that keeps asking does not keep the cluster's connect queue busy.
//!
//! While the cluster has never failed (or since a probe succeeded), connects are not gated.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// After a failed connect, callers fail at once for this long before one may try again.
pub const REPROBE_AFTER: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Reach {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// When and why the last connect failed; `None` while the cluster answers.
    down: Option<(Instant, String)>,
    /// A probe is connecting now.
    probing: bool,
}

/// Leave to connect; report how it went with [`Pass::done`]. A probe dropped without a
/// report (a panic) lets the next caller probe.
pub struct Pass<'a> {
    reach: &'a Reach,
    probe: bool,
}

impl Reach {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Leave to connect, or why not (the last failure, and how long ago).
    pub fn pass(&self) -> Result<Pass<'_>, String> {
        let mut s = self.state();
        let Some((at, why)) = &s.down else {
            return Ok(Pass {
                reach: self,
                probe: false,
            });
        };
        if s.probing || at.elapsed() < REPROBE_AFTER {
            return Err(format!(
                "cluster unreachable ({}, {} s ago; {})",
                why,
                at.elapsed().as_secs(),
                if s.probing {
                    "trying again now"
                } else {
                    "tried again on a later call"
                }
            ));
        }
        s.probing = true;
        Ok(Pass {
            reach: self,
            probe: true,
        })
    }

    /// The last connect failed (and nothing succeeded since).
    #[cfg(test)]
    pub fn is_down(&self) -> bool {
        self.state().down.is_some()
    }
}

impl Pass<'_> {
    /// This caller tries a cluster that failed the last time.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Records the connect's outcome: a failure closes the gate, a success opens it.
    pub fn done<T, E: std::fmt::Display>(mut self, r: &Result<T, E>) {
        let mut s = self.reach.state();
        match r {
            Ok(_) => s.down = None,
            Err(e) => s.down = Some((Instant::now(), e.to_string())),
        }
        if self.probe {
            s.probing = false;
            self.probe = false;
        }
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if self.probe {
            self.reach.state().probing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_until_a_failure_then_one_probe_at_a_time() {
        let r = Reach::default();
        // Never failed: every caller may connect, at once.
        let (a, b) = (r.pass().unwrap(), r.pass().unwrap());
        b.done(&Ok::<(), &str>(()));
        a.done(&Err::<(), _>("timed out"));
        assert!(r.is_down());
        // Just failed: refused at once, naming the failure.
        let e = r.pass().err().unwrap();
        assert!(e.contains("timed out"), "{e}");
        // Later: one probe; others refused while it runs.
        r.state().down.as_mut().unwrap().0 -= REPROBE_AFTER;
        let p = r.pass().unwrap();
        let e = r.pass().err().unwrap();
        assert!(e.contains("trying again now"), "{e}");
        p.done(&Ok::<(), &str>(()));
        assert!(!r.is_down());
        let _free = (r.pass().unwrap(), r.pass().unwrap());
    }

    #[test]
    fn a_probe_that_fails_or_vanishes_reopens_the_probe_slot() {
        let r = Reach::default();
        r.pass().unwrap().done(&Err::<(), _>("refused"));
        r.state().down.as_mut().unwrap().0 -= REPROBE_AFTER;
        drop(r.pass().unwrap()); // no report (a panic while connecting)
        let p = r.pass().unwrap();
        p.done(&Err::<(), _>("refused again"));
        assert!(r.pass().is_err(), "a fresh failure refuses again");
        r.state().down.as_mut().unwrap().0 -= REPROBE_AFTER;
        assert!(r.pass().is_ok());
    }
}
