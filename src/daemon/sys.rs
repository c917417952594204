//! The process hardening calls std lacks.
#![allow(unsafe_code)]

/// Marks the process non-dumpable: no core dumps (which would hold keys), no ptrace by
/// same-uid processes.
pub fn set_non_dumpable() -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) only reads its integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether the process is dumpable (tests and the start-up check).
pub fn is_dumpable() -> bool {
    // SAFETY: prctl(PR_GET_DUMPABLE) takes no pointers.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != 0 }
}

/// Files the daemon creates (key store, audit log, volumes) are private to it, also when it
/// is started by hand rather than by the unit (which sets UMask=0077 too).
pub fn private_umask() {
    // SAFETY: umask only sets the process file-mode mask; it cannot fail.
    unsafe { libc::umask(0o077) };
}

/// The effective uid. Not the owner of /proc/self: that is root once the process is not
/// dumpable, whatever its uid.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// Raises the soft limit on open files to the hard limit, best effort, and returns the soft
/// limit in force. Every NBD connection is a descriptor: `max_connections` (1024 by default)
/// does not fit under the usual soft limit of 1024 (systemd's default for services too).
pub fn raise_fd_limit() -> Option<u64> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid, exclusively borrowed `l`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return None;
    }
    if l.rlim_cur < l.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: l.rlim_max,
            rlim_max: l.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit from the valid `raised`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            l = raised;
        }
    }
    Some(l.rlim_cur)
}
