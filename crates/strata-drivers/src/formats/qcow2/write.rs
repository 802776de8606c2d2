//! The write path (QEMU: qcow2-cluster.c), three steps: plan under the
//! metadata lock (find or allocate clusters, mark them in flight), data I/O
//! without it (with copy-on-write of the partial clusters), and commit under
//! it (link the L2 entries, release what they pointed to).

use super::compress;
use super::meta::{Mapping, Meta, OFFSET_MASK, OFLAG_COPIED};
use super::{Extent, InflightGuard, Qcow2Driver};
use strata_block::{DebugEvent, Driver, Error, IoBuf, Result, WriteFlags};

impl Qcow2Driver {
    /// The old content of guest cluster `gc` (bytes `range` of it), for
    /// copy-on-write into a newly allocated cluster.
    pub(super) async fn old_content(
        &self,
        gc: u64,
        mapping: Mapping,
        from: u64,
        to: u64,
    ) -> Result<IoBuf> {
        let buf = IoBuf::zeroed((to - from) as usize);
        let off = (gc << self.geo.cluster_bits) + from;
        let mapping = match mapping {
            Mapping::Normal { host, copied } => Mapping::Normal {
                host: host + from,
                copied,
            },
            m => m,
        };
        self.file.get().debug_event(DebugEvent::CowRead).await;
        self.read_extent(
            Extent {
                offset: off,
                len: to - from,
                mapping,
            },
            buf,
        )
        .await
    }

    /// Makes sure guest cluster `gc` has an L2 table it may write to
    /// (allocating or copying it) and returns the table's offset.
    pub(super) async fn writable_l2(&self, m: &mut Meta, gc: u64) -> Result<u64> {
        let l1i = (gc >> self.geo.l2_bits) as usize;
        if l1i >= m.l1.len() {
            // Past the table (VM state lives there): grow it by half again
            // until it fits, as QEMU's qcow2_grow_l1_table(exact=false).
            let mut n = (m.l1.len() as u64).max(1);
            while n < l1i as u64 + 1 {
                n = (n * 3).div_ceil(2);
            }
            self.grow_l1(m, n).await?;
        }
        let e = m.l1[l1i];
        let e_old = e;
        let old = e & OFFSET_MASK;
        if old != 0 && e & OFLAG_COPIED != 0 {
            return Ok(old);
        }
        let cs = self.geo.cluster_size;
        let new = m.alloc_clusters(&self.file.get(), 1).await?;
        // Content first: zeroes, or a copy of the shared table.
        let content = if old == 0 {
            IoBuf::zeroed(cs as usize)
        } else {
            m.flush_l2(&self.file.get()).await?;
            self.file
                .get()
                .debug_event(DebugEvent::L2AllocCowRead)
                .await;
            self.file.get().debug_event(DebugEvent::L2Load).await;
            self.file
                .get()
                .read(old, IoBuf::zeroed(cs as usize))
                .await?
        };
        m.check_metadata_write(&self.file.get(), new, cs).await?;
        m.l2_cache.remove_table(new, cs);
        self.file.get().debug_event(DebugEvent::L2AllocWrite).await;
        self.file.get().debug_event(DebugEvent::L2Update).await;
        let content = self
            .file
            .get()
            .write(new, content, WriteFlags::default())
            .await?;
        m.adopt_l2_table(&self.file.get(), new, content.as_slice())
            .await?;
        // Its refcount and content are stable before L1 points to it.
        m.flush_refcounts(&self.file.get()).await?;
        self.file.get().flush().await?;
        m.l1[l1i] = new | OFLAG_COPIED;
        m.l2_tables.insert(new);
        if let Err(e) = m.write_l1_entry(&self.file.get(), l1i).await {
            // The table was not linked: memory must say what the disk says.
            m.l1[l1i] = e_old;
            m.l2_tables.remove(&new);
            return Err(e);
        }
        if old != 0 {
            self.file.get().flush().await?;
            m.l2_cache.remove_table(old, cs);
            m.l2_tables.remove(&old);
            m.update_refcounts(&self.file.get(), old, 1, -1).await?;
        }
        Ok(new)
    }

