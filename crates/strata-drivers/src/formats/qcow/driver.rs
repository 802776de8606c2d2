//! An open qcow image: requests cut at cluster boundaries, each cluster
//! read from its place, decompressed, or from the backing file.

use super::alloc::{is_plain, Alloc};
use super::tables::L2Cache;
use super::{read_at, Geometry, Header, HEADER_LEN, SECTOR};
use crate::formats::crypto::crypto_err;
use crate::formats::qcow2::compress::decompress;
use crate::formats::qcow2::header::Compression;
use async_trait::async_trait;
use std::sync::Arc;
use strata_block::driver::Preallocation;
use strata_block::{
    BlockStatus, Child, ChildRole, DebugEvent, Driver, Error, IoBuf, Limits, Node, Result,
    WriteFlags,
};
use strata_crypto::BlockCrypto;

/// An open qcow image.
pub struct QcowDriver {
    pub(super) file: Arc<Node>,
    backing: std::sync::RwLock<Option<Arc<Node>>>,
    backing_name: Option<String>,
    /// The disk's length: the header's size in whole sectors.
    pub(super) size: u64,
    pub(super) geo: Geometry,
    pub(super) crypto: Option<BlockCrypto>,
    pub(super) l1_offset: u64,
    pub(super) l1_entries: u64,
    /// The L1 entries inside the file; those past its end read as zero.
    pub(super) l1: std::sync::RwLock<Vec<u64>>,
    pub(super) l2: std::sync::Mutex<L2Cache>,
    pub(super) alloc: async_lock::Mutex<Alloc>,
    /// Held shared by every write, whole by `make_empty`.
    pub(super) writers: async_lock::RwLock<()>,
    /// The end of the header, backing file name and L1 table.
    pub(super) metadata_end: u64,
}

impl QcowDriver {
    pub(super) fn new(
        file: Arc<Node>,
        h: &Header,
        l1_entries: u64,
        l1: Vec<u64>,
        backing_name: Option<String>,
        backing: Option<Arc<Node>>,
        crypto: Option<BlockCrypto>,
    ) -> QcowDriver {
        let geo = h.geo;
        let l1_end = h.l1_offset.saturating_add(l1_entries * 8);
        let name_end = match h.backing_offset {
            0 => 0,
            at => at.saturating_add(h.backing_len as u64),
        };
        let metadata_end = l1_end.max(name_end).max(HEADER_LEN as u64);
        // New clusters go past the file, the metadata and every L2 table.
        let mut alloc = Alloc::new(metadata_end.max(file.length()));
        for &t in l1.iter().filter(|&&t| t != 0) {
            alloc.reserve_to(t.saturating_add(geo.l2_len() as u64));
        }
        QcowDriver {
            file,
            backing: std::sync::RwLock::new(backing),
            backing_name,
            size: h.size / SECTOR * SECTOR,
            geo,
            crypto,
            l1_offset: h.l1_offset,
            l1_entries,
            l1: std::sync::RwLock::new(l1),
            l2: Default::default(),
            alloc: async_lock::Mutex::new(alloc),
            writers: async_lock::RwLock::new(()),
            metadata_end,
        }
    }

    pub(super) fn backing(&self) -> Option<Arc<Node>> {
        self.backing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The cluster a compressed entry points at, decompressed; a cluster
    /// that does not inflate to its full size fails (QEMU: EIO).
    pub(super) async fn read_compressed(&self, entry: u64) -> Result<Vec<u8>> {
        let (at, len) = self.geo.compressed_extent(entry);
        self.file.debug_event(DebugEvent::ReadCompressed).await;
        let raw = read_at(&self.file, at, len).await?;
        let mut out = vec![0u8; self.geo.cluster_size() as usize];
        decompress(Compression::Zlib, raw.as_slice(), &mut out)
            .map_err(|_| Error::errno(libc::EIO))?;
        Ok(out)
    }

    /// Reads `piece` (within one cluster) at guest offset `guest`.
    async fn read_cluster(&self, guest: u64, piece: IoBuf) -> Result<IoBuf> {
        let entry = self.entry(guest).await?;
        let in_cluster = self.geo.offset_in_cluster(guest);
        if entry == 0 {
            if self.backing().is_some() {
                self.file.debug_event(DebugEvent::ReadBackingAio).await;
            }
            return crate::formats::read_backing(self.backing(), guest, piece).await;
        }
        if !is_plain(entry) {
            let data = self.read_compressed(entry).await?;
            let mut piece = piece;
            let at = in_cluster as usize;
            let n = piece.len();
            piece.as_mut_slice().copy_from_slice(&data[at..at + n]);
            return Ok(piece);
        }
        if !entry.is_multiple_of(SECTOR) {
            return Err(Error::errno(libc::EIO));
        }
        self.file.debug_event(DebugEvent::ReadAio).await;
        let mut piece = self.file.read(entry + in_cluster, piece).await?;
        if let Some(c) = &self.crypto {
            c.decrypt(guest, piece.as_mut_slice()).map_err(crypto_err)?;
        }
        Ok(piece)
    }

    /// Writes `piece` (within one cluster) at guest offset `guest`; the
    /// caller holds `writers`.
    pub(super) async fn write_cluster(
        &self,
        guest: u64,
        piece: IoBuf,
        flags: WriteFlags,
    ) -> Result<IoBuf> {
        let entry = self.entry(guest).await?;
        if is_plain(entry) {
            return self.write_in_place(entry, guest, piece, flags).await;
        }
        self.write_new_cluster(guest, piece, flags).await
    }

    fn pieces(&self, offset: u64, buf: IoBuf) -> impl Iterator<Item = (u64, IoBuf)> {
        let cs = self.geo.cluster_size();
        buf.pieces(offset, move |o, left| left.min((cs - o % cs) as usize))
    }
}

#[async_trait]
impl Driver for QcowDriver {
    fn format_name(&self) -> &'static str {
        "qcow"
    }

