//! Transmission: a request header (compact, or 32-byte extended), validated against an export
//! whose size and flags come from the first bytes. Any bytes: a command or a rejection, never
//! a panic.
#![no_main]
use cryptvol::nbd::consts::MAX_PAYLOAD;
use cryptvol::nbd::transmission::{ExportLimits, Framing, parse_request, validate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        let _ = parse_request(data, Framing::Structured);
        let _ = parse_request(data, Framing::Extended);
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let f = data[8];
    let framing = match f >> 4 & 3 {
        0 => Framing::Simple,
        1 => Framing::Structured,
        _ => Framing::Extended,
    };
    let lim = ExportLimits {
        size,
        read_only: f & 1 != 0,
        framing,
        meta_allocation: f & 4 != 0,
        max_payload: if f & 8 != 0 { 64 << 20 } else { MAX_PAYLOAD },
    };
    if let Ok(h) = parse_request(&data[9..], framing) {
        let _ = validate(&h, &lim);
    }
});
