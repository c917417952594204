//! `Volume`: byte ranges -> encrypted data units over a [`BlockStore`].
//!
//! Whole units are encrypted straight from (or into) the caller's buffer; a range that starts
//! or ends inside a unit is served by read-modify-write of that unit. Every write holds the
//! stripe locks of the units it touches, so a read-modify-write never races another write of
//! the same unit (the kernel client sends 512-byte I/O to 4096-sector volumes, and several
//! connections may write at once). Units written whole take their stripe shared and units
//! read-modify-written take it exclusive: whole-unit writes (the common case, and every large
//! write) run in parallel, and only a partial unit waits for the other writes of its stripe.
//! On a direct-I/O store whose block is larger than a unit (512-byte units, 4 KiB device
//! blocks) the lock granule is that block, since the store rewrites whole blocks
//! ([`BlockStore::io_align`]).

use std::cell::RefCell;
use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use super::VolumeError;
use super::cipher::{Backend, SectorCipher, UnitSize, XtsKey, wipe};
use super::direct::CacheMode;
use super::header::{COPY_OFFSETS, HEADER_COPY_LEN, VolumeHeader};
use super::reencrypt::{Keys, Migration};
use super::store::{BlockStore, FileStore};
use super::stripe::{StripeGuard, StripeLock};
use crate::aligned::AlignedBuf;
use crate::zeroes::is_zero;

pub(super) const STRIPES: usize = 256;
/// Largest single transfer: larger requests are processed in pieces of this size.
pub(super) const CHUNK: usize = 1 << 20;

/// Whole units are decrypted after `pread` and encrypted before `pwrite` in pieces of this size
/// on a page-cache store: the piece just copied is still in the core's L2 (1 MiB here) when the
/// cipher passes over it, and the piece just encrypted when `pwrite` copies it, where a 1 MiB
/// pass would fetch each byte from L3 or DRAM again. Measured on 2 vCPUs (issue 16, 1 MiB
/// sequential reads and writes, 1 and 4 connections, two rounds at load ~10): with the
/// process-wide CPU slots of `server::threaded`, 0.62 s of server CPU per GiB with 128 KiB
/// pieces against 0.71 with 1 MiB passes. Stores whose I/O waits for a device or the network
/// ([`BlockStore::writes_wait`]) keep [`CHUNK`]: there a call costs a round trip, not a copy.
const PIECE: usize = 128 << 10;

pub struct Volume {
    pub(super) store: Box<dyn BlockStore>,
    pub(super) cipher: SectorCipher,
    header: VolumeHeader,
    pub(super) unit: u64,
    /// What a stripe lock covers: a unit, or the store's direct-I/O block when larger.
    pub(super) granule: u64,
    pub(super) read_only: bool,
    /// The header's encrypt-zeroes flag: zero plaintext is stored encrypted, and a stored
    /// all-zero unit reads as zeros only where the store has a hole.
    pub(super) encrypt_zeroes: bool,
    /// Released on any thread: an aio write holds its stripes until librbd calls back.
    pub(super) stripes: Arc<[StripeLock]>,
    /// A copy-path snapshot in the making: writes copy old data out first (`snapshot.rs`).
    cow: super::snapshot::CowSlot,
    /// Set once an online re-encryption runs on this volume (`super::reencrypt`): from then
    /// on every I/O goes through `mig`. Unset, the hot path pays this one atomic load.
    pub(super) mig_on: AtomicBool,
    /// The new key, the boundary and the segment in flight; I/O holds it shared.
    pub(super) mig: RwLock<Option<Migration>>,
    /// Bumped (and notified) whenever the segment in flight is released.
    pub(super) mig_wake: (Mutex<u64>, Condvar),
}

thread_local! {
    /// Scratch for copies on the write path and partial units (no allocation per call);
    /// page-aligned, so a direct-I/O store reads and writes it without a bounce.
    static SCRATCH: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::default());
}

