//! Dirty bitmaps (QEMU: HBitmap and BdrvDirtyBitmap): which parts of a
//! disk were written since some point, for incremental backup, mirror and
//! NBD's `qemu:dirty-bitmap` context. `hbitmap` is the bit structure (a
//! bottom level of bits with summary levels above, so updates cost
//! O(log n) and empty regions are skipped whole); `dirty` is a node's set
//! of named bitmaps with their states, fed by the write funnel.

mod dirty;
mod hbitmap;

pub use dirty::{Check, DirtyBitmap, DirtyBitmaps, DirtyInfo};
pub use hbitmap::HBitmap;
