//! Lifecycle: config -> lock the state dir -> key store -> restore attachments -> listeners ->
//! READY=1; SIGTERM/SIGINT -> stop accepting, finish in-flight requests, flush, zeroize, exit.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;

use super::access::ClientPolicy;
use super::{Daemon, DaemonError};
use crate::api::{self, Access};
use crate::config::{Config, RootKeySource};
use crate::kms::{Caller, Kms, KmsConfig, RootKey};
use crate::server::{self, Listener, ServerConfig};

/// `cryptvol init`: the state dir (0700) and a random root key (0600); refuses to overwrite.
pub fn init_state_dir(dir: &Path) -> Result<PathBuf, DaemonError> {
    let key = dir.join("root.key");
    if key.exists() {
        return Err(DaemonError::Conflict(format!(
            "{} already exists; refusing to overwrite it",
            key.display()
        )));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    RootKey::generate_file(&key)?;
    Ok(key)
}

/// Says where the key store's sealing key lives and logs the audit chain's head (a copy of
/// both outside the state dir, in the journal).
fn log_kms_start(kms: &Kms, cfg: &Config) {
    let (sealing, generation) = kms.sealing();
    if cfg.kms_store == crate::config::KmsStore::Rados {
        tracing::info!(records = %sealing.display(), "key store: shared key records in RADOS (loaded at each call)");
        return;
    }
    tracing::info!(sealing_file = %sealing.display(), generation, "key store open");
    let root_outside = match &cfg.root_key {
        RootKeySource::File(p) => !p.starts_with(&cfg.state_dir),
        RootKeySource::Credential(_) => true,
    };
    if root_outside && sealing.starts_with(&cfg.state_dir) {
        tracing::warn!(
            sealing_file = %sealing.display(),
            "the sealing file is in the state dir: restoring the state dir from a backup can \
             bring destroyed keys back; set [kms] sealing_key_file outside it"
        );
    }
    kms.log_audit_head("start");
}

/// systemd's notify protocol: a datagram to $NOTIFY_SOCKET (a few lines; no crate needed).
fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let bytes = path.as_encoded_bytes();
    let r = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
    } else {
        sock.send_to(msg.as_bytes(), Path::new(&path))
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

fn bind_unix(path: &Path, mode: u32) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // A stale socket from a previous run (we hold the state-dir lock, so it is not live).
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(l)
}

fn tls_config(cfg: &Config) -> anyhow_free::Result<Option<Arc<rustls::ServerConfig>>> {
    anyhow_free::tls(cfg)
}

/// A running daemon (serve and demo).
pub struct Running {
    pub daemon: Arc<Daemon>,
    shutdown: watch::Sender<bool>,
    nbd: tokio::task::JoinHandle<std::io::Result<()>>,
    api: tokio::task::JoinHandle<()>,
    _lock: std::fs::File,
}

/// Takes the state dir's lock (held while the returned file is open): one daemon per state
/// dir, and no offline command (`key migrate-records`) beside a running one.
pub(super) fn lock_state_dir(dir: &Path) -> Result<std::fs::File, String> {
    let lock_path = dir.join("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("{}: {e}", lock_path.display()))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "state dir {} is in use by another cryptvol daemon",
            dir.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(format!("{}: {e}", lock_path.display())),
    }
}