    /// Writes `buf` at guest `offset`; the range lies within one L2 table.
    pub(super) async fn write_in_table(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        if self.geo.extended_l2 {
            return self.write_in_table_sub(offset, buf).await;
        }
        let cs = self.geo.cluster_size;
        let len = buf.len() as u64;
        let first = offset >> self.geo.cluster_bits;
        let last = (offset + len - 1) >> self.geo.cluster_bits;
        loop {
            self.wait_inflight(first, last).await;
            let mut m = self.meta.lock().await;
            if m.corrupt {
                return Err(Error::errno(libc::ENOMEDIUM));
            }
            // Already in flight by someone who got the lock first: wait again.
            if self.allocating(first, last) {
                continue;
            }
            let mut mappings = Vec::with_capacity((last - first + 1) as usize);
            for gc in first..=last {
                mappings.push(m.mapping(&self.file.get(), gc).await?);
            }
            // Fast path: every cluster is ours alone and contiguous on the host.
            if let Mapping::Normal { host, copied: true } = mappings[0] {
                let contiguous = mappings.iter().enumerate().all(|(i, mp)| {
                    *mp == Mapping::Normal {
                        host: host + i as u64 * cs,
                        copied: true,
                    }
                });
                if contiguous {
                    let at = host + self.geo.offset_in_cluster(offset);
                    m.check_data_write(&self.file.get(), at, len).await?;
                    let _held = self.hold_hosts(
                        &m,
                        &[Extent {
                            offset,
                            len,
                            mapping: mappings[0],
                        }],
                    );
                    self.note_planned(len);
                    drop(m);
                    self.file.get().debug_event(DebugEvent::WriteAio).await;
                    return self.write_data(at, offset, buf).await;
                }
            }
            // Zero clusters that keep their host clusters, among data clusters
            // contiguous with them: one write in place.
            let kept = match self.geo.external_data {
                false => self.kept_run(&mut m, &mappings).await?,
                true => None,
            };
            // Else split at the first cluster that is (or is not) written in place.
            let in_place = |mp: &Mapping| matches!(mp, Mapping::Normal { copied: true, .. });
            let head_in_place = in_place(&mappings[0]);
            let run = mappings
                .iter()
                .take_while(|mp| in_place(mp) == head_in_place)
                .count() as u64;
            if kept.is_none() && run < last - first + 1 {
                let split = ((first + run) << self.geo.cluster_bits) - offset;
                let (a, b) = buf.split_at(split as usize);
                drop(m);
                let a = Box::pin(self.write_in_table(offset, a)).await?;
                let b = Box::pin(self.write_in_table(offset + split, b)).await?;
                return Ok(IoBuf::join_all(vec![a, b]));
            }
            if kept.is_none() && head_in_place {
                // In place but not contiguous on the host: cluster by cluster.
                drop(m);
                let split = (cs - self.geo.offset_in_cluster(offset)).min(len);
                let (a, b) = buf.split_at(split as usize);
                let a = Box::pin(self.write_in_table(offset, a)).await?;
                if b.is_empty() {
                    return Ok(a);
                }
                let b = Box::pin(self.write_in_table(offset + split, b)).await?;
                return Ok(IoBuf::join_all(vec![a, b]));
            }
            // Allocate: new L2 table if needed, then the data clusters.
            let n = last - first + 1;
            let l2 = self.writable_l2(&mut m, first).await?;
            // Lazy refcounts: the image is marked dirty while refcounts may lag.
            m.mark_dirty_for_lazy_refcounts(&self.file.get()).await?;
            let host = if self.geo.external_data {
                // A data file keeps each cluster at its guest offset, uncounted.
                first << self.geo.cluster_bits
            } else if let Some(h) = kept {
                h
            } else {
                m.alloc_clusters(&self.file.get(), n).await?
            };
            m.check_data_write(&self.file.get(), host, n * cs).await?;
            // Marked in flight until this guard goes, even if this future is dropped.
            let _inflight = InflightGuard::new(self, first, last);
            // The clusters copy-on-write reads from stay theirs meanwhile.
            let cs_len = |i: usize| Extent {
                offset: (first + i as u64) << self.geo.cluster_bits,
                len: cs,
                mapping: mappings[i],
            };
            let _cow_src = self.hold_hosts(&m, &[cs_len(0), cs_len(mappings.len() - 1)]);
            self.note_planned(len);
            drop(m);
            let written = match kept {
                Some(_) => self.write_kept_run(offset, buf, host, &mappings).await,
                None => {
                    self.write_new_clusters(offset, buf, host, first, &mappings)
                        .await
                }
            };
            let mut m = self.meta.lock().await;
            return match written {
                // Linking failed half way leaves leaks at worst, never a
                // reference to a free cluster.
                Ok((buf, copied)) => {
                    if copied {
                        // Copied old data must be stable before an L2 entry
                        // points at it: a crash would lose data the guest had.
                        m.l2_cache.set_depends_on_flush();
                    }
                    self.link_clusters(&mut m, l2, first, host, mappings.len())
                        .await
                        .map(|()| buf)
                }
                Err(e) => {
                    // Nothing points to the new clusters yet: give them back.
                    // Data file clusters were never counted, so nothing is
                    // freed for them (freeing would hit unrelated clusters).
                    if !self.geo.external_data && kept.is_none() {
                        let _ = m.update_refcounts(&self.file.get(), host, n, -1).await;
                    }
                    Err(e)
                }
            };
        }
    }

