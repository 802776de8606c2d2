//! Opening qcow2 images (QEMU: qcow2_do_open): the header and its
//! extensions checked, tables validated and loaded, unknown autoclear bits
//! cleared on a read-write open; and the driver class that registers it.

use super::header::{
    Header, AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_CORRUPT, INCOMPAT_DIRTY,
};
use super::header_write::{read_cluster0, write_cluster0};
use super::host_inflight::HostInflight;
use super::meta::{Geometry, Meta, MAX_REFTABLE_BYTES, OFFSET_MASK};
use super::runtime_opts::{cache_slices, RuntimeOpts};
use super::{cache, create, data_file, header};
use super::{Qcow2Class, Qcow2Driver, MAX_L1_BYTES};
use async_lock::Mutex;
use async_trait::async_trait;
use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use strata_block::driver::RepairMode;
use strata_block::options::{OptSpec, Opts};
use strata_block::{
    ChildCell, DebugEvent, Driver, DriverClass, Error, IoBuf, Measure, Node, OpenCtx, OpenFlags,
    Perm, Result, WriteFlags,
};
use tokio::sync::Notify;

#[async_trait]
impl DriverClass for Qcow2Class {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    fn probe(&self, header: &[u8], _filename: &str) -> u32 {
        if header.len() >= 8 && header[..4] == header::MAGIC.to_be_bytes() {
            let v = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
            if v >= 2 {
                return 100;
            }
        }
        0
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn strong_options(&self) -> &'static [&'static str] {
        &["encrypt.key-secret"]
    }

    fn amend_options(&self) -> Option<&'static [OptSpec]> {
        Some(super::amend::AMEND_OPTIONS)
    }

    fn create_options(&self) -> &'static [OptSpec] {
        create::CREATE_OPTIONS
    }

    async fn measure(&self, opts: Opts, input: Option<&Arc<Node>>) -> Result<Measure> {
        super::measure::measure(opts, input).await
    }

    fn child_perms(&self, perm: Perm, shared: Perm, flags: &OpenFlags) -> (Perm, Perm) {
        // Metadata is read and written whatever the guest does, and nobody
        // else may write or resize the file under it (QEMU's rule for formats).
        let mut perm = perm;
        if !flags.no_io {
            perm = perm.with(Perm::CONSISTENT_READ);
        }
        if !flags.read_only {
            perm = perm.with(Perm::WRITE).with(Perm::RESIZE);
        }
        let shared = if flags.force_share {
            Perm::ALL
        } else {
            Perm(shared.0 & !(Perm::WRITE.0 | Perm::RESIZE.0))
        };
        (perm, shared)
    }

    async fn create(&self, ctx: &OpenCtx, filename: &str, opts: Opts) -> Result<()> {
        create::create(ctx, filename, opts).await
    }

    fn can_blockdev_create(&self) -> bool {
        true
    }

    async fn blockdev_create(&self, ctx: &OpenCtx, mut opts: Opts) -> Result<()> {
        let file = opts.remove("file").unwrap_or_default();
        let file = ctx.open_blockdev_ref(file).await?;
        let data = match opts.remove("data-file") {
            None => None,
            Some(r) => match ctx.open_blockdev_ref(r).await {
                Ok(d) => Some(d),
                Err(e) => {
                    let _ = file.close().await;
                    return Err(e);
                }
            },
        };
        let r = create::create_on(ctx, &file, data.as_ref(), create::from_qapi(opts)).await;
        if let Some(d) = data {
            let _ = d.close().await;
        }
        let _ = file.close().await;
        r
    }

    async fn open(&self, ctx: &OpenCtx, opts: &mut Opts) -> Result<Box<dyn Driver>> {
        let file = ctx.file()?;
        let backing_opts = opts.remove("backing");
        let read_only = ctx.flags.read_only;

        let (mut hdr, geo, l1, reftable) = load_metadata(&file, read_only, ctx.flags.check).await?;
        let runtime = RuntimeOpts::take(opts, &geo, hdr.size)?;
        if hdr.stale_bitmaps {
            super::bitmaps::warn_stale(hdr.version);
        }
        if !read_only && !ctx.flags.inactive {
            clear_unknown_autoclear(&file, &mut hdr).await?;
        }
        let external = geo.external_data;
        let crypto = super::encryption::open(ctx, &file, &hdr, opts).await?;
        let data = data_file::open(ctx, opts, &hdr).await?;

        let backing = match (&hdr.backing_file, backing_opts) {
            (_, Some(serde_json::Value::Null)) => None,
            // The name of an open node: this image shares it as its backing file.
            (_, Some(serde_json::Value::String(r))) => Some(
                ctx.reference(&r)
                    .map_err(|e| e.context("Could not open backing file"))?,
            ),
            // Options alone may define a backing file the header does not name.
            (name, bo) if !ctx.flags.no_backing && (name.is_some() || bo.is_some()) => {
                let bopts = match bo {
                    Some(serde_json::Value::Object(o)) => o,
                    _ => Opts::new(),
                };
                let node = ctx
                    .open_backing(&file, name.as_deref(), hdr.backing_format.as_deref(), bopts)
                    .await
                    .map_err(|e| e.context("Could not open backing file"))?;
                Some(node)
            }
            _ => None,
        };

        let host_busy = Arc::new(HostInflight::new());
        let meta = new_meta(geo, &hdr, l1, reftable, read_only, &host_busy, &runtime);
        let dirty = hdr.incompatible_features & INCOMPAT_DIRTY != 0;
        let driver = Qcow2Driver {
            file: ChildCell::new(file),
            data,
            data_raw: external && data_file::is_raw(&hdr),
            backing: std::sync::RwLock::new(backing),
            geo,
            size: AtomicU64::new(hdr.size),
            compression: hdr.compression,
            meta: Mutex::new(meta),
            inflight: std::sync::Mutex::new(BTreeSet::new()),
            host_busy,
            alloc_done: Notify::new(),
            read_only: std::sync::atomic::AtomicBool::new(read_only),
            version: std::sync::atomic::AtomicU32::new(geo.version),
            runtime: std::sync::Mutex::new(runtime),
            crypto,
            metadata_prealloc: tokio::sync::OnceCell::new(),
            node_bitmaps: Default::default(),
            bitmap_dir: Default::default(),
            flushed_epochs: Default::default(),
            planned: AtomicU64::new(0),
            file_released: Default::default(),
        };
        if dirty && !read_only && !ctx.flags.check && !ctx.flags.inactive {
            // Refcounts may lag behind (lazy refcounts): repair before use.
            driver
                .check(RepairMode {
                    leaks: true,
                    errors: true,
                })
                .await
                .map_err(|e| e.context("Could not repair dirty image"))?;
        }
        Ok(Box::new(driver))
    }
}

