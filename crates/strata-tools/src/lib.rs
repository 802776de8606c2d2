//! Strata's command-line tools: `strata-img` (qemu-img), `strata-io`
//! (qemu-io) and `strata-daemon` (qemu-storage-daemon), drop-in in flags,
//! output and exit codes.

pub mod common;
pub mod daemon;
pub mod getopt;
pub mod img;
pub mod io;
pub mod nbd;
pub mod process;
pub mod progress;
pub mod qjson;
pub mod stdout;
