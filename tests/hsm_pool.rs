//! PKCS#11 custody in-process (SoftHSM2): the session pool under many threads, and re-login
//! after the token forgets the login. One test in this binary: it sets `SOFTHSM2_CONF` for
//! the process before the module is loaded.
mod common;

use std::sync::Arc;

use cryptvol::kms::custody::{Custody, Pkcs11Custody, Pkcs11Settings, read_pin};
use cryptvol::kms::{Caller, EncryptionContext, Kms, KmsConfig, KmsError, RootKey};
use uuid::Uuid;

fn ctx(v: &str) -> EncryptionContext {
    [("volume_id".to_string(), v.to_string())].into()
}

#[test]
fn pool_threads_relogin_and_kms() {
    let Some(t) = common::hsm::token("cv-pool") else {
        return;
    };
    // SAFETY: the only test in this binary, run before anything reads the environment or
    // starts another thread of ours; SoftHSM2 reads the variable when the module loads below.
    unsafe { std::env::set_var("SOFTHSM2_CONF", &t.conf) };
    let settings = || Pkcs11Settings {
        module: t.module.clone(),
        token_label: t.label.clone(),
        pin: read_pin(Some(&t.pin_file), None).unwrap(),
        pin_key: "pin_file",
    };
    let c = Arc::new(Pkcs11Custody::open(settings()).unwrap());
    let id = Uuid::new_v4();
    let entry = c.generate_version(id, 1).unwrap();
    assert!(c.present(id, 1, &entry).unwrap());
    let v2 = format!("cryptvol/{id}/v2/0011223344556677");
    assert!(!c.present(id, 2, &v2).unwrap(), "no version 2 yet");
    // An entry naming another key or version is refused, not followed.
    assert!(c.present(id, 2, &entry).is_err());
    assert!(c.present(Uuid::new_v4(), 1, &entry).is_err());

    // 16 threads on a pool of 4 sessions: every wrap and unwrap succeeds, none mixed up.
    let threads: Vec<_> = (0..16u8)
        .map(|i| {
            let (c, entry) = (c.clone(), entry.clone());
            std::thread::spawn(move || {
                for j in 0..40u8 {
                    let plain = [i, j, 0xa5, 0x5a].repeat(16);
                    let cx = ctx(&format!("{i}-{j}"));
                    let blob = c.wrap(id, 1, &entry, &plain, &cx).unwrap();
                    assert_eq!(c.unwrap(id, 1, &entry, &blob, &cx).unwrap().expose(), plain);
                    assert!(matches!(
                        c.unwrap(id, 1, &entry, &blob, &ctx("other")),
                        Err(KmsError::InvalidCiphertext(_))
                    ));
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }

    // The token forgets the login (as after a token restart): the next operation logs in
    // again on a fresh session instead of failing.
    let blob = c
        .wrap(id, 1, &entry, b"0123456789abcdef", &ctx("a"))
        .unwrap();
    c.logout().unwrap();
    assert_eq!(
        c.unwrap(id, 1, &entry, &blob, &ctx("a")).unwrap().expose(),
        b"0123456789abcdef"
    );
    c.logout().unwrap();
    c.wrap(id, 1, &entry, b"x", &ctx("a")).unwrap();

    // Destroy: idempotent, and afterwards the version is certainly gone.
    c.destroy(id, 1, &entry).unwrap();
    c.destroy(id, 1, &entry).unwrap();
    assert!(!c.present(id, 1, &entry).unwrap());
    let e = c.unwrap(id, 1, &entry, &blob, &ctx("a")).err().unwrap();
    assert!(e.to_string().contains("destroyed"), "{e}");

    // The key manager on top: create, wrap, re-login, unwrap, rotate.
    let d = tempfile::tempdir().unwrap();
    let kms = Kms::open_with_custody(
        d.path(),
        RootKey::from_bytes([3; 32]),
        KmsConfig::default(),
        Some(c.clone()),
    )
    .unwrap();
    let who = Caller {
        uid: 0,
        gid: 0,
        pid: 1,
    };
    let k = kms.create_key(&who, "hk", "").unwrap();
    assert_eq!(k.custody, "pkcs11");
    let (plain, blob) = kms.create_datakey(&who, "hk", 256, &ctx("v")).unwrap();
    c.logout().unwrap();
    let (_, v, back) = kms.decrypt_datakey(&who, &blob, &ctx("v")).unwrap();
    assert_eq!((v, back.expose()), (1, plain.expose()));
    kms.rotate_key(&who, "hk").unwrap();
    let blob2 = kms
        .encrypt_datakey(&who, "hk", plain.expose(), &ctx("v"))
        .unwrap();
    assert_eq!(kms.decrypt_datakey(&who, &blob2, &ctx("v")).unwrap().1, 2);
    // Oversized and empty plaintexts are refused before the token sees them.
    assert!(matches!(
        kms.encrypt_datakey(&who, "hk", &[0u8; 1025], &ctx("v")),
        Err(KmsError::InvalidParameter(_))
    ));
    assert!(matches!(
        kms.encrypt_datakey(&who, "hk", &[], &ctx("v")),
        Err(KmsError::InvalidParameter(_))
    ));
}
