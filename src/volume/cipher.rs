//! The sector cipher: AES-256-XTS over data units of 512 or 4096 bytes, tweak = the unit's
//! index as a little-endian u64 in a 16-byte block (dm-crypt `aes-xts-plain64`).
//!
//! Two backends behind [`XtsBackend`], always tested against each other:
//! - [`awslc::AwsLcXts`] (default): aws-lc's EVP AES-256-XTS, which uses VAES/AVX-512 where the
//!   CPU has them;
//! - [`soft::SoftXts`]: the RustCrypto `aes` crate with a hand-written XTS that computes a whole
//!   chunk's tweaks first and hands all its blocks to `encrypt_blocks` at once (VAES or AES-NI
//!   keep many blocks in flight). The `xts-mode` crate is not used: it encrypts one 16-byte
//!   block at a time and measured 0.03x `openssl speed -evp aes-256-xts` here.
//!
//! Where the CPU has VAES/AVX-512, both backends run `xts_vaes`: one fused
//! kernel for a whole run of units, tweaks in registers (bit-identical, tests/cipher_runs.rs).
//! Elsewhere runs of 512-byte units take the multi-unit path of `xts_batch` in both backends.
//!
//! The cipher never touches a file: it transforms buffers in place.

use zeroize::Zeroize;

use crate::secmem::LockedBox;

use super::VolumeError;

/// Bytes in an AES-256-XTS key: two AES-256 keys (data key, tweak key).
pub const XTS_KEY_LEN: usize = 64;

/// A 512-bit XTS key in locked memory (`crate::secmem`: mlocked where RLIMIT_MEMLOCK allows,
/// excluded from core dumps, zeroized on drop); no `Debug`, no `Clone`.
pub struct XtsKey(LockedBox<[u8; XTS_KEY_LEN]>);

impl XtsKey {
    /// Takes a DEK as unwrapped by the key manager. Rejects a wrong length and a key whose two
    /// halves are equal (NIST SP 800-38E; FIPS 140-3 IG C.I): XTS is then not a tweakable cipher.
    pub fn new(bytes: &[u8]) -> Result<XtsKey, VolumeError> {
        if bytes.len() != XTS_KEY_LEN {
            return Err(VolumeError::BadKey("data key must be 512 bits"));
        }
        let (a, b) = bytes.split_at(32);
        // Constant-time comparison: a timing leak here would reveal key structure.
        let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
        if diff == 0 {
            return Err(VolumeError::BadKey("data key halves are equal"));
        }
        let mut key = LockedBox::<[u8; XTS_KEY_LEN]>::zeroed();
        key.copy_from_slice(bytes);
        Ok(XtsKey(key))
    }

    pub(crate) fn bytes(&self) -> &[u8; XTS_KEY_LEN] {
        &self.0
    }
}

/// Data-unit sizes the format allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitSize {
    B512,
    B4096,
}

impl UnitSize {
    pub fn from_bytes(n: u32) -> Option<UnitSize> {
        match n {
            512 => Some(UnitSize::B512),
            4096 => Some(UnitSize::B4096),
            _ => None,
        }
    }
    pub const fn bytes(self) -> usize {
        match self {
            UnitSize::B512 => 512,
            UnitSize::B4096 => 4096,
        }
    }
}

/// One XTS implementation. `data.len()` is a multiple of `unit`; unit *k* of `data` is
/// transformed with tweak `first_unit + k`.
pub trait XtsBackend: Send + Sync {
    fn encrypt(&self, first_unit: u64, unit: UnitSize, data: &mut [u8]);
    fn decrypt(&self, first_unit: u64, unit: UnitSize, data: &mut [u8]);
    /// Decrypts whole units of `src` into `dst` (same length). Backends with an out-of-place
    /// kernel save the copy this default makes.
    fn decrypt_to(&self, first_unit: u64, unit: UnitSize, src: &[u8], dst: &mut [u8]) {
        dst.copy_from_slice(src);
        self.decrypt(first_unit, unit, dst);
    }
    /// Whether calls at some unit size go through the fused VAES kernel (`xts_vaes`).
    fn fused(&self) -> bool {
        false
    }
}

