//! qcow2 metadata in memory: the geometry, L2 entry decoding, the L1 table,
//! the caches of L2 and refcount slices and their write-back, and the
//! overlap check of every write (refcounts and allocation: `refcount.rs`).
//!
//! Ordering rules (DESIGN.md, "Rules that keep images intact"):
//! - refcount slices are written (and the file flushed) before any L2 slice
//!   or L1 entry that may point to a cluster they count;
//! - when a reference goes away, the L2 change is written (and flushed)
//!   before the refcount drops;
//! - metadata writes are checked against the header, L1 and refcount table
//!   first; a violation marks the image corrupt.

use super::cache::TableCache;
use std::collections::HashSet;
use strata_block::report::c_hex;

/// Largest refcount table QEMU accepts (bytes).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
use super::header::Header;
use std::sync::Arc;
use strata_block::{DebugEvent, Error, IoBuf, Node, Result, WriteFlags};

/// L2 entry: the cluster's refcount is exactly one (may be written in place).
pub const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry: compressed cluster.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry: reads as zeroes (v3).
pub const OFLAG_ZERO: u64 = 1;
/// Host offset bits of L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// The fixed geometry of an image.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub cluster_size: u64,
    /// log2 of L2 entries per table.
    pub l2_bits: u32,
    pub refcount_order: u32,
    /// log2 of refcount entries per block.
    pub rb_bits: u32,
    pub version: u32,
    /// Guest data lives in an external data file: a data cluster's host
    /// offset is its guest offset there, and the image's refcounts do not
    /// count it.
    pub external_data: bool,
    /// Extended L2 entries: each entry has a second word, the allocation
    /// and zero bits of the cluster's 32 subclusters (`subcluster.rs`).
    pub extended_l2: bool,
    /// log2 of the unit a bit of that word covers (the cluster without
    /// extended L2 entries).
    pub subcluster_bits: u32,
}

impl Geometry {
    pub fn new(
        cluster_bits: u32,
        refcount_order: u32,
        version: u32,
        external_data: bool,
        extended_l2: bool,
    ) -> Geometry {
        let ext = extended_l2 as u32;
        Geometry {
            cluster_bits,
            cluster_size: 1 << cluster_bits,
            l2_bits: cluster_bits - 3 - ext,
            refcount_order,
            rb_bits: cluster_bits + 3 - refcount_order,
            version,
            external_data,
            extended_l2,
            subcluster_bits: cluster_bits - 5 * ext,
        }
    }
    /// Bytes of one L2 entry (8, or 16 with the subcluster word).
    pub fn l2_entry_size(&self) -> u64 {
        8 << self.extended_l2 as u32
    }
    pub fn subcluster_size(&self) -> u64 {
        1 << self.subcluster_bits
    }
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }
    /// Bit where the sector count of a compressed L2 entry starts.
    fn compressed_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
    /// Where the data of a compressed L2 entry lies: its host offset and
    /// the bytes its sector count spans from there (the last sector may be
    /// partly used).
    pub fn compressed_extent(&self, entry: u64) -> (u64, u64) {
        let shift = self.compressed_shift();
        let host = entry & ((1u64 << shift) - 1);
        let sectors = ((entry >> shift) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
        (host, sectors * 512 - (host & 511))
    }
    /// The L2 entry for `len` (> 0) bytes of compressed data at `host`.
    pub fn compressed_entry(&self, host: u64, len: u64) -> u64 {
        let extra_sectors = (host + len - 1) / 512 - host / 512;
        OFLAG_COMPRESSED | host | (extra_sectors << self.compressed_shift())
    }
    pub fn refcount_max(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.refcount_order)) - 1
        }
    }
    /// Guest bytes one L2 table covers.
    pub fn l2_coverage(&self) -> u64 {
        self.cluster_size << self.l2_bits
    }
    pub fn offset_in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size - 1)
    }
    /// L1 entries needed for a disk of `size` bytes.
    pub fn l1_size_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_coverage())
    }
}

