//! Wrap/unwrap throughput of the key manager's data-key blobs (HKDF + AES-256-GCM per call),
//! without the store or the audit log: `kmsspeed [SECONDS]`.
use std::time::{Duration, Instant};

use cryptvol::kms::wrap;

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let ctx: wrap::EncryptionContext = [(
        "volume_id".to_string(),
        "0d6f0c1e-0000-4000-8000-000000000000".to_string(),
    )]
    .into();
    let id = uuid::Uuid::new_v4();
    let material = [7u8; 32];
    let dek = [9u8; 64];
    let blob = wrap::wrap(id, 1, &material, &dek, &ctx).expect("wrap");
    let run = |name: &str, f: &dyn Fn()| {
        let (start, mut n) = (Instant::now(), 0u64);
        while start.elapsed() < Duration::from_secs_f64(secs) {
            for _ in 0..100 {
                f();
            }
            n += 100;
        }
        println!("{name}: {:.0}/s", n as f64 / start.elapsed().as_secs_f64());
    };
    run("wrap", &|| {
        wrap::wrap(id, 1, &material, &dek, &ctx).expect("wrap");
    });
    run("unwrap", &|| {
        wrap::unwrap(&blob, &material, &ctx).expect("unwrap");
    });
}
