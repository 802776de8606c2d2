//! What a mirror job has in flight (QEMU: MirrorOp, the in-flight bitmap
//! and the active-write path of block/mirror.c): the dirty bitmap of what
//! the target still lacks, the ranges that copies and guest writes claim,
//! the background copies, and the guest writes that a write-blocking
//! mirror sends to the target before they complete.
//!
//! Ordering rule: two operations on the same granule never overlap. A
//! background copy claims granules that no one has claimed; a guest write
//! waits until nothing overlapping is claimed and then claims its range.
//! So data read from the source reaches the target in the order it was
//! read, and a stale copy can never land after a fresher one. Claims are
//! taken only when nothing is in the way, so waits cannot form a cycle.

use crate::job::{ErrorAction, Job, JobError, OnError};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use strata_block::{Backend, HBitmap, IoBuf, Node, WriteFlags};
use tokio::sync::Notify;

/// At most this many background copies in flight (QEMU: MAX_IN_FLIGHT).
pub(crate) const MAX_IN_FLIGHT: usize = 16;
/// The largest single copy by default (QEMU: MAX_IO_BYTES).
pub(crate) const MAX_IO_BYTES: u64 = 1 << 20;

/// How a range reaches the target (QEMU: MirrorMethod).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Method {
    Copy,
    Zero,
    Discard,
}

/// The copy modes (QEMU: MirrorCopyMode).
pub(crate) const BACKGROUND: u8 = 0;
pub(crate) const WRITE_BLOCKING: u8 = 1;

pub(crate) fn copy_mode_name(m: u8) -> &'static str {
    if m == WRITE_BLOCKING {
        "write-blocking"
    } else {
        "background"
    }
}

/// A claimed range of granules `[start, end)`.
struct Claim {
    id: u64,
    start: u64,
    end: u64,
}

struct State {
    dirty: HBitmap,
    claims: Vec<Claim>,
    next_id: u64,
    /// Where the search for dirty granules goes on (QEMU: the dirty iterator).
    cursor: u64,
    /// Background copies in flight and their bytes (QEMU: in_flight,
    /// bytes_in_flight).
    in_flight: usize,
    bytes_in_flight: u64,
    /// Free granules of the copy buffer (QEMU: buf_free_count).
    buf_free: u64,
    /// Guest writes being copied and their bytes (QEMU:
    /// in_active_write_counter, active_write_bytes_in_flight).
    active_writes: usize,
    active_bytes: u64,
    /// Copies that ended, to wake whoever waits for a free slot.
    ended: u64,
    /// The first error the job reports (QEMU: s->ret).
    ret: Option<JobError>,
    /// The target is being zeroed: that is not progress.
    initial_zeroing: bool,
}

/// A mirror job's copy state, shared by the job and its mirror_top node.
pub(crate) struct Ops {
    pub(crate) granularity: u64,
    pub(crate) buf_size: u64,
    /// The source's length when the job started.
    pub(crate) len: u64,
    pub(crate) target: Arc<Backend>,
    /// The job's mirror_top node, whose child is the source.
    top: Weak<Node>,
    pub(crate) unmap: bool,
    /// Copies round to the target's clusters: it has a backing file name
    /// but no backing file open, so a partial cluster would lose the rest.
    pub(crate) cow_cluster: Option<u64>,
    pub(crate) copy_mode: AtomicU8,
    pub(crate) actively_synced: AtomicBool,
    on_source_error: OnError,
    on_target_error: OnError,
    job: Weak<Job>,
    st: Mutex<State>,
    changed: Notify,
}

pub(crate) struct OpsConfig {
    pub(crate) granularity: u64,
    pub(crate) buf_size: u64,
    pub(crate) len: u64,
    pub(crate) target: Arc<Backend>,
    pub(crate) top: Weak<Node>,
    pub(crate) unmap: bool,
    pub(crate) cow_cluster: Option<u64>,
    pub(crate) copy_mode: u8,
    pub(crate) on_source_error: OnError,
    pub(crate) on_target_error: OnError,
}

