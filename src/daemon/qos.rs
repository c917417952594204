//! Per-volume settings of this host: QoS limits (applied at attach, changed online) and the
//! cache mode (`--cache`, in force from the next attach), persisted in the state dir
//! (`qos.json`, beside `volumes.json`; the name is kept from when it held limits only, and
//! such files read as they are: an entry without `cache` is `writeback`).
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
use crate::volume::CacheMode;

const FILE: &str = "qos.json";

/// One volume's settings: `{"iops": N, "bandwidth": N, "cache": "none"}` (`cache` only when
/// not `writeback`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Settings {
    #[serde(flatten)]
    pub(super) qos: QosLimits,
    #[serde(default, skip_serializing_if = "is_writeback")]
    pub(super) cache: CacheMode,
}

fn is_writeback(c: &CacheMode) -> bool {
    *c == CacheMode::Writeback
}

/// volume id -> settings; volumes with the defaults (unlimited, writeback) have no entry.
#[derive(Default, Serialize, Deserialize)]
struct QosTable {
    volumes: BTreeMap<Uuid, Settings>,
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
    /// The settings recorded for volume `id` (the defaults when none are).
    pub(super) fn settings_of(&self, id: Uuid) -> Result<Settings, DaemonError> {
        Ok(QosTable::load(&self.state_dir)?
            .volumes
            .get(&id)
            .copied()
            .unwrap_or_default())
    }

    /// The limits recorded for volume `id` (unlimited when none are).
    pub(super) fn qos_of(&self, id: Uuid) -> Result<QosLimits, DaemonError> {
        Ok(self.settings_of(id)?.qos)
    }

    /// Records `s` for volume `id` (the defaults: no entry). Caller holds the ops lock (one
    /// writer of the file).
    pub(super) fn record_settings(&self, id: Uuid, s: Settings) -> Result<(), DaemonError> {
        let mut t = QosTable::load(&self.state_dir)?;
        let default = s == Settings::default();
        let old = if default {
            t.volumes.remove(&id)
        } else {
            t.volumes.insert(id, s)
        };
        if old != Some(s) && !(old.is_none() && default) {
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
        self.set_volume(name, iops, bandwidth, None)
    }

    /// `volume set`: the limits as [`set_qos`](Self::set_qos) and the cache mode, which
    /// takes effect at the next attach (checked now: `none` on a file system without direct
    /// I/O is refused).
    pub fn set_volume(
        &self,
        name: &str,
        iops: Option<u64>,
        bandwidth: Option<u64>,
        cache: Option<CacheMode>,
    ) -> Result<VolumeInfo, DaemonError> {
        let _g = self.lock_ops();
        let loc = self.locate(name)?;
        let (h, _) = self.trusted_header(name, &loc)?;
        let settings = self.settings_of(h.volume_id)?;
        let old = settings.qos;
        let new = QosLimits {
            iops: iops.unwrap_or(old.iops),
            bandwidth: bandwidth.unwrap_or(old.bandwidth),
        };
        let cache = cache.unwrap_or(settings.cache);
        if cache != settings.cache {
            self.check_cache(name, &loc, cache)?;
            tracing::info!(
                volume = name,
                cache = cache.as_str(),
                "cache mode set (next attach)"
            );
        }
        self.record_settings(h.volume_id, Settings { qos: new, cache })?;
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
