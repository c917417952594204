//! Transmission phase: request headers (compact and extended), validation into a [`Command`],
//! reply headers in the three framings the handshake can settle on.

use super::DecodeError;
use super::consts::*;

/// Bytes of a compact request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Bytes of an extended request header (`NBD_OPT_EXTENDED_HEADERS`).
pub const EXTENDED_REQUEST_HEADER_LEN: usize = 32;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Bytes of an extended reply header.
pub const EXTENDED_REPLY_LEN: usize = 32;
/// Largest refused payload the server reads and drops to stay in sync with the client (a
/// compact header can announce no more); past it, the connection is closed instead.
pub const MAX_SKIP: u64 = u32::MAX as u64;

/// How transmission messages are framed, as negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Compact requests, simple replies only.
    Simple,
    /// Compact requests; structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    Structured,
    /// Extended requests and replies (`NBD_OPT_EXTENDED_HEADERS`; structured replies implied).
    Extended,
}

impl Framing {
    /// Structured replies in force (either framing that has them).
    pub fn structured(self) -> bool {
        self != Framing::Simple
    }

    /// Bytes of a request header in this framing.
    pub fn request_header_len(self) -> usize {
        match self {
            Framing::Extended => EXTENDED_REQUEST_HEADER_LEN,
            _ => REQUEST_HEADER_LEN,
        }
    }
}

/// A request header as it came off the wire, not yet validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    /// 32 bits on the wire in a compact header, 64 in an extended one.
    pub length: u64,
}

/// Parses a compact (28-byte) request header.
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
        length: u64::from(u32::from_be_bytes(b[24..28].try_into().expect("4"))),
    })
}

/// Parses an extended (32-byte) request header. Once extended headers are negotiated, a
/// compact magic is as wrong as any other.
pub fn parse_extended_request_header(b: &[u8]) -> Result<RequestHeader, DecodeError> {
    let b = b
        .get(..EXTENDED_REQUEST_HEADER_LEN)
        .ok_or(DecodeError::Incomplete)?;
    if u32::from_be_bytes(b[0..4].try_into().expect("4")) != NBD_EXTENDED_REQUEST_MAGIC {
        return Err(DecodeError::Invalid("bad extended request magic"));
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes([b[4], b[5]]),
        command: u16::from_be_bytes([b[6], b[7]]),
        cookie: u64::from_be_bytes(b[8..16].try_into().expect("8")),
        offset: u64::from_be_bytes(b[16..24].try_into().expect("8")),
        length: u64::from_be_bytes(b[24..32].try_into().expect("8")),
    })
}

/// Parses a request header of the negotiated framing.
pub fn parse_request(b: &[u8], framing: Framing) -> Result<RequestHeader, DecodeError> {
    match framing {
        Framing::Extended => parse_extended_request_header(b),
        _ => parse_request_header(b),
    }
}

/// A validated command, ready to execute against a backend. READ and WRITE lengths are
/// bounded by the payload cap (so 32 bits); the others may span the export.
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
        length: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u64,
        fua: bool,
        no_hole: bool,
        fast: bool,
    },
    Cache {
        offset: u64,
        length: u64,
    },
    BlockStatus {
        offset: u64,
        length: u64,
        req_one: bool,
    },
    Disconnect,
}

/// What the export and the connection offer, for validation.
#[derive(Debug, Clone, Copy)]
pub struct ExportLimits {
    pub size: u64,
    pub read_only: bool,
    pub framing: Framing,
    /// `base:allocation` negotiated.
    pub meta_allocation: bool,
    /// Largest READ/WRITE length served on this connection.
    pub max_payload: u32,
}

/// A request the server refuses: the error to reply with. `skip_payload` counts the payload
/// bytes (a WRITE's, or any request's with `NBD_CMD_FLAG_PAYLOAD_LEN`) that follow on the
/// wire and must be dropped to stay in sync; past [`MAX_SKIP`] the server closes instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub errno: u32,
    pub skip_payload: u64,
}

