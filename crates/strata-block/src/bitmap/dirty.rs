//! Dirty bitmaps of a node (QEMU: BdrvDirtyBitmap, block/dirty-bitmap.c):
//! many per node, each with a name, a granularity and its states
//! (enabled, busy, read-only, persistent, inconsistent). The write funnel
//! marks every enabled bitmap of its node after each write.

use super::HBitmap;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Longest bitmap name QEMU accepts (BDRV_BITMAP_MAX_NAME_SIZE).
const MAX_NAME: usize = 1023;

/// One dirty bitmap.
pub struct DirtyBitmap {
    name: Option<String>,
    bits: Mutex<HBitmap>,
    enabled: AtomicBool,
    busy: AtomicBool,
    readonly: AtomicBool,
    persistent: AtomicBool,
    inconsistent: AtomicBool,
    /// Frozen while a successor that records stands in for it: shown as
    /// recording (QEMU: bdrv_dirty_bitmap_recording).
    successor_records: AtomicBool,
}

/// What `query-block` shows of a bitmap (QEMU: BlockDirtyInfo).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyInfo {
    pub name: Option<String>,
    pub count: u64,
    pub granularity: u64,
    pub recording: bool,
    pub busy: bool,
    pub persistent: bool,
    pub inconsistent: bool,
}

/// Which states forbid an operation (QEMU: BdrvDirtyBitmapFlags).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Busy, read-only and inconsistent bitmaps are refused.
    Default,
    /// Read-only bitmaps are fine (reading, enabling, merging from).
    AllowReadOnly,
    /// Inconsistent bitmaps are fine, busy and read-only ones are not
    /// (removing one: QEMU's BDRV_BITMAP_BUSY | BDRV_BITMAP_RO).
    Remove,
}

