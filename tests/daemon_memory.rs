//! Peak memory of the real daemon process (VmHWM of `cryptvol serve`, not of the test) under
//! hostile load: 1000 idle NBD connections, then clients that pipeline large READs and never
//! read a reply and clients that stop halfway through a WRITE payload. The daemon must stay
//! under a stated bound, keep serving a normal client throughout, and give the memory back
//! once the hostile clients are gone. The figures are printed for the notes.

mod common;
mod support;

use std::time::{Duration, Instant};

use common::{Env, proc_kib};
use support::{CMD_READ, CMD_WRITE, Conn, MIB};

/// Idle connections (all in the transmission phase, each having done one small READ).
const IDLE: usize = 1000;
/// Clients that pipeline READS x 32 MiB and never read a reply.
const NON_READING: usize = 4;
const READS: u64 = 8;
/// Clients that send a 32 MiB WRITE header, half its payload, then nothing.
const STALLED: usize = 2;
/// The largest request (the protocol's and the daemon's cap).
const MAX_REQ: u32 = 32 << 20;

/// What one connection may hold, from the server's documented limits: `max_buffer_mib`
/// (64 MiB default) of payload buffered (READ data not yet sent, WRITE payloads being read),
/// plus up to 8 MiB of recycled buffers parked (src/server/bufpool.rs), plus its two 64 KiB
/// stream buffers.
const HOSTILE_BUDGET_KIB: u64 = (64 + 8) * 1024 + 128;
/// What one idle connection may hold: its read buffer (64 KiB) and reply queue (64 KiB), a
/// parked 4 KiB buffer, its thread's touched stack and the socket state, with room for the
/// allocator's rounding (a stated budget, not a measurement: the measured figure is printed;
/// about 97 KiB with a thread per connection, 33 KiB before on the async path).
const IDLE_BUDGET_KIB: u64 = 192;
/// Slack over a measured level for runtime growth (blocking-pool threads, allocator arenas).
/// Less than two maximum-size buffers: memory kept for each hostile connection after it is
/// gone (one 32 MiB buffer each, six connections) would not fit in it.
const SLACK_KIB: u64 = 64 * 1024;

