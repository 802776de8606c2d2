//! Persistent dirty bitmaps in and out of the image (QEMU: qcow2-bitmap.c).
//!
//! At open every bitmap of the directory becomes one of the node's dirty
//! bitmaps, and a writer marks them IN_USE on disk at once: if it dies,
//! the next opener knows their bits missed writes (inconsistent). At close
//! the bits go to fresh clusters, a new directory names them without
//! IN_USE, and only then are the old clusters freed, so a crash leaves the
//! old state or the new one, leaking clusters at worst. The directory is
//! rewritten in place only to set IN_USE, with the autoclear bit cleared
//! around the write: a torn directory is then ignored, never trusted.

use super::bitmaps::{
    self, check_constraints, entry_size, parse_directory, serialize_directory, table_entry_ok,
    DirEntry, ENTRY_ALL_ONES, ENTRY_OFFSET_MASK, FLAG_AUTO, FLAG_IN_USE,
};
use super::header::{BitmapsExt, AUTOCLEAR_BITMAPS, MAX_BITMAPS, MAX_BITMAP_DIR_SIZE};
use super::meta::Meta;
use super::Qcow2Driver;
use std::sync::Arc;
use strata_block::error::strerror;
use strata_block::{DirtyBitmap, DirtyBitmaps, Driver, Error, IoBuf, Result, WriteFlags};

/// Errors of a step, as QEMU's error_setg_errno words them.
fn with_errno(e: Error, what: &str) -> Error {
    Error::msg(e.code(), format!("{what}: {}", strerror(e.code())))
}

