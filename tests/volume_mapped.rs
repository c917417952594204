//! Reads through the mapping of a volume file on tmpfs (src/volume/mapped.rs): only tmpfs
//! files are mapped; reads decrypt straight from the mapping and match a model for both unit
//! sizes, thin and encrypt-zeroes volumes, holes, trims and unaligned ranges; a file truncated
//! under the mapping fails the read racing it with EIO instead of killing the process (a
//! SIGBUS) and later reads behave as `pread` always did (a truncation found before the read,
//! by `mincore`, reads as `pread` at once); through the daemon and real clients
//! (`nbdcopy`, `qemu-io`), a truncated volume fails its own reads while the daemon serves on.

mod common;
mod testdata;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use cryptvol::volume::header::FLAG_ENCRYPT_ZEROES;
use cryptvol::volume::{BlockStore, FileStore, Volume, VolumeHeader};
use uuid::Uuid;

use testdata::key;

fn noise(seed: u64, len: usize) -> Vec<u8> {
    testdata::pattern(len, seed)
}

fn shm() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").expect("/dev/shm")
}

/// A thin volume of `size` bytes (4 KiB units) on /dev/shm, open: (its dir, path, header).
fn shm_volume(size: u64) -> (tempfile::TempDir, std::path::PathBuf, VolumeHeader, Volume) {
    let d = shm();
    let path = d.path().join("v.cvol");
    let h = VolumeHeader::new(Uuid::new_v4(), size, 4096, "k", 1, vec![1; 64]).unwrap();
    Volume::create(&path, &h).unwrap();
    let v = Volume::open(&path, key(), false).unwrap();
    (d, path, h, v)
}

fn file(p: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .unwrap()
}

