//! What a tool does as a process: tune the allocator for its buffers,
//! detach from the terminal (`--daemonize`, `--fork`) and announce itself
//! in a PID file.

pub mod daemonize;
pub mod malloc;
pub mod pidfile;
