//! Block stores: positional I/O under a volume, like redb's `StorageBackend`. [`FileStore`] is a
//! sparse file; [`MemStore`] is its in-memory twin for tests (and fault injection).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use super::direct::{self, CacheMode, DirectError};
pub use super::mapped::Window;

/// What a store calls when an I/O started without waiting ([`BlockStore::read_at_async`],
/// [`BlockStore::write_at_async`]) is done: its buffer back, and the result. Called once, on a
/// thread of the store's library (librbd's), so it must only hand the work on: no I/O, no
/// cryptography, nothing that may block or panic.
pub type AioDone = Box<dyn FnOnce(crate::aligned::AlignedBuf, io::Result<()>) + Send>;

#[allow(
    clippy::len_without_is_empty,
    reason = "a store is never empty: it holds the headers"
)]
pub trait BlockStore: Send + Sync {
    /// Fills `buf` from `offset`; bytes past the end read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Like [`read_at`](Self::read_at) when that would not wait for a device; `Ok(false)`
    /// (contents of `buf` unspecified) when it would, e.g. the data is not in the page cache.
    /// A store that cannot tell just reads.
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        self.read_at(buf, offset).map(|()| true)
    }
    /// Writes all of `buf` at `offset`, extending the store if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// `[offset, offset + len)` as memory to read in place (a file on tmpfs: its mapping,
    /// `mapped.rs`), where the store has it so and the range holds data (no hole); `None`:
    /// use [`read_at`](Self::read_at). Never waits for a device. The caller checks
    /// [`Window::finish`] after reading. Not for encrypt-zeroes volumes: a read racing a
    /// punch of the same range could fault the punched page back in as allocated zeros,
    /// which such a volume reads as ciphertext (a thin volume reads them as zeros, as after
    /// the punch).
    fn mapped(&self, _offset: u64, _len: usize) -> Option<Window<'_>> {
        None
    }
    /// Starts filling `buf` from `offset` without a thread waiting for the device, where the
    /// store can (RBD: librbd's aio) and the range lies within the store; `done` is called
    /// once it is in ([`AioDone`]). `Err` gives both back, nothing started: use
    /// [`read_at`](Self::read_at). The buffer stays the store's until `done`.
    fn read_at_async(
        &self,
        buf: crate::aligned::AlignedBuf,
        _offset: u64,
        done: AioDone,
    ) -> Result<(), (crate::aligned::AlignedBuf, AioDone)> {
        Err((buf, done))
    }
    /// Starts writing `buf` at `offset` without a thread waiting, as
    /// [`read_at_async`](Self::read_at_async) (never extends the store).
    fn write_at_async(
        &self,
        buf: crate::aligned::AlignedBuf,
        _offset: u64,
        done: AioDone,
    ) -> Result<(), (crate::aligned::AlignedBuf, AioDone)> {
        Err((buf, done))
    }
    /// Everything written before this call is durable when it returns.
    fn sync(&self) -> io::Result<()>;
    /// The range reads as zeros afterwards and, where possible, frees its space.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Sets the length (growing leaves a hole).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Allocation of `[offset, offset+len)` as (length, is_hole) runs in order.
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>>;
    /// The granularity of allocation: a write allocates (and zero-fills) whole blocks of this
    /// size. Encrypt-zeroes volumes need units at least this large (a smaller unit written
    /// into a hole would leave its neighbours as allocated zero bytes, which such a volume
    /// reads as ciphertext). Unknown by default: no such volume opens on the store.
    fn allocation_unit(&self) -> u64 {
        u64::MAX
    }
    /// Whether every write waits for the network (RBD), so callers should not make it on a
    /// thread that serves anything else meanwhile.
    fn writes_wait(&self) -> bool {
        false
    }
    /// The granule a write is done in: 1 for stores that write any byte range as such; for a
    /// direct-I/O file ([`FileStore::direct`]) its block (512 or 4096), and a write that
    /// covers a block partly reads and rewrites the whole block, so callers must keep other
    /// writes of that block out meanwhile ([`Volume`](super::Volume) locks per granule).
    fn io_align(&self) -> u64 {
        1
    }
    /// Takes the store's own snapshot `name` (an RBD snapshot) of everything written before
    /// the call. Stores without snapshots of their own: `Unsupported`.
    fn native_snapshot(&self, _name: &str) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this store takes no snapshots of its own",
        ))
    }
}