/// What an L2 entry says of one guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Not here: the backing file (or zeroes) shows through.
    Unallocated,
    /// Not here either, but in a cluster that has host bytes for it (an
    /// unallocated subcluster of an allocated cluster): block status says
    /// where, as QEMU's does.
    Reserved(u64),
    /// Reads as zeroes; may keep a preallocated host cluster.
    Zero(Option<u64>),
    /// Data at a host cluster; `copied` when its refcount is one.
    Normal { host: u64, copied: bool },
    /// Compressed data (the raw L2 entry).
    Compressed(u64),
}

impl Mapping {
    /// True when `next` continues this mapping `len` bytes further on: the
    /// same kind and, where there is a host offset, the next host bytes.
    /// Compressed clusters are alike for block status but never one piece
    /// of data (each decompresses on its own).
    pub fn continued_by(self, len: u64, next: Mapping) -> bool {
        match (self, next) {
            (Mapping::Normal { host: a, .. }, Mapping::Normal { host: b, .. }) => a + len == b,
            (Mapping::Reserved(a), Mapping::Reserved(b)) => a + len == b,
            (Mapping::Zero(Some(a)), Mapping::Zero(Some(b))) => a + len == b,
            (Mapping::Unallocated, Mapping::Unallocated)
            | (Mapping::Zero(None), Mapping::Zero(None))
            | (Mapping::Compressed(_), Mapping::Compressed(_)) => true,
            _ => false,
        }
    }
}

/// The L2 tables an L1 table points to (the active set of the overlap check).
pub(super) fn tables_of(l1: &[u64]) -> HashSet<u64> {
    l1.iter()
        .map(|e| e & OFFSET_MASK)
        .filter(|&o| o != 0)
        .collect()
}

/// The in-memory metadata, behind the driver's async lock.
pub struct Meta {
    pub geo: Geometry,
    pub header: Header,
    pub l1: Vec<u64>,
    pub reftable: Vec<u64>,
    pub l2_cache: TableCache,
    pub rb_cache: TableCache,
    /// No cluster below this index is free (first-fit search starts here).
    pub free_cluster_index: u64,
    /// Set after a fatal corruption: the image is unusable from then on.
    pub corrupt: bool,
    /// A corruption was reported already (later ones are not repeated).
    pub signaled: bool,
    /// Opened read-write: corruption marks the image corrupt on disk.
    pub writable: bool,
    /// Lazy refcounts (QEMU's use_lazy_refcounts): the first refcount
    /// change marks the image dirty, and from then on refcount blocks are
    /// written only when the cache needs room or the image is closed; an
    /// image left dirty is repaired at its next read-write open.
    pub lazy_refcounts: bool,
    /// Host offsets of the active L2 tables and of the refcount blocks, for
    /// the overlap check of every write.
    pub l2_tables: HashSet<u64>,
    pub refblocks: HashSet<u64>,
    /// Where the next compressed cluster may start inside a partly used
    /// cluster; 0 for none (QEMU: free_byte_offset).
    pub free_byte_offset: u64,
    /// Host clusters with guest I/O in flight: not handed out again, even
    /// when free, until that I/O is done.
    pub busy: Arc<super::host_inflight::HostInflight>,
    /// Check writes against the snapshots' L2 tables too (QEMU's
    /// overlap-check.inactive-l2).
    pub check_inactive_l2: bool,
}

/// What a write to the image file is, for the overlap check: each kind may
/// only land on its own kind of cluster (or on free ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// Guest data or a brand-new table.
    Data,
    /// An active L2 table.
    L2,
    /// A refcount block.
    Refblock,
    /// The active L1 table.
    L1,
}

pub(super) fn be64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

