//! PKCS#11 custody together with the key store's sealing-key generations (issues 11 and 13),
//! through the real daemon, CLI, qemu-io and SoftHSM2: a token key's record names its token
//! objects through every re-sealing untouched while file-custody material is re-sealed; the
//! material a key keeps while moving to the token is re-sealed like file material, and
//! dropping it is a generation of its own, so the `keys.json` that still held it is refused.
mod common;

use common::hsm::{self, Token};
use common::{Env, ok_io};
use serde_json::Value;

fn start(e: &mut Env, t: &Token) {
    e.start_via(&t.wrapper());
}

/// Switches `[kms]` of the test config to pkcs11 custody in `t`.
fn to_token(e: &Env, t: &Token) {
    let mut table: toml::Table = std::fs::read_to_string(&e.cfg).unwrap().parse().unwrap();
    let kms = table.get_mut("kms").unwrap().as_table_mut().unwrap();
    let extra: toml::Table = t.config().parse().unwrap();
    for (k, v) in extra["kms"].as_table().unwrap() {
        kms.insert(k.clone(), v.clone());
    }
    std::fs::write(&e.cfg, toml::to_string(&table).unwrap()).unwrap();
}

fn store(e: &Env) -> Value {
    serde_json::from_slice(&std::fs::read(e.state.join("kms/keys.json")).unwrap()).unwrap()
}

