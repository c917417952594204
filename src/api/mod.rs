//! The control API: HTTP/1.1 + JSON on a Unix socket (hyper). KMS operations follow the cloud
//! KMS API (`POST /v1/kms/<operation>`, its field names, numbers as strings, binary as hex);
//! volume operations live under `/v1/volumes`. Every request is checked against the peer's
//! credentials (SO_PEERCRED, SO_PEERGROUPS) and the caller is recorded in the audit log.
//! Routes: `docs/api.md`.

mod audit;
mod auth;
pub mod export;
mod kms_ops;
mod snapshots;

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
/// A JSON body (at most [`MAX_BODY`]) must arrive within this once its headers are in: a
/// caller that stalls mid-body does not keep a connection slot.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// An import upload may pause at most this long between two pieces of its body.
const UPLOAD_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

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

/// Every answer's body: a JSON document, or (export) a stream.
pub type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed()
}

fn respond(status: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(full(Bytes::from(v.to_string())))
        .expect("static response parts")
}

fn error_response(e: ApiError) -> Response<Body> {
    respond(
        e.status,
        &json!({"error": {"error_code": e.code, "error_msg": e.msg}}),
    )
}

/// Limits of the control socket against a caller that opens connections and stalls.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// A request's headers (the first, and each next one on a kept-alive connection) must
    /// arrive within this.
    pub header_timeout: std::time::Duration,
}

/// Serves the control socket until `shutdown`.
pub async fn serve(
    listener: UnixListener,
    daemon: Arc<Daemon>,
    access: Access,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let access = Arc::new(access);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut failures = crate::server::AcceptFailures::new("control");
    loop {
        // At the cap, callers wait in the backlog until a connection ends: stalled ones end
        // within `header_timeout`.
        let Some(((stream, _), slot)) =
            crate::server::accept_in_slot(&slots, &mut failures, &mut shutdown, || {
                listener.accept()
            })
            .await
        else {
            return;
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
            gid: cred.gid(),
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
                    if req.method() == Method::GET && req.uri().path() == "/metrics" {
                        return Ok(metrics_response(&daemon)
                            .map(|b| b.map_err(|never| match never {}).boxed()));
                    }
                    if let Some(name) = snapshots::export_target(req.method(), req.uri().path()) {
                        // A stream, not a JSON document.
                        return Ok(snapshots::export(daemon, caller, name)
                            .await
                            .unwrap_or_else(error_response));
                    }
                    let vol_op = volume_op(req.method(), req.uri().path());
                    let r = route(req, daemon, caller).await;
                    if let Some(op) = vol_op {
                        crate::metrics::volume_op(
                            op,
                            r.as_ref().map(|_| ()).map_err(|e| e.code.as_str()),
                        );
                    }
                    Ok(match r {
                        Ok(v) => respond(200, &v),
                        Err(e) => error_response(e),
                    })
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "control connection ended");
            }
            drop(slot);
        });
    }
}

/// `GET /metrics`: the Prometheus text exposition (`docs/metrics.md`).
pub fn metrics_response(daemon: &Daemon) -> Response<Full<Bytes>> {
    Response::builder()
        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
        .body(Full::new(Bytes::from(crate::metrics::render(
            &daemon.exports.stats(),
        ))))
        .expect("static response parts")
}

/// The volume operation a request is, for the metrics.
fn volume_op(m: &Method, path: &str) -> Option<&'static str> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (m, parts.as_slice()) {
        (&Method::POST, ["v1", "volumes"]) => Some("create"),
        (&Method::DELETE, ["v1", "volumes", _]) => Some("delete"),
        (&Method::POST, ["v1", "volumes", _, a]) => [
            "import",
            "attach",
            "detach",
            "resize",
            "rewrap",
            "reencrypt",
        ]
        .into_iter()
        .find(|k| k == a),
        _ => None,
    }
}

/// Counts an API operation's result for the metrics.
fn counted<T>(
    r: Result<T, ApiError>,
    record: impl FnOnce(Result<(), &str>),
) -> Result<T, ApiError> {
    record(r.as_ref().map(|_| ()).map_err(|e| e.code.as_str()));
    r
}

