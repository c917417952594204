//! cryptvol: encrypted virtual disks served over NBD.
//!
//! ```text
//!   cli ──HTTP/JSON──▶ api ──▶ daemon ──▶ kms      (CMKs, wrapped DEKs, audit)
//!                                │  └───▶ volume   (header, AES-256-XTS sectors, block store)
//!                                └──────▶ server   (tokio NBD sessions) ──▶ nbd (sans-I/O codec)
//! ```
//! Dependencies point one way: `nbd` knows no sockets, `volume` and `kms` know nothing of NBD,
//! only `server` touches sockets, `daemon` joins the parts, `cli` is a client of `api`.

pub mod aligned;
pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod kms;
pub mod metrics;
pub mod nbd;
pub mod secmem;
pub mod server;
pub mod volume;
pub mod zeroes;
