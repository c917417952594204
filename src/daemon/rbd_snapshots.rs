//! Snapshots of RBD volumes (SPEC §9): Ceph's own snapshots, no copy of cryptvol's.
//!
//! Snapshot `SNAP` of RBD volume `NAME` is the image snapshot `cryptvol.SNAP` of
//! `cryptvol.NAME` ([`ceph::SNAP_PREFIX`]: snapshots a user took of the image are never
//! listed or touched). It holds the image's bytes at that moment, header included: the same
//! volume id and wrapped DEK, so it opens with the volume's DEK. The cluster is the record:
//! nothing is kept in `volumes.json`, so every host of the pool sees the same snapshots.
//!
//! Point in time: attached read-write here, the daemon takes every stripe lock of the
//! `Volume` (no write in flight, `Volume::quiesce`), flushes librbd and takes the snapshot
//! through the attachment's own (locked) image handle, then releases the stripes. Not
//! attached read-write here: a session of its own takes the image's lock (refused while
//! another host holds it: the snapshot is that host's to take), snapshots and releases it.
//! A fenced holder's session is blocklisted: the cluster refuses its snapshot.
//!
//! Read: `NAME@SNAP` opens the image read-only at the snapshot (no lock), for a read-only
//! attach, `inspect`, `export` and a clone (`create --from-snapshot`: a new image holding
//! the snapshot's ciphertext, data runs only, under a new volume id and re-wrapped DEK).
//! Its header must name the volume id of `NAME`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::ceph::{self, SNAP_PREFIX};
use super::snapshots::{SnapshotInfo, split_full};
use super::{Daemon, DaemonError, Loc, VolumeInfo, volume_context};
use crate::kms::Caller;
use crate::volume::snapshot::pace;
use crate::volume::store::walk_allocation;
use crate::volume::{BlockStore, CipherBackend, Volume, VolumeHeader, XtsKey};

impl Daemon {
    /// The pool of `NAME@SNAP`'s (or `NAME`'s) volume when it is an RBD volume.
    pub(super) fn rbd_pool_of(&self, name: &str) -> Option<String> {
        let vol = name.split_once('@').map_or(name, |(v, _)| v);
        match self.locate(vol) {
            Ok(Loc::Rbd(pool)) => Some(pool),
            _ => None,
        }
    }

    fn rbd_place(pool: &str, vol: &str, snap: &str) -> String {
        format!("rbd:{pool}/{}@{SNAP_PREFIX}{snap}", ceph::image_name(vol))
    }

    /// `volume snapshot create NAME SNAP` of an RBD volume (ops lock held).
    pub(super) fn rbd_snapshot_create(
        &self,
        name: &str,
        snap: &str,
        pool: &str,
    ) -> Result<SnapshotInfo, DaemonError> {
        let full = format!("{name}@{snap}");
        let (h, _) = self.trusted_header(name, &Loc::Rbd(pool.to_owned()))?;
        if h.reencrypt.is_some() {
            // A snapshot holds one DEK; during a re-encryption the data is under two.
            return Err(DaemonError::Conflict(format!(
                "volume {name:?} is being re-encrypted; snapshot it when that is done"
            )));
        }
        let ceph = self.ceph()?;
        let writer = self.exports.get(name).filter(|a| !a.read_only);
        let t0 = Instant::now();
        match &writer {
            Some(a) => {
                let raw = a.raw.clone().ok_or_else(|| {
                    DaemonError::Conflict(format!("volume {name:?} has no RBD image attached"))
                })?;
                let snap_name = format!("{SNAP_PREFIX}{snap}");
                a.backend
                    .0
                    .quiesce(|| raw.native_snapshot(&snap_name))
                    .map_err(|e| match e.raw_os_error() {
                        Some(libc::EEXIST) => DaemonError::Exists(full.clone()),
                        _ => DaemonError::Cluster(format!(
                            "snapshot {}: {e}",
                            Self::rbd_place(pool, name, snap)
                        )),
                    })?;
            }
            None => ceph.snap_create(pool, name, snap)?,
        }
        let pause_us = writer
            .as_ref()
            .map_or(0, |_| t0.elapsed().as_micros() as u64);
        tracing::info!(
            volume = name,
            snapshot = snap,
            method = "rbd",
            pause_us,
            "snapshot taken"
        );
        let mut info = self.rbd_snapshot_info(&full, pool)?;
        info.pause_us = Some(pause_us);
        Ok(info)
    }

