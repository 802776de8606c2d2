//! One job: its state under a lock, the task that runs its work, and the
//! way from running to gone (QEMU: job.c and blockjob.c).
//!
//! The work runs as a task on its node's event loop; it pauses, sleeps and
//! notices cancellation only at the points where it asks to ([`Job::pause_point`],
//! [`Job::sleep`]), as QEMU's coroutines do. Everything after the work
//! (prepare, commit or abort, clean, the events) runs on the main loop,
//! where the monitor's commands run, so a command never sees it half done.

use crate::list::JobList;
use crate::ratelimit::RateLimit;
use crate::state::{JobStatus, JobType, JobVerb};
use async_trait::async_trait;
use futures::FutureExt;
use serde_json::{json, Map, Value};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use strata_block::error::strerror;
use strata_block::LoopHandle;

mod txn;
mod verbs;
use tokio::sync::Notify;
pub use txn::JobTxn;

/// Why a job's work failed: an errno and, where there is one, a message
/// (QEMU: job->ret and job->err); without a message QMP shows strerror.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobError {
    pub errno: i32,
    pub msg: Option<String>,
}

impl JobError {
    pub fn errno(errno: i32) -> JobError {
        JobError { errno, msg: None }
    }

    /// An error with its message, as the job reports it.
    pub fn reported(e: strata_block::Error) -> JobError {
        JobError {
            errno: e.code(),
            msg: Some(e.to_string()),
        }
    }

    /// The text QMP shows.
    pub fn text(&self) -> String {
        self.msg.clone().unwrap_or_else(|| strerror(self.errno))
    }
}

impl From<strata_block::Error> for JobError {
    fn from(e: strata_block::Error) -> JobError {
        JobError::errno(e.code())
    }
}

/// What a kind of job does (QEMU: JobDriver). Only `run` is required.
#[async_trait]
pub trait JobDriver: Send + Sync {
    fn job_type(&self) -> JobType;

    /// The work; it calls [`Job::pause_point`] or [`Job::sleep`] often and
    /// stops early when [`Job::is_cancelled`].
    async fn run(&self, job: &Arc<Job>) -> Result<(), JobError>;

    /// After the work succeeded, before the outcome is final: may still fail.
    async fn prepare(&self, _job: &Arc<Job>) -> Result<(), JobError> {
        Ok(())
    }

    /// The job succeeded.
    async fn commit(&self, _job: &Arc<Job>) {}

    /// The job failed or was cancelled.
    async fn abort(&self, _job: &Arc<Job>) {}

    /// Either way, last: gives back what the job held.
    async fn clean(&self, _job: &Arc<Job>) {}

    /// `job-complete`: None if this kind of job cannot be completed.
    fn complete(&self, _job: &Arc<Job>) -> Option<Result<(), String>> {
        None
    }

    /// Called when the job leaves the job list (QEMU: block_job_free):
    /// drops the holds on nodes that the job keeps until it is dismissed.
    async fn free(&self) {}

    /// A cancel was asked for; returns whether it forces the job to stop
    /// now (QEMU: JobDriver.cancel). Jobs without a soft cancel always force.
    fn cancel(&self, _job: &Arc<Job>, _force: bool) -> bool {
        true
    }

    /// Whether a cancel is answered only once the job has ended. QEMU's
    /// mirror drains its source on the way out, which yields to the
    /// monitor: its cancel is answered first, its events follow.
    fn cancel_waits(&self) -> bool {
        true
    }

    /// The work is about to stop at a pause point: requests it has in
    /// flight end first (QEMU: JobDriver.pause).
    async fn pause(&self, _job: &Arc<Job>) {}

    /// `block-job-change` with these arguments: None if this kind of job has
    /// nothing to change.
    fn change(&self, _job: &Arc<Job>, _args: &Value) -> Option<Result<(), String>> {
        None
    }

    /// What `query-block-jobs` shows of this kind of job beyond the common
    /// fields (QEMU: BlockJobDriver.query).
    fn query(&self, _info: &mut Map<String, Value>) {}
}

/// How a block job answers an I/O error (QEMU: BlockdevOnError).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    Report,
    Ignore,
    Enospc,
    Stop,
    Auto,
}

