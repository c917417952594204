//! Snapshot routes and the export stream (`docs/api.md`):
//!
//! ```text
//!  POST   /v1/volumes/NAME/snapshots          {"name": SNAP, "max_rate": BYTES_PER_S}
//!  GET    /v1/volumes/NAME/snapshots          the volume's snapshots
//!  GET    /v1/snapshots                       every snapshot
//!  GET    /v1/volumes/NAME/snapshots/SNAP     one snapshot (state, percent)
//!  DELETE /v1/volumes/NAME/snapshots/SNAP
//!  GET    /v1/volumes/NAME[@SNAP]/export      the decrypted image (export.rs framing)
//! ```

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response};
use serde_json::{Value, json};

use super::{ApiError, blocking, json_body, num_field, str_field};
use crate::daemon::Daemon;
use crate::kms::Caller;

/// Whether a request is one of the snapshot routes (not the export).
pub fn matches(m: &Method, parts: &[&str]) -> bool {
    matches!(
        (m, parts),
        (&Method::GET, ["v1", "snapshots"])
            | (
                &Method::POST | &Method::GET,
                ["v1", "volumes", _, "snapshots"]
            )
            | (
                &Method::GET | &Method::DELETE,
                ["v1", "volumes", _, "snapshots", _]
            )
    )
}

/// Runs a snapshot route; `named`: the `NAME@SNAP` a create names in its body (audit).
pub async fn route(
    req: Request<Incoming>,
    d: Arc<Daemon>,
    named: &mut Option<String>,
) -> Result<Value, ApiError> {
    let path = req.uri().path().to_owned();
    let parts: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(str::to_owned)
        .collect();
    let method = req.method().clone();
    match (method, parts.len()) {
        (Method::GET, 2) => {
            blocking(move || Ok(json!({"snapshots": d.snapshot_list(None)?}))).await
        }
        (Method::POST, 4) => {
            let b = json_body(req).await?;
            let snap = str_field(&b, "name")?
                .ok_or_else(|| ApiError::bad("name (of the snapshot) is required"))?
                .to_owned();
            let rate = num_field(&b, "max_rate")?.unwrap_or(0);
            let vol = parts[2].clone();
            *named = Some(format!("{vol}@{snap}"));
            blocking(move || Ok(json!(d.snapshot_create(&vol, &snap, rate)?))).await
        }
        (Method::GET, 4) => {
            let vol = parts[2].clone();
            blocking(move || Ok(json!({"snapshots": d.snapshot_list(Some(&vol))?}))).await
        }
        (Method::GET, _) => {
            let full = format!("{}@{}", parts[2], parts[4]);
            blocking(move || Ok(json!(d.snapshot_inspect(&full)?))).await
        }
        (_, _) => {
            let full = format!("{}@{}", parts[2], parts[4]);
            blocking(move || {
                d.snapshot_delete(&full)?;
                Ok(json!({"deleted": full}))
            })
            .await
        }
    }
}

/// The body of an export answer: records from the producer thread.
pub struct ExportBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ExportBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// The volume (or `NAME@SNAP`) an export request names.
pub fn export_target(m: &Method, path: &str) -> Option<String> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (m, parts.as_slice()) {
        (&Method::GET, ["v1", "volumes", name, "export"]) => Some((*name).to_owned()),
        _ => None,
    }
}

/// `GET .../export`: opens the source (the DEK is unwrapped for the caller, audited as
/// `exportVolume`), then streams. A refusal is a JSON error as for any route.
pub async fn export(
    d: Arc<Daemon>,
    c: Caller,
    name: String,
) -> Result<Response<http_body_util::combinators::BoxBody<Bytes, std::io::Error>>, ApiError> {
    let (d2, n2) = (d.clone(), name.clone());
    let src = blocking(move || Ok(d2.export_source(&c, &n2)?)).await;
    let audited = src.as_ref().map(|_| json!({})).map_err(|e| ApiError {
        status: e.status,
        code: e.code.clone(),
        msg: e.msg.clone(),
    });
    super::audit::record(d, c, "exportVolume", Some(name.clone()), &audited).await;
    let src = src?;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::task::spawn_blocking(move || {
        let n = super::export::produce(src, tx);
        tracing::info!(volume = %name, data_bytes = n, "exported");
    });
    Ok(Response::builder()
        .header("content-type", "application/x-cryptvol-export")
        .body(ExportBody(rx).boxed())
        .expect("static response parts"))
}
