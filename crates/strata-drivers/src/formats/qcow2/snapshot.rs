//! The internal snapshot table: read so that `info` lists snapshots and
//! `check` counts the clusters they hold (otherwise their clusters would
//! look leaked, and a repair would free data that a snapshot still needs).

use super::header::Header;
use std::sync::Arc;
use strata_block::driver::SnapshotInfo;
use strata_block::{Error, IoBuf, Node, Result};

/// Most snapshots QEMU accepts, and the most bytes their table may take.
const MAX_SNAPSHOTS: u32 = 65536;
const MAX_TABLE_BYTES: u64 = 1024 * MAX_SNAPSHOTS as u64;
/// Most bytes of extra data in one entry.
const MAX_EXTRA: u32 = 1024;

/// One snapshot: its L1 table and what `info` shows.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub l1_offset: u64,
    pub l1_size: u32,
    pub info: SnapshotInfo,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn be64(b: &[u8], o: usize) -> u64 {
    (be32(b, o) as u64) << 32 | be32(b, o + 4) as u64
}

/// Reads the snapshot table; sizes come from the file, so each is bounded
/// before it is used. Returns the entries and the table's length in bytes.
pub async fn read(file: &Arc<Node>, h: &Header) -> Result<(Vec<Snapshot>, u64)> {
    if h.nb_snapshots == 0 {
        return Ok((Vec::new(), 0));
    }
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(Error::invalid("Snapshot table too large"));
    }
    let mut off = h.snapshots_offset;
    let mut out = Vec::with_capacity(h.nb_snapshots as usize);
    for _ in 0..h.nb_snapshots {
        let fixed = file.read(off, IoBuf::zeroed(40)).await?;
        let b = fixed.as_slice();
        let (id_len, name_len) = (
            u16::from_be_bytes([b[12], b[13]]) as u64,
            u16::from_be_bytes([b[14], b[15]]) as u64,
        );
        let extra_len = be32(b, 36);
        if extra_len > MAX_EXTRA {
            return Err(Error::invalid(
                "Too much extra metadata in snapshot table entry",
            ));
        }
        let rest_len = extra_len as u64 + id_len + name_len;
        let rest = file
            .read(off + 40, IoBuf::zeroed(rest_len as usize))
            .await?;
        let r = rest.as_slice();
        let e = extra_len as usize;
        let mut vm_state_size = be32(b, 32) as u64;
        if e >= 8 {
            vm_state_size = be64(r, 0);
        }
        let icount = if e >= 24 {
            Some(be64(r, 16)).filter(|&v| v != u64::MAX)
        } else {
            None
        };
        let id = String::from_utf8_lossy(&r[e..e + id_len as usize]).into_owned();
        let name = String::from_utf8_lossy(&r[e + id_len as usize..]).into_owned();
        out.push(Snapshot {
            l1_offset: be64(b, 0),
            l1_size: be32(b, 8),
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
        off += (40 + rest_len).div_ceil(8) * 8;
        if off - h.snapshots_offset > MAX_TABLE_BYTES {
            return Err(Error::invalid("Snapshot table too large"));
        }
    }
    Ok((out, off - h.snapshots_offset))
}
