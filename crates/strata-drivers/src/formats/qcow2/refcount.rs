//! Refcounts and allocation (QEMU: qcow2-refcount.c): reading and setting
//! refcounts of every width, freeing, new refcount blocks, growing the
//! refcount table, and handing out clusters and bytes for compressed data.
//! New structures are installed in memory only once the disk has them.

use super::meta::{be64_at, Meta, MAX_REFTABLE_BYTES, OFFSET_MASK};
use std::sync::Arc;
use strata_block::report::c_hex;
use strata_block::{DebugEvent, Error, IoBuf, Node, Result, WriteFlags};

impl Meta {
    /// A refcount block must start on a cluster boundary; one that does not
    /// is a corrupt refcount table entry (QEMU: qcow2_get_refcount).
    pub(super) async fn check_refblock_aligned(
        &mut self,
        file: &Arc<Node>,
        rb: u64,
        ti: u64,
    ) -> Result<()> {
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
            // QEMU's update_refcount answers an overflow with EINVAL.
            return Err(Error::msg(libc::EINVAL, "Refcount overflow"));
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
        if val == 0 {
            self.busy.freed(hc);
        }
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
                if delta > 0 {
                    // QEMU's update_refcount: an overflow is EINVAL.
                    Error::msg(libc::EINVAL, "Refcount overflow")
                } else {
                    Error::corrupt(format!("Refcount of cluster {hc:#x} would drop below zero"))
                }
            })?;
            self.set_refcount(file, hc, new).await?;
        }
        Ok(())
    }

    /// A cluster some table references must already be counted by a
    /// refcount block. QEMU's update_refcount makes the missing block (EFBIG
    /// if the refcount table cannot grow that far), then fails with EAGAIN
    /// (its allocator would retry; a reference increment does not); Strata
    /// refuses with the same errors before changing anything, as such a
    /// reference points past everything the image ever allocated.
    pub fn counted(&self, off: u64) -> Result<()> {
        let ti = off >> self.geo.cluster_bits >> self.geo.rb_bits;
        match self.reftable.get(ti as usize) {
            Some(e) if e & OFFSET_MASK != 0 => Ok(()),
            _ if (ti + 1).next_multiple_of(self.geo.cluster_size / 8) * 8 > MAX_REFTABLE_BYTES => {
                Err(Error::errno(libc::EFBIG))
            }
            _ => Err(Error::errno(libc::EAGAIN)),
        }
    }

    /// Announces the refcount block of cluster `hc` once per block a
    /// refcount update walks through (QEMU: alloc_refcount_block's events).
    pub(super) async fn announce_refblock(
        &self,
        file: &Arc<Node>,
        hc: u64,
        last_block: &mut Option<u64>,
    ) {
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
    pub(super) async fn ensure_refblock(&mut self, file: &Arc<Node>, ti: u64) -> Result<u64> {
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
    pub(super) async fn write_zero_block(&mut self, file: &Arc<Node>, off: u64) -> Result<()> {
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
    pub(super) async fn put_in_block(
        &mut self,
        file: &Arc<Node>,
        rb: u64,
        idx: u64,
        val: u64,
    ) -> Result<()> {
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
    pub(super) async fn write_reftable_entry(
        &mut self,
        file: &Arc<Node>,
        ti: u64,
        value: u64,
    ) -> Result<()> {
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
    pub(super) async fn grow_reftable(&mut self, file: &Arc<Node>, min_entries: u64) -> Result<()> {
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
    pub(super) async fn allocatable(&mut self, file: &Arc<Node>, hc: u64) -> Result<bool> {
        Ok(self.refcount(file, hc).await? == 0 && !self.busy.is_busy(hc))
    }

    /// Where a first-fit search starts: clusters passed over while busy and
    /// released since are candidates again.
    pub(super) fn search_start(&mut self) -> u64 {
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
