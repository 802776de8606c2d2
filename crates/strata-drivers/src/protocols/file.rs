//! The `file` protocol: a regular file or a block device on the host.
//!
//! Reads past the end of the file see zeroes and writes past it grow the file
//! (formats allocate at the end). Discard punches holes, write-zeroes uses
//! fallocate, block status uses SEEK_DATA/SEEK_HOLE, and O_DIRECT probes the
//! alignment it needs.

use super::lock;
use async_trait::async_trait;
use std::ffi::CString;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use strata_block::driver::Preallocation;
use strata_block::engine::{self, Aio, Fd, FileOp, InlineWrites};
use strata_block::options::{take_bool, take_size, take_str, OptSpec, OptType};
use strata_block::{
    BlockStatus, Driver, DriverClass, Error, IoBuf, Limits, OpenCtx, Opts, Result, WriteFlags,
};

/// The `file`, `host_device` and `host_cdrom` driver classes: one
/// implementation, told apart by what they accept (a regular file, or a
/// block or character device) and whether the medium can change size.
pub struct FileClass {
    name: &'static str,
    device: bool,
}

impl FileClass {
    /// `file`: a regular file.
    pub const FILE: FileClass = FileClass {
        name: "file",
        device: false,
    };
    /// `host_device`: a block or character device.
    pub const HOST_DEVICE: FileClass = FileClass {
        name: "host_device",
        device: true,
    };
    /// `host_cdrom`: a device whose medium may change, and its size with it.
    pub const HOST_CDROM: FileClass = FileClass {
        name: "host_cdrom",
        device: true,
    };
}

/// Creation options of the file protocol, as `-o help` lists them.
pub const CREATE_OPTIONS: &[OptSpec] = &[
    OptSpec {
        name: "size",
        ty: OptType::Size,
        help: "Virtual disk size",
        default: None,
    },
    OptSpec {
        name: "nocow",
        ty: OptType::Bool,
        help: "Turn off copy-on-write (valid only on btrfs)",
        default: None,
    },
    OptSpec {
        name: "preallocation",
        ty: OptType::Str,
        help: "Preallocation mode (allowed values: off, falloc, full)",
        default: None,
    },
    OptSpec {
        name: "extent_size_hint",
        ty: OptType::Size,
        help: "Extent size hint for the image file, 0 to disable",
        default: None,
    },
];

/// How the discards that reached the file went (QEMU: BlockStatsSpecificFile).
#[derive(Default)]
struct DiscardStats {
    nb_ok: AtomicU64,
    nb_failed: AtomicU64,
    bytes_ok: AtomicU64,
}

