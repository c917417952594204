//! Runs `tests/format_decrypt.sh` against the built binary: the volume format is readable
//! with standard tools (docs/volume-format.md). Skips (with a message) without qemu-io or
//! Python `cryptography`.

use std::process::Command;

#[test]
fn volume_decrypts_with_standard_tools() {
    let out = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/format_decrypt.sh"
        ))
        .arg(env!("CARGO_BIN_EXE_cryptvol"))
        .output()
        .expect("run bash");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    println!("{text}");
}
