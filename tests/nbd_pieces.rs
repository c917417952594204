//! Large unaligned READs and WRITEs through the daemon from four connections at once, on
//! volumes of 512- and 4096-byte sectors, checked against a model (tests/py/pieces_check.py,
//! python3-libnbd): the volume's 128 KiB pieces and the process-wide CPU slots of the
//! threaded transmission path (`src/server/threaded.rs`) under concurrent clients. Then the
//! same volume through nbdcopy (4 connections, 256 KiB requests) and `cmp`.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Env, python_nbd};

#[test]
fn concurrent_large_unaligned_requests_match_a_model() {
    let Some(py) = python_nbd() else { return };
    let mut env = Env::new();
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    let size = 16u64 << 20;
    for sector in ["512", "4096"] {
        let name = format!("v{sector}");
        env.json(&[
            "volume",
            "create",
            &name,
            "--size",
            "16M",
            "--key",
            "k",
            "--sector-size",
            sector,
        ]);
        env.json(&["volume", "attach", &name]);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/pieces_check.py");
        let o = Command::new(&py)
            .arg(&script)
            .args([&env.uri(&name), &size.to_string(), sector])
            .output()
            .unwrap();
        assert!(
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("OK"),
            "{sector} B sectors: {}{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            env.log()
        );
    }
}

#[test]
fn nbdcopy_in_and_out_round_trips() {
    if !common::tools_present("nbdcopy_in_and_out_round_trips", &["nbdcopy", "cmp"]) {
        return;
    }
    let mut env = Env::new();
    env.start();
    env.json(&["key", "create", "--alias", "k"]);
    for sector in ["512", "4096"] {
        let name = format!("c{sector}");
        env.json(&[
            "volume",
            "create",
            &name,
            "--size",
            "24M",
            "--key",
            "k",
            "--sector-size",
            sector,
        ]);
        env.json(&["volume", "attach", &name]);
        let src = env.dir.path().join("src.img");
        let back = env.dir.path().join("back.img");
        let mut data = vec![0u8; 24 << 20];
        let mut x = 0x1234_5678_9abc_def1u64 ^ sector.len() as u64;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        // A zero stretch, so nbdcopy sends WRITE_ZEROES (or a hole) there too.
        data[(5 << 20) + 4096..(7 << 20) + 512].fill(0);
        std::fs::write(&src, &data).unwrap();
        let uri = env.uri(&name);
        for (from, to) in [
            (src.to_str().unwrap(), uri.as_str()),
            (uri.as_str(), back.to_str().unwrap()),
        ] {
            let o = Command::new("nbdcopy").args([from, to]).output().unwrap();
            assert!(
                o.status.success(),
                "nbdcopy {from} {to}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let o = Command::new("cmp").arg(&src).arg(&back).output().unwrap();
        assert!(
            o.status.success(),
            "{sector} B sectors: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        let _ = std::fs::remove_file(&back);
    }
}
