//! The `raw` format: the image is the bytes of its file, optionally a window
//! of it (`offset`, `size`).

use async_trait::async_trait;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use strata_block::driver::Preallocation;
use strata_block::options::{take_size, OptSpec};
use strata_block::Registry;
use strata_block::{
    BlockStatus, Child, ChildRole, DebugEvent, Driver, DriverClass, Error, IoBuf, Measure, Node,
    OpenCtx, Opts, Result, WriteFlags,
};
use strata_block::{ChildCell, Perm};

/// What probing reads of an image, and so what raw guards when probed.
const SECTOR: u64 = 512;

/// The `raw` driver class.
pub struct RawClass;

/// An open raw image.
pub struct RawDriver {
    file: ChildCell,
    /// Set when the format was guessed: a write must not turn the first
    /// sector into another format's header (a guest could otherwise make
    /// the host open, say, a backing file of its choice next time).
    guard_first_sector: Option<Arc<Registry>>,
    /// Where the disk starts in the file; a reopen moves it, drained.
    offset: AtomicU64,
    /// Fixed size when `size` was given (else `WHOLE`: the file's length
    /// minus `offset`); a reopen changes it, drained.
    size: AtomicU64,
    /// Opened as the whole file: raw is then a filter of it, and stays one
    /// for its permissions when a reopen gives it a window (QEMU fixes the
    /// child's role at open).
    filter: bool,
}

/// `size` when the disk is the rest of the file.
const WHOLE: u64 = u64::MAX;

/// The window the `offset` and `size` options cut from a file of `flen`
/// bytes, checked as QEMU's raw_apply_options checks it at open and reopen.
fn window_of(opts: &mut Opts, flen: u64) -> Result<(u64, Option<u64>)> {
    let offset = take_size(opts, "offset")?.unwrap_or(0);
    let size = take_size(opts, "size")?;
    if offset > flen {
        return Err(Error::invalid(format!(
            "Offset ({offset}) cannot be greater than size of the containing file ({flen})"
        )));
    }
    if let Some(size) = size {
        if flen - offset < size {
            return Err(Error::invalid(format!(
                "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the  actual size of the containing file ({flen})"
            )));
        }
        if size % SECTOR != 0 {
            return Err(Error::invalid(format!(
                "Specified size is not multiple of {SECTOR}"
            )));
        }
    }
    Ok((offset, size))
}

impl RawDriver {
    fn offset(&self) -> u64 {
        self.offset.load(Ordering::Relaxed)
    }

    fn fixed_size(&self) -> Option<u64> {
        Some(self.size.load(Ordering::Relaxed)).filter(|&s| s != WHOLE)
    }
}

#[async_trait]
impl Driver for RawDriver {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn length(&self) -> u64 {
        self.fixed_size()
            .unwrap_or_else(|| self.file.get().length().saturating_sub(self.offset()))
    }

    fn zeroes_may_unmap(&self) -> bool {
        self.file.get().driver().zeroes_may_unmap()
    }

    /// QEMU's raw answers get_info with its file's answer.
    fn has_info(&self) -> bool {
        self.file.get().driver().has_info()
    }

    fn children(&self) -> Vec<Child> {
        vec![Child {
            role: ChildRole::File,
            node: self.file.get(),
        }]
    }

    fn child_cell(&self, role: ChildRole) -> Option<&ChildCell> {
        (role == ChildRole::File).then_some(&self.file)
    }

    fn child_perm(&self, _node: &Node, _role: ChildRole, perm: Perm, shared: Perm) -> (Perm, Perm) {
        if self.filter {
            // The whole file: raw is a filter of it.
            return (perm, shared);
        }
        // A window of the file: what the users take, and nobody may resize it.
        (perm, Perm(shared.0 & !Perm::RESIZE.0))
    }