impl Qcow2Driver {
    /// The node's bitmaps, once the node gave them.
    fn node_bitmaps(&self) -> Option<Arc<DirtyBitmaps>> {
        self.node_bitmaps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Keeps the directory as it is on disk now, for `info`.
    fn set_shown_directory(&self, dir: Vec<DirEntry>) {
        *self.bitmap_dir.lock().unwrap_or_else(|p| p.into_inner()) = dir;
    }

    /// The directory as it is on disk, for `info`.
    pub(super) fn shown_directory(&self) -> Vec<DirEntry> {
        self.bitmap_dir
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads and checks the directory the header points to.
    async fn read_directory(&self, m: &Meta) -> Result<Vec<DirEntry>> {
        let Some(ext) = m.header.bitmaps else {
            return Ok(Vec::new());
        };
        if ext.dir_size == 0 {
            return Err(Error::invalid("Requested bitmap directory size is zero"));
        }
        let dir = self
            .file
            .get()
            .read(ext.dir_offset, IoBuf::zeroed(ext.dir_size as usize))
            .await
            .map_err(|e| with_errno(e, "Failed to read bitmap directory"))?;
        parse_directory(
            dir.as_slice(),
            ext.nb_bitmaps,
            self.geo.cluster_size,
            self.length(),
        )
    }

    /// A bitmap's table, every entry checked (QEMU: bitmap_table_load).
    async fn read_table(&self, e: &DirEntry) -> Result<Vec<u64>> {
        let b = self
            .file
            .get()
            .read(e.table_offset, IoBuf::zeroed(e.table_size as usize * 8))
            .await?;
        let t: Vec<u64> = b
            .as_slice()
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        if t.iter().any(|&x| !table_entry_ok(x, self.geo.cluster_size)) {
            return Err(Error::errno(libc::EINVAL));
        }
        Ok(t)
    }

    /// Fills `b` from the clusters of its table (QEMU: load_bitmap_data).
    async fn read_bits(&self, e: &DirEntry, b: &DirtyBitmap) -> Result<()> {
        let table = self.read_table(e).await.map_err(|err| {
            with_errno(
                err,
                &format!(
                    "Could not read bitmap_table table from image for bitmap '{}'",
                    e.name
                ),
            )
        })?;
        let failed = |err: Error| {
            with_errno(
                err,
                &format!("Could not read bitmap '{}' from image", e.name),
            )
        };
        let cs = self.geo.cluster_size;
        let (size, granularity) = (b.size(), b.granularity());
        let total = bitmaps::bytes_needed(size, granularity);
        if bitmaps::table_size(size, granularity, cs) != u64::from(e.table_size) {
            return Err(failed(Error::errno(libc::EINVAL)));
        }
        // Disk bytes one cluster of bits covers.
        let coverage = cs * 8 * granularity;
        let mut bytes = vec![0u8; total as usize];
        let mut ones = Vec::new();
        for (i, &entry) in table.iter().enumerate() {
            let at = i as u64 * cs;
            let len = cs.min(total - at) as usize;
            let data = entry & ENTRY_OFFSET_MASK;
            if data != 0 {
                let c = self
                    .file
                    .get()
                    .read(data, IoBuf::zeroed(len))
                    .await
                    .map_err(failed)?;
                bytes[at as usize..at as usize + len].copy_from_slice(c.as_slice());
            } else if entry & ENTRY_ALL_ONES != 0 {
                ones.push(i as u64 * coverage);
            }
        }
        // Bits past the disk's end mean nothing.
        let bits = size.div_ceil(granularity);
        if bits % 8 != 0 {
            if let Some(last) = bytes.last_mut() {
                *last &= (1u8 << (bits % 8)) - 1;
            }
        }
        b.deserialize(&bytes).map_err(failed)?;
        for start in ones {
            b.set(start, coverage.min(size - start));
        }
        Ok(())
    }

    /// QEMU's qcow2_load_dirty_bitmaps: every bitmap of the image into the
    /// node; with write access those loaded are marked IN_USE on disk.
    pub(super) async fn load_persistent_bitmaps(&self, bms: &Arc<DirtyBitmaps>) -> Result<()> {
        *self.node_bitmaps.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(bms));
        let mut m = self.meta.lock().await;
        let on_disk = self.read_directory(&m).await?;
        let mut dir = on_disk.clone();
        let mut created: Vec<Arc<DirtyBitmap>> = Vec::new();
        let mut needs_update = false;
        let mut result = Ok(());
        for e in dir.iter_mut() {
            let in_use = e.flags & FLAG_IN_USE != 0;
            // Already here with an in-use copy on disk: ours is the live one.
            if in_use && bms.find(&e.name).is_some() {
                continue;
            }
            let b = match bms.create(Some(&e.name), 1 << e.granularity_bits, self.length()) {
                Ok(b) => b,
                Err(err) => {
                    result = Err(err);
                    break;
                }
            };
            created.push(Arc::clone(&b));
            if !in_use {
                // An in-use bitmap's bits are not worth reading.
                if let Err(err) = self.read_bits(e, &b).await {
                    result = Err(err);
                    break;
                }
                e.flags |= FLAG_IN_USE;
                needs_update = true;
            }
            b.set_persistent(true);
            // Disabled before it is marked inconsistent, which set_enabled
            // would refuse.
            if e.flags & FLAG_AUTO == 0 {
                bms.set_enabled(&b, false)?;
            }
            b.set_inconsistent(in_use);
        }
        if result.is_ok() && needs_update && !self.read_only() {
            result = self
                .rewrite_directory_in_place(&mut m, &dir)
                .await
                .map_err(|e| with_errno(e, "Can't update bitmap directory"));
        }
        if let Err(e) = result {
            for b in &created {
                bms.release(b);
            }
            return Err(e);
        }
        if self.read_only() {
            for b in &created {
                b.set_readonly(true);
            }
            self.set_shown_directory(on_disk);
        } else {
            self.set_shown_directory(dir);
        }
        Ok(())
    }

    /// After a reopen read-write (QEMU: qcow2_reopen_bitmaps_rw): the
    /// bitmaps loaded read-only are marked in use on disk and take writes.
    pub(super) async fn reopen_bitmaps_rw(&self) -> Result<()> {
        let Some(bms) = self.node_bitmaps() else {
            return Ok(());
        };
        let mut m = self.meta.lock().await;
        let mut dir = self.read_directory(&m).await?;
        let mut reopened = Vec::new();
        for e in dir.iter_mut() {
            let Some(b) = bms.find(&e.name) else {
                continue;
            };
            if e.flags & FLAG_IN_USE != 0 || !b.is_readonly() {
                continue;
            }
            e.flags |= FLAG_IN_USE;
            reopened.push(b);
        }
        if reopened.is_empty() {
            return Ok(());
        }
        self.rewrite_directory_in_place(&mut m, &dir)
            .await
            .map_err(|e| with_errno(e, "Can't update bitmap directory"))?;
        for b in &reopened {
            b.set_readonly(false);
        }
        self.set_shown_directory(dir);
        Ok(())
    }

    /// After the bitmaps were stored for a reopen read-only (QEMU:
    /// qcow2_reopen_bitmaps_ro): the persistent ones take no more writes.
    pub(super) fn bitmaps_read_only(&self) {
        if let Some(bms) = self.node_bitmaps() {
            for b in bms.list().iter().filter(|b| b.is_persistent()) {
                b.set_readonly(true);
            }
        }
    }

    /// Rewrites the directory where it is, same size (only flags change),
    /// with the autoclear bit off while it is written (QEMU:
    /// update_ext_header_and_dir_in_place).
    async fn rewrite_directory_in_place(&self, m: &mut Meta, dir: &[DirEntry]) -> Result<()> {
        let ext = match m.header.bitmaps {
            Some(ext) if m.header.autoclear_features & AUTOCLEAR_BITMAPS != 0 => ext,
            _ => return Err(Error::errno(libc::EINVAL)),
        };
        let bytes = serialize_directory(dir, self.geo.cluster_size, self.length())?;
        if bytes.len() as u64 != ext.dir_size || dir.len() as u32 != ext.nb_bitmaps {
            return Err(Error::errno(libc::EINVAL));
        }
        m.header.autoclear_features &= !AUTOCLEAR_BITMAPS;
        self.write_header(m).await?;
        self.file
            .get()
            .write(
                ext.dir_offset,
                IoBuf::from_slice(&bytes),
                WriteFlags::default(),
            )
            .await?;
        m.header.autoclear_features |= AUTOCLEAR_BITMAPS;
        self.write_header(m).await
    }

    /// Writes a new directory (or none) and points the header at it, then
    /// frees the old one (QEMU: update_ext_header_and_dir).
    async fn replace_directory(&self, m: &mut Meta, dir: &[DirEntry]) -> Result<()> {
        let cs = self.geo.cluster_size;
        let old_header = m.header.clone();
        let mut new = None;
        if dir.is_empty() {
            m.header.autoclear_features &= !AUTOCLEAR_BITMAPS;
            m.header.bitmaps = None;
        } else {
            if dir.len() as u32 > MAX_BITMAPS {
                return Err(Error::errno(libc::EINVAL));
            }
            let bytes = serialize_directory(dir, cs, self.length())?;
            let len = bytes.len() as u64;
            let off = m.alloc_clusters(&self.file.get(), len.div_ceil(cs)).await?;
            new = Some((off, len));
            let written = match m.check_metadata_write(&self.file.get(), off, len).await {
                Ok(()) => self
                    .file
                    .get()
                    .write(off, IoBuf::from_slice(&bytes), WriteFlags::default())
                    .await
                    .map(drop),
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                let _ = m
                    .free_clusters(&self.file.get(), off, len.div_ceil(cs), false)
                    .await;
                return Err(e);
            }
            m.header.autoclear_features |= AUTOCLEAR_BITMAPS;
            m.header.bitmaps = Some(BitmapsExt {
                nb_bitmaps: dir.len() as u32,
                dir_size: len,
                dir_offset: off,
            });
        }
        if let Err(e) = self.write_header(m).await {
            m.header = old_header;
            if let Some((off, len)) = new {
                let _ = m
                    .free_clusters(&self.file.get(), off, len.div_ceil(cs), false)
                    .await;
            }
            return Err(e);
        }
        if let Some(old) = old_header.bitmaps {
            m.free_clusters(
                &self.file.get(),
                old.dir_offset,
                old.dir_size.div_ceil(cs),
                false,
            )
            .await?;
        }
        self.set_shown_directory(dir.to_vec());
        Ok(())
    }

    /// Frees a bitmap's data clusters and table (QEMU: free_bitmap_clusters).
    async fn free_bitmap_clusters(&self, m: &mut Meta, offset: u64, size: u32) -> Result<()> {
        let e = DirEntry {
            table_offset: offset,
            table_size: size,
            flags: 0,
            granularity_bits: 16,
            name: String::new(),
        };
        let table = self.read_table(&e).await?;
        let cs = self.geo.cluster_size;
        for entry in table {
            let data = entry & ENTRY_OFFSET_MASK;
            if data != 0 {
                m.free_clusters(&self.file.get(), data, 1, true).await?;
            }
        }
        m.free_clusters(
            &self.file.get(),
            offset,
            (u64::from(size) * 8).div_ceil(cs),
            false,
        )
        .await
    }

    /// Writes one bitmap's bits and table to fresh clusters (QEMU:
    /// store_bitmap); returns the table's offset and size. Clusters of
    /// zero bits are not written: their entries stay 0.
    async fn write_bitmap(&self, m: &mut Meta, b: &DirtyBitmap) -> Result<(u64, u32)> {
        let name = b.name().unwrap_or_default();
        let cs = self.geo.cluster_size;
        let bytes = b.serialize();
        let tb_size = (bytes.len() as u64).div_ceil(cs);
        if tb_size > 0x800_0000 || tb_size * cs > 0x2000_0000 {
            return Err(Error::invalid(format!("Bitmap '{name}' is too big")));
        }
        let alloc_failed = |e: Error| {
            with_errno(
                e,
                &format!("Failed to allocate clusters for bitmap '{name}'"),
            )
        };
        let write_failed =
            |e: Error| with_errno(e, &format!("Failed to write bitmap '{name}' to file"));
        let mut table = vec![0u64; tb_size as usize];
        let mut result = Ok(());
        for (i, chunk) in bytes.chunks(cs as usize).enumerate() {
            if chunk.iter().all(|&x| x == 0) {
                continue;
            }
            let off = match m.alloc_clusters(&self.file.get(), 1).await {
                Ok(off) => off,
                Err(e) => {
                    result = Err(alloc_failed(e));
                    break;
                }
            };
            table[i] = off;
            let mut buf = IoBuf::zeroed(cs as usize);
            buf.as_mut_slice()[..chunk.len()].copy_from_slice(chunk);
            if let Err(e) = self.write_metadata(m, off, buf).await {
                result = Err(write_failed(e));
                break;
            }
        }
        let table_bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        let tb_len = table_bytes.len() as u64;
        if result.is_ok() {
            match m
                .alloc_clusters(&self.file.get(), tb_len.div_ceil(cs))
                .await
            {
                Ok(off) => match self
                    .write_metadata(m, off, IoBuf::from_slice(&table_bytes))
                    .await
                {
                    Ok(()) => return Ok((off, tb_size as u32)),
                    Err(e) => {
                        let _ = m
                            .free_clusters(&self.file.get(), off, tb_len.div_ceil(cs), false)
                            .await;
                        result = Err(write_failed(e));
                    }
                },
                Err(e) => result = Err(alloc_failed(e)),
            }
        }
        for off in table.into_iter().filter(|&o| o != 0) {
            let _ = m.free_clusters(&self.file.get(), off, 1, true).await;
        }
        result.map(|()| (0, 0))
    }

    /// A write of new metadata, checked against the existing metadata.
    async fn write_metadata(&self, m: &mut Meta, off: u64, buf: IoBuf) -> Result<()> {
        m.check_metadata_write(&self.file.get(), off, buf.len() as u64)
            .await
            .map_err(|e| with_errno(e, "Qcow2 overlap check failed"))?;
        self.file
            .get()
            .write(off, buf, WriteFlags::default())
            .await?;
        Ok(())
    }

    /// QEMU's qcow2_store_persistent_dirty_bitmaps: every persistent
    /// bitmap that may be written goes to the image, replacing its in-use
    /// copy; inconsistent and read-only ones stay as they are on disk.
    pub(super) async fn store_persistent_bitmaps(&self) -> Result<()> {
        let Some(bms) = self.node_bitmaps() else {
            return Ok(());
        };
        let mut m = self.meta.lock().await;
        if m.corrupt {
            return Ok(());
        }
        let cs = self.geo.cluster_size;
        let len = self.length();
        let mut dir = self.read_directory(&m).await?;
        let mut dir_size: u64 = dir.iter().map(|e| entry_size(e.name.len())).sum();
        let mut todo: Vec<(usize, Arc<DirtyBitmap>)> = Vec::new();
        let mut drop_tables = Vec::new();
        for b in bms.list() {
            if !b.is_persistent() || b.is_inconsistent() || b.is_readonly() {
                continue;
            }
            let name = b.name().unwrap_or_default().to_string();
            check_constraints(&name, b.granularity(), len, cs).map_err(|e| {
                Error::invalid(format!(
                    "Bitmap '{name}' doesn't satisfy the constraints: {e}"
                ))
            })?;
            let i = match dir.iter().position(|e| e.name == name) {
                None => {
                    if dir.len() as u32 >= MAX_BITMAPS {
                        return Err(Error::invalid("Too many persistent bitmaps"));
                    }
                    dir_size += entry_size(name.len());
                    if dir_size > MAX_BITMAP_DIR_SIZE {
                        return Err(Error::invalid("Bitmap directory is too large"));
                    }
                    dir.push(DirEntry {
                        table_offset: 0,
                        table_size: 0,
                        flags: 0,
                        granularity_bits: 0,
                        name: name.clone(),
                    });
                    dir.len() - 1
                }
                Some(i) => {
                    if dir[i].flags & FLAG_IN_USE == 0 {
                        return Err(Error::invalid(format!(
                            "Bitmap '{name}' already exists in the image"
                        )));
                    }
                    drop_tables.push((dir[i].table_offset, dir[i].table_size));
                    i
                }
            };
            dir[i].flags = if b.is_enabled() { FLAG_AUTO } else { 0 };
            dir[i].granularity_bits = b.granularity().trailing_zeros() as u8;
            todo.push((i, b));
        }
        if todo.is_empty() {
            return Ok(());
        }
        if self.read_only() {
            return Err(Error::invalid("No write access"));
        }
        let mut written = Vec::new();
        let mut result = Ok(());
        for (i, b) in &todo {
            match self.write_bitmap(&mut m, b).await {
                Ok((off, size)) => {
                    (dir[*i].table_offset, dir[*i].table_size) = (off, size);
                    written.push((off, size));
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() {
            result = self
                .replace_directory(&mut m, &dir)
                .await
                .map_err(|e| with_errno(e, "Failed to update bitmap extension"));
        }
        if let Err(e) = result {
            for (off, size) in written {
                let _ = self.free_bitmap_clusters(&mut m, off, size).await;
            }
            return Err(e);
        }
        // The directory names the new copies: the old ones can go.
        for (off, size) in drop_tables {
            let _ = self.free_bitmap_clusters(&mut m, off, size).await;
        }
        Ok(())
    }

    /// QEMU's qcow2_co_remove_persistent_dirty_bitmap.
    pub(super) async fn remove_bitmap_from_image(&self, name: &str) -> Result<()> {
        let mut m = self.meta.lock().await;
        if m.header.bitmaps.is_none() {
            return Ok(());
        }
        let mut dir = self
            .read_directory(&m)
            .await
            .map_err(|e| Error::msg(libc::EIO, e.to_string()))?;
        let Some(i) = dir.iter().position(|e| e.name == name) else {
            return Ok(());
        };
        let gone = dir.remove(i);
        self.replace_directory(&mut m, &dir)
            .await
            .map_err(|e| with_errno(e, "Failed to update bitmap extension"))?;
        let _ = self
            .free_bitmap_clusters(&mut m, gone.table_offset, gone.table_size)
            .await;
        Ok(())
    }

    /// QEMU's qcow2_co_can_store_new_dirty_bitmap, with its messages.
    pub(super) async fn can_store_bitmap(
        &self,
        node: &str,
        name: &str,
        granularity: u64,
    ) -> Result<()> {
        let bms = self.node_bitmaps();
        if bms.as_ref().is_some_and(|b| b.find(name).is_some()) {
            return Err(Error::invalid(format!("Bitmap already exists: {name}")));
        }
        self.can_store_more(bms, name, granularity)
            .map_err(|e| e.context(format!("Can't make bitmap '{name}' persistent in '{node}'")))
    }

    fn can_store_more(
        &self,
        bms: Option<Arc<DirtyBitmaps>>,
        name: &str,
        granularity: u64,
    ) -> Result<()> {
        if !self.v3() {
            return Err(Error::invalid(
                "Cannot store dirty bitmaps in qcow2 v2 files",
            ));
        }
        check_constraints(name, granularity, self.length(), self.geo.cluster_size)?;
        let persistent: Vec<_> = bms
            .map(|b| b.list())
            .unwrap_or_default()
            .into_iter()
            .filter(|b| b.is_persistent())
            .collect();
        let dir_size: u64 = persistent
            .iter()
            .map(|b| entry_size(b.name().unwrap_or_default().len()))
            .sum::<u64>()
            + entry_size(name.len());
        if persistent.len() as u32 + 1 > MAX_BITMAPS {
            return Err(Error::invalid(
                "Maximum number of persistent bitmaps is already reached",
            ));
        }
        if dir_size > MAX_BITMAP_DIR_SIZE {
            return Err(Error::invalid("Not enough space in the bitmap directory"));
        }
        Ok(())
    }

    /// QEMU's qcow2_truncate_bitmaps_check: a resize needs every bitmap of
    /// the image in memory and usable, to resize them with the disk.
    pub(super) async fn check_bitmaps_for_resize(&self, m: &Meta) -> Result<()> {
        if m.header.bitmaps.is_none() {
            return Ok(());
        }
        let dir = self.read_directory(m).await?;
        let bms = self.node_bitmaps();
        for e in dir {
            let Some(b) = bms.as_ref().and_then(|b| b.find(&e.name)) else {
                return Err(Error::unsupported(
                    "Cannot resize qcow2 with persistent bitmaps that were not loaded into memory",
                ));
            };
            b.check(strata_block::bitmap::Check::Default)
                .map_err(|e| Error::msg(libc::ENOTSUP, e.to_string()))?;
        }
        Ok(())
    }

    /// The regions the bitmaps hold, for check (QEMU:
    /// qcow2_check_bitmaps_refcounts): the directory, each table and each
    /// data cluster; and how many corruptions were found on the way.
    pub(super) async fn bitmap_regions(&self, m: &Meta) -> (Vec<(u64, u64)>, u64) {
        let Some(ext) = m.header.bitmaps else {
            return (Vec::new(), 0);
        };
        let cs = self.geo.cluster_size;
        let mut regions = vec![(ext.dir_offset, ext.dir_size)];
        let Ok(dir) = self.read_directory(m).await else {
            return (regions, 1);
        };
        let mut corruptions = 0;
        for e in dir {
            regions.push((e.table_offset, u64::from(e.table_size) * 8));
            let Ok(b) = self
                .file
                .get()
                .read(e.table_offset, IoBuf::zeroed(e.table_size as usize * 8))
                .await
            else {
                corruptions += 1;
                continue;
            };
            for c in b.as_slice().chunks_exact(8) {
                let entry = u64::from_be_bytes(c.try_into().unwrap());
                if !table_entry_ok(entry, cs) {
                    corruptions += 1;
                } else if entry & ENTRY_OFFSET_MASK != 0 {
                    regions.push((entry & ENTRY_OFFSET_MASK, cs));
                }
            }
        }
        (regions, corruptions)
    }
}
