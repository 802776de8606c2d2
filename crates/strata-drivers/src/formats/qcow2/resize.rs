//! Changing the disk's size (QEMU: qcow2_co_truncate): the L1 table grown
//! with a safe switch, shrinking that frees what lies past the new end, and
//! preallocation.

use super::meta::{Meta, OFFSET_MASK, OFLAG_COPIED};
use super::subcluster::{L2Entry, ALL_ALLOC, ALL_ZEROES};
use super::{Clear, Extent, InflightGuard, Qcow2Driver, MAX_L1_BYTES};
use std::sync::atomic::Ordering;
use strata_block::driver::Preallocation;
use strata_block::{DebugEvent, Driver, Error, IoBuf, Result, WriteFlags};

impl Qcow2Driver {
    /// Grows the L1 table to `entries`, moving it to new clusters.
    pub(super) async fn grow_l1(&self, m: &mut Meta, entries: u64) -> Result<()> {
        if entries * 8 > MAX_L1_BYTES {
            return Err(Error::msg(libc::EFBIG, "Active L1 table too large"));
        }
        let cs = self.geo.cluster_size;
        let clusters = (entries * 8).div_ceil(cs);
        self.file
            .get()
            .debug_event(DebugEvent::L1GrowAllocTable)
            .await;
        let new = m.alloc_clusters(&self.file.get(), clusters).await?;
        let switched = self.write_grown_l1(m, new, entries).await;
        let table = match switched {
            Ok(t) => t,
            Err(e) => {
                // The header still names the old table: give the new one back.
                let _ = m
                    .free_clusters(&self.file.get(), new, clusters, false)
                    .await;
                return Err(e);
            }
        };
        let old_off = m.header.l1_table_offset;
        let old_clusters = (m.l1.len() as u64 * 8).div_ceil(cs);
        m.header.l1_table_offset = new;
        m.header.l1_size = entries as u32;
        m.l1 = table;
        if old_off != 0 && old_clusters > 0 {
            m.free_clusters(&self.file.get(), old_off, old_clusters, false)
                .await?;
        }
        Ok(())
    }

