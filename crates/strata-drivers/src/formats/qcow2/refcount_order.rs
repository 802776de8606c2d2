//! Changing the refcount width of an open image (QEMU:
//! qcow2_change_refcount_order), for `amend -o refcount_bits=N`.
//!
//! New refcount blocks and a new table are built beside the old ones: walks
//! over the old table allocate the new blocks (allocating changes the old
//! refcounts, so the walk repeats until one allocates nothing), a last walk
//! writes them, then the new table, then the header names the new table
//! and width; only after that are the old blocks and table freed. A crash
//! before the header write leaves the old structure whole (the new
//! clusters leak); after it, the new one.

use super::meta::{Meta, OFFSET_MASK};
use super::refcount::put_refcount;
use super::Qcow2Driver;
use strata_block::error::strerror;
use strata_block::{Error, IoBuf, Result, WriteFlags};

/// Largest refcount table QEMU handles (QCOW_MAX_REFTABLE_SIZE, bytes).
const MAX_REFTABLE_BYTES: u64 = 8 << 20;

/// What a walk does with each new refcount block it completes.
enum Step {
    /// Gives every non-empty block a cluster (QEMU: alloc_refblock).
    Alloc,
    /// Writes every block where the new table says (QEMU: flush_refblock).
    Write,
}

fn failed(e: Error, what: &str) -> Error {
    Error::msg(e.code(), format!("{what}: {}", strerror(e.code())))
}

