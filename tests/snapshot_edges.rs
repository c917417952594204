//! Snapshots, clones, exports and re-encryption at the edges: the largest volume the format allows (size +
//! data offset = 2^63 - 1, rounded down to whole sectors) on tmpfs, where a file may be that
//! large, and a snapshot file truncated behind the daemon's back. Data is written and read by
//! nbdsh (`python3 -m nbd`, libnbd's shell), which takes 64-bit offsets as they are.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::{Env, python};

/// Largest volume: `size + 1 MiB data offset <= i64::MAX`, a multiple of 4096.
const LARGEST: u64 = ((i64::MAX as u64) - (1 << 20)) / 4096 * 4096;

fn nbdsh(uri: &str, code: &str) -> String {
    let o = Command::new(python())
        .args(["-m", "nbd", "-u", uri, "-c", code])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "nbdsh {code}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// Writes 4 KiB of `byte` at each offset.
fn write(uri: &str, byte: u8, offsets: &[u64]) {
    let code = offsets
        .iter()
        .map(|o| format!("h.pwrite(bytes([{byte}]) * 4096, {o})"))
        .collect::<Vec<_>>()
        .join("; ");
    nbdsh(uri, &format!("{code}; h.flush()"));
}

/// The distinct byte values in the 4 KiB at each offset, e.g. "[97] [97]".
fn read(uri: &str, offsets: &[u64]) -> String {
    let code = offsets
        .iter()
        .map(|o| format!("print(sorted(set(h.pread(4096, {o}))))"))
        .collect::<Vec<_>>()
        .join("; ");
    nbdsh(uri, &code).replace('\n', " ")
}

fn tmpfs() -> Option<&'static Path> {
    let p = Path::new("/dev/shm");
    let o = Command::new("stat")
        .args(["-f", "-c", "%T", "/dev/shm"])
        .output()
        .ok()?;
    if String::from_utf8_lossy(&o.stdout).trim() == "tmpfs" {
        Some(p)
    } else {
        eprintln!("SKIP: /dev/shm is not tmpfs (files of 2^63 bytes need it)");
        None
    }
}

#[test]
fn largest_volume_snapshots_clones_and_exports() {
    if common::python_nbd().is_none() {
        return;
    }
    let Some(shm) = tmpfs() else { return };
    let mut env = Env::with_config_in(shm, |_| String::new());
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    let size = LARGEST.to_string();

    // One sector more than the format allows: refused, nothing left behind.
    let over = (LARGEST + 4096).to_string();
    let e = env.fails(&["volume", "create", "big", "--size", &over, "--key", "k"]);
    assert!(e.contains("too large"), "{e}");
    assert!(!env.volume_path("big").exists());

    let r = env.json(&["volume", "create", "v", "--size", &size, "--key", "k"]);
    assert_eq!(r["size"].as_u64(), Some(LARGEST), "{r}");
    env.json(&["volume", "attach", "v"]);
    let uri = env.uri("v");
    let at = [0, LARGEST / 2, LARGEST - 4096];
    write(&uri, 0x61, &at);
    // Past the end: refused by the server, not wrapped around.
    let past = nbdsh(
        &uri,
        &format!(
            "try:\n  h.pwrite(b'x' * 4096, {})\n  print('written')\nexcept nbd.Error as e:\n  print('refused')",
            LARGEST - 2048
        ),
    );
    assert_eq!(past, "refused");

    // Snapshot (sparse copy of an 8 EiB file on tmpfs), then the volume moves on.
    let s = env.json(&["volume", "snapshot", "create", "v", "s"]);
    assert_eq!(s["state"], "ready", "{s}");
    assert_eq!(s["size"].as_u64(), Some(LARGEST), "{s}");
    write(&uri, 0x62, &at);
    assert_eq!(read(&uri, &at), "[98] [98] [98]");

    env.json(&["volume", "attach", "v@s", "--read-only"]);
    assert_eq!(read(&env.uri("v@s"), &at), "[97] [97] [97]");
    env.json(&["volume", "detach", "v@s"]);

    // A clone of the snapshot: its own volume, the snapshot's data.
    env.json(&["volume", "create", "c", "--from-snapshot", "v@s"]);
    env.json(&["volume", "attach", "c"]);
    assert_eq!(read(&env.uri("c"), &at), "[97] [97] [97]");
    env.json(&["volume", "detach", "c"]);

    // Export of the snapshot: a sparse file of the full size holding the plaintext.
    let out = env.dir.path().join("out");
    let r = env.json(&["volume", "export", "v@s", "--to", out.to_str().unwrap()]);
    assert_eq!(r["size"].as_u64(), Some(LARGEST), "{r}");
    let f = std::fs::File::open(&out).unwrap();
    assert_eq!(f.metadata().unwrap().len(), LARGEST);
    for o in at {
        let mut b = vec![0u8; 4096];
        f.read_exact_at(&mut b, o).unwrap();
        assert!(b.iter().all(|&x| x == 0x61), "export at {o}");
    }
    assert!(
        common::file_blocks(&out) < 1024,
        "export stayed sparse: {} blocks",
        common::file_blocks(&out)
    );

    // Online re-encryption jumps the exabytes of holes (one step each) and keeps the data.
    let k2 = env.key("k2");
    env.json(&["volume", "reencrypt", "v", "--key", "k2", "--wait"]);
    assert_eq!(read(&uri, &at), "[98] [98] [98]");
    assert_eq!(env.json(&["volume", "inspect", "v"])["key_id"], k2);

    // Growing past the limit is refused and the volume keeps its size and data.
    env.json(&["volume", "detach", "v"]);
    let e = env.fails(&["volume", "resize", "v", "--size", &over]);
    assert!(e.contains("too large"), "{e}");
    env.json(&["volume", "attach", "v"]);
    assert_eq!(read(&uri, &at), "[98] [98] [98]");
}

