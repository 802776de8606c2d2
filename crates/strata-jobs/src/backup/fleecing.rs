//! Image fleecing as `blockdev-add` builds it (QEMU: cbw_open,
//! block/snapshot-access.c): a `copy-before-write` node over the disk
//! keeps its point in time in a `target`, and a `snapshot-access` node on
//! top of it reads that point in time, so an NBD export of it serves a
//! backup tool while the guest writes through the filter.

use super::cbw::{CopyBeforeWrite, OnCbwError};
use super::copy::{BlockCopy, CopyOpts, DEFAULT_CLUSTER};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use strata_block::options::{take_dict, take_size, take_str, take_u64};
use strata_block::{
    BlockStatus, Child, ChildCell, ChildRole, Driver, DriverClass, Error, IoBuf, Node, OpenCtx,
    OpenFlags, Opts, Perm, Result, WriteFlags,
};

/// The `copy-before-write` driver class.
pub struct CbwClass;

/// Reads `on-cbw-error`, `cbw-timeout`, `min-cluster-size` and `bitmap`
/// as QEMU's cbw_parse_options takes them.
struct CbwOptions {
    on_error: OnCbwError,
    timeout: Option<Duration>,
    min_cluster: u64,
    bitmap: Option<(String, String)>,
}

impl CbwOptions {
    fn take(opts: &mut Opts) -> Result<CbwOptions> {
        let on_error = match take_str(opts, "on-cbw-error")?.as_deref() {
            None | Some("break-guest-write") => OnCbwError::BreakGuestWrite,
            Some("break-snapshot") => OnCbwError::BreakSnapshot,
            Some(v) => {
                return Err(Error::invalid(format!(
                    "Parameter 'on-cbw-error' does not accept value '{v}'"
                )))
            }
        };
        let timeout = match take_u64(opts, "cbw-timeout")? {
            Some(s) if s > u64::from(u32::MAX) => {
                return Err(Error::invalid("Parameter 'cbw-timeout' expects uint32_t"))
            }
            Some(s) if s > 0 => Some(Duration::from_secs(s)),
            _ => None,
        };
        let min_cluster = take_size(opts, "min-cluster-size")?.unwrap_or(0);
        let bitmap = match take_dict(opts, "bitmap")? {
            None => None,
            Some(mut b) => {
                let node = take_str(&mut b, "node")?
                    .ok_or_else(|| Error::invalid("Parameter 'bitmap.node' is missing"))?;
                let name = take_str(&mut b, "name")?
                    .ok_or_else(|| Error::invalid("Parameter 'bitmap.name' is missing"))?;
                if let Some(k) = b.keys().next() {
                    return Err(Error::invalid(format!(
                        "Parameter 'bitmap.{k}' is unexpected"
                    )));
                }
                Some((node, name))
            }
        };
        Ok(CbwOptions {
            on_error,
            timeout,
            min_cluster,
            bitmap,
        })
    }
}

/// Both drivers are named after their file (QEMU: cbw_refresh_filename,
/// snapshot_access_refresh_filename).
fn file_name(children: &[(ChildRole, strata_block::filename::Identity)]) -> Option<String> {
    children
        .iter()
        .find(|(r, _)| *r == ChildRole::File)
        .map(|(_, id)| id.filename())
}

/// The cluster a copy works in (QEMU: block_copy_calculate_cluster_size):
/// the target's own, at least `min` and 64 KiB.
pub(crate) fn copy_cluster(target: &Node, min: u64) -> std::result::Result<u64, String> {
    if min != 0 && !min.is_power_of_two() {
        return Err("min-cluster-size needs to be a power of 2".into());
    }
    let min = min.max(DEFAULT_CLUSTER);
    Ok(target.driver().cluster_size().unwrap_or(0).max(min))
}

#[async_trait]
impl DriverClass for CbwClass {
    fn name(&self) -> &'static str {
        "copy-before-write"
    }

    fn exact_filename(
        &self,
        _full: &Opts,
        children: &[(ChildRole, strata_block::filename::Identity)],
    ) -> Option<String> {
        file_name(children)
    }

    async fn create(&self, _ctx: &OpenCtx, _filename: &str, _opts: Opts) -> Result<()> {
        Err(Error::unsupported(
            "Driver 'copy-before-write' does not support image creation",
        ))
    }

    async fn open(&self, ctx: &OpenCtx, opts: &mut Opts) -> Result<Box<dyn Driver>> {
        let o = CbwOptions::take(opts)?;
        let source = ctx.file()?;
        let target = ctx
            .open_child(opts, "target", None, ChildRole::Target, false)
            .await?
            .ok_or_else(|| Error::invalid("A block device must be specified for \"target\""))?;
        match open_cbw(source, &target, o, ctx).await {
            Ok(d) => Ok(Box::new(d)),
            Err(e) => {
                let _ = target.close().await;
                Err(e)
            }
        }
    }
}

