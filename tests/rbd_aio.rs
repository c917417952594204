//! RBD volumes served through librbd's aio (src/volume/rbd/aio.rs, src/server/dispatch.rs):
//! many requests in flight at once through python3-libnbd (aligned, unaligned: the
//! read-modify-write path beside the aio one, 4 KiB to 1 MiB), every byte checked; and requests in flight while the cluster freezes: they
//! fail within the op timeout, the daemon stays up, no reply carries another request's data
//! (each block is tagged with its number and version), and service resumes after the thaw.
//! FLUSH-acknowledged data surviving kill -9 on this path: tests/daemon_rbd.rs (takeover).
#![cfg(feature = "rbd")]

mod ceph_support;
mod common;
#[path = "ceph_support/hosts.rs"]
mod hosts;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ceph_support::{CLIENT_A, MicroCeph};
use common::Env;
use hosts::nbd_read;

const PY: &str = "/usr/bin/python3";
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/aio_storm.py");
const OP_TIMEOUT_SECS: u64 = 3;

fn libnbd_present(test: &str) -> bool {
    let ok = Command::new(PY)
        .args(["-c", "import nbd"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIP {test}: {PY} cannot import nbd (python3-libnbd)");
    }
    ok
}

/// One RBD volume `name` of `size` on a started daemon.
fn volume(mc: &MicroCeph, name: &str, size: &str) -> Env {
    hosts::with_rbd_volume(mc, CLIENT_A, OP_TIMEOUT_SECS, name, size)
}

fn run_load(a: &Env, seed: &str) {
    let size = (16u64 << 20).to_string();
    let (ok, out) = hosts::run_script(PY, SCRIPT, &["load", &a.uri("v"), &size, seed]);
    assert!(
        ok && out.contains("OK checked="),
        "aio_storm load: {out}\n{}",
        a.log()
    );
    eprintln!("{}", out.trim());
}

#[test]
fn many_requests_in_flight_keep_every_byte() {
    let test = "many_requests_in_flight_keep_every_byte";
    if !common::tools_present(test, &["timeout"]) || !libnbd_present(test) {
        return;
    }
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    let mut a = volume(&mc, "v", "16M");
    run_load(&a, "1");
    // What the load left is in the image: a fresh attachment reads the same (the script
    // checked every byte after FLUSH; the daemon's re-read after detach/attach is compared
    // with its read before).
    let before = nbd_read(&a.uri("v"));
    a.json(&["volume", "detach", "v"]);
    a.json(&["volume", "attach", "v"]);
    assert!(
        before == nbd_read(&a.uri("v")),
        "data changed over detach/attach"
    );
    assert!(!a.log().contains("panicked"), "{}", a.log());
    assert!(a.stop().success());
}

#[test]
fn requests_in_flight_through_a_frozen_cluster() {
    let test = "requests_in_flight_through_a_frozen_cluster";
    if !common::tools_present(test, &["timeout", "nbdcopy"]) || !libnbd_present(test) {
        return;
    }
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    let mut a = volume(&mc, "v", "4M");
    let stop = a.state.join("storm.stop");
    let mut py = Command::new("timeout")
        .args(["-s", "KILL", "300", PY, SCRIPT, "storm", &a.uri("v")])
        .args([&(4u64 << 20).to_string(), "3"])
        .arg(&stop)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(py.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "RUNNING", "{}", common::stderr_of(&mut py));
    // 64 requests in flight all the time: freeze under them, for more than two op timeouts.
    std::thread::sleep(Duration::from_millis(500));
    mc.freeze();
    std::thread::sleep(Duration::from_secs(2 * OP_TIMEOUT_SECS + 1));
    // The daemon still answers its control API while librbd holds requests.
    let t = Instant::now();
    a.json(&["volume", "list"]);
    eprintln!("volume list while frozen: {:?}", t.elapsed());
    mc.thaw();
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(&stop, b"").unwrap();
    let st = py.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let err = common::stderr_of(&mut py);
    assert!(
        st.success() && rest.contains("OK"),
        "storm: {rest}{err}\n{}",
        a.log()
    );
    eprintln!("{}", rest.trim());
    let stats = rest.lines().find(|l| l.starts_with("STATS")).unwrap();
    let num = |k: &str| -> u64 {
        let v = stats.split_whitespace().find(|w| w.starts_with(k)).unwrap();
        v[k.len()..].parse().unwrap()
    };
    assert!(
        num("failed=") > 0,
        "no request failed while frozen: {stats}"
    );
    assert!(num("ok=") > 0, "{stats}");
    // Still serving, nothing crashed.
    let o = common::qemu_io(&a.uri("v"), &["write -P 0x42 0 64k", "read -P 0x42 0 64k"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(!a.log().contains("panicked"), "{}", a.log());
    assert!(a.stop().success());
}

/// 1 MiB writes sent into a frozen cluster: more bytes than the sockets take, so librados
/// holds some in its own queue. librbd sends aio write buffers without a copy and holds each
/// completion until it let go of the buffer (docs/rbd.md); every write must still be answered
/// (an error) within a bound, never hang, and the image must hold no other write's bytes
/// once the cluster is back.
#[test]
fn large_writes_into_a_frozen_cluster_are_answered() {
    let test = "large_writes_into_a_frozen_cluster_are_answered";
    if !common::tools_present(test, &["timeout", "qemu-io"]) || !libnbd_present(test) {
        return;
    }
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    let a = volume(&mc, "v", "32M");
    let o = common::qemu_io(&a.uri("v"), &["write -P 0x11 0 32M", "flush"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    mc.freeze();
    // 24 writes of 1 MiB, each its own pattern, all in flight; answers awaited for at most
    // ten op timeouts.
    let script = format!(
        r#"
import nbd, time
h = nbd.NBD()
h.connect_uri("{uri}")
done = {{}}
def cb(i):
    return lambda err: done.__setitem__(i, err) or 1
for i in range(24):
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([0x20 + i]) * (1 << 20)), i << 20,
                 completion=cb(i))
t = time.monotonic()
while len(done) < 24 and time.monotonic() - t < {limit}:
    h.poll(100)
print("ANSWERED", len(done), "in %.1f s" % (time.monotonic() - t), flush=True)
"#,
        uri = a.uri("v"),
        limit = 10 * OP_TIMEOUT_SECS
    );
    let o = Command::new("timeout")
        .args(["-s", "KILL", "120", PY, "-c", &script])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    eprintln!("{}{}", out.trim(), String::from_utf8_lossy(&o.stderr));
    mc.thaw();
    assert!(
        out.contains("ANSWERED 24 "),
        "writes into a frozen cluster not all answered: {out}\n{}",
        a.log()
    );
    // Back: each MiB holds the old pattern or its own write's, nothing else.
    std::thread::sleep(Duration::from_secs(2));
    let deadline = Instant::now() + Duration::from_secs(60);
    let data = loop {
        let o = Command::new("nbdcopy")
            .args([&a.uri("v"), "-"])
            .output()
            .unwrap();
        if o.status.success() {
            break o.stdout;
        }
        assert!(Instant::now() < deadline, "not served after the thaw");
        std::thread::sleep(Duration::from_millis(500));
    };
    for (i, mib) in data.chunks(1 << 20).enumerate() {
        let own = if i < 24 { 0x20 + i as u8 } else { 0x11 };
        let first = mib[0];
        assert!(
            (first == 0x11 || first == own) && mib.iter().all(|&b| b == first),
            "MiB {i} holds bytes of another write or a torn one"
        );
    }
    assert!(!a.log().contains("panicked"), "{}", a.log());
}