/// Reads and validates the header and the tables every request needs (L1,
/// refcount table), in QEMU's order and words; at open and again when an
/// inactive node is activated.
pub(super) async fn load_metadata(
    file: &Arc<Node>,
    read_only: bool,
    check: bool,
) -> Result<(Header, Geometry, Vec<u64>, Vec<u64>)> {
    // A short file reads as zeroes past its end, as the header fields QEMU
    // checks then see them.
    let first = file.read(0, IoBuf::zeroed(512)).await?;
    let bits = u32::from_be_bytes([
        first.as_slice()[20],
        first.as_slice()[21],
        first.as_slice()[22],
        first.as_slice()[23],
    ]);
    // Extensions may run past the first 512 bytes: parse the whole cluster.
    let hdr = if (header::MIN_CLUSTER_BITS + 1..=header::MAX_CLUSTER_BITS).contains(&bits) {
        let whole = file.read(0, IoBuf::zeroed(1 << bits)).await?;
        Header::parse(whole.as_slice())?
    } else {
        Header::parse(first.as_slice())?
    };
    let cs = 1u64 << hdr.cluster_bits;
    hdr.check_features()?;
    // A corrupt image is written to only to repair it.
    if hdr.incompatible_features & INCOMPAT_CORRUPT != 0 && !read_only && !check {
        return Err(Error::msg(
            libc::EACCES,
            "qcow2: Image is corrupt; cannot be opened read/write",
        ));
    }
    if hdr.version == 2 && hdr.refcount_order != 4 {
        return Err(Error::invalid(
            "Refcount order must be 4 for version 2 images",
        ));
    }
    let external = data_file::is_external(&hdr);
    let extended_l2 = hdr.incompatible_features & header::INCOMPAT_EXTL2 != 0;
    let geo = Geometry::new(
        hdr.cluster_bits,
        hdr.refcount_order,
        hdr.version,
        external,
        extended_l2,
    );
    if geo.subcluster_size() < 512 {
        return Err(Error::invalid(format!(
            "Unsupported subcluster size: {}",
            geo.subcluster_size()
        )));
    }
    // Tables are validated (and bounded) before anything is allocated by
    // their size, in QEMU's order and words. Tables beyond the end of the
    // file are not an error: they read as zeroes, as in QEMU.
    if hdr.refcount_table_clusters == 0 {
        return Err(Error::invalid(
            "Image does not contain a reference count table",
        ));
    }
    let rt_clusters = hdr.refcount_table_clusters as u64;
    validate_table(
        hdr.refcount_table_offset,
        rt_clusters,
        cs,
        MAX_REFTABLE_BYTES,
        cs,
        "Reference count table",
    )?;
    if !check {
        validate_snapshot_table(&hdr)?;
    }
    validate_table(
        hdr.l1_table_offset,
        hdr.l1_size as u64,
        8,
        MAX_L1_BYTES,
        cs,
        "Active L1 table",
    )?;
    if geo.l1_size_for(hdr.size) > i32::MAX as u64 {
        return Err(Error::msg(libc::EFBIG, "Image is too big"));
    }
    if (hdr.l1_size as u64) < geo.l1_size_for(hdr.size) {
        return Err(Error::invalid("L1 table is too small"));
    }
    let rt_bytes = rt_clusters * cs;
    let l1_bytes = file
        .read(hdr.l1_table_offset, IoBuf::zeroed(hdr.l1_size as usize * 8))
        .await?;
    let l1: Vec<u64> = l1_bytes.as_slice().chunks_exact(8).map(be64).collect();
    file.debug_event(DebugEvent::ReftableLoad).await;
    let rt = file
        .read(hdr.refcount_table_offset, IoBuf::zeroed(rt_bytes as usize))
        .await
        .map_err(|e| e.context("Could not initialize refcount handling"))?;
    let reftable: Vec<u64> = rt.as_slice().chunks_exact(8).map(be64).collect();
    // The snapshot table must read as QEMU reads it at open; check reads
    // (and repairs) it itself.
    if !check {
        super::snapshot::read(file, &hdr).await?;
    }
    Ok((hdr, geo, l1, reftable))
}

