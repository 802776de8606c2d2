//! Small buffered writes done on the event loop's own thread, and on
//! tmpfs small reads too.
//!
//! A buffered write is a copy into the page cache, a few microseconds. But
//! most filesystems (ext4 among them) cannot promise it will not block, so
//! io_uring hands every one to a kernel worker and the completion comes back
//! through a wake-up: that round trip costs more than the copy (4 KiB writes
//! over NBD run 1.6 times faster inline, `scripts/bench-nbd`). A write that
//! does block (dirty-page throttling, reclaim, a full journal) stalls every
//! request of the loop while it lasts, so one that takes longer than
//! [`SLOW`] sends the file's writes back to the ring for [`BACKOFF`].
//!
//! tmpfs does the same to reads: io_uring gives each to a kernel worker,
//! and a chain of small metadata reads (65,536 snapshot tables) took 15 s
//! instead of 1 s on ext4, where a read from the page cache is served in
//! place.

use super::{threads, Fd, FileOp};
use crate::buf::IoBuf;
use crate::error::Result;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Largest write done inline: beyond it the copy itself is worth the other
/// core, and the handoff is a small part of the time.
pub const INLINE_MAX: usize = 64 << 10;
/// An inline write this long blocked somewhere in the kernel.
pub const SLOW: Duration = Duration::from_millis(1);
/// How long a file's writes go through the ring after a slow one.
pub const BACKOFF: Duration = Duration::from_secs(1);

/// The inline-write policy of one buffered file.
#[derive(Debug, Default)]
pub struct InlineWrites {
    /// Until this time (ns since [`epoch`]) writes go through the ring.
    ring_until: AtomicU64,
    /// Small reads are done inline too (a file on tmpfs).
    reads: bool,
}

/// Nanoseconds since the first call: a clock an atomic can hold.
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

impl InlineWrites {
    /// The policy of a file whose small reads are done inline too.
    pub fn with_reads() -> InlineWrites {
        InlineWrites {
            reads: true,
            ..InlineWrites::default()
        }
    }

    /// Whether `op` should be done inline now: a small write (or read, with
    /// `reads`), on a thread that runs an event loop (elsewhere the thread
    /// pool serves anyway), outside a backoff.
    pub fn takes(&self, op: &FileOp) -> bool {
        let small = match op {
            FileOp::Write(_, b) => b.len() <= INLINE_MAX,
            FileOp::Read(_, b) => self.reads && b.len() <= INLINE_MAX,
            _ => false,
        };
        small
            && super::on_ring_thread()
            // No clock read while no write was ever slow.
            && (self.ring_until.load(Ordering::Relaxed) == 0 || self.allowed_at(now_ns()))
    }

    /// Does the request with a blocking system call, timing it.
    pub fn run(&self, fd: &Fd, op: FileOp) -> (Result<usize>, Option<IoBuf>) {
        let start = now_ns();
        let r = threads::blocking(fd, op);
        self.note(start, now_ns().saturating_sub(start));
        r
    }

    fn allowed_at(&self, now: u64) -> bool {
        now >= self.ring_until.load(Ordering::Relaxed)
    }

    /// Records that a write started at `start` took `took` ns.
    fn note(&self, start: u64, took: u64) {
        if took > SLOW.as_nanos() as u64 {
            let until = start + took + BACKOFF.as_nanos() as u64;
            self.ring_until.fetch_max(until, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_write_sends_writes_to_the_ring_for_the_backoff() {
        let w = InlineWrites::default();
        assert!(w.allowed_at(0));
        w.note(10, 20_000);
        assert!(w.allowed_at(50), "a fast write changes nothing");
        let slow = SLOW.as_nanos() as u64 + 1;
        w.note(100, slow);
        let end = 100 + slow + BACKOFF.as_nanos() as u64;
        assert!(!w.allowed_at(100 + slow));
        assert!(!w.allowed_at(end - 1));
        assert!(w.allowed_at(end));
    }

    #[test]
    fn only_small_writes_on_a_loop_thread_go_inline() {
        let w = InlineWrites::default();
        // No event loop on this thread: the ring is not there to avoid.
        assert!(!w.takes(&FileOp::Write(0, IoBuf::zeroed(4096))));
        let el = crate::EventLoop::new().unwrap();
        el.block_on(async {
            assert!(w.takes(&FileOp::Write(0, IoBuf::zeroed(4096))));
            assert!(w.takes(&FileOp::Write(0, IoBuf::zeroed(INLINE_MAX))));
            assert!(!w.takes(&FileOp::Write(0, IoBuf::zeroed(INLINE_MAX + 1))));
            assert!(!w.takes(&FileOp::Read(0, IoBuf::zeroed(4096))));
            assert!(!w.takes(&FileOp::Flush));
            let tmpfs = InlineWrites::with_reads();
            assert!(tmpfs.takes(&FileOp::Read(0, IoBuf::zeroed(4096))));
            assert!(!tmpfs.takes(&FileOp::Read(0, IoBuf::zeroed(INLINE_MAX + 1))));
        });
    }
}
