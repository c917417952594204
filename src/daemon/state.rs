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

const INSTANCE: &str = "instance.id";

/// This daemon's id (16 hex digits, made once per state dir, `instance.id`): names the RBD
/// images its imports are built in, so its clean-up after a crash can tell its own from
/// another daemon's. Per state dir rather than per host name or `[kms] host_id`: two live
/// daemons never share a state dir (its lock), where names can be shared by mistake.
pub fn instance_id(dir: &Path) -> std::io::Result<String> {
    let valid = |s: &str| s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit());
    match std::fs::read_to_string(dir.join(INSTANCE)) {
        Ok(s) if valid(s.trim()) => return Ok(s.trim().to_owned()),
        Ok(_) => tracing::warn!(file = INSTANCE, "not an instance id: made anew"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    crate::kms::atomic_write(dir, INSTANCE, format!("{id}\n").as_bytes())?;
    Ok(id)
}

const REGISTRY: &str = "volumes.json";

/// What the daemon trusts about a volume it created (or adopted): the backing file of NAME
/// must hold this volume id, under this key, at this header generation or a later one. A
/// backing file swapped for another volume's (a copy, a restore) is refused at attach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    pub volume_id: uuid::Uuid,
    pub key_id: String,
    /// The highest header generation this daemon has written or seen.
    pub generation: u64,
    /// `Some(pool)`: an RBD volume, image `cryptvol.NAME` in this pool; `None`: a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// During an online re-encryption: the key the volume moves to (the header may name it
    /// once the re-encryption ends, before this registry is written again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_key_id: Option<String>,
}

/// A snapshot file the daemon made: `volumes/NAME@SNAP.cvol` must carry this snapshot id
/// (in its snapshot record) and this volume's header, or it is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredSnapshot {
    pub snapshot_id: uuid::Uuid,
    pub volume_id: uuid::Uuid,
    pub key_id: String,
    pub generation: u64,
    pub size: u64,
    /// Unix seconds.
    pub created: u64,
    /// "reflink" or "copy".
    pub method: String,
}

/// name -> [`Registered`], persisted as `volumes.json` beside `attached.json`.
#[derive(Default, Serialize, Deserialize)]
pub struct Registry {
    volumes: BTreeMap<String, Registered>,
    /// `NAME@SNAP` -> snapshot (absent in registries from before snapshots).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    snapshots: BTreeMap<String, RegisteredSnapshot>,
}

impl Registry {
    /// Loads the registry; `None` when the state dir has none yet (made before it existed).
    pub fn load(dir: &Path) -> std::io::Result<Option<Registry>> {
        match std::fs::read(dir.join(REGISTRY)) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{REGISTRY}: {e}"))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let b = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::kms::atomic_write(dir, REGISTRY, &b)
    }
    pub fn get(&self, name: &str) -> Option<&Registered> {
        self.volumes.get(name)
    }
    /// The name registered with `id`, other than `except`.
    pub fn owner_of(&self, id: uuid::Uuid, except: &str) -> Option<&str> {
        self.volumes
            .iter()
            .find(|(n, r)| r.volume_id == id && n.as_str() != except)
            .map(|(n, _)| n.as_str())
    }
    pub fn insert(&mut self, name: &str, r: Registered) {
        self.volumes.insert(name.to_owned(), r);
    }
    /// The names of the RBD volumes registered here.
    pub fn rbd_names(&self) -> Vec<String> {
        self.volumes
            .iter()
            .filter(|(_, r)| r.pool.is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }
    pub fn remove(&mut self, name: &str) {
        self.volumes.remove(name);
    }
    pub fn snapshot(&self, full: &str) -> Option<&RegisteredSnapshot> {
        self.snapshots.get(full)
    }
    pub fn insert_snapshot(&mut self, full: &str, r: RegisteredSnapshot) {
        self.snapshots.insert(full.to_owned(), r);
    }
    pub fn remove_snapshot(&mut self, full: &str) {
        self.snapshots.remove(full);
    }
    /// The snapshots of volume `name` (`NAME@SNAP`, in order); every one when `None`.
    pub fn snapshots_of(&self, name: Option<&str>) -> Vec<(String, RegisteredSnapshot)> {
        self.snapshots
            .iter()
            .filter(|(k, _)| name.is_none_or(|n| k.split_once('@').is_some_and(|(v, _)| v == n)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}
