//! Tracked requests: in-flight requests of a node, so that a serialising
//! request (read-modify-write of a partial sector) never interleaves with an
//! overlapping write.
//!
//! Rules: a request waits once, at its start, and only for requests that
//! started before it; a serialising request waits for every such overlapping
//! request, any other request only for overlapping serialising ones. Since
//! nobody waits for a later request, waits cannot form a cycle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::Notify;

struct Entry {
    id: u64,
    start: u64,
    end: u64,
    serialising: bool,
}

/// The in-flight requests of one node.
#[derive(Default)]
pub struct Tracker {
    reqs: Mutex<Vec<Entry>>,
    changed: Notify,
    next_id: AtomicU64,
}

/// A request in flight; dropping it ends the request and wakes waiters.
pub struct TrackedRequest<'a> {
    tracker: &'a Tracker,
    id: u64,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.reqs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a request over `[start, end)` and waits for the earlier
    /// requests it must not overlap with.
    pub async fn begin(&self, start: u64, end: u64, serialising: bool) -> TrackedRequest<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().push(Entry {
            id,
            start,
            end,
            serialising,
        });
        // The guard exists before the first wait, so a request dropped while
        // waiting still leaves the list.
        let req = TrackedRequest { tracker: self, id };
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let conflict = self.lock().iter().any(|e| {
                e.id < id && e.start < end && start < e.end && (serialising || e.serialising)
            });
            if !conflict {
                return req;
            }
            notified.await;
        }
    }

    /// Number of requests in flight (for drain).
    pub fn in_flight(&self) -> usize {
        self.lock().len()
    }

    /// Waits until no request is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.changed.notified();
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
        self.tracker.lock().retain(|e| e.id != self.id);
        self.tracker.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

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
}
