//! The metadata cache: slices of L2 tables and refcount blocks, least recently
//! used first out. A slice is `min(cluster size, 4 KiB)`, so a small read of
//! an image with 2 MiB clusters does not load a whole 2 MiB table.
//!
//! The cache only holds bytes and dirty marks; the ordering of write-back
//! (refcount blocks before the L2 tables that point to new clusters) is the
//! caller's rule, see `meta.rs`.

use std::collections::HashMap;
use std::sync::Arc;
use strata_block::{IoBuf, Node, Result, WriteFlags};

struct Slice {
    data: Vec<u8>,
    dirty: bool,
    used: u64,
}

/// A cache of table slices keyed by their host offset.
pub struct TableCache {
    slice_size: usize,
    capacity: usize,
    slices: HashMap<u64, Slice>,
    tick: u64,
    /// Slices were written since the file was last flushed: a write that
    /// must come after them needs a flush first, even if none is dirty now.
    written: bool,
}

impl TableCache {
    /// A cache of `capacity` slices of `slice_size` bytes.
    pub fn new(slice_size: usize, capacity: usize) -> TableCache {
        TableCache {
            slice_size,
            capacity: capacity.max(4),
            slices: HashMap::new(),
            tick: 0,
            written: false,
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
        self.slices
            .iter()
            .min_by_key(|(_, s)| s.used)
            .map(|(o, s)| (*o, s.dirty))
    }

    /// Inserts a slice read from disk or made new.
    pub fn insert(&mut self, off: u64, data: Vec<u8>, dirty: bool) {
        self.tick += 1;
        self.slices.insert(
            off,
            Slice {
                data,
                dirty,
                used: self.tick,
            },
        );
    }

    /// Drops a slice (clean, or written back already).
    pub fn remove(&mut self, off: u64) {
        self.slices.remove(&off);
    }

    /// Drops every slice of the table at `table` (a freed table).
    pub fn remove_table(&mut self, table: u64, table_size: u64) {
        self.slices
            .retain(|o, _| !(table..table + table_size).contains(o));
    }

    /// The bytes of a cached slice.
    pub fn get(&mut self, off: u64) -> Option<&[u8]> {
        self.tick += 1;
        let t = self.tick;
        self.slices.get_mut(&off).map(|s| {
            s.used = t;
            &s.data[..]
        })
    }

    /// The bytes of a cached slice, to change; marks it dirty.
    pub fn get_mut(&mut self, off: u64) -> Option<&mut [u8]> {
        self.tick += 1;
        let t = self.tick;
        self.slices.get_mut(&off).map(|s| {
            s.used = t;
            s.dirty = true;
            &mut s.data[..]
        })
    }

    /// True when slices were written (or wait to be) since the last flush.
    pub fn needs_flush(&self) -> bool {
        self.written || self.has_dirty()
    }

    /// Records that the file was flushed.
    pub fn flushed(&mut self) {
        self.written = false;
    }

    /// True when any slice waits to be written.
    pub fn has_dirty(&self) -> bool {
        self.slices.values().any(|s| s.dirty)
    }

    /// Writes one dirty slice back and marks it clean.
    pub async fn write_back(&mut self, file: &Arc<Node>, off: u64) -> Result<()> {
        if let Some(s) = self.slices.get_mut(&off) {
            if s.dirty {
                file.write(off, IoBuf::from_slice(&s.data), WriteFlags::default())
                    .await?;
                s.dirty = false;
                self.written = true;
            }
        }
        Ok(())
    }

    /// The offsets of the dirty slices, in order (the caller checks each
    /// against the other metadata before writing it back).
    pub fn dirty_offsets(&self) -> Vec<u64> {
        let mut dirty: Vec<u64> = self
            .slices
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(o, _)| *o)
            .collect();
        dirty.sort_unstable();
        dirty
    }

    /// Forgets everything (after a failed write-back the image is re-read).
    pub fn clear(&mut self) {
        self.slices.clear();
    }
}
