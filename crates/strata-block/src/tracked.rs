//! Tracked requests: every request in flight on a node, so that drained
//! sections can wait for all of them and a serialising request
//! (read-modify-write, copy-on-read, truncate) never interleaves with an
//! overlapping one.
//!
//! Rules (QEMU's): a request waits only at its start. A serialising request
//! waits for every overlapping request in flight, any other request only for
//! overlapping serialising ones; but nobody waits for a request that is
//! itself waiting (it will wait for us in turn when it wakes, if need be).
//! So a wait never leads to another wait, and waits cannot form a cycle.
//! A woken request looks again at everything in flight, later requests
//! included, before it goes on.
//!
//! Cost: one lock to start a request and one to end it; requests live in
//! reused slots and get a wake-up only once somebody waits for them. An
//! ordinary request checks only the serialising requests in flight (usually
//! none); only a serialising one looks at every request. A request that
//! ends wakes the requests that wait for it, not every waiter.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::Notify;

struct Entry {
    start: u64,
    end: u64,
    serialising: bool,
    /// Waiting for another request: nobody waits for it meanwhile.
    waiting: bool,
    /// Tells this entry from an earlier one in the same slot.
    generation: u64,
    /// Woken when this request ends; made only once somebody waits for it.
    done: Option<Arc<Notify>>,
}

/// The requests in flight, in slots reused once free (no allocation per
/// request once warm), with the serialising ones also listed by slot.
#[derive(Default)]
struct Inner {
    slots: Vec<Option<Entry>>,
    free: Vec<usize>,
    serialising: Vec<usize>,
    next_generation: u64,
    /// Requests in flight, empty ranges included (for drain).
    count: usize,
}

impl Inner {
    fn insert(&mut self, start: u64, end: u64, serialising: bool) -> usize {
        self.count += 1;
        let generation = self.next_generation;
        self.next_generation += 1;
        let entry = Entry {
            start,
            end,
            serialising,
            waiting: false,
            generation,
            done: None,
        };
        let slot = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(entry);
                i
            }
            None => {
                self.slots.push(Some(entry));
                self.slots.len() - 1
            }
        };
        if serialising {
            self.serialising.push(slot);
        }
        slot
    }

    fn remove(&mut self, slot: usize) -> Option<Entry> {
        let e = self.slots.get_mut(slot)?.take()?;
        self.count -= 1;
        self.free.push(slot);
        if e.serialising {
            self.serialising.retain(|&i| i != slot);
        }
        Some(e)
    }

    /// The slot of a request `[start, end)` (in `me`) must wait for, if
    /// any: an overlapping one that is not waiting itself.
    fn conflict(&self, me: usize, start: u64, end: u64, serialising: bool) -> Option<usize> {
        let blocks = |i: usize| {
            i != me
                && self.slots[i]
                    .as_ref()
                    .is_some_and(|e| !e.waiting && e.start < end && start < e.end)
        };
        if serialising {
            (0..self.slots.len()).find(|&i| blocks(i))
        } else {
            self.serialising.iter().copied().find(|&i| blocks(i))
        }
    }

    fn entry(&mut self, slot: usize) -> Option<&mut Entry> {
        self.slots.get_mut(slot).and_then(Option::as_mut)
    }

    /// What the request in `slot` must wait for now: the slot, generation
    /// and wake-up of a request in its way. Its waiting mark is set under
    /// the same lock as the check, so that no two requests can each see the
    /// other running and both wait.
    fn check(
        &mut self,
        slot: usize,
        start: u64,
        end: u64,
        serialising: bool,
    ) -> Option<(usize, u64, Arc<Notify>)> {
        let c = self.conflict(slot, start, end, serialising);
        if let Some(e) = self.entry(slot) {
            e.waiting = c.is_some();
        }
        let other = c?;
        let o = self.entry(other)?;
        let done = Arc::clone(o.done.get_or_insert_with(|| Arc::new(Notify::new())));
        Some((other, o.generation, done))
    }
}

/// The in-flight requests of one node.
#[derive(Default)]
pub struct Tracker {
    inner: Mutex<Inner>,
    /// Drains waiting for the count to reach zero (none: no wake-up to send).
    idle_waiters: AtomicUsize,
    /// Woken when the last request in flight ends (drain).
    idle: Notify,
}

/// A registered request on its way in: ready, or waiting its turn.
pub enum Begin<'a> {
    Ready(Option<TrackedRequest<'a>>),
    Waiting(Pin<Box<dyn Future<Output = TrackedRequest<'a>> + Send + 'a>>),
}

impl<'a> Future for Begin<'a> {
    type Output = TrackedRequest<'a>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<TrackedRequest<'a>> {
        match self.get_mut() {
            Begin::Ready(r) => match r.take() {
                Some(r) => Poll::Ready(r),
                None => panic!("tracked request begin polled after it completed"),
            },
            Begin::Waiting(f) => f.as_mut().poll(cx),
        }
    }
}

