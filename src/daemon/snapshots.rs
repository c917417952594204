//! Snapshots, clones and export sources of file volumes (SPEC §9); those of RBD volumes are
//! Ceph's own (`rbd_snapshots.rs`), dispatched from here.
//!
//! A snapshot of NAME is the file `volumes/NAME@SNAP.cvol`: the volume's header (same
//! volume id, same wrapped DEK), a snapshot record (`volume::snapshot::SnapRecord`) and the
//! data area's ciphertext at the moment of the snapshot. It is made under a temporary name
//! and renamed when complete, so a crash leaves a temporary file (removed at start-up) and
//! never a snapshot that looks complete but is not. `volumes.json` binds `NAME@SNAP` to its
//! snapshot id: a swapped snapshot file is refused like a swapped volume file.
//!
//! Point in time: with the volume attached read-write, the daemon takes every stripe lock of
//! the `Volume` (no write in flight, see `Volume::quiesce`) and either reflinks the file
//! (XFS, btrfs) or installs copy-before-write state; the pause is measured (`pause_us`).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use uuid::Uuid;

use super::exports::{Attached, VolumeBackend};
use super::state::RegisteredSnapshot;
use super::{Daemon, DaemonError, Loc, TEMP_MARK, VolumeInfo, valid_name, volume_context};
use crate::kms::Caller;
use crate::server::{Qos, QosLimits};
use crate::volume::snapshot::{
    CowState, SnapRecord, copy_sparse, pace, reflink, reflink_range, reflink_unsupported,
};
use crate::volume::store::walk_allocation;
use crate::volume::{BlockStore, FileStore, Volume, VolumeHeader, XtsKey};

/// What `volume snapshot list/inspect` shows.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// `NAME@SNAP`: also the export name of a read-only attach.
    pub name: String,
    pub volume: String,
    pub snapshot: String,
    pub snapshot_id: String,
    pub volume_id: String,
    pub size: u64,
    pub key_id: String,
    /// Unix seconds.
    pub created: u64,
    /// "reflink" or "copy".
    pub method: String,
    /// "ready", "creating" or "failed: <reason>".
    pub state: String,
    /// Of the copy (100 when ready).
    pub percent: u64,
    /// Chunks copied out by writes before they changed them (copy path, while creating).
    pub copied_on_write: u64,
    /// How long writes to the volume were held for the snapshot (create only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_us: Option<u64>,
    pub attached: bool,
    pub path: String,
}

/// A copy-path snapshot in the making.
struct Job {
    volume: String,
    cow: Arc<CowState>,
    tmp: PathBuf,
    reg: RegisteredSnapshot,
    failed: Mutex<Option<String>>,
}

/// The daemon's snapshot bookkeeping (in memory; the registry holds finished ones).
#[derive(Default)]
pub struct Snapshots {
    /// `NAME@SNAP` -> copy in progress (or failed, until deleted).
    jobs: Mutex<BTreeMap<String, Arc<Job>>>,
    /// `NAME@SNAP` -> clones being made from it.
    cloning: Mutex<BTreeMap<String, usize>>,
}

/// Holds a snapshot busy while a clone is made from it.
struct CloneHold<'a>(&'a Snapshots, String);

impl Drop for CloneHold<'_> {
    fn drop(&mut self) {
        let mut m = self.0.cloning.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Splits `NAME@SNAP`, both parts valid names.
pub fn split_full(full: &str) -> Result<(&str, &str), DaemonError> {
    match full.split_once('@') {
        Some((v, s)) if valid_name(v) && valid_name(s) => Ok((v, s)),
        _ => Err(DaemonError::Invalid(format!(
            "{full:?} is not VOLUME@SNAPSHOT (each 1..64 of [A-Za-z0-9._-], starting with a letter or digit)"
        ))),
    }
}

impl Snapshots {
    /// The copy-before-write state to install in a volume being attached, if a snapshot of
    /// it is being copied.
    pub fn active_cow(&self, volume: &str) -> Option<Arc<CowState>> {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|j| j.volume == volume && j.failed.lock().is_ok_and(|f| f.is_none()))
            .map(|j| j.cow.clone())
    }

    fn job(&self, full: &str) -> Option<Arc<Job>> {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(full)
            .cloned()
    }

    fn jobs_of(&self, volume: &str) -> Vec<(String, Arc<Job>)> {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, j)| j.volume == volume)
            .map(|(k, j)| (k.clone(), j.clone()))
            .collect()
    }

    /// The snapshot of `volume` whose copy is still running (not failed), if any.
    pub(super) fn copying(&self, volume: &str) -> Option<String> {
        self.jobs_of(volume)
            .into_iter()
            .find(|(_, j)| j.failed.lock().is_ok_and(|f| f.is_none()))
            .map(|(full, _)| full)
    }

    fn busy_cloning(&self, full: &str) -> bool {
        self.cloning
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(full)
    }
}