impl Meta {
    /// Decodes an L2 entry; a misaligned host offset is corruption.
    pub fn decode(&self, entry: u64, l2_off: u64, idx: u64) -> Result<Mapping> {
        if entry & OFLAG_COMPRESSED != 0 {
            return Ok(Mapping::Compressed(entry));
        }
        let host = entry & OFFSET_MASK;
        if host & (self.geo.cluster_size - 1) != 0 {
            return Err(Error::corrupt(format!(
                "Cluster allocation offset {} unaligned (L2 offset: {}, L2 index: {})",
                c_hex(host),
                c_hex(l2_off),
                c_hex(idx)
            )));
        }
        // With extended entries the zero flag is unused: the subcluster
        // word says what reads as zeroes.
        if self.geo.version >= 3 && !self.geo.extended_l2 && entry & OFLAG_ZERO != 0 {
            return Ok(Mapping::Zero((host != 0).then_some(host)));
        }
        // Offset 0 is a real cluster of an external data file; such clusters
        // always carry COPIED, which tells them from unallocated entries.
        if host == 0 && !(self.geo.external_data && entry & OFLAG_COPIED != 0) {
            return Ok(Mapping::Unallocated);
        }
        Ok(Mapping::Normal {
            host,
            copied: entry & OFLAG_COPIED != 0,
        })
    }

    /// The L2 table offset for guest cluster `gc`, if it has one.
    pub fn l2_table_of(&self, gc: u64) -> Result<Option<u64>> {
        let l1i = (gc >> self.geo.l2_bits) as usize;
        let e = self.l1.get(l1i).copied().unwrap_or(0);
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if off & (self.geo.cluster_size - 1) != 0 {
            return Err(Error::corrupt(format!(
                "L2 table offset {} unaligned (L1 index: {})",
                c_hex(off),
                c_hex(l1i as u64)
            )));
        }
        Ok(Some(off))
    }

    /// Loads the slice at `off` into a cache, evicting (and writing back,
    /// in the right order) the least recently used slice if full.
    pub(super) async fn ensure_slice(
        &mut self,
        file: &Arc<Node>,
        off: u64,
        l2: bool,
    ) -> Result<()> {
        let cache = if l2 { &self.l2_cache } else { &self.rb_cache };
        if cache.contains(off) {
            return Ok(());
        }
        self.make_room(file, l2).await?;
        let size = self.l2_cache.slice_size();
        if l2 {
            file.debug_event(DebugEvent::L2Load).await;
        }
        let buf = file.read(off, IoBuf::zeroed(size)).await?;
        let c = if l2 {
            &mut self.l2_cache
        } else {
            &mut self.rb_cache
        };
        c.insert(off, buf.as_slice().to_vec(), false);
        Ok(())
    }

    /// Puts a new L2 table whose content was just written at `off` into the
    /// cache, so that filling it in does not read it back (QEMU gets empty
    /// cache entries for new tables).
    pub async fn adopt_l2_table(
        &mut self,
        file: &Arc<Node>,
        off: u64,
        content: &[u8],
    ) -> Result<()> {
        let size = self.l2_cache.slice_size();
        for (i, slice) in content.chunks(size).enumerate() {
            let at = off + (i * size) as u64;
            if self.l2_cache.contains(at) {
                continue;
            }
            self.make_room(file, true).await?;
            self.l2_cache.insert(at, slice.to_vec(), false);
        }
        Ok(())
    }

    /// Evicts the least recently used slice of a full cache, writing it back
    /// first (after the refcounts it depends on) if dirty.
    pub(super) async fn make_room(&mut self, file: &Arc<Node>, l2: bool) -> Result<()> {
        let cache = if l2 { &self.l2_cache } else { &self.rb_cache };
        if cache.is_full() {
            if let Some((victim, dirty)) = cache.victim() {
                if dirty {
                    if l2 {
                        self.flush_refcounts_before_l2(file).await?;
                        if self.l2_cache.depends_on_flush() {
                            file.flush().await?;
                            self.l2_cache.flushed();
                        }
                    }
                    let ss = self.l2_cache.slice_size() as u64;
                    let kind = if l2 {
                        WriteKind::L2
                    } else {
                        WriteKind::Refblock
                    };
                    Box::pin(self.check_write(file, victim, ss, kind)).await?;
                    file.debug_event(update_event(l2)).await;
                    let c = if l2 {
                        &mut self.l2_cache
                    } else {
                        &mut self.rb_cache
                    };
                    c.write_back(file, victim).await?;
                }
                let c = if l2 {
                    &mut self.l2_cache
                } else {
                    &mut self.rb_cache
                };
                c.remove(victim);
            }
        }
        Ok(())
    }

