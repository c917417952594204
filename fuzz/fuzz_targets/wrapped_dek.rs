#![no_main]
//! Wrapped data-key blobs: parse and unwrap never panic and never yield a key for garbage.
use cryptvol::kms::wrap;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wrap::parse(data);
    assert!(wrap::unwrap(data, &[7u8; 32], &Default::default()).is_err() || data.len() > 86);
});