/// A request in flight; dropping it ends the request and wakes its waiters.
pub struct TrackedRequest<'a> {
    tracker: &'a Tracker,
    slot: usize,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a request over `[start, end)` at once, and returns a
    /// future that waits for the earlier requests it must not overlap with.
    /// An empty range (flush, block status) never waits, but counts as in
    /// flight for drain. The usual case, nothing in the way, is ready at
    /// once and small: only a request that must wait carries a waiting
    /// future (boxed), so the request futures that hold this stay small.
    pub fn begin(&self, start: u64, end: u64, serialising: bool) -> Begin<'_> {
        // Registration and the first check under one lock: the common case
        // (nothing to wait for) takes it once.
        let (slot, wait) = {
            let mut g = self.lock();
            let slot = g.insert(start, end, serialising);
            let wait = (start < end)
                .then(|| g.check(slot, start, end, serialising))
                .flatten();
            (slot, wait)
        };
        // The guard exists before the first wait, so a request dropped while
        // waiting still leaves the list.
        let req = TrackedRequest {
            tracker: self,
            slot,
        };
        match wait {
            None => Begin::Ready(Some(req)),
            Some(w) => Begin::Waiting(Box::pin(self.wait_turn(req, start, end, serialising, w))),
        }
    }

    async fn wait_turn<'a>(
        &'a self,
        req: TrackedRequest<'a>,
        start: u64,
        end: u64,
        serialising: bool,
        first: (usize, u64, Arc<Notify>),
    ) -> TrackedRequest<'a> {
        let mut wait = Some(first);
        while let Some((other, generation, done)) = wait {
            let notified = done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // The other may have ended between the check and enable().
            let still = self
                .lock()
                .entry(other)
                .is_some_and(|e| e.generation == generation);
            if still {
                notified.await;
            }
            wait = self.lock().check(req.slot, start, end, serialising);
        }
        req
    }

    /// Number of requests in flight (for drain).
    pub fn in_flight(&self) -> usize {
        self.lock().count
    }

    /// Waits until no request is in flight.
    pub async fn wait_idle(&self) {
        self.idle_waiters.fetch_add(1, Ordering::AcqRel);
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                break;
            }
            notified.await;
        }
        self.idle_waiters.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for TrackedRequest<'_> {
    fn drop(&mut self) {
        let (entry, last) = {
            let mut g = self.tracker.lock();
            let e = g.remove(self.slot);
            (e, g.count == 0)
        };
        if let Some(done) = entry.and_then(|e| e.done) {
            done.notify_waiters();
        }
        if last && self.tracker.idle_waiters.load(Ordering::Acquire) > 0 {
            self.tracker.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serialising_waits_for_earlier_overlap_only() {
        let t = Arc::new(Tracker::default());
        let a = t.begin(0, 512, false).await;
        // Non-overlapping serialising request does not wait.
        let b = t.begin(4096, 8192, true).await;
        drop(b);
        let t2 = Arc::clone(&t);
        let h = tokio::spawn(async move {
            let _c = t2.begin(0, 4096, true).await;
        });
        tokio::task::yield_now().await;
        assert!(!h.is_finished());
        drop(a);
        h.await.unwrap();
        assert_eq!(t.in_flight(), 0);
    }

    #[tokio::test]
    async fn ordinary_waits_for_serialising_and_empty_never_waits() {
        let t = Arc::new(Tracker::default());
        let s = t.begin(0, 4096, true).await;
        // A flush (empty range) passes at once and counts as in flight.
        let f = t.begin(0, 0, false).await;
        assert_eq!(t.in_flight(), 2);
        drop(f);
        let t2 = Arc::clone(&t);
        let h = tokio::spawn(async move {
            let _w = t2.begin(1024, 2048, false).await;
        });
        // A non-overlapping ordinary request does not wait.
        let _other = t.begin(8192, 9000, false).await;
        tokio::task::yield_now().await;
        assert!(!h.is_finished());
        drop(s);
        h.await.unwrap();
    }

    #[tokio::test]
    async fn nobody_waits_for_a_waiting_request() {
        // A holds [0, 4k); C (serialising, [0, 8k)) waits for A; B
        // (serialising, [4k, 8k)) overlaps only C, which is waiting: B goes
        // on at once (QEMU's rule; iotest 077). When A ends, C waits for B.
        let t = Arc::new(Tracker::default());
        let a = t.begin(0, 4096, true).await;
        let t2 = Arc::clone(&t);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let c = tokio::spawn(async move {
            let _c = t2.begin(0, 8192, true).await;
            tx.send("c").unwrap();
        });
        tokio::task::yield_now().await;
        let b = t.begin(4096, 8192, true).await;
        drop(a);
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err(), "C must now wait for B");
        drop(b);
        c.await.unwrap();
        assert_eq!(rx.recv().await, Some("c"));
    }

    #[tokio::test]
    async fn wait_idle_returns_when_the_last_request_ends() {
        let t = Arc::new(Tracker::default());
        let a = t.begin(0, 512, false).await;
        let t2 = Arc::clone(&t);
        let h = tokio::spawn(async move { t2.wait_idle().await });
        tokio::task::yield_now().await;
        assert!(!h.is_finished());
        drop(a);
        h.await.unwrap();
    }
}
