//! The write path of images with extended L2 entries (QEMU:
//! calculate_l2_meta and qcow2_alloc_cluster_link_l2 with subclusters).
//!
//! The same three steps as `write.rs`: plan under the metadata lock, data
//! I/O without it, commit under it. What differs is the unit of
//! copy-on-write: only the partial subclusters at either end of a write are
//! completed, and the subcluster word records what was written. A cluster
//! that is this image's alone (COPIED) is written in place even where its
//! subclusters are unallocated or zero; other clusters get a new host
//! cluster. A write that changes a subcluster word marks its clusters in
//! flight, as an allocating write does, so two writes never complete the
//! same subcluster from stale data.

use super::meta::{Mapping, Meta, OFLAG_COPIED};
use super::subcluster::{alloc_range, invalid_entry, zero_range, L2Entry, ScType, ALL_ALLOC};
use super::{Extent, InflightGuard, Qcow2Driver};
use strata_block::{DebugEvent, Error, IoBuf, Result};

/// Where the bytes a write puts on the host start and end, relative to its
/// first cluster: the guest data plus the partial subclusters it completes.
#[derive(Clone, Copy, Debug)]
struct Span {
    from: u64,
    to: u64,
}

impl Qcow2Driver {
    /// Writes `buf` at guest `offset` of an image with subclusters; the
    /// range lies within one L2 table.
    pub(super) async fn write_in_table_sub(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let cs = self.geo.cluster_size;
        let len = buf.len() as u64;
        let first = offset >> self.geo.cluster_bits;
        let last = (offset + len - 1) >> self.geo.cluster_bits;
        let mut m = self.lock_idle(first, last).await?;
        let entries = self.entries_for_write(&mut m, first, last).await?;
        // Kept in place: the cluster is ours alone (QEMU: handle_copied).
        let keep = |e: &L2Entry| e.has_cluster(&self.geo) && e.entry & OFLAG_COPIED != 0;
        let head_keep = keep(&entries[0]);
        let run = entries
            .iter()
            .enumerate()
            .take_while(|(i, e)| {
                keep(e) == head_keep
                    && (!head_keep || e.host() == entries[0].host() + *i as u64 * cs)
            })
            .count() as u64;
        if run < last - first + 1 {
            let split = ((first + run) << self.geo.cluster_bits) - offset;
            let (a, b) = buf.split_at(split as usize);
            drop(m);
            let a = Box::pin(self.write_in_table_sub(offset, a)).await?;
            let b = Box::pin(self.write_in_table_sub(offset + split, b)).await?;
            return Ok(IoBuf::join_all(vec![a, b]));
        }
        let head = self.geo.offset_in_cluster(offset);
        if head_keep {
            let host = entries[0].host();
            let Some(span) = self.in_place_span(&entries, head, head + len) else {
                // Every subcluster written holds data already: no
                // metadata changes, the bytes go straight in.
                let at = host + head;
                m.check_data_write(&self.file.get(), at, len).await?;
                let mapping = Mapping::Normal { host, copied: true };
                let _held = self.hold_hosts(
                    &m,
                    &[Extent {
                        offset,
                        len,
                        mapping,
                    }],
                );
                self.note_planned(len);
                drop(m);
                self.file.get().debug_event(DebugEvent::WriteAio).await;
                return self.write_data(at, offset, buf).await;
            };
            m.check_data_write(&self.file.get(), host + span.from, span.to - span.from)
                .await?;
            let _inflight = InflightGuard::new(self, first, last);
            let mapping = Mapping::Normal { host, copied: true };
            let whole = entries.len() as u64 * cs;
            let _held = self.hold_hosts(
                &m,
                &[Extent {
                    offset: first << self.geo.cluster_bits,
                    len: whole,
                    mapping,
                }],
            );
            self.note_planned(len);
            drop(m);
            let (buf, copied) = self
                .write_span(offset, buf, host, first, &entries, span)
                .await?;
            let mut m = self.meta.lock().await;
            if copied {
                m.l2_cache.set_depends_on_flush();
            }
            self.mark_written(&mut m, first, entries.len(), span)
                .await?;
            return Ok(buf);
        }
        // A new host cluster for each (QEMU: handle_alloc).
        let n = last - first + 1;
        let l2 = self.writable_l2(&mut m, first).await?;
        m.mark_dirty_for_lazy_refcounts(&self.file.get()).await?;
        let host = if self.geo.external_data {
            first << self.geo.cluster_bits
        } else {
            m.alloc_clusters(&self.file.get(), n).await?
        };
        let span = self.new_cluster_span(&entries, head, head + len);
        m.check_data_write(&self.file.get(), host + span.from, span.to - span.from)
            .await?;
        let _inflight = InflightGuard::new(self, first, last);
        // The clusters copy-on-write reads from stay theirs meanwhile.
        let source = |i: usize| Extent {
            offset: (first + i as u64) << self.geo.cluster_bits,
            len: cs,
            mapping: self.cluster_mapping(&entries[i]),
        };
        let _cow_src = self.hold_hosts(&m, &[source(0), source(entries.len() - 1)]);
        self.note_planned(len);
        drop(m);
        let written = self
            .write_span(offset, buf, host, first, &entries, span)
            .await;
        let mut m = self.meta.lock().await;
        match written {
            Ok((buf, copied)) => {
                if copied {
                    m.l2_cache.set_depends_on_flush();
                }
                self.link_sub_clusters(&mut m, l2, first, host, entries.len(), span)
                    .await
                    .map(|()| buf)
            }
            Err(e) => {
                // Nothing points to the new clusters yet: give them back.
                if !self.geo.external_data {
                    let _ = m.update_refcounts(&self.file.get(), host, n, -1).await;
                }
                Err(e)
            }
        }
    }

