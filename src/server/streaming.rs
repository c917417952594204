//! Connections streaming large requests, counted process-wide, so that the threaded path
//! ([`super::threaded`]) knows when handing a request to the blocking pool buys nothing.
//!
//! Why: a connection thread that hands its large WRITEs to pool threads keeps two CPUs busy
//! with one connection (it copies the next payload off the socket while a pool thread
//! encrypts and stores the last): what one connection needs to reach the machine's speed.
//! Once twice as many connections stream as there are CPUs, every CPU already has connection
//! threads of their own to run, and each hand-off only adds a wake-up, a context switch and a
//! payload fetched into another core's cache, and a connection thread waits for its own
//! previous write to leave the pool before handing on the next. Measured on 2 vCPUs (2 GiB in
//! /dev/shm, `docs/benchmarks.md`, multi-connection, against main): server CPU per GiB −13 %
//! on `nbdcopy IMAGE URI` and −5 % on 1 MiB writes with 4 connections, throughput within the
//! noise (a one-per-CPU probe: −25 to −35 %, but see [`crowded_with`]).
//!
//! A connection counts from the header of a large READ or WRITE until it next waits for the
//! client with nothing buffered (or sends a small request, or ends): an idle connection, or
//! one whose client sends the next request only after the reply, does not count.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Connections counted right now.
static STREAMING: AtomicUsize = AtomicUsize::new(0);

/// The CPUs this process may run on.
fn cpus() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Whether every CPU has two streaming connections: store WRITEs on the connection's own
/// thread.
pub(super) fn crowded() -> bool {
    crowded_with(STREAMING.load(Ordering::Relaxed), cpus())
}

/// Whether at least one connection per CPU streams (and two at the least): a connection whose
/// write slots ([`super::threaded`]'s `write_parallelism`) are all busy then stores its next
/// WRITE on its own thread instead of waiting for a slot. Waiting leaves a CPU idle when the
/// other connections' writers are themselves waiting (for their slot, or for the file's inode
/// lock, which every `pwrite` to the volume file takes): with 2 connections of 1 MiB QD8
/// writes on 2 vCPUs the CPUs were 17 % idle (perf), and throughput 0.67× `nbdkit file`'s.
/// Serving instead: 0.89× with 2 connections, `nbdcopy IMAGE URI` 0.75× → 0.90×, 4
/// connections 1.00× → 1.08× (docs/benchmarks.md). Not with one connection: its thread would
/// stop reading its socket while it stores (a probe that served regardless took 1 MiB writes
/// on 1 connection from 1.11× to 0.93×).
pub(super) fn shared() -> bool {
    shared_with(STREAMING.load(Ordering::Relaxed), cpus())
}

fn shared_with(streaming: usize, cpus: usize) -> bool {
    streaming >= cpus.max(2)
}

/// Two per CPU, not one: with one per CPU, a connection serving its own WRITEs leaves its
/// socket unread while it encrypts and stores, and its client waits (measured on 2 vCPUs, 1 MiB
/// writes on 2 connections: 30–45 % less throughput than with the hand-off, though 25 % less
/// CPU per byte). With two per CPU another connection's thread has a payload to read meanwhile.
/// READs keep the hand-off: `nbdcopy URI null:` lost 10–15 % of its throughput without it.
fn crowded_with(streaming: usize, cpus: usize) -> bool {
    streaming >= cpus.saturating_mul(2)
}

/// One connection's place in the count; uncounted when dropped.
pub(super) struct Streamer {
    on: bool,
    count: &'static AtomicUsize,
}

impl Default for Streamer {
    fn default() -> Streamer {
        Streamer {
            on: false,
            count: &STREAMING,
        }
    }
}

impl Streamer {
    /// Counts this connection (`true`) or not (`false`); repeated calls are free.
    pub(super) fn set(&mut self, on: bool) {
        if on == self.on {
            return;
        }
        self.on = on;
        if on {
            self.count.fetch_add(1, Ordering::Relaxed);
        } else {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.set(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_connection_once_and_uncounts_on_drop() {
        // A counter of its own: other tests in this process serve connections too.
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let get = || COUNT.load(Ordering::SeqCst);
        let mut a = Streamer {
            on: false,
            count: &COUNT,
        };
        let mut b = Streamer {
            on: false,
            count: &COUNT,
        };
        a.set(true);
        a.set(true);
        assert_eq!(get(), 1, "set twice, counted once");
        b.set(true);
        assert_eq!(get(), 2);
        b.set(false);
        b.set(false);
        assert_eq!(get(), 1);
        b.set(true);
        drop(a);
        assert_eq!(get(), 1, "dropped: uncounted");
        drop(b);
        assert_eq!(get(), 0);
        assert!(crowded_with(4, 2) && crowded_with(5, 2) && crowded_with(2, 1));
        assert!(!crowded_with(3, 2) && !crowded_with(1, 1));
        assert!(shared_with(2, 2) && shared_with(2, 1) && shared_with(8, 8));
        assert!(!shared_with(1, 2) && !shared_with(1, 1) && !shared_with(7, 8));
    }
}
