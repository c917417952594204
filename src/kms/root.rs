//! The root key: 256 bits that seal the key store's sealing key (and so every CMK at rest)
//! and key the audit chain. From a file made by `cryptvol init`
//! (0600, refused when group/world-readable) or a systemd credential.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use zeroize::Zeroizing;

use crate::secmem::LockedBox;

use super::KmsError;
use super::crypto;

/// In locked memory (`crate::secmem`) for the daemon's lifetime.
pub struct RootKey(pub(super) LockedBox<[u8; 32]>);

/// The systemd credential name (`LoadCredentialEncrypted=cryptvol-root-key:...`).
pub const CREDENTIAL_NAME: &str = "cryptvol-root-key";

impl RootKey {
    /// Writes a new random root key file (0600); refuses to overwrite.
    pub fn generate_file(path: &Path) -> Result<(), KmsError> {
        let mut key = Zeroizing::new([0u8; 32]);
        crypto::random(&mut key[..])?;
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| KmsError::RootKey(format!("cannot create {}: {e}", path.display())))?;
        f.write_all(&key[..])?;
        f.sync_all()?;
        Ok(())
    }

    /// Loads a root key file: exactly 32 bytes, not readable by group or others.
    pub fn load_file(path: &Path) -> Result<RootKey, KmsError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| KmsError::RootKey(format!("cannot read {}: {e}", path.display())))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(KmsError::RootKey(format!(
                "{} is accessible by group or others (mode {:o}); chmod 600 it",
                path.display(),
                meta.permissions().mode() & 0o777
            )));
        }
        Self::read(path)
    }

    /// Loads `$CREDENTIALS_DIRECTORY/<name>` (systemd decrypts it, e.g. with the TPM).
    pub fn load_credential(name: &str) -> Result<RootKey, KmsError> {
        let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
            KmsError::RootKey("CREDENTIALS_DIRECTORY is not set (not started by systemd?)".into())
        })?;
        Self::read(&Path::new(&dir).join(name))
    }

    fn read(path: &Path) -> Result<RootKey, KmsError> {
        // Read straight into locked memory (read_to_end into a Vec would leave copies in the
        // heap as it grows). One byte of room tells a longer file.
        let mut buf = LockedBox::<[u8; 33]>::zeroed();
        let mut n = 0;
        let mut f = std::fs::File::open(path)
            .map_err(|e| KmsError::RootKey(format!("cannot read {}: {e}", path.display())))?;
        while n < buf.len() {
            match f.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(KmsError::RootKey(format!(
                        "cannot read {}: {e}",
                        path.display()
                    )));
                }
            }
        }
        if n != 32 {
            return Err(KmsError::RootKey(format!(
                "{} must hold exactly 32 bytes",
                path.display()
            )));
        }
        let mut k = LockedBox::<[u8; 32]>::zeroed();
        k.copy_from_slice(&buf[..32]);
        Ok(RootKey(k))
    }

    /// A root key from bytes (tests, tools).
    pub fn from_bytes(b: [u8; 32]) -> RootKey {
        let mut k = LockedBox::<[u8; 32]>::zeroed();
        k.copy_from_slice(&b);
        RootKey(k)
    }
}
