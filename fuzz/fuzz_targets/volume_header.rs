//! Volume header: one copy decoded, and two copies (the input split in half) chosen between.
#![no_main]
use cryptvol::volume::VolumeHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = VolumeHeader::decode(data) {
        // A header that decodes must encode again.
        let _ = h.encode();
    }
    let (a, b) = data.split_at(data.len() / 2);
    let _ = VolumeHeader::choose(a, b);
});
