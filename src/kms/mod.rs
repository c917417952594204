//! Local key manager modelled on a cloud KMS: CMKs with versions, data-key wrapping under an
//! encryption context, rotation, scheduled deletion (crypto-shredding that a restored key
//! store cannot undo), a keyed (HMAC) audit chain, and envelope encryption of files.
//!
//! ```text
//!  root key (file or systemd credential) ──AES-256-GCM──▶ sealing key (one per generation)
//!  sealing key ──AES-256-GCM──▶ CMK material (per version, at rest)
//!  root key ──HKDF──▶ audit chain HMAC key
//!  CMK version material ──HKDF(salt)──▶ wrap key ──AES-256-GCM(AAD = blob header + context)──▶ DEK
//! ```
//! or, with `[kms] custody = "pkcs11"` (`custody.rs`), each CMK version is a non-extractable
//! AES-256 object in a PKCS#11 token that wraps DEKs itself (CKM_AES_GCM, same AAD).
//! Knows nothing of NBD or volumes. The API layer maps JSON to these calls one to one.
#![forbid(unsafe_code)]

pub mod audit;
mod crypto;
pub mod custody;
pub mod envelope;
pub mod records;
mod root;
mod sealing;
mod secret;
mod store;
pub use sealing::atomic_write;

/// The sealing file's name in the key store dir (unless `[kms] sealing_key_file`).
pub fn sealing_file_name() -> &'static str {
    sealing::SEALING_FILE
}
pub mod wrap;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

pub use audit::{AuditHead, AuditKey, AuditReport};
pub use custody::{Custody, CustodyKind, Pkcs11Custody};
pub use records::{Conflict, FileRecords, Loaded, RecordStore};
pub use root::{CREDENTIAL_NAME, RootKey};
pub use secret::Secret;
pub use wrap::EncryptionContext;

use store::{KeyRecord, Store};
pub use store::{Merged, local_key_count};

/// Who asked (from the control socket's peer credentials); recorded in the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
}

impl Caller {
    /// The daemon itself (attach at start-up, sweeps).
    pub const DAEMON: Caller = Caller {
        uid: 0,
        gid: 0,
        pid: 0,
    };
}

#[derive(Debug, Clone)]
pub struct KmsConfig {
    pub min_pending_days: u32,
    pub max_pending_days: u32,
    /// The sealing file (`[kms] sealing_key_file`); default `<key store dir>/sealing.key`.
    pub sealing_key_file: Option<PathBuf>,
    /// The host named in every audit record (`[kms] host_id`, else the host name).
    pub host: Option<String>,
}

impl Default for KmsConfig {
    fn default() -> KmsConfig {
        KmsConfig {
            min_pending_days: 7,
            max_pending_days: 1096,
            sealing_key_file: None,
            host: None,
        }
    }
}

/// Key states as the cloud API numbers them ("1" and "5" reserved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KeyState {
    Enabled,
    Disabled,
    PendingDeletion,
    /// Past its deletion window: material destroyed.
    Destroyed,
}

impl KeyState {
    pub fn code(self) -> &'static str {
        match self {
            KeyState::Enabled => "2",
            KeyState::Disabled => "3",
            KeyState::PendingDeletion => "4",
            KeyState::Destroyed => "destroyed",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            KeyState::Enabled => "enabled",
            KeyState::Disabled => "disabled",
            KeyState::PendingDeletion => "pending deletion",
            KeyState::Destroyed => "destroyed",
        }
    }
}

/// A CMK as the API shows it (cloud field names; numbers as strings).
#[derive(Debug, Clone, Serialize)]
pub struct KeyMetadata {
    pub key_id: String,
    pub key_alias: String,
    pub key_description: String,
    /// Unix milliseconds, as a string.
    pub creation_date: String,
    pub key_state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delete_date: Option<String>,
    pub key_version: String,
    pub key_versions: String,
    /// `"file"` or `"pkcs11"` (SPEC §8).
    pub custody: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    #[error("key not found: {0}")]
    NotFound(String),
    #[error("alias already exists: {0}")]
    AliasExists(String),
    /// The key cannot be used in its state (names id, alias, state).
    #[error("{0}")]
    KeyState(String),
    #[error("invalid state transition: {0}")]
    Transition(String),
    #[error("{0}")]
    InvalidCiphertext(String),
    #[error("root key: {0}")]
    RootKey(String),
    /// The key store and its sealing file do not fit together (a rollback, a missing file).
    #[error("{0}")]
    StoreState(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("internal: {0}")]
    Internal(String),
    /// The PKCS#11 token failed or is unreachable (names the token and the PKCS#11 error).
    #[error("hsm: {0}")]
    Hsm(String),
    /// Shared key records unreachable or failing (the cluster is down: retry later), or a
    /// change that kept losing to other hosts' changes.
    #[error("key records: {0}")]
    Records(String),
}