impl Daemon {
    fn snapshot_path(&self, full: &str) -> Result<PathBuf, DaemonError> {
        split_full(full)?;
        Ok(self.state_dir.join("volumes").join(format!("{full}.cvol")))
    }

    /// `volume snapshot create NAME SNAP`: returns at once with state "ready" (reflink, or a
    /// detached volume's copy done) or "creating" (copy path; a thread copies the rest).
    /// `max_rate`: bytes per second of the background copy (0 = unlimited).
    pub fn snapshot_create(
        self: &Arc<Self>,
        name: &str,
        snap: &str,
        max_rate: u64,
    ) -> Result<SnapshotInfo, DaemonError> {
        let full = format!("{name}@{snap}");
        let final_path = self.snapshot_path(&full)?;
        let _g = self.lock_ops();
        let loc = self.locate(name)?;
        let path = match &loc {
            Loc::File(path) => path,
            Loc::Rbd(pool) => return self.rbd_snapshot_create(name, snap, pool),
        };
        if final_path.exists()
            || self.registry().snapshot(&full).is_some()
            || self.snaps.job(&full).is_some()
        {
            return Err(DaemonError::Exists(full));
        }
        if let Some(other) = self.snaps.copying(name) {
            return Err(DaemonError::Conflict(format!(
                "snapshot {other:?} of volume {name:?} is still being copied; wait for it"
            )));
        }
        let (h, _) = self.trusted_header(name, &loc)?;
        if h.reencrypt.is_some() {
            // A snapshot holds one DEK; during a re-encryption the data is under two.
            return Err(DaemonError::Conflict(format!(
                "volume {name:?} is being re-encrypted; snapshot it when that is done"
            )));
        }
        let tmp = self
            .state_dir
            .join("volumes")
            .join(format!(".{full}{TEMP_MARK}{}", Uuid::new_v4().simple()));
        let dst = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let cleanup = |e: DaemonError| {
            let _ = std::fs::remove_file(&tmp);
            e
        };
        let src = File::open(path).map_err(|e| cleanup(e.into()))?;
        let record = SnapRecord {
            snapshot_id: Uuid::new_v4(),
            volume_id: h.volume_id,
            created: now(),
            name: full.clone(),
        };
        // The snapshot file's header and record first (headers only change under the ops
        // lock, held). Whether the file system shares blocks: tried on the header copies,
        // which are rewritten right after with the same bytes.
        let prepared = (|| -> Result<bool, DaemonError> {
            let header_len = 2 * crate::volume::header::HEADER_COPY_LEN as u64;
            let reflinked = match reflink_range(&src, 0, header_len, &dst, 0) {
                Ok(()) => true,
                Err(e) if reflink_unsupported(&e) => false,
                Err(e) => return Err(e.into()),
            };
            let store = FileStore::new(dst.try_clone()?);
            Volume::create_with_store(&store, &h).map_err(Self::vol_err(&full))?;
            let at = crate::volume::snapshot::record_offset(h.data_offset);
            store.write_at(&record.encode().map_err(Self::vol_err(&full))?, at)?;
            Ok(reflinked)
        })();
        let reflinked = prepared.map_err(cleanup)?;
        let method = if reflinked { "reflink" } else { "copy" };
        let cow = Arc::new(
            CowState::new(
                src.try_clone().map_err(|e| cleanup(e.into()))?,
                dst.try_clone().map_err(|e| cleanup(e.into()))?,
                h.data_offset,
                h.size,
                !h.encrypt_zeroes(),
                reflinked,
            )
            .map_err(|e| cleanup(e.into()))?,
        );
        // The point in time. Attached read-write: no write in flight while the
        // copy-before-write state is installed; every later write copies (or shares) the
        // chunks it changes into the snapshot first.
        let writer = self.exports.get(name).filter(|a| !a.read_only);
        let t0 = Instant::now();
        if let Some(a) = &writer {
            a.backend
                .0
                .quiesce(|| a.backend.0.cow().install(cow.clone()));
        }
        let pause_us = writer
            .as_ref()
            .map_or(0, |_| t0.elapsed().as_micros() as u64);
        tracing::info!(
            volume = name,
            snapshot = snap,
            method,
            pause_us,
            "snapshot taken"
        );
        let reg = RegisteredSnapshot {
            snapshot_id: record.snapshot_id,
            volume_id: h.volume_id,
            key_id: h.key_id.clone(),
            generation: h.generation,
            size: h.size,
            created: record.created,
            method: method.into(),
        };
        let job = Arc::new(Job {
            volume: name.to_owned(),
            cow: cow.clone(),
            tmp,
            reg,
            failed: Mutex::new(None),
        });
        self.snaps
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(full.clone(), job.clone());
        let d = Arc::downgrade(self);
        let (full2, job2) = (full.clone(), job.clone());
        let spawned = std::thread::Builder::new()
            .name("cryptvol-snap".into())
            .spawn(move || {
                let r = job2.cow.run_copy(max_rate);
                if let Some(d) = d.upgrade() {
                    d.finish_snapshot(&full2, &job2, r);
                }
            });
        if let Err(e) = spawned {
            job.cow.fail(format!("cannot start the copy: {e}"));
            self.finish_snapshot_locked(&full, &job, Err(format!("no copy thread: {e}")));
        }
        let mut info = self.snapshot_info_locked(&full)?;
        info.pause_us = Some(pause_us);
        Ok(info)
    }

