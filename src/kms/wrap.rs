//! The wrapped-DEK blob (`docs/key-format.md`):
//!
//! ```text
//! off len field
//!   0   4 magic "CVWK"
//!   4   1 format version (1)
//!   5   1 algorithm (1 = AES-256-GCM, key = HKDF-SHA256(CMK version material, salt);
//!                    2 = AES-256-GCM inside a PKCS#11 token with the CMK version's object)
//!   6  16 CMK id (uuid bytes)
//!  22   4 CMK version (BE)
//!  26  32 salt
//!  58  12 nonce
//!  70   n ciphertext (n = blob length - 86)
//! 70+n 16 tag
//! ```
//! AAD = bytes 0..70 followed by the canonical encryption context.

use uuid::Uuid;

use super::KmsError;
use super::crypto::{self, TAG_LEN};
use super::secret::Secret;

pub const MAGIC: &[u8; 4] = b"CVWK";
pub const VERSION: u8 = 1;
pub const ALG_AES256GCM_HKDF: u8 = 1;
/// `CKM_AES_GCM` inside a PKCS#11 token, key = the CMK version's token object (custody
/// `pkcs11`); the salt field is random and authenticated but derives nothing.
pub const ALG_PKCS11_AES256GCM: u8 = 2;
pub const HEADER_LEN: usize = 70;
/// Largest plaintext wrapped: 8192 bits.
pub const MAX_PLAIN: usize = 1024;
/// Largest plaintext of encrypt-data.
pub const MAX_DATA: usize = 4096;

pub type EncryptionContext = std::collections::BTreeMap<String, String>;

/// The parsed, not yet authenticated, header of a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedHeader {
    pub key_id: Uuid,
    pub key_version: u32,
    /// Algorithm byte: tells the custody that made the blob.
    pub alg: u8,
}

/// The 70-byte header (also the first part of the AAD).
pub fn header(
    alg: u8,
    key_id: Uuid,
    key_version: u32,
    salt: &[u8; 32],
    nonce: &[u8; 12],
) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN + MAX_DATA + TAG_LEN);
    h.extend_from_slice(MAGIC);
    h.push(VERSION);
    h.push(alg);
    h.extend_from_slice(key_id.as_bytes());
    h.extend_from_slice(&key_version.to_be_bytes());
    h.extend_from_slice(salt);
    h.extend_from_slice(nonce);
    h
}

/// Checks a plaintext length for wrapping: 1..=`max` bytes.
pub fn check_plain(plain: &[u8], max: usize) -> Result<(), KmsError> {
    if plain.is_empty() || plain.len() > max {
        return Err(KmsError::InvalidParameter(format!(
            "plain text must be 1..{max} bytes"
        )));
    }
    Ok(())
}

/// Canonical context bytes: count, then (key, value) each u32-length-prefixed, keys sorted.
pub fn canonical_context(ctx: &EncryptionContext) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(ctx.len() as u32).to_be_bytes());
    for (k, val) in ctx {
        for s in [k, val] {
            v.extend_from_slice(&(s.len() as u32).to_be_bytes());
            v.extend_from_slice(s.as_bytes());
        }
    }
    v
}

fn derive(material: &[u8], salt: &[u8]) -> crate::secmem::LockedBox<[u8; 32]> {
    crypto::hkdf32(material, salt, b"cryptvol wrap v1")
}

/// Wraps a data key (1..1024 bytes) under one CMK version's material.
pub fn wrap(
    key_id: Uuid,
    key_version: u32,
    material: &[u8],
    plain: &[u8],
    ctx: &EncryptionContext,
) -> Result<Vec<u8>, KmsError> {
    if plain.is_empty() || plain.len() > MAX_PLAIN {
        return Err(KmsError::InvalidParameter(
            "plain text must be 1..1024 bytes".into(),
        ));
    }
    wrap_any(key_id, key_version, material, plain, ctx)
}

