//! Native journal logging, against a real `systemd-journald`: started in a private mount
//! namespace (a tmpfs over /run, so the host's /run is untouched and nothing outlives the
//! test), the daemon started with `JOURNAL_STREAM` naming its stderr as systemd would, then
//! `journalctl VOLUME=vol1` (and friends) must find structured entries, and stderr must stay
//! empty of them. Needs root (unshare, mount): CI runs as root.

mod common;

use std::process::Command;

use common::{BIN, Env, have, is_root};

const SCRIPT: &str = r#"
set -eu
bin=$1; cfg=$2; dir=$3
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/journal
/lib/systemd/systemd-journald & jpid=$!
trap 'kill $dpid 2>/dev/null || true; kill $jpid; wait $jpid 2>/dev/null || true' EXIT
dpid=
for i in $(seq 100); do [ -S /run/systemd/journal/socket ] && break; sleep 0.1; done
: > "$dir/stderr.log"
# What systemd sets for a unit with StandardError=journal: the stream's device:inode.
export JOURNAL_STREAM=$(stat -L -c '%d:%i' "$dir/stderr.log")
CRYPTVOL_LOG=info,cryptvol::server=debug "$bin" serve --config "$cfg" 2>>"$dir/stderr.log" & dpid=$!
for i in $(seq 100); do "$bin" --config "$cfg" volume list >/dev/null 2>&1 && break; sleep 0.1; done
key=$("$bin" --config "$cfg" key create --alias k --json | sed -n 's/.*"key_id": *"\([^"]*\)".*/\1/p')
echo "KEY=$key"
"$bin" --config "$cfg" volume create vol1 --size 8M --key k >/dev/null
"$bin" --config "$cfg" volume attach vol1 >/dev/null
nbdinfo "nbd+unix:///vol1?socket=$dir/n.sock" >/dev/null
"$bin" --config "$cfg" key describe no-such-key >/dev/null 2>&1 || true
kill -TERM $dpid; wait $dpid || true
dpid=
journalctl --sync 2>/dev/null || sleep 1
echo "== VOLUME"
journalctl --no-pager -o json VOLUME=vol1
echo "== KEY"
journalctl --no-pager -o json KEY_ID=no-such-key
echo "== ALL"
journalctl --no-pager -o json SYSLOG_IDENTIFIER=cryptvol
"#;

fn section(out: &str, name: &str) -> Vec<serde_json::Value> {
    let start = out.find(&format!("== {name}\n")).expect(name) + name.len() + 4;
    out[start..]
        .lines()
        .take_while(|l| !l.starts_with("== "))
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn under_systemd_logs_go_to_the_journal_with_fields() {
    if !is_root() || !have("unshare") || !have("journalctl") {
        eprintln!("skipped: needs root, unshare and systemd-journald (CI has them)");
        return;
    }
    let e = Env::new();
    let o = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            SCRIPT,
            "sh",
            BIN,
        ])
        .arg(&e.cfg)
        .arg(e.dir.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "script: {out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let key = out
        .lines()
        .find_map(|l| l.strip_prefix("KEY="))
        .expect("key id");
    assert!(!key.is_empty(), "{out}");

    let vol = section(&out, "VOLUME");
    let attached = vol
        .iter()
        .find(|j| j["MESSAGE"] == "attached")
        .unwrap_or_else(|| panic!("no 'attached' entry for VOLUME=vol1: {out}"));
    assert_eq!(attached["KEY_ID"], key);
    assert_eq!(attached["PEER_UID"], "0");
    assert_eq!(attached["SYSLOG_IDENTIFIER"], "cryptvol");
    // tracing-journald maps INFO to notice (5), DEBUG to info (6).
    assert_eq!(attached["PRIORITY"], "5");
    // The NBD session's debug line names the volume and the client.
    assert!(
        vol.iter()
            .any(|j| j["CLIENT"] == "unix socket" && j["MESSAGE"] == "transmission"),
        "no transmission entry with CLIENT: {out}"
    );
    let refused = section(&out, "KEY");
    assert!(
        refused
            .iter()
            .any(|j| j["PEER_UID"] == "0" && j["OPERATION"] == "describe-key"),
        "{out}"
    );
    assert!(section(&out, "ALL").len() >= 3);
    // Nothing of it went to stderr.
    let stderr = std::fs::read_to_string(e.dir.path().join("stderr.log")).unwrap();
    assert!(!stderr.contains("attached"), "stderr: {stderr}");
}
