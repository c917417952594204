//! Local key manager modelled on a cloud KMS: CMKs with versions, data-key wrapping under an
//! encryption context, rotation, scheduled deletion (crypto-shredding), a hash-chained audit log,
//! and envelope encryption of files.
//!
//! CONTRACT (used by `api/` and `daemon/`; the bodies are filled in by the key-manager issue,
//! the signatures stay; the API layer only maps JSON <-> these types):
//!
//! ```ignore
//! pub struct RootKey;  // 32 zeroizing bytes
//! impl RootKey { pub fn load_file(path) -> Result<Self, KmsError>;   // refuses group/world-readable
//!                pub fn load_credential(name) -> Result<Self, KmsError>;  // $CREDENTIALS_DIRECTORY
//!                pub fn generate_file(path) -> Result<(), KmsError>; }  // 0600, refuses overwrite
//! pub struct KmsConfig { pub min_pending_days: u32 /* default 7 */, pub max_pending_days: u32 /* 1096 */ }
//! pub struct Caller { pub uid: u32, pub pid: i32 }   // recorded in the audit log
//! pub enum KeyState { Enabled /*"2"*/, Disabled /*"3"*/, PendingDeletion /*"4"*/, Destroyed }
//! pub struct KeyMetadata { pub key_id: String /*uuid*/, pub key_alias: String, pub key_description: String,
//!     pub creation_date: u64 /*unix ms*/, pub key_state: KeyState, pub deletion_date: Option<u64>,
//!     pub current_version: u32, pub versions: u32 }     // Serialize, Clone, Debug
//! pub struct Secret;   // zeroizing bytes, no Debug; .expose() -> &[u8]
//! pub type EncryptionContext = std::collections::BTreeMap<String, String>;
//! pub enum KmsError { .. }  // thiserror; `pub fn error_code(&self) -> &'static str` ("KMS.0xxx"),
//!                           // `pub fn http_status(&self) -> u16`; messages name key id/alias/state
//! impl Kms {
//!     pub fn open(state_dir: &Path, root: RootKey, cfg: KmsConfig) -> Result<Kms, KmsError>;
//!     // KEY = key id or alias everywhere below. Kms: Send + Sync (internal locking).
//!     pub fn create_key(&self, c: &Caller, alias: &str, description: &str) -> Result<KeyMetadata, KmsError>;
//!     pub fn describe_key(&self, c: &Caller, key: &str) -> Result<KeyMetadata, KmsError>;
//!     pub fn list_keys(&self, c: &Caller) -> Result<Vec<KeyMetadata>, KmsError>;
//!     pub fn enable_key / disable_key / cancel_key_deletion / rotate_key(&self, c, key) -> Result<KeyMetadata, KmsError>;
//!     pub fn schedule_key_deletion(&self, c, key, pending_days: u32) -> Result<KeyMetadata, KmsError>;
//!     pub fn create_datakey(&self, c, key, length_bits: u32, ctx: &EncryptionContext) -> Result<(Secret, Vec<u8>), KmsError>;
//!     pub fn create_datakey_without_plaintext(&self, c, key, length_bits, ctx) -> Result<Vec<u8>, KmsError>;
//!     pub fn encrypt_datakey(&self, c, key, plain: &[u8], ctx) -> Result<Vec<u8>, KmsError>;
//!     /// Returns the CMK id and version named by the blob, and the DEK.
//!     pub fn decrypt_datakey(&self, c, wrapped: &[u8], ctx) -> Result<(String, u32, Secret), KmsError>;
//!     pub fn encrypt_data / decrypt_data (<= 4096 bytes), pub fn gen_random(&self, c, n) -> Result<Vec<u8>, KmsError>;
//!     /// Destroys material of keys whose deletion window has ended; called periodically and at open.
//!     pub fn sweep_deletions(&self) -> Result<Vec<String>, KmsError>;
//!     pub fn audit_verify(&self) -> Result<AuditReport, KmsError>;  // first broken record, if any
//! }
//! pub mod envelope { pub fn encrypt<R: Read, W: Write>(kms, caller, key, r, w) -> Result<..>;
//!                    pub fn decrypt<R: Read, W: Write>(kms, caller, r, w) -> Result<..>; }
//! ```
#![forbid(unsafe_code)]
