//! Point-in-time snapshots of a volume file while it is written.
//!
//! ```text
//!  quiesce (all stripe locks of the Volume held exclusively: microseconds):
//!    install a CowState in the Volume's CowSlot; release
//!  after the quiesce:
//!    writer (stripe locks held) ─▶ CowSlot::before_write ─▶ chunk not copied yet?
//!                                  copy its old ciphertext into the snapshot file first
//!    copier thread ──────────────▶ every chunk with data not copied yet (holes skipped)
//!  "copy" a chunk: FICLONERANGE where the file system shares blocks (XFS, btrfs: reflink
//!  path, no data moves), else read + write of its data extents (copy path).
//! ```
//! A chunk ([`CHUNK`] bytes of the data area) is copied once, under its shard's lock, by
//! whoever comes first: the copier's position says which chunks are done, and a small set
//! per shard the chunks writers copied ahead of it (never a bitmap of the whole volume).
//! The snapshot file is built under a temporary name and renamed by the daemon once the
//! copy is complete and synced.
//! Copies are of ciphertext: the XTS tweak is the unit number, so a snapshot (and a clone)
//! decrypts with the same DEK. A whole-file FICLONE inside the quiesce was tried first: XFS
//! writes the dirty pages back and walks every extent in the call, seconds under load.
//! Snapshot files carry a [`SnapRecord`] in the last 4 KiB before the data area (after the
//! two header copies, far from them).

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use uuid::Uuid;

use super::VolumeError;
use super::store::{BlockStore, FileStore};

/// Copy-before-write granularity: bytes of the data area tracked by one bit.
pub const CHUNK: u64 = 64 << 10;
const LOCKS: usize = 256;
/// Length of the snapshot record.
pub const RECORD_LEN: usize = 4096;
const RECORD_MAGIC: &[u8; 8] = b"CVSNAPSH";
const RECORD_VERSION: u32 = 1;
const RECORD_SUM_AT: usize = RECORD_LEN - 32;
/// Longest `NAME@SNAP` a record holds.
const RECORD_NAME_MAX: usize = 256;

/// Where a snapshot's record sits: the 4 KiB just before the data area.
pub fn record_offset(data_offset: u64) -> u64 {
    data_offset.saturating_sub(RECORD_LEN as u64)
}

/// What makes a snapshot file this snapshot and no other: written once when it is made,
/// checked against the daemon's registry when it is opened (a swapped file is refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapRecord {
    pub snapshot_id: Uuid,
    pub volume_id: Uuid,
    /// Unix seconds.
    pub created: u64,
    /// `NAME@SNAP`.
    pub name: String,
}

impl SnapRecord {
    pub fn encode(&self) -> Result<[u8; RECORD_LEN], VolumeError> {
        if self.name.is_empty() || self.name.len() > RECORD_NAME_MAX {
            return Err(VolumeError::Invalid("snapshot name too long"));
        }
        let mut b = [0u8; RECORD_LEN];
        b[0..8].copy_from_slice(RECORD_MAGIC);
        b[8..12].copy_from_slice(&RECORD_VERSION.to_le_bytes());
        b[16..32].copy_from_slice(self.snapshot_id.as_bytes());
        b[32..48].copy_from_slice(self.volume_id.as_bytes());
        b[48..56].copy_from_slice(&self.created.to_le_bytes());
        b[56..58].copy_from_slice(&(self.name.len() as u16).to_le_bytes());
        b[64..64 + self.name.len()].copy_from_slice(self.name.as_bytes());
        let sum = digest::digest(&digest::SHA256, &b[..RECORD_SUM_AT]);
        b[RECORD_SUM_AT..].copy_from_slice(sum.as_ref());
        Ok(b)
    }

