//! The copy loop of stream and commit: the image walked in order, chunk by
//! chunk, with a few chunk copies in flight. QEMU copies one chunk at a
//! time; overlapping one chunk's read with the last one's write is where
//! most of the time goes (`scripts/bench-jobs`).
//!
//! Before the job stops at a pause point (a pause, a drain, the speed limit)
//! every copy in flight has ended, so the job is idle there as QEMU's is.

use crate::job::{Job, JobError};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use std::sync::Arc;
use strata_block::Error;

/// Chunk copies in flight at most: two overlap a read with a write; four
/// copied no faster and took a third of the guest's writes during a
/// commit (`scripts/bench-jobs`).
const DEPTH: usize = 2;

/// What a failed step does to the job, as its error policy decides.
pub enum Failed {
    /// The same chunk again (after the pause an error may have asked for).
    Retry,
    /// The chunk counted as done; the job ends with this error at the end.
    Skip(JobError),
    /// The job ends with this error once the copies in flight are done.
    Fail(JobError),
}

/// A copy that failed: whether on the read side, and why.
pub type CopyError = (bool, Error);

/// Walks `[0, len)` in chunks of at most `chunk` bytes. `plan(offset, want)`
/// says how many bytes from `offset` form the next piece and whether they
/// are copied; `copy(offset, n)` copies them; `failed(is_read, error)`
/// applies the job's error policy. Returns the first error kept.
pub async fn copy_chunks<'a>(
    job: &Arc<Job>,
    len: u64,
    chunk: u64,
    plan: impl Fn(u64, u64) -> BoxFuture<'a, strata_block::Result<(u64, bool)>>,
    copy: impl Fn(u64, u64) -> BoxFuture<'a, Result<(), CopyError>>,
    failed: impl Fn(bool, Error) -> Failed,
) -> Result<(), JobError> {
    let mut offset = 0;
    let mut again: Vec<(u64, u64)> = Vec::new();
    let mut flight = FuturesUnordered::new();
    let mut first_error: Option<JobError> = None;
    let mut stopping = false;
    // One copy at a time until one succeeds, at the start and after an
    // error: a failing image is not sent more work, and the job stops where
    // QEMU's stops.
    let mut depth = 1;
    loop {
        if flight.is_empty() {
            if stopping || (offset >= len && again.is_empty()) {
                break;
            }
            // Even without a speed limit the job stops here between
            // requests, so that a pause or a drain finds it idle.
            job.ratelimit_sleep().await;
            if job.is_cancelled() {
                break;
            }
        }
        while !stopping
            && flight.len() < depth
            && !job.should_pause()
            && !job.ratelimit_exceeded()
            && !job.is_cancelled()
        {
            let (at, n) = if let Some(piece) = again.pop() {
                piece
            } else if offset < len {
                let want = chunk.min(len - offset);
                match plan(offset, want).await {
                    // No progress would loop for ever.
                    Ok((0, _)) => {
                        first_error.get_or_insert(JobError::errno(libc::EIO));
                        stopping = true;
                        break;
                    }
                    Ok((n, false)) => {
                        job.progress_update(n);
                        offset += n;
                        continue;
                    }
                    Ok((n, true)) => {
                        offset += n;
                        (offset - n, n)
                    }
                    Err(e) => {
                        match failed(true, e) {
                            // The job may be pausing: look again after.
                            Failed::Retry => {}
                            Failed::Skip(e) => {
                                first_error.get_or_insert(e);
                                job.progress_update(want);
                                offset += want;
                            }
                            Failed::Fail(e) => {
                                first_error.get_or_insert(e);
                                stopping = true;
                            }
                        }
                        break;
                    }
                }
            } else {
                break;
            };
            // Counted when sent, so that a speed limit lets one chunk go
            // at a time, as QEMU's loop does.
            job.ratelimit_processed(n);
            let done = copy(at, n);
            flight.push(async move { (at, n, done.await) });
        }
        if flight.is_empty() {
            continue;
        }
        job.yield_for_io();
        let Some((at, n, r)) = flight.next().await else {
            continue;
        };
        match r {
            Ok(()) => {
                job.progress_update(n);
                depth = DEPTH;
            }
            Err((is_read, e)) => match failed(is_read, e) {
                Failed::Retry => {
                    depth = 1;
                    again.push((at, n));
                }
                Failed::Skip(e) => {
                    depth = 1;
                    first_error.get_or_insert(e);
                    job.progress_update(n);
                }
                Failed::Fail(e) => {
                    first_error.get_or_insert(e);
                    stopping = true;
                }
            },
        }
    }
    first_error.map_or(Ok(()), Err)
}
