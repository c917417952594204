//! Online re-encryption of a volume to a new DEK, crash-safe at any byte, while the volume
//! serves I/O. Pure over [`BlockStore`]: the daemon drives it (`daemon::reencrypt`), tests
//! cut it anywhere with [`super::MemStore`].
//!
//! ```text
//!  data area:  | units < boundary: new DEK | segment in flight | units >= boundary: old DEK |
//!  journal:    bytes 64 KiB .. 832 KiB of the store (between header B and the data area)
//!  one segment (768 KiB at the boundary), frozen for I/O from 1 to 4:
//!   1. read its old ciphertext; nothing to rewrite (holes, thin zeros) -> go to 4
//!   2. copy it to the journal, sync; header names the journal (start, length, SHA-256)
//!   3. rewrite its units in place under the new DEK, sync
//!   4. header: boundary = segment end, no journal
//!  a file-hole run at the boundary (up to 8 GiB) is skipped with one header write (step 4)
//!  recovery (open, or a retry after an error): a named journal is decrypted with the old
//!  DEK and re-encrypted into place with the new one (idempotent), then step 4
//!  end: header holds the new DEK and key id only, the flag and the fields are gone
//! ```
//! A cut anywhere leaves every unit readable: before step 2's header the segment is untouched
//! (old DEK, as the header says); after it, the journal holds the old ciphertext and recovery
//! redoes step 3; after step 4 the segment is under the new DEK, as the header says.
//! Concurrency: I/O takes `Volume::mig` shared and waits while its range overlaps the frozen
//! range; the boundary moves only when the header saying so is durable.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, RwLockReadGuard};

use aws_lc_rs::digest;

use super::VolumeError;
use super::cipher::{Backend, SectorCipher, UnitSize, XtsKey};
use super::disk::{Volume, read_header_from, rewrite_header};
use super::header::{
    FLAG_REENCRYPT, JOURNAL_AT, JOURNAL_LEN, REENC_PAUSED, Reencrypt, VolumeHeader,
};
use super::store::{BlockStore, leading_hole};
use crate::zeroes::is_zero;

