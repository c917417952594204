//! Custody of CMK material: where each CMK version lives and where wrapping happens.
//!
//! - [`FileCustody`] (`custody = "file"`): 32 random bytes per version, sealed in `keys.json`
//!   under the key store's current sealing key (re-sealed on every store change, `store.rs`);
//!   wraps in this process (blob algorithm 1, `docs/key-format.md`).
//! - [`Pkcs11Custody`] (`custody = "pkcs11"`): an AES-256 secret-key object generated inside a
//!   PKCS#11 token (`CKA_TOKEN`, `CKA_SENSITIVE`, `CKA_PRIVATE`, `CKA_EXTRACTABLE = false`);
//!   `keys.json` keeps only the object's label. Wrapping and unwrapping run inside the token
//!   with `CKM_AES_GCM`, AAD = blob header || canonical encryption context (blob algorithm 2).
//!   Destroying a version is `C_DestroyObject`: no copy is left anywhere, so restoring the
//!   state dir from a backup cannot bring the key back.
//!
//! The key store stores, per version, the string [`Custody::generate_version`] returned and
//! hands it back to every later call.

use std::path::Path;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::crypto::{self, TAG_LEN};
use super::secret::Secret;
use super::wrap::{self, EncryptionContext};
use super::{KmsError, sealing};

/// Which custody a CMK is in (recorded per key in `keys.json`; `key describe` shows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CustodyKind {
    #[default]
    File,
    Pkcs11,
}

impl CustodyKind {
    pub fn name(self) -> &'static str {
        match self {
            CustodyKind::File => "file",
            CustodyKind::Pkcs11 => "pkcs11",
        }
    }
    /// The wrapped-DEK algorithm byte of this custody: a blob is only ever tried with the
    /// custody that made it.
    pub fn alg(self) -> u8 {
        match self {
            CustodyKind::File => wrap::ALG_AES256GCM_HKDF,
            CustodyKind::Pkcs11 => wrap::ALG_PKCS11_AES256GCM,
        }
    }
}

