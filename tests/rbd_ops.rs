//! RBD operations under crashes and outages, through the real daemons on a throwaway cluster
//! (tests/ceph/micro-ceph.sh): an import killed half-way leaves no image behind once its
//! daemon restarts, while another host's import in progress is untouched; a re-attach
//! waiting for a frozen cluster does not hold up the daemon's other volume operations.
#![cfg(feature = "rbd")]

mod ceph_support;
mod common;
#[path = "ceph_support/hosts.rs"]
mod hosts;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ceph_support::{CLIENT_A, MicroCeph};
use common::{Env, qemu_io};
use hosts::volume;

const TEMP: &str = "cryptvol-tmp.";

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(60), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pool's temporary (import) images, via the `rbd` CLI.
fn temp_images(mc: &MicroCeph) -> Vec<String> {
    let o = mc.rbd(CLIENT_A, &["ls"]);
    assert!(
        o.status.success(),
        "rbd ls: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.starts_with(TEMP))
        .map(str::to_owned)
        .collect()
}

/// Starts an RBD import of `size` bytes of 0x11 on `h`, sends `sent` bytes of it and stalls.
fn stalled_import(h: &Env, name: &str, size: usize, sent: usize) -> UnixStream {
    let mut s = UnixStream::connect(h.dir.path().join("c.sock")).unwrap();
    write!(
        s,
        "POST /v1/volumes/{name}/import?size={size}&key_id=k&store=rbd HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {size}\r\n\r\n"
    )
    .unwrap();
    s.write_all(&vec![0x11u8; sent]).unwrap();
    s
}

#[test]
fn a_killed_import_leaves_nothing_and_never_touches_another_hosts_import() {
    let test = "a_killed_import_leaves_nothing_and_never_touches_another_hosts_import";
    if !common::tools_present(test, &["qemu-io"]) {
        return;
    }
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    let (mut a, b) = hosts::two_hosts(&mc, 5);
    const SIZE: usize = 8 << 20;
    // Both hosts import at once, into the same pool; each stalls half-way.
    let _up_a = stalled_import(&a, "va", SIZE, 1 << 20);
    wait_until("A's temporary image", || temp_images(&mc).len() == 1);
    let a_temp = temp_images(&mc).remove(0);
    let mut up_b = stalled_import(&b, "vb", SIZE, 1 << 20);
    wait_until("B's temporary image", || temp_images(&mc).len() == 2);
    let b_temp: String = temp_images(&mc).into_iter().find(|t| *t != a_temp).unwrap();
    // Neither is listed as a volume, on either host.
    for h in [&a, &b] {
        let l = h.json(&["volume", "list"]);
        assert!(l["volumes"].as_array().unwrap().is_empty(), "{l}");
    }

    // A crashes mid-import (no shutdown path runs): its temporary image stays, until A starts.
    a.kill();
    assert!(temp_images(&mc).contains(&a_temp));
    a.start();
    wait_until("A's stale image removed at start", || {
        !temp_images(&mc).contains(&a_temp)
    });
    assert!(
        a.log().contains("removed an unfinished import"),
        "{}",
        a.log()
    );
    // B's import in progress is untouched, also by A's listing, and completes.
    a.json(&["volume", "list"]);
    assert_eq!(temp_images(&mc), vec![b_temp.clone()]);
    up_b.write_all(&vec![0x11u8; SIZE - (1 << 20)]).unwrap();
    let mut reply = String::new();
    up_b.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "B's import: {reply}");

    // A imports the same name again, whole this time; B's volume is there for both.
    let img = a.dir.path().join("img");
    std::fs::write(&img, vec![0x22u8; 2 << 20]).unwrap();
    let v = a.json(&[
        "volume",
        "import",
        "va",
        "--from",
        img.to_str().unwrap(),
        "--key",
        "k",
        "--store",
        "rbd",
    ]);
    assert_eq!(v["store"], "rbd", "{v}");
    a.json(&["volume", "attach", "va"]);
    let o = qemu_io(&a.uri("va"), &["read -P 0x22 0 2M"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    b.json(&["volume", "attach", "vb"]);
    let o = qemu_io(&b.uri("vb"), &["read -P 0x11 0 8M"]);
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let l = a.json(&["volume", "list"]);
    for n in ["va", "vb"] {
        assert_eq!(volume(&l, n)["store"], "rbd", "{l}");
    }
    assert!(temp_images(&mc).is_empty(), "{:?}", temp_images(&mc));
}

/// Attempts of the re-attach thread begun and ended, from the daemon's log.
fn attempts(h: &Env) -> (usize, usize) {
    let log = h.log();
    (
        log.matches("re-attach: trying the cluster again").count(),
        log.matches("re-attach failed").count(),
    )
}

#[test]
fn a_reattach_waiting_for_the_cluster_holds_up_no_other_operation() {
    let test = "a_reattach_waiting_for_the_cluster_holds_up_no_other_operation";
    if !common::tools_present(test, &["qemu-io"]) {
        return;
    }
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    // Long timeouts: an attempt on the frozen cluster waits its whole connect timeout.
    let mut a = hosts::with_rbd_volume(&mc, CLIENT_A, 20, "r", "4M");
    a.attach_new("f", "4M");
    assert!(a.stop().success());

    mc.freeze();
    a.start();
    // An attempt of the re-attach thread is waiting for the cluster...
    let mut ended = 0;
    wait_until("a re-attach attempt in progress", || {
        let (begun, e) = attempts(&a);
        ended = e;
        begun > e
    });
    // ...while file volumes are created, attached, listed, served, detached.
    let t = Instant::now();
    a.json(&["volume", "create", "g", "--size", "4M", "--key", "k"]);
    a.json(&["volume", "attach", "g"]);
    let o = qemu_io(&a.uri("g"), &["write -P 5 0 64k", "read -P 5 0 64k"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let l = a.json(&["volume", "list"]);
    assert_eq!(volume(&l, "f")["attached"], true, "{l}");
    assert!(
        volume(&l, "r")["status"]
            .as_str()
            .unwrap()
            .starts_with("failed:"),
        "{l}"
    );
    a.json(&["volume", "detach", "g"]);
    eprintln!(
        "create, attach, I/O, list, detach of a file volume during a re-attach attempt: {:?}",
        t.elapsed()
    );
    assert_eq!(
        attempts(&a).1,
        ended,
        "the operations waited for the re-attach attempt to end:\n{}",
        a.log()
    );

    // Detached by hand meanwhile: the thread stops trying, and the thaw does not bring it
    // back; attached by hand it serves.
    a.json(&["volume", "detach", "r"]);

    // An attach by hand waiting for the cluster holds up nothing either. (Right after a
    // failure it is refused at once, until the next probe is due: tried again then.)
    let probes = |h: &Env| {
        h.log()
            .matches("the cluster was unreachable: connecting again")
            .count()
    };
    loop {
        let before = probes(&a);
        let mut attach = std::process::Command::new(common::BIN)
            .arg("--config")
            .arg(&a.cfg)
            .args(["volume", "attach", "r"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut done = None;
        wait_until("the attach connecting, or refused", || {
            done = attach.try_wait().unwrap();
            done.is_some() || probes(&a) > before
        });
        if let Some(st) = done {
            let err = common::stderr_of(&mut attach);
            assert!(
                !st.success() && err.contains("cluster unreachable"),
                "{err}"
            );
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        a.json(&["volume", "create", "h", "--size", "4M", "--key", "k"]);
        a.json(&["volume", "attach", "h"]);
        a.json(&["volume", "list"]);
        assert!(
            attach.try_wait().unwrap().is_none(),
            "the file volume operations waited for the attach:\n{}",
            a.log()
        );
        let st = attach.wait().unwrap();
        assert!(!st.success(), "attached on a frozen cluster");
        break;
    }
    mc.thaw();
    wait_until("the last attempt ends", || {
        let (begun, e) = attempts(&a);
        begun == e || a.log().contains("no longer wanted")
    });
    // (The cluster is tried again a few seconds after the last failure.)
    wait_until("the cluster answers again", || {
        a.cli(&["volume", "inspect", "r"]).status.success()
    });
    let r = a.json(&["volume", "inspect", "r"]);
    assert_eq!(r["attached"], false, "{r}");
    a.json(&["volume", "attach", "r"]);
    let o = qemu_io(&a.uri("r"), &["write -P 6 0 64k", "read -P 6 0 64k"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}
