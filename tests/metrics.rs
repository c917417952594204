//! `GET /metrics` against the real daemon: scraped with curl (control socket and the loopback
//! TCP listener) while fio writes through its NBD engine, checked by `promtool check metrics`,
//! and the counters compared with what the clients did.

mod common;
mod support;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, have};

/// One scrape through the control socket.
fn scrape(e: &Env) -> String {
    let o = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "10", "--unix-socket"])
        .arg(e.dir.path().join("c.sock"))
        .arg("http://localhost/metrics")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// `promtool check metrics` must accept the exposition (format and naming lint).
fn promtool_ok(text: &str) {
    let mut c = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Samples by their full name with labels, e.g. `cryptvol_volume_bytes_total{volume="v",op="write"}`.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_owned(), v.parse::<f64>().unwrap())
        })
        .collect()
}

fn get(m: &BTreeMap<String, f64>, k: &str) -> f64 {
    *m.get(k)
        .unwrap_or_else(|| panic!("no sample {k} in {:#?}", m.keys().collect::<Vec<_>>()))
}

#[test]
fn metrics_follow_a_real_fio_run_and_pass_promtool() {
    for t in ["curl", "promtool", "fio", "nbdcopy"] {
        if !have(t) {
            panic!("{t} is required (see .ci/run)");
        }
    }
    // A free loopback port for [metrics] listen.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut e = Env::with_config(|_| format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
    e.start();
    e.json(&["key", "create", "--alias", "k"]);
    e.attach_new("vol1", "64M");

    let before = scrape(&e);
    promtool_ok(&before);
    let m0 = samples(&before);
    assert_eq!(get(&m0, "cryptvol_attached_volumes"), 1.0);
    assert_eq!(
        get(
            &m0,
            r#"cryptvol_volume_bytes_total{volume="vol1",op="write"}"#
        ),
        0.0
    );
    assert!(
        get(
            &m0,
            r#"cryptvol_kms_operations_total{operation="create-key",result="ok"}"#
        ) >= 1.0
    );
    assert_eq!(
        get(
            &m0,
            r#"cryptvol_volume_operations_total{operation="attach",result="ok"}"#
        ),
        1.0
    );
    assert!(get(&m0, "process_resident_memory_bytes") > 0.0);
    assert!(get(&m0, "process_open_fds") > 0.0);

    // fio writes for a few seconds over 2 jobs; we scrape while it runs.
    let fio = Command::new("fio")
        .args([
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={}", e.uri("vol1")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--numjobs=2",
            "--size=64m",
            "--time_based",
            "--runtime=4",
            "--group_reporting",
            "--output-format=json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // While fio runs: its connections are counted and written bytes move.
    let deadline = Instant::now() + Duration::from_secs(30);
    let during = loop {
        let t = scrape(&e);
        let m = samples(&t);
        if get(&m, r#"cryptvol_volume_connections{volume="vol1"}"#) >= 2.0
            && get(
                &m,
                r#"cryptvol_volume_bytes_total{volume="vol1",op="write"}"#,
            ) > 0.0
        {
            break t;
        }
        assert!(Instant::now() < deadline, "fio never showed up: {t}");
        std::thread::sleep(Duration::from_millis(100));
    };
    promtool_ok(&during);
    let m1 = samples(&during);
    let o = fio.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "fio: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // fio's engine may print notes before the JSON document.
    let stdout = String::from_utf8_lossy(&o.stdout);
    let json = &stdout[stdout.find("\n{").map_or(0, |i| i + 1)..];
    let report: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("fio output ({e}): {stdout}"));
    let fio_written = report["jobs"][0]["write"]["io_bytes"].as_u64().unwrap() as f64;
    let fio_ios = report["jobs"][0]["write"]["total_ios"].as_u64().unwrap() as f64;
    assert!(fio_written > 0.0);

    // A read of the whole volume, and a request refused before execution (out of range).
    let out = e.dir.path().join("copy.img");
    let st = Command::new("nbdcopy")
        .arg(e.uri("vol1"))
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let mut c = support::Conn::connect(&e.nbd_socket());
    let (size, _) = c.go("vol1", false, false);
    assert_eq!(c.write_simple(1, size, &[0u8; 4096]), 28, "ENOSPC");
    drop(c);

    // The TCP listener serves the same exposition (and nothing else).
    let tcp = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()
        .unwrap();
    assert!(tcp.status.success());
    promtool_ok(&String::from_utf8(tcp.stdout).unwrap());
    let other = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .arg(format!("http://127.0.0.1:{port}/v1/volumes"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&other.stdout), "404");

    // Counters after: at least what the clients did, never less than during the run.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let t = scrape(&e);
        let m = samples(&t);
        // Connections close asynchronously after the clients exit.
        if get(&m, r#"cryptvol_volume_connections{volume="vol1"}"#) == 0.0 {
            break t;
        }
        assert!(Instant::now() < deadline, "connections not closed: {t}");
        std::thread::sleep(Duration::from_millis(50));
    };
    promtool_ok(&after);
    let m2 = samples(&after);
    let w = |m: &BTreeMap<String, f64>, k: &str| {
        get(m, &format!("{k}{{volume=\"vol1\",op=\"write\"}}"))
    };
    assert!(w(&m2, "cryptvol_volume_bytes_total") >= fio_written);
    assert!(w(&m2, "cryptvol_volume_bytes_total") >= w(&m1, "cryptvol_volume_bytes_total"));
    assert!(w(&m2, "cryptvol_volume_requests_total") >= fio_ios);
    assert_eq!(
        w(&m2, "cryptvol_volume_request_duration_seconds_count"),
        w(&m2, "cryptvol_volume_requests_total")
    );
    assert!(w(&m2, "cryptvol_volume_request_duration_seconds_sum") > 0.0);
    assert!(
        get(
            &m2,
            r#"cryptvol_volume_bytes_total{volume="vol1",op="read"}"#
        ) >= 64.0 * 1048576.0,
        "nbdcopy read the whole volume"
    );
    assert_eq!(
        get(
            &m2,
            r#"cryptvol_volume_errors_total{volume="vol1",errno="ENOSPC"}"#
        ),
        1.0
    );
    assert_eq!(
        get(&m2, r#"cryptvol_volume_in_flight_requests{volume="vol1"}"#),
        0.0
    );
    // fio (2), nbdcopy (1 or more), the raw client: every one began transmission.
    assert!(
        get(
            &m2,
            r#"cryptvol_nbd_handshakes_total{outcome="ok",tls="false"}"#
        ) >= 4.0
    );

    // Detach: the volume's series go, the detach is counted.
    e.json(&["volume", "detach", "vol1"]);
    let m3 = samples(&scrape(&e));
    assert!(!m3.keys().any(|k| k.contains("volume=\"vol1\"")));
    assert_eq!(get(&m3, "cryptvol_volume_detaches_total"), 1.0);
    assert_eq!(get(&m3, "cryptvol_attached_volumes"), 0.0);
}

#[test]
fn a_non_loopback_metrics_address_is_refused() {
    let mut e = Env::with_config(|_| "[metrics]\nlisten = \"0.0.0.0:9465\"\n".into());
    let o = Command::new(common::BIN)
        .args(["serve", "--config"])
        .arg(&e.cfg)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("metrics.listen") && err.contains("loopback"),
        "{err}"
    );
    e.daemon = None;
}

/// The TLS transmission path (the async session) counts too, and handshakes are told apart
/// by TLS and outcome: a plaintext attempt on the TLS-only port fails, nbdcopy over TLS works.
#[test]
fn tls_connections_are_counted() {
    use common::pki::{client_dir, free_port, make_pki};
    for t in ["curl", "promtool", "openssl", "nbdcopy", "nbdinfo"] {
        if !have(t) {
            panic!("{t} is required (see .ci/run)");
        }
    }
    let port = free_port();
    let mut e = Env::with_config(|d| {
        make_pki(d);
        format!(
            "[nbd]\ntcp = \"127.0.0.1:{port}\"\n[tls]\ncert = \"{d}/server-cert.pem\"\n\
             key = \"{d}/server-key.pem\"\nclient_ca = \"{d}/ca-cert.pem\"\n",
            d = d.display()
        )
    });
    e.start();
    e.json(&["key", "create", "--alias", "k"]);
    e.attach_new("tv", "16M");
    let certs = client_dir(e.dir.path(), "ca", Some("client-a"));
    let plain = Command::new("nbdinfo")
        .args(["--size", &format!("nbd://127.0.0.1:{port}/tv")])
        .output()
        .unwrap();
    assert!(!plain.status.success(), "plaintext refused");
    let src = e.dir.path().join("src.img");
    std::fs::write(&src, vec![0xa5u8; 4 << 20]).unwrap();
    let uri = format!(
        "nbds://127.0.0.1:{port}/tv?tls-certificates={}",
        certs.display()
    );
    let st = Command::new("nbdcopy")
        .arg(&src)
        .arg(&uri)
        .status()
        .unwrap();
    assert!(st.success(), "nbdcopy over TLS");

    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let t = scrape(&e);
        if get(&samples(&t), r#"cryptvol_volume_connections{volume="tv"}"#) == 0.0 {
            break t;
        }
        assert!(Instant::now() < deadline, "connections not closed: {t}");
        std::thread::sleep(Duration::from_millis(50));
    };
    promtool_ok(&text);
    let m = samples(&text);
    assert!(get(&m, r#"cryptvol_volume_bytes_total{volume="tv",op="write"}"#) >= (4 << 20) as f64);
    assert!(
        get(
            &m,
            r#"cryptvol_nbd_handshakes_total{outcome="ok",tls="true"}"#
        ) >= 1.0
    );
    assert!(
        get(
            &m,
            r#"cryptvol_nbd_handshakes_total{outcome="failed",tls="false"}"#
        ) >= 1.0
    );
    assert_eq!(
        get(
            &m,
            r#"cryptvol_nbd_handshakes_total{outcome="ok",tls="false"}"#
        ),
        0.0
    );
}
