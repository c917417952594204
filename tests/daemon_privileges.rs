//! The daemon under an unprivileged uid, proven from outside the process: it serves; the
//! kernel treats it as non-dumpable (its /proc files belong to root and its own uid may not
//! read its memory or environment); and the control socket admits a member of `[control]
//! group` through a supplementary group even where the daemon cannot see the caller's /proc
//! (as under the unit's `ProtectProc=invisible`). Needs root (to switch uids); skips otherwise.

mod common;
mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use common::{Env, as_user, have, is_root, proc_status};
use support::Conn;

/// The daemon's uid (nobody) and a caller's, neither root.
const DAEMON_UID: u32 = 65534;
const CALLER_UID: u32 = 65533;
/// The configured control group; no /etc/group entry is needed for a numeric group.
const CONTROL_GID: u32 = 4242;

fn can_switch_uids(test: &str) -> bool {
    if is_root() && have("setpriv") {
        return true;
    }
    eprintln!("SKIP {test}: needs root and setpriv (util-linux) to run processes as other uids");
    false
}

/// A daemon as DAEMON_UID, its state and sockets owned by it; `wrapper` goes before setpriv.
fn unprivileged_daemon(wrapper: &[&str], groups: &[u32], control_group: Option<u32>) -> Env {
    let mut e = Env::with_config(|_| match control_group {
        Some(g) => format!("[control]\ngroup = \"{g}\"\n"),
        None => String::new(),
    });
    e.give_to(DAEMON_UID, DAEMON_UID);
    let mut w: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
    w.extend(as_user(DAEMON_UID, DAEMON_UID, groups));
    e.start_via(&w);
    e
}

/// Runs `script` with sh as `uid`; returns (success, stdout, stderr).
fn sh_as(uid: u32, script: &str) -> (bool, String, String) {
    let w = as_user(uid, uid, &[]);
    let o = Command::new(&w[0])
        .args(&w[1..])
        .args(["sh", "-c", script])
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn unprivileged_daemon_serves_and_is_not_dumpable_from_outside() {
    if !can_switch_uids("unprivileged_daemon_serves_and_is_not_dumpable_from_outside") {
        return;
    }
    let e = unprivileged_daemon(&[], &[], None);
    let pid = e.pid();

    // It works as non-root: key, volume, attach, NBD I/O through its socket.
    e.json(&["key", "create", "--alias", "k"]);
    e.attach_new("v", "8M");
    let mut c = Conn::connect(&e.nbd_socket());
    c.go("v", false, false);
    assert_eq!(c.write_simple(1, 4096, &[0x5a; 4096]), 0);
    assert_eq!(c.read_simple(2, 4096, 4096).unwrap(), vec![0x5a; 4096]);
    let vol = std::fs::metadata(e.volume_path("v")).unwrap();
    assert_eq!(
        vol.uid(),
        DAEMON_UID,
        "volume file created by the daemon's uid"
    );
    assert_eq!(vol.mode() & 0o077, 0, "private to it (umask 077)");
    // Its own uid may use the control socket (the daemon must know its uid although
    // /proc/self is root's once it is not dumpable).
    let o = e.cli_via(
        &as_user(DAEMON_UID, DAEMON_UID, &[]),
        &["volume", "list", "--json"],
    );
    assert!(
        o.status.success(),
        "the daemon's own uid is refused: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The kernel's view. Real, effective, saved and fs uid are all nobody ...
    let uids = proc_status(&pid.to_string(), "Uid:").unwrap();
    assert_eq!(
        uids.split_whitespace().collect::<Vec<_>>(),
        [DAEMON_UID.to_string().as_str(); 4],
        "daemon uids"
    );
    // ... yet its /proc files belong to root:root: proc does that only for a process whose
    // dumpable flag is off (task_dump_owner).
    for f in ["status", "environ", "mem", "maps"] {
        let m = std::fs::metadata(format!("/proc/{pid}/{f}")).unwrap();
        assert_eq!(
            (m.uid(), m.gid()),
            (0, 0),
            "/proc/{pid}/{f} of the daemon is owned by {}:{}: the process is dumpable",
            m.uid(),
            m.gid()
        );
    }
    // Same uid, from outside: a shell of that uid reads its own environ and owns its own
    // /proc files (the control: these reads work for a dumpable process of the uid), and is
    // refused the daemon's environ and memory.
    let (ok, out, err) = sh_as(
        DAEMON_UID,
        &format!(
            "stat -c %u /proc/$$/status && cat /proc/$$/environ >/dev/null && echo own-readable; \
             cat /proc/{pid}/environ >/dev/null && echo DAEMON-ENVIRON-READ; \
             dd if=/proc/{pid}/mem of=/dev/null bs=4096 count=1 2>/dev/null && echo DAEMON-MEM-READ; \
             true"
        ),
    );
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [DAEMON_UID.to_string().as_str(), "own-readable"],
        "same-uid reads of the daemon's environ and memory must be refused: {out}{err}"
    );
    assert!(err.contains("Permission denied"), "{err}");
    // A debugger of the same uid cannot attach either (gdb is optional here).
    if have("gcore") {
        let core = e.dir.path().join("core");
        let (ok, out, err) = sh_as(
            DAEMON_UID,
            &format!("gcore -o {} {pid} 2>&1", core.display()),
        );
        assert!(!ok, "gcore of the daemon succeeded: {out}{err}");
        assert!(
            !std::fs::read_dir(e.dir.path()).unwrap().any(|f| f
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("core")),
            "gcore wrote a core file: {out}"
        );
        eprintln!("gcore as uid {DAEMON_UID} refused: {}", out.trim());
    } else {
        eprintln!("gcore (gdb) missing: the ptrace check is covered by /proc/PID/mem only");
    }
    eprintln!(
        "daemon pid {pid}: Uid {uids}; /proc/{pid}/status owned by root:root; same-uid reads \
         of environ and mem refused"
    );
}

/// Mounts a private /proc with hidepid=invisible for the daemon (what `ProtectProc=invisible`
/// does): it then sees no process of another uid. None where mount namespaces are not allowed.
fn hidden_proc_wrapper() -> Option<Vec<&'static str>> {
    let probe = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg("mount -t proc -o hidepid=invisible proc /proc")
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        return None;
    }
    Some(vec![
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount -t proc -o hidepid=invisible proc /proc && exec \"$0\" \"$@\"",
    ])
}

