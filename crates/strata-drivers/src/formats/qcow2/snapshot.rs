//! The internal snapshot table (qcow2.txt "Snapshot table"): read, found
//! in by id and name as QEMU finds, and encoded for writing back. `info`
//! lists it, `check` counts the clusters snapshots hold, and `snapshot_ops`
//! creates, applies and deletes snapshots through it.

use super::header::Header;
use std::sync::Arc;
use strata_block::driver::SnapshotInfo;
use strata_block::{Error, IoBuf, Node, Result};

/// Most snapshots QEMU accepts, and the most bytes their table may take.
pub const MAX_SNAPSHOTS: u32 = 65536;
const MAX_TABLE_BYTES: u64 = 1024 * MAX_SNAPSHOTS as u64;
/// Most bytes of extra data in one entry.
const MAX_EXTRA: u32 = 1024;

/// Bytes of the fixed part of an entry, and of the extra data QEMU writes
/// (large VM state size, disk size, icount).
const FIXED: usize = 40;
const KNOWN_EXTRA: usize = 24;

/// One snapshot: its L1 table, the disk's size then, and what `info` shows.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub l1_offset: u64,
    pub l1_size: u32,
    pub disk_size: u64,
    /// Extra data past the fields known here, kept as it was.
    pub unknown_extra: Vec<u8>,
    /// The id and name as stored: written back byte for byte, even where
    /// they are not UTF-8 (`info` shows them lossily).
    pub raw_id: Vec<u8>,
    pub raw_name: Vec<u8>,
    pub info: SnapshotInfo,
    /// Stored without the disk size and 64-bit VM state size that v3
    /// requires (written by a v2 tool).
    pub short_extra: bool,
}

impl Snapshot {
    /// A new entry for `info`, whose id and name are stored as given.
    pub fn new(l1_offset: u64, l1_size: u32, disk_size: u64, info: SnapshotInfo) -> Snapshot {
        Snapshot {
            l1_offset,
            l1_size,
            disk_size,
            unknown_extra: Vec::new(),
            raw_id: info.id.as_bytes().to_vec(),
            raw_name: info.name.as_bytes().to_vec(),
            info,
            short_extra: false,
        }
    }
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn be64(b: &[u8], o: usize) -> u64 {
    (be32(b, o) as u64) << 32 | be32(b, o + 4) as u64
}

/// What `check -r all` dropped while reading the table (QEMU:
/// qcow2_do_read_snapshots in repair mode).
#[derive(Clone, Copy, Debug, Default)]
pub struct TableRepairs {
    /// Snapshots cut off the end of a table that was too long.
    pub reduced: u32,
    /// Entries whose extra data was cut to the most QEMU keeps.
    pub extra_dropped: u32,
}

/// Reads of the snapshot table through a window of [`TableReader::WINDOW`]
/// bytes: a table of thousands of entries costs a few reads of the file,
/// not three per entry (QEMU makes three).
struct TableReader<'a> {
    file: &'a Arc<Node>,
    at: u64,
    window: IoBuf,
}

impl TableReader<'_> {
    const WINDOW: u64 = 64 * 1024;

    /// `len` bytes at `off`: from the window, or from a new window there
    /// (no further than the file's end). Where the window cannot be read,
    /// the exact read decides, so that errors are the ones it would give.
    async fn bytes(&mut self, off: u64, len: usize) -> Result<Vec<u8>> {
        let in_window = off
            .checked_sub(self.at)
            .filter(|&d| d.saturating_add(len as u64) <= self.window.len() as u64);
        if let Some(d) = in_window {
            return Ok(self.window.as_slice()[d as usize..d as usize + len].to_vec());
        }
        let want = (len as u64).max(Self::WINDOW.min(self.file.length().saturating_sub(off)));
        if want > len as u64 && off.checked_add(want).is_some() {
            if let Ok(w) = self.file.read(off, IoBuf::zeroed(want as usize)).await {
                self.at = off;
                self.window = w;
                return Ok(self.window.as_slice()[..len].to_vec());
            }
        }
        let b = self.file.read(off, IoBuf::zeroed(len)).await?;
        Ok(b.as_slice().to_vec())
    }
}