impl DiscardStats {
    fn account(&self, bytes: u64, ok: bool) {
        if ok {
            self.nb_ok.fetch_add(1, Ordering::Relaxed);
            self.bytes_ok.fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.nb_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert(
            "discard-nb-ok".into(),
            self.nb_ok.load(Ordering::Relaxed).into(),
        );
        m.insert(
            "discard-nb-failed".into(),
            self.nb_failed.load(Ordering::Relaxed).into(),
        );
        m.insert(
            "discard-bytes-ok".into(),
            self.bytes_ok.load(Ordering::Relaxed).into(),
        );
        m
    }
}

/// An open file.
pub struct FileDriver {
    fd: Arc<Fd>,
    /// The name as given, for lock error hints; None when locking is off.
    lock_name: Option<String>,
    /// The first lock (at open) is still to be taken: it waits out a
    /// killed user's requests (see `lock::apply_patiently`).
    first_lock: AtomicBool,
    aio: Aio,
    /// On io_uring: small buffered writes are copied in on the loop's
    /// thread (never while `direct`).
    inline_writes: Option<InlineWrites>,
    length: AtomicU64,
    /// O_DIRECT alignment while `direct`; set again by a reopen.
    limits: std::sync::Mutex<Limits>,
    /// Opened with O_DIRECT (`cache.direct`); a reopen may switch it.
    direct: AtomicBool,
    block_device: bool,
    discard_stats: DiscardStats,
    /// The driver's name (file, host_device, host_cdrom).
    name: &'static str,
    /// The medium may change under us: ask for the length every time
    /// instead of caching it.
    removable: bool,
    /// Opened writable without `cache.no-flush`: closing makes the writes
    /// stable (QEMU's bdrv_close flushes, which `cache=unsafe` and
    /// read-only nodes skip).
    flush_on_close: AtomicBool,
    /// How to open the file again in another mode: its name, the flags
    /// besides the access mode, and whether flushes are skipped.
    path: String,
    extra_flags: std::sync::atomic::AtomicI32,
    no_flush: bool,
    /// The permissions the image lock holds, taken again after a reopen.
    taken: std::sync::Mutex<Option<(strata_block::Perm, strata_block::Perm)>>,
}

fn cstr(path: &str) -> Result<CString> {
    CString::new(path).map_err(|_| Error::invalid(format!("Invalid file name '{path}'")))
}

/// Opens `path`; errors read `Could not {verb} 'path': reason` as QEMU's do.
fn open_fd(path: &str, flags: i32, mode: u32, verb: &str) -> Result<Fd> {
    let c = cstr(path)?;
    // SAFETY: c is a valid NUL-terminated path.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(Error::from(std::io::Error::last_os_error())
            .context(format!("Could not {verb} '{path}'")));
    }
    Ok(Fd::new(fd))
}

fn fstat(fd: RawFd) -> Result<libc::stat> {
    // SAFETY: an all-zero stat is valid; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid out-pointer.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(st)
}

/// The size of whatever `fd` is: BLKGETSIZE64 for block devices, else
/// the end of the file (0 for character devices such as /dev/null).
fn media_size(fd: RawFd) -> Result<u64> {
    let st = fstat(fd)?;
    if st.st_mode & libc::S_IFMT == libc::S_IFBLK {
        return device_size(fd);
    }
    // SAFETY: lseek on an open fd has no memory-safety preconditions.
    let end = unsafe { libc::lseek(fd, 0, libc::SEEK_END) };
    if end < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(end as u64)
}

fn device_size(fd: RawFd) -> Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64.
    if unsafe { libc::ioctl(fd, 0x80081272, &mut size) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(size)
}

/// O_DIRECT alignment on `fd`: (request, memory). The kernel says it where
/// it can (`statx` STATX_DIOALIGN, Linux 6.1+; BLKSSZGET on devices); else
/// trial reads, as QEMU probes.
fn probe_alignment(fd: RawFd, block_device: bool) -> (u32, u32) {
    if let Some(a) = dio_align(fd) {
        return a;
    }
    if block_device {
        let mut ssz: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int.
        if unsafe { libc::ioctl(fd, 0x1268, &mut ssz) } == 0 && ssz > 0 {
            return (ssz as u32, (ssz as u32).max(512));
        }
    }
    let mut buf = IoBuf::zeroed(4096);
    for align in [1u32, 512, 1024, 2048, 4096] {
        // SAFETY: buf has 4096 bytes, at least `align`.
        let r = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), align as usize, 0) };
        if r >= 0 {
            // A 1-byte read proves nothing (a hole, or the end of the file,
            // is read without touching the device): take the safe value, as
            // QEMU does.
            let align = if align == 1 { 4096 } else { align };
            return (align, align.max(512));
        }
    }
    (4096, 4096)
}

/// The O_DIRECT offset and memory alignment the kernel reports for `fd`,
/// if it does (0 means O_DIRECT is not supported there: unknown).
fn dio_align(fd: RawFd) -> Option<(u32, u32)> {
    // SAFETY: an all-zero statx is a valid value to be overwritten.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid empty C string; statx writes one struct.
    let r = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    let (off, mem) = (stx.stx_dio_offset_align, stx.stx_dio_mem_align);
    (off > 0 && mem > 0).then(|| (off, mem.max(512)))
}

