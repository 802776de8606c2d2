//! Large I/O buffers, each its own mapping, kept for reuse.
//!
//! Requests of hundreds of KiB come and go by the thousand a second. From
//! malloc they either fault fresh pages in every time (above its mmap
//! threshold) or, once glibc has raised that threshold, fragment its heap:
//! an NBD server that never had more than 1 MiB of requests in flight was
//! seen holding an 18 MiB heap. Here a large buffer is a mapping of a
//! power-of-two size; a freed one waits in the free list of its size for
//! the next request, and at most [`IDLE_MAX`] bytes wait in all: the rest is
//! unmapped, so what a burst took goes back to the system.

use std::ptr::NonNull;
use std::sync::Mutex;

/// Buffers from this size up come from here; smaller ones from malloc,
/// which packs them well below its default mmap threshold.
pub const POOLED_MIN: usize = 128 << 10;
/// Sizes of the free lists: 128 KiB to 32 MiB (NBD's largest request).
const CLASSES: usize = 9;
/// Idle bytes kept for reuse, across all sizes: convert keeps 8 requests
/// of 2 MiB in flight, whose buffers faulted fresh zeroed pages in every
/// time under a 4 MiB cap.
const IDLE_MAX: usize = 32 << 20;

struct Pool {
    /// Free mappings (addresses) per size class, most recently freed last.
    free: [Vec<usize>; CLASSES],
    idle: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: [const { Vec::new() }; CLASSES],
    idle: 0,
});

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    // The lists stay consistent whatever panicked while holding the lock.
    POOL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The mapping size for a buffer of `len` bytes and its class, if pooled.
fn size_of(len: usize) -> (usize, Option<usize>) {
    if len > POOLED_MIN << (CLASSES - 1) {
        // Beyond the largest class: mapped to the page, never kept.
        return (len.next_multiple_of(page_size()), None);
    }
    let size = len.max(POOLED_MIN).next_power_of_two();
    let class = (size.trailing_zeros() - POOLED_MIN.trailing_zeros()) as usize;
    (size, Some(class))
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory arguments.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// A zero-filled, page-aligned buffer of at least `len` (>= [`POOLED_MIN`])
/// bytes; returns it with its mapping size, to give to [`release`].
pub fn alloc(len: usize) -> (NonNull<u8>, usize) {
    let (size, class) = size_of(len);
    if let Some(c) = class {
        let reused = {
            let mut p = pool();
            let a = p.free[c].pop();
            if a.is_some() {
                p.idle -= size;
            }
            a
        };
        if let Some(addr) = reused {
            let ptr = addr as *mut u8;
            // SAFETY: a free mapping of `size` >= len bytes, now ours alone.
            unsafe { std::ptr::write_bytes(ptr, 0, len) };
            // SAFETY: mappings are never at address 0.
            return (unsafe { NonNull::new_unchecked(ptr) }, size);
        }
    }
    // SAFETY: an anonymous private mapping; no memory of ours is involved.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        let layout =
            std::alloc::Layout::from_size_align(size, page_size()).expect("buffer size overflow");
        std::alloc::handle_alloc_error(layout);
    }
    // SAFETY: mmap succeeded, so ptr is not null.
    (unsafe { NonNull::new_unchecked(ptr.cast()) }, size)
}

/// Gives back a buffer from [`alloc`].
///
/// # Safety
/// `ptr` and `size` come from one call of [`alloc`], and nothing uses the
/// buffer any more (the kernel included).
pub unsafe fn release(ptr: NonNull<u8>, size: usize) {
    if let (_, Some(c)) = size_of(size) {
        let mut p = pool();
        if p.idle + size <= IDLE_MAX {
            p.idle += size;
            p.free[c].push(ptr.as_ptr() as usize);
            return;
        }
    }
    // SAFETY: the caller gives back a whole mapping it no longer uses.
    unsafe { libc::munmap(ptr.as_ptr().cast(), size) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_to_classes_and_large_ones_to_pages() {
        assert_eq!(size_of(POOLED_MIN), (POOLED_MIN, Some(0)));
        assert_eq!(size_of(POOLED_MIN + 1), (2 * POOLED_MIN, Some(1)));
        assert_eq!(size_of(1 << 20), (1 << 20, Some(3)));
        assert_eq!(size_of(32 << 20), (32 << 20, Some(8)));
        assert_eq!(size_of((32 << 20) + 1), ((32 << 20) + 4096, None));
    }

    #[test]
    fn a_reused_buffer_is_zeroed_and_the_idle_bytes_stay_bounded() {
        // Sizes no other test of this crate uses, so the lists are ours.
        // Two buffers of the largest class (as much as may idle): the first
        // is kept, the second would pass the cap and is unmapped.
        let len = 32 << 20;
        let (a, size) = alloc(len);
        let (b, _) = alloc(len);
        // SAFETY: a has `size` bytes.
        unsafe { std::ptr::write_bytes(a.as_ptr(), 0xab, size) };
        unsafe { release(a, size) };
        unsafe { release(b, size) };
        assert_eq!(pool().free[8].len(), 1);
        let (a, size) = alloc(len);
        unsafe { release(a, size) };

        let len = 3 << 18; // 768 KiB, in the 1 MiB class
        let (b, size) = alloc(len);
        assert_eq!(size, 1 << 20);
        // SAFETY: b has `size` bytes.
        unsafe { std::ptr::write_bytes(b.as_ptr(), 0xcd, size) };
        unsafe { release(b, size) };
        let (c, size) = alloc(len);
        // SAFETY: c has `size` >= len bytes.
        let bytes = unsafe { std::slice::from_raw_parts(c.as_ptr(), len) };
        assert!(
            bytes.iter().all(|&x| x == 0),
            "stale data in a reused buffer"
        );
        unsafe { release(c, size) };
        assert!(pool().idle <= IDLE_MAX);
    }
}
