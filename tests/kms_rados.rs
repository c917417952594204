//! Shared key records (`[kms] store = "rados"`) through the real daemon: two "hosts" (two
//! daemons, own state dirs, sockets and cephx users, the same root key) on one throwaway
//! cluster (tests/ceph/micro-ceph.sh). Host B never gets a copy of A's `kms/` dir: every key
//! it uses comes from the RADOS object. Real clients: the CLI, qemu-io, nbdcopy, the `rados`
//! CLI (to roll the object back).
#![cfg(feature = "rbd")]

mod ceph_support;
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use ceph_support::{CLIENT_A, CLIENT_B, MicroCeph, POOL};
use common::{Env, have, hsm, qemu_io};

const OBJECT: &str = "cryptvol.kms.records";

/// A daemon on the cluster as `client`, key records in RADOS, 5 s operation timeout.
fn host(mc: &MicroCeph, client: &str) -> Env {
    host_with(mc, client, "")
}

/// Like [`host`], with more `[kms]` lines.
fn host_with(mc: &MicroCeph, client: &str, kms: &str) -> Env {
    let conf = mc.conf().to_owned();
    let keyring = mc.keyring(client);
    Env::with_config(|_| {
        format!(
            "[ceph]\nconf = \"{}\"\nclient = \"{client}\"\nkeyring = \"{}\"\npool = \"{POOL}\"\n\
             op_timeout_secs = 5\n[kms]\nstore = \"rados\"\nhost_id = \"{client}\"\n{kms}",
            conf.display(),
            keyring.display()
        )
    })
}

/// Hosts A and B, started, sharing only the root key.
fn two_hosts(mc: &MicroCeph) -> (Env, Env) {
    let mut a = host(mc, CLIENT_A);
    let mut b = host(mc, CLIENT_B);
    std::fs::copy(a.state.join("root.key"), b.state.join("root.key")).unwrap();
    a.start();
    b.start();
    (a, b)
}

