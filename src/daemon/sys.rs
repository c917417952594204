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

/// Renames `from` to `to` unless `to` exists (`renameat2(RENAME_NOREPLACE)`), then syncs the
/// directory. A new volume is written under a temporary name and appears under its own name
/// only whole, and never over a volume that appeared meanwhile.
pub fn rename_noreplace(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &std::path::Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: both pointers are NUL-terminated strings that outlive the call; AT_FDCWD makes
    // the paths relative to the working directory as usual.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
        // The file system does not support the flag: a hard link fails on an existing name
        // just the same.
        std::fs::hard_link(from, to)?;
        std::fs::remove_file(from)?;
    }
    if let Some(dir) = to.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
