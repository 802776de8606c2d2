//! Extended L2 entries (qcow2.txt, "Extended L2 Entries"): a second word
//! per entry whose low 32 bits say which of the cluster's 32 subclusters
//! are allocated in it and whose high 32 bits say which read as zeroes.
//! This file decodes a pair of words into what each subcluster is (QEMU:
//! qcow2_get_subcluster_type) and holds the bit arithmetic; the write,
//! zero and discard paths that change the words are in `write_sub.rs` and
//! `zero_sub.rs`.

use super::meta::{Geometry, Mapping, Meta, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use std::sync::Arc;
use strata_block::report::c_hex;
use strata_block::{Error, Node, Result};

/// Subclusters in a cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;
/// Every allocation bit, every zero bit.
pub const ALL_ALLOC: u64 = 0xffff_ffff;
pub const ALL_ZEROES: u64 = ALL_ALLOC << 32;

/// The allocation bits of subclusters `[from, to)`.
pub fn alloc_range(from: u32, to: u32) -> u64 {
    debug_assert!(from <= to && to <= SUBCLUSTERS);
    ((1u64 << to) - 1) & !((1u64 << from) - 1)
}

/// The zero bits of subclusters `[from, to)`.
pub fn zero_range(from: u32, to: u32) -> u64 {
    alloc_range(from, to) << 32
}

/// Both words of one L2 entry (the second is 0 without extended entries).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L2Entry {
    pub entry: u64,
    pub bitmap: u64,
}

/// What one subcluster is (QEMU's QCow2SubclusterType).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScType {
    /// Data in the cluster's host cluster.
    Normal,
    /// Part of a compressed cluster.
    Compressed,
    /// Reads as zeroes; the cluster has a host cluster (ALLOC) or not.
    ZeroPlain,
    ZeroAlloc,
    /// Not here: the backing file shows through; the cluster has a host
    /// cluster (ALLOC, written in place later) or not.
    UnallocatedPlain,
    UnallocatedAlloc,
    /// Bits that contradict each other: corruption.
    Invalid,
}

impl L2Entry {
    /// The host cluster the entry names (0 for none; compressed entries
    /// have no cluster-aligned one).
    pub fn host(&self) -> u64 {
        self.entry & OFFSET_MASK
    }

    pub fn compressed(&self) -> bool {
        self.entry & OFLAG_COMPRESSED != 0
    }

    /// True when the entry names a host cluster of its own (QEMU's
    /// QCOW2_CLUSTER_NORMAL with extended entries, where the zero flag of
    /// the first word is not used).
    pub fn has_cluster(&self, geo: &Geometry) -> bool {
        !self.compressed()
            && (self.host() != 0 || (geo.external_data && self.entry & OFLAG_COPIED != 0))
    }

    /// The type of subcluster `sc`.
    pub fn sc_type(&self, geo: &Geometry, sc: u32) -> ScType {
        if self.compressed() {
            // The word is unused for compressed clusters, whatever it holds.
            return ScType::Compressed;
        }
        let zero = self.bitmap & (1u64 << (32 + sc)) != 0;
        let alloc = self.bitmap & (1u64 << sc) != 0;
        if self.has_cluster(geo) {
            if (self.bitmap >> 32) & self.bitmap != 0 {
                ScType::Invalid
            } else if zero {
                ScType::ZeroAlloc
            } else if alloc {
                ScType::Normal
            } else {
                ScType::UnallocatedAlloc
            }
        } else if self.bitmap & ALL_ALLOC != 0 {
            ScType::Invalid
        } else if zero {
            ScType::ZeroPlain
        } else {
            ScType::UnallocatedPlain
        }
    }

    /// The type of subcluster `sc` and how many subclusters from it have
    /// that type (QEMU: qcow2_get_subcluster_range_type).
    pub fn range_type(&self, geo: &Geometry, sc: u32) -> (ScType, u32) {
        let ty = self.sc_type(geo, sc);
        let n = match ty {
            ScType::Invalid => 0,
            ScType::Compressed => SUBCLUSTERS - sc,
            _ => {
                let mut n = 1;
                while sc + n < SUBCLUSTERS && self.sc_type(geo, sc + n) == ty {
                    n += 1;
                }
                n
            }
        };
        (ty, n)
    }

    /// True when any subcluster of the cluster is invalid.
    pub fn invalid(&self, geo: &Geometry) -> bool {
        // Both kinds of contradiction concern the whole word.
        self.sc_type(geo, 0) == ScType::Invalid
    }

    /// The mapping of a subcluster of type `ty` at byte `in_cluster` of it.
    pub fn mapping(&self, ty: ScType, in_cluster: u64) -> Mapping {
        let host = self.host() + in_cluster;
        match ty {
            ScType::Normal => Mapping::Normal {
                host,
                copied: self.entry & OFLAG_COPIED != 0,
            },
            ScType::ZeroAlloc => Mapping::Zero(Some(host)),
            ScType::ZeroPlain => Mapping::Zero(None),
            ScType::UnallocatedPlain => Mapping::Unallocated,
            ScType::UnallocatedAlloc => Mapping::Reserved(host),
            ScType::Compressed => Mapping::Compressed(self.entry),
            // Callers turn this into corruption first.
            ScType::Invalid => Mapping::Unallocated,
        }
    }

    /// What `[from, to)` of the cluster (byte offsets in it) starts with:
    /// its mapping and how many bytes from `from` (at most to `to`) share it.
    pub fn run_at(&self, geo: &Geometry, from: u64, to: u64) -> Option<(Mapping, u64)> {
        let sc = (from >> geo.subcluster_bits) as u32;
        let (ty, n) = self.range_type(geo, sc);
        if ty == ScType::Invalid {
            return None;
        }
        let run_end = (u64::from(sc + n) << geo.subcluster_bits).min(to);
        Some((self.mapping(ty, from), run_end - from))
    }
}

