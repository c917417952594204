//! Who may use the NBD TCP listener, tried as an attacker on the host would: a local user
//! (uid 65534, through `setpriv`) points `nbdinfo` at the port. A TCP listener serves only
//! TLS clients with a verified certificate; a config without `[tls]` or without `client_ca`
//! is refused at start, unless `[nbd] insecure_plaintext = true` opts in, which is warned
//! about at every start. Needs nbdinfo and openssl; the local-user checks need root.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::pki::*;
use common::{Env, as_user, have, is_root};

const NOBODY: u32 = 65534;

fn tools(names: &[&str]) -> bool {
    match names.iter().find(|t| !have(t)) {
        Some(t) => {
            eprintln!("SKIP: {t} missing");
            false
        }
        None => true,
    }
}

/// The TLS part of a config, from the PKI in `d`, with or without `client_ca`.
fn tls_toml(d: &Path, client_ca: bool) -> String {
    let mut t = format!(
        "[tls]\ncert = \"{d}/server-cert.pem\"\nkey = \"{d}/server-key.pem\"\n",
        d = d.display()
    );
    if client_ca {
        t.push_str(&format!("client_ca = \"{}/ca-cert.pem\"\n", d.display()));
    }
    t
}

/// What `serve` did with the config: exited (with its stderr), or became ready.
enum Start {
    Refused(Output),
    Ready,
}

