//! Daemons as "hosts" of a [`MicroCeph`] cluster: each its own state dir, sockets and cephx
//! user, configured for the cluster's conf and keyring. For the tests that also have
//! `mod common;` (the daemon [`Env`]); include with `#[path = "ceph_support/hosts.rs"]`.
#![allow(dead_code)]

use std::process::Command;

use super::ceph_support::{CLIENT_A, CLIENT_B, MicroCeph, POOL};
use super::common::Env;

/// The `[ceph]` section for `client` (operation timeout `op_timeout_secs`).
pub fn ceph_section(mc: &MicroCeph, client: &str, op_timeout_secs: u64) -> String {
    format!(
        "[ceph]\nconf = \"{}\"\nclient = \"{client}\"\nkeyring = \"{}\"\npool = \"{POOL}\"\nop_timeout_secs = {op_timeout_secs}\n",
        mc.conf().display(),
        mc.keyring(client).display()
    )
}

/// A daemon (not started) on the cluster as `client`, with `extra` config lines after
/// `[ceph]` (other sections).
pub fn host(mc: &MicroCeph, client: &str, op_timeout_secs: u64, extra: &str) -> Env {
    let section = ceph_section(mc, client, op_timeout_secs);
    Env::with_config(|_| format!("{section}{extra}"))
}

/// Hosts A and B (started) with one root key, and key `k` made on A and known to B. With the
/// per-host key store (the default) B gets a copy of A's `kms/` as it is after the create;
/// `[kms] store = "rados"` shares the records instead (tests/kms_rados.rs).
pub fn two_hosts(mc: &MicroCeph, op_timeout_secs: u64) -> (Env, Env) {
    let mut a = host(mc, CLIENT_A, op_timeout_secs, "");
    let mut b = host(mc, CLIENT_B, op_timeout_secs, "");
    std::fs::copy(a.state.join("root.key"), b.state.join("root.key")).unwrap();
    a.start();
    a.json(&["key", "create", "--alias", "k"]);
    copy_kms(&a, &b);
    b.start();
    (a, b)
}

/// Copies `from`'s local key store (`kms/`) to `to` (not running): `to` then knows every
/// key `from` has now.
pub fn copy_kms(from: &Env, to: &Env) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from.state.join("kms"))
        .arg(to.state.join("kms"))
        .status()
        .unwrap();
    assert!(st.success(), "copy kms/");
}

/// The entry of volume `name` in a `volume list --json`.
pub fn volume<'a>(list: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    list["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed: {list}"))
}

/// `client`'s daemon (started) with key `k` and an attached RBD volume `name` of `size`.
pub fn with_rbd_volume(
    mc: &MicroCeph,
    client: &str,
    op_timeout_secs: u64,
    name: &str,
    size: &str,
) -> Env {
    let mut a = host(mc, client, op_timeout_secs, "");
    a.start();
    a.json(&["key", "create", "--alias", "k"]);
    a.json(&[
        "volume", "create", name, "--size", size, "--key", "k", "--store", "rbd",
    ]);
    a.json(&["volume", "attach", name]);
    a
}

/// A command's stdout and stderr together; fails the test naming `what` unless it succeeded.
pub fn ok(o: &std::process::Output, what: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{what}: {text}");
    text
}

/// What an NBD client reads of the whole export (nbdcopy to stdout).
pub fn nbd_read(uri: &str) -> Vec<u8> {
    let o = Command::new("nbdcopy").args([uri, "-"]).output().unwrap();
    assert!(
        o.status.success(),
        "nbdcopy: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// Runs `py SCRIPT ARGS...` (killed after 300 s): whether it exited 0, and its stdout and
/// stderr together.
pub fn run_script(py: &str, script: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new("timeout")
        .args(["-s", "KILL", "300", py, script])
        .args(args)
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), out)
}
