//! Where new clusters and tables go, and the order that keeps a crash
//! harmless: the cluster's bytes (and a new L2 table), a flush, then the
//! one entry that points at them.
//!
//! QEMU writes the entry first (synced) and the data after, so a crash
//! between them leaves a cluster of zeroes where the backing file's data
//! or the old compressed cluster was; it also gives two compressed
//! clusters in flight the same place (both take the file's length before
//! either writes). Here one lock covers an allocation from choosing the
//! place to publishing the entry, and the next free byte is kept in
//! memory, past everything any loaded table points at.

use super::tables::L2Table;
use super::{QcowDriver, READ_MAX, SECTOR};
use crate::formats::crypto::crypto_err;
use crate::formats::qcow2::compress::compress;
use crate::formats::qcow2::header::Compression;
use std::sync::atomic::{AtomicU64, Ordering};
use strata_block::driver::Preallocation;
use strata_block::{DebugEvent, Error, IoBuf, Result, WriteFlags};

/// State under the allocation lock.
pub(super) struct Alloc {
    /// The first byte no table entry and no metadata uses (QEMU: the
    /// file's length, rounded up to a sector).
    next_free: u64,
}

impl Alloc {
    pub(super) fn new(next_free: u64) -> Alloc {
        Alloc {
            next_free: next_free.next_multiple_of(SECTOR),
        }
    }

    /// Keeps everything before `end` from being handed out.
    pub(super) fn reserve_to(&mut self, end: u64) {
        self.next_free = self.next_free.max(end.next_multiple_of(SECTOR));
    }

    /// Takes `len` bytes at the next multiple of `align`; never handed out
    /// again, even when the write that wanted them fails.
    fn take(&mut self, len: u64, align: u64) -> Result<u64> {
        let at = self.next_free.next_multiple_of(align);
        if at.saturating_add(len) > READ_MAX {
            return Err(Error::errno(libc::EFBIG));
        }
        self.next_free = (at + len).next_multiple_of(SECTOR);
        Ok(at)
    }
}

/// An entry for guest data written in place (neither unallocated nor
/// compressed).
pub(super) fn is_plain(entry: u64) -> bool {
    entry != 0 && entry & super::COMPRESSED == 0
}

impl QcowDriver {
    /// Writes `piece` (within one cluster) where the cluster already is.
    /// An entry off a sector boundary fails, as in QEMU.
    pub(super) async fn write_in_place(
        &self,
        entry: u64,
        guest: u64,
        piece: IoBuf,
        flags: WriteFlags,
    ) -> Result<IoBuf> {
        if !entry.is_multiple_of(SECTOR) {
            return Err(Error::errno(libc::EIO));
        }
        let host = entry + self.geo.offset_in_cluster(guest);
        self.file.debug_event(DebugEvent::WriteAio).await;
        let Some(c) = &self.crypto else {
            return self.file.write(host, piece, flags).await;
        };
        let mut enc = IoBuf::from_slice(piece.as_slice());
        c.encrypt(guest, enc.as_mut_slice()).map_err(crypto_err)?;
        self.file.write(host, enc, flags).await?;
        Ok(piece)
    }

    /// Writes `piece` into a cluster that is unallocated or compressed: a
    /// new cluster at the end holds the piece and, around it, what the
    /// cluster showed before (QEMU fills with zeroes even over a backing
    /// file's data when clusters are larger than a sector).
    pub(super) async fn write_new_cluster(
        &self,
        guest: u64,
        piece: IoBuf,
        flags: WriteFlags,
    ) -> Result<IoBuf> {
        let mut a = self.alloc.lock().await;
        let (l2_at, table, old) = self.entry_locked(&mut a, guest).await?;
        if is_plain(old) {
            // Another request placed it while this one waited.
            drop(a);
            return self.write_in_place(old, guest, piece, flags).await;
        }
        // Held here by blkdebug, nothing of the new cluster is written yet.
        self.file.debug_event(DebugEvent::ClusterAlloc).await;
        let cs = self.geo.cluster_size();
        let start = guest - self.geo.offset_in_cluster(guest);
        // A whole plain cluster is written from the caller's buffer (the
        // copy convert would pay on every cluster); anything else is built.
        let built = match (piece.len() as u64 == cs, &self.crypto) {
            (true, None) => None,
            (true, Some(_)) => Some(IoBuf::from_slice(piece.as_slice())),
            (false, _) => {
                let mut before = self.cluster_before(start, old).await?;
                let at = (guest - start) as usize;
                before.as_mut_slice()[at..at + piece.len()].copy_from_slice(piece.as_slice());
                Some(before)
            }
        };
        let built = match (built, &self.crypto) {
            (Some(mut data), Some(c)) => {
                c.encrypt(start, data.as_mut_slice()).map_err(crypto_err)?;
                Some(data)
            }
            (built, _) => built,
        };
        let new_table = match table {
            None => Some(a.take(self.geo.l2_len() as u64, cs)?),
            Some(_) => None,
        };
        let host = a.take(cs, cs)?;
        self.file.debug_event(DebugEvent::WriteAio).await;
        let piece = match built {
            None => self.file.write(host, piece, flags).await?,
            Some(data) => {
                self.file.write(host, data, flags).await?;
                piece
            }
        };
        let placed = Placed {
            guest,
            l2_at,
            table,
            new_table,
            entry: host,
        };
        self.publish(&mut a, placed, DebugEvent::L2Update, flags)
            .await?;
        Ok(piece)
    }

