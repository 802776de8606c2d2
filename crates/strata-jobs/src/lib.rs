//! Strata's jobs (QEMU: job.c, blockjob.c and the jobs in block/): one state
//! machine with QEMU's states, verbs and events ([`Job`]), the daemon's list
//! of jobs ([`JobList`]), and the jobs themselves. A job reaches the graph
//! only through the core's user handles and op blockers; the daemon wires
//! the list to QMP.

mod amend;
pub mod backup;
mod chunks;
pub mod commit;
mod commit_top;
mod create;
mod filter_node;
mod holds;
pub mod job;
pub mod list;
pub mod mirror;
pub mod ratelimit;
pub mod state;
pub mod stream;

pub use amend::x_blockdev_amend;
pub use backup::{
    backup_prepare, blockdev_backup, drive_backup, drive_backup_prepare, BackupArgs, BackupPerf,
    DriveBackupArgs,
};
pub use commit::{block_commit, CommitArgs};
pub use create::blockdev_create;
pub use job::{ErrorAction, Job, JobDriver, JobError, JobOptions, JobTxn, OnError};
pub use list::{EventSink, JobList};
pub use mirror::{blockdev_mirror, drive_mirror, DriveMirrorArgs, MirrorArgs};
pub use state::{JobStatus, JobType, JobVerb};
pub use stream::{block_stream, StreamArgs};

/// Why a job command was refused: QEMU's error class and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    Generic(String),
    /// The `device` argument names nothing (libvirt probes for this class).
    DeviceNotFound(String),
}

impl From<String> for Refused {
    fn from(s: String) -> Refused {
        Refused::Generic(s)
    }
}

impl From<&str> for Refused {
    fn from(s: &str) -> Refused {
        Refused::Generic(s.to_string())
    }
}

/// A node by node name only, as `base-node`, `top-node` and `bottom` name
/// one (QEMU: bdrv_lookup_bs(NULL, name)).
fn node_named(
    graph: &strata_block::Graph,
    name: &str,
) -> Result<std::sync::Arc<strata_block::Node>, String> {
    graph
        .find(name)
        .ok_or_else(|| format!("Cannot find device='' nor node-name='{name}'"))
}
