//! What users ask of a job (QEMU: job-qmp.c and the verbs of job.c):
//! pause, resume, speed, complete, change, finalize, dismiss and cancel,
//! each refused in the states QEMU refuses it, and the job as
//! `query-jobs` and `query-block-jobs` show it.

use super::{Job, JobStatus, JobVerb, State};
use serde_json::{Map, Value};
use std::sync::Arc;

impl Job {
    /// `job-pause` (QEMU: job_user_pause); if it woke the work (which then
    /// pauses at once), the count to [`Job::settle`] from.
    pub fn user_pause(&self) -> Result<Option<u64>, String> {
        let mut st = self.lock();
        self.apply_verb(&st, JobVerb::Pause)?;
        if st.user_paused {
            return Err("Job is already paused".into());
        }
        st.user_paused = true;
        st.pause_count += 1;
        let since = st.yields;
        Ok((!st.paused && self.enter_if(&mut st, |_| true)).then_some(since))
    }

    pub fn user_paused(&self) -> bool {
        self.lock().user_paused
    }

    /// `job-resume` (QEMU: job_user_resume); as [`Job::user_pause`].
    pub fn user_resume(&self) -> Result<Option<u64>, String> {
        let mut st = self.lock();
        if !st.user_paused || st.pause_count == 0 {
            return Err("Can't resume a job that was not paused".into());
        }
        self.apply_verb(&st, JobVerb::Resume)?;
        // A block job's I/O status starts afresh (QEMU: block_job_user_resume).
        st.iostatus = "ok";
        st.user_paused = false;
        st.pause_count -= 1;
        // Not while a sleep runs: its timer wakes the job.
        let since = st.yields;
        let woke = st.pause_count == 0 && self.enter_if(&mut st, |s| s.timer.is_none());
        Ok(woke.then_some(since))
    }

    /// `block-job-set-speed` (QEMU: block_job_set_speed); as
    /// [`Job::user_pause`].
    pub fn set_speed(&self, speed: i64) -> Result<Option<u64>, String> {
        let mut st = self.lock();
        self.apply_verb(&st, JobVerb::SetSpeed)?;
        if speed < 0 {
            return Err("Parameter 'speed' expects a non-negative value".into());
        }
        let old = st.speed;
        st.limit.set_speed(speed as u64);
        st.speed = speed as u64;
        if speed != 0 && speed as u64 <= old {
            return Ok(None);
        }
        // A sleeping job recomputes its wait at the new speed.
        let since = st.yields;
        Ok(self
            .enter_if(&mut st, |s| s.timer.is_some())
            .then_some(since))
    }

    /// `job-complete` (QEMU: job_complete).
    pub fn complete(self: &Arc<Self>) -> Result<(), String> {
        {
            let st = self.lock();
            self.apply_verb(&st, JobVerb::Complete)?;
            if st.cancelled {
                return Err(self.cannot_complete());
            }
        }
        match self.driver.complete(self) {
            None => Err(self.cannot_complete()),
            Some(r) => r,
        }
    }

    /// `block-job-change` (QEMU: block_job_change).
    pub fn change(self: &Arc<Self>, args: &Value) -> Result<(), String> {
        {
            let st = self.lock();
            self.apply_verb(&st, JobVerb::Change)?;
        }
        self.driver
            .change(self, args)
            .unwrap_or_else(|| Err("Job type does not support change".into()))
    }

    fn cannot_complete(&self) -> String {
        format!("The active block job '{}' cannot be completed", self.id)
    }

    /// `job-finalize` (QEMU: job_finalize).
    pub async fn finalize(self: &Arc<Self>) -> Result<(), String> {
        let _finalizing = self.lock_finalizing().await;
        {
            let st = self.lock();
            self.apply_verb(&st, JobVerb::Finalize)?;
        }
        self.do_finalize().await;
        Ok(())
    }

    /// `job-dismiss` (QEMU: job_dismiss).
    pub async fn dismiss(&self) -> Result<(), String> {
        let _finalizing = self.lock_finalizing().await;
        {
            let mut st = self.lock();
            self.apply_verb(&st, JobVerb::Dismiss)?;
            self.do_dismiss(&mut st);
        }
        self.release().await;
        Ok(())
    }

    /// `job-cancel` and `block-job-cancel` (QEMU: job_user_cancel). A job
    /// that was waiting ends before the answer, so its events come first,
    /// as QEMU sends them; one busy in its I/O ends at its next stop.
    pub async fn user_cancel(self: &Arc<Self>, force: bool) -> Result<(), String> {
        {
            let _finalizing = self.lock_finalizing().await;
            {
                let st = self.lock();
                self.apply_verb(&st, JobVerb::Cancel)?;
            }
            if !self.cancel(force).await || !self.driver.cancel_waits() {
                return Ok(());
            }
        }
        // A soft cancel ends a job as a success: it may then wait to be
        // finalized.
        self.wait_until(|st| {
            matches!(st.status, JobStatus::Concluded | JobStatus::Null)
                || (st.status == JobStatus::Pending && !st.auto_finalize)
        })
        .await;
        Ok(())
    }