/// Whether `fd` is a file on tmpfs, whose reads io_uring cannot do
/// without a kernel worker.
fn on_tmpfs(fd: i32) -> bool {
    // SAFETY: an all-zero statfs is valid; fstatfs fills it in.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: st lives across the call.
    let r = unsafe { libc::fstatfs(fd, &mut st) };
    r == 0 && st.f_type == libc::TMPFS_MAGIC
}

impl FileDriver {
    /// Opens the file again with `mode | extra` and puts the new open file
    /// description under the same descriptor number, so requests keep
    /// naming it; the image locks move with it (QEMU:
    /// raw_reconfigure_getfd). The node is drained.
    fn reopen_as(&self, mode: i32, extra: i32) -> Result<()> {
        let new = open_fd(&self.path, mode | extra, 0, "open")?;
        let taken = *self.taken.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(name), Some((perm, shared))) = (&self.lock_name, taken) {
            lock::apply(
                self.fd.raw(),
                strata_block::Perm::NONE,
                strata_block::Perm::ALL,
                name,
            )?;
            if let Err(e) = lock::apply(new.raw(), perm, shared, name) {
                let _ = lock::apply(self.fd.raw(), perm, shared, name);
                return Err(e);
            }
        }
        // SAFETY: both descriptors are open and owned; dup3 closes the old
        // description in the same step.
        if unsafe { libc::dup3(new.raw(), self.fd.raw(), libc::O_CLOEXEC) } < 0 {
            if let (Some(name), Some((perm, shared))) = (&self.lock_name, taken) {
                let _ = lock::apply(self.fd.raw(), perm, shared, name);
            }
            return Err(Error::from(std::io::Error::last_os_error())
                .context(format!("Could not reopen '{}'", self.path)));
        }
        Ok(())
    }

    async fn op(&self, op: FileOp) -> (Result<usize>, Option<IoBuf>) {
        let inline = self.inline_writes.as_ref();
        if let Some(w) = inline.filter(|w| !self.direct.load(Ordering::Relaxed) && w.takes(&op)) {
            return w.run(&self.fd, op);
        }
        engine::submit(self.aio, &self.fd, op).await
    }

    fn seek(&self, offset: u64, whence: i32) -> Result<Option<u64>> {
        // SAFETY: lseek has no memory arguments.
        let r = unsafe { libc::lseek(self.fd.raw(), offset as libc::off_t, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e.into());
        }
        Ok(Some(r as u64))
    }

    fn grow_to(&self, end: u64) {
        self.length.fetch_max(end, Ordering::AcqRel);
    }

    async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> Result<()> {
        self.op(FileOp::Fallocate(mode, offset, len))
            .await
            .0
            .map(|_| ())
    }
}

