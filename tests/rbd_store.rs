//! Volumes on Ceph RBD images, against a real throwaway cluster (tests/ceph/micro-ceph.sh):
//! the same `Volume` over `RbdStore` round-trips data (512 and 4096-byte sectors, unaligned
//! read-modify-write), trims to holes, stores exactly the file format (`rbd export` decrypts
//! with Python `cryptography`), fences an old writer with the exclusive lock and blocklist,
//! and fails I/O (no hang, no panic) when the cluster goes away.
#![cfg(feature = "rbd")]

mod ceph_support;
mod testdata;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use ceph_support::{CLIENT_A, CLIENT_B, MicroCeph, POOL};
use cryptvol::volume::rbd::{Cluster, Image, LockError, RbdStore};
use cryptvol::volume::{
    BlockStore, CipherBackend, DATA_OFFSET, Volume, VolumeError, VolumeHeader, XtsKey,
    rewrite_header,
};
use uuid::Uuid;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
/// 64 KiB objects: trims of a few objects free them, and the OSD's RAM stays small.
const ORDER: u8 = 16;

fn dek(seed: u8) -> Vec<u8> {
    (0..64u8)
        .map(|i| i.wrapping_mul(29).wrapping_add(seed))
        .collect()
}

use testdata::pattern;

/// Creates image `name` (just big enough) and a fresh volume of `size` bytes in it.
fn create_volume(cluster: &Cluster, name: &str, size: u64, sector: u32) {
    let io = cluster.ioctx(POOL).unwrap();
    io.create_image(name, DATA_OFFSET + size, Some(ORDER))
        .unwrap();
    let store = RbdStore::new(io.open(name).unwrap());
    let h = VolumeHeader::new(Uuid::new_v4(), size, sector, "key-1", 1, vec![7; 100]).unwrap();
    Volume::create_with_store(&store, &h).unwrap();
}

fn open_volume(image: Image, seed: u8) -> Volume {
    Volume::open_with_store(
        Box::new(RbdStore::new(image)),
        XtsKey::new(&dek(seed)).unwrap(),
        false,
        CipherBackend::AwsLc,
    )
    .unwrap()
}

fn errno(e: &VolumeError) -> Option<i32> {
    match e {
        VolumeError::Io(io) => io.raw_os_error(),
        _ => None,
    }
}

