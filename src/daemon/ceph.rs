//! RBD volumes for the daemon (`[ceph]`): where they live in the cluster, which session does
//! what, and the exclusive lock that makes one host the writer.
//!
//! - A volume `NAME` is the image `cryptvol.NAME` ([`IMAGE_PREFIX`]) in its pool; the image
//!   holds exactly the bytes of a volume file. `volume list` shows every `cryptvol.*` image of
//!   the configured pool.
//! - **Sessions.** One long-lived *control* session (connected on first use, reconnected on
//!   the next call after a failure) reads headers, lists, names lock holders and removes
//!   images; it never takes a lock. Every read-write attach, and every operation that writes
//!   a header (create, resize, rewrap of a volume not attached here), gets a session of its
//!   own: a takeover blocklists the holder's session address, which then fences exactly that
//!   one attachment, not the host's other volumes nor its control session.
//! - **Holder label.** A lock is recorded with `CLIENT@HOSTNAME` (the cephx user and this
//!   host's name), which another host's refusal and `volume list` show.
//! - **Imports** are built in `cryptvol-tmp.INSTANCE.NAME.RANDOM` ([`TEMP_PREFIX`]), INSTANCE
//!   being this daemon's id (`state.rs`, one per state dir: two live daemons never share
//!   it). A crash mid-import leaves one; this daemon removes its own (never another
//!   daemon's, never one of an import running here) whenever its control session connects,
//!   on every `volume list`, and before every import into a pool.
//! - **Unreachable cluster**: every new session passes the gate of `reach.rs`, so callers
//!   fail at once while one probe waits out the connect timeout.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use crate::config::CephConfig;
use crate::volume::rbd::{Cluster, ClusterConfig, Image, LockError, LockOwner, RbdStore};
use crate::volume::{BlockStore, Volume, VolumeHeader};

use super::DaemonError;
use super::reach::Reach;

/// Image name prefix: volume `NAME` is image `cryptvol.NAME`.
pub const IMAGE_PREFIX: &str = "cryptvol.";

pub fn image_name(name: &str) -> String {
    format!("{IMAGE_PREFIX}{name}")
}

/// Prefix of the images imports are built in (never listed as volumes).
pub const TEMP_PREFIX: &str = "cryptvol-tmp.";

pub struct Ceph {
    cfg: ClusterConfig,
    pool: String,
    label: String,
    /// This daemon's id in temporary image names.
    instance: String,
    control: Mutex<Option<Cluster>>,
    reach: Reach,
    /// Temporary images of the imports running in this process (not stale).
    building: Arc<Mutex<BTreeSet<String>>>,
}

fn cluster_err(what: &str, e: impl std::fmt::Display) -> DaemonError {
    DaemonError::Cluster(format!("{what}: {e}"))
}

/// What a look at an image (read-only, no lock) shows.
pub struct Peek {
    pub header: VolumeHeader,
    /// The exclusive lock's holder (its label and session address), if any.
    pub holder: Option<String>,
}

/// An image being imported into: its store (drop every other handle before
/// [`Ceph::finish`]); removed again if dropped unfinished.
pub struct Building {
    store: Option<Arc<RbdStore>>,
    io: Option<crate::volume::rbd::IoCtx>,
    temp: String,
    live: Arc<Mutex<BTreeSet<String>>>,
}

impl Building {
    pub fn store(&self) -> Option<Arc<dyn BlockStore>> {
        self.store.clone().map(|s| s as Arc<dyn BlockStore>)
    }
}

impl Drop for Building {
    fn drop(&mut self) {
        // Close the image (the last handle, when the caller dropped its own) first.
        drop(self.store.take());
        if let Some(io) = self.io.take()
            && let Err(e) = io.remove_image(&self.temp)
        {
            tracing::error!(image = %self.temp, error = %e, "could not remove an unfinished import (tried again on the next volume list)");
        }
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.temp);
    }
}

/// An image opened for an attach: the part that waits for the cluster, done before the
/// daemon's ops lock is taken (`retry.rs`). Dropped unused, it closes (releasing any lock).
pub struct Opened {
    pub store: Arc<dyn BlockStore>,
    /// Read-write: releases the exclusive lock (detach).
    pub release: Option<Box<dyn Fn() -> std::io::Result<()> + Send + Sync>>,
    /// Read-write: this session's address (what lock holders are named by).
    pub address: Option<String>,
    pub took_over_from: Option<String>,
}

