//! Handshake messages (fixed newstyle): the greeting, option requests, option replies.
//! Parsers take a byte slice and return `Incomplete` when more bytes are needed.

use super::DecodeError;
use super::consts::*;

/// Bytes of an option request header: IHAVEOPT, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Largest option payload accepted; longer ones close the connection (no buffering 2^31 bytes).
pub const MAX_OPTION_LEN: u32 = 16 * 1024;

/// The server's first 18 bytes.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Client flags as sent after the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// Parses the client's 4-byte flags; unknown bits are an error (the connection closes).
pub fn parse_client_flags(b: &[u8]) -> Result<ClientFlags, DecodeError> {
    let raw = u32::from_be_bytes(
        b.get(..4)
            .ok_or(DecodeError::Incomplete)?
            .try_into()
            .expect("4"),
    );
    if raw & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
        return Err(DecodeError::Invalid("unknown client flags"));
    }
    Ok(ClientFlags {
        fixed_newstyle: raw & NBD_FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: raw & NBD_FLAG_C_NO_ZEROES != 0,
    })
}

/// An option request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

pub fn parse_option_header(b: &[u8]) -> Result<OptionHeader, DecodeError> {
    let b = b.get(..OPTION_HEADER_LEN).ok_or(DecodeError::Incomplete)?;
    if u64::from_be_bytes(b[0..8].try_into().expect("8")) != IHAVEOPT {
        return Err(DecodeError::Invalid("bad option magic"));
    }
    let option = u32::from_be_bytes(b[8..12].try_into().expect("4"));
    let length = u32::from_be_bytes(b[12..16].try_into().expect("4"));
    if length > MAX_OPTION_LEN {
        return Err(DecodeError::TooLong);
    }
    Ok(OptionHeader { option, length })
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

/// Parses an INFO/GO payload; a length mismatch is `Invalid` (answered with ERR_INVALID).
pub fn parse_info_request(d: &[u8]) -> Result<InfoRequest, DecodeError> {
    let mut c = Cursor(d);
    let name = c.string_u32()?;
    let n = c.u16()?;
    let mut requests = Vec::with_capacity(usize::from(n).min(16));
    for _ in 0..n {
        requests.push(c.u16()?);
    }
    c.end()?;
    Ok(InfoRequest { name, requests })
}

/// The payload of `NBD_OPT_SET_META_CONTEXT` / `NBD_OPT_LIST_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

pub fn parse_meta_context_request(d: &[u8]) -> Result<MetaContextRequest, DecodeError> {
    let mut c = Cursor(d);
    let export = c.string_u32()?;
    let n = c.u32()?;
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(c.string_u32()?);
    }
    c.end()?;
    Ok(MetaContextRequest { export, queries })
}

/// Appends one option reply.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an `NBD_REP_INFO` with `NBD_INFO_EXPORT`.
pub fn encode_info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    let mut d = [0u8; 12];
    d[0..2].copy_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
    d[2..10].copy_from_slice(&size.to_be_bytes());
    d[10..12].copy_from_slice(&flags.to_be_bytes());
    encode_option_reply(out, option, NBD_REP_INFO, &d);
}

/// Appends an `NBD_REP_INFO` with `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
pub fn encode_info_text(out: &mut Vec<u8>, option: u32, info: u16, text: &str) {
    let mut d = Vec::with_capacity(2 + text.len());
    d.extend_from_slice(&info.to_be_bytes());
    d.extend_from_slice(text.as_bytes());
    encode_option_reply(out, option, NBD_REP_INFO, &d);
}

/// Appends an `NBD_REP_INFO` with `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(out: &mut Vec<u8>, option: u32, min: u32, preferred: u32, max: u32) {
    let mut d = [0u8; 14];
    d[0..2].copy_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    d[2..6].copy_from_slice(&min.to_be_bytes());
    d[6..10].copy_from_slice(&preferred.to_be_bytes());
    d[10..14].copy_from_slice(&max.to_be_bytes());
    encode_option_reply(out, option, NBD_REP_INFO, &d);
}

