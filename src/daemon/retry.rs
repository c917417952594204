//! Re-attaching the volumes that could not be re-attached at start-up because the Ceph
//! cluster was unreachable (SPEC: "cluster unreachable at start: RBD volumes are reported
//! failed with the reason and retried"). One thread, started only when such a volume
//! exists, tries each again every [`RETRY_EVERY`] until it is attached, or fails for a reason
//! a retry cannot fix (held by another host, key refused: it stays failed until an explicit
//! `volume attach`), or is no longer wanted (detached, deleted, or attached by hand).

use std::sync::Arc;
use std::time::Duration;

use super::{Caller, Daemon, DaemonError};

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

    /// One attempt; whether to try again later.
    fn retry_one(&self, name: &str, read_only: bool) -> bool {
        let _g = self.lock_ops();
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
        if !still_failed || !wanted || self.exports.get(name).is_some() {
            return false;
        }
        match self.attach_locked(&Caller::DAEMON, name, read_only, false) {
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
