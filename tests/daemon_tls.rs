//! NBD over TLS with a real client: libnbd's GnuTLS (`nbdinfo nbds://...`) against the daemon's
//! rustls STARTTLS, with client certificates required. Certificates are made in the test by the
//! openssl CLI (no private key is committed).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("spawn")
}

fn openssl(dir: &Path, args: &[&str]) {
    let o = run(Command::new("openssl").current_dir(dir).args(args));
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in libnbd's layout.
fn make_pki(dir: &Path, prefix: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{prefix}ca-key.pem"),
            "-out",
            &format!("{prefix}ca-cert.pem"),
            "-days",
            "2",
            "-subj",
            "/CN=cryptvol test CA",
        ],
    );
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth",
        ),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        std::fs::write(dir.join(format!("{prefix}{name}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{prefix}{name}-key.pem"),
                "-out",
                &format!("{prefix}{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{prefix}{name}.csr"),
                "-CA",
                &format!("{prefix}ca-cert.pem"),
                "-CAkey",
                &format!("{prefix}ca-key.pem"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{prefix}{name}.ext"),
                "-out",
                &format!("{prefix}{name}-cert.pem"),
            ],
        );
    }
}

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cli(cfg: &Path, args: &[&str]) -> Output {
    run(Command::new(env!("CARGO_BIN_EXE_cryptvol"))
        .arg("--config")
        .arg(cfg)
        .args(args))
}

#[test]
fn nbds_with_client_certificates() {
    if !have("openssl") || !have("nbdinfo") {
        eprintln!("SKIP: openssl or nbdinfo missing");
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("cvtls")
        .tempdir_in("/tmp")
        .unwrap();
    let d = tmp.path();
    make_pki(d, "");
    // libnbd reads ca-cert.pem, client-cert.pem, client-key.pem from one directory.
    let good = d.join("good");
    std::fs::create_dir(&good).unwrap();
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(d.join(f), good.join(f)).unwrap();
    }
    // A client with only the CA (no client certificate), and one trusting another CA.
    let nocert = d.join("nocert");
    std::fs::create_dir(&nocert).unwrap();
    std::fs::copy(d.join("ca-cert.pem"), nocert.join("ca-cert.pem")).unwrap();
    let other = d.join("other");
    std::fs::create_dir(&other).unwrap();
    make_pki(&other, "");

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let state = d.join("state");
    assert!(
        cli(
            Path::new("/dev/null"),
            &["init", "--state-dir", state.to_str().unwrap()]
        )
        .status
        .success()
    );
    let cfg: PathBuf = d.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{s}\"\n[control]\nsocket = \"{d}/ctl.sock\"\n[nbd]\nunix_socket = \"{d}/nbd.sock\"\ntcp = \"127.0.0.1:{port}\"\n\
             [tls]\ncert = \"{d}/server-cert.pem\"\nkey = \"{d}/server-key.pem\"\nclient_ca = \"{d}/ca-cert.pem\"\n",
            s = state.display(),
            d = d.display()
        ),
    )
    .unwrap();
    let _daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_cryptvol"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cli(&cfg, &["volume", "list"]).status.success() {
        assert!(Instant::now() < deadline, "daemon did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        cli(&cfg, &["key", "create", "--alias", "k"])
            .status
            .success()
    );
    assert!(
        cli(
            &cfg,
            &["volume", "create", "v", "--size", "16M", "--key", "k"]
        )
        .status
        .success()
    );
    assert!(cli(&cfg, &["volume", "attach", "v"]).status.success());

    let info = |uri: String| run(Command::new("nbdinfo").arg("--size").arg(uri));
    let ok = info(format!(
        "nbds://127.0.0.1:{port}/v?tls-certificates={}",
        good.display()
    ));
    assert!(
        ok.status.success(),
        "nbds with a client certificate: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "16777216");

    // Plain TCP is refused (FORCEDTLS), a missing client certificate and a foreign CA fail.
    assert!(
        !info(format!("nbd://127.0.0.1:{port}/v")).status.success(),
        "plaintext must be refused"
    );
    assert!(
        !info(format!(
            "nbds://127.0.0.1:{port}/v?tls-certificates={}",
            nocert.display()
        ))
        .status
        .success()
    );
    assert!(
        !info(format!(
            "nbds://127.0.0.1:{port}/v?tls-certificates={}",
            other.display()
        ))
        .status
        .success()
    );

    // The Unix socket stays plain, and the daemon still serves TLS clients after the failures.
    let unix = info(format!("nbd+unix:///v?socket={}/nbd.sock", d.display()));
    assert!(unix.status.success());
    let again = info(format!(
        "nbds://127.0.0.1:{port}/v?tls-certificates={}",
        good.display()
    ));
    assert!(again.status.success());
}
