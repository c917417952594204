//! Shared key records in RADOS (`[kms] store = "rados"`): the [`RecordStore`] the daemon
//! injects into the key manager, so every host with the same root key (or token) sees the
//! same CMKs. The key logic stays in `kms`; this is only where the bytes live.
//!
//! - **One object**, [`RECORDS_OBJECT`] in the `[ceph]` pool, holding the whole record set
//!   (kilobytes). A change is one OSD write op: `assert_version(read version)` +
//!   `write_full`, or exclusive `create` for the first record set, so two hosts' changes
//!   never overwrite each other: the loser gets `ERANGE`/`EOVERFLOW`, reloads and re-applies
//!   (`kms/store.rs`). One object rather than one per key: every change (create, rotate,
//!   sweep) is then one atomic compare-and-swap, and `list` one read.
//! - **A session of its own**, connected on first use and again after a failure, never
//!   holding an image lock, so a takeover's blocklisting of an attachment's session cannot
//!   cut the KMS off. Its ioctx is used under a mutex (`rados_get_last_version` is per ioctx).
//! - **Bounded**: every call is bounded by `[ceph] op_timeout_secs` (connect: at most 10 s);
//!   a lost cluster makes KMS calls fail with `KMS.0504`, never hang, and the next call tries
//!   again.

use std::sync::Arc;

use crate::config::CephConfig;
use crate::kms::RecordStore;

/// The object holding the record set.
pub const RECORDS_OBJECT: &str = "cryptvol.kms.records";

#[cfg(feature = "rbd")]
pub use imp::RadosRecords;

/// The records store for `[ceph]`.
pub fn records(c: &CephConfig) -> Result<Arc<dyn RecordStore>, String> {
    #[cfg(feature = "rbd")]
    {
        Ok(Arc::new(RadosRecords::new(c)))
    }
    #[cfg(not(feature = "rbd"))]
    {
        let _ = c;
        Err(
            "[kms] store = \"rados\": cryptvol was built without Ceph support (feature \"rbd\")"
                .into(),
        )
    }
}

#[cfg(feature = "rbd")]
mod imp {
    use std::sync::Mutex;

    use super::*;
    use crate::kms::{Conflict, KmsError, Loaded};
    use crate::volume::rbd::{Cluster, ClusterConfig, IoCtx};

    pub struct RadosRecords {
        cfg: ClusterConfig,
        pool: String,
        io: Mutex<Session>,
    }

    /// The connected ioctx, or when and why connecting last failed.
    #[derive(Default)]
    struct Session {
        io: Option<IoCtx>,
        failed: Option<(std::time::Instant, String)>,
    }

    /// After a failed connect, calls fail at once for this long instead of each waiting out
    /// the connect timeout again (a start-up re-attaching many volumes with the cluster down
    /// would otherwise wait that long per volume).
    const RECONNECT_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

    impl RadosRecords {
        /// Nothing is connected yet (a cluster down at start does not stop the daemon).
        pub fn new(c: &CephConfig) -> RadosRecords {
            let mut cfg = ClusterConfig::new(&c.conf, c.client.clone());
            cfg.keyring = c.keyring.clone();
            cfg.op_timeout = c.op_timeout;
            cfg.mount_timeout = c.op_timeout.min(std::time::Duration::from_secs(10));
            RadosRecords {
                cfg,
                pool: c.pool.clone(),
                io: Mutex::new(Session::default()),
            }
        }

        fn err(&self, what: &str, e: std::io::Error) -> KmsError {
            KmsError::Records(format!("{} ({what}): {e}", self.describe()))
        }

        /// Runs `f` on the session's ioctx (connecting if there is none); a failure drops
        /// the session so the next call connects again.
        fn with_io<T>(
            &self,
            what: &str,
            f: impl FnOnce(&IoCtx) -> std::io::Result<T>,
        ) -> Result<T, KmsError> {
            let mut g = self.io.lock().unwrap_or_else(|e| e.into_inner());
            if g.io.is_none() {
                if let Some((at, why)) = &g.failed
                    && at.elapsed() < RECONNECT_AFTER
                {
                    return Err(KmsError::Records(format!(
                        "{} (connecting, {} s ago): {why}; retried after {} s",
                        self.describe(),
                        at.elapsed().as_secs(),
                        RECONNECT_AFTER.as_secs()
                    )));
                }
                match Cluster::connect(&self.cfg).and_then(|c| c.ioctx(&self.pool)) {
                    Ok(io) => {
                        tracing::info!(records = %self.describe(), "key records: connected");
                        *g = Session {
                            io: Some(io),
                            failed: None,
                        };
                    }
                    Err(e) => {
                        g.failed = Some((std::time::Instant::now(), e.to_string()));
                        return Err(self.err("connecting", e));
                    }
                }
            }
            let io =
                g.io.as_ref()
                    .ok_or_else(|| KmsError::Internal("no ioctx".into()))?;
            f(io).map_err(|e| {
                g.io = None;
                self.err(what, e)
            })
        }
    }

    impl RecordStore for RadosRecords {
        fn describe(&self) -> String {
            format!("rados:{}/{RECORDS_OBJECT}", self.pool)
        }

        fn shared(&self) -> bool {
            true
        }

        fn load(&self) -> Result<Option<Loaded>, KmsError> {
            self.with_io("reading", |io| io.read_object(RECORDS_OBJECT))
                .map(|o| {
                    o.map(|o| Loaded {
                        bytes: o.bytes,
                        version: o.version,
                    })
                })
        }

        fn write(
            &self,
            bytes: &[u8],
            expected: Option<u64>,
        ) -> Result<Result<u64, Conflict>, KmsError> {
            self.with_io("writing", |io| {
                io.write_object_if(RECORDS_OBJECT, bytes, expected)
            })
            .map(|r| r.map_err(|_| Conflict))
        }
    }
}
