//! The `qcow` format: QEMU's first copy-on-write image (version 1; QEMU:
//! block/qcow.c).
//!
//! A 48-byte big-endian header, the backing file's name right after it,
//! then the L1 table. Each L1 entry points at an L2 table, each L2 entry
//! at a cluster of guest data: zero is unallocated (the backing file or
//! zeroes show through), bit 63 marks a compressed cluster (raw deflate;
//! its length in the `cluster_bits` bits below). There are no refcounts:
//! new clusters and tables go at the end of the file.
//!
//! A new cluster is written whole first (the write's bytes, the rest
//! copied from what the cluster showed before), then the file is flushed,
//! then the one table entry that makes it visible: a crash leaves either
//! the old view or the new one, never an entry pointing at unwritten
//! space. Allocations take one lock; see `alloc.rs`.

mod alloc;
mod create;
mod driver;
mod tables;

use crate::formats::crypto::{crypto_err, password, take_prefixed};
use async_trait::async_trait;
use std::sync::Arc;
use strata_block::options::{OptSpec, Opts};
use strata_block::{Driver, DriverClass, Error, IoBuf, Node, OpenCtx, Result};
use strata_crypto::BlockCrypto;

pub use driver::QcowDriver;

/// The `qcow` driver class.
pub struct QcowClass;

const MAGIC: u32 = u32::from_be_bytes(*b"QFI\xfb");
const VERSION: u32 = 1;
const HEADER_LEN: usize = 48;
const CRYPT_NONE: u32 = 0;
const CRYPT_AES: u32 = 1;
/// An L2 entry with this bit points at a compressed cluster.
const COMPRESSED: u64 = 1 << 63;
const SECTOR: u64 = 512;
/// The longest backing file name QEMU reads.
const MAX_BACKING_NAME: u32 = 1023;
/// The last byte a request may reach (QEMU: BDRV_MAX_LENGTH); tables
/// placed past it fail as QEMU's reads fail.
const READ_MAX: u64 = i64::MAX as u64 & !((1 << 30) - 1);
/// The longest single request QEMU makes (BDRV_REQUEST_MAX_BYTES).
const REQUEST_MAX: u64 = (i32::MAX as u64 >> 9) << 9;

