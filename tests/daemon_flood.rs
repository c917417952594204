//! A caller who may use the control socket and the NBD socket floods both with connections
//! it never finishes, against a daemon whose descriptor limit is low (prlimit): half-sent
//! HTTP requests, complete requests followed by silence on a kept-alive connection, and NBD
//! connections that never answer the greeting. Before, the control connections were held
//! forever, the control accept loop spun on EMFILE writing a log line each time, and the
//! daemon stopped answering. Now: an established NBD session is served throughout, and once
//! the header and handshake timeouts have run (2 s here) the health endpoint (curl) and a new
//! NBD client (nbdinfo) are answered, the log stays a few lines, the daemon lives.

mod common;
mod support;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::Command;

use common::{Env, have};
use support::Conn;

/// The daemon's descriptor limit: below what either cap (64 control connections, 64 NBD
/// handshakes) and the daemon's own files need, so both accept loops hit EMFILE.
const NOFILE: u32 = 64;
/// Connections of each kind the flood holds open.
const STALLED: usize = 250;
/// Hang guards for the clients (not measurements): far above the expected few seconds.
const CLIENT_LIMIT_SECS: &str = "60";

#[test]
fn stalled_control_and_nbd_connections_do_not_take_the_daemon_down() {
    for t in ["prlimit", "curl", "nbdinfo", "timeout"] {
        if !have(t) {
            eprintln!("SKIP: {t} missing");
            return;
        }
    }
    let mut env = Env::with_config(|_| {
        "[control]\nheader_timeout_secs = 2\n[nbd]\nhandshake_timeout_secs = 2\n".into()
    });
    let nofile = format!("--nofile={NOFILE}:{NOFILE}");
    env.start_via(&["prlimit".into(), nofile, "--".into()]);
    env.json(&["key", "create", "--alias", "k"]);
    env.attach_new("v", "8M");
    let control = env.dir.path().join("c.sock");
    let log_before = env.log().lines().count();

    // A session established before the flood.
    let mut established = Conn::connect(&env.nbd_socket());
    established.go("v", false, false);
    assert_eq!(established.write_simple(1, 0, &[0x5a; 4096]), 0);

    let flood_start = std::time::Instant::now();
    // The flood. Connecting never waits for the daemon: the kernel queues up to the listen
    // backlog (1024 with tokio) without an accept().
    let mut held = Vec::with_capacity(2 * STALLED);
    for i in 0..STALLED {
        let mut s = UnixStream::connect(&control).expect("connect control");
        let req: &[u8] = if i % 2 == 0 {
            // Complete, then silent on the kept-alive connection.
            b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
        } else {
            b"GET /v1/health HTTP/1.1\r\nHost: x\r\n"
        };
        s.write_all(req).unwrap();
        held.push(s);
        held.push(UnixStream::connect(env.nbd_socket()).expect("connect nbd"));
    }

    // The established session is served while the flood is held.
    for cookie in 2..10 {
        let data = established.read_simple(cookie, 0, 4096).expect("read");
        assert!(data.iter().all(|&b| b == 0x5a));
    }

    // A control call and a new NBD client, each answered once stalled connections ahead of
    // them have timed out.
    let health = Command::new("curl")
        .args(["-sS", "--max-time", CLIENT_LIMIT_SECS, "--unix-socket"])
        .arg(&control)
        .arg("http://x/v1/health")
        .output()
        .unwrap();
    assert!(
        health.status.success(),
        "health during the flood: {}\n{}",
        String::from_utf8_lossy(&health.stderr),
        tail(&env.log())
    );
    assert_eq!(
        String::from_utf8_lossy(&health.stdout),
        "{\"status\":\"ok\"}"
    );
    let size = Command::new("timeout")
        .args([CLIENT_LIMIT_SECS, "nbdinfo", "--size", &env.uri("v")])
        .output()
        .unwrap();
    assert!(
        size.status.success(),
        "new NBD client during the flood: {}",
        String::from_utf8_lossy(&size.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&size.stdout).trim(), "8388608");
    assert!(env.cli(&["volume", "list"]).status.success());

    // Alive, and the log holds a few rate-limited lines, not one per failed accept.
    assert!(
        env.daemon.as_mut().unwrap().try_wait().unwrap().is_none(),
        "daemon died: {}",
        tail(&env.log())
    );
    let log = env.log();
    let added = log.lines().count() - log_before;
    let secs = flood_start.elapsed().as_secs() + 1;
    eprintln!("{added} log lines during the {secs} s of the flood");
    // At most one line per second per accept loop (two), and a few others.
    assert!(
        added as u64 <= 2 * secs + 10,
        "{added} log lines in {secs} s of the flood: {}",
        tail(&log)
    );
    // The limit was reached in both accept loops (otherwise this test tests nothing) and
    // reported.
    for listener in ["control", "nbd"] {
        assert!(
            log.lines().any(|l| l.contains("accept failed")
                && l.contains(&format!("listener=\"{listener}\""))
                && l.contains("os error 24")),
            "EMFILE never reached on {listener}: {}",
            tail(&log)
        );
    }
    drop(held);
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