#[async_trait]
impl Driver for FileDriver {
    fn format_name(&self) -> &'static str {
        self.name
    }

    fn length(&self) -> u64 {
        if self.removable {
            if let Ok(n) = media_size(self.fd.raw()) {
                return n;
            }
        }
        self.length.load(Ordering::Acquire)
    }

    fn limits(&self) -> Limits {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new regular file reads as zeroes; a device keeps what it held.
    fn has_zero_init(&self) -> bool {
        self.name == "file"
    }

    fn zeroes_may_unmap(&self) -> bool {
        true
    }

    fn growable(&self) -> bool {
        !self.block_device
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let total = buf.len();
        let (r, b) = self.op(FileOp::Read(offset, buf)).await;
        let mut buf = b.ok_or_else(|| Error::errno(libc::EIO))?;
        let mut done = r?;
        // Short reads: keep reading; at end of file, the rest reads as zeroes.
        while done < total {
            let (head, tail) = buf.split_at(done);
            let (r, t) = self.op(FileOp::Read(offset + done as u64, tail)).await;
            let tail = t.ok_or_else(|| Error::errno(libc::EIO))?;
            buf = IoBuf::join_all(vec![head, tail]);
            match r? {
                0 => {
                    buf.as_mut_slice()[done..].fill(0);
                    break;
                }
                n => done += n,
            }
        }
        Ok(buf)
    }

    async fn write(&self, offset: u64, buf: IoBuf, _flags: WriteFlags) -> Result<IoBuf> {
        let total = buf.len();
        let (r, b) = self.op(FileOp::Write(offset, buf)).await;
        let mut buf = b.ok_or_else(|| Error::errno(libc::EIO))?;
        let mut done = r?;
        while done < total {
            let (head, tail) = buf.split_at(done);
            let (r, t) = self.op(FileOp::Write(offset + done as u64, tail)).await;
            buf = IoBuf::join_all(vec![head, t.ok_or_else(|| Error::errno(libc::EIO))?]);
            match r? {
                0 => return Err(Error::errno(libc::ENOSPC)),
                n => done += n,
            }
        }
        self.grow_to(offset + total as u64);
        Ok(buf)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        let mode = if flags.may_unmap && !self.block_device {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE
        };
        match self.fallocate(mode, offset, len).await {
            Ok(()) => {}
            Err(e) if matches!(e.code(), libc::EOPNOTSUPP | libc::EINVAL) => {
                return Err(Error::errno(libc::ENOTSUP))
            }
            Err(e) => return Err(e),
        }
        let end = offset + len;
        if end > self.length() && !self.block_device {
            // PUNCH_HOLE keeps the size: extend explicitly.
            // SAFETY: ftruncate has no memory arguments.
            if unsafe { libc::ftruncate(self.fd.raw(), end as libc::off_t) } < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            self.grow_to(end);
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let len = len.min(self.length().saturating_sub(offset));
        if len == 0 || self.block_device {
            return Ok(());
        }
        let r = self
            .fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
            .await;
        self.discard_stats.account(len, r.is_ok());
        r.or_else(|e| {
            if e.code() == libc::EOPNOTSUPP {
                Ok(())
            } else {
                Err(e)
            }
        })
    }

    async fn flush(&self) -> Result<()> {
        self.op(FileOp::Flush).await.0.map(|_| ())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let here = |mut st: BlockStatus| {
            st.here = true;
            st
        };
        if self.block_device {
            return Ok(here(BlockStatus::data(len)));
        }
        match self.seek(offset, libc::SEEK_DATA)? {
            // No data from here to the end: a hole.
            None => Ok(here(BlockStatus::zero(len))),
            Some(d) if d > offset => Ok(here(BlockStatus::zero((d - offset).min(len)))),
            Some(_) => {
                let hole = self.seek(offset, libc::SEEK_HOLE)?.unwrap_or(offset + len);
                // A data extent ending in a partial block at the end of the
                // file counts the whole block (QEMU's raw_co_block_status).
                let align = u64::from(self.limits().request_alignment.max(1));
                let n = (hole.max(offset + 1) - offset).div_ceil(align) * align;
                Ok(here(BlockStatus::data(n.min(len))))
            }
        }
    }

    async fn truncate(&self, size: u64, exact: bool, prealloc: Preallocation) -> Result<()> {
        if self.block_device {
            if size != self.length() && exact {
                return Err(Error::unsupported("Cannot resize device files"));
            }
            if size > self.length() {
                return Err(Error::invalid("Cannot grow device files"));
            }
            return Ok(());
        }
        let old = self.length();
        // SAFETY: ftruncate has no memory arguments.
        if unsafe { libc::ftruncate(self.fd.raw(), size as libc::off_t) } < 0 {
            return Err(
                Error::from(std::io::Error::last_os_error()).context("Failed to resize the file")
            );
        }
        self.length.store(size, Ordering::Release);
        if old == 0 && size > 0 && prealloc == Preallocation::Off {
            // Allocate the first block so that O_DIRECT alignment probing of
            // the file finds data to read; a failure only loses that (QEMU:
            // allocate_first_block).
            let n = if size < 4096 {
                512.min(size as usize)
            } else {
                4096
            };
            let _ = self.write(0, IoBuf::zeroed(n), WriteFlags::default()).await;
        }
        if size > old {
            preallocate(self, old, size - old, prealloc).await?;
        }
        Ok(())
    }

    fn set_perm(&self, perm: strata_block::Perm, shared: strata_block::Perm) -> Result<()> {
        *self.taken.lock().unwrap_or_else(|p| p.into_inner()) = Some((perm, shared));
        match &self.lock_name {
            Some(name) if self.first_lock.swap(false, Ordering::AcqRel) => {
                lock::apply_patiently(self.fd.raw(), perm, shared, name)
            }
            Some(name) => lock::apply(self.fd.raw(), perm, shared, name),
            None => Ok(()),
        }
    }

    async fn invalidate_cache(&self) -> Result<()> {
        // Another process may have grown or shrunk the file meanwhile.
        let n = media_size(self.fd.raw())
            .map_err(|e| e.context("Could not refresh total sector count"))?;
        self.length.store(n, Ordering::Release);
        Ok(())
    }

    fn reopen_takes(&self) -> &'static [&'static str] {
        // Page cache hints, as QEMU's file-posix: no effect on data.
        &["x-check-cache-dropped", "drop-cache"]
    }

    async fn reopen_read_only(&self, read_only: bool) -> Result<()> {
        let mode = if read_only {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        };
        self.reopen_as(mode, self.extra_flags.load(Ordering::Acquire))?;
        self.flush_on_close
            .store(!read_only && !self.no_flush, Ordering::Release);
        Ok(())
    }

    async fn reopen_direct(&self, direct: bool) -> Result<()> {
        if direct == self.direct.load(Ordering::Acquire) {
            return Ok(());
        }
        // SAFETY: F_GETFL has no memory arguments.
        let fl = unsafe { libc::fcntl(self.fd.raw(), libc::F_GETFL) };
        if fl < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let mode = fl & libc::O_ACCMODE;
        let extra = match direct {
            true => self.extra_flags.load(Ordering::Acquire) | libc::O_DIRECT,
            false => self.extra_flags.load(Ordering::Acquire) & !libc::O_DIRECT,
        };
        // Asked first: after the swap nothing may fail.
        let block_device = fstat(self.fd.raw())?.st_mode & libc::S_IFMT == libc::S_IFBLK;
        self.reopen_as(mode, extra)?;
        self.extra_flags.store(extra, Ordering::Release);
        let mut limits = Limits::default();
        if direct {
            (limits.request_alignment, limits.memory_alignment) =
                probe_alignment(self.fd.raw(), block_device);
        }
        *self.limits.lock().unwrap_or_else(|p| p.into_inner()) = limits;
        self.direct.store(direct, Ordering::Release);
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        let r = if self.flush_on_close.load(Ordering::Acquire) {
            self.flush().await
        } else {
            Ok(())
        };
        // Closing releases the image for other users at once, not when the
        // last reference to the node goes.
        self.set_perm(strata_block::Perm::NONE, strata_block::Perm::ALL)?;
        r
    }

    fn specific_stats(&self) -> Option<serde_json::Map<String, serde_json::Value>> {
        Some(self.discard_stats.to_json())
    }

    async fn allocated_size(&self) -> Result<Option<u64>> {
        let st = fstat(self.fd.raw())?;
        Ok(Some(st.st_blocks as u64 * 512))
    }
}

