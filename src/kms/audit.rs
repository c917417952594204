//! The audit log: JSON Lines, one record per control call that changes state or touches a key
//! (failures too). Each record carries an HMAC-SHA256 (`hash`) under a key derived from the
//! root key, over the record's own bytes with `hash` empty, which include the previous
//! record's `hash` (`prev`): an edited line is found at that line, a removed or reordered one
//! at the next, and whoever can write the state dir but not read the root key cannot forge a
//! chain. The running daemon knows its head (seq, hash, inode): `verify` compares the file
//! against it, so a replaced file, an emptied one and records cut from the end are found too.
//!
//! Logs from before the key (`v` absent, plain SHA-256 chain) keep verifying: at its first
//! start the daemon appends a keyed `openAuditLog` record whose `prev` is the old head, which
//! seals the unkeyed records before it. Unkeyed records after a keyed one are refused.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aws_lc_rs::hmac;
use serde::{Deserialize, Serialize};

use super::crypto::{hkdf32, sha256};
use super::root::RootKey;
use super::{Caller, EncryptionContext, KmsError};

/// `v` of a keyed record.
const KEYED: u32 = 2;
const HKDF_INFO: &[u8] = b"cryptvol audit log hmac v1";
/// The record the daemon appends each time it opens the log.
pub const OPEN_OPERATION: &str = "openAuditLog";

/// The HMAC key of the chain: HKDF-SHA256(root key, info "cryptvol audit log hmac v1").
pub struct AuditKey(hmac::Key);

impl AuditKey {
    pub fn derive(root: &RootKey) -> AuditKey {
        let k = hkdf32(&root.0[..], b"", HKDF_INFO);
        AuditKey(hmac::Key::new(hmac::HMAC_SHA256, &k[..]))
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Record {
    /// 2: keyed (HMAC) record; absent: an unkeyed record from before (SHA-256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    pub seq: u64,
    pub time: String,
    pub operation: String,
    /// The volume a volume operation was about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption_context: Option<EncryptionContext>,
    pub caller_uid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_gid: Option<u32>,
    pub caller_pid: i32,
    /// The host that wrote the record (`[kms] host_id` or the host name): with shared key
    /// records several hosts act on the same keys, each in its own chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// "ok" or the error code.
    pub result: String,
    /// The previous record's `hash` ("" for the first).
    pub prev: String,
    /// Keyed: hex HMAC-SHA256 of the line with `hash` = "". Unkeyed: hex SHA-256 of the
    /// record serialised with `hash` = "".
    #[serde(default)]
    pub hash: String,
}

impl Record {
    /// The unkeyed rule of old logs: SHA-256 of the re-serialised record with `hash` empty.
    fn legacy_hash(&self) -> Result<String, KmsError> {
        let r = Record {
            v: None,
            seq: self.seq,
            time: self.time.clone(),
            operation: self.operation.clone(),
            volume: self.volume.clone(),
            key_id: self.key_id.clone(),
            key_version: self.key_version,
            encryption_context: self.encryption_context.clone(),
            caller_uid: self.caller_uid,
            caller_gid: self.caller_gid,
            caller_pid: self.caller_pid,
            host: None,
            result: self.result.clone(),
            prev: self.prev.clone(),
            hash: String::new(),
        };
        let bytes = serde_json::to_vec(&r).map_err(|e| KmsError::Internal(e.to_string()))?;
        Ok(hex::encode(sha256(&bytes)))
    }
}

/// What an append is about (besides the operation and the caller).
#[derive(Debug, Default, Clone, Copy)]
pub struct Subject<'a> {
    pub volume: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub key_version: Option<u32>,
    pub context: Option<&'a EncryptionContext>,
}

/// The running daemon's end of the chain: the last record it wrote and the file it writes.
#[derive(Debug, Clone, Serialize)]
pub struct AuditHead {
    pub seq: u64,
    pub hash: String,
    pub path: String,
    pub dev: u64,
    pub ino: u64,
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
    /// Unkeyed records from before the keyed chain, sealed by the first keyed one.
    #[serde(skip_serializing_if = "is_zero")]
    pub unkeyed_records: u64,
    /// The daemon's head the file was checked against (absent offline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head: Option<AuditHead>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl AuditReport {
    fn broken(&mut self, line: u64, why: impl Into<String>) {
        if self.ok || self.broken_line.is_some_and(|l| line < l) {
            self.ok = false;
            self.broken_line = Some(line);
            self.reason = Some(why.into());
        }
    }
}

/// The chain walked from the start of a file.
struct Walk {
    report: AuditReport,
    /// `hash` of the last record, and of the last record before the first bad one.
    last_hash: String,
    keyed: u64,
}

/// Checks one line; returns its record.
fn check_line(
    key: &AuditKey,
    line: &str,
    n: u64,
    prev: &str,
    keyed_before: bool,
) -> Result<Record, &'static str> {
    let rec: Record = serde_json::from_str(line).map_err(|_| "not a valid audit record")?;
    match rec.v {
        Some(KEYED) => {
            let (body, tag) = split_mac(line).ok_or("not a valid audit record")?;
            // Lowercase hex only: one record, one spelling (`prev` of the next compares it).
            let tag = hex::decode(tag)
                .ok()
                .filter(|t| hex::encode(t) == tag)
                .ok_or("not a valid audit record")?;
            hmac::verify(&key.0, &body, &tag)
                .map_err(|_| "record was edited or forged (its HMAC does not match)")?;
        }
        Some(_) => return Err("unknown record version"),
        None if keyed_before => {
            return Err("unkeyed record after keyed ones: written without the audit key");
        }
        None => {
            if rec.legacy_hash().ok().as_deref() != Some(rec.hash.as_str()) {
                return Err("record was edited (its hash does not match)");
            }
        }
    }
    if rec.prev != prev {
        return Err("hash chain broken: a record before this one was removed or reordered");
    }
    if rec.seq != n {
        return Err("sequence number out of order");
    }
    Ok(rec)
}

