//! Serves an in-memory export on a Unix socket: `memserve SOCKET [SIZE_MIB]` (protocol tests
//! and the fio comparison with `nbdkit memory`).
use std::sync::Arc;

use cryptvol::server::{self, Listener, MemBackend, ServerConfig, StaticRegistry};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let sock = args.next().expect("usage: memserve SOCKET [SIZE_MIB]");
    let mib: u64 = args
        .next()
        .map(|s| s.parse().expect("size in MiB"))
        .unwrap_or(1024);
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)?;
    let reg = StaticRegistry::new().with("mem", Arc::new(MemBackend::new(mib << 20, 4096)), false);
    let (_tx, rx) = tokio::sync::watch::channel(false);
    server::serve(
        vec![Listener::Unix(listener)],
        Arc::new(reg),
        ServerConfig::default(),
        rx,
    )
    .await
}