impl Volume {
    /// Writes both header copies into a new file (refuses an existing one), sized sparse.
    pub fn create(path: &Path, header: &VolumeHeader) -> Result<(), VolumeError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let store = FileStore::new(file);
        Self::create_with_store(&store, header)?;
        Ok(())
    }

    /// Writes a fresh volume's headers into `store` and sizes it.
    pub fn create_with_store(
        store: &dyn BlockStore,
        header: &VolumeHeader,
    ) -> Result<(), VolumeError> {
        let end = header
            .data_offset
            .checked_add(header.size)
            .ok_or(VolumeError::BadHeader("size too large"))?;
        header.encode()?;
        check_unit_fits_store(header, store)?;
        store.set_len(end)?;
        write_copies(store, header)?;
        Ok(())
    }

    /// Reads and checks the header (the newer valid copy; both bad -> error).
    pub fn read_header(path: &Path) -> Result<VolumeHeader, VolumeError> {
        let store = FileStore::new(OpenOptions::new().read(true).open(path)?);
        read_header_from(&store)
    }

    /// Reads and checks the header of a volume in `store` (the newer valid copy).
    pub fn read_header_in(store: &dyn BlockStore) -> Result<VolumeHeader, VolumeError> {
        read_header_from(store)
    }

    /// Rewrites the header crash-safely (generation + 1; copy A, sync, copy B, sync).
    pub fn write_header(path: &Path, header: &VolumeHeader) -> Result<VolumeHeader, VolumeError> {
        let store = FileStore::new(OpenOptions::new().read(true).write(true).open(path)?);
        rewrite_header(&store, header)
    }

    /// Grows a detached volume; data is kept.
    pub fn grow(path: &Path, new_size: u64) -> Result<VolumeHeader, VolumeError> {
        let store = FileStore::new(OpenOptions::new().read(true).write(true).open(path)?);
        Self::grow_in(&store, new_size)
    }

    /// Grows the detached volume in `store`: the store first, then the header.
    pub fn grow_in(store: &dyn BlockStore, new_size: u64) -> Result<VolumeHeader, VolumeError> {
        let mut h = read_header_from(store)?;
        if new_size < h.size {
            return Err(VolumeError::Invalid("volumes only grow"));
        }
        if !new_size.is_multiple_of(u64::from(h.sector_size)) {
            return Err(VolumeError::Invalid(
                "size must be a multiple of the sector size",
            ));
        }
        h.size = new_size;
        // Validate (and encode) the new header before the file is touched: a size the header
        // cannot hold is refused with nothing changed.
        h.encode()?;
        let end = h
            .data_offset
            .checked_add(new_size)
            .ok_or(VolumeError::BadHeader("size too large"))?;
        // Only ever extend: a shorter file would cut data off.
        if store.len()? < end {
            store.set_len(end)?;
            store.sync()?;
        }
        rewrite_header(store, &h)
    }

    /// Opens a volume file for I/O with its unwrapped DEK.
    pub fn open(path: &Path, key: XtsKey, read_only: bool) -> Result<Volume, VolumeError> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        Self::open_with_store(
            Box::new(FileStore::new(file)),
            key,
            read_only,
            Backend::default(),
        )
    }

    /// Opens a volume file in cache mode `cache` ([`FileStore::open`]; errors of direct I/O,
    /// like a file system without it, come back as they are, to be named to the user).
    /// `new_key`: the new DEK of a volume in re-encryption ([`Volume::open_with_keys`]).
    pub fn open_file(
        path: &Path,
        key: XtsKey,
        new_key: Option<XtsKey>,
        read_only: bool,
        cache: CacheMode,
    ) -> Result<Result<Volume, VolumeError>, super::DirectError> {
        let store = FileStore::open(path, read_only, cache)?;
        Ok(Self::open_with_keys(
            Box::new(store),
            key,
            new_key,
            read_only,
            Backend::default(),
        ))
    }

    pub fn open_with_store(
        store: Box<dyn BlockStore>,
        key: XtsKey,
        read_only: bool,
        backend: Backend,
    ) -> Result<Volume, VolumeError> {
        Self::open_with_keys(store, key, None, read_only, backend)
    }

    /// [`Volume::open_with_store`]; a volume in re-encryption needs its new DEK too (and
    /// no journaled segment pending: see [`super::reencrypt::recover`]).
    pub fn open_with_keys(
        store: Box<dyn BlockStore>,
        key: XtsKey,
        new_key: Option<XtsKey>,
        read_only: bool,
        backend: Backend,
    ) -> Result<Volume, VolumeError> {
        let header = read_header_from(store.as_ref())?;
        let unit = UnitSize::from_bytes(header.sector_size)
            .ok_or(VolumeError::BadHeader("sector size"))?;
        check_unit_fits_store(&header, store.as_ref())?;
        let cipher = SectorCipher::new(&key, unit, backend)?;
        // decode() validated data_offset + size (no overflow, <= i64::MAX).
        if store.len()? < header.data_offset + header.size {
            return Err(VolumeError::BadHeader(
                "backing file shorter than the volume",
            ));
        }
        let unit_len = u64::from(header.sector_size);
        let mig = Migration::at_open(&header, new_key.as_ref(), unit, backend)?;
        Ok(Volume {
            granule: unit_len.max(store.io_align()),
            store,
            cipher,
            unit: unit_len,
            encrypt_zeroes: header.encrypt_zeroes(),
            header,
            read_only,
            stripes: (0..STRIPES).map(|_| StripeLock::default()).collect(),
            cow: Default::default(),
            mig_on: AtomicBool::new(mig.is_some()),
            mig: RwLock::new(mig),
            mig_wake: (Mutex::new(0), Condvar::new()),
        })
    }

    /// Whether the store's writes wait for the network ([`BlockStore::writes_wait`]).
    pub fn writes_wait(&self) -> bool {
        self.store.writes_wait()
    }

    pub fn header(&self) -> &VolumeHeader {
        &self.header
    }
    pub fn size(&self) -> u64 {
        self.header.size
    }
    pub fn sector_size(&self) -> u32 {
        self.header.sector_size
    }
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub(super) fn check(&self, offset: u64, len: u64, write: bool) -> Result<(), VolumeError> {
        if write && self.read_only {
            return Err(VolumeError::ReadOnly);
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.header.size => Ok(()),
            _ => Err(VolumeError::OutOfRange),
        }
    }

    /// Bytes of whole units read or written per store call: [`PIECE`] on a page-cache store,
    /// [`CHUNK`] where each call waits for a device; always a multiple of the unit.
    fn piece(&self) -> usize {
        let p = if self.store.writes_wait() {
            CHUNK
        } else {
            PIECE
        };
        (p / self.unit as usize).max(1) * self.unit as usize
    }

    pub(super) fn pos(&self, offset: u64) -> u64 {
        self.header.data_offset + offset
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.read_with(offset, buf, false).map(drop)
    }

    /// [`read`](Self::read) if it needs no device I/O (all of it in the page cache);
    /// `Ok(false)` otherwise, with `buf` unspecified. Lets a caller serve cached reads on a
    /// latency-critical thread and send the others where waiting is cheap.
    pub fn try_read(&self, offset: u64, buf: &mut [u8]) -> Result<bool, VolumeError> {
        self.read_with(offset, buf, true)
    }

    fn read_with(&self, offset: u64, buf: &mut [u8], nowait: bool) -> Result<bool, VolumeError> {
        self.check(offset, buf.len() as u64, false)?;
        if !self.mig_on.load(Ordering::Acquire) {
            let r = self.read_keys(self.keys(None), offset, buf, nowait);
            // Seqlock-like: a re-encryption that began meanwhile may have rewritten what was
            // read; read again through the gate.
            if !self.mig_on.load(Ordering::Acquire) {
                return r;
            }
        }
        let g = self.enter(offset, buf.len() as u64);
        self.read_keys(self.keys(g.as_deref()), offset, buf, nowait)
    }

    fn read_keys(
        &self,
        k: Keys<'_>,
        offset: u64,
        buf: &mut [u8],
        nowait: bool,
    ) -> Result<bool, VolumeError> {
        let read = |out: &mut [u8], at: u64| -> Result<bool, VolumeError> {
            if nowait {
                Ok(self.store.read_at_nowait(out, self.pos(at))?)
            } else {
                self.store.read_at(out, self.pos(at))?;
                Ok(true)
            }
        };
        let u = self.unit;
        let piece = self.piece();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let within = (pos % u) as usize;
            let unit_idx = pos / u;
            if within == 0 && buf.len() - done >= u as usize {
                let n = ((buf.len() - done) / u as usize * u as usize).min(piece);
                let out = &mut buf[done..done + n];
                if let Some(w) = (!self.encrypt_zeroes)
                    .then(|| self.store.mapped(self.pos(pos), n))
                    .flatten()
                {
                    // Mapped (tmpfs, thin): decrypt from the page cache into the caller's buffer.
                    self.decrypt_units_from(k, unit_idx, w.bytes(), out)?;
                    w.finish()?;
                    done += n;
                    continue;
                }
                // Whole units: read ciphertext into the caller's buffer, decrypt in place.
                if !read(out, pos)? {
                    return Ok(false);
                }
                self.decrypt_units(k, unit_idx, out)?;
                done += n;
            } else {
                let n = (u as usize - within).min(buf.len() - done);
                let got = with_scratch(u as usize, |s| -> Result<bool, VolumeError> {
                    let got = read(s, unit_idx * u)?;
                    let r = if got {
                        self.decrypt_units(k, unit_idx, s).map(|()| {
                            buf[done..done + n].copy_from_slice(&s[within..within + n]);
                        })
                    } else {
                        Ok(())
                    };
                    wipe(s);
                    r.map(|()| got)
                })?;
                if !got {
                    return Ok(false);
                }
                done += n;
            }
        }
        Ok(true)
    }

    /// Writes `data` at `offset` (copied; see [`Volume::write_mut`] to save the copy).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), VolumeError> {
        self.check(offset, data.len() as u64, true)?;
        let mut done = 0;
        while done < data.len() {
            let n = (data.len() - done).min(CHUNK);
            with_scratch(n, |s| {
                s.copy_from_slice(&data[done..done + n]);
                let r = self.write_mut(offset + done as u64, s);
                wipe(s);
                r
            })?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `offset`, encrypting whole units of `data` in place.
    pub fn write_mut(&self, offset: u64, data: &mut [u8]) -> Result<(), VolumeError> {
        self.check(offset, data.len() as u64, true)?;
        if data.is_empty() {
            return Ok(());
        }
        let _locks = self.lock_units(offset, data.len() as u64);
        self.cow.before_write(offset, data.len() as u64);
        let g = self.enter(offset, data.len() as u64);
        let k = self.keys(g.as_deref());
        let u = self.unit;
        let piece = self.piece();
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let within = (pos % u) as usize;
            let unit_idx = pos / u;
            if within == 0 && data.len() - done >= u as usize {
                let n = ((data.len() - done) / u as usize * u as usize).min(piece);
                let chunk = &mut data[done..done + n];
                self.encrypt_units(k, unit_idx, chunk);
                self.store.write_at(chunk, self.pos(pos))?;
                done += n;
            } else {
                let n = (u as usize - within).min(data.len() - done);
                with_scratch(u as usize, |s| -> Result<(), VolumeError> {
                    self.read_unit(k, unit_idx, s)?;
                    s[within..within + n].copy_from_slice(&data[done..done + n]);
                    self.encrypt_units(k, unit_idx, s);
                    self.store.write_at(s, self.pos(unit_idx * u))?;
                    Ok(())
                })?;
                done += n;
            }
        }
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<(), VolumeError> {
        if self.read_only {
            return Ok(());
        }
        Ok(self.store.sync()?)
    }

    /// Discards a range: it reads as zeros afterwards; whole units become holes.
    pub fn trim(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.write_zeroes(offset, len, true)
    }

    /// Zeroes a range. Whole units are punched (`may_punch`) or stored as zero bytes, which
    /// read as zeros by the thin rule; partial units are read-modify-written. With
    /// encrypt-zeroes, whole units are punched where the store can make a real hole there and
    /// stored as encrypted zeros everywhere else (never as zero bytes: those would not read
    /// as zeros).
    pub fn write_zeroes(&self, offset: u64, len: u64, may_punch: bool) -> Result<(), VolumeError> {
        self.check(offset, len, true)?;
        if len == 0 {
            return Ok(());
        }
        let _locks = self.lock_units(offset, len);
        self.cow.before_write(offset, len);
        let g = self.enter(offset, len);
        let k = self.keys(g.as_deref());
        let u = self.unit;
        let end = offset + len;
        let first_whole = offset.div_ceil(u) * u;
        let last_whole = end / u * u;
        if first_whole < last_whole {
            if self.encrypt_zeroes {
                let mut at = first_whole;
                if may_punch {
                    self.store
                        .punch_hole(self.pos(first_whole), last_whole - first_whole)?;
                    // A punch inside a file-system block zeroes bytes but leaves the block
                    // allocated: those units get encrypted zeros.
                    for (len, hole) in self
                        .store
                        .allocation(self.pos(first_whole), last_whole - first_whole)?
                    {
                        if !hole {
                            let from = at / u * u;
                            let to = (at + len).div_ceil(u) * u;
                            self.store_encrypted_zeros(k, from, to.min(last_whole))?;
                        }
                        at += len;
                    }
                } else {
                    self.store_encrypted_zeros(k, first_whole, last_whole)?;
                }
            } else if may_punch {
                self.store
                    .punch_hole(self.pos(first_whole), last_whole - first_whole)?;
            } else {
                let zeros = AlignedBuf::zeroed(CHUNK.min((last_whole - first_whole) as usize));
                let mut p = first_whole;
                while p < last_whole {
                    let n = (last_whole - p).min(zeros.len() as u64) as usize;
                    self.store.write_at(&zeros[..n], self.pos(p))?;
                    p += n as u64;
                }
            }
        }
        // Partial units at the edges.
        let mut edges = Vec::with_capacity(2);
        if offset < first_whole.min(end) {
            edges.push((offset, first_whole.min(end)));
        }
        if last_whole.max(offset) < end && last_whole >= first_whole {
            edges.push((last_whole.max(offset), end));
        }
        for (from, to) in edges {
            let unit_idx = from / u;
            let within = (from % u) as usize;
            with_scratch(u as usize, |s| -> Result<(), VolumeError> {
                self.read_unit(k, unit_idx, s)?;
                s[within..within + (to - from) as usize].fill(0);
                self.encrypt_units(k, unit_idx, s);
                self.store.write_at(s, self.pos(unit_idx * u))?;
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Allocation of `[offset, offset+len)` as (length, is_hole) runs.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, VolumeError> {
        self.check(offset, len, false)?;
        Ok(self.store.allocation(self.pos(offset), len)?)
    }

    /// Stores the encryption of zero plaintext in the whole units of `[from, to)`.
    fn store_encrypted_zeros(&self, k: Keys<'_>, from: u64, to: u64) -> Result<(), VolumeError> {
        let mut p = from;
        while p < to {
            let n = (to - p).min(CHUNK as u64) as usize;
            with_scratch(n, |s| -> Result<(), VolumeError> {
                s.fill(0);
                k.encrypt(p / self.unit, s);
                Ok(self.store.write_at(s, self.pos(p))?)
            })?;
            p += n as u64;
        }
        Ok(())
    }

    /// Reads and decrypts one unit into `s` (exactly one unit long).
    fn read_unit(&self, k: Keys<'_>, unit_idx: u64, s: &mut [u8]) -> Result<(), VolumeError> {
        self.store.read_at(s, self.pos(unit_idx * self.unit))?;
        self.decrypt_units(k, unit_idx, s)
    }

    /// [`decrypt_units`](Self::decrypt_units) of a thin volume's ciphertext `src` into `out`
    /// (as long), in one pass: an all-zero unit reads as zeros.
    fn decrypt_units_from(
        &self,
        keys: Keys<'_>,
        first: u64,
        src: &[u8],
        out: &mut [u8],
    ) -> Result<(), VolumeError> {
        debug_assert!(!self.encrypt_zeroes, "encrypt-zeroes reads with pread");
        let u = self.unit as usize;
        let mut i = 0;
        while i < src.len() {
            let end = self.run_end(src, i, false);
            if end > i {
                keys.decrypt_to(first + (i / u) as u64, &src[i..end], &mut out[i..end]);
            }
            i = self.run_end(src, end, true);
            out[end..i].fill(0);
        }
        Ok(())
    }

    /// Decrypts whole units in place. Thin (default): a unit stored as all zeros is a hole
    /// and reads as zeros. Encrypt-zeroes: it reads as zeros only where the store has a hole
    /// (never written, TRIM, WRITE_ZEROES); zero bytes written into allocated space are
    /// decrypted like any other ciphertext (and so read as noise, not as chosen zeros).
    pub(super) fn decrypt_units(
        &self,
        keys: Keys<'_>,
        first: u64,
        data: &mut [u8],
    ) -> Result<(), VolumeError> {
        if !self.encrypt_zeroes {
            self.for_nonzero_runs(first, data, |unit, run| keys.decrypt(unit, run));
            return Ok(());
        }
        let u = self.unit as usize;
        let units = data.len() / u;
        if !data.chunks_exact(u).any(is_zero) {
            // The common case: no all-zero unit (decided on each unit's first block).
            keys.decrypt(first, data);
            return Ok(());
        }
        // hole[k]: unit k stays zeros. Only all-zero units are candidates; for those the
        // store says whether the bytes are a hole.
        let mut hole = vec![false; units];
        let mut k = 0;
        while k < units {
            if !is_zero(&data[k * u..(k + 1) * u]) {
                k += 1;
                continue;
            }
            let start = k;
            while k < units && is_zero(&data[k * u..(k + 1) * u]) {
                k += 1;
            }
            hole[start..k].fill(true);
            let at = self.pos((first + start as u64) * self.unit);
            let mut off = 0usize;
            for (len, is_hole) in self.store.allocation(at, ((k - start) * u) as u64)? {
                let end = off + len as usize;
                if !is_hole {
                    // Every unit this data extent touches is ciphertext.
                    let (a, b) = (start + off / u, (start + end.div_ceil(u)).min(k));
                    hole[a..b].fill(false);
                }
                off = end;
            }
        }
        let mut k = 0;
        while k < units {
            let start = k;
            while k < units && !hole[k] {
                k += 1;
            }
            if k > start {
                keys.decrypt(first + start as u64, &mut data[start * u..k * u]);
            }
            while k < units && hole[k] {
                k += 1;
            }
        }
        Ok(())
    }

    /// Encrypts whole units in place; thin (default): an all-zero plaintext unit is stored as
    /// zeros; encrypt-zeroes: every unit is encrypted.
    pub(super) fn encrypt_units(&self, k: Keys<'_>, first: u64, data: &mut [u8]) {
        if self.encrypt_zeroes {
            k.encrypt(first, data);
        } else {
            self.for_nonzero_runs(first, data, |unit, run| k.encrypt(unit, run));
        }
    }

    /// Calls `f` on each run of consecutive units that are not all zero (one backend call per
    /// run), with the index of the run's first unit; all-zero units are left as they are.
    fn for_nonzero_runs(&self, first: u64, data: &mut [u8], f: impl Fn(u64, &mut [u8])) {
        let u = self.unit as usize;
        let mut i = 0;
        while i < data.len() {
            let end = self.run_end(data, i, false);
            if end > i {
                f(first + (i / u) as u64, &mut data[i..end]);
            }
            i = self.run_end(data, end, true);
        }
    }

    /// Where the run of whole units from byte `from` that are all zero (`zero`) or not ends:
    /// the first unit of the other kind, or the end of `data`.
    fn run_end(&self, data: &[u8], from: usize, zero: bool) -> usize {
        let u = self.unit as usize;
        let mut i = from;
        while i < data.len() && is_zero(&data[i..i + u]) == zero {
            i += u;
        }
        i
    }

    /// Runs `f` with every stripe lock held exclusively: no write is in flight and none
    /// starts until `f` returns (reads go on). A snapshot's point in time.
    pub fn quiesce<R>(&self, f: impl FnOnce() -> R) -> R {
        let _all: Vec<_> = self.stripes.iter().map(|s| s.write()).collect();
        f()
    }

    /// The copy-before-write hook of this volume (`snapshot.rs`).
    pub fn cow(&self) -> &super::snapshot::CowSlot {
        &self.cow
    }

    /// Locks the stripes of every granule (unit, or the store's larger direct-I/O block) a
    /// write of `[offset, offset+len)` touches, in stripe order (no deadlock): exclusive for
    /// the (at most two) granules written partly, since their read-modify-write must not
    /// interleave with another write of the granule; shared for those written whole.
    fn lock_units(&self, offset: u64, len: u64) -> Vec<StripeGuard<'_>> {
        let u = self.granule;
        let end = offset + len;
        let first = offset / u;
        let last = (end - 1) / u;
        let partial = |unit: u64| unit * u < offset || (unit + 1) * u > end;
        let stripe = |unit: u64| (unit % STRIPES as u64) as usize;
        let mut exclusive = [usize::MAX; 2];
        if partial(first) {
            exclusive[0] = stripe(first);
        }
        if last != first && partial(last) {
            exclusive[1] = stripe(last);
        }
        let take = |i: usize| {
            if exclusive.contains(&i) {
                self.stripes[i].write()
            } else {
                self.stripes[i].read()
            }
        };
        if last - first + 1 >= STRIPES as u64 {
            return (0..STRIPES).map(take).collect();
        }
        let mut idx: Vec<usize> = (first..=last).map(stripe).collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(take).collect()
    }
}

fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len);
            }
            f(&mut v[..len])
        }
        // Re-entered (write -> write_mut): use a fresh buffer.
        Err(_) => f(&mut AlignedBuf::zeroed(len)),
    })
}

