//! The documented example configuration parses, and says what it documents.
use std::path::Path;

use cryptvol::config::{Config, RootKeySource};

#[test]
fn example_config_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cryptvol.toml");
    let c = Config::load(&path).unwrap();
    assert_eq!(c.state_dir, Path::new("/var/lib/cryptvol"));
    assert_eq!(c.control_socket, Path::new("/run/cryptvol/control.sock"));
    assert_eq!(c.nbd_unix_socket, Path::new("/run/cryptvol/nbd.sock"));
    assert_eq!(
        c.root_key,
        RootKeySource::File("/var/lib/cryptvol/root.key".into())
    );
    assert_eq!((c.min_pending_days, c.max_pending_days), (7, 1096));
    assert!(c.nbd_tcp.is_none() && c.tls.is_none());
}
