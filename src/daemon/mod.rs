//! The daemon: joins the key manager, the volumes and the NBD server. Holds the attached set,
//! implements every volume operation (the API layer only maps HTTP to these calls), and runs
//! the lifecycle (`run`): config -> state -> restore attachments -> serve; signals; sd_notify.

pub mod access;
mod cache;
#[cfg(feature = "rbd")]
mod ceph;
#[cfg(not(feature = "rbd"))]
#[path = "ceph_stub.rs"]
mod ceph;
pub mod ceph_kms;
pub mod exports;
mod metrics;
pub mod migrate;
mod qos;
mod rbd_snapshots;
#[cfg(feature = "rbd")]
mod reach;
mod reencrypt;
mod retry;
mod run;
mod snapshots;
mod state;
mod sys;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;
use uuid::Uuid;

use crate::config::CephConfig;
pub use crate::config::StoreKind;
use crate::kms::{Caller, EncryptionContext, KeyState, Kms, KmsError};
use crate::server::{Qos, QosLimits};
use crate::volume::{
    CIPHER_NAME, CacheMode, CipherBackend, Volume, VolumeError, VolumeHeader, XtsKey,
};
use exports::{Attached, Exports, Fence, VolumeBackend};
pub use reencrypt::{ReencInfo, ReencRequest};
pub use run::{Running, demo, init_state_dir, serve};
pub use snapshots::SnapshotInfo;
use state::{AttachState, Registered, Registry};

/// The alias of the key used when a volume is created without `--key`.
pub const DEFAULT_KEY_ALIAS: &str = "cryptvol/default";

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Kms(#[from] KmsError),
    #[error("volume {0}: {1}")]
    Volume(String, VolumeError),
    #[error("no volume named {0:?}")]
    NoVolume(String),
    #[error("volume {0:?} already exists")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    /// The backing file is not the volume the daemon knows under that name (swapped, rolled
    /// back, or its header disagrees with its wrapped key).
    #[error("{0}")]
    Untrusted(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The Ceph cluster could not be reached or refused an operation.
    #[error("{0}")]
    Cluster(String),
    /// Not (yet) possible for this kind of volume (e.g. snapshots of RBD volumes).
    #[error("{0}")]
    Unsupported(String),
}

impl DaemonError {
    pub fn error_code(&self) -> &'static str {
        match self {
            DaemonError::Kms(e) => e.error_code(),
            DaemonError::Volume(..) => "VOL.0500",
            DaemonError::NoVolume(_) => "VOL.0404",
            DaemonError::Exists(_) => "VOL.0409",
            DaemonError::Invalid(_) => "VOL.0400",
            DaemonError::Conflict(_) => "VOL.0410",
            DaemonError::Untrusted(_) => "VOL.0422",
            DaemonError::Io(_) => "VOL.0501",
            DaemonError::Cluster(_) => "VOL.0503",
            DaemonError::Unsupported(_) => "VOL.0405",
        }
    }
    pub fn http_status(&self) -> u16 {
        match self {
            DaemonError::Kms(e) => e.http_status(),
            DaemonError::Volume(_, VolumeError::BadHeader(_) | VolumeError::BadKey(_)) => 422,
            DaemonError::Volume(..) | DaemonError::Io(_) => 500,
            DaemonError::NoVolume(_) => 404,
            DaemonError::Exists(_) | DaemonError::Conflict(_) => 409,
            DaemonError::Invalid(_) => 400,
            DaemonError::Untrusted(_) => 422,
            DaemonError::Cluster(_) => 503,
            DaemonError::Unsupported(_) => 501,
        }
    }
}

/// What `volume inspect` / `volume list` show (SPEC §1 field names).
#[derive(Debug, Clone, Serialize)]
pub struct VolumeInfo {
    pub name: String,
    pub volume_id: String,
    pub size: u64,
    pub sector_size: u32,
    pub cipher: String,
    pub key_id: String,
    pub key_version: u32,
    pub cipher_text: String,
    pub data_offset: u64,
    /// All-zero plaintext stored encrypted (header flag) rather than as zeros (thin).
    pub encrypt_zeroes: bool,
    /// `file:` a volume file in the state dir; `rbd`: an image in the Ceph cluster.
    pub store: String,
    /// The volume file, or `rbd:POOL/IMAGE`.
    pub path: String,
    /// RBD volumes: who holds the image's exclusive lock (attached read-write), e.g.
    /// `cryptvol-a@host1 (ADDRESS)`; `null` when nobody does, and for file volumes.
    pub holder: Option<String>,
    pub attached: bool,
    pub read_only: bool,
    pub clients: usize,
    /// "ok", "unrecoverable: key destroyed", "fenced: lock taken over by <holder>" or
    /// "failed: <reason>".
    pub status: String,
    /// Per-volume limits (SPEC §9; 0 = unlimited).
    pub qos: QosLimits,
    /// `writeback` or `none` (O_DIRECT), SPEC §9; a change takes effect at the next attach.
    pub cache: CacheMode,
    /// An online re-encryption in progress (or done since the daemon started).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reencrypt: Option<ReencInfo>,
}

pub struct Daemon {
    pub kms: Kms,
    pub exports: Arc<Exports>,
    state_dir: PathBuf,
    attach_state: std::sync::Mutex<AttachState>,
    /// Serialises volume operations (create/attach/detach/resize/rewrap/delete).
    ops: std::sync::Mutex<()>,
    /// Volumes that failed to attach at start-up, with the reason.
    failed: std::sync::Mutex<BTreeMap<String, String>>,
    /// name -> volume id, key, header generation: what the backing files must hold.
    registry: std::sync::Mutex<Registry>,
    /// Names held by an import in progress: not attachable, deletable or creatable.
    importing: std::sync::Mutex<BTreeSet<String>>,
    /// `[ceph]`: RBD volumes.
    ceph: Option<ceph::Ceph>,
    /// `[volumes] store`.
    default_store: StoreKind,
    /// RBD volumes whose lock another host took over while attached here, with why.
    fenced: std::sync::Mutex<BTreeMap<String, String>>,
    /// Fence reports from the backends (volume name, backend id) and their receiver, taken
    /// by [`Daemon::start_fence_worker`].
    fence_tx: std::sync::Mutex<std::sync::mpsc::Sender<(String, usize)>>,
    fence_rx: std::sync::Mutex<Option<std::sync::mpsc::Receiver<(String, usize)>>>,
    /// Snapshots in the making and snapshots held by a clone (`snapshots.rs`).
    snaps: snapshots::Snapshots,
    /// Online re-encryption workers.
    reenc: reencrypt::Jobs,
}

/// Where a volume's bytes are.
#[derive(Clone, Debug)]
enum Loc {
    File(PathBuf),
    /// Image `cryptvol.NAME` in this pool.
    Rbd(String),
}

