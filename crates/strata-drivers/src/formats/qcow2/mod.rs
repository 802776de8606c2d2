//! The qcow2 format (docs/interop/qcow2.txt): versions 2 and 3, refcount
//! widths 1 to 64 bits, cluster sizes 512 B to 2 MiB, zero clusters,
//! compressed clusters, backing files, external data files.
//!
//! Concurrency: the metadata sits behind one async lock, held for lookups and
//! allocation only, never across guest data I/O. A write that allocates
//! clusters marks their guest clusters in flight; another write to them waits
//! until the first has written its data and linked the clusters in its L2
//! table, so a new cluster is visible only once its data is there.
//!
//! By concern, as QEMU splits qcow2*.c: `open` (header, tables, the class),
//! `amend` (version, lazy refcounts, size and data file options in place),
//! `read`, `write` (plan / I/O / commit), `zero` (zero writes and discards),
//! `resize`, `meta` (tables, refcounts, allocation), `cache` (L2 and refcount
//! block caches), `inflight` and `host_inflight` (what requests hold),
//! `check`, `create`, `compress`, `data_file`, `snapshot` (the table),
//! `snapshot_ops` (create, apply, delete, load) and `header_update`
//! (backing file names, emptying after a commit).

mod amend;
mod bitmap_store;
mod bitmaps;
mod cache;
mod cache_opts;
mod check;
pub(crate) mod compress;
mod create;
mod data_file;
mod encryption;
pub mod header;
mod header_update;
mod header_write;
mod host_inflight;
mod inflight;
mod measure;
mod meta;
mod offset_hash;
mod open;
mod read;
mod refcount;
mod refcount_order;
mod resize;
mod runtime_opts;
mod snapshot;
mod snapshot_ops;
mod subcluster;
mod write;
mod write_sub;
mod zero;
mod zero_sub;

use inflight::InflightGuard;
use open::{clear_unknown_autoclear, load_metadata, new_meta};
use read::Extent;
use zero::Clear;