/// Which implementation a [`SectorCipher`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    #[default]
    AwsLc,
    Soft,
}

/// The cipher of one volume: a backend keyed with the volume's DEK and its unit size.
pub struct SectorCipher {
    inner: Box<dyn XtsBackend>,
    unit: UnitSize,
}

impl SectorCipher {
    pub fn new(
        key: &XtsKey,
        unit: UnitSize,
        backend: Backend,
    ) -> Result<SectorCipher, VolumeError> {
        let inner: Box<dyn XtsBackend> = match backend {
            Backend::AwsLc => Box::new(super::awslc::AwsLcXts::new(key)?),
            Backend::Soft => Box::new(super::soft::SoftXts::new(key)),
        };
        Ok(SectorCipher { inner, unit })
    }

    /// As [`SectorCipher::new`] but never on the fused VAES kernel (`xts_vaes`): the paths a
    /// CPU without VAES/AVX-512 takes, for tests and benchmarks that compare the two.
    #[doc(hidden)]
    pub fn portable(
        key: &XtsKey,
        unit: UnitSize,
        backend: Backend,
    ) -> Result<SectorCipher, VolumeError> {
        let inner: Box<dyn XtsBackend> = match backend {
            Backend::AwsLc => Box::new(super::awslc::AwsLcXts::portable(key)?),
            Backend::Soft => Box::new(super::soft::SoftXts::portable(key)),
        };
        Ok(SectorCipher { inner, unit })
    }

    /// Whether this cipher runs the fused VAES kernel (`xts_vaes`) at some unit size.
    #[doc(hidden)]
    pub fn fused(&self) -> bool {
        self.inner.fused()
    }

    pub fn unit(&self) -> UnitSize {
        self.unit
    }

    /// Encrypts whole units in place, the first one being unit `first_unit`.
    pub fn encrypt(&self, first_unit: u64, data: &mut [u8]) {
        debug_assert_eq!(data.len() % self.unit.bytes(), 0, "whole units only");
        self.inner.encrypt(first_unit, self.unit, data);
    }

    /// Decrypts whole units in place, the first one being unit `first_unit`.
    pub fn decrypt(&self, first_unit: u64, data: &mut [u8]) {
        debug_assert_eq!(data.len() % self.unit.bytes(), 0, "whole units only");
        self.inner.decrypt(first_unit, self.unit, data);
    }

    /// Decrypts whole units of `src` into `dst`, which must be as long (one pass on the fused
    /// kernel; a copy and [`decrypt`](Self::decrypt) elsewhere).
    pub fn decrypt_to(&self, first_unit: u64, src: &[u8], dst: &mut [u8]) {
        assert_eq!(src.len(), dst.len(), "decrypt_to: lengths differ");
        debug_assert_eq!(src.len() % self.unit.bytes(), 0, "whole units only");
        self.inner.decrypt_to(first_unit, self.unit, src, dst);
    }
}

/// The 16-byte plain64 IV of a unit.
pub(crate) fn plain64_iv(unit: u64) -> [u8; 16] {
    let mut iv = [0u8; 16];
    iv[..8].copy_from_slice(&unit.to_le_bytes());
    iv
}

