//! The daemon's jobs: created under a unique id, listed newest first, and
//! the one place their events leave through (QEMU: the global job list).

use crate::job::{Job, JobDriver, JobOptions};
use serde_json::Value;
use std::sync::{Arc, Mutex, MutexGuard};
use strata_block::graph::id_wellformed;
use strata_block::LoopHandle;

/// Where a job's QMP events go: the event's name and its data.
pub type EventSink = Arc<dyn Fn(&str, Value) + Send + Sync>;

/// Every job of a daemon.
pub struct JobList {
    /// Newest first, as QEMU lists them.
    jobs: Mutex<Vec<Arc<Job>>>,
    sink: EventSink,
    /// Jobs whose work has returned and whose completion runs now, without
    /// waiting for any command (see [`JobList::quiesce`]).
    finishing: std::sync::atomic::AtomicUsize,
    finished: tokio::sync::Notify,
}

/// Counts one job as finishing while it lives.
pub(crate) struct Finishing(Arc<JobList>);

impl Drop for Finishing {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        if self.0.finishing.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.finished.notify_waiters();
        }
    }
}

impl JobList {
    pub fn new(sink: EventSink) -> Arc<JobList> {
        Arc::new(JobList {
            jobs: Mutex::new(Vec::new()),
            sink,
            finishing: Default::default(),
            finished: tokio::sync::Notify::new(),
        })
    }

    fn jobs_locked(&self) -> MutexGuard<'_, Vec<Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn emit(&self, event: &str, data: Value) {
        (self.sink)(event, data);
    }

    /// A job by id.
    pub fn find(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs_locked().iter().find(|j| j.id() == id).cloned()
    }

    /// Every job, newest first.
    pub fn jobs(&self) -> Vec<Arc<Job>> {
        self.jobs_locked().clone()
    }

    /// Makes a job in state `created` (QEMU: job_create); `home` is the
    /// loop its work runs on. It starts with [`JobList::start`].
    pub fn create(
        self: &Arc<Self>,
        id: &str,
        driver: Box<dyn JobDriver>,
        home: Option<LoopHandle>,
        opts: JobOptions,
    ) -> Result<Arc<Job>, String> {
        self.check_id(id)?;
        let job = Arc::new(Job::new(id, driver, Arc::downgrade(self), home, opts));
        job.txn().add(&job);
        job.created();
        self.jobs_locked().insert(0, Arc::clone(&job));
        Ok(job)
    }

    /// Refuses an id that is malformed or taken, in QEMU's words.
    pub fn check_id(&self, id: &str) -> Result<(), String> {
        if !id_wellformed(id) {
            return Err(format!("Invalid job ID '{id}'"));
        }
        if self.find(id).is_some() {
            return Err(format!("Job ID '{id}' already in use"));
        }
        Ok(())
    }

    /// Marks a job as finishing until the guard goes.
    pub(crate) fn finishing(self: &Arc<Self>) -> Finishing {
        self.finishing
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Finishing(Arc::clone(self))
    }

    /// Waits until no job is in the middle of completing by itself. QEMU
    /// completes a job in one go on the main loop, where its monitor runs:
    /// a command sent after a job's last event sees the job's nodes let go.
    /// The daemon waits here before each command for the same guarantee.
    pub async fn quiesce(&self) {
        use std::sync::atomic::Ordering;
        loop {
            let done = self.finished.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.finishing.load(Ordering::Acquire) == 0 {
                return;
            }
            done.await;
        }
    }

    pub fn start(&self, job: &Arc<Job>) {
        job.start();
    }

    pub(crate) fn remove(&self, job: &Job) {
        self.jobs_locked()
            .retain(|j| !std::ptr::eq(Arc::as_ptr(j), job));
    }

    /// `query-jobs`.
    pub fn query_jobs(&self) -> Value {
        Value::Array(self.jobs().iter().map(|j| j.info()).collect())
    }

    /// `query-block-jobs`.
    pub fn query_block_jobs(&self) -> Value {
        Value::Array(
            self.jobs()
                .iter()
                .filter(|j| j.job_type().is_block_job())
                .map(|j| j.block_info())
                .collect(),
        )
    }

    /// Cancels every job and waits for each to conclude (QEMU:
    /// job_cancel_sync_all, at shutdown).
    pub async fn cancel_all(&self) {
        while let Some(job) = self.jobs().into_iter().next() {
            job.cancel_sync().await;
            // A job kept for its user after it concluded goes now.
            if job.status() == crate::JobStatus::Concluded {
                let _ = job.dismiss().await;
            }
            self.remove(&job);
        }
    }
}
