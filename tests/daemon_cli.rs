//! The daemon through its CLI and control API, as SPEC §1-4 describe them: every command with
//! `--json`, the EVS key semantics, and the failure paths (wrong or disabled keys, tampered
//! headers, swapped wrapped keys, a second daemon, bad config, a caller who is not the owner).

mod common;

use common::{Env, file_blocks, have, qemu_io};
use serde_json::Value;

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

#[test]
fn keys_and_datakeys_through_the_cli() {
    let mut e = Env::new();
    e.start();
    let k = e.json(&[
        "key",
        "create",
        "--alias",
        "app-key",
        "--description",
        "for tests",
    ]);
    let id = s(&k["key_info"]["key_id"]).to_owned();
    // --json accepted before the subcommand too.
    let o = e.cli(&["--json", "key", "describe", "app-key"]);
    let d: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(d["key_info"]["key_id"], id.as_str());
    assert_eq!(d["key_info"]["key_state"], "2");
    assert!(
        e.fails(&["key", "create", "--alias", "app-key"])
            .contains("alias already exists")
    );

    let dk = e.json(&[
        "datakey",
        "create",
        "--key",
        "app-key",
        "--context",
        "app=test",
    ]);
    assert_eq!(s(&dk["plain_text"]).len(), 128, "512-bit default");
    let back = e.json(&[
        "datakey",
        "decrypt",
        "--cipher-text",
        s(&dk["cipher_text"]),
        "--context",
        "app=test",
    ]);
    assert_eq!(back["data_key"], dk["plain_text"]);
    e.fails(&[
        "datakey",
        "decrypt",
        "--cipher-text",
        s(&dk["cipher_text"]),
        "--context",
        "app=other",
    ]);
    let enc = e.json(&[
        "datakey",
        "encrypt",
        "--key",
        &id,
        "--plain-text",
        "00112233445566778899aabbccddeeff",
    ]);
    let dec = e.json(&[
        "datakey",
        "decrypt",
        "--cipher-text",
        s(&enc["cipher_text"]),
    ]);
    assert_eq!(dec["data_key"], "00112233445566778899aabbccddeeff");
    let np = e.json(&[
        "datakey",
        "create-without-plaintext",
        "--key",
        "app-key",
        "--length",
        "256",
    ]);
    assert!(np.get("plain_text").is_none());

    // Rotation: new version, the old wrap still opens.
    assert_eq!(
        e.json(&["key", "rotate", "app-key"])["key_info"]["key_version"],
        "2"
    );
    e.json(&[
        "datakey",
        "decrypt",
        "--cipher-text",
        s(&dk["cipher_text"]),
        "--context",
        "app=test",
    ]);

    e.json(&["key", "disable", "app-key"]);
    let err = e.fails(&["datakey", "create", "--key", "app-key"]);
    assert!(err.contains("disabled") && err.contains("app-key"), "{err}");
    e.json(&["key", "enable", "app-key"]);
    assert_eq!(
        e.json(&[
            "key",
            "schedule-deletion",
            "app-key",
            "--pending-days",
            "30"
        ])["key_state"],
        "4"
    );
    assert_eq!(
        e.json(&["key", "cancel-deletion", "app-key"])["key_state"],
        "3"
    );
    let list = e.json(&["key", "list"]);
    assert_eq!(list["total"], "1");

    // Envelope files: round trip, and a flipped byte fails without leaving output.
    e.json(&["key", "enable", "app-key"]);
    let input = e.dir.path().join("in.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&input, &data).unwrap();
    let env = e.dir.path().join("in.env");
    let out = e.dir.path().join("out.bin");
    e.json(&[
        "envelope",
        "encrypt",
        "--key",
        "app-key",
        input.to_str().unwrap(),
        env.to_str().unwrap(),
    ]);
    e.json(&[
        "envelope",
        "decrypt",
        env.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&out).unwrap(), data);
    let mut t = std::fs::read(&env).unwrap();
    let n = t.len();
    t[n - 100] ^= 1;
    std::fs::write(&env, &t).unwrap();
    std::fs::remove_file(&out).unwrap();
    e.fails(&[
        "envelope",
        "decrypt",
        env.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(!out.exists(), "no partial plaintext left behind");

    // Audit: intact, then an edited line is found.
    assert_eq!(e.json(&["audit", "verify"])["ok"], true);
    let audit = e.state.join("kms/audit.jsonl");
    let text = std::fs::read_to_string(&audit).unwrap();
    std::fs::write(
        &audit,
        text.replacen("\"result\":\"ok\"", "\"result\":\"OK\"", 1),
    )
    .unwrap();
    assert!(e.fails(&["audit", "verify"]).contains("broken"));

    // No DEK byte in the logs or state files.
    let dek = s(&dk["plain_text"]).to_owned();
    for f in [
        e.dir.path().join("daemon.log"),
        e.state.join("kms/keys.json"),
        audit,
    ] {
        let body = std::fs::read_to_string(&f).unwrap_or_default();
        assert!(
            !body.contains(&dek[..32]),
            "DEK hex found in {}",
            f.display()
        );
    }
}

#[test]
fn volume_lifecycle_and_evs_key_semantics() {
    if !have("qemu-io") {
        eprintln!("SKIP: qemu-io missing");
        return;
    }
    let mut e = Env::new();
    e.start();
    e.json(&["key", "create", "--alias", "vk"]);
    let v = e.json(&[
        "volume",
        "create",
        "v1",
        "--size",
        "32M",
        "--key",
        "vk",
        "--sector-size",
        "512",
    ]);
    for f in [
        "name",
        "volume_id",
        "size",
        "sector_size",
        "cipher",
        "key_id",
        "key_version",
        "cipher_text",
        "data_offset",
        "path",
        "attached",
        "read_only",
    ] {
        assert!(v.get(f).is_some(), "inspect lacks {f}: {v}");
    }
    assert_eq!(v["size"], 32 << 20);
    assert_eq!(v["cipher"], "aes-xts-plain64");
    assert_eq!(v["data_offset"], 1 << 20);
    assert_eq!(v["attached"], false);
    // Default key alias when --key is omitted.
    e.json(&["volume", "create", "v2", "--size", "8M"]);
    assert_eq!(
        e.json(&["key", "describe", "cryptvol/default"])["key_info"]["key_state"],
        "2"
    );

    let a = e.json(&["volume", "attach", "v1"]);
    assert_eq!(a["attached"], true);
    let uri = e.uri("v1");
    let w = qemu_io(&uri, &["write -P 0x5a 1000 200000"]);
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    assert!(e.fails(&["volume", "delete", "v1"]).contains("attached"));
    assert!(
        e.fails(&["volume", "resize", "v1", "--size", "64M"])
            .contains("attached")
    );

    // Disabling the key does not stop the attached volume ...
    e.json(&["key", "disable", "vk"]);
    let r = qemu_io(&uri, &["read -P 0x5a 1000 200000"]);
    assert!(r.status.success() && !String::from_utf8_lossy(&r.stdout).contains("fail"));
    // ... but re-attach is refused, naming the key and its state.
    e.json(&["volume", "detach", "v1"]);
    let err = e.fails(&["volume", "attach", "v1"]);
    assert!(
        err.contains("vk") && err.contains("disabled") && err.contains("key "),
        "{err}"
    );
    e.json(&["key", "enable", "vk"]);

    // Rotation + rewrap: a newer key version in the header, data untouched.
    e.json(&["key", "rotate", "vk"]);
    assert_eq!(e.json(&["volume", "rewrap", "v1"])["key_version"], 2);
    // Grow while detached keeps data.
    assert_eq!(
        e.json(&["volume", "resize", "v1", "--size", "64M"])["size"],
        64 << 20
    );
    e.json(&["volume", "attach", "v1", "--read-only"]);
    let r = std::process::Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read -P 0x5a 1000 200000", &uri])
        .output()
        .unwrap();
    assert!(
        r.status.success() && !String::from_utf8_lossy(&r.stdout).contains("fail"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(
        !qemu_io(&uri, &["write -P 1 0 512"]).status.success(),
        "read-only attach refuses writes"
    );
    assert_eq!(e.json(&["volume", "inspect", "v1"])["read_only"], true);
    e.json(&["volume", "detach", "v1"]);

    // Scheduled deletion: unusable at once; after the window the volume is unrecoverable.
    e.json(&["key", "schedule-deletion", "vk", "--pending-days", "0"]);
    let err = e.fails(&["volume", "attach", "v1"]);
    assert!(err.contains("vk"), "{err}");
    let list = e.json(&["volume", "list"]);
    let v1 = list["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "v1")
        .unwrap()
        .clone();
    assert_eq!(v1["status"], "unrecoverable: key destroyed");
    assert!(
        e.fails(&["key", "cancel-deletion", "vk"])
            .contains("destroyed")
    );
    e.json(&["volume", "delete", "v1"]);
    e.fails(&["volume", "inspect", "v1"]);
}

#[test]
fn tampered_headers_and_swapped_keys() {
    let mut e = Env::new();
    e.start();
    e.json(&["key", "create", "--alias", "k"]);
    e.json(&["volume", "create", "a", "--size", "8M", "--key", "k"]);
    e.json(&["volume", "create", "b", "--size", "8M", "--key", "k"]);
    e.json(&["volume", "create", "c", "--size", "8M", "--key", "k"]);
    // One damaged copy: the other is used.
    let pa = e.volume_path("a");
    let mut bytes = std::fs::read(&pa).unwrap();
    bytes[200] ^= 0xff;
    std::fs::write(&pa, &bytes).unwrap();
    e.json(&["volume", "attach", "a"]);
    e.json(&["volume", "detach", "a"]);
    // Both damaged: a clear error.
    bytes[4096 + 200] ^= 0xff;
    std::fs::write(&pa, &bytes).unwrap();
    assert!(e.fails(&["volume", "attach", "a"]).contains("header"));
    // b's wrapped DEK moved into c's header: bound to b's volume id, it does not unwrap.
    use cryptvol::volume::Volume;
    let hb = Volume::read_header(&e.volume_path("b")).unwrap();
    let mut hc = Volume::read_header(&e.volume_path("c")).unwrap();
    hc.wrapped_dek = hb.wrapped_dek.clone();
    Volume::write_header(&e.volume_path("c"), &hc).unwrap();
    let err = e.fails(&["volume", "attach", "c"]);
    assert!(err.contains("does not decrypt"), "{err}");
    e.json(&["volume", "attach", "b"]);
}

#[test]
fn refusals_at_start_and_for_strangers() {
    let mut e = Env::new();
    e.start();
    // A second daemon on the same state dir.
    let o = std::process::Command::new(common::BIN)
        .args(["serve", "--config"])
        .arg(&e.cfg)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("in use by another cryptvol daemon"), "{err}");

    // Bad config: unknown key, non-loopback TCP without TLS; each names the file and key.
    let bad = e.dir.path().join("bad.toml");
    std::fs::write(&bad, "state_dir = \"/tmp/x\"\n[nbd]\nport = 1\n").unwrap();
    let o = std::process::Command::new(common::BIN)
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("bad.toml") && err.contains("port"),
        "{err}"
    );
    std::fs::write(
        &bad,
        "state_dir = \"/tmp/x\"\n[nbd]\ntcp = \"0.0.0.0:10809\"\n",
    )
    .unwrap();
    let o = std::process::Command::new(common::BIN)
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("nbd.tcp"), "{err}");

    // A root key readable by others is refused.
    let e2 = Env::new();
    let rk = e2.state.join("root.key");
    std::fs::set_permissions(&rk, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let o = std::process::Command::new(common::BIN)
        .args(["serve", "--config"])
        .arg(&e2.cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("root.key") && err.contains("group or others"),
        "{err}"
    );

    // A caller who is neither root, the daemon's user nor in its group gets 403.
    if common::have("setpriv") {
        let sock = e.dir.path().join("c.sock");
        std::fs::set_permissions(
            e.dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .unwrap();
        let o = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                common::BIN,
                "--socket",
            ])
            .arg(&sock)
            .args(["key", "list"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("may not use the control socket"),
            "{err}"
        );
    }
}

#[test]
fn restart_reattaches_and_import_keeps_holes() {
    if !have("qemu-io") || !have("nbdcopy") {
        eprintln!("SKIP: qemu-io or nbdcopy missing");
        return;
    }
    let mut e = Env::new();
    e.start();
    e.json(&["key", "create", "--alias", "k"]);
    // A sparse 64 MiB image with data at a few places.
    let img = e.dir.path().join("img.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(64 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    for (off, byte) in [(0u64, 0x11u8), (10 << 20, 0x22), ((64 << 20) - 4096, 0x33)] {
        f.write_all_at(&[byte; 4096], off).unwrap();
    }
    drop(f);
    let v = e.json(&[
        "volume",
        "import",
        "im",
        "--from",
        img.to_str().unwrap(),
        "--key",
        "k",
    ]);
    assert_eq!(v["size"], 64 << 20);
    assert!(
        file_blocks(&e.volume_path("im")) * 512 < 4 << 20,
        "holes stayed holes"
    );
    e.json(&["volume", "attach", "im"]);
    let out = e.dir.path().join("out.raw");
    let o = std::process::Command::new("nbdcopy")
        .arg(e.uri("im"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&img).unwrap(),
        "imported content reads back"
    );

    let uri = e.uri("im");
    assert!(
        qemu_io(&uri, &["write -P 0x5a 5M 1M", "flush"])
            .status
            .success()
    );
    assert!(e.stop().success(), "SIGTERM exits 0: {}", e.log());
    e.start();
    assert_eq!(
        e.json(&["volume", "inspect", "im"])["attached"],
        true,
        "re-attached at start"
    );
    let r = qemu_io(&uri, &["read -P 0x5a 5M 1M", "read -P 0x22 10M 4k"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stdout));
    // Detach is refused while a client is connected; --force disconnects it.
    let py = std::env::var("CRYPTVOL_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    let mut client = std::process::Command::new(py)
        .args(["-m", "nbd", "-u", &uri, "-c", "import time; time.sleep(30)"])
        .spawn();
    if let Ok(c) = client.as_mut() {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while e.json(&["volume", "inspect", "im"])["clients"] == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "client never connected"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(e.fails(&["volume", "detach", "im"]).contains("connected"));
        assert_eq!(
            e.json(&["volume", "detach", "im", "--force"])["attached"],
            false
        );
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn demo_serves_and_cleans_up() {
    use std::io::{BufRead, BufReader};
    if !have("nbdinfo") {
        eprintln!("SKIP: nbdinfo missing");
        return;
    }
    let mut child = std::process::Command::new(common::BIN)
        .arg("demo")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut uri = None;
    let mut removes = None;
    for l in lines.by_ref() {
        let l = l.unwrap();
        if let Some(u) = l.trim().strip_prefix("NBD URI:") {
            uri = Some(u.trim().to_owned());
        }
        if let Some(r) = l.strip_prefix("Ctrl-C stops the demo and removes ") {
            removes = Some(r.trim_end_matches('.').to_owned());
            break;
        }
    }
    let uri = uri.expect("demo prints the NBD URI");
    let o = std::process::Command::new("nbdinfo")
        .arg("--size")
        .arg(&uri)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        (1u64 << 30).to_string()
    );
    let _ = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
    let dir = removes.expect("demo names its temp dir");
    assert!(!std::path::Path::new(&dir).exists(), "{dir} removed");
}