/// Reads the snapshot table; sizes come from the file, so each is bounded
/// before it is used. Returns the entries and the table's length in bytes.
pub async fn read(file: &Arc<Node>, h: &Header) -> Result<(Vec<Snapshot>, u64)> {
    let (list, len, _) = read_checked(file, h, false).await?;
    Ok((list, len))
}

/// [`read`], and with `repair` what QEMU's check repairs instead of
/// refusing: too many snapshots, too much extra data, a table too big.
pub async fn read_checked(
    file: &Arc<Node>,
    h: &Header,
    repair: bool,
) -> Result<(Vec<Snapshot>, u64, TableRepairs)> {
    let mut fixes = TableRepairs::default();
    let mut count = h.nb_snapshots;
    if count == 0 {
        return Ok((Vec::new(), 0, fixes));
    }
    if count > MAX_SNAPSHOTS {
        if !repair {
            return Err(Error::invalid("Snapshot table too large"));
        }
        strata_block::stderr_line!("Discarding {} overhanging snapshots", count - MAX_SNAPSHOTS);
        fixes.reduced += count - MAX_SNAPSHOTS;
        count = MAX_SNAPSHOTS;
    }
    let mut off = h.snapshots_offset;
    // Where the last entry read ends (unpadded), and the table's length
    // as QEMU bounds it (with extra data as kept).
    let mut end = off;
    let mut table_len = 0u64;
    let mut out = Vec::with_capacity(count as usize);
    let mut table = TableReader {
        file,
        at: 0,
        window: IoBuf::zeroed(0),
    };
    for i in 0..count {
        let fixed = table.bytes(off, FIXED).await?;
        let b = fixed.as_slice();
        let (id_len, name_len) = (
            u16::from_be_bytes([b[12], b[13]]) as u64,
            u16::from_be_bytes([b[14], b[15]]) as u64,
        );
        let extra_len = be32(b, 36);
        let mut kept = extra_len;
        if extra_len > MAX_EXTRA {
            if !repair {
                return Err(Error::msg(
                    libc::EFBIG,
                    format!(
                        "Too much extra metadata in snapshot table entry {i}\nYou can force-remove this extra metadata with qemu-img check -r all"
                    ),
                ));
            }
            strata_block::stderr_line!(
                "Discarding too much extra metadata in snapshot table entry {i} ({extra_len} > {MAX_EXTRA})"
            );
            fixes.extra_dropped += 1;
            kept = MAX_EXTRA;
        }
        let e = kept as usize;
        let extra = table.bytes(off + FIXED as u64, e).await?;
        let x = extra.as_slice();
        let names_at = off + FIXED as u64 + extra_len as u64;
        let names = table.bytes(names_at, (id_len + name_len) as usize).await?;
        let r = names.as_slice();
        table_len = table_len.div_ceil(8) * 8 + FIXED as u64 + kept as u64 + id_len + name_len;
        let entry_end = names_at + id_len + name_len;
        if table_len > MAX_TABLE_BYTES || entry_end - h.snapshots_offset > i32::MAX as u64 {
            if !repair {
                return Err(Error::msg(
                    libc::EFBIG,
                    format!(
                        "Snapshot table is too big\nYou can force-remove all {} overhanging snapshots with qemu-img check -r all",
                        count - i
                    ),
                ));
            }
            strata_block::stderr_line!(
                "Discarding {} overhanging snapshots (snapshot table is too big)",
                count - i
            );
            fixes.reduced += count - i;
            break;
        }
        let mut vm_state_size = be32(b, 32) as u64;
        if e >= 8 {
            vm_state_size = be64(x, 0);
        }
        // Images older than the disk size field had the disk's size.
        let disk_size = if e >= 16 { be64(x, 8) } else { h.size };
        let icount = if e >= 24 {
            Some(be64(x, 16)).filter(|&v| v != u64::MAX)
        } else {
            None
        };
        let raw_id = r[..id_len as usize].to_vec();
        let raw_name = r[id_len as usize..].to_vec();
        // QEMU reads them as C strings: shown and matched up to a NUL.
        let text = |raw: &[u8]| {
            let n = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
            String::from_utf8_lossy(&raw[..n]).into_owned()
        };
        let (id, name) = (text(&raw_id), text(&raw_name));
        out.push(Snapshot {
            raw_id,
            raw_name,
            l1_offset: be64(b, 0),
            l1_size: be32(b, 8),
            disk_size,
            unknown_extra: x[e.min(KNOWN_EXTRA)..e].to_vec(),
            short_extra: e < 16,
            info: SnapshotInfo {
                id,
                name,
                vm_state_size,
                date_sec: be32(b, 16) as u64,
                date_nsec: be32(b, 20) as u64,
                vm_clock_nsec: be64(b, 24),
                icount,
            },
        });
        end = entry_end;
        off = entry_end.div_ceil(8) * 8;
    }
    Ok((out, end - h.snapshots_offset, fixes))
}

