//! `cryptvol bench` (the CLI) against the real daemon: verified writes and reads over several
//! connections on 512- and 4096-byte-sector volumes, including block sizes that are not a
//! multiple of the sector (server-side read-modify-write) and requests from two connections on
//! the same sectors.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::bench;

const BIN: &str = env!("CARGO_BIN_EXE_cryptvol");

/// A `cryptvol serve` child on a temporary state dir; killed on drop.
struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let ok = Command::new(BIN)
            .arg("init")
            .arg("--state-dir")
            .arg(p.join("state"))
            .output();
        assert!(ok.unwrap().status.success(), "cryptvol init");
        let cfg = format!(
            "state_dir = {:?}\n[control]\nsocket = {:?}\n[nbd]\nunix_socket = {:?}\n[kms]\nroot_key_file = {:?}\n",
            p.join("state"),
            p.join("control.sock"),
            p.join("nbd.sock"),
            p.join("state/root.key")
        );
        std::fs::write(p.join("cryptvol.toml"), cfg).unwrap();
        let child = Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(p.join("cryptvol.toml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn cryptvol serve");
        let d = Daemon { child, dir };
        // Readiness: the control API answers.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !d.cli(&["volume", "list"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "cryptvol serve did not become ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d.ok(&["key", "create", "--alias", "bench"]);
        d
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--socket")
            .arg(self.path("control.sock"))
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> Output {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn volume(&self, name: &str, size: &str, sector: &str) -> String {
        self.ok(&[
            "volume",
            "create",
            name,
            "--size",
            size,
            "--key",
            "bench",
            "--sector-size",
            sector,
        ]);
        self.ok(&["volume", "attach", name]);
        format!(
            "nbd+unix:///{name}?socket={}",
            self.path("nbd.sock").display()
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn verified(r: &serde_json::Value) -> u64 {
    assert_eq!(r["errors"], 0, "{r}");
    assert_eq!(r["verify"]["mismatches"], 0, "{r}");
    r["verify"]["verified_blocks"].as_u64().unwrap()
}

#[test]
fn verified_workloads_on_both_sector_sizes() {
    let d = Daemon::start();
    for sector in ["512", "4096"] {
        let uri = d.volume(&format!("v{sector}"), "16M", sector);
        // Whole sectors, two connections, random writes then the read-back pass.
        let r = bench(
            &uri,
            "--rw randwrite --bs 4K --iodepth 16 --connections 2 --size 8M --verify",
        );
        assert!(verified(&r) > 500, "{r}");
        // Sequential 1 MiB requests.
        let r = bench(&uri, "--rw write --bs 1M --iodepth 4 --verify");
        assert_eq!(verified(&r), 16);
        // 1.5 KiB requests: not sector multiples on 4096 (read-modify-write in the server).
        let r = bench(
            &uri,
            "--rw mixed --bs 1536 --iodepth 8 --connections 3 --size 6M --verify",
        );
        assert!(verified(&r) > 1000, "{r}");
    }
}

#[test]
fn concurrent_writers_on_the_same_sectors_keep_sectors_whole() {
    // Verified blocks interleave across connections: 512-byte writes from 4 connections land in
    // the same 4096-byte sectors at once, and every one must survive the others' RMW.
    let d = Daemon::start();
    let uri = d.volume("hot", "1M", "4096");
    let r = bench(
        &uri,
        "--rw randwrite --bs 512 --iodepth 16 --connections 4 --size 4M --verify",
    );
    assert!(verified(&r) > 1500, "{r}");
    let r = bench(
        &uri,
        "--rw write --bs 512 --iodepth 16 --connections 4 --verify",
    );
    assert_eq!(verified(&r), 2048);
}
