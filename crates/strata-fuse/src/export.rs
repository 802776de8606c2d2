//! A FUSE export (QEMU: block/export/fuse.c): a node's disk shown as one
//! regular file on a mount point, read and written by any program. One
//! task reads the requests off `/dev/fuse`; each request runs as a task
//! of its own, so the kernel's parallel reads and writes stay in flight
//! together, and answers as soon as its I/O is done.

use crate::proto::{self, Args, Attr, InHeader, Out};
use std::collections::HashSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use strata_block::buf::IoBuf;
use strata_block::driver::{Preallocation, WriteFlags};
use strata_block::error::Error;
use strata_block::Backend;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

/// `allow-other` (QEMU: FuseExportAllowOther).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllowOther {
    On,
    Off,
    /// Try with it, and without it if the mount is refused.
    Auto,
}

/// What `block-export-add` says of a FUSE export.
#[derive(Clone, Debug)]
pub struct FuseOptions {
    pub mountpoint: String,
    pub writable: bool,
    pub growable: bool,
    pub allow_other: AllowOther,
}

/// Mount points in use by this process, so a second export on the same
/// path is refused before it stats a file the first one serves.
fn mounted() -> std::sync::MutexGuard<'static, HashSet<String>> {
    static SET: std::sync::LazyLock<Mutex<HashSet<String>>> =
        std::sync::LazyLock::new(Default::default);
    SET.lock().unwrap_or_else(|p| p.into_inner())
}

/// The mode and owner `stat` shows; `chmod` and `chown` change them.
#[derive(Clone, Copy)]
struct Owner {
    mode: u32,
    uid: u32,
    gid: u32,
}

/// One running FUSE export.
pub struct FuseExport {
    opts: FuseOptions,
    allow_other: bool,
    blk: Arc<Backend>,
    fd: AsyncFd<OwnedFd>,
    owner: Mutex<Owner>,
    /// Requests being served, and the signal that the last one ended.
    inflight: AtomicUsize,
    idle: Notify,
    stop: Notify,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl FuseExport {
    /// The permissions the export's user handle takes: RESIZE too when it
    /// may change the length (QEMU: fuse_export_create). Others may do
    /// anything beside it.
    pub fn perms(writable: bool, growable: bool) -> (strata_block::Perm, strata_block::Perm) {
        use strata_block::Perm;
        let mut perm = Perm::CONSISTENT_READ;
        if writable {
            perm = perm.with(Perm::WRITE);
        }
        if writable || growable {
            perm = perm.with(Perm::RESIZE);
        }
        (perm, Perm::ALL)
    }

    /// Mounts the export and starts serving it, on the current tokio
    /// runtime. Errors are QEMU's.
    pub fn start(opts: FuseOptions, blk: Arc<Backend>) -> Result<Arc<FuseExport>, String> {
        if mounted().contains(&opts.mountpoint) {
            return Err(format!(
                "There already is a FUSE export on '{}'",
                opts.mountpoint
            ));
        }
        crate::mount::check_regular_file(&opts.mountpoint)?;
        let mount_with =
            |allow: bool| crate::mount::mount(&opts.mountpoint, allow).map(|fd| (fd, allow));
        let (fd, allow_other) = match opts.allow_other {
            AllowOther::Auto => mount_with(true).or_else(|_| mount_with(false)),
            a => mount_with(a == AllowOther::On),
        }
        .map_err(|_| "Failed to mount FUSE session to export".to_string())?;
        // SAFETY: an OwnedFd always returns its one descriptor, open until
        // the AsyncFd drops it.
        let fd = match unsafe { AsyncFd::register(fd) } {
            Ok(fd) => fd,
            Err(_) => {
                crate::mount::unmount(&opts.mountpoint);
                return Err("Failed to set up FUSE session".into());
            }
        };
        mounted().insert(opts.mountpoint.clone());
        // SAFETY: getuid and getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let mut mode = libc::S_IFREG | libc::S_IRUSR;
        if opts.writable {
            mode |= libc::S_IWUSR;
        }
        let exp = Arc::new(FuseExport {
            opts,
            allow_other,
            blk,
            fd,
            owner: Mutex::new(Owner { mode, uid, gid }),
            inflight: AtomicUsize::new(0),
            idle: Notify::new(),
            stop: Notify::new(),
            reader: Mutex::new(None),
        });
        let task = tokio::spawn(Arc::clone(&exp).read_requests());
        *exp.reader.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(exp)
    }

    /// The user handle the export serves.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.blk
    }

