//! The key store: `keys.json` in the state dir, every change written atomically (temp file,
//! fsync, rename, fsync dir). CMK material is sealed under the root key with AES-256-GCM,
//! AAD = key id + version; a verifier record detects a wrong root key at open.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::Zeroizing;

use super::crypto;
use super::root::RootKey;
use super::secret::Secret;
use super::wrap::{self, EncryptionContext};
use super::{KeyMetadata, KeyState, KmsError};

const FILE: &str = "keys.json";
const VERIFIER_AAD: &[u8] = b"cryptvol root key verifier v1";

#[derive(Serialize, Deserialize)]
struct OnDisk {
    format: u32,
    /// hex(nonce || seal(zeros32)) under the root key.
    verifier: String,
    keys: Vec<KeyRecord>,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: Uuid,
    pub alias: String,
    pub description: String,
    pub creation_date: u64,
    pub state: KeyState,
    pub deletion_date: Option<u64>,
    /// Sealed material per version (index 0 = version 1); emptied when destroyed.
    sealed: Vec<String>,
    versions: u32,
}

impl KeyRecord {
    pub fn describe(&self) -> String {
        format!("key {} (alias {:?})", self.key_id, self.alias)
    }
    pub fn effective_state(&self, _now: u64) -> KeyState {
        self.state
    }
    /// Usable for new wraps and unwraps?
    pub fn usable(&self) -> Result<(), KmsError> {
        match self.state {
            KeyState::Enabled => Ok(()),
            KeyState::Destroyed => Err(KmsError::KeyState(format!(
                "{} is destroyed: its material was deleted and data under it is unrecoverable",
                self.describe()
            ))),
            s => Err(KmsError::KeyState(format!(
                "{} is {} (key_state {})",
                self.describe(),
                s.name(),
                s.code()
            ))),
        }
    }
    pub fn metadata(&self) -> KeyMetadata {
        KeyMetadata {
            key_id: self.key_id.to_string(),
            key_alias: self.alias.clone(),
            key_description: self.description.clone(),
            creation_date: self.creation_date.to_string(),
            key_state: self.state.code().to_owned(),
            delete_date: self.deletion_date.map(|d| d.to_string()),
            key_version: self.versions.to_string(),
            key_versions: self.versions.to_string(),
        }
    }
}

/// `wrap::wrap` or `wrap::wrap_any`.
type WrapFn = fn(Uuid, u32, &[u8], &[u8], &EncryptionContext) -> Result<Vec<u8>, KmsError>;

pub struct Store {
    dir: PathBuf,
    root: RootKey,
    verifier: String,
    keys: Vec<KeyRecord>,
}

fn material_aad(id: Uuid, version: u32) -> Vec<u8> {
    let mut a = id.as_bytes().to_vec();
    a.extend_from_slice(&version.to_be_bytes());
    a
}

fn seal_hex(root: &RootKey, aad: &[u8], plain: &[u8]) -> Result<String, KmsError> {
    let mut nonce = [0u8; 12];
    crypto::random(&mut nonce)?;
    let mut body = plain.to_vec();
    crypto::seal(&root.0, &nonce, aad, &mut body);
    let mut out = nonce.to_vec();
    out.extend_from_slice(&body);
    Ok(hex::encode(out))
}

fn open_hex(root: &RootKey, aad: &[u8], h: &str) -> Option<Secret> {
    let raw = hex::decode(h).ok()?;
    if raw.len() < 12 + 16 {
        return None;
    }
    let nonce: [u8; 12] = raw[..12].try_into().ok()?;
    let mut body = Secret::new(raw[12..].to_vec());
    let n = crypto::open(&root.0, &nonce, aad, body.expose_mut()).ok()?;
    Some(Secret::new(body.expose()[..n].to_vec()))
}

