//! Mounting a FUSE filesystem over one regular file, as libfuse does for
//! a privileged process: `/dev/fuse` opened, then mount(2) with its
//! descriptor in the options. No fusermount: the daemon runs as root, as
//! qemu-storage-daemon must for the same mount.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};

/// Checks that `path` is a regular file, in QEMU's words.
pub fn check_regular_file(path: &str) -> Result<(), String> {
    match std::fs::metadata(path) {
        Err(e) => Err(format!(
            "Failed to stat '{path}': {}",
            strata_block::error::strerror(e.raw_os_error().unwrap_or(libc::EIO))
        )),
        Ok(m) if !m.is_file() => Err(format!("'{path}' is not a regular file")),
        Ok(_) => Ok(()),
    }
}

/// Opens `/dev/fuse` (non-blocking, for the event loop) and mounts it on
/// `mountpoint`: the file's own inode becomes the root of the filesystem.
pub fn mount(mountpoint: &str, allow_other: bool) -> std::io::Result<OwnedFd> {
    let dev = CString::new("/dev/fuse").unwrap_or_default();
    // SAFETY: a valid C string; the result is checked.
    let raw = unsafe {
        libc::open(
            dev.as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just opened and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: getuid and getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let opts = format!(
        "max_read={},default_permissions{},fd={raw},rootmode={:o},user_id={uid},group_id={gid}",
        crate::proto::MAX_READ,
        if allow_other { ",allow_other" } else { "" },
        libc::S_IFREG,
    );
    let target =
        CString::new(mountpoint).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let fstype = CString::new("fuse").unwrap_or_default();
    let data = CString::new(opts).unwrap_or_default();
    // SAFETY: valid C strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            dev.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr().cast(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Takes the filesystem off `mountpoint`, lazily as libfuse does, so that
/// a client still holding the file open does not keep the daemon waiting.
pub fn unmount(mountpoint: &str) {
    if let Ok(target) = CString::new(mountpoint) {
        // SAFETY: a valid C string; failure leaves nothing to undo.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}
