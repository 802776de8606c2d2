//! The persistent bitmaps' on-disk shapes (qcow2.txt, "Bitmaps"; QEMU:
//! qcow2-bitmap.c): the directory the bitmaps extension points to, its
//! entries, the bitmap tables and QEMU's constraints on all three. No I/O
//! here: `bitmap_store` reads and writes them.

use super::header::MAX_BITMAP_DIR_SIZE;
use strata_block::report::warn_report;
use strata_block::{Error, Result};

/// Largest bitmap table, in entries (BME_MAX_TABLE_SIZE).
const MAX_TABLE_SIZE: u64 = 0x800_0000;
/// Largest bitmap, in bytes of bits (BME_MAX_PHYS_SIZE).
const MAX_PHYS_SIZE: u64 = 0x2000_0000;
const MIN_GRANULARITY_BITS: u8 = 9;
const MAX_GRANULARITY_BITS: u8 = 31;
/// Longest name (BME_MAX_NAME_SIZE).
const MAX_NAME_SIZE: usize = 1023;
/// The only bitmap type: dirty tracking.
const TYPE_DIRTY_TRACKING: u8 = 1;

/// Flag: the bitmap is in use by a writer and its bits cannot be trusted.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Flag: the bitmap records writes ("auto": enabled).
pub const FLAG_AUTO: u32 = 1 << 1;
const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO);

/// Table entry bits: reserved, the data cluster's offset, "all ones".
const ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
pub const ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const ENTRY_ALL_ONES: u64 = 1;

/// Size of an entry's fixed part.
const ENTRY_HEADER: usize = 24;

/// One entry of the bitmap directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub table_offset: u64,
    /// Entries of the bitmap table.
    pub table_size: u32,
    pub flags: u32,
    pub granularity_bits: u8,
    pub name: String,
}

/// Bytes an entry with a name of `name_len` bytes takes, padded to 8.
pub fn entry_size(name_len: usize) -> u64 {
    (ENTRY_HEADER + name_len).next_multiple_of(8) as u64
}

/// Bytes of bits a bitmap of `granularity` over `len` bytes of disk holds.
pub fn bytes_needed(len: u64, granularity: u64) -> u64 {
    len.div_ceil(granularity).div_ceil(8)
}

/// Clusters of bits a bitmap of `granularity` over `len` bytes needs.
pub fn table_size(len: u64, granularity: u64, cluster_size: u64) -> u64 {
    bytes_needed(len, granularity).div_ceil(cluster_size)
}

/// Is the entry valid for an image of `disk_len` bytes? (QEMU:
/// check_dir_entry; a bitmap in use may be too small, after a resize.)
fn entry_ok(e: &DirEntry, cluster_size: u64, disk_len: u64) -> bool {
    let basic = e.table_size != 0
        && e.table_offset != 0
        && e.table_offset.is_multiple_of(cluster_size)
        && u64::from(e.table_size) <= MAX_TABLE_SIZE
        && (MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&e.granularity_bits)
        && e.flags & RESERVED_FLAGS == 0
        && e.name.len() <= MAX_NAME_SIZE;
    if !basic {
        return false;
    }
    let phys = u64::from(e.table_size) * cluster_size;
    if phys > MAX_PHYS_SIZE {
        return false;
    }
    e.flags & FLAG_IN_USE != 0 || disk_len <= (phys * 8) << e.granularity_bits
}