/// The record of `key_id` in keys.json.
fn record(e: &Env, key_id: &str) -> Value {
    store(e)["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == key_id)
        .unwrap_or_else(|| panic!("no record of {key_id}"))
        .clone()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// Starts the daemon expecting it to refuse; returns its stderr.
fn refused(e: &Env, t: &Token) -> String {
    e.refused_via(&t.wrapper(), "a restored keys.json")
}

#[test]
fn token_labels_ride_through_every_generation_file_material_is_resealed() {
    let Some(t) = hsm::token("cv-gens") else {
        return;
    };
    let mut e = Env::new();
    e.start();
    let f = e.key("f");
    e.json(&["volume", "create", "vf", "--size", "8M", "--key", "f"]);
    e.json(&["volume", "attach", "vf"]);
    ok_io(&e.uri("vf"), "write -P 0x5a 4096 65536");
    e.json(&["volume", "detach", "vf"]);
    e.stop();

    to_token(&e, &t);
    start(&mut e, &t);
    let tk = e.key("t");
    e.json(&["volume", "create", "vt", "--size", "8M", "--key", "t"]);
    e.json(&["volume", "attach", "vt"]);
    ok_io(&e.uri("vt"), "write -P 0xa5 4096 65536");
    e.json(&["volume", "detach", "vt"]);

    let before = store(&e);
    let gen0 = before["generation"].as_u64().unwrap();
    let (t0, f0) = (record(&e, &tk), record(&e, &f));
    assert_eq!(t0["custody"], "pkcs11");
    assert_eq!(f0["custody"], "file");
    let label = strings(&t0["sealed"]);
    assert!(label[0].starts_with(&format!("cryptvol/{tk}/v1/")), "{t0}");
    let old_keys = std::fs::read(e.state.join("kms/keys.json")).unwrap();

    // Changes of every kind: each one re-seals the store under a new sealing key.
    e.json(&["key", "rotate", "t"]);
    e.json(&["key", "rotate", "f"]);
    e.json(&["key", "disable", "t"]);
    e.json(&["key", "enable", "t"]);
    e.key("other");
    let after = store(&e);
    assert!(after["generation"].as_u64().unwrap() >= gen0 + 5, "{after}");
    let (t1, f1) = (record(&e, &tk), record(&e, &f));
    let t_sealed = strings(&t1["sealed"]);
    assert_eq!(
        t_sealed[0], label[0],
        "token object label carried over untouched"
    );
    assert!(
        t_sealed[1].starts_with(&format!("cryptvol/{tk}/v2/")),
        "{t1}"
    );
    let f_sealed = strings(&f1["sealed"]);
    assert_eq!(f_sealed.len(), 2);
    assert_ne!(
        f_sealed[0],
        strings(&f0["sealed"])[0],
        "file material re-sealed under the new generation"
    );
    assert!(
        !String::from_utf8_lossy(&old_keys).contains(&f_sealed[0]),
        "no file entry survives a generation"
    );

    // Both keys keep working across a restart: the file one through its re-sealed material,
    // the token one through the objects its unchanged labels name.
    e.stop();
    start(&mut e, &t);
    for (v, p) in [("vf", "0x5a"), ("vt", "0xa5")] {
        e.json(&["volume", "attach", v]);
        ok_io(&e.uri(v), &format!("read -P {p} 4096 65536"));
        e.json(&["volume", "rewrap", v]);
        e.json(&["volume", "detach", v]);
    }
    e.stop();

    // The keys.json from before those changes: refused, naming the generations.
    let newest = std::fs::read(e.state.join("kms/keys.json")).unwrap();
    std::fs::write(e.state.join("kms/keys.json"), &old_keys).unwrap();
    let err = refused(&e, &t);
    assert!(
        err.contains("older copy") && err.contains("keys.json"),
        "{err}"
    );
    std::fs::write(e.state.join("kms/keys.json"), &newest).unwrap();
    start(&mut e, &t);
    e.json(&["volume", "attach", "vt"]);
    ok_io(&e.uri("vt"), "read -P 0xa5 4096 65536");
}

#[test]
fn kept_file_material_is_resealed_and_its_drop_is_a_generation() {
    let Some(t) = hsm::token("cv-gens-drop") else {
        return;
    };
    let mut e = Env::new();
    e.start();
    let f = e.key("f");
    e.json(&["volume", "create", "v", "--size", "8M", "--key", "f"]);
    let ct = e.json(&["datakey", "create", "--key", "f"])["cipher_text"]
        .as_str()
        .unwrap()
        .to_owned();
    e.stop();

    to_token(&e, &t);
    start(&mut e, &t);
    let r = e.json(&["key", "import-to-hsm", "f", "--keep-file-material"]);
    assert_eq!(r["file_material_dropped"], false);
    let kept = strings(&record(&e, &f)["legacy"]);
    assert_eq!(kept.len(), 1);
    // Another change: the kept material is re-sealed, and still opens (an algorithm-1 blob
    // made before the move decrypts).
    e.key("other");
    let resealed = strings(&record(&e, &f)["legacy"]);
    assert_eq!(resealed.len(), 1);
    assert_ne!(resealed[0], kept[0], "legacy material re-sealed");
    e.json(&["datakey", "decrypt", "--cipher-text", &ct]);
    let with_material = std::fs::read(e.state.join("kms/keys.json")).unwrap();
    let gen_with = store(&e)["generation"].as_u64().unwrap();

    let r = e.json(&["key", "import-to-hsm", "f"]);
    assert_eq!(r["file_material_dropped"], true);
    assert!(record(&e, &f).get("legacy").is_none());
    assert!(store(&e)["generation"].as_u64().unwrap() > gen_with);
    assert!(
        e.fails(&["datakey", "decrypt", "--cipher-text", &ct])
            .contains("custody")
    );
    let audit = std::fs::read_to_string(e.state.join("kms/audit.jsonl")).unwrap();
    assert!(audit.contains("\"importKeyToHsm\"") && audit.contains("\"dropFileMaterial\""));
    assert_eq!(e.json(&["audit", "verify"])["ok"], true);
    e.stop();

    // Putting back the keys.json that still held the material does not bring it back.
    let newest = std::fs::read(e.state.join("kms/keys.json")).unwrap();
    std::fs::write(e.state.join("kms/keys.json"), &with_material).unwrap();
    let err = refused(&e, &t);
    assert!(err.contains("older copy"), "{err}");
    std::fs::write(e.state.join("kms/keys.json"), &newest).unwrap();
    start(&mut e, &t);
    e.json(&["volume", "attach", "v"]);
}

/// One HTTP/1.1 POST on the control socket; the whole answer.
fn post(sock: &std::path::Path, path: &str, body: &str) -> String {
    common::control_request(sock, "POST", path, body)
}

#[test]
fn import_requests_are_audited_in_the_keyed_chain_refused_ones_too() {
    let mut e = Env::new();
    e.start();
    let f = e.key("f");
    let path = "/v1/kms/import-key-to-hsm";
    let sock = e.dir.path().join("c.sock");
    // Refused by the API (a malformed field, no body): audited all the same.
    assert!(post(&sock, path, r#"{"key_id": 5}"#).contains("KMS.0101"));
    assert!(post(&sock, path, "").contains("KMS.0101"));
    // Refused by the key manager: no token to move to.
    let answer = post(&sock, path, &format!(r#"{{"key_id": "{f}"}}"#));
    assert!(answer.contains("KMS.0503"), "{answer}");
    let log = std::fs::read_to_string(e.state.join("kms/audit.jsonl")).unwrap();
    let recs: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &Value| r["operation"] == "importKeyToHsm")
        .collect();
    let results: Vec<&str> = recs.iter().map(|r| r["result"].as_str().unwrap()).collect();
    assert_eq!(results, ["KMS.0101", "KMS.0101", "KMS.0503"], "{recs:?}");
    assert_eq!(recs[2]["key_id"], f.as_str());
    assert!(recs.iter().all(|r| r["v"] == 2), "keyed records: {recs:?}");
    assert_eq!(e.json(&["audit", "verify"])["ok"], true);
}
