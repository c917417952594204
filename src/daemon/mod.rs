//! The daemon: joins the key manager, the volumes and the NBD server. Holds the attached set,
//! implements every volume operation (the API layer only maps HTTP to these calls), and runs
//! the lifecycle (`run`): config -> state -> restore attachments -> serve; signals; sd_notify.

pub mod access;
pub mod exports;
mod run;
mod state;
mod sys;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;
use uuid::Uuid;

use crate::kms::{Caller, EncryptionContext, KeyState, Kms, KmsError};
use crate::volume::{CIPHER_NAME, Volume, VolumeError, VolumeHeader, XtsKey};
use exports::{Attached, Exports, VolumeBackend};
pub use run::{Running, demo, init_state_dir, serve};
use state::AttachState;

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
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
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
            DaemonError::Io(_) => "VOL.0501",
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
    pub path: String,
    pub attached: bool,
    pub read_only: bool,
    pub clients: usize,
    /// "ok", "unrecoverable: key destroyed", or "failed: <reason>".
    pub status: String,
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
}

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .enumerate()
            .all(|(i, c)| c.is_ascii_alphanumeric() || (i > 0 && b"._-".contains(&c)))
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
        std::fs::create_dir_all(state_dir.join("volumes"))?;
        let attach_state = AttachState::load(state_dir)?;
        Ok(Daemon {
            kms,
            exports: Arc::new(Exports::new(max_per_export, policy)),
            state_dir: state_dir.to_owned(),
            attach_state: std::sync::Mutex::new(attach_state),
            ops: std::sync::Mutex::new(()),
            failed: std::sync::Mutex::new(BTreeMap::new()),
        })
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

    fn existing(&self, name: &str) -> Result<PathBuf, DaemonError> {
        let p = self.path(name)?;
        if !p.exists() {
            return Err(DaemonError::NoVolume(name.to_owned()));
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
    ) -> Result<VolumeInfo, DaemonError> {
        let _g = self.lock_ops();
        let path = self.path(name)?;
        if path.exists() {
            return Err(DaemonError::Exists(name.to_owned()));
        }
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
        let ctx = volume_context(id);
        let wrapped = self
            .kms
            .create_datakey_without_plaintext(c, &key, 512, &ctx)?;
        let h = crate::kms::wrap::parse(&wrapped)?;
        let header = VolumeHeader::new(
            id,
            size,
            sector_size,
            &h.key_id.to_string(),
            h.key_version,
            wrapped,
        )
        .map_err(Self::vol_err(name))?;
        Volume::create(&path, &header).map_err(Self::vol_err(name))?;
        self.info_locked(name)
    }

    /// import: a raw image stream becomes an encrypted volume; all-zero chunks stay holes.
    pub fn import_volume(
        &self,
        c: &Caller,
        name: &str,
        size: u64,
        key: Option<&str>,
        mut image: impl Read,
    ) -> Result<VolumeInfo, DaemonError> {
        let sector = 4096u32;
        let rounded = size.div_ceil(u64::from(sector)) * u64::from(sector);
        self.create_volume(c, name, rounded.max(u64::from(sector)), sector, key)?;
        let result = (|| {
            let path = self.existing(name)?;
            let header = Volume::read_header(&path).map_err(Self::vol_err(name))?;
            let (_, _, dek) = self.kms.decrypt_datakey(
                c,
                &header.wrapped_dek,
                &volume_context(header.volume_id),
            )?;
            let vol = Volume::open(
                &path,
                XtsKey::new(dek.expose()).map_err(Self::vol_err(name))?,
                false,
            )
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
                if off + n as u64 > size {
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
            // Leave nothing half-imported behind.
            let _ = std::fs::remove_file(self.path(name)?);
            return Err(e);
        }
        self.inspect(name)
    }

    pub fn list_volumes(&self) -> Result<Vec<VolumeInfo>, DaemonError> {
        let mut names: Vec<String> = std::fs::read_dir(self.state_dir.join("volumes"))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".cvol")
                    .map(str::to_owned)
            })
            .collect();
        names.sort();
        Ok(names
            .iter()
            .map(|n| {
                self.info_locked(n)
                    .unwrap_or_else(|e| self.failed_info(n, &e))
            })
            .collect())
    }

    fn failed_info(&self, name: &str, e: &DaemonError) -> VolumeInfo {
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
            path: self
                .path(name)
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            attached: false,
            read_only: false,
            clients: 0,
            status: format!("failed: {e}"),
        }
    }

    pub fn inspect(&self, name: &str) -> Result<VolumeInfo, DaemonError> {
        self.info_locked(name)
    }

    fn info_locked(&self, name: &str) -> Result<VolumeInfo, DaemonError> {
        let path = self.existing(name)?;
        let h = Volume::read_header(&path).map_err(Self::vol_err(name))?;
        let attached = self.exports.get(name);
        let status = match self.kms.key_state(&h.key_id) {
            Ok((KeyState::Destroyed, _)) => "unrecoverable: key destroyed".to_owned(),
            Ok(_) => match self
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(name)
            {
                Some(why) if attached.is_none() => format!("failed: {why}"),
                _ => "ok".to_owned(),
            },
            Err(e) => format!("failed: {e}"),
        };
        Ok(VolumeInfo {
            name: name.to_owned(),
            volume_id: h.volume_id.to_string(),
            size: h.size,
            sector_size: h.sector_size,
            cipher: CIPHER_NAME.into(),
            key_id: h.key_id.clone(),
            key_version: h.key_version,
            cipher_text: hex::encode(&h.wrapped_dek),
            data_offset: h.data_offset,
            path: path.display().to_string(),
            attached: attached.is_some(),
            read_only: attached.as_ref().is_some_and(|a| a.read_only),
            clients: attached
                .as_ref()
                .map_or(0, |a| a.clients.load(Ordering::SeqCst)),
            status,
        })
    }

    /// attach: unwrap the DEK (context = volume id) and export the volume.
    pub fn attach(
        &self,
        c: &Caller,
        name: &str,
        read_only: bool,
    ) -> Result<VolumeInfo, DaemonError> {
        let _g = self.lock_ops();
        self.attach_locked(c, name, read_only)?;
        self.info_locked(name)
    }

    fn attach_locked(&self, c: &Caller, name: &str, read_only: bool) -> Result<(), DaemonError> {
        let path = self.existing(name)?;
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
        let h = Volume::read_header(&path).map_err(Self::vol_err(name))?;
        let (_, _, dek) =
            self.kms
                .decrypt_datakey(c, &h.wrapped_dek, &volume_context(h.volume_id))?;
        let key = XtsKey::new(dek.expose()).map_err(Self::vol_err(name))?;
        drop(dek);
        let vol = Volume::open(&path, key, read_only).map_err(Self::vol_err(name))?;
        if vol.header().volume_id != h.volume_id {
            return Err(DaemonError::Conflict(
                "volume header changed during attach".into(),
            ));
        }
        self.exports.insert(
            name,
            Attached {
                backend: Arc::new(VolumeBackend(vol)),
                read_only,
                clients: Arc::new(AtomicUsize::new(0)),
                detach: tokio::sync::watch::channel(false).0,
                description: format!("cryptvol volume {name} ({} bytes, aes-xts-plain64)", h.size),
            },
        );
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        let mut st = self.attach_state.lock().unwrap_or_else(|e| e.into_inner());
        st.set(name, Some(read_only));
        st.save(&self.state_dir)?;
        tracing::info!(volume = name, read_only, "attached");
        Ok(())
    }

    /// detach: refused while clients are connected unless `force` (flush, then disconnect them).
    pub fn detach(&self, name: &str, force: bool) -> Result<VolumeInfo, DaemonError> {
        let _g = self.lock_ops();
        self.existing(name)?;
        let Some(a) = self.exports.get(name) else {
            return self.info_locked(name); // already detached: idempotent
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
        let mut st = self.attach_state.lock().unwrap_or_else(|e| e.into_inner());
        st.set(name, None);
        st.save(&self.state_dir)?;
        tracing::info!(volume = name, forced = force && clients > 0, "detached");
        // The key is zeroized when the last session drops its handle to the volume.
        drop(a);
        self.info_locked(name)
    }

    pub fn resize(&self, name: &str, new_size: u64) -> Result<VolumeInfo, DaemonError> {
        let _g = self.lock_ops();
        let path = self.existing(name)?;
        if self.exports.get(name).is_some() {
            return Err(DaemonError::Conflict(format!(
                "volume {name:?} is attached; detach it to resize"
            )));
        }
        Volume::grow(&path, new_size).map_err(Self::vol_err(name))?;
        self.info_locked(name)
    }

    /// rewrap: the DEK re-wrapped under the key's newest version; data untouched.
    pub fn rewrap(&self, c: &Caller, name: &str) -> Result<VolumeInfo, DaemonError> {
        let _g = self.lock_ops();
        let path = self.existing(name)?;
        let mut h = Volume::read_header(&path).map_err(Self::vol_err(name))?;
        let ctx = volume_context(h.volume_id);
        let (key_id, _, dek) = self.kms.decrypt_datakey(c, &h.wrapped_dek, &ctx)?;
        let wrapped = self.kms.encrypt_datakey(c, &key_id, dek.expose(), &ctx)?;
        let wh = crate::kms::wrap::parse(&wrapped)?;
        h.key_version = wh.key_version;
        h.wrapped_dek = wrapped;
        Volume::write_header(&path, &h).map_err(Self::vol_err(name))?;
        self.info_locked(name)
    }

    pub fn delete(&self, name: &str) -> Result<(), DaemonError> {
        let _g = self.lock_ops();
        let path = self.existing(name)?;
        if self.exports.get(name).is_some() {
            return Err(DaemonError::Conflict(format!(
                "volume {name:?} is attached; detach it first"
            )));
        }
        std::fs::remove_file(&path)?;
        tracing::info!(volume = name, "deleted");
        Ok(())
    }

    /// Re-attaches the volumes that were attached when the daemon stopped. A volume that fails
    /// is reported (status "failed: ...") and the others still attach.
    pub fn restore(&self) {
        let wanted = self
            .attach_state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries();
        let _g = self.lock_ops();
        for (name, read_only) in wanted {
            if let Err(e) = self.attach_locked(&Caller::DAEMON, &name, read_only) {
                tracing::error!(volume = %name, error = %e, "could not re-attach");
                self.failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(name, e.to_string());
            }
        }
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
