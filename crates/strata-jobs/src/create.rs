//! `blockdev-create` (QEMU: block/create.c): an image made by its driver
//! from QAPI options, as a job of type `create` that its user dismisses.
//! Its progress is one step, done whether the image was made or not.

use crate::job::{Job, JobDriver, JobError, JobOptions};
use crate::list::JobList;
use crate::state::JobType;
use async_trait::async_trait;
use std::sync::{Arc, Mutex};
use strata_block::driver::DriverClass;
use strata_block::options::Opts;
use strata_block::OpenCtx;

struct Create {
    class: Arc<dyn DriverClass>,
    ctx: OpenCtx,
    /// The options, taken by the one run.
    opts: Mutex<Opts>,
}

#[async_trait]
impl JobDriver for Create {
    fn job_type(&self) -> JobType {
        JobType::Create
    }

    async fn run(&self, job: &Arc<Job>) -> Result<(), JobError> {
        job.progress_set_remaining(1);
        let opts = std::mem::take(&mut *self.opts.lock().unwrap_or_else(|e| e.into_inner()));
        if let Err(e) = self.class.blockdev_create_check(&opts) {
            job.progress_update(1);
            return Err(JobError::reported(e));
        }
        // The command is answered from here, as QEMU's once a node opens;
        // the loop runs the command on before the create's work.
        job.yield_for_io();
        tokio::task::yield_now().await;
        let r = self.class.blockdev_create(&self.ctx, opts).await;
        job.progress_update(1);
        r.map_err(JobError::reported)
    }
}

/// Starts a `blockdev-create` job: the driver named by `options` makes the
/// image, nodes of `ctx`'s graph serving as its files. QEMU's checks, in
/// QEMU's order, come first.
pub async fn blockdev_create(
    list: &Arc<JobList>,
    ctx: OpenCtx,
    job_id: &str,
    mut options: Opts,
) -> Result<(), String> {
    let driver = match options.remove("driver") {
        Some(serde_json::Value::String(d)) => d,
        _ => return Err("Parameter 'driver' is missing".into()),
    };
    let Some(class) = ctx.registry.get(&driver) else {
        return Err(format!(
            "Block driver '{driver}' not found or not supported"
        ));
    };
    if !class.can_blockdev_create() {
        return Err("Driver does not support blockdev-create".into());
    }
    let create = Create {
        class,
        ctx,
        opts: Mutex::new(options),
    };
    let opts = JobOptions {
        auto_finalize: true,
        auto_dismiss: false,
        speed: 0,
    };
    let job = list.create(job_id, Box::new(create), None, opts)?;
    list.start(&job);
    job.settle(0).await;
    Ok(())
}
