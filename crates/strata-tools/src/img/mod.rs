//! qemu-img's subcommands.

/// Entry point of `strata-img`; returns the exit code.
pub fn main() -> i32 {
    let _reg = crate::common::init();
    1
}
