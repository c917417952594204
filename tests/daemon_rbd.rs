//! RBD volumes through the real daemon, two "hosts" on one throwaway cluster
//! (tests/ceph/micro-ceph.sh): two daemons with their own state dirs and sockets, cephx users
//! cryptvol-a and cryptvol-b, the same root key. These hosts keep the default per-host key
//! store (`[kms] store = "file"`), so host B gets a copy of A's `kms/` made after the key was
//! created on A; tests/kms_rados.rs covers shared key records (`store = "rados"`). Real clients only: the CLI, qemu-io, nbdcopy, `rbd export`, and Python
//! `cryptography` to decrypt what the cluster stores.
#![cfg(feature = "rbd")]

mod ceph_support;
mod common;
#[path = "ceph_support/hosts.rs"]
mod hosts;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ceph_support::{CLIENT_A, CLIENT_B, MicroCeph};
use common::{Env, qemu_io};
use hosts::{nbd_read, ok, volume};

const MIB: usize = 1 << 20;

/// A daemon configured for the cluster as `client` (5 s operation timeout).
fn host(mc: &MicroCeph, client: &str) -> Env {
    hosts::host(mc, client, 5, "")
}

/// Hosts A and B (started), one root key, and key `k` made on A and known to B.
fn two_hosts(mc: &MicroCeph) -> (Env, Env) {
    hosts::two_hosts(mc, 5)
}

