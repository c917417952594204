//! Issue 11, the volume findings, attacked black-box as the review did: a resize to a size
//! that wraps (data loss), an import whose name is attached meanwhile (data loss), a backing
//! file swapped for another volume's or rolled back, a header naming a decoy key, a sector
//! size that truncates, and the demo's predictable temp dir.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Env, have, qemu_io};
use cryptvol::volume::Volume;
use serde_json::Value;

fn started() -> Env {
    let mut e = Env::new();
    e.start();
    e.json(&["key", "create", "--alias", "k"]);
    e
}

fn control_socket(e: &Env) -> std::path::PathBuf {
    e.dir.path().join("c.sock")
}

/// One HTTP/1.1 request on the control socket; (status, body).
fn http(e: &Env, method: &str, path: &str, body: &str) -> (u16, Value) {
    let out = common::control_request(&control_socket(e), method, path, body);
    let status: u16 = out[9..12].parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
    // The body may be chunked: take the JSON object inside.
    let json = body
        .find('{')
        .and_then(|a| body.rfind('}').map(|b| &body[a..=b]))
        .unwrap_or("null");
    (status, serde_json::from_str(json).unwrap_or(Value::Null))
}

fn sha(p: &std::path::Path) -> String {
    let o = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn resize_to_a_size_that_wraps_changes_nothing() {
    let e = started();
    e.attach_new("va", "16M");
    let o = qemu_io(&e.uri("va"), &["write -P 0x5a 0 1M", "flush"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    e.json(&["volume", "detach", "va"]);
    let p = e.volume_path("va");
    let (len, sum) = (std::fs::metadata(&p).unwrap().len(), sha(&p));

    // data_offset (1 MiB) + this wraps to 1 MiB - 4 KiB: the file was cut to that.
    let (status, body) = http(
        &e,
        "POST",
        "/v1/volumes/va/resize",
        r#"{"size":"18446744073709547520"}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("too large"), "{body}");
    // Through the CLI too, and sizes the header cannot hold or the sector size does not divide.
    for bad in ["18446744073709547520", "9223372036854775807", "20971521"] {
        e.fails(&["volume", "resize", "va", "--size", bad]);
    }
    assert_eq!(std::fs::metadata(&p).unwrap().len(), len, "file length");
    assert_eq!(sha(&p), sum, "file contents");
    e.json(&["volume", "attach", "va"]);
    let o = qemu_io(&e.uri("va"), &["read -P 0x5a 0 1M"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    // A good resize still works.
    e.json(&["volume", "detach", "va"]);
    let v = e.json(&["volume", "resize", "va", "--size", "32M"]);
    assert_eq!(v["size"], 32 << 20);
}

#[test]
fn sector_size_out_of_range_is_refused_not_truncated() {
    let e = started();
    // 4294967808 = 2^32 + 512: `as u32` made it 512.
    let (status, body) = http(
        &e,
        "POST",
        "/v1/volumes",
        r#"{"name":"vs","size":"8388608","key_id":"k","sector_size":"4294967808"}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("sector size"), "{body}");
    e.fails(&["volume", "inspect", "vs"]);
    assert!(!e.volume_path("vs").exists());
}

/// Starts an import of `size` bytes, sends `sent` bytes of it and stalls; the stream is
/// returned so the test decides when the upload ends.
fn stalled_import(e: &Env, name: &str, size: u64, sent: usize) -> UnixStream {
    let mut s = UnixStream::connect(control_socket(e)).unwrap();
    write!(
        s,
        "POST /v1/volumes/{name}/import?size={size}&key_id=k HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n"
    )
    .unwrap();
    s.write_all(&vec![0x11u8; sent]).unwrap();
    s
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(20), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_failed_import_never_deletes_what_is_attached() {
    let e = started();
    let up = stalled_import(&e, "vi", 8 << 20, 64 << 10);
    // The import holds the name: nothing else can take it, attach it, resize or delete it.
    wait_until("import started", || {
        e.cli(&["volume", "attach", "vi"])
            .stderr
            .windows(5)
            .any(|w| w == b"being")
    });
    let err = e.fails(&["volume", "attach", "vi"]);
    assert!(err.contains("being imported"), "{err}");
    e.fails(&["volume", "create", "vi", "--size", "8M", "--key", "k"]);
    e.fails(&["volume", "delete", "vi"]);
    e.fails(&["volume", "resize", "vi", "--size", "16M"]);
    assert!(
        !e.volume_path("vi").exists(),
        "only a temporary file exists"
    );
    // The upload breaks off: the import fails and leaves nothing behind.
    drop(up);
    wait_until("import failed", || {
        let o = e.cli(&["volume", "inspect", "vi"]);
        String::from_utf8_lossy(&o.stderr).contains("no volume named")
    });
    let left: Vec<_> = std::fs::read_dir(e.state.join("volumes"))
        .unwrap()
        .map(|d| d.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // The name is free again; a volume made under it is not touched by another failed import.
    e.attach_new("vi", "8M");
    let o = qemu_io(&e.uri("vi"), &["write -P 0x77 0 64k", "flush"]);
    assert!(o.status.success());
    let mut up = stalled_import(&e, "vi", 8 << 20, 0);
    let mut reply = String::new();
    up.read_to_string(&mut reply).unwrap();
    assert!(reply.contains("409"), "{reply}");
    let o = qemu_io(&e.uri("vi"), &["read -P 0x77 0 64k"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn a_complete_import_appears_whole_and_stale_temporaries_are_cleared() {
    let mut e = started();
    let img = e.dir.path().join("img");
    let mut data = vec![0u8; 3 << 20];
    data[5000..9000].fill(0x42);
    std::fs::write(&img, &data).unwrap();
    let v = e.json(&[
        "volume",
        "import",
        "vm",
        "--from",
        img.to_str().unwrap(),
        "--key",
        "k",
    ]);
    assert_eq!(v["size"], 3 << 20);
    e.json(&["volume", "attach", "vm"]);
    let o = qemu_io(
        &e.uri("vm"),
        &["read -P 0x42 5000 4000", "read -P 0 9000 4096"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));

    // What a crash during a create or import leaves: removed at the next start.
    e.stop();
    let stale = e.state.join("volumes").join(".vx.tmp-0123");
    std::fs::write(&stale, b"half a volume").unwrap();
    e.start();
    assert!(!stale.exists());
    e.json(&["volume", "create", "vx", "--size", "8M", "--key", "k"]);
}

#[test]
fn a_swapped_backing_file_is_refused_naming_both_volumes() {
    let e = started();
    e.attach_new("va", "8M");
    e.attach_new("vb", "8M");
    assert!(
        qemu_io(&e.uri("va"), &["write -P 0xaa 0 64k", "flush"])
            .status
            .success()
    );
    assert!(
        qemu_io(&e.uri("vb"), &["write -P 0xbb 0 64k", "flush"])
            .status
            .success()
    );
    e.json(&["volume", "detach", "va"]);
    e.json(&["volume", "detach", "vb"]);
    let ida = e.json(&["volume", "inspect", "va"])["volume_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let idb = e.json(&["volume", "inspect", "vb"])["volume_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let pa = e.volume_path("va");
    let original = std::fs::read(&pa).unwrap();

    // vb's file copied over va's (a restore, a SAN mix-up, an attacker on the storage).
    std::fs::copy(e.volume_path("vb"), &pa).unwrap();
    let err = e.fails(&["volume", "attach", "va"]);
    assert!(err.contains(&ida) && err.contains(&idb), "{err}");
    let list = e.json(&["volume", "list"]);
    let va = list["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "va")
        .unwrap();
    assert!(va["status"].as_str().unwrap().starts_with("failed"), "{va}");
    // Nor may a second name serve vb.
    std::fs::copy(e.volume_path("vb"), e.volume_path("vc")).unwrap();
    let err = e.fails(&["volume", "attach", "vc"]);
    assert!(err.contains("never share"), "{err}");
    std::fs::remove_file(e.volume_path("vc")).unwrap();

    // The right file back: served, with its own data.
    std::fs::write(&pa, &original).unwrap();
    e.json(&["volume", "attach", "va"]);
    assert!(
        qemu_io(&e.uri("va"), &["read -P 0xaa 0 64k"])
            .status
            .success()
    );
    e.json(&["volume", "attach", "vb"]);
    assert!(
        qemu_io(&e.uri("vb"), &["read -P 0xbb 0 64k"])
            .status
            .success()
    );
}

#[test]
fn a_rolled_back_header_is_refused() {
    let e = started();
    e.json(&["volume", "create", "vr", "--size", "8M", "--key", "k"]);
    let p = e.volume_path("vr");
    let old = std::fs::read(&p).unwrap();
    // A suspected leak of key version 1: rotate and rewrap away from it.
    e.json(&["key", "rotate", "k"]);
    let v = e.json(&["volume", "rewrap", "vr"]);
    assert_eq!(v["key_version"], 2);
    // Restoring the old header would put the volume back under version 1.
    std::fs::write(&p, &old).unwrap();
    let err = e.fails(&["volume", "attach", "vr"]);
    assert!(err.contains("rolled back"), "{err}");
}

#[test]
fn a_header_naming_a_decoy_key_is_refused() {
    let e = started();
    let decoy = e.key("decoy");
    e.json(&["volume", "create", "vd", "--size", "8M", "--key", "k"]);
    let p = e.volume_path("vd");
    let mut h = Volume::read_header(&p).unwrap();
    let real = h.key_id.clone();
    h.key_id = decoy.clone();
    Volume::write_header(&p, &h).unwrap(); // checksum recomputed, as an attacker would
    let err = e.fails(&["volume", "inspect", "vd"]);
    assert!(err.contains(&decoy) && err.contains(&real), "{err}");
    let err = e.fails(&["volume", "attach", "vd"]);
    assert!(err.contains(&real), "{err}");
    // Scheduling the decoy's deletion changes nothing; the real key's state still rules.
    e.json(&["key", "schedule-deletion", "decoy", "--pending-days", "7"]);
    e.fails(&["volume", "attach", "vd"]);
}

#[test]
fn a_state_dir_from_before_the_registry_still_attaches() {
    let mut e = started();
    e.attach_new("vo", "8M");
    assert!(
        qemu_io(&e.uri("vo"), &["write -P 0x33 0 4k", "flush"])
            .status
            .success()
    );
    e.stop();
    std::fs::remove_file(e.state.join("volumes.json")).unwrap();
    e.start();
    assert!(
        qemu_io(&e.uri("vo"), &["read -P 0x33 0 4k"])
            .status
            .success()
    );
    assert!(e.state.join("volumes.json").exists());
}

#[test]
fn demo_ignores_a_prepared_temp_dir() {
    if !have("sh") {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("cvd")
        .tempdir_in("/tmp")
        .unwrap();
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"precious\n").unwrap();
    // The shell prepares cryptvol-demo-<its pid>, with a symlink where the demo writes its
    // config, then becomes the demo under the same pid.
    let script = r#"d="$TMPDIR/cryptvol-demo-$$"; mkdir -p "$d" && ln -s "$VICTIM" "$d/cryptvol.toml" && exec "$BIN" demo"#;
    let mut child = Command::new("sh")
        .args(["-c", script])
        .env("TMPDIR", tmp.path())
        .env("VICTIM", &victim)
        .env("BIN", BIN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("Ctrl-C") {
        assert!(t.elapsed() < Duration::from_secs(120), "demo did not start");
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&seen).into_owned();
    let state_line = text
        .lines()
        .find(|l| l.trim_start().starts_with("state dir:"))
        .unwrap_or_else(|| panic!("demo failed: {text}"));
    let demo_dir = std::path::Path::new(state_line.split(':').nth(1).unwrap().trim())
        .parent()
        .unwrap()
        .to_owned();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&demo_dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{}", demo_dir.display());
    }
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let st = child.wait().unwrap();
    let err = common::stderr_of(&mut child);
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"precious\n",
        "victim overwritten"
    );
    assert!(text.contains("Ctrl-C"), "demo failed: {text}{err}");
    assert!(st.success(), "{err}");
    assert!(
        !demo_dir.ends_with(format!("cryptvol-demo-{}", child.id())),
        "{}",
        demo_dir.display()
    );
    assert!(!demo_dir.exists(), "demo dir left behind");
}
