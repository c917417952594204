//! Client side of the codec (handshake client, request encoding, reply decoding), used by
//! `cryptvol bench` and tests. Sans-I/O like the server side: the transport loops "feed the
//! bytes read, send what [`Handshake::take_output`] gives, until done", and in transmission
//! encodes requests into a buffer and decodes replies from one. `Incomplete` means "read more".
//!
//! ```text
//!   server                         client
//!   NBDMAGIC IHAVEOPT hflags  ──▶
//!                             ◀──  cflags (FIXED_NEWSTYLE|NO_ZEROES)
//!                             ◀──  [OPT_STRUCTURED_REPLY]     (optional)
//!   ACK | ERR_UNSUP           ──▶
//!                             ◀──  OPT_GO name [INFO_BLOCK_SIZE]
//!   INFO(EXPORT) INFO(..) ACK ──▶  (ERR_UNSUP: fall back to OPT_EXPORT_NAME)
//! ```

use super::consts::*;

/// Length of a request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header on the wire.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header on the wire.
pub const STRUCTURED_REPLY_LEN: usize = 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// Not enough bytes yet: read more and try again.
    #[error("incomplete")]
    Incomplete,
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("server is not fixed newstyle")]
    NotFixedNewstyle,
    #[error("server refused {option}: reply {reply:#x}: {message}")]
    Refused {
        option: u32,
        reply: u32,
        message: String,
    },
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
}

/// What the client asks for in the handshake.
#[derive(Debug, Clone)]
pub struct HandshakeOptions {
    pub export_name: String,
    /// Send `NBD_OPT_STRUCTURED_REPLY` (the server may refuse; then simple replies are used).
    pub structured_replies: bool,
}

/// The outcome of a handshake: what transmission may rely on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub size: u64,
    pub transmission_flags: u16,
    /// `(minimum, preferred, maximum)` from `NBD_INFO_BLOCK_SIZE`, when the server sent it.
    pub block_size: Option<(u32, u32, u32)>,
    pub structured_replies: bool,
}

impl Negotiated {
    pub fn has(&self, flag: u16) -> bool {
        self.transmission_flags & flag != 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    StructuredReply,
    Go,
    ExportName,
    Done,
}

/// The client half of the fixed newstyle handshake as a state machine.
#[derive(Debug)]
pub struct Handshake {
    opts: HandshakeOptions,
    state: State,
    out: Vec<u8>,
    no_zeroes: bool,
    structured: bool,
    size: Option<(u64, u16)>,
    block_size: Option<(u32, u32, u32)>,
}

impl Handshake {
    pub fn new(opts: HandshakeOptions) -> Self {
        Self {
            opts,
            state: State::Greeting,
            out: Vec::new(),
            no_zeroes: false,
            structured: false,
            size: None,
            block_size: None,
        }
    }

    /// Bytes to send to the server now (empty when waiting for the server).
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// The negotiated parameters once the handshake has finished.
    pub fn negotiated(&self) -> Option<Negotiated> {
        if self.state != State::Done {
            return None;
        }
        let (size, transmission_flags) = self.size?;
        Some(Negotiated {
            size,
            transmission_flags,
            block_size: self.block_size,
            structured_replies: self.structured,
        })
    }