impl DirtyBitmap {
    fn lock(&self) -> MutexGuard<'_, HBitmap> {
        self.bits.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// The name; None for an anonymous bitmap (a job's own).
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    fn shown_name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }
    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.lock().granularity()
    }
    /// True while writes mark it.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }
    /// True while a job or an export uses it.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }
    /// Marks it used (or no longer used) by a job or an export.
    pub fn set_busy(&self, busy: bool) {
        self.busy.store(busy, Ordering::Release)
    }
    /// Marks it read-only (loaded from a read-only image).
    pub fn set_readonly(&self, ro: bool) {
        self.readonly.store(ro, Ordering::Release)
    }
    /// Marks it to be stored in the image on close.
    pub fn set_persistent(&self, p: bool) {
        self.persistent.store(p, Ordering::Release)
    }
    /// Marks it as not to be trusted (found in use in an image).
    pub fn set_inconsistent(&self, i: bool) {
        self.inconsistent.store(i, Ordering::Release)
    }
    /// True when it was loaded from an image opened read-only.
    pub fn is_readonly(&self) -> bool {
        self.readonly.load(Ordering::Acquire)
    }
    /// True when it is stored in the image on close.
    pub fn is_persistent(&self) -> bool {
        self.persistent.load(Ordering::Acquire)
    }
    /// True when the image held it in use (its bits cannot be trusted).
    pub fn is_inconsistent(&self) -> bool {
        self.inconsistent.load(Ordering::Acquire)
    }
    /// Bytes of disk it covers.
    pub fn size(&self) -> u64 {
        self.lock().size()
    }

    /// QEMU's bdrv_dirty_bitmap_check: may this bitmap be used as `check`
    /// says? (QEMU adds the hint "Try block-dirty-bitmap-remove to delete
    /// this bitmap from disk" to the inconsistent case; callers print it.)
    pub fn check(&self, check: Check) -> Result<()> {
        let name = self.shown_name();
        if self.is_busy() {
            return Err(Error::invalid(format!(
                "Bitmap '{name}' is currently in use by another operation and cannot be used"
            )));
        }
        if check != Check::AllowReadOnly && self.is_readonly() {
            return Err(Error::invalid(format!(
                "Bitmap '{name}' is readonly and cannot be modified"
            )));
        }
        if check != Check::Remove && self.is_inconsistent() {
            return Err(Error::invalid(format!(
                "Bitmap '{name}' is inconsistent and cannot be used"
            )));
        }
        Ok(())
    }

    /// Starts or stops recording writes.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Release)
    }
    /// Marks `[offset, offset+len)` dirty.
    pub fn set(&self, offset: u64, len: u64) {
        self.lock().set(offset, len)
    }
    /// Marks `[offset, offset+len)` clean.
    pub fn reset(&self, offset: u64, len: u64) {
        self.lock().reset(offset, len)
    }
    /// Marks everything clean.
    pub fn clear(&self) {
        self.lock().clear()
    }
    /// True when the granule holding `offset` is dirty.
    pub fn get(&self, offset: u64) -> bool {
        self.lock().get(offset)
    }
    /// Dirty bytes.
    pub fn count(&self) -> u64 {
        self.lock().count()
    }
    /// A copy of the bits as they are now (to iterate without the lock).
    pub fn snapshot(&self) -> HBitmap {
        self.lock().clone()
    }
    /// Puts back bits taken by [`DirtyBitmap::snapshot`] (QEMU:
    /// bdrv_restore_dirty_bitmap, a transaction's undo of clear or merge).
    pub fn restore(&self, bits: HBitmap) {
        *self.lock() = bits;
    }
    /// Every dirty range, in order.
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        self.lock().dirty_ranges().collect()
    }
    /// The first dirty area in `[offset, end)`, at most `max_len` long.
    pub fn next_dirty_area(&self, offset: u64, end: u64, max_len: u64) -> Option<(u64, u64)> {
        self.lock().next_dirty_area(offset, end, max_len)
    }
    /// The first clean byte in `[offset, end)`.
    pub fn next_clean(&self, offset: u64, end: u64) -> Option<u64> {
        self.lock().next_clean(offset, end)
    }
    /// The bits as bytes, for storage.
    pub fn serialize(&self) -> Vec<u8> {
        self.lock().serialize()
    }
    /// The bits from bytes made by `serialize`.
    pub fn deserialize(&self, bytes: &[u8]) -> Result<()> {
        self.lock().deserialize(bytes).map_err(Error::invalid)
    }
    /// What query-block shows.
    pub fn info(&self) -> DirtyInfo {
        let b = self.lock();
        DirtyInfo {
            name: self.name.clone(),
            count: b.count(),
            granularity: b.granularity(),
            recording: self.is_enabled() || self.successor_records.load(Ordering::Acquire),
            busy: self.is_busy(),
            persistent: self.persistent.load(Ordering::Acquire),
            inconsistent: self.inconsistent.load(Ordering::Acquire),
        }
    }
}

/// The dirty bitmaps of one node.
#[derive(Default)]
pub struct DirtyBitmaps {
    list: Mutex<Vec<Arc<DirtyBitmap>>>,
    /// Enabled bitmaps: the write funnel skips the lock when there are none.
    enabled: AtomicUsize,
    /// The size the bitmaps cover (the node's length); 0 without bitmaps.
    size: AtomicU64,
}

impl DirtyBitmaps {
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<DirtyBitmap>>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when the node has no bitmap at all.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn recount(&self, list: &[Arc<DirtyBitmap>]) {
        let n = list.iter().filter(|b| b.is_enabled()).count();
        self.enabled.store(n, Ordering::Release);
    }

