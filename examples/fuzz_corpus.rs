//! Writes small valid seed inputs for the fuzz targets into `fuzz/corpus/<target>/`.
use std::path::Path;

use cryptvol::kms::{envelope, wrap};
use cryptvol::volume::VolumeHeader;

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

fn main() {
    // GO with a name and one BLOCK_SIZE info request.
    let mut go = b"IHAVEOPT".to_vec();
    go.extend_from_slice(&7u32.to_be_bytes());
    go.extend_from_slice(&9u32.to_be_bytes());
    put("nbd_option", "go_header", &go);
    let mut info = 3u32.to_be_bytes().to_vec();
    info.extend_from_slice(b"vol");
    info.extend_from_slice(&1u16.to_be_bytes());
    info.extend_from_slice(&3u16.to_be_bytes());
    put("nbd_option", "go_payload", &info);
    // A WRITE request with FUA, behind limits (size 1 MiB, structured).
    let mut req = (1u64 << 20).to_le_bytes().to_vec();
    req.push(2);
    req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    req.extend_from_slice(&1u16.to_be_bytes());
    req.extend_from_slice(&1u16.to_be_bytes());
    req.extend_from_slice(&7u64.to_be_bytes());
    req.extend_from_slice(&4096u64.to_be_bytes());
    req.extend_from_slice(&512u32.to_be_bytes());
    put("nbd_request", "write_fua", &req);
    let h = VolumeHeader::new(
        uuid::Uuid::from_u128(1),
        1 << 30,
        4096,
        "key",
        1,
        vec![9; 100],
    )
    .expect("header");
    let copy = h.encode().expect("encode");
    put("volume_header", "copy", &copy);
    let ctx = wrap::EncryptionContext::new();
    let blob = wrap::wrap(uuid::Uuid::from_u128(2), 1, &[7u8; 32], &[1u8; 64], &ctx).expect("wrap");
    put("wrapped_dek", "blob", &blob);
    let mut env = Vec::new();
    envelope::encrypt(&[3u8; 32], b"wrapped", &b"hello envelope"[..], &mut env).expect("envelope");
    put("envelope", "small", &env);
}