/// A keyed line `{…,"hash":"<hex>"}` -> (the line with `"hash":""`, the hex).
fn split_mac(line: &str) -> Option<(Vec<u8>, &str)> {
    const FIELD: &str = ",\"hash\":\"";
    let rest = line.strip_suffix("\"}")?;
    let at = rest.rfind(FIELD)?;
    let tag = &rest[at + FIELD.len()..];
    let mut body = rest.as_bytes()[..at + FIELD.len()].to_vec();
    body.extend_from_slice(b"\"}");
    Some((body, tag))
}

fn walk(key: &AuditKey, r: impl Read) -> Result<Walk, KmsError> {
    let mut w = Walk {
        report: AuditReport {
            records: 0,
            ok: true,
            broken_line: None,
            reason: None,
            unkeyed_records: 0,
            head: None,
        },
        last_hash: String::new(),
        keyed: 0,
    };
    let mut prev = String::new();
    for line in BufReader::new(r).split(b'\n') {
        let line = line?;
        w.report.records += 1;
        let n = w.report.records;
        if !w.report.ok {
            continue;
        }
        let checked = std::str::from_utf8(&line)
            .map_err(|_| "not a valid audit record")
            .and_then(|l| check_line(key, l, n, &prev, w.keyed > 0));
        match checked {
            Ok(rec) => {
                if rec.v.is_some() {
                    w.keyed += 1;
                } else {
                    w.report.unkeyed_records += 1;
                }
                prev = rec.hash;
            }
            Err(why) => w.report.broken(n, why),
        }
    }
    w.last_hash = prev;
    Ok(w)
}

/// Verifies a log without the daemon: the keyed chain, and that the log was sealed (a log the
/// daemon has opened holds at least one keyed record). What it cannot see: records cut from
/// the end, or a whole file swapped for an older copy of itself.
pub fn verify_offline(key: &AuditKey, path: &Path) -> Result<AuditReport, KmsError> {
    let w = walk(key, File::open(path)?)?;
    let mut report = w.report;
    if report.ok && w.keyed == 0 {
        let why = if report.records == 0 {
            "the log is empty, but the daemon writes a record each time it starts: it was emptied"
        } else {
            "no keyed record: the daemon seals the log each time it starts, so this one was \
             rewritten without the audit key or cut back"
        };
        report.broken(1, why);
    }
    Ok(report)
}

pub struct AuditLog {
    path: PathBuf,
    file: File,
    key: AuditKey,
    last_hash: String,
    seq: u64,
    /// Records 1..=unkeyed_end were unkeyed when the daemon opened the log.
    unkeyed_end: u64,
    /// The path was found to name another file (said once in the journal).
    replaced_said: bool,
    /// Named in every record appended.
    host: Option<String>,
}