#[test]
fn control_group_members_by_supplementary_group_are_admitted_without_proc() {
    if !can_switch_uids("control_group_members_by_supplementary_group_are_admitted_without_proc") {
        return;
    }
    let wrapper = hidden_proc_wrapper();
    if wrapper.is_none() {
        eprintln!("no mount namespace for hidepid=invisible: the daemon sees /proc as usual");
    }
    // In the group itself, so that it may hand the socket to the group without CAP_CHOWN.
    let e = unprivileged_daemon(
        wrapper.as_deref().unwrap_or_default(),
        &[CONTROL_GID],
        Some(CONTROL_GID),
    );
    let pid = e.pid();
    if wrapper.is_some() {
        // The daemon's view of /proc: no process of another uid (it holds for the CLI below).
        let ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
        assert_ne!(ns, std::fs::read_link("/proc/self/ns/mnt").unwrap());
    }
    let sock = e.dir.path().join("c.sock");
    let m = std::fs::metadata(&sock).unwrap();
    assert_eq!((m.gid(), m.mode() & 0o777), (CONTROL_GID, 0o660));
    let list = |uid: u32, gid: u32, groups: &[u32]| {
        e.cli_via(&as_user(uid, gid, groups), &["volume", "list", "--json"])
    };
    let ok = |o: std::process::Output, who: &str| {
        assert!(
            o.status.success(),
            "{who} refused: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    ok(
        list(CALLER_UID, CALLER_UID, &[7, CONTROL_GID]),
        "supplementary member",
    );
    ok(list(CALLER_UID, CONTROL_GID, &[]), "primary member");
    ok(list(DAEMON_UID, DAEMON_UID, &[]), "the daemon's uid");

    // Not a member: the socket's mode refuses the connection ...
    let o = list(CALLER_UID, CALLER_UID, &[7]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("Permission denied") && err.trim_end().lines().count() == 1,
        "{err}"
    );
    // ... and with the socket opened to all, the daemon's own check does, naming the uid.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = list(CALLER_UID, CALLER_UID, &[7]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("uid {CALLER_UID} may not use the control socket"))
            && err.trim_end().lines().count() == 1,
        "{err}"
    );
    ok(
        list(CALLER_UID, CALLER_UID, &[CONTROL_GID]),
        "supplementary member, socket 0666",
    );
}
