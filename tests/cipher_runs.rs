//! The sector cipher over runs of units (the multi-unit paths of both backends,
//! src/volume/xts_batch.rs, and the fused VAES kernel, src/volume/xts_vaes.rs): property
//! tests across unit sizes, run lengths, unit numbers near the u64 wrap and misaligned
//! buffers, the fused kernel against the portable paths (`SectorCipher::portable`), and one
//! comparison with an independent implementation (Python's `cryptography`, OpenSSL
//! underneath).

mod testdata;

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
    testdata::pattern(len, seed)
}

/// First unit numbers of a run: small ones, around 2^32 and up to the u64 wrap.
fn first_units() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..100_000,
        (1u64 << 32) - 70..(1u64 << 32) + 4,
        u64::MAX - 70..=u64::MAX,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Both backends agree on a run of 1..64 units, each unit of the run equals a one-unit call
    /// (so chunking and the interleaved tweak chains change nothing), and decrypt inverts.
    #[test]
    fn runs_agree_across_backends_and_with_single_units(
        small in any::<bool>(),
        units in 1usize..64,
        start in first_units(),
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

/// Whether this CPU runs the fused kernel (the same detection as src/volume/xts_vaes.rs).
fn cpu_has_vaes512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("vaes")
            && is_x86_feature_detected!("vpclmulqdq")
            && is_x86_feature_detected!("aes")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The default ciphers take the fused kernel exactly where the CPU has what it needs, and
/// `portable` never does: so the comparisons below really compare the two paths here.
#[test]
fn fused_kernel_is_used_where_the_cpu_has_it_and_portable_forces_the_fallback() {
    let k = key(5);
    for unit in [UnitSize::B512, UnitSize::B4096] {
        for backend in [CipherBackend::AwsLc, CipherBackend::Soft] {
            let c = SectorCipher::new(&k, unit, backend).unwrap();
            assert_eq!(c.fused(), cpu_has_vaes512(), "{backend:?}");
            let p = SectorCipher::portable(&k, unit, backend).unwrap();
            assert!(!p.fused(), "{backend:?} portable");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// The fused kernel (default ciphers on a VAES CPU) equals the portable paths, both
    /// backends, for runs of 1..63 units at both sizes, unit numbers around 2^32 and the u64
    /// wrap, buffers at any byte offset; every unit of a run equals aws-lc's native one-unit
    /// XTS; decrypt inverts.
    #[test]
    fn fused_kernel_matches_the_portable_paths(
        small in any::<bool>(),
        units in 1usize..64,
        start in first_units(),
        offset in 0usize..64,
        seed in any::<u64>(),
    ) {
        let unit = if small { UnitSize::B512 } else { UnitSize::B4096 };
        let us = unit.bytes();
        let k = key(seed);
        let len = units * us;
        let plain = noise(seed, len);
        let reference = SectorCipher::portable(&k, unit, CipherBackend::Soft).unwrap();
        let mut want = plain.clone();
        reference.encrypt(start, &mut want);
        // aws-lc's native XTS, one unit per call (its portable path for a lone unit).
        let native = SectorCipher::portable(&k, unit, CipherBackend::AwsLc).unwrap();
        for u in [0, units / 2, units - 1] {
            let mut one = plain[u * us..(u + 1) * us].to_vec();
            native.encrypt(start.wrapping_add(u as u64), &mut one);
            prop_assert!(one[..] == want[u * us..(u + 1) * us], "native unit {}", u);
        }
        for backend in [CipherBackend::AwsLc, CipherBackend::Soft] {
            let c = SectorCipher::new(&k, unit, backend).unwrap();
            let mut buf = vec![0u8; len + 64];
            let win = &mut buf[offset..offset + len];
            win.copy_from_slice(&plain);
            c.encrypt(start, win);
            prop_assert!(win[..] == want[..], "{:?} encrypt", backend);
            c.decrypt(start, win);
            prop_assert!(win[..] == plain[..], "{:?} decrypt", backend);
            // The fused decrypt inverts the portable encrypt too (same bytes, other path).
            win.copy_from_slice(&want);
            c.decrypt(start, win);
            prop_assert!(win[..] == plain[..], "{:?} decrypt of portable", backend);
            prop_assert!(buf[..offset].iter().chain(&buf[offset + len..]).all(|&b| b == 0), "bytes outside the run touched");
        }
        // Out of place (reads from a tmpfs mapping): decrypt_to from `want` at any offset into
        // a buffer at another offset gives the plaintext, leaves the source as it was and
        // touches nothing outside the destination; fused and portable, both backends.
        for backend in [CipherBackend::AwsLc, CipherBackend::Soft] {
            for c in [
                SectorCipher::new(&k, unit, backend).unwrap(),
                SectorCipher::portable(&k, unit, backend).unwrap(),
            ] {
                let mut src = vec![0u8; len + 64];
                src[63 - offset..63 - offset + len].copy_from_slice(&want);
                let mut dst = vec![0x77u8; len + 64];
                c.decrypt_to(start, &src[63 - offset..63 - offset + len], &mut dst[offset..offset + len]);
                prop_assert!(dst[offset..offset + len] == plain[..], "{:?} fused {} decrypt_to", backend, c.fused());
                prop_assert!(src[63 - offset..63 - offset + len] == want[..], "source changed");
                prop_assert!(dst[..offset].iter().chain(&dst[offset + len..]).all(|&b| b == 0x77), "bytes outside the destination touched");
            }
        }
    }
}

/// Runs of 512- and 4096-byte units, longer than one 16-unit tweak group and one 8 KiB
/// chunk, around the u64 wrap, against Python's `cryptography` encrypting unit by unit
/// (tweak = the unit number as LE u64 in 16 bytes): the default ciphers (fused kernel on a
/// VAES CPU) and the portable paths.
#[test]
fn runs_of_units_match_python_cryptography() {
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
    for (us, start, units) in [
        (512usize, 0u64, 1usize),
        (512, 1 << 40, 33),
        (512, u64::MAX - 40, 70),
        (4096, (1 << 32) - 3, 1),
        (4096, u64::MAX - 9, 19),
    ] {
        let plain = noise(start, units * us);
        let script = format!(
            r#"
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
key = bytes.fromhex("{}")
data = sys.stdin.buffer.read()
out = bytearray()
for i in range(len(data) // {us}):
    n = ({start} + i) % (1 << 64)
    e = Cipher(algorithms.AES(key), modes.XTS(n.to_bytes(16, "little"))).encryptor()
    out += e.update(data[i * {us}:(i + 1) * {us}]) + e.finalize()
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
        let unit = UnitSize::from_bytes(us as u32).unwrap();
        for backend in [CipherBackend::AwsLc, CipherBackend::Soft] {
            for (c, path) in [
                (SectorCipher::new(&k, unit, backend).unwrap(), "default"),
                (
                    SectorCipher::portable(&k, unit, backend).unwrap(),
                    "portable",
                ),
            ] {
                let mut buf = plain.clone();
                c.encrypt(start, &mut buf);
                assert_eq!(
                    hex::encode(&buf),
                    want,
                    "{backend:?} {path} {us} from unit {start}"
                );
            }
        }
    }
}
