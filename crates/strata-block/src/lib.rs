//! Strata's block core: nodes and their request path, the driver traits and
//! registry, options, owned I/O buffers, I/O engines and event loops.
//!
//! It knows no driver by name; drivers register in a [`Registry`].

pub mod backend;
pub mod bitmap;
pub mod blockers;
pub mod buf;
mod buf_pool;
mod chain;
mod copy_on_read;
pub mod create_existing;
pub mod create_opts;
pub mod debug;
pub mod driver;
pub mod engine;
pub mod error;
pub mod event_loop;
pub mod filename;
pub mod graph;
pub mod img_create;
pub mod info;
pub mod node;
pub mod open;
pub mod options;
pub mod perm;
pub mod poll;
pub mod qjson;
pub mod reopen;
pub mod report;
pub mod snapshot;
pub mod status;
mod temp_overlay;
pub mod tracked;

pub use backend::Backend;
pub use bitmap::{DirtyBitmap, DirtyBitmaps, HBitmap};
pub use blockers::{BlockOp, Blocker};
pub use buf::IoBuf;
pub use debug::DebugEvent;
pub use driver::{
    CheckResult, Child, ChildCell, ChildRole, Driver, DriverClass, Limits, Measure, Perm,
    Preallocation, RepairMode, WriteFlags,
};
pub use error::{Error, Result};
pub use event_loop::{EventLoop, IoThread, LoopHandle};
pub use graph::Graph;
pub use node::{
    drain_begin, drained, drained_async, drop_intermediate, replace_node, BeforeWrite, CacheMode,
    DetectZeroes, DrainGuard, FrozenChain, Node, NodeOptions, ThresholdExceeded, WriteKind,
    WriteReq,
};
pub use open::{OpenCtx, OpenFlags, Registry};
pub use options::Opts;
pub use status::BlockStatus;
