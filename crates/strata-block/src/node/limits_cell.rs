//! A node's limits, read by every request and changed only when the graph
//! under the node changes: a sequence lock over atomics, so a read is a few
//! plain loads and never takes a lock (QEMU reads bs->bl without one).

use crate::driver::Limits;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

pub(super) struct LimitsCell {
    /// Odd while a writer is changing the fields.
    seq: AtomicU64,
    writer: Mutex<()>,
    request_alignment: AtomicU32,
    memory_alignment: AtomicU32,
    max_transfer: AtomicU64,
    discard_alignment: AtomicU32,
    max_discard: AtomicU64,
    write_zeroes_alignment: AtomicU32,
    max_write_zeroes: AtomicU64,
}

impl LimitsCell {
    pub(super) fn new(l: Limits) -> LimitsCell {
        LimitsCell {
            seq: AtomicU64::new(0),
            writer: Mutex::new(()),
            request_alignment: AtomicU32::new(l.request_alignment),
            memory_alignment: AtomicU32::new(l.memory_alignment),
            max_transfer: AtomicU64::new(l.max_transfer),
            discard_alignment: AtomicU32::new(l.discard_alignment),
            max_discard: AtomicU64::new(l.max_discard),
            write_zeroes_alignment: AtomicU32::new(l.write_zeroes_alignment),
            max_write_zeroes: AtomicU64::new(l.max_write_zeroes),
        }
    }

    /// The limits, all from one version.
    pub(super) fn get(&self) -> Limits {
        loop {
            let before = self.seq.load(Ordering::Acquire);
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let l = Limits {
                request_alignment: self.request_alignment.load(Ordering::Relaxed),
                memory_alignment: self.memory_alignment.load(Ordering::Relaxed),
                max_transfer: self.max_transfer.load(Ordering::Relaxed),
                discard_alignment: self.discard_alignment.load(Ordering::Relaxed),
                max_discard: self.max_discard.load(Ordering::Relaxed),
                write_zeroes_alignment: self.write_zeroes_alignment.load(Ordering::Relaxed),
                max_write_zeroes: self.max_write_zeroes.load(Ordering::Relaxed),
            };
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == before {
                return l;
            }
        }
    }

    pub(super) fn set(&self, l: Limits) {
        let _one_writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        self.seq.fetch_add(1, Ordering::AcqRel);
        fence(Ordering::Release);
        self.request_alignment
            .store(l.request_alignment, Ordering::Relaxed);
        self.memory_alignment
            .store(l.memory_alignment, Ordering::Relaxed);
        self.max_transfer.store(l.max_transfer, Ordering::Relaxed);
        self.discard_alignment
            .store(l.discard_alignment, Ordering::Relaxed);
        self.max_discard.store(l.max_discard, Ordering::Relaxed);
        self.write_zeroes_alignment
            .store(l.write_zeroes_alignment, Ordering::Relaxed);
        self.max_write_zeroes
            .store(l.max_write_zeroes, Ordering::Relaxed);
        self.seq.fetch_add(1, Ordering::Release);
    }
}
