//! Key memory stays locked, seen from outside the process: `VmLck` in /proc/PID/status of the
//! real daemon grows when volumes are attached (their XTS keys and aws-lc key schedules), stays
//! above the idle level while any volume is attached (pages are counted, so detaching one
//! volume never unlocks another's key), and returns to the idle level (the root key's page)
//! when all are detached. Under an RLIMIT_MEMLOCK too small for it, the daemon says so once,
//! with the figures, and keeps serving.

mod common;
mod support;

use common::{Env, as_user, have, is_root, proc_kib, qemu_io};
use support::{CMD_DISC, Conn};

fn vmlck(e: &Env) -> u64 {
    proc_kib(e.pid(), "VmLck:")
}

/// Sends NBD_CMD_DISC and waits (bounded) until the daemon counts no client on `export`.
fn disconnect(e: &Env, mut c: Conn, export: &str) {
    c.send_req(0, CMD_DISC, 99, 0, 0);
    c.expect_closed();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while e.json(&["volume", "inspect", export])["clients"] != 0 {
        assert!(std::time::Instant::now() < deadline, "client still counted");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn attached_volumes_keep_their_key_pages_locked() {
    let mut e = Env::new();
    e.start();
    e.json(&["key", "create", "--alias", "k"]);
    for v in ["va", "vb"] {
        e.json(&["volume", "create", v, "--size", "8M", "--key", "k"]);
    }
    let idle = vmlck(&e);
    assert!(
        idle > 0,
        "the root key is locked from start-up: VmLck {idle} kB"
    );

    e.json(&["volume", "attach", "va"]);
    let one = vmlck(&e);
    assert!(
        one > idle,
        "one volume attached: VmLck {one} kB, idle {idle} kB: its key is not locked"
    );
    e.json(&["volume", "attach", "vb"]);
    // I/O on both makes the decrypt contexts (more key schedules) too.
    for v in ["va", "vb"] {
        let mut c = Conn::connect(&e.nbd_socket());
        c.go(v, false, false);
        assert_eq!(c.write_simple(1, 4096, &[0x5a; 4096]), 0);
        assert_eq!(c.read_simple(2, 4096, 4096).unwrap(), vec![0x5a; 4096]);
        disconnect(&e, c, v);
    }
    let two = vmlck(&e);
    assert!(
        two >= one,
        "two volumes: VmLck {two} kB < one volume's {one} kB"
    );

    e.json(&["volume", "detach", "va"]);
    let after_one = vmlck(&e);
    assert!(
        after_one > idle,
        "vb is still attached: VmLck {after_one} kB, idle {idle} kB: detaching va unlocked vb's key"
    );
    // vb still serves (its key is intact).
    let mut c = Conn::connect(&e.nbd_socket());
    c.go("vb", false, false);
    assert_eq!(c.read_simple(3, 4096, 4096).unwrap(), vec![0x5a; 4096]);
    disconnect(&e, c, "vb");

    e.json(&["volume", "detach", "vb"]);
    // The last session may drop its handle on the volume just after the detach answers:
    // wait (bounded) for the level to settle before comparing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while vmlck(&e) != idle && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    eprintln!(
        "VmLck: idle {idle} kB, one volume {one} kB, two with I/O {two} kB, one detached \
         {after_one} kB, none {} kB",
        vmlck(&e)
    );
    assert_eq!(
        vmlck(&e),
        idle,
        "all detached: back to the idle level (nothing of the volumes left locked)"
    );
}

#[test]
fn too_small_memlock_limit_warns_once_and_keeps_serving() {
    if !(is_root() && have("setpriv") && have("prlimit")) {
        eprintln!("SKIP: needs root, setpriv and prlimit to run the daemon without CAP_IPC_LOCK");
        return;
    }
    const UID: u32 = 65534;
    let mut e = Env::new();
    e.give_to(UID, UID);
    // No CAP_IPC_LOCK (setpriv drops capabilities with the uid) and a zero lock limit.
    let mut w: Vec<String> = ["prlimit", "--memlock=0:0", "--"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    w.extend(as_user(UID, UID, &[]));
    e.start_via(&w);
    e.json(&["key", "create", "--alias", "k"]);
    e.attach_new("v", "8M");
    let out = qemu_io(&e.uri("v"), &["write -P 0x33 0 64k", "read -P 0x33 0 64k"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(vmlck(&e), 0, "nothing can be locked under a zero limit");
    let log = e.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cannot lock key memory"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning, not one per key: {log}");
    assert!(
        warnings[0].contains("rlimit_memlock_kib=0"),
        "the warning names the limit: {}",
        warnings[0]
    );
}
