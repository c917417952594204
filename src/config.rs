//! TOML configuration: raw struct (serde, unknown keys refused) -> validated [`Config`].
//! Every error names the file, the key and the reason.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    state_dir: PathBuf,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    nbd: RawNbd,
    tls: Option<RawTls>,
    #[serde(default)]
    kms: RawKms,
    ceph: Option<RawCeph>,
    #[serde(default)]
    volumes: RawVolumes,
    #[serde(default)]
    metrics: RawMetrics,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCeph {
    conf: PathBuf,
    client: String,
    keyring: Option<PathBuf>,
    pool: Option<String>,
    op_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolumes {
    store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<PathBuf>,
    group: Option<String>,
    max_connections: Option<usize>,
    header_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNbd {
    unix_socket: Option<PathBuf>,
    tcp: Option<String>,
    #[serde(default)]
    insecure_plaintext: bool,
    max_connections: Option<usize>,
    max_connections_per_export: Option<usize>,
    handshake_timeout_secs: Option<u64>,
    max_handshakes: Option<usize>,
    idle_timeout_secs: Option<u64>,
    max_in_flight: Option<usize>,
    max_buffer_mib: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    allowed_clients: Option<BTreeMap<String, Vec<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKms {
    root_key_file: Option<PathBuf>,
    root_key_credential: Option<String>,
    min_pending_days: Option<u32>,
    max_pending_days: Option<u32>,
    sealing_key_file: Option<PathBuf>,
    custody: Option<String>,
    module: Option<PathBuf>,
    token_label: Option<String>,
    pin_file: Option<PathBuf>,
    pin_credential: Option<String>,
    store: Option<String>,
    host_id: Option<String>,
}

/// `[kms] store`: where the key records live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KmsStore {
    /// `keys.json` in the state dir, sealed per host (default).
    #[default]
    File,
    /// One RADOS object in the `[ceph]` pool, shared by every host with the root key.
    Rados,
}

/// `[kms] custody`: where CMK material lives (SPEC §8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustodyConfig {
    /// Sealed in the key store under its sealing key (default).
    File,
    /// Non-extractable AES-256 objects in a PKCS#11 token.
    Pkcs11 {
        module: PathBuf,
        token_label: String,
        pin: PinSource,
    },
}

/// Where the token's user PIN comes from (never the TOML itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    File(PathBuf),
    Credential(String),
}

/// Where the root key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootKeySource {
    File(PathBuf),
    Credential(String),
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    /// `[tls.allowed_clients]`: volume name -> the client identities (certificate subject
    /// CN or SAN DNS name) that may see and open it over TLS. Volumes not named: any verified
    /// client. Empty unless `client_ca` is set.
    pub allowed_clients: BTreeMap<String, Vec<String>>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub control_group: Option<String>,
    /// Control connections served at once.
    pub control_max_connections: usize,
    /// A control request's headers must arrive within this.
    pub control_header_timeout: Duration,
    pub nbd_unix_socket: PathBuf,
    pub nbd_tcp: Option<SocketAddr>,
    /// The TCP listener admits peers without a verified client certificate (no `[tls]`, or
    /// `[tls]` without `client_ca`): every attached volume is open to them.
    pub insecure_plaintext: bool,
    pub max_connections: usize,
    pub max_connections_per_export: usize,
    pub handshake_timeout: Duration,
    pub max_handshakes: usize,
    pub idle_timeout: Option<Duration>,
    pub max_in_flight: usize,
    pub max_buffer_bytes: usize,
    pub tls: Option<TlsFiles>,
    pub root_key: RootKeySource,
    pub min_pending_days: u32,
    pub max_pending_days: u32,
    /// `[kms] sealing_key_file`: where the key store's sealing key lives (default in the
    /// key store dir).
    pub sealing_key_file: Option<PathBuf>,
    /// `[ceph]`: the cluster RBD volumes live in; `None` = the single-host daemon.
    pub ceph: Option<CephConfig>,
    /// `[volumes] store`: where `volume create` puts a volume without `--store`.
    pub default_store: StoreKind,
    /// `[metrics] listen`: Prometheus metrics over plain HTTP on this loopback address.
    pub metrics_listen: Option<SocketAddr>,
    pub custody: CustodyConfig,
    /// `[kms] store`.
    pub kms_store: KmsStore,
    /// `[kms] host_id`: the host named in audit records (default: the host name).
    pub host_id: Option<String>,
}

