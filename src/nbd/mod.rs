//! The NBD protocol, sans-I/O: constants under the spec's names, option and request parsing,
//! reply encoding. Never awaits, never touches a socket.
#![forbid(unsafe_code)]

pub mod client;
pub mod consts;