#[test]
fn volume_round_trips_on_an_rbd_image_with_rmw_and_holes() {
    let Some(mc) = MicroCeph::start("volume_round_trips_on_an_rbd_image_with_rmw_and_holes") else {
        return;
    };
    let cluster = mc.connect(CLIENT_A);
    let io = cluster.ioctx(POOL).unwrap();
    for sector in [512u32, 4096] {
        let name = format!("rt-{sector}");
        let size = 2 * MIB;
        create_volume(&cluster, &name, size, sector);
        assert!(io.list_images().unwrap().contains(&name));
        let v = open_volume(io.open(&name).unwrap(), 1);
        assert_eq!(v.size(), size);
        let s = u64::from(sector);
        let mut model = vec![0u8; size as usize];
        // Unaligned starts and ends (read-modify-write of partial units), whole units, a run
        // across an object boundary (64 KiB), and the last byte.
        let cases: Vec<(u64, usize)> = vec![
            (0, 1),
            (s - 1, 2),
            (3 * s - 7, 2 * s as usize + 14),
            (10 * s, 8 * s as usize),
            (64 * KIB - 100, 300),
            (100 * KIB + 3, 200 * KIB as usize),
            (size - 1, 1),
        ];
        for (i, (off, len)) in cases.iter().enumerate() {
            let data = pattern(*len, i as u64 + 1);
            v.write(*off, &data).unwrap();
            model[*off as usize..*off as usize + len].copy_from_slice(&data);
            let mut back = vec![0u8; *len];
            v.read(*off, &mut back).unwrap();
            assert_eq!(back, data, "sector {sector} case {i}");
        }
        v.flush().unwrap();
        // Sub-unit reads at odd offsets match the model.
        for (off, len) in [(1u64, 5usize), (s + 3, 2 * s as usize), (64 * KIB - 1, 2)] {
            let mut back = vec![0u8; len];
            v.read(off, &mut back).unwrap();
            assert_eq!(
                back,
                model[off as usize..off as usize + len],
                "read {off}+{len}"
            );
        }

        // Trim: four whole objects of the data area become holes and read as zeros; a
        // partial unit at the edge is zeroed by read-modify-write.
        let (t_off, t_len) = (128 * KIB, 256 * KIB);
        v.write(t_off, &pattern(t_len as usize, 99)).unwrap();
        v.trim(t_off, t_len).unwrap();
        model[t_off as usize..(t_off + t_len) as usize].fill(0);
        let ext = v.extents(t_off, t_len).unwrap();
        assert_eq!(ext, vec![(t_len, true)], "trimmed objects are holes");
        let ext = v.extents(0, 2 * 64 * KIB).unwrap();
        assert!(
            ext.iter().all(|&(_, hole)| !hole),
            "written objects are data: {ext:?}"
        );
        // Whole units inside an object (librbd's discard would skip these: below its
        // 64 KiB granularity) must read as zeros too.
        let (p_off, p_len) = (512 * KIB + 4096, 8192);
        v.write(p_off - 4096, &pattern(16384, 98)).unwrap();
        model[(p_off - 4096) as usize..(p_off + 12288) as usize]
            .copy_from_slice(&pattern(16384, 98));
        v.trim(p_off, p_len).unwrap();
        model[p_off as usize..(p_off + p_len) as usize].fill(0);
        v.trim(3 * s - 5, 3).unwrap();
        model[(3 * s - 5) as usize..(3 * s - 2) as usize].fill(0);

        // Everything again, through a fresh open (nothing was cached in this process).
        drop(v);
        let v = open_volume(io.open(&name).unwrap(), 1);
        let mut all = vec![0u8; size as usize];
        v.read(0, &mut all).unwrap();
        assert!(
            all == model,
            "sector {sector}: volume differs from the model"
        );
        // Out of range and a wrong key are refused as for files.
        assert!(matches!(
            v.write(size - 1, &[1, 2]),
            Err(VolumeError::OutOfRange)
        ));
        drop(v);
        let other = open_volume(io.open(&name).unwrap(), 2);
        let mut first = vec![0u8; 64];
        other.read(0, &mut first).unwrap();
        assert_ne!(first, model[..64], "another key does not decrypt the data");
        let mut h = other.header().clone();
        drop(other);

        // Grow, as a detached file volume grows: resize, then the header (both copies).
        let store = RbdStore::new(io.open(&name).unwrap());
        h.size = size + MIB;
        store.set_len(DATA_OFFSET + h.size).unwrap();
        rewrite_header(&store, &h).unwrap();
        let v = open_volume(store.into_image(), 1);
        assert_eq!(v.size(), size + MIB);
        v.write(size + MIB - 10, &[5; 10]).unwrap();
        let mut all = vec![0u8; (size + MIB) as usize];
        v.read(0, &mut all).unwrap();
        assert!(all[..size as usize] == model, "data kept across the grow");
        assert_eq!(&all[(size + MIB - 10) as usize..], &[5; 10]);
        drop(v);
        io.remove_image(&name).unwrap();
    }
    assert!(io.list_images().unwrap().is_empty());

    // Bad input: clear errors, no hang.
    let e = io
        .open("no-such-image")
        .err()
        .expect("opened a missing image");
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    io.create_image("twice", MIB, Some(ORDER)).unwrap();
    let e = io.create_image("twice", MIB, Some(ORDER)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "{e}");
    let e = io.open("bad\0name").err().expect("a NUL in a name");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    let mut stranger = mc.config("nobody", Duration::from_secs(3));
    stranger.mount_timeout = Duration::from_secs(3);
    let e = Cluster::connect(&stranger)
        .err()
        .expect("a user the cluster does not know");
    assert!(e.to_string().contains("client.nobody"), "{e}");
    let mut no_conf = mc.config(CLIENT_A, Duration::from_secs(3));
    no_conf.conf = mc.dir().join("missing.conf");
    let e = Cluster::connect(&no_conf).err().expect("a missing conf");
    assert!(e.to_string().contains("missing.conf"), "{e}");
}

