//! Volume: byte-range I/O over the encrypted format — round trips, read-modify-write edges,
//! concurrent sub-sector writers, holes, header copies and crash cuts, and the on-disk format
//! read back by an independent XTS implementation (Python `cryptography`).

mod testdata;

use std::sync::Arc;

use cryptvol::volume::header::{COPY_OFFSETS, HEADER_COPY_LEN};
use cryptvol::volume::{BlockStore, CipherBackend, MemStore, Volume, VolumeHeader, XtsKey};
use uuid::Uuid;

fn dek(seed: u8) -> Vec<u8> {
    (0..64u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(seed))
        .collect()
}

fn header(size: u64, sector: u32) -> VolumeHeader {
    VolumeHeader::new(Uuid::new_v4(), size, sector, "key-1", 1, vec![1; 100]).unwrap()
}

/// A volume over an in-memory store that the test can still inspect.
fn mem_volume(size: u64, sector: u32) -> (Volume, Arc<MemStore>) {
    let store = Arc::new(MemStore::new());
    Volume::create_with_store(&store.clone(), &header(size, sector)).unwrap();
    let v = Volume::open_with_store(
        Box::new(store.clone()),
        XtsKey::new(&dek(1)).unwrap(),
        false,
        CipherBackend::AwsLc,
    )
    .unwrap();
    (v, store)
}

use testdata::pattern;

#[test]
fn round_trips_and_rmw_edges_match_a_plain_model() {
    for sector in [512u32, 4096] {
        let size = 256 * 1024;
        let (v, _) = mem_volume(size, sector);
        let mut model = vec![0u8; size as usize];
        let s = sector as u64;
        // 1 byte at sector ends and starts, spans across sectors, whole-sector and odd runs.
        let cases: Vec<(u64, usize)> = vec![
            (0, 1),
            (s - 1, 1),
            (s, 1),
            (s - 1, 2),
            (3 * s - 7, 2 * s as usize + 14),
            (5 * s, 4 * s as usize),
            (size - 1, 1),
            (size - 3 * s - 5, 3 * s as usize + 5),
            (12345, 54321),
        ];
        for (i, (off, len)) in cases.into_iter().enumerate() {
            let data = pattern(len, i as u64 + 1);
            v.write(off, &data).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
            let mut all = vec![0u8; size as usize];
            v.read(0, &mut all).unwrap();
            assert!(all == model, "sector {sector} case {i}");
        }
        // write_mut on aligned data, read at odd offsets
        let mut d = pattern(8 * s as usize, 99);
        let keep = d.clone();
        v.write_mut(16 * s, &mut d).unwrap();
        model[16 * s as usize..24 * s as usize].copy_from_slice(&keep);
        let mut part = vec![0u8; 333];
        v.read(16 * s + 77, &mut part).unwrap();
        assert_eq!(part, model[(16 * s + 77) as usize..(16 * s + 410) as usize]);
    }
}

#[test]
fn out_of_range_is_refused_and_writes_nothing() {
    let (v, store) = mem_volume(64 * 1024, 4096);
    let before = store.snapshot();
    assert!(v.write(64 * 1024 - 1, &[1, 2]).is_err());
    assert!(v.write(u64::MAX, &[1]).is_err());
    assert!(v.read(64 * 1024, &mut [0u8; 1]).is_err());
    assert!(v.write_zeroes(60 * 1024, 8192, true).is_err());
    assert_eq!(store.snapshot(), before);
}

