//! `qemu-img check` for qcow2: rebuilds every cluster's reference count from
//! the metadata (header, L1, L2 tables, data, refcount table and blocks),
//! compares with the stored counts, and repairs leaks and corruptions on
//! request. Messages go to stderr in QEMU's words, as scripts read them.

use super::meta::{Mapping, Meta, OFFSET_MASK, OFLAG_COPIED};
use super::Qcow2Driver;
use std::collections::BTreeMap;
use strata_block::driver::{CheckResult, RepairMode};
use strata_block::{Driver, IoBuf, Result, WriteFlags};

/// Computed references per host cluster.
type Refs = BTreeMap<u64, u64>;

/// Counts one reference to `[off, off+len)`. A region that ends a cluster
/// or more past the end of the file is corruption, not a reference (the last
/// cluster may be partly beyond it).
fn add(refs: &mut Refs, res: &mut CheckResult, cs: u64, file_len: u64, off: u64, len: u64) {
    if len == 0 {
        return;
    }
    if (off + len).saturating_sub(file_len) >= cs {
        eprintln!(
            "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {len:#x}"
        );
        res.corruptions += 1;
        return;
    }
    let first = off / cs;
    let last = (off + len - 1) / cs;
    for c in first..=last {
        *refs.entry(c).or_insert(0) += 1;
    }
}