    /// Snapshot `full`'s header, checked to be of the volume now named NAME, with its store
    /// (`reader`: one that keeps other hosts from deleting the snapshot while it lives).
    fn rbd_snapshot_open_store(
        &self,
        full: &str,
        pool: &str,
        reader: bool,
    ) -> Result<(VolumeHeader, Arc<dyn BlockStore>), DaemonError> {
        let (vol, snap) = split_full(full)?;
        let store = self.ceph()?.open_snapshot(pool, vol, snap, reader)?;
        let h = Volume::read_header_in(store.as_ref()).map_err(Self::vol_err(full))?;
        let (vh, _) = self.trusted_header(vol, &Loc::Rbd(pool.to_owned()))?;
        let w = crate::kms::wrap::parse(&h.wrapped_dek)?;
        let why = if h.volume_id != vh.volume_id {
            Some(format!(
                "holds volume_id {}, not {} of volume {vol:?}",
                h.volume_id, vh.volume_id
            ))
        } else if w.key_id.to_string() != h.key_id {
            Some(format!(
                "names key {}, but its data key is wrapped under {}",
                h.key_id, w.key_id
            ))
        } else if h.reencrypt.is_some() {
            Some("was taken during a re-encryption".to_owned())
        } else {
            None
        };
        match why {
            Some(why) => Err(DaemonError::Untrusted(format!(
                "snapshot {full:?}: {} {why}: refused",
                Self::rbd_place(pool, vol, snap)
            ))),
            None => Ok((h, store)),
        }
    }

    /// What `snapshot list/inspect` shows of an RBD snapshot.
    pub(super) fn rbd_snapshot_info(
        &self,
        full: &str,
        pool: &str,
    ) -> Result<SnapshotInfo, DaemonError> {
        let (vol, snap) = split_full(full)?;
        let Some(s) = self
            .ceph()?
            .snap_list(pool, vol)?
            .into_iter()
            .find(|s| s.name == snap)
        else {
            return Err(DaemonError::NoVolume(full.to_owned()));
        };
        let (h, state) = match self.rbd_snapshot_open_store(full, pool, false) {
            Ok((h, _)) => (Some(h), "ready".to_owned()),
            Err(e) => (None, format!("failed: {e}")),
        };
        Ok(SnapshotInfo {
            name: full.to_owned(),
            volume: vol.to_owned(),
            snapshot: snap.to_owned(),
            snapshot_id: format!("rbd-snap-{}", s.id),
            volume_id: h
                .as_ref()
                .map(|h| h.volume_id.to_string())
                .unwrap_or_default(),
            size: h.as_ref().map_or(0, |h| h.size),
            key_id: h.as_ref().map(|h| h.key_id.clone()).unwrap_or_default(),
            created: s.created,
            method: "rbd".into(),
            state,
            percent: 100,
            copied_on_write: 0,
            pause_us: None,
            attached: self.exports.get(full).is_some(),
            path: Self::rbd_place(pool, vol, snap),
        })
    }

    /// The cryptvol snapshots of RBD volume `vol`, as `NAME@SNAP`.
    pub(super) fn rbd_snapshot_names(
        &self,
        vol: &str,
        pool: &str,
    ) -> Result<Vec<String>, DaemonError> {
        Ok(self
            .ceph()?
            .snap_list(pool, vol)?
            .into_iter()
            .map(|s| format!("{vol}@{}", s.name))
            .collect())
    }

