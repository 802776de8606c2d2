//! Tracked requests: every request in flight on a node, so that drained
//! sections can wait for all of them and a serialising request
//! (read-modify-write, copy-on-read, truncate) never interleaves with an
//! overlapping one.
//!
//! Rules: a request waits once, at its start, and only for requests that
//! started before it; a serialising request waits for every such overlapping
//! request, any other request only for overlapping serialising ones. Since
//! nobody waits for a later request, waits cannot form a cycle.
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
    /// Woken when this request ends (only its waiters listen).
    done: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    /// Requests in flight by id; ids grow, so "earlier" is "smaller".
    reqs: BTreeMap<u64, Entry>,
    /// Ids of the serialising requests among them.
    serialising: BTreeSet<u64>,
    next_id: u64,
}

impl Inner {
    /// The first earlier request that `[start, end)` must wait for.
    fn conflict(&self, id: u64, start: u64, end: u64, serialising: bool) -> Option<Arc<Notify>> {
        let overlaps = |e: &Entry| e.start < end && start < e.end;
        if serialising {
            self.reqs
                .range(..id)
                .map(|(_, e)| e)
                .find(|e| overlaps(e))
                .map(|e| Arc::clone(&e.done))
        } else {
            self.serialising
                .range(..id)
                .filter_map(|i| self.reqs.get(i))
                .find(|e| overlaps(e))
                .map(|e| Arc::clone(&e.done))
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
            let done = self.lock().conflict(id, start, end, serialising);
            let Some(done) = done else {
                return req;
            };
            let notified = done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // The entry may have ended between the check and enable().
            if self.lock().conflict(id, start, end, serialising).is_some_and(|d| Arc::ptr_eq(&d, &done)) {
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