impl Ops {
    pub(crate) fn new(c: OpsConfig, job: &Arc<Job>) -> Arc<Ops> {
        Arc::new(Ops {
            granularity: c.granularity,
            buf_size: c.buf_size,
            len: c.len,
            target: c.target,
            top: c.top,
            unmap: c.unmap,
            cow_cluster: c.cow_cluster,
            copy_mode: AtomicU8::new(c.copy_mode),
            actively_synced: AtomicBool::new(false),
            on_source_error: c.on_source_error,
            on_target_error: c.on_target_error,
            job: Arc::downgrade(job),
            st: Mutex::new(State {
                dirty: HBitmap::new(c.len, c.granularity),
                claims: Vec::new(),
                next_id: 0,
                cursor: 0,
                in_flight: 0,
                bytes_in_flight: 0,
                buf_free: c.buf_size / c.granularity,
                active_writes: 0,
                active_bytes: 0,
                ended: 0,
                ret: None,
                initial_zeroing: false,
            }),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn job(&self) -> Option<Arc<Job>> {
        self.job.upgrade()
    }

    fn granules(&self, offset: u64, len: u64) -> (u64, u64) {
        let g = self.granularity;
        (offset / g, (offset + len).div_ceil(g))
    }

    pub(crate) fn mark_dirty(&self, offset: u64, len: u64) {
        self.actively_synced.store(false, Ordering::Release);
        self.lock().dirty.set(offset, len);
    }

    pub(crate) fn on_target_error(&self) -> OnError {
        self.on_target_error
    }

    pub(crate) fn dirty_count(&self) -> u64 {
        self.lock().dirty.count()
    }

    pub(crate) fn ret(&self) -> Option<JobError> {
        self.lock().ret.clone()
    }

    pub(crate) fn set_ret(&self, e: JobError) {
        self.lock().ret.get_or_insert(e);
    }

    pub(crate) fn set_initial_zeroing(&self, on: bool) {
        self.lock().initial_zeroing = on;
    }

    /// Background copies in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// Bytes still to copy: dirty, in flight, or written by the guest and
    /// on their way (QEMU: the remaining work mirror_run reports).
    pub(crate) fn remaining(&self) -> u64 {
        let st = self.lock();
        st.dirty.count() + st.bytes_in_flight + st.active_bytes
    }

    pub(crate) fn free_buffer_granules(&self) -> u64 {
        self.lock().buf_free
    }

    /// The guest's writes go to the target too (QEMU: should_copy_to_target).
    pub(crate) fn should_copy_to_target(&self) -> bool {
        self.copy_mode.load(Ordering::Acquire) == WRITE_BLOCKING
            && self.lock().ret.is_none()
            && !self.job().is_some_and(|j| j.is_cancelled())
    }

    /// Answers an I/O error as the job's options say (QEMU: mirror_error_action).
    fn error_action(&self, is_read: bool, errno: i32) -> ErrorAction {
        self.actively_synced.store(false, Ordering::Release);
        let on = if is_read {
            self.on_source_error
        } else {
            self.on_target_error
        };
        match self.job() {
            Some(j) => j.error_action(on, is_read, errno),
            None => ErrorAction::Report,
        }
    }

    /// Records an error the job must fail with, if the options say so.
    fn fail(&self, is_read: bool, e: &strata_block::Error) {
        if self.error_action(is_read, e.code()) == ErrorAction::Report {
            self.set_ret(JobError::from(e.clone()));
        }
    }

    /// Waits until no claim but `except` overlaps `[start, end)`, or the
    /// job failed, then claims the range if `claim` (QEMU:
    /// mirror_wait_on_conflicts). Check and claim happen under one lock.
    async fn wait_clear(
        &self,
        start: u64,
        end: u64,
        except: Option<u64>,
        claim: bool,
    ) -> Option<u64> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut st = self.lock();
                let busy = st
                    .claims
                    .iter()
                    .any(|c| Some(c.id) != except && c.start < end && start < c.end);
                if !busy || st.ret.is_some() {
                    return claim.then(|| Self::claim_locked(&mut st, start, end));
                }
            }
            changed.await;
        }
    }

