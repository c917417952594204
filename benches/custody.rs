//! Wrap/unwrap per second and volume attach latency with each CMK custody (file vs PKCS#11
//! in SoftHSM2), side by side. A benchmark, not a test: `cargo bench --bench custody`.
//! Needs softhsm2 (`softhsm2-util`); makes its own token in a temp dir.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptvol::daemon::Daemon;
use cryptvol::daemon::access::ClientPolicy;
use cryptvol::kms::custody::{Custody, FileCustody, Pkcs11Custody, Pkcs11Settings};
use cryptvol::kms::{Caller, EncryptionContext, Kms, KmsConfig, RootKey};
use uuid::Uuid;

const MODULES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
];

fn rate(n: u32, f: impl FnMut()) -> (f64, Duration) {
    let mut f = f;
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    let d = t.elapsed();
    (f64::from(n) / d.as_secs_f64(), d / n)
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p) as usize]
}

fn main() {
    let Some(module) = MODULES.iter().find(|m| std::path::Path::new(m).exists()) else {
        eprintln!("softhsm2 not installed: nothing to compare");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("tokens")).unwrap();
    let conf = tmp.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n",
            tmp.path().display()
        ),
    )
    .unwrap();
    // SAFETY: single-threaded here; SoftHSM2 reads it when the module is loaded below.
    unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
    let ok = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "bench",
            "--pin",
            "1234",
        ])
        .args(["--so-pin", "5678"])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    let hsm: Arc<Pkcs11Custody> = Arc::new(
        Pkcs11Custody::open(Pkcs11Settings {
            module: module.into(),
            token_label: "bench".into(),
            pin: "1234".into(),
            pin_key: "pin_file",
        })
        .unwrap(),
    );
    // File custody under a sealing key, as the key store lends it (its current one).
    let sealing_key = [9u8; 32];
    let file = FileCustody::new(&sealing_key);
    let ctx: EncryptionContext = [("volume_id".to_string(), Uuid::new_v4().to_string())].into();
    let dek = [7u8; 64];
    let n = 2000;

    println!("custody  op      ops/s      mean");
    for (name, c) in [("file", &file as &dyn Custody), ("pkcs11", hsm.as_ref())] {
        let id = Uuid::new_v4();
        let e = c.generate_version(id, 1).unwrap();
        let blob = c.wrap(id, 1, &e, &dek, &ctx).unwrap();
        let (w, wm) = rate(n, || {
            c.wrap(id, 1, &e, &dek, &ctx).unwrap();
        });
        let (u, um) = rate(n, || {
            c.unwrap(id, 1, &e, &blob, &ctx).unwrap();
        });
        println!("{name:8} wrap   {w:9.0} {wm:>9.1?}");
        println!("{name:8} unwrap {u:9.0} {um:>9.1?}");
    }

    // Whole volume attach (header read, unwrap through the KMS with its audit record and
    // fsync, volume open, export) and detach, in-process, on a tmpfs state dir if there is one.
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm".into()
    } else {
        std::env::temp_dir()
    };
    println!(
        "custody  attach p50   p99   (detach+attach cycles: 200; state dir in {})",
        base.display()
    );
    for (name, custody) in [
        ("file", None),
        ("pkcs11", Some(hsm.clone() as Arc<dyn Custody>)),
    ] {
        let state = tempfile::tempdir_in(&base).unwrap();
        let kms = Kms::open_with_custody(
            &state.path().join("kms"),
            RootKey::from_bytes([9; 32]),
            KmsConfig::default(),
            custody,
        )
        .unwrap();
        let d = Daemon::new(state.path(), kms, 4, ClientPolicy::new(Default::default())).unwrap();
        let who = Caller::DAEMON;
        d.kms.create_key(&who, "b", "").unwrap();
        d.create_volume(&who, "v", 64 << 20, 4096, Some("b"), false)
            .unwrap();
        let mut lat = Vec::new();
        for _ in 0..200 {
            let t = Instant::now();
            d.attach(&who, "v", false).unwrap();
            lat.push(t.elapsed());
            d.detach("v", false).unwrap();
        }
        let p50 = percentile(&mut lat, 0.5);
        let p99 = percentile(&mut lat, 0.99);
        println!("{name:8} {p50:>9.2?} {p99:>9.2?}");
    }
}
