//! Per-volume QoS limits: persisted in the state dir (`qos.json`, beside `volumes.json`),
//! applied at attach, changed online (`volume set`).
//!
//! Why the state dir and not the volume header: the limits are this host's policy for the
//! volume (like an EBS volume type), not part of the encrypted disk; the header is a
//! checksummed on-disk format rewritten only while detached, and the limits must change while
//! attached. Keyed by volume id, not name: a limit left behind by a delete that crashed half-way
//! never applies to a new volume that reuses the name.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Daemon, DaemonError, VolumeInfo};
use crate::server::QosLimits;

const FILE: &str = "qos.json";

/// volume id -> limits; unlimited volumes have no entry.
#[derive(Default, Serialize, Deserialize)]
struct QosTable {
    volumes: BTreeMap<Uuid, QosLimits>,
}

impl QosTable {
    fn load(dir: &Path) -> std::io::Result<QosTable> {
        match std::fs::read(dir.join(FILE)) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{FILE}: {e}"))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(QosTable::default()),
            Err(e) => Err(e),
        }
    }

    fn save(&self, dir: &Path) -> std::io::Result<()> {
        let b = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::kms::atomic_write(dir, FILE, &b)
    }
}

impl Daemon {
    /// The limits recorded for volume `id` (unlimited when none are).
    pub(super) fn qos_of(&self, id: Uuid) -> Result<QosLimits, DaemonError> {
        Ok(QosTable::load(&self.state_dir)?
            .volumes
            .get(&id)
            .copied()
            .unwrap_or_default())
    }

    /// Records `limits` for volume `id`. Caller holds the ops lock (one writer of the file).
    pub(super) fn record_qos(&self, id: Uuid, limits: QosLimits) -> Result<(), DaemonError> {
        let mut t = QosTable::load(&self.state_dir)?;
        let old = if limits.is_unlimited() {
            t.volumes.remove(&id)
        } else {
            t.volumes.insert(id, limits)
        };
        if old != Some(limits) && !(old.is_none() && limits.is_unlimited()) {
            t.save(&self.state_dir)?;
        }
        Ok(())
    }

    /// `volume set`: changes the limits given (`None` keeps one), persisted first, then in
    /// force for an attached volume at once (requests waiting are priced again).
    pub fn set_qos(
        &self,
        name: &str,
        iops: Option<u64>,
        bandwidth: Option<u64>,
    ) -> Result<VolumeInfo, DaemonError> {
        let _g = self.lock_ops();
        let loc = self.locate(name)?;
        let (h, _) = self.trusted_header(name, &loc)?;
        let old = self.qos_of(h.volume_id)?;
        let new = QosLimits {
            iops: iops.unwrap_or(old.iops),
            bandwidth: bandwidth.unwrap_or(old.bandwidth),
        };
        self.record_qos(h.volume_id, new)?;
        if let Some(a) = self.exports.get(name) {
            a.qos.set(new);
        }
        tracing::info!(
            volume = name,
            iops = new.iops,
            bandwidth = new.bandwidth,
            "qos set"
        );
        self.info_locked(name)
    }
}
