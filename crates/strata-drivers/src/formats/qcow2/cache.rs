//! The metadata cache: slices of L2 tables and refcount blocks, least recently
//! used first out. A slice is `min(cluster size, 4 KiB)`, so a small read of
//! an image with 2 MiB clusters does not load a whole 2 MiB table.
//!
//! The cache only holds bytes and dirty marks; the ordering of write-back
//! (refcount blocks before the L2 tables that point to new clusters) is the
//! caller's rule, see `meta.rs`.

use super::offset_hash::OffsetHash;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use strata_block::{IoBuf, Node, Result, WriteFlags};

struct Slice {
    data: Vec<u8>,
    dirty: bool,
    used: u64,
}

/// A cache of table slices keyed by their host offset. Finding the least
/// recently used slice and the dirty ones costs O(log n), not a scan.
pub struct TableCache {
    slice_size: usize,
    capacity: usize,
    slices: HashMap<u64, Slice, OffsetHash>,
    /// Slices by last use (tick to offset): the first is the LRU victim.
    lru: BTreeMap<u64, u64>,
    /// Offsets of the dirty slices, in order.
    dirty: BTreeSet<u64>,
    tick: u64,
    /// Slices were written since the file was last flushed: a write that
    /// must come after them needs a flush first, even if none is dirty now.
    written: bool,
    /// Data these slices point to was written (copy-on-write) and must be
    /// stable before any slice is written back (QEMU: depends_on_flush).
    depends_on_flush: bool,
    /// Counts the changes to `written` and `depends_on_flush`, so that a
    /// flush made without the lock clears only what it covered.
    epoch: u64,
}

impl TableCache {
    /// A cache of `capacity` slices of `slice_size` bytes.
    pub fn new(slice_size: usize, capacity: usize) -> TableCache {
        TableCache {
            slice_size,
            capacity: capacity.max(4),
            slices: HashMap::default(),
            lru: BTreeMap::new(),
            dirty: BTreeSet::new(),
            tick: 0,
            written: false,
            depends_on_flush: false,
            epoch: 0,
        }
    }

    /// The slice size in bytes.
    pub fn slice_size(&self) -> usize {
        self.slice_size
    }

    /// The host offset of the slice holding byte `off` of the table at `table`.
    pub fn slice_of(&self, table: u64, byte: u64) -> (u64, usize) {
        let s = self.slice_size as u64;
        (table + byte / s * s, (byte % s) as usize)
    }

    /// True when the slice at `off` is cached.
    pub fn contains(&self, off: u64) -> bool {
        self.slices.contains_key(&off)
    }

    /// True when the cache is full (a load must evict first).
    pub fn is_full(&self) -> bool {
        self.slices.len() >= self.capacity
    }

    /// The least recently used slice, to evict.
    pub fn victim(&self) -> Option<(u64, bool)> {
        let (_, &off) = self.lru.first_key_value()?;
        Some((off, self.dirty.contains(&off)))
    }

    /// Marks the slice at `off` as used now.
    fn touch(&mut self, off: u64) -> Option<&mut Slice> {
        let s = self.slices.get_mut(&off)?;
        if s.used == self.tick {
            // Already the most recent (a run of requests in one slice).
            return Some(s);
        }
        self.tick += 1;
        let t = self.tick;
        self.lru.remove(&s.used);
        self.lru.insert(t, off);
        s.used = t;
        Some(s)
    }

    /// Inserts a slice read from disk or made new.
    pub fn insert(&mut self, off: u64, data: Vec<u8>, dirty: bool) {
        self.remove(off);
        self.tick += 1;
        self.lru.insert(self.tick, off);
        if dirty {
            self.dirty.insert(off);
        }
        self.slices.insert(
            off,
            Slice {
                data,
                dirty,
                used: self.tick,
            },
        );
    }