#[test]
fn concurrent_sub_sector_writers_never_lose_an_update() {
    // 8 threads each own a 512-byte slot inside the same 4096-byte sectors and rewrite it many
    // times; each RMW must keep the others' latest data.
    let (v, _) = mem_volume(64 * 1024, 4096);
    let v = Arc::new(v);
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let v = v.clone();
            std::thread::spawn(move || {
                for round in 0..2000u32 {
                    let sector = u64::from(round % 4);
                    let val = [(t as u8) ^ (round as u8); 512];
                    v.write(sector * 4096 + t * 512, &val).unwrap();
                    let mut back = [0u8; 512];
                    v.read(sector * 4096 + t * 512, &mut back).unwrap();
                    assert_eq!(back, val, "thread {t} round {round}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for t in 0..8u64 {
        for sector in 0..4u64 {
            let last = (0..2000u32)
                .rev()
                .find(|r| u64::from(r % 4) == sector)
                .unwrap();
            let mut back = [0u8; 512];
            v.read(sector * 4096 + t * 512, &mut back).unwrap();
            assert_eq!(back, [(t as u8) ^ (last as u8); 512]);
        }
    }
}

#[test]
fn whole_unit_writers_and_partial_writers_serialize_per_unit() {
    // Whole-unit writes share their stripe; a partial write's read-modify-write holds it
    // alone. Per unit, one thread rewrites the whole unit (value w) while another rewrites
    // its first half (value p), each in increasing order. Any serial order of the two ends in
    // either all-w_last, or p_last then w_last; a partial write that read the unit before a
    // whole write and stored after it would leave an older w in the second half. Large
    // writes spanning every stripe (the 1 MiB case) run at the same time.
    const UNITS: u64 = 4;
    const ROUNDS: u8 = 250;
    let (v, _) = mem_volume(4 << 20, 4096);
    let v = Arc::new(v);
    let mut threads = Vec::new();
    for unit in 0..UNITS {
        let whole = v.clone();
        threads.push(std::thread::spawn(move || {
            for w in 1..=ROUNDS {
                whole.write(unit * 4096, &[w; 4096]).unwrap();
            }
        }));
        let part = v.clone();
        threads.push(std::thread::spawn(move || {
            for p in 1..=ROUNDS {
                part.write(unit * 4096, &[p; 2048]).unwrap();
            }
        }));
    }
    let big = v.clone();
    threads.push(std::thread::spawn(move || {
        // Units 16.. (every stripe locked shared, none of the units above touched).
        for i in 0..20u8 {
            big.write(1 << 20, &vec![i; 2 << 20]).unwrap();
        }
    }));
    for t in threads {
        t.join().unwrap();
    }
    for unit in 0..UNITS {
        let mut back = vec![0u8; 4096];
        v.read(unit * 4096, &mut back).unwrap();
        assert!(
            back[2048..].iter().all(|&b| b == ROUNDS),
            "unit {unit}: second half holds an older whole write"
        );
        assert!(
            back[..2048].iter().all(|&b| b == ROUNDS),
            "unit {unit}: first half is neither the last whole nor the last partial write"
        );
    }
    let mut back = vec![0u8; 2 << 20];
    v.read(1 << 20, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 19));
}

#[test]
fn holes_read_as_zeros_and_trim_frees() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.cvol");
    Volume::create(&path, &header(8 << 20, 4096)).unwrap();
    let v = Volume::open(&path, XtsKey::new(&dek(2)).unwrap(), false).unwrap();
    let mut buf = vec![1u8; 8192];
    v.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "never-written reads as zeros");
    assert!(
        v.extents(0, 8 << 20).unwrap().iter().all(|e| e.1),
        "all hole"
    );
    v.write(1 << 20, &pattern(1 << 20, 5)).unwrap();
    v.flush().unwrap();
    let ext = v.extents(0, 8 << 20).unwrap();
    assert!(ext.iter().any(|e| !e.1), "{ext:?}");
    v.trim(1 << 20, 1 << 20).unwrap();
    v.read(1 << 20, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "trimmed reads as zeros");
    assert!(
        v.extents(0, 8 << 20).unwrap().iter().all(|e| e.1),
        "trim punched the hole"
    );
    // Partial trim zeroes only its range.
    v.write(0, &[7u8; 4096]).unwrap();
    v.trim(100, 200).unwrap();
    let mut s = [0u8; 4096];
    v.read(0, &mut s).unwrap();
    assert!(
        s[..100].iter().all(|&b| b == 7)
            && s[100..300].iter().all(|&b| b == 0)
            && s[300..].iter().all(|&b| b == 7)
    );
    // No plaintext in the file.
    let raw = std::fs::read(&path).unwrap();
    assert!(!raw.windows(64).any(|w| w.iter().all(|&b| b == 7)));
}

