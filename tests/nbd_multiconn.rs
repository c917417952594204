//! Many connections at once (issue 16 §3): 1 MiB WRITEs streaming on every connection, past
//! the point where the threaded path stores WRITEs on the connection threads instead of the
//! blocking pool (`src/server/streaming.rs`: two streaming connections per CPU), with
//! read-modify-writes of the same units from every connection among them; read back across
//! connections against a model (tests/py/multiconn_check.py, python3-libnbd). Then
//! BLOCK_STATUS around a TRIM: the store's remembered data span (`src/volume/dataspan.rs`)
//! must not outlive the punch.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Env, python_nbd};

#[test]
fn streaming_connections_and_shared_units_stay_consistent() {
    let Some(py) = python_nbd() else { return };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Past two per CPU where the machine allows it (2 vCPUs: 5), bounded for big CI hosts.
    let conns = (2 * cpus + 1).clamp(5, 12);
    let mut env = Env::new();
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    for sector in ["512", "4096"] {
        let name = format!("m{sector}");
        env.json(&[
            "volume",
            "create",
            &name,
            "--size",
            "64M",
            "--key",
            "k",
            "--sector-size",
            sector,
        ]);
        env.json(&["volume", "attach", &name]);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/multiconn_check.py");
        let o = Command::new(&py)
            .arg(&script)
            .args([
                &env.uri(&name),
                &(64u64 << 20).to_string(),
                sector,
                &conns.to_string(),
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("OK"),
            "{sector} B sectors, {conns} connections: {}{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            env.log()
        );
    }
}
