//! Strata's command-line tools: `strata-img` (qemu-img) and `strata-io`
//! (qemu-io), drop-in in flags, output and exit codes.

pub mod common;
pub mod getopt;
pub mod img;
pub mod io;
pub mod progress;
pub mod qjson;
pub mod stdout;
