//! Filter drivers: nodes that pass requests to a child and change how they
//! go (fail them, hold them, check them, copy them).

pub mod blkdebug;
mod rules;
