//! Host clusters with guest data I/O in flight. A request decides under the
//! metadata lock where its bytes are, then does the I/O without the lock; if
//! a discard, a zero write or a shrink frees such a cluster meanwhile, the
//! allocator must not hand it out again before that I/O is done, or the late
//! write would land in someone else's data (a hole QEMU 10.0.2 has).

use super::offset_hash::OffsetHash;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

type Counts = HashMap<u64, Count, OffsetHash>;

/// The cluster ranges one request holds; one range (the usual case) needs
/// no allocation.
enum Held {
    Nothing,
    One((u64, u64)),
    Many(Vec<(u64, u64)>),
}

impl Held {
    /// First and last cluster of each range.
    fn ranges(&self) -> &[(u64, u64)] {
        match self {
            Held::Nothing => &[],
            Held::One(r) => std::slice::from_ref(r),
            Held::Many(v) => v,
        }
    }
    fn add(&mut self, r: (u64, u64)) {
        *self = match std::mem::replace(self, Held::Nothing) {
            Held::Nothing => Held::One(r),
            Held::One(a) => Held::Many(vec![a, r]),
            Held::Many(mut v) => {
                v.push(r);
                Held::Many(v)
            }
        };
    }
}

#[derive(Default)]
struct Count {
    held: u32,
    /// An allocator passed this cluster over while it was held.
    skipped: bool,
}

/// In-flight counts per host cluster of the image file.
pub struct HostInflight {
    cluster_bits: u32,
    map: Mutex<Counts>,
    /// Entries in `map`: lets the allocator skip the lock when nothing is held.
    held: AtomicUsize,
    /// Lowest cluster passed over by an allocator and released since; the
    /// allocator's first-fit search must start there again.
    released_min: AtomicU64,
}

/// Host clusters held while one request's I/O is in flight.
pub struct HostGuard<'a> {
    owner: &'a HostInflight,
    held: Held,
}

impl HostInflight {
    /// Counts for an image with clusters of `1 << cluster_bits` bytes.
    pub fn new(cluster_bits: u32) -> Arc<Self> {
        Arc::new(HostInflight {
            cluster_bits,
            map: Mutex::new(Counts::default()),
            held: AtomicUsize::new(0),
            released_min: AtomicU64::new(u64::MAX),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds the host clusters under each `(offset, len)` byte range until
    /// the guard is dropped.
    pub fn hold(&self, ranges: impl IntoIterator<Item = (u64, u64)>) -> HostGuard<'_> {
        let mut held = Held::Nothing;
        for (off, len) in ranges {
            if len > 0 {
                held.add((
                    off >> self.cluster_bits,
                    (off + len - 1) >> self.cluster_bits,
                ));
            }
        }
        if !held.ranges().is_empty() {
            let mut m = self.lock();
            for &(first, last) in held.ranges() {
                for c in first..=last {
                    m.entry(c).or_default().held += 1;
                }
            }
            self.held.store(m.len(), Ordering::Release);
        }
        HostGuard { owner: self, held }
    }

    /// True while host cluster `hc` has I/O in flight; the caller (an
    /// allocator) then passes it over and is told again once it is free.
    pub fn is_busy(&self, hc: u64) -> bool {
        if self.held.load(Ordering::Acquire) == 0 {
            return false;
        }
        match self.lock().get_mut(&hc) {
            Some(c) => {
                c.skipped = true;
                true
            }
            None => false,
        }
    }

    /// The lowest cluster an allocator passed over that has been released
    /// since the last call, if any.
    pub fn take_released_min(&self) -> Option<u64> {
        match self.released_min.swap(u64::MAX, Ordering::AcqRel) {
            u64::MAX => None,
            m => Some(m),
        }
    }
}

impl Drop for HostGuard<'_> {
    fn drop(&mut self) {
        if self.held.ranges().is_empty() {
            return;
        }
        let mut m = self.owner.lock();
        for &(first, last) in self.held.ranges() {
            for c in first..=last {
                if let Some(e) = m.get_mut(&c) {
                    e.held -= 1;
                    if e.held == 0 {
                        if e.skipped {
                            self.owner.released_min.fetch_min(c, Ordering::AcqRel);
                        }
                        m.remove(&c);
                    }
                }
            }
        }
        self.owner.held.store(m.len(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_clusters_are_busy_until_released() {
        let h = HostInflight::new(16);
        assert!(!h.is_busy(1));
        let g = h.hold([(65536, 4096), (3 << 16, 1 << 17)]);
        assert!(h.is_busy(1));
        assert!(!h.is_busy(2));
        assert!(h.is_busy(3) && h.is_busy(4));
        let g2 = h.hold([(65536 + 512, 512)]);
        drop(g);
        assert!(h.is_busy(1), "still held by the second request");
        assert_eq!(h.take_released_min(), Some(3));
        drop(g2);
        assert!(!h.is_busy(1));
        assert_eq!(h.take_released_min(), Some(1));
        assert_eq!(h.take_released_min(), None);
    }

    #[test]
    fn release_of_a_cluster_nobody_skipped_does_not_rewind_the_allocator() {
        let h = HostInflight::new(16);
        drop(h.hold([(0, 65536)]));
        assert_eq!(h.take_released_min(), None);
    }
}