#[test]
fn header_copy_corruption_and_crash_cuts() {
    let store = MemStore::new();
    let h = header(1 << 20, 512);
    Volume::create_with_store(&store, &h).unwrap();
    // Either copy damaged: the other is used; both: a clear error.
    for copy_at in COPY_OFFSETS {
        let s2 = MemStore::new();
        s2.write_at(&store.snapshot(), 0).unwrap();
        s2.write_at(&[0xff; 16], copy_at + 40).unwrap();
        let v = Volume::open_with_store(
            Box::new(s2),
            XtsKey::new(&dek(3)).unwrap(),
            false,
            CipherBackend::Soft,
        )
        .unwrap();
        assert_eq!(v.header().volume_id, h.volume_id);
    }
    let s3 = MemStore::new();
    s3.write_at(&store.snapshot(), 0).unwrap();
    s3.write_at(&[0xff; 16], 40).unwrap();
    s3.write_at(&[0xff; 16], HEADER_COPY_LEN as u64 + 40)
        .unwrap();
    let e = Volume::open_with_store(
        Box::new(s3),
        XtsKey::new(&dek(3)).unwrap(),
        false,
        CipherBackend::Soft,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("header"), "{e}");

    // A rewrite (rewrap) cut after every possible byte count leaves the old or the new header.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.cvol");
    Volume::create(&path, &h).unwrap();
    let original = std::fs::read(&path).unwrap();
    let mut newer = h.clone();
    newer.key_version = 2;
    newer.wrapped_dek = vec![2; 90];
    for cut in (0..2 * HEADER_COPY_LEN as u64)
        .step_by(61)
        .chain([4095, 4096, 4097, 8191])
    {
        let s = MemStore::new();
        s.write_at(&original[..2 * HEADER_COPY_LEN], 0).unwrap();
        s.set_len(original.len() as u64).unwrap();
        s.fail_after(cut, libc::EIO);
        let _ = cryptvol_rewrite(&s, &newer);
        let mut a = vec![0u8; HEADER_COPY_LEN];
        let mut b = vec![0u8; HEADER_COPY_LEN];
        s.read_at(&mut a, 0).unwrap();
        s.read_at(&mut b, HEADER_COPY_LEN as u64).unwrap();
        let (got, _) = VolumeHeader::choose(&a, &b).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert!(got.key_version == 1 || got.key_version == 2, "cut at {cut}");
    }
}

/// Rewrites a header through the public API on a store (via a temp file would hide the cut).
fn cryptvol_rewrite(s: &MemStore, h: &VolumeHeader) -> Result<(), cryptvol::volume::VolumeError> {
    cryptvol::volume::rewrite_header(s, h).map(|_| ())
}

#[test]
fn grow_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.cvol");
    Volume::create(&path, &header(1 << 20, 4096)).unwrap();
    let data = pattern(1 << 20, 9);
    {
        let v = Volume::open(&path, XtsKey::new(&dek(4)).unwrap(), false).unwrap();
        v.write(0, &data).unwrap();
        v.flush().unwrap();
    }
    assert!(Volume::grow(&path, 1 << 19).is_err(), "shrink refused");
    let h = Volume::grow(&path, 4 << 20).unwrap();
    assert_eq!(h.size, 4 << 20);
    let v = Volume::open(&path, XtsKey::new(&dek(4)).unwrap(), false).unwrap();
    let mut back = vec![0u8; 1 << 20];
    v.read(0, &mut back).unwrap();
    assert_eq!(back, data);
    v.write((4 << 20) - 10, &[5; 10]).unwrap();
}

