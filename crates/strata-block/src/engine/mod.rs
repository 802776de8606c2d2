//! I/O engines: how a file's reads and writes reach the kernel.
//!
//! Both engines take owned buffers and give them back with the result, so an
//! operation owns its memory until the kernel is done with it, even when the
//! future that asked for it is dropped.

mod inline;
mod threads;
mod uring;

pub use inline::InlineWrites;
pub use threads::off_loop;
pub use uring::{current_ring, on_ring_thread, Ring};

use crate::buf::IoBuf;
use crate::error::{Error, Result};
use std::os::fd::RawFd;
use std::sync::Arc;

/// Which engine a file node uses (`aio=` option).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aio {
    /// io_uring on the node's event loop, submissions batched per loop turn.
    IoUring,
    /// A pool of threads doing blocking system calls.
    Threads,
}

impl Aio {
    /// Parses the `aio` option value as QEMU spells it.
    pub fn parse(s: &str) -> Result<Aio> {
        match s {
            "io_uring" => Ok(Aio::IoUring),
            "threads" => Ok(Aio::Threads),
            // Linux AIO is served by the ring: same semantics, one engine fewer.
            "native" => Ok(Aio::IoUring),
            _ => Err(Error::invalid(format!(
                "Parameter 'aio' does not accept value '{s}'"
            ))),
        }
    }
}

/// An open file descriptor that the engines operate on; closed on drop.
#[derive(Debug)]
pub struct Fd(RawFd);

impl Fd {
    /// Takes ownership of `fd`.
    pub fn new(fd: RawFd) -> Fd {
        Fd(fd)
    }
    /// The raw descriptor.
    pub fn raw(&self) -> RawFd {
        self.0
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor and close it once.
        unsafe { libc::close(self.0) };
    }
}

/// One operation on a file.
pub enum FileOp {
    /// Read `buf.len()` bytes at an offset.
    Read(u64, IoBuf),
    /// Write the buffer at an offset.
    Write(u64, IoBuf),
    /// fdatasync.
    Flush,
    /// fallocate(mode, offset, len).
    Fallocate(i32, u64, u64),
}

/// Runs `op` on `fd` with the chosen engine; returns the kernel's result
/// (bytes moved, or 0) and the buffer, if the operation had one.
///
/// io_uring is used when this thread has a ring (it runs an [`crate::EventLoop`]);
/// from any other thread the threads engine serves, which is correct, only slower.
pub async fn submit(aio: Aio, fd: &Arc<Fd>, op: FileOp) -> (Result<usize>, Option<IoBuf>) {
    if aio == Aio::IoUring {
        if let Some(ring) = current_ring() {
            return ring.run(Arc::clone(fd), op).await;
        }
    }
    threads::run(Arc::clone(fd), op).await
}

/// Converts a kernel return value (negative errno on failure) into a Result.
fn kernel_result(ret: i64) -> Result<usize> {
    if ret < 0 {
        Err(Error::errno(-ret as i32))
    } else {
        Ok(ret as usize)
    }
}
