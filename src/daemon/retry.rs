//! Re-attaching the volumes that could not be re-attached at start-up because the Ceph
//! cluster was unreachable (SPEC: "cluster unreachable at start: RBD volumes are reported
//! failed with the reason and retried"). One thread, started only when such a volume
//! exists, tries each again every [`RETRY_EVERY`] until it is attached, or fails for a reason
//! a retry cannot fix (held by another host, key refused: it stays failed until an explicit
//! `volume attach`), or is no longer wanted (detached, deleted, or attached by hand).
//!
//! Here too: opening an RBD image for an attach before the daemon's ops lock (the part that
//! waits for the cluster), for this thread and for a user's `volume attach`, so that no
//! other volume operation waits out a connect timeout behind it.

use std::sync::Arc;
use std::time::Duration;

use super::{Caller, Daemon, DaemonError, Loc};

/// Pause between two rounds of attempts (each attempt waits at most the connect timeout).
pub const RETRY_EVERY: Duration = Duration::from_secs(5);

impl Daemon {
    /// Starts the retry thread for `names` (name, read-only), those [`Daemon::restore`]
    /// could not attach because of a cluster error.
    pub fn start_retry(self: &Arc<Self>, names: Vec<(String, bool)>) {
        if names.is_empty() {
            return;
        }
        let d = Arc::downgrade(self);
        let r = std::thread::Builder::new()
            .name("cryptvol-retry".into())
            .spawn(move || {
                let mut left = names;
                while !left.is_empty() {
                    std::thread::sleep(RETRY_EVERY);
                    let Some(d) = d.upgrade() else { break };
                    left.retain(|(name, read_only)| d.retry_one(name, *read_only));
                }
            });
        if let Err(e) = r {
            tracing::error!(error = %e, "cannot start the re-attach thread");
        }
    }

    /// For an attach: RBD volume NAME's image opened (and, read-write, locked) without the ops
    /// lock, with its pool; `None` when it is not an RBD volume, is attached or being
    /// imported, or the open failed: the attach then opens under the lock as it always did,
    /// deciding with the state as it is then (a conflict with a concurrent attach here, a
    /// cluster error the gate now answers at once).
    pub(super) fn open_before_lock(
        &self,
        name: &str,
        read_only: bool,
    ) -> Option<(String, super::ceph::Opened)> {
        if name.contains('@') || self.exports.get(name).is_some() || self.is_importing(name) {
            return None;
        }
        let Ok(Loc::Rbd(pool)) = self.locate(name) else {
            return None;
        };
        let o = self
            .ceph()
            .and_then(|c| c.open_for_attach(&pool, name, read_only, false))
            .ok()?;
        Some((pool, o))
    }

    /// Under the ops lock: the image opened before it, if NAME still lives in that pool
    /// (else it is closed again).
    pub(super) fn still_placed(
        &self,
        name: &str,
        pre: Option<(String, super::ceph::Opened)>,
    ) -> Option<super::ceph::Opened> {
        let (pool, o) = pre?;
        matches!(self.locate(name), Ok(Loc::Rbd(p)) if p == pool).then_some(o)
    }

    /// Still to be re-attached by this thread: failed at start-up (and not since attached,
    /// detached or deleted: each clears `failed`), still wanted as `read_only`, not attached.
    fn retry_wanted(&self, name: &str, read_only: bool) -> bool {
        let still_failed = self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(name);
        let wanted = self
            .attach_state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries()
            .iter()
            .any(|(n, ro)| n == name && *ro == read_only);
        still_failed && wanted && self.exports.get(name).is_none()
    }

    /// One attempt; whether to try again later. The part that waits for the cluster
    /// (connect, open, lock: up to the connect timeout while it is down) runs without the
    /// ops lock, so every other volume operation goes on meanwhile; the lock is taken only
    /// to install the result, after checking again that it is still wanted: a volume
    /// detached, deleted, attached by hand (and maybe taken over and fenced since) is not
    /// brought back, and the image opened for it is closed again (its lock released).
    fn retry_one(&self, name: &str, read_only: bool) -> bool {
        if !self.retry_wanted(name, read_only) {
            return false;
        }
        let r = if name.contains('@') {
            // An RBD volume's snapshot (`rbd_snapshots.rs`): the cluster reached first, the
            // read-only open (no lock) under the ops lock.
            let (Some(pool), Some((vol, _))) = (self.rbd_pool_of(name), name.split_once('@'))
            else {
                return false;
            };
            tracing::info!(volume = name, "re-attach: trying the cluster again");
            if let Err(e @ DaemonError::Cluster(_)) =
                self.ceph().and_then(|c| c.snap_list(&pool, vol))
            {
                tracing::warn!(volume = name, error = %e, retry = true, "re-attach failed");
                return true;
            }
            let _g = self.lock_ops();
            if !self.retry_wanted(name, read_only) {
                return false;
            }
            let r = self.attach_snapshot_locked(&Caller::DAEMON, name, read_only);
            if r.is_ok() {
                self.failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(name);
            }
            r
        } else {
            let pool = match self.locate(name) {
                Ok(Loc::Rbd(pool)) => pool,
                // Not an RBD volume (any more): nothing the cluster's return fixes.
                _ => return false,
            };
            tracing::info!(volume = name, "re-attach: trying the cluster again");
            let opened = self
                .ceph()
                .and_then(|c| c.open_for_attach(&pool, name, read_only, false));
            let g = self.lock_ops();
            let still = self.retry_wanted(name, read_only)
                && matches!(self.locate(name), Ok(Loc::Rbd(p)) if p == pool);
            if !still {
                drop(g);
                drop(opened); // closed outside the lock
                tracing::info!(volume = name, "re-attach dropped: no longer wanted");
                return false;
            }
            opened
                .and_then(|o| self.attach_opened(&Caller::DAEMON, name, read_only, false, Some(o)))
        };
        match r {
            Ok(()) => {
                tracing::info!(volume = name, "re-attached: the cluster is back");
                false
            }
            Err(e) => {
                let again = matches!(e, DaemonError::Cluster(_));
                tracing::warn!(volume = name, error = %e, retry = again, "re-attach failed");
                self.failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(name.to_owned(), e.to_string());
                again
            }
        }
    }
}
