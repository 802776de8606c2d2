//! Event loops (QEMU: AioContext / IOThread): an async runtime on one thread
//! with its own io_uring ring. The main loop runs on the thread that calls
//! [`EventLoop::block_on`]; an [`IoThread`] is an OS thread running its own.
//! A node lives on one loop (its home), and its users send their requests
//! there through a [`LoopHandle`].

use crate::engine::Ring;
use crate::poll::{PollParams, Poller};
use std::future::Future;
use std::sync::Arc;

/// An event loop on the calling thread: a current-thread tokio runtime and a ring.
pub struct EventLoop {
    rt: tokio::runtime::Runtime,
    ring: Option<Arc<Ring>>,
    poller: Arc<Poller>,
}

impl EventLoop {
    /// Builds the runtime and, where the kernel allows, the ring. Without a ring
    /// (old kernel, seccomp) file nodes fall back to the thread pool.
    pub fn new() -> std::io::Result<EventLoop> {
        Self::with_polling(PollParams::default())
    }

    /// A loop that polls as `params` say after its clients' requests.
    pub fn with_polling(params: PollParams) -> std::io::Result<EventLoop> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let ring = rt.block_on(async { Ring::start() }).ok();
        let poller = Poller::new(params);
        // Runs only while the thread is in block_on, like all the loop's work.
        rt.spawn(Arc::clone(&poller).run());
        Ok(EventLoop { rt, ring, poller })
    }

    /// Runs `fut` to completion on this loop.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        let _guard = self.ring.as_ref().map(|r| r.enter());
        let _poll = crate::poll::enter(&self.poller);
        self.rt.block_on(fut)
    }

    /// Runs `fut` to completion as a task of this loop: for a tool's main
    /// I/O loop. Tokio polls a `block_on` future only after a zero-timeout
    /// look at epoll each time it is woken, which is one system call per
    /// request at queue depth 1 (a quarter of a cached 4 KiB read); a task
    /// is simply run. A panic in `fut` goes on in the caller.
    pub fn block_on_task<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.block_on(self.rt.spawn(fut)) {
            Ok(v) => v,
            Err(e) => match e.try_into_panic() {
                Ok(p) => std::panic::resume_unwind(p),
                // Only a runtime shutting down cancels it, and this one runs.
                Err(e) => unreachable!("main task cancelled: {e}"),
            },
        }
    }

    /// A handle that sends work to this loop (it runs while the loop's
    /// thread is inside [`block_on`](Self::block_on)).
    pub fn handle(&self, name: &str) -> LoopHandle {
        LoopHandle(Arc::new(LoopInner {
            name: name.to_string(),
            rt: self.rt.handle().clone(),
        }))
    }
}

struct LoopInner {
    name: String,
    rt: tokio::runtime::Handle,
}

/// Where work runs: a cheap, cloneable reference to an event loop.
#[derive(Clone)]
pub struct LoopHandle(Arc<LoopInner>);

impl LoopHandle {
    /// The loop's name (an I/O thread's id, or what the main loop was called).
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// True when both handles are the same loop.
    pub fn same(&self, other: &LoopHandle) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Starts `fut` on this loop.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0.rt.spawn(fut)
    }

    /// Runs `fut` on this loop and waits for its result from whatever loop
    /// the caller is on. None when the loop stopped before `fut` finished.
    pub async fn run<F>(&self, fut: F) -> Option<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.spawn(fut).await.ok()
    }
}

/// An I/O thread (QEMU: IOThread, `--object iothread,id=ID`): an OS thread
/// running its own event loop, with its own ring, until dropped.
pub struct IoThread {
    handle: LoopHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IoThread {
    /// Starts the thread `id` and waits until its loop runs.
    pub fn new(id: &str) -> std::io::Result<IoThread> {
        Self::with_polling(id, PollParams::default())
    }

    /// Starts the thread `id`, polling as `poll` says.
    pub fn with_polling(id: &str, poll: PollParams) -> std::io::Result<IoThread> {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let name = id.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("iothread-{id}"))
            .spawn(move || {
                let ev = match EventLoop::with_polling(poll) {
                    Ok(ev) => ev,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(ev.handle(&name)));
                // Work sent through the handle runs while this waits.
                ev.block_on(async {
                    let _ = stop_rx.await;
                });
            })?;
        let handle = ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("I/O thread died while starting"))??;
        Ok(IoThread {
            handle,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The thread's loop.
    pub fn handle(&self) -> &LoopHandle {
        &self.handle
    }

    /// The thread's id.
    pub fn id(&self) -> &str {
        self.handle.name()
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
