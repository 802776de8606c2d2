//! Zero writes and discards of whole clusters (QEMU: qcow2_cluster_zeroize,
//! qcow2_cluster_discard): L2 entries changed in place, host clusters kept
//! or released, decided under the lock they act under.

use super::meta::{Mapping, Meta, OFLAG_ZERO};
use super::subcluster::{L2Entry, ALL_ZEROES};
use super::Qcow2Driver;
use strata_block::{Driver, Error, Result, WriteFlags};

/// How `clear_clusters` changes the L2 entries of whole clusters.
#[derive(Clone, Copy, Debug)]
pub(super) enum Clear {
    /// write_zeroes: zero clusters; with `unmap` their host clusters go.
    Zero { unmap: bool },
    /// A guest discard (QEMU's semantics for v2 and v3).
    Discard,
    /// Gone for good (shrinking): unallocated, host clusters freed.
    Drop,
}

impl Qcow2Driver {
    /// Sets the L2 entries of whole clusters `[first, first+n)` to `zero`
    /// (reads as zeroes) or unallocated, releasing what they pointed to.
    pub(super) async fn clear_clusters(&self, first: u64, n: u64, how: Clear) -> Result<()> {
        let mut gc = first;
        let end = first + n;
        while gc < end {
            let table_end = ((gc >> self.geo.l2_bits) + 1) << self.geo.l2_bits;
            let stop = table_end.min(end);
            let mut m = self.lock_idle(gc, stop - 1).await?;
            // Without a table nothing is allocated: zeroing still records
            // zero clusters, as QEMU does; a discard must only hide a
            // backing file (v3).
            let v3 = self.v3();
            let needs_table = match how {
                Clear::Zero { .. } => true,
                Clear::Discard => v3 && self.backing().is_some(),
                Clear::Drop => false,
            };
            if m.l2_table_of(gc)?.is_none() && !needs_table {
                gc = stop;
                continue;
            }
            let l2 = self.writable_l2(&mut m, gc).await?;
            let mask = self.geo.l2_entries() - 1;
            let mut old = Vec::new();
            for c in gc..stop {
                if self.geo.extended_l2 {
                    if let Some(mp) = self.clear_extended(&mut m, l2, c & mask, how).await? {
                        old.push(mp);
                    }
                    continue;
                }
                let entry = m.l2_get(&self.file.get(), l2, c & mask).await?;
                let mp = m.mapping(&self.file.get(), c).await?;
                let allocated = !matches!(mp, Mapping::Unallocated | Mapping::Zero(None));
                let (new, release) = match how {
                    // As QEMU: compressed data always goes; other allocations
                    // go when unmapping is allowed, else keep their cluster, zeroed.
                    Clear::Zero { unmap } => {
                        let drop_it = matches!(mp, Mapping::Compressed(_)) || (unmap && allocated);
                        (
                            if drop_it {
                                OFLAG_ZERO
                            } else {
                                entry | OFLAG_ZERO
                            },
                            drop_it,
                        )
                    }
                    // v3 keeps a discarded cluster reading as zeroes where it
                    // was allocated or a backing file would show through.
                    Clear::Discard
                        if v3 && (self.backing().is_some() || mp != Mapping::Unallocated) =>
                    {
                        (OFLAG_ZERO, true)
                    }
                    Clear::Discard | Clear::Drop => (0, true),
                };
                if new == entry {
                    continue;
                }
                if release {
                    old.push(mp);
                }
                m.l2_set(&self.file.get(), l2, c & mask, new).await?;
            }
            // Guest discards and unmapping zero writes give the space back.
            self.release_old(&mut m, &old, true).await?;
            gc = stop;
        }
        Ok(())
    }