    /// Adds an enabled bitmap over `size` bytes (QEMU:
    /// bdrv_create_dirty_bitmap, with block-dirty-bitmap-add's checks).
    pub fn create(
        &self,
        name: Option<&str>,
        granularity: u64,
        size: u64,
    ) -> Result<Arc<DirtyBitmap>> {
        if granularity < 512 || !granularity.is_power_of_two() || granularity > 1 << 31 {
            return Err(Error::invalid(
                "Granularity must be power of 2 and at least 512",
            ));
        }
        let mut list = self.lock();
        if let Some(n) = name {
            if n.is_empty() {
                return Err(Error::invalid("Bitmap name cannot be empty"));
            }
            if n.len() > MAX_NAME {
                return Err(Error::invalid(format!("Bitmap name too long: {n}")));
            }
            if list.iter().any(|b| b.name() == Some(n)) {
                return Err(Error::invalid(format!("Bitmap already exists: {n}")));
            }
        }
        let b = Arc::new(DirtyBitmap {
            name: name.map(str::to_string),
            bits: Mutex::new(HBitmap::new(size, granularity)),
            enabled: AtomicBool::new(true),
            busy: AtomicBool::new(false),
            readonly: AtomicBool::new(false),
            persistent: AtomicBool::new(false),
            inconsistent: AtomicBool::new(false),
            successor_records: AtomicBool::new(false),
        });
        list.push(Arc::clone(&b));
        self.recount(&list);
        self.size.fetch_max(size, Ordering::AcqRel);
        Ok(b)
    }

    /// Takes in a bitmap made elsewhere (an operation's own, made before
    /// the node it belongs to existed).
    pub fn adopt(&self, bitmap: &Arc<DirtyBitmap>) {
        let mut list = self.lock();
        list.push(Arc::clone(bitmap));
        self.recount(&list);
        self.size.fetch_max(bitmap.size(), Ordering::AcqRel);
    }

    /// The bitmap called `name`.
    pub fn find(&self, name: &str) -> Option<Arc<DirtyBitmap>> {
        self.lock().iter().find(|b| b.name() == Some(name)).cloned()
    }

    /// The bitmap called `name`, or QEMU's error (block_dirty_bitmap_lookup).
    pub fn lookup(&self, name: &str) -> Result<Arc<DirtyBitmap>> {
        self.find(name)
            .ok_or_else(|| Error::invalid(format!("Dirty bitmap '{name}' not found")))
    }

    /// Removes a bitmap (QEMU: block-dirty-bitmap-remove's checks).
    pub fn remove(&self, bitmap: &Arc<DirtyBitmap>) -> Result<()> {
        bitmap.check(Check::Remove)?;
        self.release(bitmap);
        Ok(())
    }

    /// Drops a bitmap from memory without checks (QEMU:
    /// bdrv_release_dirty_bitmap).
    pub fn release(&self, bitmap: &Arc<DirtyBitmap>) {
        let mut list = self.lock();
        list.retain(|b| !Arc::ptr_eq(b, bitmap));
        self.recount(&list);
    }

    /// Every bitmap, newest first: QEMU's list order, which decides the
    /// order a format stores new bitmaps in and convert copies them.
    pub fn list(&self) -> Vec<Arc<DirtyBitmap>> {
        self.lock().iter().rev().cloned().collect()
    }

    /// Drops the persistent bitmaps from memory once the image holds them
    /// (QEMU: qcow2_inactivate releases what it stored).
    pub fn release_persistent(&self) {
        let mut list = self.lock();
        list.retain(|b| !b.is_persistent());
        self.recount(&list);
    }

    /// Starts or stops recording in `bitmap`.
    pub fn set_enabled(&self, bitmap: &DirtyBitmap, on: bool) -> Result<()> {
        bitmap.check(Check::AllowReadOnly)?;
        let list = self.lock();
        bitmap.set_enabled(on);
        self.recount(&list);
        Ok(())
    }

    /// Clears `bitmap` (block-dirty-bitmap-clear).
    pub fn clear(&self, bitmap: &DirtyBitmap) -> Result<()> {
        bitmap.check(Check::Default)?;
        bitmap.clear();
        Ok(())
    }