    /// Consumes as many complete server messages from `input` as possible and returns how many
    /// bytes were used. Bytes after the end of the handshake are left alone.
    pub fn receive(&mut self, input: &[u8]) -> Result<usize, ClientError> {
        let mut used = 0;
        while self.state != State::Done {
            match self.step(&input[used..]) {
                Ok(n) => used += n,
                Err(ClientError::Incomplete) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(used)
    }

    fn step(&mut self, input: &[u8]) -> Result<usize, ClientError> {
        match self.state {
            State::Greeting => {
                let mut c = Cursor::new(input);
                let magic = c.u64()?;
                if magic != NBDMAGIC {
                    return Err(ClientError::BadMagic(magic));
                }
                let opt = c.u64()?;
                if opt != IHAVEOPT {
                    return Err(ClientError::BadMagic(opt));
                }
                let hflags = c.u16()?;
                if hflags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
                    return Err(ClientError::NotFixedNewstyle);
                }
                self.no_zeroes = hflags & NBD_FLAG_NO_ZEROES != 0;
                let mut cflags = NBD_FLAG_C_FIXED_NEWSTYLE;
                if self.no_zeroes {
                    cflags |= NBD_FLAG_C_NO_ZEROES;
                }
                self.out.extend_from_slice(&cflags.to_be_bytes());
                if self.opts.structured_replies {
                    encode_option(NBD_OPT_STRUCTURED_REPLY, &[], &mut self.out);
                    self.state = State::StructuredReply;
                } else {
                    self.send_go();
                }
                Ok(c.pos)
            }
            State::StructuredReply => {
                let (n, reply) = decode_option_reply(input)?;
                check_option(&reply, NBD_OPT_STRUCTURED_REPLY)?;
                // Any error (UNSUP, POLICY...) just means simple replies.
                self.structured = reply.reply_type == NBD_REP_ACK;
                self.send_go();
                Ok(n)
            }
            State::Go => {
                let (n, reply) = decode_option_reply(input)?;
                check_option(&reply, NBD_OPT_GO)?;
                match reply.reply_type {
                    NBD_REP_INFO => self.info(reply.data)?,
                    NBD_REP_ACK => {
                        if self.size.is_none() {
                            return Err(ClientError::Protocol("GO acked without NBD_INFO_EXPORT"));
                        }
                        self.state = State::Done;
                    }
                    NBD_REP_ERR_UNSUP => {
                        // An old server: the name alone, and no way to learn block sizes.
                        let name = self.opts.export_name.as_bytes();
                        encode_option(NBD_OPT_EXPORT_NAME, name, &mut self.out);
                        self.state = State::ExportName;
                    }
                    t if t & NBD_REP_FLAG_ERROR != 0 => {
                        return Err(ClientError::Refused {
                            option: NBD_OPT_GO,
                            reply: t,
                            message: String::from_utf8_lossy(reply.data).into_owned(),
                        });
                    }
                    _ => {} // unknown non-error replies are ignored, as the spec asks
                }
                Ok(n)
            }
            State::ExportName => {
                let mut c = Cursor::new(input);
                let size = c.u64()?;
                let flags = c.u16()?;
                if !self.no_zeroes {
                    c.take(124)?;
                }
                self.size = Some((size, flags));
                self.state = State::Done;
                Ok(c.pos)
            }
            State::Done => Ok(0),
        }
    }

    fn send_go(&mut self) {
        let name = self.opts.export_name.as_bytes();
        let mut data = Vec::with_capacity(4 + name.len() + 4);
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name);
        data.extend_from_slice(&1u16.to_be_bytes()); // one info request
        data.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
        encode_option(NBD_OPT_GO, &data, &mut self.out);
        self.state = State::Go;
    }

    fn info(&mut self, data: &[u8]) -> Result<(), ClientError> {
        let mut c = Cursor::new(data);
        let short = |_| ClientError::Protocol("short NBD_REP_INFO");
        match c.u16().map_err(short)? {
            NBD_INFO_EXPORT => {
                let size = c.u64().map_err(short)?;
                let flags = c.u16().map_err(short)?;
                self.size = Some((size, flags));
            }
            NBD_INFO_BLOCK_SIZE => {
                let min = c.u32().map_err(short)?;
                let pref = c.u32().map_err(short)?;
                let max = c.u32().map_err(short)?;
                self.block_size = Some((min, pref, max));
            }
            _ => {} // name, description, unknown: not needed
        }
        Ok(())
    }
}

fn check_option(reply: &OptionReply<'_>, sent: u32) -> Result<(), ClientError> {
    if reply.option != sent {
        return Err(ClientError::Protocol("option reply for another option"));
    }
    Ok(())
}

/// Appends an option request: `IHAVEOPT`, option, length, data.
pub fn encode_option(option: u32, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// One option reply, borrowing its data from the input.
#[derive(Debug, PartialEq, Eq)]
pub struct OptionReply<'a> {
    pub option: u32,
    pub reply_type: u32,
    pub data: &'a [u8],
}

/// Decodes one option reply; returns the bytes used and the reply.
pub fn decode_option_reply(input: &[u8]) -> Result<(usize, OptionReply<'_>), ClientError> {
    let mut c = Cursor::new(input);
    let magic = c.u64()?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(ClientError::BadMagic(magic));
    }
    let option = c.u32()?;
    let reply_type = c.u32()?;
    let len = c.u32()? as usize;
    if len > 64 * 1024 * 1024 {
        return Err(ClientError::Protocol("option reply too long"));
    }
    let data = c.take(len)?;
    Ok((
        c.pos,
        OptionReply {
            option,
            reply_type,
            data,
        },
    ))
}

