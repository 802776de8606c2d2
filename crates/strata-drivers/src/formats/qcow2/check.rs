//! `qemu-img check` for qcow2: counts every cluster's references from the
//! metadata (header, L1, L2 tables, data, refcount table and blocks),
//! compares them with the stored refcounts, and repairs on request: leaks
//! and excess counts in place; a referenced cluster counted zero by
//! rebuilding the whole refcount structure, as QEMU does. The passes, their
//! order and their messages (stderr) are QEMU's, as scripts read them.

use super::header::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use super::meta::{Mapping, Meta, WriteKind, OFFSET_MASK, OFLAG_COPIED, OFLAG_ZERO};

/// Reserved bits of table entries (QEMU: REFT_RESERVED_MASK,
/// L1E_RESERVED_MASK, L2E_STD_RESERVED_MASK).
const REFT_RESERVED: u64 = 0x1ff;
const L1E_RESERVED: u64 = 0x7f00_0000_0000_01ff;
const L2E_STD_RESERVED: u64 = 0x3f00_0000_0000_01fe;
use super::subcluster::{L2Entry, ALL_ALLOC, ALL_ZEROES};
use super::Qcow2Driver;
use std::collections::BTreeMap;
use strata_block::driver::{CheckResult, RepairMode};
use strata_block::{Driver, Error, IoBuf, Result, WriteFlags};

/// Computed references per host cluster.
/// Computed references per host cluster, each at most `max` (the image's
/// widest refcount): more is an overflow, counted as QEMU counts it.
struct Refs {
    map: BTreeMap<u64, u64>,
    max: u64,
}

impl std::ops::Deref for Refs {
    type Target = BTreeMap<u64, u64>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl std::ops::DerefMut for Refs {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.map
    }
}

/// Whether `[off, off+len)` ends a cluster or more past the end of the
/// file (the last cluster may be partly beyond it).
fn past_end(off: u64, len: u64, file_len: u64, cs: u64) -> bool {
    (off + len).saturating_sub(file_len) >= cs
}

/// Counts one reference to `[off, off+len)`. A region that ends a cluster
/// or more past the end of the file is corruption, not a reference (the last
/// cluster may be partly beyond it).
fn add(refs: &mut Refs, res: &mut CheckResult, cs: u64, file_len: u64, off: u64, len: u64) {
    if len == 0 {
        return;
    }
    if past_end(off, len, file_len, cs) {
        strata_block::stderr_line!(
            "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {len:#x}"
        );
        res.corruptions += 1;
        return;
    }
    let first = off / cs;
    let last = (off + len - 1) / cs;
    let max = refs.max;
    for c in first..=last {
        let r = refs.entry(c).or_insert(0);
        if *r == max {
            // QEMU's qcow2_inc_refcounts_imrt: the count stays at the top.
            strata_block::stderr_line!("ERROR: overflow cluster offset={:#x}", c * cs);
            strata_block::stderr_line!("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing");
            res.corruptions += 1;
            continue;
        }
        *r += 1;
    }
}

/// The references found by walking the metadata.
struct Walk {
    refs: Refs,
    /// Clusters to compare: the file's, or more where references reach further.
    nb_clusters: u64,
    /// (L1 index, L1 entry, L2 offset) of every L2 table.
    l2_tables: Vec<(usize, u64, u64)>,
    /// The refcount table itself is broken: only a rebuild helps.
    rebuild: bool,
    /// Refcount table indexes whose blocks cannot be read (unaligned).
    unreadable: std::collections::BTreeSet<u64>,
}

/// The snapshot table as check read it: entries and length in bytes.
type Table = (Vec<super::snapshot::Snapshot>, u64);

