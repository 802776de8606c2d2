//! A hierarchical bitmap (QEMU: HBitmap): one bit per `granularity` bytes
//! of a disk, with levels above where a bit says "this word below is not
//! all zeroes". Setting or clearing one bit costs O(log n); finding the
//! next set bit skips empty regions a word of the level above at a time,
//! so a sparse bitmap of a large disk is cheap to walk.

/// Bits in a word.
const W: u64 = 64;

/// A hierarchical bitmap over `size` bytes of a disk.
#[derive(Clone, Debug)]
pub struct HBitmap {
    size: u64,
    granularity: u64,
    /// `levels[0]` holds the bits; `levels[k+1]` bit i says `levels[k][i] != 0`.
    levels: Vec<Vec<u64>>,
    /// Set bits in `levels[0]`.
    set_bits: u64,
}

impl HBitmap {
    /// An empty bitmap of `size` bytes, one bit per `granularity` bytes (a
    /// power of two).
    pub fn new(size: u64, granularity: u64) -> HBitmap {
        let mut b = HBitmap {
            size,
            granularity,
            levels: Vec::new(),
            set_bits: 0,
        };
        b.build_levels(Vec::new());
        b
    }

    fn bits(&self) -> u64 {
        self.size.div_ceil(self.granularity)
    }

    /// Lays the levels out for the current size, keeping `bottom`'s bits.
    fn build_levels(&mut self, mut bottom: Vec<u64>) {
        let bits = self.bits();
        bottom.resize(bits.div_ceil(W).max(1) as usize, 0);
        // Bits past the end never count.
        if !bits.is_multiple_of(W) {
            let last = bottom.len() - 1;
            bottom[last] &= (1u64 << (bits % W)) - 1;
        }
        if bits == 0 {
            bottom[0] = 0;
        }
        self.set_bits = bottom.iter().map(|w| w.count_ones() as u64).sum();
        self.levels = vec![bottom];
        while self.levels.last().is_some_and(|l| l.len() > 1) {
            let below = self.levels.last().map(Vec::as_slice).unwrap_or_default();
            let mut up = vec![0u64; below.len().div_ceil(W as usize)];
            for (i, w) in below.iter().enumerate() {
                if *w != 0 {
                    up[i / W as usize] |= 1 << (i as u64 % W);
                }
            }
            self.levels.push(up);
        }
    }

