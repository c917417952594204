//! Large WRITEs on an RBD volume through librbd's aio, the server reusing each request's
//! buffer for later requests once its write completes (if librbd sent the buffer itself,
//! `rbd_disable_zero_copy_writes = false`, a completion before it let go would show here). Rounds of 1 MiB writes (and a 256 KiB and a 4 KiB one), 8 in flight, each 4 KiB
//! block tagged with its round and number: after FLUSH, and again after detach/attach, every
//! block holds its last round's data — none holds bytes of a request whose buffer reused the
//! memory (a completion before librbd released the buffer would show here).
#![cfg(feature = "rbd")]

mod ceph_support;
mod common;
#[path = "ceph_support/hosts.rs"]
mod hosts;

use ceph_support::{CLIENT_A, MicroCeph};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/reuse_check.py");

fn run(py: &str, args: &[&str]) -> String {
    let (ok, out) = hosts::run_script(py, SCRIPT, args);
    assert!(ok && out.contains("OK"), "reuse_check {args:?}: {out}");
    out
}

#[test]
fn reused_write_buffers_store_their_own_data() {
    let test = "reused_write_buffers_store_their_own_data";
    if !common::tools_present(test, &["timeout"]) {
        return;
    }
    let Some(py) = common::python_nbd() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "python3-libnbd missing (CI installs it)"
        );
        return;
    };
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    let mut a = hosts::with_rbd_volume(&mc, CLIENT_A, 30, "v", "16M");
    let uri = a.uri("v");
    eprintln!("{}", run(&py, &["write", &uri, "4", "7"]).trim());
    a.json(&["volume", "detach", "v"]);
    a.json(&["volume", "attach", "v"]);
    run(&py, &["check", &uri, "4", "7"]);
    let log = a.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(a.stop().success());
}
