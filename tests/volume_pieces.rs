//! Large requests served in pieces (the volume decrypts after each `pread` and encrypts before
//! each `pwrite` in 128 KiB pieces on a page-cache store, `src/volume/disk.rs` PIECE): data
//! checked against a plain model for requests that start and end anywhere (inside units, on
//! piece boundaries or not), with 512- and 4096-byte units, on a file in the page cache and in
//! memory; and a snapshot's point in time (`quiesce`, what `volume snapshot create` takes)
//! never splits a piecewise write.

mod testdata;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use cryptvol::volume::{BlockStore, CipherBackend, FileStore, MemStore, Volume, VolumeHeader};
use uuid::Uuid;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
/// The volume's piece size (kept in step with src/volume/disk.rs by the cases below, which
/// straddle it and its multiples either way).
const PIECE: u64 = 128 * KIB;

use testdata::key;

use testdata::pattern;

/// A fresh volume of `size` bytes over `store`.
fn volume(store: Box<dyn BlockStore>, size: u64, sector: u32) -> Volume {
    let h = VolumeHeader::new(Uuid::new_v4(), size, sector, "key-1", 1, vec![1; 100]).unwrap();
    Volume::create_with_store(store.as_ref(), &h).unwrap();
    Volume::open_with_store(store, key(), false, CipherBackend::AwsLc).unwrap()
}

/// The stores a volume runs on in production without direct I/O: a file in the page cache
/// (the test dir's file system, and /dev/shm when there is one) and memory.
fn stores(tag: &str) -> Vec<(String, Box<dyn BlockStore>, Option<tempfile::TempDir>)> {
    let mut v: Vec<(String, Box<dyn BlockStore>, Option<tempfile::TempDir>)> =
        vec![("memory".into(), Box::new(MemStore::new()), None)];
    for base in ["/tmp", "/dev/shm"] {
        if !std::path::Path::new(base).is_dir() {
            continue;
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("cv-pieces-{tag}"))
            .tempdir_in(base)
            .unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("v.img"))
            .unwrap();
        v.push((
            format!("file in {base}"),
            Box::new(FileStore::new(f)),
            Some(dir),
        ));
    }
    v
}

/// (offset, length) of writes and reads: unit-aligned or not, shorter and longer than a
/// piece, ending a byte before or after a piece boundary, several MiB.
fn cases(sector: u64) -> Vec<(u64, u64)> {
    vec![
        (0, PIECE),
        (0, PIECE + sector),
        (sector, 3 * PIECE - sector),
        (13, MIB),
        (PIECE - 1, PIECE + 2),
        (64 * KIB, MIB),
        (MIB - 7, 3 * MIB - 7),
        (2 * MIB + sector / 2, 2 * PIECE + 1),
        (5 * MIB, 2 * MIB + 512),
        (7 * MIB + 3, 1),
        (4 * MIB - PIECE + sector, 5 * PIECE - 2 * sector + 17),
    ]
}

#[test]
fn large_unaligned_requests_across_pieces_match_a_model() {
    for sector in [512u32, 4096] {
        for (name, store, _dir) in stores(&sector.to_string()) {
            let size = 8 * MIB;
            let v = volume(store, size, sector);
            let mut model = vec![0u8; size as usize];
            for (i, (off, len)) in cases(u64::from(sector)).into_iter().enumerate() {
                let data = pattern(len as usize, i as u64 + 1);
                // Both write paths: the server's (in place, `write_mut`) and the copying one.
                if i % 2 == 0 {
                    v.write_mut(off, &mut data.clone()).unwrap();
                } else {
                    v.write(off, &data).unwrap();
                }
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                // The range just written, then a window around it, then the whole volume.
                let mut got = vec![0xaau8; len as usize];
                v.read(off, &mut got).unwrap();
                assert!(
                    got == data,
                    "{name}, {sector} B units: read back ({off}, {len})"
                );
                let (a, b) = (
                    off.saturating_sub(PIECE + 5),
                    (off + len + PIECE + 5).min(size),
                );
                let mut got = vec![0u8; (b - a) as usize];
                assert!(
                    v.try_read(a, &mut got).unwrap(),
                    "{name}: try_read declined"
                );
                assert!(
                    got == model[a as usize..b as usize],
                    "{name}, {sector} B units: neighbours of ({off}, {len})"
                );
            }
            let mut all = vec![0u8; size as usize];
            v.read(0, &mut all).unwrap();
            assert!(all == model, "{name}, {sector} B units: whole volume");
        }
    }
}

/// A writer rewrites a region in large requests that span many pieces, each request all of
/// one round; snapshots' points in time are taken meanwhile (`quiesce`). Every request must be
/// seen whole (all of round r) or not at all: the stripe locks are held over all its pieces.
#[test]
fn a_snapshot_point_in_time_never_splits_a_piecewise_write() {
    for sector in [512u32, 4096] {
        for (name, store, _dir) in stores(&format!("snap{sector}")) {
            let size = 8 * MIB;
            let v = Arc::new(volume(store, size, sector));
            // Requests of 1 MiB + 3 sectors + 100 bytes, one after another, back to back.
            let req = MIB + 3 * u64::from(sector) + 100;
            let reqs = (size - 4096) / req;
            let stop = Arc::new(AtomicBool::new(false));
            let rounds = Arc::new(AtomicU64::new(0));
            let w = {
                let (v, stop, rounds) = (v.clone(), stop.clone(), rounds.clone());
                std::thread::spawn(move || {
                    let mut r = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        r += 1;
                        for k in 0..reqs {
                            let mut b = vec![r as u8; req as usize];
                            v.write_mut(4096 + k * req, &mut b).unwrap();
                        }
                        rounds.store(r, Ordering::Release);
                    }
                })
            };
            let mut seen = 0;
            while rounds.load(Ordering::Acquire) < 3 || seen < 20 {
                let image = v.quiesce(|| {
                    let mut b = vec![0u8; (reqs * req) as usize];
                    v.read(4096, &mut b).unwrap();
                    b
                });
                for (k, r) in image.chunks(req as usize).enumerate() {
                    assert!(
                        r.iter().all(|x| *x == r[0]),
                        "{name}, {sector} B units: request {k} seen half written at a point \
                         in time"
                    );
                }
                seen += 1;
            }
            stop.store(true, Ordering::Relaxed);
            w.join().unwrap();
        }
    }
}