fn be32(h: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(h[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(h: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(h[at..at + 8].try_into().expect("8 bytes"))
}

/// The sizes a header fixes.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    cluster_bits: u32,
    /// L2 entries per table, as a power of two.
    l2_bits: u32,
}

impl Geometry {
    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes of one L2 table.
    fn l2_len(&self) -> usize {
        8 << self.l2_bits
    }

    fn l1_index(&self, guest: u64) -> usize {
        (guest >> (self.cluster_bits + self.l2_bits)) as usize
    }

    fn l2_index(&self, guest: u64) -> usize {
        ((guest >> self.cluster_bits) & ((1 << self.l2_bits) - 1)) as usize
    }

    fn offset_in_cluster(&self, guest: u64) -> u64 {
        guest & (self.cluster_size() - 1)
    }

    /// Where a compressed cluster's bytes are and how many there are.
    fn compressed_extent(&self, entry: u64) -> (u64, usize) {
        let shift = 63 - self.cluster_bits;
        let offset = entry & ((1 << shift) - 1);
        let len = (entry >> shift) & (self.cluster_size() - 1);
        (offset, len as usize)
    }

    /// The L2 entry of a compressed cluster of `len` bytes at `offset`.
    fn compressed_entry(&self, offset: u64, len: usize) -> u64 {
        COMPRESSED | offset | (len as u64) << (63 - self.cluster_bits)
    }

    /// Entries in the L1 table of a disk of `size` bytes (QEMU: l1_size);
    /// None when it does not fit QEMU's int.
    fn l1_entries(&self, size: u64) -> Option<u64> {
        let shift = self.cluster_bits + self.l2_bits;
        let n = size.checked_add((1 << shift) - 1)? >> shift;
        (n <= i32::MAX as u64 / 8).then_some(n)
    }
}

/// A parsed header.
struct Header {
    backing_offset: u64,
    backing_len: u32,
    size: u64,
    geo: Geometry,
    crypt_method: u32,
    l1_offset: u64,
}

impl Header {
    /// Parses and checks the header in QEMU's order and words (qcow_open).
    fn parse(h: &[u8]) -> Result<Header> {
        if be32(h, 0) != MAGIC {
            return Err(Error::invalid("Image not in qcow format"));
        }
        let version = be32(h, 4);
        if version != VERSION {
            let mut msg = format!("qcow (v{VERSION}) does not support qcow version {version}");
            if version == 2 || version == 3 {
                msg.push_str("\nTry the 'qcow2' driver instead.");
            }
            return Err(Error::unsupported(msg));
        }
        let size = be64(h, 24);
        if size <= 1 {
            return Err(Error::invalid(
                "Image size is too small (must be at least 2 bytes)",
            ));
        }
        let cluster_bits = h[32] as u32;
        if !(9..=16).contains(&cluster_bits) {
            return Err(Error::invalid("Cluster size must be between 512 and 64k"));
        }
        let l2_bits = h[33] as u32;
        if !(9 - 3..=16 - 3).contains(&l2_bits) {
            return Err(Error::invalid("L2 table size must be between 512 and 64k"));
        }
        Ok(Header {
            backing_offset: be64(h, 8),
            backing_len: be32(h, 16),
            size,
            geo: Geometry {
                cluster_bits,
                l2_bits,
            },
            crypt_method: be32(h, 36),
            l1_offset: be64(h, 40),
        })
    }
}

/// Reads `len` bytes at `offset`, failing as QEMU's reads fail for
/// offsets no request may reach; zeroes past the file's end.
async fn read_at(file: &Arc<Node>, offset: u64, len: usize) -> Result<IoBuf> {
    check_reach(offset, len as u64)?;
    let end = file.length();
    let mut buf = IoBuf::zeroed(len);
    let n = end.saturating_sub(offset).min(len as u64) as usize;
    if n > 0 {
        let (head, tail) = buf.split_at(n);
        let head = file.read(offset, head).await?;
        buf = IoBuf::join_all(vec![head, tail]);
    }
    Ok(buf)
}

/// Fails as QEMU's read of `len` bytes at `offset` fails when no request
/// may reach them.
fn check_reach(offset: u64, len: u64) -> Result<()> {
    if offset > READ_MAX || len > READ_MAX - offset || len > REQUEST_MAX {
        return Err(Error::errno(libc::EIO));
    }
    Ok(())
}

/// The image's encryption from its header and the `encrypt.*` options, in
/// QEMU's order and words; unlocked unless opened without I/O.
fn open_crypto(ctx: &OpenCtx, method: u32, opts: &mut Opts) -> Result<Option<BlockCrypto>> {
    let format = take_prefixed(opts, "encrypt.", "format")?;
    let key_secret = take_prefixed(opts, "encrypt.", "key-secret")?;
    match method {
        CRYPT_NONE => match format {
            Some(f) => Err(Error::invalid(format!(
                "No encryption in image header, but options specified format '{f}'"
            ))),
            None => Ok(None),
        },
        CRYPT_AES => {
            if let Some(f) = format.filter(|f| f != "aes") {
                return Err(Error::invalid(format!(
                    "Header reported 'aes' encryption format but options specify '{f}'"
                )));
            }
            let pw = match ctx.flags.no_io {
                true => None,
                false => Some(password(key_secret.as_deref(), "encrypt.")?),
            };
            BlockCrypto::qcow(pw.as_deref())
                .map(Some)
                .map_err(crypto_err)
        }
        _ => Err(Error::invalid("invalid encryption method in qcow header")),
    }
}

/// The backing file named in the header, if any (QEMU reads at most 1023
/// bytes of it).
async fn backing_name(file: &Arc<Node>, h: &Header) -> Result<Option<String>> {
    if h.backing_offset == 0 {
        return Ok(None);
    }
    if h.backing_len > MAX_BACKING_NAME {
        return Err(Error::invalid("Backing file name too long"));
    }
    let raw = read_at(file, h.backing_offset, h.backing_len as usize).await?;
    // QEMU keeps it as a C string: it ends at the first NUL, and an empty
    // one names no backing file.
    let bytes = raw.as_slice();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let name = String::from_utf8_lossy(&bytes[..end]).into_owned();
    Ok(Some(name).filter(|n| !n.is_empty()))
}

/// Opens the backing file from the header's name or the `backing` option,
/// as qcow2 does.
async fn open_backing(
    ctx: &OpenCtx,
    file: &Arc<Node>,
    name: Option<&str>,
    opt: Option<serde_json::Value>,
) -> Result<Option<Arc<Node>>> {
    let node = match (name, opt) {
        (_, Some(serde_json::Value::Null)) => return Ok(None),
        (_, Some(serde_json::Value::String(r))) => ctx.reference(&r),
        (name, bo) if !ctx.flags.no_backing && (name.is_some() || bo.is_some()) => {
            let bopts = match bo {
                Some(serde_json::Value::Object(o)) => o,
                _ => Opts::new(),
            };
            ctx.open_backing(file, name, None, bopts).await
        }
        _ => return Ok(None),
    };
    node.map(Some)
        .map_err(|e| e.context("Could not open backing file"))
}

/// A read of the header or tables that failed without QEMU's own words:
/// its block layer names the file.
fn open_failed(file: &Arc<Node>, e: Error) -> Error {
    if e.message().is_some() {
        return e;
    }
    e.context(format!("Could not open '{}'", file.filename()))
}

#[async_trait]
impl DriverClass for QcowClass {
    fn name(&self) -> &'static str {
        "qcow"
    }

    fn probe(&self, header: &[u8], _filename: &str) -> u32 {
        if header.len() >= HEADER_LEN && be32(header, 0) == MAGIC && be32(header, 4) == VERSION {
            100
        } else {
            0
        }
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn strong_options(&self) -> &'static [&'static str] {
        &["encrypt.key-secret"]
    }

    fn create_options(&self) -> &'static [OptSpec] {
        create::CREATE_OPTIONS
    }

    async fn create(&self, ctx: &OpenCtx, filename: &str, opts: Opts) -> Result<()> {
        create::create(ctx, filename, opts).await
    }

    fn can_blockdev_create(&self) -> bool {
        true
    }

    fn blockdev_create_check(&self, opts: &Opts) -> Result<()> {
        create::blockdev_create_check(opts)
    }

    async fn blockdev_create(&self, ctx: &OpenCtx, opts: Opts) -> Result<()> {
        create::blockdev_create(ctx, opts).await
    }

    async fn open(&self, ctx: &OpenCtx, opts: &mut Opts) -> Result<Box<dyn Driver>> {
        let file = ctx.file()?;
        let backing_opt = opts.remove("backing");
        let raw = read_at(&file, 0, HEADER_LEN)
            .await
            .map_err(|e| open_failed(&file, e))?;
        let h = Header::parse(raw.as_slice())?;
        let crypto = open_crypto(ctx, h.crypt_method, opts)?;
        let Some(l1_entries) = h.geo.l1_entries(h.size) else {
            return Err(Error::invalid("Image too large"));
        };
        let l1 = tables::read_l1(&file, h.l1_offset, l1_entries)
            .await
            .map_err(|e| open_failed(&file, e))?;
        let name = backing_name(&file, &h)
            .await
            .map_err(|e| open_failed(&file, e))?;
        let backing = open_backing(ctx, &file, name.as_deref(), backing_opt).await?;
        Ok(Box::new(QcowDriver::new(
            file, &h, l1_entries, l1, name, backing, crypto,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_entries_round_trip() {
        let g = Geometry {
            cluster_bits: 12,
            l2_bits: 9,
        };
        let e = g.compressed_entry(0x12345, 4095);
        assert_eq!(g.compressed_extent(e), (0x12345, 4095));
        assert_ne!(e & COMPRESSED, 0);
        assert_eq!(g.l1_entries(10 << 20), Some(5));
        assert_eq!(g.l1_entries(u64::MAX), None);
    }

    #[test]
    fn headers_are_checked_in_qemus_order() {
        let mut h = [0u8; HEADER_LEN];
        assert!(Header::parse(&h).is_err());
        h[..4].copy_from_slice(b"QFI\xfb");
        h[7] = 2;
        let e = Header::parse(&h).err().unwrap();
        assert!(e.to_string().contains("Try the 'qcow2' driver"), "{e}");
        h[7] = 1;
        h[31] = 1;
        assert!(Header::parse(&h)
            .err()
            .unwrap()
            .to_string()
            .contains("too small"));
        h[31] = 0;
        h[30] = 1;
        h[32] = 12;
        h[33] = 14;
        assert!(Header::parse(&h)
            .err()
            .unwrap()
            .to_string()
            .contains("L2 table"));
        h[33] = 9;
        assert!(Header::parse(&h).is_ok());
    }
}
