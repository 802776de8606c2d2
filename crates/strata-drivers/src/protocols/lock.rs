//! Image locking compatible with QEMU's (block/file-posix.c): open file
//! description locks on single bytes, so a qemu-io writer and a strata-io
//! writer refuse each other.
//!
//! For every permission bit `i` a user holds, it takes a shared lock on byte
//! 100 + i; for every bit it does not share, on byte 200 + i. A new user
//! checks that nobody locks 200 + i for a bit it wants, nor 100 + i for a bit
//! it refuses to share.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};
use strata_block::{Error, Perm, Result};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const PERM_BITS: u8 = 4;

fn flock(fd: RawFd, cmd: i32, ty: i32, byte: i64) -> std::io::Result<libc::flock> {
    // SAFETY: an all-zero flock is a valid value; we fill in what matters.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: fl is a valid flock for the duration of the call.
    let r = unsafe { libc::fcntl(fd, cmd, &mut fl) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(fl)
    }
}

/// True when another open file description holds a lock on `byte`.
fn locked_by_other(fd: RawFd, byte: i64) -> std::io::Result<bool> {
    let fl = flock(fd, libc::F_OFD_GETLK, libc::F_WRLCK, byte)?;
    Ok(fl.l_type != libc::F_UNLCK as i16)
}

/// Takes the lock bytes for (`perm`, `shared`) on `fd` and checks that no one
/// else conflicts. `filename` goes into the error message.
pub fn apply(fd: RawFd, perm: Perm, shared: Perm, filename: &str) -> Result<()> {
    for i in 0..PERM_BITS {
        let bit = Perm(1 << i);
        let (want, refuse) = (perm.contains(bit), !shared.contains(bit));
        for (cond, base) in [(want, PERM_BASE), (refuse, SHARED_BASE)] {
            let ty = if cond { libc::F_RDLCK } else { libc::F_UNLCK };
            flock(fd, libc::F_OFD_SETLK, ty, base + i as i64).map_err(|e| {
                Error::from(e).context(format!("Failed to lock byte {}", base + i as i64))
            })?;
        }
    }
    for i in 0..PERM_BITS {
        let bit = Perm(1 << i);
        let name = Perm::bit_name(i);
        if perm.contains(bit) && locked_by_other(fd, SHARED_BASE + i as i64)? {
            return Err(conflict(format!("Failed to get \"{name}\" lock"), filename));
        }
        if !shared.contains(bit) && locked_by_other(fd, PERM_BASE + i as i64)? {
            return Err(conflict(
                format!("Failed to get shared \"{name}\" lock"),
                filename,
            ));
        }
    }
    Ok(())
}

/// How long opening waits for a conflicting lock to go. A process killed
/// with io_uring requests in flight is reaped before the kernel tears its
/// ring down, and the ring's references keep the file, and its locks, for
/// a few milliseconds more (up to 8 ms measured). Its writes may land in
/// that time, so the lock is right to stay; a tool restarted at once waits
/// for it instead of failing. A real conflict is reported this much later.
const OPEN_PATIENCE: Duration = Duration::from_millis(200);

/// [`apply`], retried while another user conflicts, for up to
/// [`OPEN_PATIENCE`]: the first lock an open takes.
pub fn apply_patiently(fd: RawFd, perm: Perm, shared: Perm, filename: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        match apply(fd, perm, shared, filename) {
            Err(e) if e.code() == libc::EAGAIN && start.elapsed() < OPEN_PATIENCE => {
                std::thread::sleep(Duration::from_millis(1));
            }
            r => return r,
        }
    }
}

fn conflict(what: String, filename: &str) -> Error {
    Error::msg(
        libc::EAGAIN,
        format!("{what}\nIs another process using the image [{filename}]?"),
    )
}
