//! Copying clusters from a source to a target once each (QEMU:
//! block/block-copy.c): what a backup job and its copy-before-write filter
//! share. A bitmap says which clusters still hold the point in time only in
//! the source; whoever copies a cluster first claims it, so a guest write
//! waits for a copy of its clusters in flight and never reaches the source
//! before the old data is in the target.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use strata_block::{DirtyBitmap, Error, IoBuf, Node, WriteFlags};
use tokio::sync::Notify;

/// The smallest cluster a copy works in (QEMU:
/// BLOCK_COPY_CLUSTER_SIZE_DEFAULT).
pub(crate) const DEFAULT_CLUSTER: u64 = 64 << 10;

/// The most one copy reads at once (QEMU: BLOCK_COPY_MAX_BUFFER).
const MAX_BUFFER: u64 = 1 << 20;

/// Told how many bytes a copy moved.
type Progress = Box<dyn Fn(u64) + Send + Sync>;

/// How copies write (QEMU: block_copy_set_copy_opts and
/// block_copy_state_new's discard_source).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CopyOpts {
    /// Clusters go to the target compressed, whole.
    pub(crate) compress: bool,
    /// A copied run is discarded from the source afterwards.
    pub(crate) discard_source: bool,
}

/// A failed copy, and whether reading the source failed (else writing the
/// target).
pub(crate) struct CopyError {
    pub(crate) error: Error,
    pub(crate) is_read: bool,
}

/// The copy state (QEMU: BlockCopyState).
pub(crate) struct BlockCopy {
    source: Arc<Node>,
    /// The target, written through the filter's `target` edge.
    target: Arc<Node>,
    cluster: u64,
    len: u64,
    /// Clusters not yet in the target: an anonymous, disabled bitmap of
    /// the filter, as QEMU keeps it (query-named-block-nodes shows it).
    dirty: Arc<DirtyBitmap>,
    /// Ranges being copied now.
    claims: Mutex<Vec<(u64, u64)>>,
    released: Notify,
    /// Sync `top` while the job looks for what the top image holds: a
    /// cluster it does not is dropped rather than copied.
    skip_unallocated: AtomicBool,
    opts: CopyOpts,
    /// Told how many bytes each copy moved (the job's progress).
    progress: Mutex<Option<Progress>>,
}

impl BlockCopy {
    /// Copy state from `source` to `target` (QEMU: block_copy_state_new):
    /// everything is to be copied.
    pub(crate) fn new(
        source: &Arc<Node>,
        target: Arc<Node>,
        cluster: u64,
        opts: CopyOpts,
    ) -> Result<Arc<BlockCopy>, String> {
        let len = source.length();
        // Made before the filter it belongs to (see `adopt_bitmap`).
        let dirty = strata_block::DirtyBitmaps::default()
            .create(None, cluster, len)
            .map_err(|e| e.to_string())?;
        dirty.set_enabled(false);
        dirty.set(0, len);
        Ok(Arc::new(BlockCopy {
            source: Arc::clone(source),
            target,
            cluster,
            len,
            dirty,
            claims: Mutex::new(Vec::new()),
            released: Notify::new(),
            skip_unallocated: AtomicBool::new(false),
            opts,
            progress: Mutex::new(None),
        }))
    }

    pub(crate) fn discards_source(&self) -> bool {
        self.opts.discard_source
    }

    pub(crate) fn cluster_size(&self) -> u64 {
        self.cluster
    }

    /// The bitmap of what is left to copy.
    pub(crate) fn target(&self) -> &Arc<Node> {
        &self.target
    }

    pub(crate) fn dirty(&self) -> &Arc<DirtyBitmap> {
        &self.dirty
    }

    pub(crate) fn set_progress(&self, f: Progress) {
        *self.lock_progress() = Some(f);
    }

