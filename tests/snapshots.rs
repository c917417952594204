//! Snapshots through the CLI and real NBD clients (python3-libnbd): point in time while a
//! writer runs (copy path on the test dir's ext4/tmpfs, reflink path on a loop-mounted XFS),
//! read-only attach of a snapshot, clones under another key, delete rules, a swapped
//! snapshot file, and kill -9 in the middle of a copy.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{Env, Proc, python_nbd};

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(name)
}

/// The pattern writer (tests/py/snap_writer.py) and its "flushed r" lines.
struct Writer {
    _p: Proc,
    rx: mpsc::Receiver<u64>,
    last: u64,
}

impl Writer {
    fn start(py: &str, uri: &str, blocks: u64) -> Writer {
        let mut p = Proc(
            Command::new(py)
                .arg(script("snap_writer.py"))
                .args([uri, &blocks.to_string()])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        let out = p.0.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(n) = l.strip_prefix("flushed ")
                    && tx.send(n.parse().unwrap()).is_err()
                {
                    break;
                }
            }
        });
        Writer { _p: p, rx, last: 0 }
    }
    /// The last round flushed so far (without waiting).
    fn flushed(&mut self) -> u64 {
        while let Ok(n) = self.rx.try_recv() {
            self.last = n;
        }
        self.last
    }
    /// Waits until round `r` is flushed.
    fn wait_for(&mut self, r: u64) {
        while self.last < r {
            self.last = self
                .rx
                .recv_timeout(Duration::from_secs(120))
                .expect("writer stalled or ended");
        }
    }
}

