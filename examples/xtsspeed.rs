//! Prints sector-cipher throughput (GB/s) per backend and unit size, for
//! `benches/cipher-vs-openssl.sh`: `xtsspeed [SECONDS]`.
use std::time::{Duration, Instant};

use cryptvol::volume::{CipherBackend, SectorCipher, UnitSize, XtsKey};

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let key: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(7).wrapping_add(1))
        .collect();
    let key = XtsKey::new(&key).expect("valid key");
    for (name, backend) in [
        ("aws-lc", CipherBackend::AwsLc),
        ("rust", CipherBackend::Soft),
    ] {
        for unit in [UnitSize::B512, UnitSize::B4096] {
            let c = SectorCipher::new(&key, unit, backend).expect("cipher");
            // One unit per call, as openssl speed does with -bytes N.
            let mut buf = vec![0x5au8; unit.bytes()];
            let (start, mut n, mut i) = (Instant::now(), 0u64, 0u64);
            while start.elapsed() < Duration::from_secs_f64(secs) {
                for _ in 0..256 {
                    c.encrypt(i, &mut buf);
                    i += 1;
                }
                n += 256;
            }
            let gbs = (n * unit.bytes() as u64) as f64 / start.elapsed().as_secs_f64() / 1e9;
            println!("{name} {} {gbs:.3}", unit.bytes());
        }
    }
}
