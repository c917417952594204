//! A throwaway one-node Ceph cluster per test (`tests/ceph/micro-ceph.sh`): one monitor, one
//! memstore OSD, pool `rbd`, cephx users [`CLIENT_A`] and [`CLIENT_B`] (one per "host").
//! Stopped and removed on drop. Without `ceph-mon` installed, [`MicroCeph::start`] prints a
//! SKIP line and returns `None`, unless `CRYPTVOL_REQUIRE_CEPH=1` (CI), where it panics.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use cryptvol::volume::rbd::{Cluster, ClusterConfig};

pub const CLIENT_A: &str = "cryptvol-a";
pub const CLIENT_B: &str = "cryptvol-b";
pub const POOL: &str = "rbd";

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ceph/micro-ceph.sh");

pub struct MicroCeph {
    dir: tempfile::TempDir,
    conf: PathBuf,
    running: bool,
}

fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

impl MicroCeph {
    /// Starts a cluster under a new temp dir, or `None` (skip) when Ceph is not installed.
    pub fn start(test: &str) -> Option<MicroCeph> {
        let missing: Vec<&str> = ["ceph-mon", "ceph-osd", "rbd"]
            .into_iter()
            .filter(|t| !have(t))
            .collect();
        if !missing.is_empty() {
            let msg = format!(
                "SKIP {test}: {} not installed (apt-get install ceph-mon ceph-osd ceph-common)",
                missing.join(", ")
            );
            if std::env::var("CRYPTVOL_REQUIRE_CEPH").as_deref() == Ok("1") {
                panic!("CRYPTVOL_REQUIRE_CEPH=1 but {msg}");
            }
            eprintln!("{msg}");
            return None;
        }
        // Under /tmp: the monitor's admin socket path must stay short (108 bytes).
        let dir = tempfile::Builder::new()
            .prefix("cv-ceph.")
            .tempdir_in("/tmp")
            .unwrap();
        let out = Command::new("bash")
            .arg(SCRIPT)
            .arg("start")
            .arg(dir.path())
            .env_remove("CEPH_ARGS")
            .env_remove("CEPH_CONF")
            .output()
            .expect("run micro-ceph.sh");
        let mc = MicroCeph {
            conf: dir.path().join("ceph.conf"),
            dir,
            running: true,
        };
        assert!(
            out.status.success(),
            "micro-ceph start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(mc)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn conf(&self) -> &Path {
        &self.conf
    }

    pub fn keyring(&self, client: &str) -> PathBuf {
        self.dir.path().join(format!("client.{client}.keyring"))
    }

    /// A config for `client` with short timeouts (tests wait at most this long on failures).
    pub fn config(&self, client: &str, op_timeout: Duration) -> ClusterConfig {
        let mut c = ClusterConfig::new(&self.conf, client);
        c.keyring = Some(self.keyring(client));
        c.op_timeout = op_timeout;
        c.mount_timeout = Duration::from_secs(10);
        c
    }

    /// A connected session as `client` (30 s operation timeout).
    pub fn connect(&self, client: &str) -> Cluster {
        Cluster::connect(&self.config(client, Duration::from_secs(30))).expect("connect")
    }

    /// Runs the `rbd` CLI as `client` against this cluster.
    pub fn rbd(&self, client: &str, args: &[&str]) -> Output {
        Command::new("rbd")
            .arg("--conf")
            .arg(&self.conf)
            .args(["--id", client, "--pool", POOL])
            .args(args)
            .env_remove("CEPH_ARGS")
            .output()
            .expect("run rbd")
    }

    /// The pids of this cluster's live daemons (monitor and OSD), from the pid files under
    /// `run/`, each checked to be a process started with this cluster's conf (pids get reused).
    pub fn daemon_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        let Ok(dir) = std::fs::read_dir(self.dir.path().join("run")) else {
            return pids;
        };
        let conf = self.conf.to_string_lossy().into_owned();
        for e in dir.flatten() {
            if e.path().extension().is_none_or(|x| x != "pid") {
                continue;
            }
            let Some(pid) = std::fs::read_to_string(e.path())
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&conf) {
                pids.push(pid);
            }
        }
        pids.sort();
        pids
    }

    fn signal_all(&self, sig: &str) {
        let pids = self.daemon_pids();
        assert_eq!(pids.len(), 2, "one monitor and one OSD running: {pids:?}");
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .args(pids.iter().map(u32::to_string))
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{sig} {pids:?}");
    }

    /// Freezes the cluster (SIGSTOP to the monitor and the OSD): every request to it waits,
    /// as in a network partition, and nothing is lost (a memstore OSD restarted would be empty).
    pub fn freeze(&self) {
        self.signal_all("STOP");
    }

    /// Lets a frozen cluster run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal_all("CONT");
    }

    /// Kills the daemons (the directory stays until drop): the cluster is gone.
    pub fn stop(&mut self) {
        if self.running {
            self.running = false;
            let _ = Command::new("bash")
                .arg(SCRIPT)
                .arg("stop")
                .arg(self.dir.path())
                .env("KEEP", "1")
                .status();
        }
    }
}

impl Drop for MicroCeph {
    fn drop(&mut self) {
        self.stop();
    }
}
