//! Shared harness for tests that drive the real daemon binary: a short temp dir (Unix socket
//! paths must stay under 108 bytes), `cryptvol init`, a config, `serve` in the background
//! (killed on drop), readiness by polling the control socket, and a CLI runner.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_cryptvol");

pub struct Env {
    pub dir: tempfile::TempDir,
    pub cfg: PathBuf,
    pub state: PathBuf,
    pub daemon: Option<Child>,
}

impl Env {
    /// A fresh state dir and config (min_pending_days = 0 so tests reach the end of a window).
    pub fn new() -> Env {
        Env::with_config(|_| String::new())
    }

    /// Like [`Env::new`], with more TOML merged into the config: `extra` gets the temp dir
    /// (for certificate paths and the like) and returns TOML whose tables are merged key by
    /// key into the base config, so `[nbd]\ntcp = ...` adds to the base's `[nbd]`.
    pub fn with_config(extra: impl FnOnce(&Path) -> String) -> Env {
        Env::with_config_in(Path::new("/tmp"), extra)
    }

    /// Like [`Env::with_config`], with the temp dir (state dir, volumes) under `base`: for
    /// tests that need a particular file system (direct I/O, tmpfs).
    pub fn with_config_in(base: &Path, extra: impl FnOnce(&Path) -> String) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("cv")
            .tempdir_in(base)
            .unwrap();
        let state = dir.path().join("s");
        let o = Command::new(BIN)
            .args(["init", "--state-dir"])
            .arg(&state)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "init: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let cfg = dir.path().join("c.toml");
        let base = format!(
            "state_dir = \"{}\"\n[control]\nsocket = \"{d}/c.sock\"\n[nbd]\nunix_socket = \"{d}/n.sock\"\n[kms]\nmin_pending_days = 0\n",
            state.display(),
            d = dir.path().display()
        );
        let mut table: toml::Table = base.parse().unwrap();
        let extra: toml::Table = extra(dir.path())
            .parse()
            .unwrap_or_else(|e| panic!("extra config: {e}"));
        merge(&mut table, extra);
        std::fs::write(&cfg, toml::to_string(&table).unwrap()).unwrap();
        Env {
            dir,
            cfg,
            state,
            daemon: None,
        }
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.dir.path().join("n.sock")
    }

    pub fn uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.nbd_socket().display()
        )
    }

    /// Starts `cryptvol serve` and waits until the control socket answers. The daemon's
    /// stderr goes to `daemon.log` in the temp dir, appended across restarts.
    pub fn start(&mut self) {
        self.start_via(&[]);
    }

    /// SIGTERM, and the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.daemon.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        c.wait().unwrap()
    }

    /// SIGKILL (a crash: no shutdown path runs), and wait for it.
    pub fn kill(&mut self) {
        let mut c = self.daemon.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--config")
            .arg(&self.cfg)
            .args(args)
            .output()
            .unwrap()
    }

    /// Creates volume `name` of `size` (CLI syntax, e.g. "8M") under the key alias `k`, which
    /// the test made, and attaches it.
    pub fn attach_new(&self, name: &str, size: &str) {
        self.json(&["volume", "create", name, "--size", size, "--key", "k"]);
        self.json(&["volume", "attach", name]);
    }

    /// Runs a CLI command that must succeed; returns its `--json` document.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let o = self.cli(&a);
        assert!(
            o.status.success(),
            "cryptvol {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?}: not JSON ({e}): {}",
                String::from_utf8_lossy(&o.stdout)
            )
        })
    }

    /// Runs a CLI command that must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            !o.status.success(),
            "cryptvol {args:?} should fail: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(
            e.trim_end().lines().count(),
            1,
            "one-line error expected: {e}"
        );
        e
    }

    pub fn volume_path(&self, name: &str) -> PathBuf {
        self.state.join("volumes").join(format!("{name}.cvol"))
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Merges `extra` into `base`: tables recursively, any other value replaced.
fn merge(base: &mut toml::Table, extra: toml::Table) {
    for (k, v) in extra {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => merge(b, e),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// qemu-io against an export. A pattern mismatch (`read -P`) exits 0 in qemu-io, so it is
/// turned into a failed status here.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let mut o = c.arg(uri).output().unwrap();
    if String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed") {
        use std::os::unix::process::ExitStatusExt;
        o.status = std::process::ExitStatus::from_raw(1 << 8);
    }
    o
}

pub fn file_blocks(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks()
}

// Daemons under another uid, config edits and /proc figures (privilege and memory tests).

/// Whether the tests run as root: only then can they start processes under other uids.
pub fn is_root() -> bool {
    proc_status("self", "Uid:").is_some_and(|v| v.split_whitespace().next() == Some("0"))
}

/// The value of one `/proc/PID/status` line (`key` with its colon, e.g. `"VmHWM:"`), trimmed.
pub fn proc_status(pid: &str, key: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_owned())
}