/// The table as QEMU writes it (qcow2_write_snapshots): each entry with at
/// least the known extra data, 8-byte aligned. Errors with EFBIG past
/// QEMU's table size limit.
pub fn encode(list: &[Snapshot]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for sn in list {
        out.resize(out.len().div_ceil(8) * 8, 0);
        let i = &sn.info;
        let extra_len = KNOWN_EXTRA + sn.unknown_extra.len();
        let mut h = [0u8; FIXED];
        h[0..8].copy_from_slice(&sn.l1_offset.to_be_bytes());
        h[8..12].copy_from_slice(&sn.l1_size.to_be_bytes());
        // Lengths are 16 bits on disk: a longer id or name cannot be stored.
        let id_len = u16::try_from(sn.raw_id.len()).map_err(|_| Error::errno(libc::EINVAL))?;
        let name_len = u16::try_from(sn.raw_name.len()).map_err(|_| Error::errno(libc::EINVAL))?;
        h[12..14].copy_from_slice(&id_len.to_be_bytes());
        h[14..16].copy_from_slice(&name_len.to_be_bytes());
        h[16..20].copy_from_slice(&(i.date_sec as u32).to_be_bytes());
        h[20..24].copy_from_slice(&(i.date_nsec as u32).to_be_bytes());
        h[24..32].copy_from_slice(&i.vm_clock_nsec.to_be_bytes());
        // Too large for 32 bits: older readers see a disk-only snapshot.
        let small_vm = u32::try_from(i.vm_state_size).unwrap_or(0);
        h[32..36].copy_from_slice(&small_vm.to_be_bytes());
        h[36..40].copy_from_slice(&(extra_len as u32).to_be_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&i.vm_state_size.to_be_bytes());
        out.extend_from_slice(&sn.disk_size.to_be_bytes());
        out.extend_from_slice(&i.icount.unwrap_or(u64::MAX).to_be_bytes());
        out.extend_from_slice(&sn.unknown_extra);
        out.extend_from_slice(&sn.raw_id);
        out.extend_from_slice(&sn.raw_name);
        if out.len() as u64 > MAX_TABLE_BYTES {
            return Err(Error::errno(libc::EFBIG));
        }
    }
    Ok(out)
}

/// The first snapshot with this id and/or name (QEMU's
/// find_snapshot_by_id_and_name: both must match when both are given).
pub fn find(list: &[Snapshot], id: Option<&str>, name: Option<&str>) -> Option<usize> {
    if id.is_none() && name.is_none() {
        return None;
    }
    list.iter()
        .position(|s| id.is_none_or(|id| s.info.id == id) && name.is_none_or(|n| s.info.name == n))
}

