//! Who may use the control socket: root, the daemon's own user, or members of the configured
//! group. Membership is what the kernel recorded for the peer at connect(): its gid
//! (SO_PEERCRED) and its supplementary groups (SO_PEERGROUPS, Linux >= 4.13). Nothing is read
//! from /proc, so the check also holds under the unit's `ProtectProc=invisible`.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// The access rule, fixed at start-up.
#[derive(Debug, Clone)]
pub struct Access {
    pub daemon_uid: u32,
    pub group: Option<u32>,
}

impl Access {
    /// `groups`: the peer's supplementary groups ([`peer_groups`]).
    pub fn allows(&self, uid: u32, gid: u32, groups: &[u32]) -> bool {
        if uid == 0 || uid == self.daemon_uid {
            return true;
        }
        self.group.is_some_and(|g| gid == g || groups.contains(&g))
    }
}

/// The supplementary groups of the process that connected `sock` (a connected Unix socket), as
/// of its connect(): getsockopt(SO_PEERGROUPS). The kernel answers ERANGE with the length it
/// needs when the buffer is too small; the call is then repeated once with that length.
pub fn peer_groups(sock: &impl AsFd) -> io::Result<Vec<u32>> {
    const GID: usize = size_of::<libc::gid_t>();
    // Most users are in a handful of groups; NGROUPS_MAX (65536) bounds the retry.
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    for _ in 0..2 {
        let mut len = libc::socklen_t::try_from(groups.len() * GID)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `groups` is valid for writes of `len` bytes and outlives the call; `len`
        // is a valid socklen_t the kernel reads and updates; the fd is borrowed (open) for the
        // duration of the call. The kernel writes at most `len` bytes.
        let r = unsafe {
            libc::getsockopt(
                sock.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let len = len as usize;
        if r == 0 {
            groups.truncate(len / GID);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || len <= groups.len() * GID {
            return Err(e);
        }
        groups.resize(len.div_ceil(GID), 0);
    }
    // The peer's credentials are fixed at connect(), so a second ERANGE cannot happen.
    Err(io::Error::from_raw_os_error(libc::ERANGE))
}

/// Looks a group name up in /etc/group (no NSS: the unit runs with a minimal system anyway).
pub fn group_gid(name: &str) -> Option<u32> {
    if let Ok(n) = name.parse::<u32>() {
        return Some(n);
    }
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 3 && f[0] == name)
                .then(|| f[2].parse().ok())
                .flatten()
        })
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_groups() -> Vec<u32> {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        let l = s.lines().find(|l| l.starts_with("Groups:")).unwrap();
        let mut g: Vec<u32> = l
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap())
            .collect();
        g.sort_unstable();
        g
    }

    #[test]
    fn peer_groups_are_the_connecting_process_groups() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut g = peer_groups(&a).unwrap();
        g.sort_unstable();
        assert_eq!(g, own_groups());
    }

    #[test]
    fn rule() {
        let a = Access {
            daemon_uid: 990,
            group: Some(42),
        };
        assert!(a.allows(0, 0, &[]), "root");
        assert!(a.allows(990, 990, &[]), "the daemon's own uid");
        assert!(a.allows(1000, 42, &[]), "primary group");
        assert!(a.allows(1000, 1000, &[7, 42]), "supplementary group");
        assert!(!a.allows(1000, 1000, &[7, 43]));
        let none = Access {
            daemon_uid: 990,
            group: None,
        };
        assert!(!none.allows(1000, 42, &[42]));
    }
}
