//! tokio NBD server: listeners, one session per connection (handshake -> transmission), a reader
//! task and a writer task so replies go out of order. The only code that touches sockets.
//!
//! CONTRACT (used by `daemon/`; filled in by the NBD issue, signatures stay):
//!
//! ```ignore
//! pub struct ServerConfig {
//!     pub max_connections: usize,           // global cap (semaphore)
//!     pub handshake_timeout: Duration,      // e.g. 10 s
//!     pub max_in_flight: usize,             // requests per connection
//!     pub tls: Option<Arc<rustls::ServerConfig>>, // STARTTLS offered when Some
//!     pub require_tls_on_tcp: bool,         // FORCEDTLS on TCP listeners
//! }                                          // impl Default
//! pub enum Listener { Unix(tokio::net::UnixListener), Tcp(tokio::net::TcpListener) }
//! /// Serves until `shutdown` becomes true; then stops accepting, lets sessions finish in-flight
//! /// requests, and returns when all have ended.
//! pub async fn serve(listeners: Vec<Listener>, registry: Arc<dyn ExportRegistry>,
//!                    cfg: ServerConfig, shutdown: tokio::sync::watch::Receiver<bool>) -> io::Result<()>;
//! pub struct MemBackend;  // in-memory Backend for tests: MemBackend::new(size, block_size)
//! pub struct StaticRegistry; // name -> Arc<dyn Backend> map implementing ExportRegistry (tests)
//! ```

pub mod backend;

pub use backend::{Backend, ExportInfo, ExportRegistry, Extent, OpenExport};
