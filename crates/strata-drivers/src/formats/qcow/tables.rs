//! The L1 table (in memory, whole) and a bounded cache of L2 tables.
//!
//! An entry changes only under the allocation lock, and only once it is on
//! disk. L2 tables are read from disk only under that lock too, so a table
//! loaded from disk never overwrites a newer one in the cache.

use super::alloc::Alloc;
use super::{read_at, QcowDriver, COMPRESSED, SECTOR};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use strata_block::{DebugEvent, Node, Result};

/// One L2 table, entries in host order.
pub(super) type L2Table = Arc<[AtomicU64]>;

/// Tables kept (QEMU keeps 16); at most 64 KiB each.
const CAPACITY: usize = 64;

/// L2 tables by their offset in the file, least recently used evicted.
#[derive(Default)]
pub(super) struct L2Cache {
    tables: HashMap<u64, (L2Table, u64)>,
    clock: u64,
}

impl L2Cache {
    fn get(&mut self, at: u64) -> Option<L2Table> {
        self.clock += 1;
        let clock = self.clock;
        self.tables.get_mut(&at).map(|(t, used)| {
            *used = clock;
            Arc::clone(t)
        })
    }

    pub(super) fn insert(&mut self, at: u64, table: L2Table) {
        if self.tables.len() >= CAPACITY {
            let oldest = self
                .tables
                .iter()
                .min_by_key(|(_, (_, u))| *u)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.tables.remove(&k);
            }
        }
        self.clock += 1;
        self.tables.insert(at, (table, self.clock));
    }

    pub(super) fn clear(&mut self) {
        self.tables.clear();
    }
}

/// Reads the L1 table. Only the part inside the file is read and kept: the
/// rest reads as zeroes (as QEMU's read past the end gives), and a header
/// cannot make Strata allocate more than the file holds.
pub(super) async fn read_l1(file: &Arc<Node>, offset: u64, entries: u64) -> Result<Vec<u64>> {
    let in_file = file.length().saturating_sub(offset) / 8;
    let n = entries.min(in_file) as usize;
    // QEMU reads the whole table: it fails where that is out of reach.
    super::check_reach(offset, entries * 8)?;
    let raw = read_at(file, offset, n * 8).await?;
    Ok(raw
        .as_slice()
        .chunks_exact(8)
        .map(|e| u64::from_be_bytes(e.try_into().expect("8 bytes")))
        .collect())
}

/// The first byte past what `entry` uses in the file (zero for none).
pub(super) fn entry_end(geo: &super::Geometry, entry: u64) -> u64 {
    if entry == 0 {
        0
    } else if entry & COMPRESSED != 0 {
        let (at, len) = geo.compressed_extent(entry);
        (at + len as u64).next_multiple_of(SECTOR)
    } else {
        entry.saturating_add(geo.cluster_size())
    }
}

impl QcowDriver {
    pub(super) fn l1_entry(&self, index: usize) -> u64 {
        let l1 = self.l1.read().unwrap_or_else(|p| p.into_inner());
        l1.get(index).copied().unwrap_or(0)
    }

    /// The L2 entry of guest offset `guest` (0: unallocated).
    pub(super) async fn entry(&self, guest: u64) -> Result<u64> {
        let at = self.l1_entry(self.geo.l1_index(guest));
        if at == 0 {
            return Ok(0);
        }
        let i = self.geo.l2_index(guest);
        if let Some(t) = self.cached(at) {
            return Ok(t[i].load(Ordering::Acquire));
        }
        let mut a = self.alloc.lock().await;
        let t = self.l2_locked(&mut a, at).await?;
        Ok(t[i].load(Ordering::Acquire))
    }

    /// The L2 table at `at`, if cached.
    fn cached(&self, at: u64) -> Option<L2Table> {
        self.l2.lock().unwrap_or_else(|p| p.into_inner()).get(at)
    }

    /// The L2 table at `at`, read from disk if it is not cached; the caller
    /// holds the allocation lock. What its entries use of the file is
    /// never handed out again, even past the file's end.
    pub(super) async fn l2_locked(&self, a: &mut Alloc, at: u64) -> Result<L2Table> {
        if let Some(t) = self.cached(at) {
            return Ok(t);
        }
        self.file.debug_event(DebugEvent::L2Load).await;
        let raw = read_at(&self.file, at, self.geo.l2_len()).await?;
        let table: L2Table = raw
            .as_slice()
            .chunks_exact(8)
            .map(|e| AtomicU64::new(u64::from_be_bytes(e.try_into().expect("8 bytes"))))
            .collect();
        for e in table.iter() {
            a.reserve_to(entry_end(&self.geo, e.load(Ordering::Relaxed)));
        }
        self.l2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(at, Arc::clone(&table));
        Ok(table)
    }

    /// The L2 entry of `guest` as the allocation lock's holder sees it:
    /// the table's offset (0 for none), the table, the entry.
    pub(super) async fn entry_locked(
        &self,
        a: &mut Alloc,
        guest: u64,
    ) -> Result<(u64, Option<L2Table>, u64)> {
        let at = self.l1_entry(self.geo.l1_index(guest));
        if at == 0 {
            return Ok((0, None, 0));
        }
        let t = self.l2_locked(a, at).await?;
        let e = t[self.geo.l2_index(guest)].load(Ordering::Acquire);
        Ok((at, Some(t), e))
    }
}
