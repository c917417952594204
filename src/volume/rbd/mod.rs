//! Ceph RBD images as block stores: a small safe wrapper over librados/librbd's C API
//! ([`ffi`], declared by hand) and [`RbdStore`], the [`BlockStore`](super::BlockStore) over one
//! image, so that the same [`Volume`](super::Volume) (format, cipher, read-modify-write, stripe
//! locks) runs on RBD as on files.
//!
//! ```text
//!  Cluster (rados_t: one session, one cephx user, bounded timeouts, rbd_cache off)
//!    └─ IoCtx (rados_ioctx_t: one pool)           create / remove / list images
//!         └─ Image (rbd_image_t)                  read, write, flush, discard, write_zeroes,
//!              └─ RbdStore: BlockStore             size, resize, allocated extents, locks
//! ```
//!
//! Handles keep their parents alive (an `Image` holds its `IoCtx`, which holds its `Cluster`),
//! so no handle outlives the one it was made from. librados and librbd are thread-safe for
//! everything used here; `rbd_close` runs only in `Drop`/[`Image::close`], which own the image.
//!
//! **Cache: off.** `rbd_cache = false` is set on every cluster handle (it overrides the conf
//! file). A write then returns only once the OSDs have committed it, so FLUSH is a no-op round
//! trip and every acknowledged write survives the daemon's kill -9 and is seen by the next
//! holder after a takeover. With the writeback cache, acknowledged writes would sit in the
//! daemon's RAM until FLUSH, a fenced holder's dirty cache would be lost silently, and
//! librbd's object cacher serialises an image's I/O under one lock (a limit at QD32), while
//! cryptvol gains nothing from it: the guest's page cache sits above NBD and every write of a
//! `Volume` is whole encrypted units. librbd's default (`writearound`) also acknowledges
//! writes early: measured, it makes fio→librbd's 4 KiB QD32 random writes 1.6× faster than
//! the same fio with the cache off, which cryptvol matches (1.1×; docs/benchmarks.md, RBD):
//! that speed is the early acknowledgement this module declines.
//!
//! **Timeouts.** `rados_osd_op_timeout`, `rados_mon_op_timeout` and `client_mount_timeout`
//! are always set (librados's defaults are 0 = wait forever): with the cluster gone, a call
//! returns `ETIMEDOUT` after [`ClusterConfig::op_timeout`] instead of hanging.
//!
//! **Locks.** [`Image::lock_exclusive`] takes the image's exclusive lock explicitly
//! (`rbd_lock_acquire`): librbd then never hands it over to another client on request (its
//! automatic lock is cooperative and moves to any writer within milliseconds, which is no
//! fence). Another client's acquire fails with `EROFS` (reported as [`LockError::Held`],
//! naming the holder) and so do its writes. [`Image::lock_break`] breaks a holder's lock and
//! blocklists its session (`rbd_blocklist_on_break_lock`): every later write of the old holder
//! fails with `ESHUTDOWN` (librados's `EBLOCKLISTED`).

mod aio;
mod ffi;
mod object;
mod store;
mod watch;

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

pub use object::{ObjectRead, VersionMismatch};
pub use store::RbdStore;
pub use watch::{MAX_LABEL, Presence};

/// Largest length handed to one librbd call: librbd returns byte counts as `int` internally
/// and refuses discards longer than `INT_MAX`.
const MAX_IO: usize = 1 << 30;
/// Image metadata key recording who holds the exclusive lock (see [`Image::lock_exclusive`]).
const HOLDER_KEY: &str = "cryptvol.holder";

/// How to reach a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The ceph.conf to read (monitors, and the keyring unless `keyring` is set).
    pub conf: PathBuf,
    /// The cephx user without its `client.` prefix, e.g. `cryptvol`.
    pub client: String,
    /// The user's keyring, when the conf does not name it.
    pub keyring: Option<PathBuf>,
    /// Bound on every OSD and monitor operation (`rados_osd_op_timeout`,
    /// `rados_mon_op_timeout`; whole seconds, rounded up): an I/O to an unreachable cluster
    /// fails with `ETIMEDOUT` then.
    pub op_timeout: Duration,
    /// Bound on connecting (`client_mount_timeout`; whole seconds, rounded up).
    pub mount_timeout: Duration,
}

