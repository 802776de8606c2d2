//! The copy-before-write filter (QEMU: block/copy-before-write.c): before a
//! write, a zero write or a discard reaches the source (`file`), the
//! clusters it touches are copied to the `target` if they are not there
//! yet, so the target keeps the disk as it was when the filter went in.
//! A backup job puts one over its source; `blockdev-add` makes one for
//! image fleecing, read through a `snapshot-access` node
//! ([`super::snapshot_access`]) with the snapshot API below.
//!
//! Safety rule of the snapshot API: a snapshot read of the source freezes
//! its range, and a guest write waits for the frozen reads of its clusters
//! after their old data is in the target; a read that starts later finds
//! the clusters done and reads the target. So a reader never sees a
//! guest write.

use super::copy::BlockCopy;
use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use strata_block::driver::{Child, ChildCell, ChildRole, Driver, Limits, Perm};
use strata_block::{
    BlockStatus, DirtyBitmap, DirtyBitmaps, Error, IoBuf, Node, Result, WriteFlags,
};
use tokio::sync::Notify;

/// What a failed copy breaks (QEMU: OnCbwError).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnCbwError {
    /// The guest's write fails; the point in time holds.
    BreakGuestWrite,
    /// The guest's write goes on; every snapshot read fails from then on.
    BreakSnapshot,
}

/// The state the snapshot API shares with guest writes (QEMU: what
/// `s->lock` protects).
#[derive(Default)]
struct SnapshotState {
    /// Snapshot reads of the source in flight: (id, start, end).
    frozen: Vec<(u64, u64, u64)>,
    next_id: u64,
    /// The first copy failure under `break-snapshot` (an errno).
    error: Option<i32>,
}

pub(crate) struct CopyBeforeWrite {
    pub(crate) source: ChildCell,
    target: ChildCell,
    /// The copy state, until a job lets go of it.
    pub(crate) copy: Mutex<Option<Arc<BlockCopy>>>,
    /// What the filter's own copies put in the target (QEMU: done_bitmap).
    done: Arc<DirtyBitmap>,
    /// What a snapshot reader may read (QEMU: access_bitmap).
    access: Arc<DirtyBitmap>,
    cluster: u64,
    on_error: OnCbwError,
    timeout: Option<Duration>,
    /// The job's copies discard the source (`discard-source`), so the
    /// filter writes it.
    discard_source: bool,
    state: Mutex<SnapshotState>,
    thawed: Notify,
    /// The job is done: the filter takes nothing on its children, so it
    /// can leave the graph (QEMU detaches it in the same step).
    pub(crate) stopped: AtomicBool,
}

/// Where a snapshot read of a range goes (QEMU: cbw_snapshot_read_lock).
/// Dropped, it thaws its range, so a reader that gives up half way (an
/// NBD client gone) never leaves a guest write waiting.
struct SnapshotRead<'a> {
    cbw: &'a CopyBeforeWrite,
    node: Arc<Node>,
    len: u64,
    /// The frozen range to thaw afterwards (reads of the source).
    frozen: Option<u64>,
}

impl Drop for SnapshotRead<'_> {
    /// QEMU: cbw_snapshot_read_unlock.
    fn drop(&mut self) {
        if let Some(id) = self.frozen {
            self.cbw.lock_state().frozen.retain(|&(i, _, _)| i != id);
            self.cbw.thawed.notify_waiters();
        }
    }
}

impl CopyBeforeWrite {
    /// A filter copying from `source` to `target` with `copy`; a snapshot
    /// reader may read what the copy starts with (QEMU: cbw_open).
    pub(crate) fn new(
        source: Arc<Node>,
        target: Arc<Node>,
        copy: Arc<BlockCopy>,
        on_error: OnCbwError,
        timeout: Option<Duration>,
    ) -> Result<CopyBeforeWrite> {
        let (cluster, len) = (copy.cluster_size(), source.length());
        let anon = DirtyBitmaps::default();
        let done = anon.create(None, cluster, len)?;
        let access = anon.create(None, cluster, len)?;
        for b in [&done, &access] {
            b.set_enabled(false);
        }
        for (off, n) in copy.dirty().dirty_ranges() {
            access.set(off, n);
        }
        let discard_source = copy.discards_source();
        Ok(CopyBeforeWrite {
            source: ChildCell::new(source),
            target: ChildCell::new(target),
            copy: Mutex::new(Some(copy)),
            done,
            access,
            cluster,
            on_error,
            timeout,
            discard_source,
            state: Mutex::new(SnapshotState::default()),
            thawed: Notify::new(),
            stopped: AtomicBool::new(false),
        })
    }