    /// Sets in `target` every bit set in `sources` (block-dirty-bitmap-merge).
    pub fn merge(&self, target: &DirtyBitmap, sources: &[Arc<DirtyBitmap>]) -> Result<()> {
        target.check(Check::Default)?;
        // Every source is checked before any is merged, so a refusal leaves
        // the target as it was (QEMU restores it from a backup).
        let size = target.lock().size();
        for s in sources {
            s.check(Check::AllowReadOnly)?;
            let other = s.lock().size();
            if other != size {
                return Err(Error::invalid(format!(
                    "Bitmaps are of different sizes (destination size is {size}, source size is {other}) and can't be merged"
                )));
            }
        }
        for s in sources {
            if std::ptr::eq(&**s, target) {
                continue;
            }
            let bits = s.snapshot();
            target.lock().merge_from(&bits).map_err(Error::invalid)?;
        }
        Ok(())
    }

    /// A new bitmap `name` with the same bits as `source` (disabled copies
    /// are how QEMU's backup keeps a point in time).
    pub fn copy(&self, source: &DirtyBitmap, name: Option<&str>) -> Result<Arc<DirtyBitmap>> {
        let bits = source.snapshot();
        let b = self.create(name, bits.granularity(), bits.size())?;
        *b.lock() = bits;
        Ok(b)
    }

    /// A new anonymous bitmap that records in `parent`'s place while an
    /// operation (a backup) works from `parent`'s bits: it records if
    /// `parent` did, and `parent` stops and is busy (QEMU:
    /// bdrv_dirty_bitmap_create_successor).
    pub fn create_successor(&self, parent: &DirtyBitmap) -> Result<Arc<DirtyBitmap>> {
        if parent.is_busy() {
            return Err(Error::invalid(format!(
                "Bitmap '{}' is currently in use by another operation and cannot be used",
                parent.shown_name()
            )));
        }
        let size = parent.size();
        let child = self.create(None, parent.granularity(), size)?;
        let list = self.lock();
        child.set_enabled(parent.is_enabled());
        parent
            .successor_records
            .store(parent.is_enabled(), Ordering::Release);
        parent.set_enabled(false);
        parent.set_busy(true);
        self.recount(&list);
        Ok(child)
    }

    /// The operation succeeded: `parent` keeps only what its successor
    /// recorded, and takes the successor's place in the list (QEMU:
    /// bdrv_dirty_bitmap_abdicate, where the successor takes the name).
    pub fn abdicate(&self, parent: &Arc<DirtyBitmap>, successor: &Arc<DirtyBitmap>) {
        // Under the list lock, which writes mark under: none is lost
        // between taking the successor's bits and its release.
        let mut list = self.lock();
        parent.restore(successor.snapshot());
        parent.set_enabled(successor.is_enabled());
        parent.successor_records.store(false, Ordering::Release);
        parent.set_busy(false);
        list.retain(|b| !Arc::ptr_eq(b, parent));
        match list.iter().position(|b| Arc::ptr_eq(b, successor)) {
            Some(at) => list[at] = Arc::clone(parent),
            None => list.push(Arc::clone(parent)),
        }
        self.recount(&list);
    }

    /// The operation failed: `parent` gets what its successor recorded on
    /// top of its own bits, and records again if the successor did (QEMU:
    /// bdrv_reclaim_dirty_bitmap).
    pub fn reclaim(&self, parent: &Arc<DirtyBitmap>, successor: &Arc<DirtyBitmap>) {
        let mut list = self.lock();
        let bits = successor.snapshot();
        let _ = parent.lock().merge_from(&bits);
        parent.set_enabled(successor.is_enabled());
        parent.successor_records.store(false, Ordering::Release);
        parent.set_busy(false);
        list.retain(|b| !Arc::ptr_eq(b, successor));
        self.recount(&list);
    }

    /// Marks `[offset, offset+len)` dirty in every enabled bitmap (the
    /// write funnel's step after a write).
    pub fn mark_dirty(&self, offset: u64, len: u64) {
        if self.enabled.load(Ordering::Acquire) == 0 {
            return;
        }
        for b in self.lock().iter().filter(|b| b.is_enabled()) {
            b.set(offset, len);
        }
    }

    /// Follows the node's new size (QEMU: bdrv_dirty_bitmap_truncate).
    pub fn truncate(&self, size: u64) {
        let list = self.lock();
        for b in list.iter() {
            b.lock().truncate(size);
        }
        if !list.is_empty() {
            self.size.store(size, Ordering::Release);
        }
    }