/// A transmission request header (the payload of a write follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    /// Encodes the 28-byte header.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A reply header. For a simple reply to a successful READ, `length` bytes of data follow,
/// where `length` is the one of the request (the transport knows it by the cookie).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    /// A structured reply chunk; `length` bytes of chunk payload follow.
    Structured {
        flags: u16,
        reply_type: u16,
        cookie: u64,
        length: u32,
    },
}

impl ReplyHeader {
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Structured { cookie, .. } => cookie,
        }
    }
}

/// Decodes one reply header from the start of `input`; returns the bytes used.
pub fn decode_reply_header(input: &[u8]) -> Result<(usize, ReplyHeader), ClientError> {
    let mut c = Cursor::new(input);
    let magic = c.u32()?;
    match magic {
        NBD_SIMPLE_REPLY_MAGIC => {
            let error = c.u32()?;
            let cookie = c.u64()?;
            Ok((c.pos, ReplyHeader::Simple { error, cookie }))
        }
        NBD_STRUCTURED_REPLY_MAGIC => {
            let flags = c.u16()?;
            let reply_type = c.u16()?;
            let cookie = c.u64()?;
            let length = c.u32()?;
            Ok((
                c.pos,
                ReplyHeader::Structured {
                    flags,
                    reply_type,
                    cookie,
                    length,
                },
            ))
        }
        m => Err(ClientError::BadMagic(u64::from(m))),
    }
}