/// Preallocates `len` bytes at `offset` (falloc reserves blocks, full writes zeroes).
async fn preallocate(f: &FileDriver, offset: u64, len: u64, mode: Preallocation) -> Result<()> {
    match mode {
        Preallocation::Off | Preallocation::Metadata => Ok(()),
        Preallocation::Falloc => f
            .fallocate(0, offset, len)
            .await
            .map_err(|e| e.context("Could not preallocate new data")),
        Preallocation::Full => {
            const CHUNK: u64 = 1 << 20;
            let mut buf = IoBuf::zeroed(CHUNK.min(len) as usize);
            let mut off = offset;
            while off < offset + len {
                let n = (offset + len - off).min(CHUNK) as usize;
                if n != buf.len() {
                    buf = IoBuf::zeroed(n);
                }
                buf = f.write(off, buf, WriteFlags::default()).await?;
                off += n as u64;
            }
            Ok(())
        }
    }
}

/// Sets the btrfs no-copy-on-write attribute on an empty file; filesystems
/// without the attribute ignore it, as QEMU does.
fn set_nocow(fd: RawFd) {
    const FS_IOC_GETFLAGS: libc::c_ulong = 0x80086601;
    const FS_IOC_SETFLAGS: libc::c_ulong = 0x40086602;
    const FS_NOCOW_FL: libc::c_int = 0x0080_0000;
    let mut attr: libc::c_int = 0;
    // SAFETY: the ioctls read and write one int.
    unsafe {
        if libc::ioctl(fd, FS_IOC_GETFLAGS, &mut attr) == 0 {
            attr |= FS_NOCOW_FL;
            libc::ioctl(fd, FS_IOC_SETFLAGS, &attr);
        }
    }
}

