//! A volume's cache mode (SPEC §9 `--cache writeback|none`) in the daemon: checked at create
//! and `volume set`, applied when the volume is opened at attach. Stored with the volume's
//! other host settings (`qos.rs`); the mechanism is `volume::direct`.
//!
//! `none` is refused where the backing file cannot do direct I/O (a memory file system, one
//! without O_DIRECT, an RBD volume), with the file system's name: a volume asked to bypass
//! the page cache never silently uses it.

use std::path::Path;

use super::{Daemon, DaemonError, Loc};
use crate::volume::{CacheMode, DirectError, FileStore};

/// The error for a direct-I/O failure of volume `name`: unsupported file systems are the
/// caller's to fix (400), the rest is I/O.
pub(super) fn direct_err(name: &str, e: DirectError) -> DaemonError {
    match e {
        DirectError::Unsupported { .. } => DaemonError::Invalid(format!("volume {name}: {e}")),
        DirectError::Io(e) => DaemonError::Io(e),
    }
}

/// Whether the volume file at `path` can be opened in `cache` mode (opened and closed again).
pub(super) fn check_file(name: &str, path: &Path, cache: CacheMode) -> Result<(), DaemonError> {
    if cache == CacheMode::None {
        FileStore::open(path, true, cache).map_err(|e| direct_err(name, e))?;
    }
    Ok(())
}

impl Daemon {
    /// Whether volume `name` at `loc` can run in `cache` mode.
    pub(super) fn check_cache(
        &self,
        name: &str,
        loc: &Loc,
        cache: CacheMode,
    ) -> Result<(), DaemonError> {
        match (loc, cache) {
            (_, CacheMode::Writeback) => Ok(()),
            (Loc::File(path), _) => check_file(name, path, cache),
            (Loc::Rbd(_), _) => Err(rbd_cache()),
        }
    }

    /// The cache mode volume `id` is to be opened in.
    pub(super) fn cache_of(&self, id: uuid::Uuid) -> Result<CacheMode, DaemonError> {
        Ok(self.settings_of(id)?.cache)
    }
}

/// `--cache none` asked of an RBD volume.
pub(super) fn rbd_cache() -> DaemonError {
    DaemonError::Invalid(
        "--cache is for file volumes (an RBD volume never caches here: librbd runs with \
         rbd_cache = false)"
            .into(),
    )
}
