//! Large WRITEs on an RBD volume, started on the connection's thread and handed to librbd
//! without a copy (`rbd_disable_zero_copy_writes = false`, src/volume/rbd/mod.rs): librbd
//! sends the request's own buffer, which the server reuses for later requests once the write
//! completes. Rounds of 1 MiB writes (and a 256 KiB and a 4 KiB one), 8 in flight, each 4 KiB
//! block tagged with its round and number: after FLUSH, and again after detach/attach, every
//! block holds its last round's data — none holds bytes of a request whose buffer reused the
//! memory (a completion before librbd released the buffer would show here).
#![cfg(feature = "rbd")]

mod ceph_support;
mod common;

use std::process::Command;

use ceph_support::{CLIENT_A, MicroCeph};
use common::Env;

const PY: &str = "/usr/bin/python3";
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/reuse_check.py");

fn run(args: &[&str]) -> String {
    let o = Command::new("timeout")
        .args(["-s", "KILL", "300", PY, SCRIPT])
        .args(args)
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success() && out.contains("OK"),
        "reuse_check {args:?}: {out}"
    );
    out
}

#[test]
fn reused_write_buffers_store_their_own_data() {
    let test = "reused_write_buffers_store_their_own_data";
    if !common::tools_present(test, &["timeout"]) {
        return;
    }
    if !Command::new(PY)
        .args(["-c", "import nbd"])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("SKIP {test}: {PY} cannot import nbd (python3-libnbd)");
        return;
    }
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    let (conf, keyring) = (mc.conf().to_owned(), mc.keyring(CLIENT_A));
    let mut a = Env::with_config(|_| {
        format!(
            "[ceph]\nconf = \"{}\"\nclient = \"{CLIENT_A}\"\nkeyring = \"{}\"\npool = \"rbd\"\n",
            conf.display(),
            keyring.display()
        )
    });
    a.start();
    a.json(&["key", "create", "--alias", "k"]);
    a.json(&[
        "volume", "create", "v", "--size", "16M", "--key", "k", "--store", "rbd",
    ]);
    a.json(&["volume", "attach", "v"]);
    let uri = a.uri("v");
    eprintln!("{}", run(&["write", &uri, "4", "7"]).trim());
    a.json(&["volume", "detach", "v"]);
    a.json(&["volume", "attach", "v"]);
    run(&["check", &uri, "4", "7"]);
    let log = a.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(a.stop().success());
}
