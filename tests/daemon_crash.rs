//! Crash safety: SIGKILL the daemon while two NBD connections write with periodic FLUSH, start
//! it again (it re-attaches), and check that every write acknowledged before a completed FLUSH
//! reads back exactly, and that the key store, audit chain and headers are intact. Several
//! rounds with random kill points.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Env, Proc, python};

#[test]
fn kill_9_loses_nothing_flushed() {
    let py = python();
    if !Command::new(&py)
        .args(["-c", "import nbd"])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("SKIP: {py} has no libnbd binding (python3-libnbd)");
        return;
    }
    let mut env = Env::new();
    let uri = env.uri("v");
    let blocks = "256";
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    env.attach_new("v", "4M");
    assert!(env.stop().success(), "{}", env.log());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seed = std::process::id() as u64 | 1;
    for round in 0..6 {
        env.start();
        let mut w = Proc(
            Command::new(&py)
                .arg(root.join("tests/py/crash_writer.py"))
                .args([&uri, blocks])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        // Kill after a random number of flushed rounds (1..=4), mid-way through the next.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let kill_after = 1 + seed % 4;
        let mut flushed = 0u64;
        let mut lines = BufReader::new(w.0.stdout.take().unwrap()).lines();
        while flushed < kill_after {
            let l = lines.next().expect("writer ended early").unwrap();
            flushed = l.trim_start_matches("flushed ").parse().unwrap();
        }
        std::thread::sleep(Duration::from_millis(seed % 40));
        env.kill(); // SIGKILL
        // Everything the writer saw flushed before the kill counts.
        for l in lines.map_while(Result::ok) {
            if let Some(n) = l.strip_prefix("flushed ") {
                flushed = n.parse().unwrap();
            }
        }
        drop(w);
        env.start();
        let o = Command::new(&py)
            .arg(root.join("tests/py/crash_check.py"))
            .args([&uri, blocks, &flushed.to_string()])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "round {round} (flushed {flushed}): {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let audit = env.cli(&["audit", "verify"]);
        assert!(
            audit.status.success(),
            "audit chain after kill: {}",
            String::from_utf8_lossy(&audit.stderr)
        );
        // The next writer starts again from round 1; reset the content so the check holds.
        let o = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -z 0 1M", &uri])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(env.stop().success(), "{}", env.log());
    }
}