impl OnError {
    pub fn parse(s: &str) -> Option<OnError> {
        Some(match s {
            "report" => OnError::Report,
            "ignore" => OnError::Ignore,
            "enospc" => OnError::Enospc,
            "stop" => OnError::Stop,
            "auto" => OnError::Auto,
            _ => return None,
        })
    }
}

/// What a block job does about one I/O error (QEMU: BlockErrorAction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorAction {
    Ignore,
    Report,
    Stop,
}

impl ErrorAction {
    fn as_str(self) -> &'static str {
        match self {
            ErrorAction::Ignore => "ignore",
            ErrorAction::Report => "report",
            ErrorAction::Stop => "stop",
        }
    }
}

/// How a job starts (QMP's `auto-finalize`, `auto-dismiss`, `speed`).
#[derive(Clone, Copy, Debug)]
pub struct JobOptions {
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    pub speed: u64,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            auto_finalize: true,
            auto_dismiss: true,
            speed: 0,
        }
    }
}

/// Everything about a job that changes, under one lock (QEMU: the fields
/// job_mutex protects).
struct State {
    status: JobStatus,
    /// Pause requests outstanding (users and the job's own start).
    pause_count: u32,
    /// Stopped at a pause point.
    paused: bool,
    /// Running its work rather than waiting (QEMU: busy).
    busy: bool,
    user_paused: bool,
    /// Cancellation asked for (QEMU: cancelled) and, for jobs without a
    /// soft cancel, forced (QEMU: force_cancel: what the work watches).
    cancelled: bool,
    force_cancel: bool,
    /// The work has returned; what is left runs on the main loop.
    deferred: bool,
    started: bool,
    ret: Option<JobError>,
    current: u64,
    total: u64,
    auto_finalize: bool,
    auto_dismiss: bool,
    speed: u64,
    limit: RateLimit,
    /// I/O status of a block job: "ok", "failed" or "nospace".
    iostatus: &'static str,
    /// When a sleeping job is due to wake by itself (QEMU: sleep_timer).
    timer: Option<Instant>,
    /// How many times the work has given up the loop: a command that woke
    /// it waits for the next one.
    yields: u64,
}

/// A job.
pub struct Job {
    id: String,
    kind: JobType,
    driver: Box<dyn JobDriver>,
    list: Weak<JobList>,
    /// Where the work runs: its node's loop, or the main loop.
    home: Option<LoopHandle>,
    st: Mutex<State>,
    /// Wakes the work from a yield (QEMU: job_enter).
    wake: Notify,
    /// Signalled whenever the job reaches a completed state.
    settled: Notify,
    /// The group it completes with; it holds the lock a job finalizes
    /// under.
    txn: Mutex<Arc<JobTxn>>,
}

