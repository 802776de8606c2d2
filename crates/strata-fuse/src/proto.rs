//! The FUSE kernel protocol as far as a one-file filesystem needs it
//! (Linux `include/uapi/linux/fuse.h`, protocol 7.31): request and reply
//! layouts, read from and written to native-endian bytes.

/// The protocol version Strata speaks; the kernel's is taken when lower.
pub const KERNEL_VERSION: u32 = 7;
pub const KERNEL_MINOR_VERSION: u32 = 31;

/// The inode of the mount point itself: the exported disk.
pub const ROOT_ID: u64 = 1;

pub const LOOKUP: u32 = 1;
pub const FORGET: u32 = 2;
pub const GETATTR: u32 = 3;
pub const SETATTR: u32 = 4;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const WRITE: u32 = 16;
pub const STATFS: u32 = 17;
pub const RELEASE: u32 = 18;
pub const FSYNC: u32 = 20;
pub const FLUSH: u32 = 25;
pub const INIT: u32 = 26;
pub const INTERRUPT: u32 = 36;
pub const DESTROY: u32 = 38;
pub const BATCH_FORGET: u32 = 42;
pub const FALLOCATE: u32 = 43;
pub const LSEEK: u32 = 46;

/// INIT flags: reads may come in parallel; writes larger than a page;
/// `max_pages` in the reply is honoured.
pub const ASYNC_READ: u32 = 1 << 0;
pub const BIG_WRITES: u32 = 1 << 5;
pub const MAX_PAGES: u32 = 1 << 22;

/// SETATTR `valid` bits.
pub const FATTR_MODE: u32 = 1 << 0;
pub const FATTR_UID: u32 = 1 << 1;
pub const FATTR_GID: u32 = 1 << 2;
pub const FATTR_SIZE: u32 = 1 << 3;
/// What libfuse hands its filesystems of `valid` (it hides the file handle
/// and lock owner bits): atime, mtime, their `_NOW` forms, ctime, and the
/// kill-suid/sgid bits besides the four above.
pub const FATTR_PASSED: u32 =
    0x0f | 1 << 4 | 1 << 5 | 1 << 7 | 1 << 8 | 1 << 10 | 1 << 11 | 1 << 12;

/// Largest write the kernel sends, as libfuse sets it (256 pages).
pub const MAX_WRITE: u32 = 1 << 20;
/// Largest read a client may ask for (QEMU: FUSE_MAX_BOUNCE_BYTES), given
/// as the `max_read` mount option.
pub const MAX_READ: u32 = 64 << 20;
/// Room for a request: the largest write and its headers.
pub const REQUEST_BUFFER: usize = MAX_WRITE as usize + 4096;

/// `fuse_in_header`: 40 bytes before every request.
pub const IN_HEADER_LEN: usize = 40;
/// `fuse_write_in`: 40 bytes of arguments before a write's data.
pub const WRITE_IN_LEN: usize = 40;

/// The header of one request.
#[derive(Clone, Copy, Debug)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

/// Reads native-endian integers off a request's argument bytes; a short
/// request reads as zeroes (the kernel never sends one).
pub struct Args<'a>(pub &'a [u8]);

impl Args<'_> {
    pub fn u32(&self, at: usize) -> u32 {
        self.0
            .get(at..at + 4)
            .map_or(0, |b| u32::from_ne_bytes(b.try_into().unwrap_or_default()))
    }
    pub fn u64(&self, at: usize) -> u64 {
        self.0
            .get(at..at + 8)
            .map_or(0, |b| u64::from_ne_bytes(b.try_into().unwrap_or_default()))
    }
}

impl InHeader {
    /// The header at the start of `buf`, if whole and consistent with it.
    pub fn parse(buf: &[u8]) -> Option<InHeader> {
        if buf.len() < IN_HEADER_LEN {
            return None;
        }
        let a = Args(buf);
        let h = InHeader {
            len: a.u32(0),
            opcode: a.u32(4),
            unique: a.u64(8),
            nodeid: a.u64(16),
        };
        (h.len as usize == buf.len()).then_some(h)
    }
}

/// Builds a reply body of native-endian fields.
#[derive(Default)]
pub struct Out(pub Vec<u8>);

impl Out {
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn zeroes(mut self, n: usize) -> Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

/// `fuse_out_header` for a reply of `body_len` bytes.
pub fn out_header(unique: u64, error: i32, body_len: usize) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&((16 + body_len) as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&(-error).to_ne_bytes());
    h[8..16].copy_from_slice(&unique.to_ne_bytes());
    h
}

/// What `stat` shows of the exported disk.
#[derive(Clone, Copy, Debug)]
pub struct Attr {
    pub size: u64,
    pub blocks: u64,
    pub time: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub blksize: u32,
}

/// `fuse_attr_out`, valid for one second as QEMU gives it.
pub fn attr_out(a: &Attr) -> Out {
    Out::default()
        .u64(1)
        .u32(0)
        .u32(0)
        .u64(ROOT_ID)
        .u64(a.size)
        .u64(a.blocks)
        .u64(a.time)
        .u64(a.time)
        .u64(a.time)
        .u32(0)
        .u32(0)
        .u32(0)
        .u32(a.mode)
        .u32(1)
        .u32(a.uid)
        .u32(a.gid)
        .u32(0)
        .u32(a.blksize)
        .u32(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_the_kernels_sizes() {
        let a = Attr {
            size: 1,
            blocks: 2,
            time: 3,
            mode: 4,
            uid: 5,
            gid: 6,
            blksize: 7,
        };
        // fuse_attr_out: 16 bytes of validity, then fuse_attr (88).
        assert_eq!(attr_out(&a).0.len(), 104);
        assert_eq!(out_header(9, libc::ENOENT, 4)[4..8], (-2i32).to_ne_bytes());
        let mut req = vec![0u8; 48];
        req[0..4].copy_from_slice(&48u32.to_ne_bytes());
        req[4..8].copy_from_slice(&READ.to_ne_bytes());
        assert_eq!(InHeader::parse(&req).map(|h| h.opcode), Some(READ));
        // A length that disagrees with what was read is refused.
        assert!(InHeader::parse(&req[..44]).is_none());
    }
}
