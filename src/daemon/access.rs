//! Which NBD clients may see and open which volumes: `[tls.allowed_clients]`.
//!
//! A volume named there is visible (LIST, INFO, meta-context queries) and openable (GO,
//! EXPORT_NAME) only by Unix-socket clients, whose access is the socket file's permissions,
//! and by TLS clients whose verified certificate carries one of the listed identities:
//!
//! - an entry equal to a subject commonName (CN), compared exactly (case-sensitive), or
//! - an entry equal to a subjectAltName dNSName, compared ASCII case-insensitively.
//!
//! Nothing else is matched (no wildcards, no IP or e-mail SANs, no other subject fields).
//! Volumes not named there are open to every Unix-socket client and every verified TLS client;
//! to peers without a verified certificate only when the config opts in
//! (`nbd.insecure_plaintext`, which is also the only way such a peer reaches the server).

use std::collections::BTreeMap;

use crate::server::{CertNames, PeerIdentity};

/// The allow-lists, per volume name.
#[derive(Debug, Clone, Default)]
pub struct ClientPolicy {
    allowed: BTreeMap<String, Vec<String>>,
    anonymous: bool,
}

impl ClientPolicy {
    pub fn new(allowed: BTreeMap<String, Vec<String>>) -> ClientPolicy {
        ClientPolicy {
            allowed,
            anonymous: false,
        }
    }

    /// Whether TCP peers without a verified certificate may see and open unlisted volumes
    /// (`nbd.insecure_plaintext`). Off by default: config validation keeps such peers away
    /// unless opted in, and this keeps the registry closed to them even if one slipped past.
    pub fn admit_anonymous(mut self, yes: bool) -> ClientPolicy {
        self.anonymous = yes;
        self
    }

    /// Whether `peer` may see and open `volume`.
    pub fn permits(&self, volume: &str, peer: &PeerIdentity) -> bool {
        let Some(list) = self.allowed.get(volume) else {
            return *peer != PeerIdentity::Anonymous || self.anonymous;
        };
        match peer {
            PeerIdentity::Local => true,
            // Not reachable with a valid config (allow-lists need client_ca, and TCP then
            // needs TLS with a client certificate), but an unproven peer is never listed.
            PeerIdentity::Anonymous => false,
            PeerIdentity::Certificate(names) => list.iter().any(|e| identity_matches(e, names)),
        }
    }

    /// The volumes that have an allow-list.
    pub fn restricted(&self) -> impl Iterator<Item = &str> {
        self.allowed.keys().map(String::as_str)
    }
}

fn identity_matches(entry: &str, names: &CertNames) -> bool {
    names.common_names.iter().any(|cn| cn == entry)
        || names
            .dns_names
            .iter()
            .any(|d| d.eq_ignore_ascii_case(entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cns: &[&str], dns: &[&str]) -> PeerIdentity {
        PeerIdentity::Certificate(CertNames {
            common_names: cns.iter().map(|s| s.to_string()).collect(),
            dns_names: dns.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn policy() -> ClientPolicy {
        ClientPolicy::new(BTreeMap::from([
            (
                "vol1".to_string(),
                vec!["client-a".to_string(), "backup.example.com".to_string()],
            ),
            ("unix-only".to_string(), vec![]),
        ]))
    }

    #[test]
    fn unlisted_volumes_are_open_to_all_but_the_unproven() {
        let p = policy();
        for peer in [PeerIdentity::Local, cert(&["stranger"], &[])] {
            assert!(p.permits("vol2", &peer), "{peer}");
        }
        assert!(ClientPolicy::default().permits("vol1", &cert(&[], &[])));
        assert!(!p.permits("vol2", &PeerIdentity::Anonymous));
        assert!(!ClientPolicy::default().permits("vol1", &PeerIdentity::Anonymous));
        // Opted in (nbd.insecure_plaintext): unlisted volumes only.
        let open = policy().admit_anonymous(true);
        assert!(open.permits("vol2", &PeerIdentity::Anonymous));
        assert!(!open.permits("vol1", &PeerIdentity::Anonymous));
    }

    #[test]
    fn common_name_is_exact() {
        let p = policy();
        assert!(p.permits("vol1", &cert(&["client-a"], &[])));
        assert!(!p.permits("vol1", &cert(&["Client-A"], &[])));
        assert!(!p.permits("vol1", &cert(&["client-a2"], &[])));
        assert!(!p.permits("vol1", &cert(&["client"], &[])));
        // Any of several CNs.
        assert!(p.permits("vol1", &cert(&["x", "client-a"], &[])));
    }

    #[test]
    fn dns_name_is_case_insensitive() {
        let p = policy();
        assert!(p.permits("vol1", &cert(&["other"], &["backup.example.com"])));
        assert!(p.permits("vol1", &cert(&[], &["x.org", "BACKUP.Example.COM"])));
        assert!(!p.permits("vol1", &cert(&[], &["backup.example.com.evil"])));
        assert!(!p.permits("vol1", &cert(&[], &["sub.backup.example.com"])));
        assert!(!p.permits("vol1", &cert(&[], &["*.example.com"])));
        // A SAN equal to a CN entry counts too (the entry is just a name).
        assert!(p.permits("vol1", &cert(&[], &["CLIENT-A"])));
    }

    #[test]
    fn the_unproven_and_the_nameless_are_refused() {
        let p = policy();
        assert!(!p.permits("vol1", &PeerIdentity::Anonymous));
        assert!(!p.permits("vol1", &cert(&[], &[])));
        assert!(!p.permits("unix-only", &cert(&["client-a"], &["backup.example.com"])));
    }

    #[test]
    fn unix_socket_clients_keep_access() {
        let p = policy();
        assert!(p.permits("vol1", &PeerIdentity::Local));
        assert!(p.permits("unix-only", &PeerIdentity::Local));
        assert_eq!(p.restricted().collect::<Vec<_>>(), ["unix-only", "vol1"]);
    }
}