    /// Where a run of clusters is written in place although some are zero
    /// clusters: each keeps its host cluster (data clusters referenced once,
    /// zero clusters referenced by nothing else), all contiguous on the host,
    /// as QEMU writes a zero cluster with COPIED like a data cluster.
    async fn kept_run(&self, m: &mut Meta, mappings: &[Mapping]) -> Result<Option<u64>> {
        let cs = self.geo.cluster_size;
        let h0 = match mappings[0] {
            Mapping::Zero(Some(h))
            | Mapping::Normal {
                host: h,
                copied: true,
            } => h,
            _ => return Ok(None),
        };
        let mut any_zero = false;
        for (i, mp) in mappings.iter().enumerate() {
            let h = h0 + i as u64 * cs;
            match *mp {
                Mapping::Normal { host, copied: true } if host == h => {}
                Mapping::Zero(Some(host))
                    if host == h && m.refcount(&self.file.get(), h / cs).await? == 1 =>
                {
                    any_zero = true
                }
                _ => return Ok(None),
            }
        }
        Ok(any_zero.then_some(h0))
    }

    /// Writes guest data in place over a kept run (see `kept_run`): the
    /// uncovered parts of a partial zero cluster at either end are written
    /// as zeroes with it, those of a data cluster are left alone (another
    /// request may be writing them). True when zeroes were added, so the
    /// L2 entries wait for them to be stable.
    async fn write_kept_run(
        &self,
        offset: u64,
        buf: IoBuf,
        host: u64,
        mappings: &[Mapping],
    ) -> Result<(IoBuf, bool)> {
        let cs = self.geo.cluster_size;
        let head = self.geo.offset_in_cluster(offset);
        let len = buf.len() as u64;
        let total = mappings.len() as u64 * cs;
        let zero_at = |i: usize| matches!(mappings[i], Mapping::Zero(_));
        let pre = if zero_at(0) { head } else { 0 };
        let post = if zero_at(mappings.len() - 1) {
            total - head - len
        } else {
            0
        };
        self.file.get().debug_event(DebugEvent::WriteAio).await;
        if pre == 0 && post == 0 {
            let buf = self.write_data(host + head, offset, buf).await?;
            return Ok((buf, false));
        }
        let mut merged = IoBuf::zeroed((pre + len + post) as usize);
        merged.as_mut_slice()[pre as usize..(pre + len) as usize].copy_from_slice(buf.as_slice());
        self.write_data(host + head - pre, offset - pre, merged)
            .await?;
        Ok((buf, true))
    }