/// A read-write attachment's store: the image open in a session of its own, locked.
pub struct Locked {
    pub store: Arc<dyn BlockStore>,
    /// Releases the lock (detach), before the last handle closes the image.
    pub release: Box<dyn Fn() -> std::io::Result<()> + Send + Sync>,
    /// The holder whose lock was broken (`--takeover`), if one was.
    pub took_over_from: Option<String>,
    /// This session's address: what lock holders are named by.
    pub address: String,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

impl Ceph {
    /// Nothing is connected yet: a cluster down at start does not stop the daemon.
    pub fn new(c: &CephConfig, instance: &str) -> Ceph {
        let mut cfg = ClusterConfig::new(&c.conf, c.client.clone());
        cfg.keyring = c.keyring.clone();
        cfg.op_timeout = c.op_timeout;
        cfg.mount_timeout = c.op_timeout.min(std::time::Duration::from_secs(10));
        Ceph {
            label: format!("{}@{}", c.client, hostname()),
            cfg,
            pool: c.pool.clone(),
            instance: instance.to_owned(),
            control: Mutex::new(None),
            reach: Reach::default(),
            building: Arc::default(),
        }
    }

    /// A new session, unless the cluster is known unreachable (`reach.rs`).
    fn connect(&self) -> Result<Cluster, DaemonError> {
        let pass = self.reach.pass().map_err(DaemonError::Cluster)?;
        if pass.is_probe() {
            tracing::info!("the cluster was unreachable: connecting again");
        }
        let r = Cluster::connect(&self.cfg);
        pass.done(&r);
        r.map_err(|e| cluster_err("cluster", e))
    }

    /// The configured pool (new volumes, `volume list`).
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// The control session, connecting (again) if there is none; a new one first removes
    /// this daemon's stale import images from the configured pool.
    pub fn control(&self) -> Result<Cluster, DaemonError> {
        if let Some(c) = self
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            return Ok(c.clone());
        }
        // Not under the mutex: a caller that finds the cluster down fails at once.
        let c = self.connect()?;
        tracing::info!(client = %self.cfg.client, "connected to the Ceph cluster");
        let c = {
            let mut g = self.control.lock().unwrap_or_else(|e| e.into_inner());
            g.get_or_insert(c).clone()
        };
        if let Ok(io) = c.ioctx(&self.pool) {
            self.remove_stale_imports(&io);
        }
        Ok(c)
    }

    /// Removes the temporary images of this daemon's imports that are not running (a crash
    /// or kill mid-import left them). Other daemons' images are never touched: theirs may
    /// be imports in progress.
    fn remove_stale_imports(&self, io: &crate::volume::rbd::IoCtx) {
        match io.list_images() {
            Ok(v) => self.remove_stale_in(io, &v),
            Err(e) => {
                tracing::warn!(pool = %io.pool(), error = %e, "cannot list the pool for unfinished imports");
            }
        }
    }

