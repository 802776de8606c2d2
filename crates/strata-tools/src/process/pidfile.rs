//! `--pidfile` (QEMU: qemu_write_pidfile): the file is created, locked for
//! as long as the daemon runs (a second daemon with the same file fails),
//! holds the process id, and is removed when the daemon ends.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use strata_block::error::strerror;

/// A written and locked PID file; removed on drop.
pub struct PidFile {
    path: String,
    _fd: OwnedFd,
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

impl PidFile {
    /// Creates, locks and writes the file. `Err` is QEMU's message.
    pub fn write(path: &str) -> Result<PidFile, String> {
        let c = CString::new(path)
            .map_err(|_| format!("Could not create '{path}': Invalid argument"))?;
        let fd = loop {
            // SAFETY: `c` is a valid C string; open has no other memory arguments.
            let raw = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC,
                    0o600,
                )
            };
            if raw < 0 {
                return Err(format!("Could not create '{path}': {}", strerror(errno())));
            }
            // SAFETY: `raw` is a descriptor we just opened and own.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let lock = libc::flock {
                l_type: libc::F_WRLCK as i16,
                l_whence: libc::SEEK_SET as i16,
                l_start: 0,
                l_len: 0,
                l_pid: 0,
            };
            // SAFETY: `lock` is a valid flock for the duration of the call.
            if unsafe { libc::fcntl(raw, libc::F_SETLK, &lock) } < 0 {
                return Err(format!("Cannot lock pid file: {}", strerror(errno())));
            }
            // The path must still name the file we locked (another daemon
            // may have replaced it meanwhile). fstat, not a second
            // descriptor: closing one would drop the lock.
            use std::os::unix::fs::MetadataExt;
            // SAFETY: `st` is a valid stat buffer for the call.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            if unsafe { libc::fstat(raw, &mut st) } < 0 {
                return Err(format!("Cannot stat file: {}", strerror(errno())));
            }
            match std::fs::metadata(path) {
                Ok(m) if m.ino() == st.st_ino => break fd,
                _ => continue,
            }
        };
        let text = format!("{}\n", std::process::id());
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        // SAFETY: plain system calls on our descriptor with a valid buffer.
        let ok = unsafe {
            libc::ftruncate(raw, 0) == 0
                && libc::write(raw, text.as_ptr().cast(), text.len()) == text.len() as isize
        };
        if !ok {
            let _ = std::fs::remove_file(path);
            return Err("Failed to write pid file".into());
        }
        let path = std::fs::canonicalize(path)
            .map(|p| p.to_string_lossy().into_owned())
            .map_err(|e| {
                let _ = std::fs::remove_file(path);
                format!(
                    "cannot resolve PID file path: {path}: {}",
                    strerror(e.raw_os_error().unwrap_or(libc::EIO))
                )
            })?;
        Ok(PidFile { path, _fd: fd })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
