//! Kernel-client tier: `tests/kernel/run.sh` boots a VM in which the real Linux `nbd.ko` and
//! `nbd-client` attach cryptvol volumes (512- and 4096-byte sectors, `-b 4096`, `-C 2`, and one
//! volume on Ceph RBD when Ceph is installed), then
//! checks what landed through another client. Minutes under TCG, so it runs only with
//! `CRYPTVOL_KERNEL_TESTS=1`; otherwise it says that it was skipped.

use std::path::Path;
use std::process::Command;

#[test]
fn kernel_client_against_cryptvol() {
    if std::env::var("CRYPTVOL_KERNEL_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped: set CRYPTVOL_KERNEL_TESTS=1 to run the kernel-client VM tier");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(root.join("tests/kernel/run.sh"))
        .arg("--cryptvol")
        .arg(env!("CARGO_BIN_EXE_cryptvol"))
        .status()
        .expect("run tests/kernel/run.sh");
    match status.code() {
        Some(0) => {}
        Some(77) => {
            eprintln!("skipped: tests/kernel/run.sh found a prerequisite missing (see above)")
        }
        other => panic!("kernel-client tier failed: exit {other:?} (see the log above)"),
    }
}