    /// Any bytes give a record or an error, never a panic.
    pub fn decode(b: &[u8]) -> Result<SnapRecord, VolumeError> {
        let bad = |why: &'static str| Err(VolumeError::BadHeader(why));
        if b.len() < RECORD_LEN || &b[0..8] != RECORD_MAGIC {
            return bad("not a snapshot (no snapshot record)");
        }
        let b = &b[..RECORD_LEN];
        if digest::digest(&digest::SHA256, &b[..RECORD_SUM_AT]).as_ref() != &b[RECORD_SUM_AT..] {
            return bad("snapshot record checksum mismatch");
        }
        if u32::from_le_bytes([b[8], b[9], b[10], b[11]]) != RECORD_VERSION {
            return bad("unsupported snapshot record version");
        }
        let len = usize::from(u16::from_le_bytes([b[56], b[57]]));
        if len == 0 || len > RECORD_NAME_MAX {
            return bad("snapshot record name length out of range");
        }
        let name = std::str::from_utf8(&b[64..64 + len])
            .map_err(|_| VolumeError::BadHeader("snapshot record name is not text"))?;
        Ok(SnapRecord {
            snapshot_id: Uuid::from_bytes(b[16..32].try_into().expect("16 bytes")),
            volume_id: Uuid::from_bytes(b[32..48].try_into().expect("16 bytes")),
            created: u64::from_le_bytes(b[48..56].try_into().expect("8 bytes")),
            name: name.to_owned(),
        })
    }

    /// Reads the record of the snapshot file in `store` (data area at `data_offset`).
    pub fn read(store: &dyn BlockStore, data_offset: u64) -> Result<SnapRecord, VolumeError> {
        let mut b = [0u8; RECORD_LEN];
        store.read_at(&mut b, record_offset(data_offset))?;
        SnapRecord::decode(&b)
    }
}

/// `ioctl(FICLONE)`: `dst` becomes a copy of `src` sharing its blocks (XFS, btrfs). Fails
/// with EOPNOTSUPP/EXDEV/EINVAL/ENOTTY where the file system cannot.
pub fn reflink(src: &File, dst: &File) -> io::Result<()> {
    sys::ficlone(src, dst)
}

/// `ioctl(FICLONERANGE)`: `len` bytes of `src` at `src_off` shared into `dst` at `dst_off`
/// (offsets and length block-aligned, or the range reaching the end of `src`).
pub fn reflink_range(
    src: &File,
    src_off: u64,
    len: u64,
    dst: &File,
    dst_off: u64,
) -> io::Result<()> {
    sys::ficlonerange(src, src_off, len, dst, dst_off)
}

/// Whether a [`reflink`] error means "cannot here, copy instead".
pub fn reflink_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS)
    )
}

/// Copies `[from, to)` of `src` to the same offsets of `dst`, data extents only: holes stay
/// holes. `thin`: all-zero 4 KiB blocks are skipped too (they read as zeros there either
/// way); an encrypt-zeroes volume keeps allocated zeros (they are ciphertext). Returns the
/// bytes written.
pub fn copy_sparse(
    src: &dyn BlockStore,
    dst: &dyn BlockStore,
    from: u64,
    to: u64,
    thin: bool,
    buf: &mut Vec<u8>,
) -> io::Result<u64> {
    const PIECE: u64 = 1 << 20;
    let mut written = 0u64;
    let mut at = from;
    for (len, hole) in src.allocation(from, to.saturating_sub(from))? {
        let end = at + len;
        if !hole {
            let mut p = at;
            while p < end {
                let n = (end - p).min(PIECE) as usize;
                buf.resize(n, 0);
                src.read_at(&mut buf[..n], p)?;
                if thin {
                    let mut q = 0usize;
                    while q < n {
                        let k = (n - q).min(4096);
                        let piece = &buf[q..q + k];
                        if !crate::zeroes::is_zero(piece) {
                            dst.write_at(piece, p + q as u64)?;
                            written += k as u64;
                        }
                        q += k;
                    }
                } else {
                    dst.write_at(&buf[..n], p)?;
                    written += n as u64;
                }
                p += n as u64;
            }
        }
        at = end;
    }
    Ok(written)
}

