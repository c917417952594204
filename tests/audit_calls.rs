//! Every state-changing control call leaves an audit record naming the operation, its target,
//! the result and the caller (uid, gid, pid from SO_PEERCRED) (issue 11, item 6). Driven
//! through the CLI as a control-group member that is not root, as an operator would be.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{Env, as_user, is_root};
use serde_json::Value;

const GROUP: u32 = 4242;
const UID: u32 = 4243;

fn records(e: &Env) -> Vec<Value> {
    std::fs::read_to_string(e.state.join("kms/audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The one record of `operation` about `target` (volume name or key id) with `result`.
fn find<'a>(recs: &'a [Value], operation: &str, target: &str, result: &str) -> &'a Value {
    let hits: Vec<&Value> = recs
        .iter()
        .filter(|r| {
            r["operation"] == operation
                && (r["volume"] == target || r["key_id"] == target)
                && r["result"] == result
        })
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "{operation} {target} {result}: {hits:?}\nall: {recs:#?}"
    );
    hits[0]
}

#[test]
fn volume_and_key_calls_are_audited_with_the_caller() {
    // As root, the caller is a group member with its own uid; otherwise the test's own user.
    let (uid, gid, wrapper) = if is_root() {
        (UID, UID, as_user(UID, UID, &[GROUP]))
    } else {
        let me = common::proc_status("self", "Uid:").unwrap();
        let g = common::proc_status("self", "Gid:").unwrap();
        let first = |s: String| s.split_whitespace().next().unwrap().parse().unwrap();
        (first(me), first(g), vec!["env".to_owned()])
    };
    let mut e = Env::with_config(|_| format!("[control]\ngroup = \"{GROUP}\"\n"));
    // The group member reaches the sockets in the test dir and reads the image to import.
    std::fs::set_permissions(e.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    e.start();
    let run = |args: &[&str]| -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let o = e.cli_via(&wrapper, &a);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let fail = |args: &[&str]| {
        let o = e.cli_via(&wrapper, args);
        assert!(!o.status.success(), "{args:?} should fail");
    };

    let key = run(&["key", "create", "--alias", "k"])["key_info"]["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    run(&["key", "rotate", "k"]);
    run(&["key", "disable", "k"]);
    run(&["key", "enable", "k"]);
    run(&["volume", "create", "va", "--size", "8M", "--key", "k"]);
    run(&["volume", "attach", "va"]);
    fail(&["volume", "delete", "va"]); // attached: refused, and audited as such
    run(&["volume", "detach", "va"]);
    run(&["volume", "resize", "va", "--size", "16M"]);
    run(&["volume", "rewrap", "va"]);
    run(&["volume", "delete", "va"]);
    let image = e.dir.path().join("img.raw");
    std::fs::write(&image, vec![7u8; 1 << 20]).unwrap();
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o644)).unwrap();
    run(&[
        "volume",
        "import",
        "vi",
        "--from",
        image.to_str().unwrap(),
        "--key",
        "k",
    ]);
    fail(&["volume", "resize", "nosuch", "--size", "16M"]);
    run(&["key", "schedule-deletion", "k", "--pending-days", "3"]);
    run(&["key", "cancel-deletion", "k"]);
    // A malformed request is refused before the key manager sees it: still audited.
    let o = e.cli_via(
        &wrapper,
        &["datakey", "create", "--key", "k", "--length", "7"],
    );
    assert!(!o.status.success());

    // A field the API itself refuses (no key manager call): audited as well (here as root).
    let raw = post(
        &e.dir.path().join("c.sock"),
        "/v1/kms/schedule-key-deletion",
        r#"{"key_id":"k","pending_days":"soon"}"#,
    );
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");

    let recs = records(&e);
    let r = find(&recs, "scheduleKeyDeletion", "k", "KMS.0101");
    assert_eq!(r["caller_uid"], 0, "{r}");
    let expect = [
        ("createKey", key.as_str(), "ok"),
        ("rotateKey", &key, "ok"),
        ("disableKey", &key, "ok"),
        ("enableKey", &key, "ok"),
        ("createVolume", "va", "ok"),
        ("attachVolume", "va", "ok"),
        ("deleteVolume", "va", "VOL.0410"),
        ("detachVolume", "va", "ok"),
        ("resizeVolume", "va", "ok"),
        ("rewrapVolume", "va", "ok"),
        ("deleteVolume", "va", "ok"),
        ("importVolume", "vi", "ok"),
        ("resizeVolume", "nosuch", "VOL.0404"),
        ("scheduleKeyDeletion", &key, "ok"),
        ("cancelKeyDeletion", &key, "ok"),
        ("createDataKey", "k", "KMS.0101"),
    ];
    for (op, target, result) in expect {
        let r = find(&recs, op, target, result);
        assert_eq!(r["caller_uid"], uid, "{r}");
        assert_eq!(r["caller_gid"], gid, "{r}");
        assert!(r["caller_pid"].as_i64().unwrap() > 0, "{r}");
    }
    // And the chain with these records verifies.
    assert_eq!(e.json(&["audit", "verify"])["ok"], true);
}

/// One HTTP/1.1 POST on the control socket; the whole answer.
fn post(sock: &std::path::Path, path: &str, body: &str) -> String {
    common::control_request(sock, "POST", path, body)
}
