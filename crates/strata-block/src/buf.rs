//! Owned, aligned I/O buffers.
//!
//! An [`IoBuf`] owns a byte range of an aligned allocation. It can be split into
//! disjoint owned parts (one per host extent of a request) and joined back, so a
//! request can be scattered over several kernel operations without copying, and
//! each operation can own its part until its completion arrives.

use crate::buf_pool;
use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of every buffer Strata allocates: enough for O_DIRECT on any
/// device with up to 4 KiB sectors, so no layer copies data just to align it.
pub const MEM_ALIGN: usize = 4096;

struct Chunk {
    ptr: NonNull<u8>,
    from: Source,
}

/// Where a chunk's memory came from, and so where it goes back.
enum Source {
    Malloc(Layout),
    /// A [`buf_pool`] mapping of this size.
    Pool(usize),
}

// SAFETY: the chunk is plain memory; access to its bytes is partitioned among
// the IoBufs that share it, each of which has exclusive use of its own range.
unsafe impl Send for Chunk {}
// SAFETY: as above; shared references to a Chunk never touch its bytes.
unsafe impl Sync for Chunk {}

impl Drop for Chunk {
    fn drop(&mut self) {
        match self.from {
            // SAFETY: allocated in `IoBuf::zeroed` with this very layout.
            Source::Malloc(layout) => unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) },
            // SAFETY: from buf_pool::alloc with this size; the last IoBuf is gone.
            Source::Pool(size) => unsafe { buf_pool::release(self.ptr, size) },
        }
    }
}