    /// Writes guest data and the copied-on-write rest of the partial first
    /// and last clusters into the new clusters at `host`, in one write; true
    /// when old data was copied.
    pub(super) async fn write_new_clusters(
        &self,
        offset: u64,
        buf: IoBuf,
        host: u64,
        first: u64,
        mappings: &[Mapping],
    ) -> Result<(IoBuf, bool)> {
        let cs = self.geo.cluster_size;
        let head = self.geo.offset_in_cluster(offset);
        let end = head + buf.len() as u64;
        let total = (mappings.len() as u64) * cs;
        if head == 0 && end == total {
            self.file.get().debug_event(DebugEvent::WriteAio).await;
            let buf = self.write_data(host, offset, buf).await?;
            return Ok((buf, false));
        }
        let mut merged = IoBuf::zeroed(total as usize);
        if head > 0 {
            let old = self.old_content(first, mappings[0], 0, head).await?;
            merged.as_mut_slice()[..head as usize].copy_from_slice(old.as_slice());
        }
        if end < total {
            let last = mappings.len() - 1;
            let from = end - last as u64 * cs;
            let old = self
                .old_content(first + last as u64, mappings[last], from, cs)
                .await?;
            merged.as_mut_slice()[end as usize..].copy_from_slice(old.as_slice());
        }
        merged.as_mut_slice()[head as usize..end as usize].copy_from_slice(buf.as_slice());
        // Guest data and copied-on-write bytes go in one write (QEMU's
        // merged COW announces both).
        self.file.get().debug_event(DebugEvent::WriteAio).await;
        self.file.get().debug_event(DebugEvent::CowWrite).await;
        self.write_data(host, first << self.geo.cluster_bits, merged)
            .await?;
        Ok((buf, true))
    }

    /// Points the L2 entries of `mappings.len()` guest clusters from `first`
    /// at the new clusters from `host`, then drops the old clusters' references.
    pub(super) async fn link_clusters(
        &self,
        m: &mut Meta,
        l2: u64,
        first: u64,
        host: u64,
        n: usize,
    ) -> Result<()> {
        let mask = self.geo.l2_entries() - 1;
        let mut old = Vec::with_capacity(n);
        for i in 0..n as u64 {
            let gc = first + i;
            // What the entry says now is what this write replaces; a zero
            // cluster written in place keeps its host cluster.
            let h = host + (i << self.geo.cluster_bits);
            let was = m.mapping(&self.file.get(), gc).await?;
            old.push(match was {
                // Written in place: the cluster stays this entry's.
                Mapping::Zero(Some(z)) | Mapping::Normal { host: z, .. } if z == h => {
                    Mapping::Zero(None)
                }
                other => other,
            });
            m.l2_set(&self.file.get(), l2, gc & mask, h | OFLAG_COPIED)
                .await?;
        }
        // Overwritten clusters are not discarded (QEMU's pass-discard-other).
        self.release_old(m, &old, false).await
    }

    /// Drops the references old mappings held, after the L2 change is on disk.
    pub(super) async fn release_old(
        &self,
        m: &mut Meta,
        old: &[Mapping],
        discard: bool,
    ) -> Result<()> {
        let frees: Vec<(u64, u64)> = old
            .iter()
            .filter_map(|mp| self.host_cluster_of(*mp))
            .collect();
        if frees.is_empty() {
            return Ok(());
        }
        // Neighbouring clusters are freed (and discarded) as one run.
        let mut frees = frees;
        frees.sort_unstable();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let cs = self.geo.cluster_size;
        for (off, n) in frees {
            match runs.last_mut() {
                Some((o, l)) if *o + *l * cs == off => *l += n,
                _ => runs.push((off, n)),
            }
        }
        if self.geo.external_data {
            // Nothing counts data file clusters; only the discard goes on
            // (QEMU: qcow2_free_any_cluster with a data file).
            if discard {
                let data = self.data()?;
                for (off, n) in runs {
                    data.discard(off, n * cs).await?;
                }
            }
            return Ok(());
        }
        m.flush_l2(&self.file.get()).await?;
        for (off, n) in runs {
            m.free_clusters(&self.file.get(), off, n, discard).await?;
        }
        Ok(())
    }

    /// The host clusters a mapping references (offset, count).
    pub(super) fn host_cluster_of(&self, mp: Mapping) -> Option<(u64, u64)> {
        let cs = self.geo.cluster_size;
        match mp {
            Mapping::Normal { host, .. } | Mapping::Zero(Some(host)) => Some((host & !(cs - 1), 1)),
            Mapping::Compressed(entry) => {
                let (off, span) = self.geo.compressed_extent(entry);
                let end = off + span;
                let start = off & !(cs - 1);
                Some((start, (end - start).div_ceil(cs)))
            }
            _ => None,
        }
    }

