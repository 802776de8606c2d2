//! The `vpc` format (Virtual PC's and Hyper-V's VHD; QEMU: block/vpc.c).
//!
//! A fixed image is the disk's bytes followed by a 512-byte footer. A
//! dynamic image starts with a copy of the footer, then a 1 KiB dynamic
//! header, then the block allocation table (BAT: big-endian 32-bit sector
//! numbers, one per block); each allocated block is a sector bitmap and
//! the block's data, and the footer comes last, after the last block.
//!
//! A new block goes where the footer was: its bitmap (all sectors
//! present), the write's bytes and the footer one block further, then a
//! flush, then the BAT entry. Allocations take one lock, and the entry is
//! on disk before any request is sent to the block, so the table never
//! points past the file's end or at a block another entry owns. QEMU's vpc
//! sends no blkdebug events; Strata's sends `read_aio`, `write_aio` and
//! `cluster_alloc`, so tests can hold its requests.

use async_lock::Mutex;
use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use strata_block::driver::Preallocation;
use strata_block::options::{take_bool, take_size, take_str, OptSpec, OptType, Opts};
use strata_block::{
    Backend, BlockStatus, Child, ChildRole, DebugEvent, Driver, DriverClass, Error, IoBuf, Node,
    OpenCtx, Result, WriteFlags,
};

/// The `vpc` driver class.
pub struct VpcClass;

const FOOTER_LEN: usize = 512;
const DYN_HEADER_LEN: usize = 1024;
const SECTOR: u64 = 512;
const COOKIE: &[u8; 8] = b"conectix";
const DYN_COOKIE: &[u8; 8] = b"cxsparse";
const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
/// A block never written: reads as zeroes (Strata, as QEMU, has no
/// parent for differencing images).
const UNALLOCATED: u32 = 0xffff_ffff;
/// The block size of the images QEMU (and so Strata) makes.
const NEW_BLOCK_SIZE: u32 = 2 << 20;
/// VHD timestamps count seconds from 2000-01-01 00:00:00 UTC.
const TIMESTAMP_BASE: u64 = 946_684_800;
const CHS_MAX: (u16, u8, u8) = (65535, 16, 255);
const MAX_GEOMETRY: u64 = 65535 * 16 * 255;
/// 2040 GiB, the largest disk QEMU opens or makes.
const MAX_SECTORS: u64 = 0xff00_0000;
/// The last byte a request may reach (QEMU: BDRV_MAX_LENGTH); offsets in
/// the headers past it fail as QEMU's reads fail.
const READ_MAX: u64 = i64::MAX as u64 & !((1 << 30) - 1);
/// The longest single request QEMU makes (BDRV_REQUEST_MAX_BYTES).
const REQUEST_MAX: u64 = (i32::MAX as u64 >> 9) << 9;

// Footer fields (big endian).
const F_DATA_OFFSET: usize = 16;
const F_TIMESTAMP: usize = 24;
const F_CREATOR_APP: usize = 28;
const F_CURRENT_SIZE: usize = 48;
const F_CYLS: usize = 56;
const F_HEADS: usize = 58;
const F_SECS: usize = 59;
const F_TYPE: usize = 60;
const F_CHECKSUM: usize = 64;
const F_UUID: usize = 68;

// Dynamic header fields (big endian).
const D_DATA_OFFSET: usize = 8;
const D_TABLE_OFFSET: usize = 16;
const D_VERSION: usize = 24;
const D_MAX_ENTRIES: usize = 28;
const D_BLOCK_SIZE: usize = 32;
const D_CHECKSUM: usize = 36;

fn be16(h: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(h[at..at + 2].try_into().expect("2 bytes"))
}

