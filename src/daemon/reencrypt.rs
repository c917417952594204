//! Online re-encryption jobs (`volume reencrypt`): one worker thread per volume drives the
//! engine in `volume::reencrypt` step by step, under the daemon's ops lock for each step (so
//! attach/detach/delete see a consistent header between steps), with a token-bucket rate
//! limit, pause/resume, and resumption at daemon start (the header says a re-encryption is in
//! progress; a paused one stays paused). The worker uses the attached volume when it is
//! attached read-write, else opens the volume itself; attached read-only, it waits.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Daemon, DaemonError, Loc, VolumeInfo, volume_context};
use crate::kms::Caller;
use crate::kms::audit::Subject;
use crate::volume::header::REENC_PAUSED;
use crate::volume::reencrypt::{self as engine, Step};
use crate::volume::{FileStore, Volume, VolumeError, VolumeHeader, XtsKey};

/// What `inspect`/`list` show while a re-encryption runs (and "done" once it finished, until
/// the daemon restarts).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReencInfo {
    /// "running", "paused" or "done".
    pub state: String,
    pub percent: u64,
    /// Bytes of the data area under the new key.
    pub boundary: u64,
    /// The last error of the worker (it retries), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `volume reencrypt` asks for.
#[derive(Debug, Default, Clone)]
pub struct ReencRequest {
    pub key: Option<String>,
    pub max_rate: Option<u64>,
    pub pause: bool,
    pub resume: bool,
}

/// Control block shared by the API and a worker.
#[derive(Default)]
struct Ctl {
    stop: AtomicBool,
    paused: AtomicBool,
    rate: AtomicU64,
    done: AtomicBool,
    error: Mutex<Option<String>>,
}

/// A job: its control block and its worker thread (if one was started).
type Job = (Arc<Ctl>, Option<std::thread::JoinHandle<()>>);

/// The jobs, by volume name.
#[derive(Default)]
pub struct Jobs {
    map: Mutex<BTreeMap<String, Job>>,
}

impl Jobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Job>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The volume a step runs on.
enum Target {
    Attached(Arc<super::exports::VolumeBackend>),
    Own(Box<Volume>),
}

impl Target {
    fn vol(&self) -> &Volume {
        match self {
            Target::Attached(b) => &b.0,
            Target::Own(v) => v,
        }
    }
}

fn conflict(s: &str) -> DaemonError {
    DaemonError::Conflict(s.to_owned())
}

/// The progress shown for header `h` of NAME.
pub(super) fn info(d: &Daemon, name: &str, h: &VolumeHeader) -> Option<ReencInfo> {
    let jobs = d.reenc.lock();
    let ctl = jobs.get(name).map(|(c, _)| c.clone());
    drop(jobs);
    let error = ctl
        .as_ref()
        .and_then(|c| c.error.lock().unwrap_or_else(|e| e.into_inner()).clone());
    match &h.reencrypt {
        Some(r) => Some(ReencInfo {
            // The worker's control block is ahead of the header (it records a change at its
            // next step).
            state: if ctl.as_ref().map_or(r.state & REENC_PAUSED != 0, |c| {
                c.paused.load(Ordering::SeqCst)
            }) {
                "paused".into()
            } else {
                "running".into()
            },
            percent: (u128::from(r.boundary) * 100 / u128::from(h.size.max(1))) as u64,
            boundary: r.boundary,
            error,
        }),
        None if ctl.is_some_and(|c| c.done.load(Ordering::SeqCst)) => Some(ReencInfo {
            state: "done".into(),
            percent: 100,
            boundary: h.size,
            error: None,
        }),
        None => None,
    }
}

/// A header mid re-encryption names its new key truthfully (the blob's own header is
/// authenticated at unwrap).
pub(super) fn check_new_key(name: &str, h: &VolumeHeader) -> Result<(), DaemonError> {
    if let Some(r) = &h.reencrypt {
        let w = crate::kms::wrap::parse(&r.new_wrapped_dek)?;
        if w.key_id.to_string() != r.new_key_id || w.key_version != r.new_key_version {
            return Err(DaemonError::Untrusted(format!(
                "volume {name:?}: the header's re-encryption names key {} version {}, but its new data key is wrapped under key {} version {}",
                r.new_key_id, r.new_key_version, w.key_id, w.key_version
            )));
        }
    }
    Ok(())
}