    /// Reads entry `idx` of the L2 table at `l2_off`.
    pub async fn l2_get(&mut self, file: &Arc<Node>, l2_off: u64, idx: u64) -> Result<u64> {
        self.l2_word(file, l2_off, idx * self.geo.l2_entry_size())
            .await
    }

    /// Sets entry `idx` of the L2 table at `l2_off` (in the cache, dirty).
    pub async fn l2_set(
        &mut self,
        file: &Arc<Node>,
        l2_off: u64,
        idx: u64,
        val: u64,
    ) -> Result<()> {
        let at = idx * self.geo.l2_entry_size();
        self.set_l2_word(file, l2_off, at, val).await
    }

    /// The subcluster word of extended entry `idx` (0 without extended entries).
    pub async fn l2_get_bitmap(&mut self, file: &Arc<Node>, l2_off: u64, idx: u64) -> Result<u64> {
        if !self.geo.extended_l2 {
            return Ok(0);
        }
        self.l2_word(file, l2_off, idx * 16 + 8).await
    }

    /// Sets the subcluster word of extended entry `idx`.
    pub async fn l2_set_bitmap(
        &mut self,
        file: &Arc<Node>,
        l2_off: u64,
        idx: u64,
        val: u64,
    ) -> Result<()> {
        debug_assert!(self.geo.extended_l2);
        self.set_l2_word(file, l2_off, idx * 16 + 8, val).await
    }

    /// The cached slice holding the word `at` bytes into the L2 table at
    /// `l2_off` (loaded if need be), and where the word is in it.
    async fn l2_slice_at(
        &mut self,
        file: &Arc<Node>,
        l2_off: u64,
        at: u64,
    ) -> Result<(u64, usize)> {
        let (slice, at) = self.l2_cache.slice_of(l2_off, at);
        self.ensure_slice(file, slice, true).await?;
        Ok((slice, at))
    }

    /// The big-endian word `at` bytes into the L2 table at `l2_off`.
    async fn l2_word(&mut self, file: &Arc<Node>, l2_off: u64, at: u64) -> Result<u64> {
        let (slice, at) = self.l2_slice_at(file, l2_off, at).await?;
        let b = self
            .l2_cache
            .get(slice)
            .ok_or_else(|| Error::errno(libc::EIO))?;
        Ok(be64_at(b, at))
    }

    async fn set_l2_word(
        &mut self,
        file: &Arc<Node>,
        l2_off: u64,
        at: u64,
        val: u64,
    ) -> Result<()> {
        let (slice, at) = self.l2_slice_at(file, l2_off, at).await?;
        let b = self
            .l2_cache
            .get_mut(slice)
            .ok_or_else(|| Error::errno(libc::EIO))?;
        b[at..at + 8].copy_from_slice(&val.to_be_bytes());
        Ok(())
    }

    /// The mapping of guest cluster `gc`.
    pub async fn mapping(&mut self, file: &Arc<Node>, gc: u64) -> Result<Mapping> {
        if self.corrupt {
            return Err(Error::errno(libc::ENOMEDIUM));
        }
        let l2 = match self.l2_table_of(gc) {
            Ok(Some(l2)) => l2,
            Ok(None) => return Ok(Mapping::Unallocated),
            Err(e) => return Err(self.signal_corruption(file, e).await),
        };
        let idx = gc & (self.geo.l2_entries() - 1);
        let e = self.l2_get(file, l2, idx).await?;
        let checked = self
            .decode(e, l2, idx)
            .and_then(|m| self.check_external(m, gc, l2, idx));
        match checked {
            Ok(m) => Ok(m),
            Err(e) => Err(self.signal_corruption(file, e).await),
        }
    }

