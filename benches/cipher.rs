//! Sector cipher throughput: both backends, 512- and 4096-byte units, encrypt and decrypt,
//! over a run of 1 MiB per call and over a single unit per call.
//! `cargo bench --bench cipher -- --warm-up-time 1 --measurement-time 2`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use cryptvol::volume::{CipherBackend, SectorCipher, UnitSize, XtsKey};

fn bench(c: &mut Criterion) {
    let key: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(7).wrapping_add(1))
        .collect();
    let key = XtsKey::new(&key).unwrap();
    for (bname, backend) in [
        ("aws-lc", CipherBackend::AwsLc),
        ("rust", CipherBackend::Soft),
    ] {
        for unit in [UnitSize::B512, UnitSize::B4096] {
            let cipher = SectorCipher::new(&key, unit, backend).unwrap();
            for (run, len) in [("1MiB", 1 << 20), ("unit", unit.bytes())] {
                let mut buf = vec![0x5au8; len];
                let mut g = c.benchmark_group(format!("xts/{bname}/{}/{run}", unit.bytes()));
                g.throughput(Throughput::Bytes(len as u64));
                g.bench_function("encrypt", |b| b.iter(|| cipher.encrypt(1 << 33, &mut buf)));
                g.bench_function("decrypt", |b| b.iter(|| cipher.decrypt(1 << 33, &mut buf)));
                g.finish();
            }
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
