//! Wrapped-DEK blob: parse, then unwrap under a fixed CMK version and context.
#![no_main]
use cryptvol::kms::EncryptionContext;
use cryptvol::kms::wrap::{parse, unwrap};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse(data);
    let material = [7u8; 32];
    let mut ctx = EncryptionContext::new();
    ctx.insert("volume_id".into(), "fuzz".into());
    let _ = unwrap(data, &material, &ctx);
});
