//! The audit log: JSON Lines, one record per KMS operation (failures too). Each record holds its
//! own SHA-256 (over the record with `hash` empty, which covers `prev`) and the previous
//! record's, so an edited line is found at that line and a removed or reordered one at the
//! next.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::crypto::sha256;
use super::{Caller, EncryptionContext, KmsError};

#[derive(Debug, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub time: String,
    pub operation: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption_context: Option<EncryptionContext>,
    pub caller_uid: u32,
    pub caller_pid: i32,
    /// "ok" or the error code.
    pub result: String,
    /// The previous record's `hash` ("" for the first).
    pub prev: String,
    /// Hex SHA-256 of this record serialised with `hash` = "".
    #[serde(default)]
    pub hash: String,
}

impl Record {
    fn own_hash(&self) -> Result<String, KmsError> {
        let mut r = self.clone_for_hash();
        r.hash = String::new();
        let bytes = serde_json::to_vec(&r).map_err(|e| KmsError::Internal(e.to_string()))?;
        Ok(hex::encode(sha256(&bytes)))
    }

    fn clone_for_hash(&self) -> Record {
        Record {
            seq: self.seq,
            time: self.time.clone(),
            operation: self.operation.clone(),
            key_id: self.key_id.clone(),
            key_version: self.key_version,
            encryption_context: self.encryption_context.clone(),
            caller_uid: self.caller_uid,
            caller_pid: self.caller_pid,
            result: self.result.clone(),
            prev: self.prev.clone(),
            hash: String::new(),
        }
    }
}

pub struct AuditLog {
    path: PathBuf,
    file: File,
    last_hash: String,
    seq: u64,
}

/// What `audit verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub records: u64,
    pub ok: bool,
    /// 1-based line of the first broken record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broken_line: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl AuditLog {
    pub fn open(path: &Path) -> Result<AuditLog, KmsError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)?;
        let report = verify_file(path)?;
        let (mut last_hash, mut seq) = (String::new(), 0);
        for line in BufReader::new(File::open(path)?).lines() {
            let line = line?;
            last_hash = serde_json::from_str::<Record>(&line)
                .map(|r| r.hash)
                .unwrap_or_default();
            seq += 1;
        }
        if !report.ok {
            tracing::warn!(line = ?report.broken_line, reason = ?report.reason, "audit log chain is broken");
        }
        Ok(AuditLog {
            path: path.to_owned(),
            file,
            last_hash,
            seq,
        })
    }

    pub fn append(
        &mut self,
        operation: &str,
        key: Option<(&str, Option<u32>)>,
        ctx: Option<&EncryptionContext>,
        caller: &Caller,
        result: &Result<(), &KmsError>,
    ) -> Result<(), KmsError> {
        let rec = Record {
            seq: self.seq + 1,
            time: now_rfc3339(),
            operation: operation.to_owned(),
            key_id: key.map(|k| k.0.to_owned()),
            key_version: key.and_then(|k| k.1),
            encryption_context: ctx.cloned(),
            caller_uid: caller.uid,
            caller_pid: caller.pid,
            result: match result {
                Ok(()) => "ok".to_owned(),
                Err(e) => e.error_code().to_owned(),
            },
            prev: self.last_hash.clone(),
            hash: String::new(),
        };
        let mut rec = rec;
        rec.hash = rec.own_hash()?;
        let line = serde_json::to_string(&rec).map_err(|e| KmsError::Internal(e.to_string()))?;
        self.file.write_all(format!("{line}\n").as_bytes())?;
        self.file.sync_data()?;
        self.last_hash = rec.hash.clone();
        self.seq += 1;
        Ok(())
    }

    pub fn verify(&self) -> Result<AuditReport, KmsError> {
        verify_file(&self.path)
    }
}

pub fn verify_file(path: &Path) -> Result<AuditReport, KmsError> {
    let mut prev = String::new();
    let mut n = 0u64;
    let broken = |n: u64, why: &str| AuditReport {
        records: n,
        ok: false,
        broken_line: Some(n),
        reason: Some(why.into()),
    };
    for line in BufReader::new(File::open(path)?).lines() {
        let line = line?;
        n += 1;
        let rec: Record = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(_) => return Ok(broken(n, "not a valid audit record")),
        };
        if rec.own_hash()? != rec.hash {
            return Ok(broken(n, "record was edited (its hash does not match)"));
        }
        if rec.prev != prev {
            return Ok(broken(
                n,
                "hash chain broken: a record before this one was removed or reordered",
            ));
        }
        if rec.seq != n {
            return Ok(broken(n, "sequence number out of order"));
        }
        prev = rec.hash.clone();
    }
    Ok(AuditReport {
        records: n,
        ok: true,
        broken_line: None,
        reason: None,
    })
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
