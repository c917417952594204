//! A read-only shared mapping of a volume file on tmpfs, so that a READ decrypts straight
//! from the page cache into the reply: one pass over the data where `pread` + decrypt-in-place
//! made two (the kernel's copy, then the cipher's); at most a `mincore` call where the data
//! span is not known.
//!
//! Why tmpfs only: there the page cache *is* the store, so a page fault never waits for a
//! device, and [`BlockStore::read_at_nowait`](super::BlockStore::read_at_nowait) (which keeps
//! device waits off the connection threads) has nothing to tell. On a disk file system a fault
//! on an uncached page would block the thread that serves cached reads, and its read-around is
//! not `pread`'s readahead: those keep `pread`.
//!
//! The mapping covers the file as it was at the first READ: a volume grown since reads its new
//! range with `pread` until it is opened again.
//!
//! Why reads only: a WRITE through the mapping was measured too (issue 16: server CPU per GiB
//! −20 %), but the cipher's stores into a mapped page can be cut short by a crash of the
//! daemon (kill -9, the OOM killer, an abort): a unit half old and half new ciphertext decrypts
//! to garbage, where `pwrite` copies each page whole before the kernel lets the process die,
//! so a unit (512 B or 4 KiB, within one page) is old or new. A disk keeps its sectors atomic;
//! so must a volume.
//!
//! **SIGBUS.** If the file shrinks under the mapping (another process truncates it), touching
//! a page past its end raises SIGBUS, whose default action would kill the daemon and every
//! volume it serves. A process-wide handler looks the faulting address up in the registry of
//! live mappings ([`SLOTS`], lock-free: a signal handler may not lock); for one of ours it maps
//! an anonymous zero page over the faulting one (so the access completes) and counts a fault on
//! that mapping; any other SIGBUS goes to the handler that was installed before (Rust's
//! stack-overflow check) or to the default action, as without this module. A [`Window`]
//! compares the mapping's fault count before and after its reader used it: if a fault came in
//! between, the read fails with EIO instead of returning those zeros, and the mapping is not
//! used again ([`Mapping::window`] refuses once a fault was counted): `pread` serves, and
//! reports the short file as it always did.

#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Once;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Mappings live at once, process-wide; a file opened beyond that is read with `pread`.
const MAX_MAPPINGS: usize = 1024;

/// `statfs.f_type` of tmpfs (linux/magic.h `TMPFS_MAGIC`).
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// One registry entry. `base` 0: free. A mapping publishes `len` before `base`, and clears
/// `base` before it unmaps.
struct Slot {
    base: AtomicUsize,
    len: AtomicUsize,
    /// SIGBUS faults on this mapping since it was made.
    faults: AtomicU64,
    /// Claimed by a live [`Mapping`] (0/1).
    taken: AtomicUsize,
}

#[allow(
    clippy::declare_interior_mutable_const,
    reason = "the initialiser of a static array of atomics"
)]
const FREE: Slot = Slot {
    base: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faults: AtomicU64::new(0),
    taken: AtomicUsize::new(0),
};

static SLOTS: [Slot; MAX_MAPPINGS] = [FREE; MAX_MAPPINGS];

/// The page size, for the handler (set before the handler is installed).
static PAGE: AtomicUsize = AtomicUsize::new(4096);

/// The SIGBUS action found when ours was installed: where a fault that is not ours goes.
static mut PREVIOUS: Option<libc::sigaction> = None;

static INSTALL: Once = Once::new();

/// Whether `file` lives on tmpfs.
pub(crate) fn on_tmpfs(file: &File) -> bool {
    // SAFETY: `st` is a plain C struct written by fstatfs; the fd is owned by `file`.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::fstatfs(file.as_raw_fd(), &mut st) == 0 && st.f_type as i64 == TMPFS_MAGIC
    }
}

/// A read-only `MAP_SHARED` mapping of a file's first `len` bytes.
pub(crate) struct Mapping {
    base: *mut u8,
    len: usize,
    slot: &'static Slot,
    /// Bytes a window may cover: `len`, lowered when the store shrinks the file.
    valid: AtomicU64,
}