/// A shared store is a store (tests keep a handle to inspect or inject faults).
impl<T: BlockStore + ?Sized> BlockStore for std::sync::Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        (**self).read_at_nowait(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn mapped(&self, offset: u64, len: usize) -> Option<Window<'_>> {
        (**self).mapped(offset, len)
    }
    fn read_at_async(
        &self,
        buf: crate::aligned::AlignedBuf,
        offset: u64,
        done: AioDone,
    ) -> Result<(), (crate::aligned::AlignedBuf, AioDone)> {
        (**self).read_at_async(buf, offset, done)
    }
    fn write_at_async(
        &self,
        buf: crate::aligned::AlignedBuf,
        offset: u64,
        done: AioDone,
    ) -> Result<(), (crate::aligned::AlignedBuf, AioDone)> {
        (**self).write_at_async(buf, offset, done)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn native_snapshot(&self, name: &str) -> io::Result<()> {
        (**self).native_snapshot(name)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).punch_hole(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        (**self).allocation(offset, len)
    }
    fn allocation_unit(&self) -> u64 {
        (**self).allocation_unit()
    }
    fn writes_wait(&self) -> bool {
        (**self).writes_wait()
    }
    fn io_align(&self) -> u64 {
        (**self).io_align()
    }
}

/// A sparse file: pread/pwrite, fdatasync, fallocate(PUNCH_HOLE), SEEK_DATA/SEEK_HOLE;
/// through the page cache, or with O_DIRECT (`cache none`, [`super::direct`]).
pub struct FileStore {
    file: File,
    /// Set once the file system refused `RWF_NOWAIT` (tmpfs does): plain reads from then on.
    no_nowait: AtomicBool,
    /// O_DIRECT: the alignment every transfer needs (0: page cache).
    direct: usize,
    /// The last data found by [`BlockStore::allocation`], until a punch ([`DataSpan`]).
    span: super::dataspan::DataSpan,
    /// On tmpfs: the file mapped for reads ([`BlockStore::mapped`]), made at the first one.
    map: std::sync::OnceLock<Option<super::mapped::Mapping>>,
}

impl FileStore {
    pub fn new(file: File) -> FileStore {
        FileStore {
            file,
            no_nowait: AtomicBool::new(false),
            direct: 0,
            span: Default::default(),
            map: Default::default(),
        }
    }

    /// A store over `file` opened with O_DIRECT, whose transfers need `align` (a power of two,
    /// at most 4096: [`super::direct::open_direct`] finds it).
    pub fn direct(file: File, align: usize) -> FileStore {
        debug_assert!(align.is_power_of_two() && align <= crate::aligned::ALIGN);
        FileStore {
            file,
            no_nowait: AtomicBool::new(true),
            direct: align,
            span: Default::default(),
            map: Default::default(),
        }
    }

    /// Opens `path` in `cache` mode (read-write unless `read_only`).
    pub fn open(
        path: &std::path::Path,
        read_only: bool,
        cache: CacheMode,
    ) -> Result<FileStore, DirectError> {
        match cache {
            CacheMode::Writeback => Ok(FileStore::new(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(!read_only)
                    .open(path)?,
            )),
            CacheMode::None => {
                let (file, align) = direct::open_direct(path, read_only)?;
                Ok(FileStore::direct(file, align))
            }
        }
    }
}