/// `[ceph]`: how to reach the cluster (SPEC §8).
#[derive(Debug, Clone)]
pub struct CephConfig {
    pub conf: PathBuf,
    /// The cephx user without `client.`.
    pub client: String,
    pub keyring: Option<PathBuf>,
    /// The pool of new RBD volumes, and the one `volume list` shows (default `rbd`).
    pub pool: String,
    /// Bound on every cluster operation and on connecting (`op_timeout_secs`, default 30).
    pub op_timeout: Duration,
}

/// Where a volume's bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreKind {
    #[default]
    File,
    Rbd,
}

impl StoreKind {
    pub fn parse(s: &str) -> Option<StoreKind> {
        match s {
            "file" => Some(StoreKind::File),
            "rbd" => Some(StoreKind::Rbd),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::File => "file",
            StoreKind::Rbd => "rbd",
        }
    }
}

/// Why a pool or cephx user name is refused, if it is (Ceph's own rules are looser; these
/// are names that survive a ceph.conf, a log line and `rbd:POOL/IMAGE`).
pub fn invalid_ceph_name(n: &str) -> Option<&'static str> {
    if n.is_empty() || n.len() > 128 {
        Some("must be 1..128 characters")
    } else if !n
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
    {
        Some("only [A-Za-z0-9._-] allowed")
    } else if n.starts_with(['.', '-']) {
        Some("must start with a letter or digit")
    } else {
        None
    }
}

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/cryptvol/control.sock";
pub const DEFAULT_NBD_SOCKET: &str = "/run/cryptvol/nbd.sock";