    /// Stops reading requests, lets those in flight finish, and unmounts.
    pub async fn close(&self) {
        self.stop.notify_one();
        let task = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = task {
            let _ = t.await;
        }
        loop {
            let idle = self.idle.notified();
            if self.inflight.load(Ordering::Acquire) == 0 {
                break;
            }
            idle.await;
        }
        crate::mount::unmount(&self.opts.mountpoint);
        mounted().remove(&self.opts.mountpoint);
    }

    /// The reading loop: one request at a time off the device, each handed
    /// to a task of its own. Ends when stopped or unmounted.
    async fn read_requests(self: Arc<Self>) {
        let mut buf = vec![0u8; proto::REQUEST_BUFFER];
        loop {
            let n = tokio::select! {
                _ = self.stop.notified() => return,
                r = self.read_one(&mut buf) => r,
            };
            match n {
                Ok(n) => {
                    // Another request likely follows soon: the loop polls.
                    strata_block::poll::note_request();
                    self.dispatch(&buf[..n])
                }
                // The request was interrupted before it was read.
                Err(e) if e == libc::ENOENT || e == libc::EINTR => continue,
                // Unmounted from outside (ENODEV), or the device failed.
                Err(_) => return,
            }
        }
    }

    async fn read_one(&self, buf: &mut [u8]) -> Result<usize, i32> {
        loop {
            let mut guard = self.fd.readable().await.map_err(|_| libc::EIO)?;
            let r = guard.try_io(|fd| {
                // SAFETY: buf is valid for its length.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) => return Err(e.raw_os_error().unwrap_or(libc::EIO)),
                Err(_would_block) => continue,
            }
        }
    }

    /// Starts serving one request; requests that take no answer are done
    /// here.
    fn dispatch(self: &Arc<Self>, req: &[u8]) {
        let Some(h) = InHeader::parse(req) else {
            return;
        };
        match h.opcode {
            proto::FORGET | proto::BATCH_FORGET | proto::INTERRUPT => return,
            _ => {}
        }
        let body = &req[proto::IN_HEADER_LEN..];
        // A write's data is copied once, into the buffer it goes to the
        // disk from; the arguments before it are kept apart.
        let (args, data) = match (h.opcode, body.len()) {
            (proto::WRITE, n) if n >= proto::WRITE_IN_LEN => (
                body[..proto::WRITE_IN_LEN].to_vec(),
                Some(IoBuf::from_slice(&body[proto::WRITE_IN_LEN..])),
            ),
            _ => (body.to_vec(), None),
        };
        self.inflight.fetch_add(1, Ordering::AcqRel);
        let exp = Arc::clone(self);
        tokio::spawn(async move {
            let answer = exp.serve(h, Args(&args), data).await;
            match answer {
                Ok(Reply::Body(b)) => exp.reply(h.unique, 0, &[&b.0]),
                Ok(Reply::Data(buf)) => exp.reply(h.unique, 0, &[buf.as_slice()]),
                Err(errno) => exp.reply(h.unique, errno, &[]),
            }
            if exp.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
                exp.idle.notify_waiters();
            }
        });
    }