impl Daemon {
    /// Unwraps the DEK(s) of header `h`: the current one, and during a re-encryption the new
    /// one.
    pub(super) fn volume_keys(
        &self,
        c: &Caller,
        name: &str,
        h: &VolumeHeader,
    ) -> Result<(XtsKey, Option<XtsKey>), DaemonError> {
        let ctx = volume_context(h.volume_id);
        let unwrap = |w: &[u8]| -> Result<XtsKey, DaemonError> {
            let (_, _, dek) = self.kms.decrypt_datakey(c, w, &ctx)?;
            XtsKey::new(dek.expose()).map_err(Self::vol_err(name))
        };
        let old = unwrap(&h.wrapped_dek)?;
        let new = match &h.reencrypt {
            Some(r) => Some(unwrap(&r.new_wrapped_dek)?),
            None => None,
        };
        Ok((old, new))
    }

    /// Opens a file volume with its key(s), first replaying a segment a crash left journaled.
    /// Returns the volume and the header it opened with.
    pub(super) fn open_file_volume(
        &self,
        c: &Caller,
        name: &str,
        loc: &Loc,
        path: &std::path::Path,
        read_only: bool,
    ) -> Result<(Volume, VolumeHeader), DaemonError> {
        let (mut h, _) = self.trusted_header(name, loc)?;
        let (mut old, mut new) = self.volume_keys(c, name, &h)?;
        if h.reencrypt.as_ref().is_some_and(|r| r.journal_len > 0) {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)?;
            let n = new.as_ref().ok_or_else(|| conflict("no new key"))?;
            engine::recover(&FileStore::new(f), &old, n).map_err(Self::vol_err(name))?;
            tracing::info!(
                volume = name,
                "re-encryption: replayed the journaled segment"
            );
            h = self.trusted_header(name, loc)?.0;
            (old, new) = self.volume_keys(c, name, &h)?;
        }
        let mode = self.cache_of(h.volume_id)?;
        let vol = Volume::open_file(path, old, new, read_only, mode)
            .map_err(|e| super::cache::direct_err(name, e))?
            .map_err(Self::vol_err(name))?;
        Ok((vol, h))
    }

    /// `volume reencrypt`: starts a re-encryption to a fresh DEK (under `key` or the volume's
    /// CMK), or changes one in progress (rate, pause, resume). Idempotent while one runs.
    pub fn reencrypt(
        self: &Arc<Self>,
        c: &Caller,
        name: &str,
        req: &ReencRequest,
    ) -> Result<VolumeInfo, DaemonError> {
        if req.pause && req.resume {
            return Err(DaemonError::Invalid(
                "--pause and --resume exclude each other".into(),
            ));
        }
        let g = self.lock_ops();
        let loc = self.locate(name)?;
        let (h, _) = self.trusted_header(name, &loc)?;
        let attached = self.exports.get(name);
        if h.reencrypt.is_some() {
            if req.key.is_some() {
                return Err(conflict(
                    "a re-encryption is in progress; --key applies to a new one",
                ));
            }
            let ctl = self.reenc_ctl(name);
            if req.pause {
                ctl.paused.store(true, Ordering::SeqCst);
            } else if req.resume {
                ctl.paused.store(false, Ordering::SeqCst);
            }
            if let Some(rate) = req.max_rate {
                ctl.rate.store(rate, Ordering::SeqCst);
            }
            self.reenc_spawn(name);
            drop(g);
            return self.info_locked(name);
        }
        if req.pause || req.resume {
            return Err(conflict("no re-encryption in progress"));
        }
        let path = match &loc {
            Loc::File(p) => p.clone(),
            Loc::Rbd(_) if attached.as_ref().is_some_and(|a| !a.read_only) => Default::default(),
            Loc::Rbd(_) => {
                return Err(DaemonError::Invalid(
                    "an RBD volume is re-encrypted while attached read-write".into(),
                ));
            }
        };
        if attached.as_ref().is_some_and(|a| a.read_only) {
            return Err(conflict(
                "the volume is attached read-only; attach it read-write (or detach it) to re-encrypt",
            ));
        }
        if let Some(snap) = self.snaps.copying(name) {
            // The copier takes the old ciphertext as it is on disk: it must not change keys
            // under it.
            return Err(conflict(&format!(
                "snapshot {snap:?} is still being copied; re-encrypt when it is complete"
            )));
        }
        let key = match &req.key {
            Some(k) => self.kms.describe_key(c, k)?.key_id,
            None => h.key_id.clone(),
        };
        let ctx = volume_context(h.volume_id);
        let (plain, wrapped) = self.kms.create_datakey(c, &key, 512, &ctx)?;
        let wh = crate::kms::wrap::parse(&wrapped)?;
        let new_key = XtsKey::new(plain.expose()).map_err(Self::vol_err(name))?;
        drop(plain);
        let rate = req.max_rate.unwrap_or(0);
        let begin = |v: &Volume| {
            v.begin_reencrypt(
                &new_key,
                &wh.key_id.to_string(),
                wh.key_version,
                wrapped.clone(),
                rate,
            )
            .map_err(|e| match e {
                VolumeError::Invalid(why) => conflict(why),
                e => Self::vol_err(name)(e),
            })
        };
        let nh = match &attached {
            Some(a) => begin(&a.backend.0)?,
            None => {
                let (v, _) = self.open_file_volume(c, name, &loc, &path, false)?;
                begin(&v)?
            }
        };
        drop(new_key);
        self.register(name, &nh, loc.pool())?;
        let ctl = self.reenc_ctl(name);
        ctl.paused.store(false, Ordering::SeqCst);
        ctl.done.store(false, Ordering::SeqCst);
        ctl.rate.store(rate, Ordering::SeqCst);
        tracing::info!(volume = name, key_id = %wh.key_id, "re-encryption started");
        self.reenc_spawn(name);
        drop(g);
        self.info_locked(name)
    }

    fn reenc_ctl(&self, name: &str) -> Arc<Ctl> {
        let mut jobs = self.reenc.lock();
        let e = jobs
            .entry(name.to_owned())
            .or_insert_with(|| (Arc::new(Ctl::default()), None));
        e.0.clone()
    }

    /// Starts NAME's worker unless it runs.
    fn reenc_spawn(self: &Arc<Self>, name: &str) {
        let mut jobs = self.reenc.lock();
        let e = jobs
            .entry(name.to_owned())
            .or_insert_with(|| (Arc::new(Ctl::default()), None));
        if e.1.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let ctl = e.0.clone();
        ctl.stop.store(false, Ordering::SeqCst);
        let d = Arc::downgrade(self);
        let n = name.to_owned();
        match std::thread::Builder::new()
            .name(format!("cryptvol-reenc-{name}"))
            .spawn(move || worker(d, &n, &ctl))
        {
            Ok(t) => e.1 = Some(t),
            Err(err) => {
                tracing::error!(volume = name, error = %err, "cannot start the re-encryption thread")
            }
        }
    }

    /// Stops NAME's worker (between steps) and waits for it; before a delete.
    pub(super) fn reenc_stop(&self, name: &str) {
        let t = {
            let mut jobs = self.reenc.lock();
            match jobs.remove(name) {
                Some((ctl, t)) => {
                    ctl.stop.store(true, Ordering::SeqCst);
                    t
                }
                None => None,
            }
        };
        if let Some(t) = t {
            let _ = t.join();
        }
    }

    /// At start: a worker for every volume whose header says a re-encryption is in progress.
    pub fn resume_reencryptions(self: &Arc<Self>) {
        let Ok(names) = self.volume_names() else {
            return;
        };
        for name in names {
            let Ok(loc) = self.locate(&name) else {
                continue;
            };
            let Ok((h, _)) = self.trusted_header(&name, &loc) else {
                continue;
            };
            if let Some(r) = &h.reencrypt {
                let ctl = self.reenc_ctl(&name);
                ctl.paused
                    .store(r.state & REENC_PAUSED != 0, Ordering::SeqCst);
                ctl.rate.store(r.max_rate, Ordering::SeqCst);
                tracing::info!(volume = %name, boundary = r.boundary, paused = r.state & REENC_PAUSED != 0, "resuming the re-encryption");
                self.reenc_spawn(&name);
            }
        }
    }

    /// The target of one step, under the ops lock: the attached volume (read-write), or the
    /// worker's own open volume (detached). `None`: attached read-only, wait.
    fn reenc_target(
        &self,
        name: &str,
        own: &mut Option<Box<Volume>>,
    ) -> Result<Option<Target>, DaemonError> {
        match self.exports.get(name) {
            Some(a) if a.read_only => {
                *own = None;
                Ok(None)
            }
            Some(a) => {
                *own = None;
                Ok(Some(Target::Attached(a.backend.clone())))
            }
            None => {
                let v = match own.take() {
                    Some(v) => v,
                    None => {
                        let loc = self.locate(name)?;
                        let Loc::File(path) = &loc else {
                            return Ok(None);
                        };
                        Box::new(
                            self.open_file_volume(&Caller::DAEMON, name, &loc, path, false)?
                                .0,
                        )
                    }
                };
                Ok(Some(Target::Own(v)))
            }
        }
    }
}

