//! Envelope encryption of files for applications (`docs/envelope-format.md`): a fresh DEK per
//! file (from create-datakey), its wrapped form in the header, then the content in 64 KiB
//! chunks sealed with AES-256-GCM. Chunk *i*'s nonce is *i* (the DEK is never reused across
//! files); its AAD is the SHA-256 of the header, *i* and a final-chunk flag, so truncation,
//! reordering, appending and header swaps are all detected. Streams in constant memory.
//!
//! ```text
//! "CVENV001" | u32 BE chunk size | u16 BE wrapped-DEK length | wrapped DEK | chunks...
//! chunk = ciphertext (chunk size, the last one shorter or equal) || 16-byte tag
//! ```

use std::io::{self, Read, Write};

use super::KmsError;
use super::crypto::{self, TAG_LEN};

pub const MAGIC: &[u8; 8] = b"CVENV001";
pub const CHUNK: usize = 64 * 1024;
/// Encryption-context entry binding the wrapped DEK to its purpose.
pub const CONTEXT_KEY: &str = "purpose";
pub const CONTEXT_VALUE: &str = "cryptvol-envelope";

fn chunk_aad(header_hash: &[u8; 32], index: u64, last: bool) -> [u8; 41] {
    let mut a = [0u8; 41];
    a[..32].copy_from_slice(header_hash);
    a[32..40].copy_from_slice(&index.to_be_bytes());
    a[40] = u8::from(last);
    a
}

fn nonce(index: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&index.to_be_bytes());
    n
}

fn dek32(dek: &[u8]) -> Result<[u8; 32], KmsError> {
    dek.try_into()
        .map_err(|_| KmsError::InvalidParameter("envelope data key must be 256 bits".into()))
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Encrypts `input` into `output` with `dek` (256-bit plaintext DEK) and its wrapped form.
pub fn encrypt(
    dek: &[u8],
    wrapped: &[u8],
    mut input: impl Read,
    mut output: impl Write,
) -> Result<u64, KmsError> {
    let key = zeroize::Zeroizing::new(dek32(dek)?);
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&(CHUNK as u32).to_be_bytes());
    header.extend_from_slice(&(wrapped.len() as u16).to_be_bytes());
    header.extend_from_slice(wrapped);
    output.write_all(&header)?;
    let hh = crypto::sha256(&header);
    let mut cur = zeroize::Zeroizing::new(vec![0u8; CHUNK]);
    let mut next = zeroize::Zeroizing::new(vec![0u8; CHUNK]);
    let mut n = read_full(&mut input, &mut cur)?;
    let mut index = 0u64;
    let mut total = 0u64;
    loop {
        // Look one chunk ahead to know whether this one is the last.
        let m = if n == CHUNK {
            read_full(&mut input, &mut next)?
        } else {
            0
        };
        let last = m == 0;
        let mut body = cur[..n].to_vec();
        crypto::seal(&key, &nonce(index), &chunk_aad(&hh, index, last), &mut body);
        output.write_all(&body)?;
        total += n as u64;
        if last {
            break;
        }
        std::mem::swap(&mut cur, &mut next);
        n = m;
        index += 1;
    }
    output.flush()?;
    Ok(total)
}

/// Reads an envelope header: the wrapped DEK (to unwrap through the key manager).
pub fn read_header(input: &mut impl Read) -> Result<(Vec<u8>, Vec<u8>), KmsError> {
    let bad = |why: &str| KmsError::InvalidCiphertext(format!("not a cryptvol envelope: {why}"));
    let mut fixed = [0u8; 14];
    if read_full(input, &mut fixed)? != 14 || &fixed[..8] != MAGIC {
        return Err(bad("bad magic"));
    }
    if u32::from_be_bytes(fixed[8..12].try_into().expect("4")) as usize != CHUNK {
        return Err(bad("unsupported chunk size"));
    }
    let wl = usize::from(u16::from_be_bytes([fixed[12], fixed[13]]));
    if wl == 0 || wl > 2048 {
        return Err(bad("wrapped key length"));
    }
    let mut wrapped = vec![0u8; wl];
    if read_full(input, &mut wrapped)? != wl {
        return Err(bad("truncated header"));
    }
    let mut header = fixed.to_vec();
    header.extend_from_slice(&wrapped);
    Ok((header, wrapped))
}

