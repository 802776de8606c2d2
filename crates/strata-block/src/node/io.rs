//! The one request path every request takes (QEMU: block/io.c): bounds
//! and read-only checks, alignment with read-modify-write under a
//! serialising tracked request, splitting at the maximum transfer,
//! write-zeroes fallback, flush and FUA semantics of the cache mode.

use super::funnel::{WriteKind, WriteReq};
use super::{DetectZeroes, Node};
use crate::buf::IoBuf;
use crate::debug::DebugEvent;
use crate::driver::{Limits, WriteFlags};
use crate::error::{err, Result};
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Node {
    /// Reads `buf.len()` bytes at `offset`.
    pub async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.read_with(offset, buf, self.copy_on_read).await
    }

    /// Reads `buf.len()` bytes at `offset`, copying what comes from the
    /// backing chain into this node whatever its own copy-on-read setting
    /// (QEMU: BDRV_REQ_COPY_ON_READ, as the copy-on-read filter asks).
    pub async fn read_cor(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.read_with(offset, buf, true).await
    }

    async fn read_with(&self, offset: u64, buf: IoBuf, copy_on_read: bool) -> Result<IoBuf> {
        self.pass_gate().await;
        let len = buf.len() as u64;
        self.check_request(offset, len)?;
        if len == 0 {
            return Ok(buf);
        }
        if copy_on_read {
            // Boxed, as the unaligned path below: the rare paths' state
            // stays out of every read's future.
            return Box::pin(self.read_copy_on_read(offset, buf)).await;
        }
        // Waits only for overlapping serialising requests (read-modify-write).
        let _req = self.tracker.begin(offset, offset + len, false).await;
        let limits = self.limits();
        let align = limits.request_alignment.max(1) as u64;
        let mem_ok = buf.is_aligned(limits.memory_alignment.max(1) as usize);
        if offset.is_multiple_of(align) && len.is_multiple_of(align) && mem_ok {
            return self.read_aligned(offset, buf, &limits).await;
        }
        // Unaligned: read the aligned cover into a bounce buffer and copy out.
        let start = offset / align * align;
        let end = (offset + len).div_ceil(align) * align;
        let cover = IoBuf::zeroed((end - start) as usize);
        let bounce = Box::pin(self.read_aligned(start, cover, &limits)).await?;
        let mut buf = buf;
        let skip = (offset - start) as usize;
        buf.as_mut_slice()
            .copy_from_slice(&bounce.as_slice()[skip..skip + len as usize]);
        Ok(buf)
    }

    /// Reads an aligned range, split at the maximum transfer. The usual
    /// request goes straight to the driver; the split loop is boxed so its
    /// state stays out of every read's future.
    pub(crate) async fn read_aligned(&self, offset: u64, buf: IoBuf, l: &Limits) -> Result<IoBuf> {
        let max = transfer_max(l);
        if buf.len() <= max {
            return self.driver.read(offset, buf).await;
        }
        Box::pin(async move {
            let mut parts = Vec::new();
            for (off, piece) in buf.pieces(offset, |_, left| left.min(max)) {
                parts.push(self.driver.read(off, piece).await?);
            }
            Ok(IoBuf::join_all(parts))
        })
        .await
    }

    /// Writes `buf` at `offset`.
    pub async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        self.pass_gate().await;
        self.check_writable()?;
        let len = buf.len() as u64;
        self.check_request(offset, len)?;
        if len == 0 {
            return Ok(buf);
        }
        let limits = self.limits();
        let align = limits.request_alignment.max(1) as u64;
        let mem_ok = buf.is_aligned(limits.memory_alignment.max(1) as usize);
        let buf = if offset.is_multiple_of(align) && len.is_multiple_of(align) && mem_ok {
            let _req = self.tracker.begin(offset, offset + len, false).await;
            let req = WriteReq::new(WriteKind::Write, offset, len);
            self.write_prepare(req).await?;
            let r = self.write_aligned(offset, buf, flags, &limits).await;
            self.write_finish(req);
            r?
        } else {
            // Boxed: the rare path's state stays out of every write's future.
            Box::pin(self.write_rmw(offset, buf, flags, &limits)).await?
        };
        self.after_write(flags).await?;
        Ok(buf)
    }

    /// Read-modify-write of the partial blocks of an unaligned write,
    /// serialised against every overlapping request so no write tears another.
    async fn write_rmw(
        &self,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
        limits: &Limits,
    ) -> Result<IoBuf> {
        let align = limits.request_alignment.max(1) as u64;
        let len = buf.len() as u64;
        let start = offset / align * align;
        let end = (offset + len).div_ceil(align) * align;
        let _req = self.tracker.begin(start, end, true).await;
        let req = WriteReq::new(WriteKind::Write, start, end - start);
        self.write_prepare(req).await?;
        let mut bounce = self
            .rmw_read(start, end, offset, offset + len, limits)
            .await?;
        let skip = (offset - start) as usize;
        bounce.as_mut_slice()[skip..skip + len as usize].copy_from_slice(buf.as_slice());
        let r = self.write_aligned(start, bounce, flags, limits).await;
        self.write_finish(req);
        r?;
        Ok(buf)
    }

    /// Reads what a read-modify-write of `[from, to)` keeps of the aligned
    /// cover `[start, end)`: the head and tail blocks (one read when they
    /// are the whole cover), announcing QEMU's `pwritev_rmw_*` events to the
    /// blkdebug node below (the node whose alignment QEMU would pad for).
    /// The caller holds a serialising request over the cover.
    async fn rmw_read(
        &self,
        start: u64,
        end: u64,
        from: u64,
        to: u64,
        l: &Limits,
    ) -> Result<IoBuf> {
        let align = l.request_alignment.max(1) as u64;
        let (head, tail) = (from != start, to != end);
        let merge = end - start == align || (head && tail && end - start == 2 * align);
        let mut bounce = IoBuf::zeroed((end - start) as usize);
        if head || merge {
            let n = if merge { end - start } else { align };
            if head {
                self.rmw_event(DebugEvent::PwritevRmwHead).await;
            }
            if merge && tail {
                self.rmw_event(DebugEvent::PwritevRmwTail).await;
            }
            let got = self.driver.read(start, IoBuf::zeroed(n as usize)).await?;
            bounce.as_mut_slice()[..n as usize].copy_from_slice(got.as_slice());
            if head {
                self.rmw_event(DebugEvent::PwritevRmwAfterHead).await;
            }
            if merge && tail {
                self.rmw_event(DebugEvent::PwritevRmwAfterTail).await;
            }
            if merge {
                return Ok(bounce);
            }
        }
        if tail {
            self.rmw_event(DebugEvent::PwritevRmwTail).await;
            let got = self
                .driver
                .read(end - align, IoBuf::zeroed(align as usize))
                .await?;
            let at = (end - start - align) as usize;
            bounce.as_mut_slice()[at..].copy_from_slice(got.as_slice());
            self.rmw_event(DebugEvent::PwritevRmwAfterTail).await;
        }
        Ok(bounce)
    }

    /// Announces a read-modify-write event to the first node at or below
    /// this one that takes debug events (alignment is inherited upwards
    /// here, so the padding happens above the node QEMU pads at).
    async fn rmw_event(&self, event: DebugEvent) {
        if self.driver.debug_hooks().is_some() {
            return self.debug_event(event).await;
        }
        let mut next = self.primary_child();
        while let Some(n) = next {
            if n.driver().debug_hooks().is_some() {
                return n.debug_event(event).await;
            }
            next = n.primary_child();
        }
    }

    pub(crate) async fn write_aligned(
        &self,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
        l: &Limits,
    ) -> Result<IoBuf> {
        if self.detect_zeroes() != DetectZeroes::Off && crate::buf::is_zero(buf.as_slice()) {
            // Boxed: the rare path's state stays out of every write's future.
            if Box::pin(self.write_detected_zeroes(offset, buf.len() as u64, flags)).await? {
                return Ok(buf);
            }
        }
        // QEMU's bdrv_aligned_pwritev events, heard by blkdebug on itself.
        self.debug_event(DebugEvent::Pwritev).await;
        let r = self.write_split(offset, buf, flags, l).await;
        self.debug_event(DebugEvent::PwritevDone).await;
        r
    }

    /// A buffer of zeroes becomes a write-zeroes request (QEMU:
    /// bdrv_aligned_pwritev). False when the driver cannot write zeroes
    /// without a buffer: it gets the buffer after all.
    async fn write_detected_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> Result<bool> {
        let zflags = WriteFlags {
            may_unmap: self.detect_zeroes() == DetectZeroes::Unmap && self.unmap(),
            ..flags
        };
        self.debug_event(DebugEvent::PwritevZero).await;
        match self.driver.write_zeroes(offset, len, zflags).await {
            Err(e) if e.code() == libc::ENOTSUP => Ok(false),
            r => {
                self.debug_event(DebugEvent::PwritevDone).await;
                r.map(|()| true)
            }
        }
    }

    /// Hands an aligned write to the driver in pieces of at most the
    /// maximum transfer.
    async fn write_split(
        &self,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
        l: &Limits,
    ) -> Result<IoBuf> {
        let max = transfer_max(l);
        if buf.len() <= max {
            return self.driver.write(offset, buf, flags).await;
        }
        Box::pin(async move {
            let mut parts = Vec::new();
            for (off, piece) in buf.pieces(offset, |_, left| left.min(max)) {
                parts.push(self.driver.write(off, piece, flags).await?);
            }
            Ok(IoBuf::join_all(parts))
        })
        .await
    }

    /// With the write cache off, or FUA asked for, a write is flushed before it completes.
    async fn after_write(&self, flags: WriteFlags) -> Result<()> {
        if flags.fua || !self.writeback.load(Ordering::Relaxed) {
            Box::pin(self.flush()).await?;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeroes. Partial blocks at
    /// either end are written as zeroed blocks under a serialising request;
    /// the aligned middle goes to the driver in pieces its limits allow.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        self.pass_gate().await;
        self.check_writable()?;
        self.check_request(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let limits = self.limits();
        let align = limits.request_alignment.max(1) as u64;
        let end = offset + len;
        if offset.is_multiple_of(align) && len.is_multiple_of(align) {
            let _req = self.tracker.begin(offset, end, false).await;
            let req = WriteReq::new(WriteKind::Zeroes, offset, len);
            self.write_prepare(req).await?;
            let r = self.zeroes_aligned(offset, len, flags, &limits).await;
            self.write_finish(req);
            r?;
        } else {
            if flags.no_fallback {
                return err(libc::ENOTSUP);
            }
            let start = offset / align * align;
            let cover_end = end.div_ceil(align) * align;
            let _req = self.tracker.begin(start, cover_end, true).await;
            let req = WriteReq::new(WriteKind::Zeroes, start, cover_end - start);
            self.write_prepare(req).await?;
            let r = self.zeroes_unaligned(offset, end, flags, &limits).await;
            self.write_finish(req);
            r?;
        }
        self.after_write(flags).await
    }

    /// Zeroes `[offset, end)`, not aligned: the partial blocks at either end
    /// by read-modify-write, the aligned middle as a zero write (the caller
    /// holds a serialising request over the aligned cover).
    async fn zeroes_unaligned(
        &self,
        offset: u64,
        end: u64,
        flags: WriteFlags,
        limits: &Limits,
    ) -> Result<()> {
        let align = limits.request_alignment.max(1) as u64;
        let start = offset / align * align;
        let mid_start = offset.div_ceil(align) * align;
        let mid_end = (end / align * align).max(mid_start);
        if start < offset {
            self.zero_partial_block(start, offset, end.min(start + align), flags, limits)
                .await?;
        }
        if mid_start < mid_end {
            self.zeroes_aligned(mid_start, mid_end - mid_start, flags, limits)
                .await?;
        }
        let tail = end / align * align;
        let head_done = start < offset;
        let tail_partial = !end.is_multiple_of(align);
        if tail_partial && (!head_done || tail != start) {
            self.zero_partial_block(tail, tail.max(offset), end, flags, limits)
                .await?;
        }
        Ok(())
    }

    /// Zeroes `[from, to)` inside the aligned block at `block` by
    /// read-modify-write (the caller holds a serialising request).
    async fn zero_partial_block(
        &self,
        block: u64,
        from: u64,
        to: u64,
        flags: WriteFlags,
        l: &Limits,
    ) -> Result<()> {
        let align = l.request_alignment.max(1) as u64;
        let mut b = self.rmw_read(block, block + align, from, to, l).await?;
        b.as_mut_slice()[(from - block) as usize..(to - block) as usize].fill(0);
        let plain = WriteFlags {
            may_unmap: false,
            ..flags
        };
        self.write_aligned(block, b, plain, l).await.map(|_| ())
    }

    /// Zeroes an aligned range (QEMU: bdrv_co_do_pwrite_zeroes): pieces
    /// aligned to the write-zeroes alignment and at most its maximum; a
    /// piece the driver cannot zero is written as buffers of zeroes.
    async fn zeroes_aligned(
        &self,
        offset: u64,
        len: u64,
        flags: WriteFlags,
        l: &Limits,
    ) -> Result<()> {
        const MAX_BOUNCE: u64 = 16 << 20;
        let align = (l.write_zeroes_alignment as u64).max(l.request_alignment.max(1) as u64);
        let max_zero = aligned_max(l.max_write_zeroes, align);
        let max_transfer = match l.max_transfer {
            0 => MAX_BOUNCE,
            m => m.min(MAX_BOUNCE),
        };
        let mut head = offset % align;
        let tail = (offset + len) % align;
        let mut off = offset;
        let mut left = len;
        while left > 0 {
            let mut num = left;
            if head != 0 {
                // Up to the first aligned offset (and at most one transfer).
                num = left.min(max_transfer).min(align - head);
                head = (head + num) % align;
            } else if tail != 0 && num > align {
                num -= tail;
            }
            num = num.min(max_zero);
            match self.driver.write_zeroes(off, num, flags).await {
                Err(e) if e.code() == libc::ENOTSUP && !flags.no_fallback => {
                    let plain = WriteFlags {
                        may_unmap: false,
                        ..flags
                    };
                    let mut at = off;
                    let mut zeroes = IoBuf::zeroed(num.min(max_transfer) as usize);
                    while at < off + num {
                        let n = (off + num - at).min(max_transfer);
                        if n as usize != zeroes.len() {
                            zeroes = IoBuf::zeroed(n as usize);
                        }
                        zeroes = self.driver.write(at, zeroes, plain).await?;
                        at += n;
                    }
                }
                r => r?,
            }
            off += num;
            left -= num;
        }
        Ok(())
    }

    /// Discards `len` bytes at `offset` (QEMU: bdrv_co_pdiscard), in pieces
    /// aligned to the discard alignment; drivers that cannot discard a
    /// piece, and nodes opened with `discard=ignore`, just succeed.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.pass_gate().await;
        self.check_writable()?;
        self.check_request(offset, len)?;
        if len == 0 || !self.unmap() {
            return Ok(());
        }
        let _req = self.tracker.begin(offset, offset + len, false).await;
        let req = WriteReq::new(WriteKind::Discard, offset, len);
        self.write_prepare(req).await?;
        let r = self.discard_pieces(offset, len).await;
        self.write_finish(req);
        r
    }

    /// Hands a discard to the driver in pieces aligned as its limits ask.
    async fn discard_pieces(&self, offset: u64, len: u64) -> Result<()> {
        let l = self.limits();
        let rq = l.request_alignment.max(1) as u64;
        let align = (l.discard_alignment as u64).max(rq);
        let max_discard = aligned_max(l.max_discard, align);
        let mut head = offset % align;
        let mut tail = (offset + len) % align;
        let mut off = offset;
        let mut left = len;
        while left > 0 {
            let mut num = left;
            if head != 0 {
                num = left.min(align - head);
                if !num.is_multiple_of(rq) {
                    num %= rq;
                }
                head = (head + num) % align;
            } else if tail != 0 {
                if num > align {
                    num -= tail;
                } else if !tail.is_multiple_of(rq) && tail > rq {
                    // The unaligned last bytes go alone, in the next round.
                    tail %= rq;
                    num -= tail;
                }
            }
            num = num.min(max_discard);
            match self.driver.discard(off, num).await {
                Err(e) if e.code() == libc::ENOTSUP => {}
                r => r?,
            }
            off += num;
            left -= num;
        }
        Ok(())
    }

    /// Writes `buf` at `offset` compressed, for formats that can (QEMU:
    /// BDRV_REQ_WRITE_COMPRESSED); the driver checks cluster alignment.
    pub async fn write_compressed(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.pass_gate().await;
        self.check_writable()?;
        let len = buf.len() as u64;
        self.check_request(offset, len)?;
        // An empty write goes to the driver too: it ends a series of them.
        let _req = self.tracker.begin(offset, offset + len, false).await;
        let req = WriteReq::new(WriteKind::Compressed, offset, len);
        self.write_prepare(req).await?;
        let r = self.driver.write_compressed(offset, buf).await;
        self.write_finish(req);
        let buf = r?;
        self.after_write(WriteFlags::default()).await?;
        Ok(buf)
    }

    /// The node that keeps VM state for this one: itself, or the first down
    /// its primary children that does (QEMU: bdrv_co_writev_vmstate).
    fn vmstate_node(self: &Arc<Self>) -> Option<Arc<Node>> {
        self.find_down(|n| n.driver.has_vmstate())
    }

    /// Saves VM state at `pos`; with the write cache off it is flushed
    /// before this returns (QEMU: blk_save_vmstate).
    pub async fn save_vmstate(self: &Arc<Self>, pos: u64, buf: IoBuf) -> Result<IoBuf> {
        self.check_writable()?;
        let Some(node) = self.vmstate_node() else {
            return err(libc::ENOTSUP);
        };
        let buf = node.driver.save_vmstate(pos, buf).await?;
        if !self.writeback.load(Ordering::Relaxed) {
            self.flush().await?;
        }
        Ok(buf)
    }

    /// Loads VM state at `pos`.
    pub async fn load_vmstate(self: &Arc<Self>, pos: u64, buf: IoBuf) -> Result<IoBuf> {
        let Some(node) = self.vmstate_node() else {
            return err(libc::ENOTSUP);
        };
        node.driver.load_vmstate(pos, buf).await
    }

    /// Makes completed writes stable (a no-op with `cache=unsafe`, and on a
    /// read-only node, which has none: QEMU's bdrv_co_flush skips both).
    pub async fn flush(&self) -> Result<()> {
        if self.no_flush() || self.is_read_only() {
            return Ok(());
        }
        self.pass_gate().await;
        self.flush_now().await
    }

    /// [`Node::flush`] by the owner of a drained section over this node,
    /// which passes the gate holding every other request back (QEMU: the
    /// main loop's bdrv_flush between bdrv_drained_begin and _end).
    pub async fn flush_drained(&self, _section: &super::DrainGuard) -> Result<()> {
        if self.no_flush() || self.is_read_only() {
            return Ok(());
        }
        self.flush_now().await
    }

    async fn flush_now(&self) -> Result<()> {
        // Tracked so that a drained section waits for it; it overlaps nothing.
        let _req = self.tracker.begin(0, 0, false).await;
        let mut flushed = self.flush_order.lock().await;
        let gen = self.write_gen.load(Ordering::Acquire);
        // A protocol node with nothing written since its last flush has
        // nothing to make stable (QEMU skips flush_to_disk the same way);
        // a format node always flushes, as it writes its caches back.
        if *flushed == gen && self.driver.children().is_empty() {
            return Ok(());
        }
        self.driver.flush().await?;
        *flushed = gen;
        Ok(())
    }

    /// Changes the length of the node. Growing serialises the new range
    /// (QEMU: BDRV_TRACKED_TRUNCATE), so no request in flight there sees it
    /// half made. Shrinking waits for nobody, as in QEMU (a write held in
    /// flight past the new end would otherwise hang the caller): formats
    /// keep the clusters such a write still targets from being reused.
    pub async fn truncate(
        &self,
        size: u64,
        exact: bool,
        prealloc: crate::driver::Preallocation,
    ) -> Result<()> {
        self.pass_gate().await;
        self.check_writable()?;
        let old = self.length();
        let _req = self.tracker.begin(old.min(size), size, true).await;
        let r = self.driver.truncate(size, exact, prealloc).await;
        self.note_write();
        r?;
        // Bitmaps follow the new length (QEMU: bdrv_dirty_bitmap_truncate).
        self.bitmaps.truncate(self.length());
        Ok(())
    }
}

/// The maximum transfer as a buffer length (0 in the limits: none).
fn transfer_max(l: &Limits) -> usize {
    match l.max_transfer {
        0 => usize::MAX,
        m => usize::try_from(m).unwrap_or(usize::MAX),
    }
}

/// A request maximum (0: none) rounded down to `align`, at least `align`.
fn aligned_max(max: u64, align: u64) -> u64 {
    match max {
        0 => u64::MAX / align * align,
        m => (m / align * align).max(align),
    }
}