fn aliases(h: &Env) -> Vec<String> {
    let mut v: Vec<String> = h.json(&["key", "list"])["key_details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key_alias"].as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

fn rados(mc: &MicroCeph, args: &[&str]) {
    let o = Command::new("rados")
        .arg("--conf")
        .arg(mc.conf())
        .args(["--id", CLIENT_A, "--pool", POOL])
        .args(args)
        .env_remove("CEPH_ARGS")
        .output()
        .expect("run rados");
    assert!(
        o.status.success(),
        "rados {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn audit_records(h: &Env) -> Vec<serde_json::Value> {
    std::fs::read_to_string(h.state.join("kms/audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_volume_made_on_a_opens_on_b_without_a_copy_of_a_key_store() {
    let test = "a_volume_made_on_a_opens_on_b_without_a_copy_of_a_key_store";
    if !["qemu-io", "nbdcopy"].iter().all(|t| have(t)) {
        eprintln!("SKIP {test}: qemu-io or nbdcopy not installed");
        return;
    }
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    let (a, b) = two_hosts(&mc);
    a.json(&["key", "create", "--alias", "k"]);
    a.json(&[
        "volume", "create", "v", "--size", "4M", "--key", "k", "--store", "rbd",
    ]);
    a.json(&["volume", "attach", "v"]);
    let o = qemu_io(&a.uri("v"), &["write -P 0x5a 0 1M", "flush"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    a.json(&["volume", "detach", "v"]);

    // B has no keys.json, no sealing file: only the shared records.
    assert!(!b.state.join("kms/keys.json").exists());
    assert!(!b.state.join("kms/sealing.key").exists());
    assert_eq!(aliases(&b), ["k"]);
    b.json(&["volume", "attach", "v"]);
    let o = Command::new("nbdcopy")
        .args([&b.uri("v"), "-"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        o.stdout[..1 << 20].iter().all(|&x| x == 0x5a),
        "A's data on B"
    );
    assert!(o.stdout[1 << 20..].iter().all(|&x| x == 0));
    // Each host's audit chain names the host.
    let recs = audit_records(&b);
    let d = recs
        .iter()
        .find(|r| r["operation"] == "decryptDatakey")
        .expect("B audited the unwrap");
    assert_eq!(d["host"], CLIENT_B, "{d}");
    assert!(
        audit_records(&a)
            .iter()
            .any(|r| r["operation"] == "createKey" && r["host"] == CLIENT_A)
    );
    b.json(&["volume", "detach", "v"]);
}

#[test]
fn concurrent_changes_from_two_hosts_lose_nothing() {
    let test = "concurrent_changes_from_two_hosts_lose_nothing";
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    let (a, b) = two_hosts(&mc);
    a.json(&["key", "create", "--alias", "shared"]);
    std::thread::scope(|s| {
        for (h, p) in [(&a, "a"), (&b, "b")] {
            s.spawn(move || {
                for i in 0..20 {
                    h.json(&["key", "create", "--alias", &format!("{p}-{i}")]);
                    if i % 4 == 0 {
                        h.json(&["key", "rotate", "shared"]);
                    }
                }
            });
        }
    });
    let mut want: Vec<String> = (0..20)
        .flat_map(|i| [format!("a-{i}"), format!("b-{i}")])
        .collect();
    want.push("shared".into());
    want.sort();
    assert_eq!(aliases(&a), want);
    assert_eq!(aliases(&b), want);
    // Five rotations from each host on the same key: all eleven versions are there.
    for h in [&a, &b] {
        assert_eq!(
            h.json(&["key", "describe", "shared"])["key_info"]["key_versions"],
            "11"
        );
    }
    // A datakey wrapped on one host under the newest version unwraps on the other.
    let dk = a.json(&["datakey", "create", "--key", "shared", "--context", "c=1"]);
    let plain = b.json(&[
        "datakey",
        "decrypt",
        "--cipher-text",
        dk["cipher_text"].as_str().unwrap(),
        "--context",
        "c=1",
    ]);
    assert_eq!(plain["data_key"], dk["plain_text"]);
    // Two hosts racing for one alias: exactly one wins.
    let results: Vec<bool> = std::thread::scope(|s| {
        let hs: Vec<_> = [&a, &b]
            .into_iter()
            .map(|h| {
                s.spawn(move || {
                    h.cli(&["key", "create", "--alias", "race"])
                        .status
                        .success()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|&&ok| ok).count(), 1, "{results:?}");
}

#[test]
fn deletion_is_seen_on_every_host_and_destroys_once() {
    let test = "deletion_is_seen_on_every_host_and_destroys_once";
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    let (a, b) = two_hosts(&mc);
    let id = a.json(&["key", "create", "--alias", "d"])["key_info"]["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    b.json(&["datakey", "create", "--key", "d"]);
    a.json(&["key", "schedule-deletion", "d", "--pending-days", "7"]);
    let e = b.fails(&["datakey", "create", "--key", "d"]);
    assert!(e.contains("pending deletion"), "{e}");
    b.json(&["key", "cancel-deletion", "d"]);
    assert_eq!(
        a.json(&["key", "describe", "d"])["key_info"]["key_state"],
        "3"
    );
    // Window over at once: destroyed by B's sweep, seen destroyed on A, recorded once.
    b.json(&["key", "schedule-deletion", "d", "--pending-days", "0"]);
    assert_eq!(
        a.json(&["key", "describe", "d"])["key_info"]["key_state"],
        "destroyed"
    );
    let e = a.fails(&["datakey", "create", "--key", "d"]);
    assert!(e.contains("destroyed"), "{e}");
    let destroyed: usize = [&a, &b]
        .iter()
        .map(|h| {
            audit_records(h)
                .iter()
                .filter(|r| r["operation"] == "destroyKey" && r["key_id"] == id.as_str())
                .count()
        })
        .sum();
    assert_eq!(destroyed, 1);
}

#[test]
fn rolled_back_records_are_refused_by_a_host_that_saw_newer() {
    let test = "rolled_back_records_are_refused_by_a_host_that_saw_newer";
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    let (a, b) = two_hosts(&mc);
    a.json(&["key", "create", "--alias", "old"]);
    let old = mc.dir().join("records.old");
    let new = mc.dir().join("records.new");
    rados(&mc, &["get", OBJECT, old.to_str().unwrap()]);
    a.json(&["key", "create", "--alias", "new"]);
    a.json(&["key", "schedule-deletion", "old", "--pending-days", "0"]);
    assert_eq!(aliases(&b), ["new", "old"]);
    rados(&mc, &["get", OBJECT, new.to_str().unwrap()]);
    // The older bytes back: the object's RADOS version goes *up*, the generation inside
    // goes down. Both hosts saw the newer generation: refused, the destroyed key stays gone.
    rados(&mc, &["put", OBJECT, old.to_str().unwrap()]);
    for h in [&a, &b] {
        let e = h.fails(&["key", "describe", "old"]);
        assert!(e.contains("KMS.0502") && e.contains("rolled back"), "{e}");
        let e = h.fails(&["datakey", "create", "--key", "old"]);
        assert!(e.contains("KMS.0502"), "{e}");
    }
    // A byte of the records changed (a state edited): refused as not opening.
    let mut edited = std::fs::read(&new).unwrap();
    let s = String::from_utf8(edited.clone()).unwrap();
    let at = s
        .find("\"alias\": \"new\"")
        .expect("alias new in the records");
    edited[at + 10] = b'w';
    let edited_path = mc.dir().join("records.edited");
    std::fs::write(&edited_path, &edited).unwrap();
    rados(&mc, &["put", OBJECT, edited_path.to_str().unwrap()]);
    let e = a.fails(&["key", "list"]);
    assert!(e.contains("KMS.05"), "{e}");
    // The newest copy back: both hosts serve again.
    rados(&mc, &["put", OBJECT, new.to_str().unwrap()]);
    assert_eq!(
        b.json(&["key", "describe", "old"])["key_info"]["key_state"],
        "destroyed"
    );
    a.json(&["key", "create", "--alias", "after"]);
    assert_eq!(aliases(&b), ["after", "new", "old"]);
}

#[test]
fn cluster_lost_kms_calls_fail_within_the_timeout() {
    let test = "cluster_lost_kms_calls_fail_within_the_timeout";
    let Some(mut mc) = MicroCeph::start(test) else {
        return;
    };
    let (a, mut b) = two_hosts(&mc);
    a.json(&["key", "create", "--alias", "k"]);
    b.stop();
    mc.stop();
    // A running host: the call fails with KMS.0504 (op_timeout_secs = 5), never hangs.
    let t = Instant::now();
    let e = a.fails(&["key", "describe", "k"]);
    let took = t.elapsed();
    assert!(e.contains("KMS.0504"), "{e}");
    eprintln!("{test}: KMS call against a stopped cluster failed after {took:?}");
    assert!(took < Duration::from_secs(60), "{took:?}");
    assert!(
        audit_records(&a)
            .iter()
            .any(|r| r["operation"] == "describeKey" && r["result"] == "KMS.0504"),
        "the failed call is audited"
    );
    // A host starting while the cluster is gone: it starts, and KMS calls
    // fail with KMS.0504.
    b.start();
    let e = b.fails(&["key", "list"]);
    assert!(e.contains("KMS.0504"), "{e}");
}

#[test]
fn token_custody_keys_are_shared_through_the_records() {
    let test = "token_custody_keys_are_shared_through_the_records";
    let Some(t) = hsm::token("cv-rados") else {
        return;
    };
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    let kms = t.config().replacen("[kms]\n", "", 1);
    let mut a = host_with(&mc, CLIENT_A, &kms);
    let mut b = host_with(&mc, CLIENT_B, &kms);
    std::fs::copy(a.state.join("root.key"), b.state.join("root.key")).unwrap();
    a.start_via(&t.wrapper());
    b.start_via(&t.wrapper());
    let info = a.json(&["key", "create", "--alias", "hk"])["key_info"].clone();
    assert_eq!(info["custody"], "pkcs11");
    let id = info["key_id"].as_str().unwrap().to_owned();
    assert!(t.object(&format!("cryptvol/{id}/v1")).is_some());
    // Rotated on B (a token object made by B), wrapped on B, unwrapped on A.
    b.json(&["key", "rotate", "hk"]);
    let dk = b.json(&["datakey", "create", "--key", "hk", "--context", "c=2"]);
    let plain = a.json(&[
        "datakey",
        "decrypt",
        "--cipher-text",
        dk["cipher_text"].as_str().unwrap(),
        "--context",
        "c=2",
    ]);
    assert_eq!(plain["data_key"], dk["plain_text"]);
    // Destroyed by A's sweep: both token objects gone, B sees it destroyed.
    a.json(&["key", "schedule-deletion", "hk", "--pending-days", "0"]);
    for v in ["v1", "v2"] {
        assert!(
            t.object(&format!("cryptvol/{id}/{v}")).is_none(),
            "{v} left"
        );
    }
    assert_eq!(
        b.json(&["key", "describe", "hk"])["key_info"]["key_state"],
        "destroyed"
    );
}