    /// The filter's bitmaps join its node, as QEMU's cbw_open makes them
    /// there: the copy state's, what was copied, what may be read.
    pub(crate) fn adopt_bitmaps(&self, bitmaps: &DirtyBitmaps) {
        if let Some(c) = self.copy() {
            bitmaps.adopt(c.dirty());
        }
        bitmaps.adopt(&self.done);
        bitmaps.adopt(&self.access);
    }

    fn copy(&self) -> Option<Arc<BlockCopy>> {
        self.copy.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, SnapshotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Copies what `[offset, offset + len)` holds now, before it changes,
    /// then waits for the snapshot reads of the source there (QEMU:
    /// cbw_do_copy_before_write).
    async fn before_write(&self, offset: u64, len: u64) -> Result<()> {
        let Some(c) = self.copy() else {
            return Ok(());
        };
        if self.lock_state().error.is_some() {
            return Ok(());
        }
        let start = offset / self.cluster * self.cluster;
        let end = (offset + len).next_multiple_of(self.cluster);
        let copied = self.copy_in_time(&c, start, end - start).await;
        if let Err(e) = &copied {
            if self.on_error == OnCbwError::BreakGuestWrite {
                return Err(e.clone());
            }
        }
        loop {
            let thawed = self.thawed.notified();
            tokio::pin!(thawed);
            thawed.as_mut().enable();
            {
                let mut st = self.lock_state();
                match &copied {
                    Ok(()) => self.done.set(start, end - start),
                    Err(e) => {
                        st.error.get_or_insert(e.code());
                    }
                }
                if !st.frozen.iter().any(|&(_, s, e)| s < end && start < e) {
                    return Ok(());
                }
            }
            thawed.await;
        }
    }

    /// The copy, bounded by `cbw-timeout` when one is set. A copy that
    /// runs out of time goes on by itself: its claim must end, whoever
    /// waits for it (QEMU: block_copy with a timeout).
    async fn copy_in_time(&self, c: &Arc<BlockCopy>, start: u64, len: u64) -> Result<()> {
        let Some(limit) = self.timeout else {
            return c.copy(start, len).await.map_err(|e| e.error);
        };
        let c = Arc::clone(c);
        let task = tokio::spawn(async move { c.copy(start, len).await.map_err(|e| e.error) });
        match tokio::time::timeout(limit, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::errno(libc::EIO)),
            Err(_) => Err(Error::errno(libc::ETIMEDOUT)),
        }
    }

