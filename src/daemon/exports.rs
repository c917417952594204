//! The attached volumes as NBD exports: [`Exports`] implements the server's registry and
//! [`VolumeBackend`] adapts an encrypted [`Volume`] to the server's `Backend` trait.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use super::access::ClientPolicy;
use crate::server::{Backend, ExportInfo, ExportRegistry, Extent, OpenExport, PeerIdentity};
use crate::volume::{Volume, VolumeError};

fn io_err(e: VolumeError) -> io::Error {
    match e {
        VolumeError::Io(e) => e,
        other => io::Error::from_raw_os_error(other.errno()),
    }
}

pub struct VolumeBackend(pub Volume);

impl Backend for VolumeBackend {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn preferred_block_size(&self) -> u32 {
        self.0.sector_size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read(offset, buf).map_err(io_err)
    }
    fn try_read(&self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        self.0.try_read(offset, buf).map_err(io_err)
    }
    fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> io::Result<()> {
        self.0.write_mut(offset, data).map_err(io_err)?;
        if fua {
            self.0.flush().map_err(io_err)
        } else {
            Ok(())
        }
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush().map_err(io_err)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.0.trim(offset, len).map_err(io_err)?;
        if fua {
            self.0.flush().map_err(io_err)
        } else {
            Ok(())
        }
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.0.write_zeroes(offset, len, may_trim).map_err(io_err)?;
        if fua {
            self.0.flush().map_err(io_err)
        } else {
            Ok(())
        }
    }
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(self
            .0
            .extents(offset, len)
            .map_err(io_err)?
            .into_iter()
            .map(|(length, hole)| Extent { length, hole })
            .collect())
    }
}

/// One attached volume.
pub struct Attached {
    pub backend: Arc<VolumeBackend>,
    pub read_only: bool,
    pub clients: Arc<AtomicUsize>,
    pub detach: watch::Sender<bool>,
    pub description: String,
}

/// The table of attached volumes, shared by the daemon (attach/detach) and the NBD server.
pub struct Exports {
    map: RwLock<BTreeMap<String, Arc<Attached>>>,
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
            max_per_export,
            policy,
        }
    }
    pub fn policy(&self) -> &ClientPolicy {
        &self.policy
    }
    pub fn insert(&self, name: &str, a: Attached) {
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
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
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
            tracing::warn!(export = name, client = %peer, "client not allowed for this export");
            return None;
        }
        // Per-export cap: count first, back out if over.
        if a.clients.fetch_add(1, Ordering::SeqCst) >= self.max_per_export {
            a.clients.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(export = name, "per-export connection limit reached");
            return None;
        }
        Some(OpenExport {
            backend: a.backend.clone(),
            read_only: a.read_only,
            detached: a.detach.subscribe(),
            guard: Box::new(ClientGuard(a.clients.clone())),
        })
    }
}