    /// What a cluster showed before a partial write: its decompressed
    /// bytes, or the backing file's (zeroes where there is none).
    async fn cluster_before(&self, start: u64, entry: u64) -> Result<IoBuf> {
        let cs = self.geo.cluster_size() as usize;
        if entry == 0 {
            return crate::formats::read_backing(self.backing(), start, IoBuf::zeroed(cs)).await;
        }
        Ok(IoBuf::from_slice(&self.read_compressed(entry).await?))
    }

    /// Makes a cluster written at `p.entry` visible: after a flush (which
    /// puts its bytes and any new table on disk), the L2 entry, or for a
    /// new table the L1 entry; then the same in memory. The caller holds
    /// the allocation lock.
    async fn publish(
        &self,
        _locked: &mut Alloc,
        p: Placed,
        event: DebugEvent,
        flags: WriteFlags,
    ) -> Result<()> {
        let i = self.geo.l2_index(p.guest);
        if let Some(t_at) = p.new_table {
            let mut raw = IoBuf::zeroed(self.geo.l2_len());
            raw.as_mut_slice()[i * 8..i * 8 + 8].copy_from_slice(&p.entry.to_be_bytes());
            self.file.write(t_at, raw, flags).await?;
            self.file.flush().await?;
            self.file.debug_event(DebugEvent::L1Update).await;
            let l1i = self.geo.l1_index(p.guest);
            let at = self.l1_offset + l1i as u64 * 8;
            self.file
                .write(at, IoBuf::from_slice(&t_at.to_be_bytes()), flags)
                .await?;
            let table: L2Table = (0..1usize << self.geo.l2_bits)
                .map(|j| AtomicU64::new(if j == i { p.entry } else { 0 }))
                .collect();
            self.l2
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(t_at, table);
            let mut l1 = self.l1.write().unwrap_or_else(|e| e.into_inner());
            if l1.len() <= l1i {
                l1.resize(l1i + 1, 0);
            }
            l1[l1i] = t_at;
            return Ok(());
        }
        let table = p.table.expect("an existing table");
        self.file.flush().await?;
        self.file.debug_event(event).await;
        let at = p.l2_at + i as u64 * 8;
        self.file
            .write(at, IoBuf::from_slice(&p.entry.to_be_bytes()), flags)
            .await?;
        table[i].store(p.entry, Ordering::Release);
        Ok(())
    }

    /// Writes one cluster compressed (the last one may be short: it is
    /// padded with zeroes), or as is when it does not shrink (QEMU:
    /// qcow_co_pwritev_compressed). An encrypted image gets no compressed
    /// clusters: QEMU stores those unencrypted.
    pub(super) async fn write_compressed_cluster(&self, guest: u64, buf: IoBuf) -> Result<IoBuf> {
        let cs = self.geo.cluster_size() as usize;
        let len = buf.len();
        if len != cs && (len > cs || guest + len as u64 != self.size) {
            return Err(Error::errno(libc::EINVAL));
        }
        let flags = WriteFlags::default();
        let _writing = self.writers.read().await;
        if self.crypto.is_some() {
            return self.write_cluster(guest, buf, flags).await;
        }
        let mut src = vec![0u8; cs];
        src[..len].copy_from_slice(buf.as_slice());
        let Some(z) = compress(Compression::Zlib, &src, cs - 1) else {
            return self.write_cluster(guest, buf, flags).await;
        };
        let mut a = self.alloc.lock().await;
        let (l2_at, table, old) = self.entry_locked(&mut a, guest).await?;
        if is_plain(old) {
            // QEMU would write the compressed bytes over the cluster.
            drop(a);
            return self.write_in_place(old, guest, buf, flags).await;
        }
        let new_table = match table {
            None => Some(a.take(self.geo.l2_len() as u64, cs as u64)?),
            Some(_) => None,
        };
        let host = a.take(z.len() as u64, SECTOR)?;
        self.file.debug_event(DebugEvent::WriteCompressed).await;
        self.file.write(host, IoBuf::from_slice(&z), flags).await?;
        let placed = Placed {
            guest,
            l2_at,
            table,
            new_table,
            entry: self.geo.compressed_entry(host, z.len()),
        };
        self.publish(&mut a, placed, DebugEvent::L2UpdateCompressed, flags)
            .await?;
        Ok(buf)
    }

    /// Drops every cluster (QEMU: qcow_make_empty): the L1 table zeroed
    /// and flushed, the file cut after it. Writes in flight finish first,
    /// so none lands in space handed out again.
    pub(super) async fn empty(&self) -> Result<()> {
        let _all = self.writers.write().await;
        let mut a = self.alloc.lock().await;
        let len = self.l1_entries * 8;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(1 << 20);
            let zeroes = IoBuf::zeroed(n as usize);
            self.file
                .write(self.l1_offset + done, zeroes, WriteFlags::default())
                .await?;
            done += n;
        }
        self.file.flush().await?;
        self.l1.write().unwrap_or_else(|e| e.into_inner()).clear();
        self.l2.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let end = self.l1_offset + len;
        self.file.truncate(end, false, Preallocation::Off).await?;
        *a = Alloc::new(end.max(self.metadata_end));
        Ok(())
    }
}

/// A cluster written and waiting for its entry.
struct Placed {
    guest: u64,
    /// The L2 table it goes in (if there is one yet) and where it is.
    l2_at: u64,
    table: Option<L2Table>,
    /// Where the new L2 table goes, when there was none.
    new_table: Option<u64>,
    entry: u64,
}
