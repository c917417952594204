//! An RBD volume through a cluster outage: the throwaway cluster (tests/ceph/micro-ceph.sh)
//! is frozen (SIGSTOP to its monitor and OSD: requests wait as in a network partition, and
//! nothing is lost, where a restarted memstore OSD would come back empty), then thawed.
//! While frozen, NBD requests fail after `[ceph] op_timeout_secs` instead of hanging and the
//! control API still answers; after the thaw the same attachment serves again, with the data
//! written before intact. A daemon started while the cluster is frozen serves its file
//! volumes and reports the RBD ones failed until the cluster is back.
//!
//! Every client call runs under `timeout -s KILL`: a hang fails the test instead of blocking CI.
#![cfg(feature = "rbd")]

mod ceph_support;
mod common;
#[path = "ceph_support/hosts.rs"]
mod hosts;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ceph_support::{CLIENT_A, MicroCeph};
use common::Env;
use hosts::volume;

/// The daemon's `[ceph] op_timeout_secs`.
const OP_TIMEOUT_SECS: u64 = 3;
/// Any single client call longer than this is a hang.
const HANG_SECS: u64 = 60;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `timeout -s KILL` exits 137 when it had to kill the command.
fn hung(o: &Output) -> bool {
    o.status.code() == Some(137) || o.status.code().is_none()
}

fn bounded() -> Vec<String> {
    ["timeout", "-s", "KILL", &HANG_SECS.to_string()]
        .map(str::to_owned)
        .to_vec()
}

/// qemu-io against an export under a hard time limit; its output and how long it took.
/// A pattern mismatch or a failed request shows in the text ("failed").
fn qemu_io(uri: &str, cmds: &[&str]) -> (Output, Duration) {
    let mut c = Command::new("timeout");
    c.args(["-s", "KILL", &HANG_SECS.to_string(), "qemu-io", "-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let t = Instant::now();
    let o = c.arg(uri).output().unwrap();
    let took = t.elapsed();
    assert!(!hung(&o), "qemu-io {cmds:?} hung for {HANG_SECS} s");
    (o, took)
}

/// qemu-io that must succeed with every request (and every pattern check).
fn io_ok(uri: &str, cmds: &[&str], what: &str) {
    let (o, _) = qemu_io(uri, cmds);
    let t = text(&o);
    assert!(
        o.status.success() && !t.contains("failed"),
        "{what}: {cmds:?}: {t}"
    );
}

/// `volume list` under the hard time limit: it must answer.
fn list(h: &Env) -> serde_json::Value {
    let t = Instant::now();
    let o = h.cli_via(&bounded(), &["volume", "list", "--json"]);
    assert!(!hung(&o), "volume list hung");
    assert!(o.status.success(), "volume list: {}", text(&o));
    eprintln!("volume list answered in {:?}", t.elapsed());
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn frozen_cluster_gives_errors_not_hangs_and_service_resumes() {
    let test = "frozen_cluster_gives_errors_not_hangs_and_service_resumes";
    if !common::tools_present(test, &["qemu-io", "timeout"]) {
        return;
    }
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    let a = hosts::with_rbd_volume(&mc, CLIENT_A, OP_TIMEOUT_SECS, "r", "4M");
    let uri = a.uri("r");
    io_ok(
        &uri,
        &["write -P 0x5a 0 1M", "write -P 0x33 1M 64k", "flush"],
        "before the outage",
    );

    mc.freeze();
    // A read of written data and a write each fail (EIO), bounded by the op timeout.
    for cmd in ["read -P 0x5a 0 4k", "write -P 0x77 2M 4k"] {
        let (o, took) = qemu_io(&uri, &[cmd]);
        let t = text(&o);
        eprintln!("frozen cluster: {cmd:?} answered in {took:?}: {}", t.trim());
        assert!(
            t.contains("failed"),
            "{cmd} succeeded on a frozen cluster: {t}"
        );
        assert!(
            took >= Duration::from_secs(OP_TIMEOUT_SECS),
            "{cmd} failed before the op timeout (not the cluster's answer?): {t}"
        );
    }
    // The control API still answers (the volume listed, whatever its status).
    let l = list(&a);
    eprintln!("frozen: {}", volume(&l, "r"));

    mc.thaw();
    // The same attachment serves again once librados reconnects (bounded retry).
    let deadline = Instant::now() + Duration::from_secs(HANG_SECS);
    loop {
        let (o, _) = qemu_io(&uri, &["read -P 0x5a 0 1M", "read -P 0x33 1M 64k"]);
        let t = text(&o);
        if o.status.success() && !t.contains("failed") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not served {HANG_SECS} s after the thaw: {t}\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    io_ok(
        &uri,
        &["write -P 0x44 2M 64k", "flush", "read -P 0x44 2M 64k"],
        "after the thaw",
    );
    let l = list(&a);
    let r = volume(&l, "r");
    assert_eq!(
        (&r["status"], &r["attached"]),
        (&"ok".into(), &true.into()),
        "{r}"
    );

    // What was written after the thaw reached the image: it survives detach and attach.
    a.json(&["volume", "detach", "r"]);
    a.json(&["volume", "attach", "r"]);
    io_ok(
        &a.uri("r"),
        &[
            "read -P 0x5a 0 1M",
            "read -P 0x33 1M 64k",
            "read -P 0x44 2M 64k",
        ],
        "after detach and attach",
    );
}

#[test]
fn daemon_starts_with_a_frozen_cluster() {
    let test = "daemon_starts_with_a_frozen_cluster";
    if !common::tools_present(test, &["qemu-io", "timeout"]) {
        return;
    }
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    let mut a = hosts::with_rbd_volume(&mc, CLIENT_A, OP_TIMEOUT_SECS, "r", "2M");
    a.attach_new("f", "2M");
    io_ok(&a.uri("r"), &["write -P 7 0 64k", "flush"], "rbd volume");
    io_ok(&a.uri("f"), &["write -P 9 0 64k", "flush"], "file volume");
    assert!(a.stop().success());

    mc.freeze();
    let t = Instant::now();
    a.start();
    eprintln!(
        "daemon answering {:?} after start on a frozen cluster",
        t.elapsed()
    );
    let l = list(&a);
    let r = volume(&l, "r");
    assert_eq!(r["attached"], false, "{r}");
    assert!(r["status"].as_str().unwrap().starts_with("failed:"), "{r}");
    let f = volume(&l, "f");
    assert_eq!(
        (&f["status"], &f["attached"]),
        (&"ok".into(), &true.into()),
        "{f}"
    );
    io_ok(&a.uri("f"), &["read -P 9 0 64k"], "file volume served");

    mc.thaw();
    // Retried: the volume comes back without an explicit attach.
    let deadline = Instant::now() + Duration::from_secs(HANG_SECS);
    loop {
        let l = list(&a);
        let r = volume(&l, "r");
        if r["attached"] == true && r["status"] == "ok" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not re-attached {HANG_SECS} s after the thaw: {r}\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    io_ok(
        &a.uri("r"),
        &["read -P 7 0 64k"],
        "rbd volume served after the thaw",
    );
}