#[test]
fn tmpfs_files_are_mapped_and_disk_files_are_not() {
    let d = shm();
    let f = file(&d.path().join("a"));
    f.set_len(1 << 20).unwrap();
    f.write_all_at(&[9u8; 64 << 10], 0).unwrap();
    let s = FileStore::new(f);
    let w = s
        .mapped(4096, 8192)
        .expect("data in a file on tmpfs is mapped");
    assert!(w.bytes().iter().all(|&b| b == 9));
    w.finish().unwrap();
    assert!(s.mapped(1 << 20, 1).is_none(), "past the end");
    // A hole is read with pread: a fault there would allocate it.
    assert!(s.mapped(60 << 10, 8192).is_none(), "data then hole");
    assert!(s.mapped(512 << 10, 4096).is_none(), "hole");
    assert_eq!(common::file_blocks(&d.path().join("a")) * 512, 64 << 10);

    let d = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let f = file(&d.path().join("b"));
    f.set_len(1 << 20).unwrap();
    let on_tmpfs = {
        // SAFETY: statfs is plain old data; all zeros is a valid value.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        let p = std::ffi::CString::new(d.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path and a writable statfs for the call.
        unsafe { libc::statfs(p.as_ptr(), &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC }
    };
    assert_eq!(FileStore::new(f).mapped(0, 4096).is_some(), on_tmpfs);
}

/// Reading a sparse volume allocates nothing on tmpfs (its holes are not read through the
/// mapping), and its data still reads back.
#[test]
fn reading_holes_allocates_nothing() {
    let (_d, path, _h, v) = shm_volume(32 << 20);
    let data = noise(5, 1 << 20);
    v.write(8 << 20, &data).unwrap();
    let before = common::file_blocks(&path);
    let mut all = vec![0u8; 32 << 20];
    for _ in 0..2 {
        v.read(0, &mut all).unwrap();
        assert!(v.try_read(0, &mut all).unwrap());
    }
    assert_eq!(common::file_blocks(&path), before, "reads allocated blocks");
    assert!(all[8 << 20..9 << 20] == data[..]);
    assert!(
        all[..8 << 20]
            .iter()
            .chain(&all[9 << 20..])
            .all(|&b| b == 0)
    );
}

/// Random writes (whole units, unaligned, zeros), trims and write-zeroes on a volume on tmpfs;
/// after each step a read of a random range (and now and then all of it) equals the model.
#[test]
fn mapped_reads_match_a_model() {
    // Encrypt-zeroes needs units of the file system's block (4 KiB) at least.
    for (sector, ez) in [(512u32, false), (4096, false), (4096, true)] {
        {
            let d = shm();
            let path = d.path().join("v.cvol");
            let size: u64 = 4 << 20;
            let mut h =
                VolumeHeader::new(Uuid::new_v4(), size, sector, "k", 1, vec![1; 64]).unwrap();
            if ez {
                h.flags |= FLAG_ENCRYPT_ZEROES;
            }
            Volume::create(&path, &h).unwrap();
            let v = Volume::open(&path, key(), false).unwrap();
            let mut model = vec![0u8; size as usize];
            let mut x: u64 = 0x1234_5678 ^ u64::from(sector) ^ u64::from(ez);
            let mut next = |m: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % m
            };
            for step in 0..300u64 {
                let s = u64::from(sector);
                let (off, len) = match next(4) {
                    // Whole units, up to 1.5 MiB (several pieces of a read).
                    0 => (next(size / s) * s, (1 + next(384)) * s),
                    // Anywhere, any length.
                    1 => (next(size), 1 + next(300_000)),
                    // Unit-aligned start, ragged end.
                    2 => (next(size / s) * s, 1 + next(3 * s)),
                    _ => (next(size - 1), 1 + next(s)),
                };
                let len = len.min(size - off);
                let (o, l) = (off as usize, len as usize);
                match next(6) {
                    0 => {
                        v.trim(off, len).unwrap();
                        model[o..o + l].fill(0);
                    }
                    1 => {
                        v.write(off, &vec![0u8; l]).unwrap();
                        model[o..o + l].fill(0);
                    }
                    _ => {
                        let data = noise(step + 1, l);
                        v.write(off, &data).unwrap();
                        model[o..o + l].copy_from_slice(&data);
                    }
                }
                let (ro, rl) = (next(size), 1 + next(2 << 20));
                let rl = rl.min(size - ro) as usize;
                let mut got = vec![0xa5u8; rl];
                v.read(ro, &mut got).unwrap();
                assert!(
                    got[..] == model[ro as usize..ro as usize + rl],
                    "sector {sector} ez {ez} step {step}: read {ro}+{rl} differs"
                );
                if step % 50 == 49 {
                    let mut all = vec![0u8; size as usize];
                    v.read(0, &mut all).unwrap();
                    assert!(
                        all == model,
                        "sector {sector} ez {ez} step {step}: whole volume"
                    );
                    // What try_read (the connection thread's cached read) sees, too.
                    assert!(v.try_read(0, &mut all).unwrap() && all == model);
                }
            }
        }
    }
}

/// Without a remembered span a read first asks `mincore`: pages cut off are not resident, so
/// the read takes `pread` (zeros past the end, as before the mapping) and no SIGBUS happens.
#[test]
fn a_truncation_seen_by_mincore_reads_as_pread() {
    let (_d, path, h, v) = shm_volume(1 << 20);
    let data = noise(9, 1 << 20);
    v.write(0, &data).unwrap();
    let mut got = vec![0u8; 1 << 20];
    v.read(0, &mut got).unwrap();
    assert!(got == data);
    file(&path).set_len(h.data_offset + 8192).unwrap();
    v.read(0, &mut got).unwrap();
    assert!(got[..8192] == data[..8192]);
    assert!(got[8192..].iter().all(|&b| b == 0));
}

