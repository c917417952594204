//! The key store: `keys.json` in the state dir, every change written atomically (temp file,
//! fsync, rename, fsync dir). CMK material is sealed with AES-256-GCM (AAD = key id +
//! version) under a *sealing key* of the store's current generation; the sealing key itself
//! lives, sealed under the root key, in the sealing file (`kms/sealing.key` or
//! `[kms] sealing_key_file`). Every change re-seals the store under a fresh sealing key and
//! destroys the old one, so a copy of `keys.json` from before a key was destroyed no longer
//! opens, and a `keys.json` older than the sealing file is refused at start.
//!
//! ```text
//!  commit(g -> g+1):  1. sealing file {g: SK_g, next: g+1: SK_g+1}   (both keys)
//!                     2. keys.json generation g+1, sealed under SK_g+1
//!                     3. sealing file {g+1: SK_g+1}                (SK_g destroyed)
//!  open: keys.json generation == the file's (or its `next`: finish step 3); older: refused
//! ```
//! Format 1 stores (material under the root key, no generation) are generation 0 and are
//! re-sealed into generation 1 when opened.
//!
//! Custody (`custody.rs`): a file-custody record's `sealed` entries are material under the
//! sealing key ([`FileCustody`] over the current one), re-sealed by every commit; a
//! pkcs11-custody record's entries are token object labels, carried through commits as they
//! are (never opened), and its `legacy` entries (file material kept during `key
//! import-to-hsm`) are re-sealed like file material.
//!
//! **Shared records** (`[kms] store = "rados"`, a [`RecordStore`] that is `shared()`): every
//! host with the root key must open the records, so there is no per-host sealing file.
//! Material is sealed under a key derived from the root key (HKDF, [`SHARED_SEALING_INFO`],
//! salt = the record set's store id), the record set is format 3, and its verifier binds the
//! generation and a SHA-256 of all records (nothing can be spliced in or edited). Every
//! operation reloads the records first; every change is a compare-and-swap on the store's
//! version, reloaded and re-applied on a conflict ([`MAX_ATTEMPTS`]). Rollback check: the
//! generation (a counter inside the sealed record set) must never go down below what this host
//! has seen (`records.seen` in the key store dir). The RADOS object version cannot serve
//! for that: writing old bytes back (`rados put`) gives the object a *new, higher* version.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::secmem::LockedBox;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::crypto;
use super::custody::{Custody, CustodyKind, FileCustody, material_aad};
use super::records::{Conflict, FileRecords, RecordStore};
use super::root::RootKey;
use super::sealing::{
    NextKey, Sealer, SealingFile, open_hex, read_json, seal_hex, sealing_aad, write_json,
};
use super::secret::Secret;
use super::wrap::{self, EncryptionContext};
use super::{KeyMetadata, KeyState, KmsError};

#[path = "migrate.rs"]
mod migrate;
pub use migrate::{Merged, local_key_count};

#[cfg(test)]
const FILE: &str = super::records::KEYS_FILE;
/// HKDF info of the shared records' sealing key (versioned: a new scheme gets a new label).
pub const SHARED_SEALING_INFO: &[u8] = b"cryptvol shared key records sealing v1";
const SHARED_VERIFIER_AAD: &[u8] = b"cryptvol shared key records verifier v1";
/// Compare-and-swap attempts of one change before giving up (`KMS.0504`).
pub const MAX_ATTEMPTS: u32 = 32;
/// This host's highest seen generation of shared records.
const SEEN_FILE: &str = "records.seen";
const VERIFIER_AAD: &[u8] = b"cryptvol root key verifier v1";
const VERIFIER_AAD_V2: &[u8] = b"cryptvol key store verifier v2";

#[derive(Serialize, Deserialize)]
struct OnDisk {
    format: u32,
    /// Format 2: the store's id, also in the sealing file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    store_id: Option<Uuid>,
    /// Format 2: the sealing key generation the material is sealed under (format 1: 0).
    #[serde(default)]
    generation: u64,
    /// hex(nonce || seal(zeros32)) under the sealing key (format 1: the root key).
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
    /// Per version (index 0 = version 1): the sealed material (file custody) or the token
    /// object's label (pkcs11 custody); emptied when destroyed.
    sealed: Vec<String>,
    versions: u32,
    /// Where the versions live (absent in stores written before custody existed: file).
    #[serde(default)]
    pub custody: CustodyKind,
    /// A key moved from file to pkcs11 custody (`key import-to-hsm`): its former sealed
    /// material (under the sealing key, like file custody's), kept only until every volume
    /// under it is re-wrapped in the token, so that algorithm-1 blobs still unwrap meanwhile;
    /// then emptied (and when destroyed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    legacy: Vec<String>,
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
            custody: self.custody.name(),
        }
    }
}

pub struct Store {
    root: RootKey,
    sealing_path: PathBuf,
    store_id: Uuid,
    sealer: Sealer,
    keys: Vec<KeyRecord>,
    /// PKCS#11 custody when configured: new keys go there.
    hsm: Option<Arc<dyn Custody>>,
    /// Where the record set is kept.
    records: Arc<dyn RecordStore>,
    /// The version of the record set `keys` came from (`None`: none written yet).
    version: Option<u64>,
    /// Shared records: this host's rollback check.
    shared: Option<Shared>,
}

