//! Where the key records (the serialised record set of `store.rs`) are kept: the
//! [`RecordStore`] trait, and its local implementation [`FileRecords`] (`keys.json`, atomic
//! rename). The daemon injects a shared one (`[kms] store = "rados"`: one RADOS object,
//! `src/daemon/ceph_kms.rs`); the key logic above the trait (`store.rs`) is the same for both.
//!
//! The trait moves whole record sets as bytes with a *version*: every change is a
//! compare-and-swap (`write` with the version it was derived from), so two hosts changing keys
//! at once cannot overwrite each other's change; the loser reloads and applies its change
//! again (`store.rs`, bounded retries).

use std::path::{Path, PathBuf};

use super::KmsError;
use super::sealing::atomic_write;

/// A record set as stored, and the version it had when read.
pub struct Loaded {
    pub bytes: Vec<u8>,
    pub version: u64,
}

/// A compare-and-swap that lost: the record set changed since it was read.
#[derive(Debug)]
pub struct Conflict;

/// Storage of the serialised record set. Implementations need not understand the bytes.
pub trait RecordStore: Send + Sync {
    /// What the records are (`keys.json` path, `rados:POOL/OBJECT`), for messages.
    fn describe(&self) -> String;
    /// Shared with other hosts (records change under us: reload before every operation) or
    /// this host's alone.
    fn shared(&self) -> bool;
    /// The current record set, or `None` when none was ever written.
    fn load(&self) -> Result<Option<Loaded>, KmsError>;
    /// Replaces the record set if its version is still `expected` (`None`: only if none
    /// exists yet). Returns the new version, or `Ok(Err(Conflict))` when another writer came
    /// first.
    fn write(&self, bytes: &[u8], expected: Option<u64>)
    -> Result<Result<u64, Conflict>, KmsError>;
}

/// `keys.json` in the key store dir. One writer (the state dir lock), so the version is the
/// record set's own `generation` and the compare is against the file as it is on disk.
pub struct FileRecords {
    dir: PathBuf,
}

pub const KEYS_FILE: &str = "keys.json";

#[derive(serde::Deserialize)]
struct Generation {
    #[serde(default)]
    generation: u64,
}

impl FileRecords {
    pub fn new(dir: &Path) -> FileRecords {
        FileRecords {
            dir: dir.to_owned(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(KEYS_FILE)
    }

    fn version_of(&self, bytes: &[u8]) -> Result<u64, KmsError> {
        serde_json::from_slice::<Generation>(bytes)
            .map(|g| g.generation)
            .map_err(|e| KmsError::Internal(format!("{} is corrupt: {e}", self.path().display())))
    }
}

impl RecordStore for FileRecords {
    fn describe(&self) -> String {
        self.path().display().to_string()
    }

    fn shared(&self) -> bool {
        false
    }

    fn load(&self) -> Result<Option<Loaded>, KmsError> {
        match std::fs::read(self.path()) {
            Ok(bytes) => {
                let version = self.version_of(&bytes)?;
                Ok(Some(Loaded { bytes, version }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(KmsError::Io(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", self.path().display()),
            ))),
        }
    }

    fn write(
        &self,
        bytes: &[u8],
        expected: Option<u64>,
    ) -> Result<Result<u64, Conflict>, KmsError> {
        let now = self.load()?.map(|l| l.version);
        if now != expected {
            return Ok(Err(Conflict));
        }
        let version = self.version_of(bytes)?;
        atomic_write(&self.dir, KEYS_FILE, bytes).map_err(|e| {
            KmsError::Io(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", self.path().display()),
            ))
        })?;
        Ok(Ok(version))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_records_compare_and_swap() {
        let d = tempfile::tempdir().unwrap();
        let r = FileRecords::new(d.path());
        assert!(!r.shared());
        assert!(r.load().unwrap().is_none());
        // Only "none yet" matches an empty dir.
        assert!(r.write(br#"{"generation":1}"#, Some(0)).unwrap().is_err());
        assert_eq!(r.write(br#"{"generation":1}"#, None).unwrap().unwrap(), 1);
        let l = r.load().unwrap().unwrap();
        assert_eq!(
            (l.version, l.bytes.as_slice()),
            (1, &br#"{"generation":1}"#[..])
        );
        // A write derived from an older (or no) version loses and changes nothing.
        assert!(r.write(br#"{"generation":7}"#, None).unwrap().is_err());
        assert!(r.write(br#"{"generation":7}"#, Some(0)).unwrap().is_err());
        assert_eq!(r.load().unwrap().unwrap().version, 1);
        assert_eq!(
            r.write(br#"{"generation":2}"#, Some(1)).unwrap().unwrap(),
            2
        );
        assert_eq!(r.load().unwrap().unwrap().version, 2);
    }

    #[test]
    fn file_records_refuse_bytes_without_a_record_set() {
        let d = tempfile::tempdir().unwrap();
        let r = FileRecords::new(d.path());
        assert!(r.write(b"not json", None).is_err());
        assert!(r.load().unwrap().is_none(), "nothing written");
        std::fs::write(d.path().join(KEYS_FILE), b"garbage").unwrap();
        let e = r.load().err().unwrap().to_string();
        assert!(e.contains("corrupt"), "{e}");
    }
}
