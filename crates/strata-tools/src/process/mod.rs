//! What a tool does as a process: detach from the terminal (`--daemonize`,
//! `--fork`) and announce itself in a PID file.

pub mod daemonize;
pub mod pidfile;
