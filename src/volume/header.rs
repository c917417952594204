//! The volume header: bytes <-> [`VolumeHeader`]. Two 4 KiB copies at offsets 0 and 4096, each
//! with its own generation and SHA-256; the valid copy with the higher generation wins. An
//! update writes copy A, syncs, writes copy B, syncs: a cut at any byte leaves one valid copy.
//! Layout, byte by byte: `docs/volume-format.md`.
#![forbid(unsafe_code)]

use aws_lc_rs::digest;
use uuid::Uuid;

use super::VolumeError;

pub const MAGIC: &[u8; 8] = b"CRYPTVOL";
pub const FORMAT_VERSION: u32 = 1;
/// Bytes in one header copy.
pub const HEADER_COPY_LEN: usize = 4096;
/// Offsets of the two copies.
pub const COPY_OFFSETS: [u64; 2] = [0, HEADER_COPY_LEN as u64];
/// The data area starts here (1 MiB-aligned).
pub const DATA_OFFSET: u64 = 1 << 20;
pub const CIPHER_NAME: &str = "aes-xts-plain64";
pub const KEY_BITS: u32 = 512;
/// Largest wrapped DEK a header holds.
pub const MAX_WRAPPED_DEK: usize = 2048;
const KEY_ID_LEN: usize = 64;
const CIPHER_LEN: usize = 32;
const CHECKSUM_AT: usize = HEADER_COPY_LEN - 32;
/// Feature flags (u32) sit just before the checksum; zero in volumes made before they existed.
const FLAGS_AT: usize = CHECKSUM_AT - 4;
/// Flag: all-zero plaintext units are stored encrypted, not as zeros (see `Volume`).
pub const FLAG_ENCRYPT_ZEROES: u32 = 1;
const KNOWN_FLAGS: u32 = FLAG_ENCRYPT_ZEROES;

/// What a header says. No secrets: the DEK is wrapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeHeader {
    pub format_version: u32,
    /// Bumped on every rewrite; picks the newer of two valid copies.
    pub generation: u64,
    pub volume_id: Uuid,
    pub size: u64,
    pub sector_size: u32,
    pub key_id: String,
    pub key_version: u32,
    pub wrapped_dek: Vec<u8>,
    pub data_offset: u64,
    /// Feature flags ([`FLAG_ENCRYPT_ZEROES`]); an unknown bit is refused.
    pub flags: u32,
}

impl VolumeHeader {
    /// A new header at generation 1 with the standard data offset.
    pub fn new(
        volume_id: Uuid,
        size: u64,
        sector_size: u32,
        key_id: &str,
        key_version: u32,
        wrapped_dek: Vec<u8>,
    ) -> Result<VolumeHeader, VolumeError> {
        let h = VolumeHeader {
            format_version: FORMAT_VERSION,
            generation: 1,
            volume_id,
            size,
            sector_size,
            key_id: key_id.to_owned(),
            key_version,
            wrapped_dek,
            data_offset: DATA_OFFSET,
            flags: 0,
        };
        h.validate()?;
        Ok(h)
    }

    /// Whether all-zero plaintext is stored encrypted (no thin zeros; holes only from TRIM
    /// and WRITE_ZEROES).
    pub fn encrypt_zeroes(&self) -> bool {
        self.flags & FLAG_ENCRYPT_ZEROES != 0
    }