    /// The disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// The bits covering `[offset, offset+len)`, clipped to the size.
    fn bit_range(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return None;
        }
        Some((offset / self.granularity, end.div_ceil(self.granularity)))
    }

    /// Sets or clears bits `[first, last)` and fixes the levels above.
    fn update(&mut self, first: u64, last: u64, set: bool) {
        let mut i = first;
        while i < last {
            let word = (i / W) as usize;
            let lo = i % W;
            let hi = (last - word as u64 * W).min(W);
            let mask = if hi - lo == W {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let old = self.levels[0][word];
            let new = if set { old | mask } else { old & !mask };
            if new != old {
                self.levels[0][word] = new;
                self.set_bits = self.set_bits + new.count_ones() as u64 - old.count_ones() as u64;
                if (old == 0) != (new == 0) {
                    self.propagate(word, new != 0);
                }
            }
            i = word as u64 * W + hi;
        }
    }

    /// Word `index` of level 0 became (non-)zero: tell the levels above.
    fn propagate(&mut self, mut index: usize, mut nonzero: bool) {
        for k in 1..self.levels.len() {
            let (w, b) = (index / W as usize, index as u64 % W);
            let old = self.levels[k][w];
            let new = if nonzero {
                old | 1 << b
            } else {
                old & !(1 << b)
            };
            self.levels[k][w] = new;
            if (old == 0) == (new == 0) {
                return;
            }
            index = w;
            nonzero = new != 0;
        }
    }

    /// Marks `[offset, offset+len)` dirty (whole granules).
    pub fn set(&mut self, offset: u64, len: u64) {
        if let Some((a, b)) = self.bit_range(offset, len) {
            self.update(a, b, true);
        }
    }

    /// Marks `[offset, offset+len)` clean (whole granules it touches).
    pub fn reset(&mut self, offset: u64, len: u64) {
        if let Some((a, b)) = self.bit_range(offset, len) {
            self.update(a, b, false);
        }
    }

    /// Marks everything clean.
    pub fn clear(&mut self) {
        for l in &mut self.levels {
            l.fill(0);
        }
        self.set_bits = 0;
    }

    /// True when the granule holding `offset` is dirty.
    pub fn get(&self, offset: u64) -> bool {
        if offset >= self.size {
            return false;
        }
        let i = offset / self.granularity;
        self.levels[0][(i / W) as usize] & (1 << (i % W)) != 0
    }

    /// Dirty bytes, counted in whole granules, a partial last one included,
    /// as QEMU counts them (hbitmap_count: dirty bits times the granularity).
    pub fn count(&self) -> u64 {
        self.set_bits * self.granularity
    }

    /// True when nothing is dirty.
    pub fn is_empty(&self) -> bool {
        self.set_bits == 0
    }

    /// The first set bit of level `k` at or after bit `from` (a bit of
    /// level k stands for a word of level k-1).
    fn next_set_at(&self, k: usize, from: u64) -> Option<u64> {
        let word = (from / W) as usize;
        let level = &self.levels[k];
        if word >= level.len() {
            return None;
        }
        let w = level[word] & !((1u64 << (from % W)) - 1);
        if w != 0 {
            return Some(word as u64 * W + w.trailing_zeros() as u64);
        }
        let next = self.next_nonzero_word(k, word + 1)?;
        Some(next as u64 * W + level[next].trailing_zeros() as u64)
    }

    /// The first word of level `k` at or after `from` that is not zero,
    /// found through the level above.
    fn next_nonzero_word(&self, k: usize, from: usize) -> Option<usize> {
        if from >= self.levels[k].len() {
            return None;
        }
        if k + 1 == self.levels.len() {
            return (from..self.levels[k].len()).find(|&i| self.levels[k][i] != 0);
        }
        self.next_set_at(k + 1, from as u64).map(|i| i as usize)
    }

    /// The first clear bit at or after bit `from`, a word at a time.
    fn next_clear(&self, from: u64) -> Option<u64> {
        let bits = self.bits();
        let mut i = from;
        while i < bits {
            let w = self.levels[0][(i / W) as usize] | ((1u64 << (i % W)) - 1);
            if w != u64::MAX {
                let b = (i / W) * W + (!w).trailing_zeros() as u64;
                return (b < bits).then_some(b);
            }
            i = (i / W + 1) * W;
        }
        None
    }

    /// The first dirty byte offset in `[offset, end)` (granule-aligned, but
    /// never before `offset`).
    pub fn next_dirty(&self, offset: u64, end: u64) -> Option<u64> {
        let end = end.min(self.size);
        if offset >= end {
            return None;
        }
        let bit = self.next_set_at(0, offset / self.granularity)?;
        let at = (bit * self.granularity).max(offset);
        (at < end).then_some(at)
    }

    /// The first clean byte offset in `[offset, end)`.
    pub fn next_clean(&self, offset: u64, end: u64) -> Option<u64> {
        let end = end.min(self.size);
        if offset >= end {
            return None;
        }
        let bit = self.next_clear(offset / self.granularity)?;
        let at = (bit * self.granularity).max(offset);
        (at < end).then_some(at)
    }

    /// The first dirty area in `[offset, end)`: where it starts and how
    /// long it is, at most `max_len` (QEMU: bdrv_dirty_bitmap_next_dirty_area).
    pub fn next_dirty_area(&self, offset: u64, end: u64, max_len: u64) -> Option<(u64, u64)> {
        let end = end.min(self.size);
        let start = self.next_dirty(offset, end)?;
        let limit = end.min(start.saturating_add(max_len.max(1)));
        let stop = self.next_clean(start, limit).unwrap_or(limit);
        Some((start, stop - start))
    }

    /// Every dirty range, in order, as (offset, length).
    pub fn dirty_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let (start, len) = self.next_dirty_area(at, self.size, u64::MAX)?;
            at = start + len;
            Some((start, len))
        })
    }

    /// Sets every bit that `other` has set (QEMU: hbitmap_merge); the two
    /// may differ in granularity, but not in size.
    pub fn merge_from(&mut self, other: &HBitmap) -> Result<(), String> {
        if other.size != self.size {
            return Err("Bitmaps are of different sizes".into());
        }
        if other.granularity == self.granularity {
            let mut bottom = std::mem::take(&mut self.levels[0]);
            for (a, b) in bottom.iter_mut().zip(&other.levels[0]) {
                *a |= b;
            }
            self.build_levels(bottom);
            return Ok(());
        }
        let ranges: Vec<(u64, u64)> = other.dirty_ranges().collect();
        for (off, len) in ranges {
            self.set(off, len);
        }
        Ok(())
    }

    /// Changes the size: a grown part is clean, a cut one is gone.
    pub fn truncate(&mut self, size: u64) {
        let bottom = std::mem::take(&mut self.levels[0]);
        self.size = size;
        self.build_levels(bottom);
    }

    /// Bytes that [`serialize`](Self::serialize) gives for the whole bitmap:
    /// one bit per granule, little-endian words (QEMU's on-disk layout).
    pub fn serialization_size(&self) -> usize {
        self.bits().div_ceil(8) as usize
    }

    /// The bits as bytes, granule 0 in bit 0 of byte 0.
    pub fn serialize(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.levels[0]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        out.truncate(self.serialization_size());
        out
    }

    /// The bits in whole little-endian words, at least one, as QEMU keeps
    /// them in memory (what x-debug-block-dirty-bitmap-sha256 hashes).
    pub fn words(&self) -> Vec<u8> {
        let n = self.bits().div_ceil(64).max(1) as usize;
        let mut out: Vec<u8> = self.levels[0]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        out.resize(n * 8, 0);
        out
    }

    /// Sets the bits from bytes made by [`serialize`](Self::serialize).
    pub fn deserialize(&mut self, bytes: &[u8]) -> Result<(), String> {
        if bytes.len() != self.serialization_size() {
            return Err(format!(
                "Bitmap data is {} bytes, {} expected",
                bytes.len(),
                self.serialization_size()
            ));
        }
        let mut bottom = vec![0u64; self.levels[0].len()];
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            bottom[i] = u64::from_le_bytes(w);
        }
        self.build_levels(bottom);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The plain model: one bool a granule.
    fn model_ranges(m: &[bool], g: u64, size: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, &d) in m.iter().enumerate() {
            if !d {
                continue;
            }
            let (a, b) = (i as u64 * g, ((i as u64 + 1) * g).min(size));
            match out.last_mut() {
                Some(l) if l.0 + l.1 == a => l.1 = b - l.0,
                _ => out.push((a, b - a)),
            }
        }
        out
    }

    #[test]
    fn a_sparse_terabyte_walks_in_few_steps() {
        let mut b = HBitmap::new(1 << 40, 65536);
        for off in [0u64, 7 << 30, (1 << 40) - 65536] {
            b.set(off, 1);
        }
        let r: Vec<_> = b.dirty_ranges().collect();
        assert_eq!(
            r,
            vec![(0, 65536), (7 << 30, 65536), ((1 << 40) - 65536, 65536)]
        );
        assert_eq!(b.count(), 3 * 65536);
        b.reset(0, 1 << 40);
        assert!(b.is_empty() && b.dirty_ranges().next().is_none());
    }

    #[test]
    fn a_partial_last_granule_counts_whole_as_in_qemu() {
        let mut b = HBitmap::new(1000, 512);
        b.set(600, 1);
        assert_eq!(b.count(), 512);
        assert_eq!(b.next_dirty(0, 1000), Some(512));
        assert_eq!(b.next_dirty(700, 1000), Some(700));
        assert_eq!(b.next_clean(512, 1000), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(u64, u64),
        Reset(u64, u64),
        Truncate(u64),
        Merge(Vec<(u64, u64)>),
    }

    fn op(size: u64) -> impl Strategy<Value = Op> {
        let r = (0..size + 4096, 0..size / 2 + 1);
        prop_oneof![
            4 => r.clone().prop_map(|(o, l)| Op::Set(o, l)),
            3 => r.clone().prop_map(|(o, l)| Op::Reset(o, l)),
            1 => (1..size * 2).prop_map(Op::Truncate),
            1 => proptest::collection::vec(r, 0..4).prop_map(Op::Merge),
        ]
    }

    proptest! {
        #[test]
        fn behaves_like_a_vec_of_bools(
            gbits in 9u32..17,
            size in 1u64..2_000_000,
            ops in proptest::collection::vec(op(2_000_000), 1..40),
        ) {
            let g = 1u64 << gbits;
            let mut b = HBitmap::new(size, g);
            let mut size = size;
            let mut m = vec![false; size.div_ceil(g) as usize];
            let mark = |m: &mut Vec<bool>, size: u64, o: u64, l: u64, v: bool| {
                let end = o.saturating_add(l).min(size);
                if o < end {
                    for i in o / g..end.div_ceil(g) {
                        m[i as usize] = v;
                    }
                }
            };
            for op in ops {
                match op {
                    Op::Set(o, l) => { b.set(o, l); mark(&mut m, size, o, l, true); }
                    Op::Reset(o, l) => { b.reset(o, l); mark(&mut m, size, o, l, false); }
                    Op::Truncate(s) => {
                        b.truncate(s);
                        size = s;
                        m.resize(s.div_ceil(g) as usize, false);
                    }
                    Op::Merge(rs) => {
                        let mut other = HBitmap::new(size, 512);
                        for (o, l) in rs {
                            other.set(o, l);
                            // A finer source marks every coarse granule it touches.
                            let end = o.saturating_add(l).min(size);
                            if o < end {
                                mark(&mut m, size, o / 512 * 512, end - o / 512 * 512, true);
                            }
                        }
                        b.merge_from(&other).unwrap();
                    }
                }
                let want = model_ranges(&m, g, size);
                let got: Vec<_> = b.dirty_ranges().collect();
                prop_assert_eq!(&got, &want);
                let count = m.iter().filter(|&&d| d).count() as u64 * g;
                prop_assert_eq!(b.count(), count);
                let probe = size / 3;
                prop_assert_eq!(b.get(probe), size > 0 && m[(probe / g) as usize]);
                let next_clean = (probe / g..m.len() as u64).find(|&i| !m[i as usize]);
                prop_assert_eq!(b.next_clean(probe, size), next_clean.map(|i| (i * g).max(probe)));
            }
            let mut c = HBitmap::new(size, g);
            c.deserialize(&b.serialize()).unwrap();
            prop_assert_eq!(c.dirty_ranges().collect::<Vec<_>>(), b.dirty_ranges().collect::<Vec<_>>());
        }
    }
}
