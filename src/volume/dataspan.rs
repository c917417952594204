//! The last stretch of data a [`FileStore`](super::store::FileStore) found with
//! `SEEK_DATA`/`SEEK_HOLE`, remembered until the next hole is punched.
//!
//! Why: `SEEK_HOLE` from inside data walks the file's page index to the next hole; on a fully
//! written volume that is the end of the file, so every BLOCK_STATUS costs a walk over the
//! whole file (tmpfs, 2 GiB: `mapping_seek_hole_data` was 13 % of the daemon's CPU during
//! `nbdcopy URI null:`, which asks for the extents of every stretch it copies). Data only
//! becomes a hole through a punch (TRIM, WRITE_ZEROES), and every punch goes through the
//! store, which then forgets the span; writes only add data. So a remembered span is exact
//! for as long as no punch completed since it was found, and a punch racing a lookup is a
//! request racing another, where either answer is right.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub(super) struct DataSpan {
    /// `(start, end, generation)`: `[start, end)` was data when the punch count was
    /// `generation`.
    span: Mutex<(u64, u64, u64)>,
    /// Punches (and length changes) completed so far.
    punches: AtomicU64,
}

impl DataSpan {
    /// The count to pass to [`remember`](Self::remember): taken before the seeks.
    pub(super) fn generation(&self) -> u64 {
        self.punches.load(Ordering::Acquire)
    }

    /// Where the data that `pos` lies in ends, if known.
    pub(super) fn data_end(&self, pos: u64) -> Option<u64> {
        let (start, end, generation) = *self.lock();
        (generation == self.generation() && start <= pos && pos < end).then_some(end)
    }

    /// `[start, end)` was data, as seen by seeks made after `generation` was taken.
    pub(super) fn remember(&self, start: u64, end: u64, generation: u64) {
        if start < end {
            *self.lock() = (start, end, generation);
        }
    }

    /// Called once a punch (or a change of length) completed: what was remembered is stale.
    pub(super) fn punched(&self) {
        self.punches.fetch_add(1, Ordering::AcqRel);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, u64, u64)> {
        self.span.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_until_a_punch() {
        let s = DataSpan::default();
        assert_eq!(s.data_end(0), None);
        let g = s.generation();
        s.remember(4096, 1 << 20, g);
        assert_eq!(s.data_end(4096), Some(1 << 20));
        assert_eq!(s.data_end((1 << 20) - 1), Some(1 << 20));
        assert_eq!(s.data_end(1 << 20), None, "end is exclusive");
        assert_eq!(s.data_end(0), None, "before the start");
        s.punched();
        assert_eq!(s.data_end(4096), None, "a punch forgets it");
        // Seeks begun before that punch are not remembered as current.
        s.remember(0, 1 << 20, g);
        assert_eq!(s.data_end(0), None);
    }
}