/// Appends an `NBD_REP_SERVER` for `NBD_OPT_LIST`.
pub fn encode_server(out: &mut Vec<u8>, name: &str, description: &str) {
    let mut d = Vec::with_capacity(4 + name.len() + description.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(description.as_bytes());
    encode_option_reply(out, NBD_OPT_LIST, NBD_REP_SERVER, &d);
}

/// Appends an `NBD_REP_META_CONTEXT`.
pub fn encode_meta_context(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    encode_option_reply(out, option, NBD_REP_META_CONTEXT, &d);
}

/// Size and flags after `NBD_OPT_EXPORT_NAME` (plus 124 zeros unless NO_ZEROES).
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// A bounds-checked big-endian reader over an option payload.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Invalid("option payload too short"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn string_u32(&mut self) -> Result<String, DecodeError> {
        let n = self.u32()? as usize;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| DecodeError::Invalid("string is not UTF-8"))
    }
    fn end(&self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Invalid("option payload too long"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_bytes() {
        let g = greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC"); // magic
        assert_eq!(&g[8..16], b"IHAVEOPT"); // newstyle magic
        assert_eq!(&g[16..18], &[0, 3]); // FIXED_NEWSTYLE | NO_ZEROES
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            parse_client_flags(&[0, 0, 0, 3]).unwrap(),
            ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            }
        );
        assert!(parse_client_flags(&[0, 0, 0, 4]).is_err()); // unknown bit
        assert_eq!(parse_client_flags(&[0, 0]), Err(DecodeError::Incomplete));
    }

    #[test]
    fn option_header_table() {
        let mut b = Vec::new();
        b.extend_from_slice(b"IHAVEOPT"); // magic
        b.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        b.extend_from_slice(&6u32.to_be_bytes()); // length
        assert_eq!(
            parse_option_header(&b).unwrap(),
            OptionHeader {
                option: 7,
                length: 6
            }
        );
        assert_eq!(parse_option_header(&b[..15]), Err(DecodeError::Incomplete));
        b[12..16].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // 2^31: refused outright
        assert_eq!(parse_option_header(&b), Err(DecodeError::TooLong));
        b[0] = b'X';
        assert!(parse_option_header(&b).is_err());
    }

    #[test]
    fn info_request_table() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes()); // name length
        d.extend_from_slice(b"vol"); // name
        d.extend_from_slice(&1u16.to_be_bytes()); // one info request
        d.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes()); // BLOCK_SIZE
        assert_eq!(
            parse_info_request(&d).unwrap(),
            InfoRequest {
                name: "vol".into(),
                requests: vec![3]
            }
        );
        assert!(parse_info_request(&d[..d.len() - 1]).is_err()); // truncated
        d.push(0);
        assert!(parse_info_request(&d).is_err()); // trailing byte
        let mut bad = 100u32.to_be_bytes().to_vec(); // name length past the end
        bad.extend_from_slice(b"x");
        assert!(parse_info_request(&bad).is_err());
    }

    #[test]
    fn option_reply_table() {
        let mut out = Vec::new();
        encode_info_export(&mut out, NBD_OPT_GO, 1 << 20, 0x0101);
        assert_eq!(&out[0..8], &OPTION_REPLY_MAGIC.to_be_bytes()); // reply magic
        assert_eq!(&out[8..12], &7u32.to_be_bytes()); // option
        assert_eq!(&out[12..16], &NBD_REP_INFO.to_be_bytes()); // reply type
        assert_eq!(&out[16..20], &12u32.to_be_bytes()); // length
        assert_eq!(&out[20..22], &[0, 0]); // NBD_INFO_EXPORT
        assert_eq!(&out[22..30], &(1u64 << 20).to_be_bytes()); // size
        assert_eq!(&out[30..32], &[1, 1]); // flags
    }
}