    /// With an external data file, data is never compressed and sits at its
    /// guest offset; anything else is corruption (QEMU's words).
    pub(super) fn check_external(&self, m: Mapping, gc: u64, l2: u64, idx: u64) -> Result<Mapping> {
        if !self.geo.external_data {
            return Ok(m);
        }
        let guest = gc << self.geo.cluster_bits;
        match m {
            Mapping::Compressed(_) => Err(Error::corrupt(format!(
                "Compressed cluster entry found in image with external data file (L2 offset: {}, L2 index: {})",
                c_hex(l2),
                c_hex(idx)
            ))),
            Mapping::Normal { host, .. } | Mapping::Zero(Some(host)) if host != guest => Err(Error::corrupt(format!(
                "External data file host cluster offset {} does not match guest cluster offset: {}, L2 index: {})",
                c_hex(host),
                c_hex(guest),
                c_hex(idx)
            ))),
            m => Ok(m),
        }
    }

    /// Writes the disk size into the header, then keeps it in memory.
    pub async fn write_disk_size(&mut self, file: &Arc<Node>, size: u64) -> Result<()> {
        let bytes = IoBuf::from_slice(&size.to_be_bytes());
        file.write(24, bytes, WriteFlags::default()).await?;
        self.header.size = size;
        Ok(())
    }

    /// Sets or clears incompatible feature bits (dirty, corrupt) on disk and
    /// flushes, so that the bit is stable before what depends on it.
    pub async fn set_incompatible(&mut self, file: &Arc<Node>, bits: u64, on: bool) -> Result<()> {
        let old = self.header.incompatible_features;
        let new = if on { old | bits } else { old & !bits };
        if new == old || self.geo.version < 3 {
            return Ok(());
        }
        let cleaning = old & !new & super::header::INCOMPAT_DIRTY != 0;
        if cleaning && self.refcounts_deferred() {
            // Refcounts are to be trusted again: on disk first (QEMU:
            // qcow2_mark_clean flushes the caches before the header).
            self.flush_refcount_cache(file).await?;
        }
        self.header.incompatible_features = new;
        file.write(
            72,
            IoBuf::from_slice(&new.to_be_bytes()),
            WriteFlags::default(),
        )
        .await?;
        file.flush().await
    }

    /// Reports corrupt metadata as QEMU does. On an image open read-write it
    /// is fatal: the corrupt bit is set on disk and the image refuses all
    /// further I/O. Returns the error for the request that found it.
    pub async fn signal_corruption(&mut self, file: &Arc<Node>, e: Error) -> Error {
        let msg = e.message().unwrap_or("corrupt metadata").to_string();
        let fatal = self.writable;
        let marked = self.header.incompatible_features & super::header::INCOMPAT_CORRUPT != 0;
        if self.signaled && (!fatal || marked) {
            return Error::errno(libc::EIO);
        }
        if fatal {
            strata_block::stderr_line!("qcow2: Marking image as corrupt: {msg}; further corruption events will be suppressed");
            if self.geo.version >= 3 {
                self.header.incompatible_features |= super::header::INCOMPAT_CORRUPT;
                let v = self.header.incompatible_features.to_be_bytes();
                let _ = file
                    .write(72, IoBuf::from_slice(&v), WriteFlags::default())
                    .await;
                let _ = file.flush().await;
            }
            self.corrupt = true;
        } else {
            strata_block::stderr_line!("qcow2: Image is corrupt: {msg}; further non-fatal corruption events will be suppressed");
        }
        self.signaled = true;
        Error::errno(libc::EIO)
    }

    /// Writes dirty refcount slices and flushes the file, so that what they
    /// count is stable before anything points to it.
    pub async fn flush_refcounts(&mut self, file: &Arc<Node>) -> Result<()> {
        if self.rb_cache.needs_flush() {
            self.write_back_cache(file, false).await?;
            file.flush().await?;
            self.rb_cache.flushed();
            self.l2_cache.flushed();
        }
        Ok(())
    }

    /// True while lazy refcounts have marked the image dirty: refcounts on
    /// disk may lag behind, so L2 tables no longer wait for them (QEMU:
    /// !qcow2_need_accurate_refcounts).
    pub fn refcounts_deferred(&self) -> bool {
        self.lazy_refcounts
            && self.header.incompatible_features & super::header::INCOMPAT_DIRTY != 0
    }

