//! Transmission phase: request headers, validation into a [`Request`], reply headers.

use super::DecodeError;
use super::consts::*;

/// Bytes of a request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// A request header as it came off the wire, not yet validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

pub fn parse_request_header(b: &[u8]) -> Result<RequestHeader, DecodeError> {
    let b = b.get(..REQUEST_HEADER_LEN).ok_or(DecodeError::Incomplete)?;
    if u32::from_be_bytes(b[0..4].try_into().expect("4")) != NBD_REQUEST_MAGIC {
        return Err(DecodeError::Invalid("bad request magic"));
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes([b[4], b[5]]),
        command: u16::from_be_bytes([b[6], b[7]]),
        cookie: u64::from_be_bytes(b[8..16].try_into().expect("8")),
        offset: u64::from_be_bytes(b[16..24].try_into().expect("8")),
        length: u32::from_be_bytes(b[24..28].try_into().expect("4")),
    })
}

/// A validated command, ready to execute against a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        length: u32,
        df: bool,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
        fast: bool,
    },
    Cache {
        offset: u64,
        length: u32,
    },
    BlockStatus {
        offset: u64,
        length: u32,
        req_one: bool,
    },
    Disconnect,
}

/// What the export offers, for validation.
#[derive(Debug, Clone, Copy)]
pub struct ExportLimits {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    /// `base:allocation` negotiated.
    pub meta_allocation: bool,
}

/// A request the server refuses: the error to reply with. `payload` says whether a WRITE's
/// payload follows on the wire and must be skipped to stay in sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub errno: u32,
    pub skip_payload: u32,
}

/// Validates a header in the order: read-only, range, known flags, flags allowed for the
/// command, advertised features, size cap, command known.
pub fn validate(h: &RequestHeader, lim: &ExportLimits) -> Result<Command, Rejection> {
    let payload = if h.command == NBD_CMD_WRITE {
        h.length
    } else {
        0
    };
    let reject = |errno| {
        Err(Rejection {
            errno,
            skip_payload: payload,
        })
    };
    let writes = matches!(
        h.command,
        NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES
    );
    if writes && lim.read_only {
        return reject(NBD_EPERM);
    }
    let ranged = matches!(
        h.command,
        NBD_CMD_READ
            | NBD_CMD_WRITE
            | NBD_CMD_TRIM
            | NBD_CMD_WRITE_ZEROES
            | NBD_CMD_CACHE
            | NBD_CMD_BLOCK_STATUS
    );
    if ranged {
        let in_range = h
            .offset
            .checked_add(u64::from(h.length))
            .is_some_and(|end| end <= lim.size);
        if !in_range {
            let is_write = matches!(h.command, NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES);
            return reject(if is_write { NBD_ENOSPC } else { NBD_EINVAL });
        }
    }
    const KNOWN: u16 = NBD_CMD_FLAG_FUA
        | NBD_CMD_FLAG_NO_HOLE
        | NBD_CMD_FLAG_DF
        | NBD_CMD_FLAG_REQ_ONE
        | NBD_CMD_FLAG_FAST_ZERO;
    if h.flags & !KNOWN != 0 {
        return reject(NBD_EINVAL);
    }
    // FUA is valid on every command once SEND_FUA is advertised (always, here): the server
    // MUST accept it, even by ignoring it (clients are known to set it on FLUSH).
    let allowed = NBD_CMD_FLAG_FUA
        | match h.command {
            NBD_CMD_READ => NBD_CMD_FLAG_DF,
            NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
            NBD_CMD_BLOCK_STATUS => NBD_CMD_FLAG_REQ_ONE,
            NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_FLUSH | NBD_CMD_CACHE | NBD_CMD_DISC => 0,
            _ => return reject(NBD_EINVAL),
        };
    if h.flags & !allowed != 0 {
        return reject(NBD_EINVAL);
    }
    if h.flags & NBD_CMD_FLAG_DF != 0 && !lim.structured {
        return reject(NBD_EINVAL);
    }
    if h.command == NBD_CMD_BLOCK_STATUS && (!lim.meta_allocation || h.length == 0) {
        // Length 0 has no valid answer: every extent descriptor MUST be nonzero.
        return reject(NBD_EINVAL);
    }
    if matches!(h.command, NBD_CMD_READ | NBD_CMD_WRITE) && h.length > MAX_PAYLOAD {
        // A READ this large is answered with an error; a WRITE's payload is skipped.
        return reject(if lim.structured {
            NBD_EOVERFLOW
        } else {
            NBD_EINVAL
        });
    }
    let fua = h.flags & NBD_CMD_FLAG_FUA != 0;
    let (offset, length) = (h.offset, h.length);
    Ok(match h.command {
        NBD_CMD_READ => Command::Read {
            offset,
            length,
            df: h.flags & NBD_CMD_FLAG_DF != 0,
        },
        NBD_CMD_WRITE => Command::Write {
            offset,
            length,
            fua,
        },
        NBD_CMD_FLUSH => Command::Flush,
        NBD_CMD_TRIM => Command::Trim {
            offset,
            length,
            fua,
        },
        NBD_CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole: h.flags & NBD_CMD_FLAG_NO_HOLE != 0,
            fast: h.flags & NBD_CMD_FLAG_FAST_ZERO != 0,
        },
        NBD_CMD_CACHE => Command::Cache { offset, length },
        NBD_CMD_BLOCK_STATUS => Command::BlockStatus {
            offset,
            length,
            req_one: h.flags & NBD_CMD_FLAG_REQ_ONE != 0,
        },
        NBD_CMD_DISC => Command::Disconnect,
        _ => unreachable!("unknown commands were rejected above"),
    })
}