/// A `/proc/PID/status` figure in KiB (`VmRSS:`, `VmHWM:`).
pub fn proc_kib(pid: u32, key: &str) -> u64 {
    proc_status(&pid.to_string(), key)
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// `setpriv` arguments that run a command as `uid:gid` with exactly the supplementary
/// `groups` and no capabilities (setpriv execs, so the pid stays the command's).
pub fn as_user(uid: u32, gid: u32, groups: &[u32]) -> Vec<String> {
    let mut v = vec![
        "setpriv".to_owned(),
        format!("--reuid={uid}"),
        format!("--regid={gid}"),
    ];
    if groups.is_empty() {
        v.push("--clear-groups".into());
    } else {
        let g: Vec<String> = groups.iter().map(u32::to_string).collect();
        v.push(format!("--groups={}", g.join(",")));
    }
    v
}

impl Env {
    /// Hands the test dir (state dir, sockets, log) to `uid:gid`, and lets other users reach
    /// its sockets (the dir becomes 0755; the state dir stays 0700).
    pub fn give_to(&self, uid: u32, gid: u32) {
        let o = Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{gid}"))
            .arg(self.dir.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "chown: {o:?}");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// Like [`Env::start`], with the daemon run by `wrapper` (e.g. [`as_user`]), which must
    /// exec it so that the child's pid is the daemon's.
    pub fn start_via(&mut self, wrapper: &[String]) {
        assert!(self.daemon.is_none(), "daemon already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let child = cmd
            .args(["serve", "--config"])
            .arg(&self.cfg)
            .stderr(log)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.cli(&["volume", "list"]).status.success() {
            if let Some(st) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited with {st}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not answer: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Runs `serve` through `wrapper` expecting it to refuse to start (within 30 s);
    /// returns its stderr. `what` names the bad setting in the panic if it starts.
    pub fn refused_via(&self, wrapper: &[String], what: &str) -> String {
        let mut cmd = match wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let mut child = cmd
            .args(["serve", "--config"])
            .arg(&self.cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("daemon started despite {what}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!st.success());
        stderr_of(&mut child)
    }

    /// `key create --alias alias`; returns the key id.
    pub fn key(&self, alias: &str) -> String {
        self.json(&["key", "create", "--alias", alias])["key_info"]["key_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The running daemon's pid.
    pub fn pid(&self) -> u32 {
        self.daemon.as_ref().expect("running").id()
    }

    /// A CLI command run through `wrapper` (e.g. [`as_user`]).
    pub fn cli_via(&self, wrapper: &[String], args: &[&str]) -> Output {
        Command::new(&wrapper[0])
            .args(&wrapper[1..])
            .arg(BIN)
            .arg("--config")
            .arg(&self.cfg)
            .args(args)
            .output()
            .unwrap()
    }
}

/// What an exited child wrote to its piped stderr.
pub fn stderr_of(child: &mut Child) -> String {
    use std::io::Read;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).unwrap();
    }
    err
}

/// Whether every tool in `tools` is installed; prints why `test` skips when one is not.
pub fn tools_present(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    if missing.is_empty() {
        return true;
    }
    eprintln!("SKIP {test}: {} not installed", missing.join(", "));
    false
}

/// `qemu-io` on `uri` running `cmd`, which must succeed.
pub fn ok_io(uri: &str, cmd: &str) {
    let o = qemu_io(uri, &[cmd]);
    assert!(
        o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("fail"),
        "qemu-io {cmd}: {} {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The test PKI (openssl CLI) for the TLS tests.
pub mod pki;

/// SoftHSM2 tokens for the PKCS#11 custody tests.
pub mod hsm;

/// One HTTP/1.1 request on a control socket (`Connection: close`); the whole raw answer,
/// status line and headers included. For tests that send what the CLI would not.
pub fn control_request(sock: &Path, method: &str, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A child process, killed and reaped when dropped (a test that fails never leaves it).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Python that runs the python3-libnbd scripts: `CRYPTVOL_PYTHON`, else the system one.
pub fn python() -> String {
    std::env::var("CRYPTVOL_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into())
}

/// [`python`] if it has libnbd's binding; else `None` and a SKIP line.
pub fn python_nbd() -> Option<String> {
    let py = python();
    if Command::new(&py)
        .args(["-c", "import nbd"])
        .status()
        .is_ok_and(|s| s.success())
    {
        Some(py)
    } else {
        eprintln!("SKIP: {py} has no libnbd binding (python3-libnbd)");
        None
    }
}

/// `cryptvol bench --json URI ARGS` (split on white space), its output piped.
pub fn bench_cmd(uri: &str, args: &str) -> Command {
    let mut c = Command::new(BIN);
    c.args(["bench", "--json", uri])
        .args(args.split_whitespace())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Runs `cryptvol bench --json URI ARGS`, which must succeed; its report.
pub fn bench(uri: &str, args: &str) -> serde_json::Value {
    let o = bench_cmd(uri, args).output().unwrap();
    let doc = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "bench {args}: {}\n{doc}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_str(&doc).unwrap_or_else(|e| panic!("bench --json: {e}: {doc}"))
}