/// Where CMK versions live and where data keys are wrapped.
pub trait Custody: Send + Sync {
    fn kind(&self) -> CustodyKind;
    /// Makes version `version` of `key_id`; returns what the key store keeps for it.
    fn generate_version(&self, key_id: Uuid, version: u32) -> Result<String, KmsError>;
    /// Wraps 1..4096 bytes (lengths checked by the caller) into a blob of this custody.
    fn wrap(
        &self,
        key_id: Uuid,
        version: u32,
        entry: &str,
        plain: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<Vec<u8>, KmsError>;
    /// Unwraps a blob of this custody (its header already names `key_id`, `version`).
    fn unwrap(
        &self,
        key_id: Uuid,
        version: u32,
        entry: &str,
        blob: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<Secret, KmsError>;
    /// Destroys a version. Idempotent: a version already gone is not an error.
    fn destroy(&self, key_id: Uuid, version: u32, entry: &str) -> Result<(), KmsError>;
    /// `Ok(false)` when the custody says for certain that the version is gone (e.g. its token
    /// object was destroyed while a restored backup of the state dir still names it).
    fn present(&self, key_id: Uuid, version: u32, entry: &str) -> Result<bool, KmsError>;
}

/// AAD of sealed material: key id || version, so an entry moved to another key does not open.
pub(super) fn material_aad(id: Uuid, version: u32) -> Vec<u8> {
    let mut a = id.as_bytes().to_vec();
    a.extend_from_slice(&version.to_be_bytes());
    a
}

/// Material sealed in `keys.json` under the key store's current sealing key (the historical
/// custody). The key store lends its sealing key per use (it changes on every commit, which
/// re-seals every file-custody entry: `store.rs`), so a `FileCustody` lives no longer than
/// one store call.
pub struct FileCustody<'k> {
    key: &'k [u8; 32],
}

impl<'k> FileCustody<'k> {
    /// File custody under `sealing_key`.
    pub fn new(sealing_key: &'k [u8; 32]) -> FileCustody<'k> {
        FileCustody { key: sealing_key }
    }

    fn material(&self, key_id: Uuid, version: u32, entry: &str) -> Result<Secret, KmsError> {
        sealing::open_hex(self.key, &material_aad(key_id, version), entry).ok_or_else(|| {
            KmsError::Internal(format!(
                "sealed material of key {key_id} version {version} does not open"
            ))
        })
    }
}

impl Custody for FileCustody<'_> {
    fn kind(&self) -> CustodyKind {
        CustodyKind::File
    }
    fn generate_version(&self, key_id: Uuid, version: u32) -> Result<String, KmsError> {
        let mut material = Secret::zeroed(32);
        crypto::random(material.expose_mut())?;
        sealing::seal_hex(self.key, &material_aad(key_id, version), material.expose())
    }
    fn wrap(
        &self,
        key_id: Uuid,
        version: u32,
        entry: &str,
        plain: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<Vec<u8>, KmsError> {
        let m = self.material(key_id, version, entry)?;
        wrap::wrap_any(key_id, version, m.expose(), plain, ctx)
    }
    fn unwrap(
        &self,
        key_id: Uuid,
        version: u32,
        entry: &str,
        blob: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<Secret, KmsError> {
        let m = self.material(key_id, version, entry)?;
        wrap::unwrap(blob, m.expose(), ctx)
    }
    fn destroy(&self, _key_id: Uuid, _version: u32, _entry: &str) -> Result<(), KmsError> {
        // The key store drops the sealed entry and its commit destroys the sealing key it was
        // sealed under; nothing else holds the material.
        Ok(())
    }
    fn present(&self, _key_id: Uuid, _version: u32, entry: &str) -> Result<bool, KmsError> {
        Ok(!entry.is_empty())
    }
}

/// `[kms] custody = "pkcs11"` settings, PIN already read.
pub struct Pkcs11Settings {
    pub module: std::path::PathBuf,
    pub token_label: String,
    pub pin: AuthPin,
    /// The `[kms]` key the PIN came from (`pin_file` or `pin_credential`), for errors.
    pub pin_key: &'static str,
}

/// A start-up failure of PKCS#11 custody, naming the `[kms]` key at fault.
#[derive(Debug, thiserror::Error)]
#[error("kms.{key}: {reason}")]
pub struct CustodyOpenError {
    pub key: &'static str,
    pub reason: String,
}

fn open_err(key: &'static str, reason: impl Into<String>) -> CustodyOpenError {
    CustodyOpenError {
        key,
        reason: reason.into(),
    }
}

/// Reads the PIN from a file (0600 or stricter; one line) or `$CREDENTIALS_DIRECTORY/<name>`.
pub fn read_pin(
    file: Option<&Path>,
    credential: Option<&str>,
) -> Result<AuthPin, CustodyOpenError> {
    use std::os::unix::fs::PermissionsExt;
    let (key, path) = match (file, credential) {
        (Some(f), _) => {
            let meta = std::fs::metadata(f)
                .map_err(|e| open_err("pin_file", format!("{}: {e}", f.display())))?;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(open_err(
                    "pin_file",
                    format!(
                        "{} is accessible by group or others (mode {:o}); chmod 600 it",
                        f.display(),
                        meta.permissions().mode() & 0o777
                    ),
                ));
            }
            ("pin_file", f.to_owned())
        }
        (None, Some(name)) => {
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                open_err(
                    "pin_credential",
                    "CREDENTIALS_DIRECTORY is not set (not started by systemd?)",
                )
            })?;
            ("pin_credential", Path::new(&dir).join(name))
        }
        (None, None) => return Err(open_err("pin_file", "set pin_file or pin_credential")),
    };
    let raw = zeroize::Zeroizing::new(
        std::fs::read(&path).map_err(|e| open_err(key, format!("{}: {e}", path.display())))?,
    );
    let text = std::str::from_utf8(&raw)
        .map_err(|_| open_err(key, format!("{} is not UTF-8", path.display())))?;
    let pin = text.strip_suffix('\n').unwrap_or(text);
    if pin.is_empty() || pin.len() > 255 || pin.contains('\n') {
        return Err(open_err(
            key,
            format!("{} must hold the PIN on one line", path.display()),
        ));
    }
    Ok(AuthPin::from(pin))
}

/// Sessions opened at most; a caller waits this long for a free one.
const MAX_SESSIONS: usize = 4;
const SESSION_WAIT: Duration = Duration::from_secs(5);

struct Pool {
    idle: Vec<Session>,
    /// Sessions existing (idle or lent).
    open: usize,
}

/// CMK versions as non-extractable AES-256 objects in a PKCS#11 token.
pub struct Pkcs11Custody {
    ctx: Pkcs11,
    slot: Slot,
    label: String,
    pin: AuthPin,
    pool: Mutex<Pool>,
    freed: Condvar,
}

