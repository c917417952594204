//! Audit records for the volume routes: every state-changing volume call (create, import,
//! attach, detach, resize, rewrap, delete, snapshot create and delete; export, which
//! decrypts) is recorded with the operation, the volume, the
//! result (`ok` or the error code) and the caller, successes and refusals alike. KMS
//! operations are audited by the key manager itself (`kms_ops`).

use std::sync::Arc;

use hyper::Method;
use serde_json::Value;

use super::ApiError;
use crate::daemon::Daemon;
use crate::kms::Caller;
use crate::kms::audit::Subject;

/// Longest volume name or key id copied from a request into a record.
const MAX_TARGET: usize = 256;

/// The audit operation of a state-changing volume route, and its volume when the path
/// names it (create names it in the body).
pub fn volume_op(method: &Method, path: &str) -> Option<(&'static str, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let op = match (method, parts.as_slice()) {
        (&Method::POST, ["v1", "volumes"]) => return Some(("createVolume", None)),
        // The snapshot's name is in the body: the route names it.
        (&Method::POST, ["v1", "volumes", _, "snapshots"]) => {
            return Some(("createSnapshot", None));
        }
        (&Method::DELETE, ["v1", "volumes", v, "snapshots", s]) => {
            return Some(("deleteSnapshot", Some(format!("{v}@{s}"))));
        }
        (&Method::DELETE, ["v1", "volumes", _]) => "deleteVolume",
        (&Method::POST, ["v1", "volumes", _, action]) => match *action {
            "import" => "importVolume",
            "attach" => "attachVolume",
            "detach" => "detachVolume",
            "resize" => "resizeVolume",
            "rewrap" => "rewrapVolume",
            "reencrypt" => "reencryptVolume",
            "set" => "setVolumeQos",
            _ => return None,
        },
        _ => return None,
    };
    Some((op, Some(parts[2].to_owned())))
}

fn clip(s: &str) -> &str {
    let mut n = s.len().min(MAX_TARGET);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s[..n]
}

/// Appends the record (off the reactor: it is fsynced). A failed append is logged; the call's
/// own result stands (the volume operation has happened either way).
pub async fn record(
    d: Arc<Daemon>,
    c: Caller,
    op: &'static str,
    volume: Option<String>,
    r: &Result<Value, ApiError>,
) {
    let result = match r {
        Ok(_) => "ok".to_owned(),
        Err(e) => e.code.clone(),
    };
    let key = r
        .as_ref()
        .ok()
        .and_then(|v| v["key_id"].as_str())
        .map(str::to_owned);
    let done = tokio::task::spawn_blocking(move || {
        let s = Subject {
            volume: Some(volume.as_deref().map_or("", clip)),
            key_id: key.as_deref().map(clip),
            ..Subject::default()
        };
        d.kms.audit_event(&c, op, s, &result)
    })
    .await;
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(operation = op, error = %e, "audit log append failed"),
        Err(e) => tracing::error!(operation = op, error = %e, "audit task failed"),
    }
}