/// This host's name (`/proc/sys/kernel/hostname`), or "localhost".
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

impl AuditLog {
    /// Opens (or creates) the log, and appends the keyed `openAuditLog` record that continues
    /// the chain (sealing an unkeyed log from before).
    pub fn open(path: &Path, key: AuditKey) -> Result<AuditLog, KmsError> {
        Self::open_for_host(path, key, None)
    }

    /// Like [`AuditLog::open`], naming `host` in every record appended.
    pub fn open_for_host(
        path: &Path,
        key: AuditKey,
        host: Option<String>,
    ) -> Result<AuditLog, KmsError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)?;
        cut_torn_tail(&file, path)?;
        (&file).seek(SeekFrom::Start(0))?;
        let w = walk(&key, &file)?;
        if !w.report.ok {
            tracing::error!(
                line = ?w.report.broken_line,
                reason = ?w.report.reason,
                "audit log chain is broken"
            );
        }
        // Continue from the last line that parses, broken or not: the break stays visible.
        let (mut last_hash, mut seq) = (String::new(), 0);
        let mut f = &file;
        f.seek(SeekFrom::Start(0))?;
        for line in BufReader::new(f).split(b'\n') {
            let line = line?;
            last_hash = serde_json::from_slice::<Record>(&line)
                .map(|r| r.hash)
                .unwrap_or_default();
            seq += 1;
        }
        let mut log = AuditLog {
            path: path.to_owned(),
            file,
            key,
            last_hash,
            seq,
            unkeyed_end: w.report.unkeyed_records,
            replaced_said: false,
            host,
        };
        log.append(OPEN_OPERATION, Subject::default(), &Caller::DAEMON, "ok")?;
        Ok(log)
    }

    /// Appends one record and fdatasyncs it.
    pub fn append(
        &mut self,
        operation: &str,
        s: Subject<'_>,
        caller: &Caller,
        result: &str,
    ) -> Result<(), KmsError> {
        let rec = Record {
            v: Some(KEYED),
            seq: self.seq + 1,
            time: now_rfc3339(),
            operation: operation.to_owned(),
            volume: s.volume.map(str::to_owned),
            key_id: s.key_id.map(str::to_owned),
            key_version: s.key_version,
            encryption_context: s.context.cloned(),
            caller_uid: caller.uid,
            caller_gid: Some(caller.gid),
            caller_pid: caller.pid,
            host: self.host.clone(),
            result: result.to_owned(),
            prev: self.last_hash.clone(),
            hash: String::new(),
        };
        let mut line = serde_json::to_vec(&rec).map_err(|e| KmsError::Internal(e.to_string()))?;
        debug_assert!(line.ends_with(b",\"hash\":\"\"}"), "hash is the last field");
        let tag = hex::encode(hmac::sign(&self.key.0, &line).as_ref());
        line.truncate(line.len() - 2);
        line.extend_from_slice(tag.as_bytes());
        line.extend_from_slice(b"\"}\n");
        self.file.write_all(&line)?;
        self.file.sync_data()?;
        self.last_hash = tag;
        self.seq += 1;
        if !self.replaced_said && self.replaced().is_some() {
            self.replaced_said = true;
            tracing::error!(
                path = %self.path.display(),
                seq = self.seq,
                "audit log was replaced or removed: the daemon keeps appending to the file it opened"
            );
        }
        Ok(())
    }

    pub fn head(&self) -> Result<AuditHead, KmsError> {
        let m = self.file.metadata()?;
        Ok(AuditHead {
            seq: self.seq,
            hash: self.last_hash.clone(),
            path: self.path.display().to_string(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// Why the path no longer names the file being appended to, if it does not.
    fn replaced(&self) -> Option<String> {
        let ours = self.file.metadata().ok()?;
        match std::fs::metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == (ours.dev(), ours.ino()) => None,
            Ok(m) => Some(format!(
                "{} was replaced: it is inode {}, the daemon writes to inode {}",
                self.path.display(),
                m.ino(),
                ours.ino()
            )),
            Err(e) => Some(format!("{}: {e}", self.path.display())),
        }
    }

    /// Verifies the file at the log's path: the keyed chain, and against the daemon's head
    /// (same file, nothing cut from the end, the last record the one written last).
    pub fn verify(&self) -> Result<AuditReport, KmsError> {
        let head = self.head()?;
        if let Some(why) = self.replaced() {
            // Name the first line where the file at the path differs from the daemon's own.
            (&self.file).seek(SeekFrom::Start(0))?;
            let (line, mut r) = match std::fs::File::open(&self.path) {
                Ok(f) => {
                    let line = first_difference(&f, &self.file)?;
                    (&f).seek(SeekFrom::Start(0))?;
                    (line, walk(&self.key, &f)?.report)
                }
                Err(_) => (1, walk(&self.key, &[][..])?.report),
            };
            r.broken(line, why);
            r.head = Some(head);
            return Ok(r);
        }
        (&self.file).seek(SeekFrom::Start(0))?;
        let w = walk(&self.key, &self.file)?;
        let mut r = w.report;
        let n = r.records;
        if r.unkeyed_records > self.unkeyed_end {
            // Unkeyed records where the daemon wrote keyed ones: rewritten without the key.
            r.broken(
                self.unkeyed_end + 1,
                "unkeyed record where the daemon wrote a keyed one: rewritten without the audit key",
            );
        }
        if n < head.seq {
            r.broken(
                n + 1,
                format!(
                    "records {}..{} were cut from the end (the daemon has written {})",
                    n + 1,
                    head.seq,
                    head.seq
                ),
            );
        } else if n > head.seq {
            r.broken(
                head.seq + 1,
                format!("records after {} were not written by the daemon", head.seq),
            );
        } else if r.ok && w.last_hash != head.hash {
            r.broken(n, "the last record is not the one the daemon wrote");
        }
        r.head = Some(head);
        Ok(r)
    }
}

/// A crash in the middle of an append can leave a last line without its newline: a record
/// never fsynced, whose operation never answered. It is cut off (and said so) rather than have
/// the next record glued onto it.
fn cut_torn_tail(file: &File, path: &Path) -> Result<(), KmsError> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut tail = Vec::new();
    let from = len.saturating_sub(64 * 1024);
    let mut f = file;
    f.seek(SeekFrom::Start(from))?;
    f.read_to_end(&mut tail)?;
    if tail.last() == Some(&b'\n') {
        return Ok(());
    }
    let keep = match tail.iter().rposition(|&c| c == b'\n') {
        Some(i) => from + i as u64 + 1,
        None if from == 0 => 0,
        // A last "line" over 64 KiB long is no torn record: leave it for verify to report.
        None => return Ok(()),
    };
    tracing::warn!(
        path = %path.display(),
        bytes = len - keep,
        "audit log ended in a partial record (a crash during an append): cut off"
    );
    file.set_len(keep)?;
    Ok(())
}

/// 1-based line at which `a` and `b` first differ (the line after the shorter one's end when
/// one is a prefix of the other; 1 past the end when equal). Streams both.
fn first_difference(a: impl Read, b: impl Read) -> std::io::Result<u64> {
    let (mut a, mut b) = (
        BufReader::new(a).split(b'\n'),
        BufReader::new(b).split(b'\n'),
    );
    let mut n = 1;
    loop {
        match (a.next().transpose()?, b.next().transpose()?) {
            (Some(x), Some(y)) if x == y => n += 1,
            _ => return Ok(n),
        }
    }
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> AuditKey {
        AuditKey::derive(&RootKey::from_bytes([b; 32]))
    }

    #[test]
    fn keyed_chain_round_trip_and_wrong_key() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.jsonl");
        let mut log = AuditLog::open(&p, key(1)).unwrap();
        let c = Caller {
            uid: 7,
            gid: 8,
            pid: 9,
        };
        let s = Subject {
            volume: Some("v"),
            ..Subject::default()
        };
        log.append("deleteVolume", s, &c, "VOL.0410").unwrap();
        let r = log.verify().unwrap();
        assert!(r.ok, "{r:?}");
        assert_eq!(r.records, 2);
        assert!(verify_offline(&key(1), &p).unwrap().ok);
        let wrong = verify_offline(&key(2), &p).unwrap();
        assert_eq!(wrong.broken_line, Some(1), "{wrong:?}");
    }

    /// Two records as the unkeyed format wrote them; `pid` of the first.
    fn unkeyed_lines(pid: i32) -> Vec<String> {
        let mut out = Vec::new();
        let mut prev = String::new();
        for seq in 1..=2 {
            let mut r = Record {
                v: None,
                seq,
                time: "2026-01-01T00:00:00Z".into(),
                operation: "createKey".into(),
                volume: None,
                key_id: Some("k".into()),
                key_version: None,
                encryption_context: None,
                caller_uid: 0,
                caller_gid: None,
                caller_pid: if seq == 1 { pid } else { 1 },
                host: None,
                result: "ok".into(),
                prev: prev.clone(),
                hash: String::new(),
            };
            r.hash = r.legacy_hash().unwrap();
            prev = r.hash.clone();
            out.push(serde_json::to_string(&r).unwrap());
        }
        out
    }

    #[test]
    fn unkeyed_log_is_sealed_by_the_first_keyed_record() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.jsonl");
        std::fs::write(&p, unkeyed_lines(1).join("\n") + "\n").unwrap();
        assert!(!verify_offline(&key(1), &p).unwrap().ok, "not sealed yet");
        let log = AuditLog::open(&p, key(1)).unwrap();
        let r = log.verify().unwrap();
        assert!(r.ok && r.records == 3 && r.unkeyed_records == 2, "{r:?}");
        drop(log);
        // The unkeyed part edited and re-chained without the key: the seal no longer fits.
        let mut lines: Vec<String> = std::fs::read_to_string(&p)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        lines.splice(0..2, unkeyed_lines(2));
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        let r = verify_offline(&key(1), &p).unwrap();
        assert_eq!(r.broken_line, Some(3), "{r:?}");
    }

    #[test]
    fn torn_last_record_is_cut_at_open() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.jsonl");
        drop(AuditLog::open(&p, key(1)).unwrap());
        let whole = std::fs::read(&p).unwrap();
        let mut torn = whole.clone();
        torn.extend_from_slice(b"{\"v\":2,\"seq\":2,\"ti");
        std::fs::write(&p, &torn).unwrap();
        let log = AuditLog::open(&p, key(1)).unwrap();
        let r = log.verify().unwrap();
        assert!(r.ok && r.records == 2, "{r:?}");
    }

    #[test]
    fn invalid_utf8_is_a_broken_record_not_an_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.jsonl");
        drop(AuditLog::open(&p, key(1)).unwrap());
        let mut t = std::fs::read(&p).unwrap();
        t.extend_from_slice(b"\xff\xfe\n");
        std::fs::write(&p, &t).unwrap();
        // The daemon still starts, and verify names the line.
        let log = AuditLog::open(&p, key(1)).unwrap();
        assert_eq!(log.verify().unwrap().broken_line, Some(2));
    }

    proptest::proptest! {
        /// Whatever the file holds, walking it reports; it never panics.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000)) {
            let w = walk(&key(1), &bytes[..]).unwrap();
            proptest::prop_assert!(w.report.ok || w.report.broken_line.is_some());
        }

        /// A valid log with one byte flipped never verifies.
        #[test]
        fn any_flipped_byte_is_found(at in 0usize..10_000, bit in 0u8..8) {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("a.jsonl");
            let mut log = AuditLog::open(&p, key(1)).unwrap();
            let c = Caller { uid: 1, gid: 2, pid: 3 };
            log.append("createKey", Subject::default(), &c, "ok").unwrap();
            drop(log);
            let mut b = std::fs::read(&p).unwrap();
            let at = at % b.len();
            b[at] ^= 1 << bit;
            std::fs::write(&p, &b).unwrap();
            proptest::prop_assert!(!verify_offline(&key(1), &p).unwrap().ok);
        }
    }

    #[test]
    fn split_mac_needs_hash_last() {
        assert!(split_mac("{\"a\":1,\"hash\":\"ab\"}").is_some());
        assert!(split_mac("{\"hash\":\"ab\",\"a\":1}").is_none());
        assert!(split_mac("").is_none());
        assert_eq!(first_difference(&b"a\nb\n"[..], &b"a\nc\n"[..]).unwrap(), 2);
        assert_eq!(first_difference(&b"a\n"[..], &b"a\nb\n"[..]).unwrap(), 2);
    }
}