    /// The file's; a probed image is accessed in whole sectors, which
    /// makes guarding its first sector simple (QEMU's rule).
    fn limits(&self) -> strata_block::Limits {
        let mut l = self.file.get().limits();
        if self.guard_first_sector.is_some() {
            l.request_alignment = l.request_alignment.max(512);
        }
        l
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.file.get().debug_event(DebugEvent::ReadAio).await;
        self.file.get().read(self.offset() + offset, buf).await
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        if let Some(reg) = &self.guard_first_sector {
            if offset < SECTOR && !buf.is_empty() {
                // The first sector as it would be after this write.
                let mut sector = self
                    .file
                    .get()
                    .read(self.offset(), IoBuf::zeroed(SECTOR as usize))
                    .await?;
                let n = (SECTOR - offset).min(buf.len() as u64) as usize;
                sector.as_mut_slice()[offset as usize..offset as usize + n]
                    .copy_from_slice(&buf.as_slice()[..n]);
                if OpenCtx::probe_formats(reg, sector.as_slice()) {
                    return Err(Error::errno(libc::EPERM));
                }
            }
        }
        self.file.get().debug_event(DebugEvent::WriteAio).await;
        self.file
            .get()
            .write(self.offset() + offset, buf, flags)
            .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        self.file
            .get()
            .write_zeroes(self.offset() + offset, len, flags)
            .await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.file.get().discard(self.offset() + offset, len).await
    }

    async fn flush(&self) -> Result<()> {
        self.file.get().flush().await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus {
            raw: true,
            ..BlockStatus::data_at(len, self.file.get(), self.offset() + offset)
        })
    }

    async fn truncate(&self, size: u64, exact: bool, prealloc: Preallocation) -> Result<()> {
        // As QEMU: a fixed size stays fixed; an offset moves the file's end.
        if self.fixed_size().is_some() {
            return Err(Error::unsupported("Cannot resize fixed-size raw disks"));
        }
        let end = size
            .checked_add(self.offset())
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or_else(|| Error::invalid("Disk size too large for the chosen offset"))?;
        self.file.get().truncate(end, exact, prealloc).await
    }

    async fn allocated_size(&self) -> Result<Option<u64>> {
        self.file.get().driver().allocated_size().await
    }

    fn reopen_takes(&self) -> &'static [&'static str] {
        &["offset", "size"]
    }

    fn reopen_check(&self, opts: &Opts) -> Result<()> {
        window_of(&mut opts.clone(), self.file.get().length()).map(|_| ())
    }

    async fn reopen_options(&self, opts: &Opts) -> Result<()> {
        let (offset, size) = window_of(&mut opts.clone(), self.file.get().length())?;
        self.offset.store(offset, Ordering::Relaxed);
        self.size.store(size.unwrap_or(WHOLE), Ordering::Relaxed);
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.file.get().close().await
    }
}

#[async_trait]
impl DriverClass for RawClass {
    fn name(&self) -> &'static str {
        "raw"
    }

    fn probe(&self, _header: &[u8], _filename: &str) -> u32 {
        1
    }

    fn strong_options(&self) -> &'static [&'static str] {
        &["offset", "size"]
    }

    fn create_options(&self) -> &'static [OptSpec] {
        // Only the size is raw's own; the rest comes from the protocol.
        &crate::protocols::file::CREATE_OPTIONS[..1]
    }

    async fn create(&self, ctx: &OpenCtx, filename: &str, opts: Opts) -> Result<()> {
        ctx.create_file(filename, opts).await
    }

    /// Every byte of the disk is a byte of the file (QEMU: raw_measure).
    async fn measure(&self, mut opts: Opts, input: Option<&Arc<Node>>) -> Result<Measure> {
        let required = match input {
            Some(n) => n.length(),
            None => take_size(&mut opts, "size")?
                .unwrap_or(0)
                .next_multiple_of(512),
        };
        Ok(Measure {
            required,
            fully_allocated: required,
            bitmaps: None,
        })
    }

    async fn open(&self, ctx: &OpenCtx, opts: &mut Opts) -> Result<Box<dyn Driver>> {
        let file = ctx.file()?;
        let (offset, size) = window_of(opts, file.length())?;
        let guard_first_sector = ctx.probed().then(|| Arc::clone(&ctx.registry));
        Ok(Box::new(RawDriver {
            file: ChildCell::new(file),
            guard_first_sector,
            offset: AtomicU64::new(offset),
            size: AtomicU64::new(size.unwrap_or(WHOLE)),
            filter: offset == 0 && size.is_none(),
        }))
    }
}
