//! Host clusters that guest data I/O in flight may still touch. A request
//! decides under the metadata lock where its bytes are, then does the I/O
//! without the lock; if a discard, a zero write or a shrink frees such a
//! cluster meanwhile, the allocator must not hand it out again before that
//! I/O is done, or the late write would land in someone else's data (a hole
//! QEMU 10.0.2 has).
//!
//! Epochs, not per-cluster counts, so that a request pays one atomic add
//! and one subtract: a request with host I/O joins the current epoch (under
//! the metadata lock, where it looked its clusters up). A cluster freed
//! while any such request is in flight is quarantined: it becomes
//! allocatable once every request that was in flight when it was freed has
//! ended. Quarantined clusters wait in a batch that retires with the
//! current epoch; new requests then join the other epoch, which is only
//! ever made current once it is empty. So a batch waits for the requests
//! that could have looked its clusters up, and for no request that started
//! after a later flip.
//!
//! Why that holds: a request that could reference a freed cluster took its
//! hold before the free (both under the metadata lock), in the epoch that
//! was current then. If that epoch is the one the batch retires with, the
//! batch waits for it; if not, the epoch was retired by a flip in between,
//! which required this epoch's count to drain first.

use super::offset_hash::OffsetHash;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex;

type Clusters = HashSet<u64, OffsetHash>;

/// Clusters freed under requests in flight, waiting for them.
#[derive(Default)]
struct Batch {
    clusters: Clusters,
    /// Lowest cluster an allocator passed over in this batch.
    skipped_min: Option<u64>,
}

impl Batch {
    fn busy(&mut self, hc: u64) -> bool {
        let hit = self.clusters.contains(&hc);
        if hit {
            self.skipped_min = Some(self.skipped_min.map_or(hc, |m| m.min(hc)));
        }
        hit
    }
}

#[derive(Default)]
struct Quarantine {
    /// The batch that waits for epoch `.0` to drain.
    retired: Option<(usize, Batch)>,
    /// Freed since the last flip: waits for both epochs.
    next: Batch,
}

/// In-flight epochs and quarantined clusters of one image file.
#[derive(Default)]
pub struct HostInflight {
    /// Requests with host I/O in flight, per epoch.
    counts: [AtomicUsize; 2],
    /// The epoch new requests join.
    current: AtomicUsize,
    /// Something is quarantined: lets the allocator and request ends skip
    /// the lock.
    quarantined: AtomicBool,
    q: Mutex<Quarantine>,
    /// Lowest cluster passed over by an allocator and released since; the
    /// allocator's first-fit search must start there again.
    released_min: AtomicU64,
}

/// A request's place in its epoch; dropping it ends the request's hold.
pub struct HostGuard<'a> {
    owner: &'a HostInflight,
    epoch: Option<usize>,
}