/// Runs `serve` on the env's config and waits until it either exits or answers on the
/// control socket (then it is kept in `env` and killed on drop).
fn start(env: &mut Env) -> Start {
    let log = std::fs::File::create(env.dir.path().join("daemon.log")).unwrap();
    let child = Command::new(common::BIN)
        .args(["serve", "--config"])
        .arg(&env.cfg)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut child: Child = child;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let stderr = env.log().into_bytes();
            return Start::Refused(Output {
                status,
                stdout: Vec::new(),
                stderr,
            });
        }
        if env.cli(&["volume", "list"]).status.success() {
            env.daemon = Some(child);
            return Start::Ready;
        }
        assert!(
            Instant::now() < deadline,
            "daemon neither exited nor answered"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// `nbdinfo ARGS` as uid 65534 with no groups: a local user without any access grant.
fn nbdinfo_as_nobody(args: &[&str]) -> Output {
    let w = as_user(NOBODY, NOBODY, &[]);
    Command::new(&w[0])
        .args(&w[1..])
        .arg("nbdinfo")
        .args(args)
        .output()
        .unwrap()
}

fn nbdinfo(args: &[&str]) -> Output {
    Command::new("nbdinfo").args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The attack of issue 11: `[nbd] tcp` on loopback and nothing else. Before, the daemon
/// started and any local user listed, read and wrote every attached volume through the port
/// (the 0660 Unix socket would have refused them). Now the config is refused at start with
/// `FILE: nbd.tcp: REASON`, and the port stays closed.
#[test]
fn plain_tcp_is_refused_at_start() {
    if !tools(&["nbdinfo"]) {
        return;
    }
    let port = free_port();
    let mut env = Env::with_config(|_| format!("[nbd]\ntcp = \"127.0.0.1:{port}\"\n"));
    match start(&mut env) {
        Start::Refused(o) => {
            assert!(!o.status.success());
            let e = text(&o.stderr);
            let want = format!(
                "{}: nbd.tcp: 127.0.0.1:{port} without [tls]: any peer that reaches the port",
                env.cfg.display()
            );
            assert!(e.contains(&want), "{e}");
            assert!(
                e.contains("insecure_plaintext = true"),
                "names the opt-in: {e}"
            );
        }
        Start::Ready => {
            // The old behaviour: show what a local user gets, then fail.
            env.json(&["key", "create", "--alias", "k"]);
            env.attach_new("secret", "8M");
            let uri = format!("nbd://127.0.0.1:{port}");
            let o = if is_root() && have("setpriv") {
                nbdinfo_as_nobody(&["--list", &uri])
            } else {
                nbdinfo(&["--list", &uri])
            };
            panic!(
                "the daemon served plain TCP without an opt-in; a local user's \
                 `nbdinfo --list {uri}` says: {}{}",
                text(&o.stdout),
                text(&o.stderr)
            );
        }
    }
    let o = nbdinfo(&["--list", &format!("nbd://127.0.0.1:{port}")]);
    assert!(!o.status.success(), "nothing may listen on the port");
}

#[test]
fn tls_without_client_ca_is_refused_at_start() {
    if !tools(&["openssl"]) {
        return;
    }
    let port = free_port();
    let mut env = Env::with_config(|d| {
        make_pki(d);
        format!("[nbd]\ntcp = \"127.0.0.1:{port}\"\n{}", tls_toml(d, false))
    });
    let Start::Refused(o) = start(&mut env) else {
        panic!("[tls] without client_ca on TCP must be refused");
    };
    let e = text(&o.stderr);
    let want = format!(
        "{}: tls.client_ca: required with nbd.tcp (127.0.0.1:{port})",
        env.cfg.display()
    );
    assert!(!o.status.success() && e.contains(&want), "{e}");
}

/// `insecure_plaintext = true` is an explicit opt-in: the daemon starts, says at start what
/// it exposes, and then does expose it (which is why it is not the default).
#[test]
fn insecure_plaintext_opt_in_starts_and_warns() {
    if !tools(&["nbdinfo", "openssl"]) {
        return;
    }
    for tls in [false, true] {
        let port = free_port();
        let mut env = Env::with_config(|d| {
            let t = if tls {
                make_pki(d);
                tls_toml(d, false)
            } else {
                String::new()
            };
            format!("[nbd]\ntcp = \"127.0.0.1:{port}\"\ninsecure_plaintext = true\n{t}")
        });
        assert!(matches!(start(&mut env), Start::Ready), "tls {tls}");
        let log = env.log();
        let warning = log
            .lines()
            .find(|l| l.contains("WARN") && l.contains("insecure_plaintext"))
            .unwrap_or_else(|| panic!("no start-up warning (tls {tls}): {log}"));
        assert!(
            warning.contains(&format!("127.0.0.1:{port}"))
                && warning.contains("any peer")
                && warning.contains("every attached volume"),
            "the warning names the exposure: {warning}"
        );
        assert_eq!(warning.contains("in plaintext"), !tls, "{warning}");
        if !tls {
            // What the opt-in means: without a certificate, the port lists the volume.
            env.json(&["key", "create", "--alias", "k"]);
            env.attach_new("v", "8M");
            let o = nbdinfo(&["--list", "--json", &format!("nbd://127.0.0.1:{port}")]);
            assert!(o.status.success(), "{}", text(&o.stderr));
            assert!(text(&o.stdout).contains("\"v\""), "{}", text(&o.stdout));
        }
    }
}

/// With TLS and client_ca, a local user without a certificate gets nothing over TCP, neither
/// in plaintext nor over TLS without a client certificate; a verified client lists and opens
/// the volumes, those not named in `[tls.allowed_clients]` included.
#[test]
fn only_verified_clients_over_tcp() {
    if !tools(&["nbdinfo", "openssl"]) {
        return;
    }
    let port = free_port();
    let mut env = Env::with_config(|d| {
        make_pki(d);
        format!(
            "[nbd]\ntcp = \"127.0.0.1:{port}\"\n{}[tls.allowed_clients]\nrestricted = [\"backup-host\"]\n",
            tls_toml(d, true)
        )
    });
    assert!(matches!(start(&mut env), Start::Ready));
    env.json(&["key", "create", "--alias", "k"]);
    env.attach_new("open", "8M");
    env.attach_new("restricted", "8M");
    let d = env.dir.path();
    let a = client_dir(d, "ca", Some("client-a"));

    if is_root() && have("setpriv") {
        // A CA-only directory the local user can read: TLS, but no client certificate.
        let nocert = client_dir(d, "ca", None);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let o = nbdinfo_as_nobody(&["--list", &format!("nbd://127.0.0.1:{port}")]);
        assert!(!o.status.success(), "plain TCP listed: {}", text(&o.stdout));
        assert!(!text(&o.stdout).contains("open"), "{}", text(&o.stdout));
        let uri = format!(
            "nbds://127.0.0.1:{port}/?tls-certificates={}",
            nocert.display()
        );
        let o = nbdinfo_as_nobody(&["--list", &uri]);
        assert!(
            !o.status.success(),
            "TLS without a certificate listed: {}",
            text(&o.stdout)
        );
    } else {
        eprintln!("SKIP (local-user part): needs root and setpriv");
    }

    let list = |certs: &Path| {
        let uri = format!(
            "nbds://127.0.0.1:{port}/?tls-certificates={}",
            certs.display()
        );
        let o = nbdinfo(&["--list", "--json", &uri]);
        assert!(o.status.success(), "verified client: {}", text(&o.stderr));
        text(&o.stdout)
    };
    let listed = list(&a);
    assert!(listed.contains("\"open\""), "{listed}");
    assert!(!listed.contains("\"restricted\""), "{listed}");
    let b = client_dir(d, "ca", Some("client-b"));
    let listed = list(&b);
    assert!(
        listed.contains("\"open\"") && listed.contains("\"restricted\""),
        "{listed}"
    );
    let uri = format!(
        "nbds://127.0.0.1:{port}/open?tls-certificates={}",
        a.display()
    );
    let o = nbdinfo(&["--size", &uri]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout).trim(), "8388608");
}