impl ClusterConfig {
    /// A config with the default timeouts (30 s per operation, 10 s to connect).
    pub fn new(conf: impl Into<PathBuf>, client: impl Into<String>) -> ClusterConfig {
        ClusterConfig {
            conf: conf.into(),
            client: client.into(),
            keyring: None,
            op_timeout: Duration::from_secs(30),
            mount_timeout: Duration::from_secs(10),
        }
    }
}

/// A negative errno from librados/librbd as an `io::Error`; non-negative values pass.
fn check(r: c_int) -> io::Result<c_int> {
    if r < 0 {
        Err(io::Error::from_raw_os_error(-r))
    } else {
        Ok(r)
    }
}

fn check_len(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::from_raw_os_error(-r as i32))
    } else {
        Ok(r as usize)
    }
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains NUL"))
}

fn path_cstring(p: &std::path::Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

fn secs(d: Duration) -> String {
    // librados takes whole seconds ("3.5" is EINVAL); 0 would mean "forever", so at least 1.
    (d.as_secs() + u64::from(d.subsec_nanos() > 0))
        .max(1)
        .to_string()
}

/// `e` with what was being done (the kind stays; the raw errno goes into the message).
fn context(what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// A connected cluster session (`rados_t`): one cephx user. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<ClusterHandle>,
}

struct ClusterHandle {
    h: ffi::rados_t,
    client: String,
}

// SAFETY: a connected rados_t is thread-safe (librados serialises internally); the handle is
// only shut down in Drop, when no other reference exists.
unsafe impl Send for ClusterHandle {}
// SAFETY: as above; every method takes &self and librados allows concurrent calls.
unsafe impl Sync for ClusterHandle {}

impl Drop for ClusterHandle {
    fn drop(&mut self) {
        // SAFETY: `h` came from rados_create2 and is shut down exactly once, here; every
        // IoCtx and Image holds a Cluster, so none is alive any more.
        unsafe { ffi::rados_shutdown(self.h) }
    }
}

impl Cluster {
    /// Reads the conf, sets the timeouts and `rbd_cache = false`, and connects.
    pub fn connect(cfg: &ClusterConfig) -> io::Result<Cluster> {
        let name = cstring(&format!("client.{}", cfg.client))?;
        let cluster_name = cstring("ceph")?;
        let mut h: ffi::rados_t = ptr::null_mut();
        // SAFETY: `h` is a valid out pointer; the strings are NUL-terminated and outlive the
        // call (librados copies them).
        check(unsafe { ffi::rados_create2(&mut h, cluster_name.as_ptr(), name.as_ptr(), 0) })?;
        // From here the handle is shut down on every path (Drop of `handle`).
        let handle = ClusterHandle {
            h,
            client: cfg.client.clone(),
        };
        let conf = path_cstring(&cfg.conf)?;
        // SAFETY: `h` is a live, not yet connected handle; `conf` is NUL-terminated.
        check(unsafe { ffi::rados_conf_read_file(h, conf.as_ptr()) })
            .map_err(|e| context(&format!("reading {}", cfg.conf.display()), e))?;
        let mut opts = vec![
            ("rados_osd_op_timeout", secs(cfg.op_timeout)),
            ("rados_mon_op_timeout", secs(cfg.op_timeout)),
            ("client_mount_timeout", secs(cfg.mount_timeout)),
            ("rbd_cache", "false".to_string()),
            // I/O is dispatched on the calling thread instead of being posted to librbd's
            // io_context thread first: one thread wake-up less per request (measured: 4.2 ->
            // 3.6 context switches per 4 KiB READ at QD32, docs/benchmarks.md). The callers
            // either wait anyway (synchronous calls, on the blocking pool) or are the
            // connection's thread starting an aio, which librbd does not block (lock and
            // refresh waits queue the I/O inside librbd).
            ("rbd_non_blocking_aio", "false".to_string()),
            // One io_context thread: librados completes an OSD reply there and librbd then
            // runs the image's completion callbacks on a strand of the same pool; with two
            // threads the strand often sits on the other one (a further wake-up per request).
            // Measured on 2 vCPUs, 4 KiB QD32: 3.7 -> 2.2-2.8 context switches and 60 -> 40-55
            // µs of daemon CPU per READ. The callbacks only queue work (server/dispatch.rs),
            // so one thread keeps up with every volume of the daemon.
            ("librados_thread_count", "1".to_string()),
            // librbd copies every aio write's buffer (its default, said here on purpose).
            // Without the copy it sends the caller's buffer and holds the completion until
            // the messenger has let go of it: with the cluster frozen, writes still queued in
            // librados (more bytes than the socket takes) were then never answered — 12 of
            // 24 in-flight 1 MiB writes after 30 s, against all 24 failed within the op
            // timeout with the copy (tests/rbd_aio.rs,
            // large_writes_into_a_frozen_cluster_are_answered). The copy costs ~18 % of the
            // daemon's CPU per 1 MiB write (docs/benchmarks.md); a bound on every request
            // comes first.
            ("rbd_disable_zero_copy_writes", "true".to_string()),
        ];
        if let Some(k) = &cfg.keyring {
            let k = k
                .to_str()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "keyring path"))?;
            opts.push(("keyring", k.to_string()));
        }
        for (k, v) in opts {
            let (k, v) = (cstring(k)?, cstring(&v)?);
            // SAFETY: live handle, NUL-terminated strings copied by librados.
            check(unsafe { ffi::rados_conf_set(h, k.as_ptr(), v.as_ptr()) })
                .map_err(|e| context(&format!("setting {k:?}"), e))?;
        }
        // SAFETY: live, configured handle; blocks at most client_mount_timeout.
        check(unsafe { ffi::rados_connect(h) }).map_err(|e| {
            context(
                &format!("connecting to the cluster as client.{}", cfg.client),
                e,
            )
        })?;
        Ok(Cluster {
            inner: Arc::new(handle),
        })
    }

    /// The cephx user (without `client.`).
    pub fn client(&self) -> &str {
        &self.inner.client
    }

    /// This session's global id (`client.<id>` in the cluster's logs).
    pub fn instance_id(&self) -> u64 {
        // SAFETY: connected handle; the call only reads it.
        unsafe { ffi::rados_get_instance_id(self.inner.h) }
    }

    /// This session's address, as lock owners and the blocklist name it.
    pub fn addrs(&self) -> io::Result<String> {
        let mut p: *mut c_char = ptr::null_mut();
        // SAFETY: connected handle; `p` is a valid out pointer.
        check(unsafe { ffi::rados_getaddrs(self.inner.h, &mut p) })?;
        if p.is_null() {
            return Err(io::Error::other("rados_getaddrs returned no address"));
        }
        // SAFETY: on success `p` is a NUL-terminated string malloc'ed by librados, which the
        // caller frees with free(); it is read once and freed once.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        // SAFETY: see above.
        unsafe { libc::free(p.cast()) };
        Ok(s)
    }

    /// An I/O context on `pool`.
    pub fn ioctx(&self, pool: &str) -> io::Result<IoCtx> {
        let name = cstring(pool)?;
        let mut io: ffi::rados_ioctx_t = ptr::null_mut();
        // SAFETY: connected handle; `io` a valid out pointer; `name` NUL-terminated.
        check(unsafe { ffi::rados_ioctx_create(self.inner.h, name.as_ptr(), &mut io) })?;
        Ok(IoCtx {
            inner: Arc::new(IoCtxHandle {
                h: io,
                pool: pool.to_string(),
                cluster: self.clone(),
            }),
        })
    }
}