#[test]
fn a_file_truncated_under_the_mapping_fails_the_racing_read_not_the_process() {
    let (_d, path, h, v) = shm_volume(4 << 20);
    let data = noise(7, 4 << 20);
    v.write(0, &data).unwrap();
    let mut got = vec![0u8; 4 << 20];
    v.read(0, &mut got).unwrap();
    assert!(got == data);
    // A BLOCK_STATUS: the store remembers the data span (`dataspan.rs`), so reads in it take
    // the mapping without asking mincore.
    assert_eq!(v.extents(0, 4 << 20).unwrap(), vec![(4 << 20, false)]);
    // Another process cuts the file to its headers and the first 64 KiB of data.
    let cut = h.data_offset + (64 << 10);
    file(&path).set_len(cut).unwrap();
    // The read that runs into the missing pages: EIO, not zeros, not a dead process.
    let err = v.read(0, &mut got).unwrap_err();
    assert!(
        format!("{err:?}").contains("Os { code: 5") || err.to_string().contains("I/O error"),
        "expected EIO, got {err:?}"
    );
    // From then on reads take pread: data before the cut, zeros after (a short file reads
    // as zeros, as it always did); the process is alive to say so.
    v.read(0, &mut got).unwrap();
    assert!(got[..64 << 10] == data[..64 << 10]);
    assert!(got[64 << 10..].iter().all(|&b| b == 0));
    // And writes still land (pwrite extends the file again).
    v.write(1 << 20, &data[..8192]).unwrap();
    let mut back = vec![0u8; 8192];
    v.read(1 << 20, &mut back).unwrap();
    assert!(back == data[..8192]);
    let f = file(&path);
    let mut raw = vec![0u8; 16];
    f.read_exact_at(&mut raw, h.data_offset + (1 << 20))
        .unwrap();
    assert!(raw != data[..16], "stored encrypted");
}

/// Through the daemon on tmpfs: `nbdcopy` in and out round-trips (the out direction reads
/// through the mapping), `qemu-io` reads at unaligned offsets; a volume whose file another
/// process truncates fails its reads, and the daemon serves its other volume on.
#[test]
fn daemon_on_tmpfs_serves_reads_from_the_mapping_and_survives_a_truncated_file() {
    if !common::tools_present("volume_mapped daemon", &["nbdcopy", "qemu-io"]) {
        return;
    }
    let mut env = common::Env::with_config_in(Path::new("/dev/shm"), |_| String::new());
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    env.attach_new("a", "8M");
    env.attach_new("b", "8M");
    let src = env.dir.path().join("src.img");
    std::fs::write(&src, noise(3, 8 << 20)).unwrap();
    for vol in ["a", "b"] {
        let ok = Command::new("nbdcopy")
            .arg(&src)
            .arg(env.uri(vol))
            .status()
            .unwrap();
        assert!(ok.success(), "nbdcopy into {vol}");
        let out = env.dir.path().join(format!("{vol}.out"));
        let ok = Command::new("nbdcopy")
            .arg(env.uri(vol))
            .arg(&out)
            .status()
            .unwrap();
        assert!(ok.success(), "nbdcopy out of {vol}");
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(&src).unwrap(),
            "{vol} round trip"
        );
    }
    // Unaligned reads and writes through qemu-io, read back with a pattern check.
    common::ok_io(&env.uri("b"), "write -P 0x3c 5000 70001");
    common::ok_io(&env.uri("b"), "read -P 0x3c 5000 70001");

    // Another process truncates a's file to its headers.
    let path = env.volume_path("a");
    file(&path).set_len(1 << 20).unwrap();
    let o = Command::new("nbdcopy")
        .arg(env.uri("a"))
        .arg("null:")
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "reading a truncated volume must fail at least once (the racing read)"
    );
    // The daemon is alive and serves b as before.
    let out = env.dir.path().join("b2.out");
    let ok = Command::new("nbdcopy")
        .arg(env.uri("b"))
        .arg(&out)
        .status()
        .unwrap();
    assert!(ok.success(), "b after a's truncation");
    let mut want = std::fs::read(&src).unwrap();
    want[5000..75001].fill(0x3c);
    assert!(std::fs::read(&out).unwrap() == want, "b's data");
    assert!(
        env.log().contains("shrank under its mapping"),
        "the daemon says what happened: {}",
        env.log()
    );
    env.json(&["volume", "list"]);
}