async fn open_cbw(
    source: Arc<Node>,
    target: &Arc<Node>,
    o: CbwOptions,
    ctx: &OpenCtx,
) -> Result<CopyBeforeWrite> {
    let bitmap = match &o.bitmap {
        None => None,
        Some((node, name)) => {
            let n = ctx
                .graph
                .lookup(node)
                .map_err(|_| Error::invalid(format!("Node '{node}' not found")))?;
            Some(n.bitmaps().lookup(name)?)
        }
    };
    let cluster = copy_cluster(target, o.min_cluster)
        .map_err(|e| Error::invalid(format!("Cannot create block-copy-state: {e}")))?;
    let copy = BlockCopy::new(&source, Arc::clone(target), cluster, CopyOpts::default())
        .map_err(|e| Error::invalid(format!("Cannot create block-copy-state: {e}")))?;
    if let Some(b) = &bitmap {
        copy.start_from(b);
    }
    CopyBeforeWrite::new(source, Arc::clone(target), copy, o.on_error, o.timeout)
}

/// The `snapshot-access` driver class.
pub struct SnapshotAccessClass;

/// Reads the point in time of the copy-before-write node under it (QEMU:
/// bdrv_snapshot_access_drv); writing is not supported.
struct SnapshotAccess {
    file: ChildCell,
}

/// The snapshot API of `node`, or QEMU's ENOTSUP when it has none (only
/// copy-before-write has one).
fn snapshot_api(node: &Node) -> Result<&CopyBeforeWrite> {
    node.driver()
        .as_any()
        .and_then(|a| a.downcast_ref::<CopyBeforeWrite>())
        .ok_or_else(|| Error::errno(libc::ENOTSUP))
}

#[async_trait]
impl Driver for SnapshotAccess {
    fn reopen_supported(&self) -> bool {
        false
    }

    fn format_name(&self) -> &'static str {
        "snapshot-access"
    }

    fn length(&self) -> u64 {
        self.file.get().length()
    }

    fn children(&self) -> Vec<Child> {
        vec![Child::new(ChildRole::File, &self.file.get())]
    }

    fn child_cell(&self, role: ChildRole) -> Option<&ChildCell> {
        (role == ChildRole::File).then_some(&self.file)
    }

    fn child_perm(&self, _: &Node, _: ChildRole, _: Perm, _: Perm) -> (Perm, Perm) {
        // The snapshot API needs no permission on the filter.
        (Perm::NONE, Perm::ALL)
    }

    fn has_info(&self) -> bool {
        // No get_info: QEMU shows neither a cluster size nor a dirty flag.
        false
    }

    async fn allocated_size(&self) -> Result<Option<u64>> {
        self.file.get().driver().allocated_size().await
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let node = self.file.get();
        snapshot_api(&node)?.read_snapshot(offset, buf).await
    }

    async fn write(&self, _offset: u64, _buf: IoBuf, _flags: WriteFlags) -> Result<IoBuf> {
        Err(Error::errno(libc::ENOTSUP))
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _flags: WriteFlags) -> Result<()> {
        Err(Error::errno(libc::ENOTSUP))
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let node = self.file.get();
        snapshot_api(&node)?.discard_snapshot(offset, len).await
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let node = self.file.get();
        snapshot_api(&node)?
            .snapshot_block_status(offset, len)
            .await
    }

    async fn close(&self) -> Result<()> {
        self.file.get().close().await
    }
}

#[async_trait]
impl DriverClass for SnapshotAccessClass {
    fn name(&self) -> &'static str {
        "snapshot-access"
    }

    fn exact_filename(
        &self,
        _full: &Opts,
        children: &[(ChildRole, strata_block::filename::Identity)],
    ) -> Option<String> {
        file_name(children)
    }

    fn child_perms(&self, _perm: Perm, _shared: Perm, _flags: &OpenFlags) -> (Perm, Perm) {
        (Perm::NONE, Perm::ALL)
    }

    async fn create(&self, _ctx: &OpenCtx, _filename: &str, _opts: Opts) -> Result<()> {
        Err(Error::unsupported(
            "Driver 'snapshot-access' does not support image creation",
        ))
    }

    async fn open(&self, ctx: &OpenCtx, _opts: &mut Opts) -> Result<Box<dyn Driver>> {
        Ok(Box::new(SnapshotAccess {
            file: ChildCell::new(ctx.file()?),
        }))
    }
}

/// The drivers of this module, for a registry.
pub fn driver_classes() -> Vec<Arc<dyn DriverClass>> {
    vec![Arc::new(CbwClass), Arc::new(SnapshotAccessClass)]
}