    /// Lets work that a command woke (or started) run until it gives up
    /// the loop again, or until the job is concluded, before the command is
    /// answered: QEMU enters the job's coroutine within the command, so the
    /// events of that stretch come before the answer.
    /// `since` is the count of yields when the command woke the work.
    pub async fn settle(&self, since: u64) {
        self.wait_until(|st| {
            st.yields != since
                || matches!(
                    st.status,
                    JobStatus::Waiting | JobStatus::Concluded | JobStatus::Null
                )
                || (st.status == JobStatus::Pending && !st.auto_finalize)
        })
        .await;
    }

    /// How many times the work has given up the loop so far.
    pub fn yields(&self) -> u64 {
        self.lock().yields
    }

    /// Waits until the job's state satisfies `done`.
    async fn wait_for(&self, done: impl Fn(JobStatus) -> bool) {
        self.wait_until(|st| done(st.status)).await;
    }

    pub(super) async fn wait_until(&self, done: impl Fn(&State) -> bool) {
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if done(&self.lock()) {
                return;
            }
            settled.await;
        }
    }

    /// QEMU: job_cancel. False if the job was busy and goes on to its next
    /// stop before it ends.
    async fn cancel(self: &Arc<Self>, force: bool) -> bool {
        enum Next {
            Nothing,
            Complete,
            Abort,
            Release,
            Later,
        }
        let next = {
            let mut st = self.lock();
            if st.status == JobStatus::Concluded {
                self.do_dismiss(&mut st);
                Next::Release
            } else {
                drop(st);
                self.cancel_async(force);
                st = self.lock();
                if !st.started {
                    Next::Complete
                } else if st.deferred {
                    // Waiting to be finalized: abort it and its group now.
                    // Still on its way out of the work: its exit sees the
                    // cancel.
                    if st.force_cancel && st.status.is_completed() {
                        Next::Abort
                    } else {
                        Next::Nothing
                    }
                } else {
                    // Busy in its I/O, it sees the cancel at its next
                    // stop, after the answer, as in QEMU.
                    if self.enter_if(&mut st, |_| true) {
                        Next::Nothing
                    } else {
                        Next::Later
                    }
                }
            }
        };
        match next {
            Next::Nothing => {}
            Next::Later => return false,
            Next::Release => self.release().await,
            Next::Complete => self.completed().await,
            Next::Abort => self.txn_abort().await,
        }
        true
    }

    /// Asks the job to stop, without waking it (QEMU: job_cancel_async).
    pub(super) fn cancel_async(self: &Arc<Self>, force: bool) {
        // The driver says whether this cancel forces; it looks at the
        // state, so unlocked.
        let force = self.driver.cancel(self, force);
        let mut st = self.lock();
        if st.user_paused {
            st.iostatus = "ok";
            st.user_paused = false;
            st.pause_count -= 1;
        }
        // A soft cancel of a job whose work is over changes nothing.
        if force || !st.deferred {
            st.cancelled = true;
            st.force_cancel |= force;
        }
    }

    /// Cancels and waits until the job is concluded (QEMU:
    /// job_cancel_sync, at shutdown).
    pub async fn cancel_sync(self: &Arc<Self>) {
        {
            let _finalizing = self.lock_finalizing().await;
            let _ = self.cancel(true).await;
        }
        self.wait_for(|s| matches!(s, JobStatus::Concluded | JobStatus::Null))
            .await;
    }

    /// The job in `query-jobs` (QEMU: JobInfo).
    pub fn info(&self) -> Value {
        let st = self.lock();
        let mut m = Map::new();
        m.insert("id".into(), self.id.clone().into());
        m.insert("type".into(), self.kind.as_str().into());
        m.insert("status".into(), st.status.as_str().into());
        m.insert("current-progress".into(), st.current.into());
        m.insert("total-progress".into(), st.total.into());
        if let Some(e) = &st.ret {
            m.insert("error".into(), e.text().into());
        }
        Value::Object(m)
    }

    /// The job in `query-block-jobs` (QEMU: BlockJobInfo).
    pub fn block_info(&self) -> Value {
        let st = self.lock();
        let mut m = Map::new();
        m.insert("type".into(), self.kind.as_str().into());
        m.insert("device".into(), self.id.clone().into());
        m.insert("len".into(), st.total.into());
        m.insert("offset".into(), st.current.into());
        m.insert("busy".into(), st.busy.into());
        m.insert("paused".into(), (st.pause_count > 0).into());
        m.insert("speed".into(), st.speed.into());
        m.insert("io-status".into(), st.iostatus.into());
        m.insert("ready".into(), st.status.is_ready().into());
        m.insert("status".into(), st.status.as_str().into());
        m.insert("auto-finalize".into(), st.auto_finalize.into());
        m.insert("auto-dismiss".into(), st.auto_dismiss.into());
        if let Some(e) = &st.ret {
            m.insert("error".into(), e.text().into());
        }
        drop(st);
        self.driver.query(&mut m);
        Value::Object(m)
    }
}
