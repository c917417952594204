//! Transmission: a 28-byte request header, validated against an export whose size and flags
//! come from the first bytes. Any bytes: a command or a rejection, never a panic.
#![no_main]
use cryptvol::nbd::transmission::{ExportLimits, parse_request_header, validate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        let _ = parse_request_header(data);
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let f = data[8];
    let lim = ExportLimits {
        size,
        read_only: f & 1 != 0,
        structured: f & 2 != 0,
        meta_allocation: f & 4 != 0,
    };
    if let Ok(h) = parse_request_header(&data[9..]) {
        let _ = validate(&h, &lim);
    }
});
