//! The control API: HTTP/1.1 + JSON on a Unix socket (hyper). KMS operations follow the cloud
//! KMS API (`POST /v1/kms/<operation>`, its field names, numbers as strings, binary as hex);
//! volume operations live under `/v1/volumes`. Every request is checked against the peer's
//! credentials (SO_PEERCRED, SO_PEERGROUPS) and the caller is recorded in the audit log.
//! Routes: `docs/api.md`.

mod auth;
mod kms_ops;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::daemon::{Daemon, DaemonError, parse_size};
use crate::kms::Caller;
pub use auth::{Access, group_gid};

/// Largest JSON body accepted.
const MAX_BODY: usize = 1 << 20;

/// An API error: HTTP status, code and message, rendered as the cloud KMS error document.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub msg: String,
}

impl ApiError {
    pub fn bad(msg: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            code: "KMS.0101".into(),
            msg: msg.into(),
        }
    }
}

impl From<DaemonError> for ApiError {
    fn from(e: DaemonError) -> ApiError {
        ApiError {
            status: e.http_status(),
            code: e.error_code().into(),
            msg: e.to_string(),
        }
    }
}

impl From<crate::kms::KmsError> for ApiError {
    fn from(e: crate::kms::KmsError) -> ApiError {
        ApiError {
            status: e.http_status(),
            code: e.error_code().into(),
            msg: e.to_string(),
        }
    }
}

fn respond(status: u16, v: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .expect("static response parts")
}

fn error_response(e: ApiError) -> Response<Full<Bytes>> {
    respond(
        e.status,
        &json!({"error": {"error_code": e.code, "error_msg": e.msg}}),
    )
}

/// Serves the control socket until `shutdown`.
pub async fn serve(
    listener: UnixListener,
    daemon: Arc<Daemon>,
    access: Access,
    mut shutdown: watch::Receiver<bool>,
) {
    let access = Arc::new(access);
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control accept failed");
                    continue;
                }
            },
            _ = shutdown.wait_for(|v| *v) => return,
        };
        let cred = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "no peer credentials");
                continue;
            }
        };
        let caller = Caller {
            uid: cred.uid(),
            pid: cred.pid().unwrap_or(0),
        };
        let groups = auth::peer_groups(&stream).unwrap_or_else(|e| {
            // Linux < 4.13: only the peer's primary group can be checked.
            tracing::warn!(error = %e, "no peer groups (SO_PEERGROUPS)");
            Vec::new()
        });
        let allowed = access.allows(cred.uid(), cred.gid(), &groups);
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let daemon = daemon.clone();
                async move {
                    if !allowed {
                        return Ok::<_, Infallible>(error_response(ApiError {
                            status: 403,
                            code: "API.0403".into(),
                            msg: format!("uid {} may not use the control socket", caller.uid),
                        }));
                    }
                    Ok(match route(req, daemon, caller).await {
                        Ok(v) => respond(200, &v),
                        Err(e) => error_response(e),
                    })
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
    }
}

async fn json_body(req: Request<Incoming>) -> Result<Value, ApiError> {
    let body = http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::bad(format!("request body: {e}")))?
        .to_bytes();
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad(format!("request body is not JSON: {e}")))
}

/// Runs blocking daemon work off the reactor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError {
        status: 500,
        code: "API.0500".into(),
        msg: format!("internal: {e}"),
    })?
}

/// A field that may be a JSON string or number (the cloud API sends numbers as strings).
pub(crate) fn num_field(v: &Value, key: &str) -> Result<Option<u64>, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| ApiError::bad(format!("{key} must be a non-negative integer"))),
        Some(Value::String(s)) => parse_size(s)
            .map(Some)
            .ok_or_else(|| ApiError::bad(format!("{key} {s:?} is not a number"))),
        Some(_) => Err(ApiError::bad(format!("{key} must be a string or number"))),
    }
}

pub(crate) fn str_field<'a>(v: &'a Value, key: &str) -> Result<Option<&'a str>, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::bad(format!("{key} must be a string"))),
    }
}

fn bool_field(v: &Value, key: &str) -> bool {
    matches!(v.get(key), Some(Value::Bool(true)))
        || matches!(v.get(key), Some(Value::String(s)) if s == "true")
}