/// A big-endian reader over a byte slice.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ClientError> {
        let end = self.pos.checked_add(n).ok_or(ClientError::Incomplete)?;
        let s = self.buf.get(self.pos..end).ok_or(ClientError::Incomplete)?;
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ClientError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, ClientError> {
        self.array().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Result<u32, ClientError> {
        self.array().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Result<u64, ClientError> {
        self.array().map(u64::from_be_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greeting(hflags: u16) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(b"NBDMAGIC"); // magic
        v.extend_from_slice(b"IHAVEOPT"); // newstyle
        v.extend_from_slice(&hflags.to_be_bytes()); // handshake flags
        v
    }

    fn opt_reply(option: u32, ty: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&ty.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn hs(structured: bool) -> Handshake {
        Handshake::new(HandshakeOptions {
            export_name: "vol".into(),
            structured_replies: structured,
        })
    }

    #[test]
    fn go_with_block_size() {
        let mut h = hs(false);
        let g = greeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        // A partial greeting is not consumed.
        assert_eq!(h.receive(&g[..10]).unwrap(), 0);
        assert_eq!(h.receive(&g).unwrap(), 18);
        #[rustfmt::skip]
        let expect: &[u8] = &[
            0, 0, 0, 3,                               // client flags: FIXED_NEWSTYLE|NO_ZEROES
            b'I', b'H', b'A', b'V', b'E', b'O', b'P', b'T',
            0, 0, 0, 7,                               // NBD_OPT_GO
            0, 0, 0, 11,                              // option length
            0, 0, 0, 3, b'v', b'o', b'l',             // name
            0, 1,                                     // one info request
            0, 3,                                     // NBD_INFO_BLOCK_SIZE
        ];
        assert_eq!(h.take_output(), expect);

        let mut input = opt_reply(
            NBD_OPT_GO,
            NBD_REP_INFO,
            &[
                0, 0, // NBD_INFO_EXPORT
                0, 0, 0, 0, 0x40, 0, 0, 0, // size 1 GiB
                0x01, 0x0d, // HAS_FLAGS|SEND_FLUSH|SEND_FUA|CAN_MULTI_CONN
            ],
        );
        input.extend(opt_reply(
            NBD_OPT_GO,
            NBD_REP_INFO,
            &[
                0, 3, // NBD_INFO_BLOCK_SIZE
                0, 0, 0, 1, // minimum
                0, 0, 0x10, 0, // preferred 4096
                0x02, 0, 0, 0, // maximum 32 MiB
            ],
        ));
        input.extend(opt_reply(NBD_OPT_GO, NBD_REP_ACK, &[]));
        input.extend_from_slice(&[0xAA]); // first byte of transmission: not ours
        assert_eq!(h.receive(&input).unwrap(), input.len() - 1);
        let n = h.negotiated().unwrap();
        assert_eq!(n.size, 1 << 30);
        assert!(n.has(NBD_FLAG_CAN_MULTI_CONN));
        assert_eq!(n.block_size, Some((1, 4096, 32 << 20)));
        assert!(!n.structured_replies);
    }

    #[test]
    fn structured_refused_then_go_unsupported_falls_back_to_export_name() {
        let mut h = hs(true);
        h.receive(&greeting(NBD_FLAG_FIXED_NEWSTYLE)).unwrap();
        let out = h.take_output();
        assert_eq!(&out[..4], &[0, 0, 0, 1]); // FIXED_NEWSTYLE only: server lacks NO_ZEROES
        assert_eq!(&out[12..16], &NBD_OPT_STRUCTURED_REPLY.to_be_bytes());
        h.receive(&opt_reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_UNSUP, b""))
            .unwrap();
        assert_eq!(&h.take_output()[8..12], &NBD_OPT_GO.to_be_bytes());
        h.receive(&opt_reply(NBD_OPT_GO, NBD_REP_ERR_UNSUP, b""))
            .unwrap();
        assert_eq!(&h.take_output()[8..12], &NBD_OPT_EXPORT_NAME.to_be_bytes());
        let mut reply = vec![0, 0, 0, 0, 0, 0, 0x10, 0, 0, 1]; // size 4096, flags HAS_FLAGS
        reply.extend([0u8; 124]); // zeroes: NO_ZEROES was not negotiated
        assert_eq!(h.receive(&reply).unwrap(), 134);
        let n = h.negotiated().unwrap();
        assert_eq!(
            (n.size, n.transmission_flags, n.block_size),
            (4096, 1, None)
        );
    }

    #[test]
    fn go_refused_names_the_error() {
        let mut h = hs(false);
        h.receive(&greeting(3)).unwrap();
        let err = h.receive(&opt_reply(
            NBD_OPT_GO,
            NBD_REP_ERR_UNKNOWN,
            b"no such export",
        ));
        assert!(matches!(
            err,
            Err(ClientError::Refused {
                reply: NBD_REP_ERR_UNKNOWN,
                ..
            })
        ));
    }

    #[test]
    fn request_bytes() {
        let r = RequestHeader {
            flags: NBD_CMD_FLAG_FUA,
            command: NBD_CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 4096,
            length: 512,
        };
        #[rustfmt::skip]
        let expect: [u8; 28] = [
            0x25, 0x60, 0x95, 0x13,         // NBD_REQUEST_MAGIC
            0, 1,                           // flags: FUA
            0, 1,                           // NBD_CMD_WRITE
            1, 2, 3, 4, 5, 6, 7, 8,         // cookie
            0, 0, 0, 0, 0, 0, 0x10, 0,      // offset
            0, 0, 2, 0,                     // length
        ];
        assert_eq!(r.encode(), expect);
    }

    #[test]
    fn reply_headers() {
        #[rustfmt::skip]
        let simple = [
            0x67, 0x44, 0x66, 0x98,         // NBD_SIMPLE_REPLY_MAGIC
            0, 0, 0, 22,                    // EINVAL
            0, 0, 0, 0, 0, 0, 0, 9,         // cookie
        ];
        assert_eq!(
            decode_reply_header(&simple[..15]),
            Err(ClientError::Incomplete)
        );
        assert_eq!(
            decode_reply_header(&simple),
            Ok((
                16,
                ReplyHeader::Simple {
                    error: 22,
                    cookie: 9
                }
            ))
        );
        #[rustfmt::skip]
        let structured = [
            0x66, 0x8e, 0x33, 0xef,         // NBD_STRUCTURED_REPLY_MAGIC
            0, 1,                           // NBD_REPLY_FLAG_DONE
            0, 1,                           // NBD_REPLY_TYPE_OFFSET_DATA
            0, 0, 0, 0, 0, 0, 0, 7,         // cookie
            0, 0, 0, 8,                     // length
        ];
        let (n, h) = decode_reply_header(&structured).unwrap();
        assert_eq!(n, 20);
        assert_eq!(h.cookie(), 7);
        assert!(matches!(
            decode_reply_header(&[0; 16]),
            Err(ClientError::BadMagic(0))
        ));
    }
}