/// Errors after which the session (or the login) is gone: reopen, log in, retry once.
fn session_lost(e: &P11Error) -> bool {
    matches!(
        e,
        P11Error::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::UserNotLoggedIn
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::DeviceError
                | RvError::CryptokiNotInitialized,
            _
        )
    )
}

fn rv(e: &P11Error) -> String {
    match e {
        P11Error::Pkcs11(rv, f) => format!("{f}: {rv:?}"),
        other => other.to_string(),
    }
}

/// Label of the canary: a private data object made at the first start on a token. While it
/// is visible, the token shows this login its objects, and an object not found is gone.
const CANARY_LABEL: &str = "cryptvol canary (do not delete)";

fn canary_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Label(CANARY_LABEL.as_bytes().to_vec()),
    ]
}

/// `C_FindObjects`, where "nothing found" is believed only from a session logged in as the
/// user that still sees the canary. Private objects are invisible without the login, and a
/// token removed or reset under a live session may answer every search with nothing: either
/// would otherwise make every key look destroyed, and a destroy succeed while the objects
/// remain. A lost login is `CKR_USER_NOT_LOGGED_IN`, a missing canary
/// `CKR_TOKEN_NOT_PRESENT`: the caller reopens, logs in again and retries once, then fails
/// with a token error (never "destroyed").
fn find_logged_in(s: &Session, template: &[Attribute]) -> Result<Vec<ObjectHandle>, P11Error> {
    let found = s.find_objects(template)?;
    if found.is_empty() {
        if !matches!(
            s.get_session_info()?.session_state(),
            SessionState::RwUser | SessionState::RoUser
        ) {
            return Err(P11Error::Pkcs11(
                RvError::UserNotLoggedIn,
                Function::FindObjects,
            ));
        }
        if s.find_objects(&canary_template())?.is_empty() {
            return Err(P11Error::Pkcs11(
                RvError::TokenNotPresent,
                Function::FindObjects,
            ));
        }
    }
    Ok(found)
}

/// Random bytes in each object's id: an object left over by a generation whose record was
/// never written (a crash, a full disk) never collides with the retry's, nor do two hosts
/// that rotate the same key apart.
const OBJECT_NONCE: usize = 8;

/// The label of a version's object, which is also the key store's entry for the version:
/// `cryptvol/<key id>/v<version>/<hex nonce>`.
fn object_label(key_id: Uuid, version: u32, nonce: &[u8; OBJECT_NONCE]) -> String {
    format!("cryptvol/{key_id}/v{version}/{}", hex::encode(nonce))
}

/// `CKA_ID` of a version's object from its entry: key id (16 bytes) || version (u32 BE) ||
/// nonce (8 bytes). An entry that does not name this key and version is refused, so a record
/// edited to point at another key's object does not reach it.
fn object_id(key_id: Uuid, version: u32, entry: &str) -> Result<Vec<u8>, KmsError> {
    let nonce = entry
        .strip_prefix(&format!("cryptvol/{key_id}/v{version}/"))
        .and_then(|h| hex::decode(h).ok())
        .filter(|n| n.len() == OBJECT_NONCE)
        .ok_or_else(|| {
            KmsError::Internal(format!(
                "key store entry of key {key_id} version {version} does not name its token \
                 object"
            ))
        })?;
    let mut id = material_aad(key_id, version);
    id.extend_from_slice(&nonce);
    Ok(id)
}

