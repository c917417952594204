//! NBD over TLS with real clients against the daemon's rustls STARTTLS, client certificates
//! required: libnbd's GnuTLS (`nbdinfo nbds://...`, its Python binding, fio's nbd engine) and
//! qemu's (`qemu-io` with `tls-creds-x509`). Certificates, expired ones included, are made in
//! the test by the openssl CLI (no private key is committed). Per-volume allowed client
//! identities (`[tls.allowed_clients]`) are checked with two client certificates.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::pki::*;
use common::{Env, have};

/// A daemon with the PKI, a TCP listener on `port` (FORCEDTLS) and `extra` TOML.
fn tls_env(port: u16, extra: &str) -> Env {
    let mut env = Env::with_config(|d| {
        make_pki(d);
        format!(
            "[nbd]\ntcp = \"127.0.0.1:{port}\"\n[tls]\ncert = \"{d}/server-cert.pem\"\n\
             key = \"{d}/server-key.pem\"\nclient_ca = \"{d}/ca-cert.pem\"\n{extra}",
            d = d.display()
        )
    });
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    env
}

fn nbds(port: u16, export: &str, certs: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{port}/{export}?tls-certificates={}",
        certs.display()
    )
}

fn nbdinfo(args: &[&str]) -> Output {
    Command::new("nbdinfo").args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// [`tls_env`] on a free port with each of `volumes` (16 MiB, key `k`) created and attached;
/// `None` (the test skips) when a tool in `needs` is missing.
fn tls_volumes(needs: &[&str], extra: &str, volumes: &[&str]) -> Option<(Env, u16)> {
    if !tools(needs) {
        return None;
    }
    let port = free_port();
    let env = tls_env(port, extra);
    for v in volumes {
        env.attach_new(v, "16M");
    }
    Some((env, port))
}

fn tools(names: &[&str]) -> bool {
    match names.iter().find(|t| !have(t)) {
        Some(t) => {
            eprintln!("SKIP: {t} missing");
            false
        }
        None => true,
    }
}

#[test]
fn nbds_with_client_certificates() {
    let Some((env, port)) = tls_volumes(&["openssl", "nbdinfo"], "", &["v"]) else {
        return;
    };
    let d = env.dir.path();
    let good = client_dir(d, "ca", Some("client-a"));
    let nocert = client_dir(d, "ca", None);
    let other = client_dir(d, "other", Some("stranger"));
    let expired = client_dir(d, "ca", Some("expired"));

    let size = |certs: &Path| nbdinfo(&["--size", &nbds(port, "v", certs)]);
    let ok = size(&good);
    assert!(
        ok.status.success(),
        "nbds with a client certificate: {}",
        stderr(&ok)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "16777216");

    // Plain TCP is refused (FORCEDTLS); a missing client certificate, one from a foreign CA
    // (the client also distrusts our server there) and an expired one fail.
    let plain = nbdinfo(&["--size", &format!("nbd://127.0.0.1:{port}/v")]);
    assert!(!plain.status.success(), "plaintext must be refused");
    assert!(!size(&nocert).status.success(), "no client certificate");
    assert!(!size(&other).status.success(), "foreign CA");
    let old = size(&expired);
    assert!(!old.status.success(), "an expired client certificate");
    // The client saw the TLS handshake fail (the server's alert), not an NBD refusal.
    assert!(
        !stderr(&old).contains("export"),
        "expired: TLS failure expected: {}",
        stderr(&old)
    );

    // The daemon says why it refused the expired one.
    let log = env.log();
    assert!(
        log.lines()
            .any(|l| l.contains("TLS handshake failed") && l.to_lowercase().contains("expired")),
        "expired certificate refusal not logged: {log}"
    );

    // The Unix socket stays plain, and the daemon still serves TLS clients after the failures.
    let unix = nbdinfo(&["--size", &env.uri("v")]);
    assert!(unix.status.success(), "{}", stderr(&unix));
    let again = size(&good);
    assert!(again.status.success(), "{}", stderr(&again));
}

/// Export names in `nbdinfo --list --json` of a URI.
fn listed(uri: &str) -> Vec<String> {
    let o = nbdinfo(&["--list", "--json", uri]);
    assert!(o.status.success(), "nbdinfo --list {uri}: {}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut names: Vec<String> = v["exports"]
        .as_array()
        .unwrap_or_else(|| panic!("no exports in {v}"))
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

/// Per export: whether LIST_META_CONTEXT and INFO succeed, over libnbd's Python binding
/// ("name meta info" with each "ok" or "no"); `None` without python3-libnbd.
fn meta_and_info(uri: &str, exports: &[&str]) -> Option<String> {
    let py = std::env::var("CRYPTVOL_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    const SCRIPT: &str = r#"
import sys, nbd
h = nbd.NBD()
h.set_opt_mode(True)
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
for name in sys.argv[2:]:
    h.set_export_name(name)
    out = [name]
    for op in (lambda: h.opt_list_meta_context(lambda ctx: 0), h.opt_info):
        try:
            op()
            out.append("ok")
        except nbd.Error:
            out.append("no")
    print(" ".join(out))
h.opt_abort()
"#;
    let o = Command::new(&py)
        .args(["-c", SCRIPT, uri])
        .args(exports)
        .output()
        .ok()?;
    if stderr(&o).contains("No module named 'nbd'") {
        eprintln!("SKIP (meta contexts): {py} has no libnbd binding");
        return None;
    }
    assert!(o.status.success(), "python libnbd: {}", stderr(&o));
    Some(String::from_utf8_lossy(&o.stdout).into_owned())
}

#[test]
fn allowed_clients_per_volume() {
    // vol1 by CN, vol2 by SAN DNS name (the certificate spells it in mixed case); vol3 is
    // not listed, so every verified client has it.
    let allowed = "[tls.allowed_clients]\nvol1 = [\"client-a\"]\nvol2 = [\"backup.example.com\"]\n";
    let needs = ["openssl", "nbdinfo"];
    let Some((env, port)) = tls_volumes(&needs, allowed, &["vol1", "vol2", "vol3"]) else {
        return;
    };
    let d = env.dir.path();
    let a = client_dir(d, "ca", Some("client-a"));
    let b = client_dir(d, "ca", Some("client-b"));
    let root = |certs: &Path| nbds(port, "", certs);

    // LIST shows each client its own set; the Unix socket sees everything.
    assert_eq!(listed(&root(&a)), ["vol1", "vol3"]);
    assert_eq!(listed(&root(&b)), ["vol2", "vol3"]);
    assert_eq!(
        listed(&format!(
            "nbd+unix://?socket={}",
            env.nbd_socket().display()
        )),
        ["vol1", "vol2", "vol3"]
    );

    // GO: each opens what it may.
    let size = |v: &str, certs: &Path| nbdinfo(&["--size", &nbds(port, v, certs)]);
    for (v, certs) in [("vol1", &a), ("vol3", &a), ("vol2", &b), ("vol3", &b)] {
        let o = size(v, certs);
        assert!(o.status.success(), "{v} via {certs:?}: {}", stderr(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "16777216");
    }
    // ... and is told "unknown export" for the rest, exactly as for a name that does not
    // exist: the refusal does not reveal that the volume exists.
    for (v, certs) in [("vol2", &a), ("vol1", &b)] {
        let refused = size(v, certs);
        assert!(!refused.status.success(), "{v} must be refused");
        let missing = size("nosuchvol", certs);
        assert!(!missing.status.success());
        assert_eq!(
            stderr(&refused).replace(v, "NAME"),
            stderr(&missing).replace("nosuchvol", "NAME"),
            "refused and missing exports must look alike"
        );
    }

    // Meta-context queries and INFO are refused the same way.
    if let Some(out) = meta_and_info(&root(&a), &["vol1", "vol2", "vol3"]) {
        assert_eq!(out, "vol1 ok ok\nvol2 no no\nvol3 ok ok\n");
        let out = meta_and_info(&root(&b), &["vol1", "vol2", "vol3"]).unwrap();
        assert_eq!(out, "vol1 no no\nvol2 ok ok\nvol3 ok ok\n");
    }

    // Unix-socket clients are governed by the socket's permissions: all volumes open.
    for v in ["vol1", "vol2"] {
        let o = nbdinfo(&["--size", &env.uri(v)]);
        assert!(o.status.success(), "unix {v}: {}", stderr(&o));
    }

    // The refusals are logged with the identity and the export; the daemon keeps serving.
    let log = env.log();
    assert!(
        log.lines().any(|l| l.contains("client not allowed")
            && l.contains("vol2")
            && l.contains("client-a")),
        "refusal not logged: {log}"
    );
    assert!(
        log.lines().any(|l| l.contains("client not allowed")
            && l.contains("vol1")
            && l.contains("Backup.Example.com")),
        "refusal not logged: {log}"
    );
    assert!(size("vol1", &a).status.success());
}

#[test]
fn allowed_clients_need_client_ca() {
    let env = Env::with_config(|d| {
        format!(
            "[tls]\ncert = \"{d}/c.pem\"\nkey = \"{d}/k.pem\"\n[tls.allowed_clients]\nv = [\"a\"]\n",
            d = d.display()
        )
    });
    let o = Command::new(common::BIN)
        .args(["serve", "--config"])
        .arg(&env.cfg)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains(&format!(
            "{}: tls.allowed_clients: needs tls.client_ca",
            env.cfg.display()
        )),
        "{e}"
    );
}

/// qemu-io over TLS with `tls-creds-x509`: writes a pattern and reads it back; a client not
/// allowed for the volume is refused and the daemon goes on serving.
#[test]
fn qemu_io_over_tls() {
    let allowed = "[tls.allowed_clients]\nqv = [\"client-a\"]\n";
    let Some((env, port)) = tls_volumes(&["openssl", "qemu-io"], allowed, &["qv"]) else {
        return;
    };
    let d = env.dir.path();
    let qemu = |certs: &Path, cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.arg("--object").arg(format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            certs.display()
        ));
        c.arg("--image-opts").arg(format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},\
             export=qv,tls-creds=tls0"
        ));
        for x in cmds {
            c.args(["-c", x]);
        }
        let o = c.output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        // qemu-io exits 0 on a pattern mismatch: look at what it printed.
        let ok = o.status.success() && !out.contains("failed") && !out.contains("error");
        (ok, format!("{out}{}", stderr(&o)))
    };
    let a = client_dir(d, "ca", Some("client-a"));
    let (ok, out) = qemu(
        &a,
        &[
            "write -P 0x5a 1M 1M",
            "flush",
            "read -P 0x5a 1M 1M",
            "read -P 0 0 1M",
        ],
    );
    assert!(ok, "qemu-io over TLS: {out}");
    // A wrong pattern must fail (the check above can fail).
    let (ok, _) = qemu(&a, &["read -P 0x11 1M 4k"]);
    assert!(!ok, "a pattern mismatch must be seen");

    let (ok, out) = qemu(&client_dir(d, "ca", Some("client-b")), &["read 0 4k"]);
    assert!(!ok, "client-b is not allowed on qv: {out}");
    // qemu itself refuses to present an expired certificate; the daemon's refusal of one is
    // checked with libnbd (which sends it) in nbds_with_client_certificates.
    let (ok, out) = qemu(&client_dir(d, "ca", Some("expired")), &["read 0 4k"]);
    assert!(!ok, "expired certificate: {out}");

    // The data went through the encrypted volume: the Unix socket reads it back.
    let o = common::qemu_io(&env.uri("qv"), &["read -P 0x5a 1M 1M"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let (ok, out) = qemu(&a, &["read -P 0x5a 1M 1M"]);
    assert!(ok, "still serving: {out}");
}

/// fio's nbd engine (libnbd) over `nbds://`: writes with verification, then reads back.
///
/// fio calls `nbd_connect_uri` without `nbd_set_uri_allow_local_file`, so libnbd refuses a
/// `?tls-certificates=DIR` in its URI ("local file access (tls-certificates) is not
/// allowed"). Without it libnbd reads its default directory: `/etc/pki/libnbd` for root,
/// `$HOME/.pki/libnbd` for anyone else. Rather than touch /etc, fio runs with HOME at a
/// temp dir holding the client's files, as `nobody` (setpriv) when the test runs as root.
#[test]
fn fio_over_nbds() {
    if !tools(&["openssl", "fio"]) {
        return;
    }
    let engines = Command::new("fio").arg("--enghelp").output().unwrap();
    if !String::from_utf8_lossy(&engines.stdout).contains("nbd") {
        eprintln!("SKIP: this fio has no nbd engine");
        return;
    }
    let root = current_uid() == 0;
    if root && !tools(&["setpriv"]) {
        return;
    }
    let allowed = "[tls.allowed_clients]\nfv = [\"client-a\"]\n";
    let Some((env, port)) = tls_volumes(&[], allowed, &["fv"]) else {
        return;
    };
    let d = env.dir.path();
    // A HOME per client, outside the daemon's 0700 temp dir so that nobody can read it.
    let homes = tempfile::Builder::new()
        .prefix("cvfio")
        .tempdir_in("/tmp")
        .unwrap();
    let home = |leaf: Option<&str>| {
        let h = homes.path().join(leaf.unwrap_or("nocert"));
        let pki = h.join(".pki/libnbd");
        std::fs::create_dir_all(&pki).unwrap();
        let src = client_dir(d, "ca", leaf);
        for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
            if src.join(f).exists() {
                std::fs::copy(src.join(f), pki.join(f)).unwrap();
            }
        }
        if root {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(homes.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            for p in [h.clone(), h.join(".pki"), pki.clone()] {
                std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
            }
            for e in std::fs::read_dir(&pki).unwrap() {
                std::os::unix::fs::chown(e.unwrap().path(), Some(65534), Some(65534)).unwrap();
            }
        }
        h
    };
    let fio = |home: &Path, export: &str, rw: &str| {
        let mut c = if root {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
                "fio",
            ]);
            c
        } else {
            Command::new("fio")
        };
        c.env("HOME", home).current_dir(home).args([
            "--name=tls",
            "--ioengine=nbd",
            &format!("--uri=nbds://127.0.0.1:{port}/{export}"),
            &format!("--rw={rw}"),
            "--bs=64k",
            "--size=8M",
            "--iodepth=4",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--output-format=json",
        ]);
        c.output().unwrap()
    };
    let a = home(Some("client-a"));
    let w = fio(&a, "fv", "write");
    assert!(
        w.status.success(),
        "fio write over nbds: {}{}",
        String::from_utf8_lossy(&w.stdout),
        stderr(&w)
    );
    // fio may print notes before its JSON document.
    let out = String::from_utf8_lossy(&w.stdout);
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap_or(0)..])
        .unwrap_or_else(|e| panic!("fio JSON ({e}): {out}"));
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(
        job["write"]["io_bytes"],
        8 << 20,
        "fio wrote the whole range"
    );
    assert_eq!(
        job["read"]["io_bytes"],
        8 << 20,
        "fio verified the whole range"
    );
    // Without a client certificate, or with one not allowed for the volume, fio fails.
    let f = fio(&home(None), "fv", "read");
    assert!(!f.status.success(), "fio without a client certificate");
    let f = fio(&home(Some("client-b")), "fv", "read");
    assert!(!f.status.success(), "fio with client-b on fv");
    let r = fio(&a, "fv", "read");
    assert!(r.status.success(), "fio still served: {}", stderr(&r));
}

fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap()
}
