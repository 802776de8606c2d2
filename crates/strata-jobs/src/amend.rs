//! `x-blockdev-amend` (QEMU: block/amend.c): an open image's options
//! changed by its driver (the key slots of LUKS encryption), as a job of
//! type `amend` that its user dismisses. One step of progress, done
//! whether or not the change was made.

use crate::job::{Job, JobDriver, JobError, JobOptions};
use crate::list::JobList;
use crate::state::JobType;
use async_trait::async_trait;
use std::sync::{Arc, Mutex};
use strata_block::options::Opts;
use strata_block::{Graph, Node};

struct Amend {
    node: Arc<Node>,
    force: bool,
    /// The options, taken by the one run.
    opts: Mutex<Opts>,
}

#[async_trait]
impl JobDriver for Amend {
    fn job_type(&self) -> JobType {
        JobType::Amend
    }

    async fn run(&self, job: &Arc<Job>) -> Result<(), JobError> {
        job.progress_set_remaining(1);
        let opts = std::mem::take(&mut *self.opts.lock().unwrap_or_else(|e| e.into_inner()));
        let checked = self.node.driver().blockdev_amend_check(&opts);
        if let Err(e) = checked {
            job.progress_update(1);
            return Err(JobError::reported(e));
        }
        // The command is answered from here, as QEMU's once its I/O starts.
        job.yield_for_io();
        // The image's metadata changes under no request of its users.
        let drained = strata_block::drain_begin(std::slice::from_ref(&self.node)).await;
        let r = self.node.driver().blockdev_amend(opts, self.force).await;
        drop(drained);
        job.progress_update(1);
        r.map_err(JobError::reported)
    }
}

/// Starts an `x-blockdev-amend` job on the node `node_name`, after QEMU's
/// checks in QEMU's order.
pub async fn x_blockdev_amend(
    list: &Arc<JobList>,
    graph: &Graph,
    job_id: &str,
    node_name: &str,
    mut options: Opts,
    force: bool,
) -> Result<(), String> {
    let node = crate::node_named(graph, node_name)?;
    let driver = match options.remove("driver") {
        Some(serde_json::Value::String(d)) => d,
        _ => return Err("Parameter 'driver' is missing".into()),
    };
    if node.format_name() != driver {
        return Err("x-blockdev-amend doesn't support changing the block driver".into());
    }
    if !node.driver().can_blockdev_amend() {
        return Err("Driver does not support x-blockdev-amend".into());
    }
    let amend = Amend {
        node,
        force,
        opts: Mutex::new(options),
    };
    let opts = JobOptions {
        auto_finalize: true,
        auto_dismiss: false,
        speed: 0,
    };
    let job = list.create(job_id, Box::new(amend), None, opts)?;
    list.start(&job);
    job.settle(0).await;
    Ok(())
}
