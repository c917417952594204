#![no_main]
//! Envelope files: header parsing and chunk decryption of arbitrary input.
use cryptvol::kms::envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    if let Ok((header, _wrapped)) = envelope::read_header(&mut r) {
        let _ = envelope::decrypt(&[3u8; 32], &header, r, std::io::sink());
    }
});
