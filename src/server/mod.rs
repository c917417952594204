//! tokio NBD server: listeners, one session per connection (handshake -> transmission). The
//! only code that touches sockets. Serves any [`ExportRegistry`] of [`Backend`]s.
//!
//! Transmission runs one of two ways: on a plain socket, a thread per connection with blocking
//! reads ([`threaded`], the fast path); under TLS, the async reader loop and writer task of
//! [`session`]. Both execute requests through [`exec`] and reply out of order.
//!
//! Shape (mini-redis): [`serve`] accepts until shutdown, a semaphore caps connections, every
//! session watches the shutdown signal, and `serve` returns once all sessions have ended.

mod accept;
pub mod backend;
mod bufpool;
mod demote;
mod dispatch;
mod exec;
mod identity;
mod mem;
pub mod qos;
mod session;
mod streaming;
mod threaded;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

pub use accept::{AcceptFailures, accept_in_slot};
pub use backend::{Backend, ExportInfo, ExportRegistry, Extent, OpenExport};
pub use identity::{CertNames, PeerIdentity};
pub use mem::{MemBackend, StaticRegistry};
pub use qos::{Qos, QosLimits};

/// Limits and TLS for a server.
#[derive(Clone)]
pub struct ServerConfig {
    /// Global cap on connections (a semaphore; more wait in the accept backlog).
    pub max_connections: usize,
    /// A client must finish the handshake within this.
    pub handshake_timeout: Duration,
    /// Cap on connections still in the handshake, per listener (a semaphore each, apart from
    /// `max_connections`): clients that connect and stall hold at most this many slots, each
    /// for at most `handshake_timeout`; established sessions are never among them, and a
    /// flood on the TCP port does not delay Unix-socket clients.
    pub max_handshakes: usize,
    /// Requests in flight per connection.
    pub max_in_flight: usize,
    /// Payload bytes buffered per connection (at least one maximum-size request).
    pub max_buffer_bytes: usize,
    /// Close a connection that sends no request for this long (off by default).
    pub idle_timeout: Option<Duration>,
    /// STARTTLS is offered when set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// TCP clients must STARTTLS before anything else (FORCEDTLS).
    pub require_tls_on_tcp: bool,
    /// Plain (non-TLS) connections serve transmission on a thread of their own with blocking
    /// socket I/O (the default, measured faster); `false` keeps them on the async path that
    /// TLS connections always use.
    pub threaded_transmission: bool,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 64,
            max_in_flight: 64,
            max_buffer_bytes: 64 << 20,
            idle_timeout: None,
            tls: None,
            require_tls_on_tcp: true,
            threaded_transmission: true,
        }
    }
}

pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// Serves until `shutdown` becomes true; then stops accepting, lets sessions finish their
/// in-flight requests, and returns when all have ended.
pub async fn serve(
    listeners: Vec<Listener>,
    registry: Arc<dyn ExportRegistry>,
    cfg: ServerConfig,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let cfg = Arc::new(cfg);
    let connections = Arc::new(Semaphore::new(cfg.max_connections.max(1)));
    let mut accept = JoinSet::new();
    for l in listeners {
        let slots = Slots {
            connections: connections.clone(),
            handshakes: Arc::new(Semaphore::new(cfg.max_handshakes.max(1))),
        };
        accept.spawn(accept_loop(
            l,
            registry.clone(),
            cfg.clone(),
            slots,
            shutdown.clone(),
        ));
    }
    while let Some(r) = accept.join_next().await {
        if let Ok(Err(e)) = r {
            tracing::error!(error = %e, "listener failed");
        }
    }
    Ok(())
}

/// The connection caps of one listener.
struct Slots {
    /// Held for a connection's life; shared by all listeners.
    connections: Arc<Semaphore>,
    /// Held from accept until the handshake ends (GO/EXPORT_NAME, or the connection closes);
    /// this listener's own.
    handshakes: Arc<Semaphore>,
}

async fn accept_loop(
    listener: Listener,
    registry: Arc<dyn ExportRegistry>,
    cfg: Arc<ServerConfig>,
    slots: Slots,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut sessions = JoinSet::new();
    let mut failures = AcceptFailures::new("nbd");
    loop {
        // While either cap is reached, new clients wait in the listen backlog: a flood of
        // stalled handshakes delays new clients by at most about `handshake_timeout` per
        // `max_handshakes` stalled ones ahead of them, and never touches established sessions.
        let (permit, handshake) = tokio::select! {
            p = async {
                let c = slots.connections.clone().acquire_owned().await;
                let h = slots.handshakes.clone().acquire_owned().await;
                (c.expect("semaphore never closed"), h.expect("semaphore never closed"))
            } => p,
            _ = shutdown.wait_for(|v| *v) => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
        };
        let accepted: io::Result<(session::BoxStream, bool)> = tokio::select! {
            r = accept_one(&listener) => r,
            _ = shutdown.wait_for(|v| *v) => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
        };
        let (stream, tcp) = match accepted {
            Ok(s) => {
                failures.succeeded();
                s
            }
            Err(e) => {
                // EMFILE and friends: back off, log at most once a second, keep serving.
                let wait = failures.failed(&e);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait_for(|v| *v) => break,
                }
                continue;
            }
        };
        let (registry, cfg, shutdown) = (registry.clone(), cfg.clone(), shutdown.clone());
        sessions.spawn(async move {
            let peer = session::Peer {
                tcp,
                tls_active: false,
                identity: if tcp {
                    PeerIdentity::Anonymous
                } else {
                    PeerIdentity::Local
                },
                handshake: Some(handshake),
            };
            if let Err(e) = session::run(stream, registry, cfg, peer, shutdown).await {
                tracing::debug!(error = %e, "session ended with an error");
            }
            drop(permit);
        });
    }
    while sessions.join_next().await.is_some() {}
    Ok(())
}

async fn accept_one(l: &Listener) -> io::Result<(session::BoxStream, bool)> {
    match l {
        Listener::Unix(u) => {
            let (s, _) = u.accept().await?;
            grow_send_buffer(&s);
            Ok((Box::new(s), false))
        }
        Listener::Tcp(t) => {
            let (s, _) = t.accept().await?;
            // Small replies must not wait for Nagle (measured 70x on small writes).
            s.set_nodelay(true)?;
            Ok((Box::new(s), true))
        }
    }
}

/// Send buffer asked for on Unix connections (the kernel caps it at `net.core.wmem_max`).
const UNIX_SNDBUF: libc::c_int = 2 << 20;

/// A 1 MiB READ reply does not fit the default Unix send buffer (208 KiB): the thread sending
/// it sleeps and wakes about five times per reply while the client drains the socket. With
/// 2 MiB it is written in one go: measured +20% on 1 MiB sequential reads (2470 -> 3100 MiB/s,
/// `docs/benchmarks.md`). A limit, not an allocation: memory is only used by replies a client
/// has not read yet. (TCP is left alone: setting it would switch off the kernel's autotuning.)
fn grow_send_buffer(s: &impl std::os::fd::AsRawFd) {
    let v = UNIX_SNDBUF;
    // std and tokio offer no SO_SNDBUF setter for Unix sockets; socket2 would, for this one call.
    // SAFETY: `v` outlives the call and its size is passed; the fd is a live socket owned by
    // the caller. A failure leaves the default, which is only slower.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw const v).cast(),
            std::mem::size_of_val(&v) as libc::socklen_t,
        );
    }
}