impl KmsError {
    /// Stable error codes (table in `docs/key-format.md`).
    pub fn error_code(&self) -> &'static str {
        match self {
            KmsError::InvalidParameter(_) => "KMS.0101",
            KmsError::NotFound(_) => "KMS.0201",
            KmsError::AliasExists(_) => "KMS.0202",
            KmsError::KeyState(_) => "KMS.0301",
            KmsError::Transition(_) => "KMS.0302",
            KmsError::InvalidCiphertext(_) => "KMS.0401",
            KmsError::RootKey(_) => "KMS.0501",
            KmsError::StoreState(_) => "KMS.0502",
            KmsError::Hsm(_) => "KMS.0503",
            KmsError::Records(_) => "KMS.0504",
            KmsError::Io(_) | KmsError::Internal(_) => "KMS.0500",
        }
    }
    pub fn http_status(&self) -> u16 {
        match self {
            KmsError::InvalidParameter(_) | KmsError::InvalidCiphertext(_) => 400,
            KmsError::NotFound(_) => 404,
            KmsError::AliasExists(_) | KmsError::KeyState(_) | KmsError::Transition(_) => 409,
            KmsError::Records(_) => 503,
            _ => 500,
        }
    }
}

const MS_PER_DAY: u64 = 86_400_000;

pub struct Kms {
    inner: Mutex<Inner>,
    cfg: KmsConfig,
}

struct Inner {
    store: Store,
    audit: audit::AuditLog,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn valid_alias(a: &str) -> bool {
    (1..=255).contains(&a.len())
        && a.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b":/_-".contains(&c))
}

impl Kms {
    /// Opens (or creates) the key store in `dir` (`keys.json`, `audit.jsonl`, and the sealing
    /// file unless configured elsewhere). A store sealed under another root key, or older than
    /// its sealing file, is refused.
    pub fn open(dir: &Path, root: RootKey, cfg: KmsConfig) -> Result<Kms, KmsError> {
        Self::open_with_custody(dir, root, cfg, None)
    }

    /// Like [`Kms::open`]; with `hsm`, new CMKs are created in that custody (PKCS#11), and
    /// keys already in it are usable.
    pub fn open_with_custody(
        dir: &Path,
        root: RootKey,
        cfg: KmsConfig,
        hsm: Option<std::sync::Arc<dyn Custody>>,
    ) -> Result<Kms, KmsError> {
        std::fs::create_dir_all(dir)?;
        let sealing = cfg
            .sealing_key_file
            .clone()
            .unwrap_or_else(|| dir.join(sealing::SEALING_FILE));
        let audit_key = AuditKey::derive(&root);
        let store = Store::open(dir, root, &sealing, hsm)?;
        Self::finish_open(dir, store, audit_key, cfg)
    }

    /// Like [`Kms::open_with_custody`], with the key records in a shared [`RecordStore`]
    /// (`[kms] store = "rados"`): material sealed under a key derived from the root key, so
    /// every host with the same root key (or the same token) opens them; the audit log stays
    /// in `dir`. The records are not read here: a store that is unreachable at start-up makes
    /// the KMS calls fail (`KMS.0504`) until it is back, it does not stop the daemon.
    pub fn open_shared(
        dir: &Path,
        root: RootKey,
        cfg: KmsConfig,
        hsm: Option<std::sync::Arc<dyn Custody>>,
        records: std::sync::Arc<dyn RecordStore>,
    ) -> Result<Kms, KmsError> {
        std::fs::create_dir_all(dir)?;
        let audit_key = AuditKey::derive(&root);
        let store = Store::open_shared(dir, root, records, hsm)?;
        Self::finish_open(dir, store, audit_key, cfg)
    }

