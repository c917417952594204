//! A host switched from local key records (`[kms] store = "file"`, `keys.json`) to shared
//! ones (`"rados"`) through the real daemon, CLI and a throwaway cluster
//! (tests/ceph/micro-ceph.sh): the daemon refuses to start while local keys are unmigrated,
//! `key migrate-records` moves them (the volume under them attaches and reads back), a second
//! run changes nothing, and a host whose alias the shared records hold as another key is
//! refused with nothing moved.
#![cfg(feature = "rbd")]

mod ceph_support;
mod common;
#[path = "ceph_support/hosts.rs"]
mod hosts;

use std::process::Output;

use ceph_support::{CLIENT_A, CLIENT_B, MicroCeph};
use common::{Env, qemu_io};

/// Sets `[kms] store = "rados"` in `h`'s config.
fn switch_to_rados(h: &Env) {
    let mut t: toml::Table = std::fs::read_to_string(&h.cfg).unwrap().parse().unwrap();
    t["kms"]
        .as_table_mut()
        .unwrap()
        .insert("store".into(), "rados".into());
    std::fs::write(&h.cfg, toml::to_string(&t).unwrap()).unwrap();
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn migrate(h: &Env) -> Output {
    h.cli(&["--json", "key", "migrate-records"])
}

fn migrated(h: &Env) -> serde_json::Value {
    let o = migrate(h);
    assert!(o.status.success(), "migrate-records: {}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn aliases(v: &serde_json::Value) -> Vec<&str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|k| k["key_alias"].as_str().unwrap())
        .collect()
}

#[test]
fn local_keys_move_into_shared_records_and_their_volumes_attach() {
    let test = "local_keys_move_into_shared_records_and_their_volumes_attach";
    if !common::tools_present(test, &["qemu-io"]) {
        return;
    }
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    // Host A with local key records: key k (two versions), an RBD volume under it.
    let mut a = hosts::host(&mc, CLIENT_A, 5, "");
    a.start();
    let k = a.key("k");
    a.json(&["key", "rotate", "k"]);
    a.json(&[
        "volume", "create", "v", "--size", "4M", "--key", "k", "--store", "rbd",
    ]);
    a.json(&["volume", "attach", "v"]);
    let o = qemu_io(&a.uri("v"), &["write -P 0x5c 0 1M", "flush"]);
    assert!(o.status.success(), "{}", text(&o));
    a.json(&["volume", "detach", "v"]);
    assert!(a.stop().success());
    let kms = a.state.join("kms");
    let backup = a.dir.path().join("kms-before");
    std::fs::create_dir(&backup).unwrap();
    for f in ["keys.json", "sealing.key"] {
        std::fs::copy(kms.join(f), backup.join(f)).unwrap();
    }

    // Switched to shared records: the daemon refuses to start, naming the command.
    switch_to_rados(&a);
    let err = a.refused_via(&[], "unmigrated local keys");
    assert!(
        err.contains("key migrate-records") && err.contains("keys.json"),
        "{err}"
    );
    let m = migrated(&a);
    assert_eq!(aliases(&m["added"]), ["k"], "{m}");
    assert!(!kms.join("keys.json").exists() && !kms.join("sealing.key").exists());

    // The key, both versions, in the shared records; the volume attaches and reads back.
    a.start();
    let d = a.json(&["key", "describe", "k"]);
    assert_eq!(d["key_info"]["key_id"], k.as_str(), "{d}");
    assert_eq!(d["key_info"]["key_versions"], "2", "{d}");
    a.json(&["volume", "attach", "v"]);
    let o = qemu_io(&a.uri("v"), &["read -P 0x5c 0 1M"]);
    assert!(o.status.success(), "{}", text(&o));
    // Not while the daemon runs.
    let o = migrate(&a);
    assert!(
        !o.status.success() && text(&o).contains("stop it first"),
        "{}",
        text(&o)
    );
    // The merge is in the audit chain, which still verifies.
    let audit = std::fs::read_to_string(kms.join("audit.jsonl")).unwrap();
    assert!(audit.contains("migrateKeyRecords"), "{audit}");
    let v = a.json(&["audit", "verify"]);
    assert_eq!(v["ok"], true, "{v}");
    assert!(a.stop().success());

    // Again: nothing to do. With the old local store back (a run interrupted after its
    // commit, or a restored backup): k is already there, left as the shared records have it.
    let m = migrated(&a);
    assert!(aliases(&m["added"]).is_empty(), "{m}");
    for f in ["keys.json", "sealing.key"] {
        std::fs::copy(backup.join(f), kms.join(f)).unwrap();
    }
    let m = migrated(&a);
    assert_eq!(
        (aliases(&m["added"]), aliases(&m["already_present"])),
        (vec![], vec!["k"]),
        "{m}"
    );
    assert!(!kms.join("keys.json").exists());

    // Host C, same root key, its own local key store with another key under alias k: refused,
    // naming it; nothing moved (not even its other key), its local store kept.
    let mut c = hosts::host(&mc, CLIENT_B, 5, "");
    std::fs::copy(a.state.join("root.key"), c.state.join("root.key")).unwrap();
    c.start();
    c.key("k");
    c.key("c-only");
    assert!(c.stop().success());
    switch_to_rados(&c);
    let o = migrate(&c);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("KMS.0202") && t.contains("nothing migrated"),
        "{t}"
    );
    assert!(c.state.join("kms/keys.json").exists());
    a.start();
    let list = a.json(&["key", "list"]).to_string();
    assert!(!list.contains("c-only"), "{list}");
}

#[test]
fn token_keys_migrate_as_references() {
    let test = "token_keys_migrate_as_references";
    if !common::tools_present(test, &["qemu-io"]) {
        return;
    }
    let Some(t) = common::hsm::token("cv-migrate") else {
        return;
    };
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    let mut a = hosts::host(&mc, CLIENT_A, 5, &t.config());
    a.start_via(&t.wrapper());
    let info = a.json(&["key", "create", "--alias", "hk"])["key_info"].clone();
    assert_eq!(info["custody"], "pkcs11", "{info}");
    let id = info["key_id"].as_str().unwrap().to_owned();
    a.json(&[
        "volume", "create", "v", "--size", "4M", "--key", "hk", "--store", "rbd",
    ]);
    a.json(&["volume", "attach", "v"]);
    let o = qemu_io(&a.uri("v"), &["write -P 0x6d 0 1M", "flush"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(a.stop().success());

    switch_to_rados(&a);
    let o = a.cli_via(&t.wrapper(), &["--json", "key", "migrate-records"]);
    assert!(o.status.success(), "migrate-records: {}", text(&o));
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(aliases(&m["added"]), ["hk"], "{m}");
    // The token object is the key, before and after: referenced, not copied or remade.
    assert!(t.object(&format!("cryptvol/{id}/v1")).is_some());
    a.start_via(&t.wrapper());
    let d = a.json(&["key", "describe", "hk"]);
    assert_eq!(
        (&d["key_info"]["key_id"], &d["key_info"]["custody"]),
        (&id.as_str().into(), &"pkcs11".into()),
        "{d}"
    );
    let o = qemu_io(&a.uri("v"), &["read -P 0x6d 0 1M"]);
    assert!(o.status.success(), "re-attached at start: {}", text(&o));
}
