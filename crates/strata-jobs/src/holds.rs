//! What a block job holds on the nodes it works on (QEMU:
//! block_job_add_bdrv): a user handle on each, taking and sharing what the
//! job needs, and the job's op blocker, so other jobs and graph changes
//! are refused with the job's reason until it lets go.

use std::sync::{Arc, Mutex};
use strata_block::driver::Perm;
use strata_block::{Backend, Blocker, Node};

pub(crate) struct Holds {
    held: Mutex<Vec<(Arc<Node>, Arc<Backend>)>>,
    blocker: Arc<Blocker>,
}

impl Holds {
    /// Holds for a job of `kind` (`stream`, `commit`): the op blockers
    /// say so.
    pub(crate) fn new(kind: &str) -> Holds {
        Holds {
            held: Mutex::new(Vec::new()),
            blocker: Blocker::new(format!("block device is in use by block job: {kind}")),
        }
    }

    /// Holds `node` for the job `desc` as its `role` (`main node`, `base`),
    /// taking `perm` and sharing `shared`.
    pub(crate) fn hold(
        &self,
        node: &Arc<Node>,
        desc: &str,
        role: &str,
        perm: Perm,
        shared: Perm,
    ) -> Result<(), String> {
        let b = Backend::job_hold(node, desc, role, perm, shared).map_err(|e| e.to_string())?;
        node.blockers().block_all(&self.blocker);
        self.lock().push((Arc::clone(node), Arc::new(b)));
        Ok(())
    }

    /// Lets go of every node (QEMU: block_job_remove_all_bdrv).
    pub(crate) async fn release(&self) {
        let held = std::mem::take(&mut *self.lock());
        for (node, b) in held {
            node.blockers().unblock_all(&self.blocker);
            let _ = b.close().await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Arc<Node>, Arc<Backend>)>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}
