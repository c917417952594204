//! The attached set, persisted (`attached.json`) so a restart re-attaches, as a host reboot
//! re-attaches its disks.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

const FILE: &str = "attached.json";

#[derive(Default, Serialize, Deserialize)]
pub struct AttachState {
    /// name -> read_only
    attached: BTreeMap<String, bool>,
}

impl AttachState {
    pub fn load(dir: &Path) -> std::io::Result<AttachState> {
        match std::fs::read(dir.join(FILE)) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{FILE}: {e}"))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AttachState::default()),
            Err(e) => Err(e),
        }
    }
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let b = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::kms::atomic_write(dir, FILE, &b)
    }
    pub fn set(&mut self, name: &str, read_only: Option<bool>) {
        match read_only {
            Some(ro) => self.attached.insert(name.to_owned(), ro),
            None => self.attached.remove(name),
        };
    }
    pub fn entries(&self) -> Vec<(String, bool)> {
        self.attached.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}