    /// `clear_clusters` for one entry with a subcluster word (QEMU's
    /// zero_in_l2_slice and discard_in_l2_slice): returns what it pointed
    /// to if that reference goes.
    async fn clear_extended(
        &self,
        m: &mut Meta,
        l2: u64,
        idx: u64,
        how: Clear,
    ) -> Result<Option<Mapping>> {
        let entry = m.l2_get(&self.file.get(), l2, idx).await?;
        let bitmap = m.l2_get_bitmap(&self.file.get(), l2, idx).await?;
        let e = L2Entry { entry, bitmap };
        let allocated = e.compressed() || e.has_cluster(&self.geo);
        let (new, new_bitmap, release) = match how {
            Clear::Zero { unmap } => {
                let drop_it = e.compressed() || (unmap && allocated);
                (if drop_it { 0 } else { entry }, ALL_ZEROES, drop_it)
            }
            Clear::Discard if self.backing().is_some() || allocated => (0, ALL_ZEROES, true),
            Clear::Discard => (entry, bitmap, false),
            Clear::Drop => (0, 0, true),
        };
        if (new, new_bitmap) == (entry, bitmap) {
            return Ok(None);
        }
        m.l2_set(&self.file.get(), l2, idx, new).await?;
        m.l2_set_bitmap(&self.file.get(), l2, idx, new_bitmap)
            .await?;
        Ok(release.then(|| self.cluster_mapping(&e)))
    }

    /// Whether a partial write-zeroes on guest cluster `gc`, covering
    /// `[from, to)` of the image, may zero the whole cluster instead (QEMU's
    /// rule): the cluster holds no data here, and the rest of it already
    /// reads as zeroes through the backing chain. Some(true) when
    /// `[from, to)` reads as zeroes too.
    pub(super) async fn may_zero_whole_cluster(
        &self,
        gc: u64,
        from: u64,
        to: u64,
    ) -> Result<Option<bool>> {
        let cs = self.geo.cluster_size;
        let mp = self.meta.lock().await.mapping(&self.file.get(), gc).await?;
        match mp {
            Mapping::Zero(_) => return Ok(Some(true)),
            Mapping::Unallocated => {}
            _ => return Ok(None),
        }
        let cluster_end = ((gc + 1) * cs).min(self.length());
        let rest_zero = self.backing_reads_zero(gc * cs, from).await?
            && self.backing_reads_zero(to, cluster_end).await?;
        if !rest_zero {
            return Ok(None);
        }
        Ok(Some(self.backing_reads_zero(from, to).await?))
    }

    /// True when guest `[start, end)` reads as zeroes from the backing chain.
    pub(super) async fn backing_reads_zero(&self, start: u64, end: u64) -> Result<bool> {
        let Some(b) = self.backing() else {
            return Ok(true);
        };
        let mut off = start;
        while off < end.min(b.length()) {
            let (st, _) = b.block_status_above(None, off, end - off).await?;
            if !st.zero {
                return Ok(false);
            }
            off += st.len.max(1);
        }
        Ok(true)
    }

    /// Makes guest cluster `gc` a zero cluster for a partial write-zeroes
    /// that [`may_zero_whole_cluster`](Self::may_zero_whole_cluster) allowed;
    /// false if it holds data by the time the lock is taken (a write linked
    /// some since the decision): then the caller writes the zeroes.
    pub(super) async fn zero_whole_cluster(&self, gc: u64, own_zero: bool) -> Result<bool> {
        loop {
            let mut m = self.meta.lock().await;
            if m.corrupt {
                return Err(Error::errno(libc::ENOMEDIUM));
            }
            // Decided again here, under the lock the change is made under.
            let mp = m.mapping(&self.file.get(), gc).await?;
            if !matches!(mp, Mapping::Unallocated | Mapping::Zero(_)) {
                return Ok(false);
            }
            if self.allocating(gc, gc) {
                if own_zero {
                    // The cluster reads as zeroes already, and the write
                    // allocating it copies those zeroes: nothing to do (and
                    // no wait, as with QEMU).
                    return Ok(true);
                }
                drop(m);
                self.wait_inflight(gc, gc).await;
                continue;
            }
            let l2 = self.writable_l2(&mut m, gc).await?;
            let idx = gc & (self.geo.l2_entries() - 1);
            let entry = m.l2_get(&self.file.get(), l2, idx).await?;
            if entry & OFLAG_ZERO == 0 {
                m.l2_set(&self.file.get(), l2, idx, entry | OFLAG_ZERO)
                    .await?;
            }
            return Ok(true);
        }
    }

    /// With data_file_raw, zeroes `[offset, offset+len)` of the data file
    /// before the clusters become zero clusters, so that it still reads as
    /// the disk by itself (QEMU: qcow2_subcluster_zeroize).
    pub(super) async fn zero_raw_data(
        &self,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> Result<()> {
        if !self.data_raw {
            return Ok(());
        }
        self.data()?.write_zeroes(offset, len, flags).await
    }
}
