//! A test PKI made by the openssl CLI (no private key is committed): CAs, server and client
//! certificates (current or expired), and the client certificate directories libnbd and qemu
//! read. Used by the TLS tests.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("spawn openssl");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `openssl req` with a new unencrypted P-256 key written to `key`, then `rest`.
pub fn req_new_key(dir: &Path, x509: bool, key: &str, rest: &[&str]) {
    let mut args = vec!["req"];
    if x509 {
        args.push("-x509");
    }
    args.extend([
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ]);
    args.extend(["-keyout", key]);
    args.extend(rest);
    openssl(dir, &args);
}

/// A self-signed CA in `dir`: `{ca}-cert.pem`, `{ca}-key.pem`.
pub fn make_ca(dir: &Path, ca: &str) {
    let (cert, subject) = (format!("{ca}-cert.pem"), format!("/CN=cryptvol test {ca}"));
    let rest = ["-out", &cert, "-days", "2", "-subj", &subject];
    req_new_key(dir, true, &format!("{ca}-key.pem"), &rest);
}

#[derive(Clone, Copy, PartialEq)]
pub enum Validity {
    Current,
    /// Valid for one day in 2020.
    Expired,
}

/// A leaf certificate `{name}-cert.pem`, `{name}-key.pem` signed by the CA `ca` in `dir`.
pub fn issue(dir: &Path, ca: &str, name: &str, subject: &str, ext: &str, validity: Validity) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    let csr = format!("{name}.csr");
    req_new_key(
        dir,
        false,
        &format!("{name}-key.pem"),
        &["-out", &csr, "-subj", subject],
    );
    let (csr, cert, ext) = (
        format!("{name}.csr"),
        format!("{name}-cert.pem"),
        format!("{name}.ext"),
    );
    let (ca_cert, ca_key) = (format!("{ca}-cert.pem"), format!("{ca}-key.pem"));
    match validity {
        Validity::Current => openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_cert,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &cert,
            ],
        ),
        Validity::Expired => {
            // `x509 -days` cannot go negative and `-not_before`/`-not_after` need OpenSSL
            // 3.4; `openssl ca -startdate/-enddate` sets any period on every OpenSSL in use.
            std::fs::write(
                dir.join("ca.cnf"),
                "[ca]\ndefault_ca = test\n[test]\ndatabase = index.txt\nnew_certs_dir = .\n\
                 serial = ca.serial\ndefault_md = sha256\npolicy = any\n[any]\ncommonName = supplied\n",
            )
            .unwrap();
            std::fs::write(dir.join("index.txt"), "").unwrap();
            std::fs::write(dir.join("ca.serial"), "1000\n").unwrap();
            openssl(
                dir,
                &[
                    "ca",
                    "-batch",
                    "-notext",
                    "-config",
                    "ca.cnf",
                    "-cert",
                    &ca_cert,
                    "-keyfile",
                    &ca_key,
                    "-in",
                    &csr,
                    "-out",
                    &cert,
                    "-startdate",
                    "20200101000000Z",
                    "-enddate",
                    "20200102000000Z",
                    "-extfile",
                    &ext,
                ],
            );
        }
    }
}

pub const CLIENT_EXT: &str = "extendedKeyUsage=clientAuth";

/// The test PKI in `d`: CA `ca` with a server certificate for 127.0.0.1 and clients
/// `client-a` (CN only), `client-b` (CN backup-host, SAN DNS Backup.Example.com) and
/// `expired` (CN client-a, expired); a second CA `other` with a client of its own.
pub fn make_pki(d: &Path) {
    make_ca(d, "ca");
    let server_ext = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth";
    let current = Validity::Current;
    issue(d, "ca", "server", "/CN=server", server_ext, current);
    issue(d, "ca", "client-a", "/CN=client-a", CLIENT_EXT, current);
    let b_ext = format!("subjectAltName=DNS:Backup.Example.com\n{CLIENT_EXT}");
    issue(d, "ca", "client-b", "/CN=backup-host", &b_ext, current);
    issue(
        d,
        "ca",
        "expired",
        "/CN=client-a",
        CLIENT_EXT,
        Validity::Expired,
    );
    make_ca(d, "other");
    issue(d, "other", "stranger", "/CN=client-a", CLIENT_EXT, current);
}

/// A client's certificate directory in the layout libnbd and qemu read: ca-cert.pem (the
/// server's CA), client-cert.pem, client-key.pem (`leaf` None: the CA only).
pub fn client_dir(d: &Path, ca: &str, leaf: Option<&str>) -> PathBuf {
    let out = d.join(format!("dir-{}", leaf.unwrap_or("nocert")));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(d.join(format!("{ca}-cert.pem")), out.join("ca-cert.pem")).unwrap();
    if let Some(l) = leaf {
        std::fs::copy(d.join(format!("{l}-cert.pem")), out.join("client-cert.pem")).unwrap();
        std::fs::copy(d.join(format!("{l}-key.pem")), out.join("client-key.pem")).unwrap();
    }
    out
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
