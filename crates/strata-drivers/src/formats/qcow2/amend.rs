//! `qemu-img amend` for qcow2 (QEMU: qcow2_amend_options): the version
//! both ways, lazy refcounts, the size, the data file's name and raw flag.
//! Upgrades run first and the downgrade last, so that what v2 lacks can be
//! removed before it is declared. Each step leaves a valid image behind:
//! the header is the last thing written.

use super::header::{Compression, AUTOCLEAR_DATA_FILE_RAW};
use super::header::{COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_DIRTY};
use super::meta::{Meta, OFFSET_MASK, OFLAG_COPIED, OFLAG_ZERO};
use super::Qcow2Driver;
use crate::formats::crypto::{amend_luks, take_luks_amend};
use std::sync::atomic::Ordering;
use strata_block::options::{take_bool, take_size, take_str, take_u64, OptSpec, OptType, Opts};
use strata_block::{Driver, Error, IoBuf, Preallocation, Result, WriteFlags};
use strata_crypto::luks_amend::AmendOptions;

const fn spec(name: &'static str, ty: OptType, help: &'static str) -> OptSpec {
    OptSpec {
        name,
        ty,
        help,
        default: None,
    }
}

/// QEMU's qcow2_amend_opts: the LUKS keyslot options, then the options
/// every qcow2 image has.
pub const AMEND_OPTIONS: &[OptSpec] = &[
    spec(
        "encrypt.state",
        OptType::Str,
        "Select new state of affected keyslots (active/inactive)",
    ),
    spec(
        "encrypt.keyslot",
        OptType::Number,
        "Select a single keyslot to modify explicitly",
    ),
    spec(
        "encrypt.old-secret",
        OptType::Str,
        "Select all keyslots that match this password",
    ),
    spec(
        "encrypt.new-secret",
        OptType::Str,
        "New secret to set in the matching keyslots. Empty string to erase",
    ),
    spec(
        "encrypt.iter-time",
        OptType::Number,
        "Time to spend in PBKDF in milliseconds",
    ),
    spec("size", OptType::Size, "Virtual disk size"),
    spec(
        "compat",
        OptType::Str,
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    spec("backing_file", OptType::Str, "File name of a base image"),
    spec(
        "backing_fmt",
        OptType::Str,
        "Image format of the base image",
    ),
    spec(
        "data_file",
        OptType::Str,
        "File name of an external data file",
    ),
    spec(
        "data_file_raw",
        OptType::Bool,
        "The external data file must stay valid as a raw image",
    ),
    super::create::LAZY_REFCOUNTS_OPT,
    super::create::REFCOUNT_BITS_OPT,
];

/// What the user asked to change.
struct Wanted {
    version: u32,
    size: Option<u64>,
    backing_file: Option<String>,
    backing_fmt: Option<String>,
    data_file: Option<String>,
    data_file_raw: bool,
    lazy: bool,
    refcount_bits: u64,
    /// Key slot changes (LUKS images).
    encryption: Option<AmendOptions>,
}

impl Qcow2Driver {
    /// Whether `x-blockdev-amend` can apply `opts` here (QEMU's checks in
    /// qcow2_co_amend, made before any I/O): only the key slots of a
    /// LUKS-encrypted image change.
    pub(super) fn amend_qapi_check(&self, opts: &Opts) -> Result<()> {
        let Some(enc) = opts.get("encrypt") else {
            return Ok(());
        };
        let Some(crypto) = &self.crypto else {
            return Err(Error::unsupported("image is not encrypted, can't amend"));
        };
        if enc.get("format").and_then(|f| f.as_str()) != Some("luks") {
            return Err(Error::unsupported(
                "Amend can't be used to change the qcow2 encryption format",
            ));
        }
        if !crypto.is_luks() {
            return Err(Error::unsupported(
                "Only LUKS encryption options can be amended for qcow2 with blockdev-amend",
            ));
        }
        Ok(())
    }

    /// `x-blockdev-amend` (QEMU: qcow2_co_amend), once checked.
    pub(super) async fn amend_qapi(&self, mut opts: Opts, force: bool) -> Result<()> {
        self.amend_qapi_check(&opts)?;
        let Some(serde_json::Value::Object(enc)) = opts.remove("encrypt") else {
            return Ok(());
        };
        let keys = enc
            .into_iter()
            .filter(|(k, _)| k != "format")
            .map(|(k, v)| (format!("encrypt.{k}"), v))
            .collect();
        self.amend_image(keys, force, &|_, _| {}).await
    }

    pub(super) async fn amend_image(
        &self,
        mut opts: Opts,
        force: bool,
        status: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<()> {
        let w = self.wanted(&mut opts).await?;
        let old_version = self.version.load(Ordering::Acquire);
        let old_bits = 1u64 << self.meta.lock().await.geo.refcount_order;
        let steps = Steps::new(
            status,
            u64::from(w.version != old_version)
                + u64::from(w.refcount_bits != old_bits)
                + u64::from(w.encryption.is_some()),
        );
        if w.version > old_version {
            self.upgrade(&|o, t| steps.report(Step::Upgrade, o, t))
                .await?;
        }
        if w.refcount_bits != old_bits {
            if w.version < 3 && w.refcount_bits != 16 {
                return Err(Error::invalid(
                    "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
                ));
            }
            let mut m = self.meta.lock().await;
            self.change_refcount_order(&mut m, w.refcount_bits.trailing_zeros(), &|o, t| {
                steps.report(Step::RefcountOrder, o, t)
            })
            .await?;
        }
        {
            let mut m = self.meta.lock().await;
            if w.data_file_raw {
                m.header.autoclear_features |= AUTOCLEAR_DATA_FILE_RAW;
            } else {
                m.header.autoclear_features &= !AUTOCLEAR_DATA_FILE_RAW;
            }
            if let Some(d) = &w.data_file {
                m.header.data_file = (!d.is_empty()).then(|| d.clone());
            }
            self.write_header(&mut m)
                .await
                .map_err(|e| e.context("Failed to update the image header"))?;
            if w.backing_file.is_some() || w.backing_fmt.is_some() {
                let same = w.backing_file == m.header.backing_file
                    && w.backing_fmt == m.header.backing_format;
                if !same {
                    return Err(Error::invalid(
                        "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
                    ));
                }
            }
            if m.lazy_refcounts != w.lazy {
                self.set_lazy_refcounts(&mut m, w.lazy, w.version).await?;
            }
        }
        if let Some(size) = w.size.filter(|&s| s != 0) {
            // Amending promises exactly the size given.
            self.truncate(size, true, Preallocation::Off).await?;
        }
        if w.version < old_version {
            self.downgrade(&|o, t| steps.report(Step::Downgrade, o, t))
                .await?;
        }
        // Key slots last, as QEMU changes them.
        if let (Some(o), Some(c), Some((off, len))) = (
            &w.encryption,
            &self.crypto,
            self.meta.lock().await.header.crypto_header,
        ) {
            amend_luks(&self.file.get(), off, len, c, o, force).await?;
        }
        Ok(())
    }

    /// Reads the options set, with the image's own values for the rest.
    async fn wanted(&self, opts: &mut Opts) -> Result<Wanted> {
        let m = self.meta.lock().await;
        let mut w = Wanted {
            version: m.geo.version,
            size: None,
            backing_file: None,
            backing_fmt: None,
            data_file: None,
            data_file_raw: self.data_raw,
            lazy: m.lazy_refcounts,
            refcount_bits: 1 << m.geo.refcount_order,
            encryption: None,
        };
        drop(m);
        if opts.keys().any(|k| k.starts_with("encrypt.")) {
            match &self.crypto {
                None => {
                    return Err(Error::invalid(
                        "Can't amend encryption options - encryption not present",
                    ))
                }
                Some(c) if !c.is_luks() => {
                    return Err(Error::unsupported(
                        "Only LUKS encryption options can be amended",
                    ))
                }
                Some(_) => w.encryption = Some(take_luks_amend(opts, "encrypt.")?),
            }
        }
        if let Some(c) = take_str(opts, "compat")? {
            w.version = match c.as_str() {
                "0.10" | "v2" => 2,
                "1.1" | "v3" => 3,
                _ => return Err(Error::invalid(format!("Unknown compatibility level {c}"))),
            };
        }
        w.size = take_size(opts, "size")?;
        w.backing_file = take_str(opts, "backing_file")?;
        w.backing_fmt = take_str(opts, "backing_fmt")?;
        if let Some(l) = take_bool(opts, "lazy_refcounts")? {
            w.lazy = l;
        }
        if let Some(b) = take_u64(opts, "refcount_bits")? {
            if b == 0 || b > 64 || !b.is_power_of_two() {
                return Err(Error::invalid(
                    "Refcount width must be a power of two and may not exceed 64 bits",
                ));
            }
            w.refcount_bits = b;
        }
        if let Some(d) = take_str(opts, "data_file")? {
            if !self.geo.external_data {
                return Err(Error::invalid(
                    "data-file can only be set for images that use an external data file",
                ));
            }
            w.data_file = Some(d);
        }
        if let Some(raw) = take_bool(opts, "data_file_raw")? {
            if raw && !self.data_raw {
                return Err(Error::invalid(
                    "data-file-raw cannot be set on existing images",
                ));
            }
            w.data_file_raw = raw;
        }
        Ok(w)
    }

    async fn set_lazy_refcounts(&self, m: &mut Meta, on: bool, version: u32) -> Result<()> {
        if on {
            if version < 3 {
                return Err(Error::invalid(
                    "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
                ));
            }
            m.header.compatible_features |= COMPAT_LAZY_REFCOUNTS;
        } else {
            // Clean first: the refcounts on disk must be right before
            // nothing allows them to lag any more.
            m.set_incompatible(&self.file.get(), INCOMPAT_DIRTY, false)
                .await
                .map_err(|e| e.context("Failed to make the image clean"))?;
            m.header.compatible_features &= !COMPAT_LAZY_REFCOUNTS;
        }
        if let Err(e) = self.write_header(m).await {
            m.header.compatible_features ^= COMPAT_LAZY_REFCOUNTS;
            return Err(e.context("Failed to update the image header"));
        }
        m.lazy_refcounts = on;
        Ok(())
    }

    /// QEMU: qcow2_upgrade. v3 snapshot entries carry the disk size and a
    /// 64-bit VM state size: a table written without them is written anew.
    async fn upgrade(&self, status: &(dyn Fn(u64, u64) + Send + Sync)) -> Result<()> {
        status(0, 2);
        let mut m = self.meta.lock().await;
        let (list, old_len) = super::snapshot::read(&self.file.get(), &m.header).await?;
        if list.iter().any(|s| s.short_extra) {
            self.write_snapshot_table(&mut m, &list, old_len)
                .await
                .map_err(|e| e.context("Failed to update the snapshot table"))?;
        }
        status(1, 2);
        m.header.version = 3;
        m.header.refcount_order = m.geo.refcount_order;
        if let Err(e) = self.write_header(&mut m).await {
            m.header.version = 2;
            return Err(e.context("Failed to update the image header"));
        }
        m.geo.version = 3;
        self.version.store(3, Ordering::Release);
        status(2, 2);
        Ok(())
    }

    /// QEMU: qcow2_downgrade.
    async fn downgrade(&self, status: &(dyn Fn(u64, u64) + Send + Sync)) -> Result<()> {
        let mut m = self.meta.lock().await;
        if m.geo.refcount_order != 4 {
            return Err(Error::unsupported("compat=0.10 requires refcount_bits=16"));
        }
        if self.geo.external_data {
            return Err(Error::unsupported(
                "Cannot downgrade an image with a data file",
            ));
        }
        let (list, _) = super::snapshot::read(&self.file.get(), &m.header).await?;
        let size = self.length();
        if list
            .iter()
            .any(|s| s.info.vm_state_size > u32::MAX as u64 || s.disk_size != size)
        {
            return Err(Error::unsupported(
                "Internal snapshots prevent downgrade of image",
            ));
        }
        if m.header.incompatible_features & INCOMPAT_DIRTY != 0 {
            m.set_incompatible(&self.file.get(), INCOMPAT_DIRTY, false)
                .await
                .map_err(|e| e.context("Failed to make the image clean"))?;
        }
        let other = m.header.incompatible_features & !INCOMPAT_COMPRESSION;
        if other != 0 {
            return Err(Error::unsupported(format!(
                "Cannot downgrade an image with incompatible features {other:#x} set"
            )));
        }
        m.header.compatible_features = 0;
        m.lazy_refcounts = false;
        m.header.autoclear_features = 0;
        self.expand_zero_clusters(&mut m, &list, status)
            .await
            .map_err(|e| e.context("Failed to turn zero into data clusters"))?;
        if m.header.incompatible_features & INCOMPAT_COMPRESSION != 0 {
            if self.has_compressed_clusters(&mut m).await? {
                return Err(Error::unsupported(
                    "Cannot downgrade an image with zstd compression type and existing compressed clusters",
                ));
            }
            m.header.incompatible_features &= !INCOMPAT_COMPRESSION;
            m.header.compression = Compression::Zlib;
        }
        m.header.version = 2;
        if let Err(e) = self.write_header(&mut m).await {
            m.header.version = 3;
            return Err(e.context("Failed to update the image header"));
        }
        m.geo.version = 2;
        self.version.store(2, Ordering::Release);
        Ok(())
    }

    /// Whether any L2 entry of the active table is compressed.
    async fn has_compressed_clusters(&self, m: &mut Meta) -> Result<bool> {
        let clusters = self.length().div_ceil(self.geo.cluster_size);
        for gc in 0..clusters {
            if matches!(
                m.mapping(&self.file.get(), gc).await?,
                super::meta::Mapping::Compressed(_)
            ) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// QEMU: qcow2_expand_zero_clusters. v2 has no zero flag: every zero
    /// cluster of the active table and of each snapshot's becomes a
    /// cluster of zeroes, or, without a backing file, unallocated (which
    /// reads as zeroes there). Zeroes are on disk before an entry points
    /// to them. `status` counts L1 entries visited.
    async fn expand_zero_clusters(
        &self,
        m: &mut Meta,
        snapshots: &[super::snapshot::Snapshot],
        status: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<()> {
        m.flush_l2_cache(&self.file.get()).await?;
        m.l2_cache.clear();
        let mut tables: Vec<Vec<u64>> = vec![m.l1.clone()];
        for sn in snapshots {
            match self.read_snapshot_l1(sn).await {
                Ok(l1) => tables.push(l1),
                // A table QEMU would not read is named before the amend
                // fails (a read error has no words of its own).
                Err(e) => {
                    if e.message().is_some() {
                        strata_block::report::error_report(e.to_string());
                    }
                    return Err(Error::errno(e.code()));
                }
            }
        }
        let total: u64 = tables.iter().map(|t| t.len() as u64).sum();
        let mut visited = 0;
        for l1 in &tables {
            for &e in l1 {
                let l2 = e & OFFSET_MASK;
                if l2 != 0 {
                    self.expand_in_table(m, l2).await?;
                }
                visited += 1;
                status(visited, total);
            }
        }
        // Tables were changed on disk, around the cache: read them afresh.
        m.l2_cache.clear();
        m.flush(&self.file.get()).await
    }

    async fn expand_in_table(&self, m: &mut Meta, l2: u64) -> Result<()> {
        let cs = self.geo.cluster_size;
        if !l2.is_multiple_of(cs) {
            let e = Error::corrupt(format!("L2 table offset {l2:#x} unaligned (L1 index)"));
            return Err(m.signal_corruption(&self.file.get(), e).await);
        }
        let l2_refcount = m.refcount(&self.file.get(), l2 / cs).await?;
        let mut table = self.file.get().read(l2, IoBuf::zeroed(cs as usize)).await?;
        let has_backing = self.backing().is_some();
        let mut dirty = false;
        for j in 0..(cs as usize / 8) {
            let b = &table.as_slice()[j * 8..j * 8 + 8];
            let entry = u64::from_be_bytes(b.try_into().unwrap_or_default());
            if entry & OFLAG_ZERO == 0 || entry & super::meta::OFLAG_COMPRESSED != 0 {
                continue;
            }
            let mut host = entry & OFFSET_MASK;
            let new = if host == 0 && !has_backing {
                0
            } else {
                if host == 0 {
                    host = m.alloc_clusters(&self.file.get(), 1).await?;
                    if l2_refcount > 1 {
                        // A shared table: the cluster is shared as widely.
                        m.update_refcounts(&self.file.get(), host, 1, l2_refcount as i64 - 1)
                            .await?;
                    }
                }
                m.check_metadata_write(&self.file.get(), host, cs).await?;
                self.file
                    .get()
                    .write_zeroes(host, cs, WriteFlags::default())
                    .await?;
                if l2_refcount == 1 {
                    host | OFLAG_COPIED
                } else {
                    host
                }
            };
            table.as_mut_slice()[j * 8..j * 8 + 8].copy_from_slice(&new.to_be_bytes());
            dirty = true;
        }
        if dirty {
            // The zeroes and their refcounts are stable before the table
            // points to them.
            m.flush_refcounts(&self.file.get()).await?;
            self.file.get().flush().await?;
            self.file
                .get()
                .write(l2, table, WriteFlags::default())
                .await?;
        }
        Ok(())
    }
}

/// The parts of one amend, for its progress.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    Upgrade,
    RefcountOrder,
    Downgrade,
}

/// One progress report over all the parts of an amend (QEMU:
/// qcow2_amend_helper_cb): the parts done count with their own work
/// size, the parts to come are projected from the average so far.
struct Steps<'a> {
    status: &'a (dyn Fn(u64, u64) + Send + Sync),
    total: u64,
    state: std::sync::Mutex<StepsState>,
}

#[derive(Default)]
struct StepsState {
    last: Option<Step>,
    offset_completed: u64,
    completed: u64,
    last_size: u64,
}

impl<'a> Steps<'a> {
    fn new(status: &'a (dyn Fn(u64, u64) + Send + Sync), total: u64) -> Steps<'a> {
        Steps {
            status,
            total: total.max(1),
            state: Default::default(),
        }
    }

    fn report(&self, step: Step, offset: u64, size: u64) {
        let (done, all) = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if s.last != Some(step) {
                if s.last.is_some() {
                    s.offset_completed += s.last_size;
                    s.completed += 1;
                }
                s.last = Some(step);
            }
            s.last_size = size;
            let current = s.offset_completed + size;
            let left = self.total.saturating_sub(s.completed + 1);
            let projected = current * left / (s.completed + 1);
            (s.offset_completed + offset, current + projected)
        };
        (self.status)(done, all);
    }
}
