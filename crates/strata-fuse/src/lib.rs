//! FUSE exports (QEMU: block/export/fuse.c): a node's disk shown as one
//! regular file on a mount point, so any program can read and write it.
//! The kernel protocol is spoken directly on `/dev/fuse` from the event
//! loop (no libfuse, no thread per request), and the disk is reached
//! through a user handle only; this crate knows no driver.

pub mod export;
mod mount;
pub mod proto;

pub use export::{AllowOther, FuseExport, FuseOptions};
