//! `Volume` throughput on a sparse file in /dev/shm (or the temp dir): aligned 1 MiB and 4 KiB
//! reads and writes through the cipher and the file store.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use cryptvol::volume::{Volume, VolumeHeader, XtsKey};

fn bench(c: &mut Criterion) {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm".into()
    } else {
        std::env::temp_dir()
    };
    let dir = tempfile::tempdir_in(base).unwrap();
    let path = dir.path().join("bench.cvol");
    let size = 256u64 << 20;
    let h = VolumeHeader::new(uuid::Uuid::new_v4(), size, 4096, "bench", 1, vec![1; 100]).unwrap();
    Volume::create(&path, &h).unwrap();
    let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_add(3)).collect();
    let v = Volume::open(&path, XtsKey::new(&key).unwrap(), false).unwrap();
    for bs in [4096usize, 1 << 20] {
        let mut buf = vec![0xa5u8; bs];
        let mut g = c.benchmark_group(format!("volume/{bs}"));
        g.throughput(Throughput::Bytes(bs as u64));
        let mut off = 0u64;
        g.bench_function("write", |b| {
            b.iter(|| {
                off = (off + bs as u64) % size;
                v.write_mut(off, &mut buf).unwrap();
            })
        });
        g.bench_function("read", |b| {
            b.iter(|| {
                off = (off + bs as u64) % size;
                v.read(off, &mut buf).unwrap();
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
