//! Locked memory for key material: every root key, CMK version, DEK and key schedule the
//! daemon holds lives in pages that are `mlock`ed (never swapped), `MADV_DONTDUMP` (never in a
//! core dump) and zeroized before they are unlocked or given back.
//!
//! ```text
//!  slab page (mmap, 4 KiB, locked, DONTDUMP): | 64 B slot | 64 B slot | ... |  bitmap of used slots
//!   - an allocation takes contiguous slots; the page is unmapped when its last slot is freed
//!   - larger than a page: a mapping of its own
//!  foreign range (memory another allocator owns, e.g. aws-lc's EVP key schedule):
//!   - RegionLock::new(ptr, len) counts a reference on each page it touches; it is unlocked
//!     when its last reference goes, so two keys on one page never unlock each other
//! ```
//!
//! Why not `mlockall(MCL_CURRENT | MCL_FUTURE)`: it locks and pre-faults every mapping,
//! including each connection thread's whole stack and every I/O buffer. Measured with the real
//! daemon under tests/daemon_memory.rs (mlockall called by an LD_PRELOAD constructor): 1000 idle
//! connections took 2,222,804 KiB RSS (2.2 MB per connection) instead of 109,084 KiB
//! (97 KB), and the base process 28.5 MB instead of 12.5 MB; and with MCL_FUTURE under a
//! finite RLIMIT_MEMLOCK (8 MiB by default for non-root) every allocation past the limit fails
//! (mmap EAGAIN). Locking only key pages costs a page or two per attached volume and context.
//!
//! When the limit is too small the first failure logs one warning with the figures; keys
//! still work, they may then reach swap.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Allocation granularity inside a slab page.
const SLOT: usize = 64;

fn page_size() -> usize {
    static PAGE: AtomicUsize = AtomicUsize::new(0);
    match PAGE.load(Ordering::Relaxed) {
        0 => {
            // SAFETY: sysconf takes no pointers.
            let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            let p = if p > 0 { p as usize } else { 4096 };
            PAGE.store(p, Ordering::Relaxed);
            p
        }
        p => p,
    }
}

/// Bytes this process has locked through this module (for the warning).
static LOCKED_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Locks `[addr, addr+len)` (page-aligned) and excludes it from core dumps. Returns whether
/// the lock took; a failure warns once and is otherwise ignored.
fn lock_pages(addr: usize, len: usize) -> bool {
    // SAFETY: madvise and mlock only act on the address range, which the caller owns or
    // holds live (a mapping of ours, or pages under a live allocation).
    let locked = unsafe {
        libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTDUMP);
        libc::mlock(addr as *const libc::c_void, len) == 0
    };
    if locked {
        LOCKED_BYTES.fetch_add(len, Ordering::Relaxed);
    } else {
        warn_once(len);
    }
    locked
}

fn unlock_pages(addr: usize, len: usize, was_locked: bool) {
    // SAFETY: as in lock_pages; munlock/madvise of a range that is not locked is harmless.
    unsafe {
        libc::munlock(addr as *const libc::c_void, len);
        libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DODUMP);
    }
    if was_locked {
        LOCKED_BYTES.fetch_sub(len, Ordering::Relaxed);
    }
}

fn warn_once(wanted: usize) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let e = std::io::Error::last_os_error();
    WARNED.call_once(|| {
        let (cur, max) = memlock_limit();
        tracing::warn!(
            error = %e,
            rlimit_memlock_kib = cur.map_or(-1, |c| (c / 1024) as i64),
            rlimit_memlock_max_kib = max.map_or(-1, |c| (c / 1024) as i64),
            locked_kib = LOCKED_BYTES.load(Ordering::Relaxed) / 1024,
            wanted_kib = wanted.div_ceil(1024),
            "cannot lock key memory: RLIMIT_MEMLOCK is too small (raise LimitMEMLOCK, or give \
             CAP_IPC_LOCK); keys keep working but may be swapped out"
        );
    });
}