    /// The cryptvol snapshots of every RBD volume of `[ceph] pool` (for `GET /v1/snapshots`);
    /// a volume or a cluster that does not answer is skipped with a warning.
    pub(super) fn rbd_snapshot_names_all(&self) -> Vec<String> {
        let Some(c) = &self.ceph else {
            return Vec::new();
        };
        let vols = match c.list() {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "snapshot list: RBD volumes not listed");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for v in vols {
            let Some(pool) = self.rbd_pool_of(&v) else {
                continue;
            };
            match self.rbd_snapshot_names(&v, &pool) {
                Ok(n) => out.extend(n),
                Err(e) => {
                    tracing::warn!(volume = %v, error = %e, "snapshot list: its snapshots not listed")
                }
            }
        }
        out
    }

    /// `volume snapshot delete NAME@SNAP` of an RBD volume (ops lock held): refused while
    /// attached here.
    pub(super) fn rbd_snapshot_delete(&self, full: &str, pool: &str) -> Result<(), DaemonError> {
        let (vol, snap) = split_full(full)?;
        if self.exports.get(full).is_some() {
            return Err(DaemonError::Conflict(format!(
                "snapshot {full:?} is attached; detach it first"
            )));
        }
        self.ceph()?.snap_remove(pool, vol, snap)?;
        tracing::info!(snapshot = full, "snapshot deleted");
        Ok(())
    }

