//! A throttled plain connection's thread runs at a low CPU priority (server/demote.rs), seen
//! from outside the daemon in /proc: it is demoted once its volume makes it wait, a connection
//! of an unlimited volume beside it never is, and it gets its priority back once the limit is
//! lifted (as root: an unprivileged daemon needs RLIMIT_NICE for that). Large requests of a
//! throttled connection are served on that thread instead of the pool: they still come back
//! intact, and the limit still holds.

mod common;
mod support;

use std::time::{Duration, Instant};

use common::{Env, bench, is_root};

/// The nice values of the daemon's connection threads (`nbd-conn`), by thread id.
fn conn_nices(pid: u32) -> Vec<(u32, i64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        // pid (comm) state ppid ...: nice is field 19, the 17th after the comm.
        let (head, rest) = stat.rsplit_once(") ").unwrap();
        if !head.ends_with("(nbd-conn") {
            continue;
        }
        let nice: i64 = rest.split_whitespace().nth(16).unwrap().parse().unwrap();
        let tid = e.file_name().to_string_lossy().parse().unwrap();
        out.push((tid, nice));
    }
    out.sort();
    out
}

/// Waits (bounded) until the connection threads' nice values, oldest first, are `want`; while
/// waiting, `poke` runs (requests: the demotion and its end happen on the request path).
fn wait_nices(pid: u32, want: &[i64], mut poke: impl FnMut()) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now: Vec<i64> = conn_nices(pid).into_iter().map(|(_, n)| n).collect();
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "connection threads' nice values {now:?}, want {want:?}"
        );
        poke();
    }
}

fn env_with(volumes: &[(&str, &[&str])]) -> Env {
    let mut env = Env::new();
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    for (name, qos) in volumes {
        let mut args = vec!["volume", "create", name, "--size", "64M", "--key", "k"];
        args.extend_from_slice(qos);
        env.json(&args);
        env.json(&["volume", "attach", name]);
    }
    env
}

fn conn(env: &Env, export: &str) -> support::Conn {
    let mut c = support::Conn::connect(&env.nbd_socket());
    c.go(export, false, false);
    c
}

#[test]
fn a_throttled_connection_runs_at_low_priority_until_its_limit_is_lifted() {
    let env = env_with(&[("free", &[]), ("busy", &["--iops", "200"])]);
    let pid = env.pid();
    let mut free = conn(&env, "free");
    let mut cookie = 0u64;
    let mut read = |c: &mut support::Conn| {
        cookie += 1;
        c.read_simple(cookie, 4096 * (cookie % 64), 4096)
            .expect("read");
    };
    read(&mut free);
    assert_eq!(conn_nices(pid).len(), 1);
    let mut busy = conn(&env, "busy");
    // The burst (100 ms worth: 20 requests) goes at once; the requests after it wait.
    for _ in 0..25 {
        read(&mut busy);
    }
    wait_nices(pid, &[0, 19], || read(&mut busy));
    // The unlimited volume's connection serves as before, at its priority.
    for _ in 0..100 {
        read(&mut free);
    }
    assert_eq!(conn_nices(pid)[0].1, 0);

    env.json(&["volume", "set", "busy", "--iops", "0"]);
    if is_root() {
        // No wait for HOLD (200 ms): restored.
        wait_nices(pid, &[0, 0], || {
            read(&mut busy);
            std::thread::sleep(Duration::from_millis(20));
        });
    } else {
        eprintln!("not root: the demoted thread may stay demoted (no RLIMIT_NICE)");
    }
    // Throttled again after a change back: demoted again.
    env.json(&["volume", "set", "busy", "--iops", "200"]);
    for _ in 0..25 {
        read(&mut busy);
    }
    wait_nices(pid, &[0, 19], || read(&mut busy));
}

#[test]
fn large_requests_of_a_throttled_connection_verify_and_keep_the_limit() {
    let env = env_with(&[("bw", &["--bandwidth", "8M"])]);
    // 1 MiB writes, 4 in flight, over the limit (the burst is 0.8 MiB): every one after the
    // first waits, on a demoted thread that then encrypts and stores it itself. --verify
    // writes a pattern and reads every block back at the end.
    let r = bench(
        &env.uri("bw"),
        "--rw randwrite --bs 1M --iodepth 4 --ramp 1s --time 3s --verify",
    );
    let mib_s = r["total"]["mib_s"].as_f64().unwrap();
    eprintln!("1 MiB writes at a limit of 8 MiB/s: {mib_s:.2} MiB/s");
    let verify = &r["verify"];
    assert!(verify["verified_blocks"].as_u64() > Some(0), "{r}");
    assert_eq!(verify["mismatches"], 0, "{r}");
    assert!(mib_s <= 8.0 * 1.05, "{mib_s} MiB/s over the limit of 8");
    assert!(mib_s >= 4.0, "{mib_s} MiB/s far under the limit of 8");
}