/// An owned byte range of an aligned allocation.
///
/// Invariant: the ranges of all live IoBufs of one chunk are disjoint, because
/// an IoBuf is not `Clone` and only [`IoBuf::split_at`] makes two from one.
pub struct IoBuf {
    chunk: Arc<Chunk>,
    start: usize,
    len: usize,
}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes aligned to [`MEM_ALIGN`].
    pub fn zeroed(len: usize) -> IoBuf {
        let chunk = if len >= buf_pool::POOLED_MIN {
            let (ptr, size) = buf_pool::alloc(len);
            Chunk {
                ptr,
                from: Source::Pool(size),
            }
        } else {
            let layout =
                Layout::from_size_align(len.max(1), MEM_ALIGN).expect("buffer size overflow");
            // SAFETY: layout has a non-zero size.
            let ptr = unsafe { alloc::alloc_zeroed(layout) };
            let ptr = NonNull::new(ptr).unwrap_or_else(|| alloc::handle_alloc_error(layout));
            Chunk {
                ptr,
                from: Source::Malloc(layout),
            }
        };
        IoBuf {
            chunk: Arc::new(chunk),
            start: 0,
            len,
        }
    }

    /// An aligned copy of `data`.
    pub fn from_slice(data: &[u8]) -> IoBuf {
        let mut b = IoBuf::zeroed(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    /// A buffer of `len` bytes, each `byte`.
    pub fn filled(len: usize, byte: u8) -> IoBuf {
        let mut b = IoBuf::zeroed(len);
        if byte != 0 {
            b.as_mut_slice().fill(byte);
        }
        b
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Address of the first byte, for the kernel.
    pub fn as_ptr(&self) -> *const u8 {
        // SAFETY: start <= allocation size.
        unsafe { self.chunk.ptr.as_ptr().add(self.start) }
    }

    /// Mutable address of the first byte, for the kernel.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: start <= allocation size.
        unsafe { self.chunk.ptr.as_ptr().add(self.start) }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: this IoBuf has exclusive ownership of [start, start+len) (see
        // the type invariant) and the chunk outlives the borrow.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len;
        // SAFETY: as in `as_slice`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), len) }
    }

    /// True when the address is a multiple of `align`.
    pub fn is_aligned(&self, align: usize) -> bool {
        (self.as_ptr() as usize).is_multiple_of(align.max(1))
    }

    /// Splits into `[0, at)` and `[at, len)`, each owned on its own.
    pub fn split_at(self, at: usize) -> (IoBuf, IoBuf) {
        assert!(at <= self.len, "split beyond the end of an IoBuf");
        let tail = IoBuf {
            chunk: Arc::clone(&self.chunk),
            start: self.start + at,
            len: self.len - at,
        };
        let head = IoBuf {
            chunk: self.chunk,
            start: self.start,
            len: at,
        };
        (head, tail)
    }

    /// Joins two parts that are neighbours in the same allocation, as `split_at` made them.
    pub fn join(self, tail: IoBuf) -> Result<IoBuf, (IoBuf, IoBuf)> {
        if Arc::ptr_eq(&self.chunk, &tail.chunk) && self.start + self.len == tail.start {
            Ok(IoBuf {
                chunk: self.chunk,
                start: self.start,
                len: self.len + tail.len,
            })
        } else {
            Err((self, tail))
        }
    }

    /// Splits a buffer meant for `offset` into consecutive pieces, each with
    /// its own offset; `piece(off, left)` says how long the piece at `off`
    /// may be (at least 1 byte, at most `left`). Every loop that cuts a
    /// request at a limit or a boundary goes through here.
    pub fn pieces<F: FnMut(u64, usize) -> usize>(self, offset: u64, piece: F) -> Pieces<F> {
        Pieces {
            rest: Some(self),
            offset,
            piece,
        }
    }

    /// Splits into consecutive parts of the given lengths (which must sum to `len`).
    pub fn split_into(self, lens: &[usize]) -> Vec<IoBuf> {
        let mut parts = Vec::with_capacity(lens.len());
        let mut rest = self;
        for &l in lens {
            let (h, t) = rest.split_at(l);
            parts.push(h);
            rest = t;
        }
        assert!(
            rest.is_empty(),
            "split_into lengths do not cover the buffer"
        );
        parts
    }

    /// Joins parts made by `split_into`, in order.
    pub fn join_all(parts: Vec<IoBuf>) -> IoBuf {
        let mut it = parts.into_iter();
        let mut acc = it.next().unwrap_or_else(|| IoBuf::zeroed(0));
        for p in it {
            acc = match acc.join(p) {
                Ok(j) => j,
                // Parts from different allocations: copy once into a new buffer.
                Err((a, b)) => {
                    let mut n = IoBuf::zeroed(a.len() + b.len());
                    n.as_mut_slice()[..a.len()].copy_from_slice(a.as_slice());
                    n.as_mut_slice()[a.len()..].copy_from_slice(b.as_slice());
                    n
                }
            };
        }
        acc
    }

    /// True when every byte is zero (detect-zeroes, `qemu-img compare`).
    pub fn is_zero(&self) -> bool {
        is_zero(self.as_slice())
    }
}

/// True when every byte of `data` is zero (QEMU: buffer_is_zero). It looks
/// at the first bytes first, then at 256-byte blocks, each the OR of 32
/// words (which the optimiser vectorises), stopping at the first block that
/// is not zero: data buffers are rejected at once, zero buffers are scanned
/// at memory speed.
pub fn is_zero(data: &[u8]) -> bool {
    const BLOCK: usize = 256;
    let (head, rest) = data.split_at(data.len().min(16));
    if head.iter().any(|&b| b != 0) {
        return false;
    }
    let blocks = rest.chunks_exact(BLOCK);
    let tail = blocks.remainder();
    for block in blocks {
        let mut acc = 0u64;
        for w in block.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        if acc != 0 {
            return false;
        }
    }
    tail.iter().all(|&b| b == 0)
}

/// The pieces of [`IoBuf::pieces`], in order.
pub struct Pieces<F> {
    rest: Option<IoBuf>,
    offset: u64,
    piece: F,
}

impl<F: FnMut(u64, usize) -> usize> Iterator for Pieces<F> {
    type Item = (u64, IoBuf);
    fn next(&mut self) -> Option<(u64, IoBuf)> {
        let rest = self.rest.take().filter(|r| !r.is_empty())?;
        let n = (self.piece)(self.offset, rest.len()).clamp(1, rest.len());
        let (head, tail) = rest.split_at(n);
        let at = self.offset;
        self.offset += n as u64;
        self.rest = Some(tail);
        Some((at, head))
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cut_at_boundaries_and_join_back() {
        let mut b = IoBuf::zeroed(10_000);
        b.as_mut_slice()
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = i as u8);
        let want = b.as_slice().to_vec();
        let cuts: Vec<(u64, usize)> = IoBuf::from_slice(&want)
            .pieces(3000, |off, left| ((4096 - off % 4096) as usize).min(left))
            .map(|(o, p)| (o, p.len()))
            .collect();
        assert_eq!(
            cuts,
            vec![(3000, 1096), (4096, 4096), (8192, 4096), (12288, 712)]
        );
        let parts = b
            .pieces(0, |_, left| left.min(3000))
            .map(|(_, p)| p)
            .collect();
        assert_eq!(IoBuf::join_all(parts).as_slice(), &want[..]);
        assert_eq!(IoBuf::zeroed(0).pieces(0, |_, l| l).count(), 0);
    }

    #[test]
    fn split_and_join_round_trip() {
        let mut b = IoBuf::zeroed(8192);
        assert!(b.is_aligned(MEM_ALIGN));
        b.as_mut_slice()[4096] = 7;
        let (h, t) = b.split_at(4096);
        assert_eq!(t.as_slice()[0], 7);
        assert!(t.is_aligned(4096));
        let j = h.join(t).unwrap();
        assert_eq!(j.len(), 8192);
        assert_eq!(j.as_slice()[4096], 7);
    }

    #[test]
    fn split_into_many() {
        let b = IoBuf::filled(10, 3);
        let parts = b.split_into(&[2, 0, 8]);
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            vec![2, 0, 8]
        );
        assert_eq!(IoBuf::join_all(parts).len(), 10);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 37]));
        let mut v = vec![0u8; 37];
        v[36] = 1;
        assert!(!is_zero(&v));
    }
}
