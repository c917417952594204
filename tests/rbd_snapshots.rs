//! Snapshots of RBD volumes (Ceph's own snapshots, `cryptvol.SNAP`) through the real daemons
//! on a throwaway cluster (tests/ceph/micro-ceph.sh), two "hosts": what a snapshot reads
//! after the volume moved on, read-only attach and export of `NAME@SNAP` on both hosts, the
//! `rbd` CLI's view, a volume made from a snapshot, the delete rules, a cut while a writer with FLUSHes runs, and a fenced
//! holder's snapshot refused.
#![cfg(feature = "rbd")]

mod ceph_support;
mod common;
#[path = "ceph_support/hosts.rs"]
mod hosts;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ceph_support::{CLIENT_A, MicroCeph};
use common::{Env, Proc, python_nbd, qemu_io};
use hosts::{nbd_read, ok};

const MIB: usize = 1 << 20;

/// The image's snapshots as `rbd snap ls` shows them (names only).
fn rbd_snaps(mc: &MicroCeph, image: &str) -> Vec<String> {
    let out = ok(
        &mc.rbd(CLIENT_A, &["snap", "ls", image, "--format", "json"]),
        "rbd snap ls",
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let mut names: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

fn listed(h: &Env, vol: &str) -> Vec<String> {
    let l = h.json(&["volume", "snapshot", "list", vol]);
    l["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn rbd_snapshot_keeps_its_point_in_time_for_both_hosts() {
    let test = "rbd_snapshot_keeps_its_point_in_time_for_both_hosts";
    if !common::tools_present(test, &["qemu-io", "nbdcopy"]) {
        return;
    }
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    let (mut a, b) = hosts::two_hosts(&mc, 5);
    a.json(&[
        "volume", "create", "v", "--size", "4M", "--key", "k", "--store", "rbd",
    ]);
    a.json(&["volume", "attach", "v"]);
    ok(
        &qemu_io(&a.uri("v"), &["write -P 0xa1 0 4M", "flush"]),
        "pattern A",
    );
    let s = a.json(&["volume", "snapshot", "create", "v", "s1"]);
    assert_eq!(s["state"], "ready", "{s}");
    assert_eq!(s["method"], "rbd", "{s}");
    assert!(s["pause_us"].is_u64(), "{s}");
    let vid = a.json(&["volume", "inspect", "v"])["volume_id"].clone();
    assert_eq!(s["volume_id"], vid, "{s}");
    ok(
        &qemu_io(&a.uri("v"), &["write -P 0xb2 0 1M", "flush"]),
        "pattern B",
    );
    // A user's snapshot of the image: never listed, never touched.
    ok(
        &mc.rbd(CLIENT_A, &["snap", "create", "cryptvol.v@usersnap"]),
        "rbd snap create",
    );
    assert_eq!(
        rbd_snaps(&mc, "cryptvol.v"),
        ["cryptvol.s1".to_owned(), "usersnap".to_owned()]
    );
    assert_eq!(listed(&a, "v"), ["v@s1"]);
    assert_eq!(listed(&b, "v"), ["v@s1"], "host B sees A's snapshot");

    // The snapshot reads A while the volume reads B over A.
    a.json(&["volume", "attach", "v@s1", "--read-only"]);
    let i = a.json(&["volume", "inspect", "v@s1"]);
    assert_eq!(i["volume_id"], vid, "{i}");
    assert_eq!(i["read_only"], true, "{i}");
    assert_eq!(i["path"], "rbd:rbd/cryptvol.v@cryptvol.s1", "{i}");
    let snap = nbd_read(&a.uri("v@s1"));
    assert_eq!(snap.len(), 4 * MIB);
    assert!(
        snap.iter().all(|&x| x == 0xa1),
        "the snapshot reads pattern A"
    );
    let vol = nbd_read(&a.uri("v"));
    assert!(vol[..MIB].iter().all(|&x| x == 0xb2));
    assert!(vol[MIB..].iter().all(|&x| x == 0xa1));
    // Read-write attach of a snapshot: refused.
    let e = a.fails(&["volume", "attach", "v@s1"]);
    assert!(e.contains("read-only"), "{e}");
    // Every snapshot (`GET /v1/snapshots`) includes it.
    let all = a.json(&["volume", "snapshot", "list"]);
    assert!(
        all["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "v@s1" && s["method"] == "rbd"),
        "{all}"
    );
    // Still attached after a restart.
    assert!(a.stop().success());
    a.start();
    assert_eq!(a.json(&["volume", "inspect", "v@s1"])["attached"], true);
    assert!(
        nbd_read(&a.uri("v@s1")) == snap,
        "re-attached after a restart"
    );

    // Export of the snapshot (detached there: opened at the snapshot for the export).
    let out = a.dir.path().join("snap.raw");
    let r = b.json(&["volume", "export", "v@s1", "--to", out.to_str().unwrap()]);
    assert_eq!(r["size"].as_u64(), Some(4 * MIB as u64), "{r}");
    assert!(
        std::fs::read(&out).unwrap() == snap,
        "export == what was written"
    );
    let _ = std::fs::remove_file(&out);

    // A volume from the snapshot (host B): its own image, volume id and wrapped DEK,
    // holding pattern A.
    let c = b.json(&["volume", "create", "c", "--from-snapshot", "v@s1"]);
    assert_eq!(c["store"], "rbd", "{c}");
    assert_eq!(c["path"], "rbd:rbd/cryptvol.c", "{c}");
    assert_ne!(c["volume_id"], vid, "{c}");
    assert_eq!(c["size"].as_u64(), Some(4 * MIB as u64), "{c}");
    b.json(&["volume", "attach", "c"]);
    assert!(
        nbd_read(&b.uri("c")) == snap,
        "the clone reads the snapshot"
    );
    ok(
        &qemu_io(&b.uri("c"), &["write -P 0xc3 0 64k", "flush"]),
        "write the clone",
    );
    assert!(
        nbd_read(&a.uri("v@s1")) == snap,
        "writing the clone left the snapshot"
    );
    b.json(&["volume", "detach", "c"]);
    b.json(&["volume", "delete", "c"]);
    let e = b.fails(&["volume", "create", "v", "--from-snapshot", "v@s1"]);
    assert!(e.contains("VOL.0409"), "a taken name: {e}");

    // Host B: the snapshot attached read-only while A holds the volume read-write.
    b.json(&["volume", "attach", "v@s1", "--read-only"]);
    assert!(nbd_read(&b.uri("v@s1")) == snap);
    // B cannot snapshot a volume A writes: the snapshot is the writer's to take.
    let e = b.fails(&["volume", "snapshot", "create", "v", "s2"]);
    assert!(e.contains("cryptvol-a@"), "{e}");

    // Delete rules.
    let e = a.fails(&["volume", "snapshot", "delete", "v@s1"]);
    assert!(e.contains("attached"), "{e}");
    a.json(&["volume", "detach", "v@s1"]);
    // Still read on host B: refused there too, naming B.
    let e = a.fails(&["volume", "snapshot", "delete", "v@s1"]);
    assert!(e.contains("being read by cryptvol-b@"), "{e}");
    b.json(&["volume", "detach", "v@s1"]);
    a.json(&["volume", "detach", "v"]);
    // Detached: taken in a session of its own.
    let s2 = a.json(&["volume", "snapshot", "create", "v", "s2"]);
    assert_eq!(s2["state"], "ready", "{s2}");
    let e = a.fails(&["volume", "snapshot", "create", "v", "s2"]);
    assert!(e.contains("VOL.0409"), "a taken name: {e}");
    let e = a.fails(&["volume", "delete", "v"]);
    assert!(e.contains("--with-snapshots") && e.contains("v@s1"), "{e}");
    a.json(&["volume", "snapshot", "delete", "v@s1"]);
    assert_eq!(
        rbd_snaps(&mc, "cryptvol.v"),
        ["cryptvol.s2".to_owned(), "usersnap".to_owned()]
    );
    a.fails(&["volume", "snapshot", "delete", "v@s1"]);
    // The user's snapshot is not cryptvol's to remove: the delete is refused, naming it,
    // and removes nothing.
    let e = a.fails(&["volume", "delete", "v", "--with-snapshots"]);
    assert!(e.contains("usersnap"), "{e}");
    assert_eq!(listed(&a, "v"), ["v@s2"]);
    ok(
        &mc.rbd(CLIENT_A, &["snap", "rm", "cryptvol.v@usersnap"]),
        "rbd snap rm",
    );
    a.json(&["volume", "delete", "v", "--with-snapshots"]);
    let ls = ok(&mc.rbd(CLIENT_A, &["ls"]), "rbd ls");
    assert!(!ls.contains("cryptvol.v"), "{ls}");
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(name)
}

#[test]
fn rbd_snapshot_under_a_writer_is_a_cut_and_a_fenced_holder_gets_none() {
    let test = "rbd_snapshot_under_a_writer_is_a_cut_and_a_fenced_holder_gets_none";
    let Some(py) = python_nbd() else { return };
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    let (a, b) = hosts::two_hosts(&mc, 5);
    const BLOCKS: u64 = 1024; // 4 MiB of 4 KiB blocks
    a.json(&[
        "volume", "create", "v", "--size", "4M", "--key", "k", "--store", "rbd",
    ]);
    a.json(&["volume", "attach", "v"]);
    // tests/py/snap_writer.py: rounds of (round, block) patterns, one write in flight,
    // a FLUSH and "flushed r" after each round.
    let mut p = Proc(
        Command::new(&py)
            .arg(script("snap_writer.py"))
            .args([&a.uri("v"), &BLOCKS.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel::<u64>();
    let out = p.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(n) = l.strip_prefix("flushed ")
                && tx.send(n.parse().unwrap()).is_err()
            {
                break;
            }
        }
    });
    let mut last = 0;
    let wait_for = |r: u64, last: &mut u64| {
        while *last < r {
            *last = rx
                .recv_timeout(Duration::from_secs(120))
                .expect("writer stalled or ended");
        }
    };
    wait_for(2, &mut last);
    while let Ok(n) = rx.try_recv() {
        last = n;
    }
    let before = last;
    let s = a.json(&["volume", "snapshot", "create", "v", "cut"]);
    assert_eq!(s["state"], "ready", "{s}");
    while let Ok(n) = rx.try_recv() {
        last = n;
    }
    let at_return = last;
    wait_for(at_return + 2, &mut last);
    drop(p);
    eprintln!("rbd snapshot under a writer: pause {} us", s["pause_us"]);

    a.json(&["volume", "attach", "v@cut", "--read-only"]);
    let o = Command::new(&py)
        .arg(script("snap_check.py"))
        .args([&a.uri("v@cut"), &BLOCKS.to_string(), &before.to_string()])
        .output()
        .unwrap();
    let text = ok(&o, "snapshot check (every flushed write in it, a cut)");
    let hi: u64 = text.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(
        hi <= at_return + 2,
        "snapshot holds round {hi}, written after it (round {at_return} flushed at its return)"
    );

    // B takes the volume over: A's attachment is fenced (blocklisted) and gets no snapshot.
    b.json(&["volume", "attach", "v", "--takeover"]);
    let e = a.fails(&["volume", "snapshot", "create", "v", "late"]);
    // Blocklisted (ESHUTDOWN), or refused naming the new holder once the fence worker
    // detached the fenced attachment.
    assert!(
        e.contains("error 108") || e.contains("cryptvol-b@"),
        "fenced holder's snapshot: {e}"
    );
    assert!(
        !rbd_snaps(&mc, "cryptvol.v").contains(&"cryptvol.late".to_owned()),
        "a fenced holder made a snapshot"
    );
    // The new holder can.
    b.json(&["volume", "snapshot", "create", "v", "after"]);
    assert_eq!(
        rbd_snaps(&mc, "cryptvol.v"),
        ["cryptvol.after".to_owned(), "cryptvol.cut".to_owned()]
    );
}

/// The RADOS objects of the pool whose names start with `prefix`.
fn objects(mc: &MicroCeph, prefix: &str) -> Vec<String> {
    let o = Command::new("rados")
        .arg("--conf")
        .arg(mc.conf())
        .args(["--id", CLIENT_A, "--pool", "rbd", "ls"])
        .env_remove("CEPH_ARGS")
        .output()
        .unwrap();
    let out = ok(&o, "rados ls");
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

#[test]
fn rbd_snapshot_read_on_another_host_is_not_deleted_under_it() {
    let test = "rbd_snapshot_read_on_another_host_is_not_deleted_under_it";
    if !common::tools_present(test, &["qemu-io", "nbdcopy", "rados"]) {
        return;
    }
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    let (a, mut b) = hosts::two_hosts(&mc, 5);
    a.json(&[
        "volume", "create", "v", "--size", "4M", "--key", "k", "--store", "rbd",
    ]);
    a.json(&["volume", "attach", "v"]);
    ok(
        &qemu_io(&a.uri("v"), &["write -P 0x5c 0 4M", "flush"]),
        "pattern",
    );
    a.json(&["volume", "snapshot", "create", "v", "s1"]);
    a.json(&["volume", "detach", "v"]);
    assert!(objects(&mc, "cryptvol-readers.").is_empty());

    // B reads the snapshot: A may not delete it, alone or with the volume; nothing goes.
    b.json(&["volume", "attach", "v@s1", "--read-only"]);
    assert_eq!(objects(&mc, "cryptvol-readers.").len(), 1);
    let e = a.fails(&["volume", "snapshot", "delete", "v@s1"]);
    assert!(e.contains("being read by cryptvol-b@"), "{e}");
    let e = a.fails(&["volume", "delete", "v", "--with-snapshots"]);
    assert!(e.contains("being read by cryptvol-b@"), "{e}");
    assert_eq!(listed(&a, "v"), ["v@s1"]);
    assert!(
        nbd_read(&b.uri("v@s1")).iter().all(|&x| x == 0x5c),
        "B still reads the snapshot"
    );
    // B's daemon dies (no detach): a dead reader holds nothing up for long. Its watch has
    // not answered; A's delete goes through once the notify times out (≤ the op timeout).
    b.kill();
    let t = std::time::Instant::now();
    a.json(&["volume", "snapshot", "delete", "v@s1"]);
    eprintln!("delete after the reader died: {:?}", t.elapsed());
    assert!(listed(&a, "v").is_empty());
    assert!(
        objects(&mc, "cryptvol-readers.").is_empty(),
        "the readers object went with the snapshot"
    );
    a.json(&["volume", "delete", "v"]);
}
