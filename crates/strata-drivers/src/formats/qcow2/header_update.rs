//! Rewrites of the image header while open (QEMU: qcow2_update_header):
//! the backing file name and format, and emptying the image after a commit.

use super::header::INCOMPAT_DIRTY;
use super::header_write::{read_cluster0, write_cluster0};
use super::meta::Meta;
use super::open::{load_metadata, new_meta};
use super::zero::Clear;
use super::Qcow2Driver;
use strata_block::{DebugEvent, Driver, Error, IoBuf, Preallocation, Result, WriteFlags};

impl Qcow2Driver {
    /// Writes the header held in `m` to cluster 0 (the header, its
    /// extensions and the backing file name all live there), in steps a
    /// torn write cannot break (`header_write`). Everything written before
    /// is on disk first, so the header never names a state the image has
    /// not reached; it is on disk itself when this returns.
    /// If it does not fit, nothing is written and `m` is unchanged (ENOSPC).
    pub(super) async fn write_header(&self, m: &mut Meta) -> Result<()> {
        let cs = self.geo.cluster_size as usize;
        let mut h = m.header.clone();
        let bytes = h.serialize(cs).map_err(|_| Error::errno(libc::ENOSPC))?;
        if let Some(d) = self.external() {
            d.flush().await?;
        }
        m.flush(&self.file.get()).await?;
        self.file.get().flush().await?;
        let old = read_cluster0(&self.file.get(), cs).await?;
        write_cluster0(&self.file.get(), &old, &bytes).await?;
        m.header = h;
        Ok(())
    }

    /// QEMU: qcow2_co_change_backing_file.
    pub(super) async fn set_backing_file_name(
        &self,
        file: Option<&str>,
        format: Option<&str>,
    ) -> Result<()> {
        // A raw data file alone must be the disk: a backing file would break it.
        if file.is_some() && self.data_raw {
            return Err(Error::errno(libc::EINVAL));
        }
        if file.is_some_and(|f| f.len() > 1023) {
            return Err(Error::errno(libc::EINVAL));
        }
        let mut m = self.meta.lock().await;
        if m.corrupt {
            return Err(Error::errno(libc::ENOMEDIUM));
        }
        let old = (
            m.header.backing_file.clone(),
            m.header.backing_format.clone(),
        );
        m.header.backing_file = file.map(str::to_string);
        m.header.backing_format = format.map(str::to_string);
        let r = self.write_header(&mut m).await;
        if r.is_err() {
            (m.header.backing_file, m.header.backing_format) = old;
        }
        r
    }

    /// QEMU: qcow2_make_empty. A v3 image with nothing but guest data
    /// (no snapshots, no data file, no LUKS header) is reset to a header, a refcount table,
    /// one refcount block and an empty L1 table, and the file cut after
    /// them; any other image has every cluster of the disk unallocated.
    pub(super) async fn empty(&self) -> Result<()> {
        let cs = self.geo.cluster_size;
        let (l1_clusters, simple) = {
            let m = self.meta.lock().await;
            let entries_per_refblock = (cs * 8) >> m.geo.refcount_order;
            let l1_clusters = (m.l1.len() as u64 * 8).div_ceil(cs);
            let simple = self.v3()
                && m.header.nb_snapshots == 0
                && m.header.crypto_header.is_none()
                && 3 + l1_clusters <= entries_per_refblock
                && self.external().is_none()
                && !self.geo.external_data;
            (l1_clusters, simple)
        };
        if simple {
            return self.make_completely_empty(l1_clusters).await;
        }
        let clusters = self.length().div_ceil(cs);
        self.clear_clusters(0, clusters, Clear::Drop).await?;
        self.flush().await
    }

    /// QEMU: make_completely_empty, step for step, with its debug events.
    /// The dirty bit is set first: from then until it is cleared the
    /// refcounts on disk are not to be trusted, and a failure leaves the
    /// image for the next open to repair, this node unusable.
    async fn make_completely_empty(&self, l1_clusters: u64) -> Result<()> {
        let cs = self.geo.cluster_size;
        let mut m = self.meta.lock().await;
        if m.corrupt {
            return Err(Error::errno(libc::ENOMEDIUM));
        }
        m.flush(&self.file.get()).await?;
        m.set_incompatible(&self.file.get(), INCOMPAT_DIRTY, true)
            .await?;
        let broken = async {
            let f = &self.file.get();
            f.debug_event(DebugEvent::L1Update).await;
            f.write_zeroes(
                m.header.l1_table_offset,
                l1_clusters * cs,
                WriteFlags::default(),
            )
            .await?;
            // The new table, refcount block and L1 table go right after the
            // header, over whatever was there.
            f.debug_event(DebugEvent::EmptyImagePrepare).await;
            f.write_zeroes(cs, (2 + l1_clusters) * cs, WriteFlags::default())
                .await?;
            f.debug_event(DebugEvent::L1Update).await;
            f.debug_event(DebugEvent::ReftableUpdate).await;
            let mut h = [0u8; 20];
            h[..8].copy_from_slice(&(3 * cs).to_be_bytes());
            h[8..16].copy_from_slice(&cs.to_be_bytes());
            h[16..].copy_from_slice(&1u32.to_be_bytes());
            f.write(40, IoBuf::from_slice(&h), WriteFlags::default())
                .await?;
            f.flush().await?;
            f.debug_event(DebugEvent::RefblockAlloc).await;
            f.write(
                cs,
                IoBuf::from_slice(&(2 * cs).to_be_bytes()),
                WriteFlags::default(),
            )
            .await?;
            f.flush().await?;
            // What is on disk now describes an empty image whose first
            // clusters are not counted yet: read it back, then count them.
            let (hdr, geo, l1, reftable) = load_metadata(f, false, false).await?;
            *m = new_meta(
                geo,
                &hdr,
                l1,
                reftable,
                false,
                &self.host_busy,
                &self.runtime(),
            );
            let first = m.alloc_clusters(f, 3 + l1_clusters).await?;
            if first != 0 {
                return Err(Error::corrupt("First cluster in emptied image is in use"));
            }
            m.flush(f).await
        }
        .await;
        if let Err(e) = broken {
            m.corrupt = true;
            return Err(e);
        }
        m.set_incompatible(&self.file.get(), INCOMPAT_DIRTY, false)
            .await?;
        drop(m);
        self.file
            .get()
            .truncate((3 + l1_clusters) * cs, false, Preallocation::Off)
            .await
    }
}
