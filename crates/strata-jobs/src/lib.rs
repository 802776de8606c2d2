//! Strata's jobs (QEMU: job.c, blockjob.c and the jobs in block/): one state
//! machine with QEMU's states, verbs and events ([`Job`]), the daemon's list
//! of jobs ([`JobList`]), and the jobs themselves. A job reaches the graph
//! only through the core's user handles and op blockers; the daemon wires
//! the list to QMP.

pub mod job;
pub mod list;
pub mod ratelimit;
pub mod state;
pub mod stream;

pub use job::{ErrorAction, Job, JobDriver, JobError, JobOptions, OnError};
pub use list::{EventSink, JobList};
pub use state::{JobStatus, JobType, JobVerb};
pub use stream::{block_stream, StreamArgs};