/// RLIMIT_MEMLOCK (soft, hard) in bytes; `None` = unlimited.
pub fn memlock_limit() -> (Option<u64>, Option<u64>) {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid, exclusively borrowed `l`.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut l) } != 0 {
        return (None, None);
    }
    let f = |v: libc::rlim_t| (v != libc::RLIM_INFINITY).then_some(v);
    (f(l.rlim_cur), f(l.rlim_max))
}

/// One mapping of ours: a slab page (slots tracked in `used`) or a large allocation.
struct Mapping {
    base: usize,
    len: usize,
    /// One bit per slot; empty for a large allocation.
    used: Vec<u64>,
    locked: bool,
}

impl Mapping {
    fn new(len: usize, slab: bool) -> Option<Mapping> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        let base = p as usize;
        let locked = lock_pages(base, len);
        let slots = if slab { len / SLOT } else { 0 };
        Some(Mapping {
            base,
            len,
            used: vec![0; slots.div_ceil(64)],
            locked,
        })
    }

    fn slots(&self) -> usize {
        self.len / SLOT
    }

    fn is_used(&self, i: usize) -> bool {
        self.used[i / 64] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, from: usize, n: usize, on: bool) {
        for i in from..from + n {
            if on {
                self.used[i / 64] |= 1 << (i % 64);
            } else {
                self.used[i / 64] &= !(1 << (i % 64));
            }
        }
    }

    /// First run of `n` free slots whose start is aligned to `align` bytes.
    fn find(&self, n: usize, align: usize) -> Option<usize> {
        let step = (align / SLOT).max(1);
        (0..self.slots())
            .step_by(step)
            .take_while(|&s| s + n <= self.slots())
            .find(|&s| (s..s + n).all(|i| !self.is_used(i)))
    }

    fn empty(&self) -> bool {
        self.used.iter().all(|&w| w == 0)
    }

    fn release(self) {
        unlock_pages(self.base, self.len, self.locked);
        // SAFETY: the mapping is ours (mmap in Mapping::new) and nothing points into it any
        // more: its last allocation was freed (and zeroized) by the caller.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// A set of locked mappings. The process uses [`POOL`]; tests make their own.
pub struct Pool {
    maps: Mutex<Vec<Mapping>>,
}

static POOL: Pool = Pool::new();

impl Pool {
    pub const fn new() -> Pool {
        Pool {
            maps: Mutex::new(Vec::new()),
        }
    }

    /// `size` zeroed bytes aligned to `align` (at most 64) in locked memory; aborts like the
    /// global allocator when the system has no memory left.
    pub fn alloc(&self, size: usize, align: usize) -> NonNull<u8> {
        assert!(
            align <= SLOT,
            "locked allocations are at most 64-byte aligned"
        );
        let size = size.max(1);
        let page = page_size();
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        let place = |m: &mut Mapping, s: usize| {
            m.set(s, size.div_ceil(SLOT), true);
            m.base + s * SLOT
        };
        let addr = if size > page {
            let len = size.div_ceil(page) * page;
            let m = Mapping::new(len, false).unwrap_or_else(|| oom(len));
            let a = m.base;
            maps.push(m);
            a
        } else {
            let n = size.div_ceil(SLOT);
            match maps
                .iter_mut()
                .filter(|m| !m.used.is_empty())
                .find_map(|m| m.find(n, align).map(|s| (m, s)))
            {
                Some((m, s)) => place(m, s),
                None => {
                    let mut m = Mapping::new(page, true).unwrap_or_else(|| oom(page));
                    let a = place(&mut m, 0);
                    maps.push(m);
                    a
                }
            }
        };
        NonNull::new(addr as *mut u8).expect("mmap never returns address 0")
    }

    /// Zeroizes and frees what [`Pool::alloc`] returned for `size`; unmaps (and so unlocks)
    /// the mapping when nothing else lives in it.
    ///
    /// # Safety
    /// `ptr` came from `self.alloc(size, _)` and is not used afterwards.
    pub unsafe fn free(&self, ptr: NonNull<u8>, size: usize) {
        let size = size.max(1);
        // SAFETY: per the contract the `size` bytes at ptr are ours and nobody else's.
        unsafe { wipe(ptr.as_ptr(), size) };
        let addr = ptr.as_ptr() as usize;
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        let Some(i) = maps
            .iter()
            .position(|m| (m.base..m.base + m.len).contains(&addr))
        else {
            debug_assert!(false, "free of memory this pool did not allocate");
            return;
        };
        let m = &mut maps[i];
        if !m.used.is_empty() {
            m.set((addr - m.base) / SLOT, size.div_ceil(SLOT), false);
        }
        if m.used.is_empty() || m.empty() {
            maps.swap_remove(i).release();
        }
    }

    /// Mappings held now (tests).
    pub fn mappings(&self) -> usize {
        self.maps.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Default for Pool {
    fn default() -> Pool {
        Pool::new()
    }
}

fn oom(len: usize) -> ! {
    std::alloc::handle_alloc_error(
        std::alloc::Layout::from_size_align(len, 1).expect("a mapping length is a valid layout"),
    )
}

/// Writes zeros over `len` bytes in a way the compiler cannot drop.
///
/// # Safety
/// `p..p+len` is valid for writes.
unsafe fn wipe(p: *mut u8, len: usize) {
    for i in 0..len {
        // SAFETY: in bounds per the contract; volatile so the dead store is kept.
        unsafe { std::ptr::write_volatile(p.add(i), 0) };
    }
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
}

/// A `T` in locked memory: dropped, then its bytes zeroized, then freed. No `Debug`, no
/// `Clone`. The value passed to [`LockedBox::new`] is moved in; a temporary copy may remain
/// in the caller's stack frame until it is overwritten (Rust cannot construct in place), so
/// build key material directly in the box where possible ([`LockedBox::zeroed`]).
pub struct LockedBox<T> {
    ptr: NonNull<T>,
    _owns: PhantomData<T>,
}

// SAFETY: LockedBox owns its T exclusively like Box<T>; sending or sharing it is as safe as
// sending or sharing the T.
unsafe impl<T: Send> Send for LockedBox<T> {}
// SAFETY: as above; &LockedBox<T> only gives &T.
unsafe impl<T: Sync> Sync for LockedBox<T> {}

impl<T> LockedBox<T> {
    pub fn new(value: T) -> LockedBox<T> {
        let ptr = POOL.alloc(size_of::<T>(), align_of::<T>()).cast::<T>();
        // SAFETY: fresh, suitably aligned allocation of size_of::<T>() bytes.
        unsafe { ptr.as_ptr().write(value) };
        LockedBox {
            ptr,
            _owns: PhantomData,
        }
    }
}

impl<const N: usize> LockedBox<[u8; N]> {
    /// N zero bytes, made in locked memory (no copy anywhere else).
    pub fn zeroed() -> LockedBox<[u8; N]> {
        LockedBox {
            // Pool memory is zeroed: fresh mappings are, and free() wipes every slot.
            ptr: POOL.alloc(N, 1).cast(),
            _owns: PhantomData,
        }
    }
}

impl<T> std::ops::Deref for LockedBox<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: ptr holds an initialised T owned by self for self's lifetime.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> std::ops::DerefMut for LockedBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in deref; &mut self gives exclusive access.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for LockedBox<T> {
    fn drop(&mut self) {
        // SAFETY: the T is initialised and dropped exactly once, here; then its bytes, which
        // came from POOL.alloc(size_of::<T>()), are wiped and freed and never used again.
        unsafe {
            std::ptr::drop_in_place(self.ptr.as_ptr());
            POOL.free(self.ptr.cast(), size_of::<T>());
        }
    }
}

/// A byte buffer of fixed length in locked memory (the storage of `kms::Secret`).
pub struct LockedBytes {
    ptr: NonNull<u8>,
    len: usize,
    /// Bytes allocated (`len` may shrink below it).
    cap: usize,
}

// SAFETY: owns its bytes exclusively, like Box<[u8]>.
unsafe impl Send for LockedBytes {}
// SAFETY: as above; &LockedBytes only gives &[u8].
unsafe impl Sync for LockedBytes {}

impl LockedBytes {
    pub fn zeroed(len: usize) -> LockedBytes {
        LockedBytes {
            ptr: POOL.alloc(len, 1),
            len,
            cap: len,
        }
    }

    pub fn from_slice(b: &[u8]) -> LockedBytes {
        let mut l = LockedBytes::zeroed(b.len());
        l.copy_from_slice(b);
        l
    }

    /// Shortens to `len` bytes (no-op if longer); the cut bytes are zeroized now.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            self[len..].fill(0);
            std::sync::atomic::compiler_fence(Ordering::SeqCst);
            // The allocation keeps its size (freed with `cap`); only the view shrinks.
            self.len = len;
        }
    }
}