impl HostInflight {
    pub fn new() -> Self {
        HostInflight {
            released_min: AtomicU64::new(u64::MAX),
            ..Default::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Quarantine> {
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds the host clusters under each non-empty `(offset, len)` byte
    /// range until the guard is dropped. Called under the metadata lock, in
    /// the same critical section as the lookup of those clusters.
    pub fn hold(&self, ranges: impl IntoIterator<Item = (u64, u64)>) -> HostGuard<'_> {
        let any = ranges.into_iter().any(|(_, len)| len > 0);
        let epoch = any.then(|| {
            let e = self.current.load(SeqCst);
            self.counts[e].fetch_add(1, SeqCst);
            e
        });
        HostGuard { owner: self, epoch }
    }

    /// Host cluster `hc` lost its last reference (under the metadata lock):
    /// quarantined if a request in flight may still touch it.
    pub fn freed(&self, hc: u64) {
        if self.counts[0].load(SeqCst) == 0 && self.counts[1].load(SeqCst) == 0 {
            return;
        }
        let mut q = self.lock();
        q.next.clusters.insert(hc);
        self.quarantined.store(true, SeqCst);
        self.advance(&mut q);
    }

    /// True while host cluster `hc` is quarantined; the caller (an
    /// allocator) then passes it over and is told again once it is free.
    pub fn is_busy(&self, hc: u64) -> bool {
        if !self.quarantined.load(SeqCst) {
            return false;
        }
        let mut q = self.lock();
        self.advance(&mut q);
        let retired = q.retired.as_mut().is_some_and(|(_, b)| b.busy(hc));
        retired || q.next.busy(hc)
    }

    /// The lowest cluster an allocator passed over that has been released
    /// since the last call, if any.
    pub fn take_released_min(&self) -> Option<u64> {
        match self.released_min.swap(u64::MAX, SeqCst) {
            u64::MAX => None,
            m => Some(m),
        }
    }

    /// Releases the retired batch once its epoch has drained, and retires
    /// the next batch with the current epoch once the other one is empty.
    fn advance(&self, q: &mut Quarantine) {
        loop {
            if let Some((e, _)) = &q.retired {
                if self.counts[*e].load(SeqCst) != 0 {
                    break;
                }
                if let Some((_, b)) = q.retired.take() {
                    if let Some(m) = b.skipped_min {
                        self.released_min.fetch_min(m, SeqCst);
                    }
                }
            }
            if q.next.clusters.is_empty() {
                break;
            }
            let cur = self.current.load(SeqCst);
            if self.counts[1 - cur].load(SeqCst) != 0 {
                // A request joined the old epoch late (it read `current`
                // before the last flip): wait for it before flipping back.
                break;
            }
            q.retired = Some((cur, std::mem::take(&mut q.next)));
            self.current.store(1 - cur, SeqCst);
        }
        let empty = q.retired.is_none() && q.next.clusters.is_empty();
        self.quarantined.store(!empty, SeqCst);
    }
}

impl Drop for HostGuard<'_> {
    fn drop(&mut self) {
        let Some(e) = self.epoch else { return };
        let left = self.owner.counts[e].fetch_sub(1, SeqCst) - 1;
        if left == 0 && self.owner.quarantined.load(SeqCst) {
            let mut q = self.owner.lock();
            self.owner.advance(&mut q);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_freed_under_a_request_waits_for_it() {
        let h = HostInflight::new();
        h.freed(7);
        assert!(!h.is_busy(7), "nothing in flight: free at once");
        let g = h.hold([(65536, 4096)]);
        h.freed(1);
        assert!(h.is_busy(1));
        assert!(!h.is_busy(2));
        drop(g);
        assert!(!h.is_busy(1));
        assert_eq!(h.take_released_min(), Some(1));
        assert_eq!(h.take_released_min(), None);
    }

    #[test]
    fn a_request_that_starts_after_the_free_does_not_hold_it_back() {
        let h = HostInflight::new();
        let old = h.hold([(0, 512)]);
        h.freed(3);
        // Retired with the old epoch; a new request joins the other one.
        let young = h.hold([(0, 512)]);
        drop(old);
        assert!(!h.is_busy(3), "only the requests before the free count");
        drop(young);
    }

    #[test]
    fn frees_after_a_flip_wait_for_both_epochs() {
        let h = HostInflight::new();
        let a = h.hold([(0, 512)]);
        h.freed(1); // retired with a's epoch
        let b = h.hold([(0, 512)]);
        h.freed(2); // a may still run, and b: waits for both
        drop(b);
        assert!(h.is_busy(2), "a is still in flight");
        drop(a);
        assert!(!h.is_busy(1) && !h.is_busy(2));
    }

    #[test]
    fn an_empty_hold_joins_no_epoch() {
        let h = HostInflight::new();
        let g = h.hold([(0, 0)]);
        h.freed(5);
        assert!(!h.is_busy(5));
        drop(g);
    }

    #[test]
    fn release_of_a_cluster_nobody_skipped_does_not_rewind_the_allocator() {
        let h = HostInflight::new();
        let g = h.hold([(0, 65536)]);
        h.freed(0);
        drop(g);
        assert_eq!(h.take_released_min(), None);
    }
}