#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let err = |key: &str, reason: String| ConfigError {
            file: path.display().to_string(),
            key: key.into(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err("-", e.to_string()))?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let err = |key: &str, reason: String| ConfigError {
            file: path.display().to_string(),
            key: key.into(),
            reason,
        };
        let raw: Raw = toml::from_str(text).map_err(|e| {
            // toml names the key and line; keep its message on one line.
            let msg = e.message().to_owned();
            let at = e.span().map(|s| {
                let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}")
            });
            err(at.as_deref().unwrap_or("-"), msg)
        })?;
        if !raw.state_dir.is_absolute() {
            return Err(err("state_dir", "must be an absolute path".into()));
        }
        let nbd_tcp = match &raw.nbd.tcp {
            None => None,
            Some(s) => Some(
                s.parse::<SocketAddr>()
                    .map_err(|e| err("nbd.tcp", format!("{s:?}: {e}")))?,
            ),
        };
        // TCP serves only verified client certificates: anyone who reaches the port, any local
        // user on loopback too, would otherwise read and write every attached volume.
        if let Some(addr) = nbd_tcp
            && !raw.nbd.insecure_plaintext
        {
            match &raw.tls {
                None => {
                    return Err(err(
                        "nbd.tcp",
                        format!(
                            "{addr} without [tls]: any peer that reaches the port would get \
                             every attached volume; configure [tls] with client_ca, or set \
                             nbd.insecure_plaintext = true"
                        ),
                    ));
                }
                Some(t) if t.client_ca.is_none() => {
                    return Err(err(
                        "tls.client_ca",
                        format!(
                            "required with nbd.tcp ({addr}): without client certificates any \
                             peer that reaches the port would get every attached volume; set \
                             it, or set nbd.insecure_plaintext = true"
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        // Plain HTTP, no authentication: loopback only (volume names are in the labels).
        let metrics_listen = match &raw.metrics.listen {
            None => None,
            Some(s) => {
                let a = s
                    .parse::<SocketAddr>()
                    .map_err(|e| err("metrics.listen", format!("{s:?}: {e}")))?;
                if !a.ip().is_loopback() {
                    return Err(err(
                        "metrics.listen",
                        format!(
                            "{a}: only a loopback address (127.0.0.1, ::1); the endpoint has \
                             no TLS and no authentication (scrape through a local proxy)"
                        ),
                    ));
                }
                Some(a)
            }
        };
        let tls = match raw.tls {
            None => None,
            Some(t) => {
                let allowed_clients = t.allowed_clients.unwrap_or_default();
                if !allowed_clients.is_empty() && t.client_ca.is_none() {
                    return Err(err(
                        "tls.allowed_clients",
                        "needs tls.client_ca: without client certificates the identities \
                         would be unverified"
                            .into(),
                    ));
                }
                for (volume, names) in &allowed_clients {
                    let key = format!("tls.allowed_clients.{volume}");
                    if !valid_volume_name(volume) {
                        return Err(err(&key, format!("{volume:?} is not a valid volume name")));
                    }
                    for n in names {
                        if let Some(reason) = invalid_identity(n) {
                            return Err(err(&key, format!("{n:?}: {reason}")));
                        }
                    }
                }
                Some(TlsFiles {
                    cert: t.cert,
                    key: t.key,
                    client_ca: t.client_ca,
                    allowed_clients,
                })
            }
        };
        let root_key = match (&raw.kms.root_key_file, &raw.kms.root_key_credential) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "kms",
                    "set root_key_file or root_key_credential, not both".into(),
                ));
            }
            (Some(f), None) => RootKeySource::File(f.clone()),
            (None, Some(c)) => RootKeySource::Credential(c.clone()),
            (None, None) => RootKeySource::File(raw.state_dir.join("root.key")),
        };
        if let Some(p) = &raw.kms.sealing_key_file
            && (!p.is_absolute() || p.file_name().is_none())
        {
            return Err(err(
                "kms.sealing_key_file",
                "must be an absolute file path".into(),
            ));
        }
        let k = &raw.kms;
        let custody = match k.custody.as_deref().unwrap_or("file") {
            "file" => {
                for (key, set) in [
                    ("kms.module", k.module.is_some()),
                    ("kms.token_label", k.token_label.is_some()),
                    ("kms.pin_file", k.pin_file.is_some()),
                    ("kms.pin_credential", k.pin_credential.is_some()),
                ] {
                    if set {
                        return Err(err(key, "only used with custody = \"pkcs11\"".into()));
                    }
                }
                CustodyConfig::File
            }
            "pkcs11" => {
                let module = k.module.clone().ok_or_else(|| {
                    err(
                        "kms.module",
                        "required with custody = \"pkcs11\" (path to the PKCS#11 library)".into(),
                    )
                })?;
                if !module.is_absolute() {
                    return Err(err("kms.module", "must be an absolute path".into()));
                }
                let token_label = k.token_label.clone().ok_or_else(|| {
                    err(
                        "kms.token_label",
                        "required with custody = \"pkcs11\"".into(),
                    )
                })?;
                let pin = match (&k.pin_file, &k.pin_credential) {
                    (Some(_), Some(_)) => {
                        return Err(err(
                            "kms",
                            "set pin_file or pin_credential, not both".into(),
                        ));
                    }
                    (Some(f), None) => PinSource::File(f.clone()),
                    (None, Some(c)) => PinSource::Credential(c.clone()),
                    (None, None) => {
                        return Err(err(
                            "kms.pin_file",
                            "custody = \"pkcs11\" needs pin_file or pin_credential (the PIN is never in this file)".into(),
                        ));
                    }
                };
                CustodyConfig::Pkcs11 {
                    module,
                    token_label,
                    pin,
                }
            }
            other => {
                return Err(err(
                    "kms.custody",
                    format!("{other:?}: must be \"file\" or \"pkcs11\""),
                ));
            }
        };
        let min = raw.kms.min_pending_days.unwrap_or(7);
        let max = raw.kms.max_pending_days.unwrap_or(1096);
        if min > max {
            return Err(err(
                "kms.min_pending_days",
                format!("{min} exceeds max_pending_days {max}"),
            ));
        }
        let ceph = match raw.ceph {
            None => None,
            Some(c) => {
                if !c.conf.is_absolute() {
                    return Err(err("ceph.conf", "must be an absolute path".into()));
                }
                if let Some(k) = &c.keyring
                    && !k.is_absolute()
                {
                    return Err(err("ceph.keyring", "must be an absolute path".into()));
                }
                if c.client.starts_with("client.") {
                    return Err(err(
                        "ceph.client",
                        format!(
                            "{:?}: give the cephx id without the \"client.\" prefix",
                            c.client
                        ),
                    ));
                }
                if let Some(why) = invalid_ceph_name(&c.client) {
                    return Err(err("ceph.client", format!("{:?}: {why}", c.client)));
                }
                let pool = c.pool.unwrap_or_else(|| "rbd".to_owned());
                if let Some(why) = invalid_ceph_name(&pool) {
                    return Err(err("ceph.pool", format!("{pool:?}: {why}")));
                }
                let t = c.op_timeout_secs.unwrap_or(30);
                if !(1..=3600).contains(&t) {
                    return Err(err(
                        "ceph.op_timeout_secs",
                        "must be 1..3600 (0 would wait forever)".into(),
                    ));
                }
                Some(CephConfig {
                    conf: c.conf,
                    client: c.client,
                    keyring: c.keyring,
                    pool,
                    op_timeout: Duration::from_secs(t),
                })
            }
        };
        let kms_store = match raw.kms.store.as_deref() {
            // SPEC §8 names it "local"; "file" matches [kms] custody and [volumes] store.
            None | Some("file" | "local") => KmsStore::File,
            Some("rados") if ceph.is_none() => {
                return Err(err(
                    "kms.store",
                    "\"rados\" keeps the key records in the [ceph] pool: it needs a [ceph] section"
                        .into(),
                ));
            }
            Some("rados") => KmsStore::Rados,
            Some(other) => {
                return Err(err(
                    "kms.store",
                    format!("{other:?}: must be \"file\" or \"rados\""),
                ));
            }
        };
        if kms_store == KmsStore::Rados && raw.kms.sealing_key_file.is_some() {
            return Err(err(
                "kms.sealing_key_file",
                "has no use with store = \"rados\" (shared records are sealed under a key \
                 derived from the root key)"
                    .into(),
            ));
        }
        let host_id = raw.kms.host_id.clone();
        if let Some(h) = &host_id
            && (h.is_empty()
                || h.len() > 64
                || !h
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c)))
        {
            return Err(err("kms.host_id", format!("{h:?}: 1-64 of [A-Za-z0-9._-]")));
        }
        let default_store = match raw.volumes.store.as_deref() {
            None => StoreKind::File,
            Some(s) => StoreKind::parse(s).ok_or_else(|| {
                err(
                    "volumes.store",
                    format!("{s:?}: must be \"file\" or \"rbd\""),
                )
            })?,
        };
        if default_store == StoreKind::Rbd && ceph.is_none() {
            return Err(err(
                "volumes.store",
                "\"rbd\" needs a [ceph] section".into(),
            ));
        }
        let positive = |key: &str, v: Option<usize>, d: usize| match v {
            Some(0) => Err(err(key, "must be at least 1".into())),
            Some(n) => Ok(n),
            None => Ok(d),
        };
        let hs = raw.nbd.handshake_timeout_secs.unwrap_or(10);
        if hs == 0 {
            return Err(err(
                "nbd.handshake_timeout_secs",
                "must be at least 1".into(),
            ));
        }
        let control_timeout = raw.control.header_timeout_secs.unwrap_or(10);
        if control_timeout == 0 {
            return Err(err(
                "control.header_timeout_secs",
                "must be at least 1".into(),
            ));
        }
        Ok(Config {
            path: path.to_owned(),
            control_socket: raw
                .control
                .socket
                .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into()),
            control_group: raw.control.group,
            control_max_connections: positive(
                "control.max_connections",
                raw.control.max_connections,
                64,
            )?,
            control_header_timeout: Duration::from_secs(control_timeout),
            nbd_unix_socket: raw
                .nbd
                .unix_socket
                .unwrap_or_else(|| DEFAULT_NBD_SOCKET.into()),
            nbd_tcp,
            insecure_plaintext: raw.nbd.insecure_plaintext,
            max_connections: positive("nbd.max_connections", raw.nbd.max_connections, 1024)?,
            max_connections_per_export: positive(
                "nbd.max_connections_per_export",
                raw.nbd.max_connections_per_export,
                64,
            )?,
            handshake_timeout: Duration::from_secs(hs),
            max_handshakes: positive("nbd.max_handshakes", raw.nbd.max_handshakes, 64)?,
            idle_timeout: raw
                .nbd
                .idle_timeout_secs
                .filter(|&s| s > 0)
                .map(Duration::from_secs),
            max_in_flight: positive("nbd.max_in_flight", raw.nbd.max_in_flight, 64)?,
            max_buffer_bytes: positive("nbd.max_buffer_mib", raw.nbd.max_buffer_mib, 64)? << 20,
            tls,
            root_key,
            min_pending_days: min,
            max_pending_days: max,
            sealing_key_file: raw.kms.sealing_key_file,
            ceph,
            default_store,
            metrics_listen,
            custody,
            kms_store,
            host_id,
            state_dir: raw.state_dir,
        })
    }
}