/// A writer clears the autoclear bits it does not know (qcow2.txt), as
/// QEMU's open does: whatever they vouch for (bitmaps that saw every write)
/// stops being true with this writer's first write.
pub(super) async fn clear_unknown_autoclear(file: &Arc<Node>, hdr: &mut Header) -> Result<()> {
    if hdr.stale_bitmaps {
        // The extension is dropped with the whole header rewritten (QEMU's
        // need_update_header); the bitmaps' clusters leak.
        hdr.autoclear_features &= AUTOCLEAR_DATA_FILE_RAW;
        hdr.stale_bitmaps = false;
        let cs = 1 << hdr.cluster_bits;
        let bytes = hdr.serialize(cs)?;
        let old = read_cluster0(file, cs).await?;
        return write_cluster0(file, &old, &bytes).await;
    }
    let known = hdr.autoclear_features & (AUTOCLEAR_DATA_FILE_RAW | AUTOCLEAR_BITMAPS);
    if hdr.version < 3 || known == hdr.autoclear_features {
        return Ok(());
    }
    file.write(
        88,
        IoBuf::from_slice(&known.to_be_bytes()),
        WriteFlags::default(),
    )
    .await?;
    file.flush().await?;
    hdr.autoclear_features = known;
    Ok(())
}

/// Fresh in-memory state for the tables read by [`load_metadata`], with
/// caches sized to the image.
pub(super) fn new_meta(
    geo: Geometry,
    hdr: &Header,
    l1: Vec<u64>,
    reftable: Vec<u64>,
    read_only: bool,
    busy: &Arc<HostInflight>,
    runtime: &RuntimeOpts,
) -> Meta {
    let (slice, l2_slices, rb_slices) = cache_slices(&geo, hdr.size, runtime.cache_sizes);
    let l2_tables = super::meta::tables_of(&l1);
    let refblocks = reftable
        .iter()
        .map(|e| e & OFFSET_MASK)
        .filter(|&o| o != 0)
        .collect();
    Meta {
        geo,
        l1,
        reftable,
        l2_cache: cache::TableCache::new(slice, l2_slices),
        rb_cache: cache::TableCache::new(slice, rb_slices),
        free_cluster_index: 0,
        l2_tables,
        refblocks,
        free_byte_offset: 0,
        corrupt: false,
        signaled: false,
        writable: !read_only,
        // The runtime option beats the image's own setting.
        lazy_refcounts: !read_only && runtime.lazy_refcounts(&geo, hdr.compatible_features),
        header: hdr.clone(),
        busy: Arc::clone(busy),
        check_inactive_l2: runtime.check_inactive_l2,
    }
}

/// The snapshot table's header fields, checked before use.
pub(super) fn validate_snapshot_table(hdr: &Header) -> Result<()> {
    let cs = 1u64 << hdr.cluster_bits;
    validate_table(
        hdr.snapshots_offset,
        hdr.nb_snapshots as u64,
        40,
        40 * 65536,
        cs,
        "Snapshot table",
    )
}

/// QEMU's qcow2_validate_table: bounded size, offset aligned and not overflowing.
pub(super) fn validate_table(
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    cs: u64,
    name: &str,
) -> Result<()> {
    if entries > max_bytes / entry_len {
        return Err(Error::msg(libc::EFBIG, format!("{name} too large")));
    }
    if (i64::MAX as u64) - entries * entry_len < offset || !offset.is_multiple_of(cs) {
        return Err(Error::invalid(format!("{name} offset invalid")));
    }
    Ok(())
}

pub(super) fn be64(c: &[u8]) -> u64 {
    u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
}