    fn finish_open(
        dir: &Path,
        store: Store,
        audit_key: AuditKey,
        cfg: KmsConfig,
    ) -> Result<Kms, KmsError> {
        let host = cfg.host.clone().unwrap_or_else(audit::hostname);
        let audit =
            audit::AuditLog::open_for_host(&dir.join("audit.jsonl"), audit_key, Some(host))?;
        let kms = Kms {
            inner: Mutex::new(Inner { store, audit }),
            cfg,
        };
        match kms.sweep_deletions() {
            Ok(_) => {}
            // Shared records unreachable: every call says so until they are back.
            Err(e @ KmsError::Records(_)) => {
                tracing::warn!(error = %e, "key records unreachable at start; KMS calls fail with KMS.0504 until they are back");
            }
            Err(e) => return Err(e),
        }
        Ok(kms)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` under the lock, audits the outcome, returns it.
    fn op<T>(
        &self,
        caller: &Caller,
        operation: &str,
        ctx: Option<&EncryptionContext>,
        f: impl FnOnce(&mut Inner) -> Result<(T, Option<(String, Option<u32>)>), KmsError>,
        key_hint: Option<&str>,
    ) -> Result<T, KmsError> {
        let mut g = self.lock();
        let now = now_ms();
        // The sweep also (re)loads shared key records: a failure there (cluster down,
        // rolled-back records) fails the call, audited like any other failure.
        let r = match g.store.sweep(now) {
            Ok(gone) => {
                audit_destroyed(&mut g, &gone)?;
                f(&mut g)
            }
            Err(e) => Err(e),
        };
        let (key, res) = match &r {
            Ok((_, k)) => (k.clone(), Ok(())),
            Err(e) => (key_hint.map(|k| (k.to_owned(), None)), Err(e)),
        };
        let subject = audit::Subject {
            key_id: key.as_ref().map(|(k, _)| k.as_str()),
            key_version: key.as_ref().and_then(|(_, v)| *v),
            context: ctx,
            volume: None,
        };
        let code = match res {
            Ok(()) => "ok",
            Err(e) => e.error_code(),
        };
        g.audit.append(operation, subject, caller, code)?;
        r.map(|(t, _)| t)
    }

    /// Audits a control call that is not a KMS operation (a volume operation), or a KMS
    /// request refused before it reached the key manager (a malformed field): `result` is
    /// "ok" or the error code.
    pub fn audit_event(
        &self,
        caller: &Caller,
        operation: &str,
        subject: audit::Subject<'_>,
        result: &str,
    ) -> Result<(), KmsError> {
        self.lock().audit.append(operation, subject, caller, result)
    }

    /// The running chain's head: last record written and the file written to.
    pub fn audit_head(&self) -> Result<AuditHead, KmsError> {
        self.lock().audit.head()
    }

    /// Logs the audit chain's head (seq + hash) so that a copy lives in the journal, outside
    /// the state dir; returns the seq logged.
    pub fn log_audit_head(&self, when: &str) -> Option<u64> {
        match self.audit_head() {
            Ok(h) => {
                tracing::info!(seq = h.seq, hash = %h.hash, when, "audit chain head");
                Some(h.seq)
            }
            Err(e) => {
                tracing::warn!(error = %e, "audit chain head unavailable");
                None
            }
        }
    }

    /// Where the sealing file is and the key store's sealing generation.
    pub fn sealing(&self) -> (PathBuf, u64) {
        let g = self.lock();
        let (p, n) = g.store.sealing();
        (p.to_owned(), n)
    }

    pub fn create_key(
        &self,
        c: &Caller,
        alias: &str,
        description: &str,
    ) -> Result<KeyMetadata, KmsError> {
        self.op(
            c,
            "createKey",
            None,
            |g| {
                if !valid_alias(alias) {
                    return Err(KmsError::InvalidParameter(format!(
                        "key_alias {alias:?} must match ^[a-zA-Z0-9:/_-]{{1,255}}$"
                    )));
                }
                if description.len() > 255 {
                    return Err(KmsError::InvalidParameter(
                        "key_description longer than 255".into(),
                    ));
                }
                if g.store.find(alias).is_ok() {
                    return Err(KmsError::AliasExists(alias.to_owned()));
                }
                let rec = g.store.create(alias, description, now_ms())?;
                let id = rec.key_id.to_string();
                Ok((rec.metadata(), Some((id, Some(1)))))
            },
            Some(alias),
        )
    }

    pub fn describe_key(&self, c: &Caller, key: &str) -> Result<KeyMetadata, KmsError> {
        self.op(
            c,
            "describeKey",
            None,
            |g| {
                let r = g.store.find(key)?;
                Ok((r.metadata(), Some((r.key_id.to_string(), None))))
            },
            Some(key),
        )
    }

    pub fn list_keys(&self, c: &Caller) -> Result<Vec<KeyMetadata>, KmsError> {
        self.op(
            c,
            "listKeys",
            None,
            |g| {
                Ok((
                    g.store.keys().iter().map(KeyRecord::metadata).collect(),
                    None,
                ))
            },
            None,
        )
    }

    fn transition(
        &self,
        c: &Caller,
        operation: &str,
        key: &str,
        f: impl Fn(&mut KeyRecord, u64) -> Result<(), KmsError>,
    ) -> Result<KeyMetadata, KmsError> {
        self.op(
            c,
            operation,
            None,
            |g| {
                let id = g.store.find(key)?.key_id;
                let meta = g.store.update(id, |r| f(r, now_ms()))?;
                Ok((meta, Some((id.to_string(), None))))
            },
            Some(key),
        )
    }

    pub fn enable_key(&self, c: &Caller, key: &str) -> Result<KeyMetadata, KmsError> {
        self.transition(c, "enableKey", key, |r, _| match r.state {
            KeyState::Disabled | KeyState::Enabled => {
                r.state = KeyState::Enabled;
                Ok(())
            }
            s => Err(KmsError::Transition(format!(
                "{} cannot be enabled while {}",
                r.describe(),
                s.name()
            ))),
        })
    }

    pub fn disable_key(&self, c: &Caller, key: &str) -> Result<KeyMetadata, KmsError> {
        self.transition(c, "disableKey", key, |r, _| match r.state {
            KeyState::Enabled | KeyState::Disabled => {
                r.state = KeyState::Disabled;
                Ok(())
            }
            s => Err(KmsError::Transition(format!(
                "{} cannot be disabled while {}",
                r.describe(),
                s.name()
            ))),
        })
    }

    pub fn schedule_key_deletion(
        &self,
        c: &Caller,
        key: &str,
        pending_days: u32,
    ) -> Result<KeyMetadata, KmsError> {
        let (min, max) = (self.cfg.min_pending_days, self.cfg.max_pending_days);
        let meta = self.transition(c, "scheduleKeyDeletion", key, |r, now| {
            if !(min..=max).contains(&pending_days) {
                return Err(KmsError::InvalidParameter(format!(
                    "pending_days must be within {min}..{max}"
                )));
            }
            match r.state {
                KeyState::Enabled | KeyState::Disabled => {
                    r.state = KeyState::PendingDeletion;
                    r.deletion_date = Some(now + u64::from(pending_days) * MS_PER_DAY);
                    Ok(())
                }
                s => Err(KmsError::Transition(format!(
                    "{} is already {}",
                    r.describe(),
                    s.name()
                ))),
            }
        })?;
        if pending_days == 0 {
            // The window is already over: destroy now, not at the next start-up.
            self.sweep_deletions()?;
        }
        Ok(meta)
    }

    pub fn cancel_key_deletion(&self, c: &Caller, key: &str) -> Result<KeyMetadata, KmsError> {
        self.transition(c, "cancelKeyDeletion", key, |r, _| match r.state {
            KeyState::PendingDeletion => {
                r.state = KeyState::Disabled;
                r.deletion_date = None;
                Ok(())
            }
            s => Err(KmsError::Transition(format!(
                "{} is not pending deletion but {}",
                r.describe(),
                s.name()
            ))),
        })
    }

    /// `key import-to-hsm`, first half: every version of a file-custody key gets a
    /// non-extractable object in the token; new wraps use the token, old blobs still unwrap
    /// with the former material until [`Kms::drop_file_material`]. Resumes a half-done move.
    pub fn import_to_hsm(&self, c: &Caller, key: &str) -> Result<KeyMetadata, KmsError> {
        self.op(
            c,
            "importKeyToHsm",
            None,
            |g| {
                let id = g.store.find(key)?.key_id;
                let meta = g.store.move_to_token(id)?;
                Ok((meta, Some((id.to_string(), None))))
            },
            Some(key),
        )
    }

    /// `key import-to-hsm`, second half (once every volume under the key is re-wrapped in the
    /// token): the sealed material leaves the key store.
    pub fn drop_file_material(&self, c: &Caller, key: &str) -> Result<bool, KmsError> {
        self.op(
            c,
            "dropFileMaterial",
            None,
            |g| {
                let id = g.store.find(key)?.key_id;
                Ok((g.store.drop_legacy(id)?, Some((id.to_string(), None))))
            },
            Some(key),
        )
    }

    pub fn rotate_key(&self, c: &Caller, key: &str) -> Result<KeyMetadata, KmsError> {
        self.op(
            c,
            "rotateKey",
            None,
            |g| {
                let id = g.store.find(key)?.key_id;
                g.store.find_id(id)?.usable()?;
                let meta = g.store.add_version(id)?;
                let v = meta.key_version.parse().ok();
                Ok((meta, Some((id.to_string(), v))))
            },
            Some(key),
        )
    }

    fn check_len(length_bits: u32) -> Result<usize, KmsError> {
        if length_bits == 0 || !length_bits.is_multiple_of(8) || length_bits > 8192 {
            return Err(KmsError::InvalidParameter(
                "datakey_length must be a multiple of 8 in 8..8192".into(),
            ));
        }
        Ok(length_bits as usize / 8)
    }

    /// A fresh DEK, in plaintext and wrapped under the key's newest version.
    pub fn create_datakey(
        &self,
        c: &Caller,
        key: &str,
        length_bits: u32,
        ctx: &EncryptionContext,
    ) -> Result<(Secret, Vec<u8>), KmsError> {
        self.op(
            c,
            "createDataKey",
            Some(ctx),
            |g| {
                let n = Self::check_len(length_bits)?;
                let mut plain = Secret::zeroed(n);
                crypto::random(plain.expose_mut())?;
                let (id, v, blob) = g.store.wrap(key, plain.expose(), ctx)?;
                Ok(((plain, blob), Some((id.to_string(), Some(v)))))
            },
            Some(key),
        )
    }

    pub fn create_datakey_without_plaintext(
        &self,
        c: &Caller,
        key: &str,
        length_bits: u32,
        ctx: &EncryptionContext,
    ) -> Result<Vec<u8>, KmsError> {
        self.op(
            c,
            "createDataKeyWithoutPlaintext",
            Some(ctx),
            |g| {
                let n = Self::check_len(length_bits)?;
                let mut plain = Secret::zeroed(n);
                crypto::random(plain.expose_mut())?;
                let (id, v, blob) = g.store.wrap(key, plain.expose(), ctx)?;
                Ok((blob, Some((id.to_string(), Some(v)))))
            },
            Some(key),
        )
    }

    pub fn encrypt_datakey(
        &self,
        c: &Caller,
        key: &str,
        plain: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<Vec<u8>, KmsError> {
        self.op(
            c,
            "encryptDatakey",
            Some(ctx),
            |g| {
                let (id, v, blob) = g.store.wrap(key, plain, ctx)?;
                Ok((blob, Some((id.to_string(), Some(v)))))
            },
            Some(key),
        )
    }

    /// Unwraps: returns the CMK id and version the blob names, and the DEK.
    pub fn decrypt_datakey(
        &self,
        c: &Caller,
        wrapped: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<(String, u32, Secret), KmsError> {
        let hint = wrap::parse(wrapped).ok().map(|h| h.key_id.to_string());
        self.op(
            c,
            "decryptDatakey",
            Some(ctx),
            |g| {
                let (id, v, plain) = g.store.unwrap(wrapped, ctx)?;
                Ok(((id.to_string(), v, plain), Some((id.to_string(), Some(v)))))
            },
            hint.as_deref(),
        )
    }

    /// encrypt-data: small payloads (<= 4096 bytes) sealed directly under the CMK.
    pub fn encrypt_data(
        &self,
        c: &Caller,
        key: &str,
        plain: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<Vec<u8>, KmsError> {
        self.op(
            c,
            "encryptData",
            Some(ctx),
            |g| {
                if plain.is_empty() || plain.len() > 4096 {
                    return Err(KmsError::InvalidParameter(
                        "plain_text must be 1..4096 bytes".into(),
                    ));
                }
                let (id, v, blob) = g.store.wrap_data(key, plain, ctx)?;
                Ok((blob, Some((id.to_string(), Some(v)))))
            },
            Some(key),
        )
    }

    pub fn decrypt_data(
        &self,
        c: &Caller,
        blob: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<Secret, KmsError> {
        let hint = wrap::parse(blob).ok().map(|h| h.key_id.to_string());
        self.op(
            c,
            "decryptData",
            Some(ctx),
            |g| {
                let (id, v, plain) = g.store.unwrap(blob, ctx)?;
                Ok((plain, Some((id.to_string(), Some(v)))))
            },
            hint.as_deref(),
        )
    }

    pub fn gen_random(&self, c: &Caller, n: usize) -> Result<Vec<u8>, KmsError> {
        self.op(
            c,
            "genRandom",
            None,
            |_| {
                if n == 0 || n > 1024 {
                    return Err(KmsError::InvalidParameter(
                        "random_data_length must be 1..1024 bytes".into(),
                    ));
                }
                let mut v = vec![0u8; n];
                crypto::random(&mut v)?;
                Ok((v, None))
            },
            None,
        )
    }

    /// Merges this host's local key records (`keys.json` in `local_dir`, sealed under the
    /// sealing file `local_sealing`) into these shared records, audited (one record for the
    /// merge, one per key added), then destroys the local store: `keys.json`, then its
    /// sealing file (`store/migrate.rs`). Nothing to merge (no `keys.json`): a leftover
    /// sealing file is removed. Refused on a local store.
    pub fn migrate_local_records(
        &self,
        caller: &Caller,
        local_dir: &Path,
        local_sealing: &Path,
        root: RootKey,
    ) -> Result<Merged, KmsError> {
        let keys_json = local_dir.join(records::KEYS_FILE);
        let merged = if keys_json.exists() {
            let local = Store::open(local_dir, root, local_sealing, None)?;
            let merged = self.op(
                caller,
                "migrateKeyRecords",
                None,
                |g| Ok((g.store.merge_local(&local)?, None)),
                None,
            )?;
            let mut g = self.lock();
            for (id, _) in &merged.added {
                let id = id.to_string();
                let subject = audit::Subject {
                    volume: None,
                    key_id: Some(&id),
                    key_version: None,
                    context: None,
                };
                g.audit.append("migrateKeyRecord", subject, caller, "ok")?;
            }
            drop(g);
            drop(local);
            std::fs::remove_file(&keys_json)?;
            merged
        } else {
            Merged::default()
        };
        match std::fs::remove_file(local_sealing) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        Ok(merged)
    }

    /// Destroys the material of keys whose deletion window has ended; returns their ids.
    pub fn sweep_deletions(&self) -> Result<Vec<String>, KmsError> {
        let mut g = self.lock();
        let gone = g.store.sweep(now_ms())?;
        audit_destroyed(&mut g, &gone)?;
        Ok(gone)
    }

    /// State of a key by id or alias, without auditing (used for volume listings).
    pub fn key_state(&self, key: &str) -> Result<(KeyState, String), KmsError> {
        let mut g = self.lock();
        // A window may have ended since the last operation: destroy first, then report.
        let gone = g.store.sweep(now_ms())?;
        audit_destroyed(&mut g, &gone)?;
        let r = g.store.find(key)?;
        let mut state = r.effective_state(now_ms());
        if state != KeyState::Destroyed && g.store.material_gone(r) {
            state = KeyState::Destroyed;
        }
        Ok((state, r.alias.clone()))
    }

    pub fn audit_verify(&self) -> Result<AuditReport, KmsError> {
        self.lock().audit.verify()
    }
}

fn audit_destroyed(g: &mut Inner, ids: &[String]) -> Result<(), KmsError> {
    for id in ids {
        let s = audit::Subject {
            key_id: Some(id),
            ..audit::Subject::default()
        };
        g.audit.append("destroyKey", s, &Caller::DAEMON, "ok")?;
    }
    Ok(())
}
