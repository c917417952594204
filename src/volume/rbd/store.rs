//! [`RbdStore`]: the [`BlockStore`] over one RBD image: librbd's synchronous calls (the
//! caller's thread waits for the OSDs, like a `pread` on a file store), and its asynchronous
//! ones for the server's READs and WRITEs ([`super::aio`]: no thread waits).

use std::io;

use super::{Image, Presence};
use crate::aligned::AlignedBuf;
use crate::volume::store::{AioDone, BlockStore};

/// A volume's bytes in an RBD image: offset for offset, the same layout as a volume file.
pub struct RbdStore {
    image: Image,
    /// Held while this store reads a snapshot that other hosts must not delete under it
    /// ([`Presence`]); unwatched when the store goes.
    _presence: Option<Presence>,
}

impl RbdStore {
    pub fn new(image: Image) -> RbdStore {
        RbdStore {
            image,
            _presence: None,
        }
    }

    /// A store that announces itself as a reader for as long as it lives.
    pub fn with_presence(image: Image, presence: Presence) -> RbdStore {
        RbdStore {
            image,
            _presence: Some(presence),
        }
    }

    pub fn image(&self) -> &Image {
        &self.image
    }

    pub fn into_image(self) -> Image {
        self.image
    }

    /// Whether `[offset, offset + len)` lies within the image (false on any error).
    fn within(&self, offset: u64, len: usize) -> bool {
        match (self.image.size(), offset.checked_add(len as u64)) {
            (Ok(size), Some(end)) => end <= size,
            _ => false,
        }
    }
}

impl BlockStore for RbdStore {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // librbd refuses reads that start past the end; the contract reads zeros there.
        let size = self.image.size()?;
        let n = if offset >= size {
            0
        } else {
            let want = (size - offset).min(buf.len() as u64) as usize;
            self.image.read(&mut buf[..want], offset)?
        };
        buf[n..].fill(0);
        Ok(())
    }

    fn writes_wait(&self) -> bool {
        true
    }

    fn read_at_nowait(&self, _buf: &mut [u8], _offset: u64) -> io::Result<bool> {
        // Every read waits for the OSDs (no page cache, librbd's cache is off): the request
        // goes to the blocking pool rather than holding the connection's own thread.
        Ok(false)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        // An image does not grow by writing past its end (EINVAL); a file does.
        if end > self.image.size()? {
            self.image.resize(end)?;
        }
        self.image.write(buf, offset)
    }

    fn read_at_async(
        &self,
        buf: AlignedBuf,
        offset: u64,
        done: AioDone,
    ) -> Result<(), (AlignedBuf, AioDone)> {
        // Only within the image (past its end reads zeros: read_at's job).
        match self.within(offset, buf.len()) {
            true => self.image.aio_read(buf, offset, done),
            false => Err((buf, done)),
        }
    }

    fn write_at_async(
        &self,
        buf: AlignedBuf,
        offset: u64,
        done: AioDone,
    ) -> Result<(), (AlignedBuf, AioDone)> {
        // Only within the image (a write past its end grows it first: write_at's job).
        match self.within(offset, buf.len()) {
            true => self.image.aio_write(buf, offset, done),
            false => Err((buf, done)),
        }
    }

    fn sync(&self) -> io::Result<()> {
        self.image.flush()
    }

    fn native_snapshot(&self, name: &str) -> io::Result<()> {
        self.image.flush()?;
        self.image.snap_create(name)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        // write_zeroes, not discard: the range must read as zeros afterwards (the volume's
        // thin rule reads an all-zero unit as a hole), and rbd_discard skips the parts of
        // objects below rbd_discard_granularity_bytes, leaving old ciphertext there.
        // write_zeroes frees whole objects and zeroes partial ones.
        self.image.write_zeroes(offset, len)
    }

    fn len(&self) -> io::Result<u64> {
        self.image.size()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.image.resize(len)
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        let end = offset.saturating_add(len);
        let mut runs = Vec::new();
        let mut pos = offset;
        for (o, l) in self.image.allocated(offset, len)? {
            if o > pos {
                runs.push((o - pos, true));
            }
            runs.push((l, false));
            pos = o + l;
        }
        if pos < end {
            runs.push((end - pos, true));
        }
        Ok(runs)
    }
}
