//! qemu-io's command language.

/// Entry point of `strata-io`; returns the exit code.
pub fn main() -> i32 {
    let _reg = crate::common::init();
    1
}