/// A simple reply header.
pub fn simple_reply(cookie: u64, errno: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&errno.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header; `length` counts the chunk's payload.
pub fn chunk_header(cookie: u64, flags: u16, ty: u16, length: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[0..4].copy_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&ty.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// An OFFSET_DATA chunk header plus its 8-byte offset; the data follows.
pub fn offset_data_header(
    cookie: u64,
    done: bool,
    offset: u64,
    data_len: u32,
) -> [u8; CHUNK_HEADER_LEN + 8] {
    let mut b = [0u8; CHUNK_HEADER_LEN + 8];
    let flags = if done { NBD_REPLY_FLAG_DONE } else { 0 };
    b[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        cookie,
        flags,
        NBD_REPLY_TYPE_OFFSET_DATA,
        8 + data_len,
    ));
    b[CHUNK_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// An OFFSET_HOLE chunk.
pub fn offset_hole(out: &mut Vec<u8>, cookie: u64, done: bool, offset: u64, len: u32) {
    let flags = if done { NBD_REPLY_FLAG_DONE } else { 0 };
    out.extend_from_slice(&chunk_header(cookie, flags, NBD_REPLY_TYPE_OFFSET_HOLE, 12));
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// A final ERROR chunk with a message.
pub fn error_chunk(out: &mut Vec<u8>, cookie: u64, errno: u32, msg: &str) {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    out.extend_from_slice(&chunk_header(
        cookie,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        6 + msg.len() as u32,
    ));
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// A final NONE chunk (success without data).
pub fn done_chunk(out: &mut Vec<u8>, cookie: u64) {
    out.extend_from_slice(&chunk_header(
        cookie,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_NONE,
        0,
    ));
}

/// A final BLOCK_STATUS chunk: (length, flags) descriptors for one context.
pub fn block_status_chunk(out: &mut Vec<u8>, cookie: u64, context: u32, extents: &[(u32, u32)]) {
    let len = 4 + 8 * extents.len() as u32;
    out.extend_from_slice(&chunk_header(
        cookie,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_BLOCK_STATUS,
        len,
    ));
    out.extend_from_slice(&context.to_be_bytes());
    for (l, f) in extents {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(command: u16, flags: u16, offset: u64, length: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes()); // magic
        b.extend_from_slice(&flags.to_be_bytes()); // command flags
        b.extend_from_slice(&command.to_be_bytes()); // type
        b.extend_from_slice(&0x4000_0000_0100_0000u64.to_be_bytes()); // cookie (opaque)
        b.extend_from_slice(&offset.to_be_bytes()); // offset
        b.extend_from_slice(&length.to_be_bytes()); // length
        b
    }

    const LIM: ExportLimits = ExportLimits {
        size: 1 << 20,
        read_only: false,
        structured: true,
        meta_allocation: true,
    };

    #[test]
    fn request_table() {
        let b = header(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 4096, 512);
        let h = parse_request_header(&b).unwrap();
        assert_eq!(h.cookie, 0x4000_0000_0100_0000);
        assert_eq!(
            validate(&h, &LIM).unwrap(),
            Command::Write {
                offset: 4096,
                length: 512,
                fua: true
            }
        );
        assert_eq!(parse_request_header(&b[..27]), Err(DecodeError::Incomplete));
    }

    #[test]
    fn validation_order_and_errors() {
        let v = |c, f, o, l, lim: &ExportLimits| {
            validate(&parse_request_header(&header(c, f, o, l)).unwrap(), lim)
        };
        let ro = ExportLimits {
            read_only: true,
            ..LIM
        };
        // read-only before range
        assert_eq!(
            v(NBD_CMD_WRITE, 0, u64::MAX, 1, &ro).unwrap_err().errno,
            NBD_EPERM
        );
        // range: overflow-safe, EINVAL for reads, ENOSPC for writes; payload skipped
        assert_eq!(
            v(NBD_CMD_READ, 0, u64::MAX, 2, &LIM).unwrap_err().errno,
            NBD_EINVAL
        );
        assert_eq!(
            v(NBD_CMD_READ, 0, 1 << 63, 1, &LIM).unwrap_err().errno,
            NBD_EINVAL
        );
        let w = v(NBD_CMD_WRITE, 0, (1 << 20) - 1, 2, &LIM).unwrap_err();
        assert_eq!((w.errno, w.skip_payload), (NBD_ENOSPC, 2));
        // flags
        assert_eq!(
            v(NBD_CMD_READ, 1 << 9, 0, 1, &LIM).unwrap_err().errno,
            NBD_EINVAL
        );
        assert_eq!(
            v(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 1, &LIM)
                .unwrap_err()
                .errno,
            NBD_EINVAL
        );
        assert_eq!(
            v(NBD_CMD_FLUSH, NBD_CMD_FLAG_REQ_ONE, 0, 0, &LIM)
                .unwrap_err()
                .errno,
            NBD_EINVAL
        );
        let simple = ExportLimits {
            structured: false,
            meta_allocation: false,
            ..LIM
        };
        assert_eq!(
            v(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 1, &simple)
                .unwrap_err()
                .errno,
            NBD_EINVAL
        );
        assert_eq!(
            v(NBD_CMD_BLOCK_STATUS, 0, 0, 1, &simple).unwrap_err().errno,
            NBD_EINVAL
        );
        // FUA is accepted on every command
        for c in [
            NBD_CMD_FLUSH,
            NBD_CMD_CACHE,
            NBD_CMD_BLOCK_STATUS,
            NBD_CMD_READ,
        ] {
            assert!(v(c, NBD_CMD_FLAG_FUA, 0, 1, &LIM).is_ok(), "FUA on {c}");
        }
        // zero-length block status has no valid reply
        assert_eq!(
            v(NBD_CMD_BLOCK_STATUS, 0, 0, 0, &LIM).unwrap_err().errno,
            NBD_EINVAL
        );
        // unknown command
        assert_eq!(v(42, 0, 0, 0, &LIM).unwrap_err().errno, NBD_EINVAL);
        // zero-length read is valid
        assert!(v(NBD_CMD_READ, 0, 0, 0, &LIM).is_ok());
    }

    #[test]
    fn reply_tables() {
        let r = simple_reply(7, 22);
        assert_eq!(&r[0..4], &[0x67, 0x44, 0x66, 0x98]); // simple reply magic
        assert_eq!(&r[4..8], &22u32.to_be_bytes()); // error
        assert_eq!(&r[8..16], &7u64.to_be_bytes()); // cookie
        let c = offset_data_header(7, true, 512, 100);
        assert_eq!(&c[0..4], &[0x66, 0x8e, 0x33, 0xef]); // structured magic
        assert_eq!(&c[4..6], &[0, 1]); // DONE
        assert_eq!(&c[6..8], &[0, 1]); // OFFSET_DATA
        assert_eq!(&c[16..20], &108u32.to_be_bytes()); // 8 + data
        assert_eq!(&c[20..28], &512u64.to_be_bytes()); // offset
    }

    proptest! {
        #[test]
        fn any_header_validates_or_rejects(bytes in proptest::collection::vec(any::<u8>(), 28)) {
            let mut b = bytes;
            b[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
            let h = parse_request_header(&b).unwrap();
            if let Ok(Command::Read { offset, length, .. } | Command::Write { offset, length, .. }) = validate(&h, &LIM) {
                prop_assert!(offset + u64::from(length) <= LIM.size);
            }
        }
    }
}