/// Wraps up to 4096 bytes (encrypt-data).
pub fn wrap_any(
    key_id: Uuid,
    key_version: u32,
    material: &[u8],
    plain: &[u8],
    ctx: &EncryptionContext,
) -> Result<Vec<u8>, KmsError> {
    if plain.is_empty() || plain.len() > MAX_DATA {
        return Err(KmsError::InvalidParameter(
            "plain text must be 1..4096 bytes".into(),
        ));
    }
    let mut salt = [0u8; 32];
    let mut nonce = [0u8; 12];
    crypto::random(&mut salt)?;
    crypto::random(&mut nonce)?;
    let mut blob = header(ALG_AES256GCM_HKDF, key_id, key_version, &salt, &nonce);
    let mut aad = blob.clone();
    aad.extend_from_slice(&canonical_context(ctx));
    // Encrypted in locked memory: the plaintext is never copied to the ordinary heap.
    let mut body = Secret::from_slice(plain);
    let tag = crypto::seal_detached(&derive(material, &salt), &nonce, &aad, body.expose_mut());
    blob.extend_from_slice(body.expose());
    blob.extend_from_slice(&tag);
    Ok(blob)
}

/// Reads the header of a blob; any byte string gives a header or an error, never a panic.
pub fn parse(blob: &[u8]) -> Result<WrappedHeader, KmsError> {
    let bad = || KmsError::InvalidCiphertext("not a cryptvol wrapped key".into());
    if blob.len() < HEADER_LEN + TAG_LEN + 1 || blob.len() > HEADER_LEN + TAG_LEN + MAX_DATA {
        return Err(bad());
    }
    if &blob[0..4] != MAGIC
        || blob[4] != VERSION
        || ![ALG_AES256GCM_HKDF, ALG_PKCS11_AES256GCM].contains(&blob[5])
    {
        return Err(bad());
    }
    Ok(WrappedHeader {
        key_id: Uuid::from_bytes(blob[6..22].try_into().expect("16 bytes")),
        key_version: u32::from_be_bytes(blob[22..26].try_into().expect("4 bytes")),
        alg: blob[5],
    })
}

/// Unwraps a blob with the material of the version its header names.
pub fn unwrap(blob: &[u8], material: &[u8], ctx: &EncryptionContext) -> Result<Secret, KmsError> {
    if parse(blob)?.alg != ALG_AES256GCM_HKDF {
        return Err(KmsError::InvalidCiphertext(
            "cipher text is not of this key's custody".into(),
        ));
    }
    let salt = &blob[26..58];
    let nonce: [u8; 12] = blob[58..70].try_into().expect("12 bytes");
    let mut aad = blob[..HEADER_LEN].to_vec();
    aad.extend_from_slice(&canonical_context(ctx));
    let mut body = Secret::from_slice(&blob[HEADER_LEN..]);
    let n =
        crypto::open(&derive(material, salt), &nonce, &aad, body.expose_mut()).map_err(|_| {
            KmsError::InvalidCiphertext(
                "cipher text does not decrypt under this key and encryption context".into(),
            )
        })?;
    body.truncate(n);
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ctx(v: &str) -> EncryptionContext {
        [("volume_id".to_string(), v.to_string())].into()
    }

    #[test]
    fn round_trip_and_tamper() {
        let id = Uuid::from_u128(7);
        let blob = wrap(id, 2, &[5u8; 32], &[9u8; 64], &ctx("a")).unwrap();
        assert_eq!(
            parse(&blob).unwrap(),
            WrappedHeader {
                key_id: id,
                key_version: 2,
                alg: ALG_AES256GCM_HKDF,
            }
        );
        assert_eq!(
            unwrap(&blob, &[5u8; 32], &ctx("a")).unwrap().expose(),
            &[9u8; 64]
        );
        assert!(
            unwrap(&blob, &[5u8; 32], &ctx("b")).is_err(),
            "other context"
        );
        assert!(unwrap(&blob, &[6u8; 32], &ctx("a")).is_err(), "other key");
        for i in 0..blob.len() {
            let mut t = blob.clone();
            t[i] ^= 1;
            assert!(unwrap(&t, &[5u8; 32], &ctx("a")).is_err(), "flip at {i}");
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = parse(&bytes);
            let _ = unwrap(&bytes, &[1u8; 32], &EncryptionContext::new());
        }
    }
}