impl Running {
    /// Opens the state and starts listening (READY=1 after this).
    pub async fn start(cfg: &Config) -> Result<Running, String> {
        let lock = lock_state_dir(&cfg.state_dir)?;
        let root = match &cfg.root_key {
            RootKeySource::File(p) => RootKey::load_file(p),
            RootKeySource::Credential(n) => RootKey::load_credential(n),
        }
        .map_err(|e| e.to_string())?;
        let hsm = open_custody(cfg)?;
        let kcfg = KmsConfig {
            min_pending_days: cfg.min_pending_days,
            max_pending_days: cfg.max_pending_days,
            sealing_key_file: cfg.sealing_key_file.clone(),
            host: cfg.host_id.clone(),
        };
        let kms_dir = cfg.state_dir.join("kms");
        let kms = match (&cfg.kms_store, &cfg.ceph) {
            (crate::config::KmsStore::Rados, Some(c)) => {
                super::migrate::refuse_unmigrated(cfg, &kms_dir)?;
                let records = super::ceph_kms::records(c)?;
                Kms::open_shared(&kms_dir, root, kcfg, hsm, records)
            }
            _ => Kms::open_with_custody(&kms_dir, root, kcfg, hsm),
        }
        .map_err(|e| format!("key store: {e}"))?;
        log_kms_start(&kms, cfg);
        let policy = ClientPolicy::new(
            cfg.tls
                .as_ref()
                .map(|t| t.allowed_clients.clone())
                .unwrap_or_default(),
        )
        .admit_anonymous(cfg.insecure_plaintext);
        let daemon = Arc::new(
            Daemon::with_stores(
                &cfg.state_dir,
                kms,
                cfg.max_connections_per_export,
                policy,
                cfg.ceph.as_ref(),
                cfg.default_store,
            )
            .map_err(|e| e.to_string())?,
        );
        daemon.start_fence_worker();
        let d = daemon.clone();
        tokio::task::spawn_blocking(move || {
            let retry = d.restore();
            d.resume_reencryptions();
            d.start_retry(retry);
            // A name that matches no volume is likely a typo that leaves the intended volume
            // open to every client: say so (the volume may also simply be created later).
            let names: Vec<String> = d
                .list_volumes()
                .map(|v| v.into_iter().map(|v| v.name).collect())
                .unwrap_or_default();
            for r in d.exports.policy().restricted() {
                if !names.iter().any(|n| n == r) {
                    tracing::warn!(
                        volume = r,
                        "tls.allowed_clients names a volume that does not exist (yet)"
                    );
                }
            }
        })
        .await
        .map_err(|e| e.to_string())?;

        let (shutdown, rx) = watch::channel(false);
        let mut listeners = vec![Listener::Unix(
            bind_unix(&cfg.nbd_unix_socket, 0o660)
                .map_err(|e| format!("{}: {e}", cfg.nbd_unix_socket.display()))?,
        )];
        if let Some(addr) = cfg.nbd_tcp {
            // Config::parse refuses this unless nbd.insecure_plaintext opts in.
            if cfg.tls.as_ref().is_none_or(|t| t.client_ca.is_none()) {
                let wire = if cfg.tls.is_none() {
                    "; disk data crosses the wire in plaintext"
                } else {
                    ""
                };
                tracing::warn!(
                    %addr,
                    "nbd.insecure_plaintext = true: NBD over TCP without client certificates: \
                     any peer that reaches {addr} (any local user on loopback) can read and \
                     write every attached volume{wire}"
                );
            }
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("nbd.tcp {addr}: {e}"))?;
            listeners.push(Listener::Tcp(l));
        }
        let scfg = ServerConfig {
            max_connections: cfg.max_connections,
            handshake_timeout: cfg.handshake_timeout,
            max_handshakes: cfg.max_handshakes,
            max_in_flight: cfg.max_in_flight,
            max_buffer_bytes: cfg.max_buffer_bytes,
            idle_timeout: cfg.idle_timeout,
            tls: tls_config(cfg).map_err(|e| format!("{}: tls: {e}", cfg.path.display()))?,
            require_tls_on_tcp: true,
            threaded_transmission: true,
        };
        let registry: Arc<dyn crate::server::ExportRegistry> = daemon.exports.clone();
        let nbd = tokio::spawn(server::serve(listeners, registry, scfg, rx.clone()));

