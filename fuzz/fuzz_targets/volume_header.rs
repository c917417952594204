#![no_main]
//! Volume header decoding, alone and as a pair of copies.
use cryptvol::volume::VolumeHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = VolumeHeader::decode(data) {
        // What decodes re-encodes to the same header.
        let again = VolumeHeader::decode(&h.encode().unwrap()).unwrap();
        assert_eq!(again, h);
    }
    let (a, b) = data.split_at(data.len() / 2);
    let _ = VolumeHeader::choose(a, b);
});