    /// Grows the bitmaps to `end` after a write that ended past them: a
    /// protocol node grows by writes past its end, and QEMU's bitmaps follow
    /// it (bdrv_co_write_req_finish), so no write goes unrecorded.
    pub fn grow_to(&self, end: u64) {
        let size = self.size.load(Ordering::Acquire);
        if size == 0 || end <= size {
            return;
        }
        let list = self.lock();
        for b in list.iter() {
            let mut bits = b.lock();
            if bits.size() < end {
                bits.truncate(end);
            }
        }
        self.size.fetch_max(end, Ordering::AcqRel);
    }

    /// What query-block shows, newest first as QEMU lists them.
    pub fn info(&self) -> Vec<DirtyInfo> {
        self.lock().iter().rev().map(|b| b.info()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_grow_with_writes_past_the_end_enabled_or_not() {
        let bms = DirtyBitmaps::default();
        let on = bms.create(Some("on"), 512, 64 << 10).unwrap();
        let off = bms.create(Some("off"), 512, 64 << 10).unwrap();
        bms.set_enabled(&off, false).unwrap();
        // A write ending past the bitmaps: they grow first, then it is marked.
        bms.grow_to(128 << 10);
        bms.mark_dirty(100 << 10, 4096);
        assert!(on.get(100 << 10));
        assert_eq!(on.count(), 4096);
        assert!(!off.get(100 << 10));
        assert_eq!(off.snapshot().size(), 128 << 10);
        // Writes inside them change nothing of their size.
        bms.grow_to(4096);
        assert_eq!(on.snapshot().size(), 128 << 10);
    }

    #[test]
    fn names_granularity_and_states_are_checked_as_qemu_does() {
        let bms = DirtyBitmaps::default();
        let e = bms.create(Some("b"), 1000, 1 << 20).err().unwrap();
        assert_eq!(
            e.to_string(),
            "Granularity must be power of 2 and at least 512"
        );
        let b = bms.create(Some("b"), 65536, 1 << 20).unwrap();
        let e = bms.create(Some("b"), 65536, 1 << 20).err().unwrap();
        assert_eq!(e.to_string(), "Bitmap already exists: b");
        b.set_busy(true);
        let e = bms.remove(&b).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Bitmap 'b' is currently in use by another operation and cannot be used"
        );
        b.set_busy(false);
        b.set_readonly(true);
        assert!(bms.clear(&b).is_err());
        // Read-only bitmaps stay; inconsistent ones may go (QEMU's flags).
        assert!(bms.remove(&b).is_err());
        b.set_readonly(false);
        b.set_inconsistent(true);
        assert!(bms.clear(&b).is_err());
        assert!(bms.remove(&b).is_ok());
        assert!(bms.find("b").is_none());
    }

    #[test]
    fn only_enabled_bitmaps_record_and_copies_keep_a_point_in_time() {
        let bms = DirtyBitmaps::default();
        let a = bms.create(Some("a"), 512, 1 << 20).unwrap();
        let off = bms.create(Some("off"), 4096, 1 << 20).unwrap();
        bms.set_enabled(&off, false).unwrap();
        bms.mark_dirty(1000, 10);
        let snap = bms.copy(&a, Some("snap")).unwrap();
        bms.set_enabled(&snap, false).unwrap();
        bms.mark_dirty(8192, 512);
        assert_eq!(a.dirty_ranges(), vec![(512, 512), (8192, 512)]);
        assert_eq!(snap.dirty_ranges(), vec![(512, 512)]);
        assert!(off.dirty_ranges().is_empty());
        bms.merge(&off, &[Arc::clone(&a)]).unwrap();
        assert_eq!(off.dirty_ranges(), vec![(0, 4096), (8192, 4096)]);
        let names: Vec<_> = bms.info().into_iter().map(|i| i.name.unwrap()).collect();
        assert_eq!(names, ["snap", "off", "a"]);
    }
}
