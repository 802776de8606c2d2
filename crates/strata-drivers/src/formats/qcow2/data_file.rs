//! The external data file of a qcow2 image (docs/interop/qcow2.txt, the
//! "external data file" incompatible feature): which node holds the guest
//! data, opened as QEMU's qcow2_do_open opens it, and the permissions the
//! image takes on it.
//!
//! With a data file every data cluster sits at its guest offset in it; the
//! image file keeps only the metadata, and its refcounts never count data.

use super::header::{Header, AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_DATA_FILE};
use super::meta::{Mapping, OFLAG_COPIED};
use super::Qcow2Driver;
use std::sync::Arc;
use strata_block::driver::Preallocation;
use strata_block::options::Opts;
use strata_block::{ChildRole, Error, Node, OpenCtx, Perm, Result, WriteFlags};

/// The option (and child) name.
const KEY: &str = "data-file";

/// Where the guest data of an open image lives.
pub enum DataFile {
    /// In the image file itself.
    Internal,
    /// In this external node.
    External(Arc<Node>),
    /// In an external file that was not opened, because the user reads no
    /// data (`qemu-img info` must not touch files an image names).
    Unopened,
}

/// True when the header says the data lives in an external file.
pub fn is_external(h: &Header) -> bool {
    h.incompatible_features & INCOMPAT_DATA_FILE != 0
}

/// True when the data file must stay a valid raw image by itself.
pub fn is_raw(h: &Header) -> bool {
    h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
}

/// Opens the data file of the image whose header is `h`: the `data-file`
/// option if given, else the file the header names (a relative name is
/// opened from the current directory, as QEMU opens it).
pub async fn open(ctx: &OpenCtx, opts: &mut Opts, h: &Header) -> Result<DataFile> {
    if ctx.flags.no_io {
        // Options for it are accepted and dropped, as QEMU drops them.
        opts.remove(KEY);
        return Ok(if is_external(h) {
            DataFile::Unopened
        } else {
            DataFile::Internal
        });
    }
    let given = ctx
        .open_child(opts, KEY, None, ChildRole::DataFile, true)
        .await?;
    if !is_external(h) {
        if given.is_some() {
            return Err(Error::invalid(
                "'data-file' can only be set for images with an external data file",
            ));
        }
        if is_raw(h) {
            return Err(Error::invalid("data-file-raw requires a data file"));
        }
        return Ok(DataFile::Internal);
    }
    let node = match (given, &h.data_file) {
        (Some(n), _) => n,
        (None, Some(name)) => ctx
            .open_child(opts, KEY, Some(name), ChildRole::DataFile, true)
            .await?
            .ok_or_else(|| Error::invalid("'data-file' is required for this image"))?,
        (None, None) => return Err(Error::invalid("'data-file' is required for this image")),
    };
    let (perm, shared) = data_perms(ctx);
    node.set_perm(perm, shared)?;
    Ok(DataFile::External(node))
}

/// What the image takes and shares on its data file (QEMU's rule for a
/// child holding only data): what its own user takes; nobody may resize it
/// under the image, and a writer may grow it.
fn data_perms(ctx: &OpenCtx) -> (Perm, Perm) {
    let (mut perm, shared) = ctx.node_perms();
    if perm.contains(Perm::WRITE_UNCHANGED) {
        perm = perm.with(Perm::WRITE);
    }
    if perm.contains(Perm::WRITE) {
        perm = perm.with(Perm::RESIZE);
    }
    let shared = if ctx.flags.force_share {
        Perm::ALL
    } else {
        Perm(shared.0 & !Perm::RESIZE.0)
    };
    (perm, shared)
}

impl Qcow2Driver {
    /// Preallocates guest `[from, to)` of an image with the data file
    /// `data` (QEMU: preallocate_co): every cluster the range touches and
    /// that is not mapped yet is mapped at its guest offset. As for a guest
    /// write, the part of such a cluster outside the range is copied on
    /// write first (zeroes, or the backing file's data), even where the data
    /// file had other bytes. Then the data file reaches `to`, reserving or
    /// writing (falloc, full) only the space it gains.
    pub(super) async fn preallocate_external(
        &self,
        data: &Arc<Node>,
        from: u64,
        to: u64,
        mode: Preallocation,
    ) -> Result<()> {
        let cs = self.geo.cluster_size;
        let first = from / cs;
        let end = to.div_ceil(cs);
        let mut gc = first;
        while gc < end {
            let table_end = ((gc >> self.geo.l2_bits) + 1) << self.geo.l2_bits;
            let stop = table_end.min(end);
            let mut m = self.meta.lock().await;
            let l2 = self.writable_l2(&mut m, gc).await?;
            let mut fresh = Vec::new();
            for c in gc..stop {
                let mp = m.mapping(&self.file.get(), c).await?;
                if !matches!(mp, Mapping::Normal { copied: true, .. }) {
                    fresh.push((c, mp));
                }
            }
            drop(m);
            // The data of a cluster is in place before its entry points to it.
            for &(c, mp) in &fresh {
                let start = c * cs;
                if start < from {
                    let head = self.old_content(c, mp, 0, from - start).await?;
                    data.write(start, head, WriteFlags::default()).await?;
                }
                if to < start + cs {
                    let tail = self.old_content(c, mp, to - start, cs).await?;
                    data.write(to, tail, WriteFlags::default()).await?;
                }
            }
            let mut m = self.meta.lock().await;
            let mask = self.geo.l2_entries() - 1;
            for (c, _) in fresh {
                m.l2_set(&self.file.get(), l2, c & mask, (c * cs) | OFLAG_COPIED)
                    .await?;
            }
            drop(m);
            gc = stop;
        }
        if from < to && to > data.length() {
            let mode = match mode {
                Preallocation::Metadata => Preallocation::Off,
                other => other,
            };
            data.truncate(to, false, mode).await?;
        }
        self.meta.lock().await.flush(&self.file.get()).await
    }
}