    /// Renames a complete snapshot file into place and registers it (ops lock held).
    fn commit_snapshot(
        &self,
        full: &str,
        tmp: &std::path::Path,
        reg: RegisteredSnapshot,
    ) -> Result<(), DaemonError> {
        let path = self.snapshot_path(full)?;
        super::sys::rename_noreplace(tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(tmp);
            DaemonError::from(e)
        })?;
        let mut r = self.registry();
        r.insert_snapshot(full, reg);
        r.save(&self.state_dir)?;
        Ok(())
    }

    /// The end of a copy: the volume's writes stop copying; the file is renamed into place,
    /// or (failed) removed and the snapshot shown failed until deleted.
    fn finish_snapshot(&self, full: &str, job: &Arc<Job>, r: Result<(), String>) {
        let _g = self.lock_ops();
        self.finish_snapshot_locked(full, job, r);
    }

    fn finish_snapshot_locked(&self, full: &str, job: &Arc<Job>, r: Result<(), String>) {
        if let Some(a) = self.exports.get(&job.volume) {
            a.backend.0.cow().remove(&job.cow);
        }
        let r = r.and_then(|()| {
            self.commit_snapshot(full, &job.tmp, job.reg.clone())
                .map_err(|e| e.to_string())
        });
        match r {
            Ok(()) => {
                tracing::info!(snapshot = full, "snapshot copy complete");
                self.snaps
                    .jobs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(full);
            }
            Err(why) => {
                let _ = std::fs::remove_file(&job.tmp);
                tracing::error!(snapshot = full, reason = %why, "snapshot failed");
                *job.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
            }
        }
    }

    /// Reads snapshot `full`'s header and checks it and its record against the registry: a
    /// file swapped for another snapshot or volume is refused.
    fn trusted_snapshot(&self, full: &str) -> Result<(VolumeHeader, PathBuf), DaemonError> {
        let (vol, _) = split_full(full)?;
        let path = self.snapshot_path(full)?;
        let Some(reg) = self.registry().snapshot(full).cloned() else {
            return Err(DaemonError::NoVolume(full.to_owned()));
        };
        if !path.exists() {
            return Err(DaemonError::Untrusted(format!(
                "snapshot {full:?}: its file {} is missing",
                path.display()
            )));
        }
        let h = Volume::read_header(&path).map_err(Self::vol_err(full))?;
        let store = FileStore::new(File::open(&path)?);
        let rec = SnapRecord::read(&store, h.data_offset).map_err(|e| {
            DaemonError::Untrusted(format!(
                "snapshot {full:?}: {} holds no valid snapshot record ({e}): refused",
                path.display()
            ))
        })?;
        let w = crate::kms::wrap::parse(&h.wrapped_dek)?;
        let why = if rec.snapshot_id != reg.snapshot_id || rec.name != full {
            Some(format!(
                "holds snapshot {} ({:?}), not {}",
                rec.snapshot_id, rec.name, reg.snapshot_id
            ))
        } else if h.volume_id != reg.volume_id || rec.volume_id != reg.volume_id {
            Some(format!(
                "holds volume_id {}, not {}",
                h.volume_id, reg.volume_id
            ))
        } else if h.key_id != reg.key_id || w.key_id.to_string() != h.key_id {
            Some(format!("names key {}, not {}", h.key_id, reg.key_id))
        } else if let Some(len) = store
            .len()
            .ok()
            .filter(|&l| h.data_offset.checked_add(h.size).is_none_or(|end| l < end))
        {
            // Cut short (a clone or export would silently read zeros for the lost part).
            Some(format!(
                "is truncated ({len} bytes, its header says {} + {})",
                h.data_offset, h.size
            ))
        } else if self
            .registry()
            .get(vol)
            .is_some_and(|r| r.volume_id != reg.volume_id)
        {
            Some(format!("is not a snapshot of the volume now named {vol:?}"))
        } else {
            None
        };
        match why {
            Some(why) => Err(DaemonError::Untrusted(format!(
                "snapshot {full:?}: {} {why}: refused",
                path.display()
            ))),
            None => Ok((h, path)),
        }
    }

    fn snapshot_info_locked(&self, full: &str) -> Result<SnapshotInfo, DaemonError> {
        let (vol, snap) = split_full(full)?;
        if let Some(pool) = self.rbd_pool_of(full) {
            return self.rbd_snapshot_info(full, &pool);
        }
        let base = |reg: &RegisteredSnapshot, state: String, percent: u64, cow: u64| SnapshotInfo {
            name: full.to_owned(),
            volume: vol.to_owned(),
            snapshot: snap.to_owned(),
            snapshot_id: reg.snapshot_id.to_string(),
            volume_id: reg.volume_id.to_string(),
            size: reg.size,
            key_id: reg.key_id.clone(),
            created: reg.created,
            method: reg.method.clone(),
            state,
            percent,
            copied_on_write: cow,
            pause_us: None,
            attached: self.exports.get(full).is_some(),
            path: self
                .snapshot_path(full)
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        };
        if let Some(j) = self.snaps.job(full) {
            let state = match &*j.failed.lock().unwrap_or_else(|e| e.into_inner()) {
                Some(why) => format!("failed: {why}"),
                None => "creating".to_owned(),
            };
            return Ok(base(&j.reg, state, j.cow.percent(), j.cow.cow_chunks()));
        }
        let Some(reg) = self.registry().snapshot(full).cloned() else {
            return Err(DaemonError::NoVolume(full.to_owned()));
        };
        let state = match self.trusted_snapshot(full) {
            Ok(_) => "ready".to_owned(),
            Err(e) => format!("failed: {e}"),
        };
        Ok(base(&reg, state, 100, 0))
    }

    pub fn snapshot_inspect(&self, full: &str) -> Result<SnapshotInfo, DaemonError> {
        self.snapshot_info_locked(full)
    }

    /// Every snapshot of `volume` (all volumes when `None`), finished and in the making.
    pub fn snapshot_list(&self, volume: Option<&str>) -> Result<Vec<SnapshotInfo>, DaemonError> {
        if let Some(v) = volume
            && let Loc::Rbd(pool) = self.locate(v)?
        {
            let names = self.rbd_snapshot_names(v, &pool)?;
            return names
                .iter()
                .map(|n| self.rbd_snapshot_info(n, &pool))
                .collect();
        }
        let mut names: Vec<String> = self
            .registry()
            .snapshots_of(volume)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        for (k, j) in self
            .snaps
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            if volume.is_none_or(|v| v == j.volume) {
                names.push(k.clone());
            }
        }
        if volume.is_none() {
            names.extend(self.rbd_snapshot_names_all());
        }
        names.sort();
        names.dedup();
        names.iter().map(|n| self.snapshot_info_locked(n)).collect()
    }

    /// `volume snapshot delete NAME@SNAP`: refused while attached, being created, or a
    /// clone is being made from it. A failed snapshot is forgotten.
    pub fn snapshot_delete(&self, full: &str) -> Result<(), DaemonError> {
        let _g = self.lock_ops();
        self.snapshot_delete_locked(full)
    }

    fn snapshot_delete_locked(&self, full: &str) -> Result<(), DaemonError> {
        let path = self.snapshot_path(full)?;
        if let Some(pool) = self.rbd_pool_of(full) {
            return self.rbd_snapshot_delete(full, &pool);
        }
        if let Some(j) = self.snaps.job(full) {
            if j.failed.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
                return Err(DaemonError::Conflict(format!(
                    "snapshot {full:?} is being created ({}%)",
                    j.cow.percent()
                )));
            }
            self.snaps
                .jobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(full);
            return Ok(());
        }
        if self.registry().snapshot(full).is_none() {
            return Err(DaemonError::NoVolume(full.to_owned()));
        }
        if self.exports.get(full).is_some() {
            return Err(DaemonError::Conflict(format!(
                "snapshot {full:?} is attached; detach it first"
            )));
        }
        if self.snaps.busy_cloning(full) {
            return Err(DaemonError::Conflict(format!(
                "a volume is being created from snapshot {full:?}"
            )));
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let mut r = self.registry();
        r.remove_snapshot(full);
        r.save(&self.state_dir)?;
        tracing::info!(snapshot = full, "snapshot deleted");
        Ok(())
    }

    /// Before `volume delete NAME` (ops lock held): refused while NAME has snapshots, unless
    /// `with_snapshots`, which deletes them first (each under the rules of
    /// [`Daemon::snapshot_delete`]).
    pub(super) fn delete_snapshots_of(
        &self,
        name: &str,
        with_snapshots: bool,
    ) -> Result<(), DaemonError> {
        if let Some(pool) = self.rbd_pool_of(name) {
            return self.rbd_delete_snapshots_of(name, &pool, with_snapshots);
        }
        let mut all: Vec<String> = self
            .registry()
            .snapshots_of(Some(name))
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        all.extend(self.snaps.jobs_of(name).into_iter().map(|(k, _)| k));
        all.sort();
        all.dedup();
        if all.is_empty() {
            return Ok(());
        }
        if !with_snapshots {
            return Err(DaemonError::Conflict(format!(
                "volume {name:?} has {} snapshot(s) ({}); delete them or use --with-snapshots",
                all.len(),
                all.join(", ")
            )));
        }
        // Check all first: nothing is deleted unless everything can be.
        for full in &all {
            if let Some(j) = self.snaps.job(full)
                && j.failed.lock().unwrap_or_else(|e| e.into_inner()).is_none()
            {
                return Err(DaemonError::Conflict(format!(
                    "snapshot {full:?} is being created"
                )));
            }
            if self.exports.get(full).is_some() || self.snaps.busy_cloning(full) {
                return Err(DaemonError::Conflict(format!(
                    "snapshot {full:?} is attached or a volume is being created from it"
                )));
            }
        }
        for full in &all {
            self.snapshot_delete_locked(full)?;
        }
        Ok(())
    }

    /// Read-only attach of a snapshot, exported as `NAME@SNAP` (ops lock held).
    pub(super) fn attach_snapshot_locked(
        &self,
        c: &Caller,
        full: &str,
        read_only: bool,
    ) -> Result<(), DaemonError> {
        if !read_only {
            return Err(DaemonError::Invalid(format!(
                "snapshot {full:?} is read-only: attach it with --read-only"
            )));
        }
        if self.exports.get(full).is_some() {
            return Ok(());
        }
        if self.snaps.job(full).is_some() {
            return Err(DaemonError::Conflict(format!(
                "snapshot {full:?} is not complete"
            )));
        }
        if let Some(pool) = self.rbd_pool_of(full) {
            self.attach_rbd_snapshot(c, full, &pool)?;
        } else {
            self.attach_file_snapshot(c, full)?;
        }
        let mut st = self.attach_state.lock().unwrap_or_else(|e| e.into_inner());
        st.set(full, Some(true));
        st.save(&self.state_dir)?;
        tracing::info!(
            snapshot = full,
            peer_uid = c.uid,
            "snapshot attached read-only"
        );
        Ok(())
    }

    fn attach_file_snapshot(&self, c: &Caller, full: &str) -> Result<(), DaemonError> {
        let vol = self.open_snapshot(c, full)?;
        self.export_snapshot(full, vol);
        Ok(())
    }

    /// Serves an opened snapshot read-only as the export `NAME@SNAP` (file or RBD).
    pub(super) fn export_snapshot(&self, full: &str, vol: Volume) {
        let size = vol.size();
        self.exports.insert(
            full,
            Attached {
                backend: Arc::new(VolumeBackend(vol, None)),
                read_only: true,
                clients: Arc::new(AtomicUsize::new(0)),
                detach: tokio::sync::watch::channel(false).0,
                qos: Arc::new(Qos::new(QosLimits::default())),
                description: format!("cryptvol snapshot {full} ({size} bytes, aes-xts-plain64)"),
                raw: None,
                release: None,
            },
        );
    }

    /// Opens a finished snapshot read-only with its (the volume's) DEK.
    fn open_snapshot(&self, c: &Caller, full: &str) -> Result<Volume, DaemonError> {
        if let Some(pool) = self.rbd_pool_of(full) {
            return self.open_rbd_snapshot(c, full, &pool);
        }
        let (h, path) = self.trusted_snapshot(full)?;
        let key = self.unwrap_dek(c, full, &h)?;
        let vol = Volume::open(&path, key, true).map_err(Self::vol_err(full))?;
        if vol.header() != &h {
            return Err(DaemonError::Conflict("snapshot header changed".into()));
        }
        Ok(vol)
    }

    fn unwrap_dek(&self, c: &Caller, name: &str, h: &VolumeHeader) -> Result<XtsKey, DaemonError> {
        let (_, _, dek) =
            self.kms
                .decrypt_datakey(c, &h.wrapped_dek, &volume_context(h.volume_id))?;
        XtsKey::new(dek.expose()).map_err(Self::vol_err(name))
    }

    /// `volume inspect NAME@SNAP` (and what attach/detach of a snapshot answer).
    pub(super) fn snapshot_volume_info(&self, full: &str) -> Result<VolumeInfo, DaemonError> {
        if let Some(pool) = self.rbd_pool_of(full) {
            return self.rbd_snapshot_volume_info(full, &pool);
        }
        let (h, path) = self.trusted_snapshot(full)?;
        let a = self.exports.get(full);
        Ok(VolumeInfo {
            attached: a.is_some(),
            read_only: true,
            clients: a.map_or(0, |a| a.clients.load(std::sync::atomic::Ordering::SeqCst)),
            ..VolumeInfo::from_header(full, &h, "file", path.display().to_string())
        })
    }

    /// The header of a clone of the snapshot whose header is `h`: a new volume id, the
    /// snapshot's DEK unwrapped under its context and re-wrapped for the new id under `key`
    /// (default: the snapshot's CMK); size, sector size, flags and data offset kept. Shared by
    /// file and RBD clones.
    pub(super) fn clone_header(
        &self,
        c: &Caller,
        new: &str,
        h: &VolumeHeader,
        key: Option<&str>,
    ) -> Result<VolumeHeader, DaemonError> {
        let id = Uuid::new_v4();
        let (_, _, dek) =
            self.kms
                .decrypt_datakey(c, &h.wrapped_dek, &volume_context(h.volume_id))?;
        let key = key.unwrap_or(&h.key_id);
        let wrapped = self
            .kms
            .encrypt_datakey(c, key, dek.expose(), &volume_context(id))?;
        drop(dek);
        let w = crate::kms::wrap::parse(&wrapped)?;
        let mut nh = VolumeHeader::new(
            id,
            h.size,
            h.sector_size,
            &w.key_id.to_string(),
            w.key_version,
            wrapped,
        )
        .map_err(Self::vol_err(new))?;
        nh.flags = h.flags;
        nh.data_offset = h.data_offset;
        Ok(nh)
    }

    /// `volume create NEW --from-snapshot NAME@SNAP [--key K]`: a volume of its own (new
    /// volume id and name) holding the snapshot's data; the DEK unwrapped under the
    /// snapshot's context and re-wrapped for NEW's under K (default: the snapshot's CMK).
    /// The ciphertext is reflinked or copied sparse (holes stay holes); the file appears
    /// under NEW only when complete. `max_rate`: bytes per second of a copy (0 = unlimited).
    pub fn create_from_snapshot(
        &self,
        c: &Caller,
        new: &str,
        full: &str,
        key: Option<&str>,
        max_rate: u64,
    ) -> Result<VolumeInfo, DaemonError> {
        if let Some(pool) = self.rbd_pool_of(full) {
            return self.rbd_create_from_snapshot(c, new, full, key, &pool, max_rate);
        }
        let (h, snap_path, held, busy) = {
            let _g = self.lock_ops();
            self.check_free(new)?;
            if self.snaps.job(full).is_some() {
                return Err(DaemonError::Conflict(format!(
                    "snapshot {full:?} is not complete"
                )));
            }
            let (h, p) = self.trusted_snapshot(full)?;
            self.importing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(new.to_owned());
            let held = super::Reservation {
                d: self,
                name: new.to_owned(),
            };
            *self
                .snaps
                .cloning
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(full.to_owned())
                .or_default() += 1;
            (h, p, held, CloneHold(&self.snaps, full.to_owned()))
        };
        let nh = self.clone_header(c, new, &h, key)?;
        let id = nh.volume_id;
        let tmp = self.temp_path(new);
        let built = (|| -> Result<&'static str, DaemonError> {
            let src = File::open(&snap_path)?;
            let dst = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            let method = match reflink(&src, &dst) {
                Ok(()) => "reflink",
                Err(e) if reflink_unsupported(&e) => "copy",
                Err(e) => return Err(e.into()),
            };
            let (s, d) = (FileStore::new(src), FileStore::new(dst));
            if method == "reflink" {
                // The snapshot's record is not the clone's.
                d.punch_hole(
                    crate::volume::snapshot::record_offset(nh.data_offset),
                    crate::volume::snapshot::RECORD_LEN as u64,
                )?;
            }
            Volume::create_with_store(&d, &nh).map_err(Self::vol_err(new))?;
            if method == "copy" {
                // Data runs only, 1 MiB at a time (paced); holes are jumped over.
                let (start, mut buf) = (Instant::now(), Vec::new());
                let (d0, thin) = (nh.data_offset, !nh.encrypt_zeroes());
                let query = |at: u64, len| s.allocation(d0 + at, len);
                walk_allocation(0, nh.size, query, |mut p, len, hole| {
                    let end = p + len;
                    while !hole && p < end {
                        let n = (end - p).min(1 << 20);
                        copy_sparse(&s, &d, d0 + p, d0 + p + n, thin, &mut buf)?;
                        p += n;
                        pace(start, p, max_rate);
                    }
                    Ok(true)
                })?;
            }
            d.sync()?;
            Ok(method)
        })();
        let method = match built {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let _g = self.lock_ops();
        self.commit_new(new, &tmp, &nh)?;
        drop((held, busy));
        tracing::info!(volume = new, from = full, volume_id = %id, key_id = %nh.key_id, method, "created from a snapshot");
        self.info_locked(new)
    }

    /// What an export reads: the attached volume or snapshot, else the volume or snapshot
    /// opened read-only for the export.
    pub fn export_source(&self, c: &Caller, name: &str) -> Result<Arc<VolumeBackend>, DaemonError> {
        let _g = self.lock_ops();
        if let Some(a) = self.exports.get(name) {
            return Ok(a.backend.clone());
        }
        if name.contains('@') {
            if self.snaps.job(name).is_some() {
                return Err(DaemonError::Conflict(format!(
                    "snapshot {name:?} is not complete"
                )));
            }
            return Ok(Arc::new(VolumeBackend(self.open_snapshot(c, name)?, None)));
        }
        let loc = self.locate(name)?;
        let Loc::File(path) = &loc else {
            return Err(DaemonError::Unsupported(
                "export of a detached RBD volume is not supported yet; attach it first".into(),
            ));
        };
        let (h, _) = self.trusted_header(name, &loc)?;
        let key = self.unwrap_dek(c, name, &h)?;
        let vol = Volume::open(path, key, true).map_err(Self::vol_err(name))?;
        Ok(Arc::new(VolumeBackend(vol, None)))
    }

    /// At start-up: registered snapshots whose file is gone are forgotten (a temporary file
    /// of one in the making was removed with the other unfinished files).
    pub(super) fn forget_missing_snapshots(&self) -> Result<(), DaemonError> {
        let mut r = self.registry();
        let mut changed = false;
        for (full, _) in r.snapshots_of(None) {
            let gone = self.snapshot_path(&full).map_or(true, |p| !p.exists());
            if gone {
                tracing::warn!(snapshot = %full, "snapshot file missing: forgotten");
                r.remove_snapshot(&full);
                changed = true;
            }
        }
        if changed {
            r.save(&self.state_dir)?;
        }
        Ok(())
    }
}
