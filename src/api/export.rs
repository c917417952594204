//! `GET /v1/volumes/NAME[@SNAP]/export`: the decrypted image as a stream of extent records,
//! so holes are never sent as data (an empty 1 TiB volume is a few records). Format
//! (little-endian; `docs/api.md`):
//!
//! ```text
//!  stream header  "CVEXPORT" | u32 version = 1 | u32 0 | u64 size          (24 bytes)
//!  record         u32 kind   | u32 0            | u64 len                  (16 bytes)
//!                 kind 1 DATA: len bytes of plaintext follow
//!                 kind 2 HOLE: len bytes of zeros, nothing follows
//!                 kind 3 END:  len = size; the image is complete
//!                 kind 4 ERROR: len bytes of UTF-8 message follow; the export failed
//! ```
//! Records cover the image in order, without gaps. The encoder and an incremental decoder
//! (sans-I/O, used by the CLI) live here; [`produce`] runs on a blocking thread.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::daemon::exports::VolumeBackend;
use crate::volume::store::walk_allocation;

pub const MAGIC: &[u8; 8] = b"CVEXPORT";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 24;
pub const RECORD_LEN: usize = 16;
pub const DATA: u32 = 1;
pub const HOLE: u32 = 2;
pub const END: u32 = 3;
pub const ERROR: u32 = 4;
/// Largest DATA payload a producer sends (a decoder accepts up to [`MAX_PAYLOAD`]).
const PIECE: u64 = 1 << 20;
/// Largest payload a decoder accepts in one record.
pub const MAX_PAYLOAD: u64 = 64 << 20;
/// Zero detection granule: all-zero 4 KiB plaintext goes out as HOLE.
const GRANULE: usize = 4096;

pub fn header(size: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(HEADER_LEN);
    b.put_slice(MAGIC);
    b.put_u32_le(VERSION);
    b.put_u32_le(0);
    b.put_u64_le(size);
    b.freeze()
}

pub fn record(kind: u32, len: u64, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(RECORD_LEN + payload.len());
    b.put_u32_le(kind);
    b.put_u32_le(0);
    b.put_u64_le(len);
    b.put_slice(payload);
    b.freeze()
}

/// One decoded item.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    /// The stream header: the image size.
    Size(u64),
    Data(Bytes),
    Hole(u64),
    End(u64),
    Error(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not an export stream (bad magic or version)")]
    BadHeader,
    #[error("unknown record kind {0}")]
    BadKind(u32),
    #[error("record of {0} bytes is too large")]
    TooLarge(u64),
}

/// Incremental decoder: feed bytes as they come, take items out.
#[derive(Default)]
pub struct Decoder {
    buf: BytesMut,
    started: bool,
}

