//! Built without the `rbd` feature: the same interface as `ceph.rs`, every call refused.

use std::sync::Arc;

use super::DaemonError;
use crate::config::CephConfig;
use crate::volume::{BlockStore, VolumeHeader};

pub const IMAGE_PREFIX: &str = "cryptvol.";

pub fn image_name(name: &str) -> String {
    format!("{IMAGE_PREFIX}{name}")
}

pub struct Ceph {
    pool: String,
}

pub struct Peek {
    pub header: VolumeHeader,
    pub holder: Option<String>,
}

pub struct Building;

impl Building {
    pub fn store(&self) -> Option<Arc<dyn BlockStore>> {
        None
    }
}

pub struct Opened {
    pub store: Arc<dyn BlockStore>,
    pub release: Option<Box<dyn Fn() -> std::io::Result<()> + Send + Sync>>,
    pub address: Option<String>,
    pub took_over_from: Option<String>,
}

// Same fields as ceph.rs's; only `store` is read outside it (the attach reads the rest
// through `Opened`).
#[allow(dead_code)]
pub struct Locked {
    pub store: Arc<dyn BlockStore>,
    pub release: Box<dyn Fn() -> std::io::Result<()> + Send + Sync>,
    pub took_over_from: Option<String>,
    pub address: String,
}

fn off() -> DaemonError {
    DaemonError::Cluster("cryptvol was built without Ceph support (feature \"rbd\")".into())
}

impl Ceph {
    pub fn new(c: &CephConfig, _instance: &str) -> Ceph {
        Ceph {
            pool: c.pool.clone(),
        }
    }
    pub fn pool(&self) -> &str {
        &self.pool
    }
    pub fn list(&self) -> Result<Vec<String>, DaemonError> {
        Err(off())
    }
    pub fn peek(&self, _: &str, _: &str) -> Result<Peek, DaemonError> {
        Err(off())
    }
    pub fn open_for_attach(
        &self,
        _: &str,
        _: &str,
        _: bool,
        _: bool,
    ) -> Result<Opened, DaemonError> {
        Err(off())
    }
    pub fn open_locked(&self, _: &str, _: &str, _: bool) -> Result<Locked, DaemonError> {
        Err(off())
    }
    pub fn create(&self, _: &str, _: &str, _: &VolumeHeader) -> Result<(), DaemonError> {
        Err(off())
    }
    pub fn create_temp(&self, _: &str, _: &str, _: &VolumeHeader) -> Result<Building, DaemonError> {
        Err(off())
    }
    pub fn finish(&self, _: Building, _: &str) -> Result<(), DaemonError> {
        Err(off())
    }
    pub fn remove(&self, _: &str, _: &str) -> Result<(), DaemonError> {
        Err(off())
    }
}

pub const SNAP_PREFIX: &str = "cryptvol.";

pub struct RbdSnap {
    pub name: String,
    pub id: u64,
    pub created: u64,
}

impl Ceph {
    pub fn snap_create(&self, _: &str, _: &str, _: &str) -> Result<(), DaemonError> {
        Err(off())
    }
    pub fn snap_list(&self, _: &str, _: &str) -> Result<Vec<RbdSnap>, DaemonError> {
        Err(off())
    }
    pub fn foreign_snaps(&self, _: &str, _: &str) -> Result<Vec<String>, DaemonError> {
        Err(off())
    }
    pub fn snap_remove(&self, _: &str, _: &str, _: &str) -> Result<(), DaemonError> {
        Err(off())
    }
    pub fn refuse_if_any_read(&self, _: &str, _: &str, _: &[&str]) -> Result<(), DaemonError> {
        Err(off())
    }
    pub fn open_snapshot(
        &self,
        _: &str,
        _: &str,
        _: &str,
        _: bool,
    ) -> Result<Arc<dyn BlockStore>, DaemonError> {
        Err(off())
    }
}
