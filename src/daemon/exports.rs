//! The attached volumes as NBD exports: [`Exports`] implements the server's registry and
//! [`VolumeBackend`] adapts an encrypted [`Volume`] to the server's `Backend` trait.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use super::access::ClientPolicy;
use crate::metrics::VolumeStats;
use crate::server::{Backend, ExportInfo, ExportRegistry, Extent, OpenExport, PeerIdentity, Qos};
use crate::volume::{Volume, VolumeError};

fn io_err(e: VolumeError) -> io::Error {
    match e {
        VolumeError::Io(e) => e,
        other => io::Error::from_raw_os_error(other.errno()),
    }
}

/// An attached volume as an NBD backend. `1`: for a read-write RBD attachment, what to do
/// when the cluster says this host was fenced.
pub struct VolumeBackend(pub Volume, pub Option<Fence>);

/// Notices that a takeover fenced this attachment: the cluster fails every later request of
/// a blocklisted session with `ESHUTDOWN`. The first such error is reported once to the
/// daemon (which stops serving the volume); the client sees `EIO`.
pub struct Fence {
    name: String,
    /// The attachment's cluster session address (the lock holder while not fenced).
    address: String,
    fired: AtomicBool,
    tx: std::sync::Mutex<std::sync::mpsc::Sender<(String, usize)>>,
}

impl Fence {
    pub fn new(name: &str, address: &str, tx: std::sync::mpsc::Sender<(String, usize)>) -> Fence {
        Fence {
            name: name.to_owned(),
            address: address.to_owned(),
            fired: AtomicBool::new(false),
            tx: std::sync::Mutex::new(tx),
        }
    }

    /// Whether the cluster fenced this attachment.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// Whether `holder` (a lock holder as `volume list` shows it) is this attachment.
    pub fn is_holder(&self, holder: &str) -> bool {
        holder == self.address || holder.ends_with(&format!("({})", self.address))
    }
}

impl VolumeBackend {
    /// The identity the daemon matches a fence report against (this attachment, not a later
    /// one of the same name).
    pub fn id(&self) -> usize {
        self as *const VolumeBackend as usize
    }

    /// Reports this attachment fenced (once) to the daemon.
    pub fn report_fenced(&self, why: &str) {
        if let Some(f) = &self.1
            && !f.fired.swap(true, Ordering::SeqCst)
        {
            tracing::error!(volume = %f.name, "fenced: {why}");
            let tx = f.tx.lock().unwrap_or_else(|e| e.into_inner());
            let _ = tx.send((f.name.clone(), self.id()));
        }
    }

    fn check<T>(&self, r: Result<T, VolumeError>) -> io::Result<T> {
        r.map_err(|e| {
            let e = io_err(e);
            if self.1.is_some() && e.raw_os_error() == Some(libc::ESHUTDOWN) {
                self.report_fenced("this host's session was blocklisted (lock taken over)");
                io::Error::from_raw_os_error(libc::EIO)
            } else {
                e
            }
        })
    }
}

impl Backend for VolumeBackend {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn preferred_block_size(&self) -> u32 {
        self.0.sector_size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(self.0.read(offset, buf))
    }
    fn try_read(&self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        self.check(self.0.try_read(offset, buf))
    }
    fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> io::Result<()> {
        self.check(self.0.write_mut(offset, data))?;
        if fua { self.flush() } else { Ok(()) }
    }
    fn flush(&self) -> io::Result<()> {
        self.check(self.0.flush())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.check(self.0.trim(offset, len))?;
        if fua { self.flush() } else { Ok(()) }
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.check(self.0.write_zeroes(offset, len, may_trim))?;
        if fua { self.flush() } else { Ok(()) }
    }
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(self
            .check(self.0.extents(offset, len))?
            .into_iter()
            .map(|(length, hole)| Extent { length, hole })
            .collect())
    }
    fn writes_wait(&self) -> bool {
        self.0.writes_wait()
    }
    fn start_read(
        &self,
        offset: u64,
        buf: crate::aligned::AlignedBuf,
        done: crate::volume::store::AioDone,
    ) -> Result<(), (crate::aligned::AlignedBuf, crate::volume::store::AioDone)> {
        self.0.read_start(offset, buf, done)
    }
    fn finish_read(&self, offset: u64, buf: &mut [u8], r: io::Result<()>) -> io::Result<()> {
        self.check(
            r.map_err(VolumeError::Io)
                .and_then(|()| self.0.read_finish(offset, buf)),
        )
    }
    fn start_write(
        &self,
        offset: u64,
        data: crate::aligned::AlignedBuf,
        done: crate::volume::store::AioDone,
    ) -> Result<(), (crate::aligned::AlignedBuf, crate::volume::store::AioDone)> {
        self.0.write_start(offset, data, done)
    }
    fn finish_write(&self, r: io::Result<()>) -> io::Result<()> {
        self.check(r.map_err(VolumeError::Io))
    }
}