#[test]
fn rbd_export_decrypts_with_python_cryptography() {
    let py = std::env::var("CRYPTVOL_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    let probe = std::process::Command::new(&py)
        .args(["-c", "import cryptography"])
        .status();
    if !matches!(probe, Ok(s) if s.success()) {
        eprintln!("SKIP: {py} has no `cryptography` module (install python3-cryptography)");
        return;
    }
    let Some(mc) = MicroCeph::start("rbd_export_decrypts_with_python_cryptography") else {
        return;
    };
    let cluster = mc.connect(CLIENT_A);
    let io = cluster.ioctx(POOL).unwrap();
    for sector in [512u32, 4096] {
        let name = format!("exp-{sector}");
        create_volume(&cluster, &name, MIB, sector);
        let v = open_volume(io.open(&name).unwrap(), 5);
        let data = pattern(64 * 1024, 77);
        let first = 8u64; // first unit written
        v.write(first * u64::from(sector), &data).unwrap();
        // An unaligned write in a later unit (read-modify-write): bytes around it stay zero.
        let rmw_at = 200 * u64::from(sector) + 3;
        v.write(rmw_at, b"cryptvol").unwrap();
        v.flush().unwrap();
        v.extents(0, MIB).unwrap();

        // Exported by another client's CLI while the volume is open, as the cluster has it.
        let file = mc.dir().join(format!("{name}.raw"));
        let out = mc.rbd(CLIENT_B, &["export", &name, file.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let raw = std::fs::read(&file).unwrap();
        assert_eq!(raw.len() as u64, DATA_OFFSET + MIB);
        assert_eq!(&raw[0..8], b"CRYPTVOL", "header copy A");
        assert_eq!(&raw[4096..4104], b"CRYPTVOL", "header copy B");
        let s = sector as usize;
        let ct = &raw[DATA_OFFSET as usize..];
        assert_ne!(
            &ct[first as usize * s..first as usize * s + 64],
            &data[..64],
            "stored in clear"
        );
        assert!(
            ct[..first as usize * s].iter().all(|&b| b == 0),
            "never-written units are zeros"
        );

        // Python decrypts units 8.. and 200 with tweak = unit index (LE), independently.
        let script = format!(
            "import sys\nfrom cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes\n\
             key=bytes.fromhex('{k}'); s={sector}; raw=open('{p}','rb').read()[1048576:]\n\
             def dec(i):\n  d=Cipher(algorithms.AES(key), modes.XTS(i.to_bytes(16,'little'))).decryptor()\n  return d.update(raw[i*s:(i+1)*s])+d.finalize()\n\
             out=b''.join(dec(i) for i in range({first}, {first} + {n}))\n\
             sys.stdout.write(out.hex() + ' ' + dec(200).hex())\n",
            k = hex::encode(dek(5)),
            p = file.display(),
            n = data.len() / s,
        );
        let o = std::process::Command::new(&py)
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8(o.stdout).unwrap();
        let (bulk, unit200) = text.split_once(' ').unwrap();
        assert_eq!(bulk, hex::encode(&data), "sector {sector}: bulk units");
        let mut want = vec![0u8; s];
        want[3..11].copy_from_slice(b"cryptvol");
        assert_eq!(unit200, hex::encode(&want), "sector {sector}: RMW unit");
    }
}

#[test]
fn exclusive_lock_refuses_a_second_writer_and_break_fences_the_first() {
    let Some(mc) = MicroCeph::start("exclusive_lock_refuses_a_second_writer") else {
        return;
    };
    let (a, b) = (mc.connect(CLIENT_A), mc.connect(CLIENT_B));
    create_volume(&a, "locked", MIB, 4096);
    let img_a = a.ioctx(POOL).unwrap().open("locked").unwrap();
    assert_eq!(
        img_a.lock_owner().unwrap(),
        None,
        "a fresh image has no lock owner"
    );
    img_a.lock_exclusive("host-a").unwrap();
    img_a.lock_release().unwrap();
    assert_eq!(img_a.lock_owner().unwrap(), None, "released");
    img_a.lock_exclusive("host-a").unwrap();
    assert!(img_a.is_lock_owner().unwrap());
    let va = open_volume(img_a, 3);
    va.write(0, &[0xaa; 4096]).unwrap();

    // B: acquire refused, naming A (its session address and its label); writes refused.
    let img_b = b.ioctx(POOL).unwrap().open("locked").unwrap();
    let owner = match img_b.lock_exclusive("host-b") {
        Err(LockError::Held { image, owner }) => {
            assert_eq!(image, "locked");
            owner
        }
        other => panic!("B's acquire should be refused, got {other:?}"),
    };
    assert_eq!(owner.address, a.addrs().unwrap());
    assert_eq!(owner.label.as_deref(), Some("host-a"));
    let held = img_b.lock_exclusive("host-b").unwrap_err().to_string();
    assert!(held.contains("host-a"), "error names the holder: {held}");
    assert_eq!(img_b.lock_owner().unwrap(), Some(owner.clone()));
    let e = img_b.write(&[0xbb; 4096], DATA_OFFSET).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "B's write: {e}");
    va.write(4096, &[0xab; 4096]).unwrap(); // A still writes

    // A read-only open takes no lock: it reads A's data beside A; its writes are refused.
    let ro = b.ioctx(POOL).unwrap().open_read_only("locked").unwrap();
    assert!(matches!(ro.lock_exclusive("ro"), Err(LockError::Io(_))));
    let e = ro.write(&[0xcc; 4096], DATA_OFFSET).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "read-only write: {e}");
    let vro = Volume::open_with_store(
        Box::new(RbdStore::new(ro)),
        XtsKey::new(&dek(3)).unwrap(),
        true,
        CipherBackend::AwsLc,
    )
    .unwrap();
    let mut back = vec![0u8; 8192];
    vro.read(0, &mut back).unwrap();
    assert!(back[..4096].iter().all(|&x| x == 0xaa) && back[4096..].iter().all(|&x| x == 0xab));
    drop(vro);

    // B breaks the lock (blocklisting A) and takes it.
    img_b.lock_break(&owner).unwrap();
    img_b.lock_exclusive("host-b").unwrap();
    let now = img_b.lock_owner().unwrap().unwrap();
    assert_eq!(now.address, b.addrs().unwrap());
    assert_eq!(now.label.as_deref(), Some("host-b"));

    // A is fenced: its writes fail with ESHUTDOWN (EBLOCKLISTED) and reach nothing.
    let e = va.write(0, &[0xee; 4096]).unwrap_err();
    assert_eq!(
        errno(&e),
        Some(libc::ESHUTDOWN),
        "A's write after the break: {e}"
    );
    let e = va.write(8192, &[0xee; 4096]).unwrap_err();
    assert_eq!(errno(&e), Some(libc::ESHUTDOWN), "and every later one: {e}");
    let vb = open_volume(img_b, 3);
    let mut back = vec![0u8; 3 * 4096];
    vb.read(0, &mut back).unwrap();
    assert!(
        back[..4096].iter().all(|&x| x == 0xaa),
        "A's write before the break kept"
    );
    assert!(back[4096..8192].iter().all(|&x| x == 0xab));
    assert!(
        back[8192..].iter().all(|&x| x == 0),
        "nothing A wrote after the break"
    );
    vb.write(0, &[0xbb; 4096]).unwrap();
    vb.flush().unwrap();
    drop(va);
    let mut back = vec![0u8; 4096];
    vb.read(0, &mut back).unwrap();
    assert!(back.iter().all(|&x| x == 0xbb));
}

#[test]
fn cluster_loss_fails_io_within_the_timeout() {
    let Some(mut mc) = MicroCeph::start("cluster_loss_fails_io_within_the_timeout") else {
        return;
    };
    let timeout = Duration::from_secs(3);
    let cluster = Cluster::connect(&mc.config(CLIENT_A, timeout)).unwrap();
    create_volume(&cluster, "lost", MIB, 4096);
    let img = cluster.ioctx(POOL).unwrap().open("lost").unwrap();
    img.lock_exclusive("host-a").unwrap();
    let v = open_volume(img, 4);
    v.write(0, &[1; 8192]).unwrap();
    v.flush().unwrap();
    mc.stop();

    // Each call runs on its own thread; a hang is reported after a generous bound instead of
    // blocking the test run (the bound is a hang detector, not a performance assertion).
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let t = Instant::now();
        let w = v.write(4096 * 10, &[2; 4096]);
        let w_took = t.elapsed();
        let t = Instant::now();
        let mut buf = vec![0u8; 4096];
        // (A written unit: librbd answers reads of objects its object map says do not
        // exist without asking an OSD.)
        let r = v.read(4096, &mut buf);
        let r_took = t.elapsed();
        let t = Instant::now();
        drop(v); // closes the image: must not hang either
        let _ = tx.send((w, w_took, r, r_took, t.elapsed()));
    });
    let (w, w_took, r, r_took, close_took) = rx
        .recv_timeout(timeout * 20)
        .expect("I/O to a stopped cluster hung");
    let w = w.expect_err("write to a stopped cluster succeeded");
    let r = r.expect_err("read from a stopped cluster succeeded");
    eprintln!(
        "stopped cluster: write {w} after {w_took:?}, read {r} after {r_took:?}, \
         close {close_took:?} (op timeout {timeout:?})"
    );
    assert_eq!(errno(&w), Some(libc::ETIMEDOUT), "write: {w}");
    assert_eq!(errno(&r), Some(libc::ETIMEDOUT), "read: {r}");
}

