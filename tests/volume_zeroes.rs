//! Zero plaintext, thin (default) and encrypt-zeroes (header flag): what the backing store
//! holds for zero writes, what zero bytes written into the store by someone else read as, and
//! that TRIM / WRITE_ZEROES still read as zeros. Encrypt-zeroes needs units at least as large
//! as the store's allocation block (the in-memory store allocates 4 KiB pages, like ext4):
//! 512-byte units are refused there.

use std::sync::Arc;

use cryptvol::volume::header::FLAG_ENCRYPT_ZEROES;
use cryptvol::volume::{BlockStore, CipherBackend, MemStore, Volume, VolumeHeader, XtsKey};
use uuid::Uuid;

const DATA: u64 = 1 << 20;
const SIZE: u64 = 256 * 1024;

fn volume(sector: u32, encrypt_zeroes: bool, backend: CipherBackend) -> (Volume, Arc<MemStore>) {
    let mut h = VolumeHeader::new(Uuid::new_v4(), SIZE, sector, "key-1", 1, vec![1; 100]).unwrap();
    if encrypt_zeroes {
        h.flags |= FLAG_ENCRYPT_ZEROES;
    }
    let store = Arc::new(MemStore::new());
    Volume::create_with_store(&store.clone(), &h).unwrap();
    let dek: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(5))
        .collect();
    let v = Volume::open_with_store(
        Box::new(store.clone()),
        XtsKey::new(&dek).unwrap(),
        false,
        backend,
    )
    .unwrap();
    (v, store)
}

fn stored(store: &MemStore, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    store.read_at(&mut b, DATA + off).unwrap();
    b
}

fn read(v: &Volume, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0xEE; len];
    v.read(off, &mut b).unwrap();
    b
}

fn zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

#[test]
fn thin_default_stores_zero_plaintext_as_zeros() {
    for sector in [512u32, 4096] {
        let (v, store) = volume(sector, false, CipherBackend::AwsLc);
        assert!(!v.header().encrypt_zeroes());
        v.write(0, &vec![0u8; 16384]).unwrap();
        v.write(16384, &vec![7u8; 4096]).unwrap();
        assert!(
            zero(&stored(&store, 0, 16384)),
            "zero units are visible as zeros"
        );
        assert!(!zero(&stored(&store, 16384, 4096)));
        // Zero bytes put into the store by someone else read as zeros: the thin rule.
        store.write_at(&vec![0u8; 4096], DATA + 16384).unwrap();
        assert!(zero(&read(&v, 16384, 4096)));
    }
}

#[test]
fn encrypt_zeroes_stores_zero_plaintext_encrypted() {
    for backend in [CipherBackend::AwsLc, CipherBackend::Soft] {
        {
            let sector = 4096u32;
            let s = sector as usize;
            let (v, store) = volume(sector, true, backend);
            assert!(v.header().encrypt_zeroes());
            // Whole units, a run mixing zero and non-zero units, and a partial-unit write.
            v.write(0, &vec![0u8; 16384]).unwrap();
            let mut mixed = vec![0u8; 4 * s];
            mixed[s..2 * s].fill(9);
            v.write(32768, &mixed).unwrap();
            v.write(65536 + 3, &[0u8; 10]).unwrap();
            for u in 0..16384 / s {
                assert!(
                    !zero(&stored(&store, (u * s) as u64, s)),
                    "{sector}: unit {u} of zero plaintext stored as zeros"
                );
            }
            for u in 0..4 {
                assert!(!zero(&stored(&store, (32768 + u * s) as u64, s)));
            }
            assert!(!zero(&stored(&store, 65536 / s as u64 * s as u64, s)));
            // Zero units of one volume differ from each other (the tweak) ...
            assert_ne!(stored(&store, 0, s), stored(&store, s as u64, s));
            // ... and all read back as written.
            assert!(zero(&read(&v, 0, 16384)));
            assert_eq!(read(&v, 32768, 4 * s), mixed);
            assert!(zero(&read(&v, 65536, s)));
            // Never-written space is a hole: zeros.
            assert!(zero(&read(&v, 131072, 8192)));
        }
    }
}

#[test]
fn encrypt_zeroes_trim_and_write_zeroes_read_as_zeros() {
    {
        let sector = 4096u32;
        let s = sector as u64;
        let (v, store) = volume(sector, true, CipherBackend::AwsLc);
        v.write(0, &vec![0x42u8; 65536]).unwrap();
        // TRIM of whole units.
        v.trim(s, 2 * s).unwrap();
        v.trim(16384, 16384).unwrap();
        // WRITE_ZEROES without holes (NBD_CMD_FLAG_NO_HOLE) and with a partial unit.
        v.write_zeroes(40960, 8192, false).unwrap();
        v.write_zeroes(50000, 100, true).unwrap();
        let mut model = vec![0x42u8; 65536];
        model[s as usize..3 * s as usize].fill(0);
        model[16384..32768].fill(0);
        model[40960..49152].fill(0);
        model[50000..50100].fill(0);
        assert_eq!(read(&v, 0, 65536), model, "{sector}");
        // The aligned TRIM made a real hole; WRITE_ZEROES without holes stored ciphertext.
        assert!(zero(&stored(&store, 16384, 16384)));
        assert!(!zero(&stored(&store, 40960, 8192)));
    }
}

