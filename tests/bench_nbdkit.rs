//! `cryptvol bench` against a reference server (`nbdkit memory`) over a Unix socket: the client
//! codec and the load generator, independent of our own server. Skipped when nbdkit is absent.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use cryptvol::bench::{BenchArgs, BenchError, measure, run};

#[derive(Parser)]
struct Cmd {
    #[command(flatten)]
    args: BenchArgs,
}

fn args(argv: &[&str]) -> BenchArgs {
    Cmd::parse_from(std::iter::once("bench").chain(argv.iter().copied())).args
}

/// An `nbdkit` child serving `plugin_args` on a temporary Unix socket; killed on drop.
struct Nbdkit {
    child: Child,
    _dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Nbdkit {
    fn start(extra: &[&str]) -> Option<Nbdkit> {
        if Command::new("nbdkit").arg("--version").output().is_err() {
            eprintln!("skipped: nbdkit is not installed");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let child = Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&sock)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null()) // injected errors and probe connections are noisy
            .spawn()
            .expect("spawn nbdkit");
        wait_for_socket(&sock);
        Some(Nbdkit {
            child,
            _dir: dir,
            sock,
        })
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Readiness = the socket accepts a connection.
fn wait_for_socket(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "nbdkit did not listen on {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sequential_read_moves_exactly_the_size() {
    let Some(k) = Nbdkit::start(&["memory", "16M"]) else {
        return;
    };
    let r = measure(
        &args(&[&k.uri(), "--rw", "read", "--bs", "64K", "--iodepth", "4"]),
        false,
    )
    .unwrap();
    let read = r.read.expect("reads");
    assert_eq!((read.ops, read.bytes), (256, 16 << 20));
    assert!(r.write.is_none());
    assert_eq!(r.errors, 0);
    assert!(read.lat_us.p50 <= read.lat_us.p99 && read.lat_us.p99 <= read.lat_us.p99_9);
}

#[test]
fn verified_random_writes_over_two_connections() {
    let Some(k) = Nbdkit::start(&["memory", "8M"]) else {
        return;
    };
    let a = args(&[
        &k.uri(),
        "--rw",
        "randwrite",
        "--bs",
        "4K",
        "--iodepth",
        "8",
        "--connections",
        "2",
        "--size",
        "4M",
        "--verify",
    ]);
    let r = measure(&a, false).unwrap();
    assert_eq!(r.write.as_ref().unwrap().ops, 1024);
    let v = r.verify.unwrap();
    assert_eq!(v.mismatches, 0, "{:?}", v.first_mismatches);
    // Every distinct block written was read back in the final pass.
    assert!(v.verified_blocks > 0 && v.verified_blocks <= 1024);
}

#[test]
fn verified_mixed_checks_reads_during_the_run() {
    let Some(k) = Nbdkit::start(&["memory", "1M"]) else {
        return;
    };
    let a = args(&[
        &k.uri(),
        "--rw",
        "mixed",
        "--rwmix-read",
        "50",
        "--bs",
        "4K",
        "--iodepth",
        "4",
    ]);
    let a = BenchArgs {
        size: Some(8 << 20),
        verify: true,
        ..a
    };
    let r = measure(&a, false).unwrap();
    let v = r.verify.unwrap();
    assert_eq!(v.mismatches, 0, "{:?}", v.first_mismatches);
    // 256 blocks and 2048 ops: most reads hit blocks written earlier in the run.
    assert!(v.verified_blocks > 500, "{v:?}");
}

#[test]
fn verify_catches_data_that_is_not_what_was_written() {
    // The `null` plugin accepts writes and reads back zeros: every read-back must mismatch.
    let Some(k) = Nbdkit::start(&["null", "1M"]) else {
        return;
    };
    let a = args(&[
        &k.uri(),
        "--rw",
        "write",
        "--bs",
        "4K",
        "--iodepth",
        "2",
        "--verify",
    ]);
    let r = measure(&a, false).unwrap();
    let v = r.verify.as_ref().unwrap();
    assert_eq!((v.verified_blocks, v.mismatches), (0, 256));
    assert_eq!(v.first_mismatches.len(), 5);
    assert!(matches!(
        run(a, true),
        Err(BenchError::Failed {
            mismatches: 256,
            ..
        })
    ));
}

#[test]
fn error_replies_are_counted_and_fail_the_run() {
    let Some(k) = Nbdkit::start(&[
        "--filter=error",
        "memory",
        "1M",
        "error-rate=20%",
        "error=EIO",
    ]) else {
        return;
    };
    let a = args(&[&k.uri(), "--rw", "randread", "--bs", "4K", "--size", "1M"]);
    let r = measure(&a, false).unwrap();
    assert!(
        r.errors > 10 && r.errors < 200,
        "{} errors of 256",
        r.errors
    );
    assert!(matches!(run(a, false), Err(BenchError::Failed { .. })));
}

#[test]
fn time_bound_and_bad_arguments() {
    let Some(k) = Nbdkit::start(&["memory", "4M"]) else {
        return;
    };
    let r = measure(
        &args(&[&k.uri(), "--rw", "randread", "--time", "300ms"]),
        false,
    )
    .unwrap();
    assert!(r.elapsed_s >= 0.29 && r.elapsed_s < 2.0, "{}", r.elapsed_s);
    assert!(r.read.unwrap().ops > 0);
    // The ramp runs first and is not measured.
    let a = args(&[
        &k.uri(),
        "--rw",
        "randread",
        "--time",
        "300ms",
        "--ramp",
        "300ms",
    ]);
    let t0 = Instant::now();
    let r = measure(&a, false).unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(600));
    assert!(r.elapsed_s >= 0.29 && r.elapsed_s < 2.0, "{}", r.elapsed_s);
    // More blocks than the export has per connection with --verify.
    let a = args(&[
        &k.uri(),
        "--rw",
        "write",
        "--bs",
        "1M",
        "--connections",
        "4",
        "--verify",
    ]);
    assert!(matches!(measure(&a, false), Err(BenchError::Args(_))));
    let a = args(&["nbd+unix:///?socket=/nonexistent/sock"]);
    assert!(matches!(measure(&a, false), Err(BenchError::Connect(_))));
}
