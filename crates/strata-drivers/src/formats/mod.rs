//! Image formats: how an image's bytes map to a virtual disk.

pub(crate) mod crypto;
pub mod luks;
pub mod qcow2;
pub mod raw;
pub mod vdi;
