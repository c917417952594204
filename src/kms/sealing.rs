//! The sealing file and the small file helpers of the key store: the key store's current
//! sealing key, sealed under the root key (`docs/key-format.md`, "Sealing file"), and atomic
//! JSON files.

use std::path::Path;

use crate::secmem::LockedBox;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::KmsError;
use super::crypto;
use super::secret::Secret;

/// The sealing file's name in the key store dir unless configured elsewhere.
pub const SEALING_FILE: &str = "sealing.key";
const SEALING_AAD: &[u8] = b"cryptvol sealing key v1";

/// The sealing file: the current sealing key, sealed under the root key; during a change
/// also the next one.
#[derive(Serialize, Deserialize)]
pub(super) struct SealingFile {
    pub format: u32,
    pub store_id: Uuid,
    pub generation: u64,
    /// hex(nonce || AES-256-GCM(root key, sealing key)); absent for generation 0 (nothing
    /// sealed under a sealing key yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<NextKey>,
}

#[derive(Clone, Serialize, Deserialize)]
pub(super) struct NextKey {
    pub generation: u64,
    pub key: String,
}

/// The key everything in `keys.json` is sealed under, and its generation.
pub(super) struct Sealer {
    pub generation: u64,
    pub key: LockedBox<[u8; 32]>,
    /// As stored in the sealing file (None for generation 0).
    pub sealed: Option<String>,
}

pub(super) fn sealing_aad(store_id: Uuid, generation: u64) -> Vec<u8> {
    let mut a = SEALING_AAD.to_vec();
    a.extend_from_slice(store_id.as_bytes());
    a.extend_from_slice(&generation.to_be_bytes());
    a
}

pub(super) fn seal_hex(key: &[u8; 32], aad: &[u8], plain: &[u8]) -> Result<String, KmsError> {
    let mut nonce = [0u8; 12];
    crypto::random(&mut nonce)?;
    // Sealed in place in locked memory: the plaintext never lands on the ordinary heap.
    let mut body = Secret::from_slice(plain);
    let tag = crypto::seal_detached(key, &nonce, aad, body.expose_mut());
    let mut out = nonce.to_vec();
    out.extend_from_slice(body.expose());
    out.extend_from_slice(&tag);
    Ok(hex::encode(out))
}

pub(super) fn open_hex(key: &[u8; 32], aad: &[u8], h: &str) -> Option<Secret> {
    let raw = hex::decode(h).ok()?;
    if raw.len() < 12 + 16 {
        return None;
    }
    let nonce: [u8; 12] = raw[..12].try_into().ok()?;
    let mut body = Secret::from_slice(&raw[12..]);
    let n = crypto::open(key, &nonce, aad, body.expose_mut()).ok()?;
    body.truncate(n);
    Some(body)
}

pub(super) fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, KmsError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| KmsError::Internal(format!("{} is corrupt: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(KmsError::Io(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        ))),
    }
}

pub(super) fn write_json(path: &Path, v: &impl Serialize) -> Result<(), KmsError> {
    let bytes = serde_json::to_vec_pretty(v).map_err(|e| KmsError::Internal(e.to_string()))?;
    let (dir, name) = match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        (Some(d), Some(n)) => (d, n),
        _ => {
            return Err(KmsError::Internal(format!(
                "{} is not a file path",
                path.display()
            )));
        }
    };
    atomic_write(dir, name, &bytes).map_err(|e| {
        KmsError::Io(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        ))
    })
}

/// Replaces `dir/name` atomically with `bytes`: temp file, fsync, rename, fsync dir. A crash
/// at any moment leaves the old or the new file. The temp file is created anew (O_EXCL): a
/// symlink planted under its name is removed, never written through.
pub fn atomic_write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!(".{name}.tmp"));
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_does_not_follow_a_planted_temp_symlink() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join(".f.tmp")).unwrap();
        atomic_write(d.path(), "f", b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(d.path().join("f")).unwrap(), b"new");
    }
}
