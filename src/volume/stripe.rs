//! The stripe locks of a [`Volume`](super::Volume): readers-writer locks whose shared holds can
//! also be owned by a write in flight and released on another thread ([`SharedHold`]).
//!
//! Why not `std::sync::RwLock`: its guards must be dropped on the thread that took them. A
//! WRITE started with librbd's aio ([`super::aio`]) holds its stripes shared until librbd calls
//! back, on one of librbd's threads; a read-modify-write of a unit in the same stripe, a
//! snapshot's quiesce and a re-encryption's start (exclusive) must still wait for it.
//!
//! Writers are preferred: once a writer waits, new shared holders wait behind it, so a stream
//! of whole-unit writes cannot starve a read-modify-write. Locks are always taken in stripe
//! order, so no cycle of waits can form.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[derive(Default)]
pub struct StripeLock {
    st: Mutex<State>,
    cv: Condvar,
}

#[derive(Default)]
struct State {
    readers: u32,
    writer: bool,
    writers_waiting: u32,
}

impl StripeLock {
    fn state(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cv.wait(g).unwrap_or_else(|e| e.into_inner())
    }

    fn lock_shared(&self) {
        let mut s = self.state();
        while s.writer || s.writers_waiting > 0 {
            s = self.wait(s);
        }
        s.readers += 1;
    }

    fn unlock_shared(&self) {
        let mut s = self.state();
        s.readers = s.readers.saturating_sub(1);
        if s.readers == 0 && s.writers_waiting > 0 {
            self.cv.notify_all();
        }
    }

    fn lock_exclusive(&self) {
        let mut s = self.state();
        s.writers_waiting += 1;
        while s.writer || s.readers > 0 {
            s = self.wait(s);
        }
        s.writers_waiting -= 1;
        s.writer = true;
    }

    fn unlock_exclusive(&self) {
        self.state().writer = false;
        self.cv.notify_all();
    }

    /// Holds the stripe shared until the guard is dropped.
    pub fn read(&self) -> StripeGuard<'_> {
        self.lock_shared();
        StripeGuard {
            lock: self,
            exclusive: false,
        }
    }

    /// Holds the stripe exclusively until the guard is dropped.
    pub fn write(&self) -> StripeGuard<'_> {
        self.lock_exclusive();
        StripeGuard {
            lock: self,
            exclusive: true,
        }
    }
}

/// A held stripe lock (released on drop).
pub struct StripeGuard<'a> {
    lock: &'a StripeLock,
    exclusive: bool,
}

impl Drop for StripeGuard<'_> {
    fn drop(&mut self) {
        if self.exclusive {
            self.lock.unlock_exclusive();
        } else {
            self.lock.unlock_shared();
        }
    }
}

/// Stripes held shared by an I/O in flight: `Send`, released on drop, on any thread.
pub struct SharedHold {
    table: Arc<[StripeLock]>,
    /// Held stripes, ascending, each once.
    held: Vec<usize>,
}

impl SharedHold {
    /// Takes `idx` (ascending, no duplicates: the lock order) shared.
    pub fn take(table: &Arc<[StripeLock]>, idx: Vec<usize>) -> SharedHold {
        debug_assert!(idx.windows(2).all(|w| w[0] < w[1]));
        for &i in &idx {
            table[i].lock_shared();
        }
        SharedHold {
            table: table.clone(),
            held: idx,
        }
    }
}

impl Drop for SharedHold {
    fn drop(&mut self) {
        for &i in self.held.iter().rev() {
            self.table[i].unlock_shared();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn exclusive_waits_for_a_hold_released_on_another_thread() {
        let table: Arc<[StripeLock]> = (0..4).map(|_| StripeLock::default()).collect();
        let hold = SharedHold::take(&table, vec![1, 3]);
        let got = Arc::new(AtomicBool::new(false));
        let (t2, g2) = (table.clone(), got.clone());
        let w = std::thread::spawn(move || {
            let _x = t2[3].write();
            g2.store(true, Ordering::SeqCst);
        });
        // Other stripes are free meanwhile, shared and exclusive.
        drop(table[0].write());
        drop(table[1].read());
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !got.load(Ordering::SeqCst),
            "the writer must wait for the hold"
        );
        std::thread::spawn(move || drop(hold)).join().unwrap();
        w.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
        drop(table[3].write());
    }
}