/// Test hook: with `CRYPTVOL_TEST_REENC_ABORT_AT=N` in the environment the process aborts
/// at the N-th crash point (a header copy written or synced, the journal written or synced,
/// a run of units rewritten, the segment synced): a kill -9 at a chosen step, inside a header
/// update too. Unset, a crash point is one load of a cached value.
pub fn crash_point() {
    use std::sync::OnceLock;
    use std::sync::atomic::AtomicU64;
    static AT: OnceLock<u64> = OnceLock::new();
    static SEEN: AtomicU64 = AtomicU64::new(0);
    let at = *AT.get_or_init(|| {
        std::env::var("CRYPTVOL_TEST_REENC_ABORT_AT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    });
    if at != 0 && SEEN.fetch_add(1, Ordering::SeqCst) + 1 == at {
        eprintln!("CRYPTVOL_TEST_REENC_ABORT_AT={at}: aborting");
        std::process::abort();
    }
}

/// Bytes re-encrypted per journaled step.
pub const SEGMENT: u64 = JOURNAL_LEN;

/// The in-memory state of a re-encryption on an open volume.
pub struct Migration {
    new: Arc<SectorCipher>,
    /// Units below this are under the new DEK.
    boundary: u64,
    /// Units `[a, b)` being migrated: I/O overlapping them waits.
    inflight: Option<(u64, u64)>,
}

impl Migration {
    /// The state of a volume opened with header `h`: `None` unless it is being re-encrypted.
    pub(super) fn at_open(
        h: &VolumeHeader,
        new_key: Option<&XtsKey>,
        unit: UnitSize,
        backend: Backend,
    ) -> Result<Option<Migration>, VolumeError> {
        let Some(r) = &h.reencrypt else {
            return Ok(None);
        };
        let Some(k) = new_key else {
            return Err(VolumeError::BadKey(
                "the volume is being re-encrypted: its new data key is needed too",
            ));
        };
        if r.journal_len > 0 {
            return Err(VolumeError::Invalid(
                "re-encryption interrupted inside a segment: recover it first",
            ));
        }
        Ok(Some(Migration {
            new: Arc::new(SectorCipher::new(k, unit, backend)?),
            boundary: r.boundary / unit.bytes() as u64,
            inflight: None,
        }))
    }
}

/// The keys an I/O uses: the old DEK, and during a re-encryption the new one below a unit.
#[derive(Clone, Copy)]
pub struct Keys<'a> {
    old: &'a SectorCipher,
    new: Option<(&'a SectorCipher, u64)>,
}

impl Keys<'_> {
    pub fn encrypt(&self, first: u64, data: &mut [u8]) {
        self.run(first, data, true);
    }
    pub fn decrypt(&self, first: u64, data: &mut [u8]) {
        self.run(first, data, false);
    }
    /// Decrypts whole units of `src` into `dst` (as long), each range under its key.
    pub fn decrypt_to(&self, first: u64, src: &[u8], dst: &mut [u8]) {
        let Some((new, b)) = self.new else {
            return self.old.decrypt_to(first, src, dst);
        };
        let u = self.old.unit().bytes();
        let n = (src.len() / u) as u64;
        if first >= b {
            self.old.decrypt_to(first, src, dst);
        } else if first + n <= b {
            new.decrypt_to(first, src, dst);
        } else {
            let at = (b - first) as usize * u;
            let ((s_lo, s_hi), (d_lo, d_hi)) = (src.split_at(at), dst.split_at_mut(at));
            new.decrypt_to(first, s_lo, d_lo);
            self.old.decrypt_to(b, s_hi, d_hi);
        }
    }
    fn run(&self, first: u64, data: &mut [u8], enc: bool) {
        let go = |c: &SectorCipher, f: u64, d: &mut [u8]| {
            if enc {
                c.encrypt(f, d)
            } else {
                c.decrypt(f, d)
            }
        };
        let Some((new, b)) = self.new else {
            return go(self.old, first, data);
        };
        let u = self.old.unit().bytes();
        let n = (data.len() / u) as u64;
        // Units below the boundary are under the new key.
        if first >= b {
            go(self.old, first, data);
        } else if first + n <= b {
            go(new, first, data);
        } else {
            let (lo, hi) = data.split_at_mut((b - first) as usize * u);
            go(new, first, lo);
            go(self.old, b, hi);
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Moved the boundary over this many bytes of holes (nothing written but the header).
    Skipped(u64),
    /// Moved the boundary over a segment, rewriting this many bytes.
    Rewrote(u64),
    /// The boundary is at the end: call [`Volume::finish_reencrypt`].
    Done,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Volume {
    /// The keys of an I/O holding `m` (the gate) or none (no re-encryption).
    pub(super) fn keys<'a>(&'a self, m: Option<&'a Option<Migration>>) -> Keys<'a> {
        Keys {
            old: &self.cipher,
            new: m
                .and_then(Option::as_ref)
                .map(|m| (m.new.as_ref(), m.boundary)),
        }
    }

    /// The gate of an I/O on `[offset, offset+len)`: `None` (one atomic load) without a
    /// re-encryption; else the shared guard, taken once the range is not in flight.
    pub(super) fn enter(
        &self,
        offset: u64,
        len: u64,
    ) -> Option<RwLockReadGuard<'_, Option<Migration>>> {
        if !self.mig_on.load(Ordering::Acquire) {
            return None;
        }
        let u = self.unit;
        let (first, end) = (offset / u, (offset + len).div_ceil(u));
        loop {
            let g = self.mig.read().unwrap_or_else(|e| e.into_inner());
            let busy = g
                .as_ref()
                .and_then(|m| m.inflight)
                .is_some_and(|(a, b)| first < b && a < end);
            if !busy {
                return Some(g);
            }
            let seen = *lock(&self.mig_wake.0);
            drop(g);
            let mut e = lock(&self.mig_wake.0);
            while *e == seen {
                e = self.mig_wake.1.wait(e).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    /// Sets the frozen unit range (waiting for the I/O in progress) and, if given, the boundary
    /// (in units); wakes the I/O that waited.
    fn set_inflight(&self, r: Option<(u64, u64)>, boundary: Option<u64>) {
        {
            let mut g = self.mig.write().unwrap_or_else(|e| e.into_inner());
            if let Some(m) = g.as_mut() {
                m.inflight = r;
                if let Some(b) = boundary {
                    m.boundary = b;
                }
            }
        }
        let mut e = lock(&self.mig_wake.0);
        *e = e.wrapping_add(1);
        self.mig_wake.1.notify_all();
    }

    /// The header as it is in the store now (not the one read at open).
    pub fn current_header(&self) -> Result<VolumeHeader, VolumeError> {
        read_header_from(self.store.as_ref())
    }

    /// Whether this open volume has (or had, since it was opened) a re-encryption.
    pub fn reencrypting(&self) -> bool {
        self.mig_on.load(Ordering::Acquire)
    }

    /// Starts re-encrypting to `new_key`, wrapped as `new_wrapped` under key `new_key_id`
    /// version `new_key_version`. Writes the header (boundary 0), then routes I/O through the
    /// gate and waits for the writes that began without it. Returns the header written.
    pub fn begin_reencrypt(
        &self,
        new_key: &XtsKey,
        new_key_id: &str,
        new_key_version: u32,
        new_wrapped: Vec<u8>,
        max_rate: u64,
    ) -> Result<VolumeHeader, VolumeError> {
        if self.read_only {
            return Err(VolumeError::ReadOnly);
        }
        if self.mig_on.load(Ordering::Acquire) {
            return Err(VolumeError::Invalid(
                "this attachment was re-encrypted already; detach and attach it again first",
            ));
        }
        let mut h = self.current_header()?;
        if h.reencrypt.is_some() {
            return Err(VolumeError::Invalid(
                "a re-encryption is already in progress",
            ));
        }
        h.flags |= FLAG_REENCRYPT;
        h.reencrypt = Some(Reencrypt {
            boundary: 0,
            journal_start: 0,
            journal_len: 0,
            state: 0,
            max_rate,
            journal_sha256: [0; 32],
            new_key_id: new_key_id.to_owned(),
            new_key_version,
            new_wrapped_dek: new_wrapped,
        });
        let new = Arc::new(SectorCipher::new(
            new_key,
            self.cipher.unit(),
            Backend::default(),
        )?);
        let h = rewrite_header(self.store.as_ref(), &h)?;
        *self.mig.write().unwrap_or_else(|e| e.into_inner()) = Some(Migration {
            new,
            boundary: 0,
            inflight: None,
        });
        self.mig_on.store(true, Ordering::SeqCst);
        // A write that checked the gate before it was on holds its stripes until it is done.
        for s in self.stripes.iter() {
            drop(s.write());
        }
        Ok(h)
    }

    /// Records pause state and rate limit in the header `h` (updated).
    pub fn set_reencrypt_state(
        &self,
        h: &mut VolumeHeader,
        paused: bool,
        max_rate: u64,
    ) -> Result<(), VolumeError> {
        let mut n = h.clone();
        let r = n
            .reencrypt
            .as_mut()
            .ok_or(VolumeError::Invalid("no re-encryption in progress"))?;
        r.state = if paused {
            r.state | REENC_PAUSED
        } else {
            r.state & !REENC_PAUSED
        };
        r.max_rate = max_rate;
        *h = rewrite_header(self.store.as_ref(), &n)?;
        Ok(())
    }

    /// One step of the re-encryption whose current header is `h` (updated as written): a
    /// pending journal recovered, else a hole run skipped or one segment migrated.
    pub fn reencrypt_step(&self, h: &mut VolumeHeader) -> Result<Step, VolumeError> {
        let r = h
            .reencrypt
            .clone()
            .ok_or(VolumeError::Invalid("no re-encryption in progress"))?;
        let u = self.unit;
        let store = self.store.as_ref();
        let new = match self.mig.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(m) => Arc::clone(&m.new),
            None => return Err(VolumeError::Invalid("no re-encryption on this volume")),
        };
        let new = new.as_ref();
        let ez = self.encrypt_zeroes;
        if r.journal_len > 0 {
            let end = r.journal_start + u64::from(r.journal_len);
            self.set_inflight(Some((r.journal_start / u, end / u)), None);
            let res = replay_journal(store, h, &self.cipher, new, ez);
            return match res {
                Ok(n) => {
                    self.set_inflight(None, Some(end / u));
                    Ok(Step::Rewrote(n))
                }
                // Still frozen: the segment may be half rewritten; a retry replays again.
                Err(e) => Err(e),
            };
        }
        let b = r.boundary;
        if b >= h.size {
            return Ok(Step::Done);
        }
        let d0 = h.data_offset;
        // The whole rest waits while the hole is measured and the boundary moved past it
        // (a write cannot fill the hole in between): a few allocation queries and one
        // header write, however large the hole (an empty 8 EiB volume: ~33 queries).
        self.set_inflight(Some((b / u, h.size.div_ceil(u))), None);
        let hole = match leading_hole(d0 + b, d0 + h.size, |at, len| store.allocation(at, len)) {
            Ok(len) => len / u * u,
            Err(e) => {
                self.set_inflight(None, None);
                return Err(e.into());
            }
        };
        if hole > 0 {
            return match advance(store, h, b + hole) {
                Ok(()) => {
                    self.set_inflight(None, Some((b + hole) / u));
                    Ok(Step::Skipped(hole))
                }
                Err(e) => {
                    self.set_inflight(None, None);
                    Err(e)
                }
            };
        }
        let s_end = (b + SEGMENT).min(h.size);
        self.set_inflight(Some((b / u, s_end / u)), None);
        let mut buf = vec![0u8; (s_end - b) as usize];
        let plan = store
            .read_at(&mut buf, d0 + b)
            .map_err(VolumeError::from)
            .and_then(|()| plan(store, d0 + b, &buf, u, ez));
        let plan = match plan {
            Ok(p) => p,
            Err(e) => {
                self.set_inflight(None, None);
                return Err(e);
            }
        };
        let mut n = 0;
        if plan.iter().any(|&x| x) {
            // From the journal's header on, an error leaves the segment frozen (retry replays).
            store.write_at(&buf, JOURNAL_AT)?;
            crash_point();
            store.sync()?;
            crash_point();
            let mut j = h.clone();
            if let Some(jr) = j.reencrypt.as_mut() {
                jr.journal_start = b;
                jr.journal_len = buf.len() as u32;
                jr.journal_sha256 = sha256(&buf);
            }
            *h = rewrite_header(store, &j)?;
            n = apply(store, d0, b, &mut buf, &plan, u, &self.cipher, new)?;
            store.sync()?;
            crash_point();
        }
        advance(store, h, s_end)?;
        self.set_inflight(None, Some(s_end / u));
        Ok(Step::Rewrote(n))
    }

    /// Ends a re-encryption whose boundary reached the end: the header keeps only the new DEK
    /// (both copies). The open volume keeps using the new DEK for every unit.
    pub fn finish_reencrypt(&self, h: &mut VolumeHeader) -> Result<(), VolumeError> {
        let r = h
            .reencrypt
            .clone()
            .ok_or(VolumeError::Invalid("no re-encryption in progress"))?;
        if r.boundary != h.size || r.journal_len != 0 {
            return Err(VolumeError::Invalid("re-encryption not at its end"));
        }
        let mut n = h.clone();
        n.key_id = r.new_key_id;
        n.key_version = r.new_key_version;
        n.wrapped_dek = r.new_wrapped_dek;
        n.flags &= !FLAG_REENCRYPT;
        n.reencrypt = None;
        *h = rewrite_header(self.store.as_ref(), &n)?;
        Ok(())
    }
}

fn sha256(b: &[u8]) -> [u8; 32] {
    digest::digest(&digest::SHA256, b)
        .as_ref()
        .try_into()
        .expect("32 bytes")
}

/// Which units of a segment's old ciphertext `buf` (stored at `at`) are rewritten: thin, the
/// ones not all zero; encrypt-zeroes, all but the store's holes.
fn plan(
    store: &dyn BlockStore,
    at: u64,
    buf: &[u8],
    u: u64,
    encrypt_zeroes: bool,
) -> Result<Vec<bool>, VolumeError> {
    let us = u as usize;
    let mut p: Vec<bool> = buf.chunks_exact(us).map(|c| !is_zero(c)).collect();
    if encrypt_zeroes && p.iter().any(|&x| !x) {
        let mut off = 0u64;
        for (len, hole) in store.allocation(at, buf.len() as u64)? {
            if !hole {
                let (a, b) = (
                    (off / u) as usize,
                    ((off + len).div_ceil(u) as usize).min(p.len()),
                );
                p[a..b].fill(true);
            }
            off += len;
        }
    }
    Ok(p)
}

/// Rewrites the planned units of the segment at data offset `start` (old ciphertext in `buf`,
/// clobbered) under the new DEK; returns the bytes written.
#[allow(clippy::too_many_arguments)]
fn apply(
    store: &dyn BlockStore,
    d0: u64,
    start: u64,
    buf: &mut [u8],
    plan: &[bool],
    u: u64,
    old: &SectorCipher,
    new: &SectorCipher,
) -> Result<u64, VolumeError> {
    let us = u as usize;
    let mut written = 0;
    let mut k = 0;
    while k < plan.len() {
        if !plan[k] {
            k += 1;
            continue;
        }
        let s = k;
        while k < plan.len() && plan[k] {
            k += 1;
        }
        let run = &mut buf[s * us..k * us];
        let first = start / u + s as u64;
        old.decrypt(first, run);
        new.encrypt(first, run);
        store.write_at(run, d0 + start + (s * us) as u64)?;
        crash_point();
        written += run.len() as u64;
    }
    Ok(written)
}

/// Moves the boundary to `to` with no journal (header `h` updated).
fn advance(store: &dyn BlockStore, h: &mut VolumeHeader, to: u64) -> Result<(), VolumeError> {
    let mut n = h.clone();
    if let Some(r) = n.reencrypt.as_mut() {
        r.boundary = to;
        r.journal_start = 0;
        r.journal_len = 0;
        r.journal_sha256 = [0; 32];
    }
    *h = rewrite_header(store, &n)?;
    Ok(())
}

/// Redoes the journaled segment named in `h`: checks the journal, rewrites the segment from
/// it, syncs, advances the boundary past it. Returns the bytes rewritten.
fn replay_journal(
    store: &dyn BlockStore,
    h: &mut VolumeHeader,
    old: &SectorCipher,
    new: &SectorCipher,
    encrypt_zeroes: bool,
) -> Result<u64, VolumeError> {
    let r = h
        .reencrypt
        .clone()
        .ok_or(VolumeError::Invalid("no re-encryption in progress"))?;
    let u = u64::from(h.sector_size);
    let mut buf = vec![0u8; r.journal_len as usize];
    store.read_at(&mut buf, JOURNAL_AT)?;
    if sha256(&buf) != r.journal_sha256 {
        return Err(VolumeError::BadHeader(
            "re-encryption journal does not match its checksum",
        ));
    }
    let at = h.data_offset + r.journal_start;
    let p = plan(store, at, &buf, u, encrypt_zeroes)?;
    let n = apply(
        store,
        h.data_offset,
        r.journal_start,
        &mut buf,
        &p,
        u,
        old,
        new,
    )?;
    store.sync()?;
    advance(store, h, r.journal_start + u64::from(r.journal_len))?;
    Ok(n)
}

/// Before a volume in re-encryption opens: replays a journaled segment left by a crash
/// (idempotent). Returns the header now in the store.
pub fn recover(
    store: &dyn BlockStore,
    old: &XtsKey,
    new: &XtsKey,
) -> Result<VolumeHeader, VolumeError> {
    let mut h = read_header_from(store)?;
    if h.reencrypt.as_ref().is_some_and(|r| r.journal_len > 0) {
        let unit =
            UnitSize::from_bytes(h.sector_size).ok_or(VolumeError::BadHeader("sector size"))?;
        let o = SectorCipher::new(old, unit, Backend::default())?;
        let n = SectorCipher::new(new, unit, Backend::default())?;
        let ez = h.encrypt_zeroes();
        replay_journal(store, &mut h, &o, &n, ez)?;
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use uuid::Uuid;

    use super::*;
    use crate::volume::MemStore;

    fn key(seed: u8) -> XtsKey {
        let b: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(31) ^ seed).collect();
        XtsKey::new(&b).unwrap()
    }

    /// Data area: 1 MiB + 3 units (a short last segment). Unit i: a pattern, explicit zeros
    /// (i % 7 == 0) or never written (i % 5 == 3, a hole).
    fn base(sector: u32, encrypt_zeroes: bool) -> (MemStore, Vec<u8>) {
        let size = (1u64 << 20) + 3 * u64::from(sector);
        let store = MemStore::new();
        let mut h =
            VolumeHeader::new(Uuid::from_u128(7), size, sector, "old", 1, vec![1; 90]).unwrap();
        if encrypt_zeroes {
            h.flags |= super::super::header::FLAG_ENCRYPT_ZEROES;
        }
        Volume::create_with_store(&store, &h).unwrap();
        let shared = Arc::new(store);
        let v = Volume::open_with_store(Box::new(shared.clone()), key(1), false, Backend::Soft)
            .unwrap();
        let u = sector as usize;
        let mut want = vec![0u8; size as usize];
        for i in 0..size as usize / u {
            if i % 5 == 3 {
                continue;
            }
            let unit = &mut want[i * u..(i + 1) * u];
            if i % 7 != 0 {
                for (j, b) in unit.iter_mut().enumerate() {
                    *b = (i * 13 + j) as u8 | 1;
                }
            }
            v.write((i * u) as u64, unit).unwrap();
        }
        drop(v);
        let store = Arc::try_unwrap(shared).ok().unwrap().duplicate();
        (store, want)
    }

    fn open(store: &Arc<MemStore>) -> Volume {
        open_on(store)
    }

    fn open_on<S: BlockStore + 'static>(store: &Arc<S>) -> Volume {
        let s: &dyn BlockStore = store.as_ref();
        let h = match read_header_from(s).unwrap() {
            h if h.reencrypt.is_some() => recover(s, &key(1), &key(2)).unwrap(),
            h => h,
        };
        let (old, new) = match (&h.reencrypt, h.key_id.as_str()) {
            (Some(_), _) => (key(1), Some(key(2))),
            (None, "new") => (key(2), None),
            (None, _) => (key(1), None),
        };
        Volume::open_with_keys(Box::new(store.clone()), old, new, false, Backend::default())
            .unwrap()
    }

    fn check(v: &Volume, want: &[u8], what: &str) {
        let mut got = vec![0u8; want.len()];
        v.read(0, &mut got).unwrap();
        let u = v.unit as usize;
        for (i, (g, w)) in got.chunks(u).zip(want.chunks(u)).enumerate() {
            assert!(g == w, "{what}: unit {i} reads wrong");
        }
    }

    /// Runs a whole re-encryption on `v`; stops at the first error (a cut).
    fn run(v: &Volume) -> Result<(), VolumeError> {
        let mut h = v.current_header()?;
        if h.reencrypt.is_none() {
            h = v.begin_reencrypt(&key(2), "new", 4, vec![2; 100], 0)?;
        }
        while v.reencrypt_step(&mut h)? != Step::Done {}
        v.finish_reencrypt(&mut h)
    }

    /// The data area decrypts with the new key only (holes and thin zeros stay zeros).
    fn check_new_only(store: &MemStore, want: &[u8], sector: u32, ez: bool) {
        let h = read_header_from(store).unwrap();
        assert_eq!(h.key_id, "new");
        assert!(h.reencrypt.is_none());
        let unit = UnitSize::from_bytes(sector).unwrap();
        let new = SectorCipher::new(&key(2), unit, Backend::Soft).unwrap();
        let old = SectorCipher::new(&key(1), unit, Backend::Soft).unwrap();
        let u = sector as usize;
        let mut raw = vec![0u8; want.len()];
        store.read_at(&mut raw, h.data_offset).unwrap();
        for (i, (c, w)) in raw.chunks(u).zip(want.chunks(u)).enumerate() {
            if is_zero(c) {
                assert!(is_zero(w) && (!ez || i % 5 == 3), "unit {i}: stored zeros");
                continue;
            }
            let mut p = c.to_vec();
            new.decrypt(i as u64, &mut p);
            assert!(p == w, "unit {i}: new key");
            let mut q = c.to_vec();
            old.decrypt(i as u64, &mut q);
            assert!(q != w, "unit {i}: old key still decrypts");
        }
    }

    fn cut_everywhere(sector: u32, ez: bool) {
        let (base, want) = base(sector, ez);
        // Bytes written by a full run, to place the cuts.
        let total = {
            let s = Arc::new(base.duplicate());
            s.fail_after(u64::MAX / 2, libc::EIO);
            run(&open(&s)).unwrap();
            check_new_only(&s, &want, sector, ez);
            let mut probe = 0u64;
            loop {
                let s = Arc::new(base.duplicate());
                s.fail_after(probe, libc::EIO);
                if run(&open(&s)).is_ok() {
                    break probe;
                }
                probe += 64 << 10;
            }
        };
        // Every 16381st byte, and finely across the start's header update, the first
        // segment's journal, journal header update, data and boundary header update.
        let mut cuts: Vec<u64> = (0..=total).step_by(16381).collect();
        let seg = SEGMENT;
        cuts.extend((0..8192 + 64).step_by(331));
        cuts.extend((8192 + seg - 64..8192 + seg + 8192 + 64).step_by(293));
        cuts.extend((16384 + 2 * seg - 64..16384 + 2 * seg + 8192 + 64).step_by(307));
        for cut in cuts {
            let s = Arc::new(base.duplicate());
            s.fail_after(cut, libc::EIO);
            let v = open(&s);
            let r = run(&v);
            drop(v);
            // The crash: what the store holds. Reopen (recovering), check, finish, check.
            let after = Arc::new(s.duplicate());
            let v = open(&after);
            check(&v, &want, &format!("cut at {cut} ({r:?})"));
            run(&v).unwrap();
            check(&v, &want, &format!("cut at {cut}, finished"));
            drop(v);
            check_new_only(&after, &want, sector, ez);
            check(&open(&after), &want, &format!("cut at {cut}, reopened"));
        }
    }

    #[test]
    fn crash_cut_anywhere_recovers_512() {
        cut_everywhere(512, false);
    }

    #[test]
    fn crash_cut_anywhere_recovers_4096_encrypt_zeroes() {
        cut_everywhere(4096, true);
    }

    /// On tmpfs reads decrypt straight from the file's mapping (`mapped.rs`): mid-migration
    /// each unit with its own key, also where one read spans the boundary.
    #[test]
    fn mapped_reads_take_each_units_key_during_the_migration() {
        for (sector, ez) in [(512, false), (4096, true), (4096, false)] {
            let (base, want) = base(sector, ez);
            let dir = tempfile::tempdir_in("/dev/shm").unwrap();
            let path = dir.path().join("v");
            // A sparse copy: encrypt-zeroes reads allocated zeros as ciphertext.
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            let snap = base.snapshot();
            f.set_len(snap.len() as u64).unwrap();
            for (i, page) in snap.chunks(4096).enumerate() {
                if !is_zero(page) {
                    std::os::unix::fs::FileExt::write_all_at(&f, page, i as u64 * 4096).unwrap();
                }
            }
            let store = Arc::new(crate::volume::FileStore::new(f));
            assert!(store.mapped(0, 4096).is_some(), "/dev/shm is mapped");
            let v = open_on(&store);
            check(&v, &want, "before");
            let mut h = v
                .begin_reencrypt(&key(2), "new", 4, vec![2; 100], 0)
                .unwrap();
            for i in 0.. {
                if v.reencrypt_step(&mut h).unwrap() == Step::Done {
                    break;
                }
                check(
                    &v,
                    &want,
                    &format!("sector {sector} ez {ez} after step {i}"),
                );
                // Reads of every length around the boundary (pieces straddle it).
                let mut got = vec![0u8; 3 * sector as usize + 1000];
                let at = h
                    .reencrypt
                    .as_ref()
                    .map_or(0, |r| r.boundary)
                    .saturating_sub(u64::from(sector) + 100)
                    .min(want.len() as u64 - got.len() as u64);
                v.read(at, &mut got).unwrap();
                assert!(got[..] == want[at as usize..at as usize + got.len()]);
            }
            v.finish_reencrypt(&mut h).unwrap();
            check(&v, &want, "finished");
        }
    }

    #[test]
    fn io_racing_the_migration_is_never_lost() {
        let (base, _) = base(512, false);
        let s = Arc::new(base);
        let v = Arc::new(open(&s));
        let size = v.size() as usize;
        let writer = {
            let v = v.clone();
            std::thread::spawn(move || {
                let mut want = vec![0u8; size];
                v.read(0, &mut want).unwrap();
                let mut x: u64 = 12345;
                for n in 0..3000u32 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = (x as usize % (size - 9000)) & !0x7; // unaligned to units
                    let len = 1 + (x >> 40) as usize % 8192;
                    let data: Vec<u8> = (0..len).map(|j| (n as usize + j) as u8 | 0x80).collect();
                    v.write(off as u64, &data).unwrap();
                    want[off..off + len].copy_from_slice(&data);
                    let mut got = vec![0u8; len];
                    v.read(off as u64, &mut got).unwrap();
                    assert!(got == data, "read back at {off}");
                }
                want
            })
        };
        run(&v).unwrap();
        let want = writer.join().unwrap();
        let mut got = vec![0u8; size];
        v.read(0, &mut got).unwrap();
        assert!(got == want);
        drop(v);
        let v = open(&s);
        v.read(0, &mut got).unwrap();
        assert!(got == want, "after reopen with the new key only");
    }

    #[test]
    fn holes_are_skipped_with_header_writes_only() {
        let store = Arc::new(MemStore::new());
        let h =
            VolumeHeader::new(Uuid::from_u128(8), 64 << 30, 4096, "old", 1, vec![1; 90]).unwrap();
        Volume::create_with_store(store.as_ref(), &h).unwrap();
        let v = open(&store);
        v.write(5 << 30, &[7u8; 4096]).unwrap();
        let mut h = v
            .begin_reencrypt(&key(2), "new", 1, vec![2; 100], 0)
            .unwrap();
        let mut steps = 0;
        loop {
            match v.reencrypt_step(&mut h).unwrap() {
                Step::Done => break,
                _ => steps += 1,
            }
        }
        v.finish_reencrypt(&mut h).unwrap();
        assert!(
            steps < 20,
            "{steps} steps for a 64 GiB volume with one written unit"
        );
        let mut got = [0u8; 4096];
        open(&store).read(5 << 30, &mut got).unwrap();
        assert_eq!(got, [7u8; 4096]);
    }

    #[test]
    fn old_cryptvol_refuses_and_fields_round_trip() {
        let mut h =
            VolumeHeader::new(Uuid::from_u128(9), 1 << 30, 4096, "k", 1, vec![1; 90]).unwrap();
        h.flags |= FLAG_REENCRYPT;
        h.reencrypt = Some(Reencrypt {
            boundary: 8192,
            journal_start: 4096,
            journal_len: 4096,
            state: REENC_PAUSED,
            max_rate: 200 << 20,
            journal_sha256: [5; 32],
            new_key_id: "k2".into(),
            new_key_version: 3,
            new_wrapped_dek: vec![9; 1600],
        });
        let b = h.encode().unwrap();
        assert_eq!(&b[4060..4064], &2u32.to_le_bytes()); // FLAG_REENCRYPT
        assert_eq!(&b[2216..2224], &8192u64.to_le_bytes()); // boundary
        assert_eq!(&b[2232..2236], &4096u32.to_le_bytes()); // journal length
        assert_eq!(&b[2280..2282], b"k2"); // new key id
        assert_eq!(VolumeHeader::decode(&b).unwrap(), h);
        // Flag without fields (or the reverse) is refused.
        let mut g = h.clone();
        g.reencrypt = None;
        assert!(g.encode().is_err());
    }
}