    /// What must precede writing L2 slices back: the refcounts they rely
    /// on, unless those are deferred.
    async fn flush_refcounts_before_l2(&mut self, file: &Arc<Node>) -> Result<()> {
        if self.refcounts_deferred() {
            return Ok(());
        }
        self.flush_refcounts(file).await
    }

    /// Marks a lazy-refcount image dirty before data clusters are linked
    /// (QEMU: qcow2_alloc_cluster_link_l2); refcounts are deferred from then.
    pub(super) async fn mark_dirty_for_lazy_refcounts(&mut self, file: &Arc<Node>) -> Result<()> {
        if self.lazy_refcounts && !self.refcounts_deferred() {
            self.set_incompatible(file, super::header::INCOMPAT_DIRTY, true)
                .await?;
        }
        Ok(())
    }

    /// Writes dirty L2 slices (after the refcounts they depend on) and
    /// flushes the file.
    pub async fn flush_l2(&mut self, file: &Arc<Node>) -> Result<()> {
        if self.l2_cache.needs_flush() {
            self.flush_refcounts_before_l2(file).await?;
            self.write_back_cache(file, true).await?;
            file.flush().await?;
            self.rb_cache.flushed();
            self.l2_cache.flushed();
        }
        Ok(())
    }

    /// Writes the dirty L2 slices back (after the refcounts they depend on)
    /// and flushes the file, whether or not anything was dirty (QEMU:
    /// qcow2_cache_flush of the L2 cache).
    pub async fn flush_l2_cache(&mut self, file: &Arc<Node>) -> Result<()> {
        if self.l2_cache.has_dirty() {
            self.flush_refcounts_before_l2(file).await?;
            self.write_back_cache(file, true).await?;
        }
        file.flush().await?;
        self.l2_cache.flushed();
        Ok(())
    }

    /// Writes the dirty refcount slices back and flushes the file.
    pub async fn flush_refcount_cache(&mut self, file: &Arc<Node>) -> Result<()> {
        self.write_back_cache(file, false).await?;
        file.flush().await?;
        self.rb_cache.flushed();
        Ok(())
    }

    /// Writes all cached metadata back in the safe order (refcounts left
    /// in the cache while lazy refcounts defer them, as QEMU's
    /// qcow2_write_caches).
    pub async fn flush(&mut self, file: &Arc<Node>) -> Result<()> {
        self.flush_refcounts_before_l2(file).await?;
        if self.l2_cache.has_dirty() {
            self.write_back_cache(file, true).await?;
        }
        Ok(())
    }

    /// Writes L1 entry `i` to disk.
    pub async fn write_l1_entry(&mut self, file: &Arc<Node>, i: usize) -> Result<()> {
        let off = self.header.l1_table_offset + i as u64 * 8;
        self.check_write(file, off, 8, WriteKind::L1).await?;
        file.debug_event(DebugEvent::L1Update).await;
        file.write(
            off,
            IoBuf::from_slice(&self.l1[i].to_be_bytes()),
            WriteFlags::default(),
        )
        .await?;
        file.flush().await
    }

    pub(super) fn l1_range(&self) -> (u64, u64) {
        let o = self.header.l1_table_offset;
        (o, o + self.l1.len() as u64 * 8)
    }

    pub(super) fn reftable_range(&self) -> (u64, u64) {
        let o = self.header.refcount_table_offset;
        (
            o,
            o + self.header.refcount_table_clusters as u64 * self.geo.cluster_size,
        )
    }

    pub(super) fn overlap_check(&self, off: u64, len: u64, kind: WriteKind) -> Result<()> {
        let end = off + len;
        let cs = self.geo.cluster_size;
        let hit = |(a, b): (u64, u64)| off < b && a < end;
        let mut what = if hit((0, cs)) {
            Some("qcow2_header")
        } else if kind != WriteKind::L1 && hit(self.l1_range()) {
            Some("active L1 table")
        } else if hit(self.reftable_range()) {
            Some("refcount table")
        } else {
            None
        };
        if what.is_none() && len > 0 {
            let mut c = off / cs * cs;
            while c < end {
                if kind != WriteKind::L2 && self.l2_tables.contains(&c) {
                    what = Some("active L2 table");
                    break;
                }
                if kind != WriteKind::Refblock && self.refblocks.contains(&c) {
                    what = Some("refcount block");
                    break;
                }
                c += cs;
            }
        }
        match what {
            Some(w) => Err(Error::corrupt(format!(
                "Preventing invalid write on metadata (overlaps with {w})"
            ))),
            None => Ok(()),
        }
    }