impl Decoder {
    pub fn feed(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    /// The next complete item; `Ok(None)`: feed more.
    pub fn next_item(&mut self) -> Result<Option<Item>, DecodeError> {
        if !self.started {
            if self.buf.len() < HEADER_LEN {
                return Ok(None);
            }
            let h = self.buf.split_to(HEADER_LEN);
            if &h[0..8] != MAGIC || u32::from_le_bytes([h[8], h[9], h[10], h[11]]) != VERSION {
                return Err(DecodeError::BadHeader);
            }
            self.started = true;
            return Ok(Some(Item::Size(u64::from_le_bytes(
                h[16..24].try_into().expect("8 bytes"),
            ))));
        }
        if self.buf.len() < RECORD_LEN {
            return Ok(None);
        }
        let kind = u32::from_le_bytes(self.buf[0..4].try_into().expect("4 bytes"));
        let len = u64::from_le_bytes(self.buf[8..16].try_into().expect("8 bytes"));
        let payload = match kind {
            DATA | ERROR => {
                if len > MAX_PAYLOAD {
                    return Err(DecodeError::TooLarge(len));
                }
                len as usize
            }
            HOLE | END => 0,
            k => return Err(DecodeError::BadKind(k)),
        };
        if self.buf.len() < RECORD_LEN + payload {
            return Ok(None);
        }
        let _ = self.buf.split_to(RECORD_LEN);
        let p = self.buf.split_to(payload).freeze();
        Ok(Some(match kind {
            DATA => Item::Data(p),
            ERROR => Item::Error(String::from_utf8_lossy(&p).into_owned()),
            HOLE => Item::Hole(len),
            _ => Item::End(len),
        }))
    }
}

/// Reads the volume and sends the stream into `tx` (blocking). Errors after the header
/// go out as an ERROR record. Returns the bytes of data sent.
pub fn produce(vol: Arc<VolumeBackend>, tx: tokio::sync::mpsc::Sender<Bytes>) -> u64 {
    let v = &vol.0;
    let size = v.size();
    let send = |b: Bytes| tx.blocking_send(b).is_ok();
    if !send(header(size)) {
        return 0;
    }
    let mut sent = 0u64;
    // Plaintext: wiped when done.
    let mut buf = zeroize::Zeroizing::new(vec![0u8; PIECE as usize]);
    let r = (|| -> Result<bool, String> {
        let mut hole = 0u64;
        let mut gone = false;
        let query = |at, len| v.extents(at, len).map_err(|e| e.to_string());
        walk_allocation(0, size, query, |mut at, len, is_hole| {
            let end = at + len;
            if is_hole {
                hole += len;
                return Ok(true);
            }
            while at < end {
                let n = (end - at).min(PIECE) as usize;
                v.read(at, &mut buf[..n]).map_err(|e| e.to_string())?;
                let mut q = 0usize;
                while q < n {
                    let start = q;
                    let zero = crate::zeroes::is_zero(&buf[q..(q + GRANULE).min(n)]);
                    while q < n && crate::zeroes::is_zero(&buf[q..(q + GRANULE).min(n)]) == zero {
                        q = (q + GRANULE).min(n);
                    }
                    if zero {
                        hole += (q - start) as u64;
                    } else {
                        if hole > 0 && !send(record(HOLE, hole, &[])) {
                            gone = true;
                            return Ok(false);
                        }
                        hole = 0;
                        if !send(record(DATA, (q - start) as u64, &buf[start..q])) {
                            gone = true;
                            return Ok(false);
                        }
                        sent += (q - start) as u64;
                    }
                }
                at += n as u64;
            }
            Ok(true)
        })?;
        if gone {
            return Ok(false);
        }
        if hole > 0 && !send(record(HOLE, hole, &[])) {
            return Ok(false);
        }
        Ok(send(record(END, size, &[])))
    })();
    if let Err(e) = r {
        tracing::error!(error = %e, "export failed");
        let _ = send(record(ERROR, e.len() as u64, e.as_bytes()));
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_byte_by_byte() {
        let mut s = Vec::new();
        s.extend_from_slice(&header(12288));
        s.extend_from_slice(&record(HOLE, 4096, &[]));
        s.extend_from_slice(&record(DATA, 3, b"abc"));
        s.extend_from_slice(&record(END, 12288, &[]));
        let mut d = Decoder::default();
        let mut items = Vec::new();
        for b in &s {
            d.feed(&[*b]);
            while let Some(i) = d.next_item().unwrap() {
                items.push(i);
            }
        }
        assert_eq!(
            items,
            vec![
                Item::Size(12288),
                Item::Hole(4096),
                Item::Data(Bytes::from_static(b"abc")),
                Item::End(12288)
            ]
        );
    }

    #[test]
    fn rejects_bad_streams() {
        let mut d = Decoder::default();
        d.feed(&[0u8; 24]);
        assert_eq!(d.next_item(), Err(DecodeError::BadHeader));
        let mut d = Decoder::default();
        d.feed(&header(1));
        d.feed(&record(9, 0, &[]));
        assert!(d.next_item().is_ok());
        assert_eq!(d.next_item(), Err(DecodeError::BadKind(9)));
        let mut d = Decoder::default();
        d.feed(&header(1));
        d.feed(&record(DATA, MAX_PAYLOAD + 1, &[]));
        let _ = d.next_item();
        assert_eq!(d.next_item(), Err(DecodeError::TooLarge(MAX_PAYLOAD + 1)));
    }
}
