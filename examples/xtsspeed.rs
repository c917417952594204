//! Prints sector-cipher throughput (GB/s) per backend and unit size, for
//! `benches/cipher-vs-openssl.sh`: `xtsspeed [SECONDS]`. Like `openssl speed` (without
//! `-elapsed`), it divides by the thread's CPU time, so a busy machine does not skew the ratio.

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
            // Units per call: 1 as openssl speed does with -bytes N; then runs as NBD requests
            // bring them (4 KiB = 8 sectors of 512 B, 64 KiB, 1 MiB).
            for run in [1usize, 8, 128, 2048] {
                let bytes = unit.bytes() * run;
                if bytes > 1 << 20 {
                    continue;
                }
                let gbs = speed(&c, bytes, secs);
                if run == 1 {
                    println!("{name} {} {gbs:.3}", unit.bytes());
                } else {
                    println!("{name} {}x{run} {gbs:.3}", unit.bytes());
                }
            }
        }
    }
}

/// GB/s of CPU time encrypting `bytes` per call for `secs` CPU seconds.
fn speed(c: &SectorCipher, bytes: usize, secs: f64) -> f64 {
    let mut buf = vec![0x5au8; bytes];
    let per_call = (bytes / c.unit().bytes()) as u64;
    let calls = (256 * 1024 / bytes).max(1);
    let (start, mut n, mut i) = (cpu_seconds(), 0u64, 0u64);
    while cpu_seconds() - start < secs {
        for _ in 0..calls {
            c.encrypt(i, &mut buf);
            i += per_call;
        }
        n += calls as u64;
    }
    (n * bytes as u64) as f64 / (cpu_seconds() - start) / 1e9
}

/// CPU time of the calling thread, in seconds.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
