//! The `vdi` format (VirtualBox's disk image; QEMU: block/vdi.c): a 512-byte
//! header, a block map of little-endian 32-bit entries (one per 1 MiB block
//! of the disk: the block's index in the data area, or unallocated), then
//! the data blocks in the order they were first written.
//!
//! A block is allocated whole: the write's bytes and zeroes around them go
//! to the end of the data area first, then the header's count, flushed,
//! then the block map's sector. Allocations take one lock, so a block's data is on
//! the file before any request (or the map on disk) points at it. QEMU's
//! vdi sends no blkdebug events; Strata's sends `read_aio`, `write_aio`
//! and `cluster_alloc`, so tests can hold its requests.

use async_lock::Mutex;
use async_trait::async_trait;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use strata_block::driver::{CheckResult, Preallocation, RepairMode};
use strata_block::options::{take_bool, take_size, take_str, OptSpec, OptType, Opts};
use strata_block::{
    stderr_line, BlockStatus, Child, ChildRole, DebugEvent, Driver, DriverClass, Error, IoBuf,
    Node, OpenCtx, Result, WriteFlags,
};

/// The `vdi` driver class.
pub struct VdiClass;

const SIGNATURE: u32 = 0xbeda_107f;
const VERSION_1_1: u32 = 0x0001_0001;
const TYPE_DYNAMIC: u32 = 1;
const TYPE_STATIC: u32 = 2;
/// What QEMU writes into the header's text field.
const TEXT: &[u8] = b"<<< QEMU VM Virtual Disk Image >>>\n";
/// A block never written: reads as zeroes (there is no backing file).
const UNALLOCATED: u32 = 0xffff_ffff;
/// A block given back: reads as zeroes too.
const DISCARDED: u32 = 0xffff_fffe;
const SECTOR: u64 = 512;
const HEADER_LEN: usize = 512;
/// The only block size QEMU (and so Strata) opens or makes.
const BLOCK: u64 = 1 << 20;
/// QEMU's limit: the block map must fit in an int's worth of bytes.
const BLOCKS_MAX: u32 = (i32::MAX as u32 + 1 - SECTOR as u32) / 4;
const DISK_SIZE_MAX: u64 = BLOCKS_MAX as u64 * BLOCK;

// Header field offsets (QEMU: VdiHeader, packed, little endian).
const OFF_SIGNATURE: usize = 0x40;
const OFF_VERSION: usize = 0x44;
const OFF_HEADER_SIZE: usize = 0x48;
const OFF_IMAGE_TYPE: usize = 0x4c;
const OFF_BMAP: usize = 0x154;
const OFF_DATA: usize = 0x158;
const OFF_SECTOR_SIZE: usize = 0x168;
const OFF_DISK_SIZE: usize = 0x170;
const OFF_BLOCK_SIZE: usize = 0x178;
const OFF_BLOCKS: usize = 0x180;
const OFF_ALLOCATED: usize = 0x184;
const OFF_UUID_IMAGE: usize = 0x188;
const OFF_UUID_LAST_SNAP: usize = 0x198;
const OFF_UUID_LINK: usize = 0x1a8;
const OFF_UUID_PARENT: usize = 0x1b8;

