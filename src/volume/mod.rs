//! Volumes: on-disk format (two header copies, then a 1 MiB-aligned data area), the
//! AES-256-XTS sector cipher (dm-crypt `aes-xts-plain64`), block stores and `Volume`, which maps
//! byte ranges onto encrypted data units (read-modify-write for partial units).
//!
//! CONTRACT (used by `daemon/`; the bodies are filled in by the foundation issue, the
//! signatures stay):
//!
//! ```ignore
//! pub struct VolumeHeader { pub format_version: u32, pub volume_id: uuid::Uuid, pub size: u64,
//!     pub sector_size: u32, pub key_id: String, pub key_version: u32,
//!     pub wrapped_dek: Vec<u8>, pub data_offset: u64 }          // Clone + Debug (no secrets)
//! pub const CIPHER_NAME: &str = "aes-xts-plain64";
//! pub const KEY_BITS: u32 = 512;
//! pub struct XtsKey;        // 64 zeroizing bytes, no Debug; XtsKey::new(&[u8]) -> Result<XtsKey, VolumeError>
//!                           // (rejects len != 64 and equal halves)
//! pub enum VolumeError { .. }   // thiserror; `pub fn errno(&self) -> i32` maps to EIO/ENOSPC/EINVAL/..
//! impl Volume {
//!     /// Writes both header copies into a new file (refuses an existing one), sized sparse.
//!     pub fn create(path: &Path, header: &VolumeHeader) -> Result<(), VolumeError>;
//!     /// Reads and checks the header (first valid copy wins; both bad -> error).
//!     pub fn read_header(path: &Path) -> Result<VolumeHeader, VolumeError>;
//!     /// Rewrites the header crash-safely (copy A, sync, copy B, sync): rewrap.
//!     pub fn write_header(path: &Path, header: &VolumeHeader) -> Result<(), VolumeError>;
//!     /// Grows a detached volume (header + file length), keeps data.
//!     pub fn grow(path: &Path, new_size: u64) -> Result<VolumeHeader, VolumeError>;
//!     /// Opens for I/O with the unwrapped DEK.
//!     pub fn open(path: &Path, key: XtsKey, read_only: bool) -> Result<Volume, VolumeError>;
//!     pub fn header(&self) -> &VolumeHeader;
//!     pub fn size(&self) -> u64;   pub fn sector_size(&self) -> u32;
//!     pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError>;
//!     pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), VolumeError>;
//!     /// Same, but may encrypt `data` in place (no copy for whole aligned units).
//!     pub fn write_mut(&self, offset: u64, data: &mut [u8]) -> Result<(), VolumeError>;
//!     pub fn flush(&self) -> Result<(), VolumeError>;   // fdatasync
//!     pub fn trim(&self, offset: u64, len: u64) -> Result<(), VolumeError>;
//!     pub fn write_zeroes(&self, offset: u64, len: u64, may_punch: bool) -> Result<(), VolumeError>;
//!     /// (length, is_hole) runs covering [offset, offset+len).
//!     pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, VolumeError>;
//! }
//! // `Volume: Send + Sync`; all I/O methods take &self and are safe to call from many threads.
//! // `Volume::create_with_store` / `open_with_store` take a `Box<dyn BlockStore>` (in-memory twin).
//! ```
