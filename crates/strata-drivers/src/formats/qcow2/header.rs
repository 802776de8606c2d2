//! The qcow2 header and its extensions (docs/interop/qcow2.txt), parsed from
//! and written back to the first cluster. Unknown extensions are kept and
//! written back unchanged.

use strata_block::{Error, Result};

/// "QFI\xfb"
pub const MAGIC: u32 = 0x5146_49fb;
/// Incompatible feature: refcounts may be inconsistent (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: the image is corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: non-default compression type.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: extended L2 entries.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature: bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature: raw external data.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension: end of the area.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Full disk encryption header pointer: where the LUKS header lives.
pub const EXT_CRYPTO_HEADER: u32 = 0x0537_be77;
/// Header extension: where the persistent bitmaps' directory is.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Most bitmaps an image may have (QCOW2_MAX_BITMAPS).
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory (QCOW2_MAX_BITMAP_DIRECTORY_SIZE).
pub const MAX_BITMAP_DIR_SIZE: u64 = 1024 * MAX_BITMAPS as u64;

/// The bitmaps extension: the directory of the persistent bitmaps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub dir_size: u64,
    pub dir_offset: u64,
}

/// `crypt_method`: none, qcow's legacy AES, LUKS.
pub const CRYPT_NONE: u32 = 0;
pub const CRYPT_AES: u32 = 1;
pub const CRYPT_LUKS: u32 = 2;

/// Names of the features Strata knows, for the feature name table it writes
/// (type, bit, name) in the order QEMU writes them.
pub const FEATURE_NAMES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// Compression types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (QEMU calls it zlib).
    Zlib,
    /// zstd.
    Zstd,
}

impl Compression {
    /// The name `info` prints.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// A header extension kept as bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extension {
    /// The type magic.
    pub kind: u32,
    /// The data, without padding.
    pub data: Vec<u8>,
}

/// The parsed header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
    /// Bytes of additional header fields beyond those we know, kept as-is.
    pub extra_fields: Vec<u8>,
    /// Extensions other than the backing format, the data file name and
    /// the feature table.
    pub extensions: Vec<Extension>,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    /// Feature names the image itself declares (type, bit, name).
    pub feature_table: Vec<(u8, u8, String)>,
    /// The LUKS header's clusters (offset, length in bytes).
    pub crypto_header: Option<(u64, u64)>,
    /// The persistent bitmaps' directory, when the autoclear bit vouches
    /// for it.
    pub bitmaps: Option<BitmapsExt>,
    /// A bitmaps extension was there without its autoclear bit: a program
    /// without bitmap support wrote the image; it is dropped.
    pub stale_bitmaps: bool,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn be64(b: &[u8], off: usize) -> u64 {
    (be32(b, off) as u64) << 32 | be32(b, off + 4) as u64
}

/// Largest cluster size QEMU accepts (2 MiB) and smallest (512 B).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;