    /// [`Ceph::remove_stale_imports`] over a listing already made (`volume list` passes its
    /// own: an image the cluster still refuses to remove, its crashed opener's watch not yet
    /// timed out, goes on a later listing).
    fn remove_stale_in(&self, io: &crate::volume::rbd::IoCtx, images: &[String]) {
        let mine = format!("{TEMP_PREFIX}{}.", self.instance);
        for image in images.iter().filter(|i| i.starts_with(&mine)) {
            if self
                .building
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(image)
            {
                continue;
            }
            match io.remove_image(image) {
                Ok(()) => {
                    tracing::warn!(pool = %io.pool(), image = %image, "removed an unfinished import")
                }
                // Removed by another sweep of this daemon meanwhile.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => {
                    tracing::warn!(pool = %io.pool(), image = %image, error = %e, "cannot remove an unfinished import (tried again on the next volume list)")
                }
            }
        }
    }

    /// Opens volume `name` for an attach: read-only in the control session, or read-write
    /// locked in a session of its own ([`Ceph::open_locked`]).
    pub fn open_for_attach(
        &self,
        pool: &str,
        name: &str,
        read_only: bool,
        takeover: bool,
    ) -> Result<Opened, DaemonError> {
        if read_only {
            return Ok(Opened {
                store: self.open_read_only(pool, name)?,
                release: None,
                address: None,
                took_over_from: None,
            });
        }
        let l = self.open_locked(pool, name, takeover)?;
        Ok(Opened {
            store: l.store,
            release: Some(l.release),
            address: Some(l.address),
            took_over_from: l.took_over_from,
        })
    }

    /// Forgets the control session after a failure that may be the session's (the next call
    /// connects again).
    fn reset_on<T>(&self, r: Result<T, DaemonError>) -> Result<T, DaemonError> {
        if let Err(DaemonError::Cluster(_)) = &r {
            *self.control.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        r
    }

    /// Names of the cryptvol volumes in the configured pool, sorted.
    pub fn list(&self) -> Result<Vec<String>, DaemonError> {
        let r = (|| {
            let io = self
                .control()?
                .ioctx(&self.pool)
                .map_err(|e| cluster_err(&format!("pool {}", self.pool), e))?;
            let images = io
                .list_images()
                .map_err(|e| cluster_err(&format!("listing pool {}", self.pool), e))?;
            self.remove_stale_in(&io, &images);
            let mut names: Vec<String> = images
                .into_iter()
                .filter_map(|i| i.strip_prefix(IMAGE_PREFIX).map(str::to_owned))
                .filter(|n| super::valid_name(n))
                .collect();
            names.sort();
            Ok(names)
        })();
        self.reset_on(r)
    }

    /// The image opened in the control session: read-only, or (to ask who holds its lock,
    /// which librbd refuses on read-only handles) read-write without writing.
    fn open_control(&self, pool: &str, name: &str, read_only: bool) -> Result<Image, DaemonError> {
        let io = self
            .control()?
            .ioctx(pool)
            .map_err(|e| cluster_err(&format!("pool {pool}"), e))?;
        let image = image_name(name);
        if read_only {
            io.open_read_only(&image)
        } else {
            io.open(&image)
        }
        .map_err(|e| open_err(pool, name, e))
    }

    /// The header and lock holder of volume `name` in `pool`, without a lock.
    pub fn peek(&self, pool: &str, name: &str) -> Result<Peek, DaemonError> {
        let r = (|| {
            let img = self.open_control(pool, name, false)?;
            let holder = img
                .lock_owner()
                .map_err(|e| cluster_err("lock owner", e))?
                .map(|o| shown(&o));
            let store = RbdStore::new(img);
            let header = Volume::read_header_in(&store)
                .map_err(|e| DaemonError::Volume(name.to_owned(), e))?;
            Ok(Peek { header, holder })
        })();
        self.reset_on(r)
    }

    /// The image opened read-only in the control session (a read-only attach: no lock).
    pub fn open_read_only(
        &self,
        pool: &str,
        name: &str,
    ) -> Result<Arc<dyn BlockStore>, DaemonError> {
        let r = self
            .open_control(pool, name, true)
            .map(|i| Arc::new(RbdStore::new(i)) as Arc<dyn BlockStore>);
        self.reset_on(r)
    }

    /// The image opened read-write in a new session holding its exclusive lock. Held by
    /// another client: refused naming it, unless `takeover`, which breaks (and blocklists)
    /// the holder first.
    pub fn open_locked(
        &self,
        pool: &str,
        name: &str,
        takeover: bool,
    ) -> Result<Locked, DaemonError> {
        let cluster = self.connect()?;
        let io = cluster
            .ioctx(pool)
            .map_err(|e| cluster_err(&format!("pool {pool}"), e))?;
        let img = io
            .open(&image_name(name))
            .map_err(|e| open_err(pool, name, e))?;
        let mut took_over_from = None;
        if takeover
            && !img.is_lock_owner().map_err(|e| cluster_err("lock", e))?
            && let Some(owner) = img.lock_owner().map_err(|e| cluster_err("lock owner", e))?
        {
            img.lock_break(&owner)
                .map_err(|e| cluster_err(&format!("breaking the lock of {}", shown(&owner)), e))?;
            tracing::warn!(volume = name, holder = %owner, "lock broken: the holder is fenced (blocklisted)");
            took_over_from = Some(shown(&owner));
        }
        img.lock_exclusive(&self.label).map_err(|e| match e {
            LockError::Held { owner, .. } => DaemonError::Conflict(format!(
                "volume {name:?} is attached read-write by {}; detach it there, or \
                 attach with --takeover to fence that holder",
                shown(&owner)
            )),
            LockError::Io(e) => cluster_err("taking the lock", e),
        })?;
        let address = cluster
            .addrs()
            .map_err(|e| cluster_err("session address", e))?;
        let store = Arc::new(RbdStore::new(img));
        let held = store.clone();
        Ok(Locked {
            store,
            release: Box::new(move || held.image().lock_release()),
            took_over_from,
            address,
        })
    }

    /// Creates the image of a new volume and writes its header (in a session of its own).
    /// On failure the image is removed again.
    pub fn create(&self, pool: &str, name: &str, h: &VolumeHeader) -> Result<(), DaemonError> {
        let cluster = self.connect()?;
        let io = cluster
            .ioctx(pool)
            .map_err(|e| cluster_err(&format!("pool {pool}"), e))?;
        let image = image_name(name);
        let end = h
            .data_offset
            .checked_add(h.size)
            .ok_or_else(|| DaemonError::Invalid("size too large".into()))?;
        io.create_image(&image, end, None).map_err(|e| {
            if e.raw_os_error() == Some(libc::EEXIST) {
                DaemonError::Exists(name.to_owned())
            } else {
                cluster_err(&format!("creating image {pool}/{image}"), e)
            }
        })?;
        let written = io
            .open(&image)
            .map_err(|e| cluster_err(&format!("opening image {pool}/{image}"), e))
            .and_then(|img| {
                let store = RbdStore::new(img);
                Volume::create_with_store(&store, h).map_err(|e| match e {
                    crate::volume::VolumeError::BadHeader(why) => {
                        DaemonError::Invalid(why.to_owned())
                    }
                    e => DaemonError::Volume(name.to_owned(), e),
                })?;
                store
                    .into_image()
                    .close()
                    .map_err(|e| cluster_err("closing", e))
            });
        if let Err(e) = written {
            if let Err(e2) = io.remove_image(&image) {
                tracing::error!(image = %image, error = %e2, "could not remove a half-created image");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Starts an import: a new image under a temporary name (`cryptvol-tmp.NAME.ID`, not
    /// listed as a volume) with the header written, open in a session of its own.
    pub fn create_temp(
        &self,
        pool: &str,
        name: &str,
        h: &VolumeHeader,
    ) -> Result<Building, DaemonError> {
        let temp = format!(
            "{TEMP_PREFIX}{}.{name}.{}",
            self.instance,
            uuid::Uuid::new_v4().simple()
        );
        let cluster = self.connect()?;
        let io = cluster
            .ioctx(pool)
            .map_err(|e| cluster_err(&format!("pool {pool}"), e))?;
        self.remove_stale_imports(&io);
        // Registered before the image exists: a sweep running meanwhile leaves it alone.
        self.building
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(temp.clone());
        let forget = |temp: &str| {
            self.building
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(temp);
        };
        let end = h
            .data_offset
            .checked_add(h.size)
            .ok_or_else(|| DaemonError::Invalid("size too large".into()))?;
        if let Err(e) = io.create_image(&temp, end, None) {
            forget(&temp);
            return Err(cluster_err(&format!("creating image {pool}/{temp}"), e));
        }
        let b = io
            .open(&temp)
            .map_err(|e| cluster_err(&format!("opening image {pool}/{temp}"), e))
            .and_then(|img| {
                let store = RbdStore::new(img);
                Volume::create_with_store(&store, h)
                    .map_err(|e| DaemonError::Volume(name.to_owned(), e))?;
                Ok(Arc::new(store))
            });
        match b {
            Ok(store) => Ok(Building {
                store: Some(store),
                io: Some(io),
                temp,
                live: self.building.clone(),
            }),
            Err(e) => {
                let _ = io.remove_image(&temp);
                forget(&temp);
                Err(e)
            }
        }
    }

    /// Ends an import: the image closed and renamed to `cryptvol.NAME` (never over an
    /// existing one: `Exists`, and the temporary image is removed).
    pub fn finish(&self, mut b: Building, name: &str) -> Result<(), DaemonError> {
        let io = b.io.take().expect("a building image has its ioctx");
        let temp = std::mem::take(&mut b.temp);
        drop(b.store.take());
        drop(b);
        let r = io
            .rename_image(&temp, &image_name(name))
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EEXIST) => DaemonError::Exists(name.to_owned()),
                _ => cluster_err("renaming the imported image", e),
            });
        if r.is_err() {
            let _ = io.remove_image(&temp);
        }
        self.building
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&temp);
        r
    }

    /// Removes volume `name`'s image; refused while another client holds its lock.
    pub fn remove(&self, pool: &str, name: &str) -> Result<(), DaemonError> {
        let r = (|| {
            if let Some(holder) = self.peek(pool, name)?.holder {
                return Err(DaemonError::Conflict(format!(
                    "volume {name:?} is attached read-write by {holder}; detach it there first"
                )));
            }
            let io = self
                .control()?
                .ioctx(pool)
                .map_err(|e| cluster_err(&format!("pool {pool}"), e))?;
            io.remove_image(&image_name(name)).map_err(|e| {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    DaemonError::Conflict(format!(
                        "volume {name:?} is open on another host; detach it there first"
                    ))
                } else {
                    cluster_err("removing the image", e)
                }
            })
        })();
        self.reset_on(r)
    }
}

