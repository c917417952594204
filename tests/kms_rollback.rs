//! Destroyed keys stay destroyed when an old `kms/keys.json` is put back (issue 11, item 8),
//! through the real daemon and CLI: the old copy is refused at start with an error naming the
//! files, and even with the daemon's check out of the way it no longer opens (its sealing key
//! was destroyed). Normal restarts, fresh state dirs and format 1 stores keep working.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Env};

/// Starts the daemon like `Env::start`, but returns its log instead of panicking when it
/// exits during start-up.
fn try_start(e: &mut Env) -> Result<(), String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(e.dir.path().join("daemon.log"))
        .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&e.cfg)
        .stderr(log)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Err(format!("exited with {st}: {}", e.log()));
        }
        if e.cli(&["volume", "list"]).status.success() {
            e.daemon = Some(child);
            return Ok(());
        }
        assert!(Instant::now() < deadline, "daemon did not answer");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("{} -> {}: {e}", from.display(), to.display()));
}

/// A key `k` with volume `v` under it, detached; returns the key id.
fn key_and_volume(e: &Env) -> String {
    let id = e.key("k");
    e.json(&["volume", "create", "v", "--size", "8M", "--key", "k"]);
    e.json(&["volume", "attach", "v"]);
    e.json(&["volume", "detach", "v"]);
    id
}

#[test]
fn restored_keys_json_does_not_bring_a_destroyed_key_back() {
    let mut e = Env::new();
    e.start();
    key_and_volume(&e);
    let keys = e.state.join("kms/keys.json");
    let old = e.dir.path().join("keys.json.old");
    copy(&keys, &old);
    // min_pending_days = 0: destroyed at once.
    e.json(&["key", "schedule-deletion", "k", "--pending-days", "0"]);
    assert!(e.fails(&["volume", "attach", "v"]).contains("destroyed"));
    e.stop();
    let newest = e.dir.path().join("keys.json.newest");
    copy(&keys, &newest);

    copy(&old, &keys);
    match try_start(&mut e) {
        Err(log) => {
            assert!(
                log.contains("keys.json") && log.contains("sealing.key"),
                "the refusal names the files: {log}"
            );
            assert!(log.contains("older copy"), "{log}");
        }
        Ok(()) => {
            let err = e.fails(&["volume", "attach", "v"]);
            panic!("the old key store was accepted (attach: {err})");
        }
    }

    // The newest copy back: starts, and the key is still destroyed.
    copy(&newest, &keys);
    e.start();
    assert!(e.fails(&["volume", "attach", "v"]).contains("destroyed"));
    let st = e.json(&["key", "describe", "k"]);
    assert_eq!(st["key_info"]["key_state"], "destroyed", "{st}");
}

#[test]
fn whole_kms_dir_restored_with_the_sealing_file_elsewhere() {
    // The sealing file outside the state dir: restoring all of kms/ does not roll it back.
    let mut e = Env::with_config(|d| {
        format!(
            "[kms]\nsealing_key_file = \"{}/seal/sealing.key\"\n",
            d.display()
        )
    });
    std::fs::create_dir(e.dir.path().join("seal")).unwrap();
    e.start();
    key_and_volume(&e);
    e.stop();
    assert!(
        !e.state.join("kms/sealing.key").exists(),
        "the sealing file is where the config says"
    );
    let backup = e.dir.path().join("kms.bak");
    let o = Command::new("cp")
        .arg("-a")
        .arg(e.state.join("kms"))
        .arg(&backup)
        .status()
        .unwrap();
    assert!(o.success());
    e.start();
    e.json(&["key", "schedule-deletion", "k", "--pending-days", "0"]);
    e.stop();
    std::fs::remove_dir_all(e.state.join("kms")).unwrap();
    let o = Command::new("cp")
        .arg("-a")
        .arg(&backup)
        .arg(e.state.join("kms"))
        .status()
        .unwrap();
    assert!(o.success());
    let log = try_start(&mut e).expect_err("restored key store accepted");
    assert!(log.contains("older copy"), "{log}");
}

#[test]
fn restarts_and_fresh_state_dirs_keep_working() {
    let mut e = Env::new();
    e.start();
    key_and_volume(&e);
    for i in 0..3 {
        e.stop();
        e.start();
        e.json(&["key", "create", "--alias", &format!("k{i}")]);
        e.json(&["volume", "attach", "v"]);
        e.json(&["volume", "detach", "v"]);
    }
    // A crash (SIGKILL) between changes is a restart like any other.
    e.kill();
    e.start();
    e.json(&["key", "rotate", "k"]);
    e.json(&["volume", "rewrap", "v"]);
    e.json(&["volume", "attach", "v"]);
    assert_eq!(e.json(&["audit", "verify"])["ok"], true);
}

/// A state dir written by the format 1 code (CMK material sealed under the root key, unkeyed
/// audit chain): `tests/fixtures/format1`, made with the previous release by `cryptvol init`,
/// `key create --alias old`, `volume create v1 --size 8M --key old`, `volume attach v1` and
/// a qemu-io write of 0x5a over the first 4 KiB. The volume file is stored as its header
/// (8 KiB) and the written data unit; the rest of it is a hole.
#[test]
fn format1_state_dir_still_opens() {
    let mut e = Env::new();
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format1");
    std::fs::create_dir_all(e.state.join("kms")).unwrap();
    for f in [
        "root.key",
        "attached.json",
        "kms/keys.json",
        "kms/audit.jsonl",
    ] {
        copy(&fx.join(f), &e.state.join(f));
    }
    // git keeps no file modes but the executable bit: the root key must be 0600.
    std::fs::set_permissions(
        e.state.join("root.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::create_dir_all(e.state.join("volumes")).unwrap();
    // The volume file: its two header copies at 0, the data area at 1 MiB (4 KiB written).
    let vol = std::fs::File::create(e.state.join("volumes/v1.cvol")).unwrap();
    use std::os::unix::fs::FileExt;
    let header = std::fs::read(fx.join("volumes/v1.header")).unwrap();
    vol.write_all_at(&header, 0).unwrap();
    let data = std::fs::read(fx.join("volumes/v1.data")).unwrap();
    vol.write_all_at(&data, 1 << 20).unwrap();
    vol.set_len((1 << 20) + (8 << 20)).unwrap();
    e.start();
    // Re-attached at start with the migrated key; the data reads back.
    let v = e.json(&["volume", "inspect", "v1"]);
    assert_eq!(v["attached"], true, "{v}\n{}", e.log());
    if common::have("qemu-io") {
        let o = common::qemu_io(&e.uri("v1"), &["read -P 0x5a 0 4k", "read -P 0 4k 1M"]);
        assert!(o.status.success(), "{o:?}");
    }
    let keys: serde_json::Value =
        serde_json::from_slice(&std::fs::read(e.state.join("kms/keys.json")).unwrap()).unwrap();
    assert_eq!(keys["format"], 2, "re-sealed on open");
    // The old audit records are sealed by the first keyed one and still verify.
    let a = e.json(&["audit", "verify"]);
    assert_eq!(a["ok"], true, "{a}");
    assert!(a["unkeyed_records"].as_u64().unwrap() > 0, "{a}");
    e.json(&["key", "create", "--alias", "new"]);
    e.stop();
    e.start();
    assert_eq!(e.json(&["volume", "inspect", "v1"])["attached"], true);
}
