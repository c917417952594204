//! `cryptvol audit verify [--offline]`, `cryptvol audit head`.
//!
//! Online (the default), the daemon verifies the file at its log path with the chain key and
//! against its own head (last seq and hash, the inode it appends to): an edited, forged,
//! replaced, emptied or cut log is reported with the first bad record. `--offline` verifies
//! the keyed chain without the daemon, with the root key found through `--config`; it cannot
//! see records cut from the end (it says so).

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use super::{client, output};
use crate::config::{Config, RootKeySource};
use crate::kms::{AuditKey, RootKey, audit};

/// Online verification through the daemon.
pub async fn verify(sock: &Path, j: bool) -> Result<()> {
    let v = client::call(sock, "GET", "/v1/audit/verify", None)
        .await
        .context("audit verify asks the running daemon (without it: audit verify --offline)")?;
    report(j, &v, "")
}

/// The daemon's chain head.
pub async fn head(sock: &Path, j: bool) -> Result<()> {
    let v = client::call(sock, "GET", "/v1/audit/head", None).await?;
    output::print(j, &v, output::fields);
    Ok(())
}

/// Offline verification: the keyed chain of `STATE_DIR/kms/audit.jsonl`, with the root key
/// from the configuration (`root_key_file`, or the credential in $CREDENTIALS_DIRECTORY).
pub fn verify_offline(config: Option<&Path>, j: bool) -> Result<()> {
    let path = config.ok_or_else(|| anyhow!("audit verify --offline needs --config FILE"))?;
    let cfg = Config::load(path)?;
    let root = match &cfg.root_key {
        RootKeySource::File(p) => RootKey::load_file(p),
        RootKeySource::Credential(n) => RootKey::load_credential(n),
    }?;
    let log = cfg.state_dir.join("kms/audit.jsonl");
    let r = audit::verify_offline(&AuditKey::derive(&root), &log)
        .with_context(|| log.display().to_string())?;
    let v = serde_json::to_value(&r)?;
    report(
        j,
        &v,
        " (offline: records cut from the end, or the file swapped for an older copy of itself, \
         cannot be detected without the daemon; compare the last record with the journal's \
         \"audit chain head\")",
    )
}

fn report(j: bool, v: &Value, caveat: &str) -> Result<()> {
    output::print(j, v, |v| {
        if v["ok"].as_bool() == Some(true) {
            let head = match v.get("head") {
                Some(h) => format!(", ending at the daemon's head (seq {})", h["seq"]),
                None => String::new(),
            };
            format!("audit log intact: {} records{head}{caveat}", v["records"])
        } else {
            format!(
                "audit log BROKEN at line {}: {}",
                v["broken_line"],
                output::s(&v["reason"])
            )
        }
    });
    if v["ok"].as_bool() != Some(true) {
        let msg = format!("audit chain broken at line {}", v["broken_line"]);
        if j {
            // The report above is the one JSON document on stdout (SPEC §1).
            eprintln!("cryptvol: {msg}");
            std::process::exit(1);
        }
        bail!(msg);
    }
    Ok(())
}
