//! The options a qcow2 node takes at open and again at every reopen
//! (QEMU: qcow2_update_options_prepare): the metadata cache sizes, lazy
//! refcounts, overlap checks and discard handling, checked in QEMU's
//! order and words; and putting new ones in force on an open image.

use super::cache_opts::CacheSizes;
use super::header::{COMPAT_LAZY_REFCOUNTS, INCOMPAT_DIRTY};
use super::meta::{Geometry, Meta};
use super::{Qcow2Driver, MAX_L2_CACHE_BYTES};
use strata_block::options::{take_bool, take_str, Opts};
use strata_block::{Driver, Error, Result};

/// What the runtime options set.
#[derive(Clone, Copy, Debug)]
pub struct RuntimeOpts {
    pub cache_sizes: CacheSizes,
    /// `lazy-refcounts` when given; else the image's own setting counts.
    pub lazy: Option<bool>,
    /// Writes are checked against the snapshots' L2 tables too.
    pub check_inactive_l2: bool,
}

impl RuntimeOpts {
    /// The options for an image of `geo` with a disk of `disk_size` bytes,
    /// removed from `opts`.
    pub fn take(opts: &mut Opts, geo: &Geometry, disk_size: u64) -> Result<RuntimeOpts> {
        let cache_sizes = CacheSizes::take(opts, geo.cluster_size, geo.l2_entry_size(), disk_size)?;
        if let Some(v) = take_str(opts, "cache-clean-interval")? {
            // Strata's caches hold no timer: only the value is checked.
            if v.parse::<u64>().is_ok_and(|s| s > u32::MAX as u64) {
                return Err(Error::invalid("Cache clean interval too big"));
            }
        }
        let lazy = take_bool(opts, "lazy-refcounts")?;
        if lazy == Some(true) && geo.version < 3 {
            return Err(Error::invalid(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level",
            ));
        }
        let check_inactive_l2 = take_overlap_check(opts)?;
        // Discards keep Strata's fixed rules; the values are checked.
        for k in [
            "pass-discard-request",
            "pass-discard-snapshot",
            "pass-discard-other",
        ] {
            take_bool(opts, k)?;
        }
        if take_bool(opts, "discard-no-unref")? == Some(true) && geo.version < 3 {
            return Err(Error::invalid(
                "discard-no-unref is only supported since qcow2 version 3",
            ));
        }
        Ok(RuntimeOpts {
            cache_sizes,
            lazy,
            check_inactive_l2,
        })
    }

    /// Whether a writable image of `geo` with `compatible_features` defers
    /// its refcounts.
    pub fn lazy_refcounts(&self, geo: &Geometry, compatible_features: u64) -> bool {
        self.lazy
            .unwrap_or(geo.version >= 3 && compatible_features & COMPAT_LAZY_REFCOUNTS != 0)
    }
}

/// The slice size and how many L2 and refcount slices fit the caches of an
/// image of `geo` with a disk of `disk_size` bytes.
pub(super) fn cache_slices(
    geo: &Geometry,
    disk_size: u64,
    sizes: CacheSizes,
) -> (usize, usize, usize) {
    let cs = geo.cluster_size;
    let slice = cs.min(4096) as usize;
    let l2_need = geo.l1_size_for(disk_size).max(1) * cs;
    let l2_bytes = l2_need.min(MAX_L2_CACHE_BYTES).min(sizes.l2_bytes);
    let l2_slices = (l2_bytes / slice as u64).max(16) as usize;
    let rb_slices = (sizes.refcount_bytes / slice as u64).max(16) as usize;
    (slice, l2_slices, rb_slices)
}

/// The `overlap-check` options (QEMU's template and per-area switches):
/// whether writes are checked against the snapshots' L2 tables too, which
/// only the `all` template and `overlap-check.inactive-l2=on` ask for (it
/// reads every snapshot's L1 table on each metadata write). The other
/// areas are always checked.
fn take_overlap_check(opts: &mut Opts) -> Result<bool> {
    let template = |t: &str| {
        match t {
        "all" => Ok(true),
        "none" | "constant" | "cached" => Ok(false),
        v => Err(Error::invalid(format!(
            "Unsupported value '{v}' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all"
        ))),
    }
    };
    let Some(v) = opts.remove("overlap-check") else {
        return Ok(false);
    };
    match v {
        serde_json::Value::String(s) => template(&s),
        serde_json::Value::Object(mut m) => {
            let mut on = match take_str(&mut m, "template")? {
                Some(t) => template(&t)?,
                None => false,
            };
            if let Some(b) = take_bool(&mut m, "inactive-l2")? {
                on = b;
            }
            Ok(on)
        }
        _ => Err(Error::invalid(
            "Invalid parameter type for 'overlap-check', expected: string",
        )),
    }
}

impl Qcow2Driver {
    /// The runtime options of a reopen (QEMU's qcow2 reopen_prepare),
    /// checked against the image as it is.
    pub(super) fn runtime_of(&self, opts: &Opts) -> Result<RuntimeOpts> {
        let mut o = opts.clone();
        let geo = Geometry {
            version: self.version.load(std::sync::atomic::Ordering::Acquire),
            ..self.geo
        };
        RuntimeOpts::take(&mut o, &geo, self.length())
    }

    /// Puts `rt` in force, drained (QEMU: qcow2_update_options_prepare's
    /// cache flush and lazy-refcount cleanup, then its commit): the caches
    /// are written back before they shrink, and an image that stops
    /// deferring refcounts is made clean first.
    pub(super) async fn apply_runtime(&self, rt: RuntimeOpts) -> Result<()> {
        let mut m = self.meta.lock().await;
        m.flush_l2_cache(&self.file.get())
            .await
            .map_err(|e| e.context("Failed to flush the L2 table cache"))?;
        m.flush_refcount_cache(&self.file.get())
            .await
            .map_err(|e| e.context("Failed to flush the refcount block cache"))?;
        let lazy = m.writable && rt.lazy_refcounts(&m.geo, m.header.compatible_features);
        if m.lazy_refcounts && !lazy {
            m.set_incompatible(&self.file.get(), INCOMPAT_DIRTY, false)
                .await
                .map_err(|e| e.context("Failed to disable lazy refcounts"))?;
        }
        m.lazy_refcounts = lazy;
        resize_caches(&mut m, self.length(), rt.cache_sizes);
        m.check_inactive_l2 = rt.check_inactive_l2;
        *self.runtime.lock().unwrap_or_else(|p| p.into_inner()) = rt;
        Ok(())
    }
}

/// New capacities for the metadata caches.
fn resize_caches(m: &mut Meta, disk_size: u64, sizes: CacheSizes) {
    let (_, l2, rb) = cache_slices(&m.geo, disk_size, sizes);
    m.l2_cache.set_capacity(l2);
    m.rb_cache.set_capacity(rb);
}