/// An I/O context on one pool (`rados_ioctx_t`). Cheap to clone.
#[derive(Clone)]
pub struct IoCtx {
    inner: Arc<IoCtxHandle>,
}

struct IoCtxHandle {
    h: ffi::rados_ioctx_t,
    pool: String,
    cluster: Cluster,
}

// SAFETY: an ioctx is thread-safe as long as its settings (namespace, snapshot) do not change
// concurrently; this wrapper never changes them. Destroyed only in Drop.
unsafe impl Send for IoCtxHandle {}
// SAFETY: as above.
unsafe impl Sync for IoCtxHandle {}

impl Drop for IoCtxHandle {
    fn drop(&mut self) {
        // SAFETY: `h` came from rados_ioctx_create and is destroyed once, here; images hold
        // an IoCtx, so none is alive; the cluster (a field) is shut down only after this.
        unsafe { ffi::rados_ioctx_destroy(self.h) }
    }
}

impl IoCtx {
    pub fn pool(&self) -> &str {
        &self.inner.pool
    }

    pub fn cluster(&self) -> &Cluster {
        &self.inner.cluster
    }

    /// Creates an image of `size` bytes with the pool's default features (exclusive-lock,
    /// object-map, fast-diff among them); objects of 2^`order` bytes (librbd's default, 22 =
    /// 4 MiB, when `None`). Fails with `EEXIST` if the name is taken.
    pub fn create_image(&self, name: &str, size: u64, order: Option<u8>) -> io::Result<()> {
        let cname = cstring(name)?;
        let mut opts: ffi::rbd_image_options_t = ptr::null_mut();
        // SAFETY: `opts` is a valid out pointer; destroyed below on every path.
        unsafe { ffi::rbd_image_options_create(&mut opts) };
        let r = (|| {
            if let Some(order) = order {
                // SAFETY: live options handle.
                check(unsafe {
                    ffi::rbd_image_options_set_uint64(
                        opts,
                        ffi::RBD_IMAGE_OPTION_ORDER,
                        u64::from(order),
                    )
                })?;
            }
            // SAFETY: live ioctx and options; `cname` NUL-terminated for the call.
            check(unsafe { ffi::rbd_create4(self.inner.h, cname.as_ptr(), size, opts) })
        })();
        // SAFETY: created above, destroyed once.
        unsafe { ffi::rbd_image_options_destroy(opts) };
        r.map(drop)
    }

