//! Internal snapshots (QEMU: qcow2-snapshot.c): create, apply (goto),
//! delete, and load one read-only in place of the active L1 table.
//!
//! A snapshot is a copy of the L1 table; every cluster it reaches gains a
//! reference, so a later write to a shared cluster copies it first (an
//! entry says COPIED only while its cluster's refcount is one). Each
//! operation holds the metadata lock throughout, and the generic layer
//! drains the node first: no guest request is in flight. The order on disk
//! is QEMU's: references are counted and flushed before anything points to
//! them, and dropped only after nothing does, so a crash leaks clusters at
//! worst.

use super::meta::{tables_of, Mapping, Meta, WriteKind, OFFSET_MASK, OFLAG_COPIED};
use super::snapshot::{self, Snapshot};
use super::Qcow2Driver;
use strata_block::driver::SnapshotInfo;
use strata_block::error::strerror;
use strata_block::{Driver, Error, IoBuf, Preallocation, Result, WriteFlags};

/// Where a refcount walk writes its table back when COPIED flags changed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WriteBack {
    /// The active L1 table (memory and disk).
    Active,
    /// A snapshot's L1 table at this offset.
    At(u64),
    /// Nowhere (the table is going away).
    Not,
}

fn table_bytes(t: &[u64]) -> Vec<u8> {
    t.iter().flat_map(|e| e.to_be_bytes()).collect()
}

impl Qcow2Driver {
    /// Snapshots need the image file to hold every version of a cluster.
    fn snapshots_possible(&self) -> Result<()> {
        if self.geo.external_data {
            return Err(Error::errno(libc::ENOTSUP));
        }
        Ok(())
    }

    /// A snapshot's L1 table, checked as QEMU checks it before use.
    pub(super) async fn read_snapshot_l1(&self, sn: &Snapshot) -> Result<Vec<u64>> {
        super::snapshot::read_l1(&self.file.get(), sn, self.geo.cluster_size).await
    }