fn check_point_in_time(py: &str, env: &Env, export: &str, blocks: u64, flushed: u64) -> (u64, u64) {
    let o = Command::new(py)
        .arg(script("snap_check.py"))
        .args([&env.uri(export), &blocks.to_string(), &flushed.to_string()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "snapshot check: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Vec<u64> = out
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    (v[0], v[1])
}

fn inspect(env: &Env, full: &str) -> serde_json::Value {
    let l = env.json(&["volume", "snapshot", "list"]);
    l["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == full)
        .cloned()
        .unwrap_or_else(|| panic!("{full} not listed: {l}"))
}

fn wait_ready(env: &Env, full: &str) -> serde_json::Value {
    loop {
        let s = inspect(env, full);
        if s["state"] != "creating" {
            assert_eq!(s["state"], "ready", "{s}");
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writer running; a snapshot taken; the writer writes `more` whole rounds after it; the
/// snapshot attached read-only must be exactly a cut of the writer's sequence, no older than
/// what was flushed before, no newer than what was being written when it was taken.
fn snapshot_under_writer(
    py: &str,
    env: &Env,
    blocks: u64,
    extra: &[&str],
    during_copy: bool,
) -> serde_json::Value {
    let mut w = Writer::start(py, &env.uri("v"), blocks);
    w.wait_for(2); // every block written at least once: the volume is full of data
    let before = w.flushed();
    let mut args = vec!["volume", "snapshot", "create", "v", "s1", "--no-wait"];
    args.extend_from_slice(extra);
    let snap = env.json(&args);
    let at_return = w.flushed();
    assert!(snap["pause_us"].is_u64(), "{snap}");
    // Whole rounds written after the snapshot (racing the copy on the copy path).
    w.wait_for(at_return + 3);
    if during_copy {
        let s = inspect(env, "v@s1");
        assert_eq!(
            s["state"], "creating",
            "the copy ended before the writer raced it (raise the test's volume size): {s}"
        );
        assert!(s["copied_on_write"].as_u64().unwrap() > 0, "{s}");
    }
    let ready = wait_ready(env, "v@s1");
    drop(w);
    env.json(&["volume", "attach", "v@s1", "--read-only"]);
    let (lo, hi) = check_point_in_time(py, env, "v@s1", blocks, before);
    assert!(
        hi <= at_return + 2,
        "snapshot holds round {hi}, written after it was taken (round {at_return} flushed when it returned)"
    );
    assert!(lo >= before);
    let mut s = ready;
    s["pause_us"] = snap["pause_us"].clone();
    s["method_at_create"] = snap["method"].clone();
    s
}

#[test]
fn copy_path_snapshot_is_a_point_in_time_while_written() {
    let Some(py) = python_nbd() else { return };
    let mut env = Env::new();
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    env.attach_new("v", "16M");
    // 16 MiB copied at 512 KiB/s: about 30 s, while the writer writes whole rounds.
    let s = snapshot_under_writer(&py, &env, 4096, &["--max-rate", "512K"], true);
    assert_eq!(s["method"], "copy", "{s}");
    eprintln!("copy path: pause {} us", s["pause_us"]);
    // Read-write attach of a snapshot is refused; the volume itself is untouched.
    let e = env.fails(&["volume", "attach", "v@s1"]);
    assert!(e.contains("read-only"), "{e}");
    let i = env.json(&["volume", "inspect", "v@s1"]);
    assert_eq!(i["read_only"], true);
    assert_eq!(
        i["volume_id"],
        env.json(&["volume", "inspect", "v"])["volume_id"]
    );
    // Survives a restart, still attached read-only.
    assert!(env.stop().success());
    env.start();
    let l = env.json(&["volume", "snapshot", "list", "v"]);
    assert_eq!(l["snapshots"][0]["state"], "ready", "{l}");
    assert_eq!(l["snapshots"][0]["attached"], true, "{l}");
}

#[test]
fn bench_verify_runs_clean_across_a_copy_snapshot() {
    let mut env = Env::new();
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    env.attach_new("v", "32M");
    let uri = env.uri("v");
    let bench = |secs: &str| {
        let o = Command::new(common::BIN)
            .args(["bench", "--json", &uri, "--rw", "randwrite", "--bs", "4K"])
            .args([
                "--iodepth",
                "8",
                "--connections",
                "2",
                "--verify",
                "--time",
                secs,
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "bench --verify: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    };
    bench("2s"); // data everywhere
    let s = env.json(&[
        "volume",
        "snapshot",
        "create",
        "v",
        "s",
        "--no-wait",
        "--max-rate",
        "4M",
    ]);
    assert_eq!(s["method"], "copy");
    // Verified writes (and read-back) while writes copy chunks out before changing them.
    bench("3s");
    let s = inspect(&env, "v@s");
    assert_eq!(
        s["state"], "creating",
        "the copy ended before the bench raced it: {s}"
    );
    assert!(s["copied_on_write"].as_u64().unwrap() > 0, "{s}");
    wait_ready(&env, "v@s");
    bench("1s");
}

/// A loop-mounted XFS (reflink=1) under the state dir's `volumes/`; unmounted on drop.
struct XfsMount(PathBuf);
impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn reflink_snapshot_on_xfs_is_a_point_in_time_and_takes_no_space() {
    let Some(py) = python_nbd() else { return };
    if !common::is_root() || !common::have("mkfs.xfs") || !Path::new("/dev/loop-control").exists() {
        eprintln!("SKIP: reflink test needs root, mkfs.xfs (xfsprogs) and loop devices");
        return;
    }
    let mut env = Env::new();
    let img = env.dir.path().join("xfs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    let ok = |c: &mut Command| {
        let o = c.output().unwrap();
        assert!(
            o.status.success(),
            "{c:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    ok(Command::new("mkfs.xfs")
        .args(["-q", "-m", "reflink=1"])
        .arg(&img));
    let vols = env.state.join("volumes");
    std::fs::create_dir_all(&vols).unwrap();
    ok(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&vols));
    let _m = XfsMount(vols.clone());
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    env.attach_new("v", "64M");
    let used = || {
        let o = Command::new("df")
            .args(["--output=used", "-B1"])
            .arg(&vols)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    // 16384 blocks = 64 MiB of data.
    let mut w = Writer::start(&py, &env.uri("v"), 16384);
    w.wait_for(1);
    drop(w);
    let u0 = used();
    let snap = env.json(&["volume", "snapshot", "create", "v", "s0"]);
    assert_eq!(snap["method"], "reflink", "{snap}");
    assert_eq!(snap["state"], "ready", "{snap}");
    let grown = used() - u0;
    assert!(
        grown < 4 << 20,
        "a reflink snapshot of 64 MiB of data took {grown} bytes"
    );
    env.json(&["volume", "snapshot", "delete", "v@s0"]);
    let s = snapshot_under_writer(&py, &env, 4096, &[], false);
    assert_eq!(s["method"], "reflink", "{s}");
    eprintln!("reflink path: pause {} us", s["pause_us"]);
    // A clone on XFS is a reflink too, and decrypts.
    env.json(&["volume", "detach", "v@s1"]);
    env.json(&["volume", "create", "c", "--from-snapshot", "v@s1"]);
    env.json(&["volume", "attach", "c", "--read-only"]);
    check_point_in_time(&py, &env, "c", 4096, 0);
    env.json(&["volume", "detach", "c"]);
    env.json(&["volume", "detach", "v"]);
    assert!(env.stop().success());
}

#[test]
fn clone_under_another_key_keeps_holes_and_the_original() {
    let Some(py) = python_nbd() else { return };
    let mut env = Env::new();
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    let k2 = env.json(&["key", "create", "--alias", "k2"])["key_info"]["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    env.attach_new("v", "256M");
    let mut w = Writer::start(&py, &env.uri("v"), 256); // the first 1 MiB only
    w.wait_for(1);
    drop(w);
    env.json(&["volume", "snapshot", "create", "v", "s"]);
    env.json(&["volume", "attach", "v@s", "--read-only"]);
    let at_snap = check_point_in_time(&py, &env, "v@s", 256, 1);
    let orig = env.json(&["volume", "inspect", "v"]);
    let c = env.json(&[
        "volume",
        "create",
        "c",
        "--from-snapshot",
        "v@s",
        "--key",
        "k2",
    ]);
    assert_eq!(c["key_id"], k2.as_str(), "{c}");
    assert_ne!(c["volume_id"], orig["volume_id"]);
    assert_eq!(c["size"], orig["size"]);
    // The clone's header names K2, and its DEK is wrapped for its own volume id.
    let h = std::fs::read(env.volume_path("c")).unwrap();
    assert_eq!(&h[96..96 + k2.len()], k2.as_bytes());
    // Holes stay holes: about 1 MiB of data, not 256 MiB.
    let blocks = common::file_blocks(&env.volume_path("c"));
    assert!(
        blocks * 512 < 8 << 20,
        "clone allocates {} bytes",
        blocks * 512
    );
    env.json(&["volume", "attach", "c", "--read-only"]);
    assert_eq!(check_point_in_time(&py, &env, "c", 256, 1), at_snap);
    // Writes to the clone leave the original and the snapshot alone.
    env.json(&["volume", "detach", "c"]);
    env.json(&["volume", "attach", "c"]);
    let mut w = Writer::start(&py, &env.uri("c"), 256);
    w.wait_for(3);
    drop(w);
    check_point_in_time(&py, &env, "v", 256, 1);
    assert_eq!(check_point_in_time(&py, &env, "v@s", 256, 1), at_snap);
    let after = env.json(&["volume", "inspect", "v"]);
    assert_eq!(after["key_id"], orig["key_id"]);
    assert_eq!(after["cipher_text"], orig["cipher_text"]);
    // Disabling the new key stops the clone, not the original.
    env.json(&["volume", "detach", "c", "--force"]);
    env.json(&["key", "disable", "k2"]);
    env.fails(&["volume", "attach", "c"]);
    env.json(&["volume", "detach", "v"]);
    env.json(&["volume", "attach", "v"]);
}

#[test]
fn delete_rules() {
    let mut env = Env::new();
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    env.json(&["volume", "create", "v", "--size", "64M", "--key", "k"]);
    // Data for the clone to copy slowly.
    let img = env.dir.path().join("img");
    let data: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(&img, &data).unwrap();
    env.json(&[
        "volume",
        "import",
        "w",
        "--from",
        img.to_str().unwrap(),
        "--key",
        "k",
    ]);
    for s in ["a", "b"] {
        env.json(&["volume", "snapshot", "create", "v", s]);
    }
    env.fails(&["volume", "snapshot", "create", "v", "a"]);
    env.fails(&["volume", "snapshot", "create", "v", "../x"]);
    env.fails(&["volume", "snapshot", "create", "v", "a/b"]);
    let e = env.fails(&["volume", "delete", "v"]);
    assert!(e.contains("snapshot") && e.contains("v@a"), "{e}");
    // An attached snapshot cannot be deleted, nor its volume with --with-snapshots.
    env.json(&["volume", "attach", "v@a", "--read-only"]);
    env.fails(&["volume", "snapshot", "delete", "v@a"]);
    env.fails(&["volume", "delete", "v", "--with-snapshots"]);
    assert!(env.volume_path("v").exists());
    assert!(env.state.join("volumes/v@b.cvol").exists());
    env.json(&["volume", "detach", "v@a"]);
    env.json(&["volume", "delete", "v", "--with-snapshots"]);
    assert!(!env.volume_path("v").exists());
    let log = std::fs::read_to_string(env.state.join("kms/audit.jsonl")).unwrap();
    for op in ["createSnapshot", "deleteSnapshot"] {
        assert!(
            log.lines().any(|l| l.contains(op) && l.contains("v@a")),
            "{op} v@a not audited: {log}"
        );
    }
    assert!(!env.state.join("volumes/v@a.cvol").exists());
    assert_eq!(
        env.json(&["volume", "snapshot", "list"])["snapshots"],
        serde_json::json!([])
    );
    // A snapshot a clone is being made from is busy (the clone copies at 2 MiB/s here).
    env.json(&["volume", "snapshot", "create", "w", "s"]);
    let mut clone = Proc(
        Command::new(common::BIN)
            .arg("--config")
            .arg(&env.cfg)
            .args([
                "volume",
                "create",
                "c",
                "--from-snapshot",
                "w@s",
                "--max-rate",
                "2M",
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The clone is being built once its temporary file appears.
    let vols = env.state.join("volumes");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !std::fs::read_dir(&vols).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".c.tmp-")
    }) {
        assert!(std::time::Instant::now() < deadline, "clone did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = env.fails(&["volume", "create", "c", "--size", "1M", "--key", "k"]);
    assert!(e.contains("VOL.0409") || e.contains("VOL.0410"), "{e}");
    let e = env.fails(&["volume", "snapshot", "delete", "w@s"]);
    assert!(e.contains("being created from"), "{e}");
    assert!(clone.0.wait().unwrap().success());
    env.json(&["volume", "snapshot", "delete", "w@s"]);
    // The clone holds the data.
    let out = env.dir.path().join("out");
    env.json(&["volume", "export", "c", "--to", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == data);
}

#[test]
fn swapped_snapshot_file_is_refused() {
    let mut env = Env::new();
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    env.json(&["volume", "create", "v", "--size", "8M", "--key", "k"]);
    env.json(&["volume", "snapshot", "create", "v", "s1"]);
    env.json(&["volume", "snapshot", "create", "v", "s2"]);
    let vols = env.state.join("volumes");
    std::fs::copy(vols.join("v@s2.cvol"), vols.join("v@s1.cvol")).unwrap();
    let e = env.fails(&["volume", "attach", "v@s1", "--read-only"]);
    assert!(e.contains("VOL.0422") && e.contains("s2"), "{e}");
    let out = env.dir.path().join("o");
    let e = env.fails(&["volume", "export", "v@s1", "--to", out.to_str().unwrap()]);
    assert!(e.contains("VOL.0422"), "{e}");
    assert!(!out.exists());
    assert!(
        inspect(&env, "v@s1")["state"]
            .as_str()
            .unwrap()
            .starts_with("failed"),
    );
    env.fails(&["volume", "create", "c", "--from-snapshot", "v@s1"]);
    // A volume file put in a snapshot's place: refused too.
    std::fs::copy(vols.join("v.cvol"), vols.join("v@s2.cvol")).unwrap();
    let e = env.fails(&["volume", "attach", "v@s2", "--read-only"]);
    assert!(e.contains("VOL.0422"), "{e}");
}

#[test]
fn kill_9_during_a_copy_leaves_no_snapshot() {
    let Some(py) = python_nbd() else { return };
    let mut env = Env::new();
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    env.attach_new("v", "16M");
    let mut w = Writer::start(&py, &env.uri("v"), 4096);
    w.wait_for(1);
    drop(w);
    let s = env.json(&[
        "volume",
        "snapshot",
        "create",
        "v",
        "s",
        "--no-wait",
        "--max-rate",
        "256K",
    ]);
    assert_eq!(s["state"], "creating");
    // The copier reads the old ciphertext: no re-encryption until the snapshot is complete.
    let err = env.fails(&["volume", "reencrypt", "v"]);
    assert!(err.contains("still being copied"), "{err}");
    // Mid-copy: some chunks copied, the file under its temporary name.
    while inspect(&env, "v@s")["percent"].as_u64().unwrap() < 5 {
        std::thread::sleep(Duration::from_millis(50));
    }
    let vols = env.state.join("volumes");
    let names = || -> Vec<String> {
        std::fs::read_dir(&vols)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains('@'))
            .collect()
    };
    assert!(
        names().iter().all(|n| n.starts_with(".v@s.tmp-")),
        "{:?}",
        names()
    );
    env.kill();
    env.start();
    assert_eq!(names(), Vec::<String>::new());
    let l = env.json(&["volume", "snapshot", "list"]);
    assert_eq!(l["snapshots"], serde_json::json!([]), "{l}");
    env.fails(&["volume", "attach", "v@s", "--read-only"]);
    // The volume still works and can be snapshotted again.
    let s = env.json(&["volume", "snapshot", "create", "v", "s"]);
    assert_eq!(s["state"], "ready");
    env.json(&["volume", "attach", "v@s", "--read-only"]);
    check_point_in_time(&py, &env, "v@s", 4096, 1);
}