async fn route(req: Request<Incoming>, d: Arc<Daemon>, c: Caller) -> Result<Value, ApiError> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    match (method, parts.as_slice()) {
        (Method::GET, ["v1", "health"]) => Ok(json!({"status": "ok"})),
        (Method::POST, ["v1", "kms", op]) => {
            let op = op.to_string();
            let body = json_body(req).await?;
            blocking(move || kms_ops::dispatch(&d.kms, &c, &op, &body)).await
        }
        (Method::GET, ["v1", "audit", "verify"]) => {
            blocking(move || Ok(serde_json::to_value(d.kms.audit_verify()?).unwrap_or_default()))
                .await
        }
        (Method::GET, ["v1", "volumes"]) => {
            blocking(move || Ok(json!({"volumes": d.list_volumes()?}))).await
        }
        (Method::POST, ["v1", "volumes"]) => {
            let b = json_body(req).await?;
            let name = str_field(&b, "name")?
                .ok_or_else(|| ApiError::bad("name is required"))?
                .to_owned();
            let size = num_field(&b, "size")?.ok_or_else(|| ApiError::bad("size is required"))?;
            let sector = num_field(&b, "sector_size")?.unwrap_or(4096) as u32;
            let key = str_field(&b, "key_id")?.map(str::to_owned);
            blocking(move || {
                Ok(json!(d.create_volume(
                    &c,
                    &name,
                    size,
                    sector,
                    key.as_deref()
                )?))
            })
            .await
        }
        (Method::GET, ["v1", "volumes", name]) => {
            let name = name.to_string();
            blocking(move || Ok(json!(d.inspect(&name)?))).await
        }
        (Method::DELETE, ["v1", "volumes", name]) => {
            let name = name.to_string();
            blocking(move || {
                d.delete(&name)?;
                Ok(json!({"deleted": name}))
            })
            .await
        }
        (Method::POST, ["v1", "volumes", name, "import"]) => {
            let name = name.to_string();
            let q: Value = Value::Object(
                query
                    .split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
                    .collect(),
            );
            let size = num_field(&q, "size")?
                .ok_or_else(|| ApiError::bad("size query parameter is required"))?;
            let key = str_field(&q, "key_id")?.map(str::to_owned);
            import(req, d, c, name, size, key).await
        }
        (Method::POST, ["v1", "volumes", name, action]) => {
            let (name, action) = (name.to_string(), action.to_string());
            let b = json_body(req).await?;
            blocking(move || {
                let info = match action.as_str() {
                    "attach" => d.attach(&c, &name, bool_field(&b, "read_only"))?,
                    "detach" => d.detach(&name, bool_field(&b, "force"))?,
                    "resize" => {
                        let size = num_field(&b, "size")?
                            .ok_or_else(|| ApiError::bad("size is required"))?;
                        d.resize(&name, size)?
                    }
                    "rewrap" => d.rewrap(&c, &name)?,
                    _ => {
                        return Err(ApiError {
                            status: 404,
                            code: "API.0404".into(),
                            msg: format!("no action {action:?}"),
                        });
                    }
                };
                Ok(json!(info))
            })
            .await
        }
        (m, _) => Err(ApiError {
            status: 404,
            code: "API.0404".into(),
            msg: format!("no route {m} {path}"),
        }),
    }
}

/// Streams the request body (a raw image) into a new volume; the blocking import reads it
/// through a channel, so memory stays bounded whatever the image size.
async fn import(
    req: Request<Incoming>,
    d: Arc<Daemon>,
    c: Caller,
    name: String,
    size: u64,
    key: Option<String>,
) -> Result<Value, ApiError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(8);
    let job = tokio::task::spawn_blocking(move || -> Result<Value, ApiError> {
        let reader = ChannelReader {
            rx,
            cur: Bytes::new(),
        };
        Ok(json!(d.import_volume(
            &c,
            &name,
            size,
            key.as_deref(),
            reader
        )?))
    });
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad(format!("upload: {e}")))?;
        if let Ok(data) = frame.into_data() {
            let tx = tx.clone();
            // The channel is bounded: wait for the importer off the reactor.
            let sent = tokio::task::spawn_blocking(move || tx.send(data).is_ok())
                .await
                .unwrap_or(false);
            if !sent {
                break;
            }
        }
    }
    drop(tx);
    job.await.map_err(|e| ApiError {
        status: 500,
        code: "API.0500".into(),
        msg: e.to_string(),
    })?
}

struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.recv() {
                Ok(b) => self.cur = b,
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}