impl Job {
    pub(crate) fn new(
        id: &str,
        driver: Box<dyn JobDriver>,
        list: Weak<JobList>,
        home: Option<LoopHandle>,
        opts: JobOptions,
    ) -> Job {
        let mut limit = RateLimit::default();
        limit.set_speed(opts.speed);
        Job {
            id: id.to_string(),
            kind: driver.job_type(),
            driver,
            list,
            home,
            st: Mutex::new(State {
                status: JobStatus::Undefined,
                pause_count: 1,
                paused: true,
                busy: false,
                user_paused: false,
                cancelled: false,
                force_cancel: false,
                deferred: false,
                started: false,
                ret: None,
                current: 0,
                total: 0,
                auto_finalize: opts.auto_finalize,
                auto_dismiss: opts.auto_dismiss,
                speed: opts.speed,
                limit,
                iostatus: "ok",
                timer: None,
                yields: 0,
            }),
            wake: Notify::new(),
            settled: Notify::new(),
            txn: Mutex::new(JobTxn::new()),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn job_type(&self) -> JobType {
        self.kind
    }

    pub fn status(&self) -> JobStatus {
        self.lock().status
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, event: &str, data: Value) {
        if let Some(list) = self.list.upgrade() {
            list.emit(event, data);
        }
    }

    /// Moves to `to`, announcing it (QEMU: job_state_transition).
    fn transition(&self, st: &mut State, to: JobStatus) {
        let from = st.status;
        debug_assert!(from.may_become(to), "job {}: {from:?} -> {to:?}", self.id);
        st.status = to;
        if from != to {
            self.emit(
                "JOB_STATUS_CHANGE",
                json!({"id": self.id, "status": to.as_str()}),
            );
        }
        if to.is_completed() {
            self.settled.notify_waiters();
        }
    }

    /// Refuses a verb the current state does not accept, in QEMU's words.
    fn apply_verb(&self, st: &State, verb: JobVerb) -> Result<(), String> {
        if verb.allowed_in(st.status) {
            return Ok(());
        }
        Err(format!(
            "Job '{}' in state '{}' cannot accept command verb '{}'",
            self.id,
            st.status.as_str(),
            verb.as_str()
        ))
    }

    /// Wakes the work if it waits and `cond` holds (QEMU: job_enter_cond);
    /// true if it did.
    fn enter_if(&self, st: &mut State, cond: impl Fn(&State) -> bool) -> bool {
        if !st.started || st.deferred || st.busy || !cond(st) {
            return false;
        }
        st.timer = None;
        st.busy = true;
        self.wake.notify_waiters();
        true
    }

    /// Gives up the loop until entered again or, with a deadline, until
    /// then (QEMU: job_do_yield), if `decide` says so: it runs under the
    /// same lock as the parking, so that no enter can fall between the
    /// decision and the park and be lost. False if it did not park.
    async fn park(
        &self,
        deadline: Option<Instant>,
        decide: impl FnOnce(&mut State) -> bool,
    ) -> bool {
        let woken = self.wake.notified();
        tokio::pin!(woken);
        {
            let mut st = self.lock();
            if !decide(&mut st) {
                return false;
            }
            st.timer = deadline;
            st.busy = false;
            st.yields += 1;
            // Registered before the lock goes: an enter cannot slip by.
            woken.as_mut().enable();
        }
        self.settled.notify_waiters();
        match deadline {
            None => woken.await,
            Some(at) => {
                // The timer wheel rounds up to its next millisecond tick: a
                // zero sleep between copies would cost a millisecond each.
                let timer = async {
                    if at <= Instant::now() {
                        tokio::task::yield_now().await
                    } else {
                        tokio::time::sleep_until(at.into()).await
                    }
                };
                tokio::select! {
                    _ = &mut woken => {}
                    _ = timer => {
                        // The timer enters the job unless someone did.
                        let mut st = self.lock();
                        if !st.busy {
                            st.timer = None;
                            st.busy = true;
                        }
                    }
                }
            }
        }
        true
    }

    /// Stops here while a pause is asked for, showing `paused` (or
    /// `standby` when ready) meanwhile (QEMU: job_pause_point).
    pub async fn pause_point(self: &Arc<Self>) {
        if self.should_pause() {
            self.driver.pause(self).await;
        }
        let mut before = JobStatus::Running;
        let parked = self
            .park(None, |st| {
                if st.pause_count == 0 || st.force_cancel {
                    return false;
                }
                before = st.status;
                let to = if before == JobStatus::Ready {
                    JobStatus::Standby
                } else {
                    JobStatus::Paused
                };
                self.transition(st, to);
                st.paused = true;
                true
            })
            .await;
        if parked {
            let mut st = self.lock();
            st.paused = false;
            self.transition(&mut st, before);
        }
    }

    /// Whether the work should stop at its next pause point (QEMU:
    /// job_should_pause).
    pub fn should_pause(&self) -> bool {
        let st = self.lock();
        st.pause_count > 0 && !st.force_cancel
    }

    /// Counts a wait for requests in flight as giving up the loop, as a
    /// QEMU coroutine yields at every request: a command that woke the work
    /// is answered from here on (see [`Job::settle`]).
    pub fn yield_for_io(&self) {
        self.lock().yields += 1;
        self.settled.notify_waiters();
    }

    /// Sleeps for `d` unless entered sooner, then stops at a pause point
    /// (QEMU: job_sleep_ns).
    pub async fn sleep(self: &Arc<Self>, d: Duration) {
        self.sleep_until(Some(Instant::now() + d)).await;
    }

    /// Waits until entered (a verb, a cancel), then stops at a pause point
    /// (QEMU: job_yield).
    pub async fn wait_entered(self: &Arc<Self>) {
        self.sleep_until(None).await;
    }

    async fn sleep_until(self: &Arc<Self>, deadline: Option<Instant>) {
        let mut cancelled = false;
        self.park(deadline, |st| {
            cancelled = st.force_cancel;
            !cancelled && st.pause_count == 0
        })
        .await;
        if !cancelled {
            self.pause_point().await;
        }
    }

    /// Waits as long as the speed limit asks, at least once, so that a
    /// drain or a pause finds the job between requests (QEMU:
    /// block_job_ratelimit_sleep).
    pub async fn ratelimit_sleep(self: &Arc<Self>) {
        loop {
            let d = self.lock().limit.delay(0, Instant::now());
            self.sleep(d).await;
            if d.is_zero() || self.is_cancelled() {
                break;
            }
        }
    }

    /// Counts `n` bytes copied against the speed limit.
    pub fn ratelimit_processed(&self, n: u64) {
        self.lock().limit.delay(n, Instant::now());
    }

    /// Whether the speed limit asks to wait before anything more.
    pub fn ratelimit_exceeded(&self) -> bool {
        !self.lock().limit.delay(0, Instant::now()).is_zero()
    }

    /// Whether the work should stop (QEMU: job_is_cancelled).
    pub fn is_cancelled(&self) -> bool {
        self.lock().force_cancel
    }

    /// Whether a cancel was asked for, soft or forced (QEMU:
    /// job_cancel_requested): a ready mirror then ends without pivoting.
    pub fn cancel_requested(&self) -> bool {
        self.lock().cancelled
    }

    /// The work has caught up and waits for `job-complete` (QEMU:
    /// job_transition_to_ready, with BLOCK_JOB_READY).
    pub fn transition_to_ready(&self) {
        let mut st = self.lock();
        self.transition(&mut st, JobStatus::Ready);
        self.emit(
            "BLOCK_JOB_READY",
            json!({"type": self.kind.as_str(), "device": self.id,
                   "len": st.total, "offset": st.current, "speed": st.speed}),
        );
    }

    /// Wakes the work unless it is paused, so it sees what a verb changed
    /// (QEMU: job_enter_cond when !job->paused).
    pub fn enter_unless_paused(&self) {
        let mut st = self.lock();
        if !st.paused {
            self.enter_if(&mut st, |_| true);
        }
    }

    /// The block job's I/O status is `ok` (no error has stopped it).
    pub fn iostatus_ok(&self) -> bool {
        self.lock().iostatus == "ok"
    }

    /// Counts `n` more bytes to do (QEMU: job_progress_increase_remaining).
    pub fn progress_increase_remaining(&self, n: u64) {
        self.lock().total += n;
    }

    pub fn progress_set_remaining(&self, remaining: u64) {
        let mut st = self.lock();
        st.total = st.current + remaining;
    }

    pub fn progress_update(&self, done: u64) {
        let mut st = self.lock();
        st.current += done;
        st.total = st.total.max(st.current);
    }

    /// What to do about an I/O error, announced with BLOCK_JOB_ERROR; on
    /// `stop` the job pauses as if a user had paused it (QEMU:
    /// block_job_error_action).
    pub fn error_action(&self, on_err: OnError, is_read: bool, errno: i32) -> ErrorAction {
        let action = match on_err {
            OnError::Enospc | OnError::Auto if errno == libc::ENOSPC => ErrorAction::Stop,
            OnError::Enospc | OnError::Auto | OnError::Report => ErrorAction::Report,
            OnError::Stop => ErrorAction::Stop,
            OnError::Ignore => ErrorAction::Ignore,
        };
        let op = if is_read { "read" } else { "write" };
        self.emit(
            "BLOCK_JOB_ERROR",
            json!({"device": self.id, "operation": op, "action": action.as_str()}),
        );
        if action == ErrorAction::Stop {
            let mut st = self.lock();
            if !st.user_paused {
                st.pause_count += 1;
                st.user_paused = true;
            }
            if st.iostatus == "ok" {
                st.iostatus = if errno == libc::ENOSPC {
                    "nospace"
                } else {
                    "failed"
                };
            }
        }
        action
    }

    /// Starts the work (QEMU: job_start): the job moves to `running` and its
    /// task begins on its loop; the rest of its life follows on the main loop.
    pub(crate) fn start(self: &Arc<Self>) {
        {
            let mut st = self.lock();
            st.started = true;
            st.pause_count -= 1;
            st.busy = true;
            st.paused = false;
            self.transition(&mut st, JobStatus::Running);
        }
        let job = Arc::clone(self);
        tokio::spawn(async move {
            let work = {
                let job = Arc::clone(&job);
                async move {
                    job.pause_point().await;
                    // A bug in a job ends it with an error, not a job
                    // that never concludes.
                    std::panic::AssertUnwindSafe(job.driver.run(&job))
                        .catch_unwind()
                        .await
                        .unwrap_or(Err(JobError::errno(libc::EIO)))
                }
            };
            let r = match job.home.clone() {
                Some(h) => h.run(work).await.unwrap_or(Err(JobError::errno(libc::EIO))),
                None => work.await,
            };
            // Commands wait while the job completes by itself.
            let _finishing = job.list.upgrade().map(|l| l.finishing());
            {
                let mut st = job.lock();
                if let Err(e) = r {
                    st.ret = Some(e);
                }
                st.deferred = true;
                st.busy = true;
            }
            // A group being aborted waits for this.
            job.settled.notify_waiters();
            let _finalizing = job.lock_finalizing().await;
            job.exit().await;
        });
    }

    /// The work has returned (QEMU: job_exit).
    async fn exit(self: &Arc<Self>) {
        {
            let mut st = self.lock();
            // A forced cancel may have finished it already.
            if st.status.is_completed() {
                return;
            }
            st.busy = false;
        }
        self.completed().await;
    }

    /// Turns a cancellation into an error and moves a failed job to
    /// `aborting` (QEMU: job_update_rc).
    fn update_rc(&self, st: &mut State) {
        if st.ret.is_none() && st.force_cancel {
            st.ret = Some(JobError::errno(libc::ECANCELED));
        }
        if st.ret.is_some() && st.status != JobStatus::Aborting {
            self.transition(st, JobStatus::Aborting);
        }
    }

    /// QEMU: job_completed.
    async fn completed(self: &Arc<Self>) {
        let failed = {
            let mut st = self.lock();
            self.update_rc(&mut st);
            st.ret.is_some()
        };
        if failed {
            self.txn_abort().await;
        } else {
            self.txn_success().await;
        }
    }

    /// Commit or abort, clean, the final event, `concluded`, and `null`
    /// unless the user dismisses it (QEMU: job_finalize_single).
    async fn finalize_single(self: &Arc<Self>) {
        let failed = {
            let mut st = self.lock();
            self.update_rc(&mut st);
            st.ret.is_some()
        };
        if failed {
            self.driver.abort(self).await;
        } else {
            self.driver.commit(self).await;
        }
        self.driver.clean(self).await;
        let gone = {
            let mut st = self.lock();
            if st.started && self.kind.is_block_job() {
                let mut data = Map::new();
                data.insert("type".into(), self.kind.as_str().into());
                data.insert("device".into(), self.id.clone().into());
                data.insert("len".into(), st.total.into());
                data.insert("offset".into(), st.current.into());
                data.insert("speed".into(), st.speed.into());
                if st.force_cancel {
                    self.emit("BLOCK_JOB_CANCELLED", Value::Object(data));
                } else {
                    if let Some(e) = &st.ret {
                        data.insert("error".into(), e.text().into());
                    }
                    self.emit("BLOCK_JOB_COMPLETED", Value::Object(data));
                }
            }
            self.txn().remove(self);
            self.transition(&mut st, JobStatus::Concluded);
            let gone = st.auto_dismiss || !st.started;
            if gone {
                self.do_dismiss(&mut st);
            }
            gone
        };
        if gone {
            self.release().await;
        }
    }

    /// Moves the job to `null` (QEMU: job_do_dismiss); [`Job::release`]
    /// follows once the lock is given back.
    fn do_dismiss(&self, st: &mut State) {
        st.busy = false;
        st.paused = false;
        st.deferred = true;
        self.transition(st, JobStatus::Null);
    }

    /// Takes a dismissed job out of the list and lets go of its nodes.
    async fn release(&self) {
        self.txn().remove(self);
        if let Some(list) = self.list.upgrade() {
            list.remove(self);
        }
        self.driver.free().await;
    }

    /// Ends a job that failed before it started (QEMU: job_early_fail, and
    /// its creator's undoing).
    pub async fn early_fail(self: &Arc<Self>) {
        self.driver.clean(self).await;
        {
            let mut st = self.lock();
            self.do_dismiss(&mut st);
        }
        self.release().await;
    }

    pub(crate) fn created(&self) {
        let mut st = self.lock();
        self.transition(&mut st, JobStatus::Created);
    }
}
