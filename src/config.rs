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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<PathBuf>,
    group: Option<String>,
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
    pub nbd_unix_socket: PathBuf,
    pub nbd_tcp: Option<SocketAddr>,
    pub insecure_plaintext: bool,
    pub max_connections: usize,
    pub max_connections_per_export: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub max_in_flight: usize,
    pub max_buffer_bytes: usize,
    pub tls: Option<TlsFiles>,
    pub root_key: RootKeySource,
    pub min_pending_days: u32,
    pub max_pending_days: u32,
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
        if let Some(addr) = nbd_tcp
            && !addr.ip().is_loopback()
            && raw.tls.is_none()
            && !raw.nbd.insecure_plaintext
        {
            {
                return Err(err(
                    "nbd.tcp",
                    format!(
                        "{addr} is not loopback: configure [tls] or set nbd.insecure_plaintext = true"
                    ),
                ));
            }
        }
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
        let min = raw.kms.min_pending_days.unwrap_or(7);
        let max = raw.kms.max_pending_days.unwrap_or(1096);
        if min > max {
            return Err(err(
                "kms.min_pending_days",
                format!("{min} exceeds max_pending_days {max}"),
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
        Ok(Config {
            path: path.to_owned(),
            control_socket: raw
                .control
                .socket
                .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into()),
            control_group: raw.control.group,
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
}