    /// Removes an image (`EBUSY` while another client has it open).
    pub fn remove_image(&self, name: &str) -> io::Result<()> {
        let cname = cstring(name)?;
        // SAFETY: live ioctx; `cname` NUL-terminated for the call.
        check(unsafe { ffi::rbd_remove(self.inner.h, cname.as_ptr()) }).map(drop)
    }

    /// Renames an image (`EEXIST` if `to` is taken; never replaces one).
    pub fn rename_image(&self, from: &str, to: &str) -> io::Result<()> {
        let (f, t) = (cstring(from)?, cstring(to)?);
        // SAFETY: live ioctx; both names NUL-terminated for the call.
        check(unsafe { ffi::rbd_rename(self.inner.h, f.as_ptr(), t.as_ptr()) }).map(drop)
    }

    /// The names of the pool's images.
    pub fn list_images(&self) -> io::Result<Vec<String>> {
        let mut cap: usize = 16;
        loop {
            let mut specs: Vec<ffi::rbd_image_spec_t> = Vec::with_capacity(cap);
            let mut n = cap;
            // SAFETY: `specs` has room for `n` entries; librbd fills at most `n` and sets `n`
            // to the count (or the needed size with -ERANGE).
            let r = unsafe { ffi::rbd_list2(self.inner.h, specs.as_mut_ptr(), &mut n) };
            if r == -libc::ERANGE {
                cap = n.max(cap * 2);
                continue;
            }
            check(r)?;
            let n = n.min(cap);
            // SAFETY: librbd initialised the first `n` entries (n <= capacity).
            unsafe { specs.set_len(n) };
            let names = specs
                .iter()
                .filter(|s| !s.name.is_null())
                .map(|s| {
                    // SAFETY: a non-null `name` is a NUL-terminated string owned by the spec,
                    // freed only below.
                    unsafe { CStr::from_ptr(s.name) }
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            // SAFETY: frees the strings of the `n` specs librbd filled, once; the Vec's own
            // buffer is freed by Rust (cleanup does not free the array).
            unsafe { ffi::rbd_image_spec_list_cleanup(specs.as_mut_ptr(), n) };
            return Ok(names);
        }
    }

    /// Opens an image read-write. Its lock is not taken: see [`Image::lock_exclusive`].
    pub fn open(&self, name: &str) -> io::Result<Image> {
        self.open_with(name, false)
    }

    /// Opens an image read-only: no watch, no lock; writes fail with `EROFS`.
    pub fn open_read_only(&self, name: &str) -> io::Result<Image> {
        self.open_with(name, true)
    }

    /// Opens snapshot `snap` of an image, read-only (no watch, no lock): what the image held
    /// when the snapshot was taken. `ENOENT` when the image or the snapshot is missing.
    pub fn open_snapshot(&self, name: &str, snap: &str) -> io::Result<Image> {
        let (cname, csnap) = (cstring(name)?, cstring(snap)?);
        let mut img: ffi::rbd_image_t = ptr::null_mut();
        // SAFETY: live ioctx; `img` a valid out pointer; both names NUL-terminated for the
        // call (librbd copies them).
        let r = unsafe {
            ffi::rbd_open_read_only(self.inner.h, cname.as_ptr(), &mut img, csnap.as_ptr())
        };
        check(r)?;
        Ok(Image {
            h: img,
            name: format!("{name}@{snap}"),
            read_only: true,
            ioctx: self.clone(),
        })
    }

    fn open_with(&self, name: &str, read_only: bool) -> io::Result<Image> {
        let cname = cstring(name)?;
        let mut img: ffi::rbd_image_t = ptr::null_mut();
        // SAFETY: live ioctx; `img` a valid out pointer; `cname` NUL-terminated; a null
        // snapshot name means the image's head.
        let r = unsafe {
            if read_only {
                ffi::rbd_open_read_only(self.inner.h, cname.as_ptr(), &mut img, ptr::null())
            } else {
                ffi::rbd_open(self.inner.h, cname.as_ptr(), &mut img, ptr::null())
            }
        };
        check(r)?;
        Ok(Image {
            h: img,
            name: name.to_string(),
            read_only,
            ioctx: self.clone(),
        })
    }
}

/// Who holds an image's exclusive lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockOwner {
    /// The holder's session address (librbd's owner id; what [`Image::lock_break`] takes and
    /// what the blocklist records), e.g. `127.0.0.1:0/722569864`.
    pub address: String,
    /// The label the holder recorded when it took the lock ([`Image::lock_exclusive`]), if
    /// the record belongs to this holder.
    pub label: Option<String>,
}

impl std::fmt::Display for LockOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.label {
            Some(l) => write!(f, "{l} ({})", self.address),
            None => write!(f, "{}", self.address),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("image {image} is locked by {owner}")]
    Held { image: String, owner: LockOwner },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One of an image's snapshots ([`Image::snapshots`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapInfo {
    pub id: u64,
    pub name: String,
    /// The image's size at the snapshot.
    pub size: u64,
}