/// The state of one copy-path snapshot in the making: which chunks are already copied
/// and the files. Shared by the volume's write path (while attached) and the copier.
pub struct CowState {
    src: FileStore,
    dst: FileStore,
    /// `Some`: chunks are shared with FICLONERANGE (XFS, btrfs), not copied.
    reflink: Option<(File, File)>,
    data_offset: u64,
    size: u64,
    thin: bool,
    /// Chunks copied by writers ahead of the copier, sharded by chunk number; each shard's
    /// lock is also the lock a chunk is copied under. Only chunks written while the copy
    /// runs are here (the copier drops each as it passes it), so memory follows the writes,
    /// not the volume's size: a bitmap of an 8 EiB volume would be 16 TiB.
    copied: Vec<Mutex<HashSet<u64>>>,
    /// Bytes of the data area the copier has gone past: every chunk that ends at or below
    /// it is in the snapshot (copied, or a hole the copier skipped and no writer touched).
    scanned: AtomicU64,
    /// Chunks copied by writers (copy-before-write), for `snapshot inspect`.
    cow_chunks: AtomicU64,
    /// Set when a copy failed: the snapshot is invalid, writes go on unhindered.
    failed: Mutex<Option<String>>,
    is_failed: AtomicBool,
    cancel: AtomicBool,
}

impl CowState {
    /// `src`: the volume file (read); `dst`: the snapshot file, sized, header and record
    /// written. `reflink`: share chunks (FICLONERANGE) instead of copying them.
    pub fn new(
        src: File,
        dst: File,
        data_offset: u64,
        size: u64,
        thin: bool,
        reflink: bool,
    ) -> io::Result<CowState> {
        let reflink = if reflink {
            Some((src.try_clone()?, dst.try_clone()?))
        } else {
            None
        };
        Ok(CowState {
            src: FileStore::new(src),
            dst: FileStore::new(dst),
            reflink,
            data_offset,
            size,
            thin,
            copied: (0..LOCKS).map(|_| Mutex::new(HashSet::new())).collect(),
            scanned: AtomicU64::new(0),
            cow_chunks: AtomicU64::new(0),
            failed: Mutex::new(None),
            is_failed: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
        })
    }

    /// Whether the copier has gone past chunk `c`.
    fn passed(&self, c: u64) -> bool {
        self.chunk_end(c) <= self.scanned.load(Ordering::Acquire)
    }

    fn chunk_end(&self, c: u64) -> u64 {
        c.saturating_add(1).saturating_mul(CHUNK).min(self.size)
    }

    /// Copies chunk `c` unless done. `by_writer`: a copy-before-write (remembered until the
    /// copier passes the chunk); else the copier's own, in order, which moves `scanned`.
    fn copy_chunk(&self, c: u64, by_writer: bool, buf: &mut Vec<u8>) {
        if self.passed(c) || self.is_failed.load(Ordering::Relaxed) {
            return;
        }
        let mut set = self.copied[(c % LOCKS as u64) as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if self.passed(c) {
            return;
        }
        let done_by_writer = if by_writer {
            set.contains(&c)
        } else {
            set.remove(&c)
        };
        if !done_by_writer {
            let from = self.data_offset + c * CHUNK;
            let to = self.data_offset + self.chunk_end(c);
            let done = match &self.reflink {
                Some((s, d)) => reflink_range(s, from, to - from, d, from),
                None => copy_sparse(&self.src, &self.dst, from, to, self.thin, buf).map(drop),
            };
            if let Err(e) = done {
                self.fail(format!("copying chunk {c}: {e}"));
                return;
            }
            if by_writer {
                set.insert(c);
                self.cow_chunks.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !by_writer {
            // Under the shard lock: a writer waiting for it sees the chunk as passed.
            self.scanned.fetch_max(self.chunk_end(c), Ordering::Release);
        }
    }

    /// Marks the snapshot failed (a copy could not be made); the volume is unaffected.
    pub fn fail(&self, why: String) {
        let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            tracing::error!(reason = %why, "snapshot copy failed; the snapshot is dropped");
            *f = Some(why);
        }
        self.is_failed.store(true, Ordering::Release);
    }

    pub fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops the copier at its next chunk (daemon shutdown, volume gone).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Release);
    }