    pub fn cipher(&self) -> &'static str {
        CIPHER_NAME
    }

    fn validate(&self) -> Result<(), VolumeError> {
        let bad = |why: &'static str| Err(VolumeError::BadHeader(why));
        if self.sector_size != 512 && self.sector_size != 4096 {
            return bad("sector size must be 512 or 4096");
        }
        if self.size == 0 || !self.size.is_multiple_of(u64::from(self.sector_size)) {
            return bad("size must be a positive multiple of the sector size");
        }
        if !self.data_offset.is_multiple_of(1 << 20)
            || self.data_offset < 2 * HEADER_COPY_LEN as u64
        {
            return bad("data offset must be 1 MiB-aligned");
        }
        if self
            .size
            .checked_add(self.data_offset)
            .is_none_or(|e| e > i64::MAX as u64)
        {
            return bad("size too large");
        }
        if self.key_id.is_empty() || self.key_id.len() > KEY_ID_LEN || !self.key_id.is_ascii() {
            return bad("key id must be 1..64 ASCII bytes");
        }
        if self.wrapped_dek.is_empty() || self.wrapped_dek.len() > MAX_WRAPPED_DEK {
            return bad("wrapped key length out of range");
        }
        if self.flags & !KNOWN_FLAGS != 0 {
            return bad("unknown feature flags (made by a newer cryptvol?)");
        }
        Ok(())
    }

    /// One header copy, checksum included.
    pub fn encode(&self) -> Result<[u8; HEADER_COPY_LEN], VolumeError> {
        self.validate()?;
        let mut b = [0u8; HEADER_COPY_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_COPY_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.generation.to_le_bytes());
        b[24..40].copy_from_slice(self.volume_id.as_bytes());
        b[40..48].copy_from_slice(&self.size.to_le_bytes());
        b[48..52].copy_from_slice(&self.sector_size.to_le_bytes());
        b[52..56].copy_from_slice(&KEY_BITS.to_le_bytes());
        b[56..56 + CIPHER_NAME.len()].copy_from_slice(CIPHER_NAME.as_bytes());
        b[88..96].copy_from_slice(&self.data_offset.to_le_bytes());
        b[96..96 + self.key_id.len()].copy_from_slice(self.key_id.as_bytes());
        b[160..164].copy_from_slice(&self.key_version.to_le_bytes());
        b[164..166].copy_from_slice(&(self.wrapped_dek.len() as u16).to_le_bytes());
        b[166..166 + self.wrapped_dek.len()].copy_from_slice(&self.wrapped_dek);
        b[FLAGS_AT..CHECKSUM_AT].copy_from_slice(&self.flags.to_le_bytes());
        let sum = digest::digest(&digest::SHA256, &b[..CHECKSUM_AT]);
        b[CHECKSUM_AT..].copy_from_slice(sum.as_ref());
        Ok(b)
    }

    /// Parses one copy. Any byte string gives a header or an error, never a panic.
    pub fn decode(b: &[u8]) -> Result<VolumeHeader, VolumeError> {
        let bad = |why: &'static str| Err(VolumeError::BadHeader(why));
        if b.len() < HEADER_COPY_LEN {
            return bad("header truncated");
        }
        let b = &b[..HEADER_COPY_LEN];
        if &b[0..8] != MAGIC {
            return bad("not a cryptvol volume (bad magic)");
        }
        let sum = digest::digest(&digest::SHA256, &b[..CHECKSUM_AT]);
        if sum.as_ref() != &b[CHECKSUM_AT..] {
            return bad("header checksum mismatch");
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let format_version = u32_at(8);
        if format_version != FORMAT_VERSION {
            return bad("unsupported format version");
        }
        if u32_at(12) as usize != HEADER_COPY_LEN {
            return bad("unexpected header length");
        }
        if u32_at(52) != KEY_BITS {
            return bad("unsupported key size");
        }
        let cipher = trim_nul(&b[56..56 + CIPHER_LEN]);
        if cipher != CIPHER_NAME.as_bytes() {
            return bad("unsupported cipher");
        }
        let key_id = std::str::from_utf8(trim_nul(&b[96..96 + KEY_ID_LEN]))
            .map_err(|_| VolumeError::BadHeader("key id is not text"))?
            .to_owned();
        let dek_len = usize::from(u16::from_le_bytes([b[164], b[165]]));
        if dek_len == 0 || dek_len > MAX_WRAPPED_DEK {
            return bad("wrapped key length out of range");
        }
        let h = VolumeHeader {
            format_version,
            generation: u64_at(16),
            volume_id: Uuid::from_bytes(b[24..40].try_into().expect("16 bytes")),
            size: u64_at(40),
            sector_size: u32_at(48),
            key_id,
            key_version: u32_at(160),
            wrapped_dek: b[166..166 + dek_len].to_vec(),
            data_offset: u64_at(88),
            flags: u32_at(FLAGS_AT),
        };
        h.validate()?;
        Ok(h)
    }

    /// Picks the header from the two copies: the valid one with the higher generation.
    /// Both bad: the first copy's error.
    pub fn choose(a: &[u8], b: &[u8]) -> Result<(VolumeHeader, [bool; 2]), VolumeError> {
        match (VolumeHeader::decode(a), VolumeHeader::decode(b)) {
            (Ok(x), Ok(y)) => {
                let fresh = [x.generation >= y.generation, y.generation >= x.generation];
                Ok((if y.generation > x.generation { y } else { x }, fresh))
            }
            (Ok(x), Err(_)) => Ok((x, [true, false])),
            (Err(_), Ok(y)) => Ok((y, [false, true])),
            (Err(e), Err(_)) => Err(e),
        }
    }
}