impl Loc {
    fn describe(&self, name: &str) -> String {
        match self {
            Loc::File(p) => p.display().to_string(),
            Loc::Rbd(pool) => format!("rbd:{pool}/{}", ceph::image_name(name)),
        }
    }
    fn pool(&self) -> Option<&str> {
        match self {
            Loc::File(_) => None,
            Loc::Rbd(p) => Some(p),
        }
    }
    fn store(&self) -> StoreKind {
        match self {
            Loc::File(_) => StoreKind::File,
            Loc::Rbd(_) => StoreKind::Rbd,
        }
    }
}

impl VolumeInfo {
    /// What the header says, named `name`, at `path`, in `store`; not attached, status ok,
    /// default settings: the caller fills in the rest.
    fn from_header(name: &str, h: &VolumeHeader, store: &str, path: String) -> VolumeInfo {
        VolumeInfo {
            name: name.to_owned(),
            volume_id: h.volume_id.to_string(),
            size: h.size,
            sector_size: h.sector_size,
            cipher: CIPHER_NAME.into(),
            key_id: h.key_id.clone(),
            key_version: h.key_version,
            cipher_text: hex::encode(&h.wrapped_dek),
            data_offset: h.data_offset,
            encrypt_zeroes: h.encrypt_zeroes(),
            store: store.into(),
            path,
            holder: None,
            attached: false,
            read_only: false,
            clients: 0,
            status: "ok".into(),
            qos: QosLimits::default(),
            cache: CacheMode::default(),
            reencrypt: None,
        }
    }
}

/// What `volume create` makes.
pub struct NewVolume<'a> {
    pub size: u64,
    pub sector_size: u32,
    pub key: Option<&'a str>,
    pub encrypt_zeroes: bool,
    /// `None`: `[volumes] store`.
    pub store: Option<StoreKind>,
    /// RBD only; `None`: `[ceph] pool`.
    pub pool: Option<&'a str>,
    /// QoS limits (0 = unlimited), kept by this host under the volume id.
    pub qos: QosLimits,
    /// Cache mode (file volumes), kept beside the limits.
    pub cache: CacheMode,
}

/// Holds a volume name for an import; released on drop (success, error or panic).
struct Reservation<'a> {
    d: &'a Daemon,
    name: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.d
            .importing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.name);
    }
}

/// Prefix of the temporary file a volume is built in before it is renamed into place.
const TEMP_MARK: &str = ".tmp-";

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .enumerate()
            .all(|(i, c)| c.is_ascii_alphanumeric() || (i > 0 && b"._-".contains(&c)))
}

fn registered(h: &VolumeHeader, pool: Option<&str>) -> Registered {
    Registered {
        volume_id: h.volume_id,
        key_id: h.key_id.clone(),
        generation: h.generation,
        pool: pool.map(str::to_owned),
        next_key_id: h.reencrypt.as_ref().map(|r| r.new_key_id.clone()),
    }
}

fn encrypt_zeroes_needs_4k(encrypt_zeroes: bool, sector_size: u32) -> bool {
    encrypt_zeroes && sector_size < 4096
}

fn volume_context(id: Uuid) -> EncryptionContext {
    [("volume_id".to_string(), id.to_string())].into()
}

/// Parses sizes like `10G`, `512M`, `4096`, `1T`, `64K` (binary units).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        (i, 'T' | 't') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

impl Daemon {
    pub fn new(
        state_dir: &Path,
        kms: Kms,
        max_per_export: usize,
        policy: access::ClientPolicy,
    ) -> Result<Daemon, DaemonError> {
        Self::with_stores(
            state_dir,
            kms,
            max_per_export,
            policy,
            None,
            StoreKind::File,
        )
    }

    /// [`Daemon::new`] with `[ceph]` (RBD volumes) and `[volumes] store`. Nothing connects
    /// to the cluster here: a cluster down at start leaves file volumes working.
    pub fn with_stores(
        state_dir: &Path,
        kms: Kms,
        max_per_export: usize,
        policy: access::ClientPolicy,
        ceph_cfg: Option<&CephConfig>,
        default_store: StoreKind,
    ) -> Result<Daemon, DaemonError> {
        if default_store == StoreKind::Rbd && ceph_cfg.is_none() {
            return Err(DaemonError::Invalid(
                "[volumes] store = \"rbd\" needs [ceph]".into(),
            ));
        }
        let (fence_tx, fence_rx) = std::sync::mpsc::channel();
        let vols = state_dir.join("volumes");
        std::fs::create_dir_all(&vols)?;
        let attach_state = AttachState::load(state_dir)?;
        // Volumes half-created or half-imported when the daemon last stopped: only ever ours.
        for e in std::fs::read_dir(&vols)?.flatten() {
            let n = e.file_name();
            if n.to_str()
                .is_some_and(|n| n.starts_with('.') && n.contains(TEMP_MARK))
            {
                tracing::warn!(file = %e.path().display(), "removing an unfinished volume");
                std::fs::remove_file(e.path())?;
            }
        }
        let instance = match ceph_cfg {
            Some(_) => {
                let id = state::instance_id(state_dir)?;
                tracing::info!(instance = %id, "RBD imports are built in cryptvol-tmp.{id}.* images");
                id
            }
            None => String::new(),
        };
        let fresh_registry = Registry::load(state_dir)?;
        let migrate = fresh_registry.is_none();
        let d = Daemon {
            kms,
            exports: Arc::new(Exports::new(max_per_export, policy)),
            state_dir: state_dir.to_owned(),
            attach_state: std::sync::Mutex::new(attach_state),
            ops: std::sync::Mutex::new(()),
            failed: std::sync::Mutex::new(BTreeMap::new()),
            registry: std::sync::Mutex::new(fresh_registry.unwrap_or_default()),
            importing: std::sync::Mutex::new(BTreeSet::new()),
            ceph: ceph_cfg.map(|c| ceph::Ceph::new(c, &instance)),
            default_store,
            fenced: std::sync::Mutex::new(BTreeMap::new()),
            fence_tx: std::sync::Mutex::new(fence_tx),
            fence_rx: std::sync::Mutex::new(Some(fence_rx)),
            snaps: Default::default(),
            reenc: reencrypt::Jobs::default(),
        };
        if migrate {
            d.adopt_existing()?;
        }
        d.forget_missing_snapshots()?;
        Ok(d)
    }

