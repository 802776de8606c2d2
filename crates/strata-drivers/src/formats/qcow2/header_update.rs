//! Rewrites of the image header while open (QEMU: qcow2_update_header):
//! the backing file name and format, and emptying the image after a commit.

use super::meta::Meta;
use super::zero::Clear;
use super::Qcow2Driver;
use strata_block::{Driver, Error, IoBuf, Result, WriteFlags};

impl Qcow2Driver {
    /// Writes the header held in `m` to cluster 0 (the header, its
    /// extensions and the backing file name all live there). Everything
    /// written before is on disk first, so the header never names a state
    /// the image has not reached; it is on disk itself when this returns.
    /// If it does not fit, nothing is written and `m` is unchanged (ENOSPC).
    pub(super) async fn write_header(&self, m: &mut Meta) -> Result<()> {
        let cs = self.geo.cluster_size as usize;
        let mut h = m.header.clone();
        let bytes = h.serialize(cs).map_err(|_| Error::errno(libc::ENOSPC))?;
        if let Some(d) = self.external() {
            d.flush().await?;
        }
        m.flush(&self.file).await?;
        self.file.flush().await?;
        self.file
            .write(0, IoBuf::from_slice(&bytes), WriteFlags::default())
            .await?;
        self.file.flush().await?;
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

    /// QEMU: qcow2_make_empty (its fallback, which works for every image):
    /// every cluster of the disk unallocated, its host clusters freed.
    pub(super) async fn empty(&self) -> Result<()> {
        let cs = self.geo.cluster_size;
        let clusters = self.length().div_ceil(cs);
        self.clear_clusters(0, clusters, Clear::Drop).await?;
        self.flush().await
    }
}
