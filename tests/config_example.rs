//! The shipped example `config/cryptvol.toml` parses, and says what the defaults are.

use std::path::Path;
use std::time::Duration;

use cryptvol::config::{Config, DEFAULT_CONTROL_SOCKET, DEFAULT_NBD_SOCKET, RootKeySource};

const EXAMPLE: &str = include_str!("../config/cryptvol.toml");

#[test]
fn example_parses_with_defaults() {
    let c = Config::parse(Path::new("config/cryptvol.toml"), EXAMPLE).expect("example parses");
    assert_eq!(c.state_dir, Path::new("/var/lib/cryptvol"));
    assert_eq!(c.control_socket, Path::new(DEFAULT_CONTROL_SOCKET));
    assert_eq!(c.nbd_unix_socket, Path::new(DEFAULT_NBD_SOCKET));
    assert_eq!(c.control_group, None);
    assert!(c.nbd_tcp.is_none() && !c.insecure_plaintext && c.tls.is_none());
    assert_eq!(c.max_connections, 1024);
    assert_eq!(c.max_connections_per_export, 64);
    assert_eq!(c.handshake_timeout, Duration::from_secs(10));
    assert_eq!(c.max_in_flight, 64);
    assert_eq!(
        c.root_key,
        RootKeySource::File("/var/lib/cryptvol/root.key".into())
    );
    assert_eq!((c.min_pending_days, c.max_pending_days), (7, 1096));
    // Same values as a config that sets nothing but state_dir: the comments tell the truth.
    let bare = Config::parse(
        Path::new("bare.toml"),
        "state_dir = \"/var/lib/cryptvol\"\n",
    )
    .unwrap();
    assert_eq!(format!("{:?}", bare.tls), format!("{:?}", c.tls));
    assert_eq!(bare.max_in_flight, c.max_in_flight);
}

/// Every commented-out `key = value` line, uncommented, still parses (with [tls] and one
/// root-key source at a time): the documented keys are real keys.
#[test]
fn commented_keys_are_real() {
    let mut text = String::new();
    for line in EXAMPLE.lines() {
        let t = line.trim_start_matches("# ");
        let is_setting = line.starts_with("# ")
            && (t.starts_with('[') || t.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')));
        if is_setting && !t.starts_with("root_key_credential") && !t.starts_with("pin_credential") {
            text.push_str(t);
        } else {
            text.push_str(line);
        }
        text.push('\n');
    }
    let c = Config::parse(Path::new("uncommented.toml"), &text).expect("uncommented parses");
    assert_eq!(c.control_group.as_deref(), Some("cryptvol"));
    assert!(c.nbd_tcp.is_some());
    assert!(c.tls.as_ref().is_some_and(|t| t.client_ca.is_some()));
    assert!(matches!(
        c.custody,
        cryptvol::config::CustodyConfig::Pkcs11 { .. }
    ));
    let cred = text.replace(
        "root_key_file = \"/var/lib/cryptvol/root.key\"",
        "root_key_credential = \"cryptvol-root-key\"",
    );
    let c = Config::parse(Path::new("cred.toml"), &cred).unwrap();
    assert_eq!(
        c.root_key,
        RootKeySource::Credential("cryptvol-root-key".into())
    );
}
