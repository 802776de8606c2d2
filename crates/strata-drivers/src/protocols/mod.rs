//! Protocol drivers: where an image's bytes live.

pub mod file;
mod lock;
pub mod nbd;
pub mod null;
