//! The qcow2 format (docs/interop/qcow2.txt): versions 2 and 3, refcount
//! widths 1 to 64 bits, cluster sizes 512 B to 2 MiB, zero clusters,
//! compressed clusters (read), backing files.
//!
//! Concurrency: the metadata sits behind one async lock, held for lookups and
//! allocation only, never across guest data I/O. A write that allocates
//! clusters marks their guest clusters in flight; another write to them waits
//! until the first has written its data and linked the clusters in its L2
//! table, so a new cluster is visible only once its data is there.

mod cache;
mod check;
mod compress;
mod create;
mod data_file;
pub mod header;
mod host_inflight;
mod meta;
mod snapshot;

use async_trait::async_trait;
use data_file::DataFile;
use header::{
    Compression, Header, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
};
use host_inflight::{HostGuard, HostInflight};
use meta::{
    Geometry, Mapping, Meta, MAX_REFTABLE_BYTES, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
    OFLAG_ZERO,
};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use strata_block::driver::{CheckResult, FormatSpecific, Preallocation, RepairMode};
use strata_block::error::strerror;
use strata_block::options::{take_dict, take_str, OptSpec, Opts};
use strata_block::report::error_report;
use strata_block::{
    BlockStatus, Child, ChildRole, DebugEvent, Driver, DriverClass, Error, IoBuf, Node, OpenCtx,
    OpenFlags, Perm, Result, WriteFlags,
};
use tokio::sync::{Mutex, Notify};

/// The `qcow2` driver class.
pub struct Qcow2Class;

/// Largest L1 table QEMU accepts (bytes).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Upper bound of the L2 cache (bytes), as QEMU's default.
const MAX_L2_CACHE_BYTES: u64 = 32 << 20;

/// An open qcow2 image.
pub struct Qcow2Driver {
    file: Arc<Node>,
    /// Where guest data lives (the image file unless there is a data file).
    data: DataFile,
    /// The data file must read as the disk by itself (data_file_raw).
    data_raw: bool,
    /// Swapped by set_backing (external snapshots); read per request.
    backing: std::sync::RwLock<Option<Arc<Node>>>,
    geo: Geometry,
    size: AtomicU64,
    compression: Compression,
    meta: Mutex<Meta>,
    /// Guest clusters being allocated by a write in flight.
    inflight: std::sync::Mutex<BTreeSet<u64>>,
    /// Host clusters with guest I/O in flight (shared with `meta`'s allocator).
    host_busy: Arc<HostInflight>,
    alloc_done: Notify,
    read_only: bool,
}

/// Guest clusters being allocated by one write; unmarked (and waiters woken)
/// when dropped, so a cancelled write cannot leave them marked forever.
struct InflightGuard<'a> {
    driver: &'a Qcow2Driver,
    first: u64,
    last: u64,
}

