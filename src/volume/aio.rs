//! A [`Volume`]'s READ and WRITE started without a thread waiting for the store
//! ([`BlockStore::read_at_async`](super::BlockStore::read_at_async): RBD's librbd aio), for
//! the server (`server/exec.rs`): the request is started on the connection's thread and
//! finished (decrypted, replied) on the blocking pool once the store calls back.
//!
//! Only the plain case takes this path: whole units, no re-encryption running, no snapshot
//! being copied, units at least as large as the store's I/O granule. Anything else is refused
//! (`Err` gives the buffer and the callback back) and served by [`Volume::read`] /
//! [`Volume::write_mut`], which handle every case. The rules of those stay true here:
//! - a WRITE holds the stripes of its units shared from before it encrypts until the store
//!   calls back ([`SharedHold`], released on librbd's thread), so a read-modify-write of a unit
//!   in the same stripe, a snapshot's quiesce and a re-encryption's start wait for it;
//! - the re-encryption gate and the snapshot hook are checked after the stripes are held
//!   (both are switched on under every stripe lock), so a write that passed them finishes
//!   before either begins;
//! - a READ is decrypted in [`Volume::read_finish`], which re-reads through the gate if a
//!   re-encryption began while the data was in flight (the seqlock rule of `read`).

use super::disk::{CHUNK, STRIPES};
use super::store::AioDone;
use super::stripe::SharedHold;
use super::{Volume, VolumeError};
use crate::aligned::AlignedBuf;
use std::sync::atomic::Ordering;

impl Volume {
    /// Whether `[offset, offset + len)` can go the async way (see the module doc).
    fn plain(&self, offset: u64, len: u64, write: bool) -> bool {
        let u = self.unit;
        len > 0
            && len <= CHUNK as u64
            && offset.is_multiple_of(u)
            && len.is_multiple_of(u)
            && self.granule == u
            && self.check(offset, len, write).is_ok()
            && !self.mig_on.load(Ordering::Acquire)
            && !(write && self.cow().is_active())
    }

    /// Starts reading `buf.len()` bytes at `offset` from the store without waiting; `done`
    /// gets the ciphertext from the store's thread, [`read_finish`](Self::read_finish)
    /// decrypts it. `Err`: not started, use [`read`](Self::read).
    pub fn read_start(
        &self,
        offset: u64,
        buf: AlignedBuf,
        done: AioDone,
    ) -> Result<(), (AlignedBuf, AioDone)> {
        if !self.plain(offset, buf.len() as u64, false) {
            return Err((buf, done));
        }
        self.store.read_at_async(buf, self.pos(offset), done)
    }

    /// Decrypts in place what [`read_start`](Self::read_start) read at `offset`.
    pub fn read_finish(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        if self.mig_on.load(Ordering::Acquire) {
            // A re-encryption began while the data was in flight: it may have rewritten the
            // range. Read it again through its gate.
            return self.read(offset, buf);
        }
        let u = self.unit as usize;
        let k = self.keys(None);
        for (i, c) in buf.chunks_mut(CHUNK).enumerate() {
            let first = (offset + (i * CHUNK) as u64) / u as u64;
            self.decrypt_units(k, first, c)?;
        }
        Ok(())
    }

    /// Encrypts `data` (whole units at `offset`) in place and starts writing it without
    /// waiting; `done` gets the result from the store's thread, the stripes are released just
    /// before. `Err`: not started and `data` untouched, use [`write_mut`](Self::write_mut).
    pub fn write_start(
        &self,
        offset: u64,
        mut data: AlignedBuf,
        done: AioDone,
    ) -> Result<(), (AlignedBuf, AioDone)> {
        let len = data.len() as u64;
        if self.read_only() || !self.plain(offset, len, true) {
            return Err((data, done));
        }
        let u = self.unit;
        let stripes = self.stripes.clone();
        let mut idx: Vec<usize> = (offset / u..(offset + len) / u)
            .map(|unit| (unit % STRIPES as u64) as usize)
            .collect();
        idx.sort_unstable();
        idx.dedup();
        let hold = SharedHold::take(&stripes, idx);
        // Switched on under every stripe lock: checked again now that ours are held.
        if self.mig_on.load(Ordering::Acquire) || self.cow().is_active() {
            drop(hold);
            return Err((data, done));
        }
        let pos = self.pos(offset);
        self.encrypt_units(self.keys(None), offset / u, &mut data);
        let done: AioDone = Box::new(move |buf, r| {
            drop(hold);
            done(buf, r)
        });
        match self.store.write_at_async(data, pos, done) {
            Ok(()) => Ok(()),
            // Not started, but already encrypted: written here, synchronously, instead (the
            // store refuses only in odd cases: no memory for librbd's completion).
            Err((buf, done)) => {
                let r = self.store.write_at(&buf, pos);
                done(buf, r);
                Ok(())
            }
        }
    }
}