impl Pkcs11Custody {
    /// Loads the module, finds the token by label, checks it offers AES key generation and
    /// AES-GCM, and logs in: every failure names the `[kms]` key and the problem.
    pub fn open(s: Pkcs11Settings) -> Result<Pkcs11Custody, CustodyOpenError> {
        let ctx = Pkcs11::new(&s.module).map_err(|e| {
            open_err(
                "module",
                format!("cannot load PKCS#11 module {}: {e}", s.module.display()),
            )
        })?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| {
                open_err(
                    "module",
                    format!("{}: C_Initialize failed: {}", s.module.display(), rv(&e)),
                )
            })?;
        let slots = ctx
            .get_slots_with_token()
            .map_err(|e| open_err("module", format!("listing slots: {}", rv(&e))))?;
        let mut labels = Vec::new();
        let mut found = None;
        for slot in slots {
            if let Ok(info) = ctx.get_token_info(slot) {
                let l = info.label().trim_end().to_owned();
                if l == s.token_label && found.is_none() {
                    found = Some(slot);
                }
                labels.push(l);
            }
        }
        let slot = found.ok_or_else(|| {
            open_err(
                "token_label",
                format!(
                    "no token labelled {:?} in {} (tokens: {:?})",
                    s.token_label,
                    s.module.display(),
                    labels
                ),
            )
        })?;
        for (m, name) in [
            (MechanismType::AES_GCM, "CKM_AES_GCM"),
            (MechanismType::AES_KEY_GEN, "CKM_AES_KEY_GEN"),
        ] {
            let offered = match ctx.get_mechanism_info(slot, m) {
                Ok(i) if m == MechanismType::AES_KEY_GEN => i.generate(),
                Ok(i) => i.encrypt() && i.decrypt(),
                Err(_) => false,
            };
            if !offered {
                return Err(open_err(
                    "token_label",
                    format!("token {:?} does not offer {name}", s.token_label),
                ));
            }
        }
        let c = Pkcs11Custody {
            ctx,
            slot,
            label: s.token_label,
            pin: s.pin,
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
        };
        let session = c.take().map_err(|e| {
            let key = match &e {
                KmsError::Hsm(m) if m.contains("login") => s.pin_key,
                _ => "token_label",
            };
            open_err(key, e.to_string())
        })?;
        // The canary: made once per token (at the first start on it), kept thereafter.
        let canary = session
            .find_objects(&canary_template())
            .and_then(|v| match v.is_empty() {
                true => {
                    let mut t = canary_template();
                    t.push(Attribute::Application(b"cryptvol".to_vec()));
                    t.push(Attribute::Value(
                        b"cryptvol: CMKs live in this token".to_vec(),
                    ));
                    session.create_object(&t).map(|_| ())
                }
                false => Ok(()),
            });
        c.give_back(session, true);
        canary.map_err(|e| {
            open_err(
                "token_label",
                format!("token {:?}: canary object: {}", c.label, rv(&e)),
            )
        })?;
        Ok(c)
    }

    pub fn token_label(&self) -> &str {
        &self.label
    }

    /// A new read-write session, logged in as the user.
    fn new_session(&self) -> Result<Session, KmsError> {
        let s = self.ctx.open_rw_session(self.slot).map_err(|e| {
            KmsError::Hsm(format!(
                "token {:?}: cannot open a session: {}",
                self.label,
                rv(&e)
            ))
        })?;
        match s.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(s),
            Err(e) => Err(KmsError::Hsm(format!(
                "token {:?}: login refused (wrong PIN?): {}",
                self.label,
                rv(&e)
            ))),
        }
    }

    /// Borrows a session: an idle one, a new one while fewer than [`MAX_SESSIONS`] exist,
    /// else waits at most [`SESSION_WAIT`].
    fn take(&self) -> Result<Session, KmsError> {
        let deadline = Instant::now() + SESSION_WAIT;
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(s) = p.idle.pop() {
                return Ok(s);
            }
            if p.open < MAX_SESSIONS {
                p.open += 1;
                drop(p);
                return self.new_session().inspect_err(|_| {
                    let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
                    p.open = p.open.saturating_sub(1);
                    self.freed.notify_one();
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(KmsError::Hsm(format!(
                    "token {:?}: no PKCS#11 session free within {} s (HSM busy or hung)",
                    self.label,
                    SESSION_WAIT.as_secs()
                )));
            }
            p = self
                .freed
                .wait_timeout(p, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Returns a session to the pool, or closes it (`keep = false`, e.g. after it was lost).
    fn give_back(&self, s: Session, keep: bool) {
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if keep {
            p.idle.push(s);
        } else {
            p.open = p.open.saturating_sub(1);
            drop(p);
            drop(s);
        }
        self.freed.notify_one();
    }

    /// Runs `f` on a pooled session; if the token dropped the session or the login, opens a
    /// new session, logs in again and retries once.
    fn with_session<T>(
        &self,
        mut f: impl FnMut(&Session) -> Result<T, P11Error>,
        map: impl Fn(P11Error) -> KmsError,
    ) -> Result<T, KmsError> {
        let s = self.take()?;
        match f(&s) {
            Ok(t) => {
                self.give_back(s, true);
                Ok(t)
            }
            Err(e) if session_lost(&e) => {
                tracing::warn!(token = %self.label, error = %rv(&e), "PKCS#11 session lost; logging in again");
                // What dropped this session or the login (a token restart, a logout) dropped
                // the idle ones too: close them all, so the retry opens and logs in afresh.
                self.give_back(s, false);
                let idle = {
                    let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
                    let idle = std::mem::take(&mut p.idle);
                    p.open = p.open.saturating_sub(idle.len());
                    idle
                };
                drop(idle);
                let s = self.take()?;
                let r = f(&s);
                let keep = !matches!(&r, Err(e) if session_lost(e));
                self.give_back(s, keep);
                r.map_err(map)
            }
            Err(e) => {
                self.give_back(s, true);
                Err(map(e))
            }
        }
    }

    fn hsm_err(&self, what: &str) -> impl Fn(P11Error) -> KmsError + '_ {
        let what = what.to_owned();
        move |e| KmsError::Hsm(format!("token {:?}: {what}: {}", self.label, rv(&e)))
    }

    /// The token object of a version: exactly one AES secret key with its `CKA_ID`, sensitive
    /// and not extractable (anything else is refused, never used).
    fn find(s: &Session, id: &[u8]) -> Result<Found, P11Error> {
        let objs = find_logged_in(
            s,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(true),
                Attribute::Id(id.to_vec()),
            ],
        )?;
        let [h] = objs[..] else {
            return Ok(if objs.is_empty() {
                Found::Gone
            } else {
                Found::Ambiguous(objs.len())
            });
        };
        let attrs = s.get_attributes(
            h,
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::ValueLen,
            ],
        )?;
        let mut ok = 0;
        for a in attrs {
            match a {
                Attribute::Sensitive(true) | Attribute::Extractable(false) => ok += 1,
                Attribute::ValueLen(n) if u64::from(n) == 32 => ok += 1,
                _ => {}
            }
        }
        Ok(if ok == 3 {
            Found::One(h)
        } else {
            Found::Unsafe
        })
    }

    fn object(
        &self,
        s: &Session,
        key_id: Uuid,
        version: u32,
        id: &[u8],
    ) -> Result<ObjectHandle, OpError> {
        match Self::find(s, id).map_err(OpError::P11)? {
            Found::One(h) => Ok(h),
            Found::Gone => Err(OpError::Kms(KmsError::KeyState(format!(
                "key {key_id} version {version} has no object in token {:?}: key destroyed, \
                 data under it is unrecoverable",
                self.label
            )))),
            Found::Ambiguous(n) => Err(OpError::Kms(KmsError::Hsm(format!(
                "token {:?} holds {n} objects for key {key_id} version {version}; refusing to \
                 choose",
                self.label
            )))),
            Found::Unsafe => Err(OpError::Kms(KmsError::Hsm(format!(
                "token {:?}: the object of key {key_id} version {version} is not a sensitive, \
                 non-extractable AES-256 key; refusing to use it",
                self.label
            )))),
        }
    }

    /// Runs a data operation on a version's object; KMS errors pass through, PKCS#11 errors
    /// go through `map`.
    fn on_object<T>(
        &self,
        key_id: Uuid,
        version: u32,
        entry: &str,
        what: &str,
        mut f: impl FnMut(&Session, ObjectHandle) -> Result<T, P11Error>,
        map: impl Fn(P11Error) -> KmsError,
    ) -> Result<T, KmsError> {
        let id = object_id(key_id, version, entry)?;
        let mut kms_err = None;
        let r = self.with_session(
            |s| match self.object(s, key_id, version, &id) {
                Ok(h) => f(s, h).map(Some),
                Err(OpError::P11(e)) => Err(e),
                Err(OpError::Kms(e)) => {
                    kms_err = Some(e);
                    Ok(None)
                }
            },
            |e| match e {
                P11Error::Pkcs11(..) if !session_lost(&e) => map(e),
                e => self.hsm_err(what)(e),
            },
        )?;
        match (r, kms_err) {
            (Some(t), _) => Ok(t),
            (None, Some(e)) => Err(e),
            (None, None) => Err(KmsError::Internal("no result".into())),
        }
    }

    /// Ends the login of this process (every session): the next operation logs in again.
    pub fn logout(&self) -> Result<(), KmsError> {
        self.with_session(|s| s.logout(), self.hsm_err("logout"))
    }
}

