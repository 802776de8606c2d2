//! Jobs that end together (QEMU: JobTxn): every job belongs to a group, a
//! group of its own unless a `transaction` with `completion-mode: grouped`
//! put it in one. A job whose work succeeded waits for the rest of its
//! group; the group then goes to `pending` and finalizes as one. When one
//! fails or is cancelled, the others are cancelled and every job of the
//! group is aborted.
//!
//! QEMU 10.0.2 hangs when a grouped transaction fails after two of its
//! backups were created: it waits for a job that never started to finish.
//! Here a job that never started is simply ended.

use super::{Job, JobError, JobStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::OwnedMutexGuard;

/// A group of jobs that complete together.
#[derive(Default)]
pub struct JobTxn {
    /// Newest first, the order QEMU walks its group in.
    jobs: Mutex<Vec<Arc<Job>>>,
    /// One job is already aborting the group (QEMU: txn->aborting).
    aborting: AtomicBool,
    /// Held while a job of the group finalizes, by itself or for a verb
    /// (QEMU does all of it under one lock): a verb that comes meanwhile
    /// waits, then sees the outcome.
    finalizing: Arc<tokio::sync::Mutex<()>>,
}

impl JobTxn {
    pub fn new() -> Arc<JobTxn> {
        Arc::default()
    }

    fn jobs(&self) -> Vec<Arc<Job>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn add(&self, job: &Arc<Job>) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.insert(0, Arc::clone(job));
    }

    pub(crate) fn remove(&self, job: &Job) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.retain(|j| !std::ptr::eq(Arc::as_ptr(j), job));
    }

    /// Moves a job that has not started into this group (QEMU: job_create
    /// with a txn).
    pub fn join(self: &Arc<Self>, job: &Arc<Job>) {
        let old = {
            let mut txn = job.txn.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut *txn, Arc::clone(self))
        };
        old.remove(job);
        self.add(job);
    }
}

impl Job {
    /// The group this job belongs to.
    pub(crate) fn txn(&self) -> Arc<JobTxn> {
        Arc::clone(&self.txn.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Waits for the group's finalizing lock.
    pub(super) async fn lock_finalizing(&self) -> OwnedMutexGuard<()> {
        Arc::clone(&self.txn().finalizing).lock_owned().await
    }

    /// The work succeeded: the job waits for the rest of its group, and the
    /// last one to get there takes the group to `pending`, then finalizes it
    /// unless a job of it waits for `job-finalize` (QEMU:
    /// job_completed_txn_success).
    pub(super) async fn txn_success(self: &Arc<Self>) {
        {
            let mut st = self.lock();
            self.transition(&mut st, JobStatus::Waiting);
        }
        let jobs = self.txn().jobs();
        if jobs.iter().any(|j| !j.status().is_completed()) {
            return;
        }
        for j in &jobs {
            j.to_pending();
        }
        if jobs.iter().all(|j| j.lock().auto_finalize) {
            self.do_finalize().await;
        }
    }

    /// Prepares every job of the group, then commits them all, or aborts
    /// them all if one prepare failed (QEMU: job_do_finalize).
    pub(super) async fn do_finalize(self: &Arc<Self>) {
        let jobs = self.txn().jobs();
        for j in &jobs {
            let failed = j.lock().ret.is_some();
            if failed {
                return self.txn_abort().await;
            }
            if let Err(e) = j.driver.prepare(j).await {
                {
                    let mut st = j.lock();
                    st.ret = Some(e);
                    j.update_rc(&mut st);
                }
                return self.txn_abort().await;
            }
        }
        for j in &jobs {
            j.finalize_single().await;
        }
    }

    /// This job failed or was cancelled: every other job of the group is
    /// cancelled, each waits for its work to stop, and all are aborted
    /// (QEMU: job_completed_txn_abort).
    pub(super) async fn txn_abort(self: &Arc<Self>) {
        let txn = self.txn();
        if txn.aborting.swap(true, Ordering::AcqRel) {
            // Another job of the group is ending it; it ends this one too.
            return;
        }
        let jobs = txn.jobs();
        for j in jobs.iter().filter(|j| !Arc::ptr_eq(j, self)) {
            // One failed: nothing the others do matters any more.
            j.cancel_async(true);
            j.enter_if(&mut j.lock(), |_| true);
        }
        // Every job's work stops before any is aborted: QEMU's first abort
        // drains the nodes, and the others end meanwhile.
        for j in &jobs {
            if !j.status().is_completed() {
                // Its work returns at its next stop; its own exit then
                // finds it ended (QEMU: job_finish_sync).
                j.wait_until(|st| st.deferred || !st.started).await;
                let mut st = j.lock();
                st.busy = false;
                if st.ret.is_none() && !st.force_cancel {
                    // Only a job that never started gets here uncancelled.
                    st.ret = Some(JobError::errno(libc::ECANCELED));
                }
                j.update_rc(&mut st);
            }
        }
        for j in &jobs {
            j.finalize_single().await;
        }
    }

    /// The whole group's work is done (QEMU: job_transition_to_pending).
    fn to_pending(&self) {
        let mut st = self.lock();
        self.transition(&mut st, JobStatus::Pending);
        if !st.auto_finalize && self.kind.is_block_job() {
            self.emit(
                "BLOCK_JOB_PENDING",
                serde_json::json!({"type": self.kind.as_str(), "id": self.id}),
            );
        }
    }
}