#[test]
fn data_area_decrypts_with_python_cryptography() {
    let py = std::env::var("CRYPTVOL_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    let probe = std::process::Command::new(&py)
        .args(["-c", "import cryptography"])
        .status();
    if !matches!(probe, Ok(s) if s.success()) {
        eprintln!("SKIP: {py} has no `cryptography` module (install python3-cryptography)");
        return;
    }
    for sector in [512u32, 4096] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.cvol");
        Volume::create(&path, &header(1 << 20, sector)).unwrap();
        let key = dek(5);
        let v = Volume::open(&path, XtsKey::new(&key).unwrap(), false).unwrap();
        let data = pattern(64 * 1024, 77);
        v.write(8 * u64::from(sector), &data).unwrap();
        v.flush().unwrap();
        // Python decrypts data units 8.. with tweak = unit index (LE) and compares.
        let script = format!(
            "import sys\nfrom cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes\n\
             key=bytes.fromhex('{k}'); s={sector}; raw=open('{p}','rb').read()[1048576:]\n\
             out=b''\nfor i in range(8, 8 + {n}):\n  d=Cipher(algorithms.AES(key), modes.XTS(i.to_bytes(16,'little'))).decryptor()\n  out+=d.update(raw[i*s:(i+1)*s])+d.finalize()\n\
             sys.stdout.write(out.hex())\n",
            k = hex::encode(&key),
            p = path.display(),
            n = data.len() / sector as usize
        );
        let o = std::process::Command::new(&py)
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            String::from_utf8(o.stdout).unwrap(),
            hex::encode(&data),
            "sector {sector}"
        );
    }
}

#[test]
fn try_read_serves_cached_data_and_declines_cold_data() {
    // On a disk file system (the target dir; tmpfs cannot say "not cached" and always reads).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("v.img");
    Volume::create(&path, &header(8 << 20, 4096)).unwrap();
    let v = Volume::open(&path, XtsKey::new(&dek(3)).unwrap(), false).unwrap();
    let data = pattern(1 << 20, 11);
    v.write(4096, &data).unwrap();
    v.flush().unwrap();

    // Cached (just written): served, and equal to a plain read.
    let mut got = vec![0u8; data.len()];
    assert!(v.try_read(4096, &mut got).unwrap());
    assert!(got == data, "try_read of cached data differs");
    // A sub-unit read inside cached data too.
    let mut part = vec![0u8; 100];
    assert!(v.try_read(4096 + 1000, &mut part).unwrap());
    assert_eq!(part, data[1000..1100]);

    // Cold: drop the file's (clean) pages from the page cache.
    let f = std::fs::File::open(&path).unwrap();
    // SAFETY: plain syscall on an fd we own; no memory is passed.
    let r = unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    assert_eq!(r, 0);
    let tmpfs = is_tmpfs(dir.path());
    let mut cold = vec![0u8; data.len()];
    let served = v.try_read(4096, &mut cold).unwrap();
    if tmpfs {
        eprintln!("target dir is on tmpfs: RWF_NOWAIT unsupported, try_read reads");
        assert!(served && cold == data);
    } else {
        assert!(!served, "try_read of uncached data must decline, not wait");
    }
    // The waiting read still returns the data, and warms the cache for the next try.
    v.read(4096, &mut cold).unwrap();
    assert!(cold == data);
    assert!(v.try_read(4096, &mut got).unwrap() && got == data);
    // Out of range is still an error, not a decline.
    assert!(v.try_read(8 << 20, &mut [0u8; 1]).is_err());
}

fn is_tmpfs(p: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: statfs is plain old data; all zeros is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statfs for the call.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    r == 0 && st.f_type == libc::TMPFS_MAGIC
}