impl Header {
    /// Parses the header from the first bytes of the image (`buf` holds at
    /// least the first cluster, or the whole file if shorter).
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < 72 || be32(buf, 0) != MAGIC {
            return Err(Error::msg(libc::EINVAL, "Image is not in qcow2 format"));
        }
        let version = be32(buf, 4);
        if !(2..=3).contains(&version) {
            return Err(Error::unsupported(format!(
                "Unsupported qcow2 version {version}"
            )));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::invalid(format!(
                "Unsupported cluster size: 2^{cluster_bits}"
            )));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 72,
            compression: Compression::Zlib,
            extra_fields: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_table: Vec::new(),
            crypto_header: None,
            bitmaps: None,
            stale_bitmaps: false,
        };
        let cluster_size = 1usize << cluster_bits;
        if version >= 3 {
            if buf.len() < 104 {
                return Err(Error::invalid("qcow2 header exceeds cluster size"));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 {
                return Err(Error::invalid("qcow2 header too short"));
            }
            if h.header_length as usize > cluster_size || h.header_length as usize > buf.len() {
                return Err(Error::invalid("qcow2 header exceeds cluster size"));
            }
            if h.header_length > 104 {
                let t = buf[104];
                h.compression = match t {
                    0 => Compression::Zlib,
                    1 => Compression::Zstd,
                    _ => {
                        return Err(Error::unsupported(format!(
                            "qcow2: unknown compression type: {t}"
                        )))
                    }
                };
                h.extra_fields = buf[105..h.header_length as usize].to_vec();
            }
            let has_bit = h.incompatible_features & INCOMPAT_COMPRESSION != 0;
            if has_bit != (h.compression != Compression::Zlib) {
                return Err(Error::invalid(
                    "qcow2: Compression type incompatible feature bit and the compression type field do not agree",
                ));
            }
        }
        if h.refcount_order > 6 {
            return Err(Error::invalid(
                "Reference count entry width too large; may not exceed 64 bits",
            ));
        }
        if h.backing_file_offset > cluster_size as u64 {
            return Err(Error::invalid("Invalid backing file offset"));
        }
        h.parse_extensions(buf, cluster_size)?;
        if h.backing_file_offset != 0 {
            let off = h.backing_file_offset as usize;
            let len = h.backing_file_size as usize;
            if len > 1023 || off >= cluster_size || off + len > cluster_size.min(buf.len()) {
                return Err(Error::invalid("Backing file name too long"));
            }
            h.backing_file = Some(String::from_utf8_lossy(&buf[off..off + len]).into_owned());
        }
        Ok(h)
    }

    fn parse_extensions(&mut self, buf: &[u8], cluster_size: usize) -> Result<()> {
        let end = if self.backing_file_offset != 0 {
            (self.backing_file_offset as usize).min(cluster_size)
        } else {
            cluster_size
        }
        .min(buf.len());
        let mut off = self.header_length as usize;
        // As QEMU's qcow2_read_extensions: an extension's own header may
        // not cross the end of the area either.
        let too_large = || Error::invalid("Header extension too large");
        while off < end {
            if off + 8 > buf.len() {
                return Err(too_large());
            }
            let kind = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            off += 8;
            if off > end || len > end - off {
                return Err(too_large());
            }
            if kind == EXT_END {
                break;
            }
            let data = buf[off..off + len].to_vec();
            off += len.div_ceil(8) * 8;
            match kind {
                EXT_BACKING_FORMAT => {
                    self.backing_format = Some(String::from_utf8_lossy(&data).into_owned())
                }
                EXT_FEATURE_TABLE => {
                    // As QEMU reads it: a short last entry is padded with
                    // zeroes, and an entry without a name ends the table.
                    let mut data = data;
                    data.resize(data.len().div_ceil(48) * 48, 0);
                    for e in data.chunks_exact(48) {
                        let name = e[2..].split(|&b| b == 0).next().unwrap_or(&[]);
                        if name.is_empty() {
                            break;
                        }
                        self.feature_table.push((
                            e[0],
                            e[1],
                            String::from_utf8_lossy(name).into_owned(),
                        ));
                    }
                }
                EXT_DATA_FILE => self.data_file = Some(String::from_utf8_lossy(&data).into_owned()),
                EXT_CRYPTO_HEADER => {
                    // QEMU's checks (qcow2_read_extensions).
                    if self.crypt_method != CRYPT_LUKS {
                        return Err(Error::invalid(
                            "CRYPTO header extension only expected with LUKS encryption method",
                        ));
                    }
                    if data.len() != 16 {
                        return Err(Error::invalid(format!(
                            "CRYPTO header extension size {}, but expected size 16",
                            data.len()
                        )));
                    }
                    let offset = u64::from_be_bytes(data[..8].try_into().unwrap());
                    let length = u64::from_be_bytes(data[8..].try_into().unwrap());
                    if offset % cluster_size as u64 != 0 {
                        return Err(Error::invalid(format!(
                            "Encryption header offset '{offset}' is not a multiple of cluster size '{cluster_size}'"
                        )));
                    }
                    self.crypto_header = Some((offset, length));
                }
                EXT_BITMAPS => self.parse_bitmaps_ext(&data, cluster_size)?,
                _ => self.extensions.push(Extension { kind, data }),
            }
        }
        Ok(())
    }

    /// The bitmaps extension with QEMU's checks (qcow2_read_extensions).
    fn parse_bitmaps_ext(&mut self, data: &[u8], cluster_size: usize) -> Result<()> {
        if data.len() != 24 {
            return Err(Error::invalid("bitmaps_ext: Invalid extension length"));
        }
        if self.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            self.stale_bitmaps = true;
            return Ok(());
        }
        if be32(data, 4) != 0 {
            return Err(Error::invalid("bitmaps_ext: Reserved field is not zero"));
        }
        let ext = BitmapsExt {
            nb_bitmaps: be32(data, 0),
            dir_size: be64(data, 8),
            dir_offset: be64(data, 16),
        };
        if ext.nb_bitmaps > MAX_BITMAPS {
            return Err(Error::invalid(format!(
                "bitmaps_ext: Image has {} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}",
                ext.nb_bitmaps
            )));
        }
        if ext.nb_bitmaps == 0 {
            return Err(Error::invalid("found bitmaps extension with zero bitmaps"));
        }
        if !ext.dir_offset.is_multiple_of(cluster_size as u64) {
            return Err(Error::invalid(
                "bitmaps_ext: invalid bitmap directory offset",
            ));
        }
        if ext.dir_size > MAX_BITMAP_DIR_SIZE {
            return Err(Error::invalid(format!(
                "bitmaps_ext: bitmap directory size ({}) exceeds the maximum supported size ({MAX_BITMAP_DIR_SIZE})",
                ext.dir_size
            )));
        }
        self.bitmaps = Some(ext);
        Ok(())
    }

    /// Refuses features Strata cannot honour, by name as the image declares it.
    pub fn check_features(&self) -> Result<()> {
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2;
        let unknown = self.incompatible_features & !known;
        if unknown != 0 {
            // As QEMU's report_unsupported_feature: the image's own names,
            // in its table's order, then the bits left as one mask.
            let mut mask = unknown;
            let mut names: Vec<String> = Vec::new();
            for (ty, bit, name) in &self.feature_table {
                if *ty == 0 && *bit < 64 && mask & (1u64 << bit) != 0 {
                    names.push(name.chars().take(46).collect());
                    mask &= !(1u64 << bit);
                }
            }
            if mask != 0 {
                names.push(format!("Unknown incompatible feature: {mask:x}"));
            }
            return Err(Error::unsupported(format!(
                "Unsupported qcow2 feature(s): {}",
                names.join(", ")
            )));
        }
        match self.crypt_method {
            CRYPT_NONE | CRYPT_AES => {}
            CRYPT_LUKS if self.crypto_header.is_some() => {}
            CRYPT_LUKS => return Err(Error::invalid("Missing CRYPTO header for crypt method 2")),
            m => return Err(Error::invalid(format!("Unsupported encryption method {m}"))),
        }
        Ok(())
    }

    /// Serialises the header and its extensions into one cluster-sized buffer
    /// (the backing file name goes after the extensions).
    pub fn serialize(&mut self, cluster_size: usize) -> Result<Vec<u8>> {
        self.serialize_with(cluster_size, true)
    }

    /// [`Header::serialize`], the feature name table left out if
    /// `feature_table` is false: it only names bits for messages, and a
    /// header without it is short enough to rewrite in one sector.
    pub fn serialize_with(&mut self, cluster_size: usize, feature_table: bool) -> Result<Vec<u8>> {
        let mut b = vec![0u8; cluster_size];
        let put32 =
            |b: &mut [u8], off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut [u8], off: usize, v: u64| b[off..off + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        let mut off = 72;
        if self.version >= 3 {
            put64(&mut b, 72, self.incompatible_features);
            put64(&mut b, 80, self.compatible_features);
            put64(&mut b, 88, self.autoclear_features);
            put32(&mut b, 96, self.refcount_order);
            let len = (105 + self.extra_fields.len()).div_ceil(8) * 8;
            self.header_length = len.max(112) as u32;
            put32(&mut b, 100, self.header_length);
            b[104] = match self.compression {
                Compression::Zlib => 0,
                Compression::Zstd => 1,
            };
            b[105..105 + self.extra_fields.len()].copy_from_slice(&self.extra_fields);
            off = self.header_length as usize;
        }
        let mut exts: Vec<Extension> = Vec::new();
        if let Some(f) = &self.backing_format {
            exts.push(Extension {
                kind: EXT_BACKING_FORMAT,
                data: f.as_bytes().to_vec(),
            });
        }
        // The data file name follows the backing format, as QEMU writes them.
        if let Some(f) = &self.data_file {
            exts.push(Extension {
                kind: EXT_DATA_FILE,
                data: f.as_bytes().to_vec(),
            });
        }
        if let Some((offset, length)) = self.crypto_header {
            let mut data = offset.to_be_bytes().to_vec();
            data.extend_from_slice(&length.to_be_bytes());
            exts.push(Extension {
                kind: EXT_CRYPTO_HEADER,
                data,
            });
        }
        // QEMU leaves the feature table out of images with clusters of 4 KiB
        // or less, to keep room for the backing file name; extensions it
        // does not know go after it.
        if self.version >= 3 && cluster_size > 4096 && feature_table {
            let mut t = Vec::new();
            for (ty, bit, name) in FEATURE_NAMES {
                let mut e = [0u8; 48];
                e[0] = *ty;
                e[1] = *bit;
                e[2..2 + name.len()].copy_from_slice(name.as_bytes());
                t.extend_from_slice(&e);
            }
            exts.push(Extension {
                kind: EXT_FEATURE_TABLE,
                data: t,
            });
        }
        if let Some(bm) = self.bitmaps.filter(|b| b.nb_bitmaps > 0) {
            let mut data = bm.nb_bitmaps.to_be_bytes().to_vec();
            data.extend_from_slice(&[0; 4]);
            data.extend_from_slice(&bm.dir_size.to_be_bytes());
            data.extend_from_slice(&bm.dir_offset.to_be_bytes());
            exts.push(Extension {
                kind: EXT_BITMAPS,
                data,
            });
        }
        exts.extend(self.extensions.iter().cloned());
        let too_big = || Error::invalid("Header extensions do not fit in the first cluster");
        for e in exts.iter().chain(std::iter::once(&Extension {
            kind: EXT_END,
            data: Vec::new(),
        })) {
            let padded = e.data.len().div_ceil(8) * 8;
            if off + 8 + padded > cluster_size {
                return Err(too_big());
            }
            put32(&mut b, off, e.kind);
            put32(&mut b, off + 4, e.data.len() as u32);
            b[off + 8..off + 8 + e.data.len()].copy_from_slice(&e.data);
            off += 8 + padded;
        }
        match &self.backing_file {
            Some(name) => {
                if off + name.len() > cluster_size || name.len() > 1023 {
                    return Err(Error::invalid("Backing file name too long"));
                }
                b[off..off + name.len()].copy_from_slice(name.as_bytes());
                self.backing_file_offset = off as u64;
                self.backing_file_size = name.len() as u32;
            }
            None => {
                self.backing_file_offset = 0;
                self.backing_file_size = 0;
            }
        }
        put64(&mut b, 8, self.backing_file_offset);
        put32(&mut b, 16, self.backing_file_size);
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        let mut h = Header::parse(&{
            let mut b = vec![0u8; 512];
            b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
            b[4..8].copy_from_slice(&3u32.to_be_bytes());
            b[20..24].copy_from_slice(&16u32.to_be_bytes());
            b[96..100].copy_from_slice(&4u32.to_be_bytes());
            b[100..104].copy_from_slice(&112u32.to_be_bytes());
            b
        })
        .unwrap();
        h.backing_file = Some("base.qcow2".into());
        h.backing_format = Some("qcow2".into());
        h
    }

    #[test]
    fn round_trip_keeps_backing_and_format() {
        let mut h = sample();
        let b = h.serialize(65536).unwrap();
        let p = Header::parse(&b).unwrap();
        assert!(Header::parse(&sample().serialize(512).unwrap())
            .unwrap()
            .feature_table
            .is_empty());
        assert_eq!(p.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(p.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(p.feature_table.len(), FEATURE_NAMES.len());
    }

    #[test]
    fn data_file_name_follows_the_backing_format() {
        let mut h = sample();
        h.data_file = Some("disk.data".into());
        h.incompatible_features |= INCOMPAT_DATA_FILE;
        let b = h.serialize(65536).unwrap();
        let p = Header::parse(&b).unwrap();
        assert_eq!(p.data_file.as_deref(), Some("disk.data"));
        // Kept by name, not a second time as an unknown extension.
        assert!(p.extensions.is_empty());
        assert!(p.check_features().is_ok());
        let at = |kind: u32| b.windows(4).position(|w| w == kind.to_be_bytes()).unwrap();
        assert!(at(EXT_BACKING_FORMAT) < at(EXT_DATA_FILE));
        assert!(at(EXT_DATA_FILE) < at(EXT_FEATURE_TABLE));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(Header::parse(&[0u8; 10]).is_err());
        let mut b = sample().serialize(65536).unwrap();
        b[20..24].copy_from_slice(&40u32.to_be_bytes());
        assert!(Header::parse(&b).is_err());
    }

    #[test]
    fn unknown_incompatible_bit_is_named() {
        let mut h = sample();
        h.incompatible_features |= 1 << 10;
        h.feature_table.push((0, 10, "teleportation".into()));
        let e = h.check_features().unwrap_err();
        assert!(e.to_string().contains("teleportation"), "{e}");
    }
}