impl std::ops::Deref for LockedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr holds at least len initialised (zeroed or written) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for LockedBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref; &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for LockedBytes {
    fn drop(&mut self) {
        // SAFETY: ptr came from POOL.alloc(cap, _) and is not used after this.
        unsafe { POOL.free(self.ptr, self.cap) };
    }
}

/// A lock on a range of memory some other allocator owns (aws-lc's key schedules). Pages are
/// reference-counted across all such locks: a page stays locked while any lock touches it.
/// Drop it *after* the owner has wiped and freed the memory.
pub struct RegionLock {
    first_page: usize,
    pages: usize,
}

static REGIONS: Mutex<BTreeMap<usize, (u32, bool)>> = Mutex::new(BTreeMap::new());

impl RegionLock {
    /// Locks every page that `[ptr, ptr+len)` touches.
    pub fn new(ptr: *const u8, len: usize) -> RegionLock {
        let page = page_size();
        let start = ptr as usize / page * page;
        let end = (ptr as usize + len.max(1)).div_ceil(page) * page;
        let pages = (end - start) / page;
        let mut map = REGIONS.lock().unwrap_or_else(|e| e.into_inner());
        for p in 0..pages {
            let addr = start + p * page;
            let e = map.entry(addr).or_insert((0, false));
            if e.0 == 0 {
                e.1 = lock_pages(addr, page);
            }
            e.0 += 1;
        }
        RegionLock {
            first_page: start,
            pages,
        }
    }
}

