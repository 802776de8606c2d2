//! Zero writes on images with extended L2 entries (QEMU: the generic
//! layer's split at the zero-write alignment, qcow2_co_pwrite_zeroes and
//! qcow2_subcluster_zeroize). The unit is the subcluster: a request is cut
//! into an unaligned head, an aligned middle and an unaligned tail, as
//! QEMU's block layer cuts it, because which subclusters end up zero or
//! allocated depends on those pieces. A piece that cannot be zeroed in the
//! metadata (a partial subcluster that does not read as zeroes around the
//! request, part of a compressed cluster) is written as zeroes instead.

use super::meta::Mapping;
use super::subcluster::{alloc_range, zero_range, ScType};
use super::zero::Clear;
use super::Qcow2Driver;
use strata_block::{Driver, IoBuf, Result, WriteFlags};

/// Largest zero buffer written at once when zeroes must be written out
/// (QEMU's MAX_WRITE_ZEROES_BOUNCE_BUFFER).
const MAX_ZERO_BOUNCE: u64 = 16 << 20;

impl Qcow2Driver {
    /// write_zeroes with subclusters: the pieces QEMU's block layer makes.
    pub(super) async fn write_zeroes_sub(
        &self,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> Result<()> {
        let sc = self.geo.subcluster_size();
        let mut head = offset % sc;
        let tail = (offset + len) % sc;
        let mut off = offset;
        let mut left = len;
        while left > 0 {
            let mut num = left;
            if head != 0 {
                num = left.min(sc - head);
                head = (head + num) % sc;
            } else if tail != 0 && num > sc {
                num -= tail;
            }
            let done = self.zero_piece(off, num, flags).await?;
            if !done {
                self.write_zero_bytes(off, num, flags).await?;
            }
            off += num;
            left -= num;
        }
        Ok(())
    }

    /// Writes `len` zero bytes at `offset`, in bounded buffers.
    async fn write_zero_bytes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        let mut off = offset;
        while off < offset + len {
            let n = (offset + len - off).min(MAX_ZERO_BOUNCE);
            self.write(off, IoBuf::zeroed(n as usize), flags).await?;
            off += n;
        }
        Ok(())
    }

    /// One piece in the metadata (QEMU: qcow2_co_pwrite_zeroes); false
    /// when it must be written as zeroes instead.
    async fn zero_piece(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<bool> {
        let sc = self.geo.subcluster_size();
        let head = offset % sc;
        let end = offset + len;
        let tail = if end == self.length() {
            0
        } else {
            end.next_multiple_of(sc) - end
        };
        if head == 0 && tail == 0 {
            return self.zeroize(offset, len, flags).await;
        }
        // A partial subcluster: only if the rest of it reads as zeroes
        // already may the whole of it become zero.
        if !(self.reads_zero(offset - head, offset).await?
            && self.reads_zero(end, end + tail).await?)
        {
            return Ok(false);
        }
        self.zero_raw_data(offset - head, sc, flags).await?;
        self.zero_subclusters(offset - head, 1, true).await
    }

    /// True when guest `[start, end)` reads as zeroes through this image
    /// and its backing chain (QEMU's is_zero on the qcow2 node).
    async fn reads_zero(&self, start: u64, end: u64) -> Result<bool> {
        let end = end.min(self.length());
        if start >= end {
            return Ok(true);
        }
        let extents = {
            let mut m = self.meta.lock().await;
            self.extents(&mut m, start, end - start).await?
        };
        for e in extents {
            let zero = match e.mapping {
                Mapping::Zero(_) => true,
                Mapping::Unallocated | Mapping::Reserved(_) => {
                    self.backing_reads_zero(e.offset, e.offset + e.len).await?
                }
                _ => false,
            };
            if !zero {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// A subcluster-aligned range in the metadata (QEMU:
    /// qcow2_subcluster_zeroize): the subclusters of a partial first and
    /// last cluster get their zero bits, whole clusters become all zero.
    /// False (nothing more done) where a compressed cluster is partly
    /// covered: the caller writes the zeroes then.
    async fn zeroize(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<bool> {
        self.zero_raw_data(offset, len, flags).await?;
        let cs = self.geo.cluster_size;
        let sc = self.geo.subcluster_size();
        let mut start = offset;
        let mut end = offset + len;
        let head = end.min(start.next_multiple_of(cs)) - start;
        start += head;
        let tail = if end >= self.length() {
            0
        } else {
            end - start.max(end / cs * cs)
        };
        end -= tail;
        if head > 0
            && !self
                .zero_subclusters(start - head, head.div_ceil(sc), false)
                .await?
        {
            return Ok(false);
        }
        if end > start {
            let how = Clear::Zero {
                unmap: flags.may_unmap,
            };
            self.clear_clusters(start / cs, (end - start).div_ceil(cs), how)
                .await?;
        }
        if tail > 0 && !self.zero_subclusters(end, tail.div_ceil(sc), false).await? {
            return Ok(false);
        }
        Ok(true)
    }

    /// Sets the zero bits of `n` subclusters of one cluster from the
    /// subcluster at `offset` (QEMU: zero_l2_subclusters). False for a
    /// compressed cluster, or, with `only_if_empty`, where the first of
    /// them holds data by the time the lock is taken.
    async fn zero_subclusters(&self, offset: u64, n: u64, only_if_empty: bool) -> Result<bool> {
        let gc = offset >> self.geo.cluster_bits;
        let first = (self.geo.offset_in_cluster(offset) >> self.geo.subcluster_bits) as u32;
        let mut m = self.lock_idle(gc, gc).await?;
        let current = m.l2_entry(&self.file.get(), gc).await?;
        let e = current.map(|c| c.2).unwrap_or_default();
        if e.compressed() {
            return Ok(false);
        }
        if only_if_empty {
            let ty = e.sc_type(&self.geo, first);
            if !matches!(
                ty,
                ScType::ZeroPlain
                    | ScType::ZeroAlloc
                    | ScType::UnallocatedPlain
                    | ScType::UnallocatedAlloc
            ) {
                return Ok(false);
            }
        }
        let l2 = self.writable_l2(&mut m, gc).await?;
        let idx = gc & (self.geo.l2_entries() - 1);
        let last = first + n as u32;
        let new = (e.bitmap | zero_range(first, last)) & !alloc_range(first, last);
        if new != e.bitmap {
            m.l2_set_bitmap(&self.file.get(), l2, idx, new).await?;
        }
        Ok(true)
    }
}
