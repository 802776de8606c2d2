//! The thread-pool engine (`aio=threads`): blocking system calls on tokio's
//! blocking pool, each owning its buffer until the call returns.

use super::{kernel_result, Fd, FileOp};
use crate::buf::IoBuf;
use crate::error::{Error, Result};
use std::sync::Arc;

/// Runs one operation on a pool thread.
pub async fn run(fd: Arc<Fd>, op: FileOp) -> (Result<usize>, Option<IoBuf>) {
    let task = move || blocking(&fd, op);
    match tokio::runtime::Handle::try_current() {
        Ok(h) => match h.spawn_blocking(task).await {
            Ok(r) => r,
            Err(_) => (Err(Error::errno(libc::EIO)), None),
        },
        // Outside any runtime: just do it here.
        Err(_) => task(),
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