impl BlockStore for FileStore {
    fn allocation_unit(&self) -> u64 {
        // The file system's block (st_blksize: 4096 on ext4, XFS, btrfs, tmpfs; the record
        // size on ZFS; larger on some network file systems).
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map_or(u64::MAX, |m| m.blksize())
    }
    fn io_align(&self) -> u64 {
        self.direct.max(1) as u64
    }
    fn writes_wait(&self) -> bool {
        // A direct write returns once the device has the data: not for a latency-critical
        // thread.
        self.direct != 0
    }
    fn read_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        if self.direct != 0 {
            return if direct::aligned(buf, offset, self.direct) {
                direct::read_direct(&self.file, buf, offset)
            } else {
                direct::read_bounced(&self.file, buf, offset, self.direct)
            };
        }
        while !buf.is_empty() {
            match self.file.read_at(buf, offset) {
                Ok(0) => {
                    buf.fill(0);
                    return Ok(());
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        if self.direct != 0 {
            // No page cache to find the data in: every direct read waits for the device.
            return Ok(false);
        }
        if self.no_nowait.load(Ordering::Relaxed) {
            return self.read_at(buf, offset).map(|()| true);
        }
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        loop {
            // std has no preadv2; RWF_NOWAIT is the one flag that matters here.
            // SAFETY: `iov` describes `buf`, valid for writes of its length for the call; the
            // fd is owned by `self.file`.
            let n = unsafe {
                libc::preadv2(
                    self.file.as_raw_fd(),
                    &iov,
                    1,
                    offset as libc::off_t,
                    libc::RWF_NOWAIT,
                )
            };
            if n >= 0 {
                let n = n as usize;
                if n == buf.len() {
                    return Ok(true);
                }
                if n == 0 && offset >= self.file.metadata()?.len() {
                    buf.fill(0); // past the end, as read_at
                    return Ok(true);
                }
                // Short: the rest is not cached. The caller reads it all again, waiting.
                return Ok(false);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => return Ok(false),
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP) => {
                    self.no_nowait.store(true, Ordering::Relaxed);
                    return self.read_at(buf, offset).map(|()| true);
                }
                _ => return Err(e),
            }
        }
    }
    fn mapped(&self, offset: u64, len: usize) -> Option<Window<'_>> {
        if self.direct != 0 {
            return None;
        }
        let map = self
            .map
            .get_or_init(|| {
                let len = self.file.metadata().ok()?.len();
                super::mapped::on_tmpfs(&self.file)
                    .then(|| super::mapped::Mapping::new(&self.file, len))
                    .flatten()
            })
            .as_ref()?;
        // Data only: a read fault in a tmpfs hole allocates a page there (pread reads holes
        // without), which would fill the file system with a sparse volume's zeros. Inside
        // the remembered data span, or every page resident (not SEEK_DATA/SEEK_HOLE: from
        // inside a large extent SEEK_HOLE walks all of it, see `dataspan.rs`).
        let end = offset.checked_add(len as u64)?;
        let data =
            self.span.data_end(offset).is_some_and(|e| e >= end) || map.resident(offset, len);
        if !data {
            return None;
        }
        map.window(offset, len)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.direct != 0 && !direct::aligned(buf, offset, self.direct) {
            return direct::write_bounced(&self.file, buf, offset, self.direct);
        }
        self.file.write_all_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        // Also with O_DIRECT: the data may sit in the device's volatile write cache.
        self.file.sync_data()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let r = sys::punch_hole(self.file.as_raw_fd(), offset, len);
        // Also after a failed punch: part of the range may be a hole now.
        self.span.punched();
        r
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        // Before the file shrinks: no window may reach past its new end.
        if let Some(Some(m)) = self.map.get() {
            m.shrink(len);
        }
        let r = self.file.set_len(len);
        self.span.punched();
        r
    }
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        let fd = self.file.as_raw_fd();
        let end = offset + len;
        let mut runs = Vec::new();
        let mut pos = offset;
        let generation = self.span.generation();
        while pos < end {
            // Inside the data found last time: no seek (see `dataspan.rs`).
            if let Some(data_end) = self.span.data_end(pos) {
                let to = data_end.min(end);
                runs.push((to - pos, false));
                pos = to;
                continue;
            }
            // Where does data start at or after pos? ENXIO: no more data -> hole to the end.
            let data = sys::seek(fd, pos, libc::SEEK_DATA)?.unwrap_or(end).min(end);
            if data > pos {
                runs.push((data - pos, true));
                pos = data;
                continue;
            }
            let found = sys::seek(fd, pos, libc::SEEK_HOLE)?;
            if let Some(h) = found {
                self.span.remember(pos, h, generation);
            }
            let hole = found.unwrap_or(end).min(end);
            let hole = hole.max(pos + 1).min(end);
            runs.push((hole - pos, false));
            pos = hole;
        }
        Ok(runs)
    }
}

/// The few syscalls std lacks.
#[allow(unsafe_code)]
mod sys {
    use std::io;
    use std::os::fd::RawFd;