    /// Writes the L1 table grown to `entries` at `new` and makes it the
    /// image's by one header write; returns the new table.
    pub(super) async fn write_grown_l1(
        &self,
        m: &mut Meta,
        new: u64,
        entries: u64,
    ) -> Result<Vec<u64>> {
        // The new clusters are counted before anything points to them.
        m.flush_refcounts(&self.file.get()).await?;
        let mut table = m.l1.clone();
        table.resize(entries as usize, 0);
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        m.check_metadata_write(&self.file.get(), new, bytes.len() as u64)
            .await?;
        self.file
            .get()
            .debug_event(DebugEvent::L1GrowWriteTable)
            .await;
        self.file
            .get()
            .write(new, IoBuf::from_slice(&bytes), WriteFlags::default())
            .await?;
        self.file.get().flush().await?;
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&(entries as u32).to_be_bytes());
        hdr[4..].copy_from_slice(&new.to_be_bytes());
        self.file
            .get()
            .debug_event(DebugEvent::L1GrowActivateTable)
            .await;
        self.file
            .get()
            .write(36, IoBuf::from_slice(&hdr), WriteFlags::default())
            .await?;
        self.file.get().flush().await?;
        Ok(table)
    }

    /// Shrinks the disk to `size` as QEMU does: the clusters past the new
    /// end are dropped for good, L2 tables past it freed, the header updated,
    /// and the file cut after the last cluster still in use.
    pub(super) async fn shrink(&self, size: u64) -> Result<()> {
        let cs = self.geo.cluster_size;
        let first = size.div_ceil(cs);
        let end = self.length().div_ceil(cs);
        if end > first {
            self.clear_clusters(first, end - first, Clear::Drop).await?;
        }
        let mut m = self.meta.lock().await;
        let keep = self.geo.l1_size_for(size) as usize;
        for i in keep..m.l1.len() {
            let l2 = m.l1[i] & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            // Unlink first, then free: never a reference to a free table.
            m.l1[i] = 0;
            m.write_l1_entry(&self.file.get(), i).await?;
            self.file.get().flush().await?;
            m.l2_cache.remove_table(l2, cs);
            m.l2_tables.remove(&l2);
            m.free_clusters(&self.file.get(), l2, 1, true).await?;
        }
        m.write_disk_size(&self.file.get(), size).await?;
        self.size.store(size, Ordering::Release);
        m.flush(&self.file.get()).await?;
        self.file.get().flush().await?;
        // Cut the file after the last cluster in use.
        let mut last = self.file.get().length().div_ceil(cs);
        // A cluster with a late write still in flight stays: cut after it.
        while last > 0
            && m.refcount(&self.file.get(), last - 1).await? == 0
            && !self.host_busy.is_busy(last - 1)
        {
            last -= 1;
        }
        if last * cs < self.file.get().length() {
            self.file
                .get()
                .truncate(last * cs, false, Preallocation::Off)
                .await?;
        }
        drop(m);
        // The data file shrinks with the disk, as QEMU resizes it.
        if let Some(d) = self.external() {
            d.truncate(size, false, Preallocation::Off).await?;
        }
        Ok(())
    }

    /// Allocates host clusters for guest `[from, to)`, and reserves
    /// (falloc) or zero-writes (full) their data, as QEMU's
    /// qcow2_co_truncate does: metadata preallocation gives a new cluster
    /// to each cluster this image does not have alone (preallocate_co);
    /// falloc and full give one to every cluster from the one `from` lies
    /// in. Where `from` is inside a cluster, what that cluster held before
    /// it is copied into the new one, so the old part of the disk reads as
    /// before. `alloc_all`: with extended L2 entries, the new clusters'
    /// subclusters are marked allocated (their zeroes hide a backing file).
    pub(super) async fn preallocate(
        &self,
        from: u64,
        to: u64,
        mode: Preallocation,
        alloc_all: bool,
    ) -> Result<()> {
        if let Some(d) = self.external() {
            return self.preallocate_external(d, from, to, mode).await;
        }
        let cs = self.geo.cluster_size;
        let every = matches!(mode, Preallocation::Falloc | Preallocation::Full);
        let first = from / cs;
        let end = to.div_ceil(cs);
        let mut gc = first;
        let mut host_end = 0;
        while gc < end {
            let table_end = ((gc >> self.geo.l2_bits) + 1) << self.geo.l2_bits;
            let stop = table_end.min(end);
            // A write below the old end may still be allocating the first cluster.
            let mut m = self.lock_idle(gc, stop - 1).await?;
            let l2 = self.writable_l2(&mut m, gc).await?;
            let mut fresh: Vec<(u64, L2Entry)> = Vec::new();
            for c in gc..stop {
                let e = match m.l2_entry(&self.file.get(), c).await? {
                    Some((_, _, e)) => e,
                    None => L2Entry::default(),
                };
                // Kept: a cluster of this image alone (QEMU: cluster_needs_new_alloc).
                let ours = !e.compressed() && e.host() != 0 && e.entry & OFLAG_COPIED != 0;
                if every || !ours {
                    fresh.push((c, e));
                }
            }
            if fresh.is_empty() {
                gc = stop;
                continue;
            }
            let n = fresh.len() as u64;
            // Fresh clusters at the end of the file, as QEMU takes them: a
            // reused free cluster would show its old data through the new entry.
            let file_end = self.file.get().length().div_ceil(cs);
            m.free_cluster_index = m.free_cluster_index.max(file_end);
            let host = m.alloc_clusters(&self.file.get(), n).await?;
            let _inflight = InflightGuard::new(self, gc, stop - 1);
            let (c0, e0) = fresh[0];
            let head = match c0 == first {
                true => from - c0 * cs,
                false => 0,
            };
            let mask = self.geo.l2_entries() - 1;
            // What the first cluster held, for its copy (decoded here, under the lock).
            let head_mapping = match self.geo.extended_l2 {
                true => self.cluster_mapping(&e0),
                false => m.decode(e0.entry, l2, c0 & mask)?,
            };
            let source = Extent {
                offset: c0 * cs,
                len: cs,
                mapping: head_mapping,
            };
            let _cow_src = self.hold_hosts(&m, &[source]);
            drop(m);
            self.reserve_data(host, n * cs, mode).await?;
            if head > 0 {
                // What the cluster held below the old end, in the new cluster.
                // (falloc and full copy all of it, whatever the subclusters.)
                let (cow_from, old) = match self.geo.extended_l2 {
                    true => {
                        let f = if every { 0 } else { self.cow_start(&e0, head) };
                        (f, self.old_sub_content(c0, &e0, f, head).await?)
                    }
                    false => (0, self.old_content(c0, head_mapping, 0, head).await?),
                };
                if cow_from < head {
                    self.write_data(host + cow_from, c0 * cs + cow_from, old)
                        .await?;
                }
            }
            let mut m = self.meta.lock().await;
            let mut old = Vec::new();
            for (i, &(c, e)) in fresh.iter().enumerate() {
                old.push(self.cluster_mapping(&e));
                let h = host + i as u64 * cs;
                m.l2_set(&self.file.get(), l2, c & mask, h | OFLAG_COPIED)
                    .await?;
                if self.geo.extended_l2 && alloc_all {
                    let bitmap = (e.bitmap | ALL_ALLOC) & !ALL_ZEROES;
                    m.l2_set_bitmap(&self.file.get(), l2, c & mask, bitmap)
                        .await?;
                }
            }
            self.release_old(&mut m, &old, false).await?;
            drop(m);
            host_end = host_end.max(host + n * cs);
            gc = stop;
        }
        // The file reaches the end of the last cluster, so reads never fall off it.
        if host_end > self.file.get().length() {
            self.file
                .get()
                .truncate(host_end, false, Preallocation::Off)
                .await?;
        }
        self.meta.lock().await.flush(&self.file.get()).await
    }

    /// Reserves (falloc) or zero-writes (full) the data of `len` bytes of
    /// new clusters at `host`.
    async fn reserve_data(&self, host: u64, len: u64, mode: Preallocation) -> Result<()> {
        match mode {
            Preallocation::Falloc => {
                // Growing the file reserves what it adds; clusters the
                // file already reaches (metadata was written past them)
                // are reserved as zeroes, which the filesystem allocates.
                let old = self.file.get().length();
                let end = host + len;
                if old > host {
                    let reserve = end.min(old) - host;
                    match self
                        .file
                        .get()
                        .write_zeroes(host, reserve, WriteFlags::default())
                        .await
                    {
                        Err(e) if e.code() != libc::ENOTSUP => return Err(e),
                        _ => {}
                    }
                }
                if end > old {
                    self.file
                        .get()
                        .truncate(end, false, Preallocation::Falloc)
                        .await?
                }
                Ok(())
            }
            Preallocation::Full => {
                self.file
                    .get()
                    .write_zeroes(host, len, WriteFlags::default())
                    .await
            }
            _ => Ok(()),
        }
    }
}