fn le32(h: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(h[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(h: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(h[at..at + 8].try_into().expect("8 bytes"))
}

fn put32(h: &mut [u8], at: usize, v: u32) {
    h[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(h: &mut [u8], at: usize, v: u64) {
    h[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn is_allocated(entry: u32) -> bool {
    entry < DISCARDED
}

/// The block map's length in the file: whole sectors.
fn bmap_bytes(blocks: u32) -> u64 {
    (blocks as u64 * 4).next_multiple_of(SECTOR)
}

/// A random version 4 UUID as VDI stores it: the first three fields
/// little endian (QEMU: qemu_uuid_generate, then qemu_uuid_bswap).
fn uuid_v4() -> Result<[u8; 16]> {
    let mut u = super::uuid_v4()?;
    u[0..4].reverse();
    u[4..6].reverse();
    u[6..8].reverse();
    Ok(u)
}

/// The header and block map of a new image of `size` bytes (QEMU:
/// vdi_co_do_create); a static image has every block allocated in order.
fn new_metadata(size: u64, is_static: bool) -> Result<IoBuf> {
    check_size(size)?;
    let blocks = size.div_ceil(BLOCK) as u32;
    let bmap_len = bmap_bytes(blocks);
    let mut buf = IoBuf::zeroed(HEADER_LEN + bmap_len as usize);
    let m = buf.as_mut_slice();
    let h = &mut m[..HEADER_LEN];
    h[..TEXT.len()].copy_from_slice(TEXT);
    put32(h, OFF_SIGNATURE, SIGNATURE);
    put32(h, OFF_VERSION, VERSION_1_1);
    put32(h, OFF_HEADER_SIZE, 0x180);
    let ty = if is_static { TYPE_STATIC } else { TYPE_DYNAMIC };
    put32(h, OFF_IMAGE_TYPE, ty);
    put32(h, OFF_BMAP, HEADER_LEN as u32);
    put32(h, OFF_DATA, HEADER_LEN as u32 + bmap_len as u32);
    put32(h, OFF_SECTOR_SIZE, SECTOR as u32);
    put64(h, OFF_DISK_SIZE, size);
    put32(h, OFF_BLOCK_SIZE, BLOCK as u32);
    put32(h, OFF_BLOCKS, blocks);
    put32(h, OFF_ALLOCATED, if is_static { blocks } else { 0 });
    h[OFF_UUID_IMAGE..OFF_UUID_IMAGE + 16].copy_from_slice(&uuid_v4()?);
    h[OFF_UUID_LAST_SNAP..OFF_UUID_LAST_SNAP + 16].copy_from_slice(&uuid_v4()?);
    for (i, e) in m[HEADER_LEN..]
        .chunks_exact_mut(4)
        .take(blocks as usize)
        .enumerate()
    {
        let v = if is_static { i as u32 } else { UNALLOCATED };
        e.copy_from_slice(&v.to_le_bytes());
    }
    Ok(buf)
}

/// The largest disk VDI's map can describe (QEMU: VDI_DISK_SIZE_MAX).
fn check_size(size: u64) -> Result<()> {
    if size > DISK_SIZE_MAX {
        return Err(Error::unsupported(format!(
            "Unsupported VDI image size (size is 0x{size:x}, max supported is 0x{DISK_SIZE_MAX:x})"
        )));
    }
    Ok(())
}

/// Writes a new image of `size` bytes into the open node `node`.
async fn format_on(node: &Arc<Node>, size: u64, is_static: bool) -> Result<()> {
    let meta = new_metadata(size, is_static)?;
    let blk = super::creating_user(node)?;
    let r = async {
        let end = meta.len() as u64;
        // The file may be longer already; only a shorter one grows.
        blk.truncate(end, false, Preallocation::Off).await?;
        blk.write(0, meta, WriteFlags::default())
            .await
            .map_err(|e| Error::msg(e.code(), "Error writing header"))?;
        if is_static {
            let blocks = size.div_ceil(BLOCK);
            blk.truncate(end + blocks * BLOCK, false, Preallocation::Off)
                .await
                .map_err(|e| e.context("Failed to statically allocate file"))?;
        }
        Ok(())
    }
    .await;
    let c = blk.close().await;
    r.and(c)
}

/// What the allocator owns: the header as it goes to disk, and the next
/// free block.
struct Alloc {
    header: [u8; HEADER_LEN],
    /// Past every block the map points at, and at least the header's
    /// count: a header that undercounts (a crash, a hostile image) never
    /// makes two disk blocks share one data block, as QEMU's count would.
    next_free: u64,
}

/// An open VDI image.
pub struct VdiDriver {
    file: Arc<Node>,
    size: u64,
    is_static: bool,
    offset_bmap: u64,
    offset_data: u64,
    blocks_in_image: u32,
    /// The block map, entries in host order; an entry changes only under
    /// `alloc`, after its block's data is on the file.
    bmap: Vec<AtomicU32>,
    alloc: Mutex<Alloc>,
}

impl VdiDriver {
    fn entry(&self, block: u64) -> u32 {
        self.bmap
            .get(block as usize)
            .map_or(UNALLOCATED, |e| e.load(Ordering::Acquire))
    }

    fn host_offset(&self, entry: u32, in_block: u64) -> u64 {
        self.offset_data + entry as u64 * BLOCK + in_block
    }

    /// The 512-byte sector of the block map that holds `block`'s entry.
    fn bmap_sector(&self, block: u64) -> (u64, IoBuf) {
        let first = (block / (SECTOR / 4)) * (SECTOR / 4);
        let mut sector = IoBuf::filled(SECTOR as usize, 0);
        for (i, out) in sector.as_mut_slice().chunks_exact_mut(4).enumerate() {
            if let Some(e) = self.bmap.get(first as usize + i) {
                out.copy_from_slice(&e.load(Ordering::Acquire).to_le_bytes());
            }
        }
        (self.offset_bmap + first * 4, sector)
    }

    /// Writes `piece` at `in_block` of `block`, allocating the block if it
    /// has none yet.
    async fn write_in_block(
        &self,
        block: u64,
        in_block: u64,
        piece: IoBuf,
        flags: WriteFlags,
    ) -> Result<IoBuf> {
        let entry = self.entry(block);
        if is_allocated(entry) {
            self.file.debug_event(DebugEvent::WriteAio).await;
            return self
                .file
                .write(self.host_offset(entry, in_block), piece, flags)
                .await;
        }
        let mut a = self.alloc.lock().await;
        let entry = self.entry(block);
        if is_allocated(entry) {
            // Another request allocated it while this one waited.
            drop(a);
            self.file.debug_event(DebugEvent::WriteAio).await;
            return self
                .file
                .write(self.host_offset(entry, in_block), piece, flags)
                .await;
        }
        let new = a.next_free;
        if new >= DISCARDED as u64 {
            return Err(Error::errno(libc::ENOSPC));
        }
        let new = new as u32;
        // Held here by blkdebug, the block is taken and not yet written.
        self.file.debug_event(DebugEvent::ClusterAlloc).await;
        let mut data = IoBuf::zeroed(BLOCK as usize);
        let at = in_block as usize;
        data.as_mut_slice()[at..at + piece.len()].copy_from_slice(piece.as_slice());
        self.file
            .write(self.host_offset(new, 0), data, flags)
            .await?;
        // The count first, as QEMU, and on disk before the map's sector
        // (QEMU does not flush): a crash then leaves a block nobody uses,
        // never a count QEMU would hand out a used block by.
        let mut header = a.header;
        let count = le32(&header, OFF_ALLOCATED).wrapping_add(1);
        put32(&mut header, OFF_ALLOCATED, count);
        self.file
            .write(0, IoBuf::from_slice(&header), flags)
            .await?;
        a.header = header;
        self.file.flush().await?;
        a.next_free += 1;
        self.bmap[block as usize].store(new, Ordering::Release);
        let (at, sector) = self.bmap_sector(block);
        self.file.write(at, sector, flags).await?;
        Ok(piece)
    }
}

#[async_trait]
impl Driver for VdiDriver {
    fn format_name(&self) -> &'static str {
        "vdi"
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

    fn cluster_size(&self) -> Option<u64> {
        Some(BLOCK)
    }

    /// A dynamic image's new blocks are zeroes; a static one's are the
    /// file's (QEMU: vdi_has_zero_init).
    fn has_zero_init(&self) -> bool {
        !self.is_static || self.file.driver().has_zero_init()
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let parts = buf.pieces(offset, |o, left| left.min((BLOCK - o % BLOCK) as usize));
        let reads = parts.map(|(o, piece)| async move {
            let entry = self.entry(o / BLOCK);
            if !is_allocated(entry) {
                let mut piece = piece;
                piece.as_mut_slice().fill(0);
                return Ok(piece);
            }
            self.file.debug_event(DebugEvent::ReadAio).await;
            self.file
                .read(self.host_offset(entry, o % BLOCK), piece)
                .await
        });
        Ok(IoBuf::join_all(futures::future::try_join_all(reads).await?))
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        let parts = buf.pieces(offset, |o, left| left.min((BLOCK - o % BLOCK) as usize));
        let writes =
            parts.map(|(o, piece)| self.write_in_block(o / BLOCK, o % BLOCK, piece, flags));
        // Every piece runs to its end, even when another fails: an
        // allocation dropped halfway would leave its map entry unwritten.
        let done = futures::future::join_all(writes).await;
        Ok(IoBuf::join_all(done.into_iter().collect::<Result<_>>()?))
    }

    async fn flush(&self) -> Result<()> {
        self.file.flush().await
    }

    /// Runs of unallocated blocks read as zeroes; an allocated block is
    /// data in the file, whose zeroes a static image's map shows.
    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let block = offset / BLOCK;
        let in_block = offset % BLOCK;
        let entry = self.entry(block);
        let mut n = (BLOCK - in_block).min(len);
        if !is_allocated(entry) {
            let mut b = block + 1;
            while n < len && !is_allocated(self.entry(b)) {
                n = (n + BLOCK).min(len);
                b += 1;
            }
            return Ok(BlockStatus::zero(n));
        }
        Ok(BlockStatus {
            recurse: self.is_static,
            ..BlockStatus::data_at(n, Arc::clone(&self.file), self.host_offset(entry, in_block))
        })
    }

    /// QEMU's vdi cannot resize; its block layer says so in these words.
    async fn truncate(&self, _size: u64, _exact: bool, _prealloc: Preallocation) -> Result<()> {
        Err(Error::unsupported(
            "Image format driver does not support resize",
        ))
    }

    async fn allocated_size(&self) -> Result<Option<u64>> {
        self.file.driver().allocated_size().await
    }

    /// The block map against the header's count (QEMU: vdi_co_check);
    /// there is nothing it repairs.
    async fn check(&self, repair: RepairMode) -> Result<CheckResult> {
        if repair.leaks || repair.errors {
            return Err(Error::errno(libc::ENOTSUP));
        }
        let mut res = CheckResult::default();
        let n = self.blocks_in_image as usize;
        let mut owner = vec![UNALLOCATED; n];
        let mut allocated = 0u32;
        for block in 0..n {
            let entry = self.entry(block as u64);
            if !is_allocated(entry) {
                continue;
            }
            if (entry as usize) < n {
                allocated += 1;
                if !is_allocated(owner[entry as usize]) {
                    owner[entry as usize] = entry;
                } else {
                    stderr_line!(
                        "ERROR: block index {} also used by {entry}",
                        owner[entry as usize]
                    );
                    res.corruptions += 1;
                }
            } else {
                stderr_line!("ERROR: block index {block} too large, is {entry}");
                res.corruptions += 1;
            }
        }
        let count = le32(&self.alloc.lock().await.header, OFF_ALLOCATED);
        if allocated != count {
            stderr_line!("ERROR: allocated blocks mismatch, is {allocated}, should be {count}");
            res.corruptions += 1;
        }
        Ok(res)
    }

    async fn close(&self) -> Result<()> {
        self.file.close().await
    }
}

/// QEMU's checks of a VDI header, in its order and words (vdi_open).
fn validate(h: &[u8]) -> Result<()> {
    let unsupported = |m: String| Err(Error::unsupported(m));
    let disk_size = le64(h, OFF_DISK_SIZE);
    if disk_size > DISK_SIZE_MAX {
        return unsupported(format!(
            "Unsupported VDI image size (size is 0x{disk_size:x}, max supported is 0x{DISK_SIZE_MAX:x})"
        ));
    }
    let disk_size = disk_size.next_multiple_of(SECTOR);
    let (signature, version) = (le32(h, OFF_SIGNATURE), le32(h, OFF_VERSION));
    let (bmap, data) = (le32(h, OFF_BMAP), le32(h, OFF_DATA));
    let (sector, block) = (le32(h, OFF_SECTOR_SIZE), le32(h, OFF_BLOCK_SIZE));
    let blocks = le32(h, OFF_BLOCKS);
    let null_uuid = |at: usize| h[at..at + 16].iter().all(|&b| b == 0);
    if signature != SIGNATURE {
        return Err(Error::invalid(format!(
            "Image not in VDI format (bad signature {signature:08x})"
        )));
    }
    if version != VERSION_1_1 {
        return unsupported(format!(
            "unsupported VDI image (version {}.{})",
            version >> 16,
            version & 0xffff
        ));
    }
    if !(bmap as u64).is_multiple_of(SECTOR) {
        return unsupported(format!(
            "unsupported VDI image (unaligned block map offset 0x{bmap:x})"
        ));
    }
    if !(data as u64).is_multiple_of(SECTOR) {
        return unsupported(format!(
            "unsupported VDI image (unaligned data offset 0x{data:x})"
        ));
    }
    if sector as u64 != SECTOR {
        return unsupported(format!(
            "unsupported VDI image (sector size {sector} is not {SECTOR})"
        ));
    }
    if block as u64 != BLOCK {
        return unsupported(format!(
            "unsupported VDI image (block size {block} is not {BLOCK})"
        ));
    }
    if disk_size > blocks as u64 * BLOCK {
        return unsupported(format!(
            "unsupported VDI image (disk size {disk_size}, image bitmap has room for {})",
            blocks as u64 * BLOCK
        ));
    }
    if !null_uuid(OFF_UUID_LINK) {
        return unsupported("unsupported VDI image (non-NULL link UUID)".into());
    }
    if !null_uuid(OFF_UUID_PARENT) {
        return unsupported("unsupported VDI image (non-NULL parent UUID)".into());
    }
    if blocks > BLOCKS_MAX {
        return unsupported(format!(
            "unsupported VDI image (too many blocks {blocks}, max is {BLOCKS_MAX})"
        ));
    }
    Ok(())
}

/// The creation options, in the order qemu-img prints them.
const CREATE_OPTIONS: &[OptSpec] = &[
    crate::protocols::file::CREATE_OPTIONS[0],
    OptSpec {
        name: "static",
        ty: OptType::Bool,
        help: "VDI static (pre-allocated) image",
        default: Some("off"),
    },
];

/// The size and the kind of image BlockdevCreateOptionsVdi asks for.
fn qapi_create_options(opts: &mut Opts) -> Result<(u64, bool)> {
    let size = take_size(opts, "size")?.unwrap_or(0);
    let is_static = match take_str(opts, "preallocation")?.as_deref() {
        None | Some("off") => false,
        Some("metadata") => true,
        Some(_) => return Err(Error::invalid("Preallocation mode not supported for vdi")),
    };
    Ok((size, is_static))
}

#[async_trait]
impl DriverClass for VdiClass {
    fn name(&self) -> &'static str {
        "vdi"
    }

    fn probe(&self, header: &[u8], _filename: &str) -> u32 {
        if header.len() >= HEADER_LEN && le32(header, OFF_SIGNATURE) == SIGNATURE {
            100
        } else {
            0
        }
    }

    fn create_options(&self) -> &'static [OptSpec] {
        CREATE_OPTIONS
    }

    /// The file with the protocol's own options, then the image in it
    /// (QEMU: vdi_co_create_opts). A size VDI cannot hold is refused
    /// before any file is made.
    async fn create(&self, ctx: &OpenCtx, filename: &str, mut opts: Opts) -> Result<()> {
        let size = take_size(&mut opts, "size")?.unwrap_or(0);
        let is_static = take_bool(&mut opts, "static")?.unwrap_or(false);
        check_size(size)?;
        let file = super::create_and_open_file(ctx, filename, opts).await?;
        let r = format_on(&file, size, is_static).await;
        super::finish_created(file, r).await
    }

    fn can_blockdev_create(&self) -> bool {
        true
    }

    /// The mode, refused before the answer as QEMU's vdi_co_do_create
    /// refuses it; its other errors leave through a path that yields, so
    /// they come after the answer.
    fn blockdev_create_check(&self, opts: &Opts) -> Result<()> {
        qapi_create_options(&mut opts.clone()).map(|_| ())
    }

    /// BlockdevCreateOptionsVdi: `preallocation` off makes a dynamic image,
    /// metadata a static one (QEMU: vdi_co_create).
    async fn blockdev_create(&self, ctx: &OpenCtx, mut opts: Opts) -> Result<()> {
        let (size, is_static) = qapi_create_options(&mut opts)?;
        check_size(size)?;
        let file = ctx
            .open_blockdev_ref(opts.remove("file").unwrap_or_default())
            .await?;
        let r = format_on(&file, size, is_static).await;
        let _ = file.close().await;
        r
    }

    async fn open(&self, ctx: &OpenCtx, _opts: &mut Opts) -> Result<Box<dyn Driver>> {
        let file = ctx.file()?;
        // A short file reads as zeroes past its end, as QEMU's checks see it.
        let h = file.read(0, IoBuf::zeroed(HEADER_LEN)).await?;
        let h: [u8; HEADER_LEN] = h.as_slice().try_into().expect("header length");
        validate(&h)?;
        let blocks = le32(&h, OFF_BLOCKS);
        let offset_bmap = le32(&h, OFF_BMAP) as u64;
        let len = bmap_bytes(blocks);
        // The map is read whole; one past the file's end is a damaged
        // header, not a reason to allocate what it says.
        if offset_bmap + len > file.length() {
            return Err(Error::invalid(format!(
                "VDI block map ({len} bytes at 0x{offset_bmap:x}) lies past the end of the file"
            )));
        }
        let raw = file.read(offset_bmap, IoBuf::zeroed(len as usize)).await?;
        let bmap: Vec<AtomicU32> = raw
            .as_slice()
            .chunks_exact(4)
            .take(blocks as usize)
            .map(|e| AtomicU32::new(u32::from_le_bytes(e.try_into().expect("4 bytes"))))
            .collect();
        let past_used = bmap
            .iter()
            .map(|e| e.load(Ordering::Relaxed))
            // Entries past the map's own length are damage that check
            // reports; new blocks do not go after them.
            .filter(|&e| is_allocated(e) && e < blocks)
            .map(|e| e as u64 + 1)
            .max()
            .unwrap_or(0);
        let mut header = h;
        // QEMU writes the size back rounded up to whole sectors.
        let size = le64(&h, OFF_DISK_SIZE).next_multiple_of(SECTOR);
        put64(&mut header, OFF_DISK_SIZE, size);
        Ok(Box::new(VdiDriver {
            file,
            size,
            is_static: le32(&h, OFF_IMAGE_TYPE) == TYPE_STATIC,
            offset_bmap,
            offset_data: le32(&h, OFF_DATA) as u64,
            blocks_in_image: blocks,
            bmap,
            alloc: Mutex::new(Alloc {
                header,
                next_free: past_used.max(le32(&h, OFF_ALLOCATED) as u64),
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_header_is_qemus() {
        let m = new_metadata(3 << 20, false).unwrap();
        let m = m.as_slice();
        assert_eq!(m.len(), 1024);
        validate(&m[..HEADER_LEN]).unwrap();
        assert_eq!(le32(m, OFF_DATA), 1024);
        assert_eq!(le32(m, OFF_BLOCKS), 3);
        assert_eq!(le32(m, HEADER_LEN), UNALLOCATED);
        assert_eq!(le32(m, HEADER_LEN + 12), 0, "past the last block: zero");
        let s = new_metadata(3 << 20, true).unwrap();
        let s = s.as_slice();
        assert_eq!(le32(s, OFF_ALLOCATED), 3);
        assert_eq!(le32(s, HEADER_LEN + 8), 2);
        // Version 4, variant 1, after the byte swap of the first fields.
        assert_eq!(m[OFF_UUID_IMAGE + 7] >> 4, 4);
        assert_eq!(m[OFF_UUID_IMAGE + 8] >> 6, 2);
    }

    #[test]
    fn too_large_is_refused() {
        let e = new_metadata(DISK_SIZE_MAX + 1, false).unwrap_err();
        assert!(e.to_string().contains("Unsupported VDI image size"), "{e}");
    }
}
