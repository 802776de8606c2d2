//! The io_uring engine: one ring per event loop.
//!
//! Operations push their entries onto the submission queue without entering
//! the kernel; a flusher task, woken by the first entry of a batch, submits the
//! whole batch in one `io_uring_enter` once every task that was ready in this
//! loop turn has queued its work (tokio's current-thread queue is FIFO, so the
//! flusher runs after them). A full queue is submitted at once. Completions are
//! reaped right after a submit (many complete inline) and whenever the ring's
//! file descriptor becomes readable.
//!
//! Every operation's buffer sits in the operation until its completion arrives;
//! a dropped operation leaves it in its slot, to be freed by the reaper.

use super::{kernel_result, Fd, FileOp};
use crate::buf::IoBuf;
use crate::error::{Error, Result};
use io_uring::{opcode, types, IoUring};
use std::cell::RefCell;
use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;

const RING_ENTRIES: u32 = 256;

thread_local! {
    static CURRENT: RefCell<Option<Arc<Ring>>> = const { RefCell::new(None) };
}

/// The ring of the event loop running on this thread, if any.
pub fn current_ring() -> Option<Arc<Ring>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Whether this thread runs an event loop with a ring (no reference taken).
pub fn on_ring_thread() -> bool {
    CURRENT.with(|c| c.borrow().is_some())
}

/// What an operation keeps alive while the kernel works on it.
struct Keep {
    _fd: Arc<Fd>,
    buf: Option<IoBuf>,
}

enum Slot {
    Free,
    Waiting(Option<Waker>, Keep),
    Done(i32, Keep),
    /// The operation's future was dropped; free the slot when the kernel is done.
    Abandoned(#[allow(dead_code)] Keep), // held only so the kernel's buffer outlives it
}

struct Inner {
    uring: IoUring,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Entries pushed but not yet submitted.
    queued: usize,
    /// The flusher has been woken for the current batch.
    flush_pending: bool,
    /// Completions being handed out, kept between reaps (no allocation each).
    reaped: Vec<(usize, i32)>,
}

/// One io_uring instance, owned by an event loop.
pub struct Ring {
    inner: Mutex<Inner>,
    flush: Notify,
}

/// The ring's file descriptor, readable when completions are waiting; owning
/// the ring keeps the descriptor open for as long as the reactor watches it.
struct RingFd(Arc<Ring>, RawFd);
impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.1
    }
}

impl Ring {
    /// Creates a ring and starts its flusher and reaper on the current runtime.
    pub fn start() -> std::io::Result<Arc<Ring>> {
        // Cooperative task running: a completion the kernel's workers post
        // (buffered writes, mostly) waits for this thread's next system
        // call instead of interrupting it with an IPI; writes through the
        // page cache at depth 32 are 20-30 % faster (scripts/bench-img).
        // Kernels before 5.19 lack it: a plain ring then.
        let uring = IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 4)
            .setup_coop_taskrun()
            .build(RING_ENTRIES)
            .or_else(|_| {
                IoUring::builder()
                    .setup_cqsize(RING_ENTRIES * 4)
                    .build(RING_ENTRIES)
            })?;
        let raw_fd = uring.as_raw_fd();
        let ring = Arc::new(Ring {
            inner: Mutex::new(Inner {
                uring,
                slots: Vec::new(),
                free: Vec::new(),
                queued: 0,
                flush_pending: false,
                reaped: Vec::new(),
            }),
            flush: Notify::new(),
        });
        // SAFETY: RingFd owns the ring, so the descriptor stays open and the same
        // for as long as the AsyncFd lives.
        let readable = unsafe {
            AsyncFd::register_with_interest(RingFd(Arc::clone(&ring), raw_fd), Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        tokio::spawn(async move {
            loop {
                let Ok(mut guard) = readable.readable().await else {
                    return;
                };
                // Clear first: a completion posted after this re-arms the edge.
                guard.clear_ready();
                guard.get_inner().0.lock().reap();
            }
        });
        let flusher = Arc::clone(&ring);
        tokio::spawn(async move {
            loop {
                flusher.flush.notified().await;
                let mut inner = flusher.lock();
                inner.flush_pending = false;
                inner.submit();
                inner.reap();
            }
        });
        Ok(ring)
    }

    /// Makes this ring the current thread's ring until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> RingGuard {
        let prev = CURRENT.with(|c| c.borrow_mut().replace(Arc::clone(self)));
        RingGuard { prev }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock means a panic elsewhere; the ring state itself is consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues one file operation and waits for its completion.
    pub async fn run(self: Arc<Self>, fd: Arc<Fd>, op: FileOp) -> (Result<usize>, Option<IoBuf>) {
        let raw = types::Fd(fd.raw());
        let (entry, mut buf) = match op {
            FileOp::Read(off, mut b) => {
                let e = opcode::Read::new(raw, b.as_mut_ptr(), b.len() as u32)
                    .offset(off)
                    .build();
                (e, Some(b))
            }
            FileOp::Write(off, b) => {
                let e = opcode::Write::new(raw, b.as_ptr(), b.len() as u32)
                    .offset(off)
                    .build();
                (e, Some(b))
            }
            FileOp::Flush => (
                opcode::Fsync::new(raw)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                None,
            ),
            FileOp::Fallocate(mode, off, len) => (
                opcode::Fallocate::new(raw, len)
                    .offset(off)
                    .mode(mode)
                    .build(),
                None,
            ),
        };
        if buf.as_ref().is_some_and(|b| b.len() > u32::MAX as usize) {
            return (Err(Error::errno(libc::EINVAL)), buf.take());
        }
        let idx = {
            let mut inner = self.lock();
            let idx = inner.alloc_slot(Keep { _fd: fd, buf });
            inner.push(entry.user_data(idx as u64));
            if !inner.flush_pending {
                inner.flush_pending = true;
                self.flush.notify_one();
            }
            idx
        };
        let (ret, keep) = Completion {
            ring: &self,
            idx,
            done: false,
        }
        .await;
        (kernel_result(ret as i64), keep.buf)
    }
}

/// Restores the previous current ring on drop.
pub struct RingGuard {
    prev: Option<Arc<Ring>>,
}

impl Drop for RingGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| *c.borrow_mut() = self.prev.take());
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The kernel may still complete operations after the ring is gone
        // (io-wq workers): their buffers must never be freed, so leak them.
        for slot in self.slots.drain(..) {
            if let Slot::Waiting(_, keep) | Slot::Abandoned(keep) = slot {
                std::mem::forget(keep);
            }
        }
    }
}