        let control = bind_unix(&cfg.control_socket, 0o660)
            .map_err(|e| format!("{}: {e}", cfg.control_socket.display()))?;
        let group =
            match &cfg.control_group {
                Some(g) => Some(api::group_gid(g).ok_or_else(|| {
                    format!("{}: control.group: no group {g:?}", cfg.path.display())
                })?),
                None => None,
            };
        if let Some(gid) = group {
            std::os::unix::fs::chown(&cfg.control_socket, None, Some(gid)).map_err(|e| {
                let hint = if e.raw_os_error() == Some(libc::EPERM) {
                    // The unit runs without CAP_CHOWN: only the daemon's own groups work.
                    " (the daemon must be a member of control.group, or have CAP_CHOWN)"
                } else {
                    ""
                };
                format!("{}: {e}{hint}", cfg.control_socket.display())
            })?;
        }
        let access = Access {
            daemon_uid: super::sys::effective_uid(),
            group,
        };
        let limits = api::Limits {
            max_connections: cfg.control_max_connections,
            header_timeout: cfg.control_header_timeout,
        };
        if let Some(addr) = cfg.metrics_listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("metrics.listen {addr}: {e}"))?;
            tokio::spawn(super::metrics::serve(l, daemon.clone(), rx.clone()));
        }
        let api = tokio::spawn(api::serve(control, daemon.clone(), access, limits, rx));
        // Keys whose deletion window ends while the daemon runs are destroyed within a minute;
        // the audit chain's head goes to the journal every 5 minutes when it moved.
        let sweeper = daemon.clone();
        let mut logged = daemon.kms.audit_head().ok().map(|h| h.seq);
        tokio::spawn(async move {
            let mut t = tokio::time::interval(std::time::Duration::from_secs(60));
            for minute in 1u64.. {
                t.tick().await;
                let (k, prev) = (sweeper.clone(), logged);
                logged = tokio::task::spawn_blocking(move || {
                    if let Err(e) = k.kms.sweep_deletions() {
                        tracing::warn!("key deletion sweep: {e}");
                    }
                    let seq = k.kms.audit_head().ok().map(|h| h.seq);
                    if minute.is_multiple_of(5) && seq != prev {
                        k.kms.log_audit_head("periodic")
                    } else {
                        prev
                    }
                })
                .await
                .unwrap_or(prev);
            }
        });
        Ok(Running {
            daemon,
            shutdown,
            nbd,
            api,
            _lock: lock,
        })
    }

    /// Stops accepting, lets sessions finish in-flight requests, flushes, drops keys.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.api.await;
        let _ = self.nbd.await;
        let d = self.daemon.clone();
        let _ = tokio::task::spawn_blocking(move || {
            d.flush_all();
            d.detach_all_in_memory();
            d.kms.log_audit_head("shutdown");
        })
        .await;
    }
}

/// Installs the SIGTERM/SIGINT handlers now and returns a future that ends at the first of
/// them. Installed before READY is announced (or the demo prints its lines): a signal sent
/// right after that would otherwise meet the default action and kill the process uncleanly.
fn wait_for_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

/// `cryptvol serve --config FILE`: runs until SIGTERM/SIGINT.
pub async fn serve(cfg: Config) -> Result<(), String> {
    super::sys::private_umask();
    super::sys::set_non_dumpable().map_err(|e| format!("prctl(PR_SET_DUMPABLE): {e}"))?;
    if super::sys::is_dumpable() {
        return Err(
            "refusing to run: the process is dumpable (keys could reach a core dump)".into(),
        );
    }
    // Listeners, volumes and a margin besides the NBD and control connections.
    let need = (cfg.max_connections + cfg.control_max_connections) as u64 + 64;
    match super::sys::raise_fd_limit() {
        Some(n) if n < need => tracing::warn!(
            limit = n,
            need,
            "RLIMIT_NOFILE is below nbd.max_connections + control.max_connections + 64: \
             connections past it wait"
        ),
        _ => {}
    }
    let signalled = wait_for_signal();
    let running = Running::start(&cfg).await?;
    let attached = running.daemon.exports.all().len();
    tracing::info!(nbd = %cfg.nbd_unix_socket.display(), control = %cfg.control_socket.display(), attached, "cryptvol ready");
    sd_notify(&format!(
        "READY=1\nSTATUS=serving {attached} attached volume(s)"
    ));
    signalled.await;
    sd_notify("STOPPING=1\nSTATUS=stopping: finishing in-flight requests");
    tracing::info!("stopping");
    running.stop().await;
    Ok(())
}