/// An open image (`rbd_image_t`). I/O methods may be called from many threads at once.
pub struct Image {
    h: ffi::rbd_image_t,
    name: String,
    read_only: bool,
    ioctx: IoCtx,
}

// SAFETY: librbd image handles are thread-safe for I/O, resize, flush, lock and metadata
// calls (ImageCtx locks internally; qemu and fio use one handle from many threads). Only
// rbd_close needs exclusive access, and it runs in Drop / close(self).
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        if !self.h.is_null() {
            // SAFETY: the handle is open and owned; closed once (close() nulls it first).
            unsafe { ffi::rbd_close(self.h) };
        }
    }
}

impl Image {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn ioctx(&self) -> &IoCtx {
        &self.ioctx
    }

    /// Closes the image (releasing its lock if held), reporting librbd's error.
    pub fn close(mut self) -> io::Result<()> {
        let h = std::mem::replace(&mut self.h, ptr::null_mut());
        // SAFETY: `h` is open and owned; Drop sees null and does not close it again.
        check(unsafe { ffi::rbd_close(h) }).map(drop)
    }

    /// The image's size in bytes.
    pub fn size(&self) -> io::Result<u64> {
        let mut size = 0u64;
        // SAFETY: open image; `size` a valid out pointer.
        check(unsafe { ffi::rbd_get_size(self.h, &mut size) })?;
        Ok(size)
    }

    /// Grows or shrinks the image (shrinking drops the data past the new end).
    pub fn resize(&self, size: u64) -> io::Result<()> {
        // SAFETY: open image.
        check(unsafe { ffi::rbd_resize(self.h, size) }).map(drop)
    }