    /// Checks a write of `kind` at `[off, off+len)` against every metadata
    /// area it must not touch; a violation is fatal corruption.
    pub async fn check_write(
        &mut self,
        file: &Arc<Node>,
        off: u64,
        len: u64,
        kind: WriteKind,
    ) -> Result<()> {
        if let Err(e) = self.overlap_check(off, len, kind) {
            return Err(self.signal_corruption(file, e).await);
        }
        if self.check_inactive_l2 {
            // An unreadable snapshot table fails the write with its error,
            // without calling the image corrupt (as QEMU returns it).
            if let Some(e) = self.inactive_l2_overlap(file, off, len).await? {
                return Err(self.signal_corruption(file, e).await);
            }
        }
        Ok(())
    }

    /// QEMU's QCOW2_OL_INACTIVE_L2 check: the corruption if
    /// `[off, off+len)` hits an L2 table a snapshot's L1 table points to.
    async fn inactive_l2_overlap(
        &self,
        file: &Arc<Node>,
        off: u64,
        len: u64,
    ) -> Result<Option<Error>> {
        if self.header.nb_snapshots == 0 || len == 0 {
            return Ok(None);
        }
        let cs = self.geo.cluster_size;
        let (snapshots, _) = super::snapshot::read(file, &self.header).await?;
        for sn in snapshots {
            for e in super::snapshot::read_l1(file, &sn, cs).await? {
                let l2 = e & OFFSET_MASK;
                if l2 != 0 && off < l2 + cs && l2 < off + len {
                    return Ok(Some(Error::corrupt(
                        "Preventing invalid write on metadata (overlaps with inactive L2 table)",
                    )));
                }
            }
        }
        Ok(None)
    }

    /// Checks a data write (or a new table) at `[off, off+len)`.
    pub async fn check_metadata_write(
        &mut self,
        file: &Arc<Node>,
        off: u64,
        len: u64,
    ) -> Result<()> {
        self.check_write(file, off, len, WriteKind::Data).await
    }

    /// Checks a guest data write at `[off, off+len)`: only without a data
    /// file does it land in the image file, where it must miss the metadata.
    pub async fn check_data_write(&mut self, file: &Arc<Node>, off: u64, len: u64) -> Result<()> {
        if self.geo.external_data {
            return Ok(());
        }
        self.check_metadata_write(file, off, len).await
    }

    /// Writes back the dirty slices of one cache, each checked first.
    pub(super) async fn write_back_cache(&mut self, file: &Arc<Node>, l2: bool) -> Result<()> {
        let dirty = if l2 {
            self.l2_cache.dirty_offsets()
        } else {
            self.rb_cache.dirty_offsets()
        };
        let kind = if l2 {
            WriteKind::L2
        } else {
            WriteKind::Refblock
        };
        let ss = self.l2_cache.slice_size() as u64;
        if l2 && !dirty.is_empty() && self.l2_cache.depends_on_flush() {
            // Copied-on-write data goes first (QEMU: depends_on_flush).
            file.flush().await?;
            self.l2_cache.flushed();
            self.rb_cache.flushed();
        }
        for off in dirty {
            if self.corrupt {
                return Err(Error::errno(libc::ENOMEDIUM));
            }
            Box::pin(self.check_write(file, off, ss, kind)).await?;
            file.debug_event(update_event(l2)).await;
            let c = if l2 {
                &mut self.l2_cache
            } else {
                &mut self.rb_cache
            };
            c.write_back(file, off).await?;
        }
        Ok(())
    }
}

/// The event announcing the write-back of a cached slice.
pub(super) fn update_event(l2: bool) -> DebugEvent {
    if l2 {
        DebugEvent::L2Update
    } else {
        DebugEvent::RefblockUpdatePart
    }
}