enum Found {
    One(ObjectHandle),
    Gone,
    Ambiguous(usize),
    Unsafe,
}

enum OpError {
    P11(P11Error),
    Kms(KmsError),
}

impl Custody for Pkcs11Custody {
    fn kind(&self) -> CustodyKind {
        CustodyKind::Pkcs11
    }

    fn generate_version(&self, key_id: Uuid, version: u32) -> Result<String, KmsError> {
        let mut nonce = [0u8; OBJECT_NONCE];
        crypto::random(&mut nonce)?;
        let label = object_label(key_id, version, &nonce);
        let id = object_id(key_id, version, &label)?;
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::Label(label.clone().into_bytes()),
            Attribute::Id(id),
        ];
        self.with_session(
            |s| s.generate_key(&Mechanism::AesKeyGen, &template),
            self.hsm_err("generating an AES-256 key"),
        )?;
        Ok(label)
    }

    fn wrap(
        &self,
        key_id: Uuid,
        version: u32,
        entry: &str,
        plain: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<Vec<u8>, KmsError> {
        let mut salt = [0u8; 32];
        let mut nonce = [0u8; 12];
        crypto::random(&mut salt)?;
        crypto::random(&mut nonce)?;
        let mut blob = wrap::header(wrap::ALG_PKCS11_AES256GCM, key_id, version, &salt, &nonce);
        let mut aad = blob.clone();
        aad.extend_from_slice(&wrap::canonical_context(ctx));
        let out = self.on_object(
            key_id,
            version,
            entry,
            "AES-GCM encrypt",
            |s, h| {
                let mut iv = nonce;
                let params = GcmParams::new(&mut iv, &aad, (TAG_LEN as u64 * 8).into())?;
                s.encrypt(&Mechanism::AesGcm(params), h, plain)
            },
            self.hsm_err("AES-GCM encrypt"),
        )?;
        if out.len() != plain.len() + TAG_LEN {
            return Err(KmsError::Hsm(format!(
                "token {:?}: AES-GCM returned {} bytes for {} (a token that picks its own IV is \
                 not supported)",
                self.label,
                out.len(),
                plain.len()
            )));
        }
        blob.extend_from_slice(&out);
        Ok(blob)
    }

    fn unwrap(
        &self,
        key_id: Uuid,
        version: u32,
        entry: &str,
        blob: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<Secret, KmsError> {
        let h = wrap::parse(blob)?;
        if h.alg != wrap::ALG_PKCS11_AES256GCM || h.key_id != key_id || h.key_version != version {
            return Err(KmsError::InvalidCiphertext(
                "cipher text is not of this key's custody".into(),
            ));
        }
        let mut aad = blob[..wrap::HEADER_LEN].to_vec();
        aad.extend_from_slice(&wrap::canonical_context(ctx));
        let nonce: [u8; 12] = blob[58..70].try_into().expect("12 bytes");
        let plain = self.on_object(
            key_id,
            version,
            entry,
            "AES-GCM decrypt",
            |s, o| {
                let mut iv = nonce;
                let params = GcmParams::new(&mut iv, &aad, (TAG_LEN as u64 * 8).into())?;
                s.decrypt(&Mechanism::AesGcm(params), o, &blob[wrap::HEADER_LEN..])
            },
            |_| {
                KmsError::InvalidCiphertext(
                    "cipher text does not decrypt under this key and encryption context".into(),
                )
            },
        )?;
        Ok(Secret::new(plain))
    }

    fn destroy(&self, key_id: Uuid, version: u32, entry: &str) -> Result<(), KmsError> {
        let id = object_id(key_id, version, entry)?;
        self.with_session(
            |s| {
                // Every object with this id, whatever its attributes: none may survive.
                for h in find_logged_in(s, &[Attribute::Token(true), Attribute::Id(id.clone())])? {
                    match s.destroy_object(h) {
                        Ok(()) | Err(P11Error::Pkcs11(RvError::ObjectHandleInvalid, _)) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            },
            self.hsm_err("C_DestroyObject"),
        )
    }

    fn present(&self, key_id: Uuid, version: u32, entry: &str) -> Result<bool, KmsError> {
        let id = object_id(key_id, version, entry)?;
        self.with_session(
            |s| Ok(!matches!(Self::find(s, &id)?, Found::Gone)),
            self.hsm_err("find"),
        )
    }
}