/// Env var naming the cluster conf for [`crashing_writer`] (run as a child process).
const CHILD_CONF: &str = "CRYPTVOL_TEST_RBD_CHILD_CONF";

/// Not a test of its own: the child of `flushed_writes_survive_kill_9_and_takeover`. Takes
/// the lock as host-a, writes and flushes, says so on stdout, then waits to be killed.
#[test]
#[ignore = "child process of flushed_writes_survive_kill_9_and_takeover"]
fn crashing_writer() {
    let Ok(conf) = std::env::var(CHILD_CONF) else {
        return;
    };
    let keyring = std::path::Path::new(&conf).with_file_name(format!("client.{CLIENT_A}.keyring"));
    let mut cfg = cryptvol::volume::rbd::ClusterConfig::new(&conf, CLIENT_A);
    cfg.keyring = Some(keyring);
    let cluster = Cluster::connect(&cfg).unwrap();
    let img = cluster.ioctx(POOL).unwrap().open("crash").unwrap();
    img.lock_exclusive("host-a").unwrap();
    let v = open_volume(img, 6);
    for i in 0..64u64 {
        v.write(i * 4096, &[i as u8 + 1; 4096]).unwrap();
    }
    v.flush().unwrap();
    println!("flushed");
    std::io::Write::flush(&mut std::io::stdout()).unwrap();
    loop {
        v.write(64 * 4096, &[0xff; 4096]).unwrap(); // keeps writing until killed
    }
}

