//! The write funnel (QEMU: bdrv_co_write_req_prepare / _finish): every
//! write, zero write, discard and compressed write of a node passes
//! `write_prepare` once its tracked request holds the range and before the
//! driver sees it (write notifiers, as copy-before-write needs; the write
//! threshold, checked where QEMU checks it), and `write_finish` once the
//! driver is done (the node's enabled dirty bitmaps). Like QEMU, a write
//! the driver failed is marked dirty too: part of it may have landed.

use super::Node;
use crate::bitmap::DirtyBitmaps;
use crate::error::Result;
use async_trait::async_trait;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What kind of change a request makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// Data from a buffer.
    Write,
    /// Zeroes, without a buffer.
    Zeroes,
    /// Deallocation; the range reads as zeroes or as before.
    Discard,
    /// Compressed clusters.
    Compressed,
}

/// One request through the funnel: what and where (the range its tracked
/// request covers, aligned as the node aligns it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteReq {
    pub kind: WriteKind,
    pub offset: u64,
    pub len: u64,
}

impl WriteReq {
    /// A request of `kind` over `[offset, offset+len)`.
    pub fn new(kind: WriteKind, offset: u64, len: u64) -> WriteReq {
        WriteReq { kind, offset, len }
    }
}

/// Hears each write before it reaches the driver; an error fails the write
/// without changing anything (a copy-before-write that could not copy).
#[async_trait]
pub trait BeforeWrite: Send + Sync {
    async fn before_write(&self, node: &Node, req: &WriteReq) -> Result<()>;
}

/// The event a write past the threshold raises (QEMU: BLOCK_WRITE_THRESHOLD).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThresholdExceeded {
    pub node_name: String,
    pub amount_exceeded: u64,
    pub write_threshold: u64,
}

/// Who hears that the threshold was crossed (the monitor sends the event).
pub type ThresholdHook = Arc<dyn Fn(ThresholdExceeded) + Send + Sync>;

impl Node {
    /// The node's dirty bitmaps.
    pub fn bitmaps(&self) -> &DirtyBitmaps {
        &self.bitmaps
    }

    /// Adds a notifier that hears every write before it starts.
    pub fn add_before_write(&self, n: Arc<dyn BeforeWrite>) {
        let mut list = self.before_write.write().unwrap_or_else(|p| p.into_inner());
        list.push(n);
        self.has_before_write.store(true, Ordering::Release);
    }

    /// Removes a notifier added by [`add_before_write`](Self::add_before_write).
    pub fn remove_before_write(&self, n: &Arc<dyn BeforeWrite>) {
        let mut list = self.before_write.write().unwrap_or_else(|p| p.into_inner());
        list.retain(|x| !Arc::ptr_eq(x, n));
        self.has_before_write
            .store(!list.is_empty(), Ordering::Release);
    }

    /// Raises `hook` once, the first time a write reaches past `threshold`
    /// bytes (0 turns it off), as QEMU's block-set-write-threshold.
    pub fn set_write_threshold(&self, threshold: u64, hook: Option<ThresholdHook>) {
        *self
            .threshold_hook
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = hook;
        self.write_threshold.store(threshold, Ordering::Release);
    }

    /// The write threshold now (0: none).
    pub fn write_threshold(&self) -> u64 {
        self.write_threshold.load(Ordering::Acquire)
    }

    /// The funnel's first step: notifiers, then the write threshold.
    pub(super) async fn write_prepare(&self, req: WriteReq) -> Result<()> {
        if self.has_before_write.load(Ordering::Acquire) {
            // Boxed: without notifiers a write's future carries no state for them.
            Box::pin(self.notify_before_write(&req)).await?;
        }
        if req.kind != WriteKind::Discard {
            self.check_write_threshold(req.offset + req.len);
        }
        Ok(())
    }

    async fn notify_before_write(&self, req: &WriteReq) -> Result<()> {
        let list = self
            .before_write
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for n in list {
            n.before_write(self, req).await?;
        }
        Ok(())
    }

    fn check_write_threshold(&self, end: u64) {
        let t = self.write_threshold.load(Ordering::Acquire);
        if t == 0 || end <= t {
            return;
        }
        // Once: the first writer past it turns it off.
        if self
            .write_threshold
            .compare_exchange(t, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let hook = self
            .threshold_hook
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = hook {
            h(ThresholdExceeded {
                node_name: self.name.clone(),
                amount_exceeded: end - t,
                write_threshold: t,
            });
        }
    }

    /// Counts a completed write, so the next flush makes it stable.
    pub(crate) fn note_write(&self) {
        self.write_gen.fetch_add(1, Ordering::AcqRel);
    }

    /// The funnel's last step: the write counted for flushes, the highest
    /// offset written, the enabled dirty bitmaps.
    pub(super) fn write_finish(&self, req: WriteReq) {
        self.note_write();
        if req.kind != WriteKind::Discard && req.len > 0 {
            self.wr_highest_offset
                .fetch_max(req.offset + req.len, Ordering::AcqRel);
            self.bitmaps.grow_to(req.offset + req.len);
        }
        self.bitmaps.mark_dirty(req.offset, req.len);
    }

    /// The end of the furthest write so far (query-blockstats).
    pub fn wr_highest_offset(&self) -> u64 {
        self.wr_highest_offset.load(Ordering::Acquire)
    }
}
