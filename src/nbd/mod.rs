//! The NBD protocol, sans-I/O: constants under the spec's names, option and request parsing,
//! reply encoding. Never awaits, never touches a socket: the transport loops "try to decode,
//! else read more".
#![forbid(unsafe_code)]

pub mod client;
pub mod consts;
pub mod handshake;
pub mod transmission;

/// Why bytes did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("more bytes needed")]
    Incomplete,
    #[error("{0}")]
    Invalid(&'static str),
    #[error("option too long")]
    TooLong,
}