fn be32(h: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(h[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(h: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(h[at..at + 8].try_into().expect("8 bytes"))
}

/// One's complement of the byte sum, the checksum field counted as zero.
fn checksum(h: &[u8], field: usize) -> u32 {
    let sum = h
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |s, (_, &b)| s.wrapping_add(b as u32));
    !sum
}

/// The cylinders, heads and sectors per track the VHD specification gives
/// a disk of `total_sectors` (QEMU: calculate_geometry, with its 255-head
/// override above 127 GiB); it may round the disk down.
fn geometry(total_sectors: u64) -> (u16, u8, u8) {
    let total = total_sectors.min(MAX_GEOMETRY);
    let (heads, secs, cyls_times_heads) = if total >= 65535 * 16 * 63 {
        (16u8, 255u8, (total / 255) as u32)
    } else {
        let mut secs = 17u8;
        let mut cth = (total / 17) as u32;
        // QEMU keeps this in a byte too; anything past 16 moves on below.
        let mut heads = cth.div_ceil(1024) as u8;
        heads = heads.max(4);
        if cth >= heads as u32 * 1024 || heads > 16 {
            secs = 31;
            heads = 16;
            cth = (total / 31) as u32;
        }
        if cth >= heads as u32 * 1024 {
            secs = 63;
            heads = 16;
            cth = (total / 63) as u32;
        }
        (heads, secs, cth)
    };
    ((cyls_times_heads / heads as u32) as u16, heads, secs)
}

fn chs_sectors((c, h, s): (u16, u8, u8)) -> u64 {
    c as u64 * h as u64 * s as u64
}

/// The geometry of a new image of `size` bytes and its sector count (QEMU:
/// calculate_rounded_image_size): the smallest geometry that holds the
/// size, or with `force_size` (or past 127 GiB) the largest geometry and
/// the size as given.
fn rounded_size(size: u64, force_size: bool) -> Result<((u16, u8, u8), u64)> {
    let mut chs = (0, 0, 0);
    if force_size {
        chs = CHS_MAX;
    } else {
        let total = MAX_GEOMETRY.min(size / SECTOR);
        let mut i = 0;
        while total > chs_sectors(chs) {
            chs = geometry(total + i);
            i += 1;
        }
    }
    if chs_sectors(chs) != MAX_GEOMETRY {
        return Ok((chs, chs_sectors(chs)));
    }
    let total = size / SECTOR;
    if total > MAX_SECTORS {
        return Err(Error::msg(
            libc::EFBIG,
            "Disk size is too large, max size is 2040 GiB",
        ));
    }
    Ok((chs, total))
}

/// What a new image is: its size, geometry, subformat and who sized it.
struct NewImage {
    size: u64,
    chs: (u16, u8, u8),
    fixed: bool,
    force_size: bool,
}

impl NewImage {
    /// Checks that `size` has a geometry of its own (QEMU: vpc_co_create).
    fn new(size: u64, fixed: bool, force_size: bool) -> Result<NewImage> {
        let (chs, sectors) = rounded_size(size, force_size)?;
        if size != sectors * SECTOR {
            // qemu-img's sizes are rounded first, so only QMP sees this,
            // without QEMU's hint.
            return Err(Error::invalid(
                "The requested image size cannot be represented in CHS geometry",
            ));
        }
        Ok(NewImage {
            size,
            chs,
            fixed,
            force_size,
        })
    }

    /// The footer QEMU writes: creator `qemu` (sized by geometry) or
    /// `qem2` (by size), Virtual PC 2007's version, a random UUID.
    fn footer(&self) -> Result<[u8; FOOTER_LEN]> {
        let mut f = [0u8; FOOTER_LEN];
        f[..8].copy_from_slice(COOKIE);
        f[8..12].copy_from_slice(&2u32.to_be_bytes());
        f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        let data_offset = if self.fixed {
            u64::MAX
        } else {
            FOOTER_LEN as u64
        };
        f[F_DATA_OFFSET..F_DATA_OFFSET + 8].copy_from_slice(&data_offset.to_be_bytes());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let stamp = now.wrapping_sub(TIMESTAMP_BASE) as u32;
        f[F_TIMESTAMP..F_TIMESTAMP + 4].copy_from_slice(&stamp.to_be_bytes());
        let app = if self.force_size { b"qem2" } else { b"qemu" };
        f[F_CREATOR_APP..F_CREATOR_APP + 4].copy_from_slice(app);
        f[32..34].copy_from_slice(&5u16.to_be_bytes());
        f[34..36].copy_from_slice(&3u16.to_be_bytes());
        f[36..40].copy_from_slice(b"Wi2k");
        f[40..48].copy_from_slice(&self.size.to_be_bytes());
        f[F_CURRENT_SIZE..F_CURRENT_SIZE + 8].copy_from_slice(&self.size.to_be_bytes());
        f[F_CYLS..F_CYLS + 2].copy_from_slice(&self.chs.0.to_be_bytes());
        f[F_HEADS] = self.chs.1;
        f[F_SECS] = self.chs.2;
        let ty = if self.fixed { TYPE_FIXED } else { TYPE_DYNAMIC };
        f[F_TYPE..F_TYPE + 4].copy_from_slice(&ty.to_be_bytes());
        f[F_UUID..F_UUID + 16].copy_from_slice(&super::uuid_v4()?);
        let sum = checksum(&f, F_CHECKSUM);
        f[F_CHECKSUM..F_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
        Ok(f)
    }

    /// A dynamic image's metadata from offset 0: footer, dynamic header,
    /// an empty BAT, the footer again (QEMU: create_dynamic_disk).
    fn dynamic_metadata(&self, footer: &[u8; FOOTER_LEN]) -> IoBuf {
        let entries = (self.size / SECTOR).div_ceil(NEW_BLOCK_SIZE as u64 / SECTOR);
        let bat_len = (entries * 4).next_multiple_of(SECTOR) as usize;
        let table_at = FOOTER_LEN + DYN_HEADER_LEN;
        let mut buf = IoBuf::zeroed(table_at + bat_len + FOOTER_LEN);
        let m = buf.as_mut_slice();
        m[..FOOTER_LEN].copy_from_slice(footer);
        let d = &mut m[FOOTER_LEN..table_at];
        d[..8].copy_from_slice(DYN_COOKIE);
        // All 64 bits set: the specification says 32, Microsoft's tools
        // want 64 (as QEMU notes).
        d[D_DATA_OFFSET..D_DATA_OFFSET + 8].copy_from_slice(&u64::MAX.to_be_bytes());
        d[D_TABLE_OFFSET..D_TABLE_OFFSET + 8].copy_from_slice(&(table_at as u64).to_be_bytes());
        d[D_VERSION..D_VERSION + 4].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        d[D_MAX_ENTRIES..D_MAX_ENTRIES + 4].copy_from_slice(&(entries as u32).to_be_bytes());
        d[D_BLOCK_SIZE..D_BLOCK_SIZE + 4].copy_from_slice(&NEW_BLOCK_SIZE.to_be_bytes());
        let sum = checksum(d, D_CHECKSUM);
        d[D_CHECKSUM..D_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
        m[table_at..table_at + bat_len].fill(0xff);
        m[table_at + bat_len..].copy_from_slice(footer);
        buf
    }

    /// Writes the image through `blk`.
    async fn write_to(&self, blk: &Backend) -> Result<()> {
        let footer = self.footer()?;
        if self.fixed {
            let end = self.size + FOOTER_LEN as u64;
            blk.truncate(end, false, Preallocation::Off).await?;
            blk.write(self.size, IoBuf::from_slice(&footer), WriteFlags::default())
                .await
                .map_err(|e| e.context("Unable to write VHD header"))?;
            return Ok(());
        }
        let meta = self.dynamic_metadata(&footer);
        let len = meta.len() as u64;
        let r = async {
            // A longer file keeps its tail, as QEMU's writes leave it.
            if blk.length() < len {
                blk.truncate(len, false, Preallocation::Off).await?;
            }
            blk.write(0, meta, WriteFlags::default()).await
        };
        r.await
            .map(|_| ())
            .map_err(|e| Error::msg(e.code(), "Unable to create or write VHD header"))
    }
}

/// Writes a new image into the open node `node`: the node's permissions
/// are taken first, then the size is checked (QEMU: vpc_co_create).
async fn format_on(node: &Arc<Node>, size: u64, fixed: bool, force_size: bool) -> Result<()> {
    let blk = super::creating_user(node)?;
    let r = match NewImage::new(size, fixed, force_size) {
        Ok(img) => img.write_to(&blk).await,
        Err(e) => Err(e),
    };
    let c = blk.close().await;
    r.and(c)
}

/// How the disk's size is read from the footer (the `force_size_calc`
/// option; QEMU: vpc_parse_options).
#[derive(Clone, Copy, PartialEq)]
enum SizeCalc {
    Auto,
    Chs,
    CurrentSize,
}

/// The disk's size in sectors: the geometry's for images Virtual PC or
/// an old QEMU made, the footer's size for the others (Hyper-V, Azure,
/// disk2vhd, Xen) and whenever the geometry is the largest there is
/// (QEMU: vpc_open, vpc_ignore_current_size).
fn total_sectors(footer: &[u8], calc: SizeCalc) -> u64 {
    let chs = (be16(footer, F_CYLS), footer[F_HEADS], footer[F_SECS]);
    let by_chs = chs_sectors(chs);
    let app = &footer[F_CREATOR_APP..F_CREATOR_APP + 4];
    let use_chs = app == b"vpc " || app == b"qemu" || calc == SizeCalc::Chs;
    if !use_chs || by_chs == MAX_GEOMETRY || calc == SizeCalc::CurrentSize {
        be64(footer, F_CURRENT_SIZE) / SECTOR
    } else {
        by_chs
    }
}

/// A dynamic image's allocation table and where new blocks go.
struct Dynamic {
    block_size: u32,
    bitmap_size: u32,
    table_offset: u64,
    /// BAT entries in host order (sector of the block's bitmap); an entry
    /// changes only under `alloc`, once it is on disk.
    table: Vec<AtomicU32>,
    /// Blocks whose bitmap this open has set whole: a block written by
    /// another tool may mark sectors absent that a write is about to fill.
    bitmap_full: Vec<AtomicBool>,
    /// Where the next block's bitmap goes, past the table and every block
    /// the table points at (QEMU: free_data_block_offset).
    alloc: Mutex<u64>,
}

/// An open VHD image.
pub struct VpcDriver {
    file: Arc<Node>,
    size: u64,
    /// The footer as it is written after the last block.
    footer: [u8; FOOTER_LEN],
    /// A footer typed fixed: every request goes to the file at its offset
    /// (QEMU decides by the type, not by where the footer was found).
    fixed: bool,
    dynamic: Option<Dynamic>,
}

impl VpcDriver {
    /// Only a fixed footer is ever found at the file's end, so an image
    /// not typed fixed is always a dynamic one.
    fn dynamic(&self) -> &Dynamic {
        self.dynamic.as_ref().expect("a dynamic image")
    }
}

impl Dynamic {
    fn entry(&self, block: u64) -> u32 {
        self.table
            .get(block as usize)
            .map_or(UNALLOCATED, |e| e.load(Ordering::Acquire))
    }

    fn data_offset(&self, entry: u32, in_block: u64) -> u64 {
        entry as u64 * SECTOR + self.bitmap_size as u64 + in_block
    }

    fn bitmap(&self) -> IoBuf {
        IoBuf::filled(self.bitmap_size as usize, 0xff)
    }
}

impl VpcDriver {
    /// Writes `piece` at `in_block` of `block`, allocating the block if it
    /// has none yet.
    async fn write_in_block(
        &self,
        block: u64,
        in_block: u64,
        piece: IoBuf,
        flags: WriteFlags,
    ) -> Result<IoBuf> {
        let d = self.dynamic();
        let entry = d.entry(block);
        if entry != UNALLOCATED {
            return self
                .write_allocated(block, entry, in_block, piece, flags)
                .await;
        }
        let mut next_free = d.alloc.lock().await;
        let entry = d.entry(block);
        if entry != UNALLOCATED {
            // Another request allocated it while this one waited.
            drop(next_free);
            return self
                .write_allocated(block, entry, in_block, piece, flags)
                .await;
        }
        let at = *next_free;
        let new = at / SECTOR;
        if new >= UNALLOCATED as u64 {
            return Err(Error::errno(libc::ENOSPC));
        }
        let new = new as u32;
        // Held here by blkdebug, the block is taken and not yet written.
        self.file.debug_event(DebugEvent::ClusterAlloc).await;
        let end = at + d.bitmap_size as u64 + d.block_size as u64;
        // The old footer lies where the block starts. A bitmap shorter
        // than a sector (blocks under 4 KiB) leaves some of it in the
        // block's data, which QEMU then reads back as the guest's; Strata
        // writes zeroes over what the request does not cover.
        let stale = (FOOTER_LEN as u64 - (d.bitmap_size as u64).min(FOOTER_LEN as u64))
            .min(d.block_size as u64);
        let (data_at, data, kept) = if stale > 0 {
            let len = piece.len() as u64;
            let mut b = IoBuf::zeroed(stale.max(in_block + len) as usize);
            b.as_mut_slice()[in_block as usize..(in_block + len) as usize]
                .copy_from_slice(piece.as_slice());
            (0, b, Some(piece))
        } else {
            (in_block, piece, None)
        };
        let (bitmap, data, footer) = futures::join!(
            self.file.write(at, d.bitmap(), flags),
            self.file.write(d.data_offset(new, data_at), data, flags),
            self.file.write(end, IoBuf::from_slice(&self.footer), flags),
        );
        bitmap?;
        footer?;
        let written = data?;
        let piece = kept.unwrap_or(written);
        // The file's new length on disk before the entry that needs it: an
        // entry past the end makes the image unopenable.
        self.file.flush().await?;
        *next_free = end;
        self.file
            .write(
                d.table_offset + block * 4,
                IoBuf::from_slice(&new.to_be_bytes()),
                flags,
            )
            .await?;
        d.bitmap_full[block as usize].store(true, Ordering::Release);
        d.table[block as usize].store(new, Ordering::Release);
        Ok(piece)
    }

    /// A write into an allocated block; the first one since open marks
    /// every sector of the block present, as QEMU does.
    async fn write_allocated(
        &self,
        block: u64,
        entry: u32,
        in_block: u64,
        piece: IoBuf,
        flags: WriteFlags,
    ) -> Result<IoBuf> {
        let d = self.dynamic();
        if !d.bitmap_full[block as usize].load(Ordering::Acquire) {
            self.file
                .write(entry as u64 * SECTOR, d.bitmap(), flags)
                .await?;
            d.bitmap_full[block as usize].store(true, Ordering::Release);
        }
        self.file.debug_event(DebugEvent::WriteAio).await;
        self.file
            .write(d.data_offset(entry, in_block), piece, flags)
            .await
    }
}

#[async_trait]
impl Driver for VpcDriver {
    fn format_name(&self) -> &'static str {
        "vpc"
    }

    fn length(&self) -> u64 {
        self.size
    }

    fn children(&self) -> Vec<Child> {
        vec![Child::new(ChildRole::File, &self.file)]
    }

    fn limits(&self) -> strata_block::Limits {
        self.file.limits()
    }

    /// A dynamic image's block size; a fixed image has none (QEMU:
    /// vpc_co_get_info).
    fn cluster_size(&self) -> Option<u64> {
        (!self.fixed).then(|| self.dynamic().block_size as u64)
    }

    fn has_zero_init(&self) -> bool {
        !self.fixed || self.file.driver().has_zero_init()
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        if self.fixed {
            self.file.debug_event(DebugEvent::ReadAio).await;
            return self.file.read(offset, buf).await;
        }
        let d = self.dynamic();
        let bs = d.block_size as u64;
        let parts = buf.pieces(offset, |o, left| left.min((bs - o % bs) as usize));
        let reads = parts.map(|(o, piece)| async move {
            let entry = d.entry(o / bs);
            if entry == UNALLOCATED {
                let mut piece = piece;
                piece.as_mut_slice().fill(0);
                return Ok(piece);
            }
            self.file.debug_event(DebugEvent::ReadAio).await;
            self.file.read(d.data_offset(entry, o % bs), piece).await
        });
        Ok(IoBuf::join_all(futures::future::try_join_all(reads).await?))
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        if self.fixed {
            self.file.debug_event(DebugEvent::WriteAio).await;
            return self.file.write(offset, buf, flags).await;
        }
        let bs = self.dynamic().block_size as u64;
        let parts = buf.pieces(offset, |o, left| left.min((bs - o % bs) as usize));
        let writes = parts.map(|(o, piece)| self.write_in_block(o / bs, o % bs, piece, flags));
        // Every piece runs to its end, even when another fails: an
        // allocation dropped halfway would leave a taken block unrecorded.
        let done = futures::future::join_all(writes).await;
        Ok(IoBuf::join_all(done.into_iter().collect::<Result<_>>()?))
    }

    async fn flush(&self) -> Result<()> {
        self.file.flush().await
    }

    /// A fixed image is the file's data; in a dynamic one, runs of
    /// unallocated blocks read as zeroes and an allocated block is data
    /// in the file, up to its end (QEMU: vpc_co_block_status).
    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        if self.fixed {
            return Ok(BlockStatus {
                recurse: true,
                ..BlockStatus::data_at(len, Arc::clone(&self.file), offset)
            });
        }
        let d = self.dynamic();
        let bs = d.block_size as u64;
        let block = offset / bs;
        let in_block = offset % bs;
        let entry = d.entry(block);
        let mut n = (bs - in_block).min(len);
        if entry != UNALLOCATED {
            return Ok(BlockStatus::data_at(
                n,
                Arc::clone(&self.file),
                d.data_offset(entry, in_block),
            ));
        }
        let mut b = block + 1;
        while n < len && d.entry(b) == UNALLOCATED {
            n = (n + bs).min(len);
            b += 1;
        }
        Ok(BlockStatus::zero(n))
    }

    /// QEMU's vpc cannot resize; its block layer says so in these words.
    async fn truncate(&self, _size: u64, _exact: bool, _prealloc: Preallocation) -> Result<()> {
        Err(Error::unsupported(
            "Image format driver does not support resize",
        ))
    }

    async fn allocated_size(&self) -> Result<Option<u64>> {
        self.file.driver().allocated_size().await
    }

    async fn close(&self) -> Result<()> {
        self.file.close().await
    }
}

/// Reads `len` bytes at `offset` of `file`, failing as QEMU's read fails
/// for offsets no request may reach.
async fn read_at(file: &Arc<Node>, offset: u64, len: usize, what: &str) -> Result<IoBuf> {
    if offset > READ_MAX || len as u64 > READ_MAX - offset || len as u64 > REQUEST_MAX {
        return Err(Error::msg(libc::EIO, what));
    }
    file.read(offset, IoBuf::zeroed(len))
        .await
        .map_err(|e| Error::msg(e.code(), what))
}

/// Finds the footer: at the start of a dynamic image (true), at the end of
/// a fixed one; checks its checksum (QEMU: vpc_open).
async fn read_footer(file: &Arc<Node>) -> Result<([u8; FOOTER_LEN], bool)> {
    let f = read_at(file, 0, FOOTER_LEN, "Unable to read VHD header").await?;
    let mut footer: [u8; FOOTER_LEN] = f.as_slice().try_into().expect("footer length");
    let at_start = &footer[..8] == COOKIE;
    if !at_start {
        let len = file.length();
        if len < FOOTER_LEN as u64 {
            return Err(Error::invalid("File too small for a VHD header"));
        }
        let f = file
            .read(len - FOOTER_LEN as u64, IoBuf::zeroed(FOOTER_LEN))
            .await?;
        footer = f.as_slice().try_into().expect("footer length");
        if &footer[..8] != COOKIE || be32(&footer, F_TYPE) != TYPE_FIXED {
            return Err(Error::invalid("invalid VPC image"));
        }
    }
    if checksum(&footer, F_CHECKSUM) != be32(&footer, F_CHECKSUM) {
        return Err(Error::invalid("Incorrect header checksum"));
    }
    Ok((footer, at_start))
}

/// Reads and checks a dynamic image's header and table, in QEMU's order
/// and words. The table is read only if it lies inside the file, so a
/// header cannot make Strata allocate more than the file holds.
async fn open_dynamic(file: &Arc<Node>, footer: &[u8], sectors: u64) -> Result<Dynamic> {
    let h = read_at(
        file,
        be64(footer, F_DATA_OFFSET),
        DYN_HEADER_LEN,
        "Error reading dynamic VHD header",
    )
    .await?;
    let h = h.as_slice();
    if &h[..8] != DYN_COOKIE {
        return Err(Error::invalid("Invalid header magic"));
    }
    let block_size = be32(h, D_BLOCK_SIZE);
    if !block_size.is_power_of_two() || (block_size as u64) < SECTOR {
        return Err(Error::invalid(format!("Invalid block size {block_size}")));
    }
    let bitmap_size = ((block_size / (8 * 512)) + 511) & !511;
    // An int in QEMU: a huge count is negative there, and said so.
    let entries = be32(h, D_MAX_ENTRIES) as i32;
    if sectors * SECTOR / block_size as u64 > 0xffff_ffff {
        return Err(Error::invalid("Too many blocks"));
    }
    if (entries as i64 as u64).wrapping_mul(block_size as u64) < sectors * SECTOR {
        return Err(Error::invalid("Page table too small"));
    }
    if !(0..=i32::MAX / 4).contains(&entries) {
        return Err(Error::invalid(format!(
            "Max Table Entries too large ({entries})"
        )));
    }
    let table_len = entries as u64 * 4;
    let table_offset = be64(h, D_TABLE_OFFSET);
    if table_offset > READ_MAX || table_len > READ_MAX - table_offset || table_len > REQUEST_MAX {
        return Err(Error::msg(libc::EIO, "Error reading pagetable"));
    }
    let truncated = || {
        Error::invalid(
            "block-vpc: free_data_block_offset points after the end of file. \
             The image has been truncated.",
        )
    };
    let file_len = file.length();
    if table_offset + table_len > file_len {
        return Err(truncated());
    }
    let raw = read_at(
        file,
        table_offset,
        table_len as usize,
        "Error reading pagetable",
    )
    .await?;
    let table: Vec<AtomicU32> = raw
        .as_slice()
        .chunks_exact(4)
        .map(|e| AtomicU32::new(u32::from_be_bytes(e.try_into().expect("4 bytes"))))
        .collect();
    let mut next_free = (table_offset + table_len).next_multiple_of(SECTOR);
    for e in &table {
        let e = e.load(Ordering::Relaxed);
        if e != UNALLOCATED {
            next_free = next_free.max(e as u64 * SECTOR + bitmap_size as u64 + block_size as u64);
        }
    }
    if next_free > file_len {
        return Err(truncated());
    }
    Ok(Dynamic {
        block_size,
        bitmap_size,
        table_offset,
        bitmap_full: table.iter().map(|_| AtomicBool::new(false)).collect(),
        table,
        alloc: Mutex::new(next_free),
    })
}

/// The creation options, in QEMU's order (`Formatting` shows them so).
const CREATE_OPTIONS: &[OptSpec] = &[
    crate::protocols::file::CREATE_OPTIONS[0],
    OptSpec {
        name: "subformat",
        ty: OptType::Str,
        help: "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} ",
        default: None,
    },
    OptSpec {
        name: "force_size",
        ty: OptType::Bool,
        help: "Force disk size calculation to use the actual size specified, rather than using the nearest CHS-based calculation",
        default: None,
    },
];

/// `subformat`, as QAPI's BlockdevVpcSubformat takes it: fixed or not.
fn is_fixed(subformat: Option<&str>) -> Result<bool> {
    match subformat {
        None | Some("dynamic") => Ok(false),
        Some("fixed") => Ok(true),
        Some(other) => Err(Error::invalid(format!(
            "Parameter 'subformat' does not accept value '{other}'"
        ))),
    }
}

#[async_trait]
impl DriverClass for VpcClass {
    fn name(&self) -> &'static str {
        "vpc"
    }

    /// Only a dynamic image starts with the footer; a fixed one probes as
    /// raw, in QEMU too.
    fn probe(&self, header: &[u8], _filename: &str) -> u32 {
        if header.starts_with(COOKIE) {
            100
        } else {
            0
        }
    }

    fn strong_options(&self) -> &'static [&'static str] {
        &["force_size_calc"]
    }

    fn create_options(&self) -> &'static [OptSpec] {
        CREATE_OPTIONS
    }

    /// The file first, with the protocol's options, then the subformat and
    /// a size grown to a whole geometry (QEMU: vpc_co_create_opts, whose
    /// errors come after the file is made).
    async fn create(&self, ctx: &OpenCtx, filename: &str, mut opts: Opts) -> Result<()> {
        let size = take_size(&mut opts, "size")?.unwrap_or(0);
        let subformat = take_str(&mut opts, "subformat")?;
        let force_size = take_bool(&mut opts, "force_size")?.unwrap_or(false);
        let file = super::create_and_open_file(ctx, filename, opts).await?;
        let r = async {
            let fixed = is_fixed(subformat.as_deref())?;
            let size = size.next_multiple_of(SECTOR);
            let size = if force_size {
                size
            } else {
                rounded_size(size, false)?.1 * SECTOR
            };
            format_on(&file, size, fixed, force_size).await
        }
        .await;
        super::finish_created(file, r).await
    }

    fn can_blockdev_create(&self) -> bool {
        true
    }

    /// BlockdevCreateOptionsVpc: the size as given must have a geometry,
    /// unless `force-size` (QEMU: vpc_co_create).
    async fn blockdev_create(&self, ctx: &OpenCtx, mut opts: Opts) -> Result<()> {
        let size = take_size(&mut opts, "size")?.unwrap_or(0);
        let fixed = is_fixed(take_str(&mut opts, "subformat")?.as_deref())?;
        let force_size = take_bool(&mut opts, "force-size")?.unwrap_or(false);
        let file = ctx
            .open_blockdev_ref(opts.remove("file").unwrap_or_default())
            .await?;
        let r = format_on(&file, size, fixed, force_size).await;
        let _ = file.close().await;
        r
    }

    async fn open(&self, ctx: &OpenCtx, opts: &mut Opts) -> Result<Box<dyn Driver>> {
        let calc = match take_str(opts, "force_size_calc")?.as_deref() {
            None => SizeCalc::Auto,
            Some("current_size") => SizeCalc::CurrentSize,
            Some("chs") => SizeCalc::Chs,
            Some(other) => {
                return Err(Error::invalid(format!(
                    "Invalid size calculation mode: '{other}'"
                )))
            }
        };
        let file = ctx.file()?;
        let (footer, at_start) = read_footer(&file).await?;
        let sectors = total_sectors(&footer, calc);
        if sectors > MAX_SECTORS {
            // QEMU's error without a message: its block layer names the
            // file, and qemu-img names it again.
            let name = format!("Could not open '{}'", file.filename());
            return Err(Error::errno(libc::EFBIG).context(name));
        }
        let dynamic = if at_start {
            Some(open_dynamic(&file, &footer, sectors).await?)
        } else {
            None
        };
        Ok(Box::new(VpcDriver {
            file,
            size: sectors * SECTOR,
            footer,
            fixed: be32(&footer, F_TYPE) == TYPE_FIXED,
            dynamic,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_rounds_up_as_qemu() {
        // 10 MiB becomes 20536 sectors, as qemu-img's 10514432 bytes.
        assert_eq!(rounded_size(10 << 20, false).unwrap().1, 20536);
        assert_eq!(rounded_size(0, false).unwrap(), ((0, 0, 0), 0));
        // Past 127 GiB the size stands as given, to 2040 GiB.
        let (chs, n) = rounded_size(200 << 30, false).unwrap();
        assert_eq!((chs, n), (CHS_MAX, (200u64 << 30) / 512));
        let e = rounded_size(3000 << 30, false).unwrap_err();
        assert_eq!(e.code(), libc::EFBIG);
    }

    #[test]
    fn footer_checksums_and_sizes() {
        let img = NewImage::new(20536 * 512, false, false).unwrap();
        let f = img.footer().unwrap();
        assert_eq!(checksum(&f, F_CHECKSUM), be32(&f, F_CHECKSUM));
        assert_eq!(total_sectors(&f, SizeCalc::Auto), 20536);
        let m = img.dynamic_metadata(&f);
        assert_eq!(m.len(), 2560);
        assert!(NewImage::new(10 << 20, false, false).is_err());
        assert!(NewImage::new(10 << 20, false, true).is_ok());
    }
}