impl Qcow2Driver {
    /// One walk over the old table (QEMU: walk_over_reftable): every old
    /// refcount goes into new blocks of `order`'s width, each handed to
    /// `step` once full. True when it allocated a cluster.
    #[allow(clippy::too_many_arguments)]
    async fn walk_refcounts_into(
        &self,
        m: &mut Meta,
        table: &mut Vec<u64>,
        order: u32,
        step: Step,
        index: u64,
        total: u64,
        status: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<bool> {
        let cs = self.geo.cluster_size;
        let new_entries = (cs * 8) >> order;
        let old_entries = 1u64 << m.geo.rb_bits;
        let mut block = vec![0u8; cs as usize];
        let (mut at, mut empty, mut ti_new) = (0u64, true, 0usize);
        let mut allocated = false;
        let mut ti = 0usize;
        // The table may grow while the walk allocates: its length is read
        // again each time, as QEMU's loop does.
        while ti < m.reftable.len() {
            let size = m.reftable.len() as u64;
            status(index * size + ti as u64, total * size);
            let rb = m.reftable[ti] & OFFSET_MASK;
            if rb != 0 && !rb.is_multiple_of(cs) {
                return Err(Error::msg(
                    libc::EIO,
                    "Image is corrupt (unaligned refblock offset)",
                ));
            }
            for i in 0..old_entries {
                if at >= new_entries {
                    allocated |= self
                        .finish_refblock(m, table, ti_new, &block, empty, &step)
                        .await?;
                    ti_new += 1;
                    (at, empty) = (0, true);
                    block.fill(0);
                }
                let refcount = if rb == 0 {
                    0
                } else {
                    m.refcount(&self.file.get(), ti as u64 * old_entries + i)
                        .await
                        .map_err(|e| failed(e, "Failed to retrieve refblock"))?
                };
                let bits = 1u64 << order;
                if bits < 64 && refcount >> bits != 0 {
                    let offset = (ti as u64 * old_entries + i) * cs;
                    return Err(Error::invalid(format!(
                        "Cannot decrease refcount entry width to {bits} bits: Cluster at offset {offset:#x} has a refcount of {refcount}"
                    )));
                }
                let bit = at << order;
                put_refcount(&mut block, (bit / 8) as usize, bit, order, refcount);
                at += 1;
                empty &= refcount == 0;
            }
            ti += 1;
        }
        if at > 0 {
            allocated |= self
                .finish_refblock(m, table, ti_new, &block, empty, &step)
                .await?;
        }
        let size = m.reftable.len() as u64;
        status((index + 1) * size, total * size);
        Ok(allocated)
    }

    /// A completed new block: allocated or written as `step` says.
    async fn finish_refblock(
        &self,
        m: &mut Meta,
        table: &mut Vec<u64>,
        ti: usize,
        block: &[u8],
        empty: bool,
        step: &Step,
    ) -> Result<bool> {
        let cs = self.geo.cluster_size;
        match step {
            Step::Alloc => {
                if !empty && ti >= table.len() {
                    let len = (ti as u64 + 1).next_multiple_of(cs / 8);
                    if len * 8 > MAX_REFTABLE_BYTES {
                        return Err(Error::unsupported(
                            "This operation would make the refcount table grow beyond the maximum size supported by QEMU, aborting",
                        ));
                    }
                    table.resize(len as usize, 0);
                }
                if !empty && table[ti] == 0 {
                    table[ti] = m
                        .alloc_clusters(&self.file.get(), 1)
                        .await
                        .map_err(|e| failed(e, "Failed to allocate refblock"))?;
                    return Ok(true);
                }
                Ok(false)
            }
            Step::Write => {
                if let Some(&off) = table.get(ti).filter(|&&o| o != 0) {
                    m.check_metadata_write(&self.file.get(), off, cs)
                        .await
                        .map_err(|e| failed(e, "Overlap check failed"))?;
                    self.file
                        .get()
                        .write(off, IoBuf::from_slice(block), WriteFlags::default())
                        .await
                        .map_err(|e| failed(e, "Failed to write refblock"))?;
                }
                Ok(false)
            }
        }
    }

    /// QEMU's qcow2_change_refcount_order, with its messages.
    pub(super) async fn change_refcount_order(
        &self,
        m: &mut Meta,
        order: u32,
        status: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<()> {
        let cs = self.geo.cluster_size;
        let mut table: Vec<u64> = Vec::new();
        let (mut table_off, mut table_allocated) = (0u64, 0u64);
        let mut walk = 0u64;
        let result = async {
            loop {
                let total = (walk + 2).max(3);
                let allocated = self
                    .walk_refcounts_into(m, &mut table, order, Step::Alloc, walk, total, status)
                    .await?;
                walk += 1;
                if !allocated {
                    break;
                }
                if table_off != 0 {
                    m.free_clusters(&self.file.get(), table_off, table_allocated, false)
                        .await?;
                }
                let clusters = (table.len() as u64 * 8).div_ceil(cs);
                table_off = m
                    .alloc_clusters(&self.file.get(), clusters)
                    .await
                    .map_err(|e| failed(e, "Failed to allocate the new reftable"))?;
                table_allocated = clusters;
            }
            self.walk_refcounts_into(m, &mut table, order, Step::Write, walk, walk + 1, status)
                .await?;
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            m.check_metadata_write(&self.file.get(), table_off, bytes.len() as u64)
                .await
                .map_err(|e| failed(e, "Overlap check failed"))?;
            self.file
                .get()
                .write(table_off, IoBuf::from_slice(&bytes), WriteFlags::default())
                .await
                .map_err(|e| failed(e, "Failed to write the new reftable"))?;
            m.flush_refcount_cache(&self.file.get())
                .await
                .map_err(|e| failed(e, "Failed to flush the refblock cache"))?;
            Ok::<(), Error>(())
        }
        .await;
        if let Err(e) = result {
            // The new structure is dropped; the old one still counts.
            for &off in table.iter().filter(|&&o| o != 0) {
                let _ = m.free_clusters(&self.file.get(), off, 1, false).await;
            }
            if table_off != 0 {
                let _ = m
                    .free_clusters(&self.file.get(), table_off, table_allocated, false)
                    .await;
            }
            return Err(e);
        }
        let old_header = m.header.clone();
        m.header.refcount_order = order;
        m.header.refcount_table_offset = table_off;
        m.header.refcount_table_clusters = table_allocated as u32;
        if let Err(e) = self.write_header(m).await {
            m.header = old_header;
            return Err(failed(e, "Failed to update the qcow2 header"));
        }
        // The new width from here on; the old blocks leave the cache.
        let old_table = std::mem::replace(&mut m.reftable, table);
        let old_off = old_header.refcount_table_offset;
        let old_clusters = u64::from(old_header.refcount_table_clusters);
        m.rb_cache.clear();
        m.geo.refcount_order = order;
        m.geo.rb_bits = self.geo.cluster_bits + 3 - order;
        m.refblocks = m
            .reftable
            .iter()
            .map(|e| e & OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
        for off in old_table.into_iter().map(|e| e & OFFSET_MASK) {
            if off != 0 {
                m.free_clusters(&self.file.get(), off, 1, false).await?;
            }
        }
        m.free_clusters(&self.file.get(), old_off, old_clusters, false)
            .await
    }
}
