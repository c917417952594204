//! CMKs in a PKCS#11 token (SoftHSM2), driven like an operator and looked at like an
//! attacker: every KMS operation and volume attach through the CLI and qemu-io, the token's
//! objects inspected from outside with `pkcs11-tool`, restarts, custody switches, bad
//! settings refused at start, and a state-dir backup that cannot bring a destroyed key back.
mod common;

use std::process::Command;

use common::hsm::{self, Token};
use common::{Env, ok_io, qemu_io};

fn hsm_env(t: &Token) -> Env {
    Env::with_config(|_| t.config())
}

fn start(e: &mut Env, t: &Token) {
    e.start_via(&t.wrapper());
}

fn label(key_id: &str, v: u32) -> String {
    format!("cryptvol/{key_id}/v{v}")
}

fn status(e: &Env, vol: &str) -> String {
    let list = e.json(&["volume", "list"]);
    list["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == vol)
        .unwrap()["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn every_kms_operation_and_attach_in_the_token() {
    let Some(t) = hsm::token("cv-ops") else {
        return;
    };
    let mut e = hsm_env(&t);
    start(&mut e, &t);

    let k = e.json(&["key", "create", "--alias", "k"])["key_info"].clone();
    let id = k["key_id"].as_str().unwrap().to_owned();
    assert_eq!(k["custody"], "pkcs11");
    assert_eq!(
        e.json(&["key", "describe", "k"])["key_info"]["custody"],
        "pkcs11"
    );

    // From outside: an AES-256 object per version, sensitive and never extractable; its
    // value cannot be read.
    let obj = t.object(&label(&id, 1)).expect("v1 object in the token");
    assert!(obj.contains("AES length 32"), "{obj}");
    assert!(
        obj.contains("sensitive") && obj.contains("never extractable"),
        "{obj}"
    );
    let hex_id = hsm::id_of(&obj);
    assert!(
        hex_id.starts_with(&format!("{}00000001", id.replace('-', ""))) && hex_id.len() == 56,
        "CKA_ID = key id || version || nonce: {obj}"
    );
    let read = t.tool(&["--read-object", "--type", "secrkey", "--id", &hex_id]);
    assert!(!read.status.success(), "value readable: {read:?}");
    // The key store holds no material: only the object's label.
    let store = std::fs::read_to_string(e.state.join("kms/keys.json")).unwrap();
    assert!(
        store.contains(&label(&id, 1)) && store.contains("\"pkcs11\""),
        "{store}"
    );

    // Data keys: wrapped in the token, bound to the context, algorithm byte 2.
    let dk = e.json(&["datakey", "create", "--key", "k", "--context", "app=x"]);
    let ct = dk["cipher_text"].as_str().unwrap().to_owned();
    assert_eq!(&ct[10..12], "02", "blob algorithm byte: pkcs11");
    let back = e.json(&[
        "datakey",
        "decrypt",
        "--cipher-text",
        &ct,
        "--context",
        "app=x",
    ]);
    assert_eq!(back["data_key"], dk["plain_text"]);
    assert!(
        e.fails(&[
            "datakey",
            "decrypt",
            "--cipher-text",
            &ct,
            "--context",
            "app=y"
        ])
        .contains("does not decrypt")
    );
    let mut flipped = hex::decode(&ct).unwrap();
    let n = flipped.len();
    flipped[n - 1] ^= 1;
    e.fails(&[
        "datakey",
        "decrypt",
        "--cipher-text",
        &hex::encode(&flipped),
        "--context",
        "app=x",
    ]);
    let nop = e.json(&["datakey", "create-without-plaintext", "--key", "k"]);
    assert!(nop.get("plain_text").is_none());
    e.json(&[
        "datakey",
        "decrypt",
        "--cipher-text",
        nop["cipher_text"].as_str().unwrap(),
    ]);
    let plain = "00112233445566778899aabbccddeeff";
    let enc = e.json(&["datakey", "encrypt", "--key", "k", "--plain-text", plain]);
    let dec = e.json(&[
        "datakey",
        "decrypt",
        "--cipher-text",
        enc["cipher_text"].as_str().unwrap(),
    ]);
    assert_eq!(dec["data_key"], plain);

    // A volume under the token key, written and read by qemu-io.
    e.json(&["volume", "create", "v", "--size", "16M", "--key", "k"]);
    e.json(&["volume", "attach", "v"]);
    let uri = e.uri("v");
    ok_io(&uri, "write -P 0x6b 4096 300000");
    ok_io(&uri, "read -P 0x6b 4096 300000");

    // Rotation: a second object; old blobs still unwrap; rewrap moves the volume to v2.
    assert_eq!(
        e.json(&["key", "rotate", "k"])["key_info"]["key_version"],
        "2"
    );
    assert!(t.object(&label(&id, 2)).is_some(), "v2 object");
    assert!(t.object(&label(&id, 1)).is_some(), "v1 kept");
    e.json(&[
        "datakey",
        "decrypt",
        "--cipher-text",
        &ct,
        "--context",
        "app=x",
    ]);
    e.json(&["volume", "detach", "v"]);
    assert_eq!(e.json(&["volume", "rewrap", "v"])["key_version"], 2);

    // Disable / enable: attach refused while disabled, names the key.
    e.json(&["key", "disable", "k"]);
    let err = e.fails(&["volume", "attach", "v"]);
    assert!(err.contains("disabled") && err.contains('k'), "{err}");
    e.json(&["key", "enable", "k"]);
    e.json(&["volume", "attach", "v"]);
    ok_io(&uri, "read -P 0x6b 4096 300000");

    // Daemon restart: the token is found again, the volume comes back, data intact.
    e.stop();
    start(&mut e, &t);
    if e.json(&["volume", "inspect", "v"])["attached"] != true {
        e.json(&["volume", "attach", "v"]);
    }
    ok_io(&uri, "read -P 0x6b 4096 300000");
    e.json(&[
        "datakey",
        "decrypt",
        "--cipher-text",
        &ct,
        "--context",
        "app=x",
    ]);

    // Cancelled deletion keeps the objects.
    e.json(&["volume", "detach", "v"]);
    e.json(&["key", "create", "--alias", "other"]);
    e.json(&["key", "schedule-deletion", "other", "--pending-days", "3"]);
    e.json(&["key", "cancel-deletion", "other"]);

    // Deletion at the end of the window destroys every version in the token.
    e.json(&["key", "schedule-deletion", "k", "--pending-days", "0"]);
    assert!(
        t.object(&label(&id, 1)).is_none(),
        "v1 destroyed in the token"
    );
    assert!(
        t.object(&label(&id, 2)).is_none(),
        "v2 destroyed in the token"
    );
    assert!(
        !t.tool(&["--read-object", "--type", "secrkey", "--id", &hex_id])
            .status
            .success()
    );
    assert_eq!(status(&e, "v"), "unrecoverable: key destroyed");
    assert!(e.fails(&["volume", "attach", "v"]).contains("destroyed"));
    assert!(
        e.fails(&[
            "datakey",
            "decrypt",
            "--cipher-text",
            &ct,
            "--context",
            "app=x"
        ])
        .contains("destroyed")
    );
    assert_eq!(e.json(&["audit", "verify"])["ok"], true);
    let audit = std::fs::read_to_string(e.state.join("kms/audit.jsonl")).unwrap();
    assert!(audit.contains("\"destroyKey\""));
}

#[test]
fn a_restored_backup_cannot_resurrect_a_destroyed_key() {
    let Some(t) = hsm::token("cv-backup") else {
        return;
    };
    let mut e = hsm_env(&t);
    start(&mut e, &t);
    let id = e.key("k");
    e.json(&["volume", "create", "v", "--size", "8M", "--key", "k"]);
    e.json(&["volume", "attach", "v"]);
    ok_io(&e.uri("v"), "write -P 0x33 0 65536");
    e.json(&["volume", "detach", "v"]);
    let ct = e.json(&["datakey", "create", "--key", "k"])["cipher_text"]
        .as_str()
        .unwrap()
        .to_owned();

    // The attacker's (or the careless operator's) backup: the whole state dir, root key too.
    e.stop();
    let backup = e.dir.path().join("backup");
    let cp = Command::new("cp")
        .arg("-a")
        .arg(&e.state)
        .arg(&backup)
        .status()
        .unwrap();
    assert!(cp.success());
    start(&mut e, &t);
    e.json(&["key", "schedule-deletion", "k", "--pending-days", "0"]);
    assert!(t.object(&label(&id, 1)).is_none());
    e.stop();

    // Restore: the records say "enabled", but the only copy of the key is gone.
    std::fs::remove_dir_all(&e.state).unwrap();
    std::fs::rename(&backup, &e.state).unwrap();
    start(&mut e, &t);
    assert_eq!(
        e.json(&["key", "describe", "k"])["key_info"]["key_state"],
        "2"
    );
    let err = e.fails(&["volume", "attach", "v"]);
    assert!(
        err.contains("destroyed") && err.contains("unrecoverable"),
        "{err}"
    );
    assert_eq!(status(&e, "v"), "unrecoverable: key destroyed");
    assert!(
        e.fails(&["datakey", "decrypt", "--cipher-text", &ct])
            .contains("destroyed")
    );
    // A new version cannot be made from nothing either: rotation makes a fresh key, which
    // does not open the old data.
    e.json(&["key", "rotate", "k"]);
    assert!(e.fails(&["volume", "attach", "v"]).contains("destroyed"));
}

/// Rewrites `[kms]` of the test config: pkcs11 custody in `t`, or file custody.
fn set_custody(e: &Env, t: Option<&Token>) {
    let mut table: toml::Table = std::fs::read_to_string(&e.cfg).unwrap().parse().unwrap();
    let kms = table.get_mut("kms").unwrap().as_table_mut().unwrap();
    for k in ["custody", "module", "token_label", "pin_file"] {
        kms.remove(k);
    }
    if let Some(t) = t {
        let extra: toml::Table = t.config().parse().unwrap();
        for (k, v) in extra["kms"].as_table().unwrap() {
            kms.insert(k.clone(), v.clone());
        }
    }
    std::fs::write(&e.cfg, toml::to_string(&table).unwrap()).unwrap();
}

#[test]
fn file_and_token_custody_side_by_side() {
    let Some(t) = hsm::token("cv-mixed") else {
        return;
    };
    let mut e = Env::new();
    e.start();
    let f = e.json(&["key", "create", "--alias", "f"])["key_info"].clone();
    assert_eq!(f["custody"], "file");
    e.json(&["volume", "create", "vf", "--size", "8M", "--key", "f"]);
    e.json(&["volume", "attach", "vf"]);
    ok_io(&e.uri("vf"), "write -P 0x11 0 65536");
    e.json(&["volume", "detach", "vf"]);
    let fct = e.json(&["datakey", "create", "--key", "f"])["cipher_text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(&fct[10..12], "01");
    e.stop();

    // Token custody: old file keys and volumes keep working; new keys go to the token.
    set_custody(&e, Some(&t));
    start(&mut e, &t);
    e.json(&["volume", "attach", "vf"]);
    ok_io(&e.uri("vf"), "read -P 0x11 0 65536");
    e.json(&["volume", "detach", "vf"]);
    e.json(&["datakey", "decrypt", "--cipher-text", &fct]);
    let h = e.json(&["key", "create", "--alias", "h"])["key_info"].clone();
    assert_eq!(h["custody"], "pkcs11");
    let hct = e.json(&["datakey", "create", "--key", "h"])["cipher_text"]
        .as_str()
        .unwrap()
        .to_owned();
    e.json(&["volume", "create", "vh", "--size", "8M", "--key", "h"]);

    // A blob is never tried with the other custody: relabelled algorithm bytes are refused
    // before any key is used.
    let relabel = |ct: &str, alg: &str| format!("{}{alg}{}", &ct[..10], &ct[12..]);
    assert!(
        e.fails(&["datakey", "decrypt", "--cipher-text", &relabel(&fct, "02")])
            .contains("custody")
    );
    assert!(
        e.fails(&["datakey", "decrypt", "--cipher-text", &relabel(&hct, "01")])
            .contains("custody")
    );
    e.stop();

    // Back to file custody: file volumes work, token keys are refused with a clear reason.
    set_custody(&e, None);
    e.start();
    e.json(&["volume", "attach", "vf"]);
    ok_io(&e.uri("vf"), "read -P 0x11 0 65536");
    let err = e.fails(&["datakey", "decrypt", "--cipher-text", &hct]);
    assert!(err.contains("pkcs11") && err.contains("custody"), "{err}");
    assert!(e.fails(&["volume", "attach", "vh"]).contains("pkcs11"));
}

/// Runs `serve` and expects it to refuse to start; returns its stderr.
fn refused(e: &Env, t: &Token) -> String {
    let err = e.refused_via(&t.wrapper(), "a bad [kms] setting");
    let last = err.trim_end().lines().last().unwrap_or("").to_owned();
    assert!(
        last.contains(&e.cfg.display().to_string()),
        "names the config file: {err}"
    );
    last
}

fn with_kms(t: &Token, change: impl Fn(&mut toml::Table)) -> Env {
    Env::with_config(|_| {
        let mut table: toml::Table = t.config().parse().unwrap();
        change(table.get_mut("kms").unwrap().as_table_mut().unwrap());
        toml::to_string(&table).unwrap()
    })
}

#[test]
fn bad_token_settings_refuse_to_start() {
    let Some(t) = hsm::token("cv-bad") else {
        return;
    };
    // Wrong PIN.
    let wrong = t.dir.path().join("wrong-pin");
    std::fs::write(&wrong, "0000\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = with_kms(&t, |k| {
        k.insert("pin_file".into(), wrong.display().to_string().into());
    });
    let err = refused(&e, &t);
    assert!(
        err.contains("kms.pin_file") && err.contains("PinIncorrect"),
        "{err}"
    );

    // A PIN file others can read.
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = refused(&e, &t);
    assert!(
        err.contains("kms.pin_file") && err.contains("chmod 600"),
        "{err}"
    );

    // No such module.
    let e = with_kms(&t, |k| {
        k.insert("module".into(), "/nonexistent/libpkcs11.so".into());
    });
    let err = refused(&e, &t);
    assert!(
        err.contains("kms.module") && err.contains("/nonexistent"),
        "{err}"
    );

    // A library that is not a PKCS#11 module.
    let e = with_kms(&t, |k| {
        k.insert("module".into(), "/lib/x86_64-linux-gnu/libc.so.6".into());
    });
    if std::path::Path::new("/lib/x86_64-linux-gnu/libc.so.6").exists() {
        assert!(refused(&e, &t).contains("kms.module"));
    }

    // No token with that label.
    let e = with_kms(&t, |k| {
        k.insert("token_label".into(), "no-such-token".into());
    });
    let err = refused(&e, &t);
    assert!(
        err.contains("kms.token_label") && err.contains("no-such-token") && err.contains("cv-bad"),
        "{err}"
    );

    // The PIN never in the TOML; pkcs11 without a PIN source; both sources.
    let e = with_kms(&t, |k| {
        k.insert("pin".into(), hsm::PIN.into());
    });
    assert!(refused(&e, &t).contains("pin"));
    let e = with_kms(&t, |k| {
        k.remove("pin_file");
    });
    assert!(refused(&e, &t).contains("kms.pin_file"));
    let e = with_kms(&t, |k| {
        k.insert("pin_credential".into(), "cryptvol-hsm-pin".into());
    });
    assert!(refused(&e, &t).contains("not both"));
    // A credential without systemd.
    let e = with_kms(&t, |k| {
        k.remove("pin_file");
        k.insert("pin_credential".into(), "cryptvol-hsm-pin".into());
    });
    assert!(refused(&e, &t).contains("kms.pin_credential"));
}

#[test]
fn two_daemons_share_one_token() {
    let Some(t) = hsm::token("cv-shared") else {
        return;
    };
    let mut a = hsm_env(&t);
    start(&mut a, &t);
    let id = a.key("shared");
    let dk = a.json(&[
        "datakey",
        "create",
        "--key",
        "shared",
        "--context",
        "host=a",
    ]);

    // Host B: its own state dir on the same token. The key records reach it as files (here a
    // copy of keys.json, the sealing file of its generation and the root key that seals it;
    // with [kms] store = "rados" they would be shared objects): B then unwraps what A
    // wrapped, in the token.
    let mut b = hsm_env(&t);
    for f in ["kms/keys.json", "kms/sealing.key", "root.key"] {
        std::fs::create_dir_all(b.state.join("kms")).unwrap();
        std::fs::copy(a.state.join(f), b.state.join(f)).unwrap();
    }
    start(&mut b, &t);
    let back = b.json(&[
        "datakey",
        "decrypt",
        "--cipher-text",
        dk["cipher_text"].as_str().unwrap(),
        "--context",
        "host=a",
    ]);
    assert_eq!(back["data_key"], dk["plain_text"]);
    assert_eq!(back["key_id"], id.as_str());
    // A destroys the key: B can no longer unwrap, though its records still say enabled.
    a.json(&["key", "schedule-deletion", "shared", "--pending-days", "0"]);
    let err = b.fails(&[
        "datakey",
        "decrypt",
        "--cipher-text",
        dk["cipher_text"].as_str().unwrap(),
        "--context",
        "host=a",
    ]);
    assert!(err.contains("destroyed"), "{err}");
}

#[test]
fn a_token_that_goes_away_is_an_error_not_a_destroyed_key() {
    let Some(t) = hsm::token("cv-gone") else {
        return;
    };
    let mut e = hsm_env(&t);
    start(&mut e, &t);
    e.json(&["key", "create", "--alias", "k"]);
    e.json(&["key", "create", "--alias", "p"]);
    e.json(&["volume", "create", "v", "--size", "8M", "--key", "k"]);
    let ct = e.json(&["datakey", "create", "--key", "k"])["cipher_text"]
        .as_str()
        .unwrap()
        .to_owned();
    // The token's storage vanishes under the running daemon (a removed or reset token).
    let tokens = t.dir.path().join("tokens");
    let away = t.dir.path().join("tokens-away");
    std::fs::rename(&tokens, &away).unwrap();
    std::fs::create_dir(&tokens).unwrap();
    let err = e.fails(&["datakey", "decrypt", "--cipher-text", &ct]);
    assert!(
        err.contains("KMS.0503") && !err.contains("destroyed"),
        "a token error, not a destroyed key: {err}"
    );
    let err = e.fails(&["volume", "attach", "v"]);
    assert!(!err.contains("destroyed"), "{err}");
    assert!(
        !status(&e, "v").contains("unrecoverable"),
        "{}",
        status(&e, "v")
    );
    // A deletion window that ends meanwhile is not recorded as done while the objects may
    // still be in the token: the key stays pending.
    e.json(&["key", "schedule-deletion", "p", "--pending-days", "0"]);
    assert_eq!(
        e.json(&["key", "describe", "p"])["key_info"]["key_state"],
        "4"
    );
    std::fs::remove_dir(&tokens).unwrap();
    std::fs::rename(&away, &tokens).unwrap();
    // Back, after a daemon restart: the key works, and the pending deletion completes.
    e.stop();
    start(&mut e, &t);
    e.json(&["datakey", "decrypt", "--cipher-text", &ct]);
    e.json(&["volume", "attach", "v"]);
    assert_eq!(
        e.json(&["key", "describe", "p"])["key_info"]["key_state"],
        "destroyed"
    );
}

#[test]
fn evs_attach_rules_with_a_token_key() {
    let Some(t) = hsm::token("cv-evs") else {
        return;
    };
    let mut e = hsm_env(&t);
    start(&mut e, &t);
    e.json(&["key", "create", "--alias", "k"]);
    e.json(&["volume", "create", "v", "--size", "8M", "--key", "k"]);
    e.json(&["volume", "attach", "v"]);
    let uri = e.uri("v");
    ok_io(&uri, "write -P 0x42 0 131072");

    // Disabled: the attached volume keeps running; re-attach is refused naming the state.
    e.json(&["key", "disable", "k"]);
    ok_io(&uri, "read -P 0x42 0 131072");
    e.json(&["volume", "detach", "v"]);
    let err = e.fails(&["volume", "attach", "v"]);
    assert!(err.contains("disabled"), "{err}");
    e.json(&["key", "enable", "k"]);

    // Pending deletion: attached keeps running, attach refused at once; cancel returns the
    // key disabled, and the token object was never touched.
    e.json(&["volume", "attach", "v"]);
    e.json(&["key", "schedule-deletion", "k", "--pending-days", "7"]);
    ok_io(&uri, "read -P 0x42 0 131072");
    e.json(&["volume", "detach", "v"]);
    let err = e.fails(&["volume", "attach", "v"]);
    assert!(err.contains("pending deletion"), "{err}");
    e.json(&["key", "cancel-deletion", "k"]);
    assert_eq!(
        e.json(&["key", "describe", "k"])["key_info"]["key_state"],
        "3"
    );
    e.json(&["key", "enable", "k"]);

    // Read-only attach: reads, refuses writes.
    e.json(&["volume", "attach", "v", "--read-only"]);
    let r = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read -P 0x42 0 131072", &uri])
        .output()
        .unwrap();
    assert!(
        r.status.success() && !String::from_utf8_lossy(&r.stdout).contains("fail"),
        "{r:?}"
    );
    assert!(!qemu_io(&uri, &["write -P 1 0 512"]).status.success());
    e.json(&["volume", "detach", "v"]);

    // Destroyed while attached: keeps running until detached, then unrecoverable.
    e.json(&["volume", "attach", "v"]);
    e.json(&["key", "schedule-deletion", "k", "--pending-days", "0"]);
    ok_io(&uri, "read -P 0x42 0 131072");
    e.json(&["volume", "detach", "v"]);
    assert!(e.fails(&["volume", "attach", "v"]).contains("destroyed"));
    assert_eq!(status(&e, "v"), "unrecoverable: key destroyed");
}

#[test]
fn import_to_hsm_moves_a_key_with_attached_volumes() {
    let Some(t) = hsm::token("cv-import") else {
        return;
    };
    let mut e = Env::new();
    e.start();
    let id = e.key("f");
    e.json(&["key", "rotate", "f"]);
    for v in ["va", "vb"] {
        e.json(&["volume", "create", v, "--size", "8M", "--key", "f"]);
        e.json(&["volume", "attach", v]);
        ok_io(&e.uri(v), "write -P 0x77 8192 65536");
    }
    e.json(&["volume", "detach", "vb"]);
    let ct = e.json(&["datakey", "create", "--key", "f"])["cipher_text"]
        .as_str()
        .unwrap()
        .to_owned();
    // Not without a token.
    assert!(e.fails(&["key", "import-to-hsm", "f"]).contains("KMS.0503"));
    let sealed_before = std::fs::read_to_string(e.state.join("kms/keys.json")).unwrap();
    e.stop();

    set_custody(&e, Some(&t));
    start(&mut e, &t);
    // First with the material kept: client-held cipher texts still decrypt.
    let r = e.json(&["key", "import-to-hsm", "f", "--keep-file-material"]);
    assert_eq!(r["key_info"]["custody"], "pkcs11");
    assert_eq!(r["rewrapped_volumes"], serde_json::json!(["va", "vb"]));
    assert_eq!(r["file_material_dropped"], false);
    for v in [1, 2] {
        let o = t
            .object(&label(&id, v))
            .unwrap_or_else(|| panic!("v{v} in the token"));
        assert!(o.contains("never extractable"), "{o}");
    }
    e.json(&["datakey", "decrypt", "--cipher-text", &ct]);
    // The attached volume kept running; both headers now hold token-made blobs.
    ok_io(&e.uri("va"), "read -P 0x77 8192 65536");
    for v in ["va", "vb"] {
        let c = e.json(&["volume", "inspect", v])["cipher_text"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(&c[10..12], "02", "{v} re-wrapped in the token");
    }

    // Then for good: the sealed material leaves the key store.
    let r = e.json(&["key", "import-to-hsm", "f"]);
    assert_eq!(r["rewrapped_volumes"], serde_json::json!([]));
    assert_eq!(r["file_material_dropped"], true);
    let store: serde_json::Value =
        serde_json::from_slice(&std::fs::read(e.state.join("kms/keys.json")).unwrap()).unwrap();
    let rec = store["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == id.as_str())
        .unwrap()
        .clone();
    assert!(rec.get("legacy").is_none(), "{rec}");
    let old: serde_json::Value = serde_json::from_str(&sealed_before).unwrap();
    for s in old["keys"][0]["sealed"].as_array().unwrap() {
        assert!(
            !store.to_string().contains(s.as_str().unwrap()),
            "sealed material still in keys.json"
        );
    }
    assert!(
        e.fails(&["datakey", "decrypt", "--cipher-text", &ct])
            .contains("custody")
    );
    // Volumes keep attaching, through the token only.
    e.json(&["volume", "detach", "va"]);
    for v in ["va", "vb"] {
        e.json(&["volume", "attach", v]);
        ok_io(&e.uri(v), "read -P 0x77 8192 65536");
    }
    let audit = std::fs::read_to_string(e.state.join("kms/audit.jsonl")).unwrap();
    assert!(audit.contains("\"importKeyToHsm\"") && audit.contains("\"dropFileMaterial\""));
    assert_eq!(e.json(&["audit", "verify"])["ok"], true);

    // Deleting it now destroys the token objects.
    e.json(&["volume", "detach", "va"]);
    e.json(&["volume", "detach", "vb"]);
    e.json(&["key", "schedule-deletion", "f", "--pending-days", "0"]);
    assert!(t.object(&label(&id, 1)).is_none() && t.object(&label(&id, 2)).is_none());
    assert!(e.fails(&["volume", "attach", "va"]).contains("destroyed"));
}
