//! Who is at the other end of a connection, as far as the transport proved it. The server
//! fills this in (Unix socket, plain TCP, or the client certificate of a TLS session) and
//! hands it to the [`ExportRegistry`](super::ExportRegistry); the registry decides what that
//! peer may see and open. The server itself holds no access policy.

use std::fmt;

use rustls::pki_types::CertificateDer;

/// The peer of one NBD connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// A client of the Unix socket: admitted by the socket file's permissions. It stays
    /// `Local` even if it upgrades to TLS.
    Local,
    /// A TCP client without a verified client certificate (plain TCP, or TLS without
    /// `client_ca`).
    Anonymous,
    /// A TCP client whose certificate chain rustls verified against the client CA.
    Certificate(CertNames),
}

/// The names a verified client certificate carries, as written in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertNames {
    /// Every subject commonName (CN) that is a text string (UTF8String, PrintableString,
    /// IA5String, NumericString); others are left out.
    pub common_names: Vec<String>,
    /// Every dNSName of the subjectAltName extension.
    pub dns_names: Vec<String>,
}

impl PeerIdentity {
    /// The identity of a TLS client from the chain rustls verified (end entity first);
    /// `Anonymous` when the client sent none (no client authentication configured).
    pub fn from_tls_chain(chain: Option<&[CertificateDer<'_>]>) -> PeerIdentity {
        match chain.and_then(|c| c.first()) {
            Some(ee) => PeerIdentity::Certificate(CertNames::parse(ee)),
            None => PeerIdentity::Anonymous,
        }
    }
}

impl CertNames {
    /// Reads the subject CNs and SAN DNS names. rustls (webpki) has already parsed and
    /// verified this certificate, but exposes neither its subject nor its SAN list, so the
    /// names come from x509-parser. A certificate it cannot read yields no names: such a
    /// client matches no allow-list entry (fail closed).
    pub fn parse(der: &CertificateDer<'_>) -> CertNames {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
            tracing::warn!("verified client certificate could not be parsed for its names");
            return CertNames::default();
        };
        let common_names = cert
            .subject()
            .iter_common_name()
            .filter_map(|a| a.as_str().ok())
            .map(str::to_owned)
            .collect();
        let dns_names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(_) => {
                tracing::warn!("client certificate has an unreadable subjectAltName");
                Vec::new()
            }
        };
        CertNames {
            common_names,
            dns_names,
        }
    }
}

/// For logs: the names only (certificates carry no secrets).
impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerIdentity::Local => f.write_str("unix socket"),
            PeerIdentity::Anonymous => f.write_str("tcp without client certificate"),
            PeerIdentity::Certificate(n) => {
                f.write_str("certificate")?;
                for cn in &n.common_names {
                    write!(f, " CN={cn:?}")?;
                }
                for d in &n.dns_names {
                    write!(f, " DNS={d:?}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1
    /// -subj "/O=cryptvol tests/CN=client-a" -addext
    /// "subjectAltName=DNS:Backup.Example.com,DNS:b2.example.com,IP:127.0.0.1,email:a@b.c"`
    /// (the certificate only; its key was thrown away).
    const CERT_PEM: &str = include_str!("testdata/client-a-san.pem");

    fn der(pem: &str) -> CertificateDer<'static> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .expect("one certificate")
            .expect("valid PEM")
    }

    #[test]
    fn names_from_certificate() {
        let n = CertNames::parse(&der(CERT_PEM));
        assert_eq!(n.common_names, ["client-a"]);
        // IP and email SANs are not names this matches on.
        assert_eq!(n.dns_names, ["Backup.Example.com", "b2.example.com"]);
    }

    #[test]
    fn chain_to_identity() {
        assert_eq!(PeerIdentity::from_tls_chain(None), PeerIdentity::Anonymous);
        assert_eq!(
            PeerIdentity::from_tls_chain(Some(&[])),
            PeerIdentity::Anonymous
        );
        let id = PeerIdentity::from_tls_chain(Some(&[der(CERT_PEM)]));
        assert_eq!(
            id.to_string(),
            "certificate CN=\"client-a\" DNS=\"Backup.Example.com\" DNS=\"b2.example.com\""
        );
    }

    #[test]
    fn garbage_yields_no_names() {
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert_eq!(CertNames::parse(&junk), CertNames::default());
        assert_eq!(
            CertNames::parse(&CertificateDer::from(Vec::new())),
            CertNames::default()
        );
    }
}