/// Counts the references of every piece of metadata and data.
async fn calculate(
    d: &Qcow2Driver,
    m: &mut Meta,
    res: &mut CheckResult,
    table: &Table,
    fix_errors: bool,
) -> Result<Walk> {
    let cs = d.geo.cluster_size;
    let mut refs = Refs {
        map: BTreeMap::new(),
        max: m.geo.refcount_max(),
    };
    let file_len = d.file.get().driver().length();
    add(&mut refs, res, cs, file_len, 0, cs);
    let l1 = m.l1.clone();
    let l1_offset = m.header.l1_table_offset;
    let mut l2_tables = Vec::new();
    let active = Table1 {
        offset: l1_offset,
        entries: &l1,
        active: true,
    };
    walk_l1(d, m, res, &mut refs, active, fix_errors, &mut l2_tables).await?;
    // Snapshots hold their own L1 tables and share L2 tables and data.
    let header = m.header.clone();
    if d.geo.external_data && header.nb_snapshots > 0 {
        // A data file holds one version of each cluster: no room for snapshots.
        strata_block::stderr_line!(
            "ERROR {} snapshots in image with data file",
            header.nb_snapshots
        );
        res.corruptions += 1;
    }
    let (snapshots, table_len) = (&table.0, table.1);
    for sn in snapshots {
        let (id, name) = (&sn.info.id, &sn.info.name);
        if !sn.l1_offset.is_multiple_of(cs) {
            strata_block::stderr_line!(
                "ERROR snapshot {id} ({name}) l1_offset={}: L1 table is not cluster aligned; snapshot table entry corrupted",
                strata_block::report::c_hex(sn.l1_offset)
            );
            res.corruptions += 1;
            continue;
        }
        if sn.l1_size as u64 > (32 << 20) / 8 {
            strata_block::stderr_line!(
                "ERROR snapshot {id} ({name}) l1_size={}: L1 table is too large; snapshot table entry corrupted",
                strata_block::report::c_hex(sn.l1_size as u64)
            );
            res.corruptions += 1;
            continue;
        }
        let bytes = d
            .file
            .get()
            .read(sn.l1_offset, IoBuf::zeroed(sn.l1_size as usize * 8))
            .await?;
        let table: Vec<u64> = bytes.as_slice().chunks_exact(8).map(be64).collect();
        let mut unused = Vec::new();
        let inactive = Table1 {
            offset: sn.l1_offset,
            entries: &table,
            active: false,
        };
        walk_l1(d, m, res, &mut refs, inactive, fix_errors, &mut unused).await?;
    }
    add(
        &mut refs,
        res,
        cs,
        file_len,
        header.snapshots_offset,
        table_len,
    );
    // The LUKS header's clusters (QEMU: calculate_refcounts).
    if let Some((offset, length)) = m.header.crypto_header {
        add(&mut refs, res, cs, file_len, offset, length);
    }
    let (regions, corruptions) = d.bitmap_regions(m).await;
    res.corruptions += corruptions;
    for (offset, length) in regions {
        add(&mut refs, res, cs, file_len, offset, length);
    }
    let rt_bytes = m.header.refcount_table_clusters as u64 * cs;
    add(
        &mut refs,
        res,
        cs,
        file_len,
        m.header.refcount_table_offset,
        rt_bytes,
    );
    // The refcount blocks, with QEMU's checks (check_refblocks).
    let mut rebuild = false;
    let mut unreadable = std::collections::BTreeSet::new();
    for (ti, &entry) in m.reftable.iter().enumerate() {
        let rb = entry & OFFSET_MASK;
        if entry & REFT_RESERVED != 0 {
            strata_block::stderr_line!("ERROR refcount table entry {ti} has reserved bits set");
            res.corruptions += 1;
            rebuild = true;
        } else if !rb.is_multiple_of(cs) {
            strata_block::stderr_line!(
                "ERROR refcount block {ti} is not cluster aligned; refcount table entry corrupted"
            );
            res.corruptions += 1;
            rebuild = true;
            unreadable.insert(ti as u64);
        } else if rb != 0 && rb >= file_len {
            strata_block::stderr_line!("ERROR refcount block {ti} is outside image");
            res.corruptions += 1;
        } else if rb != 0 {
            add(&mut refs, res, cs, file_len, rb, cs);
            // A block that is also other metadata (or data) has its counts
            // overwritten by the other use.
            let r = refs.get(&(rb / cs)).copied().unwrap_or(0);
            if r != 1 {
                strata_block::stderr_line!("ERROR refcount block {ti} refcount={r}");
                res.corruptions += 1;
                rebuild = true;
            }
        }
    }
    let reached = refs.keys().next_back().map_or(0, |c| c + 1);
    Ok(Walk {
        refs,
        nb_clusters: file_len.div_ceil(cs).max(reached),
        l2_tables,
        rebuild,
        unreadable,
    })
}