    /// Both words of each cluster `[first, last]`, checked as QEMU checks
    /// them before a write: an unaligned host cluster or contradicting
    /// bits are corruption.
    async fn entries_for_write(&self, m: &mut Meta, first: u64, last: u64) -> Result<Vec<L2Entry>> {
        let mut out = Vec::with_capacity((last - first + 1) as usize);
        for gc in first..=last {
            let Some((l2, idx, e)) = m.l2_entry(&self.file.get(), gc).await? else {
                out.push(L2Entry::default());
                continue;
            };
            let checked = m
                .check_host_alignment(&e, l2, idx)
                .and_then(|()| match e.invalid(&self.geo) {
                    true => Err(invalid_entry(l2, idx, false)),
                    false => Ok(()),
                })
                .and_then(|()| {
                    m.check_external(self.cluster_mapping(&e), gc, l2, idx)
                        .map(|_| ())
                });
            if let Err(err) = checked {
                return Err(m.signal_corruption(&self.file.get(), err).await);
            }
            out.push(e);
        }
        Ok(out)
    }

    /// The mapping of a whole cluster, for holding and releasing its host
    /// cluster.
    pub(super) fn cluster_mapping(&self, e: &L2Entry) -> Mapping {
        if e.compressed() {
            Mapping::Compressed(e.entry)
        } else if e.has_cluster(&self.geo) {
            Mapping::Normal {
                host: e.host(),
                copied: e.entry & OFLAG_COPIED != 0,
            }
        } else {
            Mapping::Unallocated
        }
    }