/// Prefix of the RBD snapshots cryptvol makes: snapshot `SNAP` of a volume is the image's
/// snapshot `cryptvol.SNAP`; other snapshots of the image (a user's) are never touched.
pub const SNAP_PREFIX: &str = "cryptvol.";

/// One cryptvol snapshot of an image.
pub struct RbdSnap {
    /// Without [`SNAP_PREFIX`].
    pub name: String,
    pub id: u64,
    /// Unix seconds.
    pub created: u64,
}

fn snap_err(pool: &str, name: &str, snap: &str, e: std::io::Error) -> DaemonError {
    match e.raw_os_error() {
        Some(libc::ENOENT) => DaemonError::NoVolume(format!("{name}@{snap}")),
        Some(libc::EEXIST) => DaemonError::Exists(format!("{name}@{snap}")),
        _ => cluster_err(
            &format!("snapshot {pool}/{}@{SNAP_PREFIX}{snap}", image_name(name)),
            e,
        ),
    }
}

impl Ceph {
    /// Snapshot `snap` of a volume not attached read-write here: taken in a session of its
    /// own holding the image's lock (refused, naming the holder, while another client holds
    /// it: that host writes, the snapshot is taken there), then the lock is released.
    pub fn snap_create(&self, pool: &str, name: &str, snap: &str) -> Result<(), DaemonError> {
        let l = self.open_locked(pool, name, false)?;
        let r = l
            .store
            .native_snapshot(&format!("{SNAP_PREFIX}{snap}"))
            .map_err(|e| snap_err(pool, name, snap, e));
        if let Err(e) = (l.release)() {
            tracing::warn!(volume = name, error = %e, "releasing the lock after a snapshot failed (released at close)");
        }
        r
    }