/// Validates a header in the order: read-only, range, known flags, flags allowed for the
/// command, advertised features, size cap, command known.
pub fn validate(h: &RequestHeader, lim: &ExportLimits) -> Result<Command, Rejection> {
    let extended = lim.framing == Framing::Extended;
    // With extended headers, PAYLOAD_LEN says `length` counts payload bytes that follow,
    // whatever the command: the one way to stay in sync after refusing an unknown request.
    let payload_len_flag = extended && h.flags & NBD_CMD_FLAG_PAYLOAD_LEN != 0;
    let payload = if h.command == NBD_CMD_WRITE || payload_len_flag {
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
            .checked_add(h.length)
            .is_some_and(|end| end <= lim.size);
        if !in_range {
            let is_write = matches!(h.command, NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES);
            return reject(if is_write { NBD_ENOSPC } else { NBD_EINVAL });
        }
    }
    let mut known = NBD_CMD_FLAG_FUA
        | NBD_CMD_FLAG_NO_HOLE
        | NBD_CMD_FLAG_DF
        | NBD_CMD_FLAG_REQ_ONE
        | NBD_CMD_FLAG_FAST_ZERO;
    if extended {
        known |= NBD_CMD_FLAG_PAYLOAD_LEN;
    }
    if h.flags & !known != 0 {
        return reject(NBD_EINVAL);
    }
    // FUA is valid on every command once SEND_FUA is advertised (always, here): the server
    // MUST accept it, even by ignoring it (clients are known to set it on FLUSH).
    // PAYLOAD_LEN is redundant on a WRITE (its length is its payload) and accepted there;
    // on any other command it describes a payload no command here takes: EINVAL.
    let allowed = NBD_CMD_FLAG_FUA
        | match h.command {
            NBD_CMD_READ => NBD_CMD_FLAG_DF,
            NBD_CMD_WRITE => NBD_CMD_FLAG_PAYLOAD_LEN,
            NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
            NBD_CMD_BLOCK_STATUS => NBD_CMD_FLAG_REQ_ONE,
            NBD_CMD_TRIM | NBD_CMD_FLUSH | NBD_CMD_CACHE | NBD_CMD_DISC => 0,
            _ => return reject(NBD_EINVAL),
        };
    if h.flags & !allowed != 0 {
        return reject(NBD_EINVAL);
    }
    if h.flags & NBD_CMD_FLAG_DF != 0 && !lim.framing.structured() {
        return reject(NBD_EINVAL);
    }
    if h.command == NBD_CMD_BLOCK_STATUS && (!lim.meta_allocation || h.length == 0) {
        // Length 0 has no valid answer: every extent descriptor MUST be nonzero.
        return reject(NBD_EINVAL);
    }
    let io_len = match h.command {
        NBD_CMD_READ | NBD_CMD_WRITE => match u32::try_from(h.length) {
            Ok(l) if l <= lim.max_payload => l,
            // A READ this large is answered with an error; a WRITE's payload is skipped.
            _ => {
                return reject(if lim.framing.structured() {
                    NBD_EOVERFLOW
                } else {
                    NBD_EINVAL
                });
            }
        },
        _ => 0,
    };
    let fua = h.flags & NBD_CMD_FLAG_FUA != 0;
    let (offset, length) = (h.offset, h.length);
    Ok(match h.command {
        NBD_CMD_READ => Command::Read {
            offset,
            length: io_len,
            df: h.flags & NBD_CMD_FLAG_DF != 0,
        },
        NBD_CMD_WRITE => Command::Write {
            offset,
            length: io_len,
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

/// Where a reply goes: the request's cookie and offset, in the connection's framing. Every
/// reply encoder appends to a buffer; data (READ) follows the header the caller appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    pub framing: Framing,
    pub cookie: u64,
    /// The request's offset: echoed in every extended reply header (as qemu and nbdkit do).
    pub offset: u64,
}

impl ReplyTo {
    /// A chunk header for `len` payload bytes: structured (20 bytes, `len` at most 2^32-1)
    /// or extended (32 bytes). Not for simple framing.
    pub fn chunk_header(&self, out: &mut Vec<u8>, flags: u16, ty: u16, len: u64) {
        match self.framing {
            Framing::Extended => {
                out.extend_from_slice(&NBD_EXTENDED_REPLY_MAGIC.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                out.extend_from_slice(&ty.to_be_bytes());
                out.extend_from_slice(&self.cookie.to_be_bytes());
                out.extend_from_slice(&self.offset.to_be_bytes());
                out.extend_from_slice(&len.to_be_bytes());
            }
            Framing::Structured | Framing::Simple => {
                debug_assert!(self.framing == Framing::Structured);
                debug_assert!(len <= u64::from(u32::MAX));
                out.extend_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                out.extend_from_slice(&ty.to_be_bytes());
                out.extend_from_slice(&self.cookie.to_be_bytes());
                out.extend_from_slice(&(len as u32).to_be_bytes());
            }
        }
    }

    /// Success without data: a simple reply, or a final NONE chunk.
    pub fn ok(&self, out: &mut Vec<u8>) {
        match self.framing {
            Framing::Simple => out.extend_from_slice(&simple_reply(self.cookie, 0)),
            _ => self.chunk_header(out, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0),
        }
    }

    /// Failure: a simple reply with `errno`, or a final ERROR chunk with `msg` (at most 4096
    /// bytes of it, the spec's string limit).
    pub fn error(&self, out: &mut Vec<u8>, errno: u32, msg: &str) {
        if self.framing == Framing::Simple {
            out.extend_from_slice(&simple_reply(self.cookie, errno));
            return;
        }
        let msg = &msg.as_bytes()[..msg.len().min(4096)];
        self.chunk_header(
            out,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_ERROR,
            6 + msg.len() as u64,
        );
        out.extend_from_slice(&errno.to_be_bytes());
        out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        out.extend_from_slice(msg);
    }

    /// The header READ data of `data_len` bytes at `offset` follows: a simple reply
    /// (`done` ignored: it is the whole reply), or an OFFSET_DATA chunk header and its offset.
    pub fn data(&self, out: &mut Vec<u8>, done: bool, offset: u64, data_len: u32) {
        if self.framing == Framing::Simple {
            out.extend_from_slice(&simple_reply(self.cookie, 0));
            return;
        }
        let flags = if done { NBD_REPLY_FLAG_DONE } else { 0 };
        self.chunk_header(
            out,
            flags,
            NBD_REPLY_TYPE_OFFSET_DATA,
            8 + u64::from(data_len),
        );
        out.extend_from_slice(&offset.to_be_bytes());
    }

    /// An OFFSET_HOLE chunk: `len` bytes at `offset` read as zeros. Structured framings only.
    pub fn hole(&self, out: &mut Vec<u8>, done: bool, offset: u64, len: u32) {
        let flags = if done { NBD_REPLY_FLAG_DONE } else { 0 };
        self.chunk_header(out, flags, NBD_REPLY_TYPE_OFFSET_HOLE, 12);
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    }

    /// A final block status chunk for one context: BLOCK_STATUS with 32-bit descriptors, or
    /// BLOCK_STATUS_EXT with 64-bit ones under extended headers. `extents` are (length,
    /// flags), consecutive, nonempty, each length nonzero. In compact framing a length past
    /// 32 bits ends the list there, cut to the largest 4 KiB multiple that fits (the spec lets
    /// a reply cover less than asked; a compact request cannot ask for that much anyway).
    pub fn block_status(&self, out: &mut Vec<u8>, context: u32, extents: &[(u64, u32)]) {
        if self.framing == Framing::Extended {
            let n = extents.len() as u64;
            self.chunk_header(
                out,
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
                8 + 16 * n,
            );
            out.extend_from_slice(&context.to_be_bytes());
            out.extend_from_slice(&(n as u32).to_be_bytes());
            for &(l, f) in extents {
                out.extend_from_slice(&l.to_be_bytes());
                out.extend_from_slice(&u64::from(f).to_be_bytes());
            }
            return;
        }
        const CAP: u64 = (u32::MAX as u64) & !4095;
        let n = extents
            .iter()
            .position(|&(l, _)| l > u64::from(u32::MAX))
            .map_or(extents.len(), |i| i + 1);
        self.chunk_header(
            out,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_BLOCK_STATUS,
            4 + 8 * n as u64,
        );
        out.extend_from_slice(&context.to_be_bytes());
        for &(l, f) in &extents[..n] {
            let l = if l > u64::from(u32::MAX) { CAP } else { l };
            out.extend_from_slice(&(l as u32).to_be_bytes());
            out.extend_from_slice(&f.to_be_bytes());
        }
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

    fn ext_header(command: u16, flags: u16, offset: u64, length: u64) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&[0x21, 0xe4, 0x1c, 0x71]); // NBD_EXTENDED_REQUEST_MAGIC
        b.extend_from_slice(&flags.to_be_bytes()); // command flags
        b.extend_from_slice(&command.to_be_bytes()); // type
        b.extend_from_slice(&7u64.to_be_bytes()); // cookie
        b.extend_from_slice(&offset.to_be_bytes()); // offset
        b.extend_from_slice(&length.to_be_bytes()); // length: 64 bits
        b
    }

    const LIM: ExportLimits = ExportLimits {
        size: 1 << 20,
        read_only: false,
        framing: Framing::Structured,
        meta_allocation: true,
        max_payload: MAX_PAYLOAD,
    };

    const EXT: ExportLimits = ExportLimits {
        size: 1 << 40,
        framing: Framing::Extended,
        ..LIM
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
        // a compact header where extended ones were negotiated is out of sync
        assert!(parse_request(&b, Framing::Extended).is_err());
    }

    #[test]
    fn extended_request_table() {
        let b = ext_header(NBD_CMD_TRIM, 0, 1 << 33, 5 << 32);
        assert_eq!(b.len(), EXTENDED_REQUEST_HEADER_LEN);
        let h = parse_request(&b, Framing::Extended).unwrap();
        assert_eq!(
            h,
            RequestHeader {
                flags: 0,
                command: NBD_CMD_TRIM,
                cookie: 7,
                offset: 1 << 33,
                length: 5 << 32,
            }
        );
        // a 20 GiB TRIM in one request
        assert_eq!(
            validate(&h, &EXT).unwrap(),
            Command::Trim {
                offset: 1 << 33,
                length: 5 << 32,
                fua: false
            }
        );
        assert_eq!(
            parse_extended_request_header(&b[..31]),
            Err(DecodeError::Incomplete)
        );
        // the compact magic is refused in extended framing, and the other way round
        assert!(parse_request(&b, Framing::Structured).is_err());
        let mut c = b.clone();
        c[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        assert!(parse_extended_request_header(&c).is_err());
    }

    #[test]
    fn extended_payload_rules() {
        let v = |c, f, o, l| {
            validate(
                &parse_request(&ext_header(c, f, o, l), Framing::Extended).unwrap(),
                &EXT,
            )
        };
        // block status past 4 GiB in one request
        assert_eq!(
            v(NBD_CMD_BLOCK_STATUS, 0, 0, 1 << 36).unwrap(),
            Command::BlockStatus {
                offset: 0,
                length: 1 << 36,
                req_one: false
            }
        );
        // PAYLOAD_LEN on a WRITE is redundant and accepted
        assert!(v(NBD_CMD_WRITE, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 512).is_ok());
        // on anything else: EINVAL, and its payload is skipped to stay in sync
        let r = v(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 16).unwrap_err();
        assert_eq!((r.errno, r.skip_payload), (NBD_EINVAL, 16));
        let r = v(42, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 100).unwrap_err();
        assert_eq!((r.errno, r.skip_payload), (NBD_EINVAL, 100));
        // an unknown command without the flag: nothing to skip
        assert_eq!(v(42, 0, 0, 100).unwrap_err().skip_payload, 0);
        // a WRITE over the payload cap: EOVERFLOW, the payload is skipped
        let big = u64::from(MAX_PAYLOAD) + 1;
        let r = v(NBD_CMD_WRITE, 0, 0, big).unwrap_err();
        assert_eq!((r.errno, r.skip_payload), (NBD_EOVERFLOW, big));
        // a READ past 32 bits is refused, not truncated
        assert_eq!(
            v(NBD_CMD_READ, 0, 0, (1 << 32) + 512).unwrap_err().errno,
            NBD_EOVERFLOW
        );
        // a WRITE whose payload could not be skipped is reported as such
        assert!(v(NBD_CMD_WRITE, 0, 0, 1 << 39).unwrap_err().skip_payload > MAX_SKIP);
        // PAYLOAD_LEN is an unknown flag without extended headers
        let h =
            parse_request_header(&header(NBD_CMD_WRITE, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 8)).unwrap();
        let r = validate(&h, &LIM).unwrap_err();
        assert_eq!((r.errno, r.skip_payload), (NBD_EINVAL, 8));
    }

    #[test]
    fn payload_cap_is_per_connection() {
        // a client that negotiated no block sizes may be allowed more than 32 MiB
        let wide = ExportLimits {
            size: 1 << 30,
            max_payload: 64 << 20,
            framing: Framing::Simple,
            meta_allocation: false,
            ..LIM
        };
        let h = parse_request_header(&header(NBD_CMD_READ, 0, 0, 48 << 20)).unwrap();
        assert!(validate(&h, &wide).is_ok());
        let narrow = ExportLimits {
            max_payload: MAX_PAYLOAD,
            ..wide
        };
        assert_eq!(validate(&h, &narrow).unwrap_err().errno, NBD_EINVAL);
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
            framing: Framing::Simple,
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
        let to = ReplyTo {
            framing: Framing::Structured,
            cookie: 7,
            offset: 512,
        };
        let mut c = Vec::new();
        to.data(&mut c, true, 512, 100);
        assert_eq!(c.len(), 28);
        assert_eq!(&c[0..4], &[0x66, 0x8e, 0x33, 0xef]); // structured magic
        assert_eq!(&c[4..6], &[0, 1]); // DONE
        assert_eq!(&c[6..8], &[0, 1]); // OFFSET_DATA
        assert_eq!(&c[8..16], &7u64.to_be_bytes()); // cookie
        assert_eq!(&c[16..20], &108u32.to_be_bytes()); // 8 + data
        assert_eq!(&c[20..28], &512u64.to_be_bytes()); // offset
        let mut h = Vec::new();
        to.hole(&mut h, false, 4096, 8192);
        assert_eq!(&h[4..6], &[0, 0]); // not done
        assert_eq!(&h[6..8], &[0, 2]); // OFFSET_HOLE
        assert_eq!(&h[16..20], &12u32.to_be_bytes()); // length 12
        assert_eq!(&h[20..28], &4096u64.to_be_bytes()); // offset
        assert_eq!(&h[28..32], &8192u32.to_be_bytes()); // hole size
        let mut b = Vec::new();
        to.block_status(&mut b, 1, &[(4096, 3), (8192, 0)]);
        assert_eq!(&b[6..8], &[0, 5]); // BLOCK_STATUS
        assert_eq!(&b[16..20], &20u32.to_be_bytes()); // 4 + 2 * 8
        assert_eq!(&b[20..24], &1u32.to_be_bytes()); // context id
        assert_eq!(&b[24..32], &[0, 0, 0x10, 0, 0, 0, 0, 3]); // 4096, HOLE|ZERO
        assert_eq!(&b[32..40], &[0, 0, 0x20, 0, 0, 0, 0, 0]); // 8192, data
        let simple = ReplyTo {
            framing: Framing::Simple,
            ..to
        };
        let mut e = Vec::new();
        simple.error(&mut e, 22, "ignored in a simple reply");
        assert_eq!(e, simple_reply(7, 22).to_vec());
    }

    #[test]
    fn extended_reply_tables() {
        let to = ReplyTo {
            framing: Framing::Extended,
            cookie: 9,
            offset: 1 << 33,
        };
        let mut ok = Vec::new();
        to.ok(&mut ok);
        assert_eq!(ok.len(), EXTENDED_REPLY_LEN);
        assert_eq!(&ok[0..4], &[0x6e, 0x8a, 0x27, 0x8c]); // extended reply magic
        assert_eq!(&ok[4..6], &[0, 1]); // DONE
        assert_eq!(&ok[6..8], &[0, 0]); // NONE
        assert_eq!(&ok[8..16], &9u64.to_be_bytes()); // cookie
        assert_eq!(&ok[16..24], &(1u64 << 33).to_be_bytes()); // the request's offset
        assert_eq!(&ok[24..32], &0u64.to_be_bytes()); // payload length
        let mut d = Vec::new();
        to.data(&mut d, true, 1 << 33, 4096);
        assert_eq!(d.len(), 40);
        assert_eq!(&d[6..8], &[0, 1]); // OFFSET_DATA
        assert_eq!(&d[24..32], &4104u64.to_be_bytes()); // 8 + data, 64 bits
        assert_eq!(&d[32..40], &(1u64 << 33).to_be_bytes()); // data offset in the payload
        let mut e = Vec::new();
        to.error(&mut e, 5, "io");
        assert_eq!(&e[6..8], &[0x80, 1]); // ERROR
        assert_eq!(&e[24..32], &8u64.to_be_bytes()); // 6 + message
        assert_eq!(&e[32..36], &5u32.to_be_bytes()); // errno
        assert_eq!(&e[36..38], &2u16.to_be_bytes()); // message length
        assert_eq!(&e[38..40], b"io");
        let mut b = Vec::new();
        to.block_status(&mut b, 1, &[(5 << 32, 3), (4096, 0)]);
        assert_eq!(&b[6..8], &[0, 6]); // BLOCK_STATUS_EXT
        assert_eq!(&b[24..32], &40u64.to_be_bytes()); // 8 + 2 * 16
        assert_eq!(&b[32..36], &1u32.to_be_bytes()); // context id
        assert_eq!(&b[36..40], &2u32.to_be_bytes()); // descriptor count
        assert_eq!(&b[40..48], &(5u64 << 32).to_be_bytes()); // 20 GiB, 64-bit length
        assert_eq!(&b[48..56], &3u64.to_be_bytes()); // HOLE|ZERO, 64-bit flags
        assert_eq!(&b[56..64], &4096u64.to_be_bytes());
        assert_eq!(b.len(), 72);
        // compact framing cannot carry a 64-bit extent: the list ends there, cut to fit
        let compact = ReplyTo {
            framing: Framing::Structured,
            ..to
        };
        let mut c = Vec::new();
        compact.block_status(&mut c, 1, &[(4096, 0), (5 << 32, 3), (4096, 0)]);
        assert_eq!(&c[16..20], &20u32.to_be_bytes()); // two descriptors
        assert_eq!(&c[32..36], &0xffff_f000u32.to_be_bytes());
    }

    proptest! {
        #[test]
        fn any_header_validates_or_rejects(bytes in proptest::collection::vec(any::<u8>(), 32), ext in any::<bool>()) {
            let mut b = bytes;
            let (framing, lim) = if ext {
                b[0..4].copy_from_slice(&NBD_EXTENDED_REQUEST_MAGIC.to_be_bytes());
                (Framing::Extended, EXT)
            } else {
                b[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
                (Framing::Structured, LIM)
            };
            let h = parse_request(&b, framing).unwrap();
            match validate(&h, &lim) {
                Ok(Command::Read { offset, length, .. } | Command::Write { offset, length, .. }) => {
                    prop_assert!(offset + u64::from(length) <= lim.size);
                    prop_assert!(length <= lim.max_payload);
                }
                Ok(Command::Trim { offset, length, .. } | Command::WriteZeroes { offset, length, .. }
                    | Command::BlockStatus { offset, length, .. } | Command::Cache { offset, length }) => {
                    prop_assert!(offset + length <= lim.size);
                }
                Ok(_) => {}
                Err(r) => {
                    let has_payload = h.command == NBD_CMD_WRITE
                        || (ext && h.flags & NBD_CMD_FLAG_PAYLOAD_LEN != 0);
                    prop_assert_eq!(r.skip_payload, if has_payload { h.length } else { 0 });
                }
            }
        }
    }
}
