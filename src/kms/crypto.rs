//! The few primitives the key manager uses, all from aws-lc: AES-256-GCM, HKDF-SHA256,
//! SHA-256, and the system random generator.

use crate::secmem::LockedBox;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::{digest, hkdf, rand};

use super::KmsError;

pub const TAG_LEN: usize = 16;

pub fn random(buf: &mut [u8]) -> Result<(), KmsError> {
    rand::fill(buf).map_err(|_| KmsError::Internal("random generator failed".into()))
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, data);
    d.as_ref().try_into().expect("32-byte digest")
}

/// HKDF-SHA256(secret, salt, info) -> 32 bytes, in locked memory.
pub fn hkdf32(secret: &[u8], salt: &[u8], info: &[u8]) -> LockedBox<[u8; 32]> {
    let mut out = LockedBox::<[u8; 32]>::zeroed();
    let info = [info];
    hkdf::Salt::new(hkdf::HKDF_SHA256, salt)
        .extract(secret)
        .expand(&info, hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut out[..]))
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

fn key(k: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k).expect("32-byte AES-256 key"))
}

/// Encrypts `data` in place and appends the tag.
pub fn seal(k: &[u8; 32], nonce: &[u8; NONCE_LEN], aad: &[u8], data: &mut Vec<u8>) {
    key(k)
        .seal_in_place_append_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), data)
        .expect("AES-GCM seal of a bounded buffer");
}

/// Encrypts `data` in place (it may be locked memory: nothing is copied) and returns the tag.
pub fn seal_detached(
    k: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    data: &mut [u8],
) -> [u8; TAG_LEN] {
    let tag = key(k)
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), data)
        .expect("AES-GCM seal of a bounded buffer");
    tag.as_ref().try_into().expect("16-byte tag")
}

/// Opens `data` (ciphertext + tag) in place; returns the plaintext length.
pub fn open(
    k: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    data: &mut [u8],
) -> Result<usize, ()> {
    key(k)
        .open_in_place(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), data)
        .map(|p| p.len())
        .map_err(|_| ())
}
