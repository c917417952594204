//! Key manager: every transition and failure the cloud model defines.
use cryptvol::kms::{Caller, EncryptionContext, Kms, KmsConfig, KmsError, RootKey};

const C: Caller = Caller {
    uid: 0,
    gid: 0,
    pid: 1,
};

fn ctx(v: &str) -> EncryptionContext {
    [("volume_id".to_string(), v.to_string())].into()
}

fn open(dir: &std::path::Path, min_days: u32) -> Kms {
    Kms::open(
        dir,
        RootKey::from_bytes([7; 32]),
        KmsConfig {
            min_pending_days: min_days,
            max_pending_days: 1096,
            ..KmsConfig::default()
        },
    )
    .unwrap()
}

#[test]
fn lifecycle_and_datakeys() {
    let d = tempfile::tempdir().unwrap();
    let kms = open(d.path(), 0);
    let k = kms.create_key(&C, "vol-key", "test").unwrap();
    assert_eq!(k.key_state, "2");
    assert!(matches!(
        kms.create_key(&C, "vol-key", ""),
        Err(KmsError::AliasExists(_))
    ));
    assert!(matches!(
        kms.create_key(&C, "bad alias!", ""),
        Err(KmsError::InvalidParameter(_))
    ));

    let (plain, blob) = kms.create_datakey(&C, "vol-key", 512, &ctx("a")).unwrap();
    assert_eq!(plain.len(), 64);
    let (id, v, back) = kms.decrypt_datakey(&C, &blob, &ctx("a")).unwrap();
    assert_eq!((id.as_str(), v), (k.key_id.as_str(), 1));
    assert_eq!(back.expose(), plain.expose());
    assert!(
        kms.decrypt_datakey(&C, &blob, &ctx("b")).is_err(),
        "context binds the DEK"
    );

    // Rotation: new wraps use v2, v1 still unwraps.
    assert_eq!(kms.rotate_key(&C, "vol-key").unwrap().key_version, "2");
    let blob2 = kms
        .encrypt_datakey(&C, &k.key_id, plain.expose(), &ctx("a"))
        .unwrap();
    assert_eq!(kms.decrypt_datakey(&C, &blob2, &ctx("a")).unwrap().1, 2);
    assert_eq!(kms.decrypt_datakey(&C, &blob, &ctx("a")).unwrap().1, 1);

    // Disable: unusable, message names the key and state; enable restores.
    kms.disable_key(&C, "vol-key").unwrap();
    let e = kms.decrypt_datakey(&C, &blob, &ctx("a")).err().unwrap();
    assert!(
        e.to_string().contains("vol-key") && e.to_string().contains("disabled"),
        "{e}"
    );
    kms.enable_key(&C, "vol-key").unwrap();

    // Schedule deletion: unusable at once; cancel -> disabled.
    assert_eq!(
        kms.schedule_key_deletion(&C, "vol-key", 30)
            .unwrap()
            .key_state,
        "4"
    );
    assert!(kms.decrypt_datakey(&C, &blob, &ctx("a")).is_err());
    assert!(
        kms.enable_key(&C, "vol-key").is_err(),
        "pending deletion cannot be enabled"
    );
    assert_eq!(
        kms.cancel_key_deletion(&C, "vol-key").unwrap().key_state,
        "3"
    );

    // Window of 0 days (min lowered by config): destroyed at the next sweep, forever.
    kms.schedule_key_deletion(&C, "vol-key", 0).unwrap();
    kms.sweep_deletions().unwrap();
    let e = kms.decrypt_datakey(&C, &blob, &ctx("a")).err().unwrap();
    assert!(e.to_string().contains("destroyed"), "{e}");
    assert!(kms.cancel_key_deletion(&C, "vol-key").is_err());

    // Audit chain holds, and records failures too.
    let report = kms.audit_verify().unwrap();
    assert!(report.ok && report.records > 10, "{report:?}");
}

#[test]
fn pending_days_bounds_from_config() {
    let d = tempfile::tempdir().unwrap();
    let kms = open(d.path(), 7);
    kms.create_key(&C, "k", "").unwrap();
    assert!(kms.schedule_key_deletion(&C, "k", 6).is_err());
    assert!(kms.schedule_key_deletion(&C, "k", 1097).is_err());
    assert!(kms.schedule_key_deletion(&C, "k", 7).is_ok());
}

#[test]
fn persistence_wrong_root_key_and_tampered_audit() {
    let d = tempfile::tempdir().unwrap();
    let blob = {
        let kms = open(d.path(), 7);
        kms.create_key(&C, "k", "").unwrap();
        kms.create_datakey(&C, "k", 256, &ctx("x")).unwrap().1
    };
    let kms = open(d.path(), 7);
    assert_eq!(
        kms.decrypt_datakey(&C, &blob, &ctx("x")).unwrap().2.len(),
        32
    );
    drop(kms);
    let wrong = Kms::open(d.path(), RootKey::from_bytes([8; 32]), KmsConfig::default());
    assert!(matches!(wrong, Err(KmsError::RootKey(_))));

    // Edit one audit line: verify names it (line 1 is the first start's openAuditLog).
    let path = d.path().join("audit.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let edited = text.replacen("createKey", "createKeY", 1);
    std::fs::write(&path, edited).unwrap();
    let kms = open(d.path(), 7);
    let r = kms.audit_verify().unwrap();
    assert!(!r.ok);
    assert_eq!(r.broken_line, Some(2), "the edited line itself is named");
}

#[test]
fn no_key_material_in_state_files() {
    let d = tempfile::tempdir().unwrap();
    let kms = open(d.path(), 7);
    kms.create_key(&C, "k", "").unwrap();
    let (plain, _) = kms.create_datakey(&C, "k", 512, &ctx("x")).unwrap();
    let hexkey = hex::encode(plain.expose());
    for f in ["keys.json", "audit.jsonl"] {
        let t = std::fs::read(d.path().join(f)).unwrap();
        assert!(!String::from_utf8_lossy(&t).contains(&hexkey));
        assert!(!t.windows(64).any(|w| w == plain.expose()));
    }
}
