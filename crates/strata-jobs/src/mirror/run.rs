//! The mirror job's work (QEMU: mirror_run and mirror_dirty_init): mark
//! what the target lacks, copy it while the guest writes, report READY
//! once in sync, and end, drained, when completed or cancelled.

use super::ops::{Method, Ops, BACKGROUND, MAX_IN_FLIGHT};
use super::MirrorState;
use crate::job::{ErrorAction, Job, JobError};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_block::driver::Preallocation;
use strata_block::{drain_begin, Node};

/// How long the job works between stops when nothing limits it (QEMU:
/// BLOCK_JOB_SLICE_TIME).
const SLICE: Duration = Duration::from_millis(100);

pub(super) async fn mirror_run(s: &MirrorState, job: &Arc<Job>) -> Result<(), JobError> {
    let r = run_inner(s, job).await;
    // Whatever went wrong, nothing of the job stays in flight.
    if let Some(ops) = s.ops() {
        ops.wait_for_all_io().await;
    }
    let drained = super::lock(&s.drain).is_some();
    if !drained {
        let guard = drain_begin(std::slice::from_ref(&s.top)).await;
        *super::lock(&s.drain) = Some(guard);
    }
    r
}

/// Flushes the target (QEMU: mirror_flush), by node: the job's own handle
/// may wait at a drained section's gate.
async fn flush_target(ops: &Ops, job: &Arc<Job>) -> bool {
    match ops.target.node().flush().await {
        Ok(()) => true,
        Err(e) => {
            ops.actively_synced.store(false, Ordering::Release);
            let on = ops.on_target_error();
            if job.error_action(on, false, e.code()) == ErrorAction::Report {
                ops.set_ret(JobError::from(e));
            }
            false
        }
    }
}

async fn run_inner(s: &MirrorState, job: &Arc<Job>) -> Result<(), JobError> {
    let Some(ops) = s.ops() else {
        return Ok(());
    };
    let Some(bs) = s.top.backing() else {
        return Err(JobError::errno(libc::EIO));
    };
    if job.is_cancelled() {
        return Ok(());
    }
    let len = ops.len;
    let target_len = ops.target.length();
    if s.base
        .as_ref()
        .is_some_and(|b| Arc::ptr_eq(b, &s.target_node))
    {
        // An active commit grows the base to the top's size.
        if len > target_len {
            ops.target.truncate(len, false, Preallocation::Off).await?;
        }
    } else if len != target_len {
        return Err(JobError {
            errno: libc::EINVAL,
            msg: Some("Source and target image have different sizes".into()),
        });
    }
    if len == 0 {
        job.transition_to_ready();
        ops.actively_synced.store(true, Ordering::Release);
        while !job.cancel_requested() && !s.should_complete.load(Ordering::Acquire) {
            job.wait_entered().await;
        }
        return Ok(());
    }
    let mut last_pause = Instant::now();
    if !s.none_mode {
        dirty_init(s, &ops, job, &bs, &mut last_pause).await?;
        if job.is_cancelled() {
            return Ok(());
        }
    }
    loop {
        if let Some(e) = ops.ret() {
            return Err(e);
        }
        job.pause_point().await;
        if job.is_cancelled() {
            return Ok(());
        }
        let mut cnt = ops.dirty_count();
        job.progress_set_remaining(ops.remaining());
        // Even unlimited, the job stops every slice with nothing in
        // flight, so that a drain or a pause finds it idle.
        if last_pause.elapsed() < SLICE && job.iostatus_ok() {
            let in_flight = ops.in_flight();
            if in_flight >= MAX_IN_FLIGHT
                || ops.free_buffer_granules() == 0
                || (cnt == 0 && in_flight > 0)
            {
                ops.wait_for_slot().await;
                continue;
            } else if cnt != 0 {
                ops.iteration(job, &bs).await;
            }
        }
        let mut should_complete = false;
        if ops.in_flight() == 0 && cnt == 0 {
            if !job.status().is_ready() {
                if !flush_target(&ops, job).await {
                    continue;
                }
                // From here on a cancel ends the job with a consistent target.
                job.transition_to_ready();
            }
            if ops.copy_mode.load(Ordering::Acquire) != BACKGROUND {
                ops.actively_synced.store(true, Ordering::Release);
            }
            should_complete = s.should_complete.load(Ordering::Acquire) || job.cancel_requested();
            cnt = ops.dirty_count();
        }
        if cnt == 0 && should_complete {
            // No guest write may come between this check and the switch:
            // the filter, which every user of the source goes through, stays
            // drained until the job has changed the graph. Only it: a target
            // that shares nodes with the source must still take the flush.
            let guard = drain_begin(std::slice::from_ref(&s.top)).await;
            if ops.dirty_count() > 0 || !flush_target(&ops, job).await {
                drop(guard);
                continue;
            }
            *super::lock(&s.drain) = Some(guard);
            return Ok(());
        }
        if job.status().is_ready() && !should_complete {
            if ops.in_flight() == 0 && cnt == 0 {
                job.sleep(SLICE).await;
            }
        } else {
            job.ratelimit_sleep().await;
        }
        last_pause = Instant::now();
    }
}

/// Stops at a pause point, and once a slice at a sleep (QEMU: mirror_throttle).
async fn throttle(job: &Arc<Job>, last_pause: &mut Instant) {
    if last_pause.elapsed() > SLICE {
        *last_pause = Instant::now();
        job.sleep(Duration::ZERO).await;
    } else {
        job.pause_point().await;
    }
}

/// Marks what the target lacks (QEMU: mirror_dirty_init): everything when
/// the target must be zeroed and cannot be by unmapping, else what is
/// allocated above the base, after zeroing the target if asked.
async fn dirty_init(
    s: &MirrorState,
    ops: &Arc<Ops>,
    job: &Arc<Job>,
    bs: &Arc<Node>,
    last_pause: &mut Instant,
) -> Result<(), JobError> {
    let len = ops.len;
    let step = (i32::MAX as u64) / s.granularity * s.granularity;
    if s.zero_target {
        if !ops.target.node().can_write_zeroes_with_unmap() {
            ops.mark_dirty(0, len);
            return Ok(());
        }
        ops.set_initial_zeroing(true);
        let mut offset = 0;
        while offset < len {
            let bytes = (len - offset).min(step);
            throttle(job, last_pause).await;
            if job.is_cancelled() {
                ops.set_initial_zeroing(false);
                return Ok(());
            }
            if ops.in_flight() >= MAX_IN_FLIGHT {
                ops.wait_for_slot().await;
                continue;
            }
            ops.perform(offset, bytes, Method::Zero, None).await;
            offset += bytes;
        }
        ops.wait_for_all_io().await;
        ops.set_initial_zeroing(false);
    }
    let mut offset = 0;
    while offset < len {
        let bytes = (len - offset).min(step);
        throttle(job, last_pause).await;
        if job.is_cancelled() {
            return Ok(());
        }
        let (st, _) = bs
            .block_status_above(s.base.as_ref(), offset, bytes)
            .await?;
        if st.allocated {
            ops.mark_dirty(offset, st.len);
        }
        offset += st.len.max(1);
    }
    Ok(())
}
