//! Real NBD clients against the in-process server: nbdinfo, python3-libnbd, qemu-io, nbdcopy,
//! fio's nbd engine, nbd-client -l, and nbdfuse + loop + ext4 + e2fsck.
//!
//! The server runs on a background tokio runtime inside the test process; the clients are
//! subprocesses (each under coreutils `timeout`, so a hang fails instead of blocking CI).
//! A missing client binary is a SKIP with a reason, except under CI=true where it fails.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cryptvol::server::Backend;
use support::*;

fn backend_bytes(b: &dyn Backend, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    b.read(offset, &mut v).unwrap();
    v
}

fn pseudo_random(n: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(n);
    v
}

#[test]
fn nbdinfo_list_and_json() {
    if !have("nbdinfo") {
        return;
    }
    let (srv, _) = TestServer::start_mem(64 * MIB);
    let list = run_ok(30, &["nbdinfo", "--list", &srv.uri("")]);
    assert!(list.contains("export=\"mem\""), "{list}");
    assert!(list.contains("base:allocation"), "{list}");

    let json = run_ok(30, &["nbdinfo", "--json", &srv.uri("mem")]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("nbdinfo --json parses");
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["structured"], true);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "mem");
    assert_eq!(e["export-size"], 64 * MIB);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["is_read_only"], false);
    for k in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
    ] {
        assert_eq!(e[k], true, "{k}");
    }
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 * MIB);
}

#[test]
fn nbdinfo_map_reports_holes_and_data() {
    if !have("nbdinfo") {
        return;
    }
    let (srv, b) = TestServer::start_mem(MIB);
    b.write(8192, &mut [1u8; 4096], false).unwrap();
    let json = run_ok(30, &["nbdinfo", "--map", "--json", &srv.uri("mem")]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("nbdinfo --map --json");
    let map: Vec<(u64, u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        map,
        [(0, 8192, 3), (8192, 4096, 0), (12288, MIB - 12288, 3)],
        "hole,zero / data / hole,zero"
    );
}

#[test]
fn python_libnbd_structured_and_simple() {
    let py = std::env::var("CRYPTVOL_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    let probe = run(30, &[&py, "-c", "import nbd"]);
    if !probe.status.success() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "python3-libnbd is not importable by {py}"
        );
        eprintln!("SKIP: {py} cannot import nbd (python3-libnbd)");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/libnbd_check.py");
    let size = (64 * MIB).to_string();
    let (srv, _) = TestServer::start_mem(64 * MIB);
    let out = run_ok(60, &[&py, script, &srv.uri("mem"), &size]);
    assert!(out.contains("OK structured"), "{out}");
    let (srv, _) = TestServer::start_mem(64 * MIB);
    let out = run_ok(
        60,
        &[&py, script, &srv.uri("mem"), &size, "--no-structured"],
    );
    assert!(out.contains("OK simple"), "{out}");
}

#[test]
fn qemu_io_write_read_pattern() {
    if !have("qemu-io") {
        return;
    }
    let (srv, b) = TestServer::start_mem(64 * MIB);
    // qemu 10 opens with NBD_OPT_EXTENDED_HEADERS (tests/nbd_extended.rs checks it is used).
    let out = run_ok(
        60,
        &[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -P 0xa5 4097 3000",
            "-c",
            "read -P 0x5a 0 4097",
            "-c",
            "read -P 0xa5 4097 3000",
            "-c",
            "read -P 0 2M 1M",
            "-c",
            "flush",
            &srv.uri("mem"),
        ],
    );
    assert!(!out.contains("fail"), "{out}");
    assert_eq!(out.matches("read ").count(), 3, "{out}");
    let got = backend_bytes(&*b, 0, 8192);
    assert!(got[..4097].iter().all(|x| *x == 0x5a));
    assert!(got[4097..7097].iter().all(|x| *x == 0xa5));
    assert!(got[7097..].iter().all(|x| *x == 0x5a));
}

#[test]
fn nbdcopy_multi_conn_in_and_out() {
    if !have("nbdcopy") {
        return;
    }
    let size = 16 * MIB;
    let (srv, b) = TestServer::start_mem(size);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.img");
    let output = dir.path().join("out.img");
    let mut data = pseudo_random(size as usize, 0x1234_5678);
    data[(4 * MIB) as usize..(6 * MIB) as usize].fill(0); // a zero run for sparse paths
    std::fs::write(&input, &data).unwrap();
    let uri = srv.uri("mem");
    run_ok(
        60,
        &["nbdcopy", "--connections=4", input.to_str().unwrap(), &uri],
    );
    assert!(
        backend_bytes(&*b, 0, size as usize) == data,
        "export differs from the copied file"
    );
    run_ok(
        60,
        &["nbdcopy", "--connections=4", &uri, output.to_str().unwrap()],
    );
    assert!(
        std::fs::read(&output).unwrap() == data,
        "file copied out differs"
    );
}

#[test]
fn fio_nbd_engine_randwrite_verify() {
    if !have("fio") {
        return;
    }
    let (srv, _) = TestServer::start_mem(64 * MIB);
    let uri = format!("--uri={}", srv.uri("mem"));
    let out = run_ok(
        80,
        &[
            "fio",
            "--name=verify",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--size=32m",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_state_save=0",
            "--output-format=json",
        ],
    );
    // fio's nbd engine prints a line before the JSON.
    let json = &out[out.find('{').expect("fio JSON")..];
    let v: serde_json::Value = serde_json::from_str(json).expect("fio JSON parses");
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{json}");
    assert_eq!(job["write"]["io_bytes"], 32 * MIB, "all written");
    assert_eq!(job["read"]["io_bytes"], 32 * MIB, "all verified");
}

#[test]
fn nbd_client_lists_export() {
    if !have("nbd-client") {
        return;
    }
    let (srv, _) = TestServer::start_mem(MIB);
    let out = run_ok(
        30,
        &["nbd-client", "-l", "-unix", srv.sock.to_str().unwrap()],
    );
    assert!(out.lines().any(|l| l.starts_with("mem")), "{out}");
}

/// Undoes every step of the nbdfuse/loop/mount stack that was done, in reverse, even when the
/// test fails half-way.
struct FuseStack {
    fuse_dir: PathBuf,
    nbdfuse: Option<Child>,
    loop_dev: Option<String>,
    mounted: Option<PathBuf>,
}

impl FuseStack {
    fn umount(&mut self) {
        if let Some(m) = self.mounted.take() {
            let ok = Command::new("umount")
                .arg(&m)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&m).status();
            }
        }
    }
}