fn raise_nofile(need: u64) -> bool {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid, exclusively borrowed `l`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 || l.rlim_max < need {
        return false;
    }
    l.rlim_cur = l.rlim_cur.max(need);
    // SAFETY: setrlimit reads one rlimit from the valid `l`.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) == 0 }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Bytes the daemon has queued to `c` that `c` has not read (without reading them).
fn queued(c: &Conn) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int into the valid, exclusively borrowed `n`; the socket
    // is open for the duration of the call.
    let r = unsafe { libc::ioctl(c.s.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r == 0 {
        usize::try_from(n).unwrap_or(0)
    } else {
        0
    }
}

/// A normal client round trip on a fresh connection.
fn serve_normal(e: &Env, cookie: u64) {
    let mut c = Conn::connect(&e.nbd_socket());
    c.go("v", false, false);
    let data = vec![cookie as u8; 64 << 10];
    assert_eq!(c.write_simple(cookie, 8 * MIB, &data), 0);
    assert_eq!(c.read_simple(cookie + 1, 8 * MIB, 64 << 10).unwrap(), data);
}

#[test]
fn daemon_memory_is_bounded_under_idle_and_non_reading_clients() {
    // The test holds every client socket; the daemon, started from it, inherits the limit.
    let fds = (IDLE + NON_READING + STALLED) as u64 + 256;
    if !raise_nofile(fds) {
        eprintln!("SKIP: RLIMIT_NOFILE hard limit below {fds}");
        return;
    }
    let cap = IDLE + NON_READING + STALLED + 16;
    let mut e = Env::with_config(|_| {
        format!("[nbd]\nmax_connections = {cap}\nmax_connections_per_export = {cap}\n")
    });
    e.start();
    e.json(&["key", "create", "--alias", "k"]);
    e.attach_new("v", "64M");
    let pid = e.pid();
    // Base: one full-size READ served once, so that the runtime's one-off allocations are in.
    {
        let mut c = Conn::connect(&e.nbd_socket());
        c.go("v", false, false);
        assert_eq!(
            c.read_simple(1, 0, MAX_REQ).unwrap().len(),
            MAX_REQ as usize
        );
    }
    serve_normal(&e, 10);
    let base = proc_kib(pid, "VmRSS:");

    // 1000 idle connections, each past GO with one 4 KiB READ answered (so its session is in
    // the transmission loop with its buffers allocated when we measure).
    let mut idle = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        let mut c = Conn::connect(&e.nbd_socket());
        c.go("v", false, false);
        assert_eq!(c.read_simple(i as u64, 0, 4096).unwrap().len(), 4096);
        idle.push(c);
    }
    serve_normal(&e, 20);
    let idle_rss = proc_kib(pid, "VmRSS:");
    let idle_fds = open_fds(pid);
    let per_idle = (idle_rss.saturating_sub(base) * 1024) / IDLE as u64;
    eprintln!(
        "daemon RSS: base {base} KiB; with {IDLE} idle connections {idle_rss} KiB \
         (+{} KiB, {per_idle} bytes per connection; {idle_fds} fds open)",
        idle_rss.saturating_sub(base)
    );
    let idle_bound = base + IDLE as u64 * IDLE_BUDGET_KIB + SLACK_KIB;
    assert!(
        proc_kib(pid, "VmHWM:") <= idle_bound,
        "peak RSS {} KiB over the bound {idle_bound} KiB with {IDLE} idle connections",
        proc_kib(pid, "VmHWM:")
    );

    // Hostile clients on top.
    let mut readers = Vec::new();
    for i in 0..NON_READING {
        let mut c = Conn::connect(&e.nbd_socket());
        c.go("v", false, false);
        for r in 0..READS {
            c.send_req(0, CMD_READ, r, (i as u64 % 2) * MAX_REQ as u64, MAX_REQ);
        }
        readers.push(c);
    }
    let mut writers = Vec::new();
    for i in 0..STALLED {
        let mut c = Conn::connect(&e.nbd_socket());
        c.go("v", false, false);
        c.send_req(0, CMD_WRITE, 1, (i as u64 % 2) * MAX_REQ as u64, MAX_REQ);
        // Returns once the daemon has read all but a socket buffer of it.
        c.write(&vec![0xa5; MAX_REQ as usize / 2]);
        writers.push(c);
    }
    let bound = idle_bound + (NON_READING + STALLED) as u64 * HOSTILE_BUDGET_KIB;
    // Every non-reading client has had reply data queued to it: the daemon executed its READs
    // up to the budget and its writer is stuck on the full socket.
    let deadline = Instant::now() + Duration::from_secs(20);
    while readers.iter().any(|c| queued(c) == 0) && Instant::now() < deadline {
        assert!(
            proc_kib(pid, "VmHWM:") <= bound,
            "over the bound while loading"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        readers.iter().all(|c| queued(c) > 0),
        "the daemon never answered the non-reading clients"
    );
    // Served meanwhile, on an idle connection and a new one.
    assert_eq!(idle[0].read_simple(1, 0, 4096).unwrap().len(), 4096);
    serve_normal(&e, 30);
    // Memory growth shows over a while (the daemon fills buffers while the writers are stuck):
    // sample until the RSS has not grown by 1 MiB for 20 samples (at most 10 s). A bound on
    // memory, not a timing: if memory kept growing, VmHWM would cross the bound.
    let (mut last, mut still, t) = (0, 0, Instant::now());
    while still < 20 && t.elapsed() < Duration::from_secs(10) {
        let now = proc_kib(pid, "VmRSS:");
        still = if now > last + 1024 { 0 } else { still + 1 };
        last = last.max(now);
        assert!(proc_kib(pid, "VmHWM:") <= bound, "over the bound");
        std::thread::sleep(Duration::from_millis(50));
    }
    let peak = proc_kib(pid, "VmHWM:");
    let loaded = proc_kib(pid, "VmRSS:");
    eprintln!(
        "daemon RSS with {IDLE} idle + {NON_READING} non-reading ({READS} x 32 MiB READs each) \
         + {STALLED} stalled-WRITE clients: {loaded} KiB now, peak (VmHWM) {peak} KiB = \
         +{} KiB over idle (bound {bound} KiB); connections {}",
        peak.saturating_sub(idle_rss),
        IDLE + NON_READING + STALLED
    );
    assert!(
        peak <= bound,
        "peak RSS {peak} KiB over the bound {bound} KiB"
    );

    // The hostile clients go. Their sessions end once the daemon has read what they had
    // queued (a non-reading client's remaining READs are still executed, their replies
    // dropped), and the memory comes back: wait for both (at most 30 s), then check.
    drop(readers);
    drop(writers);
    let back = || open_fds(pid) <= idle_fds && proc_kib(pid, "VmRSS:") <= idle_rss + SLACK_KIB;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !back() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = proc_kib(pid, "VmRSS:");
    eprintln!("daemon RSS after the hostile clients left: {after} KiB (idle level {idle_rss} KiB)");
    assert!(open_fds(pid) <= idle_fds, "hostile sessions did not end");
    assert!(
        after <= idle_rss + SLACK_KIB,
        "RSS {after} KiB did not fall back to the idle level {idle_rss} KiB"
    );
    serve_normal(&e, 40);
    // The idle connections still work.
    for (i, c) in idle.iter_mut().enumerate().step_by(97) {
        assert_eq!(c.read_simple(i as u64, 0, 4096).unwrap().len(), 4096);
    }
}