#[async_trait]
impl DriverClass for FileClass {
    fn name(&self) -> &'static str {
        self.name
    }

    fn protocol_name(&self) -> Option<&'static str> {
        Some(self.name)
    }

    fn create_options(&self) -> &'static [OptSpec] {
        CREATE_OPTIONS
    }

    fn can_blockdev_create(&self) -> bool {
        self.name == "file"
    }

    /// BlockdevCreateOptionsFile: the same options, named as in QAPI.
    async fn blockdev_create(&self, ctx: &OpenCtx, mut opts: Opts) -> Result<()> {
        let filename = take_str(&mut opts, "filename")?.unwrap_or_default();
        let opts = opts
            .into_iter()
            .map(|(k, v)| (k.replace('-', "_"), v))
            .collect();
        self.create(ctx, &filename, opts).await
    }

    async fn create(&self, ctx: &OpenCtx, filename: &str, mut opts: Opts) -> Result<()> {
        let size = take_size(&mut opts, "size")?.unwrap_or(0);
        let prealloc = match take_str(&mut opts, "preallocation")? {
            Some(p) => Preallocation::parse(&p)?,
            None => Preallocation::Off,
        };
        if prealloc == Preallocation::Metadata {
            return Err(Error::invalid("Unsupported preallocation mode: metadata"));
        }
        let nocow = take_bool(&mut opts, "nocow")?.unwrap_or(false);
        let _ = take_size(&mut opts, "extent_size_hint")?;
        strata_block::options::reject_unknown(&opts, "file")?;
        // The protocol prefix names the driver, not the file (QEMU's
        // raw_co_create_opts skips it the same way).
        let filename = filename.strip_prefix("file:").unwrap_or(filename);
        let fd = open_fd(filename, libc::O_RDWR | libc::O_CREAT, 0o644, "create")?;
        if nocow {
            set_nocow(fd.raw());
        }
        // While creating: write and resize held, resize not shared (as QEMU).
        let perm = strata_block::Perm::WRITE.with(strata_block::Perm::RESIZE);
        let shared = strata_block::Perm(strata_block::Perm::ALL.0 & !strata_block::Perm::RESIZE.0);
        if ctx.flags.locking {
            lock::apply_patiently(fd.raw(), perm, shared, filename)?;
        }
        let st = fstat(fd.raw())?;
        let is_reg = st.st_mode & libc::S_IFMT == libc::S_IFREG;
        let driver = FileDriver {
            fd: Arc::new(fd),
            lock_name: None,
            first_lock: AtomicBool::new(false),
            aio: Aio::Threads,
            inline_writes: None,
            length: AtomicU64::new(0),
            limits: Default::default(),
            direct: AtomicBool::new(false),
            block_device: !is_reg,
            discard_stats: DiscardStats::default(),
            name: self.name,
            removable: false,
            flush_on_close: AtomicBool::new(true),
            path: filename.to_string(),
            extra_flags: Default::default(),
            no_flush: false,
            taken: Default::default(),
        };
        if is_reg {
            driver.truncate(0, true, Preallocation::Off).await?;
            driver.truncate(size, true, prealloc).await?;
        }
        Ok(())
    }

    async fn open(&self, ctx: &OpenCtx, opts: &mut Opts) -> Result<Box<dyn Driver>> {
        let filename = take_str(opts, "filename")?
            .ok_or_else(|| Error::invalid("Parameter 'filename' is missing"))?;
        let mut aio = ctx.flags.aio;
        if let Some(a) = take_str(opts, "aio")? {
            aio = Aio::parse(&a)?;
        }
        let locking = match take_str(opts, "locking")?.as_deref() {
            None | Some("auto") | Some("on") => ctx.flags.locking,
            Some("off") => false,
            Some(v) => {
                return Err(Error::invalid(format!(
                    "Parameter 'locking' does not accept value '{v}'"
                )))
            }
        };
        let _ = take_str(opts, "aio-max-batch")?;
        let _ = take_bool(opts, "x-check-cache-dropped")?;
        let direct = ctx.flags.cache.direct;
        let mut flags = if ctx.flags.read_only {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        };
        if direct {
            flags |= libc::O_DIRECT;
        }
        let removable = self.name == "host_cdrom";
        if removable {
            // A drive without a disc must still open.
            flags |= libc::O_NONBLOCK;
        }
        let extra_flags = flags & !libc::O_ACCMODE;
        let fd = open_fd(&filename, flags, 0, "open")?;
        let st = fstat(fd.raw())?;
        let kind = st.st_mode & libc::S_IFMT;
        if !self.device && kind != libc::S_IFREG {
            return Err(Error::invalid(format!(
                "'{}' driver requires '{filename}' to be a regular file",
                self.name
            )));
        }
        if self.device && kind != libc::S_IFCHR && kind != libc::S_IFBLK {
            return Err(Error::invalid(format!(
                "'{}' driver requires '{filename}' to be either a character or block device",
                self.name
            )));
        }
        let block_device = kind == libc::S_IFBLK;
        let length = if self.device {
            media_size(fd.raw())?
        } else {
            st.st_size as u64
        };
        let mut limits = Limits::default();
        if direct {
            (limits.request_alignment, limits.memory_alignment) =
                probe_alignment(fd.raw(), block_device);
        }
        let tmpfs = on_tmpfs(fd.raw());
        Ok(Box::new(FileDriver {
            fd: Arc::new(fd),
            lock_name: locking.then(|| filename.clone()),
            first_lock: AtomicBool::new(true),
            aio,
            // O_DIRECT writes go to the device: only the ring keeps them
            // async, so inline writes wait for a reopen without it.
            inline_writes: (aio == Aio::IoUring).then(|| {
                if tmpfs {
                    InlineWrites::with_reads()
                } else {
                    InlineWrites::default()
                }
            }),
            length: AtomicU64::new(length),
            limits: std::sync::Mutex::new(limits),
            direct: AtomicBool::new(direct),
            block_device: self.device,
            discard_stats: DiscardStats::default(),
            name: self.name,
            removable,
            flush_on_close: AtomicBool::new(!ctx.flags.read_only && !ctx.flags.cache.no_flush),
            path: filename,
            extra_flags: extra_flags.into(),
            no_flush: ctx.flags.cache.no_flush,
            taken: Default::default(),
        }))
    }
}
