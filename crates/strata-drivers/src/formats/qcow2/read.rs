//! The read side (QEMU: qcow2_get_host_offset and the read path): a
//! request cut into extents of like mapping, each read from the data file,
//! the backing chain, zeroes or a decompressed cluster.

use super::compress;
use super::meta::{Mapping, Meta};
use super::Qcow2Driver;
use crate::formats::zero_fill;
use strata_block::{DebugEvent, Error, IoBuf, Result};

/// One piece of a request: `len` guest bytes at `offset`, all mapped alike.
#[derive(Clone, Copy, Debug)]
pub(super) struct Extent {
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) mapping: Mapping,
}

impl Qcow2Driver {
    /// Splits `[offset, offset+len)` into extents of like mapping; contiguous
    /// data clusters merge into one extent.
    pub(super) async fn extents(&self, m: &mut Meta, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let cs = self.geo.cluster_size;
        let mut out: Vec<Extent> = Vec::new();
        let mut off = offset;
        let end = offset + len;
        while off < end {
            let n = (cs - self.geo.offset_in_cluster(off)).min(end - off);
            // With subclusters an extent may end before its cluster does.
            let Extent {
                mapping, len: n, ..
            } = self.extent_at(m, off, n).await?;
            if let Some(last) = out.last_mut() {
                // One extent is one kind of I/O: data of one refcount state
                // at contiguous host bytes, or a run without host bytes.
                let same_io = match (last.mapping, mapping) {
                    (Mapping::Normal { copied: a, .. }, Mapping::Normal { copied: b, .. }) => {
                        a == b
                    }
                    (Mapping::Unallocated, _) | (Mapping::Zero(None), _) => true,
                    (Mapping::Reserved(_), Mapping::Reserved(_)) => true,
                    _ => false,
                };
                if same_io && last.mapping.continued_by(last.len, mapping) {
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

    /// The extent at `offset` of at most `len` bytes, within one cluster:
    /// shorter where the subclusters of the cluster change type.
    pub(super) async fn extent_at(&self, m: &mut Meta, offset: u64, len: u64) -> Result<Extent> {
        if self.geo.extended_l2 {
            let (mapping, len) = m.sub_mapping(&self.file.get(), offset, len).await?;
            return Ok(Extent {
                offset,
                len,
                mapping,
            });
        }
        let in_cluster = self.geo.offset_in_cluster(offset);
        let mapping = match m
            .mapping(&self.file.get(), offset >> self.geo.cluster_bits)
            .await?
        {
            Mapping::Normal { host, copied } => Mapping::Normal {
                host: host + in_cluster,
                copied,
            },
            Mapping::Zero(Some(host)) => Mapping::Zero(Some(host + in_cluster)),
            other => other,
        };
        Ok(Extent {
            offset,
            len,
            mapping,
        })
    }

    /// Reads one extent's bytes into `buf`.
    pub(super) async fn read_extent(&self, e: Extent, buf: IoBuf) -> Result<IoBuf> {
        match e.mapping {
            Mapping::Normal { host, .. } => {
                self.file.get().debug_event(DebugEvent::ReadAio).await;
                self.read_data(host, e.offset, buf).await
            }
            Mapping::Zero(_) => Ok(zero_fill(buf)),
            Mapping::Unallocated | Mapping::Reserved(_) => self.read_backing(e.offset, buf).await,
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
    pub(super) async fn read_backing(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        if self.backing().is_some() {
            self.file
                .get()
                .debug_event(DebugEvent::ReadBackingAio)
                .await;
        }
        crate::formats::read_backing(self.backing(), offset, buf).await
    }

    /// The decompressed cluster a compressed L2 entry points to.
    pub(super) async fn read_compressed(&self, entry: u64) -> Result<Vec<u8>> {
        let (host, span) = self.geo.compressed_extent(entry);
        let len = span.min(self.file.get().length().saturating_sub(host));
        if len == 0 {
            return Err(Error::corrupt(format!(
                "Compressed cluster at {host:#x} lies beyond the end of the image"
            )));
        }
        self.file
            .get()
            .debug_event(DebugEvent::ReadCompressed)
            .await;
        let src = self
            .file
            .get()
            .read(host, IoBuf::zeroed(len as usize))
            .await?;
        let mut out = vec![0u8; self.geo.cluster_size as usize];
        compress::decompress(self.compression, src.as_slice(), &mut out)?;
        Ok(out)
    }
}
