//! The dirty bitmaps' part of the concurrency model: persistent bitmaps
//! are added and removed (which allocates and frees clusters under the
//! metadata lock) while requests are in flight, and must record every
//! write that started after them. For each bitmap the model keeps the
//! granules it `must` have dirty (writes that started after it and
//! succeeded) and those it `may` have (any write in flight with it, or
//! since). At the end the bitmaps are stored by close, loaded again, and
//! must come back bit for bit.

use std::sync::Arc;
use strata_block::Node;

/// The granularity of the model's bitmaps.
pub const GRANULE: u64 = 65536;

struct Tracked {
    name: String,
    must: Vec<bool>,
    may: Vec<bool>,
}

/// The bitmaps the node should have.
pub struct BitmapModel {
    list: Vec<Tracked>,
    granules: usize,
    next: u32,
    /// Bitmaps removed so far (adds: `next`).
    removes: u32,
}

fn granules(off: u64, len: u64) -> std::ops::Range<usize> {
    (off / GRANULE) as usize..(off + len).div_ceil(GRANULE) as usize
}

impl BitmapModel {
    pub fn new(size: u64) -> BitmapModel {
        BitmapModel {
            list: Vec::new(),
            granules: size.div_ceil(GRANULE) as usize,
            next: 0,
            removes: 0,
        }
    }

    /// The bitmaps now: a write that starts now must be in all of them.
    pub fn names(&self) -> Vec<String> {
        self.list.iter().map(|t| t.name.clone()).collect()
    }

    /// A modifying request starts: every bitmap may record it.
    pub fn started(&mut self, off: u64, len: u64) {
        for t in &mut self.list {
            t.may[granules(off, len)].fill(true);
        }
    }

    /// A modifying request that started when `names` existed succeeded.
    pub fn written(&mut self, names: &[String], off: u64, len: u64) {
        for t in self.list.iter_mut().filter(|t| names.contains(&t.name)) {
            t.must[granules(off, len)].fill(true);
        }
    }

    /// The disk was cut to `to` and grown back: the bits past it are gone.
    pub fn truncated(&mut self, to: u64) {
        for t in &mut self.list {
            t.must[(to / GRANULE) as usize..].fill(false);
        }
    }

    /// A name for the next bitmap.
    pub fn next_name(&mut self) -> String {
        self.next += 1;
        format!("bm{}", self.next)
    }

    /// Bitmap `name` was added while `in_flight` modifying requests ran.
    pub fn added(&mut self, name: String, in_flight: &[(u64, u64)]) {
        let mut may = vec![false; self.granules];
        for &(off, end) in in_flight {
            may[granules(off, end - off)].fill(true);
        }
        self.list.push(Tracked {
            name,
            must: vec![false; self.granules],
            may,
        });
    }

    /// Bitmap `name` is gone.
    pub fn removed(&mut self, name: &str) {
        self.list.retain(|t| t.name != name);
        self.removes += 1;
    }

    /// (added, removed) so far: the run must have done both.
    pub fn churn(&self) -> (u32, u32) {
        (self.next, self.removes)
    }

    /// Checks the node's bitmaps against the model: the same names, and
    /// each one dirty wherever it must be and nowhere it may not.
    pub fn verify(&self, node: &Arc<Node>) -> Result<(), String> {
        let mut have: Vec<String> = node
            .bitmaps()
            .list()
            .iter()
            .filter_map(|b| b.name().map(str::to_string))
            .collect();
        have.sort();
        let mut want = self.names();
        want.sort();
        if have != want {
            return Err(format!("bitmaps {have:?}, the model says {want:?}"));
        }
        for t in &self.list {
            let b = node.bitmaps().find(&t.name).expect("listed");
            let mut dirty = vec![false; self.granules];
            for (off, len) in b.dirty_ranges() {
                dirty[granules(off, len)].fill(true);
            }
            for (g, &d) in dirty.iter().enumerate() {
                if t.must[g] && !d {
                    return Err(format!("bitmap {}: granule {g} missed a write", t.name));
                }
                if d && !t.may[g] {
                    return Err(format!(
                        "bitmap {}: granule {g} is dirty, no write touched it",
                        t.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// The node's bitmaps as (name, dirty ranges), to compare after a
    /// store and a load.
    pub fn snapshot(node: &Arc<Node>) -> Vec<(String, Vec<(u64, u64)>)> {
        let mut v: Vec<_> = node
            .bitmaps()
            .list()
            .iter()
            .map(|b| (b.name().unwrap_or_default().to_string(), b.dirty_ranges()))
            .collect();
        v.sort();
        v
    }
}