    pub fn punch_hole(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate only reads its integer arguments; fd is owned by the caller's File
        // for the duration of the call.
        let r = unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// lseek with SEEK_DATA/SEEK_HOLE; `None` for ENXIO (no data/hole past `offset`).
    pub fn seek(fd: RawFd, offset: u64, whence: i32) -> io::Result<Option<u64>> {
        let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: lseek only reads its integer arguments; fd is valid for the call (see above).
        let r = unsafe { libc::lseek(fd, off, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    }
}

/// In-memory store: 4 KiB pages, absent pages are holes. Can be told to fail writes (tests of
/// ENOSPC/EIO paths) or to stop after a byte budget (crash cuts).
#[derive(Default)]
pub struct MemStore {
    inner: RwLock<MemInner>,
}

#[derive(Default)]
struct MemInner {
    pages: std::collections::BTreeMap<u64, Box<[u8; PAGE]>>,
    len: u64,
    /// Remaining bytes writes may store before failing with `fail_errno`; None = unlimited.
    write_budget: Option<u64>,
    fail_errno: i32,
}

const PAGE: usize = 4096;

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }
    /// After `bytes` more bytes, writes fail with `errno` (a partial write keeps its prefix).
    pub fn fail_after(&self, bytes: u64, errno: i32) {
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        g.write_budget = Some(bytes);
        g.fail_errno = errno;
    }
    /// An independent copy, holes kept, no fault set: the store as a crash left it.
    pub fn duplicate(&self) -> MemStore {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        MemStore {
            inner: RwLock::new(MemInner {
                pages: g.pages.clone(),
                len: g.len,
                write_budget: None,
                fail_errno: 0,
            }),
        }
    }
    /// A copy of the whole content (for crash-cut tests).
    pub fn snapshot(&self) -> Vec<u8> {
        let len = self.len().unwrap_or(0) as usize;
        let mut v = vec![0u8; len];
        let _ = self.read_at(&mut v, 0);
        v
    }
}

impl BlockStore for MemStore {
    fn allocation_unit(&self) -> u64 {
        PAGE as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (page, within) = (pos / PAGE as u64, (pos % PAGE as u64) as usize);
            let n = (PAGE - within).min(buf.len() - done);
            match g.pages.get(&page) {
                Some(p) => buf[done..done + n].copy_from_slice(&p[within..within + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let mut allowed = buf.len();
        if let Some(budget) = g.write_budget {
            allowed = allowed.min(budget as usize);
            g.write_budget = Some(budget - allowed as u64);
        }
        let mut done = 0usize;
        while done < allowed {
            let pos = offset + done as u64;
            let (page, within) = (pos / PAGE as u64, (pos % PAGE as u64) as usize);
            let n = (PAGE - within).min(allowed - done);
            let p = g.pages.entry(page).or_insert_with(|| Box::new([0u8; PAGE]));
            p[within..within + n].copy_from_slice(&buf[done..done + n]);
            done += n;
        }
        g.len = g.len.max(offset + allowed as u64);
        if allowed < buf.len() {
            return Err(io::Error::from_raw_os_error(g.fail_errno));
        }
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let end = offset + len;
        let first_whole = offset.div_ceil(PAGE as u64);
        let last_whole = end / PAGE as u64;
        // A range inside one page has first_whole > last_whole: no whole page to drop.
        let keys: Vec<u64> = g
            .pages
            .range(first_whole..last_whole.max(first_whole))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            g.pages.remove(&k);
        }
        drop(g);
        // Partial pages at the edges are zeroed in place.
        let zero_edge = |from: u64, to: u64| -> io::Result<()> {
            if to > from {
                let z = vec![0u8; (to - from) as usize];
                let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
                for (i, b) in z.iter().enumerate() {
                    let pos = from + i as u64;
                    if let Some(p) = g.pages.get_mut(&(pos / PAGE as u64)) {
                        p[(pos % PAGE as u64) as usize] = *b;
                    }
                }
            }
            Ok(())
        };
        zero_edge(offset, (first_whole * PAGE as u64).min(end))?;
        zero_edge((last_whole * PAGE as u64).max(offset), end)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.inner.read().unwrap_or_else(|e| e.into_inner()).len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        g.len = len;
        let cut = len.div_ceil(PAGE as u64);
        g.pages.split_off(&cut);
        Ok(())
    }
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let page = pos / PAGE as u64;
            let n = ((page + 1) * PAGE as u64).min(end) - pos;
            let hole = !g.pages.contains_key(&page);
            match runs.last_mut() {
                Some(last) if last.1 == hole => last.0 += n,
                _ => runs.push((n, hole)),
            }
            pos += n;
        }
        Ok(runs)
    }
}

/// Walks the allocation map of `[from, to)` in windows, calling `f(at, len, is_hole)` for
/// each run in order; `f` returns `Ok(false)` to stop. `query(at, len)` gives one window's
/// runs (they cover it). A window that is one hole doubles the next (up to the rest), so an
/// empty 8 EiB range costs ~33 queries instead of 2^33 windows of 1 GiB; a window with data
/// starts again at 1 GiB, which bounds the runs held at once.
pub fn walk_allocation<E>(
    from: u64,
    to: u64,
    mut query: impl FnMut(u64, u64) -> Result<Vec<(u64, bool)>, E>,
    mut f: impl FnMut(u64, u64, bool) -> Result<bool, E>,
) -> Result<(), E> {
    const WINDOW: u64 = 1 << 30;
    let mut window = WINDOW;
    let mut pos = from;
    while pos < to {
        let len = window.min(to - pos);
        let runs = query(pos, len)?;
        let all_hole = runs.iter().all(|&(_, hole)| hole);
        let mut at = pos;
        for (n, hole) in runs {
            let n = n.min(pos + len - at);
            if n > 0 && !f(at, n, hole)? {
                return Ok(());
            }
            at += n;
        }
        pos += len;
        window = if all_hole {
            window.saturating_mul(2)
        } else {
            WINDOW
        };
    }
    Ok(())
}

/// The length of the hole at the start of `[from, to)` (0 if data is there), found with
/// [`walk_allocation`].
pub fn leading_hole<E>(
    from: u64,
    to: u64,
    query: impl FnMut(u64, u64) -> Result<Vec<(u64, bool)>, E>,
) -> Result<u64, E> {
    let mut hole = 0u64;
    walk_allocation(from, to, query, |_, n, is_hole| {
        if is_hole {
            hole += n;
        }
        Ok(is_hole)
    })?;
    Ok(hole)
}

#[cfg(test)]
mod walk_tests {
    use super::*;