impl Store {
    pub fn open(dir: &Path, root: RootKey) -> Result<Store, KmsError> {
        let path = dir.join(FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let d: OnDisk = serde_json::from_slice(&bytes).map_err(|e| {
                    KmsError::Internal(format!("{} is corrupt: {e}", path.display()))
                })?;
                if open_hex(&root, VERIFIER_AAD, &d.verifier).is_none() {
                    return Err(KmsError::RootKey(format!(
                        "the root key does not open the key store {} (wrong root key?)",
                        path.display()
                    )));
                }
                Ok(Store {
                    dir: dir.to_owned(),
                    root,
                    verifier: d.verifier,
                    keys: d.keys,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let verifier = seal_hex(&root, VERIFIER_AAD, &[0u8; 32])?;
                let s = Store {
                    dir: dir.to_owned(),
                    root,
                    verifier,
                    keys: Vec::new(),
                };
                s.persist(&s.keys)?;
                Ok(s)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Writes `keys` atomically: temp, fsync, rename, fsync dir.
    fn persist(&self, keys: &[KeyRecord]) -> Result<(), KmsError> {
        let d = OnDisk {
            format: 1,
            verifier: self.verifier.clone(),
            keys: keys.to_vec(),
        };
        let bytes = serde_json::to_vec_pretty(&d).map_err(|e| KmsError::Internal(e.to_string()))?;
        atomic_write(&self.dir, FILE, &bytes)?;
        Ok(())
    }

    /// Applies a change to a copy, persists it, then adopts it: a failed write changes nothing.
    fn commit(&mut self, keys: Vec<KeyRecord>) -> Result<(), KmsError> {
        self.persist(&keys)?;
        self.keys = keys;
        Ok(())
    }

    pub fn keys(&self) -> &[KeyRecord] {
        &self.keys
    }

    pub fn find(&self, key: &str) -> Result<&KeyRecord, KmsError> {
        let by_id = Uuid::parse_str(key).ok();
        self.keys
            .iter()
            .find(|r| Some(r.key_id) == by_id || r.alias == key)
            .ok_or_else(|| KmsError::NotFound(key.to_owned()))
    }

    pub fn find_id(&self, id: Uuid) -> Result<&KeyRecord, KmsError> {
        self.keys
            .iter()
            .find(|r| r.key_id == id)
            .ok_or_else(|| KmsError::NotFound(id.to_string()))
    }

    pub fn create(
        &mut self,
        alias: &str,
        description: &str,
        now: u64,
    ) -> Result<KeyRecord, KmsError> {
        let id = Uuid::new_v4();
        let mut material = Zeroizing::new([0u8; 32]);
        crypto::random(&mut material[..])?;
        let rec = KeyRecord {
            key_id: id,
            alias: alias.to_owned(),
            description: description.to_owned(),
            creation_date: now,
            state: KeyState::Enabled,
            deletion_date: None,
            sealed: vec![seal_hex(&self.root, &material_aad(id, 1), &material[..])?],
            versions: 1,
        };
        let mut keys = self.keys.clone();
        keys.push(rec.clone());
        self.commit(keys)?;
        Ok(rec)
    }

    pub fn update(
        &mut self,
        id: Uuid,
        f: impl FnOnce(&mut KeyRecord) -> Result<(), KmsError>,
    ) -> Result<KeyMetadata, KmsError> {
        let mut keys = self.keys.clone();
        let r = keys
            .iter_mut()
            .find(|r| r.key_id == id)
            .ok_or_else(|| KmsError::NotFound(id.to_string()))?;
        f(r)?;
        let meta = r.metadata();
        self.commit(keys)?;
        Ok(meta)
    }

    pub fn add_version(&mut self, id: Uuid) -> Result<KeyMetadata, KmsError> {
        let mut material = Zeroizing::new([0u8; 32]);
        crypto::random(&mut material[..])?;
        let root = &self.root;
        let mut keys = self.keys.clone();
        let r = keys
            .iter_mut()
            .find(|r| r.key_id == id)
            .ok_or_else(|| KmsError::NotFound(id.to_string()))?;
        let v = r.versions + 1;
        r.sealed
            .push(seal_hex(root, &material_aad(id, v), &material[..])?);
        r.versions = v;
        let meta = r.metadata();
        self.commit(keys)?;
        Ok(meta)
    }

    fn material(&self, r: &KeyRecord, version: u32) -> Result<Secret, KmsError> {
        let sealed = r
            .sealed
            .get(version.wrapping_sub(1) as usize)
            .ok_or_else(|| {
                KmsError::InvalidCiphertext(format!("{} has no version {version}", r.describe()))
            })?;
        open_hex(&self.root, &material_aad(r.key_id, version), sealed).ok_or_else(|| {
            KmsError::Internal(format!("sealed material of {} does not open", r.describe()))
        })
    }

    /// Wraps a data key (1..1024 bytes) under the newest version of an enabled key.
    pub fn wrap(
        &self,
        key: &str,
        plain: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<(Uuid, u32, Vec<u8>), KmsError> {
        self.wrap_with(key, plain, ctx, wrap::wrap)
    }

    /// Wraps up to 4096 bytes (encrypt-data); same blob format.
    pub fn wrap_data(
        &self,
        key: &str,
        plain: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<(Uuid, u32, Vec<u8>), KmsError> {
        self.wrap_with(key, plain, ctx, wrap::wrap_any)
    }

    fn wrap_with(
        &self,
        key: &str,
        plain: &[u8],
        ctx: &EncryptionContext,
        f: WrapFn,
    ) -> Result<(Uuid, u32, Vec<u8>), KmsError> {
        let r = self.find(key)?;
        r.usable()?;
        let m = self.material(r, r.versions)?;
        Ok((
            r.key_id,
            r.versions,
            f(r.key_id, r.versions, m.expose(), plain, ctx)?,
        ))
    }

    /// Unwraps with the version the blob names; the key must be enabled.
    pub fn unwrap(
        &self,
        blob: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<(Uuid, u32, Secret), KmsError> {
        let h = wrap::parse(blob)?;
        let r = self.find_id(h.key_id)?;
        r.usable()?;
        let m = self.material(r, h.key_version)?;
        Ok((
            r.key_id,
            h.key_version,
            wrap::unwrap(blob, m.expose(), ctx)?,
        ))
    }

    /// Destroys the material of keys past their deletion date.
    pub fn sweep(&mut self, now: u64) -> Result<Vec<String>, KmsError> {
        let due: Vec<Uuid> = self
            .keys
            .iter()
            .filter(|r| {
                r.state == KeyState::PendingDeletion && r.deletion_date.is_some_and(|d| d <= now)
            })
            .map(|r| r.key_id)
            .collect();
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let mut keys = self.keys.clone();
        for r in keys.iter_mut().filter(|r| due.contains(&r.key_id)) {
            r.state = KeyState::Destroyed;
            r.sealed.clear();
        }
        self.commit(keys)?;
        Ok(due.iter().map(Uuid::to_string).collect())
    }
}

/// Replaces `dir/name` atomically with `bytes`: temp file, fsync, rename, fsync dir. A crash
/// at any moment leaves the old or the new file.
pub fn atomic_write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}