    /// For a write in place over `[head, end)` (bytes from the start of
    /// the first cluster): None when every subcluster it touches holds
    /// data, else the span that completes its partial zero or unallocated
    /// subclusters (QEMU: calculate_l2_meta with keep_old).
    fn in_place_span(&self, entries: &[L2Entry], head: u64, end: u64) -> Option<Span> {
        let cb = self.geo.cluster_bits;
        let sb = self.geo.subcluster_bits;
        let all_data = entries.iter().enumerate().all(|(i, e)| {
            let base = (i as u64) << cb;
            let from = head.max(base) - base;
            let to = end.min(base + self.geo.cluster_size) - base;
            let first_sc = (from >> sb) as u32;
            let last_sc = ((to - 1) >> sb) as u32;
            let (ty, n) = e.range_type(&self.geo, first_sc);
            ty == ScType::Normal && first_sc + n > last_sc
        });
        if all_data {
            return None;
        }
        let sc_mask = self.geo.subcluster_size() - 1;
        let first_ty = entries[0].sc_type(&self.geo, (head >> sb) as u32);
        let from = match first_ty {
            ScType::Normal => head,
            _ => head & !sc_mask,
        };
        let last = entries.len() - 1;
        let in_last = end - 1 - ((last as u64) << cb);
        let to = match entries[last].sc_type(&self.geo, (in_last >> sb) as u32) {
            ScType::Normal => end,
            _ => end.next_multiple_of(self.geo.subcluster_size()),
        };
        Some(Span { from, to })
    }

    /// For a write into new host clusters over `[head, end)`: the span
    /// that keeps what the old clusters held (QEMU: calculate_l2_meta).
    /// Unallocated and zero subclusters before the first and after the last
    /// allocated one are not copied; a compressed cluster is copied whole.
    fn new_cluster_span(&self, entries: &[L2Entry], head: u64, end: u64) -> Span {
        let cb = self.geo.cluster_bits;
        let sb = self.geo.subcluster_bits;
        let cs = self.geo.cluster_size;
        let from = self.cow_start(&entries[0], head);
        let last_i = entries.len() - 1;
        let e = &entries[last_i];
        let base = (last_i as u64) << cb;
        let sc = ((end - 1 - base) >> sb) as u32;
        let to = match e.sc_type(&self.geo, sc) {
            ScType::Compressed => end.next_multiple_of(cs),
            ScType::ZeroPlain | ScType::UnallocatedPlain => {
                end.next_multiple_of(self.geo.subcluster_size())
            }
            _ => {
                let alloc = (e.bitmap & 0xffff_ffff) as u32;
                let skip = (super::subcluster::SUBCLUSTERS - sc - 1).min(alloc.leading_zeros());
                end.next_multiple_of(cs) - (u64::from(skip) << sb)
            }
        };
        Span { from, to }
    }

    /// Where copy-on-write into a new host cluster starts when the cluster
    /// is written from byte `head` of it on.
    pub(super) fn cow_start(&self, e: &L2Entry, head: u64) -> u64 {
        let sb = self.geo.subcluster_bits;
        let sc = (head >> sb) as u32;
        match e.sc_type(&self.geo, sc) {
            ScType::Compressed => 0,
            ScType::ZeroPlain | ScType::UnallocatedPlain => u64::from(sc) << sb,
            _ => {
                let alloc = (e.bitmap & ALL_ALLOC) as u32;
                u64::from(sc.min(alloc.trailing_zeros())) << sb
            }
        }
    }

    /// Writes the guest data with the old content of the rest of `span`
    /// into the clusters at `host`, in one write; true when old content
    /// (not only the guest's bytes) was written.
    async fn write_span(
        &self,
        offset: u64,
        buf: IoBuf,
        host: u64,
        first: u64,
        entries: &[L2Entry],
        span: Span,
    ) -> Result<(IoBuf, bool)> {
        let base = first << self.geo.cluster_bits;
        let head = offset - base;
        let end = head + buf.len() as u64;
        if span.from == head && span.to == end {
            self.file.get().debug_event(DebugEvent::WriteAio).await;
            let buf = self.write_data(host + head, offset, buf).await?;
            return Ok((buf, false));
        }
        let mut merged = IoBuf::zeroed((span.to - span.from) as usize);
        if span.from < head {
            let old = self
                .old_sub_content(first, &entries[0], span.from, head)
                .await?;
            merged.as_mut_slice()[..(head - span.from) as usize].copy_from_slice(old.as_slice());
        }
        if end < span.to {
            let last = entries.len() - 1;
            let cbase = (last as u64) << self.geo.cluster_bits;
            let old = self
                .old_sub_content(
                    first + last as u64,
                    &entries[last],
                    end - cbase,
                    span.to - cbase,
                )
                .await?;
            merged.as_mut_slice()[(end - span.from) as usize..].copy_from_slice(old.as_slice());
        }
        merged.as_mut_slice()[(head - span.from) as usize..(end - span.from) as usize]
            .copy_from_slice(buf.as_slice());
        self.file.get().debug_event(DebugEvent::WriteAio).await;
        self.file.get().debug_event(DebugEvent::CowWrite).await;
        self.write_data(host + span.from, base + span.from, merged)
            .await?;
        Ok((buf, true))
    }

