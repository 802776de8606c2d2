//! Filter drivers: nodes that pass requests to a child and change how they
//! go (fail them, hold them, check them, copy them).

pub mod blkdebug;
pub mod blklogwrites;
pub mod blkverify;
pub mod compress;
pub mod copy_on_read;
pub mod quorum;
mod rules;
pub mod throttle;
