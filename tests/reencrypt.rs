//! Online re-encryption through the daemon, the CLI and real NBD clients (SPEC §9,
//! docs/volume-format.md "Online re-encryption"):
//! - kill -9 at random moments (and, through the test hook, inside header updates and
//!   segment writes) while python3-libnbd writes over two connections with FLUSHes and
//!   `cryptvol bench --verify` runs over two connections on a second volume; after every
//!   restart the re-encryption goes on by itself, everything flushed reads back, and a
//!   pattern written before the start stays intact; 512- and 4096-byte sectors;
//! - when done, an independent AES-XTS decryption (Python `cryptography`) of the data area
//!   with the new DEK equals what an NBD client reads, and the old DEK decrypts no unit;
//! - pause survives a restart, resume finishes, the audit log has start and end;
//! - an empty 1 TiB volume re-encrypts (holes skipped).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Env, Proc, python};

fn have_py_modules() -> bool {
    Command::new(python())
        .args(["-c", "import nbd, cryptography"])
        .status()
        .is_ok_and(|s| s.success())
}

fn py(code: &str, args: &[&str]) -> String {
    let o = Command::new(python())
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "python: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Writes (`w`) or checks (`c`) a pattern over blocks [first, first+n) of 4 KiB: block k holds
/// ("pattern", k, seed) repeated.
const PATTERN: &str = r#"
import struct, sys, nbd
uri, mode, first, n, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
h = nbd.NBD(); h.connect_uri(uri)
for k in range(first, first + n):
    want = struct.pack("<8sQQ", b"pattern!", k, seed) * 170 + b"\x00" * 16
    if mode == "w":
        h.pwrite(want, k * 4096)
    else:
        got = h.pread(4096, k * 4096)
        if got != want:
            sys.exit(f"block {k} differs")
if mode == "w":
    h.flush()
print("ok")
"#;

fn reenc_state(env: &Env, name: &str) -> (String, u64, String) {
    let i = env.json(&["volume", "inspect", name]);
    (
        i["reencrypt"]["state"].as_str().unwrap_or("").to_owned(),
        i["reencrypt"]["percent"].as_u64().unwrap_or(0),
        i["key_id"].as_str().unwrap_or("").to_owned(),
    )
}

/// Waits until NAME's header names `key` and no re-encryption is left.
fn wait_done(env: &Env, name: &str, key: &str) {
    let t = Instant::now();
    loop {
        let (state, _, k) = reenc_state(env, name);
        if (state.is_empty() || state == "done") && k == key {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "{name}: re-encryption did not finish (state {state:?}, key {k})\n{}",
            env.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn bench(env: &Env, name: &str, secs: &str) -> Command {
    let mut c = Command::new(BIN);
    c.args([
        "bench",
        &env.uri(name),
        "--verify",
        "--rw",
        "mixed",
        "--connections",
        "2",
        "--iodepth",
        "4",
        "--bs",
        "4K",
        "--time",
        secs,
    ]);
    c
}

fn xorshift(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Checks the data area of detached volume NAME with Python `cryptography`: each unit not
/// stored as zeros decrypts under the new DEK to what `plain` (read over NBD) holds, and no
/// unit decrypts under the old DEK.
fn check_independent_decryption(env: &Env, name: &str, old_ct: &str, plain: &Path) {
    let i = env.json(&["volume", "inspect", name]);
    let ct = i["cipher_text"].as_str().unwrap();
    let vid = i["volume_id"].as_str().unwrap();
    let sector = i["sector_size"].as_u64().unwrap().to_string();
    let ctx = format!("volume_id={vid}");
    let dek = |c: &str| {
        env.json(&["datakey", "decrypt", "--cipher-text", c, "--context", &ctx])["data_key"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (new, old) = (dek(ct), dek(old_ct));
    assert_ne!(new, old);
    let out = py(
        r#"
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
img, plain, new, old, u = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3]), bytes.fromhex(sys.argv[4]), int(sys.argv[5])
def dec(key, i, c):
    d = Cipher(algorithms.AES(key), modes.XTS(i.to_bytes(16, "little"))).decryptor()
    return d.update(c) + d.finalize()
written = 0
with open(img, "rb") as f, open(plain, "rb") as p:
    f.seek(1 << 20)
    i = 0
    while True:
        c = f.read(u)
        if not c:
            break
        want = p.read(u)
        if c == bytes(u):
            if want != bytes(u):
                sys.exit(f"unit {i}: stored zeros, but reads non-zero")
        else:
            if dec(new, i, c) != want:
                sys.exit(f"unit {i}: the new DEK does not decrypt it to what NBD reads")
            if dec(old, i, c) == want:
                sys.exit(f"unit {i}: the old DEK still decrypts it")
            written += 1
        i += 1
print("units", written)
"#,
        &[
            env.volume_path(name).to_str().unwrap(),
            plain.to_str().unwrap(),
            &new,
            &old,
            &sector,
        ],
    );
    let n: u64 = out.trim().trim_start_matches("units ").parse().unwrap();
    assert!(n > 100, "only {n} written units checked");
}

fn read_all(uri: &str, to: &Path) {
    let o = Command::new("nbdcopy")
        .args([uri, to.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Starts the daemon with the abort hook at crash point `at`; it may be gone before it
/// answers (the re-encryption resumes at once).
fn start_hooked(env: &mut Env, at: u64) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(env.dir.path().join("daemon.log"))
        .unwrap();
    let child = Command::new(BIN)
        .env("CRYPTVOL_TEST_REENC_ABORT_AT", at.to_string())
        .args(["serve", "--config"])
        .arg(&env.cfg)
        .stderr(log)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    env.daemon = Some(child);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !env.cli(&["volume", "list"]).status.success() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn kill9_rounds(sector_v: &str, sector_w: &str, rounds: u64) {
    if !have_py_modules() || !common::have("nbdcopy") {
        eprintln!("SKIP: needs python3-libnbd, python3-cryptography and nbdcopy");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut env = Env::new();
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    env.json(&["key", "create", "--alias", "k2"]);
    let k2 = env.json(&["key", "describe", "k2"])["key_info"]["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for (n, s) in [("v", sector_v), ("w", sector_w)] {
        env.json(&[
            "volume",
            "create",
            n,
            "--size",
            "20M",
            "--key",
            "k",
            "--sector-size",
            s,
        ]);
        env.json(&["volume", "attach", n]);
    }
    let (uv, uw) = (env.uri("v"), env.uri("w"));
    // v: blocks 0..256 the crash writer's, 256..4352 (16 MiB: about two segments re-encrypted per daemon start, so kills land mid-run for ten rounds) a pattern written before the start.
    py(PATTERN, &[&uv, "w", "256", "4096", "7"]);
    let o = bench(&env, "w", "1s").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let old_ct: Vec<String> = ["v", "w"]
        .iter()
        .map(|n| {
            env.json(&["volume", "inspect", n])["cipher_text"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let r = env.json(&[
        "volume",
        "reencrypt",
        "v",
        "--key",
        "k2",
        "--max-rate",
        "48K",
    ]);
    assert_eq!(r["reencrypt"]["state"], "running", "{r}");
    env.json(&[
        "volume",
        "reencrypt",
        "w",
        "--key",
        "k2",
        "--max-rate",
        "256K",
    ]);
    assert!(env.stop().success(), "{}", env.log());

    let mut seed = std::process::id() as u64 | 1;
    let mut percents = Vec::new();
    for round in 0..rounds {
        // Every other round also aborts at a chosen crash point (header copies included).
        if round % 2 == 1 {
            start_hooked(&mut env, 1 + xorshift(&mut seed) % 40);
        } else {
            env.start();
        }
        // A whole verified bench run while both volumes re-encrypt (may be cut by the abort
        // hook: then it fails, and the daemon is already gone).
        let hooked = round % 2 == 1;
        let o = bench(&env, "w", "1s").output().unwrap();
        assert!(
            hooked || o.status.success(),
            "round {round}: bench --verify: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let mut b = Proc(
            bench(&env, "w", "30s")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let mut w = Proc(
            Command::new(python())
                .arg(root.join("tests/py/crash_writer.py"))
                .args([&uv, "256"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let kill_after = 1 + xorshift(&mut seed) % 3;
        let mut flushed = 0u64;
        let mut lines = BufReader::new(w.0.stdout.take().unwrap()).lines();
        while flushed < kill_after {
            match lines.next() {
                Some(Ok(l)) => flushed = l.trim_start_matches("flushed ").parse().unwrap(),
                _ => break, // the abort hook killed the daemon
            }
        }
        std::thread::sleep(Duration::from_millis(xorshift(&mut seed) % 300));
        env.kill();
        for l in lines.map_while(Result::ok) {
            if let Some(n) = l.strip_prefix("flushed ") {
                flushed = n.parse().unwrap();
            }
        }
        drop(w);
        let _ = b.0.kill();
        let _ = b.0.wait();
        env.start();
        // flushed 0: the abort hook took the daemon down before the writer's first FLUSH;
        // nothing was promised (blocks may still be zeros), so only the pattern is checked.
        if flushed > 0 {
            let o = Command::new(python())
                .arg(root.join("tests/py/crash_check.py"))
                .args([&uv, "256", &flushed.to_string()])
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "round {round} (flushed {flushed}): {}{}\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr),
                env.log()
            );
        }
        py(PATTERN, &[&uv, "c", "256", "4096", "7"]);
        percents.push(reenc_state(&env, "v").1);
        // The writer starts from round 1 again: reset its blocks.
        let o = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -z 0 1M", &uv])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(env.stop().success(), "{}", env.log());
    }
    eprintln!("v percent after each round: {percents:?}");
    env.start();
    for n in ["v", "w"] {
        env.json(&["volume", "reencrypt", n, "--max-rate", "0"]);
        wait_done(&env, n, &k2);
    }
    py(PATTERN, &[&uv, "c", "256", "4096", "7"]);
    let o = bench(&env, "w", "1s").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = std::fs::read_to_string(env.state.join("kms/audit.jsonl")).unwrap();
    assert!(log.contains("\"reencryptVolume\""), "start not audited");
    assert!(log.contains("\"reencryptVolumeDone\""), "end not audited");
    for (n, ct) in ["v", "w"].iter().zip(&old_ct) {
        let plain = env.dir.path().join(format!("{n}.raw"));
        read_all(&env.uri(n), &plain);
        env.json(&["volume", "detach", n]);
        check_independent_decryption(&env, n, ct, &plain);
        // A fresh attach (the new DEK only) reads the same.
        env.json(&["volume", "attach", n]);
        let again = env.dir.path().join(format!("{n}.again"));
        read_all(&env.uri(n), &again);
        assert!(std::fs::read(&plain).unwrap() == std::fs::read(&again).unwrap());
    }
    let _ = uw;
    assert!(env.stop().success(), "{}", env.log());
}

#[test]
fn kill9_during_reencryption_512_and_4096() {
    kill9_rounds("512", "4096", 10);
}

#[test]
fn kill9_during_reencryption_4096_and_512() {
    kill9_rounds("4096", "512", 4);
}

#[test]
fn pause_survives_restart_and_resume_finishes_detached() {
    let mut env = Env::new();
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    env.json(&["volume", "create", "d", "--size", "8M", "--key", "k"]);
    env.json(&["volume", "attach", "d"]);
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x6b 0 6M", &env.uri("d")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    env.json(&["volume", "detach", "d"]);
    let key = env.json(&["volume", "inspect", "d"])["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = env.json(&["volume", "reencrypt", "d", "--max-rate", "1M"]);
    assert_eq!(r["reencrypt"]["state"], "running", "{r}");
    let r = env.json(&["volume", "reencrypt", "d", "--pause"]);
    assert_eq!(r["reencrypt"]["state"], "paused", "{r}");
    std::thread::sleep(Duration::from_millis(500));
    // The worker records the pause in the header; a kill -9 and restart keep it paused.
    let p0 = reenc_state(&env, "d").1;
    env.kill();
    env.start();
    let (state, p1, _) = reenc_state(&env, "d");
    assert_eq!(state, "paused");
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(reenc_state(&env, "d").1, p1, "a paused re-encryption moved");
    assert!(p1 >= p0);
    assert!(
        env.fails(&["volume", "resize", "d", "--size", "16M"])
            .contains("re-encrypted")
    );
    // A snapshot holds one DEK: none while the data is under two.
    let err = env.fails(&["volume", "snapshot", "create", "d", "s"]);
    assert!(err.contains("being re-encrypted"), "{err}");
    let r = env.json(&["volume", "reencrypt", "d", "--resume", "--max-rate", "0"]);
    assert_eq!(r["reencrypt"]["state"], "running", "{r}");
    // --wait on the one in progress: returns when done.
    let out = env.cli(&["volume", "reencrypt", "d", "--wait", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["reencrypt"]["state"], "done", "{done}");
    assert_eq!(done["key_id"], key.as_str(), "same CMK by default");
    env.json(&["volume", "attach", "d"]);
    let o = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "read -P 0x6b 0 6M",
            "-c",
            "read -P 0 6M 2M",
            &env.uri("d"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && !text.contains("fail"), "{text}");
    let l = env.json(&["volume", "list"]);
    assert_eq!(l["volumes"][0]["reencrypt"]["state"], "done", "{l}");
    assert!(env.stop().success(), "{}", env.log());
}

#[test]
fn empty_one_tib_volume_reencrypts() {
    let mut env = Env::new();
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    env.json(&["volume", "create", "big", "--size", "1T", "--key", "k"]);
    env.json(&["volume", "attach", "big"]);
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x33 700G 64k", &env.uri("big")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = env.cli(&["volume", "reencrypt", "big", "--wait", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["reencrypt"]["state"], "done", "{done}");
    let o = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "read -P 0x33 700G 64k",
            "-c",
            "read -P 0 1G 1M",
            &env.uri("big"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && !text.contains("fail"), "{text}");
    assert!(
        common::file_blocks(&env.volume_path("big")) < 4096,
        "holes were filled"
    );
    assert!(env.stop().success(), "{}", env.log());
}
