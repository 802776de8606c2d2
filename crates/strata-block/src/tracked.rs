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
//! Cost: an ordinary request checks only the serialising requests in flight
//! (usually none); only a serialising one looks at every request. A request
//! that ends wakes the requests that wait for it, not every waiter.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

struct Entry {
    start: u64,
    end: u64,
    /// Waiting for another request: nobody waits for it meanwhile.
    waiting: bool,
    /// Woken when this request ends (only its waiters listen).
    done: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    /// Requests in flight by id.
    reqs: BTreeMap<u64, Entry>,
    /// Ids of the serialising requests among them.
    serialising: BTreeSet<u64>,
    next_id: u64,
}

impl Inner {
    /// A request `[start, end)` (id `id`) must wait for, if any: an
    /// overlapping one that is not waiting itself.
    fn conflict(&self, id: u64, start: u64, end: u64, serialising: bool) -> Option<Arc<Notify>> {
        let blocks = |i: &u64, e: &Entry| *i != id && !e.waiting && e.start < end && start < e.end;
        if serialising {
            self.reqs
                .iter()
                .find(|(i, e)| blocks(i, e))
                .map(|(_, e)| Arc::clone(&e.done))
        } else {
            self.serialising
                .iter()
                .filter_map(|i| self.reqs.get(i).map(|e| (i, e)))
                .find(|(i, e)| blocks(i, e))
                .map(|(_, e)| Arc::clone(&e.done))
        }
    }

    fn set_waiting(&mut self, id: u64, waiting: bool) {
        if let Some(e) = self.reqs.get_mut(&id) {
            e.waiting = waiting;
        }
    }
}

/// The in-flight requests of one node.
#[derive(Default)]
pub struct Tracker {
    inner: Mutex<Inner>,
    count: AtomicUsize,
    /// Woken when the last request in flight ends (drain).
    idle: Notify,
}

/// A request in flight; dropping it ends the request and wakes its waiters.
pub struct TrackedRequest<'a> {
    tracker: &'a Tracker,
    id: u64,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a request over `[start, end)` and waits for the earlier
    /// requests it must not overlap with. An empty range (flush, block
    /// status) never waits, but counts as in flight for drain.
    pub async fn begin(&self, start: u64, end: u64, serialising: bool) -> TrackedRequest<'_> {
        let id = {
            let mut g = self.lock();
            let id = g.next_id;
            g.next_id += 1;
            g.reqs.insert(
                id,
                Entry {
                    start,
                    end,
                    waiting: false,
                    done: Arc::new(Notify::new()),
                },
            );
            if serialising {
                g.serialising.insert(id);
            }
            id
        };
        self.count.fetch_add(1, Ordering::AcqRel);
        // The guard exists before the first wait, so a request dropped while
        // waiting still leaves the list.
        let req = TrackedRequest { tracker: self, id };
        if start >= end {
            return req;
        }
        loop {
            let done = {
                let mut g = self.lock();
                let c = g.conflict(id, start, end, serialising);
                // Marked under the same lock as the check, so that no two
                // requests can each see the other running and both wait.
                g.set_waiting(id, c.is_some());
                c
            };
            let Some(done) = done else {
                return req;
            };
            let notified = done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // The entry may have ended between the check and enable().
            let still = self
                .lock()
                .reqs
                .values()
                .any(|e| Arc::ptr_eq(&e.done, &done));
            if still {
                notified.await;
            }
        }
    }

    /// Number of requests in flight (for drain).
    pub fn in_flight(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Waits until no request is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for TrackedRequest<'_> {
    fn drop(&mut self) {
        let entry = {
            let mut g = self.tracker.lock();
            g.serialising.remove(&self.id);
            g.reqs.remove(&self.id)
        };
        if let Some(e) = entry {
            e.done.notify_waiters();
        }
        if self.tracker.count.fetch_sub(1, Ordering::AcqRel) == 1 {
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
