//! `qemu-img measure` for qcow2 (QEMU: qcow2_measure): the file size of a
//! new image, fully allocated (header, L1 and L2 tables, refcount
//! structure, every cluster) and as required by the data of an input image
//! or by preallocation.

use super::create::{take_cluster_size, take_refcount_bits, take_version};
use std::sync::Arc;
use strata_block::driver::Preallocation;
use strata_block::options::{take_bool, take_size, take_str, Opts};
use strata_block::{Error, Measure, Node, Result};

/// Bytes of an L1 entry, of a normal and an extended L2 entry, and of a
/// refcount table entry.
const L1E_SIZE: u64 = 8;
const L2E_SIZE: u64 = 8;
const L2E_SIZE_EXTENDED: u64 = 16;
const REFTABLE_ENTRY_SIZE: u64 = 8;
/// QEMU's limit on the L1 table (32 MiB).
const MAX_L1_SIZE: u64 = 32 << 20;

pub async fn measure(mut opts: Opts, input: Option<&Arc<Node>>) -> Result<Measure> {
    let extended_l2 = take_bool(&mut opts, "extended_l2")?.unwrap_or(false);
    let cluster_size = take_cluster_size(&mut opts)?;
    if extended_l2 && cluster_size < 16384 {
        return Err(Error::invalid(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    let version = take_version(&mut opts)?;
    let refcount_bits = take_refcount_bits(&mut opts, version, "(use compat=1.1 or greater)")?;
    let prealloc = match take_str(&mut opts, "preallocation")? {
        None => Preallocation::Off,
        Some(p) => Preallocation::parse(&p)
            .map_err(|_| Error::invalid(format!("invalid parameter value: {p}")))?,
    };
    let has_backing_file = take_str(&mut opts, "backing_file")?.is_some();
    if take_str(&mut opts, "encrypt.format")?.is_some_and(|f| f == "luks") {
        return Err(Error::unsupported(
            "Encrypted images are not supported by Strata",
        ));
    }
    let l2e_size = if extended_l2 {
        L2E_SIZE_EXTENDED
    } else {
        L2E_SIZE
    };
    let mut virtual_size = take_size(&mut opts, "size")?
        .unwrap_or(0)
        .next_multiple_of(cluster_size);
    let l2_tables = (virtual_size / cluster_size).div_ceil(cluster_size / l2e_size);
    if l2_tables * L1E_SIZE > MAX_L1_SIZE {
        return Err(Error::invalid(
            "The image size is too large (try using a larger cluster size)",
        ));
    }
    let mut required = 0;
    if let Some(input) = input {
        let size = input.length();
        virtual_size = size.next_multiple_of(cluster_size);
        if has_backing_file {
            // Nothing is known of what the new backing file shares with the
            // input: every cluster may need writing.
            required = virtual_size;
        } else {
            required = data_clusters_bytes(input, size, cluster_size).await?;
        }
    }
    if matches!(prealloc, Preallocation::Full | Preallocation::Falloc) {
        required = virtual_size;
    }
    let fully_allocated = prealloc_size(
        virtual_size,
        cluster_size,
        refcount_bits.trailing_zeros(),
        extended_l2,
    );
    let bitmaps = input.and_then(|i| persistent_bitmaps_size(i, version, cluster_size));
    Ok(Measure {
        // Metadata of the fully allocated image stays counted, as QEMU's.
        required: fully_allocated - virtual_size + required,
        fully_allocated,
        bitmaps,
    })
}

/// The bytes of the input's clusters (of the new cluster size) that hold
/// data; zero ranges need none.
async fn data_clusters_bytes(input: &Arc<Node>, size: u64, cluster_size: u64) -> Result<u64> {
    let mut required = 0;
    let mut offset = 0;
    while offset < size {
        let (st, _) = input
            .block_status_above(None, offset, size - offset)
            .await
            .map_err(|e| {
                let why = strata_block::error::strerror(e.code());
                Error::msg(e.code(), format!("Unable to get block status: {why}"))
            })?;
        let mut pnum = st.len.max(1);
        if !st.zero && st.data && st.allocated {
            // Up to the end of the cluster, counted once.
            pnum = (offset + pnum).next_multiple_of(cluster_size) - offset;
            required += offset % cluster_size + pnum;
        }
        offset += pnum;
    }
    Ok(required)
}

/// The bytes the input's persistent bitmaps would take in the new image,
/// None where the target (v2) or the input cannot have any (QEMU:
/// qcow2_get_persistent_dirty_bitmap_size, over the bitmaps it loaded).
fn persistent_bitmaps_size(input: &Node, version: u32, cluster_size: u64) -> Option<u64> {
    if version < 3 || !input.supports_persistent_bitmaps() {
        return None;
    }
    let list: Vec<(usize, u64)> = input
        .bitmaps()
        .list()
        .iter()
        .filter(|b| b.is_persistent())
        .map(|b| (b.name().unwrap_or_default().len(), b.granularity()))
        .collect();
    Some(if list.is_empty() {
        0
    } else {
        super::bitmaps::persistent_size(&list, input.length(), cluster_size)
    })
}

/// The file size of an image with every cluster allocated (QEMU:
/// qcow2_calc_prealloc_size).
fn prealloc_size(total: u64, cluster_size: u64, refcount_order: u32, extended_l2: bool) -> u64 {
    let aligned = total.next_multiple_of(cluster_size);
    let l2e_size = if extended_l2 {
        L2E_SIZE_EXTENDED
    } else {
        L2E_SIZE
    };
    // The header.
    let mut meta = cluster_size;
    let nl2e = (aligned / cluster_size).next_multiple_of(cluster_size / l2e_size);
    meta += nl2e * l2e_size;
    let nl1e = (nl2e * l2e_size / cluster_size).next_multiple_of(cluster_size / L1E_SIZE);
    meta += nl1e * L1E_SIZE;
    meta += refcount_metadata_size(
        (meta + aligned) / cluster_size,
        cluster_size,
        refcount_order,
    );
    meta + aligned
}

/// Bytes of refcount blocks and table that count `clusters` clusters and
/// themselves: the fixed point (QEMU: qcow2_refcount_metadata_size, without
/// the generous increase).
fn refcount_metadata_size(clusters: u64, cluster_size: u64, refcount_order: u32) -> u64 {
    let blocks_per_table_cluster = cluster_size / REFTABLE_ENTRY_SIZE;
    let refcounts_per_block = cluster_size * 8 / (1 << refcount_order);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(refcounts_per_block);
        table = blocks.div_ceil(blocks_per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * cluster_size;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fully_allocated_sizes_are_qemus() {
        // qemu-img measure --size 1G -O qcow2: 1074135040.
        assert_eq!(prealloc_size(1 << 30, 65536, 4, false), 1_074_135_040);
        // -o cluster_size=4k --size 10G: 10763706368.
        assert_eq!(prealloc_size(10 << 30, 4096, 4, false), 10_763_706_368);
    }
}
