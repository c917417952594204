//! Cache modes of a file volume, and direct I/O (`cache none`: O_DIRECT) on its file.
//!
//! `writeback` (the default) goes through the page cache. `none` opens the file with
//! O_DIRECT, like `qemu -drive cache=none`: the host already caches above the NBD device, so
//! a second cache of ciphertext below it only costs memory (and makes the daemon's RSS look
//! small while the page cache grows). FLUSH still calls `fdatasync`: O_DIRECT bypasses the
//! page cache, not the device's write cache.
//!
//! O_DIRECT needs the offset, the length and the buffer address of every `pread`/`pwrite`
//! aligned to the file system's direct-I/O granule (`statx` `STATX_DIOALIGN`: the device's
//! logical block, 512 or 4096; 4096 when the kernel does not say). The server's buffers and
//! the volume's scratch are page-aligned ([`crate::aligned`]), so whole-unit I/O goes to the
//! device as it is. Anything else (the header's copies, a 512-byte unit on a 4 KiB device)
//! goes through an aligned bounce buffer here, with a read-modify-write of the edge blocks
//! for writes; [`Volume`](super::Volume) locks whole granules for that (see
//! [`BlockStore::io_align`](super::BlockStore::io_align)).
//!
//! A file system without direct I/O (EINVAL at open), or one where it means nothing (tmpfs
//! and ramfs accept O_DIRECT since Linux 6.6, but their pages are the only copy: nothing is
//! bypassed), is refused with its name: never a silent fallback to the page cache.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::aligned::{ALIGN, AlignedBuf, is_aligned};

/// How a file volume's I/O meets the page cache (SPEC §9 `--cache`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Through the page cache; FLUSH = fdatasync.
    #[default]
    Writeback,
    /// O_DIRECT: no page cache; FLUSH = fdatasync (the device's cache).
    None,
}

impl CacheMode {
    pub fn parse(s: &str) -> Option<CacheMode> {
        match s {
            "writeback" => Some(CacheMode::Writeback),
            "none" => Some(CacheMode::None),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::Writeback => "writeback",
            CacheMode::None => "none",
        }
    }
}

/// Why a file cannot be opened for direct I/O.
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    #[error(
        "cache none needs direct I/O (O_DIRECT), which {path} on {fs} does not offer{why}; \
         use --cache writeback or a file system on a block device (ext4, XFS, btrfs)"
    )]
    Unsupported {
        path: String,
        fs: String,
        why: &'static str,
    },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Opens `path` with O_DIRECT (read-write unless `read_only`) and finds its direct-I/O
/// alignment. Refuses file systems without real direct I/O, naming them.
pub fn open_direct(path: &Path, read_only: bool) -> Result<(File, usize), DirectError> {
    let unsupported = |why: &'static str| DirectError::Unsupported {
        path: path.display().to_string(),
        fs: fs_name(path),
        why,
    };
    if memory_fs(path)? {
        return Err(unsupported(
            " (a memory file system: its pages are the only copy, nothing to bypass)",
        ));
    }
    let file = match OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Err(unsupported("")),
        Err(e) => return Err(e.into()),
    };
    match sys::dio_align(&file)? {
        Some(0) => Err(unsupported(" (statx reports no direct-I/O alignment)")),
        Some(a) if a > ALIGN => Err(unsupported(
            " (it needs buffers aligned beyond 4 KiB, which this server does not allocate)",
        )),
        Some(a) => Ok((file, a.max(512))),
        None => Ok((file, ALIGN)),
    }
}

/// Whether `path` is on a memory file system (tmpfs, ramfs).
fn memory_fs(path: &Path) -> io::Result<bool> {
    let t = sys::fs_type(path)?;
    Ok(t == TMPFS || t == RAMFS)
}

const TMPFS: u32 = 0x0102_1994;
const RAMFS: u32 = 0x8584_58f6;

/// The file system `path` is on, by name where known (`statfs` f_type).
pub fn fs_name(path: &Path) -> String {
    let names: [(u32, &str); 12] = [
        (TMPFS, "tmpfs"),
        (RAMFS, "ramfs"),
        (0xef53, "ext2/3/4"),
        (0x5846_5342, "XFS"),
        (0x9123_683e, "btrfs"),
        (0x6969, "NFS"),
        (0xff53_4d42, "CIFS"),
        (0x6573_5546, "FUSE"),
        (0x794c_7630, "overlayfs"),
        (0x2fc1_2fc1, "ZFS"),
        (0x0102_1997, "9p"),
        (0x5346_414f, "AFS"),
    ];
    match sys::fs_type(path) {
        Ok(t) => names.iter().find(|(m, _)| *m == t).map_or_else(
            || format!("a file system of type {t:#x}"),
            |(_, n)| n.to_string(),
        ),
        Err(_) => "an unknown file system".into(),
    }
}

