//! The node a mirror job puts over its source (QEMU: bdrv_mirror_top in
//! block/mirror.c): a filter whose backing child is the source. Reads pass
//! through; writes, zero writes and discards go to the source and then
//! either mark the job's dirty bitmap (background copy) or are written to
//! the target before they complete (write-blocking copy). For an active
//! commit it takes no consistent read on the chain below and shares writes,
//! since the job writes into the base under it.

use super::ops::{Method, Ops};
use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use strata_block::driver::{Child, ChildCell, ChildRole, Driver, Limits, Perm};
use strata_block::{BlockStatus, IoBuf, Node, Result, WriteFlags};

/// What the filter and its job share (QEMU: MirrorBDSOpaque).
pub(crate) struct TopLink {
    /// The job is done with the source: the filter takes nothing on it, so
    /// the graph can change under it.
    pub(crate) stop: AtomicBool,
    /// Active commit: the target is in the source's chain.
    pub(crate) is_commit: bool,
    /// The job's copy state, once it is set up.
    pub(crate) ops: Mutex<Option<Arc<Ops>>>,
}

impl TopLink {
    pub(crate) fn new(is_commit: bool) -> Arc<TopLink> {
        Arc::new(TopLink {
            stop: AtomicBool::new(false),
            is_commit,
            ops: Mutex::new(None),
        })
    }

    fn ops(&self) -> Option<Arc<Ops>> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set_ops(&self, ops: Option<Arc<Ops>>) {
        *self.ops.lock().unwrap_or_else(|e| e.into_inner()) = ops;
    }
}

pub(crate) struct MirrorTop {
    pub(crate) source: ChildCell,
    pub(crate) link: Arc<TopLink>,
}

impl MirrorTop {
    /// One guest write of any kind (QEMU: bdrv_mirror_top_do_write).
    async fn do_write(
        &self,
        method: Method,
        offset: u64,
        len: u64,
        buf: Option<IoBuf>,
        flags: WriteFlags,
    ) -> Result<Option<IoBuf>> {
        let ops = self.link.ops();
        let copy = ops.as_ref().filter(|o| o.should_copy_to_target());
        let claim = match copy {
            Some(o) => Some(o.active_write_prepare(offset, len).await),
            None => None,
        };
        let source = self.source.get();
        let r = match (method, buf) {
            (Method::Copy, Some(buf)) => source.write(offset, buf, flags).await.map(Some),
            (Method::Zero, _) => source.write_zeroes(offset, len, flags).await.map(|_| None),
            _ => source.discard(offset, len).await.map(|_| None),
        };
        // A write that failed may have landed in part: the target must get
        // the range again (QEMU marks only in background mode).
        if copy.is_none() || r.is_err() {
            if let Some(o) = &ops {
                o.mark_dirty(offset, len);
            }
        }
        let r = match (r, copy) {
            (Ok(buf), Some(o)) => Ok(o.sync_target_write(method, offset, len, buf, flags).await),
            (r, _) => r,
        };
        if let (Some(o), Some(claim)) = (copy, claim) {
            o.active_write_settle(claim);
        }
        r
    }
}

#[async_trait]
impl Driver for MirrorTop {
    fn reopen_supported(&self) -> bool {
        false
    }

    fn format_name(&self) -> &'static str {
        "mirror_top"
    }

    fn length(&self) -> u64 {
        self.source.get().length()
    }

    fn children(&self) -> Vec<Child> {
        vec![Child::new(ChildRole::Backing, &self.source.get())]
    }

    fn child_cell(&self, role: ChildRole) -> Option<&ChildCell> {
        (role == ChildRole::Backing).then_some(&self.source)
    }

    fn child_perm(&self, _node: &Node, _role: ChildRole, perm: Perm, shared: Perm) -> (Perm, Perm) {
        if self.link.stop.load(Ordering::Acquire) {
            return (Perm::NONE, Perm::ALL);
        }
        // A filter passes its users' permissions through.
        let (mut p, mut s) = (perm, shared);
        if self.link.is_commit {
            // The chain above the base is unreadable as a disk while the
            // job writes the base, and the job's own writes must pass.
            p = p.without(Perm::CONSISTENT_READ);
            s = s.with(Perm::WRITE);
        }
        (p, s)
    }

    fn limits(&self) -> Limits {
        self.source.get().limits()
    }

    fn is_filter(&self) -> bool {
        true
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
        let len = buf.len() as u64;
        let out = self
            .do_write(Method::Copy, offset, len, Some(buf), flags)
            .await?;
        Ok(out.unwrap_or_else(|| IoBuf::zeroed(0)))
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        self.do_write(Method::Zero, offset, len, None, flags)
            .await
            .map(|_| ())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.do_write(Method::Discard, offset, len, None, WriteFlags::default())
            .await
            .map(|_| ())
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
