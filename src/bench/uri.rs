//! NBD URIs as `cryptvol bench` takes them (the subset of the NBD URI standard we need):
//! `nbd+unix:///NAME?socket=PATH` and `nbd://HOST[:PORT]/NAME`.

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Unix(PathBuf),
    /// `host:port`, ready for `TcpStream::connect`.
    Tcp(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub target: Target,
    pub export: String,
}

impl std::str::FromStr for NbdUri {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            let (path_part, query) = rest.split_once('?').ok_or("missing ?socket=PATH")?;
            let export = export_name(path_part)?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or("missing socket= in the query")?;
            if socket.is_empty() {
                return Err("empty socket path".into());
            }
            Ok(NbdUri {
                target: Target::Unix(PathBuf::from(percent_decode(socket)?)),
                export,
            })
        } else if let Some(rest) = s.strip_prefix("nbd://") {
            let (authority, path_part) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            if authority.is_empty() {
                return Err("missing host".into());
            }
            let has_port = match authority.rfind(']') {
                Some(close) => authority[close..].contains(':'), // [::1]:10809
                None => authority.contains(':'),
            };
            let addr = if has_port {
                authority.to_string()
            } else {
                format!("{authority}:10809")
            };
            Ok(NbdUri {
                target: Target::Tcp(addr),
                export: export_name(path_part)?,
            })
        } else {
            Err("expected nbd+unix:///NAME?socket=PATH or nbd://HOST:PORT/NAME".into())
        }
    }
}

/// The export name is the path without its leading slash, percent-decoded.
fn export_name(path: &str) -> Result<String, String> {
    percent_decode(path.strip_prefix('/').unwrap_or(path))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or("truncated %-escape")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| "bad %-escape")?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "escape is not UTF-8".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<NbdUri, String> {
        s.parse()
    }

    #[test]
    fn unix() {
        let u = p("nbd+unix:///vol%201?socket=/run/c/nbd.sock").unwrap();
        assert_eq!(u.export, "vol 1");
        assert_eq!(u.target, Target::Unix("/run/c/nbd.sock".into()));
        assert_eq!(p("nbd+unix://?socket=/s").unwrap().export, "");
        assert!(p("nbd+unix:///vol").is_err());
    }

    #[test]
    fn tcp() {
        let u = p("nbd://127.0.0.1:10810/data").unwrap();
        assert_eq!(
            (u.target, u.export.as_str()),
            (Target::Tcp("127.0.0.1:10810".into()), "data")
        );
        assert_eq!(
            p("nbd://localhost").unwrap().target,
            Target::Tcp("localhost:10809".into())
        );
        assert_eq!(
            p("nbd://[::1]/x").unwrap().target,
            Target::Tcp("[::1]:10809".into())
        );
        assert!(p("http://x/y").is_err());
    }
}
