//! Copy-on-read (QEMU: bdrv_co_do_copy_on_readv): a read of a node whose
//! clusters are not allocated in it reads them through the backing chain and
//! writes them into the node, so the next read finds them there.
//!
//! The whole cluster-aligned range is one serialising tracked request, so a
//! guest write to the same clusters cannot land between the read of the
//! backing data and its copy (which would overwrite the guest's write).

use crate::buf::{is_zero, IoBuf};
use crate::driver::WriteFlags;
use crate::error::Result;
use crate::node::Node;

/// Largest piece copied at once (QEMU: MAX_BOUNCE_BUFFER).
const MAX_BOUNCE: u64 = 32768 << 9;

impl Node {
    /// Reads `buf.len()` bytes at `offset`, copying unallocated clusters up.
    pub(crate) async fn read_copy_on_read(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len() as u64;
        let limits = self.limits();
        let align = limits.request_alignment.max(1) as u64;
        let cluster = self.driver().cluster_size().unwrap_or(0).max(align);
        let start = offset / cluster * cluster;
        let end =
            ((offset + len).div_ceil(cluster) * cluster).min(self.length().div_ceil(align) * align);
        let _req = self.tracker().begin(start, end, true).await;
        let mut pos = start;
        while pos < end {
            let st = self
                .driver()
                .block_status(pos, (end - pos).min(MAX_BOUNCE))
                .await?;
            let n = st.len.clamp(1, end - pos);
            // The part of [pos, pos + n) the caller asked for.
            let want_start = pos.max(offset);
            let want_end = (pos + n).min(offset + len);
            if st.data || st.zero {
                if want_start < want_end {
                    let a = want_start / align * align;
                    let b = want_end.div_ceil(align) * align;
                    let piece = self
                        .read_aligned(a, IoBuf::zeroed((b - a) as usize), &limits)
                        .await?;
                    copy_out(&mut buf, offset, &piece, a, want_start, want_end);
                }
            } else {
                let n = n.div_ceil(align) * align;
                let bounce = self
                    .read_aligned(pos, IoBuf::zeroed(n as usize), &limits)
                    .await?;
                let flags = WriteFlags::default();
                let zeroes = is_zero(bounce.as_slice())
                    && self.driver().write_zeroes(pos, n, flags).await.is_ok();
                let bounce = if zeroes {
                    bounce
                } else {
                    self.driver().write(pos, bounce, flags).await?
                };
                self.note_write();
                if want_start < want_end {
                    copy_out(&mut buf, offset, &bounce, pos, want_start, want_end);
                }
            }
            pos += n;
        }
        Ok(buf)
    }
}

/// Copies `[from, to)` from `src` (which starts at `src_off`) into `dst`
/// (which starts at `dst_off`).
fn copy_out(dst: &mut IoBuf, dst_off: u64, src: &IoBuf, src_off: u64, from: u64, to: u64) {
    let n = (to - from) as usize;
    let d = (from - dst_off) as usize;
    let s = (from - src_off) as usize;
    dst.as_mut_slice()[d..d + n].copy_from_slice(&src.as_slice()[s..s + n]);
}