use async_lock::Mutex;
use async_trait::async_trait;
use data_file::DataFile;
use futures::StreamExt;
use header::{Compression, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use host_inflight::HostInflight;
use meta::{Geometry, Mapping, Meta};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use strata_block::driver::{CheckResult, FormatSpecific, Preallocation, RepairMode};
use strata_block::error::strerror;
use strata_block::report::error_report;
use strata_block::{
    BlockStatus, Child, ChildCell, ChildRole, DebugEvent, Driver, Error, IoBuf, Node, Opts, Result,
    WriteFlags,
};
use tokio::sync::Notify;

/// Clusters of one compressed write being compressed at the same time.
const COMPRESS_AHEAD: usize = 8;

/// The `qcow2` driver class.
pub struct Qcow2Class;

/// Largest L1 table QEMU accepts (bytes).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Upper bound of the L2 cache (bytes), as QEMU's default.
const MAX_L2_CACHE_BYTES: u64 = 32 << 20;

/// An open qcow2 image.
pub struct Qcow2Driver {
    /// The image file; a reopen may put another node holding the same
    /// image in its place (a filter, a copy), drained.
    file: ChildCell,
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
    /// Changes only in a reopen, drained.
    read_only: std::sync::atomic::AtomicBool,
    /// The image's version (2 or 3): amend changes it while open.
    version: std::sync::atomic::AtomicU32,
    /// The runtime options in force (cache sizes, lazy refcounts, overlap
    /// checks); a reopen changes them, drained.
    runtime: std::sync::Mutex<runtime_opts::RuntimeOpts>,
    /// The image's encryption (LUKS or legacy AES), if any.
    crypto: Option<strata_crypto::BlockCrypto>,
    /// Whether clusters were allocated ahead of their data (decided once,
    /// on the first block status, as QEMU does).
    metadata_prealloc: tokio::sync::OnceCell<bool>,
    /// The node's dirty bitmaps, given at load: the persistent ones are
    /// stored from there.
    node_bitmaps: std::sync::Mutex<Option<Arc<strata_block::DirtyBitmaps>>>,
    /// The bitmap directory as on disk, for `info`.
    bitmap_dir: std::sync::Mutex<Vec<bitmaps::DirEntry>>,
    /// The cache epochs of the last completed flush not yet recorded in
    /// the caches (see `flush`).
    flushed_epochs: std::sync::Mutex<Option<(u64, u64)>>,
    /// Bytes of guest writes placed so far (see `Driver::bytes_planned`).
    planned: AtomicU64,
    /// Everything cached was written back for a reopen that puts another
    /// node in the file's place: until the metadata is read again, the
    /// file may be replaced.
    file_released: std::sync::atomic::AtomicBool,
}

impl Qcow2Driver {
    fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    fn runtime(&self) -> runtime_opts::RuntimeOpts {
        *self.runtime.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// As QEMU's bdrv_close and qcow2_inactivate: a flush whose result is
    /// ignored, then each cache written back and the file flushed, with a
    /// message for each that fails. False when a cache could not be
    /// written back; otherwise the image is marked clean.
    async fn write_back(&self) -> Result<bool> {
        let _ = self.flush().await;
        let mut m = self.meta.lock().await;
        let l2 = m.flush_l2_cache(&self.file.get()).await;
        if let Err(e) = &l2 {
            error_report(format!(
                "Failed to flush the L2 table cache: {}",
                strerror(e.code())
            ));
        }
        let rb = m.flush_refcount_cache(&self.file.get()).await;
        if let Err(e) = &rb {
            error_report(format!(
                "Failed to flush the refcount block cache: {}",
                strerror(e.code())
            ));
        }
        // Everything is written back: the refcounts are consistent again.
        if l2.is_ok() && rb.is_ok() && !m.corrupt {
            m.set_incompatible(&self.file.get(), INCOMPAT_DIRTY, false)
                .await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// True for version 3 images (zero clusters, feature bits).
    fn v3(&self) -> bool {
        self.version.load(Ordering::Acquire) >= 3
    }

    /// The backing node, if any.
    fn backing(&self) -> Option<Arc<Node>> {
        self.backing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The node guest data is read from and written to.
    fn data(&self) -> Result<Arc<Node>> {
        match &self.data {
            DataFile::Internal => Ok(self.file.get()),
            DataFile::External(n) => Ok(Arc::clone(n)),
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

    /// Where VM state starts: after the last L1 entry the disk needs
    /// (QEMU: qcow2_vm_state_offset).
    fn vm_state_offset(&self) -> u64 {
        self.geo.l1_size_for(self.length()) << (self.geo.cluster_bits + self.geo.l2_bits)
    }
}

impl Qcow2Driver {
    /// Counts `len` bytes of a write whose clusters are found or allocated:
    /// its data I/O is all that is left.
    fn note_planned(&self, len: u64) {
        self.planned.fetch_add(len, Ordering::Release);
    }

    /// Records a completed flush in the caches: what they held at its
    /// start is stable (a later epoch means more was written since).
    fn apply_flushed(&self, m: &mut Meta) {
        let done = self
            .flushed_epochs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((l2, rb)) = done {
            m.l2_cache.flushed_at(l2);
            m.rb_cache.flushed_at(rb);
        }
    }

    /// QEMU's qcow2_detect_metadata_preallocation: far more clusters are
    /// in use than the file has blocks for.
    async fn metadata_preallocated(&self) -> Result<bool> {
        self.metadata_prealloc
            .get_or_try_init(|| async {
                let cs = self.geo.cluster_size;
                let real = match self.file.get().driver().allocated_size().await? {
                    Some(a) => a / cs,
                    None => return Ok(false),
                };
                let threshold = (real * 10 / 9).max(real + 2);
                let end = self.file.get().length().div_ceil(cs);
                let mut m = self.meta.lock().await;
                let mut count = 0;
                let mut i = 0;
                while i < end && count < threshold {
                    count += (m.refcount(&self.file.get(), i).await? != 0) as u64;
                    i += 1;
                }
                Ok(count >= threshold)
            })
            .await
            .copied()
    }
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
            node: Arc::clone(&self.file.get()),
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
        let len = buf.len() as u64;
        if self.geo.offset_in_cluster(offset) + len <= self.geo.cluster_size {
            // Within one cluster (the usual small request): one extent, no list.
            let (e, _held) = {
                let mut m = self.meta.lock().await;
                let e = self.extent_at(&mut m, offset, len).await?;
                let held = self.hold_hosts(&m, [&e]);
                (e, held)
            };
            // (Subclusters of several kinds take the general path.)
            if e.len == len {
                return self.read_extent(e, buf).await;
            }
        }
        let (extents, _held) = {
            let mut m = self.meta.lock().await;
            let e = self.extents(&mut m, offset, buf.len() as u64).await?;
            let held = self.hold_hosts(&m, &e);
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
        // Every piece runs to its end before the request does, even when
        // one fails: the host clusters stay held while any I/O is in flight.
        let parts = futures::future::join_all(reads).await;
        let parts = parts.into_iter().collect::<Result<Vec<_>>>()?;
        Ok(IoBuf::join_all(parts))
    }

    async fn write(&self, offset: u64, buf: IoBuf, _flags: WriteFlags) -> Result<IoBuf> {
        if self.read_only() {
            return Err(Error::errno(libc::EPERM));
        }
        // One piece per L2 table; the pieces come back and join again.
        let cover = self.geo.l2_coverage();
        let mut done = Vec::new();
        let to_table_end = |off: u64, left: usize| left.min((cover - off % cover) as usize);
        for (off, piece) in buf.pieces(offset, to_table_end) {
            done.push(self.write_in_table(off, piece).await?);
        }
        Ok(IoBuf::join_all(done))
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        if self.geo.extended_l2 {
            return self.write_zeroes_sub(offset, len, flags).await;
        }
        // v2 has no zero flag; without a backing file an unallocated
        // cluster reads as zeroes, so whole clusters are discarded instead
        // (QEMU: qcow2_subcluster_zeroize).
        let v2 = !self.v3();
        if v2 && self.backing().is_some() {
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
                let how = match v2 {
                    true => Clear::Discard,
                    false => Clear::Zero {
                        unmap: flags.may_unmap,
                    },
                };
                self.clear_clusters(gc, (run_end - off) / cs, how).await?;
                off = run_end.min(end);
                continue;
            }
            let piece_end = ((gc + 1) * cs).min(end);
            // The request grows to the whole cluster, as in QEMU, if the
            // cluster still holds no data when the change is made. (A raw
            // data file would have to be zeroed first, which could wipe a
            // write racing for the cluster: it gets the bytes written.)
            let whole = match self.may_zero_whole_cluster(gc, off, piece_end).await? {
                Some(own_zero) if !self.data_raw && !v2 => {
                    self.zero_whole_cluster(gc, own_zero).await?
                }
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
        let v3 = self.v3();
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
        let epochs = {
            let mut m = self.meta.lock().await;
            self.apply_flushed(&mut m);
            m.flush(&self.file.get()).await?;
            (m.l2_cache.epoch(), m.rb_cache.epoch())
        };
        // The fsync itself runs without the lock: requests go on meanwhile.
        self.file.get().flush().await?;
        // The flush is done now. Recording it needs the lock, but waiting
        // for it here would let requests that came later finish first:
        // when it is busy, the next flush records this one.
        *self
            .flushed_epochs
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(epochs);
        if let Some(mut m) = self.meta.try_lock() {
            self.apply_flushed(&mut m);
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let cs = self.geo.cluster_size;
        // Look at no more than one L2 table's worth at a time.
        let len = len.min(self.geo.l2_coverage() - offset % self.geo.l2_coverage());
        let mut m = self.meta.lock().await;
        if !m.corrupt && matches!(m.l2_table_of(offset >> self.geo.cluster_bits), Ok(None)) {
            // No L2 table: the whole table's worth is unallocated, without
            // a look at each of its clusters (a sparse disk maps fast).
            return Ok(BlockStatus::unallocated(len));
        }
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
            if !first.mapping.continued_by(total, e.mapping) {
                break;
            }
            total += e.len;
            next += e.len;
        }
        drop(m);
        Ok(match first.mapping {
            Mapping::Unallocated => BlockStatus::unallocated(total),
            Mapping::Reserved(_) if self.crypto.is_some() => BlockStatus::unallocated(total),
            Mapping::Reserved(host) => BlockStatus {
                host: Some((self.data()?, host)),
                ..BlockStatus::unallocated(total)
            },
            Mapping::Zero(None) => BlockStatus::zero(total),
            // A zero cluster that keeps its host cluster says where it is.
            // Encrypted bytes are not the guest's: no host offset (QEMU).
            Mapping::Zero(Some(_)) | Mapping::Normal { .. } if self.crypto.is_some() => {
                match first.mapping {
                    Mapping::Zero(_) => BlockStatus::zero(total),
                    _ => BlockStatus::data(total),
                }
            }
            Mapping::Zero(Some(host)) => BlockStatus {
                host: Some((self.data()?, host)),
                ..BlockStatus::zero(total)
            },
            // Preallocated clusters may hold nothing yet: the file says
            // whether they read as zeroes (QEMU's BDRV_BLOCK_RECURSE).
            Mapping::Normal { host, .. } => BlockStatus {
                recurse: self.metadata_preallocated().await?,
                ..BlockStatus::data_at(total, self.data()?, host)
            },
            Mapping::Compressed(_) => BlockStatus {
                compressed: true,
                ..BlockStatus::data(total)
            },
        })
    }

    async fn truncate(&self, size: u64, exact: bool, prealloc: Preallocation) -> Result<()> {
        let old = self.length();
        if !size.is_multiple_of(512) {
            return Err(Error::invalid("The new size must be a multiple of 512"));
        }
        // Snapshots record their disk size only from version 3 on.
        {
            let m = self.meta.lock().await;
            if m.header.nb_snapshots > 0 && m.header.version < 3 {
                return Err(Error::unsupported(
                    "Can't resize a v2 image which has snapshots",
                ));
            }
            self.check_bitmaps_for_resize(&m).await?;
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
                d.truncate(size, exact, Preallocation::Off).await?;
            }
        }
        m.write_disk_size(&self.file.get(), size).await?;
        drop(m);
        // The new area must read as zeroes, not as a longer backing file's
        // data (QEMU: BDRV_REQ_ZERO_WRITE on a truncate).
        let hide_backing = self.backing().is_some_and(|b| b.length() > old);
        // New clusters of the image file read as zeroes by themselves.
        let zeroed = matches!(prealloc, Preallocation::Falloc | Preallocation::Full)
            && self.external().is_none();
        if prealloc != Preallocation::Off {
            self.preallocate(old, size, prealloc, hide_backing && zeroed)
                .await?;
        }
        self.size.store(size, Ordering::Release);
        if hide_backing && !zeroed && self.v3() {
            self.write_zeroes(old, size - old, WriteFlags::default())
                .await?;
        }
        Ok(())
    }

    async fn allocated_size(&self) -> Result<Option<u64>> {
        // What the image takes is its file plus its data file (QEMU sums
        // the children that hold data or metadata).
        let mut total = self.file.get().driver().allocated_size().await?;
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

    fn can_compress(&self) -> bool {
        true
    }

    async fn write_compressed(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        // An L2 entry cannot point into a data file at a compressed cluster,
        // and compressed clusters are never encrypted.
        if self.geo.external_data || self.crypto.is_some() {
            return Err(Error::errno(libc::ENOTSUP));
        }
        let cs = self.geo.cluster_size;
        let len = buf.len() as u64;
        if len == 0 {
            // The end of a series: the file ends on a whole sector, so that
            // sector-based readers see all of the last compressed cluster.
            let end = self.file.get().length();
            self.file
                .get()
                .truncate(end, false, Preallocation::Off)
                .await?;
            return Ok(buf);
        }
        let unaligned_end = !len.is_multiple_of(cs) && offset + len != self.length();
        if !offset.is_multiple_of(cs) || unaligned_end {
            return Err(Error::errno(libc::EINVAL));
        }
        // One cluster (convert's unit) is compressed here: the hop to the
        // blocking pool cost more than zstd takes (convert -c with zstd went
        // from 0.51 s to 0.94 s).
        if len <= cs {
            let packed = self.compress_here(&buf);
            return self.write_compressed_cluster(offset, buf, packed).await;
        }
        // Up to COMPRESS_AHEAD clusters are compressed at once, on as many
        // cores (QEMU runs 8 tasks), and stored one after the other in guest
        // order: the image's layout does not depend on which finished first.
        let mut packed = futures::stream::iter(buf.pieces(offset, |_, left| left.min(cs as usize)))
            .map(|(off, cluster)| async move {
                let p = self.compress_cluster(&cluster).await;
                (off, cluster, p)
            })
            .buffered(COMPRESS_AHEAD);
        let mut done = Vec::new();
        while let Some((off, cluster, p)) = packed.next().await {
            done.push(self.write_compressed_cluster(off, cluster, p?).await?);
        }
        Ok(IoBuf::join_all(done))
    }

    async fn save_vmstate(&self, pos: u64, buf: IoBuf) -> Result<IoBuf> {
        self.file.get().debug_event(DebugEvent::VmstateSave).await;
        self.write(self.vm_state_offset() + pos, buf, WriteFlags::default())
            .await
    }

    async fn load_vmstate(&self, pos: u64, buf: IoBuf) -> Result<IoBuf> {
        self.file.get().debug_event(DebugEvent::VmstateLoad).await;
        self.read(self.vm_state_offset() + pos, buf).await
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.geo.cluster_size)
    }

    fn subcluster_size(&self) -> Option<u64> {
        Some(self.geo.subcluster_size())
    }

    fn bytes_planned(&self) -> Option<u64> {
        Some(self.planned.load(Ordering::Acquire))
    }

    fn is_dirty(&self) -> bool {
        self.meta
            .try_lock()
            .map(|m| m.header.incompatible_features & INCOMPAT_DIRTY != 0)
            .unwrap_or(false)
    }

    fn backing_file(&self) -> Option<(String, Option<String>)> {
        let m = self.meta.try_lock()?;
        m.header
            .backing_file
            .clone()
            .map(|b| (b, m.header.backing_format.clone()))
    }

    /// Encryption works on whole sectors (QEMU: qcow2_refresh_limits).
    fn limits(&self) -> strata_block::Limits {
        let mut l = strata_block::Limits::default();
        if let Some(c) = &self.crypto {
            l.request_alignment = c.sector_size() as u32;
        }
        l
    }

    fn encrypted(&self) -> bool {
        self.crypto.is_some()
    }

    fn zeroes_may_unmap(&self) -> bool {
        self.v3()
    }

    /// QEMU's qcow2_has_zero_init: an image without L2 tables reads as
    /// zeroes; a preallocated one only if its data is not encrypted and
    /// the data file itself reads as zeroes.
    fn has_zero_init(&self) -> bool {
        let preallocated = match self.meta.try_lock() {
            Some(m) => m.l1.first().is_some_and(|&e| e != 0),
            None => true,
        };
        if !preallocated {
            true
        } else if self.crypto.is_some() {
            false
        } else {
            self.data().is_ok_and(|d| d.driver().has_zero_init())
        }
    }

    fn supports_persistent_bitmaps(&self) -> bool {
        self.v3()
    }

    async fn load_bitmaps(&self, bitmaps: &Arc<strata_block::DirtyBitmaps>) -> Result<()> {
        self.load_persistent_bitmaps(bitmaps).await
    }

    async fn store_bitmaps(&self) -> Result<()> {
        self.store_persistent_bitmaps().await
    }

    async fn can_store_new_bitmap(&self, node: &str, name: &str, granularity: u64) -> Result<()> {
        self.can_store_bitmap(node, name, granularity).await
    }

    async fn remove_persistent_bitmap(&self, name: &str) -> Result<()> {
        self.remove_bitmap_from_image(name).await
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn format_specific(&self) -> Option<FormatSpecific> {
        let m = self.meta.try_lock()?;
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
            data.insert("extended-l2".into(), self.geo.extended_l2.into());
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
        if let Some(c) = &self.crypto {
            // ImageInfoSpecificQCow2Encryption: QCryptoBlockInfo with the
            // qcow scheme called `aes`.
            let mut info = c.info();
            if !c.is_luks() {
                info.insert("format".into(), "aes".into());
            }
            data.insert("encrypt".into(), info.into());
        }
        if h.version >= 3 {
            // Qcow2BitmapInfo: name, granularity, flags.
            let list: Vec<serde_json::Value> = self
                .shown_directory()
                .into_iter()
                .map(|e| {
                    let mut flags = Vec::new();
                    if e.flags & bitmaps::FLAG_IN_USE != 0 {
                        flags.push("in-use");
                    }
                    if e.flags & bitmaps::FLAG_AUTO != 0 {
                        flags.push("auto");
                    }
                    serde_json::json!({
                        "name": e.name,
                        "granularity": 1u64 << e.granularity_bits,
                        "flags": flags,
                    })
                })
                .collect();
            if !list.is_empty() {
                data.insert("bitmaps".into(), list.into());
            }
        }
        data.insert("compression-type".into(), self.compression.name().into());
        Some(serde_json::json!({ "type": "qcow2", "data": data }))
    }

    async fn snapshots(&self) -> Result<Vec<strata_block::driver::SnapshotInfo>> {
        let h = self.meta.lock().await.header.clone();
        Ok(snapshot::read(&self.file.get(), &h)
            .await?
            .0
            .into_iter()
            .map(|s| s.info)
            .collect())
    }

    fn has_internal_snapshots(&self) -> bool {
        true
    }

    async fn snapshot_create(&self, sn: &strata_block::driver::SnapshotInfo) -> Result<()> {
        self.create_snapshot(sn).await
    }

    async fn snapshot_goto(&self, id_or_name: &str) -> Result<()> {
        self.goto_snapshot(id_or_name).await
    }

    async fn snapshot_delete(&self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        self.delete_snapshot(id, name).await
    }

    async fn snapshot_load_tmp(&self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        self.load_snapshot_tmp(id, name).await
    }

    async fn amend(
        &self,
        opts: strata_block::Opts,
        force: bool,
        status: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<()> {
        self.amend_image(opts, force, status).await
    }

    fn can_blockdev_amend(&self) -> bool {
        true
    }

    fn blockdev_amend_check(&self, opts: &strata_block::Opts) -> Result<()> {
        self.amend_qapi_check(opts)
    }

    async fn blockdev_amend(&self, opts: strata_block::Opts, force: bool) -> Result<()> {
        self.amend_qapi(opts, force).await
    }

    async fn change_backing_file(&self, file: Option<&str>, format: Option<&str>) -> Result<()> {
        self.set_backing_file_name(file, format).await
    }

    async fn make_empty(&self) -> Result<()> {
        self.empty().await
    }

    async fn check(&self, repair: RepairMode) -> Result<CheckResult> {
        let mut m = self.meta.lock().await;
        check::check(self, &mut m, repair).await
    }

    fn set_backing(&self, backing: Option<Arc<Node>>) -> Result<()> {
        *self.backing.write().unwrap_or_else(|p| p.into_inner()) = backing;
        Ok(())
    }

    fn can_replace_child(&self, role: ChildRole) -> bool {
        // The file and data file hold metadata the driver has cached: the
        // file may go only once that was written back (release_file).
        role == ChildRole::Backing
            || (role == ChildRole::File && self.file_released.load(Ordering::Acquire))
    }

    fn replace_child(&self, role: ChildRole, node: Arc<Node>) -> Result<()> {
        if !self.can_replace_child(role) {
            return Err(Error::unsupported(format!(
                "qcow2 cannot replace its '{}' child while open",
                role.name()
            )));
        }
        if role == ChildRole::File {
            self.file.set(node);
            return Ok(());
        }
        self.set_backing(Some(node))
    }

    async fn release_file(&self) -> Result<()> {
        if !self.read_only() && !self.write_back().await? {
            return Err(Error::errno(libc::EIO));
        }
        self.file_released.store(true, Ordering::Release);
        Ok(())
    }

    async fn reload_file(&self) -> Result<()> {
        self.file_released.store(false, Ordering::Release);
        self.invalidate_cache().await
    }

    async fn invalidate_cache(&self) -> Result<()> {
        // Another process owned the image: everything cached may be stale.
        let (mut hdr, geo, l1, reftable) = load_metadata(&self.file.get(), self.read_only(), false)
            .await
            .map_err(|e| e.context("Could not reopen qcow2 layer"))?;
        if !self.read_only() {
            clear_unknown_autoclear(&self.file.get(), &mut hdr).await?;
        }
        // This driver keeps the geometry in its own fields; QEMU would pick
        // up a new one, but only amend or a new image changes it.
        // The refcount width lives in the metadata (amend changes it).
        let refcount_order = self.meta.lock().await.geo.refcount_order;
        if (geo.cluster_bits, geo.refcount_order, geo.version)
            != (
                self.geo.cluster_bits,
                refcount_order,
                self.version.load(Ordering::Acquire),
            )
            || hdr.compression != self.compression
        {
            return Err(Error::unsupported(
                "Could not reopen qcow2 layer: the image's geometry changed while it was inactive",
            ));
        }
        let dirty = hdr.incompatible_features & INCOMPAT_DIRTY != 0;
        self.size.store(hdr.size, Ordering::Release);
        *self.meta.lock().await = new_meta(
            geo,
            &hdr,
            l1,
            reftable,
            self.read_only(),
            &self.host_busy,
            &self.runtime(),
        );
        if dirty && !self.read_only() {
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

    fn reopen_takes(&self) -> &'static [&'static str] {
        // QEMU's qcow2 takes all its runtime options anew.
        &[
            "lazy-refcounts",
            "pass-discard-request",
            "pass-discard-snapshot",
            "pass-discard-other",
            "discard-no-unref",
            "overlap-check",
            "cache-size",
            "l2-cache-size",
            "l2-cache-entry-size",
            "refcount-cache-size",
            "cache-clean-interval",
        ]
    }

    fn reopen_check(&self, opts: &Opts) -> Result<()> {
        self.runtime_of(opts).map(|_| ())
    }

    async fn reopen_options(&self, opts: &Opts) -> Result<()> {
        let rt = self.runtime_of(opts)?;
        self.apply_runtime(rt).await
    }

    async fn reopen_read_only(&self, read_only: bool) -> Result<()> {
        if read_only {
            // As QEMU's qcow2_reopen_prepare: everything cached written
            // back and the image marked clean, then no more writes.
            if !self.write_back().await? {
                return Err(Error::errno(libc::EIO));
            }
            self.read_only.store(true, Ordering::Release);
            let mut m = self.meta.lock().await;
            m.writable = false;
            m.lazy_refcounts = false;
            drop(m);
            self.bitmaps_read_only();
            return Ok(());
        }
        // Read-write: the metadata is read again as a writable open reads
        // it (a dirty image repaired, unknown autoclear bits cleared), and
        // the loaded bitmaps are marked in use on disk.
        self.read_only.store(false, Ordering::Release);
        let reloaded = match self.invalidate_cache().await {
            Ok(()) => self.reopen_bitmaps_rw().await,
            Err(e) => Err(e),
        };
        if let Err(e) = reloaded {
            self.read_only.store(true, Ordering::Release);
            let mut m = self.meta.lock().await;
            m.writable = false;
            m.lazy_refcounts = false;
            return Err(e);
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        // An image found corrupt is cut off: nothing more is written to it
        // (QEMU drops the driver of the node).
        let corrupt = self.meta.lock().await.corrupt;
        if !self.read_only() && !corrupt {
            self.write_back().await?;
        }
        if let Some(b) = self.backing() {
            b.close().await?;
        }
        if let Some(d) = self.external() {
            d.close().await?;
        }
        self.file.get().close().await
    }
}
