//! `cryptvol key migrate-records --config FILE`: a host switched from `[kms] store = "file"`
//! to `"rados"` moves its local key records into the shared ones (`kms/migrate.rs`), run with
//! the daemon stopped (the state dir lock): a daemon started with shared records while a
//! non-empty `keys.json` is still there refuses to start, naming this command
//! ([`refuse_unmigrated`]).
//!
//! Why an explicit command, not a migration at start-up: it is one-way and changes who can
//! read the keys (every host with the root key, or the token); it needs the cluster, which a
//! daemon otherwise does not need at start; and it destroys the local store afterwards.

use std::path::{Path, PathBuf};

use crate::config::{Config, KmsStore, RootKeySource};
use crate::kms::{Caller, Kms, KmsConfig, RootKey, local_key_count};

/// The command an operator runs, as error messages name it.
pub fn command(cfg: &Config) -> String {
    format!(
        "cryptvol key migrate-records --config {}",
        cfg.path.display()
    )
}

/// With shared records: refuses while `keys.json` in `kms_dir` still holds keys (the
/// volumes under them would not attach: the shared records do not have them).
pub fn refuse_unmigrated(cfg: &Config, kms_dir: &Path) -> Result<(), String> {
    match local_key_count(kms_dir).map_err(|e| format!("key store: {e}"))? {
        0 => Ok(()),
        n => Err(format!(
            "[kms] store = \"rados\", but {} still holds {n} key(s) of the local key store, \
             which the shared records do not have: stop here and run `{}` to move them",
            kms_dir.join(crate::kms::records::KEYS_FILE).display(),
            command(cfg)
        )),
    }
}

fn root_key(cfg: &Config) -> Result<RootKey, String> {
    match &cfg.root_key {
        RootKeySource::File(p) => RootKey::load_file(p),
        RootKeySource::Credential(n) => RootKey::load_credential(n),
    }
    .map_err(|e| e.to_string())
}

/// Runs the migration (daemon stopped); what it did, as JSON.
pub fn migrate_key_records(cfg: &Config) -> Result<serde_json::Value, String> {
    let (KmsStore::Rados, Some(ceph)) = (&cfg.kms_store, &cfg.ceph) else {
        return Err(format!(
            "{}: migrate-records moves local key records into shared ones: set [kms] store = \
             \"rados\" (with [ceph]) first",
            cfg.path.display()
        ));
    };
    let _lock =
        super::run::lock_state_dir(&cfg.state_dir).map_err(|e| format!("{e}: stop it first"))?;
    let kms_dir = cfg.state_dir.join("kms");
    let sealing: PathBuf = cfg
        .sealing_key_file
        .clone()
        .unwrap_or_else(|| kms_dir.join(crate::kms::sealing_file_name()));
    let kcfg = KmsConfig {
        min_pending_days: cfg.min_pending_days,
        max_pending_days: cfg.max_pending_days,
        sealing_key_file: cfg.sealing_key_file.clone(),
        host: cfg.host_id.clone(),
    };
    let hsm = super::run::open_custody(cfg)?;
    let records = super::ceph_kms::records(ceph)?;
    let describe = records.describe();
    let kms = Kms::open_shared(&kms_dir, root_key(cfg)?, kcfg, hsm, records)
        .map_err(|e| format!("key store: {e}"))?;
    // The operator running this command, as the audit record's caller.
    let caller = Caller {
        uid: super::sys::effective_uid(),
        gid: 0,
        pid: std::process::id() as i32,
    };
    let m = kms
        .migrate_local_records(&caller, &kms_dir, &sealing, root_key(cfg)?)
        .map_err(|e| format!("{} ({}): {e}", describe, e.error_code()))?;
    let ids = |v: &[(uuid::Uuid, String)]| -> Vec<serde_json::Value> {
        v.iter()
            .map(|(id, a)| serde_json::json!({"key_id": id.to_string(), "key_alias": a}))
            .collect()
    };
    Ok(serde_json::json!({
        "records": describe,
        "added": ids(&m.added),
        "already_present": ids(&m.present),
    }))
}