    fn lock_progress(&self) -> std::sync::MutexGuard<'_, Option<Progress>> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_skip_unallocated(&self, on: bool) {
        self.skip_unallocated.store(on, Ordering::Release);
    }

    /// Starts from the clusters `bitmap` marks instead of all of them
    /// (QEMU: block_copy_state_new with a bitmap).
    pub(crate) fn start_from(&self, bitmap: &DirtyBitmap) {
        self.dirty.clear();
        for (off, len) in bitmap.dirty_ranges() {
            self.dirty.set(off, len);
        }
    }

    /// Drops clusters from the copy: no one will read them from the target
    /// (QEMU: block_copy_reset).
    pub(crate) fn reset(&self, offset: u64, len: u64) {
        let _claims = self.lock_claims();
        self.dirty.reset(offset, len);
    }

    fn lock_claims(&self) -> std::sync::MutexGuard<'_, Vec<(u64, u64)>> {
        self.claims.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims the first run of dirty clusters in `[offset, end)` that no
    /// one copies now, up to `max` bytes, and takes it out of the bitmap;
    /// or says where a copy in flight must be waited for.
    fn claim(&self, offset: u64, end: u64, max: u64) -> Claim {
        let mut claims = self.lock_claims();
        let Some((start, len)) = self.dirty.next_dirty_area(offset, end, max) else {
            // Nothing left to copy here, but a copy in flight may still be
            // putting the old data in place: the caller waits for it.
            return match claims.iter().any(|&(s, e)| s < end && offset < e) {
                true => Claim::Wait,
                false => Claim::Done,
            };
        };
        // A run stops at the first cluster someone else copies.
        let mut stop = start + len;
        for &(s, e) in claims.iter() {
            if s <= start && start < e {
                return Claim::Wait;
            }
            if start < s && s < stop {
                stop = s;
            }
        }
        self.dirty.reset(start, stop - start);
        claims.push((start, stop));
        Claim::Got(start, stop)
    }

    fn release(&self, start: u64, end: u64, failed: bool) {
        let mut claims = self.lock_claims();
        if failed {
            // Still to be copied by whoever comes next.
            self.dirty.set(start, end - start);
        }
        claims.retain(|&c| c != (start, end));
        drop(claims);
        self.released.notify_waiters();
    }

    /// Copies every cluster of `[offset, offset + len)` not yet in the
    /// target, waiting for copies in flight there (QEMU: block_copy).
    pub(crate) async fn copy(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        let start = offset / self.cluster * self.cluster;
        let end = (offset + len).next_multiple_of(self.cluster);
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            // At least one whole cluster, whatever the target's size.
            match self.claim(start, end, MAX_BUFFER.max(self.cluster)) {
                Claim::Done => return Ok(()),
                Claim::Wait => released.await,
                Claim::Got(s, e) => {
                    let mut claimed = Claimed {
                        copy: self,
                        start: s,
                        end: e,
                        copied: false,
                    };
                    let e = self.shrink_to_first_run(&mut claimed).await;
                    let r = self.copy_claimed(s, e).await;
                    if r.is_ok() && self.opts.discard_source {
                        // Still claimed, so a guest write there waits and
                        // cannot be discarded (QEMU discards after the
                        // claim ends). A failed discard only keeps space.
                        let _ = self.source.discard(s, e.min(self.len) - s).await;
                    }
                    claimed.copied = r.is_ok();
                    drop(claimed);
                    r?;
                }
            }
        }
    }

    /// Gives back the part of a claim past its first run of data or of
    /// zeroes (QEMU: block_copy_task_shrink), so a guest write there need
    /// not wait for a slow read before it: others may claim it at once.
    /// Returns where the claim ends now.
    async fn shrink_to_first_run(&self, claimed: &mut Claimed<'_>) -> u64 {
        let (start, end) = (claimed.start, claimed.end);
        if self.opts.compress || self.skip_unallocated.load(Ordering::Acquire) {
            return end;
        }
        // Errors are the copy's to report; it asks again.
        let Ok((st, _)) = self
            .source
            .block_status_above(None, start, end - start)
            .await
        else {
            return end;
        };
        let stop = (start + st.len).next_multiple_of(self.cluster);
        if stop >= end.min(self.len) {
            return end;
        }
        let mut claims = self.lock_claims();
        if let Some(c) = claims.iter_mut().find(|c| **c == (start, end)) {
            c.1 = stop;
        }
        self.dirty.set(stop, end - stop);
        claimed.end = stop;
        drop(claims);
        self.released.notify_waiters();
        stop
    }

    /// Copies one claimed run: data as data, zeroes as zeroes (QEMU:
    /// block_copy_task_entry); while sync `top` looks for what the top
    /// image holds, clusters it does not hold are left out.
    async fn copy_claimed(&self, start: u64, end: u64) -> Result<(), CopyError> {
        let end = end.min(self.len);
        let mut at = start;
        while at < end {
            let next = (at + self.cluster).min(end);
            if self.skip_unallocated.load(Ordering::Acquire) {
                let st = self
                    .source
                    .block_status(at, next - at)
                    .await
                    .map_err(|error| CopyError {
                        error,
                        is_read: true,
                    })?;
                if !st.allocated && st.len >= next - at {
                    at = next;
                    continue;
                }
                self.copy_range(at, next).await?;
                at = next;
            } else {
                self.copy_range(at, end).await?;
                at = end;
            }
        }
        Ok(())
    }

    async fn copy_range(&self, start: u64, end: u64) -> Result<(), CopyError> {
        let read_err = |error| CopyError {
            error,
            is_read: true,
        };
        let write_err = |error| CopyError {
            error,
            is_read: false,
        };
        let mut at = start;
        while at < end {
            let n = end - at;
            // Compressed clusters are written whole, whatever they hold.
            let (run, zero) = if self.opts.compress {
                (n, false)
            } else {
                let (st, _) = self
                    .source
                    .block_status_above(None, at, n)
                    .await
                    .map_err(read_err)?;
                (st.len.clamp(1, n), st.zero)
            };
            if zero {
                self.target
                    .write_zeroes(at, run, WriteFlags::default())
                    .await
                    .map_err(write_err)?;
            } else {
                let buf = self
                    .source
                    .read(at, IoBuf::zeroed(run as usize))
                    .await
                    .map_err(read_err)?;
                let w = if self.opts.compress {
                    self.target.write_compressed(at, buf).await
                } else {
                    self.target.write(at, buf, WriteFlags::default()).await
                };
                w.map_err(write_err)?;
            }
            if let Some(p) = self.lock_progress().as_ref() {
                p(run);
            }
            at += run;
        }
        Ok(())
    }

    /// Drops from the copy whatever the source's top image does not hold
    /// in the run at `offset`; returns how far it looked (QEMU:
    /// block_copy_reset_unallocated).
    pub(crate) async fn reset_unallocated(&self, offset: u64) -> strata_block::Result<u64> {
        let st = self.source.block_status(offset, self.len - offset).await?;
        let run = st.len.max(1).min(self.len - offset);
        if !st.allocated {
            let from = offset.next_multiple_of(self.cluster);
            let to = (offset + run).min(self.len);
            let to = if to == self.len {
                to.next_multiple_of(self.cluster)
            } else {
                to / self.cluster * self.cluster
            };
            if to > from {
                self.dirty.reset(from, to - from);
            }
        }
        Ok(run)
    }
}

enum Claim {
    Done,
    Wait,
    Got(u64, u64),
}

/// A claimed run being copied. Dropped, the claim goes, and the run is
/// still to copy unless the copy went through: a copy whose caller gives
/// up half way never leaves others waiting for its clusters.
struct Claimed<'a> {
    copy: &'a BlockCopy,
    start: u64,
    end: u64,
    copied: bool,
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        self.copy.release(self.start, self.end, !self.copied);
    }
}
