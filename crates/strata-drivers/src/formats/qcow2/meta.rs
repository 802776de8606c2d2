//! qcow2 metadata in memory: the L1 table, the refcount table, the cache of
//! L2 and refcount slices, and cluster allocation.
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
}

impl Geometry {
    pub fn new(
        cluster_bits: u32,
        refcount_order: u32,
        version: u32,
        external_data: bool,
    ) -> Geometry {
        Geometry {
            cluster_bits,
            cluster_size: 1 << cluster_bits,
            l2_bits: cluster_bits - 3,
            refcount_order,
            rb_bits: cluster_bits + 3 - refcount_order,
            version,
            external_data,
        }
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
            (Mapping::Zero(Some(a)), Mapping::Zero(Some(b))) => a + len == b,
            (Mapping::Unallocated, Mapping::Unallocated)
            | (Mapping::Zero(None), Mapping::Zero(None))
            | (Mapping::Compressed(_), Mapping::Compressed(_)) => true,
            _ => false,
        }
    }
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

fn be64_at(b: &[u8], off: usize) -> u64 {
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
        if self.geo.version >= 3 && entry & OFLAG_ZERO != 0 {
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
    async fn ensure_slice(&mut self, file: &Arc<Node>, off: u64, l2: bool) -> Result<()> {
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
    async fn make_room(&mut self, file: &Arc<Node>, l2: bool) -> Result<()> {
        let cache = if l2 { &self.l2_cache } else { &self.rb_cache };
        if cache.is_full() {
            if let Some((victim, dirty)) = cache.victim() {
                if dirty {
                    if l2 {
                        self.flush_refcounts(file).await?;
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
        let (slice, at) = self.l2_cache.slice_of(l2_off, idx * 8);
        self.ensure_slice(file, slice, true).await?;
        let b = self
            .l2_cache
            .get(slice)
            .ok_or_else(|| Error::errno(libc::EIO))?;
        Ok(be64_at(b, at))
    }

    /// Sets entry `idx` of the L2 table at `l2_off` (in the cache, dirty).
    pub async fn l2_set(
        &mut self,
        file: &Arc<Node>,
        l2_off: u64,
        idx: u64,
        val: u64,
    ) -> Result<()> {
        let (slice, at) = self.l2_cache.slice_of(l2_off, idx * 8);
        self.ensure_slice(file, slice, true).await?;
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
    fn check_external(&self, m: Mapping, gc: u64, l2: u64, idx: u64) -> Result<Mapping> {
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

    /// Sets or clears incompatible feature bits (dirty, corrupt) on disk and
    /// flushes, so that the bit is stable before what depends on it.
    pub async fn set_incompatible(&mut self, file: &Arc<Node>, bits: u64, on: bool) -> Result<()> {
        let old = self.header.incompatible_features;
        let new = if on { old | bits } else { old & !bits };
        if new == old || self.geo.version < 3 {
            return Ok(());
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

    /// A refcount block must start on a cluster boundary; one that does not
    /// is a corrupt refcount table entry (QEMU: qcow2_get_refcount).
    async fn check_refblock_aligned(&mut self, file: &Arc<Node>, rb: u64, ti: u64) -> Result<()> {
        if self.geo.offset_in_cluster(rb) == 0 {
            return Ok(());
        }
        let e = Error::corrupt(format!(
            "Refblock offset {} unaligned (reftable index: {})",
            c_hex(rb),
            c_hex(ti)
        ));
        Err(self.signal_corruption(file, e).await)
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
            eprintln!("qcow2: Marking image as corrupt: {msg}; further corruption events will be suppressed");
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
            eprintln!("qcow2: Image is corrupt: {msg}; further non-fatal corruption events will be suppressed");
        }
        self.signaled = true;
        Error::errno(libc::EIO)
    }

    /// The refcount of host cluster `hc` (0 where no refcount block exists).
    pub async fn refcount(&mut self, file: &Arc<Node>, hc: u64) -> Result<u64> {
        let ti = (hc >> self.geo.rb_bits) as usize;
        let Some(&rb) = self.reftable.get(ti) else {
            return Ok(0);
        };
        let rb = rb & OFFSET_MASK;
        if rb == 0 {
            return Ok(0);
        }
        self.check_refblock_aligned(file, rb, ti as u64).await?;
        let i = hc & ((1 << self.geo.rb_bits) - 1);
        let bit = i << self.geo.refcount_order;
        let (slice, at) = self.rb_cache.slice_of(rb, bit / 8);
        self.ensure_slice(file, slice, false).await?;
        let b = self
            .rb_cache
            .get(slice)
            .ok_or_else(|| Error::errno(libc::EIO))?;
        Ok(get_refcount(b, at, bit, self.geo.refcount_order))
    }

    /// Sets the refcount of host cluster `hc`, allocating a refcount block
    /// (and growing the refcount table) where none covers it.
    pub async fn set_refcount(&mut self, file: &Arc<Node>, hc: u64, val: u64) -> Result<()> {
        if val > self.geo.refcount_max() {
            return Err(Error::msg(libc::ERANGE, "Refcount overflow"));
        }
        let ti = hc >> self.geo.rb_bits;
        let rb = self.ensure_refblock(file, ti).await?;
        let i = hc & ((1 << self.geo.rb_bits) - 1);
        let bit = i << self.geo.refcount_order;
        let (slice, at) = self.rb_cache.slice_of(rb, bit / 8);
        self.ensure_slice(file, slice, false).await?;
        let order = self.geo.refcount_order;
        let b = self
            .rb_cache
            .get_mut(slice)
            .ok_or_else(|| Error::errno(libc::EIO))?;
        put_refcount(b, at, bit, order, val);
        if val == 0 && hc < self.free_cluster_index {
            self.free_cluster_index = hc;
        }
        if val == 0 && self.free_byte_offset >> self.geo.cluster_bits == hc {
            // Compressed data must not be packed into a cluster given back.
            self.free_byte_offset = 0;
        }
        Ok(())
    }

    /// Adds `delta` to the refcounts of `n` clusters from host offset `off`.
    pub async fn update_refcounts(
        &mut self,
        file: &Arc<Node>,
        off: u64,
        n: u64,
        delta: i64,
    ) -> Result<()> {
        let first = off >> self.geo.cluster_bits;
        let mut last_block = None;
        for hc in first..first + n {
            self.announce_refblock(file, hc, &mut last_block).await;
            let cur = self.refcount(file, hc).await?;
            let new = cur.checked_add_signed(delta).ok_or_else(|| {
                Error::corrupt(format!("Refcount of cluster {hc:#x} would drop below zero"))
            })?;
            self.set_refcount(file, hc, new).await?;
        }
        Ok(())
    }

    /// Announces the refcount block of cluster `hc` once per block a
    /// refcount update walks through (QEMU: alloc_refcount_block's events).
    async fn announce_refblock(&self, file: &Arc<Node>, hc: u64, last_block: &mut Option<u64>) {
        let ti = hc >> self.geo.rb_bits;
        if *last_block == Some(ti) {
            return;
        }
        *last_block = Some(ti);
        file.debug_event(DebugEvent::RefblockAlloc).await;
        if self
            .reftable
            .get(ti as usize)
            .is_some_and(|e| e & OFFSET_MASK != 0)
        {
            file.debug_event(DebugEvent::RefblockLoad).await;
        }
    }

    /// Drops one reference to each of `n` clusters from `off`; with
    /// `discard`, clusters that become free are discarded in the file too.
    /// As QEMU's defaults: guest discards and repairs discard, metadata moves
    /// (old L1, old refcount table, copied L2 tables) do not.
    pub async fn free_clusters(
        &mut self,
        file: &Arc<Node>,
        off: u64,
        n: u64,
        discard: bool,
    ) -> Result<()> {
        file.debug_event(DebugEvent::ClusterFree).await;
        self.update_refcounts(file, off, n, -1).await?;
        if discard {
            // One discard per run of clusters that became free.
            let cs = self.geo.cluster_size;
            let mut run: Option<(u64, u64)> = None;
            for hc in off / cs..off / cs + n {
                let free = self.refcount(file, hc).await? == 0;
                run = match (run, free) {
                    (Some((s, l)), true) => Some((s, l + 1)),
                    (None, true) => Some((hc, 1)),
                    (Some((s, l)), false) => {
                        file.discard(s * cs, l * cs).await?;
                        None
                    }
                    (None, false) => None,
                };
            }
            if let Some((s, l)) = run {
                file.discard(s * cs, l * cs).await?;
            }
        }
        Ok(())
    }

    /// The refcount block for refcount table index `ti`, made if missing.
    /// Like QEMU, a new block takes the first free cluster; if that cluster
    /// lies in the very range the block describes, the block counts itself.
    async fn ensure_refblock(&mut self, file: &Arc<Node>, ti: u64) -> Result<u64> {
        if let Some(&e) = self.reftable.get(ti as usize) {
            if e & OFFSET_MASK != 0 {
                self.check_refblock_aligned(file, e & OFFSET_MASK, ti)
                    .await?;
                return Ok(e & OFFSET_MASK);
            }
        }
        if ti as usize >= self.reftable.len() {
            Box::pin(self.grow_reftable(file, ti + 1)).await?;
            if let Some(&e) = self.reftable.get(ti as usize) {
                if e & OFFSET_MASK != 0 {
                    return Ok(e & OFFSET_MASK);
                }
            }
        }
        let mut f = self.search_start();
        while !self.allocatable(file, f).await? {
            f += 1;
        }
        let tf = f >> self.geo.rb_bits;
        let covered = self
            .reftable
            .get(tf as usize)
            .is_some_and(|e| e & OFFSET_MASK != 0);
        if !covered && tf != ti {
            // The free cluster needs a block of its own range first.
            Box::pin(self.ensure_refblock(file, tf)).await?;
            return Box::pin(self.ensure_refblock(file, ti)).await;
        }
        let rb = f << self.geo.cluster_bits;
        self.check_metadata_write(file, rb, self.geo.cluster_size)
            .await?;
        file.debug_event(DebugEvent::RefblockAllocWrite).await;
        let hooked = async {
            self.write_zero_block(file, rb).await?;
            if covered {
                Box::pin(self.set_refcount(file, f, 1)).await?;
                self.flush_refcounts(file).await?;
            } else {
                let idx = f & ((1 << self.geo.rb_bits) - 1);
                self.put_in_block(file, rb, idx, 1).await?;
            }
            self.write_reftable_entry(file, ti, rb).await
        }
        .await;
        if let Err(e) = hooked {
            // The table does not point to the block: nothing cached may
            // treat that cluster as one (it is free and will be reused).
            self.rb_cache.remove_table(rb, self.geo.cluster_size);
            return Err(e);
        }
        // Only now that the disk has it does memory.
        self.reftable[ti as usize] = rb;
        self.refblocks.insert(rb);
        if self.free_cluster_index == f {
            self.free_cluster_index = f + 1;
        }
        Ok(rb)
    }

    /// Writes a zeroed cluster at `off` and drops stale cached slices of it.
    async fn write_zero_block(&mut self, file: &Arc<Node>, off: u64) -> Result<()> {
        file.write(
            off,
            IoBuf::zeroed(self.geo.cluster_size as usize),
            WriteFlags::default(),
        )
        .await?;
        self.rb_cache.remove_table(off, self.geo.cluster_size);
        self.l2_cache.remove_table(off, self.geo.cluster_size);
        Ok(())
    }

    /// Sets entry `idx` of the refcount block at `rb` directly (the block
    /// may not be in the refcount table yet).
    async fn put_in_block(&mut self, file: &Arc<Node>, rb: u64, idx: u64, val: u64) -> Result<()> {
        let bit = idx << self.geo.refcount_order;
        let (slice, at) = self.rb_cache.slice_of(rb, bit / 8);
        self.ensure_slice(file, slice, false).await?;
        let order = self.geo.refcount_order;
        let b = self
            .rb_cache
            .get_mut(slice)
            .ok_or_else(|| Error::errno(libc::EIO))?;
        put_refcount(b, at, bit, order, val);
        Ok(())
    }

    /// Writes refcount table entry `ti` as `value`, after everything it
    /// points to; the caller installs it in memory once this succeeded.
    async fn write_reftable_entry(&mut self, file: &Arc<Node>, ti: u64, value: u64) -> Result<()> {
        // Everything the entry points to is on disk before the entry is.
        self.flush_refcounts(file).await?;
        let off = self.header.refcount_table_offset + ti * 8;
        let v = value.to_be_bytes();
        file.debug_event(DebugEvent::RefblockAllocHookup).await;
        file.write(off, IoBuf::from_slice(&v), WriteFlags::default())
            .await?;
        file.flush().await
    }

    /// Replaces the refcount table by a larger one of at least `min_entries`.
    /// The new table goes after everything in use, followed by the blocks
    /// that count it; it becomes the image's by one header write, after
    /// which the old table is freed.
    async fn grow_reftable(&mut self, file: &Arc<Node>, min_entries: u64) -> Result<()> {
        file.debug_event(DebugEvent::ReftableGrow).await;
        let cs = self.geo.cluster_size;
        let per_cluster = cs / 8;
        let old_entries = self.reftable.len() as u64;
        let covered_end = old_entries << self.geo.rb_bits;
        // After anything in use, including a run being counted right now.
        let start = covered_end
            .max(file.length().div_ceil(cs))
            .max(self.free_cluster_index);
        let mut entries = min_entries
            .max(old_entries * 3 / 2 + 1)
            .div_ceil(per_cluster)
            * per_cluster;
        // Find how many new blocks are needed to count the table and themselves.
        let (table_clusters, blocks) = loop {
            let tc = (entries * 8).div_ceil(cs);
            let mut nb = 0;
            let blocks = loop {
                let end = start + tc + nb;
                let first_ti = start >> self.geo.rb_bits;
                let last_ti = (end - 1) >> self.geo.rb_bits;
                let missing: Vec<u64> = (first_ti..=last_ti)
                    .filter(|&t| {
                        self.reftable
                            .get(t as usize)
                            .is_none_or(|e| e & OFFSET_MASK == 0)
                    })
                    .collect();
                if missing.len() as u64 == nb {
                    break missing;
                }
                nb = missing.len() as u64;
            };
            let last_ti = (start + tc + blocks.len() as u64 - 1) >> self.geo.rb_bits;
            if last_ti < entries {
                break (tc, blocks);
            }
            entries = (last_ti + 1).div_ceil(per_cluster) * per_cluster;
        };
        if entries * 8 > MAX_REFTABLE_BYTES {
            return Err(Error::msg(libc::EFBIG, "Refcount table too large"));
        }
        let old_off = self.header.refcount_table_offset;
        let old_clusters = self.header.refcount_table_clusters as u64;
        // The new table is built beside the old one; memory switches to it
        // only after the header on disk has (a failure leaves both as they were).
        let mut table = self.reftable.clone();
        table.resize(entries as usize, 0);
        let end = start + table_clusters + blocks.len() as u64;
        file.debug_event(DebugEvent::RefblockAllocWriteBlocks).await;
        let mut new_blocks = Vec::new();
        for (k, &ti) in blocks.iter().enumerate() {
            let rb = (start + table_clusters + k as u64) << self.geo.cluster_bits;
            // A new block counts the new clusters in its own range.
            let mut block = vec![0u8; cs as usize];
            let first = ti << self.geo.rb_bits;
            for hc in start.max(first)..end.min(first + (1 << self.geo.rb_bits)) {
                let bit = (hc - first) << self.geo.refcount_order;
                put_refcount(
                    &mut block,
                    (bit / 8) as usize,
                    bit,
                    self.geo.refcount_order,
                    1,
                );
            }
            file.write(rb, IoBuf::from_slice(&block), WriteFlags::default())
                .await?;
            self.rb_cache.remove_table(rb, cs);
            self.l2_cache.remove_table(rb, cs);
            table[ti as usize] = rb;
            new_blocks.push(rb);
        }
        // New clusters in ranges that already have a block are counted there
        // (if the switch fails they are leaked, never lost).
        for hc in start..end {
            let has_block = self
                .reftable
                .get((hc >> self.geo.rb_bits) as usize)
                .is_some_and(|e| e & OFFSET_MASK != 0);
            if has_block {
                self.set_refcount(file, hc, 1).await?;
            }
        }
        self.flush_refcounts(file).await?;
        let new_off = start << self.geo.cluster_bits;
        let mut bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        bytes.resize((table_clusters * cs) as usize, 0);
        file.debug_event(DebugEvent::RefblockAllocWriteTable).await;
        file.write(new_off, IoBuf::from_slice(&bytes), WriteFlags::default())
            .await?;
        file.flush().await?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&new_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        file.debug_event(DebugEvent::RefblockAllocSwitchTable).await;
        file.write(48, IoBuf::from_slice(&hdr), WriteFlags::default())
            .await?;
        file.flush().await?;
        self.reftable = table;
        self.refblocks.extend(new_blocks);
        self.header.refcount_table_offset = new_off;
        self.header.refcount_table_clusters = table_clusters as u32;
        Box::pin(self.update_refcounts(file, old_off, old_clusters, -1)).await?;
        Ok(())
    }

    /// True when host cluster `hc` may be handed out: no reference counts
    /// it and no request's I/O to it is still in flight.
    async fn allocatable(&mut self, file: &Arc<Node>, hc: u64) -> Result<bool> {
        Ok(self.refcount(file, hc).await? == 0 && !self.busy.is_busy(hc))
    }

    /// Where a first-fit search starts: clusters passed over while busy and
    /// released since are candidates again.
    fn search_start(&mut self) -> u64 {
        if let Some(m) = self.busy.take_released_min() {
            self.free_cluster_index = self.free_cluster_index.min(m);
        }
        self.free_cluster_index
    }

    /// Allocates `n` contiguous free clusters (first fit) with refcount 1.
    pub async fn alloc_clusters(&mut self, file: &Arc<Node>, n: u64) -> Result<u64> {
        file.debug_event(DebugEvent::ClusterAlloc).await;
        let mut start = self.search_start();
        let mut found = 0;
        while found < n {
            let hc = start + found;
            if !self.allocatable(file, hc).await? {
                start = hc + 1;
                found = 0;
                continue;
            }
            found += 1;
        }
        let off = start << self.geo.cluster_bits;
        if off + (n << self.geo.cluster_bits) > (1u64 << 56) {
            return Err(Error::msg(libc::EFBIG, "Image file is too large"));
        }
        // As QEMU's alloc_clusters_noref: the search position moves past
        // the run first, so a refcount block made while counting it
        // goes after the run (where QEMU puts it), never inside.
        self.free_cluster_index = start + n;
        let mut last_block = None;
        for hc in start..start + n {
            self.announce_refblock(file, hc, &mut last_block).await;
            self.set_refcount(file, hc, 1).await?;
        }
        Ok(off)
    }

    /// Allocates `size` bytes for compressed data, packed after the last
    /// compressed cluster where they fit (QEMU: qcow2_alloc_bytes). Every
    /// cluster the bytes touch gains one reference.
    pub async fn alloc_bytes(&mut self, file: &Arc<Node>, size: u64) -> Result<u64> {
        file.debug_event(DebugEvent::ClusterAllocBytes).await;
        let cs = self.geo.cluster_size;
        let mut offset = self.free_byte_offset;
        if offset != 0 && self.refcount(file, offset / cs).await? == self.geo.refcount_max() {
            offset = 0;
        }
        let free_in_cluster = if offset == 0 { 0 } else { cs - offset % cs };
        if offset == 0 || free_in_cluster < size {
            // One free cluster, not counted yet (QEMU: alloc_clusters_noref).
            let mut hc = self.search_start();
            while !self.allocatable(file, hc).await? {
                hc += 1;
            }
            self.free_cluster_index = hc + 1;
            let new = hc * cs;
            if new == 0 {
                let e = Error::corrupt(
                    "Preventing invalid allocation of compressed cluster at offset 0",
                );
                return Err(self.signal_corruption(file, e).await);
            }
            if offset == 0 || offset.div_ceil(cs) * cs != new {
                offset = new;
            }
        }
        let first = offset / cs;
        let last = (offset + size - 1) / cs;
        self.update_refcounts(file, first * cs, last - first + 1, 1)
            .await?;
        self.free_byte_offset = if (offset + size).is_multiple_of(cs) {
            0
        } else {
            offset + size
        };
        Ok(offset)
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

    /// Writes dirty L2 slices (after the refcounts they depend on) and
    /// flushes the file.
    pub async fn flush_l2(&mut self, file: &Arc<Node>) -> Result<()> {
        if self.l2_cache.needs_flush() {
            self.flush_refcounts(file).await?;
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
            self.flush_refcounts(file).await?;
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

    /// Writes all cached metadata back in the safe order.
    pub async fn flush(&mut self, file: &Arc<Node>) -> Result<()> {
        self.flush_refcounts(file).await?;
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

    fn l1_range(&self) -> (u64, u64) {
        let o = self.header.l1_table_offset;
        (o, o + self.l1.len() as u64 * 8)
    }

    fn reftable_range(&self) -> (u64, u64) {
        let o = self.header.refcount_table_offset;
        (
            o,
            o + self.header.refcount_table_clusters as u64 * self.geo.cluster_size,
        )
    }

    fn overlap_check(&self, off: u64, len: u64, kind: WriteKind) -> Result<()> {
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
        match self.overlap_check(off, len, kind) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.signal_corruption(file, e).await),
        }
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
    async fn write_back_cache(&mut self, file: &Arc<Node>, l2: bool) -> Result<()> {
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
fn update_event(l2: bool) -> DebugEvent {
    if l2 {
        DebugEvent::L2Update
    } else {
        DebugEvent::RefblockUpdatePart
    }
}

/// Reads a refcount of `1 << order` bits at bit `bit` of a block, whose
/// byte `at` of this slice holds that bit.
pub fn get_refcount(b: &[u8], at: usize, bit: u64, order: u32) -> u64 {
    match order {
        0..=2 => {
            let width = 1u32 << order;
            let shift = (bit % 8) as u32;
            ((b[at] >> shift) as u64) & ((1 << width) - 1)
        }
        3 => b[at] as u64,
        4 => u16::from_be_bytes([b[at], b[at + 1]]) as u64,
        5 => u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as u64,
        _ => be64_at(b, at),
    }
}

/// Writes a refcount; see [`get_refcount`].
pub fn put_refcount(b: &mut [u8], at: usize, bit: u64, order: u32, val: u64) {
    match order {
        0..=2 => {
            let width = 1u32 << order;
            let shift = (bit % 8) as u32;
            let mask = (((1u16 << width) - 1) as u8) << shift;
            b[at] = (b[at] & !mask) | (((val as u8) << shift) & mask);
        }
        3 => b[at] = val as u8,
        4 => b[at..at + 2].copy_from_slice(&(val as u16).to_be_bytes()),
        5 => b[at..at + 4].copy_from_slice(&(val as u32).to_be_bytes()),
        _ => b[at..at + 8].copy_from_slice(&val.to_be_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_packing_every_width() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 128];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            for i in 0..16u64 {
                let bit = i << order;
                put_refcount(&mut b, (bit / 8) as usize, bit, order, (i * 7) & max);
            }
            for i in 0..16u64 {
                let bit = i << order;
                assert_eq!(
                    get_refcount(&b, (bit / 8) as usize, bit, order),
                    (i * 7) & max,
                    "order {order} i {i}"
                );
            }
        }
    }
}