async fn json_body(req: Request<Incoming>) -> Result<Value, ApiError> {
    let collect = http_body_util::Limited::new(req.into_body(), MAX_BODY).collect();
    let body = tokio::time::timeout(BODY_TIMEOUT, collect)
        .await
        .map_err(|_| ApiError::bad("request body: not received in time"))?
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

/// `cache`: `"writeback"` or `"none"` (SPEC §9).
fn cache_field(v: &Value) -> Result<Option<crate::volume::CacheMode>, ApiError> {
    str_field(v, "cache")?
        .map(|s| {
            crate::volume::CacheMode::parse(s).ok_or_else(|| {
                ApiError::bad(format!("cache {s:?} must be \"writeback\" or \"none\""))
            })
        })
        .transpose()
}

fn bool_field(v: &Value, key: &str) -> bool {
    matches!(v.get(key), Some(Value::Bool(true)))
        || matches!(v.get(key), Some(Value::String(s)) if s == "true")
}

/// Routes a request; state-changing volume calls are audited (`audit.rs`).
async fn route(req: Request<Incoming>, d: Arc<Daemon>, c: Caller) -> Result<Value, ApiError> {
    let audited = audit::volume_op(req.method(), req.uri().path());
    let mut named = None;
    let r = route_inner(req, d.clone(), c, &mut named).await;
    if let Some((op, volume)) = audited {
        audit::record(d, c, op, volume.or(named), &r).await;
    }
    r
}

/// `named`: set to the volume a create names in its body.
async fn route_inner(
    req: Request<Incoming>,
    d: Arc<Daemon>,
    c: Caller,
    named: &mut Option<String>,
) -> Result<Value, ApiError> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    if snapshots::matches(&method, &parts) {
        return snapshots::route(req, d, named).await;
    }
    match (method, parts.as_slice()) {
        (Method::GET, ["v1", "health"]) => Ok(json!({"status": "ok"})),
        (Method::POST, ["v1", "kms", "import-key-to-hsm"]) => {
            let b = json_body(req).await;
            blocking(move || {
                let request = b.and_then(|b| {
                    let key = str_field(&b, "key_id")?
                        .ok_or_else(|| ApiError::bad("key_id is required"))?;
                    Ok((key.to_owned(), bool_field(&b, "keep_file_material")))
                });
                let (key, keep) = match request {
                    Ok(r) => r,
                    Err(e) => {
                        // Refused before the key manager saw it: audited here, as kms_ops does.
                        let s = crate::kms::audit::Subject::default();
                        if let Err(ae) = d.kms.audit_event(&c, "importKeyToHsm", s, &e.code) {
                            tracing::error!(error = %ae, "audit log append failed");
                        }
                        return Err(e);
                    }
                };
                let (meta, volumes, dropped) = d.import_key_to_hsm(&c, &key, keep)?;
                Ok(json!({"key_info": meta, "rewrapped_volumes": volumes, "file_material_dropped": dropped}))
            })
            .await
        }
        (Method::POST, ["v1", "kms", op]) => {
            let (op, op2) = (op.to_string(), op.to_string());
            let body = json_body(req).await?;
            let key_id = body
                .get("key_id")
                .and_then(Value::as_str)
                .map(str::to_owned);
            let r = blocking(move || kms_ops::dispatch(&d.kms, &c, &op2, &body)).await;
            if let Err(e) = &r {
                tracing::info!(
                    operation = %op,
                    key_id = key_id.as_deref().unwrap_or(""),
                    peer_uid = c.uid,
                    code = %e.code,
                    "KMS operation refused: {}",
                    e.msg
                );
            }
            counted(r, |r| crate::metrics::kms_op(&op, r))
        }
        (Method::GET, ["v1", "audit", "head"]) => {
            blocking(move || Ok(serde_json::to_value(d.kms.audit_head()?).unwrap_or_default()))
                .await
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
            *named = Some(name.clone());
            if let Some(from) = str_field(&b, "from_snapshot")?.map(str::to_owned) {
                let key = str_field(&b, "key_id")?.map(str::to_owned);
                let rate = num_field(&b, "max_rate")?.unwrap_or(0);
                return blocking(move || {
                    Ok(json!(d.create_from_snapshot(
                        &c,
                        &name,
                        &from,
                        key.as_deref(),
                        rate
                    )?))
                })
                .await;
            }
            let size = num_field(&b, "size")?.ok_or_else(|| ApiError::bad("size is required"))?;
            let sector = match num_field(&b, "sector_size")? {
                None => 4096,
                Some(v) => u32::try_from(v)
                    .map_err(|_| ApiError::bad("sector size must be 512 or 4096"))?,
            };
            let key = str_field(&b, "key_id")?.map(str::to_owned);
            let encrypt_zeroes = bool_field(&b, "encrypt_zeroes");
            let store = match str_field(&b, "store")? {
                None => None,
                Some(s) => Some(crate::daemon::StoreKind::parse(s).ok_or_else(|| {
                    ApiError::bad(format!("store {s:?} must be \"file\" or \"rbd\""))
                })?),
            };
            let pool = str_field(&b, "pool")?.map(str::to_owned);
            let qos = crate::server::QosLimits {
                iops: num_field(&b, "iops")?.unwrap_or(0),
                bandwidth: num_field(&b, "bandwidth")?.unwrap_or(0),
            };
            let cache = cache_field(&b)?.unwrap_or_default();
            blocking(move || {
                let v = crate::daemon::NewVolume {
                    size,
                    sector_size: sector,
                    key: key.as_deref(),
                    encrypt_zeroes,
                    store,
                    pool: pool.as_deref(),
                    qos,
                    cache,
                };
                Ok(json!(d.create(&c, &name, &v)?))
            })
            .await
        }
        (Method::GET, ["v1", "volumes", name]) => {
            let name = name.to_string();
            blocking(move || Ok(json!(d.inspect(&name)?))).await
        }
        (Method::DELETE, ["v1", "volumes", name]) => {
            let name = name.to_string();
            let with_snapshots = query.split('&').any(|kv| kv == "with_snapshots=true");
            blocking(move || {
                d.delete_with(&name, with_snapshots)?;
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
            let store = match str_field(&q, "store")? {
                None => None,
                Some(s) => Some(crate::daemon::StoreKind::parse(s).ok_or_else(|| {
                    ApiError::bad(format!("store {s:?} must be \"file\" or \"rbd\""))
                })?),
            };
            let pool = str_field(&q, "pool")?.map(str::to_owned);
            import(req, d, c, name, size, key, (store, pool)).await
        }
        (Method::POST, ["v1", "volumes", name, action]) => {
            let (name, action) = (name.to_string(), action.to_string());
            let b = json_body(req).await?;
            blocking(move || {
                let info = match action.as_str() {
                    "attach" => d.attach_with(
                        &c,
                        &name,
                        bool_field(&b, "read_only"),
                        bool_field(&b, "takeover"),
                    )?,
                    "detach" => d.detach(&name, bool_field(&b, "force"))?,
                    "resize" => {
                        let size = num_field(&b, "size")?
                            .ok_or_else(|| ApiError::bad("size is required"))?;
                        d.resize(&name, size)?
                    }
                    "rewrap" => d.rewrap(&c, &name)?,
                    "reencrypt" => d.reencrypt(
                        &c,
                        &name,
                        &crate::daemon::ReencRequest {
                            key: str_field(&b, "key")?.map(str::to_owned),
                            max_rate: num_field(&b, "max_rate")?,
                            pause: bool_field(&b, "pause"),
                            resume: bool_field(&b, "resume"),
                        },
                    )?,
                    "set" => d.set_volume(
                        &name,
                        num_field(&b, "iops")?,
                        num_field(&b, "bandwidth")?,
                        cache_field(&b)?,
                    )?,
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
    place: (Option<crate::daemon::StoreKind>, Option<String>),
) -> Result<Value, ApiError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(8);
    let job = tokio::task::spawn_blocking(move || -> Result<Value, ApiError> {
        let reader = ChannelReader {
            rx,
            cur: Bytes::new(),
        };
        Ok(json!(d.import_to(
            &c,
            &name,
            size,
            key.as_deref(),
            (place.0, place.1.as_deref()),
            reader
        )?))
    });
    let mut job = job;
    let join = |r: Result<Result<Value, ApiError>, tokio::task::JoinError>| {
        r.map_err(|e| ApiError {
            status: 500,
            code: "API.0500".into(),
            msg: e.to_string(),
        })?
    };
    let mut body = req.into_body();
    loop {
        // An upload that stops sending ends: it would hold a connection slot and the importer.
        // The importer may also end first (a name in use, a bad key): answer then, without
        // waiting for a body it will not read.
        let frame = tokio::select! {
            r = &mut job => return join(r),
            f = tokio::time::timeout(UPLOAD_IDLE, body.frame()) => f,
        };
        let Some(frame) = frame.map_err(|_| ApiError::bad("upload: no data for 60 s"))? else {
            break;
        };
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
    join(job.await)
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