    /// Reads into `buf` from `offset`; returns the bytes read, short only at the image's end.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_IO);
            // SAFETY: `buf[done..done + n]` is valid for writes of n bytes for the call;
            // librbd writes at most n bytes and keeps no reference after returning.
            let r = unsafe {
                ffi::rbd_read2(
                    self.h,
                    offset + done as u64,
                    n,
                    buf[done..].as_mut_ptr().cast(),
                    0,
                )
            };
            let got = check_len(r)?;
            done += got;
            if got < n {
                break;
            }
        }
        Ok(done)
    }

    /// Writes all of `buf` at `offset` (within the image's size).
    pub fn write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_IO);
            // SAFETY: `buf[done..done + n]` is valid for reads of n bytes for the call;
            // librbd copies what it needs before returning.
            let r = unsafe {
                ffi::rbd_write2(
                    self.h,
                    offset + done as u64,
                    n,
                    buf[done..].as_ptr().cast(),
                    0,
                )
            };
            let put = check_len(r)?;
            if put == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            done += put;
        }
        Ok(())
    }

    /// Waits until every completed write is durable (with the cache off: already so).
    pub fn flush(&self) -> io::Result<()> {
        // SAFETY: open image.
        check(unsafe { ffi::rbd_flush(self.h) }).map(drop)
    }

    /// Discards a range: whole objects are freed; parts of objects (below
    /// `rbd_discard_granularity_bytes`) may keep their old data. Not a zeroing operation:
    /// see [`write_zeroes`](Self::write_zeroes).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.chunked(offset, len, |off, n| {
            // SAFETY: open image; integer arguments only.
            check(unsafe { ffi::rbd_discard(self.h, off, n as u64) }).map(drop)
        })
    }

    /// Zeroes a range: whole objects are freed, parts of objects are zeroed. Reads as zeros
    /// afterwards.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.chunked(offset, len, |off, n| {
            // SAFETY: open image; integer arguments only; no flags.
            check_len(unsafe { ffi::rbd_write_zeroes(self.h, off, n, 0, 0) }).map(drop)
        })
    }

    fn chunked(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, usize) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(MAX_IO as u64) as usize;
            f(offset + done, n)?;
            done += n as u64;
        }
        Ok(())
    }

    /// The allocated (data) extents of `[offset, offset+len)` as sorted, merged
    /// `(offset, length)` pairs (`rbd_diff_iterate2` from the image's creation). The
    /// granularity is what the OSD reports, at worst whole objects.
    pub fn allocated(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        struct Acc {
            extents: Vec<(u64, u64)>,
        }
        unsafe extern "C" fn cb(off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
            // No panic may cross into C: catch it and stop the iteration.
            catch_unwind(AssertUnwindSafe(|| {
                // SAFETY: `arg` is the `&mut Acc` passed to rbd_diff_iterate2 below, alive
                // and not otherwise borrowed while the (synchronous) iteration runs.
                let acc = unsafe { &mut *arg.cast::<Acc>() };
                if exists != 0 && len > 0 {
                    acc.extents.push((off, len as u64));
                }
                0
            }))
            .unwrap_or(-libc::EIO)
        }
        let mut acc = Acc {
            extents: Vec::new(),
        };
        // SAFETY: open image; a null snapshot name means "since creation"; `cb` matches the
        // C signature and `arg` points to `acc`, which outlives the call (librbd calls `cb`
        // only before rbd_diff_iterate2 returns).
        check(unsafe {
            ffi::rbd_diff_iterate2(
                self.h,
                ptr::null(),
                offset,
                len,
                1,
                0,
                cb,
                (&mut acc as *mut Acc).cast(),
            )
        })?;
        let mut ext = acc.extents;
        ext.sort_unstable();
        let end = offset.saturating_add(len);
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ext.len());
        for (o, l) in ext {
            // Clip to the asked range (whole-object reports may exceed it).
            let (s, e) = (o.max(offset), o.saturating_add(l).min(end));
            if s >= e {
                continue;
            }
            match merged.last_mut() {
                Some((mo, ml)) if *mo + *ml >= s => *ml = (*ml).max(e - *mo),
                _ => merged.push((s, e - s)),
            }
        }
        Ok(merged)
    }

    /// Takes the image's exclusive lock for this session, to keep until close or
    /// [`lock_release`](Self::lock_release) (librbd does not give it up on another client's
    /// request), and records `label` (e.g. the host's name) as the holder for other clients'
    /// [`lock_owner`](Self::lock_owner). Held by another client: [`LockError::Held`].
    ///
    /// A lock held by another client is reported at once, without asking librbd to acquire
    /// it: librbd would ask the holder to release it and, when the holder is dead (kill -9),
    /// wait for its watch to time out (30 s) and then take the lock over silently. Taking
    /// over is [`lock_break`](Self::lock_break)'s job, on request.
    pub fn lock_exclusive(&self, label: &str) -> Result<(), LockError> {
        if !self.read_only
            && !self.is_lock_owner()?
            && let Some(owner) = self.lock_owner()?
        {
            return Err(LockError::Held {
                image: self.name.clone(),
                owner,
            });
        }
        // SAFETY: open image.
        let r = unsafe { ffi::rbd_lock_acquire(self.h, ffi::RBD_LOCK_MODE_EXCLUSIVE) };
        if r == -libc::EROFS && !self.read_only {
            // librbd says EROFS when another client holds the lock (and for a read-only
            // image, which is not this branch).
            return match self.lock_owner()? {
                Some(owner) => Err(LockError::Held {
                    image: self.name.clone(),
                    owner,
                }),
                None => Err(io::Error::from_raw_os_error(libc::EROFS).into()),
            };
        }
        check(r)?;
        // Not held without the record naming the holder: release it again on failure.
        let record = self
            .ioctx
            .cluster()
            .addrs()
            .and_then(|me| self.metadata_set(HOLDER_KEY, &format!("{me}\n{label}")));
        if let Err(e) = record {
            let _ = self.lock_release();
            return Err(e.into());
        }
        Ok(())
    }

    /// Releases the exclusive lock taken by [`lock_exclusive`](Self::lock_exclusive).
    pub fn lock_release(&self) -> io::Result<()> {
        // SAFETY: open image.
        check(unsafe { ffi::rbd_lock_release(self.h) }).map(drop)
    }

    /// Whether this session holds the exclusive lock now (false once broken).
    pub fn is_lock_owner(&self) -> io::Result<bool> {
        let mut owner: c_int = 0;
        // SAFETY: open image; `owner` a valid out pointer.
        check(unsafe { ffi::rbd_is_exclusive_lock_owner(self.h, &mut owner) })?;
        Ok(owner != 0)
    }

    /// The current holder of the exclusive lock, if any, with its recorded label.
    pub fn lock_owner(&self) -> io::Result<Option<LockOwner>> {
        let mut cap: usize = 4;
        let address = loop {
            let mut owners: Vec<*mut c_char> = vec![ptr::null_mut(); cap];
            let mut n = cap;
            let mut mode: ffi::rbd_lock_mode_t = 0;
            // SAFETY: `owners` has room for `n` pointers; librbd fills at most `n` with
            // malloc'ed strings and sets `n` (or the needed count with -ERANGE).
            let r =
                unsafe { ffi::rbd_lock_get_owners(self.h, &mut mode, owners.as_mut_ptr(), &mut n) };
            if r == -libc::ERANGE {
                cap = n.max(cap * 2);
                continue;
            }
            if r == -libc::ENOENT {
                return Ok(None);
            }
            check(r)?;
            let n = n.min(cap);
            let first = owners[..n]
                .first()
                .filter(|p| !p.is_null())
                // SAFETY: a non-null owner is a NUL-terminated string from librbd.
                .map(|p| unsafe { CStr::from_ptr(*p) }.to_string_lossy().into_owned());
            // SAFETY: frees the `n` strings librbd filled in, once.
            unsafe { ffi::rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), n) };
            match first {
                Some(a) => break a,
                None => return Ok(None),
            }
        };
        let label = match self.metadata_get(HOLDER_KEY)? {
            Some(v) => match v.split_once('\n') {
                Some((addr, label)) if addr == address => Some(label.to_string()),
                _ => None,
            },
            None => None,
        };
        Ok(Some(LockOwner { address, label }))
    }

    /// Breaks `owner`'s exclusive lock and blocklists its session: the old holder's later
    /// writes fail with `ESHUTDOWN`. Take the lock afterwards with
    /// [`lock_exclusive`](Self::lock_exclusive).
    pub fn lock_break(&self, owner: &LockOwner) -> io::Result<()> {
        let a = cstring(&owner.address)?;
        // SAFETY: open image; `a` NUL-terminated for the call.
        check(unsafe { ffi::rbd_lock_break(self.h, ffi::RBD_LOCK_MODE_EXCLUSIVE, a.as_ptr()) })
            .map(drop)
    }

    /// Sets an image metadata key (`rbd image-meta set`); needs the lock when another client
    /// holds it.
    pub fn metadata_set(&self, key: &str, value: &str) -> io::Result<()> {
        let (k, v) = (cstring(key)?, cstring(value)?);
        // SAFETY: open image; NUL-terminated strings copied by librbd.
        check(unsafe { ffi::rbd_metadata_set(self.h, k.as_ptr(), v.as_ptr()) }).map(drop)
    }

    /// An image metadata value, `None` when the key is not set.
    pub fn metadata_get(&self, key: &str) -> io::Result<Option<String>> {
        let k = cstring(key)?;
        let mut cap: usize = 256;
        loop {
            let mut buf = vec![0u8; cap];
            let mut n = cap;
            // SAFETY: `buf` is valid for writes of `n` bytes; librbd writes at most `n` (the
            // value and its NUL) or sets `n` to the needed size with -ERANGE.
            let r = unsafe {
                ffi::rbd_metadata_get(self.h, k.as_ptr(), buf.as_mut_ptr().cast(), &mut n)
            };
            match r {
                r if r == -libc::ERANGE && n > cap => cap = n,
                r if r == -libc::ENOENT => return Ok(None),
                r => {
                    check(r)?;
                    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
                    return Ok(Some(String::from_utf8_lossy(&buf[..end]).into_owned()));
                }
            }
        }
    }

    /// Takes snapshot `snap` of the image (`rbd_snap_create`): every write completed before
    /// the call is in it. On an image whose exclusive lock another client holds, librbd asks
    /// the holder to do it; a fenced (blocklisted) session gets an error, never a snapshot.
    pub fn snap_create(&self, snap: &str) -> io::Result<()> {
        let c = cstring(snap)?;
        // SAFETY: open image; `c` NUL-terminated for the call.
        check(unsafe { ffi::rbd_snap_create(self.h, c.as_ptr()) }).map(drop)
    }

    /// Removes snapshot `snap` (`ENOENT` if there is none).
    pub fn snap_remove(&self, snap: &str) -> io::Result<()> {
        let c = cstring(snap)?;
        // SAFETY: open image; `c` NUL-terminated for the call.
        check(unsafe { ffi::rbd_snap_remove(self.h, c.as_ptr()) }).map(drop)
    }

    /// The image's snapshots.
    pub fn snapshots(&self) -> io::Result<Vec<SnapInfo>> {
        let mut cap: c_int = 16;
        loop {
            let room = usize::try_from(cap).unwrap_or(16);
            let mut snaps: Vec<ffi::rbd_snap_info_t> = (0..room)
                .map(|_| ffi::rbd_snap_info_t {
                    id: 0,
                    size: 0,
                    name: ptr::null(),
                })
                .collect();
            let mut n = cap;
            // SAFETY: `snaps` holds `n` initialised entries; librbd fills at most `n` (the
            // snapshots and a terminating entry with a null name) or sets `n` to the room
            // needed with -ERANGE.
            let r = unsafe { ffi::rbd_snap_list(self.h, snaps.as_mut_ptr(), &mut n) };
            if r == -libc::ERANGE {
                cap = n.max(cap.saturating_mul(2));
                continue;
            }
            let count = usize::try_from(check(r)?).unwrap_or(0).min(room);
            let out = snaps[..count]
                .iter()
                .filter(|s| !s.name.is_null())
                .map(|s| SnapInfo {
                    id: s.id,
                    size: s.size,
                    // SAFETY: a non-null name is a NUL-terminated string strdup'ed by
                    // librbd, freed only by rbd_snap_list_end below.
                    name: unsafe { CStr::from_ptr(s.name) }
                        .to_string_lossy()
                        .into_owned(),
                })
                .collect();
            // SAFETY: frees the names librbd filled in (up to the null-named terminator,
            // which it wrote on success), once; the array is Rust's.
            unsafe { ffi::rbd_snap_list_end(snaps.as_mut_ptr()) };
            return Ok(out);
        }
    }

    /// When snapshot `id` was taken (Unix seconds).
    pub fn snap_timestamp(&self, id: u64) -> io::Result<u64> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: open image; `ts` a valid out pointer.
        check(unsafe { ffi::rbd_snap_get_timestamp(self.h, id, &mut ts) })?;
        Ok(u64::try_from(ts.tv_sec).unwrap_or(0))
    }
}