/// Whether a transfer of `buf` at `offset` may go to `file` directly.
pub(super) fn aligned(buf: &[u8], offset: u64, align: usize) -> bool {
    let a = align as u64;
    offset.is_multiple_of(a) && (buf.len() as u64).is_multiple_of(a) && is_aligned(buf, align)
}

/// Reads `buf` at `offset` (any alignment) through an aligned bounce buffer; bytes past the
/// end of the file read as zeros.
pub(super) fn read_bounced(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    align: usize,
) -> io::Result<()> {
    let a = align as u64;
    let start = offset / a * a;
    let end = (offset + buf.len() as u64).div_ceil(a) * a;
    let mut b = AlignedBuf::zeroed((end - start) as usize);
    read_direct(file, &mut b, start)?;
    let skip = (offset - start) as usize;
    buf.copy_from_slice(&b[skip..skip + buf.len()]);
    Ok(())
}

/// Writes `buf` at `offset` (any alignment) through an aligned bounce buffer: the blocks at
/// the edges that `buf` covers only partly are read first and patched. The caller keeps
/// other writes off those blocks meanwhile. Past the end of the file the last block is
/// written whole (zeros beyond `buf`), which may extend the file by less than a block.
pub(super) fn write_bounced(file: &File, buf: &[u8], offset: u64, align: usize) -> io::Result<()> {
    let a = align as u64;
    let end_b = offset + buf.len() as u64;
    let start = offset / a * a;
    let end = end_b.div_ceil(a) * a;
    let mut b = AlignedBuf::zeroed((end - start) as usize);
    if start < offset {
        read_direct(file, &mut b[..align], start)?;
    }
    if end > end_b && (end - a > start || start == offset) {
        let n = b.len();
        read_direct(file, &mut b[n - align..], end - a)?;
    }
    let skip = (offset - start) as usize;
    b[skip..skip + buf.len()].copy_from_slice(buf);
    file.write_all_at(&b, start)
}