    /// What guest cluster `gc` read as over bytes `[from, to)` of it, by
    /// the entry it had when the write was planned.
    pub(super) async fn old_sub_content(
        &self,
        gc: u64,
        e: &L2Entry,
        from: u64,
        to: u64,
    ) -> Result<IoBuf> {
        self.file.get().debug_event(DebugEvent::CowRead).await;
        let base = gc << self.geo.cluster_bits;
        let mut parts = Vec::new();
        let mut off = from;
        while off < to {
            let (mapping, n) = e
                .run_at(&self.geo, off, to)
                .ok_or_else(|| Error::errno(libc::EIO))?;
            let ext = Extent {
                offset: base + off,
                len: n,
                mapping,
            };
            parts.push(self.read_extent(ext, IoBuf::zeroed(n as usize)).await?);
            off += n;
        }
        Ok(IoBuf::join_all(parts))
    }

    /// The subcluster word of a cluster that `span` wrote into: what it
    /// covers of the cluster (`i` from the write's first) is allocated
    /// and no longer zero.
    fn written_bitmap(&self, old: u64, i: usize, span: Span) -> u64 {
        let cb = self.geo.cluster_bits;
        let sb = self.geo.subcluster_bits;
        let base = (i as u64) << cb;
        let from = span.from.max(base) - base;
        let to = span.to.min(base + self.geo.cluster_size) - base;
        let (a, b) = ((from >> sb) as u32, ((to - 1) >> sb) as u32 + 1);
        (old | alloc_range(a, b)) & !zero_range(a, b)
    }

    /// Records the subclusters a write in place filled.
    async fn mark_written(&self, m: &mut Meta, first: u64, n: usize, span: Span) -> Result<()> {
        let l2 = self.writable_l2(m, first).await?;
        let mask = self.geo.l2_entries() - 1;
        for i in 0..n {
            let idx = (first + i as u64) & mask;
            let old = m.l2_get_bitmap(&self.file.get(), l2, idx).await?;
            let new = self.written_bitmap(old, i, span);
            if new != old {
                m.l2_set_bitmap(&self.file.get(), l2, idx, new).await?;
            }
        }
        Ok(())
    }

    /// Points the entries of `n` clusters from `first` at the new clusters
    /// from `host`, with their subcluster words updated, then drops what
    /// the old entries referenced.
    async fn link_sub_clusters(
        &self,
        m: &mut Meta,
        l2: u64,
        first: u64,
        host: u64,
        n: usize,
        span: Span,
    ) -> Result<()> {
        let mask = self.geo.l2_entries() - 1;
        let mut old = Vec::with_capacity(n);
        for i in 0..n {
            let idx = (first + i as u64) & mask;
            let entry = m.l2_get(&self.file.get(), l2, idx).await?;
            let bitmap = m.l2_get_bitmap(&self.file.get(), l2, idx).await?;
            let h = host + ((i as u64) << self.geo.cluster_bits);
            let was = self.cluster_mapping(&L2Entry { entry, bitmap });
            old.push(match was {
                // A data file cluster stays at its guest offset.
                Mapping::Normal { host: z, .. } if z == h => Mapping::Unallocated,
                other => other,
            });
            m.l2_set(&self.file.get(), l2, idx, h | OFLAG_COPIED)
                .await?;
            m.l2_set_bitmap(
                &self.file.get(),
                l2,
                idx,
                self.written_bitmap(bitmap, i, span),
            )
            .await?;
        }
        self.release_old(m, &old, false).await
    }
}