/// The highest shared record set this host has opened (`records.seen`).
#[derive(Default, Clone, Serialize, Deserialize)]
struct Seen {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    store_id: Option<Uuid>,
    generation: u64,
}

struct Shared {
    seen_path: PathBuf,
    seen: Seen,
    /// Whether `keys` holds a record set read from the store (false until the first load).
    loaded: bool,
}

/// The custody of one record for one call: file custody under the current sealing key, or
/// the token.
enum CustodyRef<'a> {
    File(FileCustody<'a>),
    Token(&'a dyn Custody),
}

impl<'a> std::ops::Deref for CustodyRef<'a> {
    type Target = dyn Custody + 'a;
    fn deref(&self) -> &Self::Target {
        match self {
            CustodyRef::File(f) => f,
            CustodyRef::Token(t) => *t,
        }
    }
}

/// Re-seals file material from one sealing key to another (same AAD: key id || version).
fn reseal(
    entries: &mut [String],
    id: Uuid,
    from: &[u8; 32],
    to: &[u8; 32],
    what: &str,
) -> Result<(), KmsError> {
    for (i, h) in entries.iter_mut().enumerate() {
        let aad = material_aad(id, i as u32 + 1);
        let m = open_hex(from, &aad, h).ok_or_else(|| {
            KmsError::Internal(format!("sealed material of {what} does not open"))
        })?;
        *h = seal_hex(to, &aad, m.expose())?;
    }
    Ok(())
}

/// The shared verifier's AAD: store id, generation and SHA-256 of the records as serialised,
/// so the verifier opens only for exactly this record set.
fn shared_verifier_aad(
    store_id: Uuid,
    generation: u64,
    keys: &[KeyRecord],
) -> Result<Vec<u8>, KmsError> {
    let body = serde_json::to_vec(keys).map_err(|e| KmsError::Internal(e.to_string()))?;
    let mut a = SHARED_VERIFIER_AAD.to_vec();
    a.extend_from_slice(store_id.as_bytes());
    a.extend_from_slice(&generation.to_be_bytes());
    a.extend_from_slice(&crypto::sha256(&body));
    Ok(a)
}

fn verifier_aad(store_id: Uuid, generation: u64) -> Vec<u8> {
    let mut a = VERIFIER_AAD_V2.to_vec();
    a.extend_from_slice(store_id.as_bytes());
    a.extend_from_slice(&generation.to_be_bytes());
    a
}

impl Store {
    /// Opens the store in `dir` with its sealing file at `sealing_path`; creates both when
    /// neither exists, finishes a change a crash interrupted, re-seals a format 1 store, and
    /// refuses a `keys.json` that does not belong to the sealing file's generation. With
    /// `hsm`, new keys are made in that custody (PKCS#11) and keys already in it are usable.
    pub fn open(
        dir: &Path,
        root: RootKey,
        sealing_path: &Path,
        hsm: Option<Arc<dyn Custody>>,
    ) -> Result<Store, KmsError> {
        let records = Arc::new(FileRecords::new(dir));
        let path = PathBuf::from(records.describe());
        let loaded = records.load()?;
        let version = loaded.as_ref().map(|l| l.version);
        let disk: Option<OnDisk> = loaded
            .map(|l| serde_json::from_slice(&l.bytes))
            .transpose()
            .map_err(|e| KmsError::Internal(format!("{} is corrupt: {e}", path.display())))?;
        let sealing: Option<SealingFile> = read_json(sealing_path)?;
        let (k, sp) = (path.display(), sealing_path.display());
        let rollback = |kgen: u64, sgen: u64| {
            KmsError::StoreState(format!(
                "{k} is generation {kgen} but {sp} is at generation {sgen}: {k} was restored \
                 from an older copy, which could bring destroyed keys back; restore the newest \
                 {k} (see README, \"Key destruction and backups\")"
            ))
        };
        let mut store = Store {
            root,
            sealing_path: sealing_path.to_owned(),
            store_id: Uuid::new_v4(),
            sealer: Sealer {
                generation: 0,
                key: LockedBox::zeroed(),
                sealed: None,
            },
            keys: Vec::new(),
            hsm,
            records,
            version,
            shared: None,
        };
        let Some(d) = disk else {
            match sealing {
                // A fresh store, or its creation was interrupted before keys.json existed.
                None => {}
                Some(s) if s.generation == 0 => store.store_id = s.store_id,
                Some(s) => {
                    return Err(KmsError::StoreState(format!(
                        "{k} is missing but {sp} says a key store of generation {} was \
                         written: restore {k}, or move {sp} away to start an empty key store",
                        s.generation
                    )));
                }
            }
            store.commit_file(Vec::new())?;
            return Ok(store);
        };
        if d.format == 1 {
            // Material sealed under the root key itself: generation 0.
            if open_hex(&store.root.0, VERIFIER_AAD, &d.verifier).is_none() {
                return Err(KmsError::RootKey(format!(
                    "the root key does not open the key store {k} (wrong root key?)"
                )));
            }
            match &sealing {
                None => {}
                // The re-sealing into generation 1 was interrupted: do it again.
                Some(s) if s.generation == 0 => store.store_id = s.store_id,
                Some(s) => return Err(rollback(0, s.generation)),
            }
            store.sealer.key = LockedBox::new(*store.root.0);
            tracing::info!(file = %k, sealing_file = %sp, "re-sealing a format 1 key store under a sealing key");
            store.commit_file(d.keys)?;
            return Ok(store);
        }
        if d.format != 2 {
            return Err(KmsError::Internal(format!(
                "{k}: unknown format {}",
                d.format
            )));
        }
        let s = sealing.ok_or_else(|| {
            KmsError::StoreState(format!(
                "{k} is sealed under the sealing key in {sp}, which is missing: restore {sp} \
                 (it is not in the state dir if [kms] sealing_key_file moved it)"
            ))
        })?;
        if d.store_id != Some(s.store_id) {
            return Err(KmsError::StoreState(format!(
                "{sp} belongs to another key store than {k} (store ids differ)"
            )));
        }
        store.store_id = s.store_id;
        let open_key = |generation: u64, hex: Option<&str>| -> Result<Sealer, KmsError> {
            let hex = hex.ok_or_else(|| KmsError::Internal(format!("{sp}: no key")))?;
            let sk = open_hex(&store.root.0, &sealing_aad(s.store_id, generation), hex)
                .ok_or_else(|| {
                    KmsError::RootKey(format!(
                        "the root key does not open the sealing file {sp} (wrong root key?)"
                    ))
                })?;
            let key: [u8; 32] = sk
                .expose()
                .try_into()
                .map_err(|_| KmsError::Internal(format!("{sp}: sealing key is not 32 bytes")))?;
            Ok(Sealer {
                generation,
                key: LockedBox::new(key),
                sealed: Some(hex.to_owned()),
            })
        };
        let finish = if d.generation == s.generation {
            store.sealer = open_key(s.generation, s.key.as_deref())?;
            // A change was interrupted before keys.json was written: forget its next key.
            s.next.is_some()
        } else if let Some(n) = s.next.as_ref().filter(|n| n.generation == d.generation) {
            // Interrupted after keys.json was written: the old key is still to be destroyed.
            store.sealer = open_key(n.generation, Some(&n.key))?;
            true
        } else if d.generation < s.generation {
            return Err(rollback(d.generation, s.generation));
        } else {
            return Err(KmsError::StoreState(format!(
                "{k} is generation {} but {sp} is at generation {}: {sp} was restored from an \
                 older copy; restore the newest {sp}",
                d.generation, s.generation
            )));
        };
        if open_hex(
            &store.sealer.key,
            &verifier_aad(store.store_id, d.generation),
            &d.verifier,
        )
        .is_none()
        {
            return Err(KmsError::StoreState(format!(
                "{k} does not open with the generation {} sealing key in {sp} (restored or \
                 edited?)",
                d.generation
            )));
        }
        store.keys = d.keys;
        if finish {
            store.write_sealing(None)?;
        }
        Ok(store)
    }

    /// The sealing file with the current key (and `next`, during a change).
    fn write_sealing(&self, next: Option<NextKey>) -> Result<(), KmsError> {
        write_json(
            &self.sealing_path,
            &SealingFile {
                format: 1,
                store_id: self.store_id,
                generation: self.sealer.generation,
                key: self.sealer.sealed.clone(),
                next,
            },
        )
    }

    /// Adopts `keys` as the new state: re-sealed under a fresh sealing key of the next
    /// generation (module doc: three steps, each crash-safe), the old sealing key destroyed.
    /// A failure before keys.json is written changes nothing.
    fn commit(&mut self, keys: Vec<KeyRecord>) -> Result<Result<(), Conflict>, KmsError> {
        if self.shared.is_some() {
            return self.commit_shared(keys);
        }
        let generation = self.sealer.generation + 1;
        let mut sk = LockedBox::<[u8; 32]>::zeroed();
        crypto::random(&mut sk[..])?;
        let sealed_sk = seal_hex(
            &self.root.0,
            &sealing_aad(self.store_id, generation),
            &sk[..],
        )?;
        let mut resealed = keys;
        for r in &mut resealed {
            let (id, what) = (r.key_id, r.describe());
            // Token object labels are not material: carried over untouched.
            if r.custody == CustodyKind::File {
                reseal(&mut r.sealed, id, &self.sealer.key, &sk, &what)?;
            }
            reseal(&mut r.legacy, id, &self.sealer.key, &sk, &what)?;
        }
        let d = OnDisk {
            format: 2,
            store_id: Some(self.store_id),
            generation,
            verifier: seal_hex(&sk, &verifier_aad(self.store_id, generation), &[0u8; 32])?,
            keys: resealed,
        };
        let bytes = serde_json::to_vec_pretty(&d).map_err(|e| KmsError::Internal(e.to_string()))?;
        self.write_sealing(Some(NextKey {
            generation,
            key: sealed_sk.clone(),
        }))?;
        // One writer (the state dir lock): a conflict means keys.json changed under us.
        self.version = Some(self.records.write(&bytes, self.version)?.map_err(|_| {
            KmsError::StoreState(format!(
                "{} changed while the daemon had it open",
                self.records.describe()
            ))
        })?);
        self.sealer = Sealer {
            generation,
            key: sk,
            sealed: Some(sealed_sk),
        };
        self.keys = d.keys;
        self.write_sealing(None)?;
        Ok(Ok(()))
    }

    /// A commit at open (file records: one writer, no conflict but an error).
    fn commit_file(&mut self, keys: Vec<KeyRecord>) -> Result<(), KmsError> {
        self.commit(keys)?.map_err(|_| {
            KmsError::StoreState(format!("{} changed under us", self.records.describe()))
        })
    }

    /// Applies `f` to the records and commits; with shared records, on a conflict (another
    /// host changed them first) reloads and applies `f` again, at most [`MAX_ATTEMPTS`] times.
    /// `f` sees the store (for custody) and the records it changes.
    fn change<T>(
        &mut self,
        mut f: impl FnMut(&Store, &mut Vec<KeyRecord>) -> Result<T, KmsError>,
    ) -> Result<T, KmsError> {
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                // Spread the retries of hosts that collide again and again.
                let mut r = [0u8; 1];
                crypto::random(&mut r)?;
                std::thread::sleep(std::time::Duration::from_millis(
                    u64::from(attempt.min(8)) * (1 + u64::from(r[0] % 8)),
                ));
                self.refresh()?;
            }
            let mut keys = self.keys.clone();
            let t = f(self, &mut keys)?;
            if self.commit(keys)?.is_ok() {
                return Ok(t);
            }
            tracing::debug!(attempt, records = %self.records.describe(), "key records changed by another host; retrying");
        }
        Err(KmsError::Records(format!(
            "{}: {MAX_ATTEMPTS} attempts lost to concurrent changes; retry",
            self.records.describe()
        )))
    }

    /// Shared records (`[kms] store = "rados"`): nothing is read yet, so a cluster that is
    /// down at start-up does not stop the daemon; every operation loads first
    /// ([`Store::refresh`]) and fails with `KMS.0504` while the records are unreachable.
    pub fn open_shared(
        dir: &Path,
        root: RootKey,
        records: Arc<dyn RecordStore>,
        hsm: Option<Arc<dyn Custody>>,
    ) -> Result<Store, KmsError> {
        let seen_path = dir.join(SEEN_FILE);
        let seen: Seen = read_json(&seen_path)?.unwrap_or_default();
        Ok(Store {
            root,
            sealing_path: PathBuf::from(records.describe()),
            store_id: Uuid::nil(),
            sealer: Sealer {
                generation: 0,
                key: LockedBox::zeroed(),
                sealed: None,
            },
            keys: Vec::new(),
            hsm,
            records,
            version: None,
            shared: Some(Shared {
                seen_path,
                seen,
                loaded: false,
            }),
        })
    }

    /// The sealing key of shared records with store id `id`.
    fn shared_sealer(&self, id: Uuid, generation: u64) -> Sealer {
        Sealer {
            generation,
            key: crypto::hkdf32(&self.root.0[..], id.as_bytes(), SHARED_SEALING_INFO),
            sealed: None,
        }
    }

    /// Shared records: loads the current record set (creating an empty one if there is none
    /// and this host never saw one), checks it opens with the root key, is whole, and is not
    /// older than the newest this host has seen. File records: nothing to do (one writer).
    pub fn refresh(&mut self) -> Result<(), KmsError> {
        let Some(sh) = &self.shared else {
            return Ok(());
        };
        let seen = sh.seen.clone();
        let what = self.records.describe();
        let Some(l) = self.records.load()? else {
            if seen.generation > 0 {
                return Err(KmsError::StoreState(format!(
                    "the key records {what} are missing, but this host has seen generation {}: \
                     restore them (see docs/key-format.md, \"Shared key records\")",
                    seen.generation
                )));
            }
            // The first host: an empty record set (exclusive create; a host that races us
            // and loses loads the winner's).
            self.store_id = Uuid::new_v4();
            self.sealer = self.shared_sealer(self.store_id, 0);
            self.keys = Vec::new();
            self.version = None;
            if self.commit_shared(Vec::new())?.is_err() {
                return self.refresh();
            }
            tracing::info!(records = %what, store_id = %self.store_id, "created the shared key records");
            return Ok(());
        };
        let d: OnDisk = serde_json::from_slice(&l.bytes).map_err(|e| {
            KmsError::StoreState(format!("the key records {what} are corrupt: {e}"))
        })?;
        let id = match (d.format, d.store_id) {
            (3, Some(id)) => id,
            (f, _) => {
                return Err(KmsError::StoreState(format!(
                    "the key records {what} are format {f}, not the shared format 3"
                )));
            }
        };
        if seen.store_id.is_some_and(|s| s != id) {
            return Err(KmsError::StoreState(format!(
                "the key records {what} belong to another key store ({id}) than the one this \
                 host has used ({}): replaced? restore them, or move {} away to trust them",
                seen.store_id.unwrap_or_default(),
                self.shared
                    .as_ref()
                    .map(|s| s.seen_path.display().to_string())
                    .unwrap_or_default()
            )));
        }
        let sealer = self.shared_sealer(id, d.generation);
        let aad = shared_verifier_aad(id, d.generation, &d.keys)?;
        if open_hex(&sealer.key, &aad, &d.verifier).is_none() {
            return Err(KmsError::RootKey(format!(
                "the key records {what} do not open with this root key (another root key, or \
                 edited)"
            )));
        }
        if d.generation < seen.generation {
            return Err(KmsError::StoreState(format!(
                "the key records {what} are generation {} but this host has seen generation {}: \
                 they were rolled back to an older copy, which could bring destroyed keys back; \
                 restore the newest copy",
                d.generation, seen.generation
            )));
        }
        self.store_id = id;
        self.sealer = sealer;
        self.keys = d.keys;
        self.version = Some(l.version);
        self.note_seen()
    }

    /// Records the current generation in `records.seen` when it is newer than the last one.
    fn note_seen(&mut self) -> Result<(), KmsError> {
        let (id, generation) = (self.store_id, self.sealer.generation);
        let Some(sh) = &mut self.shared else {
            return Ok(());
        };
        sh.loaded = true;
        if sh.seen.store_id == Some(id) && sh.seen.generation >= generation {
            return Ok(());
        }
        let seen = Seen {
            store_id: Some(id),
            generation,
        };
        write_json(&sh.seen_path, &seen)?;
        sh.seen = seen;
        Ok(())
    }

    /// A change of shared records: generation + 1, same sealing key (derived), written if
    /// nobody changed the records since they were loaded.
    fn commit_shared(&mut self, keys: Vec<KeyRecord>) -> Result<Result<(), Conflict>, KmsError> {
        let generation = self
            .sealer
            .generation
            .checked_add(1)
            .ok_or_else(|| KmsError::Internal("generation overflow".into()))?;
        let aad = shared_verifier_aad(self.store_id, generation, &keys)?;
        let d = OnDisk {
            format: 3,
            store_id: Some(self.store_id),
            generation,
            verifier: seal_hex(&self.sealer.key, &aad, &[0u8; 32])?,
            keys,
        };
        let bytes = serde_json::to_vec_pretty(&d).map_err(|e| KmsError::Internal(e.to_string()))?;
        match self.records.write(&bytes, self.version)? {
            Err(c) => Ok(Err(c)),
            Ok(v) => {
                self.version = Some(v);
                self.sealer.generation = generation;
                self.keys = d.keys;
                self.note_seen()?;
                Ok(Ok(()))
            }
        }
    }

    /// Where the sealing file is and the store's generation (start-up log, docs).
    pub fn sealing(&self) -> (&Path, u64) {
        (&self.sealing_path, self.sealer.generation)
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
        // Material made once; a retry after a conflict only re-checks the alias.
        let (entry, kind) = {
            let custody = self.default_custody();
            (custody.generate_version(id, 1)?, custody.kind())
        };
        let rec = KeyRecord {
            key_id: id,
            alias: alias.to_owned(),
            description: description.to_owned(),
            creation_date: now,
            state: KeyState::Enabled,
            deletion_date: None,
            sealed: vec![entry],
            versions: 1,
            custody: kind,
            legacy: Vec::new(),
        };
        let r = self.change(|_, keys| {
            if keys.iter().any(|r| r.alias == alias) {
                return Err(KmsError::AliasExists(alias.to_owned()));
            }
            keys.push(rec.clone());
            Ok(())
        });
        if r.is_err() {
            self.discard(&rec, 1, &rec.sealed[0]);
        }
        r.map(|()| rec)
    }

    /// Destroys material made for a change that was not committed (a token object).
    fn discard(&self, r: &KeyRecord, version: u32, entry: &str) {
        if let Err(e) = self
            .custody(r)
            .and_then(|c| c.destroy(r.key_id, version, entry))
        {
            tracing::warn!(key = %r.key_id, error = %e, "unused key material not destroyed");
        }
    }

    pub fn update(
        &mut self,
        id: Uuid,
        mut f: impl FnMut(&mut KeyRecord) -> Result<(), KmsError>,
    ) -> Result<KeyMetadata, KmsError> {
        self.change(|_, keys| {
            let r = keys
                .iter_mut()
                .find(|r| r.key_id == id)
                .ok_or_else(|| KmsError::NotFound(id.to_string()))?;
            f(r)?;
            Ok(r.metadata())
        })
    }

    pub fn add_version(&mut self, id: Uuid) -> Result<KeyMetadata, KmsError> {
        // Material for the version number the records have at each attempt; what a lost
        // attempt made is destroyed.
        let mut made: Vec<(KeyRecord, u32, String)> = Vec::new();
        let r = self.change(|s, keys| {
            let r = keys
                .iter_mut()
                .find(|r| r.key_id == id)
                .ok_or_else(|| KmsError::NotFound(id.to_string()))?;
            r.usable()?;
            let v = r
                .versions
                .checked_add(1)
                .ok_or_else(|| KmsError::Internal("version overflow".into()))?;
            let entry = s.custody(r)?.generate_version(id, v)?;
            made.push((r.clone(), v, entry.clone()));
            r.sealed.push(entry);
            r.versions = v;
            Ok(r.metadata())
        });
        let kept = if r.is_ok() {
            made.len().saturating_sub(1)
        } else {
            made.len()
        };
        for (rec, v, e) in &made[..kept] {
            self.discard(rec, *v, e);
        }
        r
    }

    /// File custody under the current sealing key.
    fn file(&self) -> FileCustody<'_> {
        FileCustody::new(&self.sealer.key)
    }

    /// The custody new keys go to.
    fn default_custody(&self) -> CustodyRef<'_> {
        match &self.hsm {
            Some(h) => CustodyRef::Token(h.as_ref()),
            None => CustodyRef::File(self.file()),
        }
    }

    /// The custody of a record; a pkcs11 key while the daemon runs without the token fails.
    fn custody(&self, r: &KeyRecord) -> Result<CustodyRef<'_>, KmsError> {
        match (r.custody, &self.hsm) {
            (CustodyKind::File, _) => Ok(CustodyRef::File(self.file())),
            (CustodyKind::Pkcs11, Some(h)) => Ok(CustodyRef::Token(h.as_ref())),
            (CustodyKind::Pkcs11, None) => Err(KmsError::Hsm(format!(
                "{} is in pkcs11 custody but the daemon runs with [kms] custody = \"file\"",
                r.describe()
            ))),
        }
    }

    /// The custody says for certain that the newest version's material is gone (a token
    /// object destroyed while this record, e.g. restored from a backup, still names it).
    /// Errors (token unreachable) are not "gone".
    pub fn material_gone(&self, r: &KeyRecord) -> bool {
        let Some(e) = r.sealed.last() else {
            return false;
        };
        matches!(
            self.custody(r)
                .and_then(|c| c.present(r.key_id, r.versions, e)),
            Ok(false)
        )
    }

    /// The record's entry for a version (sealed material or token object label).
    fn entry<'a>(&self, r: &'a KeyRecord, version: u32) -> Result<&'a str, KmsError> {
        r.sealed
            .get(version.wrapping_sub(1) as usize)
            .map(String::as_str)
            .ok_or_else(|| {
                KmsError::InvalidCiphertext(format!("{} has no version {version}", r.describe()))
            })
    }

    /// Wraps a data key (1..1024 bytes) under the newest version of an enabled key.
    pub fn wrap(
        &self,
        key: &str,
        plain: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<(Uuid, u32, Vec<u8>), KmsError> {
        self.wrap_with(key, plain, ctx, wrap::MAX_PLAIN)
    }

    /// Wraps up to 4096 bytes (encrypt-data); same blob format.
    pub fn wrap_data(
        &self,
        key: &str,
        plain: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<(Uuid, u32, Vec<u8>), KmsError> {
        self.wrap_with(key, plain, ctx, wrap::MAX_DATA)
    }

    fn wrap_with(
        &self,
        key: &str,
        plain: &[u8],
        ctx: &EncryptionContext,
        max: usize,
    ) -> Result<(Uuid, u32, Vec<u8>), KmsError> {
        wrap::check_plain(plain, max)?;
        let r = self.find(key)?;
        r.usable()?;
        let e = self.entry(r, r.versions)?;
        let blob = self.custody(r)?.wrap(r.key_id, r.versions, e, plain, ctx)?;
        Ok((r.key_id, r.versions, blob))
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
        // A key moved to the token unwraps its old blobs with its former material until the
        // volumes are re-wrapped.
        if h.alg == wrap::ALG_AES256GCM_HKDF
            && r.custody == CustodyKind::Pkcs11
            && let Some(m) = r.legacy.get(h.key_version.wrapping_sub(1) as usize)
        {
            let plain = self.file().unwrap(r.key_id, h.key_version, m, blob, ctx)?;
            return Ok((r.key_id, h.key_version, plain));
        }
        // A blob is only ever tried with the custody that made it.
        if h.alg != r.custody.alg() {
            return Err(KmsError::InvalidCiphertext(format!(
                "cipher text was not made by the {} custody of {}",
                r.custody.name(),
                r.describe()
            )));
        }
        let e = self.entry(r, h.key_version)?;
        let plain = self
            .custody(r)?
            .unwrap(r.key_id, h.key_version, e, blob, ctx)?;
        Ok((r.key_id, h.key_version, plain))
    }

    /// Moves a file-custody key into the token: a new token object per version, the sealed
    /// material kept as `legacy` (still re-sealed by every commit) until
    /// [`Store::drop_legacy`]. Resumes a move already made.
    pub fn move_to_token(&mut self, id: Uuid) -> Result<KeyMetadata, KmsError> {
        let hsm = self.hsm.clone().ok_or_else(|| {
            KmsError::Hsm(
                "the daemon runs with [kms] custody = \"file\": no token to move to".into(),
            )
        })?;
        let r = self.find_id(id)?;
        match (r.custody, r.state) {
            (CustodyKind::Pkcs11, _) => return Ok(r.metadata()),
            (CustodyKind::File, KeyState::Enabled | KeyState::Disabled) => {}
            (_, s) => {
                return Err(KmsError::Transition(format!(
                    "{} cannot move to the token while {}",
                    r.describe(),
                    s.name()
                )));
            }
        }
        let entries = (1..=r.versions)
            .map(|v| hsm.generate_version(id, v))
            .collect::<Result<Vec<_>, _>>()?;
        self.update(id, |r| {
            // Shared records: another host may have rotated or moved the key meanwhile.
            if r.custody != CustodyKind::File || r.versions as usize != entries.len() {
                return Err(KmsError::Transition(format!(
                    "{} changed on another host during the move; run it again",
                    r.describe()
                )));
            }
            r.legacy = std::mem::replace(&mut r.sealed, entries.clone());
            r.custody = CustodyKind::Pkcs11;
            Ok(())
        })
    }

    /// Forgets the sealed material of a key moved to the token: a commit, so the sealing key
    /// it was sealed under is destroyed with it and no copy of an older `keys.json` opens it.
    /// Returns whether there was any.
    pub fn drop_legacy(&mut self, id: Uuid) -> Result<bool, KmsError> {
        if self.find_id(id)?.legacy.is_empty() {
            return Ok(false);
        }
        self.update(id, |r| {
            r.legacy.clear();
            Ok(())
        })?;
        Ok(true)
    }

    /// Destroys the material of keys past their deletion date.
    pub fn sweep(&mut self, now: u64) -> Result<Vec<String>, KmsError> {
        // Every operation starts here: shared records are reloaded first.
        self.refresh()?;
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
        // Destroy in custody first (C_DestroyObject for token objects), then record it: a
        // crash in between leaves the key pending and the next sweep destroys again
        // (idempotent). A key whose custody fails stays pending and is retried.
        let due: Vec<Uuid> = due
            .into_iter()
            .filter(|id| {
                let Ok(r) = self.find_id(*id) else {
                    return false;
                };
                let res = self.custody(r).and_then(|c| {
                    (1..=r.versions)
                        .zip(&r.sealed)
                        .try_for_each(|(v, e)| c.destroy(r.key_id, v, e))
                });
                match res {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(key = %id, error = %e, "key material not destroyed yet; retried at the next sweep");
                        false
                    }
                }
            })
            .collect();
        if due.is_empty() {
            return Ok(Vec::new());
        }
        // Recorded once: with shared records a host that loses the race to another host's
        // sweep reloads, finds the keys destroyed already, and reports nothing.
        self.change(|_, keys| {
            let mut done = Vec::new();
            for r in keys
                .iter_mut()
                .filter(|r| due.contains(&r.key_id) && r.state == KeyState::PendingDeletion)
            {
                r.state = KeyState::Destroyed;
                r.sealed.clear();
                r.legacy.clear();
                done.push(r.key_id.to_string());
            }
            Ok(done)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::sealing::SEALING_FILE;

    pub(super) fn root() -> RootKey {
        RootKey::from_bytes([3; 32])
    }

    fn sealing(dir: &Path) -> SealingFile {
        read_json(&dir.join(SEALING_FILE)).unwrap().unwrap()
    }

    pub(super) fn open(dir: &Path) -> Result<Store, KmsError> {
        Store::open(dir, root(), &dir.join(SEALING_FILE), None)
    }

    #[test]
    fn every_change_is_a_new_generation_and_the_old_key_is_gone() {
        let d = tempfile::tempdir().unwrap();
        let mut s = open(d.path()).unwrap();
        assert_eq!(s.sealing().1, 1);
        let old_keys = std::fs::read(d.path().join(FILE)).unwrap();
        s.create("a", "", 0).unwrap();
        assert_eq!(s.sealing().1, 2);
        let f = sealing(d.path());
        assert!(f.generation == 2 && f.next.is_none());
        drop(s);
        // The generation 1 keys.json back: refused, naming both files.
        std::fs::write(d.path().join(FILE), &old_keys).unwrap();
        let e = open(d.path()).err().unwrap().to_string();
        assert!(e.contains("keys.json") && e.contains(SEALING_FILE), "{e}");
        assert!(e.contains("older copy"), "{e}");
    }

    #[test]
    fn a_change_interrupted_at_each_step_opens() {
        let d = tempfile::tempdir().unwrap();
        let mut s = open(d.path()).unwrap();
        s.create("a", "", 0).unwrap();
        let before = sealing(d.path());
        // Crash after step 1: the sealing file names a next key, keys.json is unchanged.
        s.write_sealing(Some(NextKey {
            generation: before.generation + 1,
            key: seal_hex(
                &s.root.0,
                &sealing_aad(s.store_id, before.generation + 1),
                &[9u8; 32],
            )
            .unwrap(),
        }))
        .unwrap();
        drop(s);
        let mut s = open(d.path()).unwrap();
        assert!(s.find("a").is_ok());
        assert!(
            sealing(d.path()).next.is_none(),
            "the unused next key is forgotten"
        );
        // Crash after step 2: keys.json is new, the sealing file still holds both keys.
        s.create("b", "", 0).unwrap();
        let after = sealing(d.path());
        let both = SealingFile {
            format: 1,
            store_id: after.store_id,
            generation: before.generation,
            key: before.key.clone(),
            next: Some(NextKey {
                generation: after.generation,
                key: after.key.clone().unwrap(),
            }),
        };
        write_json(&d.path().join(SEALING_FILE), &both).unwrap();
        drop(s);
        let s = open(d.path()).unwrap();
        assert!(s.find("b").is_ok());
        let f = sealing(d.path());
        assert!(
            f.generation == after.generation && f.next.is_none() && f.key == after.key,
            "step 3 finished at open: the old key destroyed"
        );
    }

    #[test]
    fn missing_or_foreign_sealing_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        open(d.path()).unwrap().create("a", "", 0).unwrap();
        let sp = d.path().join(SEALING_FILE);
        let saved = std::fs::read(&sp).unwrap();
        std::fs::remove_file(&sp).unwrap();
        let e = open(d.path()).err().unwrap().to_string();
        assert!(e.contains("missing"), "{e}");
        // Another store's sealing file.
        let other = tempfile::tempdir().unwrap();
        open(other.path()).unwrap();
        std::fs::copy(other.path().join(SEALING_FILE), &sp).unwrap();
        let e = open(d.path()).err().unwrap().to_string();
        assert!(e.contains("another key store"), "{e}");
        // keys.json gone while the sealing file says one was written.
        std::fs::write(&sp, saved).unwrap();
        std::fs::remove_file(d.path().join(FILE)).unwrap();
        let e = open(d.path()).err().unwrap().to_string();
        assert!(e.contains("missing"), "{e}");
    }

    /// Shared records in memory: the same compare-and-swap contract as the RADOS object.
    #[derive(Default)]
    pub(super) struct MemRecords(std::sync::Mutex<Option<(Vec<u8>, u64)>>);

    impl RecordStore for MemRecords {
        fn describe(&self) -> String {
            "mem".into()
        }
        fn shared(&self) -> bool {
            true
        }
        fn load(&self) -> Result<Option<super::super::records::Loaded>, KmsError> {
            Ok(self
                .0
                .lock()
                .unwrap()
                .clone()
                .map(|(bytes, version)| super::super::records::Loaded { bytes, version }))
        }
        fn write(
            &self,
            b: &[u8],
            expected: Option<u64>,
        ) -> Result<Result<u64, Conflict>, KmsError> {
            let mut g = self.0.lock().unwrap();
            if g.as_ref().map(|x| x.1) != expected {
                return Ok(Err(Conflict));
            }
            let v = g.as_ref().map_or(1, |x| x.1 + 10);
            *g = Some((b.to_vec(), v));
            Ok(Ok(v))
        }
    }

    pub(super) fn shared(dir: &Path, r: &Arc<MemRecords>) -> Store {
        let mut s = Store::open_shared(dir, root(), r.clone(), None).unwrap();
        s.refresh().unwrap();
        s
    }

    #[test]
    fn shared_records_two_hosts_and_rollback() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let r = Arc::new(MemRecords::default());
        let mut a = shared(da.path(), &r);
        let mut b = shared(db.path(), &r);
        let k = a.create("k", "", 0).unwrap();
        let ctx = EncryptionContext::default();
        // B's view is stale until it reloads; its change is then re-applied on top of A's.
        b.create("kb", "", 0).unwrap();
        a.refresh().unwrap();
        assert_eq!(a.keys().len(), 2);
        let (_, _, blob) = b.wrap("k", b"0123456789abcdef", &ctx).unwrap();
        let (id, _, plain) = a.unwrap(&blob, &ctx).unwrap();
        assert_eq!((id, plain.expose()), (k.key_id, &b"0123456789abcdef"[..]));
        // A and B both rotate from the same stale state: both versions kept.
        a.add_version(k.key_id).unwrap();
        b.add_version(k.key_id).unwrap();
        a.refresh().unwrap();
        assert_eq!(a.find("k").unwrap().versions, 3);
        // Alias taken by the other host meanwhile.
        let e = a.create("kb", "", 0).err().unwrap();
        assert!(matches!(e, KmsError::AliasExists(_)), "{e}");
        // Old bytes back at a *higher* store version: refused by generation by the hosts
        // that saw the newer set.
        let old = r.load().unwrap().unwrap().bytes;
        a.create("later", "", 0).unwrap();
        b.refresh().unwrap();
        let v = r.load().unwrap().unwrap().version;
        r.write(&old, Some(v)).unwrap().unwrap();
        for s in [&mut a, &mut b] {
            let e = s.refresh().err().unwrap().to_string();
            assert!(e.contains("rolled back"), "{e}");
        }
        // A host that never saw the newer set cannot tell: it takes the old one.
        let other = tempfile::tempdir().unwrap();
        assert!(shared(other.path(), &r).find("later").is_err());
        // An edited record set does not open.
        let mut cur = old.clone();
        let at = String::from_utf8_lossy(&cur)
            .find("\"alias\": \"kb\"")
            .unwrap();
        cur[at + 10] = b'x';
        let v = r.load().unwrap().unwrap().version;
        r.write(&cur, Some(v)).unwrap().unwrap();
        let fresh = tempfile::tempdir().unwrap();
        let mut c = Store::open_shared(fresh.path(), root(), r.clone(), None).unwrap();
        assert!(matches!(c.refresh(), Err(KmsError::RootKey(_))));
        // Another root key does not open the records either.
        let mut c = Store::open_shared(fresh.path(), RootKey::from_bytes([4; 32]), r.clone(), None)
            .unwrap();
        assert!(matches!(c.refresh(), Err(KmsError::RootKey(_))));
    }

    #[test]
    fn shared_records_concurrent_creates_lose_nothing() {
        let r = Arc::new(MemRecords::default());
        let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
        std::thread::scope(|sc| {
            for (h, d) in dirs.iter().enumerate() {
                let r = r.clone();
                sc.spawn(move || {
                    let mut s = shared(d.path(), &r);
                    for i in 0..10 {
                        s.create(&format!("h{h}-{i}"), "", 0).unwrap();
                    }
                });
            }
        });
        let s = shared(dirs[0].path(), &r);
        assert_eq!(s.keys().len(), 40);
    }
}
