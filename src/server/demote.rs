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
//! or `CAP_SYS_NICE`); without it the thread stays demoted until the client reconnects.

use std::time::{Duration, Instant};

/// How long a demoted thread must go without a QoS wait before it is restored.
pub(super) const HOLD: Duration = Duration::from_millis(200);

/// How a throttled thread is demoted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    /// Not at all.
    Off,
    /// A higher nice value (1..=19).
    Nice(i32),
    /// `SCHED_IDLE`: runs only when nothing else wants the CPU.
    Idle,
}

fn class() -> Class {
    static C: std::sync::OnceLock<Class> = std::sync::OnceLock::new();
    *C.get_or_init(|| match std::env::var("CRYPTVOL_THROTTLED_CLASS").as_deref() {
        Ok("off") => Class::Off,
        Ok("idle") => Class::Idle,
        Ok(n) => n.parse().ok().filter(|n| (1..=19).contains(n)).map_or(Class::Nice(19), Class::Nice),
        Err(_) => Class::Nice(19),
    })
}

/// The connection thread's demotion state; lives on that thread.
pub(super) struct Demotion {
    /// The nice value to restore, while demoted.
    demoted: Option<i32>,
    last_wait: Instant,
    /// A restore was refused: the thread stays demoted.
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
        if self.demoted.is_some() {
            return;
        }
        let class = class();
        if class == Class::Off {
            return;
        }
        let nice = current_nice();
        let ok = match class {
            Class::Off => false,
            Class::Nice(n) => set_nice(n),
            Class::Idle => set_policy(libc::SCHED_IDLE),
        };
        if ok {
            self.demoted = Some(nice);
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
        let ok = match class() {
            Class::Idle => set_policy(libc::SCHED_OTHER) && set_nice(nice),
            _ => set_nice(nice),
        };
        if ok {
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

/// Sets the calling thread's scheduling policy (pid 0: the calling thread).
fn set_policy(policy: libc::c_int) -> bool {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: `p` is a valid `sched_param` for the duration of the call.
    unsafe { libc::sched_setscheduler(0, policy, &p) == 0 }
}