#[test]
fn encrypt_zeroes_zero_bytes_written_by_an_attacker_do_not_read_as_zeros() {
    {
        let sector = 4096usize;
        let (v, store) = volume(sector as u32, true, CipherBackend::AwsLc);
        v.write(0, &vec![0x42u8; 8192]).unwrap();
        // Someone with write access to the backing file overwrites a unit with zero bytes:
        // the unit is still allocated, so it is taken as ciphertext, and reads as noise.
        store.write_at(&vec![0u8; sector], DATA).unwrap();
        let got = read(&v, 0, sector);
        assert!(!zero(&got), "zeroed stored unit must not read as zeros");
        assert_ne!(got, vec![0x42u8; sector]);
        // The other units are untouched.
        assert_eq!(
            read(&v, sector as u64, 8192 - sector),
            vec![0x42u8; 8192 - sector]
        );
        // Punching a hole (what TRIM does) does make it read as zeros: documented.
        store.punch_hole(DATA, 8192).unwrap();
        assert!(zero(&read(&v, 0, 8192)));
    }
}

#[test]
fn encrypt_zeroes_refuses_units_smaller_than_the_store_block() {
    // A 512-byte unit written into a hole would allocate a 4 KiB block whose other seven
    // units are zero bytes, which an encrypt-zeroes volume reads as ciphertext: refused.
    let mut h = VolumeHeader::new(Uuid::new_v4(), SIZE, 512, "key-1", 1, vec![1; 100]).unwrap();
    h.flags |= FLAG_ENCRYPT_ZEROES;
    let store = Arc::new(MemStore::new());
    assert!(Volume::create_with_store(&store.clone(), &h).is_err());
    // A header written anyway (or on a store with larger blocks) does not open.
    h.flags = 0;
    Volume::create_with_store(&store.clone(), &h).unwrap();
    h.flags = FLAG_ENCRYPT_ZEROES;
    cryptvol::volume::rewrite_header(&store.clone(), &h).unwrap();
    let dek: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(5))
        .collect();
    let r = Volume::open_with_store(
        Box::new(store),
        XtsKey::new(&dek).unwrap(),
        false,
        CipherBackend::AwsLc,
    );
    assert!(r.is_err());
}

#[test]
fn old_headers_without_the_flag_open_thin() {
    // A header as written before the flag existed has zeros at the flag's bytes.
    let h = VolumeHeader::new(Uuid::new_v4(), SIZE, 4096, "key-1", 1, vec![1; 100]).unwrap();
    let b = h.encode().unwrap();
    assert_eq!(&b[4060..4064], &[0, 0, 0, 0]);
    assert!(!VolumeHeader::decode(&b).unwrap().encrypt_zeroes());
}

/// Random writes (data and zeros, any alignment), TRIMs and WRITE_ZEROES against a plain
/// model: an encrypt-zeroes volume always reads back what the model says, and never stores
/// a zero unit for a unit whose last operation was a WRITE.
#[test]
fn encrypt_zeroes_matches_a_plain_model_under_random_operations() {
    {
        let sector = 4096u64;
        let (v, store) = volume(sector as u32, true, CipherBackend::AwsLc);
        let mut model = vec![0u8; SIZE as usize];
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ sector;
        let mut next = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        let mut log = Vec::new();
        for _ in 0..300 {
            let off = next(SIZE);
            let len = (1 + next(5 * sector)).min(SIZE - off);
            let (o, l) = (off as usize, len as usize);
            let op = next(4);
            log.push((op, off, len));
            match op {
                0 => {
                    let b = vec![(1 + next(255)) as u8; l];
                    v.write(off, &b).unwrap();
                    model[o..o + l].copy_from_slice(&b);
                }
                1 => {
                    v.write(off, &vec![0u8; l]).unwrap();
                    model[o..o + l].fill(0);
                    // Whole units written with zero data are stored encrypted.
                    let first = off.div_ceil(sector) * sector;
                    let mut p = first;
                    while p + sector <= off + len {
                        assert!(!zero(&stored(&store, p, sector as usize)), "unit at {p}");
                        p += sector;
                    }
                }
                2 => {
                    v.trim(off, len).unwrap();
                    model[o..o + l].fill(0);
                }
                _ => {
                    v.write_zeroes(off, len, next(2) == 0).unwrap();
                    model[o..o + l].fill(0);
                }
            }
            let got = read(&v, 0, SIZE as usize);
            if let Some(i) = (0..got.len()).find(|&i| got[i] != model[i]) {
                panic!(
                    "{sector}: byte {i} reads {} instead of {} after {:?}",
                    got[i],
                    model[i],
                    &log[log.len().saturating_sub(4)..]
                );
            }
        }
    }
}
