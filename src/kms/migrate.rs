//! Moving a host's local key records (`keys.json`, `[kms] store = "file"`) into the shared
//! records (`[kms] store = "rados"`), so that switching the store loses no key: the volumes'
//! wrapped DEKs name keys that only `keys.json` holds.
//!
//! - **Merge by compare-and-swap** ([`Store::merge_local`]): each local record is added to
//!   the shared set through the same CAS as every other change, its file material opened
//!   with the local sealing key and sealed again under the shared one; token (PKCS#11)
//!   records carry their object labels, references into the same token, untouched.
//! - **Idempotent**: a record whose key id is already shared under the same alias was merged
//!   before (a run interrupted after its commit) and is left as the shared set has it (it
//!   may have been rotated or disabled since). A key id shared under another alias, or an
//!   alias shared by another key id, is a conflict: nothing is merged, the error names both.
//! - **Then the local store is destroyed** (by the caller, `Kms::migrate_local_records`):
//!   `keys.json` first, then its sealing file, so no second copy of the keys lives on to
//!   bring back a key the shared records later destroy.

use super::*;

/// What a merge did, key by key (id, alias).
#[derive(Default, Debug, Clone, Serialize)]
pub struct Merged {
    /// Added to the shared records now.
    pub added: Vec<(Uuid, String)>,
    /// Already there (an earlier run): left as they are.
    pub present: Vec<(Uuid, String)>,
}

/// How many key records `keys.json` in `dir` holds (0 when there is none), read without
/// opening anything: what a daemon switched to shared records checks before it starts.
pub fn local_key_count(dir: &Path) -> Result<usize, KmsError> {
    let path = dir.join(super::super::records::KEYS_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(KmsError::Io(e)),
    };
    #[derive(Deserialize)]
    struct Count {
        #[serde(default)]
        keys: Vec<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Count>(&bytes)
        .map(|c| c.keys.len())
        .map_err(|e| KmsError::StoreState(format!("{} is corrupt: {e}", path.display())))
}

impl Store {
    /// Merges the records of `local` (an opened file store) into these shared records.
    pub fn merge_local(&mut self, local: &Store) -> Result<Merged, KmsError> {
        if self.shared.is_none() || local.shared.is_some() {
            return Err(KmsError::Internal(
                "a merge goes from file records into shared ones".into(),
            ));
        }
        self.refresh()?;
        let from = &local.sealer.key;
        let plan = |keys: &[KeyRecord]| -> Result<Merged, KmsError> {
            let mut m = Merged::default();
            for r in &local.keys {
                let by_id = keys.iter().find(|k| k.key_id == r.key_id);
                let by_alias = keys.iter().find(|k| k.alias == r.alias);
                match (by_id, by_alias) {
                    (Some(k), _) if k.alias == r.alias => {
                        m.present.push((r.key_id, r.alias.clone()))
                    }
                    (Some(k), _) => {
                        return Err(KmsError::StoreState(format!(
                            "key {} is alias {:?} here but {:?} in the shared records: nothing migrated",
                            r.key_id, r.alias, k.alias
                        )));
                    }
                    (None, Some(k)) => {
                        return Err(KmsError::AliasExists(format!(
                            "{} (key {} here, key {} in the shared records): nothing migrated",
                            r.alias, r.key_id, k.key_id
                        )));
                    }
                    (None, None) => m.added.push((r.key_id, r.alias.clone())),
                }
            }
            Ok(m)
        };
        if plan(&self.keys)?.added.is_empty() {
            return plan(&self.keys);
        }
        self.change(|st, keys| {
            let m = plan(keys)?;
            for r in &local.keys {
                if !m.added.iter().any(|(id, _)| *id == r.key_id) {
                    continue;
                }
                let mut n = r.clone();
                let what = n.describe();
                if n.custody == CustodyKind::File {
                    reseal(&mut n.sealed, n.key_id, from, &st.sealer.key, &what)?;
                }
                reseal(&mut n.legacy, n.key_id, from, &st.sealer.key, &what)?;
                keys.push(n);
            }
            Ok(m)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{MemRecords, open, shared};
    use super::*;

    #[test]
    fn merged_keys_unwrap_from_the_shared_records_once_and_conflicts_change_nothing() {
        let ctx = EncryptionContext::default();
        let (dl, ds) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut local = open(dl.path()).unwrap();
        let k = local.create("k", "", 0).unwrap();
        local.add_version(k.key_id).unwrap();
        let (_, v, blob) = local.wrap("k", b"0123456789abcdef", &ctx).unwrap();
        assert_eq!(v, 2);
        let r = Arc::new(MemRecords::default());
        let mut s = shared(ds.path(), &r);
        let m = s.merge_local(&local).unwrap();
        assert_eq!((m.added.len(), m.present.len()), (1, 0));
        // Material sealed again: the shared records unwrap what the local store wrapped.
        let (id, _, plain) = s.unwrap(&blob, &ctx).unwrap();
        assert_eq!((id, plain.expose()), (k.key_id, &b"0123456789abcdef"[..]));
        // Again: already there, nothing written.
        let before = r.load().unwrap().unwrap().version;
        let m = s.merge_local(&local).unwrap();
        assert_eq!((m.added.len(), m.present.len()), (0, 1));
        assert_eq!(r.load().unwrap().unwrap().version, before);
        // Another local store with alias k (another key) and a new key: refused, nothing added.
        let d2 = tempfile::tempdir().unwrap();
        let mut other = open(d2.path()).unwrap();
        other.create("new", "", 0).unwrap();
        other.create("k", "", 0).unwrap();
        let e = s.merge_local(&other).err().unwrap();
        assert!(matches!(e, KmsError::AliasExists(_)), "{e}");
        assert_eq!(r.load().unwrap().unwrap().version, before);
        assert!(s.find("new").is_err());
        // The same key id under another alias: refused too.
        let k2 = s.find("k").unwrap().key_id;
        s.update(k2, |rec| {
            rec.alias = "renamed".into();
            Ok(())
        })
        .unwrap();
        let e = s.merge_local(&local).err().unwrap();
        assert!(matches!(e, KmsError::StoreState(_)), "{e}");
    }
}