    fn length(&self) -> u64 {
        self.size
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn children(&self) -> Vec<Child> {
        let mut c = vec![Child::new(ChildRole::File, &self.file)];
        if let Some(b) = self.backing() {
            c.push(Child::new(ChildRole::Backing, &b));
        }
        c
    }

    /// Whole sectors only, as QEMU's qcow_refresh_limits sets.
    fn limits(&self) -> Limits {
        Limits {
            request_alignment: SECTOR as u32,
            ..Limits::default()
        }
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.geo.cluster_size())
    }

    fn encrypted(&self) -> bool {
        self.crypto.is_some()
    }

    fn has_zero_init(&self) -> bool {
        true
    }

    fn backing_file(&self) -> Option<(String, Option<String>)> {
        self.backing_name.clone().map(|n| (n, None))
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let reads = self
            .pieces(offset, buf)
            .map(|(o, p)| self.read_cluster(o, p));
        Ok(IoBuf::join_all(futures::future::try_join_all(reads).await?))
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        let _writing = self.writers.read().await;
        let writes = self
            .pieces(offset, buf)
            .map(|(o, p)| self.write_cluster(o, p, flags));
        // Every piece runs to its end, even when another fails: a cluster
        // dropped halfway would be taken and never pointed at.
        let done = futures::future::join_all(writes).await;
        Ok(IoBuf::join_all(done.into_iter().collect::<Result<_>>()?))
    }

    async fn flush(&self) -> Result<()> {
        self.file.flush().await
    }

    fn can_compress(&self) -> bool {
        true
    }

    async fn write_compressed(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let mut done = Vec::new();
        for (o, p) in self.pieces(offset, buf) {
            done.push(self.write_compressed_cluster(o, p).await?);
        }
        Ok(IoBuf::join_all(done))
    }

    /// One cluster at a time, as QEMU's qcow_co_block_status answers:
    /// unallocated, compressed data, encrypted data (no offset to show),
    /// or data at its place in the file.
    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let entry = self.entry(offset).await?;
        let in_cluster = self.geo.offset_in_cluster(offset);
        let n = (self.geo.cluster_size() - in_cluster).min(len);
        if entry == 0 {
            return Ok(BlockStatus::unallocated(n));
        }
        if !is_plain(entry) {
            return Ok(BlockStatus {
                compressed: true,
                ..BlockStatus::data(n)
            });
        }
        if self.crypto.is_some() {
            return Ok(BlockStatus::data(n));
        }
        Ok(BlockStatus::data_at(
            n,
            Arc::clone(&self.file),
            entry + in_cluster,
        ))
    }

    /// QEMU's qcow cannot resize; its block layer says so in these words.
    async fn truncate(&self, _size: u64, _exact: bool, _prealloc: Preallocation) -> Result<()> {
        Err(Error::unsupported(
            "Image format driver does not support resize",
        ))
    }

    async fn make_empty(&self) -> Result<()> {
        self.empty().await
    }

    fn set_backing(&self, backing: Option<Arc<Node>>) -> Result<()> {
        *self.backing.write().unwrap_or_else(|p| p.into_inner()) = backing;
        Ok(())
    }

    fn can_replace_child(&self, role: ChildRole) -> bool {
        role == ChildRole::Backing
    }

    fn replace_child(&self, role: ChildRole, node: Arc<Node>) -> Result<()> {
        if role != ChildRole::Backing {
            return Err(Error::unsupported(format!(
                "qcow cannot replace its '{}' child while open",
                role.name()
            )));
        }
        self.set_backing(Some(node))
    }

    async fn allocated_size(&self) -> Result<Option<u64>> {
        self.file.driver().allocated_size().await
    }

    async fn close(&self) -> Result<()> {
        if let Some(b) = self.backing() {
            b.close().await?;
        }
        self.file.close().await
    }
}