    /// Holds at most `capacity` slices from now on: the least recently used
    /// clean ones go now, dirty ones as loads make room (a reopen with new
    /// cache sizes, after the caches were written back).
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(4);
        let clean: Vec<u64> = self
            .lru
            .values()
            .filter(|o| !self.dirty.contains(o))
            .copied()
            .collect();
        let over = self.slices.len().saturating_sub(self.capacity);
        for off in clean.into_iter().take(over) {
            self.remove(off);
        }
    }

    /// Drops a slice (clean, or written back already).
    pub fn remove(&mut self, off: u64) {
        if let Some(s) = self.slices.remove(&off) {
            self.lru.remove(&s.used);
            self.dirty.remove(&off);
        }
    }

    /// Drops every slice of the table at `table` (a freed table).
    pub fn remove_table(&mut self, table: u64, table_size: u64) {
        let s = self.slice_size as u64;
        let mut off = table;
        while off < table + table_size {
            self.remove(off);
            off += s;
        }
    }

    /// The bytes of a cached slice.
    pub fn get(&mut self, off: u64) -> Option<&[u8]> {
        self.touch(off).map(|s| &s.data[..])
    }

    /// The bytes of a cached slice, to change; marks it dirty.
    pub fn get_mut(&mut self, off: u64) -> Option<&mut [u8]> {
        self.touch(off)?;
        self.dirty.insert(off);
        let s = self.slices.get_mut(&off)?;
        s.dirty = true;
        Some(&mut s.data[..])
    }

    /// True when slices were written (or wait to be) since the last flush.
    pub fn needs_flush(&self) -> bool {
        self.written || self.has_dirty()
    }

    /// Records that the file was flushed.
    pub fn flushed(&mut self) {
        self.written = false;
        self.depends_on_flush = false;
    }

    /// Where the flush state stands now; see [`flushed_at`](Self::flushed_at).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Records a flush that began at `epoch` (taken under the lock before
    /// the lock was dropped for the flush): what changed since stays owed.
    pub fn flushed_at(&mut self, epoch: u64) {
        if self.epoch == epoch {
            self.flushed();
        }
    }

    /// Requires a flush of the file before the next slice is written back.
    pub fn set_depends_on_flush(&mut self) {
        self.depends_on_flush = true;
        self.epoch += 1;
    }

    /// True when a flush must come before the next write-back.
    pub fn depends_on_flush(&self) -> bool {
        self.depends_on_flush
    }

    /// True when any slice waits to be written.
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Writes one dirty slice back and marks it clean.
    pub async fn write_back(&mut self, file: &Arc<Node>, off: u64) -> Result<()> {
        if let Some(s) = self.slices.get_mut(&off) {
            if s.dirty {
                file.write(off, IoBuf::from_slice(&s.data), WriteFlags::default())
                    .await?;
                s.dirty = false;
                self.dirty.remove(&off);
                self.written = true;
                self.epoch += 1;
            }
        }
        Ok(())
    }

    /// The offsets of the dirty slices, in order (the caller checks each
    /// against the other metadata before writing it back).
    pub fn dirty_offsets(&self) -> Vec<u64> {
        self.dirty.iter().copied().collect()
    }

    /// Forgets everything (after a failed write-back the image is re-read).
    pub fn clear(&mut self) {
        self.slices.clear();
        self.lru.clear();
        self.dirty.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_victim_and_dirty_set_follow_use() {
        let mut c = TableCache::new(512, 4);
        for off in [0u64, 512, 1024, 1536] {
            c.insert(off, vec![0; 512], false);
        }
        assert!(c.is_full());
        assert_eq!(c.victim(), Some((0, false)));
        c.get(0);
        assert_eq!(c.victim(), Some((512, false)));
        c.get_mut(512);
        c.get(1024);
        c.get(1536);
        assert_eq!(c.victim(), Some((0, false)));
        c.get(0);
        assert_eq!(c.victim(), Some((512, true)));
        assert_eq!(c.dirty_offsets(), vec![512]);
        c.remove_table(0, 1024);
        assert!(!c.has_dirty());
        assert_eq!(c.victim(), Some((1024, false)));
    }
}
