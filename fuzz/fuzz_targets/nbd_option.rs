#![no_main]
//! Option-haggling parsers: any bytes give a value or an error, never a panic.
use cryptvol::nbd::handshake::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_client_flags(data);
    let _ = parse_option_header(data);
    let _ = parse_info_request(data);
    let _ = parse_meta_context_request(data);
});
