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
/// The re-encryption journal: old ciphertext of the segment in flight, in the free space
/// between the second header copy and the data area.
pub const JOURNAL_AT: u64 = 64 << 10;
/// Largest journaled segment.
pub const JOURNAL_LEN: u64 = 768 << 10;
const CIPHER_LEN: usize = 32;
const CHECKSUM_AT: usize = HEADER_COPY_LEN - 32;
/// Feature flags (u32) sit just before the checksum; zero in volumes made before they existed.
const FLAGS_AT: usize = CHECKSUM_AT - 4;
/// Flag: all-zero plaintext units are stored encrypted, not as zeros (see `Volume`).
pub const FLAG_ENCRYPT_ZEROES: u32 = 1;
/// Flag: an online re-encryption is in progress; the fields of [`Reencrypt`] are present
/// (bytes 2216..4060). A cryptvol without this flag in its known set refuses the volume.
pub const FLAG_REENCRYPT: u32 = 2;
const KNOWN_FLAGS: u32 = FLAG_ENCRYPT_ZEROES | FLAG_REENCRYPT;
/// Where the re-encryption fields start (after the largest wrapped DEK: 166 + 2048 = 2214).
const REENC_AT: usize = 2216;
/// Largest wrapped new DEK a header in re-encryption holds (room left before the flags).
pub const MAX_NEW_WRAPPED_DEK: usize = 1600;
/// Re-encryption state flag: paused by the user (stays paused across restarts).
pub const REENC_PAUSED: u32 = 1;

/// The state of an online re-encryption (present iff [`FLAG_REENCRYPT`]). Units below
/// `boundary` are under the new DEK, the others under the old one. A non-empty journal names
/// the segment whose old ciphertext was copied to the journal area and may be half rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reencrypt {
    /// Byte offset in the data area; a multiple of the sector size, <= size.
    pub boundary: u64,
    /// Data-area byte offset of the journaled segment (meaningful when `journal_len > 0`).
    pub journal_start: u64,
    /// Bytes of old ciphertext in the journal; 0 = no journal.
    pub journal_len: u32,
    /// [`REENC_PAUSED`].
    pub state: u32,
    /// Rate limit in bytes per second (0 = unlimited).
    pub max_rate: u64,
    /// SHA-256 of the journal's `journal_len` bytes.
    pub journal_sha256: [u8; 32],
    pub new_key_id: String,
    pub new_key_version: u32,
    pub new_wrapped_dek: Vec<u8>,
}

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
    /// Online re-encryption in progress ([`FLAG_REENCRYPT`] is set iff this is `Some`).
    pub reencrypt: Option<Reencrypt>,
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
            reencrypt: None,
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
        if (self.flags & FLAG_REENCRYPT != 0) != self.reencrypt.is_some() {
            return bad("re-encryption flag and fields disagree");
        }
        if let Some(r) = &self.reencrypt {
            let unit = u64::from(self.sector_size);
            if r.boundary > self.size || !r.boundary.is_multiple_of(unit) {
                return bad("re-encryption boundary out of range");
            }
            if r.journal_len > 0
                && (!r.journal_start.is_multiple_of(unit)
                    || !u64::from(r.journal_len).is_multiple_of(unit)
                    || u64::from(r.journal_len) > JOURNAL_LEN
                    || r.journal_start
                        .checked_add(u64::from(r.journal_len))
                        .is_none_or(|e| e > self.size))
            {
                return bad("re-encryption journal out of range");
            }
            if r.new_key_id.is_empty()
                || r.new_key_id.len() > KEY_ID_LEN
                || !r.new_key_id.is_ascii()
            {
                return bad("new key id must be 1..64 ASCII bytes");
            }
            if r.new_wrapped_dek.is_empty() || r.new_wrapped_dek.len() > MAX_NEW_WRAPPED_DEK {
                return bad("new wrapped key length out of range");
            }
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
        if let Some(r) = &self.reencrypt {
            let o = REENC_AT;
            b[o..o + 8].copy_from_slice(&r.boundary.to_le_bytes());
            b[o + 8..o + 16].copy_from_slice(&r.journal_start.to_le_bytes());
            b[o + 16..o + 20].copy_from_slice(&r.journal_len.to_le_bytes());
            b[o + 20..o + 24].copy_from_slice(&r.state.to_le_bytes());
            b[o + 24..o + 32].copy_from_slice(&r.max_rate.to_le_bytes());
            b[o + 32..o + 64].copy_from_slice(&r.journal_sha256);
            b[o + 64..o + 64 + r.new_key_id.len()].copy_from_slice(r.new_key_id.as_bytes());
            b[o + 128..o + 132].copy_from_slice(&r.new_key_version.to_le_bytes());
            b[o + 132..o + 134].copy_from_slice(&(r.new_wrapped_dek.len() as u16).to_le_bytes());
            b[o + 134..o + 134 + r.new_wrapped_dek.len()].copy_from_slice(&r.new_wrapped_dek);
        }
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
            reencrypt: None,
        };
        let mut h = h;
        if h.flags & FLAG_REENCRYPT != 0 {
            let o = REENC_AT;
            let new_key_id = std::str::from_utf8(trim_nul(&b[o + 64..o + 64 + KEY_ID_LEN]))
                .map_err(|_| VolumeError::BadHeader("new key id is not text"))?
                .to_owned();
            let n = usize::from(u16::from_le_bytes([b[o + 132], b[o + 133]]));
            if n == 0 || n > MAX_NEW_WRAPPED_DEK {
                return bad("new wrapped key length out of range");
            }
            h.reencrypt = Some(Reencrypt {
                boundary: u64_at(o),
                journal_start: u64_at(o + 8),
                journal_len: u32_at(o + 16),
                state: u32_at(o + 20),
                max_rate: u64_at(o + 24),
                journal_sha256: b[o + 32..o + 64].try_into().expect("32 bytes"),
                new_key_id,
                new_key_version: u32_at(o + 128),
                new_wrapped_dek: b[o + 134..o + 134 + n].to_vec(),
            });
        }
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
