//! Envelope file: header, then the chunk stream decrypted under a fixed DEK.
#![no_main]
use cryptvol::kms::envelope::{decrypt, read_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    if let Ok((header, _wrapped)) = read_header(&mut input) {
        let dek = [9u8; 32];
        let _ = decrypt(&dek, &header, input, std::io::sink());
    }
});