    /// Sends one answer in one write, as the device wants it.
    fn reply(&self, unique: u64, errno: i32, body: &[&[u8]]) {
        let len: usize = if errno == 0 {
            body.iter().map(|b| b.len()).sum()
        } else {
            0
        };
        let hdr = proto::out_header(unique, errno, len);
        let mut iov = vec![libc::iovec {
            iov_base: hdr.as_ptr() as *mut _,
            iov_len: hdr.len(),
        }];
        if errno == 0 {
            iov.extend(body.iter().map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut _,
                iov_len: b.len(),
            }));
        }
        // SAFETY: every iovec points into memory alive for the call. A
        // failed answer (ENOENT: the request was interrupted) is dropped.
        unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
    }

    /// One request's work and answer (an errno on failure).
    async fn serve(&self, h: InHeader, a: Args<'_>, data: Option<IoBuf>) -> Result<Reply, i32> {
        match h.opcode {
            proto::INIT => Ok(Reply::Body(init_reply(&a))),
            proto::LOOKUP => Err(libc::ENOENT),
            proto::GETATTR => self.getattr().await,
            proto::SETATTR => self.setattr(&a).await,
            // Handle 0; the kernel's page cache is used as QEMU lets it.
            proto::OPEN => Ok(Reply::Body(Out::default().u64(0).u32(0).u32(0))),
            proto::READ => self.read(a.u64(8), a.u32(16)).await,
            proto::WRITE => {
                self.write(a.u64(8), data.unwrap_or_else(|| IoBuf::zeroed(0)))
                    .await
            }
            proto::STATFS => Ok(Reply::Body(statfs_reply())),
            proto::RELEASE | proto::DESTROY => Ok(Reply::Body(Out::default())),
            proto::FSYNC | proto::FLUSH => {
                self.blk.flush().await.map_err(errno)?;
                Ok(Reply::Body(Out::default()))
            }
            proto::FALLOCATE => self.fallocate(a.u64(8), a.u64(16), a.u32(24)).await,
            proto::LSEEK => self.lseek(a.u64(8), a.u32(16)).await,
            _ => Err(libc::ENOSYS),
        }
    }

    async fn getattr(&self) -> Result<Reply, i32> {
        let node = self.blk.node();
        let size = self.blk.length();
        let allocated = node
            .driver()
            .allocated_size()
            .await
            .ok()
            .flatten()
            .unwrap_or(0);
        // An unknown allocation shows as the whole length (QEMU).
        let blocks = if allocated == 0 { size } else { allocated }.div_ceil(512);
        let o = *self.owner.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(Reply::Body(proto::attr_out(&Attr {
            size,
            blocks,
            time: now,
            mode: o.mode,
            uid: o.uid,
            gid: o.gid,
            blksize: node.limits().request_alignment,
        })))
    }

    /// Only the length and the mode (and owner with allow-other) change,
    /// and only as far as they grant access that works (QEMU: fuse_setattr).
    async fn setattr(&self, a: &Args<'_>) -> Result<Reply, i32> {
        let valid = a.u32(0) & proto::FATTR_PASSED;
        let mut supported = proto::FATTR_SIZE | proto::FATTR_MODE;
        if self.allow_other {
            supported |= proto::FATTR_UID | proto::FATTR_GID;
        }
        if valid & !supported != 0 {
            return Err(libc::ENOTSUP);
        }
        let mode = a.u32(68);
        if valid & proto::FATTR_MODE != 0 {
            if !self.allow_other && mode & (libc::S_IRWXG | libc::S_IRWXO) != 0 {
                return Err(libc::EPERM);
            }
            if !self.opts.writable && mode & (libc::S_IWUSR | libc::S_IWGRP | libc::S_IWOTH) != 0 {
                return Err(libc::EROFS);
            }
        }
        if valid & proto::FATTR_SIZE != 0 {
            if !self.opts.writable {
                return Err(libc::EACCES);
            }
            self.truncate(a.u64(16), Preallocation::Off).await?;
        }
        {
            let mut o = self.owner.lock().unwrap_or_else(|p| p.into_inner());
            if valid & proto::FATTR_MODE != 0 {
                o.mode = (mode & 0o7777) | libc::S_IFREG;
            }
            if valid & proto::FATTR_UID != 0 {
                o.uid = a.u32(76);
            }
            if valid & proto::FATTR_GID != 0 {
                o.gid = a.u32(80);
            }
        }
        self.getattr().await
    }

    async fn truncate(&self, size: u64, prealloc: Preallocation) -> Result<(), i32> {
        self.blk.truncate(size, true, prealloc).await.map_err(errno)
    }

    /// Reads stop short at the end of the disk, as clients expect.
    async fn read(&self, offset: u64, size: u32) -> Result<Reply, i32> {
        if size > proto::MAX_READ {
            return Err(libc::EINVAL);
        }
        let len = self.blk.length();
        let size = (size as u64).min(len.saturating_sub(offset)) as usize;
        let buf = self
            .blk
            .read(offset, IoBuf::zeroed(size))
            .await
            .map_err(errno)?;
        Ok(Reply::Data(buf))
    }

    /// Writes past the end grow a growable export and stop short on any
    /// other.
    async fn write(&self, offset: u64, mut data: IoBuf) -> Result<Reply, i32> {
        if !self.opts.writable {
            return Err(libc::EACCES);
        }
        let len = self.blk.length();
        let mut size = data.len() as u64;
        if offset + size > len {
            if self.opts.growable {
                self.truncate(offset + size, Preallocation::Off).await?;
            } else {
                size = len.saturating_sub(offset);
                data = data.split_at(size as usize).0;
            }
        }
        if size > 0 {
            self.blk
                .write(offset, data, WriteFlags::default())
                .await
                .map_err(errno)?;
        }
        Ok(Reply::Body(Out::default().u32(size as u32).u32(0)))
    }

    /// fallocate(2): growing at the end, punching holes and zeroing ranges
    /// (QEMU: fuse_fallocate).
    async fn fallocate(&self, offset: u64, mut length: u64, mode: u32) -> Result<Reply, i32> {
        if !self.opts.writable {
            return Err(libc::EACCES);
        }
        let mode = mode as i32;
        let blk_len = self.blk.length();
        if mode & libc::FALLOC_FL_KEEP_SIZE != 0 {
            length = length.min(blk_len.saturating_sub(offset));
        }
        if mode == 0 {
            // Only past the end, by growing.
            if offset < blk_len {
                return Err(libc::EOPNOTSUPP);
            }
            if offset > blk_len {
                self.truncate(offset, Preallocation::Off).await?;
            }
            self.truncate(offset + length, Preallocation::Falloc)
                .await?;
        } else if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            if mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
                return Err(libc::EINVAL);
            }
            let flags = WriteFlags {
                may_unmap: true,
                no_fallback: true,
                ..Default::default()
            };
            self.blk
                .write_zeroes(offset, length, flags)
                .await
                .map_err(|e| match e.code() {
                    libc::ENOTSUP => libc::EOPNOTSUPP,
                    c => c,
                })?;
        } else if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
            if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && offset + length > blk_len {
                self.truncate(offset + length, Preallocation::Off).await?;
            }
            self.blk
                .write_zeroes(offset, length, WriteFlags::default())
                .await
                .map_err(errno)?;
        } else {
            return Err(libc::EOPNOTSUPP);
        }
        Ok(Reply::Body(Out::default()))
    }

    /// SEEK_DATA and SEEK_HOLE from block status through the whole chain
    /// (QEMU: fuse_lseek).
    async fn lseek(&self, mut offset: u64, whence: u32) -> Result<Reply, i32> {
        let whence = whence as i32;
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return Err(libc::EINVAL);
        }
        let len = self.blk.length();
        loop {
            if offset >= len {
                // The end is a hole to SEEK_HOLE; there is no data past it.
                if offset > len || whence == libc::SEEK_DATA {
                    return Err(libc::ENXIO);
                }
                return Ok(Reply::Body(Out::default().u64(offset)));
            }
            let (st, _) = self
                .blk
                .block_status_above(offset, len - offset)
                .await
                .map_err(errno)?;
            if st.data == (whence == libc::SEEK_DATA) {
                return Ok(Reply::Body(Out::default().u64(offset)));
            }
            if st.len == 0 {
                return Err(libc::ENXIO);
            }
            offset += st.len;
        }
    }
}

