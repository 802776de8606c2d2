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
}

impl JobList {
    pub fn new(sink: EventSink) -> Arc<JobList> {
        Arc::new(JobList {
            jobs: Mutex::new(Vec::new()),
            sink,
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