/// Decrypts the chunks after a header read with [`read_header`]. Nothing unauthenticated is
/// written: each chunk is verified before its plaintext goes out; a truncated file is an error.
pub fn decrypt(
    dek: &[u8],
    header: &[u8],
    mut input: impl Read,
    mut output: impl Write,
) -> Result<u64, KmsError> {
    let key = zeroize::Zeroizing::new(dek32(dek)?);
    let hh = crypto::sha256(header);
    let mut cur = vec![0u8; CHUNK + TAG_LEN];
    let mut next = vec![0u8; CHUNK + TAG_LEN];
    let mut n = read_full(&mut input, &mut cur)?;
    let mut index = 0u64;
    let mut total = 0u64;
    let fail = || {
        KmsError::InvalidCiphertext("envelope content was altered, truncated or reordered".into())
    };
    loop {
        if n < TAG_LEN {
            return Err(fail());
        }
        let m = if n == CHUNK + TAG_LEN {
            read_full(&mut input, &mut next)?
        } else {
            0
        };
        let last = m == 0;
        let len = crypto::open(
            &key,
            &nonce(index),
            &chunk_aad(&hh, index, last),
            &mut cur[..n],
        )
        .map_err(|_| fail())?;
        output.write_all(&cur[..len])?;
        zeroize::Zeroize::zeroize(&mut cur[..len]);
        total += len as u64;
        if last {
            break;
        }
        std::mem::swap(&mut cur, &mut next);
        n = m;
        index += 1;
    }
    output.flush()?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(len: usize) -> (Vec<u8>, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mut out = Vec::new();
        encrypt(&[3u8; 32], b"wrapped", &data[..], &mut out).unwrap();
        (data, out)
    }

    fn open_env(env: &[u8]) -> Result<Vec<u8>, KmsError> {
        let mut r = env;
        let (header, wrapped) = read_header(&mut r)?;
        assert_eq!(wrapped, b"wrapped");
        let mut out = Vec::new();
        decrypt(&[3u8; 32], &header, r, &mut out)?;
        Ok(out)
    }

    #[test]
    fn round_trips_at_chunk_edges() {
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK] {
            let (data, env) = round(len);
            assert_eq!(open_env(&env).unwrap(), data, "len {len}");
        }
    }

    #[test]
    fn truncation_append_reorder_flip_detected() {
        let (_, env) = round(2 * CHUNK + 10);
        let hdr = 14 + 7;
        let c = CHUNK + TAG_LEN;
        assert!(open_env(&env[..hdr + c]).is_err(), "dropped last chunks");
        assert!(
            open_env(&env[..hdr + 2 * c]).is_err(),
            "truncated at chunk boundary"
        );
        let mut app = env.clone();
        app.extend_from_slice(&env[hdr..hdr + c]);
        assert!(open_env(&app).is_err(), "appended chunk");
        let mut re = env[..hdr].to_vec();
        re.extend_from_slice(&env[hdr + c..hdr + 2 * c]);
        re.extend_from_slice(&env[hdr..hdr + c]);
        re.extend_from_slice(&env[hdr + 2 * c..]);
        assert!(open_env(&re).is_err(), "reordered");
        let mut flip = env.clone();
        flip[hdr + 5] ^= 1;
        assert!(open_env(&flip).is_err(), "flipped bit");
    }

    #[test]
    fn garbage_never_panics() {
        use proptest::prelude::*;
        proptest!(|(bytes in proptest::collection::vec(any::<u8>(), 0..300))| {
            let _ = open_env_any(&bytes);
        });
        fn open_env_any(b: &[u8]) -> Result<(), KmsError> {
            let mut r = b;
            let (h, _) = read_header(&mut r)?;
            decrypt(&[3u8; 32], &h, r, std::io::sink())?;
            Ok(())
        }
    }
}