    /// A map of an 8 EiB range with data at two places; queries are counted.
    fn sparse_map(at: u64, len: u64, data: &[(u64, u64)]) -> Vec<(u64, bool)> {
        let mut runs = Vec::new();
        let mut p = at;
        let end = at + len;
        for &(s, e) in data {
            let (s, e) = (s.max(p), e.min(end));
            if s >= e {
                continue;
            }
            if s > p {
                runs.push((s - p, true));
            }
            runs.push((e - s, false));
            p = e;
        }
        if p < end {
            runs.push((end - p, true));
        }
        runs
    }

    #[test]
    fn walks_an_exabyte_range_in_few_queries_and_finds_every_run() {
        let to = (i64::MAX as u64) - (1 << 20);
        let data = [(5 << 40, (5 << 40) + 4096), (to - 8192, to - 4096)];
        let mut queries = 0;
        let mut seen = Vec::new();
        let mut covered = 0u64;
        walk_allocation::<()>(
            0,
            to,
            |at, len| {
                queries += 1;
                Ok(sparse_map(at, len, &data))
            },
            |at, n, hole| {
                assert_eq!(at, covered, "runs in order, no gaps");
                covered += n;
                if !hole {
                    seen.push((at, at + n));
                }
                Ok(true)
            },
        )
        .unwrap();
        assert_eq!(covered, to);
        assert_eq!(seen, data);
        assert!(queries < 200, "{queries} queries");
        let lead = leading_hole::<()>(0, to, |at, len| Ok(sparse_map(at, len, &data))).unwrap();
        assert_eq!(lead, 5 << 40);
        let none = leading_hole::<()>(0, to, |at, len| Ok(sparse_map(at, len, &[]))).unwrap();
        assert_eq!(none, to);
    }
}