impl Drop for RegionLock {
    fn drop(&mut self) {
        let page = page_size();
        let mut map = REGIONS.lock().unwrap_or_else(|e| e.into_inner());
        for p in 0..self.pages {
            let addr = self.first_page + p * page;
            if let Some(e) = map.get_mut(&addr) {
                e.0 -= 1;
                if e.0 == 0 {
                    let locked = e.1;
                    map.remove(&addr);
                    unlock_pages(addr, page, locked);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `VmFlags` of the mapping holding `addr` in /proc/self/smaps, or None if unmapped.
    fn vm_flags(addr: usize) -> Option<Vec<String>> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-')
                && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            {
                inside = (a..b).contains(&addr);
                continue;
            }
            if inside && let Some(f) = line.strip_prefix("VmFlags:") {
                return Some(f.split_whitespace().map(str::to_owned).collect());
            }
        }
        None
    }

    fn locked(addr: usize) -> bool {
        vm_flags(addr).is_some_and(|f| f.iter().any(|x| x == "lo"))
    }

    fn no_dump(addr: usize) -> bool {
        vm_flags(addr).is_some_and(|f| f.iter().any(|x| x == "dd"))
    }

    fn can_lock() -> bool {
        // Root (CAP_IPC_LOCK) or a limit with room for the few pages these tests lock.
        memlock_limit().0.is_none_or(|l| l >= 64 * 1024)
            || std::fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    }

    #[test]
    fn two_secrets_share_a_page_and_it_stays_locked_until_the_last_goes() {
        assert!(can_lock(), "RLIMIT_MEMLOCK leaves no room for the test");
        let pool = Pool::new();
        let a = pool.alloc(64, 8);
        let b = pool.alloc(32, 1);
        let page = page_size();
        let pa = a.as_ptr() as usize / page;
        assert_eq!(pa, b.as_ptr() as usize / page, "both on one page");
        assert_eq!(pool.mappings(), 1);
        assert!(locked(a.as_ptr() as usize), "page locked");
        assert!(
            no_dump(a.as_ptr() as usize),
            "page excluded from core dumps"
        );
        // SAFETY: b is 32 bytes of ours.
        unsafe { std::ptr::write_bytes(b.as_ptr(), 0xAB, 32) };
        // SAFETY: a came from pool.alloc(64, _) and is not used again.
        unsafe { pool.free(a, 64) };
        assert!(
            locked(b.as_ptr() as usize),
            "page still locked: b lives on it"
        );
        // SAFETY: b is still ours; its bytes are intact and a's slot was wiped.
        unsafe {
            assert!(
                std::slice::from_raw_parts(b.as_ptr(), 32)
                    .iter()
                    .all(|&x| x == 0xAB)
            );
            assert!(
                std::slice::from_raw_parts(a.as_ptr(), 64)
                    .iter()
                    .all(|&x| x == 0)
            );
        }
        // SAFETY: b came from pool.alloc(32, _) and is not used again.
        unsafe { pool.free(b, 32) };
        // munmap unlocks the page. Its address is not looked at again: another test thread
        // may map (and lock) a new page at the same address at once.
        assert_eq!(pool.mappings(), 0, "empty page given back");
    }

    #[test]
    fn slots_are_reused_aligned_and_large_allocations_get_their_own_mapping() {
        let pool = Pool::new();
        let a = pool.alloc(10, 1);
        let b = pool.alloc(100, 64);
        assert_eq!(b.as_ptr() as usize % 64, 0);
        assert_ne!(a, b);
        let big = pool.alloc(3 * page_size() + 1, 8);
        assert_eq!(pool.mappings(), 2);
        assert!(locked(big.as_ptr() as usize + 3 * page_size()));
        // SAFETY: each pointer is freed once with its size.
        unsafe {
            pool.free(big, 3 * page_size() + 1);
            pool.free(a, 10);
        }
        let c = pool.alloc(64, 1);
        assert_eq!(c, a, "the freed slot is taken again");
        // SAFETY: as above.
        unsafe {
            pool.free(b, 100);
            pool.free(c, 64);
        }
        assert_eq!(pool.mappings(), 0);
    }

    #[test]
    fn region_locks_are_counted_per_page() {
        // A page of our own in the ordinary heap, as aws-lc's key schedules are.
        let page = page_size();
        let layout = std::alloc::Layout::from_size_align(2 * page, page).unwrap();
        // SAFETY: a non-zero-size layout.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!p.is_null());
        let addr = p as usize;
        assert!(!locked(addr));
        let one = RegionLock::new(p, 100);
        // SAFETY: p + 200 is inside the allocation.
        let two = RegionLock::new(unsafe { p.add(200) }, 100);
        assert!(locked(addr));
        drop(one);
        assert!(locked(addr), "the other lock on the page keeps it locked");
        drop(two);
        assert!(!locked(addr), "last lock gone: unlocked");
        // A range across a page boundary locks both pages.
        // SAFETY: p + page - 8 .. + 16 is inside the allocation.
        let across = RegionLock::new(unsafe { p.add(page - 8) }, 16);
        assert!(locked(addr) && locked(addr + page));
        drop(across);
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(p, layout) };
    }

    #[test]
    fn locked_box_and_bytes_round_trip() {
        let mut k = LockedBox::<[u8; 64]>::zeroed();
        k[3] = 7;
        assert_eq!(k[3], 7);
        assert!(locked(k.as_ptr() as usize));
        let mut s = LockedBytes::from_slice(&[1, 2, 3, 4, 5]);
        s.truncate(2);
        assert_eq!(&s[..], &[1, 2]);
        let v = LockedBox::new(vec![1u8, 2, 3]);
        assert_eq!(v.len(), 3);
    }
}