    /// Called by a write of `[offset, offset+len)` of the data area, with its stripe locks
    /// held, before it changes anything: every chunk it touches is copied first.
    pub fn before_write(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let first = offset / CHUNK;
        let last = (offset.saturating_add(len) - 1).min(self.size - 1) / CHUNK;
        let mut buf = Vec::new();
        for c in first..=last {
            self.copy_chunk(c, true, &mut buf);
        }
    }

    /// Percent of the data area the copier has gone past.
    pub fn percent(&self) -> u64 {
        let s = self.scanned.load(Ordering::Relaxed).min(self.size);
        s.saturating_mul(100).checked_div(self.size).unwrap_or(100)
    }

    pub fn cow_chunks(&self) -> u64 {
        self.cow_chunks.load(Ordering::Relaxed)
    }

    /// The copier: every chunk with data not copied yet, in order; holes are skipped (they
    /// stay holes in the snapshot). `max_rate`: bytes per second of the data area scanned
    /// (0 = unlimited). Then the snapshot file is synced. Runs on its own thread.
    pub fn run_copy(&self, max_rate: u64) -> Result<(), String> {
        let start = Instant::now();
        let mut buf = Vec::new();
        let query = |at: u64, len: u64| {
            self.src
                .allocation(self.data_offset + at, len)
                .map_err(|e| format!("allocation map: {e}"))
        };
        crate::volume::store::walk_allocation(0, self.size, query, |at, len, hole| {
            let run_end = at + len;
            if !hole {
                let mut c = at / CHUNK;
                while c * CHUNK < run_end {
                    if self.cancel.load(Ordering::Acquire) {
                        return Err("cancelled".into());
                    }
                    self.copy_chunk(c, false, &mut buf);
                    if let Some(why) = self.failure() {
                        return Err(why);
                    }
                    pace(start, self.chunk_end(c), max_rate);
                    c += 1;
                }
            }
            // Chunks wholly inside a hole are passed (a writer that changed one copied it).
            self.scanned
                .fetch_max(run_end / CHUNK * CHUNK, Ordering::Release);
            Ok(true)
        })?;
        self.scanned.store(self.size, Ordering::Release);
        self.dst
            .sync()
            .map_err(|e| format!("syncing the snapshot: {e}"))?;
        if let Some(why) = self.failure() {
            return Err(why);
        }
        Ok(())
    }
}

/// Sleeps so that `done` bytes took at least `done / rate` seconds since `start`.
pub fn pace(start: Instant, done: u64, rate: u64) {
    if rate == 0 {
        return;
    }
    let due = Duration::from_secs_f64(done as f64 / rate as f64);
    if let Some(wait) = due.checked_sub(start.elapsed()) {
        std::thread::sleep(wait);
    }
}

/// The hook a [`Volume`](super::Volume) calls on its write path. Without a snapshot in the
/// making it costs one relaxed load.
#[derive(Default)]
pub struct CowSlot {
    active: AtomicBool,
    state: Mutex<Option<Arc<CowState>>>,
}

