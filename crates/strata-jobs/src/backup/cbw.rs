//! The copy-before-write filter a backup job puts over its source (QEMU:
//! block/copy-before-write.c): before a write, a zero write or a discard
//! reaches the source, the clusters it touches are copied to the target if
//! they are not there yet, so the target keeps the disk as it was when the
//! job started. A copy that fails fails the guest's write (QEMU's default,
//! `on-cbw-error=break-guest-write`): the point in time is never broken.

use super::copy::BlockCopy;
use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use strata_block::driver::{Child, ChildCell, ChildRole, Driver, Limits, Perm};
use strata_block::{BlockStatus, DirtyBitmap, IoBuf, Node, Result, WriteFlags};

pub(crate) struct CopyBeforeWrite {
    pub(crate) source: ChildCell,
    /// The copy state, until the job lets go of it.
    pub(crate) copy: Mutex<Option<Arc<BlockCopy>>>,
    /// What the filter's own copies put in the target (QEMU: done_bitmap),
    /// once the filter is a node.
    pub(crate) done: Mutex<Option<Arc<DirtyBitmap>>>,
    /// The job is done: the filter takes nothing on the source, so it can
    /// leave the graph (QEMU detaches it in the same step).
    pub(crate) stopped: AtomicBool,
}

impl CopyBeforeWrite {
    /// The filter's bitmaps, as QEMU's cbw_open makes them on its node:
    /// the copy state's, then what the filter copied, then what a
    /// snapshot-access reader may still read (all of it).
    pub(crate) fn add_bitmaps(&self, node: &Arc<Node>, copy: &BlockCopy) -> Result<(), String> {
        let bitmaps = node.bitmaps();
        bitmaps.adopt(copy.dirty());
        let (cluster, len) = (copy.cluster_size(), node.length());
        let done = bitmaps
            .create(None, cluster, len)
            .map_err(|e| e.to_string())?;
        let access = bitmaps
            .create(None, cluster, len)
            .map_err(|e| e.to_string())?;
        for b in [&done, &access] {
            let _ = bitmaps.set_enabled(b, false);
        }
        access.set(0, len);
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(done);
        Ok(())
    }

    fn copy(&self) -> Option<Arc<BlockCopy>> {
        self.copy.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Copies what `[offset, offset + len)` holds now, before it changes
    /// (QEMU: cbw_do_copy_before_write).
    async fn before_write(&self, offset: u64, len: u64) -> Result<()> {
        let Some(c) = self.copy() else {
            return Ok(());
        };
        c.copy(offset, len).await.map_err(|e| e.error)?;
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(d) = done {
            let cs = c.cluster_size();
            let start = offset / cs * cs;
            d.set(start, (offset + len).next_multiple_of(cs) - start);
        }
        Ok(())
    }
}

#[async_trait]
impl Driver for CopyBeforeWrite {
    fn format_name(&self) -> &'static str {
        "copy-before-write"
    }

    fn length(&self) -> u64 {
        self.source.get().length()
    }

    fn children(&self) -> Vec<Child> {
        vec![Child::new(ChildRole::File, &self.source.get())]
    }

    fn child_cell(&self, role: ChildRole) -> Option<&ChildCell> {
        (role == ChildRole::File).then_some(&self.source)
    }

    fn child_perm(&self, node: &Node, _role: ChildRole, perm: Perm, shared: Perm) -> (Perm, Perm) {
        // Used (by its job at least), the filter reads the source for its
        // copies, and no one else may write to it or resize it behind the
        // filter's back; before it is in place it takes nothing.
        if self.stopped.load(Ordering::Acquire) {
            return (Perm::NONE, Perm::ALL);
        }
        if node.parents().is_empty() && node.backend_count() == 0 {
            return (perm, shared);
        }
        (
            perm.with(Perm::CONSISTENT_READ),
            shared.without(Perm::WRITE).without(Perm::RESIZE),
        )
    }

    fn limits(&self) -> Limits {
        self.source.get().limits()
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn has_info(&self) -> bool {
        true
    }

    fn is_dirty(&self) -> bool {
        self.source.get().driver().is_dirty()
    }

    fn cluster_size(&self) -> Option<u64> {
        self.source.get().driver().cluster_size()
    }

    async fn allocated_size(&self) -> Result<Option<u64>> {
        self.source.get().driver().allocated_size().await
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.source.get().read(offset, buf).await
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        self.before_write(offset, buf.len() as u64).await?;
        self.source.get().write(offset, buf, flags).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        self.before_write(offset, len).await?;
        self.source.get().write_zeroes(offset, len, flags).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.before_write(offset, len).await?;
        self.source.get().discard(offset, len).await
    }

    async fn flush(&self) -> Result<()> {
        self.source.get().flush().await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus {
            raw: true,
            ..BlockStatus::data_at(len, self.source.get(), offset)
        })
    }

    async fn close(&self) -> Result<()> {
        self.source.get().close().await
    }
}
