//! `volume export NAME[@SNAP] --to FILE` against the real daemon: an imported image comes
//! back byte for byte (`cmp`), holes stay holes in FILE, a snapshot exports its point in
//! time while the volume moves on, an empty 1 TiB volume exports as a few records, and the
//! export is audited.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::Env;

fn cmp(a: &Path, b: &Path) {
    let o = Command::new("cmp").arg(a).arg(b).output().unwrap();
    assert!(
        o.status.success(),
        "cmp: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A sparse image: data at a few places (including a partial 512-byte tail), holes between.
fn image(p: &Path, size: u64) -> u64 {
    let f = std::fs::File::create(p).unwrap();
    f.set_len(size).unwrap();
    let mut data = 0;
    for (i, at) in [0u64, 3 << 20, 9 << 20 | 4096, size - 512]
        .into_iter()
        .enumerate()
    {
        let len = if at == size - 512 { 512 } else { 300_000 };
        let buf: Vec<u8> = (0..len).map(|j| (i * 31 + j % 253) as u8 | 1).collect();
        f.write_all_at(&buf, at).unwrap();
        data += len as u64;
    }
    data
}

#[test]
fn import_export_round_trip_keeps_bytes_and_holes() {
    let mut env = Env::new();
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    let (img, out) = (env.dir.path().join("img"), env.dir.path().join("out"));
    let size = (16 << 20) + 512;
    let data = image(&img, size);
    env.json(&[
        "volume",
        "import",
        "v",
        "--from",
        img.to_str().unwrap(),
        "--key",
        "k",
    ]);
    let r = env.json(&["volume", "export", "v", "--to", out.to_str().unwrap()]);
    // The volume is rounded up to whole 4 KiB sectors; the tail is zeros.
    let vsize = r["size"].as_u64().unwrap();
    assert_eq!(vsize, size.next_multiple_of(4096));
    std::fs::File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(vsize)
        .unwrap();
    cmp(&img, &out);
    // Only the data went over the stream and into FILE: holes stay holes.
    let sent = r["data_bytes"].as_u64().unwrap();
    assert!(
        sent < data + (64 << 10),
        "{sent} bytes of data sent for {data}"
    );
    assert!(
        common::file_blocks(&out) * 512 < data + (1 << 20),
        "export allocates {} bytes",
        common::file_blocks(&out) * 512
    );
    // Attached and detached alike; FILE is replaced whole.
    env.json(&["volume", "attach", "v"]);
    env.json(&["volume", "export", "v", "--to", out.to_str().unwrap()]);
    cmp(&img, &out);
    // Audited: reading the plaintext unwraps the DEK.
    let log = std::fs::read_to_string(env.state.join("kms/audit.jsonl")).unwrap();
    assert_eq!(log.matches("\"exportVolume\"").count(), 2, "{log}");
}

#[test]
fn snapshot_exports_its_point_in_time() {
    let mut env = Env::new();
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    let (img, out) = (env.dir.path().join("img"), env.dir.path().join("out"));
    image(&img, 12 << 20);
    env.json(&[
        "volume",
        "import",
        "v",
        "--from",
        img.to_str().unwrap(),
        "--key",
        "k",
    ]);
    env.json(&["volume", "attach", "v"]);
    env.json(&["volume", "snapshot", "create", "v", "s"]);
    // The volume moves on.
    let o = common::qemu_io(&env.uri("v"), &["write -P 0x5a 0 8M"]);
    assert!(o.status.success(), "{o:?}");
    env.json(&["volume", "export", "v@s", "--to", out.to_str().unwrap()]);
    cmp(&img, &out);
    // Attached read-only, the same.
    env.json(&["volume", "attach", "v@s", "--read-only"]);
    env.json(&["volume", "export", "v@s", "--to", out.to_str().unwrap()]);
    cmp(&img, &out);
    env.json(&["volume", "export", "v", "--to", out.to_str().unwrap()]);
    let b = std::fs::read(&out).unwrap();
    assert!(b[..8 << 20].iter().all(|&x| x == 0x5a));
    // Unknown names and a snapshot in the making are refused, leaving no FILE behind.
    let none = env.dir.path().join("none");
    env.fails(&["volume", "export", "v@nope", "--to", none.to_str().unwrap()]);
    env.fails(&["volume", "export", "nope", "--to", none.to_str().unwrap()]);
    assert!(!none.exists());
    assert!(!env.dir.path().join("none.partial").exists());
}

#[test]
fn empty_one_tib_volume_exports_as_holes() {
    let mut env = Env::new();
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    env.json(&["volume", "create", "big", "--size", "1T", "--key", "k"]);
    let out = env.dir.path().join("big.img");
    let r = env.json(&["volume", "export", "big", "--to", out.to_str().unwrap()]);
    assert_eq!(r["size"], 1u64 << 40);
    assert_eq!(r["data_bytes"], 0);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 1 << 40);
    assert_eq!(common::file_blocks(&out), 0);
}