    fn claim_locked(st: &mut State, start: u64, end: u64) -> u64 {
        let id = st.next_id;
        st.next_id += 1;
        st.claims.push(Claim { id, start, end });
        id
    }

    fn release(&self, id: u64) {
        self.lock().claims.retain(|c| c.id != id);
        self.changed.notify_waiters();
    }

    /// Waits until a background copy ends (QEMU:
    /// mirror_wait_for_free_in_flight_slot).
    pub(crate) async fn wait_for_slot(&self) {
        let seen = self.lock().ended;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let st = self.lock();
                if st.ended != seen || st.in_flight == 0 {
                    return;
                }
            }
            changed.await;
        }
    }

    /// Waits until no background copy is in flight (QEMU: mirror_wait_for_all_io).
    pub(crate) async fn wait_for_all_io(&self) {
        while self.in_flight() > 0 {
            self.wait_for_slot().await;
        }
    }

    // ---- the guest's writes in write-blocking mode ----

    /// Claims a guest write's range once nothing overlapping is in flight
    /// (QEMU: active_write_prepare).
    pub(crate) async fn active_write_prepare(&self, offset: u64, len: u64) -> u64 {
        self.lock().active_writes += 1;
        let (start, end) = self.granules(offset, len);
        self.wait_clear(start, end, None, true)
            .await
            .unwrap_or(u64::MAX)
    }

    /// QEMU: active_write_settle.
    pub(crate) fn active_write_settle(&self, id: u64) {
        self.lock().active_writes -= 1;
        self.release(id);
    }

    /// Writes what the guest wrote to the source to the target as well;
    /// gives the guest's buffer back (QEMU: do_sync_target_write). Its
    /// errors are the job's, not the guest's.
    pub(crate) async fn sync_target_write(
        &self,
        method: Method,
        offset: u64,
        len: u64,
        buf: Option<IoBuf>,
        flags: WriteFlags,
    ) -> Option<IoBuf> {
        let g = self.granularity;
        let (mut off, mut end) = (offset, offset + len);
        {
            let mut st = self.lock();
            // An unaligned end in a dirty granule is left to the background
            // copy: its bit cannot be cleared while other bytes there are stale.
            if !off.is_multiple_of(g) && st.dirty.get(off) {
                off = off.next_multiple_of(g);
                if end <= off {
                    return buf;
                }
            }
            if !end.is_multiple_of(g) && st.dirty.get(end - 1) {
                let tail = end % g;
                if end - off <= tail {
                    return buf;
                }
                end -= tail;
            }
            let (a, b) = (off.next_multiple_of(g), end / g * g);
            if a < b {
                st.dirty.reset(a, b - a);
            }
            st.active_bytes += end - off;
        }
        let n = end - off;
        let job = self.job();
        if let Some(j) = &job {
            j.progress_increase_remaining(n);
        }
        let (r, buf) = match method {
            Method::Copy => {
                let buf = buf?;
                if off == offset && n == len {
                    match self.target.write(off, buf, flags).await {
                        Ok(b) => (Ok(()), Some(b)),
                        // The guest's buffer went with the failed write; its
                        // own write succeeded and gets one of its size back.
                        Err(e) => (Err(e), Some(IoBuf::zeroed(len as usize))),
                    }
                } else {
                    let skip = (off - offset) as usize;
                    let mut part = IoBuf::zeroed(n as usize);
                    part.as_mut_slice()
                        .copy_from_slice(&buf.as_slice()[skip..skip + n as usize]);
                    (
                        self.target.write(off, part, flags).await.map(|_| ()),
                        Some(buf),
                    )
                }
            }
            Method::Zero => (self.target.write_zeroes(off, n, flags).await, buf),
            Method::Discard => (self.target.discard(off, n).await, buf),
        };
        self.lock().active_bytes -= n;
        match r {
            Ok(()) => {
                if let Some(j) = &job {
                    j.progress_update(n);
                }
            }
            Err(e) => {
                let (a, b) = (off / g * g, end.next_multiple_of(g));
                self.mark_dirty(a, b - a);
                self.fail(false, &e);
            }
        }
        Some(buf.unwrap_or_else(|| IoBuf::zeroed(len as usize)))
    }

    // ---- the background copy ----

    /// The next dirty granule to copy, searching on from the last one and
    /// then from the start (QEMU: bdrv_dirty_iter_next and its reset).
    fn next_dirty(&self) -> Option<u64> {
        let mut st = self.lock();
        let at = st
            .dirty
            .next_dirty(st.cursor, self.len)
            .or_else(|| st.dirty.next_dirty(0, self.len))?;
        st.cursor = at;
        Some(at / self.granularity * self.granularity)
    }

    /// One step of the background copy (QEMU: mirror_iteration): the next
    /// dirty area, as long as the buffer allows and no one has claimed it,
    /// cleared in the bitmap and copied in pieces as the source's block
    /// status says (data copied, zeroes written, holes discarded).
    pub(crate) async fn iteration(self: &Arc<Self>, job: &Arc<Job>, source: &Arc<Node>) {
        let g = self.granularity;
        let Some(mut offset) = self.next_dirty() else {
            return;
        };
        let first = offset / g;
        self.wait_clear(first, first + 1, None, false).await;
        job.pause_point().await;
        let (mut nb, pseudo) = {
            let mut st = self.lock();
            // A guest write may have claimed it while the job was paused.
            if st.claims.iter().any(|c| c.start <= first && first < c.end) {
                return;
            }
            let mut nb = 1u64;
            while nb * g < self.buf_size {
                let next = offset + nb * g;
                let chunk = next / g;
                if next >= self.len
                    || !st.dirty.get(next)
                    || st.claims.iter().any(|c| c.start <= chunk && chunk < c.end)
                {
                    break;
                }
                nb += 1;
            }
            st.dirty.reset(offset, nb * g);
            st.cursor = offset + nb * g;
            // Guest writes that come meanwhile wait for the pieces below.
            let pseudo = Self::claim_locked(&mut st, first, first + nb);
            (nb, pseudo)
        };
        let write_zeroes_ok = self.target.node().can_write_zeroes_with_unmap();
        let max_io = (self.buf_size / MAX_IN_FLIGHT as u64).max(MAX_IO_BYTES);
        while nb > 0 && offset < self.len {
            let want = (nb * g).min(self.len.next_multiple_of(g) - offset);
            let status = source.block_status_above(None, offset, want).await;
            let mut method = Method::Copy;
            let mut io = match &status {
                Err(_) => (nb * g).min(max_io),
                Ok((st, _)) if st.data => st.len.min(max_io),
                Ok((st, _)) => st.len,
            };
            io -= io % g;
            if io < g {
                io = g;
            } else if let Ok((st, _)) = &status {
                if !st.data && self.target_aligned(offset, io) {
                    method = if st.zero {
                        Method::Zero
                    } else {
                        Method::Discard
                    };
                }
            }
            while self.in_flight() >= MAX_IN_FLIGHT {
                self.wait_for_slot().await;
            }
            if self.ret().is_some() {
                break;
            }
            let io = io.min(self.len - offset);
            let handled = self.perform(offset, io, method, Some(pseudo)).await;
            let acct = if method != Method::Copy && write_zeroes_ok {
                0
            } else {
                handled
            };
            offset += handled;
            nb = nb.saturating_sub(handled.div_ceil(g));
            job.ratelimit_processed(acct);
        }
        self.release(pseudo);
    }

    /// Whether `[offset, offset+len)` covers whole target clusters (QEMU:
    /// bdrv_round_to_subclusters leaves it as it is).
    fn target_aligned(&self, offset: u64, len: u64) -> bool {
        let d = self.target.node();
        let c = d
            .driver()
            .subcluster_size()
            .or_else(|| d.driver().cluster_size())
            .unwrap_or(1);
        let end = offset + len;
        offset.is_multiple_of(c) && (end.is_multiple_of(c) || end >= d.length())
    }

    /// Starts one copy of `[offset, offset+len)` as a task of its own and
    /// returns how many bytes from `offset` it covers (QEMU: mirror_perform).
    /// `pseudo` is the claim of the iteration that asks, which the copy may
    /// overlap.
    pub(crate) async fn perform(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        method: Method,
        pseudo: Option<u64>,
    ) -> u64 {
        let g = self.granularity;
        let (mut off, mut bytes, mut handled) = (offset, len, len);
        if method == Method::Copy {
            bytes = bytes.min(self.buf_size).min(g * 1024);
            handled = bytes;
            if let Some(c) = self.cow_cluster {
                let start = off / c * c;
                let mut end = (off + bytes).next_multiple_of(c).min(self.len);
                // Never more than the buffer holds (make_ops keeps it at
                // least one cluster).
                if end - start > self.buf_size {
                    end = start + (self.buf_size / c * c).max(c);
                }
                handled = end - off;
                off = start;
                bytes = end - start;
                // The widened ends may hold someone else's claim (a guest
                // write in write-blocking mode): wait for it, as for any
                // claim, but not for this iteration's own.
                let (s0, e0) = self.granules(off, bytes);
                self.wait_clear(s0, e0, pseudo, false).await;
            }
            let need = bytes.div_ceil(g);
            while self.free_buffer_granules() < need {
                self.wait_for_slot().await;
            }
        }
        let (start, end) = self.granules(off, bytes);
        {
            let mut st = self.lock();
            if method == Method::Copy {
                st.buf_free -= bytes.div_ceil(g);
            }
            st.in_flight += 1;
            st.bytes_in_flight += bytes;
        }
        let id = {
            let mut st = self.lock();
            Self::claim_locked(&mut st, start, end)
        };
        let ops = Arc::clone(self);
        tokio::spawn(async move {
            let r = ops.copy_one(method, off, bytes).await;
            ops.op_done(id, method, off, bytes, r);
        });
        handled
    }

    async fn copy_one(
        &self,
        method: Method,
        off: u64,
        bytes: u64,
    ) -> Result<(), (bool, strata_block::Error)> {
        let target = &self.target;
        match method {
            Method::Copy => {
                let source = self.source_node();
                let buf = match source {
                    Some(s) => s.read(off, IoBuf::zeroed(bytes as usize)).await,
                    None => Err(strata_block::Error::errno(libc::EIO)),
                }
                .map_err(|e| (true, e))?;
                target
                    .write(off, buf, WriteFlags::default())
                    .await
                    .map(|_| ())
                    .map_err(|e| (false, e))
            }
            Method::Zero => {
                let flags = WriteFlags {
                    may_unmap: self.unmap,
                    ..WriteFlags::default()
                };
                target
                    .write_zeroes(off, bytes, flags)
                    .await
                    .map_err(|e| (false, e))
            }
            Method::Discard => target.discard(off, bytes).await.map_err(|e| (false, e)),
        }
    }

    /// A copy ended (QEMU: mirror_iteration_done and its callers).
    fn op_done(
        &self,
        id: u64,
        method: Method,
        off: u64,
        bytes: u64,
        r: Result<(), (bool, strata_block::Error)>,
    ) {
        let progress = {
            let mut st = self.lock();
            if let Err((_, _)) = &r {
                st.dirty.set(off, bytes);
            }
            st.in_flight -= 1;
            st.bytes_in_flight -= bytes;
            if method == Method::Copy {
                st.buf_free += bytes.div_ceil(self.granularity);
            }
            st.ended += 1;
            st.claims.retain(|c| c.id != id);
            r.is_ok() && !st.initial_zeroing
        };
        if let Err((is_read, e)) = &r {
            self.fail(*is_read, e);
        }
        if progress {
            if let Some(j) = self.job() {
                j.progress_update(bytes);
            }
        }
        self.changed.notify_waiters();
    }

    /// The source: the mirror_top node's child now.
    pub(crate) fn source_node(&self) -> Option<Arc<Node>> {
        self.top.upgrade()?.backing()
    }
}