/// Parses the directory read from the image (QEMU: bitmap_list_load).
pub fn parse_directory(
    dir: &[u8],
    nb_bitmaps: u32,
    cluster_size: u64,
    disk_len: u64,
) -> Result<Vec<DirEntry>> {
    if dir.is_empty() {
        return Err(Error::invalid("Requested bitmap directory size is zero"));
    }
    if dir.len() as u64 > MAX_BITMAP_DIR_SIZE {
        return Err(Error::invalid("Requested bitmap directory size is too big"));
    }
    let broken = || Error::invalid("Broken bitmap directory");
    let be32 = |o: usize| u32::from_be_bytes(dir[o..o + 4].try_into().unwrap());
    let mut out = Vec::new();
    let mut off = 0usize;
    while off < dir.len() {
        if off + ENTRY_HEADER > dir.len() {
            return Err(broken());
        }
        if out.len() as u32 >= nb_bitmaps {
            return Err(Error::invalid(
                "More bitmaps found than specified in header extension",
            ));
        }
        let name_size = u16::from_be_bytes([dir[off + 18], dir[off + 19]]) as usize;
        let extra = be32(off + 20) as usize;
        let size = (ENTRY_HEADER + name_size + extra).next_multiple_of(8);
        if off + size > dir.len() {
            return Err(broken());
        }
        let name_at = off + ENTRY_HEADER + extra;
        let name = String::from_utf8_lossy(&dir[name_at..name_at + name_size]).into_owned();
        if extra != 0 {
            return Err(Error::invalid("Bitmap extra data is not supported"));
        }
        let e = DirEntry {
            table_offset: u64::from_be_bytes(dir[off..off + 8].try_into().unwrap()),
            table_size: be32(off + 8),
            flags: be32(off + 12),
            granularity_bits: dir[off + 17],
            name,
        };
        if dir[off + 16] != TYPE_DIRTY_TRACKING || !entry_ok(&e, cluster_size, disk_len) {
            return Err(Error::invalid(format!(
                "Bitmap '{}' doesn't satisfy the constraints",
                e.name
            )));
        }
        out.push(e);
        off += size;
    }
    if out.len() as u32 != nb_bitmaps {
        return Err(Error::invalid(
            "Less bitmaps found than specified in header extension",
        ));
    }
    Ok(out)
}

/// The directory's bytes (QEMU: bitmap_list_store); every entry must pass
/// the constraints for an image of `disk_len` bytes.
pub fn serialize_directory(
    entries: &[DirEntry],
    cluster_size: u64,
    disk_len: u64,
) -> Result<Vec<u8>> {
    let size: u64 = entries.iter().map(|e| entry_size(e.name.len())).sum();
    if size == 0 || size > MAX_BITMAP_DIR_SIZE {
        return Err(Error::errno(libc::EINVAL));
    }
    let mut dir = Vec::with_capacity(size as usize);
    for e in entries {
        if !entry_ok(e, cluster_size, disk_len) {
            return Err(Error::errno(libc::EINVAL));
        }
        let start = dir.len();
        dir.extend_from_slice(&e.table_offset.to_be_bytes());
        dir.extend_from_slice(&e.table_size.to_be_bytes());
        dir.extend_from_slice(&e.flags.to_be_bytes());
        dir.push(TYPE_DIRTY_TRACKING);
        dir.push(e.granularity_bits);
        dir.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        dir.extend_from_slice(&0u32.to_be_bytes());
        dir.extend_from_slice(e.name.as_bytes());
        dir.resize(start + entry_size(e.name.len()) as usize, 0);
    }
    Ok(dir)
}

/// Is a bitmap table entry valid? (QEMU: check_table_entry.)
pub fn table_entry_ok(entry: u64, cluster_size: u64) -> bool {
    if entry & ENTRY_RESERVED_MASK != 0 {
        return false;
    }
    let offset = entry & ENTRY_OFFSET_MASK;
    offset == 0 || (entry & ENTRY_ALL_ONES == 0 && offset.is_multiple_of(cluster_size))
}

/// QEMU's check_constraints_on_bitmap, with its messages.
pub fn check_constraints(
    name: &str,
    granularity: u64,
    disk_len: u64,
    cluster_size: u64,
) -> Result<()> {
    let bits = granularity.trailing_zeros();
    if bits > u32::from(MAX_GRANULARITY_BITS) {
        return Err(Error::invalid(format!(
            "Granularity exceeds maximum ({} bytes)",
            1u64 << MAX_GRANULARITY_BITS
        )));
    }
    if bits < u32::from(MIN_GRANULARITY_BITS) {
        return Err(Error::invalid(format!(
            "Granularity is under minimum ({} bytes)",
            1u64 << MIN_GRANULARITY_BITS
        )));
    }
    let bytes = bytes_needed(disk_len, granularity);
    if bytes > MAX_PHYS_SIZE || bytes > MAX_TABLE_SIZE * cluster_size {
        return Err(Error::invalid(
            "Too much space will be occupied by the bitmap. Use larger granularity",
        ));
    }
    if name.len() > MAX_NAME_SIZE {
        return Err(Error::invalid(format!(
            "Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
        )));
    }
    Ok(())
}

