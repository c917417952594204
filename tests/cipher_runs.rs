//! The sector cipher over runs of units (the multi-unit paths of both backends,
//! src/volume/xts_batch.rs): property tests across unit sizes, run lengths and unit numbers
//! near the u64 wrap, and one comparison with an independent implementation (Python's
//! `cryptography`, OpenSSL underneath) for 512-byte units.

use std::io::Write;
use std::process::{Command, Stdio};

use cryptvol::volume::{CipherBackend, SectorCipher, UnitSize, XtsKey};
use proptest::prelude::*;

fn key(seed: u64) -> XtsKey {
    let mut x = seed | 1;
    let bytes: Vec<u8> = (0..64)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    XtsKey::new(&bytes).unwrap()
}

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Both backends agree on a run of 1..64 units, each unit of the run equals a one-unit call
    /// (so chunking and the interleaved tweak chains change nothing), and decrypt inverts.
    #[test]
    fn runs_agree_across_backends_and_with_single_units(
        small in any::<bool>(),
        units in 1usize..64,
        start in prop_oneof![
            0u64..100_000,
            (1u64 << 32) - 70..(1u64 << 32) + 4,
            u64::MAX - 70..=u64::MAX,
        ],
        seed in any::<u64>(),
    ) {
        let unit = if small { UnitSize::B512 } else { UnitSize::B4096 };
        let us = unit.bytes();
        let k = key(seed);
        let hw = SectorCipher::new(&k, unit, CipherBackend::AwsLc).unwrap();
        let sw = SectorCipher::new(&k, unit, CipherBackend::Soft).unwrap();
        let plain = noise(seed, units * us);
        let mut a = plain.clone();
        let mut b = plain.clone();
        hw.encrypt(start, &mut a);
        sw.encrypt(start, &mut b);
        prop_assert!(a == b, "backends differ");
        for u in [0, units / 2, units - 1] {
            let mut one = plain[u * us..(u + 1) * us].to_vec();
            hw.encrypt(start.wrapping_add(u as u64), &mut one);
            prop_assert!(one[..] == a[u * us..(u + 1) * us], "unit {} of the run", u);
            let mut one = plain[u * us..(u + 1) * us].to_vec();
            sw.encrypt(start.wrapping_add(u as u64), &mut one);
            prop_assert!(one[..] == a[u * us..(u + 1) * us], "soft unit {} of the run", u);
        }
        // Distinct units with equal plaintext must differ (tweaks really vary per unit).
        if units > 1 {
            let mut same = vec![0x5au8; 2 * us];
            hw.encrypt(start, &mut same);
            prop_assert!(same[..us] != same[us..]);
        }
        hw.decrypt(start, &mut b);
        sw.decrypt(start, &mut a);
        prop_assert!(a == plain, "soft decrypt");
        prop_assert!(b == plain, "aws-lc decrypt");
    }
}

/// 512-byte units, runs longer than one 16 KiB chunk, around the u64 wrap, against Python's
/// `cryptography` encrypting unit by unit (tweak = the unit number as LE u64 in 16 bytes).
#[test]
fn runs_of_512_byte_units_match_python_cryptography() {
    let have = Command::new("/usr/bin/python3")
        .args(["-c", "import cryptography"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        have,
        "python3-cryptography is required (.ci/run installs it)"
    );
    let key_bytes = noise(7, 64);
    let k = XtsKey::new(&key_bytes).unwrap();
    for (start, units) in [(0u64, 1usize), (1 << 40, 33), (u64::MAX - 40, 70)] {
        let plain = noise(start, units * 512);
        let script = format!(
            r#"
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
key = bytes.fromhex("{}")
data = sys.stdin.buffer.read()
out = bytearray()
for i in range(len(data) // 512):
    n = ({start} + i) % (1 << 64)
    e = Cipher(algorithms.AES(key), modes.XTS(n.to_bytes(16, "little"))).encryptor()
    out += e.update(data[i * 512:(i + 1) * 512]) + e.finalize()
sys.stdout.write(bytes(out).hex())
"#,
            hex::encode(&key_bytes)
        );
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&plain).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "python failed");
        let want = String::from_utf8(out.stdout).unwrap();
        for backend in [CipherBackend::AwsLc, CipherBackend::Soft] {
            let c = SectorCipher::new(&k, UnitSize::B512, backend).unwrap();
            let mut buf = plain.clone();
            c.encrypt(start, &mut buf);
            assert_eq!(hex::encode(&buf), want, "{backend:?} from unit {start}");
        }
    }
}
