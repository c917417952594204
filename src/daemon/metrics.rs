//! `[metrics] listen`: the Prometheus endpoint on a loopback TCP address, for a scraper that
//! cannot reach the control socket. It serves `GET /metrics` and nothing else.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use super::Daemon;

/// Scrapes served at once; more wait in the backlog.
const MAX_CONNECTIONS: usize = 16;
/// A request's headers must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection (kept alive or not) is closed after this.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    daemon: Arc<Daemon>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut failures = crate::server::AcceptFailures::new("metrics");
    loop {
        let Some(((stream, _), slot)) =
            crate::server::accept_in_slot(&slots, &mut failures, &mut shutdown, || {
                listener.accept()
            })
            .await
        else {
            return;
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let daemon = daemon.clone();
                async move {
                    Ok::<_, Infallible>(
                        if req.method() == Method::GET && req.uri().path() == "/metrics" {
                            crate::api::metrics_response(&daemon)
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"only GET /metrics\n")))
                                .expect("static response parts")
                        },
                    )
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            drop(slot);
        });
    }
}