/// QEMU's words for an entry with contradicting bits; the read path has a
/// stray space in them that scripts may see.
pub fn invalid_entry(l2: u64, idx: u64, read: bool) -> Error {
    let gap = if read { "  " } else { " " };
    Error::corrupt(format!(
        "Invalid cluster entry found{gap}(L2 offset: {}, L2 index: {})",
        c_hex(l2),
        c_hex(idx)
    ))
}

impl Meta {
    /// Both words of guest cluster `gc`'s entry, with the table they are
    /// in and the entry's index there; None without a table.
    pub async fn l2_entry(
        &mut self,
        file: &Arc<Node>,
        gc: u64,
    ) -> Result<Option<(u64, u64, L2Entry)>> {
        let l2 = match self.l2_table_of(gc) {
            Ok(Some(l2)) => l2,
            Ok(None) => return Ok(None),
            Err(e) => return Err(self.signal_corruption(file, e).await),
        };
        let idx = gc & (self.geo.l2_entries() - 1);
        let entry = self.l2_get(file, l2, idx).await?;
        let bitmap = self.l2_get_bitmap(file, l2, idx).await?;
        Ok(Some((l2, idx, L2Entry { entry, bitmap })))
    }

    /// With extended entries: the mapping of guest byte `offset` and how
    /// many bytes from it (at most `len`, within its cluster) share it.
    pub async fn sub_mapping(
        &mut self,
        file: &Arc<Node>,
        offset: u64,
        len: u64,
    ) -> Result<(Mapping, u64)> {
        if self.corrupt {
            return Err(Error::errno(libc::ENOMEDIUM));
        }
        let gc = offset >> self.geo.cluster_bits;
        let from = self.geo.offset_in_cluster(offset);
        let to = (from + len).min(self.geo.cluster_size);
        let Some((l2, idx, e)) = self.l2_entry(file, gc).await? else {
            return Ok((Mapping::Unallocated, to - from));
        };
        let checked = self
            .check_host_alignment(&e, l2, idx)
            .and_then(|()| {
                e.run_at(&self.geo, from, to)
                    .ok_or_else(|| invalid_entry(l2, idx, true))
            })
            .and_then(|(m, n)| Ok((self.check_external(m, gc, l2, idx)?, n)));
        match checked {
            Ok(r) => Ok(r),
            Err(e) => Err(self.signal_corruption(file, e).await),
        }
    }

    /// A host cluster offset must be cluster aligned (QEMU's message).
    pub fn check_host_alignment(&self, e: &L2Entry, l2: u64, idx: u64) -> Result<()> {
        if e.compressed() || e.host() & (self.geo.cluster_size - 1) == 0 {
            return Ok(());
        }
        Err(Error::corrupt(format!(
            "Cluster allocation offset {} unaligned (L2 offset: {}, L2 index: {})",
            c_hex(e.host()),
            c_hex(l2),
            c_hex(idx)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> Geometry {
        Geometry::new(16, 4, 3, false, true)
    }

    #[test]
    fn ranges_cover_their_bits() {
        assert_eq!(alloc_range(0, 32), ALL_ALLOC);
        assert_eq!(zero_range(0, 32), ALL_ZEROES);
        assert_eq!(alloc_range(3, 5), 0b11000);
        assert_eq!(alloc_range(4, 4), 0);
    }

    #[test]
    fn types_follow_the_specification() {
        let g = geo();
        let alloc = L2Entry {
            entry: 0x50000 | OFLAG_COPIED,
            bitmap: 1 | (1 << 33),
        };
        assert_eq!(alloc.sc_type(&g, 0), ScType::Normal);
        assert_eq!(alloc.sc_type(&g, 1), ScType::ZeroAlloc);
        assert_eq!(alloc.sc_type(&g, 2), ScType::UnallocatedAlloc);
        assert_eq!(alloc.range_type(&g, 2), (ScType::UnallocatedAlloc, 30));
        let plain = L2Entry {
            entry: 0,
            bitmap: 1 << 32,
        };
        assert_eq!(plain.sc_type(&g, 0), ScType::ZeroPlain);
        assert_eq!(plain.sc_type(&g, 1), ScType::UnallocatedPlain);
        // Allocation bits without a host cluster, or both bits of one
        // subcluster, contradict each other.
        let bad = L2Entry {
            entry: 0,
            bitmap: 1,
        };
        assert_eq!(bad.sc_type(&g, 5), ScType::Invalid);
        let both = L2Entry {
            entry: 0x50000,
            bitmap: (1 << 32) | 1,
        };
        assert!(both.invalid(&g));
        assert_eq!(both.sc_type(&g, 7), ScType::Invalid);
        // The word of a compressed cluster is ignored.
        let comp = L2Entry {
            entry: OFLAG_COMPRESSED | 0x50000,
            bitmap: 0x1_8000_0000,
        };
        assert_eq!(comp.range_type(&g, 3), (ScType::Compressed, 29));
        assert!(!comp.invalid(&g));
    }

    #[test]
    fn runs_stop_at_a_change_of_type() {
        let g = geo();
        let e = L2Entry {
            entry: 0x50000 | OFLAG_COPIED,
            bitmap: alloc_range(0, 4),
        };
        let (m, n) = e.run_at(&g, 1024, 65536).unwrap();
        assert_eq!(
            m,
            Mapping::Normal {
                host: 0x50000 + 1024,
                copied: true
            }
        );
        assert_eq!(n, 4 * 2048 - 1024);
        let (m, n) = e.run_at(&g, 8192, 9000).unwrap();
        assert_eq!((m, n), (Mapping::Reserved(0x50000 + 8192), 808));
    }
}