fn trim_nul(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> VolumeHeader {
        VolumeHeader::new(
            Uuid::from_u128(0x1234),
            1 << 30,
            4096,
            "key-1",
            3,
            vec![9; 120],
        )
        .unwrap()
    }

    #[test]
    fn round_trip_and_field_positions() {
        let h = sample();
        let b = h.encode().unwrap();
        assert_eq!(&b[0..8], b"CRYPTVOL"); // magic
        assert_eq!(&b[8..12], &1u32.to_le_bytes()); // format version
        assert_eq!(&b[40..48], &(1u64 << 30).to_le_bytes()); // size
        assert_eq!(&b[48..52], &4096u32.to_le_bytes()); // sector size
        assert_eq!(&b[56..71], b"aes-xts-plain64"); // cipher
        assert_eq!(&b[88..96], &(1u64 << 20).to_le_bytes()); // data offset
        assert_eq!(&b[4060..4064], &[0; 4]); // flags: none
        assert_eq!(VolumeHeader::decode(&b).unwrap(), h);
    }

    #[test]
    fn encrypt_zeroes_flag_round_trips_and_unknown_flags_are_refused() {
        let mut h = sample();
        assert!(!h.encrypt_zeroes());
        h.flags = FLAG_ENCRYPT_ZEROES;
        let b = h.encode().unwrap();
        assert_eq!(&b[4060..4064], &1u32.to_le_bytes());
        let d = VolumeHeader::decode(&b).unwrap();
        assert!(d.encrypt_zeroes());
        assert_eq!(d, h);
        // A header with a flag this version does not know (checksum fixed) is refused.
        let mut c = b;
        c[4061] = 0x80;
        let sum = digest::digest(&digest::SHA256, &c[..CHECKSUM_AT]);
        c[CHECKSUM_AT..].copy_from_slice(sum.as_ref());
        assert!(VolumeHeader::decode(&c).is_err());
        h.flags = 2;
        assert!(h.encode().is_err());
    }

    #[test]
    fn any_flipped_bit_is_detected() {
        let b = sample().encode().unwrap();
        for i in (0..HEADER_COPY_LEN).step_by(7) {
            let mut c = b;
            c[i] ^= 0x10;
            assert!(VolumeHeader::decode(&c).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn choose_prefers_valid_then_newer() {
        let mut h = sample();
        let a = h.encode().unwrap();
        h.generation = 2;
        let b = h.encode().unwrap();
        assert_eq!(VolumeHeader::choose(&a, &b).unwrap().0.generation, 2);
        let mut broken = b;
        broken[100] ^= 1;
        assert_eq!(VolumeHeader::choose(&a, &broken).unwrap().0.generation, 1);
        assert!(VolumeHeader::choose(&broken, &[0u8; 4096]).is_err());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = VolumeHeader::decode(&bytes);
        }
        #[test]
        fn valid_magic_garbage_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 4096)) {
            bytes[..8].copy_from_slice(MAGIC);
            let sum = digest::digest(&digest::SHA256, &bytes[..CHECKSUM_AT]);
            bytes[CHECKSUM_AT..].copy_from_slice(sum.as_ref());
            let _ = VolumeHeader::decode(&bytes);
        }
    }
}
