//! Requests in flight on guest clusters: a write that allocates marks its
//! clusters, and another write to them waits until the first has linked
//! them; reads and in-place writes hold their host clusters (see
//! `host_inflight`) so none is reused under them.

use super::host_inflight::HostGuard;
use super::meta::{Mapping, Meta};
use super::{Extent, Qcow2Driver};
use async_lock::MutexGuard;
use std::collections::BTreeSet;
use strata_block::{Error, Result};

/// Guest clusters being allocated by one write; unmarked (and waiters woken)
/// when dropped, so a cancelled write cannot leave them marked forever.
pub(super) struct InflightGuard<'a> {
    driver: &'a Qcow2Driver,
    first: u64,
    last: u64,
}

impl<'a> InflightGuard<'a> {
    pub(super) fn new(driver: &'a Qcow2Driver, first: u64, last: u64) -> Self {
        driver.lock_inflight().extend(first..=last);
        InflightGuard {
            driver,
            first,
            last,
        }
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        let mut set = self.driver.lock_inflight();
        for gc in self.first..=self.last {
            set.remove(&gc);
        }
        drop(set);
        self.driver.alloc_done.notify_waiters();
    }
}

impl Qcow2Driver {
    pub(super) fn lock_inflight(&self) -> std::sync::MutexGuard<'_, BTreeSet<u64>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True while a write is allocating any of guest clusters `[first, last]`.
    pub(super) fn allocating(&self, first: u64, last: u64) -> bool {
        self.lock_inflight().range(first..=last).next().is_some()
    }

    /// Holds the host clusters that `extents` read or write in place, so
    /// none is handed out again while the I/O is in flight (taken under the
    /// metadata lock, where the mapping was looked up: `m` proves it).
    pub(super) fn hold_hosts<'e>(
        &self,
        _locked: &Meta,
        extents: impl IntoIterator<Item = &'e Extent>,
    ) -> HostGuard<'_> {
        let external = self.geo.external_data;
        self.host_busy.hold(extents.into_iter().filter_map(|e| {
            match e.mapping {
                // A data file keeps clusters at their guest offsets: never reused.
                Mapping::Normal { host, .. } if !external => Some((host, e.len)),
                Mapping::Compressed(_) => self
                    .host_cluster_of(e.mapping)
                    .map(|(off, n)| (off, n << self.geo.cluster_bits)),
                _ => None,
            }
        }))
    }

    /// The metadata lock, taken when no write is allocating any of guest
    /// clusters `[first, last]` (looked at again under the lock: a write
    /// may have marked them meanwhile); ENOMEDIUM once the image is corrupt.
    pub(super) async fn lock_idle(&self, first: u64, last: u64) -> Result<MutexGuard<'_, Meta>> {
        loop {
            self.wait_inflight(first, last).await;
            let m = self.meta.lock().await;
            if m.corrupt {
                return Err(Error::errno(libc::ENOMEDIUM));
            }
            if !self.allocating(first, last) {
                return Ok(m);
            }
        }
    }

    /// Waits until none of the guest clusters `[first, last]` is being allocated.
    pub(super) async fn wait_inflight(&self, first: u64, last: u64) {
        loop {
            let notified = self.alloc_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.allocating(first, last) {
                return;
            }
            notified.await;
        }
    }
}