/// By id first, then by name (QEMU's find_snapshot_by_id_or_name).
pub fn find_by_id_or_name(list: &[Snapshot], id_or_name: &str) -> Option<usize> {
    find(list, Some(id_or_name), None).or_else(|| find(list, None, Some(id_or_name)))
}

/// A new id: one more than the largest numeric prefix of the ids in use
/// (QEMU's find_new_snapshot_id, with strtoul's reading of each).
pub fn new_id(list: &[Snapshot]) -> String {
    let max = list
        .iter()
        .map(|s| {
            let t = s.info.id.trim_start();
            let digits: String = t.chars().take_while(char::is_ascii_digit).collect();
            digits
                .parse::<u64>()
                .unwrap_or(if digits.is_empty() { 0 } else { u64::MAX })
        })
        .max()
        .unwrap_or(0);
    // strtoul's overflow gives ULONG_MAX, and QEMU's + 1 wraps to 0.
    max.wrapping_add(1).to_string()
}

/// Most snapshots an image may hold.
pub const fn max_snapshots() -> u32 {
    MAX_SNAPSHOTS
}

/// A snapshot's L1 table, checked first as QEMU's qcow2_validate_table
/// checks it ("Snapshot L1 table too large" or "... offset invalid").
pub(super) async fn read_l1(
    file: &Arc<Node>,
    sn: &Snapshot,
    cluster_size: u64,
) -> Result<Vec<u64>> {
    super::open::validate_table(
        sn.l1_offset,
        sn.l1_size as u64,
        8,
        super::MAX_L1_BYTES,
        cluster_size,
        "Snapshot L1 table",
    )?;
    let bytes = sn.l1_size as usize * 8;
    let b = file.read(sn.l1_offset, IoBuf::zeroed(bytes)).await?;
    Ok(b.as_slice()
        .chunks_exact(8)
        .map(super::open::be64)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sn(id: &str, name: &str) -> Snapshot {
        Snapshot::new(
            0x30000,
            1,
            1 << 26,
            SnapshotInfo {
                id: id.into(),
                name: name.into(),
                vm_state_size: 0,
                date_sec: 1,
                date_nsec: 2,
                vm_clock_nsec: 3,
                icount: None,
            },
        )
    }

    #[test]
    fn lookups_follow_qemu() {
        let l = [sn("1", "a"), sn("2", "1"), sn("3", "b")];
        // An id wins over a name that reads the same.
        assert_eq!(find_by_id_or_name(&l, "1"), Some(0));
        assert_eq!(find_by_id_or_name(&l, "b"), Some(2));
        assert_eq!(find(&l, Some("2"), Some("a")), None);
        assert_eq!(find(&l, Some("2"), Some("1")), Some(1));
        assert_eq!(find(&l, None, None), None);
        assert_eq!(new_id(&l), "4");
        assert_eq!(new_id(&[sn("7x", "a"), sn("z", "b")]), "8");
        assert_eq!(new_id(&[]), "1");
        assert_eq!(new_id(&[sn("99999999999999999999", "a")]), "0");
    }

    #[test]
    fn entries_are_aligned_and_carry_the_extra_data() {
        let mut a = sn("1", "abc");
        a.unknown_extra = vec![9; 5];
        let b = encode(&[a, sn("12", "d")]).unwrap();
        // 40 + 24 + 5 + 1 + 3 = 73, so the second entry starts at 80.
        assert_eq!(b.len(), 80 + 40 + 24 + 2 + 1);
        assert_eq!(u32::from_be_bytes(b[36..40].try_into().unwrap()), 29);
        assert_eq!(&b[48..56], &(1u64 << 26).to_be_bytes());
        assert_eq!(&b[120 + 24 - 8..120 + 24], &u64::MAX.to_be_bytes());
        // A name too long for its 16-bit length is refused, never cut short.
        assert!(encode(&[sn("1", &"x".repeat(70000))]).is_err());
    }
}
