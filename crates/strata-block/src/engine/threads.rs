//! The thread-pool engine (`aio=threads`): blocking system calls on tokio's
//! blocking pool, each owning its buffer until the call returns.

use super::{kernel_result, Fd, FileOp};
use crate::buf::IoBuf;
use crate::error::{Error, Result};
use std::sync::Arc;

/// Runs one operation on a pool thread.
pub async fn run(fd: Arc<Fd>, op: FileOp) -> (Result<usize>, Option<IoBuf>) {
    off_loop(move || blocking(&fd, op))
        .await
        .unwrap_or_else(|e| (Err(e), None))
}

/// Runs `task` on tokio's blocking pool, so that the event loop goes on
/// serving every other request meanwhile (a blocking system call, seconds
/// of key derivation); outside any runtime it just runs here. An error
/// only if the pool lost the task (it panicked or the runtime is going).
pub async fn off_loop<T: Send + 'static>(task: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => h
            .spawn_blocking(task)
            .await
            .map_err(|_| Error::errno(libc::EIO)),
        Err(_) => Ok(task()),
    }
}

/// The system call for `op`. Regular files and block devices do not return
/// EINTR for these calls, so there is no retry loop.
pub fn blocking(fd: &Fd, op: FileOp) -> (Result<usize>, Option<IoBuf>) {
    // SAFETY (all arms): the buffers are owned by `op` and live across the call.
    let (ret, buf) = match op {
        FileOp::Read(off, mut b) => {
            let r = unsafe {
                libc::pread(fd.raw(), b.as_mut_ptr().cast(), b.len(), off as libc::off_t)
            };
            (r as i64, Some(b))
        }
        FileOp::Write(off, b) => {
            let r =
                unsafe { libc::pwrite(fd.raw(), b.as_ptr().cast(), b.len(), off as libc::off_t) };
            (r as i64, Some(b))
        }
        FileOp::Flush => (unsafe { libc::fdatasync(fd.raw()) } as i64, None),
        FileOp::Fallocate(mode, off, len) => (
            unsafe { libc::fallocate(fd.raw(), mode, off as libc::off_t, len as libc::off_t) }
                as i64,
            None,
        ),
    };
    if ret < 0 {
        let errno = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        return (Err(Error::errno(errno)), buf);
    }
    (kernel_result(ret), buf)
}