/// A snapshot file cut short (to 0 bytes, inside the header, inside the data area) while the
/// daemon runs or is stopped: the snapshot is refused with a reason naming it, its volume and
/// the other snapshots are untouched, and the broken snapshot can still be deleted.
#[test]
fn truncated_snapshot_file_is_refused_and_loses_nothing_else() {
    if common::python_nbd().is_none() {
        return;
    }
    let mut env = Env::new();
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    env.json(&["volume", "create", "v", "--size", "16M", "--key", "k"]);
    env.json(&["volume", "attach", "v"]);
    let uri = env.uri("v");
    let at = [0, 8 << 20, (16 << 20) - 4096];
    write(&uri, 0x61, &at);
    for s in ["s0", "s1", "s2", "ok"] {
        env.json(&["volume", "snapshot", "create", "v", s]);
    }
    write(&uri, 0x62, &at);
    let dir = env.volume_path("v").parent().unwrap().to_owned();
    let path = |s: &str| dir.join(format!("v@{s}.cvol"));
    let full = std::fs::metadata(path("ok")).unwrap().len();

    let cut = |s: &str, len: u64| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path(s))
            .unwrap()
            .set_len(len)
            .unwrap();
    };
    cut("s0", 0);
    cut("s1", 100);
    cut("s2", full - 4096);

    let check = |env: &Env| {
        for s in ["s0", "s1", "s2"] {
            let name = format!("v@{s}");
            let e = env.fails(&["volume", "attach", &name, "--read-only"]);
            assert!(e.contains(&name) || e.contains("truncated"), "{s}: {e}");
            let e = env.fails(&["volume", "create", "c", "--from-snapshot", &name]);
            assert!(!e.is_empty(), "{s}");
            let out = env.dir.path().join(format!("out-{s}"));
            env.fails(&["volume", "export", &name, "--to", out.to_str().unwrap()]);
            assert!(
                !env.volume_path("c").exists(),
                "no clone left from a broken snapshot"
            );
        }
        // The volume and the intact snapshot are untouched.
        assert_eq!(read(&env.uri("v"), &at), "[98] [98] [98]");
        env.json(&["volume", "attach", "v@ok", "--read-only"]);
        assert_eq!(read(&env.uri("v@ok"), &at), "[97] [97] [97]");
        env.json(&["volume", "detach", "v@ok"]);
    };
    check(&env);

    // After a restart: the daemon starts, the volume comes back, the same answers.
    env.stop();
    env.start();
    if env.json(&["volume", "inspect", "v"])["attached"] != true {
        env.json(&["volume", "attach", "v"]);
    }
    check(&env);

    // The broken snapshots can be deleted; the volume then deletes with its last snapshot.
    for s in ["s0", "s1", "s2"] {
        env.json(&["volume", "snapshot", "delete", &format!("v@{s}")]);
        assert!(!path(s).exists(), "{s} removed");
    }
    let l = env.json(&["volume", "snapshot", "list", "v"]);
    assert_eq!(l["snapshots"].as_array().map(Vec::len), Some(1), "{l}");
}
