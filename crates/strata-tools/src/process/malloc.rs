//! The C allocator's thresholds for a block layer's buffers.
//!
//! Request buffers (up to a few MiB, 4 KiB-aligned) come and go with every
//! request. Above glibc's mmap threshold each one was a fresh mmap, 64 page
//! faults to zero it and a munmap: a third of a server's time copying a
//! disk (strace: one mmap and one munmap per 256 KiB read of nbdcopy).
//! Kept on the heap instead, freed buffers are reused warm.

/// Buffers up to this size come from the heap; the heap keeps this much
/// free at its top before giving memory back.
const HEAP_BUFFERS: i32 = 32 << 20;

/// Sets the thresholds, once, before any buffer is allocated.
pub fn tune() {
    // SAFETY: mallopt only changes allocator parameters; called at start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, HEAP_BUFFERS);
        libc::mallopt(libc::M_TRIM_THRESHOLD, HEAP_BUFFERS);
    }
}