/// The worker: steps until done, stopped, or the daemon is gone.
fn worker(d: Weak<Daemon>, name: &str, ctl: &Ctl) {
    let mut own: Option<Box<Volume>> = None;
    let mut next = Instant::now();
    let set_err = |e: Option<String>| *ctl.error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    loop {
        if ctl.stop.load(Ordering::SeqCst) {
            return;
        }
        let Some(d) = d.upgrade() else { return };
        let g = d.lock_ops();
        let r = (|| -> Result<Option<u64>, DaemonError> {
            let Some(t) = d.reenc_target(name, &mut own)? else {
                return Ok(Some(u64::MAX)); // wait
            };
            let v = t.vol();
            let mut h = v.current_header().map_err(Daemon::vol_err(name))?;
            let Some(r) = h.reencrypt.clone() else {
                ctl.done.store(true, Ordering::SeqCst);
                return Ok(None);
            };
            let paused = ctl.paused.load(Ordering::SeqCst);
            let rate = ctl.rate.load(Ordering::SeqCst);
            if paused != (r.state & REENC_PAUSED != 0) || rate != r.max_rate {
                v.set_reencrypt_state(&mut h, paused, rate)
                    .map_err(Daemon::vol_err(name))?;
            }
            if paused {
                if let Target::Own(v) = t {
                    own = Some(v);
                }
                return Ok(Some(u64::MAX));
            }
            let step = v.reencrypt_step(&mut h).map_err(Daemon::vol_err(name))?;
            let n = match step {
                Step::Done => {
                    // "done" before the header drops its re-encryption: a reader between the
                    // two sees "running" (the header still has it) or "done", never nothing
                    // (which `reencrypt --wait` would take for the end, without a state).
                    ctl.done.store(true, Ordering::SeqCst);
                    if let Err(e) = v.finish_reencrypt(&mut h) {
                        ctl.done.store(false, Ordering::SeqCst);
                        return Err(Daemon::vol_err(name)(e));
                    }
                    let loc = d.locate(name)?;
                    d.register(name, &h, loc.pool())?;
                    let s = Subject {
                        volume: Some(name),
                        key_id: Some(&h.key_id),
                        ..Subject::default()
                    };
                    if let Err(e) =
                        d.kms
                            .audit_event(&Caller::DAEMON, "reencryptVolumeDone", s, "ok")
                    {
                        tracing::error!(volume = name, error = %e, "audit log append failed");
                    }
                    tracing::info!(volume = name, key_id = %h.key_id, "re-encryption done; the old data key is gone from the header");
                    ctl.done.store(true, Ordering::SeqCst);
                    return Ok(None);
                }
                Step::Skipped(_) => 0,
                Step::Rewrote(n) => n,
            };
            if let Target::Own(v) = t {
                own = Some(v);
            }
            Ok(Some(n))
        })();
        drop(g);
        drop(d);
        match r {
            Ok(None) => {
                // Done: the own volume (and its keys) are dropped, zeroized.
                set_err(None);
                return;
            }
            Ok(Some(u64::MAX)) => std::thread::sleep(Duration::from_millis(100)),
            Ok(Some(n)) => {
                set_err(None);
                let rate = ctl.rate.load(Ordering::SeqCst);
                if rate > 0 && n > 0 {
                    // Token bucket with one segment of burst.
                    let now = Instant::now();
                    let floor = now.checked_sub(Duration::from_secs_f64(
                        engine::SEGMENT as f64 / rate as f64,
                    ));
                    if let Some(f) = floor
                        && next < f
                    {
                        next = f;
                    }
                    next += Duration::from_secs_f64(n as f64 / rate as f64);
                    // In slices, so that stop, pause and a new rate apply promptly.
                    while Instant::now() < next
                        && !ctl.stop.load(Ordering::SeqCst)
                        && !ctl.paused.load(Ordering::SeqCst)
                        && ctl.rate.load(Ordering::SeqCst) == rate
                    {
                        std::thread::sleep((next - Instant::now()).min(Duration::from_millis(50)));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(volume = name, error = %e, "re-encryption step failed; retrying");
                set_err(Some(e.to_string()));
                own = None;
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}