    /// Before `volume delete NAME` of an RBD volume (ops lock held): as for files, refused
    /// while it has snapshots unless `with_snapshots`; none is removed unless all can be.
    pub(super) fn rbd_delete_snapshots_of(
        &self,
        name: &str,
        pool: &str,
        with_snapshots: bool,
    ) -> Result<(), DaemonError> {
        let all = match self.rbd_snapshot_names(name, pool) {
            Ok(v) => v,
            // No image: the delete reports it.
            Err(DaemonError::NoVolume(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if !all.is_empty() && !with_snapshots {
            return Err(DaemonError::Conflict(format!(
                "volume {name:?} has {} snapshot(s) ({}); delete them or use --with-snapshots",
                all.len(),
                all.join(", ")
            )));
        }
        let foreign = self.ceph()?.foreign_snaps(pool, name)?;
        if !foreign.is_empty() {
            let shown: Vec<String> = foreign
                .iter()
                .map(|n| n.chars().take(64).filter(|c| !c.is_control()).collect())
                .collect();
            return Err(DaemonError::Conflict(format!(
                "the image of volume {name:?} has snapshots cryptvol did not make ({}); \
                 remove them with the rbd tool first",
                shown.join(", ")
            )));
        }
        if all.is_empty() {
            return Ok(());
        }
        if let Some(full) = all.iter().find(|f| self.exports.get(f).is_some()) {
            return Err(DaemonError::Conflict(format!(
                "snapshot {full:?} is attached; detach it first"
            )));
        }
        let snaps = all
            .iter()
            .map(|f| split_full(f).map(|(_, s)| s))
            .collect::<Result<Vec<_>, _>>()?;
        self.ceph()?.refuse_if_any_read(pool, name, &snaps)?;
        for full in &all {
            self.rbd_snapshot_delete(full, pool)?;
        }
        Ok(())
    }

    /// Opens RBD snapshot `full` read-only with the volume's DEK.
    pub(super) fn open_rbd_snapshot(
        &self,
        c: &Caller,
        full: &str,
        pool: &str,
    ) -> Result<Volume, DaemonError> {
        let (h, store) = self.rbd_snapshot_open_store(full, pool, true)?;
        let (_, _, dek) =
            self.kms
                .decrypt_datakey(c, &h.wrapped_dek, &volume_context(h.volume_id))?;
        let key = XtsKey::new(dek.expose()).map_err(Self::vol_err(full))?;
        drop(dek);
        let vol =
            Volume::open_with_keys(Box::new(store), key, None, true, CipherBackend::default())
                .map_err(Self::vol_err(full))?;
        if vol.header() != &h {
            return Err(DaemonError::Conflict("snapshot header changed".into()));
        }
        Ok(vol)
    }

    /// Read-only attach of RBD snapshot `full` (ops lock held; `attach_snapshot_locked` has
    /// checked the mode and that it is not attached yet).
    pub(super) fn attach_rbd_snapshot(
        &self,
        c: &Caller,
        full: &str,
        pool: &str,
    ) -> Result<(), DaemonError> {
        let vol = self.open_rbd_snapshot(c, full, pool)?;
        self.export_snapshot(full, vol);
        Ok(())
    }

    /// `volume inspect NAME@SNAP` of an RBD snapshot.
    pub(super) fn rbd_snapshot_volume_info(
        &self,
        full: &str,
        pool: &str,
    ) -> Result<VolumeInfo, DaemonError> {
        let (vol, snap) = split_full(full)?;
        let (h, _) = self.rbd_snapshot_open_store(full, pool, false)?;
        let a = self.exports.get(full);
        Ok(VolumeInfo {
            attached: a.is_some(),
            read_only: true,
            clients: a.map_or(0, |a| a.clients.load(Ordering::SeqCst)),
            ..VolumeInfo::from_header(full, &h, "rbd", Self::rbd_place(pool, vol, snap))
        })
    }

    /// `volume create NEW --from-snapshot NAME@SNAP [--key K]` of an RBD snapshot: a new
    /// image in the snapshot's pool (built under a temporary name, renamed when complete, as
    /// an import) holding the snapshot's ciphertext, copied data runs only (holes stay
    /// holes); its own volume id, the DEK unwrapped under the snapshot's context and
    /// re-wrapped for NEW's under K (default: the snapshot's CMK), the header written anew.
    pub(super) fn rbd_create_from_snapshot(
        &self,
        c: &Caller,
        new: &str,
        full: &str,
        key: Option<&str>,
        pool: &str,
        max_rate: u64,
    ) -> Result<VolumeInfo, DaemonError> {
        let (h, src, held) = {
            let _g = self.lock_ops();
            self.check_free(new)?;
            let (h, src) = self.rbd_snapshot_open_store(full, pool, true)?;
            self.importing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(new.to_owned());
            let held = super::Reservation {
                d: self,
                name: new.to_owned(),
            };
            (h, src, held)
        };
        let nh = self.clone_header(c, new, &h, key)?;
        let id = nh.volume_id;
        // A failure drops `b`: the temporary image is removed.
        let b = self.ceph()?.create_temp(pool, new, &nh)?;
        let dst = b
            .store()
            .ok_or_else(|| DaemonError::Conflict("the new image is not open".into()))?;
        let (start, d0, mut buf) = (Instant::now(), nh.data_offset, vec![0u8; 1 << 20]);
        let mut copied = 0u64;
        let query = |at: u64, len| {
            let from = d0
                .checked_add(at)
                .ok_or(DaemonError::Invalid("offset".into()))?;
            src.allocation(from, len).map_err(DaemonError::from)
        };
        walk_allocation(0, nh.size, query, |mut p, len, hole| {
            let end = p
                .checked_add(len)
                .ok_or(DaemonError::Invalid("offset".into()))?;
            while !hole && p < end {
                let n = (end - p).min(buf.len() as u64) as usize;
                let at = d0
                    .checked_add(p)
                    .ok_or(DaemonError::Invalid("offset".into()))?;
                src.read_at(&mut buf[..n], at)?;
                dst.write_at(&buf[..n], at)?;
                p += n as u64;
                copied += n as u64;
                pace(start, copied, max_rate);
            }
            Ok(true)
        })?;
        dst.sync()?;
        drop((dst, src));
        let _g = self.lock_ops();
        self.ceph()?.finish(b, new)?;
        self.register(new, &nh, Some(pool))?;
        drop(held);
        tracing::info!(volume = new, from = full, volume_id = %id, key_id = %nh.key_id, copied, "created from a snapshot");
        self.info_locked(new)
    }
}