/// Bytes that bitmaps of these (name length, granularity) over `len`
/// bytes take in an image of `cluster_size`, every cluster of bits counted
/// (QEMU: qcow2_get_persistent_dirty_bitmap_size).
pub fn persistent_size(bitmaps: &[(usize, u64)], len: u64, cluster_size: u64) -> u64 {
    let mut size = 0;
    let mut dir = 0;
    for &(name_len, granularity) in bitmaps {
        let clusters = table_size(len, granularity, cluster_size);
        size += clusters * cluster_size;
        size += (clusters * 8).next_multiple_of(cluster_size);
        dir += entry_size(name_len);
    }
    size + dir.next_multiple_of(cluster_size)
}

/// QEMU's warning for a bitmaps extension whose autoclear bit is clear.
pub fn warn_stale(version: u32) {
    if version < 3 {
        warn_report(
            "This qcow2 v2 image contains bitmaps, but they may have been modified by a program without persistent bitmap support; so now they must all be considered inconsistent",
        );
    } else {
        warn_report(
            "a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent",
        );
    }
    // QEMU's error_printf, without a newline.
    eprint!("Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, flags: u32) -> DirEntry {
        DirEntry {
            table_offset: 0x30000,
            table_size: 1,
            flags,
            granularity_bits: 16,
            name: name.into(),
        }
    }

    #[test]
    fn directory_round_trips_with_padding() {
        let es = vec![entry("b0", FLAG_AUTO), entry("a-longer-name", FLAG_IN_USE)];
        let dir = serialize_directory(&es, 65536, 1 << 30).unwrap();
        assert_eq!(dir.len() as u64, entry_size(2) + entry_size(13));
        assert_eq!(dir.len() % 8, 0);
        assert_eq!(parse_directory(&dir, 2, 65536, 1 << 30).unwrap(), es);
        // The count in the extension must match the entries.
        let e = parse_directory(&dir, 1, 65536, 1 << 30).unwrap_err();
        assert_eq!(
            e.to_string(),
            "More bitmaps found than specified in header extension"
        );
        let e = parse_directory(&dir, 3, 65536, 1 << 30).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Less bitmaps found than specified in header extension"
        );
        assert!(parse_directory(&dir[..dir.len() - 8], 2, 65536, 1 << 30).is_err());
    }

    #[test]
    fn constraints_are_qemus() {
        // One table cluster of 64 KiB at 64 KiB granularity covers 32 GiB;
        // a bigger disk needs a bigger table unless the bitmap is in use.
        let mut e = entry("b", 0);
        assert!(entry_ok(&e, 65536, 32 << 30));
        assert!(!entry_ok(&e, 65536, (32 << 30) + 1));
        e.flags = FLAG_IN_USE;
        assert!(entry_ok(&e, 65536, (32 << 30) + 1));
        e.flags = 4;
        assert!(!entry_ok(&e, 65536, 1 << 20));
        assert!(table_entry_ok(0x10000, 65536));
        assert!(table_entry_ok(ENTRY_ALL_ONES, 65536));
        assert!(!table_entry_ok(0x10000 | ENTRY_ALL_ONES, 65536));
        assert!(!table_entry_ok(0x10200, 65536));
        assert!(!table_entry_ok(2, 65536));
        assert_eq!(
            check_constraints("b", 256, 1 << 20, 65536)
                .unwrap_err()
                .to_string(),
            "Granularity is under minimum (512 bytes)"
        );
    }

    #[test]
    fn persistent_size_matches_qemus_measure() {
        // iotest 190: 2 TiB, bitmaps at 512 B and 2 MiB granularity.
        let len = 2u64 << 40;
        assert_eq!(
            persistent_size(&[(2, 512), (2, 2 << 20)], len, 65536),
            537198592
        );
        assert_eq!(
            persistent_size(&[(2, 512), (2, 2 << 20)], len, 2 << 20),
            545259520
        );
    }
}