// SAFETY: the mapping is read-only memory owned by this value until drop; the raw pointer is
// only read through windows, which borrow the mapping.
unsafe impl Send for Mapping {}
// SAFETY: as above; shared use only reads.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `file`'s first `len` bytes, or `None` (empty, no free slot, mmap refused).
    pub(crate) fn new(file: &File, len: u64) -> Option<Mapping> {
        let len = usize::try_from(len).ok().filter(|&l| l > 0)?;
        install_handler();
        let slot = SLOTS.iter().find(|s| {
            s.taken
                .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
                == Ok(0)
        })?;
        // SAFETY: a fresh mapping chosen by the kernel (no address given), of an fd we own.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            slot.taken.store(0, Ordering::Release);
            tracing::debug!(error = %io::Error::last_os_error(), "no mapping: reads use pread");
            return None;
        }
        slot.faults.store(0, Ordering::SeqCst);
        slot.len.store(len, Ordering::SeqCst);
        slot.base.store(p as usize, Ordering::SeqCst);
        Some(Mapping {
            base: p.cast(),
            len,
            slot,
            valid: AtomicU64::new(len as u64),
        })
    }

    /// `[offset, offset + len)` to read, if the mapping covers it and never faulted.
    pub(crate) fn window(&self, offset: u64, len: usize) -> Option<Window<'_>> {
        let faults = self.slot.faults.load(Ordering::SeqCst);
        if faults != 0 {
            return None;
        }
        let end = offset.checked_add(len as u64)?;
        if end > self.valid.load(Ordering::Acquire) {
            return None;
        }
        // SAFETY: end <= valid <= self.len: the range lies in the live mapping, which the
        // window's borrow keeps mapped. Bytes may change meanwhile (writes of the same file);
        // a read racing a write of the same units may see either, as with pread.
        let bytes = unsafe { std::slice::from_raw_parts(self.base.add(offset as usize), len) };
        Some(Window {
            bytes,
            faults,
            slot: self.slot,
        })
    }

    /// Whether every page of `[offset, offset + len)` is in memory (`mincore`). On tmpfs a
    /// page that is not is a hole, which a read fault would allocate, or swapped out. One
    /// system call over the range's page-cache entries (no walk beyond it, unlike
    /// `SEEK_HOLE`); `false` for ranges of more than 512 pages (reads come in pieces of at
    /// most 1 MiB).
    pub(crate) fn resident(&self, offset: u64, len: usize) -> bool {
        const MAX_PAGES: usize = 512;
        let page = PAGE.load(Ordering::Relaxed) as u64;
        let Some(end) = offset.checked_add(len as u64) else {
            return false;
        };
        if len == 0 || end > self.valid.load(Ordering::Acquire) {
            return false;
        }
        let start = offset / page * page;
        let pages = (end - start).div_ceil(page) as usize;
        if pages > MAX_PAGES {
            return false;
        }
        let mut vec = [0u8; MAX_PAGES];
        // SAFETY: [start, end) lies in our live mapping (end <= valid <= len) and `start` is
        // page-aligned (the mapping's base is); `vec` has room for one byte per page.
        let r = unsafe {
            libc::mincore(
                self.base.add(start as usize).cast(),
                (end - start) as usize,
                vec.as_mut_ptr(),
            )
        };
        r == 0 && vec[..pages].iter().all(|v| v & 1 == 1)
    }

    /// The file is about to shrink to `len` bytes: no window reaches past it from now on.
    pub(crate) fn shrink(&self, len: u64) {
        self.valid.fetch_min(len, Ordering::AcqRel);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        self.slot.base.store(0, Ordering::SeqCst);
        // SAFETY: our own mapping, unmapped once; no window outlives `self` (borrows).
        unsafe { libc::munmap(self.base.cast(), self.len) };
        self.slot.taken.store(0, Ordering::Release);
    }
}

/// Part of a mapping being read. [`finish`](Window::finish) tells whether what was read is
/// the file's.
pub struct Window<'a> {
    bytes: &'a [u8],
    faults: u64,
    slot: &'static Slot,
}

impl Window<'_> {
    pub fn bytes(&self) -> &[u8] {
        self.bytes
    }

    /// `Err(EIO)` if the file shrank under the mapping while this window was read: some of
    /// it then read as zeros that are not the file's.
    pub fn finish(self) -> io::Result<()> {
        if self.slot.faults.load(Ordering::SeqCst) == self.faults {
            return Ok(());
        }
        tracing::error!(
            "a volume file shrank under its mapping (truncated by another process?): \
             the read fails, reads use pread from now on"
        );
        Err(io::Error::from_raw_os_error(libc::EIO))
    }
}

fn install_handler() {
    INSTALL.call_once(|| {
        // SAFETY: plain sysconf/sigaction calls with structs we own; PREVIOUS is written
        // once, here, before our handler can run (it is installed after), and only read by
        // the handler afterwards.
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE);
            if page > 0 {
                PAGE.store(page as usize, Ordering::SeqCst);
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                return;
            }
            PREVIOUS = Some(old);
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigbus as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut());
        }
    });
}