impl Drop for FuseStack {
    fn drop(&mut self) {
        self.umount();
        if let Some(l) = self.loop_dev.take() {
            let _ = Command::new("losetup").arg("-d").arg(&l).status();
        }
        if let Some(mut c) = self.nbdfuse.take() {
            let ok = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.fuse_dir)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("fusermount3")
                    .arg("-uz")
                    .arg(&self.fuse_dir)
                    .status();
            }
            // Our own child, by its pid.
            if !matches!(c.try_wait(), Ok(Some(_))) {
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn fuse_skip_reason() -> Option<String> {
    for bin in [
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "fusermount3",
        "mount",
    ] {
        if !have(bin) {
            return Some(format!("{bin} is not installed"));
        }
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing".into());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("loop devices and mount need root".into());
    }
    let free = run(10, &["losetup", "-f"]);
    if !free.status.success() {
        return Some(format!(
            "no free loop device: {}",
            String::from_utf8_lossy(&free.stderr).trim()
        ));
    }
    None
}

#[test]
fn nbdfuse_loop_ext4_fsck() {
    if let Some(why) = fuse_skip_reason() {
        eprintln!("SKIP nbdfuse_loop_ext4_fsck: {why}");
        return;
    }
    let (srv, _) = TestServer::start_mem(64 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let fuse_dir = dir.path().join("fuse");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&fuse_dir).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let pidfile = dir.path().join("nbdfuse.pid");
    let disk = fuse_dir.join("disk");

    let mut stack = FuseStack {
        fuse_dir: fuse_dir.clone(),
        nbdfuse: None,
        loop_dev: None,
        mounted: None,
    };
    stack.nbdfuse = Some(
        Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(&disk)
            .arg(srv.uri("mem"))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn nbdfuse"),
    );
    // Ready when nbdfuse writes its pid file (it does so once the mount is up).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read(&pidfile).is_ok_and(|p| !p.is_empty()) {
        if let Ok(Some(st)) = stack.nbdfuse.as_mut().unwrap().try_wait() {
            eprintln!("SKIP nbdfuse_loop_ext4_fsck: nbdfuse exited early ({st})");
            return;
        }
        assert!(Instant::now() < deadline, "nbdfuse not ready in 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 64 * MIB);

    let l = run_ok(30, &["losetup", "-f", "--show", disk.to_str().unwrap()]);
    let l = l.trim().to_owned();
    assert!(l.starts_with("/dev/loop"), "{l}");
    stack.loop_dev = Some(l.clone());

    run_ok(60, &["mkfs.ext4", "-q", "-F", &l]);
    run_ok(30, &["mount", "-t", "ext4", &l, mnt.to_str().unwrap()]);
    stack.mounted = Some(mnt.clone());
    let files: Vec<(String, Vec<u8>)> = (0..8u64)
        .map(|i| {
            let n = 100_000 + i as usize * 333_333; // odd sizes, up to ~2.4 MB
            (format!("f{i}.bin"), pseudo_random(n, i + 1))
        })
        .collect();
    std::fs::create_dir(mnt.join("sub")).unwrap();
    for (name, d) in &files {
        std::fs::write(mnt.join("sub").join(name), d).unwrap();
    }
    run_ok(30, &["sync", "-f", mnt.to_str().unwrap()]);
    stack.umount();

    let fsck = run(60, &["e2fsck", "-fn", &l]);
    assert!(
        fsck.status.success(),
        "e2fsck -fn found problems ({}):\n{}{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );

    // Remount read-only: every file reads back.
    run_ok(
        30,
        &["mount", "-t", "ext4", "-o", "ro", &l, mnt.to_str().unwrap()],
    );
    stack.mounted = Some(mnt.clone());
    for (name, d) in &files {
        assert!(
            std::fs::read(mnt.join("sub").join(name)).unwrap() == *d,
            "{name} differs after remount"
        );
    }
    drop(stack);
}

#[test]
fn tcp_listener_with_libnbd_and_qemu() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let (_srv, addr) = TestServer::start_tcp(16 * MIB);
    let uri = format!("nbd://{addr}/mem");
    let json = run_ok(30, &["nbdinfo", "--json", &uri]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["exports"][0]["export-size"], 16 * MIB);
    let out = run_ok(
        60,
        &[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x3c 1M 64k",
            "-c",
            "read -P 0x3c 1M 64k",
            &uri,
        ],
    );
    assert!(!out.contains("fail"), "{out}");
}
