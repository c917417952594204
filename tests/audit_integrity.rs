//! The audit log against someone who can write the state dir but cannot read the root key
//! (issue 11, item 7): a rewritten and re-chained log, a replaced file (`sed -i`), a log
//! emptied (`: > audit.jsonl`) and records cut from the end are each reported by
//! `cryptvol audit verify` (non-zero exit, the first bad record named); an untouched log
//! verifies, online and offline.

mod common;

use std::io::Write;
use std::process::Command;

use common::Env;

/// A running daemon with a key, a volume and a few records behind them.
fn daemon_with_history() -> Env {
    let mut e = Env::new();
    e.start();
    e.json(&["key", "create", "--alias", "k"]);
    e.json(&["volume", "create", "v", "--size", "8M", "--key", "k"]);
    e.json(&["volume", "attach", "v"]);
    e.json(&["volume", "detach", "v"]);
    e.json(&["key", "describe", "k"]);
    e
}

fn log_path(e: &Env) -> std::path::PathBuf {
    e.state.join("kms/audit.jsonl")
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b).as_ref())
}

/// What an attacker without the key can do: edit a record, then recompute every record's
/// `hash` as the documented unkeyed rule did (SHA-256 of the line with `"hash":""`) and every
/// `prev`, so the chain is consistent again. `downgrade` also strips the keyed-format marker.
fn rechain_without_key(text: &str, downgrade: bool) -> String {
    let mut out = String::new();
    let mut prev = String::new();
    for line in text.lines() {
        let mut l = line.to_owned();
        if downgrade {
            l = l.replace("\"v\":2,", "");
        }
        // Blank the hash (always the last field) and set prev.
        let h = l.rfind("\"hash\":\"").expect("hash field");
        l.truncate(h);
        l.push_str("\"hash\":\"\"}");
        let p = l.find("\"prev\":\"").expect("prev field") + 8;
        let pe = p + l[p..].find('"').unwrap();
        l.replace_range(p..pe, &prev);
        let hash = sha256_hex(l.as_bytes());
        l.truncate(l.len() - 2);
        l.push_str(&hash);
        l.push_str("\"}");
        out.push_str(&l);
        out.push('\n');
        prev = hash;
    }
    out
}

/// `audit verify` fails and names `line` as the first bad record.
fn verify_fails_at(e: &Env, line: u64) -> String {
    let o = e.cli(&["audit", "verify", "--json"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(!o.status.success(), "verify should fail: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}"));
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["broken_line"], line, "{v}");
    let err = e.fails(&["audit", "verify"]);
    assert!(err.contains("broken"), "{err}");
    v["reason"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn untouched_log_verifies_online_and_offline() {
    let mut e = daemon_with_history();
    let v = e.json(&["audit", "verify"]);
    assert_eq!(v["ok"], true, "{v}");
    let n = v["records"].as_u64().unwrap();
    assert!(n >= 6, "{v}");
    // The daemon's head is the file's last record.
    let head = e.json(&["audit", "head"]);
    assert_eq!(head["seq"], n, "{head}");
    let text = std::fs::read_to_string(log_path(&e)).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(head["hash"], last["hash"], "{head}");
    assert!(
        e.log().contains("audit chain head"),
        "journal copy of the head"
    );

    e.stop();
    assert!(
        e.log().matches("audit chain head").count() >= 2,
        "head logged at start and at shutdown: {}",
        e.log()
    );
    // Offline: the chain (with the root key from the config), and a plain caveat.
    let o = e.cli(&["audit", "verify", "--offline"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("intact"), "{out}");
    assert!(
        out.contains("cut from the end") && out.contains("cannot be detected"),
        "offline says what it cannot see: {out}"
    );
    // Without --offline and without a daemon: a clear error, not a silent weaker check.
    let err = e.fails(&["audit", "verify"]);
    assert!(err.contains("--offline"), "{err}");
}

#[test]
fn rewrite_and_rechain_without_key_is_detected() {
    for downgrade in [false, true] {
        let mut e = daemon_with_history();
        let path = log_path(&e);
        let text = std::fs::read_to_string(&path).unwrap();
        // Blame someone else for line 2, then make the chain consistent again.
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        assert!(lines[1].contains("\"caller_uid\":0"), "{}", lines[1]);
        lines[1] = lines[1].replace("\"caller_uid\":0", "\"caller_uid\":1000");
        let forged = rechain_without_key(&(lines.join("\n") + "\n"), downgrade);
        // In place (same inode): only the content betrays it.
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap()
            .write_all(forged.as_bytes())
            .unwrap();
        // Line 1 is the first record the daemon wrote with the key: the forger could not.
        let reason = verify_fails_at(&e, 1);
        assert!(!reason.is_empty());

        // Offline, the key alone finds it too.
        e.stop();
        let o = e.cli(&["audit", "verify", "--offline"]);
        assert!(
            !o.status.success(),
            "offline verify of a forged log must fail"
        );
    }
}

#[test]
fn replaced_file_is_detected() {
    let e = daemon_with_history();
    let path = log_path(&e);
    let before = std::fs::read_to_string(&path).unwrap().lines().count() as u64;
    // A no-op edit: same content, new inode; the daemon keeps appending to the old one.
    let o = Command::new("sed")
        .args(["-i", "s/x/x/"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(o.status.success());
    e.json(&["key", "describe", "k"]);
    let reason = verify_fails_at(&e, before + 1);
    assert!(reason.contains("replaced"), "{reason}");
    assert!(
        e.log().contains("audit log") && e.log().contains("replaced"),
        "the daemon says so in the journal when it next appends: {}",
        e.log()
    );
}

#[test]
fn emptied_file_is_detected() {
    let mut e = daemon_with_history();
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(log_path(&e))
        .unwrap();
    let reason = verify_fails_at(&e, 1);
    assert!(
        reason.contains("cut") || reason.contains("trunc"),
        "{reason}"
    );
    // Offline, an empty log cannot be one the daemon wrote (it seals the log at each start).
    e.stop();
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(log_path(&e))
        .unwrap();
    let o = e.cli(&["audit", "verify", "--offline"]);
    assert!(!o.status.success(), "an empty log does not verify offline");
}

#[test]
fn records_cut_from_the_end_are_detected() {
    let e = daemon_with_history();
    let path = log_path(&e);
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let keep = lines.len() - 2;
    let len: usize = lines[..keep].iter().map(|l| l.len() + 1).sum();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len as u64)
        .unwrap();
    let reason = verify_fails_at(&e, keep as u64 + 1);
    assert!(reason.contains("cut"), "{reason}");
}