/// An encrypt-zeroes volume reads allocated zero bytes as ciphertext, so a write must never
/// allocate space beyond its own unit: units at least as large as the store's blocks.
fn check_unit_fits_store(h: &VolumeHeader, store: &dyn BlockStore) -> Result<(), VolumeError> {
    if h.encrypt_zeroes() && u64::from(h.sector_size) < store.allocation_unit() {
        return Err(VolumeError::Invalid(
            "encrypt_zeroes needs data units at least as large as the backing store's \
             allocation block (4096-byte sectors on a file system with 4 KiB blocks)",
        ));
    }
    Ok(())
}

pub(super) fn read_header_from(store: &dyn BlockStore) -> Result<VolumeHeader, VolumeError> {
    let mut a = [0u8; HEADER_COPY_LEN];
    let mut b = [0u8; HEADER_COPY_LEN];
    store.read_at(&mut a, COPY_OFFSETS[0])?;
    store.read_at(&mut b, COPY_OFFSETS[1])?;
    Ok(VolumeHeader::choose(&a, &b)?.0)
}

/// Writes copy A, syncs, copy B, syncs: a cut anywhere leaves one valid copy.
fn write_copies(store: &dyn BlockStore, header: &VolumeHeader) -> Result<(), VolumeError> {
    let bytes = header.encode()?;
    for off in COPY_OFFSETS {
        store.write_at(&bytes, off)?;
        store.sync()?;
    }
    Ok(())
}

/// Rewrites the header with generation + 1. When copy A is the only valid one, B is brought
/// up first, so that at every moment at least one valid copy exists.
pub fn rewrite_header(
    store: &dyn BlockStore,
    header: &VolumeHeader,
) -> Result<VolumeHeader, VolumeError> {
    let mut a = [0u8; HEADER_COPY_LEN];
    let mut b = [0u8; HEADER_COPY_LEN];
    store.read_at(&mut a, COPY_OFFSETS[0])?;
    store.read_at(&mut b, COPY_OFFSETS[1])?;
    let (current, valid) = VolumeHeader::choose(&a, &b)?;
    let mut h = header.clone();
    h.generation = current.generation + 1;
    let bytes = h.encode()?;
    // Overwrite a copy that is not the only valid one first.
    let order = if valid[1] && !valid[0] {
        [0, 1]
    } else if valid[0] && !valid[1] {
        [1, 0]
    } else {
        [0, 1]
    };
    for i in order {
        store.write_at(&bytes, COPY_OFFSETS[i])?;
        super::reencrypt::crash_point();
        store.sync()?;
        super::reencrypt::crash_point();
    }
    Ok(h)
}