/// An answer's body.
enum Reply {
    Body(Out),
    Data(IoBuf),
}

fn errno(e: Error) -> i32 {
    e.code()
}

/// `fuse_init_out`: the version both sides speak and what this side does
/// (libfuse's choices for a one-file filesystem).
fn init_reply(a: &Args<'_>) -> Out {
    let (major, minor, readahead, flags) = (a.u32(0), a.u32(4), a.u32(8), a.u32(12));
    let minor = if major > proto::KERNEL_VERSION {
        // The kernel asks again with our version.
        proto::KERNEL_MINOR_VERSION
    } else {
        minor.min(proto::KERNEL_MINOR_VERSION)
    };
    let want = proto::ASYNC_READ | proto::BIG_WRITES | proto::MAX_PAGES;
    Out::default()
        .u32(proto::KERNEL_VERSION)
        .u32(minor)
        .u32(readahead)
        .u32(flags & want)
        .u16(12)
        .u16(9)
        .u32(proto::MAX_WRITE)
        .u32(1)
        .u16((proto::MAX_WRITE / 4096) as u16)
        .u16(0)
        .zeroes(32)
}

/// `fuse_statfs_out` as libfuse answers for a filesystem without statfs.
fn statfs_reply() -> Out {
    Out::default().zeroes(40).u32(512).u32(255).zeroes(32)
}