/// `rbd export` of volume `name`, data units `first..first+n` decrypted by Python with the
/// DEK (unwrapped by host `h`), as hex.
fn decrypt_export(mc: &MicroCeph, h: &Env, name: &str, first: usize, n: usize) -> Option<Vec<u8>> {
    let py = std::env::var("CRYPTVOL_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    if !Command::new(&py)
        .args(["-c", "import cryptography"])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("SKIP decrypting the export: {py} has no `cryptography`");
        return None;
    }
    let info = h.json(&["volume", "inspect", name]);
    let dek = h.json(&[
        "datakey",
        "decrypt",
        "--cipher-text",
        info["cipher_text"].as_str().unwrap(),
        "--context",
        &format!("volume_id={}", info["volume_id"].as_str().unwrap()),
    ])["data_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let file = mc.dir().join(format!("{name}-{}.raw", std::process::id()));
    let _ = std::fs::remove_file(&file);
    ok(
        &mc.rbd(
            CLIENT_B,
            &[
                "export",
                &format!("cryptvol.{name}"),
                file.to_str().unwrap(),
            ],
        ),
        "rbd export",
    );
    let raw = std::fs::read(&file).unwrap();
    assert_eq!(&raw[..8], b"CRYPTVOL", "the image holds the volume format");
    let s = info["sector_size"].as_u64().unwrap() as usize;
    let script = format!(
        "import sys\nfrom cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes\n\
         key=bytes.fromhex('{dek}'); s={s}; raw=open('{p}','rb').read()[1048576:]\n\
         def dec(i):\n  d=Cipher(algorithms.AES(key), modes.XTS(i.to_bytes(16,'little'))).decryptor()\n  return d.update(raw[i*s:(i+1)*s])+d.finalize()\n\
         sys.stdout.buffer.write(b''.join(dec(i) if any(raw[i*s:(i+1)*s]) else bytes(s) for i in range({first}, {first}+{n})))\n",
        p = file.display()
    );
    let o = Command::new(&py).args(["-c", &script]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let _ = std::fs::remove_file(&file);
    Some(o.stdout)
}

#[test]
fn two_hosts_one_writer_and_only_ciphertext_in_the_cluster() {
    let test = "two_hosts_one_writer_and_only_ciphertext_in_the_cluster";
    if !common::tools_present(test, &["qemu-io", "nbdcopy"]) {
        return;
    }
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    let (a, b) = two_hosts(&mc);

    let info = a.json(&[
        "volume", "create", "v", "--size", "4M", "--key", "k", "--store", "rbd",
    ]);
    assert_eq!(info["store"], "rbd");
    assert_eq!(info["path"], "rbd:rbd/cryptvol.v");
    a.json(&["volume", "attach", "v"]);
    let l = a.json(&["volume", "list"]);
    let v = volume(&l, "v");
    assert!(
        v["holder"].as_str().unwrap().starts_with("cryptvol-a@"),
        "{v}"
    );
    ok(
        &qemu_io(
            &a.uri("v"),
            &["write -P 0xa5 0 1M", "write -P 0x3c 1M 64k", "flush"],
        ),
        "write on A",
    );

    // The cluster holds only ciphertext: the export has no run of the plaintext, and an
    // independent XTS decryption of it gives the data back.
    let file = mc.dir().join("v.raw");
    ok(
        &mc.rbd(CLIENT_B, &["export", "cryptvol.v", file.to_str().unwrap()]),
        "rbd export",
    );
    let raw = std::fs::read(&file).unwrap();
    assert!(
        !raw.windows(64).any(|w| w.iter().all(|&x| x == 0xa5)),
        "plaintext in the cluster"
    );
    if let Some(plain) = decrypt_export(&mc, &a, "v", 0, 272) {
        assert!(plain[..MIB].iter().all(|&x| x == 0xa5));
        assert!(plain[MIB..MIB + 65536].iter().all(|&x| x == 0x3c));
    }

    // Rewrap while attached: the header is rewritten through the attachment's locked session.
    // (No key rotation here: B's copy of the key records would not know the new version.)
    let r = a.json(&["volume", "rewrap", "v"]);
    assert_eq!(
        (&r["attached"], &r["status"]),
        (&true.into(), &"ok".into()),
        "{r}"
    );
    ok(
        &qemu_io(&a.uri("v"), &["read -P 0xa5 0 1M"]),
        "data after rewrap",
    );

    // Host B sees the volume, who holds it, and is refused naming A.
    let l = b.json(&["volume", "list"]);
    let v = volume(&l, "v");
    assert_eq!(v["store"], "rbd");
    assert_eq!(v["attached"], false);
    assert!(v["holder"].as_str().unwrap().contains("cryptvol-a@"), "{v}");
    let e = b.fails(&["volume", "attach", "v"]);
    assert!(e.contains("cryptvol-a@"), "refusal names the holder: {e}");
    // Read-only takes no lock.
    b.json(&["volume", "attach", "v", "--read-only"]);
    let o = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read -P 0xa5 0 1M"])
        .arg(b.uri("v"))
        .output()
        .unwrap();
    let text = ok(&o, "read-only on B");
    assert!(!text.contains("verification failed"), "{text}");
    b.json(&["volume", "detach", "v"]);
    // Delete and resize are refused while A holds it.
    assert!(b.fails(&["volume", "delete", "v"]).contains("cryptvol-a@"));
    assert!(
        b.fails(&["volume", "resize", "v", "--size", "8M"])
            .contains("cryptvol-a@")
    );

    // Detach on A releases the lock; B attaches and reads A's data.
    a.json(&["volume", "detach", "v"]);
    assert!(volume(&b.json(&["volume", "list"]), "v")["holder"].is_null());
    b.json(&["volume", "resize", "v", "--size", "8M"]);
    b.json(&["volume", "rewrap", "v"]);
    let info = b.json(&["volume", "attach", "v"]);
    assert_eq!(info["size"], 8 * MIB as u64);
    ok(
        &qemu_io(
            &b.uri("v"),
            &[
                "read -P 0xa5 0 1M",
                "read -P 0x3c 1M 64k",
                "read -P 0 7M 64k",
            ],
        ),
        "A's data read on B",
    );
    let e = a.fails(&["volume", "attach", "v"]);
    assert!(e.contains("cryptvol-b@"), "{e}");
    // A's registry followed B's header rewrites (resize, rewrap: newer generations).
    assert_eq!(a.json(&["volume", "inspect", "v"])["size"], 8 * MIB as u64);

    // File volumes keep working beside RBD ones.
    let f = a.json(&[
        "volume", "create", "f", "--size", "2M", "--key", "k", "--store", "file",
    ]);
    assert_eq!(f["store"], "file");
    assert!(
        a.fails(&["volume", "create", "v", "--size", "2M", "--key", "k"])
            .contains("exists")
    );
    a.json(&["volume", "attach", "f"]);
    ok(
        &qemu_io(&a.uri("f"), &["write -P 7 0 64k", "read -P 7 0 64k"]),
        "file volume",
    );
    let names: Vec<String> = a.json(&["volume", "list"])["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["f", "v"]);

    // Import into an RBD volume: built under a temporary image, renamed when complete; B
    // reads it. A failed import leaves no image behind.
    let src = a.dir.path().join("img.raw");
    let mut img = vec![0u8; 3 * MIB];
    img[..MIB].fill(0x5a);
    img[2 * MIB..].fill(0x6b);
    std::fs::write(&src, &img).unwrap();
    let src_s = src.to_str().unwrap();
    let i = a.json(&[
        "volume", "import", "imp", "--from", src_s, "--key", "k", "--store", "rbd",
    ]);
    assert_eq!(
        (&i["store"], &i["size"]),
        (&"rbd".into(), &(3 * MIB as u64).into()),
        "{i}"
    );
    b.json(&["volume", "attach", "imp", "--read-only"]);
    assert_eq!(nbd_read(&b.uri("imp")), img, "imported data read on B");
    b.json(&["volume", "detach", "imp"]);
    let e = a.fails(&[
        "volume", "create", "imp", "--size", "1M", "--key", "k", "--store", "file",
    ]);
    assert!(e.contains("exists"), "{e}");
    // An upload shorter than announced fails, and its temporary image goes.
    let o = Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(a.dir.path().join("c.sock"))
        .args([
            "-X",
            "POST",
            "http://x/v1/volumes/imp2/import?size=4194304&key_id=k&store=rbd",
            "--data-binary",
        ])
        .arg(format!("@{src_s}"))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&o.stdout);
    assert!(body.contains("announced"), "{body}");
    let ls = ok(&mc.rbd(CLIENT_A, &["ls"]), "rbd ls");
    assert!(!ls.contains("imp2"), "{ls}");
    assert!(
        !ls.contains("cryptvol-tmp."),
        "a temporary image is left: {ls}"
    );

    b.json(&["volume", "detach", "v"]);
    a.json(&["volume", "delete", "v"]);
    let l = mc.rbd(CLIENT_A, &["ls"]);
    assert!(!String::from_utf8_lossy(&l.stdout).contains("cryptvol.v"));
}

/// Round `r` of the writer: every 4 KiB block of the first 256 KiB filled with byte `r`,
/// one request per block, then FLUSH.
fn write_round(uri: &str, r: u64) -> bool {
    let cmds: Vec<String> = (0..64)
        .map(|k| format!("write -P {} {} 4k", r % 250 + 1, k * 4096))
        .chain(["flush".to_string()])
        .collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let o = qemu_io(uri, &refs);
    o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("error")
}

/// Every block holds round `flushed` or later (a round the writer had started), never less.
fn check_rounds(data: &[u8], flushed: u64, started: u64) {
    for (k, blk) in data[..256 * 1024].chunks(4096).enumerate() {
        let v = u64::from(blk[0]);
        assert!(blk.iter().all(|&x| u64::from(x) == v), "block {k} torn");
        let ok = (flushed..=started).any(|r| r % 250 + 1 == v);
        assert!(
            ok,
            "block {k} holds round byte {v}; flushed {flushed}, started {started}"
        );
    }
}

#[test]
fn takeover_fences_a_crashed_and_a_live_holder() {
    let test = "takeover_fences_a_crashed_and_a_live_holder";
    if !common::tools_present(test, &["qemu-io", "nbdcopy"]) {
        return;
    }
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    let (mut a, b) = two_hosts(&mc);
    a.json(&[
        "volume", "create", "v", "--size", "4M", "--key", "k", "--store", "rbd",
    ]);
    a.json(&["volume", "attach", "v"]);

    // A writing client on A; A is killed (-9) after a few flushed rounds.
    let flushed = Arc::new(AtomicU64::new(0));
    let started = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (uri, flushed, started, stop) =
            (a.uri("v"), flushed.clone(), started.clone(), stop.clone());
        std::thread::spawn(move || {
            for r in 1.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                started.store(r, Ordering::SeqCst);
                if !write_round(&uri, r) {
                    break;
                }
                flushed.store(r, Ordering::SeqCst);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while flushed.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "writer made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    a.kill();
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let (f, s) = (
        flushed.load(Ordering::SeqCst),
        started.load(Ordering::SeqCst),
    );

    // Without --takeover B is refused (the dead holder's lock stands); with it, B is in.
    assert!(b.fails(&["volume", "attach", "v"]).contains("cryptvol-a@"));
    let t = Instant::now();
    b.json(&["volume", "attach", "v", "--takeover"]);
    println!("takeover of a killed holder: {:?}", t.elapsed());
    check_rounds(&nbd_read(&b.uri("v")), f, s);

    // A restarts: its volume is held by B, so it is reported failed (naming B), not taken.
    a.start();
    let v = volume(&a.json(&["volume", "list"]), "v").clone();
    assert_eq!(v["attached"], false, "{v}");
    assert!(
        v["status"].as_str().unwrap().starts_with("failed:")
            && v["status"].as_str().unwrap().contains("cryptvol-b@"),
        "{v}"
    );

    // A live holder fenced: A takes over from B while B serves a client.
    ok(
        &qemu_io(&b.uri("v"), &["write -P 0x11 2M 64k", "flush"]),
        "B writes",
    );
    a.json(&["volume", "attach", "v", "--takeover"]);
    // B's next write is refused, reaches nothing, and B stops serving the volume.
    let o = qemu_io(&b.uri("v"), &["write -P 0xee 2M 64k", "flush"]);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !o.status.success() || out.contains("error"),
        "fenced write: {out}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let v = loop {
        let v = volume(&b.json(&["volume", "list"]), "v").clone();
        if v["status"].as_str().unwrap().starts_with("fenced:") {
            break v;
        }
        assert!(Instant::now() < deadline, "B never reported the fence: {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(v["status"].as_str().unwrap().contains("cryptvol-a@"), "{v}");
    assert_eq!(v["attached"], false);
    assert!(
        !qemu_io(&b.uri("v"), &["read 0 4k"]).status.success(),
        "still served on B"
    );
    // Nothing B wrote after the takeover is in the image.
    ok(
        &qemu_io(&a.uri("v"), &["read -P 0x11 2M 64k"]),
        "A reads B's last flushed write",
    );
    if let Some(plain) = decrypt_export(&mc, &a, "v", 512, 16) {
        assert!(
            plain.iter().all(|&x| x == 0x11),
            "a fenced write reached the image"
        );
    }
    // B does not re-attach it at restart.
    let attached = std::fs::read_to_string(b.state.join("attached.json")).unwrap();
    assert!(!attached.contains("\"v\""), "{attached}");

    // A takeover with no I/O on the old holder: its `volume list` sees the lock gone and
    // reports the volume fenced at once, and stops serving it.
    b.json(&[
        "volume", "create", "w", "--size", "1M", "--key", "k", "--store", "rbd",
    ]);
    b.json(&["volume", "attach", "w"]);
    a.json(&["volume", "attach", "w", "--takeover"]);
    let w = volume(&b.json(&["volume", "list"]), "w").clone();
    assert!(
        w["status"]
            .as_str()
            .unwrap()
            .starts_with("fenced: lock taken over by cryptvol-a@"),
        "{w}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while volume(&b.json(&["volume", "list"]), "w")["attached"] != false {
        assert!(Instant::now() < deadline, "B still serves w");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!qemu_io(&b.uri("w"), &["read 0 4k"]).status.success());
    // The host that took it over serves it.
    ok(
        &qemu_io(&a.uri("w"), &["write -P 3 0 4k", "read -P 3 0 4k"]),
        "A serves w",
    );
}

#[test]
fn cluster_down_at_start_keeps_file_volumes() {
    let test = "cluster_down_at_start_keeps_file_volumes";
    if !common::tools_present(test, &["qemu-io", "nbdcopy"]) {
        return;
    }
    let Some(mut mc) = MicroCeph::start(test) else {
        return;
    };
    let mut a = host(&mc, CLIENT_A);
    a.start();
    a.json(&["key", "create", "--alias", "k"]);
    a.json(&[
        "volume", "create", "r", "--size", "2M", "--key", "k", "--store", "rbd",
    ]);
    a.attach_new("f", "2M");
    a.json(&["volume", "attach", "r"]);
    ok(
        &qemu_io(&a.uri("f"), &["write -P 9 0 64k", "flush"]),
        "file volume",
    );
    assert!(a.stop().success());
    mc.stop();

    a.start();
    let l = a.json(&["volume", "list"]);
    let r = volume(&l, "r");
    assert_eq!(r["store"], "rbd");
    assert_eq!(r["attached"], false);
    assert!(r["status"].as_str().unwrap().starts_with("failed:"), "{r}");
    let f = volume(&l, "f");
    assert_eq!(
        (&f["status"], &f["attached"]),
        (&"ok".into(), &true.into()),
        "{f}"
    );
    ok(
        &qemu_io(&a.uri("f"), &["read -P 9 0 64k"]),
        "file volume served",
    );
    let e = a.fails(&["volume", "attach", "r"]);
    assert!(e.contains("cluster"), "{e}");
}

#[test]
fn an_image_swapped_for_another_volumes_is_refused() {
    let test = "an_image_swapped_for_another_volumes_is_refused";
    if !common::tools_present(test, &["qemu-io", "nbdcopy"]) {
        return;
    }
    let Some(mc) = MicroCeph::start(test) else {
        return;
    };
    let mut a = host(&mc, CLIENT_A);
    a.start();
    a.json(&["key", "create", "--alias", "k"]);
    for n in ["v", "w"] {
        a.json(&[
            "volume", "create", n, "--size", "1M", "--key", "k", "--store", "rbd",
        ]);
    }
    let w_id = a.json(&["volume", "inspect", "w"])["volume_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Someone with access to the pool replaces v's image with a copy of w's.
    ok(&mc.rbd(CLIENT_B, &["rm", "cryptvol.v"]), "rbd rm");
    ok(
        &mc.rbd(CLIENT_B, &["cp", "cryptvol.w", "cryptvol.v"]),
        "rbd cp",
    );
    let e = a.fails(&["volume", "attach", "v"]);
    assert!(e.contains("refused") && e.contains(&w_id), "{e}");
    let v = volume(&a.json(&["volume", "list"]), "v").clone();
    assert!(v["status"].as_str().unwrap().starts_with("failed:"), "{v}");
    assert_eq!(
        v["attached"], false,
        "the refused volume is not served: {v}"
    );
    assert!(!qemu_io(&a.uri("v"), &["read 0 4k"]).status.success());
    assert_eq!(v["store"], "rbd");
    assert_eq!(v["path"], "rbd:rbd/cryptvol.v");
    // Another host registers RBD volumes on first sight: of two names holding one volume,
    // it trusts the first it sees and refuses the other.
    let mut b = host(&mc, CLIENT_B);
    std::fs::copy(a.state.join("root.key"), b.state.join("root.key")).unwrap();
    hosts::copy_kms(&a, &b);
    b.start();
    let l = b.json(&["volume", "list"]);
    let refused: Vec<&str> = ["v", "w"]
        .into_iter()
        .filter(|n| {
            volume(&l, n)["status"]
                .as_str()
                .unwrap()
                .contains("two names never share a volume")
        })
        .collect();
    assert_eq!(refused.len(), 1, "{l}");
}
