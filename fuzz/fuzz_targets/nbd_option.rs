//! Option haggling: the 16-byte option header, then its data as an INFO/GO request and as a
//! meta-context request. Any bytes: a value or an error, never a panic.
#![no_main]
use cryptvol::nbd::handshake::{
    OPTION_HEADER_LEN, parse_info_request, parse_meta_context_request, parse_option_header,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_option_header(data);
    let rest = data.get(OPTION_HEADER_LEN.min(data.len())..).unwrap_or(&[]);
    let _ = parse_info_request(rest);
    let _ = parse_meta_context_request(rest);
    let _ = parse_info_request(data);
    let _ = parse_meta_context_request(data);
});
