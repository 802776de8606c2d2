//! `--daemonize` (QEMU: os_daemonize, os_setup_post): the process forks
//! twice into a new session before any thread starts; the first parent
//! waits and exits 0 only once the daemon reports a complete start-up,
//! after which the daemon's standard streams go to /dev/null.

use std::os::fd::RawFd;

/// The daemon's end of the start-up pipe.
pub struct Daemonized {
    pipe: RawFd,
}

/// Forks into the background. Returns in the daemon only; the parent
/// exits with the daemon's start-up status.
pub fn daemonize() -> Daemonized {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        std::process::exit(1);
    }
    // SAFETY: no other thread exists yet, so the child may run Rust code.
    match unsafe { libc::fork() } {
        pid if pid > 0 => {
            // SAFETY: closing our copy of the write end; reading one byte
            // into a valid buffer.
            unsafe { libc::close(fds[1]) };
            let mut status = [1u8];
            let n = loop {
                let n = unsafe { libc::read(fds[0], status.as_mut_ptr().cast(), 1) };
                if n >= 0
                    || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                {
                    break n;
                }
            };
            std::process::exit(if n == 1 && status[0] == 0 { 0 } else { 1 });
        }
        pid if pid < 0 => std::process::exit(1),
        _ => {}
    }
    // SAFETY: closing the read end in the child; setsid and fork as above.
    unsafe {
        libc::close(fds[0]);
        libc::setsid();
        match libc::fork() {
            pid if pid > 0 => libc::_exit(0),
            pid if pid < 0 => libc::_exit(1),
            _ => {}
        }
        libc::umask(0o027);
        libc::signal(libc::SIGTSTP, libc::SIG_IGN);
        libc::signal(libc::SIGTTOU, libc::SIG_IGN);
        libc::signal(libc::SIGTTIN, libc::SIG_IGN);
    }
    Daemonized { pipe: fds[1] }
}

impl Daemonized {
    /// Start-up is complete: leave the working directory, detach the
    /// standard streams and let the waiting parent exit 0.
    pub fn finish(self) -> Result<(), String> {
        // SAFETY: chdir and open get valid C strings; dup2/close/write act
        // on descriptors we own, with a valid one-byte buffer.
        unsafe {
            if libc::chdir(c"/".as_ptr()) < 0 {
                let e = std::io::Error::last_os_error();
                return Err(format!(
                    "not able to chdir to /: {}",
                    strata_block::error::strerror(e.raw_os_error().unwrap_or(libc::EIO))
                ));
            }
            let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            if fd < 0 {
                std::process::exit(1);
            }
            libc::dup2(fd, 0);
            libc::dup2(fd, 1);
            libc::dup2(fd, 2);
            libc::close(fd);
            let status = 0u8;
            if libc::write(self.pipe, (&status as *const u8).cast(), 1) != 1 {
                std::process::exit(1);
            }
            libc::close(self.pipe);
        }
        Ok(())
    }
}