/// Runs the check (and repair) on an open image.
pub async fn check(d: &Qcow2Driver, m: &mut Meta, repair: RepairMode) -> Result<CheckResult> {
    // Check what is on disk, not what the cache holds.
    m.flush(&d.file).await?;
    let cs = d.geo.cluster_size;
    let mut res = CheckResult {
        total_clusters: d.length().div_ceil(cs),
        ..Default::default()
    };
    let mut refs = Refs::new();
    let file_len = d.file.driver().length();
    let l1_bytes = m.l1.len() as u64 * 8;
    add(&mut refs, &mut res, cs, file_len, 0, cs);
    add(
        &mut refs,
        &mut res,
        cs,
        file_len,
        m.header.l1_table_offset,
        l1_bytes,
    );
    let mut next_contiguous = 0u64;
    let mut l2_tables = Vec::new();
    for (l1i, &e) in m.l1.iter().enumerate() {
        let l2 = e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        add(&mut refs, &mut res, cs, file_len, l2, cs);
        l2_tables.push((l1i, e, l2));
        if !l2.is_multiple_of(cs) {
            eprintln!("ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted");
            res.corruptions += 1;
        }
    }
    for &(_, _, l2) in l2_tables.iter().filter(|t| t.2 % cs == 0) {
        let table = d.file.read(l2, IoBuf::zeroed(cs as usize)).await?;
        for (idx, c) in table.as_slice().chunks_exact(8).enumerate() {
            let entry = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            match m.decode(entry, l2, idx as u64) {
                Err(_) => {
                    eprintln!(
                        "ERROR offset={:x}: Cluster is not properly aligned; L2 entry corrupted.",
                        entry & OFFSET_MASK
                    );
                    res.corruptions += 1;
                }
                Ok(Mapping::Normal { host, .. }) => {
                    res.allocated_clusters += 1;
                    if next_contiguous != 0 && host != next_contiguous {
                        res.fragmented_clusters += 1;
                    }
                    next_contiguous = host + cs;
                    add(&mut refs, &mut res, cs, file_len, host, cs);
                }
                Ok(Mapping::Zero(Some(host))) => {
                    res.allocated_clusters += 1;
                    add(&mut refs, &mut res, cs, file_len, host, cs);
                }
                Ok(mp @ Mapping::Compressed(_)) => {
                    res.allocated_clusters += 1;
                    res.compressed_clusters += 1;
                    res.fragmented_clusters += 1;
                    if let Some((off, n)) = d.host_cluster_of(mp) {
                        add(&mut refs, &mut res, cs, file_len, off, n * cs);
                    }
                }
                Ok(_) => {}
            }
        }
    }
    let rt_off = m.header.refcount_table_offset;
    let rt_bytes = m.header.refcount_table_clusters as u64 * cs;
    add(&mut refs, &mut res, cs, file_len, rt_off, rt_bytes);
    for (ti, &rb) in m.reftable.iter().enumerate() {
        let rb = rb & OFFSET_MASK;
        if rb != 0 && rb >= file_len {
            eprintln!("ERROR refcount block {ti} is outside image");
            res.corruptions += 1;
        } else if rb != 0 {
            add(&mut refs, &mut res, cs, file_len, rb, cs);
        }
    }

    // Stored counts, block by block.
    let entries = 1u64 << d.geo.rb_bits;
    let order = d.geo.refcount_order;
    let mut stored: BTreeMap<u64, u64> = BTreeMap::new();
    for (ti, &rb) in m.reftable.iter().enumerate() {
        let rb = rb & OFFSET_MASK;
        if rb == 0 {
            continue;
        }
        if rb >= file_len {
            continue;
        }
        let block = d.file.read(rb, IoBuf::zeroed(cs as usize)).await?;
        for i in 0..entries {
            let bit = i << order;
            let v = super::meta::get_refcount(block.as_slice(), (bit / 8) as usize, bit, order);
            if v != 0 {
                stored.insert(ti as u64 * entries + i, v);
            }
        }
    }

    // Compare.
    let mut clusters: Vec<u64> = refs.keys().chain(stored.keys()).copied().collect();
    clusters.sort_unstable();
    clusters.dedup();
    let mut highest = 0;
    let mut fixes = Vec::new();
    for &c in &clusters {
        let want = refs.get(&c).copied().unwrap_or(0);
        let have = stored.get(&c).copied().unwrap_or(0);
        if want > 0 || have > 0 {
            highest = highest.max(c + 1);
        }
        if want == have {
            continue;
        }
        let leak = have > want;
        let what = if leak { "Leaked" } else { "ERROR" };
        eprintln!("{what} cluster {c} refcount={have} reference={want}");
        if leak {
            res.leaks += 1;
        } else {
            res.corruptions += 1;
        }
        if (leak && repair.leaks) || (!leak && repair.errors) {
            fixes.push((c, have, want, leak));
        }
    }

    // OFLAG_COPIED must say "refcount is one", in L1 and in L2 entries.
    let mut copied_fixes = Vec::new();
    for &(l1i, e, l2) in &l2_tables {
        let rc = stored.get(&(l2 / cs)).copied().unwrap_or(0);
        let want_copied = rc == 1;
        if want_copied != (e & OFLAG_COPIED != 0) {
            eprintln!("ERROR OFLAG_COPIED L2 cluster: l1_index={l1i} l1_entry={e:x} refcount={rc}");
            res.corruptions += 1;
        }
        if l2 % cs != 0 {
            continue;
        }
        let table = d.file.read(l2, IoBuf::zeroed(cs as usize)).await?;
        for (idx, c) in table.as_slice().chunks_exact(8).enumerate() {
            let entry = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            if let Ok(Mapping::Normal { host, copied }) = m.decode(entry, l2, idx as u64) {
                let rc = stored.get(&(host / cs)).copied().unwrap_or(0);
                if (rc == 1) != copied {
                    eprintln!("ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}");
                    res.corruptions += 1;
                    if repair.errors {
                        copied_fixes.push((l2 + idx as u64 * 8, entry ^ OFLAG_COPIED));
                    }
                }
            }
        }
    }

    for (c, have, want, leak) in fixes {
        eprintln!("Repairing cluster {c} refcount={have} reference={want}");
        m.set_refcount(&d.file, c, want).await?;
        if leak {
            res.leaks_fixed += 1;
        } else {
            res.corruptions_fixed += 1;
        }
        if want == 0 && have > 0 && c + 1 == highest {
            highest = c;
        }
    }
    for (off, entry) in copied_fixes {
        d.file
            .write(
                off,
                IoBuf::from_slice(&entry.to_be_bytes()),
                WriteFlags::default(),
            )
            .await?;
        m.l2_cache.clear();
        res.corruptions_fixed += 1;
    }
    m.flush(&d.file).await?;
    d.file.flush().await?;
    res.image_end_offset = highest * cs;
    Ok(res)
}