/// pread of aligned `buf` at aligned `offset`, O_DIRECT; past the end reads as zeros.
pub(super) fn read_direct(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(n) if n == buf.len() => return Ok(()),
            // End of file (a short direct read stops there; a read at EOF returns 0).
            Ok(n) if n == 0 || offset + n as u64 >= file.metadata()?.len() => {
                buf[n..].fill(0);
                return Ok(());
            }
            // Short in the middle (not seen on local file systems): go on from there; an
            // offset off the granule then fails with EINVAL rather than reading wrong bytes.
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// statx and statfs, which std lacks.
#[allow(unsafe_code)]
mod sys {
    use std::ffi::CString;
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    /// The direct-I/O alignment of offsets and lengths (`stx_dio_offset_align`, at least the
    /// memory alignment), `Some(0)` when the file supports no direct I/O, `None` when the
    /// kernel does not tell (before Linux 6.1).
    pub fn dio_align(file: &File) -> io::Result<Option<usize>> {
        // SAFETY: an all-zero statx is a valid value of this plain C struct.
        let mut st: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: the path is a NUL-terminated empty string with AT_EMPTY_PATH (the fd itself);
        // `st` is a valid, writable statx for the call.
        let r = unsafe {
            libc::statx(
                file.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                libc::STATX_DIOALIGN,
                &mut st,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOSYS) | Some(libc::EINVAL) => Ok(None),
                _ => Err(e),
            };
        }
        if st.stx_mask & libc::STATX_DIOALIGN == 0 {
            return Ok(None);
        }
        if st.stx_dio_offset_align == 0 {
            return Ok(Some(0));
        }
        Ok(Some(
            st.stx_dio_offset_align.max(st.stx_dio_mem_align) as usize
        ))
    }

    /// `statfs(path).f_type` (of the parent directory when `path` does not exist yet).
    pub fn fs_type(path: &Path) -> io::Result<u32> {
        let p = if path.exists() {
            path
        } else {
            path.parent().unwrap_or(Path::new("."))
        };
        let c = CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: an all-zero statfs is a valid value of this plain C struct.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is NUL-terminated and lives across the call; `st` is writable.
        let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // Magic numbers are 32-bit; f_type is a (sign-extended) long.
        Ok(st.f_type as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::store::{BlockStore, FileStore};
    use crate::volume::{CipherBackend, Volume, VolumeHeader, XtsKey};
    use std::path::PathBuf;

    /// A fresh directory on a file system with direct I/O (the temp dir, unless it is tmpfs:
    /// then under target/).
    fn dir(tag: &str) -> PathBuf {
        let base = if memory_fs(&std::env::temp_dir()).unwrap_or(true) {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tmp")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("cryptvol-direct-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A store over a direct-I/O file that demands 4 KiB alignment whatever the device's own
    /// (512 here, typically): the bounce and read-modify-write paths of a 4 KiB device.
    fn store_4k(path: &Path, len: u64) -> FileStore {
        std::fs::File::create(path).unwrap().set_len(len).unwrap();
        let (file, _) = open_direct(path, false).unwrap();
        FileStore::direct(file, ALIGN)
    }

    #[test]
    fn unaligned_transfers_match_a_model() {
        let d = dir("model");
        let p = d.join("f");
        let len = 64 * 1024u64;
        let s = store_4k(&p, len);
        assert_eq!(s.io_align(), 4096);
        let mut model = vec![0u8; len as usize];
        // Offsets and lengths off every granule, buffers at odd addresses too.
        let cases: [(u64, usize); 7] = [
            (1, 10),
            (4095, 2),
            (5000, 9000),
            (8192, 4096),
            (12288 + 511, 512),
            (0, 65536),
            (65536 - 7, 7),
        ];
        for (i, (off, n)) in cases.into_iter().enumerate() {
            let src: Vec<u8> = (0..n + 3).map(|k| (k * 31 + i * 7 + 1) as u8).collect();
            let data = &src[3..]; // an address off any alignment
            s.write_at(data, off).unwrap();
            model[off as usize..off as usize + n].copy_from_slice(data);
            let mut back = vec![0u8; n + 5];
            s.read_at(&mut back[5..], off).unwrap();
            assert_eq!(&back[5..], data, "case {i}");
        }
        let mut all = AlignedBuf::zeroed(len as usize);
        s.read_at(&mut all, 0).unwrap();
        assert!(all[..] == model[..]);
        // Past the end reads zeros; the file is the same bytes through the page cache.
        let mut past = vec![1u8; 100];
        s.read_at(&mut past, len + 10).unwrap();
        assert!(past.iter().all(|&b| b == 0));
        assert_eq!(std::fs::read(&p).unwrap()[..len as usize], model[..]);
        assert!(
            !s.read_at_nowait(&mut past, 0).unwrap(),
            "never the page-cache path"
        );
        assert!(s.writes_wait());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn memory_file_systems_are_refused_by_name() {
        let shm = Path::new("/dev/shm");
        if !memory_fs(shm).unwrap_or(false) {
            eprintln!("skipped: /dev/shm is not tmpfs here");
            return;
        }
        let p = shm.join(format!("cryptvol-direct-{}", std::process::id()));
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let e = open_direct(&p, false).unwrap_err().to_string();
        std::fs::remove_file(&p).unwrap();
        assert!(e.contains("tmpfs") && e.contains("O_DIRECT"), "{e}");
    }

    /// 512-byte units on a 4 KiB direct-I/O store: eight threads write neighbouring units of
    /// the same blocks at once. The store rewrites whole blocks, so without the volume's
    /// per-block locks one thread's read-modify-write would undo another's unit.
    #[test]
    fn sub_block_units_written_at_once_all_survive() {
        let d = dir("units");
        let p = d.join("v");
        let size = 8u64 << 20;
        let h = VolumeHeader::new(uuid::Uuid::new_v4(), size, 512, "k", 1, vec![1; 90]).unwrap();
        Volume::create(&p, &h).unwrap();
        let (file, _) = open_direct(&p, false).unwrap();
        let key: Vec<u8> = (0..64u8).collect();
        let v = Volume::open_with_store(
            Box::new(FileStore::direct(file, ALIGN)),
            XtsKey::new(&key).unwrap(),
            false,
            CipherBackend::default(),
        )
        .unwrap();
        let threads = 8u64;
        let start = std::sync::Barrier::new(threads as usize);
        std::thread::scope(|sc| {
            for t in 0..threads {
                let (v, start) = (&v, &start);
                sc.spawn(move || {
                    start.wait();
                    // Unit t of every block, in the same order: all threads share each block,
                    // at about the same time. A lost update leaves a unit reading as zeros.
                    for blk in 0..size / 4096 {
                        let mut b = AlignedBuf::zeroed(512);
                        b.fill(t as u8 + 1);
                        v.write_mut(blk * 4096 + t * 512, &mut b).unwrap();
                    }
                });
            }
        });
        let mut all = AlignedBuf::zeroed(size as usize);
        v.read(0, &mut all).unwrap();
        let lost: Vec<usize> = all
            .chunks(512)
            .enumerate()
            .filter(|(i, unit)| unit.iter().any(|&b| b != (i % 8) as u8 + 1))
            .map(|(i, _)| i)
            .collect();
        assert!(
            lost.is_empty(),
            "{} units lost, first {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
