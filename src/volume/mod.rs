//! Volumes: on-disk format (two header copies, then a 1 MiB-aligned data area), the
//! AES-256-XTS sector cipher (dm-crypt `aes-xts-plain64`), block stores and [`Volume`], which
//! maps byte ranges onto encrypted data units (read-modify-write for partial units).
//!
//! ```text
//!  file: | header A (4 KiB) | header B (4 KiB) | ... | data area @ 1 MiB: unit 0 | unit 1 | ...
//!  unit i stored = AES-256-XTS(DEK, tweak = i as LE u64) of its plaintext; all-zero = hole
//!  (thin default; a volume with the encrypt_zeroes flag: only over a file hole)
//! ```
//! Knows nothing of NBD or of the key manager: it takes an unwrapped [`XtsKey`].

mod aio;
mod awslc;
pub mod cipher;
mod dataspan;
mod direct;
mod disk;
pub mod header;
mod mapped;
#[cfg(feature = "rbd")]
pub mod rbd;
pub mod reencrypt;
pub mod snapshot;
mod soft;
pub mod store;
mod stripe;
mod xts_batch;
mod xts_vaes;

use std::io;

pub use cipher::{Backend as CipherBackend, SectorCipher, UnitSize, XtsKey};
pub use direct::{CacheMode, DirectError, fs_name};
pub use disk::{Volume, rewrite_header};
pub use header::{CIPHER_NAME, DATA_OFFSET, KEY_BITS, VolumeHeader};
#[cfg(feature = "rbd")]
pub use rbd::RbdStore;
pub use store::{BlockStore, FileStore, MemStore};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("invalid volume header: {0}")]
    BadHeader(&'static str),
    #[error("invalid data key: {0}")]
    BadKey(&'static str),
    #[error("crypto: {0}")]
    Crypto(&'static str),
    #[error("range out of bounds")]
    OutOfRange,
    #[error("volume is read-only")]
    ReadOnly,
    #[error("{0}")]
    Invalid(&'static str),
}

impl VolumeError {
    /// The errno an NBD client should see for this error.
    pub fn errno(&self) -> i32 {
        match self {
            VolumeError::Io(e) => match e.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => libc::ENOSPC,
                Some(libc::EROFS) | Some(libc::EPERM) | Some(libc::EACCES) => libc::EPERM,
                _ => libc::EIO,
            },
            VolumeError::OutOfRange | VolumeError::Invalid(_) => libc::EINVAL,
            VolumeError::ReadOnly => libc::EPERM,
            _ => libc::EIO,
        }
    }
}