    /// Where a snapshot read at `offset` goes, and for how long; None when
    /// the range may not be read (QEMU: cbw_snapshot_read_lock).
    fn snapshot_read_lock(&self, offset: u64, len: u64) -> Option<SnapshotRead<'_>> {
        let mut st = self.lock_state();
        if st.error.is_some() || self.access.next_clean(offset, offset + len).is_some() {
            return None;
        }
        let done = self.done.get(offset);
        let run_end = match done {
            true => self.done.next_clean(offset, offset + len),
            false => self
                .done
                .next_dirty_area(offset, offset + len, u64::MAX)
                .map(|(s, _)| s),
        };
        let len = run_end.unwrap_or(offset + len) - offset;
        if done {
            return Some(SnapshotRead {
                cbw: self,
                node: self.target.get(),
                len,
                frozen: None,
            });
        }
        let id = st.next_id;
        st.next_id += 1;
        st.frozen.push((id, offset, offset + len));
        Some(SnapshotRead {
            cbw: self,
            node: self.source.get(),
            len,
            frozen: Some(id),
        })
    }

    /// Reads the disk as it was when the filter went in (QEMU:
    /// cbw_co_preadv_snapshot).
    pub(crate) async fn read_snapshot(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let total = buf.len() as u64;
        let mut done = 0;
        while done < total {
            let at = offset + done;
            let r = self
                .snapshot_read_lock(at, total - done)
                .ok_or_else(|| Error::errno(libc::EACCES))?;
            let n = r.len;
            let part = r.node.read(at, IoBuf::zeroed(n as usize)).await;
            drop(r);
            let part = part?;
            buf.as_mut_slice()[done as usize..(done + n) as usize].copy_from_slice(part.as_slice());
            done += n;
        }
        Ok(buf)
    }

    /// What the snapshot holds at `offset` (QEMU:
    /// cbw_co_snapshot_block_status): the target's answer where the data
    /// was copied, the source's elsewhere.
    pub(crate) async fn snapshot_block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let r = self
            .snapshot_read_lock(offset, len)
            .ok_or_else(|| Error::errno(libc::EACCES))?;
        let st = r.node.block_status(offset, r.len).await;
        let copied = r.frozen.is_none();
        drop(r);
        let mut st = st?;
        if copied {
            // Copied data is this snapshot's own, whatever the target's
            // backing file holds.
            st.allocated = true;
        }
        Ok(st)
    }

    /// The snapshot reader is done with whole clusters of the range: they
    /// are no longer copied and their copies go (QEMU:
    /// cbw_co_pdiscard_snapshot).
    pub(crate) async fn discard_snapshot(&self, offset: u64, len: u64) -> Result<()> {
        let start = offset.next_multiple_of(self.cluster);
        let end = (offset + len) / self.cluster * self.cluster;
        if end <= start {
            return Ok(());
        }
        {
            let _st = self.lock_state();
            self.access.reset(start, end - start);
        }
        if let Some(c) = self.copy() {
            c.reset(start, end - start);
        }
        self.target.get().discard(start, end - start).await
    }
}

#[async_trait]
impl Driver for CopyBeforeWrite {
    fn reopen_supported(&self) -> bool {
        false
    }

    fn format_name(&self) -> &'static str {
        "copy-before-write"
    }

    fn length(&self) -> u64 {
        self.source.get().length()
    }

    fn children(&self) -> Vec<Child> {
        vec![
            Child::new(ChildRole::File, &self.source.get()),
            Child::new(ChildRole::Target, &self.target.get()),
        ]
    }

    fn child_cell(&self, role: ChildRole) -> Option<&ChildCell> {
        match role {
            ChildRole::File => Some(&self.source),
            ChildRole::Target => Some(&self.target),
            _ => None,
        }
    }

    fn child_perm(&self, node: &Node, role: ChildRole, perm: Perm, shared: Perm) -> (Perm, Perm) {
        // A stopped filter takes nothing, so it can leave the graph.
        if self.stopped.load(Ordering::Acquire) {
            return (Perm::NONE, Perm::ALL);
        }
        if role == ChildRole::Target {
            // Copies write the target; its size was checked once.
            return (Perm::WRITE, Perm::ALL.without(Perm::RESIZE));
        }
        // Used, the filter reads the source for its copies, and no one
        // else may write to it or resize it behind the filter's back.
        if node.parents().is_empty() && node.backend_count() == 0 {
            return (perm, shared);
        }
        let perm = match self.discard_source {
            true => perm.with(Perm::CONSISTENT_READ).with(Perm::WRITE),
            false => perm.with(Perm::CONSISTENT_READ),
        };
        (perm, shared.without(Perm::WRITE).without(Perm::RESIZE))
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

    async fn load_bitmaps(&self, bitmaps: &Arc<DirtyBitmaps>) -> Result<()> {
        self.adopt_bitmaps(bitmaps);
        Ok(())
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
        let r = self.source.get().close().await;
        let t = self.target.get().close().await;
        r.and(t)
    }
}