/// `cryptvol demo`: a temp state dir, a key, a 1 GiB volume, attached and served.
pub async fn demo() -> Result<(), String> {
    // A fresh private directory (mkdtemp, 0700): a name another local user can predict and
    // pre-create (with symlinks in it) would let them redirect root's files and sockets.
    let tmp = tempfile::Builder::new()
        .prefix("cryptvol-demo-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .map_err(|e| format!("demo directory: {e}"))?;
    let dir = tmp.path().to_owned();
    let state = dir.join("state");
    init_state_dir(&state).map_err(|e| e.to_string())?;
    let nbd = dir.join("nbd.sock");
    let control = dir.join("control.sock");
    let cfg_path = dir.join("cryptvol.toml");
    let text = format!(
        "state_dir = {:?}\n[control]\nsocket = {:?}\n[nbd]\nunix_socket = {:?}\n",
        state.display().to_string(),
        control.display().to_string(),
        nbd.display().to_string()
    );
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&cfg_path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| format!("{}: {e}", cfg_path.display()))?;
    }
    let cfg = Config::load(&cfg_path).map_err(|e| e.to_string())?;
    let signalled = wait_for_signal();
    let running = Running::start(&cfg).await?;
    let d = running.daemon.clone();
    let c = Caller {
        uid: super::sys::effective_uid(),
        gid: 0,
        pid: std::process::id() as i32,
    };
    let info = tokio::task::spawn_blocking(move || -> Result<super::VolumeInfo, DaemonError> {
        d.kms
            .create_key(&c, "demo-key", "cryptvol demo master key")?;
        d.create_volume(&c, "demo", 1 << 30, 4096, Some("demo-key"), false)?;
        d.attach(&c, "demo", false)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let sock = nbd.display();
    let uri = format!("nbd+unix:///demo?socket={sock}");
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "cryptvol".into());
    println!(
        "cryptvol demo: volume \"demo\" ({} bytes, {}, key {} v{}) is attached.",
        info.size, info.cipher, info.key_id, info.key_version
    );
    println!("  NBD URI:        {uri}");
    println!("  state dir:      {}", state.display());
    println!();
    println!("Try, in another terminal:");
    println!("  nbdinfo '{uri}'");
    println!("  qemu-io -f raw -c 'write -P 0x5a 0 1M' -c 'read -P 0x5a 0 1M' '{uri}'");
    println!("  mkdir -p /tmp/demo-fuse && nbdfuse /tmp/demo-fuse/disk '{uri}' &");
    println!(
        "  nbd-client -unix {sock} /dev/nbd0 -N demo -b 4096    # needs the nbd kernel module"
    );
    println!("  {exe} --socket {} volume inspect demo", control.display());
    println!("  {exe} bench '{uri}' --rw randread --bs 4k --time 5");
    println!();
    println!("Ctrl-C stops the demo and removes {}.", dir.display());
    sd_notify("READY=1");
    signalled.await;
    running.stop().await;
    drop(tmp); // removes the directory
    println!("demo stopped, {} removed", dir.display());
    Ok(())
}

/// TLS configuration from PEM files (rustls), without anyhow (library code).
mod anyhow_free {
    use std::sync::Arc;

    use crate::config::Config;

    pub type Result<T> = std::result::Result<T, String>;

    pub fn tls(cfg: &Config) -> Result<Option<Arc<rustls::ServerConfig>>> {
        let Some(t) = &cfg.tls else { return Ok(None) };
        let read =
            |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let certs: Vec<_> = rustls_pemfile::certs(&mut &read(&t.cert)?[..])
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| format!("{}: {e}", t.cert.display()))?;
        let key = rustls_pemfile::private_key(&mut &read(&t.key)?[..])
            .map_err(|e| format!("{}: {e}", t.key.display()))?
            .ok_or_else(|| format!("{}: no private key", t.key.display()))?;
        let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
        let builder = match &t.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in rustls_pemfile::certs(&mut &read(ca)?[..]) {
                    roots
                        .add(c.map_err(|e| format!("{}: {e}", ca.display()))?)
                        .map_err(|e| e.to_string())?;
                }
                let v = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .map_err(|e| e.to_string())?;
                builder.with_client_cert_verifier(v)
            }
            None => builder.with_no_client_auth(),
        };
        Ok(Some(Arc::new(
            builder
                .with_single_cert(certs, key)
                .map_err(|e| format!("certificate: {e}"))?,
        )))
    }
}

/// `[kms] custody = "pkcs11"`: loads the module, finds the token, checks AES-GCM and logs in;
/// any failure is one line naming the config file, the key and the problem.
pub(super) fn open_custody(
    cfg: &crate::config::Config,
) -> Result<Option<Arc<dyn crate::kms::Custody>>, String> {
    use crate::config::{CustodyConfig, PinSource};
    use crate::kms::custody::{Pkcs11Settings, read_pin};
    let CustodyConfig::Pkcs11 {
        module,
        token_label,
        pin,
    } = &cfg.custody
    else {
        return Ok(None);
    };
    let fail = |e: crate::kms::custody::CustodyOpenError| format!("{}: {e}", cfg.path.display());
    let (pin, pin_key) = match pin {
        PinSource::File(f) => (read_pin(Some(f), None).map_err(fail)?, "pin_file"),
        PinSource::Credential(c) => (read_pin(None, Some(c)).map_err(fail)?, "pin_credential"),
    };
    let c = crate::kms::Pkcs11Custody::open(Pkcs11Settings {
        module: module.clone(),
        token_label: token_label.clone(),
        pin,
        pin_key,
    })
    .map_err(fail)?;
    tracing::info!(token = %token_label, module = %module.display(), "CMK custody: PKCS#11 token");
    Ok(Some(Arc::new(c)))
}