    /// The cryptvol snapshots of volume `name`, by name.
    pub fn snap_list(&self, pool: &str, name: &str) -> Result<Vec<RbdSnap>, DaemonError> {
        let r = (|| {
            let img = self.open_control(pool, name, true)?;
            let mut out = Vec::new();
            for s in img
                .snapshots()
                .map_err(|e| cluster_err("listing snapshots", e))?
            {
                let Some(short) = s.name.strip_prefix(SNAP_PREFIX) else {
                    continue;
                };
                if !super::valid_name(short) {
                    continue;
                }
                out.push(RbdSnap {
                    name: short.to_owned(),
                    id: s.id,
                    created: img.snap_timestamp(s.id).unwrap_or(0),
                });
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })();
        self.reset_on(r)
    }

    /// The snapshots of volume `name`'s image that are not cryptvol's (a user's): the image
    /// cannot be removed while they exist, and cryptvol never removes them.
    pub fn foreign_snaps(&self, pool: &str, name: &str) -> Result<Vec<String>, DaemonError> {
        let r = (|| {
            let img = self.open_control(pool, name, true)?;
            let all = img
                .snapshots()
                .map_err(|e| cluster_err("listing snapshots", e))?;
            Ok(all
                .into_iter()
                .filter(|s| {
                    s.name
                        .strip_prefix(SNAP_PREFIX)
                        .is_none_or(|n| !super::valid_name(n))
                })
                .map(|s| s.name)
                .collect())
        })();
        self.reset_on(r)
    }

    /// Removes snapshot `snap` of volume `name` (through the control session; librbd asks
    /// the lock holder, if any, to do it). Refused, naming them, while other hosts read the
    /// snapshot (their [`Presence`](crate::volume::rbd::Presence) answers on its readers
    /// object, see [`readers_object`]); then the readers object goes too.
    pub fn snap_remove(&self, pool: &str, name: &str, snap: &str) -> Result<(), DaemonError> {
        let r = (|| {
            let img = self.open_control(pool, name, false)?;
            let full = format!("{SNAP_PREFIX}{snap}");
            let id = self.refuse_if_read(&img, pool, name, snap)?;
            img.snap_remove(&full)
                .map_err(|e| snap_err(pool, name, snap, e))?;
            if let Err(e) = img.ioctx().remove_object(&readers_object(id)) {
                tracing::warn!(object = %readers_object(id), error = %e, "cannot remove a deleted snapshot's readers object");
            }
            Ok(())
        })();
        self.reset_on(r)
    }

    /// Refused while another host reads snapshot `snap` of volume `name` (whose image is
    /// `img`); else the snapshot's id.
    fn refuse_if_read(
        &self,
        img: &Image,
        pool: &str,
        name: &str,
        snap: &str,
    ) -> Result<u64, DaemonError> {
        let id = snap_id(img, &format!("{SNAP_PREFIX}{snap}"))
            .map_err(|e| snap_err(pool, name, snap, e))?;
        let readers = img
            .ioctx()
            .present(&readers_object(id), self.cfg.op_timeout)
            .map_err(|e| cluster_err(&format!("asking who reads {name}@{snap}"), e))?;
        if readers.is_empty() {
            return Ok(id);
        }
        let shown: Vec<String> = readers.iter().map(|l| clean(l, 128)).collect();
        Err(DaemonError::Conflict(format!(
            "snapshot \"{name}@{snap}\" is being read by {}; detach it there first",
            shown.join(", ")
        )))
    }

    /// Refused while another host reads any of snapshots `snaps` of volume `name`.
    pub fn refuse_if_any_read(
        &self,
        pool: &str,
        name: &str,
        snaps: &[&str],
    ) -> Result<(), DaemonError> {
        let r = (|| {
            let img = self.open_control(pool, name, true)?;
            snaps
                .iter()
                .try_for_each(|s| self.refuse_if_read(&img, pool, name, s).map(drop))
        })();
        self.reset_on(r)
    }

    /// Snapshot `snap` of volume `name` opened read-only in the control session (no lock).
    /// `reader`: announce this host as a reader until the store goes, so that no host
    /// deletes the snapshot under it (attach, export and clone do; a look at the header
    /// does not).
    pub fn open_snapshot(
        &self,
        pool: &str,
        name: &str,
        snap: &str,
        reader: bool,
    ) -> Result<Arc<dyn BlockStore>, DaemonError> {
        let r = (|| {
            let io = self
                .control()?
                .ioctx(pool)
                .map_err(|e| cluster_err(&format!("pool {pool}"), e))?;
            let full = format!("{SNAP_PREFIX}{snap}");
            let img = io
                .open_snapshot(&image_name(name), &full)
                .map_err(|e| snap_err(pool, name, snap, e))?;
            if !reader {
                return Ok(Arc::new(RbdStore::new(img)) as Arc<dyn BlockStore>);
            }
            let id = snap_id(&img, &full).map_err(|e| snap_err(pool, name, snap, e))?;
            let presence = io
                .announce(&readers_object(id), &self.label, self.cfg.op_timeout)
                .map_err(|e| cluster_err(&format!("announcing a reader of {name}@{snap}"), e))?;
            // A delete between the open and the announce removed the snapshot: the open
            // image would read nothing. Checked again with the presence standing.
            snap_id(&img, &full).map_err(|e| snap_err(pool, name, snap, e))?;
            Ok(Arc::new(RbdStore::with_presence(img, presence)) as Arc<dyn BlockStore>)
        })();
        self.reset_on(r)
    }
}

/// The RADOS object whose watchers are the readers of snapshot `id` (Ceph's snapshot ids
/// are unique in a pool and never reused). Not an image name: images are `cryptvol.NAME`.
pub fn readers_object(id: u64) -> String {
    format!("cryptvol-readers.{id}")
}

/// The id of snapshot `full` (Ceph's name) of `img`, `ENOENT` when it is gone.
fn snap_id(img: &Image, full: &str) -> std::io::Result<u64> {
    img.snapshots()?
        .into_iter()
        .find(|s| s.name == full)
        .map(|s| s.id)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT))
}

/// A lock holder as shown to users: its label is image metadata any client of the pool can
/// write, so control characters are replaced and the length is bounded.
fn shown(o: &LockOwner) -> String {
    match &o.label {
        Some(l) => format!("{} ({})", clean(l, 128), clean(&o.address, 128)),
        None => clean(&o.address, 128),
    }
}

/// Text another client wrote, as shown to users: control characters replaced, at most `max`
/// characters.
fn clean(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn open_err(pool: &str, name: &str, e: std::io::Error) -> DaemonError {
    if e.raw_os_error() == Some(libc::ENOENT) {
        DaemonError::NoVolume(name.to_owned())
    } else {
        cluster_err(&format!("opening image {pool}/{}", image_name(name)), e)
    }
}