impl<'a> InflightGuard<'a> {
    fn new(driver: &'a Qcow2Driver, first: u64, last: u64) -> Self {
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

/// How `clear_clusters` changes the L2 entries of whole clusters.
#[derive(Clone, Copy, Debug)]
enum Clear {
    /// write_zeroes: zero clusters; with `unmap` their host clusters go.
    Zero { unmap: bool },
    /// A guest discard (QEMU's semantics for v2 and v3).
    Discard,
    /// Gone for good (shrinking): unallocated, host clusters freed.
    Drop,
}

/// One piece of a request: `len` guest bytes at `offset`, all mapped alike.
#[derive(Clone, Copy, Debug)]
struct Extent {
    offset: u64,
    len: u64,
    mapping: Mapping,
}

impl Qcow2Driver {
    fn lock_inflight(&self) -> std::sync::MutexGuard<'_, BTreeSet<u64>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True while a write is allocating any of guest clusters `[first, last]`.
    fn allocating(&self, first: u64, last: u64) -> bool {
        self.lock_inflight().range(first..=last).next().is_some()
    }

    /// Holds the host clusters that `extents` read or write in place, so
    /// none is handed out again while the I/O is in flight (taken under the
    /// metadata lock, where the mapping was looked up).
    fn hold_hosts<'e>(&self, extents: impl IntoIterator<Item = &'e Extent>) -> HostGuard {
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

    /// The backing node, if any.
    fn backing(&self) -> Option<Arc<Node>> {
        self.backing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The node guest data is read from and written to.
    fn data(&self) -> Result<&Arc<Node>> {
        match &self.data {
            DataFile::Internal => Ok(&self.file),
            DataFile::External(n) => Ok(n),
            // Opened for metadata only (`info`): there is no data to reach.
            DataFile::Unopened => Err(Error::errno(libc::ENOMEDIUM)),
        }
    }

    /// The external data file, if one is open.
    fn external(&self) -> Option<&Arc<Node>> {
        match &self.data {
            DataFile::External(n) => Some(n),
            _ => None,
        }
    }

    /// Splits `[offset, offset+len)` into extents of like mapping; contiguous
    /// data clusters merge into one extent.
    async fn extents(&self, m: &mut Meta, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let cs = self.geo.cluster_size;
        let mut out: Vec<Extent> = Vec::new();
        let mut off = offset;
        let end = offset + len;
        while off < end {
            let gc = off >> self.geo.cluster_bits;
            let n = (cs - self.geo.offset_in_cluster(off)).min(end - off);
            let mapping = match m.mapping(&self.file, gc).await? {
                Mapping::Normal { host, copied } => Mapping::Normal {
                    host: host + self.geo.offset_in_cluster(off),
                    copied,
                },
                Mapping::Zero(Some(host)) => {
                    Mapping::Zero(Some(host + self.geo.offset_in_cluster(off)))
                }
                other => other,
            };
            if let Some(last) = out.last_mut() {
                let merge = match (last.mapping, mapping) {
                    (
                        Mapping::Normal {
                            host: a,
                            copied: ca,
                        },
                        Mapping::Normal {
                            host: b,
                            copied: cb,
                        },
                    ) => a + last.len == b && ca == cb,
                    (Mapping::Unallocated, Mapping::Unallocated) => true,
                    (Mapping::Zero(None), Mapping::Zero(None)) => true,
                    _ => false,
                };
                if merge {
                    last.len += n;
                    off += n;
                    continue;
                }
            }
            out.push(Extent {
                offset: off,
                len: n,
                mapping,
            });
            off += n;
        }
        Ok(out)
    }

    /// Reads one extent's bytes into `buf`.
    async fn read_extent(&self, e: Extent, buf: IoBuf) -> Result<IoBuf> {
        match e.mapping {
            Mapping::Normal { host, .. } => {
                self.file.debug_event(DebugEvent::ReadAio).await;
                self.data()?.read(host, buf).await
            }
            Mapping::Zero(_) => Ok(zero_fill(buf)),
            Mapping::Unallocated => self.read_backing(e.offset, buf).await,
            Mapping::Compressed(entry) => {
                let data = self.read_compressed(entry).await?;
                let mut buf = buf;
                let at = self.geo.offset_in_cluster(e.offset) as usize;
                buf.as_mut_slice()
                    .copy_from_slice(&data[at..at + e.len as usize]);
                Ok(buf)
            }
        }
    }

    /// Reads from the backing file; zeroes where there is none or it is shorter.
    async fn read_backing(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let Some(b) = self.backing() else {
            return Ok(zero_fill(buf));
        };
        self.file.debug_event(DebugEvent::ReadBackingAio).await;
        let blen = b.length();
        if offset >= blen {
            return Ok(zero_fill(buf));
        }
        let n = (buf.len() as u64).min(blen - offset) as usize;
        if n == buf.len() {
            return b.read(offset, buf).await;
        }
        let (head, tail) = buf.split_at(n);
        let head = b.read(offset, head).await?;
        Ok(IoBuf::join_all(vec![head, zero_fill(tail)]))
    }

    /// The decompressed cluster a compressed L2 entry points to.
    async fn read_compressed(&self, entry: u64) -> Result<Vec<u8>> {
        let x = 62 - (self.geo.cluster_bits - 8);
        let host = entry & ((1u64 << x) - 1);
        let sectors = ((entry >> x) & ((1u64 << (self.geo.cluster_bits - 8)) - 1)) + 1;
        let len = (sectors * 512 - (host & 511)).min(self.file.length().saturating_sub(host));
        if len == 0 {
            return Err(Error::corrupt(format!(
                "Compressed cluster at {host:#x} lies beyond the end of the image"
            )));
        }
        self.file.debug_event(DebugEvent::ReadCompressed).await;
        let src = self.file.read(host, IoBuf::zeroed(len as usize)).await?;
        let mut out = vec![0u8; self.geo.cluster_size as usize];
        compress::decompress(self.compression, src.as_slice(), &mut out)?;
        Ok(out)
    }

    /// The old content of guest cluster `gc` (bytes `range` of it), for
    /// copy-on-write into a newly allocated cluster.
    async fn old_content(&self, gc: u64, mapping: Mapping, from: u64, to: u64) -> Result<IoBuf> {
        let buf = IoBuf::zeroed((to - from) as usize);
        let off = (gc << self.geo.cluster_bits) + from;
        let mapping = match mapping {
            Mapping::Normal { host, copied } => Mapping::Normal {
                host: host + from,
                copied,
            },
            m => m,
        };
        self.file.debug_event(DebugEvent::CowRead).await;
        self.read_extent(
            Extent {
                offset: off,
                len: to - from,
                mapping,
            },
            buf,
        )
        .await
    }

    /// Makes sure guest cluster `gc` has an L2 table it may write to
    /// (allocating or copying it) and returns the table's offset.
    async fn writable_l2(&self, m: &mut Meta, gc: u64) -> Result<u64> {
        let l1i = (gc >> self.geo.l2_bits) as usize;
        if l1i >= m.l1.len() {
            // Past the table (VM state lives there): grow it by half again
            // until it fits, as QEMU's qcow2_grow_l1_table(exact=false).
            let mut n = (m.l1.len() as u64).max(1);
            while n < l1i as u64 + 1 {
                n = (n * 3).div_ceil(2);
            }
            self.grow_l1(m, n).await?;
        }
        let e = m.l1[l1i];
        let e_old = e;
        let old = e & OFFSET_MASK;
        if old != 0 && e & OFLAG_COPIED != 0 {
            return Ok(old);
        }
        let cs = self.geo.cluster_size;
        let new = m.alloc_clusters(&self.file, 1).await?;
        // Content first: zeroes, or a copy of the shared table.
        let content = if old == 0 {
            IoBuf::zeroed(cs as usize)
        } else {
            m.flush_l2(&self.file).await?;
            self.file.debug_event(DebugEvent::L2AllocCowRead).await;
            self.file.debug_event(DebugEvent::L2Load).await;
            self.file.read(old, IoBuf::zeroed(cs as usize)).await?
        };
        m.check_metadata_write(&self.file, new, cs).await?;
        m.l2_cache.remove_table(new, cs);
        self.file.debug_event(DebugEvent::L2AllocWrite).await;
        self.file.debug_event(DebugEvent::L2Update).await;
        let content = self.file.write(new, content, WriteFlags::default()).await?;
        m.adopt_l2_table(&self.file, new, content.as_slice())
            .await?;
        // Its refcount and content are stable before L1 points to it.
        m.flush_refcounts(&self.file).await?;
        self.file.flush().await?;
        m.l1[l1i] = new | OFLAG_COPIED;
        m.l2_tables.insert(new);
        if let Err(e) = m.write_l1_entry(&self.file, l1i).await {
            // The table was not linked: memory must say what the disk says.
            m.l1[l1i] = e_old;
            m.l2_tables.remove(&new);
            return Err(e);
        }
        if old != 0 {
            self.file.flush().await?;
            m.l2_cache.remove_table(old, cs);
            m.l2_tables.remove(&old);
            m.update_refcounts(&self.file, old, 1, -1).await?;
        }
        Ok(new)
    }

    /// Waits until none of the guest clusters `[first, last]` is being allocated.
    async fn wait_inflight(&self, first: u64, last: u64) {
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

    /// Writes `buf` at guest `offset`; the range lies within one L2 table.
    async fn write_in_table(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let cs = self.geo.cluster_size;
        let len = buf.len() as u64;
        let first = offset >> self.geo.cluster_bits;
        let last = (offset + len - 1) >> self.geo.cluster_bits;
        loop {
            self.wait_inflight(first, last).await;
            let mut m = self.meta.lock().await;
            if m.corrupt {
                return Err(Error::errno(libc::ENOMEDIUM));
            }
            // Already in flight by someone who got the lock first: wait again.
            if self.allocating(first, last) {
                continue;
            }
            let mut mappings = Vec::with_capacity((last - first + 1) as usize);
            for gc in first..=last {
                mappings.push(m.mapping(&self.file, gc).await?);
            }
            // Fast path: every cluster is ours alone and contiguous on the host.
            if let Mapping::Normal { host, copied: true } = mappings[0] {
                let contiguous = mappings.iter().enumerate().all(|(i, mp)| {
                    *mp == Mapping::Normal {
                        host: host + i as u64 * cs,
                        copied: true,
                    }
                });
                if contiguous {
                    let at = host + self.geo.offset_in_cluster(offset);
                    m.check_data_write(&self.file, at, len).await?;
                    let _held = self.hold_hosts(&[Extent {
                        offset,
                        len,
                        mapping: mappings[0],
                    }]);
                    drop(m);
                    self.file.debug_event(DebugEvent::WriteAio).await;
                    return self.data()?.write(at, buf, WriteFlags::default()).await;
                }
            }
            // Split at the first cluster that is (or is not) written in place.
            let in_place = |mp: &Mapping| matches!(mp, Mapping::Normal { copied: true, .. });
            let head_in_place = in_place(&mappings[0]);
            let run = mappings
                .iter()
                .take_while(|mp| in_place(mp) == head_in_place)
                .count() as u64;
            if run < last - first + 1 {
                let split = ((first + run) << self.geo.cluster_bits) - offset;
                let (a, b) = buf.split_at(split as usize);
                drop(m);
                let a = Box::pin(self.write_in_table(offset, a)).await?;
                let b = Box::pin(self.write_in_table(offset + split, b)).await?;
                return Ok(IoBuf::join_all(vec![a, b]));
            }
            if head_in_place {
                // In place but not contiguous on the host: cluster by cluster.
                drop(m);
                let split = (cs - self.geo.offset_in_cluster(offset)).min(len);
                let (a, b) = buf.split_at(split as usize);
                let a = Box::pin(self.write_in_table(offset, a)).await?;
                if b.is_empty() {
                    return Ok(a);
                }
                let b = Box::pin(self.write_in_table(offset + split, b)).await?;
                return Ok(IoBuf::join_all(vec![a, b]));
            }
            // Allocate: new L2 table if needed, then the data clusters.
            let n = last - first + 1;
            let l2 = self.writable_l2(&mut m, first).await?;
            if m.header.compatible_features & COMPAT_LAZY_REFCOUNTS != 0 {
                // Lazy refcounts: the image is marked dirty while refcounts may lag.
                m.set_incompatible(&self.file, INCOMPAT_DIRTY, true).await?;
            }
            let host = if self.geo.external_data {
                // A data file keeps each cluster at its guest offset, uncounted.
                first << self.geo.cluster_bits
            } else {
                m.alloc_clusters(&self.file, n).await?
            };
            m.check_data_write(&self.file, host, n * cs).await?;
            // Marked in flight until this guard goes, even if this future is dropped.
            let _inflight = InflightGuard::new(self, first, last);
            // The clusters copy-on-write reads from stay theirs meanwhile.
            let cs_len = |i: usize| Extent {
                offset: (first + i as u64) << self.geo.cluster_bits,
                len: cs,
                mapping: mappings[i],
            };
            let _cow_src = self.hold_hosts(&[cs_len(0), cs_len(mappings.len() - 1)]);
            drop(m);
            let written = self
                .write_new_clusters(offset, buf, host, first, &mappings)
                .await;
            let mut m = self.meta.lock().await;
            return match written {
                // Linking failed half way leaves leaks at worst, never a
                // reference to a free cluster.
                Ok((buf, copied)) => {
                    if copied {
                        // Copied old data must be stable before an L2 entry
                        // points at it: a crash would lose data the guest had.
                        m.l2_cache.set_depends_on_flush();
                    }
                    self.link_clusters(&mut m, l2, first, host, mappings.len())
                        .await
                        .map(|()| buf)
                }
                Err(e) => {
                    // Nothing points to the new clusters yet: give them back.
                    // Data file clusters were never counted, so nothing is
                    // freed for them (freeing would hit unrelated clusters).
                    if !self.geo.external_data {
                        let _ = m.update_refcounts(&self.file, host, n, -1).await;
                    }
                    Err(e)
                }
            };
        }
    }

    /// Writes guest data and the copied-on-write rest of the partial first
    /// and last clusters into the new clusters at `host`, in one write; true
    /// when old data was copied.
    async fn write_new_clusters(
        &self,
        offset: u64,
        buf: IoBuf,
        host: u64,
        first: u64,
        mappings: &[Mapping],
    ) -> Result<(IoBuf, bool)> {
        let cs = self.geo.cluster_size;
        let head = self.geo.offset_in_cluster(offset);
        let end = head + buf.len() as u64;
        let total = (mappings.len() as u64) * cs;
        let data = self.data()?;
        if head == 0 && end == total {
            self.file.debug_event(DebugEvent::WriteAio).await;
            let buf = data.write(host, buf, WriteFlags::default()).await?;
            return Ok((buf, false));
        }
        let mut merged = IoBuf::zeroed(total as usize);
        if head > 0 {
            let old = self.old_content(first, mappings[0], 0, head).await?;
            merged.as_mut_slice()[..head as usize].copy_from_slice(old.as_slice());
        }
        if end < total {
            let last = mappings.len() - 1;
            let from = end - last as u64 * cs;
            let old = self
                .old_content(first + last as u64, mappings[last], from, cs)
                .await?;
            merged.as_mut_slice()[end as usize..].copy_from_slice(old.as_slice());
        }
        merged.as_mut_slice()[head as usize..end as usize].copy_from_slice(buf.as_slice());
        // Guest data and copied-on-write bytes go in one write (QEMU's
        // merged COW announces both).
        self.file.debug_event(DebugEvent::WriteAio).await;
        self.file.debug_event(DebugEvent::CowWrite).await;
        data.write(host, merged, WriteFlags::default()).await?;
        Ok((buf, true))
    }

    /// Points the L2 entries of `mappings.len()` guest clusters from `first`
    /// at the new clusters from `host`, then drops the old clusters' references.
    async fn link_clusters(
        &self,
        m: &mut Meta,
        l2: u64,
        first: u64,
        host: u64,
        n: usize,
    ) -> Result<()> {
        let mask = self.geo.l2_entries() - 1;
        let mut old = Vec::with_capacity(n);
        for i in 0..n as u64 {
            let gc = first + i;
            // What the entry says now is what this write replaces.
            old.push(m.mapping(&self.file, gc).await?);
            let h = host + (i << self.geo.cluster_bits);
            m.l2_set(&self.file, l2, gc & mask, h | OFLAG_COPIED)
                .await?;
        }
        // Overwritten clusters are not discarded (QEMU's pass-discard-other).
        self.release_old(m, &old, false).await
    }

    /// Drops the references old mappings held, after the L2 change is on disk.
    async fn release_old(&self, m: &mut Meta, old: &[Mapping], discard: bool) -> Result<()> {
        let frees: Vec<(u64, u64)> = old
            .iter()
            .filter_map(|mp| self.host_cluster_of(*mp))
            .collect();
        if frees.is_empty() {
            return Ok(());
        }
        // Neighbouring clusters are freed (and discarded) as one run.
        let mut frees = frees;
        frees.sort_unstable();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let cs = self.geo.cluster_size;
        for (off, n) in frees {
            match runs.last_mut() {
                Some((o, l)) if *o + *l * cs == off => *l += n,
                _ => runs.push((off, n)),
            }
        }
        if self.geo.external_data {
            // Nothing counts data file clusters; only the discard goes on
            // (QEMU: qcow2_free_any_cluster with a data file).
            if discard {
                let data = self.data()?;
                for (off, n) in runs {
                    data.discard(off, n * cs).await?;
                }
            }
            return Ok(());
        }
        m.flush_l2(&self.file).await?;
        for (off, n) in runs {
            m.free_clusters(&self.file, off, n, discard).await?;
        }
        Ok(())
    }

    /// The host clusters a mapping references (offset, count).
    fn host_cluster_of(&self, mp: Mapping) -> Option<(u64, u64)> {
        let cs = self.geo.cluster_size;
        match mp {
            Mapping::Normal { host, .. } | Mapping::Zero(Some(host)) => Some((host & !(cs - 1), 1)),
            Mapping::Compressed(entry) => {
                let x = 62 - (self.geo.cluster_bits - 8);
                let off = entry & ((1u64 << x) - 1);
                let sectors = ((entry >> x) & ((1u64 << (self.geo.cluster_bits - 8)) - 1)) + 1;
                let end = off + sectors * 512 - (off & 511);
                let start = off & !(cs - 1);
                Some((start, (end - start).div_ceil(cs)))
            }
            _ => None,
        }
    }

    /// Sets the L2 entries of whole clusters `[first, first+n)` to `zero`
    /// (reads as zeroes) or unallocated, releasing what they pointed to.
    async fn clear_clusters(&self, first: u64, n: u64, how: Clear) -> Result<()> {
        let mut gc = first;
        let end = first + n;
        while gc < end {
            let table_end = ((gc >> self.geo.l2_bits) + 1) << self.geo.l2_bits;
            let stop = table_end.min(end);
            self.wait_inflight(gc, stop - 1).await;
            let mut m = self.meta.lock().await;
            if m.corrupt {
                return Err(Error::errno(libc::ENOMEDIUM));
            }
            // A write may have marked clusters in flight before we got the lock.
            if self.allocating(gc, stop - 1) {
                continue;
            }
            // Without a table nothing is allocated: zeroing still records
            // zero clusters, as QEMU does; a discard must only hide a
            // backing file (v3).
            let v3 = self.geo.version >= 3;
            let needs_table = match how {
                Clear::Zero { .. } => true,
                Clear::Discard => v3 && self.backing().is_some(),
                Clear::Drop => false,
            };
            if m.l2_table_of(gc)?.is_none() && !needs_table {
                gc = stop;
                continue;
            }
            let l2 = self.writable_l2(&mut m, gc).await?;
            let mask = self.geo.l2_entries() - 1;
            let mut old = Vec::new();
            for c in gc..stop {
                let entry = m.l2_get(&self.file, l2, c & mask).await?;
                let mp = m.mapping(&self.file, c).await?;
                let allocated = !matches!(mp, Mapping::Unallocated | Mapping::Zero(None));
                let (new, release) = match how {
                    // As QEMU: compressed data always goes; other allocations
                    // go when unmapping is allowed, else keep their cluster, zeroed.
                    Clear::Zero { unmap } => {
                        let drop_it = matches!(mp, Mapping::Compressed(_)) || (unmap && allocated);
                        (
                            if drop_it {
                                OFLAG_ZERO
                            } else {
                                entry | OFLAG_ZERO
                            },
                            drop_it,
                        )
                    }
                    // v3 keeps a discarded cluster reading as zeroes where it
                    // was allocated or a backing file would show through.
                    Clear::Discard
                        if v3 && (self.backing().is_some() || mp != Mapping::Unallocated) =>
                    {
                        (OFLAG_ZERO, true)
                    }
                    Clear::Discard | Clear::Drop => (0, true),
                };
                if new == entry {
                    continue;
                }
                if release {
                    old.push(mp);
                }
                m.l2_set(&self.file, l2, c & mask, new).await?;
            }
            // Guest discards and unmapping zero writes give the space back.
            self.release_old(&mut m, &old, true).await?;
            gc = stop;
        }
        Ok(())
    }

    /// Whether a partial write-zeroes on guest cluster `gc`, covering
    /// `[from, to)` of the image, may zero the whole cluster instead (QEMU's
    /// rule): the cluster holds no data here, and the rest of it already
    /// reads as zeroes through the backing chain. Some(true) when
    /// `[from, to)` reads as zeroes too.
    async fn may_zero_whole_cluster(&self, gc: u64, from: u64, to: u64) -> Result<Option<bool>> {
        let cs = self.geo.cluster_size;
        let mp = self.meta.lock().await.mapping(&self.file, gc).await?;
        match mp {
            Mapping::Zero(_) => return Ok(Some(true)),
            Mapping::Unallocated => {}
            _ => return Ok(None),
        }
        let cluster_end = ((gc + 1) * cs).min(self.length());
        let rest_zero = self.backing_reads_zero(gc * cs, from).await?
            && self.backing_reads_zero(to, cluster_end).await?;
        if !rest_zero {
            return Ok(None);
        }
        Ok(Some(self.backing_reads_zero(from, to).await?))
    }

    /// True when guest `[start, end)` reads as zeroes from the backing chain.
    async fn backing_reads_zero(&self, start: u64, end: u64) -> Result<bool> {
        let Some(b) = self.backing() else {
            return Ok(true);
        };
        let mut off = start;
        while off < end.min(b.length()) {
            let (st, _) = b.block_status_above(None, off, end - off).await?;
            if !st.zero {
                return Ok(false);
            }
            off += st.len.max(1);
        }
        Ok(true)
    }

    /// Makes guest cluster `gc` a zero cluster for a partial write-zeroes
    /// that [`may_zero_whole_cluster`](Self::may_zero_whole_cluster) allowed;
    /// false if it holds data by the time the lock is taken (a write linked
    /// some since the decision): then the caller writes the zeroes.
    async fn zero_whole_cluster(&self, gc: u64, own_zero: bool) -> Result<bool> {
        loop {
            let mut m = self.meta.lock().await;
            if m.corrupt {
                return Err(Error::errno(libc::ENOMEDIUM));
            }
            // Decided again here, under the lock the change is made under.
            let mp = m.mapping(&self.file, gc).await?;
            if !matches!(mp, Mapping::Unallocated | Mapping::Zero(_)) {
                return Ok(false);
            }
            if self.allocating(gc, gc) {
                if own_zero {
                    // The cluster reads as zeroes already, and the write
                    // allocating it copies those zeroes: nothing to do (and
                    // no wait, as with QEMU).
                    return Ok(true);
                }
                drop(m);
                self.wait_inflight(gc, gc).await;
                continue;
            }
            let l2 = self.writable_l2(&mut m, gc).await?;
            let idx = gc & (self.geo.l2_entries() - 1);
            let entry = m.l2_get(&self.file, l2, idx).await?;
            if entry & OFLAG_ZERO == 0 {
                m.l2_set(&self.file, l2, idx, entry | OFLAG_ZERO).await?;
            }
            return Ok(true);
        }
    }

    /// With data_file_raw, zeroes `[offset, offset+len)` of the data file
    /// before the clusters become zero clusters, so that it still reads as
    /// the disk by itself (QEMU: qcow2_subcluster_zeroize).
    async fn zero_raw_data(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        if !self.data_raw {
            return Ok(());
        }
        self.data()?.write_zeroes(offset, len, flags).await
    }

    /// Grows the L1 table to `entries`, moving it to new clusters.
    async fn grow_l1(&self, m: &mut Meta, entries: u64) -> Result<()> {
        if entries * 8 > MAX_L1_BYTES {
            return Err(Error::msg(libc::EFBIG, "Active L1 table too large"));
        }
        let cs = self.geo.cluster_size;
        let clusters = (entries * 8).div_ceil(cs);
        self.file.debug_event(DebugEvent::L1GrowAllocTable).await;
        let new = m.alloc_clusters(&self.file, clusters).await?;
        let switched = self.write_grown_l1(m, new, entries).await;
        let table = match switched {
            Ok(t) => t,
            Err(e) => {
                // The header still names the old table: give the new one back.
                let _ = m.free_clusters(&self.file, new, clusters, false).await;
                return Err(e);
            }
        };
        let old_off = m.header.l1_table_offset;
        let old_clusters = (m.l1.len() as u64 * 8).div_ceil(cs);
        m.header.l1_table_offset = new;
        m.header.l1_size = entries as u32;
        m.l1 = table;
        if old_off != 0 && old_clusters > 0 {
            m.free_clusters(&self.file, old_off, old_clusters, false)
                .await?;
        }
        Ok(())
    }

    /// Writes the L1 table grown to `entries` at `new` and makes it the
    /// image's by one header write; returns the new table.
    async fn write_grown_l1(&self, m: &mut Meta, new: u64, entries: u64) -> Result<Vec<u64>> {
        // The new clusters are counted before anything points to them.
        m.flush_refcounts(&self.file).await?;
        let mut table = m.l1.clone();
        table.resize(entries as usize, 0);
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        m.check_metadata_write(&self.file, new, bytes.len() as u64)
            .await?;
        self.file.debug_event(DebugEvent::L1GrowWriteTable).await;
        self.file
            .write(new, IoBuf::from_slice(&bytes), WriteFlags::default())
            .await?;
        self.file.flush().await?;
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&(entries as u32).to_be_bytes());
        hdr[4..].copy_from_slice(&new.to_be_bytes());
        self.file.debug_event(DebugEvent::L1GrowActivateTable).await;
        self.file
            .write(36, IoBuf::from_slice(&hdr), WriteFlags::default())
            .await?;
        self.file.flush().await?;
        Ok(table)
    }

    /// Writes one guest cluster compressed (QEMU:
    /// qcow2_co_pwritev_compressed_task): only into an unallocated cluster;
    /// data that does not shrink is written the ordinary way.
    async fn write_compressed_cluster(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let cs = self.geo.cluster_size as usize;
        let mut data = buf.as_slice().to_vec();
        // The last cluster of an image whose size is not a multiple of it.
        data.resize(cs, 0);
        let Some(packed) = compress::compress(self.compression, &data, cs - 1) else {
            return self.write(offset, buf, WriteFlags::default()).await;
        };
        let plen = packed.len() as u64;
        let gc = offset >> self.geo.cluster_bits;
        let idx = gc & (self.geo.l2_entries() - 1);
        // Plan under the lock: the cluster must be unallocated; it is marked
        // in flight so no other write allocates it meanwhile.
        let (host, _inflight) = loop {
            self.wait_inflight(gc, gc).await;
            let mut m = self.meta.lock().await;
            if m.corrupt {
                return Err(Error::errno(libc::ENOMEDIUM));
            }
            if self.allocating(gc, gc) {
                continue;
            }
            let l2 = self.writable_l2(&mut m, gc).await?;
            // Compression cannot overwrite anything.
            if m.l2_get(&self.file, l2, idx).await? & OFFSET_MASK != 0 {
                return Err(Error::errno(libc::EIO));
            }
            let host = m.alloc_bytes(&self.file, plen).await?;
            m.check_metadata_write(&self.file, host, plen).await?;
            break (host, InflightGuard::new(self, gc, gc));
        };
        // I/O without it: the data is on disk before anything points to it.
        self.file.debug_event(DebugEvent::WriteCompressed).await;
        let written = self
            .file
            .write(host, IoBuf::from_slice(&packed), WriteFlags::default())
            .await;
        // Commit under it.
        let mut m = self.meta.lock().await;
        let cs = self.geo.cluster_size;
        let (first_hc, n) = (host / cs, (host + plen - 1) / cs - host / cs + 1);
        if let Err(e) = written {
            // Nothing points to the bytes: give their references back.
            let _ = m.update_refcounts(&self.file, first_hc * cs, n, -1).await;
            return Err(e);
        }
        let l2 = self.writable_l2(&mut m, gc).await?;
        let sectors = (host + plen - 1) / 512 - host / 512;
        let shift = 62 - (self.geo.cluster_bits - 8);
        self.file.debug_event(DebugEvent::L2UpdateCompressed).await;
        m.l2_set(
            &self.file,
            l2,
            idx,
            OFLAG_COMPRESSED | host | (sectors << shift),
        )
        .await?;
        Ok(buf)
    }

    /// Where VM state starts: after the last L1 entry the disk needs
    /// (QEMU: qcow2_vm_state_offset).
    fn vm_state_offset(&self) -> u64 {
        self.geo.l1_size_for(self.length()) << (self.geo.cluster_bits + self.geo.l2_bits)
    }

    /// Shrinks the disk to `size` as QEMU does: the clusters past the new
    /// end are dropped for good, L2 tables past it freed, the header updated,
    /// and the file cut after the last cluster still in use.
    async fn shrink(&self, size: u64) -> Result<()> {
        let cs = self.geo.cluster_size;
        if self.meta.lock().await.header.nb_snapshots > 0 {
            return Err(Error::unsupported(
                "Can't resize an image which has snapshots",
            ));
        }
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
            m.write_l1_entry(&self.file, i).await?;
            self.file.flush().await?;
            m.l2_cache.remove_table(l2, cs);
            m.l2_tables.remove(&l2);
            m.free_clusters(&self.file, l2, 1, true).await?;
        }
        self.file
            .write(
                24,
                IoBuf::from_slice(&size.to_be_bytes()),
                WriteFlags::default(),
            )
            .await?;
        m.header.size = size;
        self.size.store(size, Ordering::Release);
        m.flush(&self.file).await?;
        self.file.flush().await?;
        // Cut the file after the last cluster in use.
        let mut last = self.file.length().div_ceil(cs);
        // A cluster with a late write still in flight stays: cut after it.
        while last > 0
            && m.refcount(&self.file, last - 1).await? == 0
            && !self.host_busy.is_busy(last - 1)
        {
            last -= 1;
        }
        if last * cs < self.file.length() {
            self.file.truncate(last * cs, Preallocation::Off).await?;
        }
        drop(m);
        // The data file shrinks with the disk, as QEMU resizes it.
        if let Some(d) = self.external() {
            d.truncate(size, Preallocation::Off).await?;
        }
        Ok(())
    }

    /// Allocates host clusters for guest `[from, to)` (metadata), and
    /// reserves (falloc) or zero-writes (full) their data.
    async fn preallocate(&self, from: u64, to: u64, mode: Preallocation) -> Result<()> {
        if let Some(d) = self.external() {
            return self.preallocate_external(d, from, to, mode).await;
        }
        let cs = self.geo.cluster_size;
        let mut gc = from.div_ceil(cs);
        let end = to.div_ceil(cs);
        let mut host_end = 0;
        while gc < end {
            let table_end = ((gc >> self.geo.l2_bits) + 1) << self.geo.l2_bits;
            let stop = table_end.min(end);
            let mut m = self.meta.lock().await;
            let l2 = self.writable_l2(&mut m, gc).await?;
            let n = stop - gc;
            // Fresh clusters at the end of the file, as QEMU takes them: a
            // reused free cluster would show its old data through the new entry.
            let file_end = self.file.length().div_ceil(cs);
            m.free_cluster_index = m.free_cluster_index.max(file_end);
            let host = m.alloc_clusters(&self.file, n).await?;
            let mask = self.geo.l2_entries() - 1;
            for i in 0..n {
                m.l2_set(
                    &self.file,
                    l2,
                    (gc + i) & mask,
                    (host + i * cs) | OFLAG_COPIED,
                )
                .await?;
            }
            drop(m);
            match mode {
                Preallocation::Falloc => {
                    self.file
                        .truncate(self.file.length().max(host + n * cs), Preallocation::Falloc)
                        .await?
                }
                Preallocation::Full => {
                    self.file
                        .write_zeroes(host, n * cs, WriteFlags::default())
                        .await?
                }
                _ => {}
            }
            host_end = host_end.max(host + n * cs);
            gc = stop;
        }
        // The file reaches the end of the last cluster, so reads never fall off it.
        if host_end > self.file.length() {
            self.file.truncate(host_end, Preallocation::Off).await?;
        }
        self.meta.lock().await.flush(&self.file).await
    }
}

fn zero_fill(mut buf: IoBuf) -> IoBuf {
    buf.as_mut_slice().fill(0);
    buf
}

#[async_trait]
impl Driver for Qcow2Driver {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn length(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn children(&self) -> Vec<Child> {
        let mut c = vec![Child {
            role: ChildRole::File,
            node: Arc::clone(&self.file),
        }];
        if let Some(b) = self.backing() {
            c.push(Child {
                role: ChildRole::Backing,
                node: b,
            });
        }
        if let Some(d) = self.external() {
            c.push(Child::new(ChildRole::DataFile, d));
        }
        c
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let (extents, _held) = {
            let mut m = self.meta.lock().await;
            let e = self.extents(&mut m, offset, buf.len() as u64).await?;
            let held = self.hold_hosts(&e);
            (e, held)
        };
        if extents.len() == 1 {
            return self.read_extent(extents[0], buf).await;
        }
        let lens: Vec<usize> = extents.iter().map(|e| e.len as usize).collect();
        let parts = buf.split_into(&lens);
        let reads = extents
            .into_iter()
            .zip(parts)
            .map(|(e, p)| self.read_extent(e, p));
        let parts = futures::future::try_join_all(reads).await?;
        Ok(IoBuf::join_all(parts))
    }

    async fn write(&self, offset: u64, buf: IoBuf, _flags: WriteFlags) -> Result<IoBuf> {
        if self.read_only {
            return Err(Error::errno(libc::EPERM));
        }
        // One piece per L2 table; the pieces come back and join again.
        let cover = self.geo.l2_coverage();
        let mut off = offset;
        let mut rest = buf;
        let mut done = Vec::new();
        while !rest.is_empty() {
            let n = (cover - off % cover).min(rest.len() as u64) as usize;
            let (piece, tail) = rest.split_at(n);
            done.push(self.write_in_table(off, piece).await?);
            off += n as u64;
            rest = tail;
        }
        Ok(IoBuf::join_all(done))
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        if self.geo.version < 3 {
            return Err(Error::errno(libc::ENOTSUP));
        }
        let cs = self.geo.cluster_size;
        let end = offset + len;
        // A request that reaches the end of the image covers its partial
        // last cluster whole (as in QEMU).
        let aligned_end = if end == self.length() {
            end.div_ceil(cs) * cs
        } else {
            end / cs * cs
        };
        // Cluster by cluster pieces, as the generic layer splits them for QEMU:
        // whole clusters become zero clusters; a partial one too if the rest
        // of it reads as zeroes already, else its bytes are written.
        let mut off = offset;
        while off < end {
            let gc = off / cs;
            let run_end = if off.is_multiple_of(cs) {
                aligned_end.max(off)
            } else {
                off
            };
            if run_end > off {
                self.zero_raw_data(off, run_end.min(end) - off, flags)
                    .await?;
                self.clear_clusters(
                    gc,
                    (run_end - off) / cs,
                    Clear::Zero {
                        unmap: flags.may_unmap,
                    },
                )
                .await?;
                off = run_end.min(end);
                continue;
            }
            let piece_end = ((gc + 1) * cs).min(end);
            // The request grows to the whole cluster, as in QEMU, if the
            // cluster still holds no data when the change is made. (A raw
            // data file would have to be zeroed first, which could wipe a
            // write racing for the cluster: it gets the bytes written.)
            let whole = match self.may_zero_whole_cluster(gc, off, piece_end).await? {
                Some(own_zero) if !self.data_raw => self.zero_whole_cluster(gc, own_zero).await?,
                _ => false,
            };
            if !whole {
                self.write(off, IoBuf::zeroed((piece_end - off) as usize), flags)
                    .await?;
            }
            off = piece_end;
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let cs = self.geo.cluster_size;
        let start = offset.div_ceil(cs) * cs;
        let mut end = (offset + len) / cs * cs;
        // The partial last cluster of the image counts as whole.
        if offset + len == self.length() {
            end = (offset + len).div_ceil(cs) * cs;
        }
        if start >= end {
            return Ok(());
        }
        let v3 = self.geo.version >= 3;
        if !v3 && self.backing().is_some() {
            // v2 cannot mark clusters zero, and unallocating them would show
            // the backing file: discard does nothing (as in QEMU).
            return Ok(());
        }
        self.clear_clusters(start / cs, (end - start) / cs, Clear::Discard)
            .await
    }

    async fn flush(&self) -> Result<()> {
        // Data first, then the metadata that points to it.
        if let Some(d) = self.external() {
            d.flush().await?;
        }
        let mut m = self.meta.lock().await;
        m.flush(&self.file).await?;
        self.file.flush().await?;
        m.l2_cache.flushed();
        m.rb_cache.flushed();
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let cs = self.geo.cluster_size;
        // Look at no more than one L2 table's worth at a time.
        let len = len.min(self.geo.l2_coverage() - offset % self.geo.l2_coverage());
        let mut m = self.meta.lock().await;
        let ext = self
            .extents(
                &mut m,
                offset,
                len.min(cs - self.geo.offset_in_cluster(offset)),
            )
            .await?;
        let first = ext[0];
        // Extend over following clusters of the same kind.
        let mut total = first.len;
        let mut next = offset + first.len;
        while next < offset + len {
            let n = cs.min(offset + len - next);
            let e = self.extents(&mut m, next, n).await?[0];
            let same = match (first.mapping, e.mapping) {
                (Mapping::Normal { host: a, .. }, Mapping::Normal { host: b, .. }) => {
                    a + total == b
                }
                (Mapping::Unallocated, Mapping::Unallocated) => true,
                (Mapping::Zero(None), Mapping::Zero(None)) => true,
                (Mapping::Zero(Some(a)), Mapping::Zero(Some(b))) => a + total == b,
                (Mapping::Compressed(_), Mapping::Compressed(_)) => true,
                _ => false,
            };
            if !same {
                break;
            }
            total += n;
            next += n;
        }
        drop(m);
        Ok(match first.mapping {
            Mapping::Unallocated => BlockStatus::unallocated(total),
            Mapping::Zero(None) => BlockStatus::zero(total),
            // A zero cluster that keeps its host cluster says where it is.
            Mapping::Zero(Some(host)) => BlockStatus {
                host: Some((Arc::clone(self.data()?), host)),
                ..BlockStatus::zero(total)
            },
            Mapping::Normal { host, .. } => {
                BlockStatus::data_at(total, Arc::clone(self.data()?), host)
            }
            Mapping::Compressed(_) => BlockStatus {
                compressed: true,
                ..BlockStatus::data(total)
            },
        })
    }

    async fn truncate(&self, size: u64, prealloc: Preallocation) -> Result<()> {
        let old = self.length();
        if !size.is_multiple_of(512) {
            return Err(Error::invalid("The new size must be a multiple of 512"));
        }
        if size < old {
            return self.shrink(size).await;
        }
        // A raw data file must read as the disk: its new area is mapped 1:1.
        let prealloc = match prealloc {
            Preallocation::Off if self.data_raw => Preallocation::Metadata,
            p => p,
        };
        let mut m = self.meta.lock().await;
        let need = self.geo.l1_size_for(size);
        if need > m.l1.len() as u64 {
            self.grow_l1(&mut m, need).await?;
        }
        if prealloc == Preallocation::Off {
            if let Some(d) = self.external() {
                d.truncate(size, Preallocation::Off).await?;
            }
        }
        self.file
            .write(
                24,
                IoBuf::from_slice(&size.to_be_bytes()),
                WriteFlags::default(),
            )
            .await?;
        m.header.size = size;
        drop(m);
        if prealloc != Preallocation::Off {
            self.preallocate(old, size, prealloc).await?;
        }
        self.size.store(size, Ordering::Release);
        // The new area must read as zeroes, not as a longer backing file's
        // data (QEMU zeroes it the same way).
        if let Some(b) = self.backing() {
            let end = size.min(b.length());
            if end > old && self.geo.version >= 3 {
                self.write_zeroes(old, end - old, WriteFlags::default())
                    .await?;
            }
        }
        Ok(())
    }

    async fn allocated_size(&self) -> Result<Option<u64>> {
        // What the image takes is its file plus its data file (QEMU sums
        // the children that hold data or metadata).
        let mut total = self.file.driver().allocated_size().await?;
        if let Some(d) = self.external() {
            total = match (total, d.driver().allocated_size().await?) {
                (Some(a), Some(b)) => Some(a + b),
                _ => None,
            };
        }
        Ok(total)
    }

    fn has_vmstate(&self) -> bool {
        true
    }

    async fn write_compressed(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        // An L2 entry cannot point into a data file at a compressed cluster.
        if self.geo.external_data {
            return Err(Error::errno(libc::ENOTSUP));
        }
        let cs = self.geo.cluster_size;
        let len = buf.len() as u64;
        if len == 0 {
            // The end of a series: the file ends on a whole sector, so that
            // sector-based readers see all of the last compressed cluster.
            let end = self.file.length();
            self.file.truncate(end, Preallocation::Off).await?;
            return Ok(buf);
        }
        let unaligned_end = !len.is_multiple_of(cs) && offset + len != self.length();
        if !offset.is_multiple_of(cs) || unaligned_end {
            return Err(Error::errno(libc::EINVAL));
        }
        let mut done = Vec::new();
        let mut rest = buf;
        let mut off = offset;
        while !rest.is_empty() {
            let n = (rest.len() as u64).min(cs) as usize;
            let (head, tail) = rest.split_at(n);
            done.push(self.write_compressed_cluster(off, head).await?);
            off += n as u64;
            rest = tail;
        }
        Ok(IoBuf::join_all(done))
    }

    async fn save_vmstate(&self, pos: u64, buf: IoBuf) -> Result<IoBuf> {
        self.file.debug_event(DebugEvent::VmstateSave).await;
        self.write(self.vm_state_offset() + pos, buf, WriteFlags::default())
            .await
    }

    async fn load_vmstate(&self, pos: u64, buf: IoBuf) -> Result<IoBuf> {
        self.file.debug_event(DebugEvent::VmstateLoad).await;
        self.read(self.vm_state_offset() + pos, buf).await
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.geo.cluster_size)
    }

    fn is_dirty(&self) -> bool {
        self.meta
            .try_lock()
            .map(|m| m.header.incompatible_features & INCOMPAT_DIRTY != 0)
            .unwrap_or(false)
    }

    fn backing_file(&self) -> Option<(String, Option<String>)> {
        let m = self.meta.try_lock().ok()?;
        m.header
            .backing_file
            .clone()
            .map(|b| (b, m.header.backing_format.clone()))
    }

    fn format_specific(&self) -> Option<FormatSpecific> {
        let m = self.meta.try_lock().ok()?;
        let h = &m.header;
        // Keys in the order of QEMU's schema (ImageInfoSpecificQCow2), which
        // decides their printed order where two share a QDict bucket.
        let mut data = serde_json::Map::new();
        data.insert(
            "compat".into(),
            if h.version >= 3 { "1.1" } else { "0.10" }.into(),
        );
        if let Some(f) = &h.data_file {
            data.insert("data-file".into(), f.clone().into());
        }
        if self.geo.external_data {
            data.insert("data-file-raw".into(), self.data_raw.into());
        }
        if h.version >= 3 {
            data.insert("extended-l2".into(), false.into());
            data.insert(
                "lazy-refcounts".into(),
                (h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0).into(),
            );
            data.insert(
                "corrupt".into(),
                (h.incompatible_features & INCOMPAT_CORRUPT != 0).into(),
            );
        }
        data.insert("refcount-bits".into(), (1u64 << h.refcount_order).into());
        data.insert("compression-type".into(), self.compression.name().into());
        Some(serde_json::json!({ "type": "qcow2", "data": data }))
    }

    async fn snapshots(&self) -> Result<Vec<strata_block::driver::SnapshotInfo>> {
        let h = self.meta.lock().await.header.clone();
        Ok(snapshot::read(&self.file, &h)
            .await?
            .0
            .into_iter()
            .map(|s| s.info)
            .collect())
    }

    async fn check(&self, repair: RepairMode) -> Result<CheckResult> {
        let mut m = self.meta.lock().await;
        if validate_snapshot_table(&m.header).is_err() {
            strata_block::report::error_report("ERROR snapshot table offset invalid");
            return Err(Error::errno(libc::EINVAL));
        }
        check::check(self, &mut m, repair).await
    }

    fn set_backing(&self, backing: Option<Arc<Node>>) -> Result<()> {
        *self.backing.write().unwrap_or_else(|p| p.into_inner()) = backing;
        Ok(())
    }

    async fn invalidate_cache(&self) -> Result<()> {
        // Another process owned the image: everything cached may be stale.
        let (mut hdr, geo, l1, reftable) =
            load_metadata(&self.file, self.read_only, false)
                .await
                .map_err(|e| e.context("Could not reopen qcow2 layer"))?;
        if !self.read_only {
            clear_unknown_autoclear(&self.file, &mut hdr).await?;
        }
        // This driver keeps the geometry in its own fields; QEMU would pick
        // up a new one, but only amend or a new image changes it.
        if (geo.cluster_bits, geo.refcount_order, geo.version)
            != (
                self.geo.cluster_bits,
                self.geo.refcount_order,
                self.geo.version,
            )
            || hdr.compression != self.compression
        {
            return Err(Error::unsupported(
                "Could not reopen qcow2 layer: the image's geometry changed while it was inactive",
            ));
        }
        let dirty = hdr.incompatible_features & INCOMPAT_DIRTY != 0;
        self.size.store(hdr.size, Ordering::Release);
        *self.meta.lock().await =
            new_meta(geo, &hdr, l1, reftable, self.read_only, &self.host_busy);
        if dirty && !self.read_only {
            // As at open: refcounts may lag behind (lazy refcounts).
            self.check(RepairMode {
                leaks: true,
                errors: true,
            })
            .await
            .map_err(|e| e.context("Could not reopen qcow2 layer: Could not repair dirty image"))?;
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        // An image found corrupt is cut off: nothing more is written to it
        // (QEMU drops the driver of the node).
        let corrupt = self.meta.lock().await.corrupt;
        if !self.read_only && !corrupt {
            // As QEMU's bdrv_close and qcow2_inactivate: a flush whose result
            // is ignored, then each cache written back and the file flushed,
            // with a message for each that fails.
            let _ = self.flush().await;
            let mut m = self.meta.lock().await;
            let l2 = m.flush_l2_cache(&self.file).await;
            if let Err(e) = &l2 {
                error_report(format!(
                    "Failed to flush the L2 table cache: {}",
                    strerror(e.code())
                ));
            }
            let rb = m.flush_refcount_cache(&self.file).await;
            if let Err(e) = &rb {
                error_report(format!(
                    "Failed to flush the refcount block cache: {}",
                    strerror(e.code())
                ));
            }
            // Everything is written back: the refcounts are consistent again.
            if l2.is_ok() && rb.is_ok() && !m.corrupt {
                m.set_incompatible(&self.file, INCOMPAT_DIRTY, false)
                    .await?;
            }
        }
        if let Some(b) = self.backing() {
            b.close().await?;
        }
        if let Some(d) = self.external() {
            d.close().await?;
        }
        self.file.close().await
    }
}

#[async_trait]
impl DriverClass for Qcow2Class {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    fn probe(&self, header: &[u8], _filename: &str) -> u32 {
        if header.len() >= 8 && header[..4] == header::MAGIC.to_be_bytes() {
            let v = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
            if v >= 2 {
                return 100;
            }
        }
        0
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn strong_options(&self) -> &'static [&'static str] {
        &["encrypt.key-secret"]
    }

    fn create_options(&self) -> &'static [OptSpec] {
        create::CREATE_OPTIONS
    }

    fn child_perms(&self, perm: Perm, shared: Perm, flags: &OpenFlags) -> (Perm, Perm) {
        // Metadata is read and written whatever the guest does, and nobody
        // else may write or resize the file under it (QEMU's rule for formats).
        let mut perm = perm;
        if !flags.no_io {
            perm = perm.with(Perm::CONSISTENT_READ);
        }
        if !flags.read_only {
            perm = perm.with(Perm::WRITE).with(Perm::RESIZE);
        }
        let shared = if flags.force_share {
            Perm::ALL
        } else {
            Perm(shared.0 & !(Perm::WRITE.0 | Perm::RESIZE.0))
        };
        (perm, shared)
    }

    async fn create(&self, ctx: &OpenCtx, filename: &str, opts: Opts) -> Result<()> {
        create::create(ctx, filename, opts).await
    }

    async fn open(&self, ctx: &OpenCtx, opts: &mut Opts) -> Result<Box<dyn Driver>> {
        let file = ctx.file()?;
        let backing_opts = opts.remove("backing");
        let _ = take_str(opts, "l2-cache-size")?;
        let _ = take_str(opts, "refcount-cache-size")?;
        let _ = take_str(opts, "cache-size")?;
        let _ = take_dict(opts, "overlap-check")?;
        let _ = take_str(opts, "overlap-check")?;
        let _ = take_str(opts, "lazy-refcounts")?;
        let _ = take_str(opts, "pass-discard-request")?;
        let _ = take_str(opts, "pass-discard-other")?;
        let _ = take_str(opts, "discard-no-unref")?;
        let _ = take_str(opts, "cache-clean-interval")?;
        let read_only = ctx.flags.read_only;

        let (mut hdr, geo, l1, reftable) = load_metadata(&file, read_only, ctx.flags.check).await?;
        if !read_only && !ctx.flags.inactive {
            clear_unknown_autoclear(&file, &mut hdr).await?;
        }
        let external = geo.external_data;
        let data = data_file::open(ctx, opts, &hdr).await?;

        let backing = match (&hdr.backing_file, backing_opts) {
            (_, Some(serde_json::Value::Null)) => None,
            // The name of an open node: this image shares it as its backing file.
            (_, Some(serde_json::Value::String(r))) => Some(ctx.reference(&r)?),
            // Options alone may define a backing file the header does not name.
            (name, bo) if !ctx.flags.no_backing && (name.is_some() || bo.is_some()) => {
                let bopts = match bo {
                    Some(serde_json::Value::Object(o)) => o,
                    _ => Opts::new(),
                };
                let node = ctx
                    .open_backing(&file, name.as_deref(), hdr.backing_format.as_deref(), bopts)
                    .await
                    .map_err(|e| e.context("Could not open backing file"))?;
                Some(node)
            }
            _ => None,
        };

        let host_busy = HostInflight::new(geo.cluster_bits);
        let meta = new_meta(geo, &hdr, l1, reftable, read_only, &host_busy);
        let dirty = hdr.incompatible_features & INCOMPAT_DIRTY != 0;
        let driver = Qcow2Driver {
            file,
            data,
            data_raw: external && data_file::is_raw(&hdr),
            backing: std::sync::RwLock::new(backing),
            geo,
            size: AtomicU64::new(hdr.size),
            compression: hdr.compression,
            meta: Mutex::new(meta),
            inflight: std::sync::Mutex::new(BTreeSet::new()),
            host_busy,
            alloc_done: Notify::new(),
            read_only,
        };
        if dirty && !read_only && !ctx.flags.check && !ctx.flags.inactive {
            // Refcounts may lag behind (lazy refcounts): repair before use.
            driver
                .check(RepairMode {
                    leaks: true,
                    errors: true,
                })
                .await
                .map_err(|e| e.context("Could not repair dirty image"))?;
        }
        Ok(Box::new(driver))
    }
}

/// Reads and validates the header and the tables every request needs (L1,
/// refcount table), in QEMU's order and words; at open and again when an
/// inactive node is activated.
async fn load_metadata(
    file: &Arc<Node>,
    read_only: bool,
    check: bool,
) -> Result<(Header, Geometry, Vec<u64>, Vec<u64>)> {
    // A short file reads as zeroes past its end, as the header fields QEMU
    // checks then see them.
    let first = file.read(0, IoBuf::zeroed(512)).await?;
    let bits = u32::from_be_bytes([
        first.as_slice()[20],
        first.as_slice()[21],
        first.as_slice()[22],
        first.as_slice()[23],
    ]);
    // Extensions may run past the first 512 bytes: parse the whole cluster.
    let hdr = if (header::MIN_CLUSTER_BITS + 1..=header::MAX_CLUSTER_BITS).contains(&bits) {
        let whole = file.read(0, IoBuf::zeroed(1 << bits)).await?;
        Header::parse(whole.as_slice())?
    } else {
        Header::parse(first.as_slice())?
    };
    let cs = 1u64 << hdr.cluster_bits;
    hdr.check_features()?;
    // A corrupt image is written to only to repair it.
    if hdr.incompatible_features & INCOMPAT_CORRUPT != 0 && !read_only && !check {
        return Err(Error::msg(
            libc::EACCES,
            "qcow2: Image is corrupt; cannot be opened read/write",
        ));
    }
    if hdr.version == 2 && hdr.refcount_order != 4 {
        return Err(Error::invalid(
            "Refcount order must be 4 for version 2 images",
        ));
    }
    let external = data_file::is_external(&hdr);
    let geo = Geometry::new(hdr.cluster_bits, hdr.refcount_order, hdr.version, external);
    // Tables are validated (and bounded) before anything is allocated by
    // their size, in QEMU's order and words. Tables beyond the end of the
    // file are not an error: they read as zeroes, as in QEMU.
    if hdr.refcount_table_clusters == 0 {
        return Err(Error::invalid(
            "Image does not contain a reference count table",
        ));
    }
    let rt_clusters = hdr.refcount_table_clusters as u64;
    validate_table(
        hdr.refcount_table_offset,
        rt_clusters,
        cs,
        MAX_REFTABLE_BYTES,
        cs,
        "Reference count table",
    )?;
    if !check {
        validate_snapshot_table(&hdr)?;
    }
    validate_table(
        hdr.l1_table_offset,
        hdr.l1_size as u64,
        8,
        MAX_L1_BYTES,
        cs,
        "Active L1 table",
    )?;
    if geo.l1_size_for(hdr.size) > i32::MAX as u64 {
        return Err(Error::msg(libc::EFBIG, "Image is too big"));
    }
    if (hdr.l1_size as u64) < geo.l1_size_for(hdr.size) {
        return Err(Error::invalid("L1 table is too small"));
    }
    let rt_bytes = rt_clusters * cs;
    let l1_bytes = file
        .read(hdr.l1_table_offset, IoBuf::zeroed(hdr.l1_size as usize * 8))
        .await?;
    let l1: Vec<u64> = l1_bytes.as_slice().chunks_exact(8).map(be64).collect();
    file.debug_event(DebugEvent::ReftableLoad).await;
    let rt = file
        .read(hdr.refcount_table_offset, IoBuf::zeroed(rt_bytes as usize))
        .await
        .map_err(|e| e.context("Could not initialize refcount handling"))?;
    let reftable: Vec<u64> = rt.as_slice().chunks_exact(8).map(be64).collect();
    Ok((hdr, geo, l1, reftable))
}

/// A writer clears the autoclear bits it does not know (qcow2.txt), as
/// QEMU's open does: whatever they vouch for (bitmaps that saw every write)
/// stops being true with this writer's first write.
async fn clear_unknown_autoclear(file: &Arc<Node>, hdr: &mut Header) -> Result<()> {
    let known = hdr.autoclear_features & AUTOCLEAR_DATA_FILE_RAW;
    if hdr.version < 3 || known == hdr.autoclear_features {
        return Ok(());
    }
    file.write(
        88,
        IoBuf::from_slice(&known.to_be_bytes()),
        WriteFlags::default(),
    )
    .await?;
    file.flush().await?;
    hdr.autoclear_features = known;
    Ok(())
}

/// Fresh in-memory state for the tables read by [`load_metadata`], with
/// caches sized to the image.
fn new_meta(
    geo: Geometry,
    hdr: &Header,
    l1: Vec<u64>,
    reftable: Vec<u64>,
    read_only: bool,
    busy: &Arc<HostInflight>,
) -> Meta {
    let cs = geo.cluster_size;
    let slice = cs.min(4096) as usize;
    let l2_need = geo.l1_size_for(hdr.size).max(1) * cs;
    let l2_slices = (l2_need.min(MAX_L2_CACHE_BYTES) / slice as u64).max(16) as usize;
    let l2_tables = l1
        .iter()
        .map(|e| e & OFFSET_MASK)
        .filter(|&o| o != 0)
        .collect();
    let refblocks = reftable
        .iter()
        .map(|e| e & OFFSET_MASK)
        .filter(|&o| o != 0)
        .collect();
    Meta {
        geo,
        l1,
        reftable,
        l2_cache: cache::TableCache::new(slice, l2_slices),
        rb_cache: cache::TableCache::new(slice, (l2_slices / 4).max(16)),
        free_cluster_index: 0,
        l2_tables,
        refblocks,
        free_byte_offset: 0,
        corrupt: false,
        signaled: false,
        writable: !read_only,
        header: hdr.clone(),
        busy: Arc::clone(busy),
    }
}

/// The snapshot table's header fields, checked before use.
fn validate_snapshot_table(hdr: &Header) -> Result<()> {
    let cs = 1u64 << hdr.cluster_bits;
    validate_table(
        hdr.snapshots_offset,
        hdr.nb_snapshots as u64,
        40,
        40 * 65536,
        cs,
        "Snapshot table",
    )
}

/// QEMU's qcow2_validate_table: bounded size, offset aligned and not overflowing.
fn validate_table(
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    cs: u64,
    name: &str,
) -> Result<()> {
    if entries > max_bytes / entry_len {
        return Err(Error::msg(libc::EFBIG, format!("{name} too large")));
    }
    if (i64::MAX as u64) - entries * entry_len < offset || !offset.is_multiple_of(cs) {
        return Err(Error::invalid(format!("{name} offset invalid")));
    }
    Ok(())
}

fn be64(c: &[u8]) -> u64 {
    u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
}
