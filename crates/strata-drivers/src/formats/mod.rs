//! Image formats: how an image's bytes map to a virtual disk.

pub mod qcow2;
pub mod raw;
