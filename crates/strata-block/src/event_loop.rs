//! Event loops (QEMU: AioContext / IOThread): an async runtime on one thread
//! with its own io_uring ring.

use crate::engine::Ring;
use std::future::Future;
use std::sync::Arc;

/// An event loop on the calling thread: a current-thread tokio runtime and a ring.
pub struct EventLoop {
    rt: tokio::runtime::Runtime,
    ring: Option<Arc<Ring>>,
}

impl EventLoop {
    /// Builds the runtime and, where the kernel allows, the ring. Without a ring
    /// (old kernel, seccomp) file nodes fall back to the thread pool.
    pub fn new() -> std::io::Result<EventLoop> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let ring = rt.block_on(async { Ring::start() }).ok();
        Ok(EventLoop { rt, ring })
    }

    /// Runs `fut` to completion on this loop.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        let _guard = self.ring.as_ref().map(|r| r.enter());
        self.rt.block_on(fut)
    }
}
