#![no_main]
//! Request header parsing and validation against export limits taken from the input.
use cryptvol::nbd::transmission::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let lim = ExportLimits {
        size: u64::from_le_bytes(data[..8].try_into().unwrap()),
        read_only: data[8] & 1 != 0,
        structured: data[8] & 2 != 0,
        meta_allocation: data[8] & 4 != 0,
    };
    if let Ok(h) = parse_request_header(&data[9..]) {
        if let Ok(Command::Read { offset, length, .. } | Command::Write { offset, length, .. }) = validate(&h, &lim) {
            assert!(offset.checked_add(u64::from(length)).is_some_and(|e| e <= lim.size));
        }
    }
});