/// The SIGBUS handler: async-signal-safe (atomics, mmap, sigaction; no lock, no allocation).
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in SLOTS.iter() {
        let base = s.base.load(Ordering::SeqCst);
        if base == 0 || addr < base || addr - base >= s.len.load(Ordering::SeqCst) {
            continue;
        }
        s.faults.fetch_add(1, Ordering::SeqCst);
        let page = addr & !(PAGE.load(Ordering::Relaxed) - 1);
        // SAFETY: replaces one page of our own read-only mapping (found in the registry, so
        // not yet unmapped: its Mapping is borrowed by the faulting reader) with zeros.
        let p = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                PAGE.load(Ordering::Relaxed),
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            return;
        }
        break;
    }
    // Not one of ours (or the page could not be replaced): what happened before we were here.
    // SAFETY: PREVIOUS was written before this handler was installed and never after.
    let prev = unsafe { *std::ptr::addr_of!(PREVIOUS) };
    // SAFETY: calls the previous handler with the arguments we were given, or restores the
    // default action, so that the fault repeats on return and ends the process as it would
    // have without this module.
    unsafe {
        match prev {
            Some(p) if p.sa_sigaction != libc::SIG_DFL && p.sa_sigaction != libc::SIG_IGN => {
                if p.sa_flags & libc::SA_SIGINFO != 0 {
                    let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                        std::mem::transmute(p.sa_sigaction);
                    f(sig, info, ctx);
                } else {
                    let f: extern "C" fn(libc::c_int) = std::mem::transmute(p.sa_sigaction);
                    f(sig);
                }
            }
            _ => {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn shm_file(len: usize) -> Option<(tempfile::TempDir, File)> {
        let dir = tempfile::tempdir_in("/dev/shm").ok()?;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("v"))
            .ok()?;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        f.write_all_at(&data, 0).ok()?;
        on_tmpfs(&f).then_some((dir, f))
    }

    #[test]
    fn a_window_reads_the_file_and_sees_later_writes() {
        let Some((_d, f)) = shm_file(64 << 10) else {
            panic!("/dev/shm is not tmpfs here");
        };
        let m = Mapping::new(&f, 64 << 10).expect("mapping");
        let w = m.window(4096, 8192).unwrap();
        assert_eq!(w.bytes()[0], (4096 % 251) as u8);
        w.finish().unwrap();
        f.write_all_at(&[7u8; 16], 4096).unwrap();
        let w = m.window(4096, 16).unwrap();
        assert_eq!(w.bytes(), &[7u8; 16]);
        w.finish().unwrap();
        assert!(m.window(60 << 10, 8 << 10).is_none(), "past the mapping");
        assert!(m.window(u64::MAX - 1, 4).is_none(), "overflowing range");
        m.shrink(8192);
        assert!(m.window(4096, 8192).is_none(), "past a shrink");
        assert!(m.window(0, 8192).is_some());
    }

    #[test]
    fn a_file_truncated_under_the_mapping_fails_the_read_instead_of_killing_the_process() {
        let Some((_d, f)) = shm_file(64 << 10) else {
            panic!("/dev/shm is not tmpfs here");
        };
        let m = Mapping::new(&f, 64 << 10).expect("mapping");
        let w = m.window(0, 64 << 10).unwrap();
        // Another process truncates the file: the pages past 8 KiB are gone.
        f.set_len(8192).unwrap();
        let sum: u64 = w.bytes().iter().map(|&b| u64::from(b)).sum();
        assert!(sum > 0, "the first pages are still the file's");
        let err = w.finish().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        // Retired: no more windows, even inside the file.
        assert!(m.window(0, 4096).is_none());
        drop(m);
        // The slot is reusable and a new mapping of the (shorter) file works.
        let m = Mapping::new(&f, 8192).expect("mapping again");
        m.window(0, 8192).unwrap().finish().unwrap();
    }

    #[test]
    fn resident_tells_data_from_holes_without_allocating() {
        let (_d, f) = shm_file(64 << 10).expect("/dev/shm is tmpfs");
        f.set_len(1 << 20).unwrap();
        let m = Mapping::new(&f, 1 << 20).expect("mapping");
        assert!(m.resident(0, 64 << 10));
        assert!(m.resident(100, 5000), "unaligned inside data");
        assert!(!m.resident(60 << 10, 8192), "data then hole");
        assert!(!m.resident(512 << 10, 4096), "hole");
        assert!(!m.resident(0, 0) && !m.resident((1 << 20) - 1, 2) && !m.resident(u64::MAX, 1));
        assert!(!m.resident(0, 4 << 20), "more pages than a piece");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            f.metadata().unwrap().blocks() * 512,
            64 << 10,
            "asking allocated nothing"
        );
        f.write_all_at(&[1u8; 4096], 512 << 10).unwrap();
        assert!(m.resident(512 << 10, 4096), "written since");
    }

    #[test]
    fn only_tmpfs_is_mapped() {
        assert!(!on_tmpfs(&File::open("/proc/self/stat").unwrap()));
        let (_d, f) = shm_file(4096).expect("/dev/shm is tmpfs");
        assert!(on_tmpfs(&f));
    }
}