/// One attached volume.
pub struct Attached {
    pub backend: Arc<VolumeBackend>,
    pub read_only: bool,
    pub clients: Arc<AtomicUsize>,
    pub detach: watch::Sender<bool>,
    /// The volume's QoS buckets, shared by its connections; `volume set` changes them.
    pub qos: Arc<Qos>,
    pub description: String,
    /// `Some` for an RBD volume: its raw store (header rewrites while attached).
    pub raw: Option<Arc<dyn crate::volume::BlockStore>>,
    /// Releases what the attachment holds in the cluster (the RBD lock) at detach.
    pub release: Option<Box<dyn Fn() -> io::Result<()> + Send + Sync>>,
}

/// The table of attached volumes, shared by the daemon (attach/detach) and the NBD server.
pub struct Exports {
    map: RwLock<BTreeMap<String, Arc<Attached>>>,
    /// Each attached volume's metrics (from attach to detach).
    stats: RwLock<BTreeMap<String, Arc<VolumeStats>>>,
    max_per_export: usize,
    policy: ClientPolicy,
}

/// Counts a connection for the life of the session.
struct ClientGuard(Arc<AtomicUsize>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Exports {
    pub fn new(max_per_export: usize, policy: ClientPolicy) -> Exports {
        Exports {
            map: RwLock::new(BTreeMap::new()),
            stats: RwLock::new(BTreeMap::new()),
            max_per_export,
            policy,
        }
    }
    pub fn policy(&self) -> &ClientPolicy {
        &self.policy
    }
    pub fn insert(&self, name: &str, a: Attached) {
        crate::metrics::attached();
        self.stats
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), Arc::default());
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), Arc::new(a));
    }
    pub fn get(&self, name: &str) -> Option<Arc<Attached>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }
    pub fn remove(&self, name: &str) -> Option<Arc<Attached>> {
        self.stats
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        let a = self
            .map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if a.is_some() {
            crate::metrics::detached();
        }
        a
    }
    /// The attached volumes' metrics, by name.
    pub fn stats(&self) -> Vec<(String, Arc<VolumeStats>)> {
        self.stats
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
    pub fn all(&self) -> Vec<(String, Arc<Attached>)> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl ExportRegistry for Exports {
    fn list(&self, peer: &PeerIdentity) -> Vec<ExportInfo> {
        self.all()
            .into_iter()
            .filter(|(name, _)| self.policy.permits(name, peer))
            .map(|(name, a)| ExportInfo {
                name,
                description: a.description.clone(),
            })
            .collect()
    }
    fn open(&self, name: &str, peer: &PeerIdentity) -> Option<OpenExport> {
        let a = self.get(name)?;
        if !self.policy.permits(name, peer) {
            // Answered as "no such export": the client learns nothing about it.
            tracing::warn!(volume = name, client = %peer, "client not allowed for this export");
            return None;
        }
        // Per-export cap: count first, back out if over.
        if a.clients.fetch_add(1, Ordering::SeqCst) >= self.max_per_export {
            a.clients.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(volume = name, "per-export connection limit reached");
            return None;
        }
        Some(OpenExport {
            backend: a.backend.clone(),
            read_only: a.read_only,
            detached: a.detach.subscribe(),
            qos: Some(a.qos.clone()),
            guard: Box::new(ClientGuard(a.clients.clone())),
            stats: self
                .stats
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(name)
                .cloned(),
        })
    }
}