#[test]
fn flushed_writes_survive_kill_9_and_takeover() {
    use std::io::BufRead;
    let Some(mc) = MicroCeph::start("flushed_writes_survive_kill_9_and_takeover") else {
        return;
    };
    let b = mc.connect(CLIENT_B);
    create_volume(&b, "crash", MIB, 4096);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crashing_writer", "--ignored", "--nocapture"])
        .env(CHILD_CONF, mc.conf())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.contains("flushed"))),
        "the child never flushed"
    );
    child.kill().unwrap(); // SIGKILL while writing
    child.wait().unwrap();

    // The dead holder still owns the lock (until its watch times out): B is refused, naming
    // it, breaks it at once and takes over; every flushed block is there.
    let img = b.ioctx(POOL).unwrap().open("crash").unwrap();
    let owner = match img.lock_exclusive("host-b") {
        Err(LockError::Held { owner, .. }) => owner,
        other => panic!("the dead holder's lock should still be held, got {other:?}"),
    };
    assert_eq!(owner.label.as_deref(), Some("host-a"));
    let t = Instant::now();
    img.lock_break(&owner).unwrap();
    img.lock_exclusive("host-b").unwrap();
    eprintln!("takeover from a dead holder: {:?}", t.elapsed());
    let v = open_volume(img, 6);
    let mut back = vec![0u8; 64 * 4096];
    v.read(0, &mut back).unwrap();
    for (i, unit) in back.chunks(4096).enumerate() {
        assert!(unit.iter().all(|&x| x == i as u8 + 1), "unit {i} lost");
    }
    v.write(0, &[0x77; 4096]).unwrap();
}