    /// A state dir from before the registry: every volume file is registered as it is found,
    /// except volume ids held by more than one file (a copy): none of those is trusted.
    fn adopt_existing(&self) -> Result<(), DaemonError> {
        let mut by_id: BTreeMap<Uuid, Vec<(String, VolumeHeader)>> = BTreeMap::new();
        for name in self.volume_names()? {
            match Volume::read_header(&self.path(&name)?) {
                Ok(h) => by_id.entry(h.volume_id).or_default().push((name, h)),
                Err(e) => tracing::warn!(volume = %name, error = %e, "not registered"),
            }
        }
        let mut reg = self.registry();
        for (id, names) in by_id {
            if let [(name, h)] = names.as_slice() {
                reg.insert(name, registered(h, None));
            } else {
                let all: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
                tracing::error!(volume_id = %id, names = ?all, "volume id held by several files: none registered");
            }
        }
        reg.save(&self.state_dir)?;
        Ok(())
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Names of the volume files in `volumes/`, sorted.
    fn volume_names(&self) -> Result<Vec<String>, DaemonError> {
        let mut names: Vec<String> = std::fs::read_dir(self.state_dir.join("volumes"))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".cvol")
                    .filter(|n| valid_name(n))
                    .map(str::to_owned)
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// Reads NAME's header (a file volume's file, or an RBD image through the control
    /// session, with the image's lock holder) and checks it ([`Daemon::check_trusted`]).
    fn trusted_header(
        &self,
        name: &str,
        loc: &Loc,
    ) -> Result<(VolumeHeader, Option<String>), DaemonError> {
        let (h, holder) = match loc {
            Loc::File(path) => (
                Volume::read_header(path).map_err(Self::vol_err(name))?,
                None,
            ),
            Loc::Rbd(pool) => {
                let p = self.ceph()?.peek(pool, name)?;
                (p.header, p.holder)
            }
        };
        self.check_trusted(name, loc, &h)?;
        Ok((h, holder))
    }

    /// Checks a header of NAME against what the daemon trusts: the header names the key that
    /// really wrapped its DEK (the blob's own header is authenticated at unwrap), the file or
    /// image holds the volume registered under NAME (a copied or restored one of another
    /// volume is refused, naming both ids), and its header is not older than the newest this
    /// daemon saw. An unregistered volume whose id no other name holds is registered (a file
    /// the daemon did not create, or an RBD volume another host created).
    fn check_trusted(&self, name: &str, loc: &Loc, h: &VolumeHeader) -> Result<(), DaemonError> {
        let w = crate::kms::wrap::parse(&h.wrapped_dek)?;
        if w.key_id.to_string() != h.key_id || w.key_version != h.key_version {
            return Err(DaemonError::Untrusted(format!(
                "volume {name:?}: the header names key {} version {}, but its data key is wrapped under key {} version {}",
                h.key_id, h.key_version, w.key_id, w.key_version
            )));
        }
        reencrypt::check_new_key(name, h)?;
        let place = loc.describe(name);
        let mut reg = self.registry();
        match reg.get(name).cloned() {
            Some(r) if r.volume_id != h.volume_id => Err(DaemonError::Untrusted(format!(
                "volume {name:?} is volume_id {}, but its backing store {place} holds volume_id {}: refused",
                r.volume_id, h.volume_id
            ))),
            Some(r) if r.key_id != h.key_id && r.next_key_id.as_ref() != Some(&h.key_id) => {
                Err(DaemonError::Untrusted(format!(
                    "volume {name:?} is under key {}, but the header in {place} names key {}: refused",
                    r.key_id, h.key_id
                )))
            }
            Some(r) if h.generation < r.generation => Err(DaemonError::Untrusted(format!(
                "volume {name:?}: the header in {place} is generation {}, older than generation {} written before (rolled back): refused",
                h.generation, r.generation
            ))),
            Some(r) => {
                if h.generation > r.generation
                    || r.pool.as_deref() != loc.pool()
                    || r.key_id != h.key_id
                {
                    reg.insert(name, registered(h, loc.pool()));
                    reg.save(&self.state_dir)?;
                }
                Ok(())
            }
            None => {
                if let Some(other) = reg.owner_of(h.volume_id, name) {
                    return Err(DaemonError::Untrusted(format!(
                        "{place} (volume {name:?}) holds volume_id {}, which is volume {other:?}: two names never share a volume",
                        h.volume_id
                    )));
                }
                tracing::warn!(volume = name, volume_id = %h.volume_id, store = %place, "registering a volume this daemon did not create");
                reg.insert(name, registered(h, loc.pool()));
                reg.save(&self.state_dir)?;
                Ok(())
            }
        }
    }

    fn ceph(&self) -> Result<&ceph::Ceph, DaemonError> {
        self.ceph.as_ref().ok_or_else(|| {
            DaemonError::Invalid("RBD volumes need a [ceph] section in the config".into())
        })
    }

    /// Where NAME lives: its volume file if there is one, else the RBD image (the pool this
    /// host registered it in, or `[ceph] pool`).
    fn locate(&self, name: &str) -> Result<Loc, DaemonError> {
        let p = self.existing_or_missing(name)?;
        if p.exists() {
            return Ok(Loc::File(p));
        }
        if let Some(pool) = self.registry().get(name).and_then(|r| r.pool.clone()) {
            return Ok(Loc::Rbd(pool));
        }
        match &self.ceph {
            Some(c) => Ok(Loc::Rbd(c.pool().to_owned())),
            None => Err(DaemonError::NoVolume(name.to_owned())),
        }
    }

    /// Records a header the daemon just wrote for NAME.
    fn register(
        &self,
        name: &str,
        h: &VolumeHeader,
        pool: Option<&str>,
    ) -> Result<(), DaemonError> {
        let mut reg = self.registry();
        reg.insert(name, registered(h, pool));
        reg.save(&self.state_dir)?;
        Ok(())
    }

    fn is_importing(&self, name: &str) -> bool {
        self.importing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(name)
    }

    /// A fresh temporary path in `volumes/` to build NAME in.
    fn temp_path(&self, name: &str) -> PathBuf {
        self.state_dir
            .join("volumes")
            .join(format!(".{name}{TEMP_MARK}{}", Uuid::new_v4().simple()))
    }

    /// Fails unless NAME is free: no volume file, no import in progress.
    /// Fails unless NAME is free: no volume file, no import in progress, no RBD volume of
    /// that name (registered here, or in `[ceph] pool` when the cluster answers).
    fn check_free(&self, name: &str) -> Result<PathBuf, DaemonError> {
        let path = self.path(name)?;
        if path.exists() || self.is_importing(name) || self.registry().get(name).is_some() {
            return Err(DaemonError::Exists(name.to_owned()));
        }
        if let Some(c) = &self.ceph {
            match c.peek(c.pool(), name) {
                Err(DaemonError::NoVolume(_)) => {}
                Err(e @ DaemonError::Cluster(_)) => {
                    tracing::warn!(volume = name, error = %e, "cannot check the cluster for an RBD volume of this name");
                }
                _ => return Err(DaemonError::Exists(name.to_owned())),
            }
        }
        Ok(path)
    }

    /// A new volume's header: a 512-bit DEK made by the KMS, bound to a fresh volume id.
    fn new_header(
        &self,
        c: &Caller,
        size: u64,
        sector_size: u32,
        key: Option<&str>,
    ) -> Result<VolumeHeader, DaemonError> {
        if sector_size != 512 && sector_size != 4096 {
            return Err(DaemonError::Invalid(
                "sector size must be 512 or 4096".into(),
            ));
        }
        if size == 0 || !size.is_multiple_of(u64::from(sector_size)) {
            return Err(DaemonError::Invalid(format!(
                "size must be a positive multiple of {sector_size}"
            )));
        }
        let key = self.resolve_key(c, key)?;
        let id = Uuid::new_v4();
        let wrapped =
            self.kms
                .create_datakey_without_plaintext(c, &key, 512, &volume_context(id))?;
        let h = crate::kms::wrap::parse(&wrapped)?;
        VolumeHeader::new(
            id,
            size,
            sector_size,
            &h.key_id.to_string(),
            h.key_version,
            wrapped,
        )
        .map_err(|e| match e {
            VolumeError::BadHeader(why) => DaemonError::Invalid(why.to_owned()),
            e => DaemonError::Volume(String::new(), e),
        })
    }

    /// Moves a finished volume file from `tmp` to NAME (never over an existing file) and
    /// registers it. Caller holds the ops lock.
    fn commit_new(&self, name: &str, tmp: &Path, h: &VolumeHeader) -> Result<(), DaemonError> {
        let path = self.path(name)?;
        sys::rename_noreplace(tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(tmp);
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                DaemonError::Exists(name.to_owned())
            } else {
                e.into()
            }
        })?;
        self.register(name, h, None)
    }

    fn lock_ops(&self) -> std::sync::MutexGuard<'_, ()> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, name: &str) -> Result<PathBuf, DaemonError> {
        if !valid_name(name) {
            return Err(DaemonError::Invalid(format!(
                "volume name {name:?} must be 1..64 of [A-Za-z0-9._-], starting with a letter or digit"
            )));
        }
        Ok(self.state_dir.join("volumes").join(format!("{name}.cvol")))
    }

    /// NAME's file path, refused while an import holds the name.
    fn existing_or_missing(&self, name: &str) -> Result<PathBuf, DaemonError> {
        let p = self.path(name)?;
        if self.is_importing(name) {
            return Err(DaemonError::Conflict(format!(
                "volume {name:?} is being imported"
            )));
        }
        Ok(p)
    }

    fn vol_err(name: &str) -> impl Fn(VolumeError) -> DaemonError + '_ {
        move |e| DaemonError::Volume(name.to_owned(), e)
    }

    /// Resolves the key for a new volume; the default alias is created on first use.
    fn resolve_key(&self, c: &Caller, key: Option<&str>) -> Result<String, DaemonError> {
        match key {
            Some(k) => Ok(k.to_owned()),
            None => match self.kms.describe_key(c, DEFAULT_KEY_ALIAS) {
                Ok(m) => Ok(m.key_id),
                Err(KmsError::NotFound(_)) => Ok(self
                    .kms
                    .create_key(
                        c,
                        DEFAULT_KEY_ALIAS,
                        "default master key for cryptvol volumes",
                    )?
                    .key_id),
                Err(e) => Err(e.into()),
            },
        }
    }

    /// create: a 512-bit DEK bound to the new volume's id, header written, data area sparse.
    pub fn create_volume(
        &self,
        c: &Caller,
        name: &str,
        size: u64,
        sector_size: u32,
        key: Option<&str>,
        encrypt_zeroes: bool,
    ) -> Result<VolumeInfo, DaemonError> {
        self.create(
            c,
            name,
            &NewVolume {
                size,
                sector_size,
                key,
                encrypt_zeroes,
                store: None,
                pool: None,
                qos: QosLimits::default(),
                cache: CacheMode::default(),
            },
        )
    }

    /// The pool of a new volume (`None`: a file volume).
    fn placement(
        &self,
        store: Option<StoreKind>,
        pool: Option<&str>,
    ) -> Result<Option<String>, DaemonError> {
        match (store.unwrap_or(self.default_store), pool) {
            (StoreKind::File, Some(_)) => Err(DaemonError::Invalid(
                "a pool is for --store rbd only".into(),
            )),
            (StoreKind::File, None) => Ok(None),
            (StoreKind::Rbd, p) => {
                let pool = p.unwrap_or(self.ceph()?.pool()).to_owned();
                if let Some(why) = crate::config::invalid_ceph_name(&pool) {
                    return Err(DaemonError::Invalid(format!("pool {pool:?}: {why}")));
                }
                Ok(Some(pool))
            }
        }
    }

    /// create, in a file or (`store` rbd) an RBD image.
    pub fn create(
        &self,
        c: &Caller,
        name: &str,
        v: &NewVolume<'_>,
    ) -> Result<VolumeInfo, DaemonError> {
        let store = v.store.unwrap_or(self.default_store);
        let pool = self.placement(v.store, v.pool)?;
        let _g = self.lock_ops();
        self.check_free(name)?;
        if encrypt_zeroes_needs_4k(v.encrypt_zeroes, v.sector_size) {
            return Err(DaemonError::Invalid(
                "encrypt_zeroes needs 4096-byte sectors (a 512-byte unit shares its file-system \
                 block with others)"
                    .into(),
            ));
        }
        if v.cache != CacheMode::Writeback && pool.is_some() {
            return Err(cache::rbd_cache());
        }
        if v.encrypt_zeroes && pool.is_some() {
            return Err(DaemonError::Invalid(
                "encrypt_zeroes is for file volumes (an RBD image reports holes per object)".into(),
            ));
        }
        let mut header = self.new_header(c, v.size, v.sector_size, v.key)?;
        if v.encrypt_zeroes {
            header.flags |= crate::volume::header::FLAG_ENCRYPT_ZEROES;
        }
        // Settings first, under the new id: the volume never appears without them.
        let settings = qos::Settings {
            qos: v.qos,
            cache: v.cache,
        };
        self.record_settings(header.volume_id, settings)?;
        let made = if let Some(pool) = &pool {
            // The image appears complete or not at all (removed again on failure).
            self.ceph()
                .and_then(|ceph| ceph.create(pool, name, &header))
                .and_then(|()| self.register(name, &header, Some(pool)))
        } else {
            // Built under a temporary name: a create that fails half-way leaves nothing that
            // blocks the name.
            let tmp = self.temp_path(name);
            match Volume::create(&tmp, &header)
                .map_err(Self::vol_err(name))
                .and_then(|()| cache::check_file(name, &tmp, v.cache))
            {
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    Err(e)
                }
                Ok(()) => self.commit_new(name, &tmp, &header),
            }
        };
        if let Err(e) = made {
            let _ = self.record_settings(header.volume_id, qos::Settings::default());
            return Err(e);
        }
        tracing::info!(volume = name, volume_id = %header.volume_id, size = v.size, store = store.as_str(), "created");
        self.info_locked(name)
    }

    /// import: a raw image stream becomes an encrypted volume; all-zero chunks stay holes.
    /// The volume is built under a temporary name and appears only when complete; while the
    /// import runs its name is held (no create, attach, resize, delete of it).
    pub fn import_volume(
        &self,
        c: &Caller,
        name: &str,
        size: u64,
        key: Option<&str>,
        image: impl Read,
    ) -> Result<VolumeInfo, DaemonError> {
        self.import_to(c, name, size, key, (None, None), image)
    }

    /// import into a file or (`place.0` rbd) an RBD image in pool `place.1`. An RBD import
    /// is built in a temporary image (not listed) renamed into place when complete.
    pub fn import_to(
        &self,
        c: &Caller,
        name: &str,
        size: u64,
        key: Option<&str>,
        place: (Option<StoreKind>, Option<&str>),
        mut image: impl Read,
    ) -> Result<VolumeInfo, DaemonError> {
        let pool = self.placement(place.0, place.1)?;
        let sector = 4096u64;
        let rounded = size
            .checked_next_multiple_of(sector)
            .ok_or_else(|| DaemonError::Invalid("size too large".into()))?
            .max(sector);
        let held = {
            let _g = self.lock_ops();
            self.check_free(name)?;
            self.importing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.to_owned());
            Reservation {
                d: self,
                name: name.to_owned(),
            }
        };
        let header = self.new_header(c, rounded, sector as u32, key)?;
        let tmp = self.temp_path(name);
        let building = match &pool {
            Some(p) => Some(self.ceph()?.create_temp(p, name, &header)?),
            None => None,
        };
        let result = (|| {
            let (_, _, dek) = self.kms.decrypt_datakey(
                c,
                &header.wrapped_dek,
                &volume_context(header.volume_id),
            )?;
            let key = XtsKey::new(dek.expose()).map_err(Self::vol_err(name))?;
            drop(dek);
            let vol = match building.as_ref().and_then(ceph::Building::store) {
                Some(store) => {
                    Volume::open_with_store(Box::new(store), key, false, CipherBackend::default())
                }
                None => {
                    Volume::create(&tmp, &header).map_err(Self::vol_err(name))?;
                    Volume::open(&tmp, key, false)
                }
            }
            .map_err(Self::vol_err(name))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0u64;
            loop {
                let mut n = 0;
                while n < buf.len() {
                    match image.read(&mut buf[n..])? {
                        0 => break,
                        k => n += k,
                    }
                }
                if n == 0 {
                    break;
                }
                if n as u64 > size - off {
                    return Err(DaemonError::Invalid(
                        "image is larger than announced".into(),
                    ));
                }
                if buf[..n].iter().any(|&b| b != 0) {
                    vol.write_mut(off, &mut buf[..n])
                        .map_err(Self::vol_err(name))?;
                }
                off += n as u64;
            }
            if off != size {
                return Err(DaemonError::Invalid(format!(
                    "image ended at {off} bytes, {size} announced"
                )));
            }
            vol.flush().map_err(Self::vol_err(name))?;
            Ok(())
        })();
        if let Err(e) = result {
            // Only the temporary file (image: dropping `building`) is removed: the name was
            // never someone else's.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let g = self.lock_ops();
        match (building, &pool) {
            (Some(b), Some(p)) => {
                self.ceph()?.finish(b, name)?;
                self.register(name, &header, Some(p))?;
            }
            _ => self.commit_new(name, &tmp, &header)?,
        }
        drop(held);
        drop(g);
        tracing::info!(volume = name, volume_id = %header.volume_id, size, "imported");
        self.info_locked(name)
    }

    /// Every file volume of this host and every RBD volume of `[ceph] pool` (and of the
    /// pools this host registered volumes in). With the cluster unreachable, the RBD volumes
    /// this host knows are listed as failed, with the reason; the next call tries again.
    pub fn list_volumes(&self) -> Result<Vec<VolumeInfo>, DaemonError> {
        let mut names: BTreeSet<String> = self.volume_names()?.into_iter().collect();
        let mut cluster_down = None;
        if let Some(c) = &self.ceph {
            match c.list() {
                Ok(v) => names.extend(v),
                Err(e) => cluster_down = Some(e),
            }
        }
        names.extend(self.registry().rbd_names());
        Ok(names
            .iter()
            .map(|n| match &cluster_down {
                Some(e) if !self.path(n).is_ok_and(|p| p.exists()) => self.failed_info(n, e),
                _ => self
                    .info_locked(n)
                    .unwrap_or_else(|e| self.failed_info(n, &e)),
            })
            .collect())
    }

    fn failed_info(&self, name: &str, e: &DaemonError) -> VolumeInfo {
        let loc = self.locate(name).ok();
        let attached = self.exports.get(name);
        let status = match self
            .fenced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            Some(why) if attached.is_none() => format!("fenced: {why}"),
            _ => format!("failed: {e}"),
        };
        VolumeInfo {
            name: name.to_owned(),
            volume_id: String::new(),
            size: 0,
            sector_size: 0,
            cipher: CIPHER_NAME.into(),
            key_id: String::new(),
            key_version: 0,
            cipher_text: String::new(),
            data_offset: 0,
            encrypt_zeroes: false,
            store: loc
                .as_ref()
                .map_or(StoreKind::File, Loc::store)
                .as_str()
                .into(),
            path: loc.map(|l| l.describe(name)).unwrap_or_default(),
            holder: None,
            attached: attached.is_some(),
            read_only: attached.as_ref().is_some_and(|a| a.read_only),
            clients: attached
                .as_ref()
                .map_or(0, |a| a.clients.load(Ordering::SeqCst)),
            status,
            qos: QosLimits::default(),
            cache: CacheMode::default(),
            reencrypt: None,
        }
    }

    pub fn inspect(&self, name: &str) -> Result<VolumeInfo, DaemonError> {
        self.info_locked(name)
    }

    fn info_locked(&self, name: &str) -> Result<VolumeInfo, DaemonError> {
        if name.contains('@') {
            return self.snapshot_volume_info(name);
        }
        let loc = self.locate(name)?;
        let (h, holder) = self.trusted_header(name, &loc)?;
        let settings = self.settings_of(h.volume_id)?;
        let attached = self.exports.get(name);
        // Attached read-write here, but the lock is not this attachment's: another host
        // took it over (seen before any I/O failed).
        let taken = attached.as_ref().and_then(|a| {
            let f = a.backend.1.as_ref()?;
            match holder.as_deref() {
                Some(h) if f.is_holder(h) => None,
                h => Some(h.unwrap_or("another client (lock broken)").to_owned()),
            }
        });
        if let (Some(a), Some(_)) = (&attached, &taken) {
            a.backend
                .report_fenced("the image's lock is held by another client");
        }
        let status = match self.kms.key_state(&h.key_id) {
            Ok((KeyState::Destroyed, _)) => "unrecoverable: key destroyed".to_owned(),
            Ok(_) if taken.is_some() => format!(
                "fenced: lock taken over by {}",
                taken.as_deref().unwrap_or_default()
            ),
            Ok(_) => {
                let fenced = self.fenced.lock().unwrap_or_else(|e| e.into_inner());
                match (
                    fenced.get(name),
                    self.failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(name),
                ) {
                    (Some(why), _) if attached.is_none() => format!("fenced: {why}"),
                    (_, Some(why)) if attached.is_none() => format!("failed: {why}"),
                    _ => "ok".to_owned(),
                }
            }
            Err(e) => format!("failed: {e}"),
        };
        Ok(VolumeInfo {
            holder,
            attached: attached.is_some(),
            read_only: attached.as_ref().is_some_and(|a| a.read_only),
            clients: attached
                .as_ref()
                .map_or(0, |a| a.clients.load(Ordering::SeqCst)),
            status,
            qos: settings.qos,
            cache: settings.cache,
            reencrypt: reencrypt::info(self, name, &h),
            ..VolumeInfo::from_header(name, &h, loc.store().as_str(), loc.describe(name))
        })
    }

    /// attach: unwrap the DEK (context = volume id) and export the volume.
    pub fn attach(
        &self,
        c: &Caller,
        name: &str,
        read_only: bool,
    ) -> Result<VolumeInfo, DaemonError> {
        self.attach_with(c, name, read_only, false)
    }

    /// attach; for an RBD volume held by another host, `takeover` breaks its lock (fencing
    /// it: the cluster blocklists its session) and takes it.
    pub fn attach_with(
        &self,
        c: &Caller,
        name: &str,
        read_only: bool,
        takeover: bool,
    ) -> Result<VolumeInfo, DaemonError> {
        if takeover && read_only {
            return Err(DaemonError::Invalid(
                "--takeover is for read-write attaches (a read-only attach takes no lock)".into(),
            ));
        }
        // An RBD image is opened before the ops lock (`retry.rs`); a takeover is not (it
        // breaks a lock: decided under the ops lock only).
        let pre = if takeover {
            None
        } else {
            self.open_before_lock(name, read_only)
        };
        let _g = self.lock_ops();
        if name.contains('@') {
            self.attach_snapshot_locked(c, name, read_only)?;
        } else {
            let pre = self.still_placed(name, pre);
            self.attach_opened(c, name, read_only, takeover, pre)?;
        }
        self.info_locked(name)
    }

    fn attach_locked(
        &self,
        c: &Caller,
        name: &str,
        read_only: bool,
        takeover: bool,
    ) -> Result<(), DaemonError> {
        self.attach_opened(c, name, read_only, takeover, None)
    }

    /// attach, with an RBD image already opened for it (`opened`: the re-attach thread opens
    /// it before taking the ops lock) or opened here.
    fn attach_opened(
        &self,
        c: &Caller,
        name: &str,
        read_only: bool,
        takeover: bool,
        opened: Option<ceph::Opened>,
    ) -> Result<(), DaemonError> {
        let loc = self.locate(name)?;
        if let Some(a) = self.exports.get(name) {
            if a.read_only == read_only {
                return Ok(()); // idempotent
            }
            return Err(DaemonError::Conflict(format!(
                "volume {name:?} is already attached {}; detach it first",
                if a.read_only {
                    "read-only"
                } else {
                    "read-write"
                }
            )));
        }
        let (vol, fence, raw, release) = match &loc {
            Loc::File(path) => {
                let (vol, h) = self.open_file_volume(c, name, &loc, path, read_only)?;
                if vol.header() != &h {
                    return Err(DaemonError::Conflict(
                        "volume header changed during attach".into(),
                    ));
                }
                // A snapshot of it is being copied: its writes copy old data out first.
                if let Some(cow) = self.snaps.active_cow(name) {
                    vol.cow().install(cow);
                }
                (vol, None, None, None)
            }
            Loc::Rbd(pool) => {
                let ceph = self.ceph()?;
                // Read-write: the lock first, then the header, read through the locked
                // session (what this host will write over is what it checked).
                let o = match opened {
                    Some(o) => o,
                    None => ceph.open_for_attach(pool, name, read_only, takeover)?,
                };
                if let Some(old) = &o.took_over_from {
                    tracing::warn!(volume = name, from = %old, "took the volume over");
                }
                let (store, release, address) = (o.store, o.release, o.address);
                let h = Volume::read_header_in(store.as_ref()).map_err(Self::vol_err(name))?;
                self.check_trusted(name, &loc, &h)?;
                let (old, new) = self.volume_keys(c, name, &h)?;
                if let (Some(n), false) = (&new, read_only) {
                    crate::volume::reencrypt::recover(store.as_ref(), &old, n)
                        .map_err(Self::vol_err(name))?;
                }
                let vol = Volume::open_with_keys(
                    Box::new(store.clone()),
                    old,
                    new,
                    read_only,
                    CipherBackend::default(),
                )
                .map_err(Self::vol_err(name))?;
                let fence = address.map(|address| {
                    Fence::new(
                        name,
                        &address,
                        self.fence_tx
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .clone(),
                    )
                });
                (vol, fence, Some(store), release)
            }
        };
        let size = vol.size();
        let key_id = vol.header().key_id.clone();
        let qos = Arc::new(Qos::new(self.qos_of(vol.header().volume_id)?));
        self.exports.insert(
            name,
            Attached {
                backend: Arc::new(VolumeBackend(vol, fence)),
                read_only,
                clients: Arc::new(AtomicUsize::new(0)),
                detach: tokio::sync::watch::channel(false).0,
                qos,
                description: format!("cryptvol volume {name} ({size} bytes, aes-xts-plain64)"),
                raw,
                release,
            },
        );
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        self.fenced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        let mut st = self.attach_state.lock().unwrap_or_else(|e| e.into_inner());
        st.set(name, Some(read_only));
        st.save(&self.state_dir)?;
        tracing::info!(
            volume = name,
            key_id = %key_id,
            peer_uid = c.uid,
            read_only,
            store = loc.store().as_str(),
            "attached"
        );
        Ok(())
    }

    /// detach: refused while clients are connected unless `force` (flush, then disconnect them).
    /// An RBD volume's lock is released.
    pub fn detach(&self, name: &str, force: bool) -> Result<VolumeInfo, DaemonError> {
        let _g = self.lock_ops();
        if name.contains('@') {
            snapshots::split_full(name)?;
        } else {
            self.existing_or_missing(name)?;
        }
        let Some(a) = self.exports.get(name) else {
            // Already detached: idempotent. One that failed to re-attach is no longer wanted
            // (the re-attach thread stops trying).
            let mut st = self.attach_state.lock().unwrap_or_else(|e| e.into_inner());
            if st.entries().iter().any(|(n, _)| n == name) {
                st.set(name, None);
                st.save(&self.state_dir)?;
                self.failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(name);
                tracing::info!(volume = name, "detached (was not re-attached)");
            }
            drop(st);
            return match self.info_locked(name) {
                Err(e @ DaemonError::Cluster(_)) => Ok(self.failed_info(name, &e)),
                r => r,
            };
        };
        let clients = a.clients.load(Ordering::SeqCst);
        if clients > 0 && !force {
            return Err(DaemonError::Conflict(format!(
                "volume {name:?} has {clients} NBD client(s) connected; disconnect them or use --force"
            )));
        }
        self.exports.remove(name);
        let _ = a.detach.send(true);
        a.backend.0.flush().map_err(Self::vol_err(name))?;
        if let Some(release) = &a.release
            && let Err(e) = release()
        {
            tracing::warn!(volume = name, error = %e, "releasing the RBD lock failed (released at close)");
        }
        let mut st = self.attach_state.lock().unwrap_or_else(|e| e.into_inner());
        st.set(name, None);
        st.save(&self.state_dir)?;
        drop(st);
        tracing::info!(volume = name, forced = force && clients > 0, "detached");
        // The key is zeroized when the last session drops its handle to the volume.
        drop(a);
        self.info_locked(name)
    }

    /// A header-writing operation on a detached RBD volume: the image locked in a session of
    /// its own (refused while another host holds it), its header checked.
    fn rbd_locked(
        &self,
        name: &str,
        loc: &Loc,
    ) -> Result<(ceph::Locked, VolumeHeader), DaemonError> {
        let pool = loc.pool().unwrap_or_default();
        let l = self.ceph()?.open_locked(pool, name, false)?;
        let h = Volume::read_header_in(l.store.as_ref()).map_err(Self::vol_err(name))?;
        self.check_trusted(name, loc, &h)?;
        Ok((l, h))
    }

    pub fn resize(&self, name: &str, new_size: u64) -> Result<VolumeInfo, DaemonError> {
        let _g = self.lock_ops();
        let loc = self.locate(name)?;
        if self.exports.get(name).is_some() {
            return Err(DaemonError::Conflict(format!(
                "volume {name:?} is attached; detach it to resize"
            )));
        }
        let grow_err = |e| match e {
            VolumeError::BadHeader(why) | VolumeError::Invalid(why) => {
                DaemonError::Invalid(why.to_owned())
            }
            e => DaemonError::Volume(name.to_owned(), e),
        };
        let h = match &loc {
            Loc::File(path) => {
                if self.trusted_header(name, &loc)?.0.reencrypt.is_some() {
                    return Err(DaemonError::Conflict(format!(
                        "volume {name:?} is being re-encrypted; resize it afterwards"
                    )));
                }
                Volume::grow(path, new_size).map_err(grow_err)?
            }
            Loc::Rbd(_) => {
                let (l, _) = self.rbd_locked(name, &loc)?;
                // The image first (rbd_resize), then the header.
                Volume::grow_in(l.store.as_ref(), new_size).map_err(grow_err)?
            }
        };
        self.register(name, &h, loc.pool())?;
        tracing::info!(volume = name, size = new_size, "resized");
        self.info_locked(name)
    }

    /// rewrap: the DEK re-wrapped under the key's newest version; data untouched.
    pub fn rewrap(&self, c: &Caller, name: &str) -> Result<VolumeInfo, DaemonError> {
        let _g = self.lock_ops();
        let loc = self.locate(name)?;
        // An RBD volume attached read-write here: its header is written through the
        // attachment's session (which holds the lock); otherwise the lock is taken for it.
        let attached_raw = self
            .exports
            .get(name)
            .filter(|a| !a.read_only)
            .and_then(|a| a.raw.clone());
        let mut held = None;
        let (mut h, store): (VolumeHeader, Option<Arc<dyn crate::volume::BlockStore>>) =
            match (&loc, attached_raw) {
                (Loc::File(_), _) => (self.trusted_header(name, &loc)?.0, None),
                (Loc::Rbd(_), Some(raw)) => {
                    let h = Volume::read_header_in(raw.as_ref()).map_err(Self::vol_err(name))?;
                    self.check_trusted(name, &loc, &h)?;
                    (h, Some(raw))
                }
                (Loc::Rbd(_), None) => {
                    let (l, h) = self.rbd_locked(name, &loc)?;
                    let store = l.store.clone();
                    held = Some(l);
                    (h, Some(store))
                }
            };
        if h.reencrypt.is_some() {
            return Err(DaemonError::Conflict(format!(
                "volume {name:?} is being re-encrypted (it gets a new data key); rewrap it afterwards"
            )));
        }
        let ctx = volume_context(h.volume_id);
        let (key_id, _, dek) = self.kms.decrypt_datakey(c, &h.wrapped_dek, &ctx)?;
        let wrapped = self.kms.encrypt_datakey(c, &key_id, dek.expose(), &ctx)?;
        let wh = crate::kms::wrap::parse(&wrapped)?;
        h.key_version = wh.key_version;
        h.wrapped_dek = wrapped;
        let h = match (&loc, store) {
            (Loc::File(path), _) => Volume::write_header(path, &h),
            (_, Some(store)) => crate::volume::rewrite_header(store.as_ref(), &h),
            (Loc::Rbd(_), None) => unreachable!("an RBD volume has a store here"),
        }
        .map_err(Self::vol_err(name))?;
        drop(held);
        self.register(name, &h, loc.pool())?;
        self.info_locked(name)
    }

    /// `key import-to-hsm`: moves a file-custody CMK into the PKCS#11 token (a new
    /// non-extractable object per version), re-wraps every volume under it in the token
    /// (attached ones too: only the header changes, not the DEK or the data), then drops the
    /// sealed material from the key store unless `keep_file_material`. Every step can be run
    /// again after a failure; the material is only dropped once no volume needs it. Returns
    /// the key, the volumes re-wrapped, and whether the material was dropped.
    pub fn import_key_to_hsm(
        &self,
        c: &Caller,
        key: &str,
        keep_file_material: bool,
    ) -> Result<(crate::kms::KeyMetadata, Vec<String>, bool), DaemonError> {
        let meta = self.kms.import_to_hsm(c, key)?;
        let mut done = Vec::new();
        for v in self.list_volumes()? {
            if v.key_id.is_empty() {
                // A volume whose header cannot be read may be under this key: keep the
                // material that may be its only way back.
                return Err(DaemonError::Conflict(format!(
                    "volume {:?} cannot be inspected ({}); the key was moved to the token but \
                     its file material is kept; fix the volume and run import-to-hsm again",
                    v.name, v.status
                )));
            }
            let alg = hex::decode(&v.cipher_text)
                .ok()
                .and_then(|b| crate::kms::wrap::parse(&b).ok())
                .map(|h| h.alg);
            if v.key_id == meta.key_id && alg != Some(crate::kms::wrap::ALG_PKCS11_AES256GCM) {
                self.rewrap(c, &v.name)?;
                done.push(v.name);
            }
        }
        let dropped = !keep_file_material && self.kms.drop_file_material(c, &meta.key_id)?;
        tracing::info!(key = %meta.key_id, volumes = done.len(), dropped, "key moved to the token");
        let meta = self.kms.describe_key(c, &meta.key_id)?;
        Ok((meta, done, dropped))
    }

    /// delete: refused while attached here, or (RBD) while another host holds its lock.
    pub fn delete(&self, name: &str) -> Result<(), DaemonError> {
        self.delete_with(name, false)
    }

    /// delete; a volume with snapshots only `with_snapshots` (deleted first).
    pub fn delete_with(&self, name: &str, with_snapshots: bool) -> Result<(), DaemonError> {
        self.reenc_stop(name);
        let _g = self.lock_ops();
        let loc = self.locate(name)?;
        if self.exports.get(name).is_some() {
            return Err(DaemonError::Conflict(format!(
                "volume {name:?} is attached; detach it first"
            )));
        }
        self.delete_snapshots_of(name, with_snapshots)?;
        let id = self.registry().get(name).map(|r| r.volume_id);
        match &loc {
            Loc::File(path) => std::fs::remove_file(path)?,
            Loc::Rbd(pool) => self.ceph()?.remove(pool, name)?,
        }
        if let Some(id) = id
            && let Err(e) = self.record_settings(id, qos::Settings::default())
        {
            // Harmless: keyed by volume id, the entry never applies to another volume.
            tracing::warn!(volume = name, error = %e, "qos entry not removed");
        }
        let mut reg = self.registry();
        reg.remove(name);
        reg.save(&self.state_dir)?;
        drop(reg);
        for m in [&self.fenced, &self.failed] {
            m.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        }
        tracing::info!(volume = name, "deleted");
        Ok(())
    }

    /// Re-attaches the volumes that were attached when the daemon stopped. A volume that fails
    /// is reported (status "failed: ...") and the others still attach. An RBD volume is
    /// never taken over here: if another session holds it (another host, or this host
    /// before a crash), it is reported failed until an explicit `attach --takeover`.
    /// Returns the volumes that failed on a cluster error, to be retried
    /// ([`Daemon::start_retry`]).
    pub fn restore(&self) -> Vec<(String, bool)> {
        let mut retry = Vec::new();
        let wanted = self
            .attach_state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries();
        let _g = self.lock_ops();
        for (name, read_only) in wanted {
            let r = if name.contains('@') {
                self.attach_snapshot_locked(&Caller::DAEMON, &name, read_only)
            } else {
                self.attach_locked(&Caller::DAEMON, &name, read_only, false)
            };
            if let Err(e) = r {
                tracing::error!(volume = %name, error = %e, "could not re-attach");
                if matches!(e, DaemonError::Cluster(_)) {
                    retry.push((name.clone(), read_only));
                }
                self.failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(name, e.to_string());
            }
        }
        retry
    }

    /// Runs the thread that handles fence reports ([`Daemon::fenced_volume`]).
    pub fn start_fence_worker(self: &Arc<Self>) {
        let Some(rx) = self
            .fence_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let d = Arc::downgrade(self);
        let r = std::thread::Builder::new()
            .name("cryptvol-fence".into())
            .spawn(move || {
                while let Ok((name, id)) = rx.recv() {
                    let Some(d) = d.upgrade() else { break };
                    d.fenced_volume(&name, id);
                }
            });
        if let Err(e) = r {
            tracing::error!(error = %e, "cannot start the fence thread");
        }
    }

    /// Another host took volume NAME over (its writes here fail with ESHUTDOWN): stop
    /// serving it (clients disconnected, removed from the exports), forget it in
    /// `attached.json` (no re-attach at restart), and report it fenced, naming the new holder.
    fn fenced_volume(&self, name: &str, id: usize) {
        let a = {
            let _g = self.lock_ops();
            let Some(a) = self.exports.get(name) else {
                return;
            };
            if a.backend.id() != id {
                return; // a report about an attachment already gone
            }
            self.exports.remove(name);
            let _ = a.detach.send(true);
            {
                let mut st = self.attach_state.lock().unwrap_or_else(|e| e.into_inner());
                st.set(name, None);
                if let Err(e) = st.save(&self.state_dir) {
                    tracing::error!(volume = name, error = %e, "cannot save attached.json");
                }
            }
            let holder = match self.locate(name) {
                Ok(Loc::Rbd(pool)) => self
                    .ceph()
                    .and_then(|c| c.peek(&pool, name))
                    .ok()
                    .and_then(|p| p.holder),
                _ => None,
            };
            let why = format!(
                "lock taken over by {}",
                holder.as_deref().unwrap_or("another client")
            );
            tracing::error!(volume = name, reason = %why, "fenced: no longer served here");
            self.fenced
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.to_owned(), why);
            a
        };
        // Closing the image of a blocklisted session waits for librbd's timeouts: done
        // here, once the sessions let go, not on a request thread.
        for _ in 0..100 {
            if a.clients.load(Ordering::SeqCst) == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        drop(a);
    }

    /// Flushes every attached volume (shutdown).
    pub fn flush_all(&self) {
        for (name, a) in self.exports.all() {
            if let Err(e) = a.backend.0.flush() {
                tracing::error!(volume = %name, error = %e, "flush failed");
            }
        }
    }

    /// Drops every attached volume: keys are zeroized with the last handle.
    pub fn detach_all_in_memory(&self) {
        for (name, a) in self.exports.all() {
            let _ = a.detach.send(true);
            self.exports.remove(&name);
        }
    }
}