impl Inner {
    fn alloc_slot(&mut self, keep: Keep) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Slot::Waiting(None, keep);
                i
            }
            None => {
                self.slots.push(Slot::Waiting(None, keep));
                self.slots.len() - 1
            }
        }
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) {
        loop {
            // SAFETY: the entry's buffer and fd are kept alive in its slot until
            // its completion is reaped.
            if unsafe { self.uring.submission().push(&entry) }.is_ok() {
                self.queued += 1;
                return;
            }
            // Queue full: submit what is there and retry.
            self.submit();
            self.reap();
        }
    }

    fn submit(&mut self) {
        if self.queued == 0 {
            return;
        }
        match self.uring.submit() {
            Ok(n) => self.queued -= n.min(self.queued),
            // EBUSY/EAGAIN: the completion queue is full; reap, then retry.
            Err(_) => {
                self.reap();
                if let Ok(n) = self.uring.submit() {
                    self.queued -= n.min(self.queued);
                }
            }
        }
    }

    fn reap(&mut self) {
        let mut done = std::mem::take(&mut self.reaped);
        done.extend(
            self.uring
                .completion()
                .map(|cqe| (cqe.user_data() as usize, cqe.result())),
        );
        for &(idx, res) in &done {
            let Some(slot) = self.slots.get_mut(idx) else {
                continue;
            };
            match std::mem::replace(slot, Slot::Free) {
                Slot::Waiting(waker, keep) => {
                    *slot = Slot::Done(res, keep);
                    if let Some(w) = waker {
                        w.wake();
                    }
                }
                Slot::Abandoned(_) => self.free.push(idx),
                other => *slot = other,
            }
        }
        done.clear();
        self.reaped = done;
    }
}

/// Waits for the completion of the operation in slot `idx`.
struct Completion<'a> {
    ring: &'a Ring,
    idx: usize,
    done: bool,
}

impl Future for Completion<'_> {
    type Output = (i32, Keep);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let idx = self.idx;
        let mut inner = self.ring.lock();
        let slot = &mut inner.slots[idx];
        match std::mem::replace(slot, Slot::Free) {
            Slot::Done(res, keep) => {
                inner.free.push(idx);
                drop(inner);
                self.done = true;
                Poll::Ready((res, keep))
            }
            Slot::Waiting(_, keep) => {
                *slot = Slot::Waiting(Some(cx.waker().clone()), keep);
                Poll::Pending
            }
            other => {
                *slot = other;
                Poll::Pending
            }
        }
    }
}

impl Drop for Completion<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut inner = self.ring.lock();
        let idx = self.idx;
        match std::mem::replace(&mut inner.slots[idx], Slot::Free) {
            Slot::Waiting(_, keep) => inner.slots[idx] = Slot::Abandoned(keep),
            Slot::Done(..) => inner.free.push(idx),
            other => inner.slots[idx] = other,
        }
    }
}