    /// One guest cluster compressed, or None where it would not shrink.
    /// Made on the blocking pool (QEMU: qcow2_co_compress, on its thread
    /// pool): it holds a core for its time, and the loop serves on.
    pub(super) async fn compress_cluster(&self, buf: &IoBuf) -> Result<Option<Vec<u8>>> {
        let data = self.whole_cluster(buf);
        let (kind, max) = (self.compression, data.len() - 1);
        strata_block::engine::off_loop(move || compress::compress(kind, &data, max)).await
    }

    /// [`Self::compress_cluster`] on this thread.
    pub(super) fn compress_here(&self, buf: &IoBuf) -> Option<Vec<u8>> {
        let data = self.whole_cluster(buf);
        compress::compress(self.compression, &data, data.len() - 1)
    }

    /// `buf` padded with zeroes to a whole cluster: the last cluster of an
    /// image whose size is not a multiple of it.
    fn whole_cluster(&self, buf: &IoBuf) -> Vec<u8> {
        let mut data = buf.as_slice().to_vec();
        data.resize(self.geo.cluster_size as usize, 0);
        data
    }

    /// Writes one guest cluster, `buf`, as `packed`, its compressed form
    /// (QEMU: qcow2_co_pwritev_compressed_task): only into an unallocated
    /// cluster; data that did not shrink is written the ordinary way.
    pub(super) async fn write_compressed_cluster(
        &self,
        offset: u64,
        buf: IoBuf,
        packed: Option<Vec<u8>>,
    ) -> Result<IoBuf> {
        let Some(packed) = packed else {
            return self.write(offset, buf, WriteFlags::default()).await;
        };
        let plen = packed.len() as u64;
        let gc = offset >> self.geo.cluster_bits;
        let idx = gc & (self.geo.l2_entries() - 1);
        // Plan under the lock: the cluster must be unallocated; it is marked
        // in flight so no other write allocates it meanwhile.
        let (host, _inflight) = loop {
            self.wait_inflight(gc, gc).await;
            let mut m = self.meta.lock().await;
            if m.corrupt {
                return Err(Error::errno(libc::ENOMEDIUM));
            }
            if self.allocating(gc, gc) {
                continue;
            }
            let l2 = self.writable_l2(&mut m, gc).await?;
            // Compression cannot overwrite anything.
            if m.l2_get(&self.file.get(), l2, idx).await? & OFFSET_MASK != 0 {
                return Err(Error::errno(libc::EIO));
            }
            let host = m.alloc_bytes(&self.file.get(), plen).await?;
            m.check_metadata_write(&self.file.get(), host, plen).await?;
            break (host, InflightGuard::new(self, gc, gc));
        };
        // I/O without it: the data is on disk before anything points to it.
        self.file
            .get()
            .debug_event(DebugEvent::WriteCompressed)
            .await;
        let written = self
            .file
            .get()
            .write(host, IoBuf::from_slice(&packed), WriteFlags::default())
            .await;
        // Commit under it.
        let mut m = self.meta.lock().await;
        let cs = self.geo.cluster_size;
        let (first_hc, n) = (host / cs, (host + plen - 1) / cs - host / cs + 1);
        if let Err(e) = written {
            // Nothing points to the bytes: give their references back.
            let _ = m
                .update_refcounts(&self.file.get(), first_hc * cs, n, -1)
                .await;
            return Err(e);
        }
        let l2 = self.writable_l2(&mut m, gc).await?;
        self.file
            .get()
            .debug_event(DebugEvent::L2UpdateCompressed)
            .await;
        let entry = self.geo.compressed_entry(host, plen);
        m.l2_set(&self.file.get(), l2, idx, entry).await?;
        if self.geo.extended_l2 {
            // The word is unused for compressed clusters: kept clear.
            m.l2_set_bitmap(&self.file.get(), l2, idx, 0).await?;
        }
        Ok(buf)
    }
}
