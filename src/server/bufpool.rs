//! Payload buffers recycled within one connection.
//!
//! A 1 MiB request served from fresh memory costs a page fault and a page clear per 4 KiB, plus
//! zeroing the buffer, before any byte of I/O: measured at 16% of the daemon's CPU on 1 MiB
//! sequential reads. Buffers are taken by the reader (write payloads) and the executor (read
//! data) and given back once the backend or the socket is done with them, often on another
//! thread, which is why this is a small locked free list rather than a thread-local cache.
//!
//! Bounded: at most [`KEEP`] buffers and [`KEEP_BYTES`] of capacity stay parked per connection,
//! and all of it is freed with the connection; a connection that never moved data parks nothing.
//! A general-purpose pool crate would not know these bounds; the list is a dozen lines.
//!
//! Every buffer starts on a page boundary ([`AlignedBuf`]): a volume with `cache none`
//! (O_DIRECT) reads and writes them straight from and to the device, with no bounce copy.

use std::sync::Mutex;

use crate::aligned::AlignedBuf;

/// Buffers parked at most (a deep queue of 1 MiB requests cycles through about this many).
const KEEP: usize = 8;
/// Capacity parked at most, in bytes.
const KEEP_BYTES: usize = 8 << 20;

#[derive(Default)]
pub(crate) struct BufPool {
    free: Mutex<Vec<AlignedBuf>>,
}

impl BufPool {
    /// A buffer of exactly `len` bytes. Its contents are unspecified (earlier payload of this
    /// connection, or zeros): every user overwrites all of it before reading any of it.
    pub(crate) fn take(&self, len: usize) -> AlignedBuf {
        let recycled = {
            let mut free = self.lock();
            // Best fit is not worth it: sizes in one connection are nearly always alike.
            free.iter()
                .position(|b| b.capacity() >= len)
                .map(|i| free.swap_remove(i))
        };
        match recycled {
            Some(mut b) => {
                // Within capacity: no zeroing, no page faults.
                b.resize(len);
                b
            }
            None => AlignedBuf::zeroed(len),
        }
    }

    /// Parks `buf` for reuse, or frees it when the pool is full.
    pub(crate) fn give(&self, buf: AlignedBuf) {
        if buf.capacity() == 0 || buf.capacity() > KEEP_BYTES {
            return;
        }
        let mut free = self.lock();
        let parked: usize = free.iter().map(counted).sum();
        if free.len() < KEEP && parked + counted(&buf) <= KEEP_BYTES {
            free.push(buf);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<AlignedBuf>> {
        // A panic while holding this lock leaves a valid list: keep using it.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A parked buffer's size for the byte bound: its capacity without the alignment slack (up
/// to a page past the requested size), so that [`KEEP`] buffers of 1 MiB all fit in
/// [`KEEP_BYTES`]: a QD8 client of 1 MiB requests then never allocates.
fn counted(b: &AlignedBuf) -> usize {
    b.capacity() / crate::aligned::ALIGN * crate::aligned::ALIGN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_and_sizes_exactly() {
        let p = BufPool::default();
        let mut b = p.take(4096);
        assert_eq!(b.len(), 4096);
        b[0] = 7;
        let ptr = b.as_ptr();
        p.give(b);
        let b = p.take(512);
        assert_eq!((b.len(), b.as_ptr()), (512, ptr), "recycled, shrunk");
        p.give(b);
        let b = p.take(4096);
        assert_eq!(
            (b.len(), b.as_ptr()),
            (4096, ptr),
            "grown back within capacity"
        );
        let c = p.take(4096);
        assert_ne!(c.as_ptr(), ptr, "the one parked buffer is in use");
        assert!(crate::aligned::is_aligned(&b, crate::aligned::ALIGN));
        assert!(crate::aligned::is_aligned(&c, crate::aligned::ALIGN));
    }

    #[test]
    fn keeps_a_qd8_of_1mib_buffers() {
        let p = BufPool::default();
        let bufs: Vec<AlignedBuf> = (0..KEEP).map(|_| p.take(1 << 20)).collect();
        let ptrs: Vec<*const u8> = bufs.iter().map(|b| b.as_ptr()).collect();
        for b in bufs {
            p.give(b);
        }
        assert_eq!(p.lock().len(), KEEP, "every one parked");
        let again: Vec<AlignedBuf> = (0..KEEP).map(|_| p.take(1 << 20)).collect();
        assert!(
            again.iter().all(|b| ptrs.contains(&b.as_ptr())),
            "none allocated anew"
        );
    }

    #[test]
    fn bounded() {
        let p = BufPool::default();
        for _ in 0..KEEP * 2 {
            p.give(AlignedBuf::zeroed(1 << 20));
        }
        let free = p.lock();
        assert!(free.len() <= KEEP);
        assert!(free.iter().map(counted).sum::<usize>() <= KEEP_BYTES);
        drop(free);
        p.give(AlignedBuf::zeroed(KEEP_BYTES + 1));
        assert!(p.lock().iter().all(|b| b.capacity() <= KEEP_BYTES));
    }
}
