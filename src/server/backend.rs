//! What the NBD server serves: any type implementing [`Backend`], looked up by name through an
//! [`ExportRegistry`]. Backend calls are blocking (file I/O and crypto); the server runs them off
//! the reactor threads.

use std::io;
use std::sync::Arc;

use super::PeerIdentity;
use crate::aligned::AlignedBuf;
use crate::volume::store::AioDone;

/// One allocation extent for `base:allocation` block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// Never written or trimmed: reads as zeros (reported as HOLE|ZERO).
    pub hole: bool,
}

/// A block device the server can export. Offsets and lengths are already validated against
/// `size()` by the server: `offset + len <= size()` always holds on entry.
pub trait Backend: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Preferred I/O size (the volume's sector size): 512 or 4096.
    fn preferred_block_size(&self) -> u32;
    /// Fills `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// [`read`](Self::read) if that needs no device I/O; `Ok(false)` if it would wait (the
    /// server then reads on its blocking pool instead of the connection's thread).
    fn try_read(&self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        self.read(offset, buf).map(|()| true)
    }
    /// Writes `data` at `offset`; with `fua`, durable before returning. The buffer is the
    /// server's own: the backend may clobber it (encrypt in place) to save a copy.
    fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> io::Result<()>;
    /// Every write that returned before this call is durable when it returns.
    fn flush(&self) -> io::Result<()>;
    /// The range reads as zeros afterwards and frees space where possible.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;
    /// The range reads as zeros afterwards; `may_trim` (no NO_HOLE flag) allows punching holes.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()>;
    /// Allocation extents covering at least the first byte of `[offset, offset+len)`, in order.
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>>;
    /// Whether every write waits for the network (a volume on Ceph RBD): small writes then go
    /// to the blocking pool too, not the connection's thread or the reactor.
    fn writes_wait(&self) -> bool {
        false
    }
    /// Starts a READ of `buf.len()` bytes at `offset` without a thread waiting for the device,
    /// when the backend can (a volume on RBD: librbd's aio). `done` is called once, on a thread
    /// of the device's library, with the buffer and the device's result, and must only hand
    /// them on; [`finish_read`](Self::finish_read) then runs on a thread that may block. `Err`:
    /// not started, everything given back ([`read`](Self::read) instead).
    fn start_read(
        &self,
        _offset: u64,
        buf: AlignedBuf,
        done: AioDone,
    ) -> Result<(), (AlignedBuf, AioDone)> {
        Err((buf, done))
    }
    /// Completes a READ that [`start_read`](Self::start_read) started and whose device part
    /// ended with `r`: the data as the client reads it (decrypted), or the client's error.
    fn finish_read(&self, _offset: u64, _buf: &mut [u8], r: io::Result<()>) -> io::Result<()> {
        r
    }
    /// Starts a (non-FUA) WRITE of `data` at `offset` without a thread waiting, as
    /// [`start_read`](Self::start_read); `data` may be clobbered once started, and is
    /// untouched when given back.
    fn start_write(
        &self,
        _offset: u64,
        data: AlignedBuf,
        done: AioDone,
    ) -> Result<(), (AlignedBuf, AioDone)> {
        Err((data, done))
    }
    /// The client's result of a WRITE that [`start_write`](Self::start_write) started and
    /// whose device part ended with `r`.
    fn finish_write(&self, r: io::Result<()>) -> io::Result<()> {
        r
    }
}

/// An export as listed by `NBD_OPT_LIST`.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
}

/// An opened export, held by one NBD connection for its lifetime. Dropping it tells the
/// registry that the connection is gone (the daemon counts clients per volume).
pub struct OpenExport {
    pub backend: Arc<dyn Backend>,
    pub read_only: bool,
    /// Becomes `true` when the export is force-detached: the session stops taking requests,
    /// finishes those in flight and closes.
    pub detached: tokio::sync::watch::Receiver<bool>,
    /// The export's QoS limits, shared by all its connections (`None`: never throttled).
    pub qos: Option<Arc<super::Qos>>,
    /// Dropped with the connection.
    pub guard: Box<dyn Send + Sync>,
    /// The export's metrics: each connection counts into a shard of its own.
    pub stats: Option<Arc<crate::metrics::VolumeStats>>,
}

/// The set of exports the server offers: the daemon's attached volumes, or a fixed map in tests.
/// Every call names the peer asking, so the registry can decide who sees what: the server
/// answers an export `open` refuses exactly like one that does not exist.
pub trait ExportRegistry: Send + Sync + 'static {
    /// The exports `peer` may see (`NBD_OPT_LIST`).
    fn list(&self, peer: &PeerIdentity) -> Vec<ExportInfo>;
    /// `None` when no export of that name is attached, or `peer` may not have it.
    fn open(&self, name: &str, peer: &PeerIdentity) -> Option<OpenExport>;
}