/// An L1 table to walk: where it is, its entries, and whether it is the
/// image's own (whose walk also gives the allocation statistics and the
/// list of L2 tables for the COPIED check) or a snapshot's.
struct Table1<'a> {
    offset: u64,
    entries: &'a [u64],
    active: bool,
}

/// Counts an L1 table, its L2 tables and their clusters, with QEMU's
/// checks of each L2 entry (check_refcounts_l2). With `fix_errors`, an
/// unaligned cluster that holds no data is dropped from its entry.
async fn walk_l1(
    d: &Qcow2Driver,
    m: &mut Meta,
    res: &mut CheckResult,
    refs: &mut Refs,
    t: Table1<'_>,
    fix_errors: bool,
    l2_tables: &mut Vec<(usize, u64, u64)>,
) -> Result<()> {
    let cs = d.geo.cluster_size;
    let file_len = d.file.get().driver().length();
    let active = t.active;
    add(
        refs,
        res,
        cs,
        file_len,
        t.offset,
        t.entries.len() as u64 * 8,
    );
    for (l1i, &e) in t.entries.iter().enumerate() {
        if e == 0 {
            continue;
        }
        if e & L1E_RESERVED != 0 {
            strata_block::stderr_line!("ERROR found L1 entry with reserved bits set: {e:x}");
            res.corruptions += 1;
        }
        let l2 = e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        // Fragmentation is counted within each L2 table, as QEMU counts it.
        let mut next_contiguous = 0u64;
        add(refs, res, cs, file_len, l2, cs);
        l2_tables.push((l1i, e, l2));
        if !l2.is_multiple_of(cs) {
            strata_block::stderr_line!(
                "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
            );
            res.corruptions += 1;
            continue;
        }
        let table = d.file.get().read(l2, IoBuf::zeroed(cs as usize)).await?;
        let esize = d.geo.l2_entry_size() as usize;
        for (idx, c) in table.as_slice().chunks_exact(esize).enumerate() {
            let e = L2Entry {
                entry: be64(&c[..8]),
                bitmap: if d.geo.extended_l2 {
                    be64(&c[8..16])
                } else {
                    0
                },
            };
            let entry = e.entry;
            if !e.compressed() && entry & L2E_STD_RESERVED != 0 {
                strata_block::stderr_line!(
                    "ERROR found l2 entry with reserved bits set: {entry:x}"
                );
                res.corruptions += 1;
            }
            if e.compressed() {
                if d.geo.external_data {
                    strata_block::stderr_line!(
                        "ERROR compressed cluster {idx} with data file, entry={entry:#x}"
                    );
                    res.corruptions += 1;
                    continue;
                }
                if e.bitmap != 0 {
                    strata_block::stderr_line!("ERROR compressed cluster {idx} with non-zero subcluster allocation bitmap, entry={entry:#x}");
                    res.corruptions += 1;
                    continue;
                }
                if active {
                    res.allocated_clusters += 1;
                    res.compressed_clusters += 1;
                    res.fragmented_clusters += 1;
                }
                if let Some((off, n)) = d.host_cluster_of(Mapping::Compressed(entry)) {
                    add(refs, res, cs, file_len, off, n * cs);
                }
                continue;
            }
            // A zero cluster that keeps its host cluster counts as
            // allocated (and fragmented) like a data cluster, as in QEMU.
            let zero_flag = !d.geo.extended_l2 && d.geo.version >= 3 && entry & OFLAG_ZERO != 0;
            let host = e.host();
            if !e.has_cluster(&d.geo) {
                if e.bitmap & ALL_ALLOC != 0 {
                    res.corruptions += 1;
                    strata_block::stderr_line!(
                        "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                    );
                }
                continue;
            }
            if (e.bitmap >> 32) & e.bitmap != 0 {
                res.corruptions += 1;
                strata_block::stderr_line!("ERROR offset={host:x}: Allocated cluster has corrupted subcluster allocation bitmap");
            }
            if !host.is_multiple_of(cs) {
                res.corruptions += 1;
                let contains_data = if d.geo.extended_l2 {
                    e.bitmap & ALL_ALLOC != 0
                } else {
                    !zero_flag
                };
                if contains_data {
                    strata_block::stderr_line!("ERROR offset={host:x}: Data cluster is not properly aligned; L2 entry corrupted.");
                } else {
                    let word = if fix_errors { "Repairing" } else { "ERROR" };
                    strata_block::stderr_line!("{word} offset={host:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.");
                    if fix_errors {
                        let at = l2 + (idx * esize) as u64;
                        if fix_entry_by_zero(d, m, e, at, active).await? {
                            res.corruptions -= 1;
                            res.corruptions_fixed += 1;
                            continue;
                        }
                    }
                }
            }
            // A data cluster a cluster or more past the end of the file: a
            // crash kept the L2 entry but lost the write that would have
            // grown the file (no flush orders them, in QEMU either). It
            // reads as zeroes; repaired, it says so without pointing past
            // the end. QEMU reports it and cannot repair it.
            let at = l2 + (idx * esize) as u64;
            // Only where the entry may be written: an "L2 table" that is
            // really other metadata is not repaired through its entries.
            if fix_errors
                && past_end(host, cs, file_len, cs)
                && !d.geo.external_data
                && d.geo.version >= 3
                && entry_writable(m, at, esize, active)
            {
                strata_block::stderr_line!("Repairing offset={host:x}: Data cluster is past the end of the file; L2 entry corrupted.");
                if fix_entry_by_zero(d, m, e, at, active).await? {
                    res.corruptions_fixed += 1;
                    continue;
                }
            }
            if active {
                res.allocated_clusters += 1;
                if next_contiguous != 0 && host != next_contiguous {
                    res.fragmented_clusters += 1;
                }
                next_contiguous = host + cs;
            }
            // Data file clusters are not the image file's to count.
            if !d.geo.external_data {
                add(refs, res, cs, file_len, host, cs);
            }
        }
    }
    Ok(())
}

/// Whether the L2 entry at `at` may be rewritten: it overlaps no metadata
/// but its own table (an inactive table counts as data here).
fn entry_writable(m: &Meta, at: u64, len: usize, active: bool) -> bool {
    let kind = if active {
        WriteKind::L2
    } else {
        WriteKind::Data
    };
    m.overlap_check(at, len as u64, kind).is_ok()
}

/// Rewrites an entry whose unaligned cluster holds no data so that it
/// reads as zeroes without it (QEMU: fix_l2_entry_by_zero); false if the
/// write was refused or failed.
async fn fix_entry_by_zero(
    d: &Qcow2Driver,
    m: &mut Meta,
    e: L2Entry,
    at: u64,
    active: bool,
) -> Result<bool> {
    let mut bytes = Vec::with_capacity(16);
    if d.geo.extended_l2 {
        // Allocated subclusters become zero.
        let bitmap = (e.bitmap | (e.bitmap << 32)) & ALL_ZEROES;
        bytes.extend_from_slice(&0u64.to_be_bytes());
        bytes.extend_from_slice(&bitmap.to_be_bytes());
    } else {
        bytes.extend_from_slice(&OFLAG_ZERO.to_be_bytes());
    }
    if !entry_writable(m, at, bytes.len(), active) {
        strata_block::stderr_line!("ERROR: Overlap check failed");
        return Ok(false);
    }
    // The cache must not write the old entry back over the fix.
    m.l2_cache.remove_table(
        at / d.geo.cluster_size * d.geo.cluster_size,
        d.geo.cluster_size,
    );
    let written = d
        .file
        .get()
        .write(at, IoBuf::from_slice(&bytes), WriteFlags::default())
        .await;
    let written = match written {
        Ok(_) => d.file.get().flush().await,
        Err(e) => Err(e),
    };
    if let Err(err) = written {
        strata_block::stderr_line!(
            "ERROR: Failed to overwrite L2 table entry: {}",
            strata_block::error::strerror(err.code())
        );
        return Ok(false);
    }
    Ok(true)
}

/// Compares stored and computed refcounts; with `fix`, repairs what it may.
/// Returns true when a referenced cluster is counted zero: then only a
/// rebuild of the refcount structure helps. `highest` gets the last cluster
/// in use by either count.
async fn compare(
    d: &Qcow2Driver,
    m: &mut Meta,
    res: &mut CheckResult,
    fix: RepairMode,
    walk: &Walk,
    highest: &mut u64,
) -> Result<bool> {
    let mut rebuild = walk.rebuild;
    *highest = 0;
    for c in 0..walk.nb_clusters {
        if walk.unreadable.contains(&(c >> d.geo.rb_bits)) {
            // Not read at all: reading would mark the image corrupt, and the
            // rebuild this asks for would then be refused.
            strata_block::stderr_line!(
                "Can't get refcount for cluster {c}: {}",
                strata_block::error::strerror(libc::EIO)
            );
            res.check_errors += 1;
            continue;
        }
        let stored = m.refcount(&d.file.get(), c).await?;
        let want = walk.refs.get(&c).copied().unwrap_or(0);
        if stored > 0 || want > 0 {
            *highest = c;
        }
        if stored == want {
            continue;
        }
        let fixing = if stored == 0 {
            rebuild = true;
            false
        } else {
            (stored > want && fix.leaks) || (stored < want && fix.errors)
        };
        let what = if fixing {
            "Repairing"
        } else if stored < want {
            "ERROR"
        } else {
            "Leaked"
        };
        strata_block::stderr_line!("{what} cluster {c} refcount={stored} reference={want}");
        if fixing {
            m.set_refcount(&d.file.get(), c, want).await?;
            if want == 0 {
                // A repaired leak is discarded, as QEMU's repair does.
                d.file
                    .get()
                    .discard(c * d.geo.cluster_size, d.geo.cluster_size)
                    .await?;
            }
            if stored > want {
                res.leaks_fixed += 1;
            } else {
                res.corruptions_fixed += 1;
            }
        } else if stored < want {
            res.corruptions += 1;
        } else {
            res.leaks += 1;
        }
    }
    Ok(rebuild)
}

/// Reads the snapshot table before anything is counted (QEMU:
/// qcow2_check_read_snapshot_table): with repair, snapshots past a table
/// too long are dropped at once (the header says so before the counts are
/// compared), extra data too long is cut; v3 entries without the disk size
/// are incomplete. Returns the table and the errors left for
/// `fix_snapshot_table`.
async fn read_snapshot_table(
    d: &Qcow2Driver,
    m: &mut Meta,
    res: &mut CheckResult,
    repair: RepairMode,
) -> Result<(Table, u64)> {
    let mut header = m.header.clone();
    let original = header.nb_snapshots;
    // Too many snapshots: with repair the rest go before anything else.
    let max = super::snapshot::MAX_SNAPSHOTS;
    if original > max && repair.errors {
        strata_block::stderr_line!("Discarding {} overhanging snapshots", original - max);
        header.nb_snapshots = max;
    }
    if let Err(e) = super::open::validate_table(
        header.snapshots_offset,
        header.nb_snapshots as u64,
        40,
        40 * max as u64,
        d.geo.cluster_size,
        "snapshot table",
    ) {
        res.check_errors += 1;
        strata_block::report::error_report(format!("ERROR {}", e.message().unwrap_or_default()));
        if header.nb_snapshots > max {
            strata_block::stderr_line!(
                "You can force-remove all {} overhanging snapshots with qemu-img check -r all",
                header.nb_snapshots - max
            );
        }
        return Err(Error::errno(e.code()));
    }
    let (list, len, mut fixes) =
        match super::snapshot::read_checked(&d.file.get(), &header, repair.errors).await {
            Ok(t) => t,
            Err(e) => {
                strata_block::report::error_report(format!(
                    "ERROR failed to read the snapshot table: {}",
                    e.message().unwrap_or_default()
                ));
                return Err(Error::errno(e.code()));
            }
        };
    fixes.reduced += original - header.nb_snapshots;
    if fixes.reduced > 0 {
        let n = original - fixes.reduced;
        d.file
            .get()
            .write(
                60,
                IoBuf::from_slice(&n.to_be_bytes()),
                WriteFlags::default(),
            )
            .await
            .map_err(|e| {
                e.context("ERROR failed to update the snapshot count in the image header")
            })?;
        d.file.get().flush().await?;
        m.header.nb_snapshots = n;
        res.corruptions_fixed += fixes.reduced as u64;
    }
    let mut errors = fixes.extra_dropped as u64;
    if d.v3() {
        for (i, sn) in list.iter().enumerate() {
            if sn.short_extra {
                errors += 1;
                let word = if repair.errors { "Repairing" } else { "ERROR" };
                strata_block::stderr_line!("{word} snapshot table entry {i} is incomplete");
            }
        }
    }
    Ok(((list, len), errors))
}

/// Writes the snapshot table anew when reading it found entries to repair
/// (QEMU: qcow2_check_fix_snapshot_table), after the refcounts are right:
/// every entry with its full extra data.
async fn fix_snapshot_table(
    d: &Qcow2Driver,
    m: &mut Meta,
    res: &mut CheckResult,
    repair: RepairMode,
    table: &Table,
    errors: u64,
) -> Result<()> {
    if errors == 0 {
        return Ok(());
    }
    if !repair.errors {
        res.corruptions += errors;
        return Ok(());
    }
    let mut list = table.0.clone();
    for sn in &mut list {
        sn.short_extra = false;
    }
    if let Err(e) = d.write_snapshot_table(m, &list, table.1).await {
        res.check_errors += 1;
        strata_block::stderr_line!(
            "ERROR failed to update snapshot table: {}",
            strata_block::error::strerror(e.code())
        );
        return Err(e);
    }
    res.corruptions_fixed += errors;
    Ok(())
}

/// Runs the check (and repair) on an open image.
pub async fn check(d: &Qcow2Driver, m: &mut Meta, repair: RepairMode) -> Result<CheckResult> {
    // Check what is on disk, not what the cache holds.
    m.flush(&d.file.get()).await?;
    let cs = d.geo.cluster_size;
    let mut res = CheckResult {
        total_clusters: d.length().div_ceil(cs),
        ..Default::default()
    };
    let (table, snapshot_errors) = read_snapshot_table(d, m, &mut res, repair).await?;
    let mut walk = calculate(d, m, &mut res, &table, repair.errors).await?;
    let pre_compare = res.clone();
    let mut highest = 0;
    let rebuild = compare(d, m, &mut res, RepairMode::default(), &walk, &mut highest).await?;
    let fixing = repair.leaks || repair.errors;
    if rebuild && repair.errors {
        let old = res.clone();
        strata_block::stderr_line!("Rebuilding refcount structure");
        rebuild_refcounts(d, m, &mut walk).await?;
        res.corruptions = 0;
        res.leaks = 0;
        // Blocks that could not be read are gone with the old structure
        // (QEMU keeps counting them, but never gets this far with one).
        res.check_errors = pre_compare.check_errors;
        walk = calculate(d, m, &mut res, &table, repair.errors).await?;
        let mut fresh_leaks = 0;
        if repair.leaks {
            // The old structures are leaks now; what cannot be fixed stays a leak.
            let saved = res.clone();
            res = CheckResult::default();
            if compare(
                d,
                m,
                &mut res,
                RepairMode {
                    leaks: true,
                    errors: false,
                },
                &walk,
                &mut highest,
            )
            .await?
            {
                strata_block::stderr_line!("ERROR rebuilt refcount structure is still broken");
            }
            fresh_leaks = res.leaks;
            res = saved;
        }
        if res.corruptions < old.corruptions {
            res.corruptions_fixed += old.corruptions - res.corruptions;
        }
        if res.leaks < old.leaks {
            res.leaks_fixed += old.leaks - res.leaks;
        }
        res.leaks += fresh_leaks;
    } else if fixing {
        if rebuild {
            strata_block::stderr_line!("ERROR need to rebuild refcount structures");
            return Err(Error::errno(libc::EIO));
        }
        if res.leaks > 0 || res.corruptions > 0 {
            res = pre_compare;
            compare(d, m, &mut res, repair, &walk, &mut highest).await?;
        }
    }
    check_oflag_copied(d, m, &mut res, repair, &walk).await?;
    fix_snapshot_table(d, m, &mut res, repair, &table, snapshot_errors).await?;
    m.flush(&d.file.get()).await?;
    d.file.get().flush().await?;
    if fixing && res.check_errors == 0 && res.corruptions == 0 {
        // Repaired: neither dirty nor corrupt any more.
        m.set_incompatible(&d.file.get(), INCOMPAT_DIRTY | INCOMPAT_CORRUPT, false)
            .await?;
    }
    res.image_end_offset = (highest + 1) * cs;
    Ok(res)
}

/// OFLAG_COPIED must say "refcount is exactly one", in L1 and L2 entries.
async fn check_oflag_copied(
    d: &Qcow2Driver,
    m: &mut Meta,
    res: &mut CheckResult,
    fix: RepairMode,
    walk: &Walk,
) -> Result<()> {
    let cs = d.geo.cluster_size;
    let repair = if fix.errors {
        true
    } else if fix.leaks {
        // Safe only if the refcounts themselves were repaired cleanly.
        res.check_errors == 0 && res.corruptions == 0 && res.leaks == 0
    } else {
        false
    };
    let word = if repair { "Repairing" } else { "ERROR" };
    for &(l1i, e, l2) in &walk.l2_tables {
        let rc = m.refcount(&d.file.get(), l2 / cs).await?;
        if (rc == 1) != (e & OFLAG_COPIED != 0) {
            res.corruptions += 1;
            strata_block::stderr_line!(
                "{word} OFLAG_COPIED L2 cluster: l1_index={l1i} l1_entry={e:x} refcount={rc}"
            );
            if repair {
                m.l1[l1i] = if rc == 1 {
                    e | OFLAG_COPIED
                } else {
                    e & !OFLAG_COPIED
                };
                m.write_l1_entry(&d.file.get(), l1i).await?;
                res.corruptions -= 1;
                res.corruptions_fixed += 1;
            }
        }
        if !l2.is_multiple_of(cs) {
            continue;
        }
        let mut table = d.file.get().read(l2, IoBuf::zeroed(cs as usize)).await?;
        let mut dirty = 0;
        let esize = d.geo.l2_entry_size() as usize;
        for idx in 0..cs as usize / esize {
            let entry = be64(&table.as_slice()[idx * esize..idx * esize + 8]);
            let host = match m.decode(entry, l2, idx as u64) {
                Ok(Mapping::Normal { host, .. }) | Ok(Mapping::Zero(Some(host))) => host,
                _ => continue,
            };
            // A data file cluster has exactly one user, this entry.
            let rc = if d.geo.external_data {
                1
            } else {
                m.refcount(&d.file.get(), host / cs).await?
            };
            if (rc == 1) != (entry & OFLAG_COPIED != 0) {
                res.corruptions += 1;
                strata_block::stderr_line!(
                    "{word} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}"
                );
                if repair {
                    let fixed = if rc == 1 {
                        entry | OFLAG_COPIED
                    } else {
                        entry & !OFLAG_COPIED
                    };
                    table.as_mut_slice()[idx * esize..idx * esize + 8]
                        .copy_from_slice(&fixed.to_be_bytes());
                    dirty += 1;
                }
            }
        }
        if dirty > 0 {
            m.check_write(&d.file.get(), l2, cs, WriteKind::L2).await?;
            d.file.get().write(l2, table, WriteFlags::default()).await?;
            m.l2_cache.remove_table(l2, cs);
            res.corruptions -= dirty;
            res.corruptions_fixed += dirty;
        }
    }
    Ok(())
}

/// Takes `n` contiguous clusters that the computed counts say are free,
/// searching from `*first_free` (QEMU's alloc_clusters_imrt), and counts them.
fn alloc_imrt(refs: &mut Refs, n: u64, first_free: &mut u64) -> u64 {
    let mut c = *first_free;
    let mut run = 0;
    let mut first_gap = true;
    let end = refs.keys().next_back().map_or(0, |k| k + 1);
    while c < end && run < n {
        if refs.get(&c).copied().unwrap_or(0) == 0 {
            run += 1;
            if first_gap {
                *first_free = c;
                first_gap = false;
            }
        } else {
            run = 0;
        }
        c += 1;
    }
    let start = if run >= n { c - n } else { c - run };
    for k in start..start + n {
        *refs.entry(k).or_insert(0) += 1;
    }
    start
}

/// Writes refcount blocks for the clusters in `[first, end)` that are in
/// use, allocating blocks where the new table has none. True when the new
/// table had to grow.
async fn write_refblocks(
    d: &Qcow2Driver,
    m: &mut Meta,
    refs: &mut Refs,
    first: u64,
    end: u64,
    table: &mut Vec<u64>,
) -> Result<bool> {
    let cs = d.geo.cluster_size;
    let rb_bits = m.geo.rb_bits;
    let order = m.geo.refcount_order;
    let mut grown = false;
    let mut first_free = 0u64;
    let mut end = end;
    let mut c = first;
    while c < end {
        if refs.get(&c).copied().unwrap_or(0) == 0 {
            c += 1;
            continue;
        }
        let ti = c >> rb_bits;
        let start = ti << rb_bits;
        let rb = match table.get(ti as usize) {
            Some(&off) if off != 0 => off,
            _ => {
                first_free = first_free.max(start);
                let hc = alloc_imrt(refs, 1, &mut first_free);
                end = end.max(hc + 1);
                if table.len() as u64 <= ti {
                    let per = cs / 8;
                    table.resize(((ti + 1).div_ceil(per) * per) as usize, 0);
                    grown = true;
                }
                table[ti as usize] = hc * cs;
                hc * cs
            }
        };
        let mut block = vec![0u8; cs as usize];
        for i in 0..1u64 << rb_bits {
            let v = refs.get(&(start + i)).copied().unwrap_or(0);
            if v != 0 {
                let bit = i << order;
                super::refcount::put_refcount(&mut block, (bit / 8) as usize, bit, order, v);
            }
        }
        m.check_write(&d.file.get(), rb, cs, WriteKind::Refblock)
            .await?;
        d.file
            .get()
            .write(rb, IoBuf::from_slice(&block), WriteFlags::default())
            .await?;
        c = start + (1 << rb_bits);
    }
    Ok(grown)
}

/// Writes a new refcount structure from the computed counts (QEMU's
/// rebuild_refcount_structure): new blocks and a new table in free
/// clusters, then one header write switches to them. The old ones become
/// leaks, repaired by the next pass.
async fn rebuild_refcounts(d: &Qcow2Driver, m: &mut Meta, walk: &mut Walk) -> Result<()> {
    let cs = d.geo.cluster_size;
    m.rb_cache.clear();
    let mut table: Vec<u64> = Vec::new();
    let nb = walk.nb_clusters;
    write_refblocks(d, m, &mut walk.refs, 0, nb, &mut table).await?;
    let (offset, clusters) = loop {
        let clusters = (table.len() as u64 * 8).div_ceil(cs);
        let mut first_free = 0;
        let start = alloc_imrt(&mut walk.refs, clusters, &mut first_free);
        let grown =
            write_refblocks(d, m, &mut walk.refs, start, start + clusters, &mut table).await?;
        if !grown {
            break (start * cs, clusters);
        }
    };
    let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
    d.file
        .get()
        .write(offset, IoBuf::from_slice(&bytes), WriteFlags::default())
        .await?;
    d.file.get().flush().await?;
    let mut hdr = [0u8; 12];
    hdr[..8].copy_from_slice(&offset.to_be_bytes());
    hdr[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
    d.file
        .get()
        .write(48, IoBuf::from_slice(&hdr), WriteFlags::default())
        .await?;
    d.file.get().flush().await?;
    m.header.refcount_table_offset = offset;
    m.header.refcount_table_clusters = clusters as u32;
    m.refblocks = table.iter().copied().filter(|&o| o != 0).collect();
    m.reftable = table;
    m.rb_cache.clear();
    m.free_cluster_index = 0;
    Ok(())
}

fn be64(c: &[u8]) -> u64 {
    u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
}
