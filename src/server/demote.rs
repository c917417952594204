//! A throttled plain connection's thread runs at a lower CPU priority than everything else.
//!
//! Why: on a host with few CPUs, a volume hammered at its QoS limit still costs CPU (reading the
//! requests, encrypting, storing, replying), and that CPU is taken in bursts: its waiters are
//! released together when the runtime's timer fires. A request of another volume that arrives
//! during such a burst waited for a CPU behind it (issue 16 §4: a QD1 volume's p99 beside a
//! volume limited to 20k IOPS was 2–3x its p99 alone). With the throttled thread demoted, the
//! scheduler runs the other volume's thread first, at once when it wakes; the throttled volume
//! gets whatever CPU is left, which is what its limit asks for anyway.
//!
//! The thread is demoted when its volume first makes it wait (a QoS ticket) and restored once it
//! has not waited for [`HOLD`]: a limit raised or removed, or a client slowed below it, gives the
//! connection its priority back. Unlimited volumes never get here (no ticket, no clock read).
//! Restoring needs the right to lower a nice value (`RLIMIT_NICE`, `LimitNICE=+0` in the unit,
//! or `CAP_SYS_NICE`); without it the thread stays demoted until the client reconnects. The
//! systemd unit allows both (`LimitNICE=+0`, `setpriority` in its system call filter).

use std::time::{Duration, Instant};

/// How long a demoted thread must go without a QoS wait before it is restored.
pub(super) const HOLD: Duration = Duration::from_millis(200);

/// The nice value of a throttled thread: the lowest. Its weight is 15 against a normal
/// thread's 1024; `SCHED_IDLE` (weight 3, preempted by any wake-up) was tried and starved the
/// throttled volume below its limit on a busy host (14k of 20k IOPS) for no better QD1 tail
/// (docs/benchmarks.md#qos).
const THROTTLED_NICE: i32 = 19;

/// The connection thread's demotion state; lives on that thread.
pub(super) struct Demotion {
    /// The nice value to restore, while demoted.
    demoted: Option<i32>,
    last_wait: Instant,
    /// A change was refused: the thread stays as it is (demoted, or not).
    stuck: bool,
}

impl Demotion {
    pub(super) fn new() -> Demotion {
        Demotion {
            demoted: None,
            last_wait: Instant::now(),
            stuck: false,
        }
    }

    /// The volume made this thread wait: demote it, if it is not yet.
    pub(super) fn waited(&mut self) {
        self.last_wait = Instant::now();
        if self.demoted.is_some() || self.stuck {
            return;
        }
        let nice = current_nice();
        if set_nice(THROTTLED_NICE) {
            self.demoted = Some(nice);
        } else {
            // Refused (a seccomp filter without setpriority): not tried again.
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "a throttled connection cannot lower its CPU priority"
            );
            self.stuck = true;
        }
    }

    /// Whether the thread runs at the lowered priority now.
    #[inline]
    pub(super) fn is_demoted(&self) -> bool {
        self.demoted.is_some()
    }

    /// A request went without waiting: restore the thread if it has not waited for [`HOLD`].
    #[inline]
    pub(super) fn went(&mut self) {
        if let Some(nice) = self.demoted
            && !self.stuck
            && self.last_wait.elapsed() >= HOLD
        {
            self.restore(nice);
        }
    }

    #[cold]
    fn restore(&mut self, nice: i32) {
        if set_nice(nice) {
            self.demoted = None;
        } else {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "a throttled connection stays at a low CPU priority (no RLIMIT_NICE to restore it)"
            );
            self.stuck = true;
        }
    }
}

fn tid() -> libc::id_t {
    // SAFETY: no arguments; cannot fail.
    unsafe { libc::gettid() as libc::id_t }
}

/// The calling thread's nice value. getpriority may legitimately return -1 (errno tells); a
/// wrong guess only means later restoring to nice -1, which the kernel refuses like any raise
/// we may not make.
fn current_nice() -> i32 {
    // SAFETY: a plain syscall on the calling thread's id.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, tid()) }
}

/// Sets the calling thread's nice value (on Linux, `PRIO_PROCESS` with a tid is per thread).
fn set_nice(n: i32) -> bool {
    // SAFETY: a plain syscall on the calling thread's id.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid(), n) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demoted_on_a_wait_restored_after_hold_without_one() {
        // On a thread of its own: the test harness's threads keep their priority.
        std::thread::spawn(|| {
            let before = current_nice();
            let mut d = Demotion::new();
            d.went();
            assert!(!d.is_demoted());
            d.waited();
            assert!(d.is_demoted());
            assert_eq!(current_nice(), THROTTLED_NICE);
            // Waiting again, and going without a wait within HOLD, keep it demoted.
            d.waited();
            d.went();
            assert_eq!(current_nice(), THROTTLED_NICE);
            std::thread::sleep(HOLD);
            d.went();
            // Lowering the nice value back needs RLIMIT_NICE or CAP_SYS_NICE (root has it).
            // SAFETY: a plain syscall.
            if unsafe { libc::geteuid() } == 0 {
                assert!(!d.is_demoted());
                assert_eq!(current_nice(), before);
            } else {
                assert!(d.is_demoted() == d.stuck);
            }
        })
        .join()
        .unwrap();
    }
}
