//! Faults from below: a full filesystem under a volume gives ENOSPC on that request, and the
//! daemon and other volumes keep going; a damaged volume at start is reported failed while the
//! others attach. Plus an injected-fault store under the NBD server.

mod common;

use std::sync::Arc;

use common::{Env, have, qemu_io};
use cryptvol::server::{self, Listener, ServerConfig, StaticRegistry};

#[test]
fn damaged_volume_at_start_is_reported_and_others_attach() {
    let mut e = Env::new();
    e.start();
    e.json(&["key", "create", "--alias", "k"]);
    for v in ["good", "bad"] {
        e.attach_new(v, "8M");
    }
    assert!(e.stop().success());
    let p = e.volume_path("bad");
    let mut b = std::fs::read(&p).unwrap();
    b[100] ^= 1;
    b[4096 + 100] ^= 1;
    std::fs::write(&p, b).unwrap();
    e.start();
    let list = e.json(&["volume", "list"]);
    let vols = list["volumes"].as_array().unwrap();
    let good = vols.iter().find(|v| v["name"] == "good").unwrap();
    let bad = vols.iter().find(|v| v["name"] == "bad").unwrap();
    assert_eq!(good["attached"], true);
    assert_eq!(bad["attached"], false);
    assert!(
        bad["status"].as_str().unwrap().starts_with("failed:"),
        "{bad}"
    );
}

/// A tmpfs too small for the volume's data: writes past its capacity fail with ENOSPC, data
/// written before reads back, and the daemon serves on.
#[test]
fn full_filesystem_gives_enospc_and_loses_nothing() {
    if !have("qemu-io") || mount_unavailable() {
        eprintln!("SKIP: qemu-io or tmpfs mounting unavailable");
        return;
    }
    let mut e = Env::new();
    let vols = e.state.join("volumes");
    std::fs::create_dir_all(&vols).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6M", "tmpfs"])
        .arg(&vols)
        .status()
        .unwrap();
    assert!(st.success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _u = Unmount(vols.clone());
    e.start();
    e.json(&["key", "create", "--alias", "k"]);
    e.attach_new("big", "64M");
    let uri = e.uri("big");
    assert!(
        qemu_io(&uri, &["write -P 0x5a 0 2M", "flush"])
            .status
            .success()
    );
    let o = qemu_io(&uri, &["write -P 0x66 8M 16M"]);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("No space left on device"), "{out}");
    assert!(
        qemu_io(&uri, &["read -P 0x5a 0 2M"]).status.success(),
        "earlier data intact"
    );
    assert_eq!(
        e.json(&["volume", "inspect", "big"])["attached"],
        true,
        "daemon still serving"
    );
}

fn mount_unavailable() -> bool {
    // Root and a mount binary are needed; probe with a throwaway tmpfs.
    let d = tempfile::tempdir().unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1M", "tmpfs"])
        .arg(d.path())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        let _ = std::process::Command::new("umount").arg(d.path()).status();
    }
    !ok
}

/// The NBD server over a volume whose store fails with EIO after a byte budget: the failing
/// request gets EIO, the connection and the server stay up.
#[test]
fn injected_store_fault_is_an_nbd_error() {
    use cryptvol::daemon::exports::VolumeBackend;
    use cryptvol::volume::{CipherBackend, MemStore, Volume, VolumeHeader, XtsKey};
    let store = Arc::new(MemStore::new());
    let h = VolumeHeader::new(uuid::Uuid::new_v4(), 4 << 20, 4096, "k", 1, vec![1; 90]).unwrap();
    Volume::create_with_store(&store.clone(), &h).unwrap();
    let key: Vec<u8> = (0..64u8).collect();
    let vol = Volume::open_with_store(
        Box::new(store.clone()),
        XtsKey::new(&key).unwrap(),
        false,
        CipherBackend::AwsLc,
    )
    .unwrap();
    let dir = tempfile::Builder::new()
        .prefix("cvf")
        .tempdir_in("/tmp")
        .unwrap();
    let sock = dir.path().join("n.sock");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let listener = rt
        .block_on(async { tokio::net::UnixListener::bind(&sock) })
        .unwrap();
    let reg = StaticRegistry::new().with("f", Arc::new(VolumeBackend(vol, None)), false);
    rt.spawn(server::serve(
        vec![Listener::Unix(listener)],
        Arc::new(reg),
        ServerConfig::default(),
        rx,
    ));
    let uri = format!("nbd+unix:///f?socket={}", sock.display());
    assert!(qemu_io(&uri, &["write -P 0x11 0 64k"]).status.success());
    store.fail_after(8192, libc::EIO);
    let o = qemu_io(&uri, &["write -P 0x22 1M 64k"]);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("Input/output error"), "{out}");
    assert!(
        qemu_io(&uri, &["read -P 0x11 0 64k"]).status.success(),
        "server still serves reads"
    );
}
