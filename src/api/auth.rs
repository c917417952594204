//! Who may use the control socket: root, the daemon's own user, or members of the configured
//! group (primary or supplementary, read from /proc for the peer's pid).

/// The access rule, fixed at start-up.
#[derive(Debug, Clone)]
pub struct Access {
    pub daemon_uid: u32,
    pub group: Option<u32>,
}

impl Access {
    pub fn allows(&self, uid: u32, gid: u32, pid: Option<i32>) -> bool {
        if uid == 0 || uid == self.daemon_uid {
            return true;
        }
        let Some(g) = self.group else { return false };
        if gid == g {
            return true;
        }
        // Supplementary groups of the peer process.
        pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Groups:"))
                    .map(str::to_owned)
            })
            .is_some_and(|l| {
                l.split_whitespace()
                    .skip(1)
                    .any(|x| x.parse::<u32>() == Ok(g))
            })
    }
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