/// Wipes a buffer that held plaintext.
pub(crate) fn wipe(buf: &mut [u8]) {
    buf.zeroize();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> XtsKey {
        let bytes: Vec<u8> = (0..64u8)
            .map(|i| i.wrapping_mul(31).wrapping_add(seed))
            .collect();
        XtsKey::new(&bytes).unwrap()
    }

    #[test]
    fn rejects_equal_halves_and_bad_length() {
        assert!(XtsKey::new(&[7u8; 64]).is_err());
        assert!(XtsKey::new(&[7u8; 32]).is_err());
        assert!(XtsKey::new(&[0u8; 65]).is_err());
    }

    /// IEEE 1619-2007 XTS-AES-256 vector 10: key1 = 2718281828459045235360287471352662497757247
    /// 09369995957496696762772407663, key2 = 3141592653589793238462643383279502884197169
    /// 3993751058209749445923078164062, data-unit sequence number 0xff, 512 bytes 00..ff,00..ff.
    const V10_KEY: &str = "27182818284590452353602874713526624977572470936999595749669676273141592653589793238462643383279502884197169399375105820974944592";
    const V10_CT: &str = "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed43851ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151";
    /// Vector 11: same keys, sequence number 0xffff.
    const V11_CT_HEAD: &str = "77a31251618a15e6b92d1d66dffe7b50b50bad552305ba0217a610688eff7e11";
    const V11_CT_TAIL: &str = "54fbff89eeaeea791f4a7ab1f9868294a4f9e27b42af8100cb9d59cef9645803";

    fn vector_plain() -> Vec<u8> {
        (0..512).map(|i| (i % 256) as u8).collect()
    }

    #[test]
    fn ieee1619_vectors_both_backends() {
        let k = XtsKey::new(&hex::decode(V10_KEY).unwrap()).unwrap();
        for backend in [Backend::AwsLc, Backend::Soft] {
            let c = SectorCipher::new(&k, UnitSize::B512, backend).unwrap();
            let mut buf = vector_plain();
            c.encrypt(0xff, &mut buf);
            assert_eq!(hex::encode(&buf), V10_CT, "{backend:?} vector 10");
            c.decrypt(0xff, &mut buf);
            assert_eq!(buf, vector_plain());
            let mut buf = vector_plain();
            c.encrypt(0xffff, &mut buf);
            assert_eq!(
                hex::encode(&buf[..32]),
                V11_CT_HEAD,
                "{backend:?} vector 11 head"
            );
            assert_eq!(
                hex::encode(&buf[480..]),
                V11_CT_TAIL,
                "{backend:?} vector 11 tail"
            );
        }
    }

    #[test]
    fn backends_agree_on_random_data_and_units() {
        use proptest::prelude::*;
        let k = key(3);
        let hw = SectorCipher::new(&k, UnitSize::B4096, Backend::AwsLc).unwrap();
        let sw = SectorCipher::new(&k, UnitSize::B4096, Backend::Soft).unwrap();
        let hw5 = SectorCipher::new(&k, UnitSize::B512, Backend::AwsLc).unwrap();
        let sw5 = SectorCipher::new(&k, UnitSize::B512, Backend::Soft).unwrap();
        proptest!(ProptestConfig::with_cases(64), |(
            start in prop_oneof![0u64..1000, (1u64 << 32) - 4..(1u64 << 32) + 4, u64::MAX - 8..u64::MAX - 4],
            units in 1usize..5, seed in any::<u64>(), small in any::<bool>())| {
            let (a, b, us) = if small { (&hw5, &sw5, 512) } else { (&hw, &sw, 4096) };
            let mut x = seed;
            let plain: Vec<u8> = (0..units * us).map(|_| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x as u8 }).collect();
            let mut p = plain.clone();
            let mut q = plain.clone();
            a.encrypt(start, &mut p);
            b.encrypt(start, &mut q);
            prop_assert_eq!(&p, &q);
            prop_assert_ne!(&p, &plain);
            // Unit k of a multi-unit call equals a single-unit call at start + k.
            if units > 1 {
                let mut one = plain[us..2 * us].to_vec();
                a.encrypt(start.wrapping_add(1), &mut one);
                prop_assert_eq!(&one[..], &p[us..2 * us]);
            }
            a.decrypt(start, &mut q);
            b.decrypt(start, &mut p);
            prop_assert_eq!(&p, &plain);
            prop_assert_eq!(&q, &plain);
        });
    }
}