/// The daemon's rule for volume names (1-64 of `[A-Za-z0-9._-]`, starting alphanumeric),
/// repeated here because config depends on no other part: a key that can never name a
/// volume is a typo, and a typo would leave the intended volume unrestricted.
fn valid_volume_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .enumerate()
            .all(|(i, c)| c.is_ascii_alphanumeric() || (i > 0 && b"._-".contains(&c)))
}

/// Why an allowed-client entry can never match as the operator means it, if it cannot.
fn invalid_identity(n: &str) -> Option<&'static str> {
    if n.is_empty() {
        Some("empty identity")
    } else if n.contains('*') {
        Some("wildcards are not supported: list each identity")
    } else if n.trim() != n || n.chars().any(char::is_control) {
        Some("leading/trailing whitespace or control characters")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/cryptvol.toml"), t)
    }

    #[test]
    fn minimal_and_defaults() {
        let c = parse("state_dir = \"/var/lib/cryptvol\"\n").unwrap();
        assert_eq!(c.control_socket, Path::new(DEFAULT_CONTROL_SOCKET));
        assert_eq!(
            c.root_key,
            RootKeySource::File("/var/lib/cryptvol/root.key".into())
        );
    }

    #[test]
    fn errors_name_file_key_reason() {
        let e = parse("state_dir = \"/x\"\n[nbd]\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/cryptvol.toml: line 3") && e.contains("bogus"),
            "{e}"
        );
        let e = parse("state_dir = \"/x\"\n[nbd]\ntcp = \"0.0.0.0:10809\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nbd.tcp") && e.contains("tls"), "{e}");
        let e = parse("state_dir = \"/x\"\n[control]\nheader_timeout_secs = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("control.header_timeout_secs"), "{e}");
        let e = parse("state_dir = \"rel\"\n").unwrap_err().to_string();
        assert!(e.contains("state_dir"), "{e}");
        assert!(
            parse("state_dir = \"/x\"\n[nbd]\ntcp = \"0.0.0.0:1\"\ninsecure_plaintext = true\n")
                .is_ok()
        );
    }

    #[test]
    fn allowed_clients() {
        const TLS: &str = "state_dir = \"/x\"\n[tls]\ncert = \"/c\"\nkey = \"/k\"\n";
        let c = parse(&format!(
            "{TLS}client_ca = \"/ca\"\n[tls.allowed_clients]\nvol1 = [\"client-a\", \"backup.example.com\"]\nvol2 = []\n"
        ))
        .unwrap();
        let a = &c.tls.unwrap().allowed_clients;
        assert_eq!(a["vol1"], ["client-a", "backup.example.com"]);
        assert!(a["vol2"].is_empty());
        // Without client_ca, an identity would be anyone's claim.
        let e = parse(&format!("{TLS}[tls.allowed_clients]\nvol1 = [\"a\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/cryptvol.toml: tls.allowed_clients: needs tls.client_ca"),
            "{e}"
        );
        for (bad, why) in [
            ("\"-v\" = [\"a\"]", "not a valid volume name"),
            ("v = [\"\"]", "empty identity"),
            ("v = [\"*.example.com\"]", "wildcards"),
            ("v = [\" a\"]", "whitespace"),
            ("v = \"a\"", "invalid type"),
        ] {
            let e = parse(&format!(
                "{TLS}client_ca = \"/ca\"\n[tls.allowed_clients]\n{bad}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let e = parse(&format!(
            "{TLS}client_ca = \"/ca\"\n[tls.allowed_clients]\n\"-v\" = [\"a\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains(": tls.allowed_clients.-v: "), "{e}");
    }

    #[test]
    fn kms_store() {
        const BASE: &str = "state_dir = \"/x\"\n";
        const CEPH: &str = "[ceph]\nconf = \"/c\"\nclient = \"a\"\n";
        let c = parse(BASE).unwrap();
        assert_eq!((c.kms_store, c.host_id), (KmsStore::File, None));
        for v in ["file", "local"] {
            let c = parse(&format!("{BASE}[kms]\nstore = \"{v}\"\n")).unwrap();
            assert_eq!(c.kms_store, KmsStore::File);
        }
        let c = parse(&format!(
            "{BASE}{CEPH}[kms]\nstore = \"rados\"\nhost_id = \"h-1.a\"\n"
        ))
        .unwrap();
        assert_eq!(c.kms_store, KmsStore::Rados);
        assert_eq!(c.host_id.as_deref(), Some("h-1.a"));
        for (extra, key, why) in [
            ("store = \"rados\"", "kms.store", "needs a [ceph] section"),
            (
                "store = \"s3\"",
                "kms.store",
                "must be \"file\" or \"rados\"",
            ),
            ("host_id = \"a b\"", "kms.host_id", "1-64"),
            ("host_id = \"\"", "kms.host_id", "1-64"),
        ] {
            let e = parse(&format!("{BASE}[kms]\n{extra}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("{key}: ")) && e.contains(why), "{e}");
        }
        let e = parse(&format!(
            "{BASE}{CEPH}[kms]\nstore = \"rados\"\nsealing_key_file = \"/s\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("kms.sealing_key_file") && e.contains("no use"),
            "{e}"
        );
    }

    #[test]
    fn ceph_section() {
        const BASE: &str = "state_dir = \"/x\"\n";
        let c = parse(BASE).unwrap();
        assert!(c.ceph.is_none());
        assert_eq!(c.default_store, StoreKind::File);
        const CEPH: &str =
            "[ceph]\nconf = \"/etc/ceph/ceph.conf\"\nclient = \"cryptvol\"\npool = \"rbd\"\n";
        let c = parse(&format!("{BASE}{CEPH}[volumes]\nstore = \"rbd\"\n")).unwrap();
        let ceph = c.ceph.unwrap();
        assert_eq!(ceph.client, "cryptvol");
        assert_eq!(ceph.op_timeout, Duration::from_secs(30));
        assert_eq!(c.default_store, StoreKind::Rbd);
        for (extra, key, why) in [
            ("", "volumes.store", "needs a [ceph] section"),
            ("x", "volumes.store", "must be \"file\" or \"rbd\""),
        ] {
            let store = if extra.is_empty() { "rbd" } else { extra };
            let e = parse(&format!("{BASE}[volumes]\nstore = \"{store}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("/etc/cryptvol.toml: {key}: ")) && e.contains(why),
                "{e}"
            );
        }
        for (bad, key, why) in [
            (
                "conf = \"rel.conf\"\nclient = \"a\"\npool = \"rbd\"",
                "ceph.conf",
                "absolute",
            ),
            (
                "conf = \"/c\"\nclient = \"client.a\"\npool = \"rbd\"",
                "ceph.client",
                "prefix",
            ),
            (
                "conf = \"/c\"\nclient = \"a b\"\npool = \"rbd\"",
                "ceph.client",
                "only",
            ),
            (
                "conf = \"/c\"\nclient = \"a\"\npool = \"\"",
                "ceph.pool",
                "1..128",
            ),
            (
                "conf = \"/c\"\nclient = \"a\"\npool = \"p/q\"",
                "ceph.pool",
                "only",
            ),
            (
                "conf = \"/c\"\nclient = \"a\"\npool = \"p\"\nkeyring = \"k\"",
                "ceph.keyring",
                "absolute",
            ),
            (
                "conf = \"/c\"\nclient = \"a\"\npool = \"p\"\nop_timeout_secs = 0",
                "ceph.op_timeout_secs",
                "forever",
            ),
        ] {
            let e = parse(&format!("{BASE}[ceph]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("/etc/cryptvol.toml: {key}: ")) && e.contains(why),
                "{bad}: {e}"
            );
        }
        // Missing keys are named by the parser.
        let e = parse(&format!("{BASE}[ceph]\nconf = \"/c\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("client"), "{e}");
    }

    #[test]
    fn tcp_needs_verified_clients() {
        const TCP: &str = "state_dir = \"/x\"\n[nbd]\ntcp = \"127.0.0.1:10809\"\n";
        const TLS: &str = "[tls]\ncert = \"/c\"\nkey = \"/k\"\n";
        // Loopback is no exception: every local user reaches it.
        let e = parse(TCP).unwrap_err().to_string();
        assert!(
            e.starts_with("/etc/cryptvol.toml: nbd.tcp: 127.0.0.1:10809 without [tls]"),
            "{e}"
        );
        let e = parse(&format!("{TCP}{TLS}")).unwrap_err().to_string();
        assert!(
            e.starts_with("/etc/cryptvol.toml: tls.client_ca: required with nbd.tcp"),
            "{e}"
        );
        let ok = parse(&format!("{TCP}{TLS}client_ca = \"/ca\"\n")).unwrap();
        assert!(!ok.insecure_plaintext);
        let opt_in = format!("{TCP}insecure_plaintext = true\n");
        assert!(parse(&opt_in).unwrap().insecure_plaintext);
        assert!(parse(&format!("{opt_in}{TLS}")).is_ok());
        // Without a TCP listener, TLS without client_ca is not refused (nothing listens).
        assert!(parse(&format!("state_dir = \"/x\"\n{TLS}")).is_ok());
    }

    #[test]
    fn custody() {
        let base = "state_dir = \"/x\"\n[kms]\n";
        assert_eq!(parse(base).unwrap().custody, CustodyConfig::File);
        let p11 = |extra: &str| {
            parse(&format!(
                "{base}custody = \"pkcs11\"\nmodule = \"/m.so\"\ntoken_label = \"t\"\n{extra}"
            ))
        };
        assert_eq!(
            p11("pin_file = \"/p\"\n").unwrap().custody,
            CustodyConfig::Pkcs11 {
                module: "/m.so".into(),
                token_label: "t".into(),
                pin: PinSource::File("/p".into())
            }
        );
        assert_eq!(
            p11("pin_credential = \"c\"\n").unwrap().custody,
            CustodyConfig::Pkcs11 {
                module: "/m.so".into(),
                token_label: "t".into(),
                pin: PinSource::Credential("c".into())
            }
        );
        for (extra, key) in [
            ("", "kms.pin_file"),
            ("pin_file = \"/p\"\npin_credential = \"c\"\n", "kms: "),
            ("pin = \"1234\"\n", "pin"),
        ] {
            let e = p11(extra).unwrap_err().to_string();
            assert!(
                e.starts_with("/etc/cryptvol.toml: ") && e.contains(key),
                "{e}"
            );
        }
        for (text, key) in [
            ("custody = \"tpm\"\n", "kms.custody"),
            (
                "custody = \"pkcs11\"\ntoken_label = \"t\"\npin_file = \"/p\"\n",
                "kms.module",
            ),
            (
                "custody = \"pkcs11\"\nmodule = \"rel.so\"\ntoken_label = \"t\"\npin_file = \"/p\"\n",
                "kms.module",
            ),
            (
                "custody = \"pkcs11\"\nmodule = \"/m.so\"\npin_file = \"/p\"\n",
                "kms.token_label",
            ),
            ("token_label = \"t\"\n", "kms.token_label"),
        ] {
            let e = parse(&format!("{base}{text}")).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }
}
