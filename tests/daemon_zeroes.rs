//! Zero plaintext seen from the backing file, black-box: zeros written through NBD (qemu-io)
//! are stored as zeros on a default (thin) volume, so whoever reads the file sees which blocks
//! are zero; on a volume made with `volume create --encrypt-zeroes` they are stored encrypted.
//! And what zero bytes written into the file by someone else read as, on each kind.

mod common;

use std::os::unix::fs::FileExt;

use common::{Env, have, qemu_io};

const DATA: u64 = 1 << 20;
const MIB: usize = 1 << 20;

fn data_area(e: &Env, name: &str, off: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(e.volume_path(name)).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, DATA + off).unwrap();
    b
}

fn zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

fn ok(out: std::process::Output) {
    assert!(
        out.status.success(),
        "qemu-io: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn zero_writes_are_stored_as_zeros_only_on_thin_volumes() {
    if !have("qemu-io") {
        eprintln!("SKIP: qemu-io not installed");
        return;
    }
    let mut e = Env::new();
    e.start();
    e.json(&["key", "create", "--alias", "k"]);
    e.json(&["volume", "create", "thin", "--size", "8M", "--key", "k"]);
    let info = e.json(&[
        "volume",
        "create",
        "enc",
        "--size",
        "8M",
        "--key",
        "k",
        "--encrypt-zeroes",
    ]);
    assert_eq!(info["encrypt_zeroes"], true);
    // 512-byte units share a file-system block: refused with a reason, nothing created.
    let err = e.fails(&[
        "volume",
        "create",
        "small",
        "--size",
        "8M",
        "--key",
        "k",
        "--sector-size",
        "512",
        "--encrypt-zeroes",
    ]);
    assert!(err.contains("4096-byte sectors"), "{err}");
    assert!(!e.volume_path("small").exists());
    assert_eq!(
        e.json(&["volume", "inspect", "thin"])["encrypt_zeroes"],
        false
    );
    assert_eq!(
        e.json(&["volume", "inspect", "enc"])["encrypt_zeroes"],
        true
    );
    let human = e.cli(&["volume", "inspect", "enc"]);
    assert!(
        String::from_utf8_lossy(&human.stdout).contains("encrypt_zeroes"),
        "inspect shows the setting"
    );
    for v in ["thin", "enc"] {
        e.json(&["volume", "attach", v]);
        // 1 MiB of zero data (NBD WRITE), then 64 KiB of WRITE_ZEROES without holes
        // (qemu-io -z without -u sends NBD_CMD_FLAG_NO_HOLE), then a marker.
        ok(qemu_io(
            &e.uri(v),
            &[
                "write -P 0 0 1M",
                "write -P 0x11 2M 64k",
                "write -z 2M 64k",
                "write -P 0x5a 4M 4k",
                "flush",
            ],
        ));
        ok(qemu_io(
            &e.uri(v),
            &["read -P 0 0 1M", "read -P 0 2M 64k", "read -P 0x5a 4M 4k"],
        ));
    }
    assert!(
        zero(&data_area(&e, "thin", 0, MIB)),
        "thin: zero data is stored as zeros"
    );
    assert!(zero(&data_area(&e, "thin", 2 << 20, 65536)));
    let enc = data_area(&e, "enc", 0, MIB);
    assert!(
        enc.chunks(4096).all(|u| !zero(u)),
        "--encrypt-zeroes: every zero unit is stored encrypted"
    );
    assert!(
        data_area(&e, "enc", 2 << 20, 65536)
            .chunks(4096)
            .all(|u| !zero(u))
    );
    assert!(!zero(&data_area(&e, "thin", 4 << 20, 4096)));

    // Someone with write access to the backing file zeroes the marker unit in place.
    for v in ["thin", "enc"] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(e.volume_path(v))
            .unwrap();
        f.write_all_at(&[0u8; 4096], DATA + (4 << 20)).unwrap();
    }
    // Thin: it reads as zeros (the attacker chose the content). Encrypt-zeroes: it is taken
    // as ciphertext and reads as noise, neither zeros nor the old data.
    ok(qemu_io(&e.uri("thin"), &["read -P 0 4M 4k"]));
    assert!(
        !qemu_io(&e.uri("enc"), &["read -P 0 4M 4k"])
            .status
            .success()
    );
    assert!(
        !qemu_io(&e.uri("enc"), &["read -P 0x5a 4M 4k"])
            .status
            .success()
    );
    // TRIM on the encrypt-zeroes volume still gives zeros (a real hole in the file).
    ok(qemu_io(
        &e.uri("enc"),
        &["discard 4M 64k", "read -P 0 4M 64k"],
    ));
}