    /// Adds `addend` (-1, 0 or 1) to the refcount of every cluster `l1`
    /// reaches, and sets COPIED on exactly the entries whose cluster ends
    /// up referenced once (QEMU: qcow2_update_snapshot_refcount); returns
    /// the table with its flags so set. Dirty metadata is flushed at the
    /// end; tables and data clusters that lost their last reference leave
    /// the cache (also when the walk fails half way) and are discarded in
    /// the file.
    async fn update_snapshot_refcount(
        &self,
        m: &mut Meta,
        mut l1: Vec<u64>,
        addend: i64,
        back: WriteBack,
    ) -> Result<Vec<u64>> {
        let cs = self.geo.cluster_size;
        let mut freed = Vec::new();
        let walked = self.walk_refcounts(m, &mut l1, addend, &mut freed).await;
        let flushed = match walked {
            Ok(changed) => match m.flush(&self.file.get()).await {
                Ok(()) => self.file.get().flush().await.map(|()| changed),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        // Freed tables must never be written again from the cache: their
        // clusters may hold anything from now on (nothing reaches them).
        for &c in &freed {
            m.l2_cache.remove_table(c, cs);
        }
        let l1_changed = flushed?;
        for c in freed {
            self.file.get().discard(c, cs).await?;
        }
        if addend < 0 || !l1_changed {
            return Ok(l1);
        }
        match back {
            WriteBack::Active => {
                let (off, len) = (m.header.l1_table_offset, l1.len() as u64 * 8);
                m.check_write(&self.file.get(), off, len, WriteKind::L1)
                    .await?;
                self.write_sync(off, &table_bytes(&l1)).await?;
                m.l1 = l1.clone();
            }
            WriteBack::At(off) => {
                m.check_metadata_write(&self.file.get(), off, l1.len() as u64 * 8)
                    .await?;
                self.write_sync(off, &table_bytes(&l1)).await?;
            }
            WriteBack::Not => {}
        }
        Ok(l1)
    }

    /// The walk of [`Self::update_snapshot_refcount`]: changes refcounts and
    /// flags in the caches and `l1`; true when `l1` changed. Clusters whose
    /// last reference this walk dropped go to `freed`.
    async fn walk_refcounts(
        &self,
        m: &mut Meta,
        l1: &mut [u64],
        addend: i64,
        freed: &mut Vec<u64>,
    ) -> Result<bool> {
        let cs = self.geo.cluster_size;
        let mut l1_changed = false;
        for (i, e) in l1.iter_mut().enumerate() {
            let l2 = *e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if !l2.is_multiple_of(cs) {
                let e = Error::corrupt(format!(
                    "L2 table offset {l2:#x} unaligned (L1 index: {i:#x})"
                ));
                return Err(m.signal_corruption(&self.file.get(), e).await);
            }
            for j in 0..self.geo.l2_entries() {
                let old = m.l2_get(&self.file.get(), l2, j).await?;
                let entry = old & !OFLAG_COPIED;
                let refcount = match m.decode(entry, l2, j) {
                    Err(e) => return Err(m.signal_corruption(&self.file.get(), e).await),
                    Ok(Mapping::Compressed(_)) => {
                        if addend != 0 {
                            let (host, len) = self.geo.compressed_extent(entry);
                            let first = host / cs;
                            let n = (host + len - 1) / cs - first + 1;
                            if addend > 0 {
                                m.counted(first * cs)?;
                            }
                            m.update_refcounts(&self.file.get(), first * cs, n, addend)
                                .await?;
                        }
                        // Compressed clusters are never written in place.
                        2
                    }
                    Ok(Mapping::Normal { host, .. }) | Ok(Mapping::Zero(Some(host))) => {
                        if addend > 0 {
                            m.counted(host)?;
                        }
                        if addend != 0 {
                            m.update_refcounts(&self.file.get(), host, 1, addend)
                                .await?;
                        }
                        let rc = m.refcount(&self.file.get(), host / cs).await?;
                        // Only a reference this walk dropped frees anything.
                        if rc == 0 && addend < 0 {
                            freed.push(host);
                        }
                        rc
                    }
                    Ok(Mapping::Unallocated | Mapping::Zero(None) | Mapping::Reserved(_)) => 0,
                };
                let new = if refcount == 1 {
                    entry | OFLAG_COPIED
                } else {
                    entry
                };
                if new != old {
                    m.l2_set(&self.file.get(), l2, j, new).await?;
                }
            }
            if addend != 0 {
                m.update_refcounts(&self.file.get(), l2, 1, addend).await?;
            }
            let rc = m.refcount(&self.file.get(), l2 / cs).await?;
            if rc == 0 && addend < 0 {
                freed.push(l2);
            }
            let new = if rc == 1 { l2 | OFLAG_COPIED } else { l2 };
            if new != *e {
                *e = new;
                l1_changed = true;
            }
        }
        Ok(l1_changed)
    }

    /// Writes `bytes` at `off` of the image file and flushes it.
    async fn write_sync(&self, off: u64, bytes: &[u8]) -> Result<()> {
        self.file
            .get()
            .write(off, IoBuf::from_slice(bytes), WriteFlags::default())
            .await?;
        self.file.get().flush().await
    }

    /// Writes the snapshot table anew and points the header at it, then
    /// frees the old one (QEMU: qcow2_write_snapshots).
    pub(super) async fn write_snapshot_table(
        &self,
        m: &mut Meta,
        list: &[Snapshot],
        old_len: u64,
    ) -> Result<()> {
        let cs = self.geo.cluster_size;
        let bytes = snapshot::encode(list)?;
        let clusters = (bytes.len() as u64).div_ceil(cs);
        let off = if clusters == 0 {
            0
        } else {
            m.alloc_clusters(&self.file.get(), clusters).await?
        };
        // The table and its refcounts are on disk before the header names it.
        m.flush(&self.file.get()).await?;
        self.file.get().flush().await?;
        if clusters > 0 {
            m.check_metadata_write(&self.file.get(), off, bytes.len() as u64)
                .await?;
            self.write_sync(off, &bytes).await?;
        }
        let mut h = [0u8; 12];
        h[..4].copy_from_slice(&(list.len() as u32).to_be_bytes());
        h[4..].copy_from_slice(&off.to_be_bytes());
        self.write_sync(60, &h).await?;
        let (old_off, old_nb) = (m.header.snapshots_offset, m.header.nb_snapshots);
        m.header.nb_snapshots = list.len() as u32;
        m.header.snapshots_offset = off;
        if old_nb > 0 && old_len > 0 {
            // The new table is in place: failing to free the old one only
            // leaks it (QEMU's qcow2_free_clusters reports and goes on).
            if let Err(e) = m
                .free_clusters(&self.file.get(), old_off, old_len.div_ceil(cs), true)
                .await
            {
                strata_block::stderr_line!("qcow2_free_clusters failed: {}", strerror(e.code()));
            }
        }
        Ok(())
    }

    /// QEMU: qcow2_snapshot_create.
    pub(super) async fn create_snapshot(&self, sn: &SnapshotInfo) -> Result<()> {
        self.snapshots_possible()?;
        let mut m = self.meta.lock().await;
        let (mut list, old_len) = snapshot::read(&self.file.get(), &m.header).await?;
        if list.len() as u32 >= snapshot::max_snapshots() {
            return Err(Error::errno(libc::EFBIG));
        }
        let id = snapshot::new_id(&list);
        // The snapshot's L1 table: a copy of the active one.
        let l1 = m.l1.clone();
        let bytes = l1.len() as u64 * 8;
        let l1_offset = if bytes == 0 {
            0
        } else {
            let off = m
                .alloc_clusters(&self.file.get(), bytes.div_ceil(self.geo.cluster_size))
                .await?;
            m.check_metadata_write(&self.file.get(), off, bytes).await?;
            self.file
                .get()
                .write(
                    off,
                    IoBuf::from_slice(&table_bytes(&l1)),
                    WriteFlags::default(),
                )
                .await?;
            off
        };
        // Every cluster gains its reference (and flags) before the table
        // that adds it is linked.
        self.update_snapshot_refcount(&mut m, l1.clone(), 1, WriteBack::Active)
            .await?;
        m.l2_tables = tables_of(&m.l1);
        let mut entry = Snapshot::new(
            l1_offset,
            l1.len() as u32,
            self.length(),
            SnapshotInfo { id, ..sn.clone() },
        );
        // QEMU keeps at most 255 bytes of a name (QEMUSnapshotInfo), cut
        // where they end, even inside a character.
        entry.raw_name.truncate(255);
        list.push(entry);
        self.write_snapshot_table(&mut m, &list, old_len).await
    }

    /// QEMU: qcow2_snapshot_goto.
    pub(super) async fn goto_snapshot(&self, id_or_name: &str) -> Result<()> {
        self.snapshots_possible()?;
        let sn = {
            let m = self.meta.lock().await;
            let (list, _) = snapshot::read(&self.file.get(), &m.header).await?;
            let i = snapshot::find_by_id_or_name(&list, id_or_name)
                .ok_or_else(|| Error::errno(libc::ENOENT))?;
            list[i].clone()
        };
        // QEMU reports what is wrong with the table itself and fails
        // with its errno (then worded "Failed to load snapshot: ...").
        let sn_l1 = self.read_snapshot_l1(&sn).await.map_err(|e| {
            if let Some(msg) = e.message() {
                strata_block::report::error_report(msg);
            }
            Error::errno(e.code())
        })?;
        if sn.disk_size != self.length() {
            self.truncate(sn.disk_size, true, Preallocation::Off)
                .await?;
        }
        let mut m = self.meta.lock().await;
        if sn.l1_size as usize > m.l1.len() {
            self.grow_l1(&mut m, sn.l1_size as u64).await?;
        }
        // The snapshot's clusters gain their references before the active
        // table points to them; the old ones lose theirs only after.
        // The table as the walk left it: its COPIED flags say what is
        // shared now, so a crash before the last pass cannot leave the
        // active table claiming a shared L2 table is its own.
        let mut new_l1 = self
            .update_snapshot_refcount(&mut m, sn_l1, 1, WriteBack::At(sn.l1_offset))
            .await?;
        new_l1.resize(m.l1.len(), 0);
        let (off, len) = (m.header.l1_table_offset, m.l1.len() as u64 * 8);
        m.check_write(&self.file.get(), off, len, WriteKind::L1)
            .await?;
        self.write_sync(off, &table_bytes(&new_l1)).await?;
        let old = std::mem::replace(&mut m.l1, new_l1);
        m.l2_tables = tables_of(&m.l1);
        self.update_snapshot_refcount(&mut m, old, -1, WriteBack::Not)
            .await?;
        // Dropping the old references may leave clusters referenced once.
        let active = m.l1.clone();
        self.update_snapshot_refcount(&mut m, active, 0, WriteBack::Active)
            .await
            .map(drop)
    }

    /// QEMU: qcow2_snapshot_delete.
    pub(super) async fn delete_snapshot(&self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        self.snapshots_possible()?;
        let mut m = self.meta.lock().await;
        let (mut list, old_len) = snapshot::read(&self.file.get(), &m.header).await?;
        let i = snapshot::find(&list, id, name)
            .ok_or_else(|| Error::msg(libc::ENOENT, "Can't find the snapshot"))?;
        let sn = list.remove(i);
        let sn_l1 = self.read_snapshot_l1(&sn).await?;
        self.write_snapshot_table(&mut m, &list, old_len)
            .await
            .map_err(|e| e.context("Failed to remove snapshot from snapshot list"))?;
        // Unlinked: from here a failure leaks clusters, never loses data.
        let free = async {
            self.update_snapshot_refcount(&mut m, sn_l1, -1, WriteBack::Not)
                .await?;
            let bytes = sn.l1_size as u64 * 8;
            if bytes > 0 {
                let n = bytes.div_ceil(self.geo.cluster_size);
                m.free_clusters(&self.file.get(), sn.l1_offset, n, true)
                    .await?;
            }
            Ok::<_, Error>(())
        };
        free.await
            .map_err(|e| e.context("Failed to free the cluster and L1 table"))?;
        let active = m.l1.clone();
        self.update_snapshot_refcount(&mut m, active, 0, WriteBack::Active)
            .await
            .map(drop)
            .map_err(|e| e.context("Failed to update snapshot status in disk"))
    }

    /// QEMU: qcow2_snapshot_load_tmp. The disk keeps its size.
    pub(super) async fn load_snapshot_tmp(
        &self,
        id: Option<&str>,
        name: Option<&str>,
    ) -> Result<()> {
        if !self.read_only() {
            return Err(Error::invalid("Device is not readonly"));
        }
        let mut m = self.meta.lock().await;
        let (list, _) = snapshot::read(&self.file.get(), &m.header).await?;
        let i = snapshot::find(&list, id, name)
            .ok_or_else(|| Error::msg(libc::ENOENT, "Can't find snapshot"))?;
        let sn = &list[i];
        let l1 = match self.read_snapshot_l1(sn).await {
            Err(e) if e.message().is_none() => {
                return Err(Error::msg(e.code(), "Failed to read l1 table for snapshot"))
            }
            r => r?,
        };
        m.header.l1_table_offset = sn.l1_offset;
        m.header.l1_size = sn.l1_size;
        m.l1 = l1;
        m.l2_tables = tables_of(&m.l1);
        Ok(())
    }
}