impl CowSlot {
    /// Installs `s`. The caller holds every stripe lock exclusively (no write in flight), so
    /// each later write sees it: writes load the flag after taking their stripe locks.
    pub fn install(&self, s: Arc<CowState>) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
        self.active.store(true, Ordering::Release);
    }

    /// Removes `s` if it is the one installed (its copy is complete or abandoned).
    pub fn remove(&self, s: &Arc<CowState>) {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if g.as_ref().is_some_and(|x| Arc::ptr_eq(x, s)) {
            *g = None;
            self.active.store(false, Ordering::Release);
        }
    }

    /// Whether a snapshot is being copied from this volume.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// See [`CowState::before_write`]; `offset` is in the data area.
    #[inline]
    pub fn before_write(&self, offset: u64, len: u64) {
        if self.active.load(Ordering::Relaxed) {
            self.slow(offset, len);
        }
    }

    #[cold]
    fn slow(&self, offset: u64, len: u64) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(s) = s {
            s.before_write(offset, len);
        }
    }
}

/// FICLONE, which std lacks.
#[allow(unsafe_code)]
mod sys {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    /// `_IOW(0x94, 9, int)`.
    const FICLONE: libc::c_ulong = 0x4004_9409;

    /// `_IOW(0x94, 13, struct file_clone_range)`.
    const FICLONERANGE: libc::c_ulong = 0x4020_940d;

    #[repr(C)]
    struct FileCloneRange {
        src_fd: i64,
        src_offset: u64,
        src_length: u64,
        dest_offset: u64,
    }

    pub fn ficlonerange(
        src: &File,
        src_off: u64,
        len: u64,
        dst: &File,
        dst_off: u64,
    ) -> io::Result<()> {
        let arg = FileCloneRange {
            src_fd: i64::from(src.as_raw_fd()),
            src_offset: src_off,
            src_length: len,
            dest_offset: dst_off,
        };
        // SAFETY: FICLONERANGE reads one `struct file_clone_range` (the repr(C) `arg`, alive
        // for the call) and writes no memory of ours; both descriptors are owned by the
        // borrowed Files for the call.
        let r = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONERANGE as _, &arg) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    pub fn ficlone(src: &File, dst: &File) -> io::Result<()> {
        // SAFETY: FICLONE takes the source descriptor as its integer argument and reads no
        // memory of ours; both descriptors are owned by the borrowed Files for the call.
        let r = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_damage() {
        let r = SnapRecord {
            snapshot_id: Uuid::from_u128(7),
            volume_id: Uuid::from_u128(9),
            created: 1_700_000_000,
            name: "vol@s1".into(),
        };
        let b = r.encode().unwrap();
        assert_eq!(SnapRecord::decode(&b).unwrap(), r);
        for i in [0, 20, 40, 60, 4000] {
            let mut d = b;
            d[i] ^= 1;
            assert!(SnapRecord::decode(&d).is_err(), "byte {i}");
        }
        assert!(SnapRecord::decode(&[0u8; 10]).is_err());
    }

    #[test]
    fn cow_copies_old_contents_before_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let (sp, dp) = (dir.path().join("s"), dir.path().join("d"));
        let src = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&sp)
            .unwrap();
        let dst = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dp)
            .unwrap();
        let size = 4 * CHUNK;
        src.set_len(4096 + size).unwrap();
        dst.set_len(4096 + size).unwrap();
        let s = FileStore::new(src.try_clone().unwrap());
        s.write_at(&[1u8; 4096], 4096 + CHUNK).unwrap();
        let cow = CowState::new(src, dst.try_clone().unwrap(), 4096, size, true, false).unwrap();
        cow.before_write(CHUNK + 100, 10);
        s.write_at(&[2u8; 4096], 4096 + CHUNK).unwrap();
        cow.run_copy(0).unwrap();
        let d = FileStore::new(dst);
        let mut b = [0u8; 4096];
        d.read_at(&mut b, 4096 + CHUNK).unwrap();
        assert_eq!(b, [1u8; 4096]);
        assert_eq!(cow.cow_chunks(), 1);
        assert_eq!(cow.percent(), 100);
        // Holes stay holes.
        let a = d.allocation(4096, size).unwrap();
        assert!(a.iter().filter(|r| !r.1).map(|r| r.0).sum::<u64>() <= CHUNK);
    }
}
