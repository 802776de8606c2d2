//! `drive-backup` (QEMU: drive_backup_action): the target is a file name.
//! It is created first (unless `mode` is `existing`) in the source's
//! format, over the source's backing file for `top` and over the source
//! itself for `none` (the fleecing overlay), opened with
//! `discard=unmap,detect-zeroes=unmap`, and backed up to like a
//! `blockdev-backup` target.

use super::{prepare_on, BackupArgs};
use crate::job::Job;
use crate::list::JobList;
use serde_json::Value;
use std::sync::Arc;
use strata_block::img_create::{img_create, ImgCreate};
use strata_block::{BlockOp, Graph, OpenCtx, OpenFlags, Opts, Registry};

/// What `drive-backup` takes beyond `blockdev-backup`'s arguments
/// (`common.target` is a file name here).
#[derive(Debug, Default)]
pub struct DriveBackupArgs {
    pub common: BackupArgs,
    pub format: Option<String>,
    pub mode: Option<String>,
}

/// Starts a backup to a file (QEMU: qmp_drive_backup).
pub async fn drive_backup(
    list: &Arc<JobList>,
    graph: &Arc<Graph>,
    registry: &Arc<Registry>,
    a: DriveBackupArgs,
) -> Result<(), String> {
    let job = drive_backup_prepare(list, graph, registry, a).await?;
    list.start(&job);
    job.settle(0).await;
    Ok(())
}

/// Creates and opens the target, then the job, not started (a
/// transaction starts it when all its actions went through).
pub async fn drive_backup_prepare(
    list: &Arc<JobList>,
    graph: &Arc<Graph>,
    registry: &Arc<Registry>,
    mut a: DriveBackupArgs,
) -> Result<Arc<Job>, String> {
    let bs = graph.lookup(&a.common.device).map_err(|e| e.to_string())?;
    let drained = strata_block::drain_begin(std::slice::from_ref(&bs)).await;
    let existing = a.mode.as_deref() == Some("existing");
    let format = match a.format.take() {
        Some(f) => Some(f),
        None if existing => None,
        None => Some(bs.format_name().to_string()),
    };
    bs.check_op(BlockOp::BackupSource)
        .map_err(|e| e.to_string())?;
    // What the new image goes over: the source's backing file for `top`
    // (none: a full backup), the source itself for `none`.
    let mut source = None;
    if a.common.sync == "top" {
        source = bs.skip_filters().backing();
        if source.is_none() {
            a.common.sync = "full".into();
        }
    }
    let over_source = a.common.sync == "none";
    if over_source {
        source = Some(Arc::clone(&bs));
    }
    if !existing {
        let (name, bfmt) = match &source {
            Some(b) => (Some(b.filename()), Some(b.format_name())),
            None => (None, None),
        };
        let req = ImgCreate {
            filename: &a.common.target,
            format: format.as_deref().unwrap_or_default(),
            backing: name.as_deref(),
            backing_format: bfmt,
            size: bs.length(),
            no_backing: true,
            quiet: false,
        };
        img_create(registry, req).await.map_err(|e| e.to_string())?;
    }
    let mut opts = Opts::new();
    opts.insert("discard".into(), Value::from("unmap"));
    opts.insert("detect-zeroes".into(), Value::from("unmap"));
    let flags = OpenFlags {
        read_only: false,
        no_backing: over_source,
        ..OpenFlags::default()
    };
    let ctx = OpenCtx::with_graph(Arc::clone(registry), flags, Arc::clone(graph));
    let target = ctx
        .open_image(Some(&a.common.target), format.as_deref(), opts)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(home) = bs.home() {
        target.move_to(Some(home)).await;
    }
    if over_source {
        if let Err(e) = target.set_backing(Some(Arc::clone(&bs))).await {
            let _ = target.close().await;
            return Err(e.to_string());
        }
    }
    let r = prepare_on(list, graph, a.common, bs, Arc::clone(&target)).await;
    drop(drained);
    // The job's filter holds the target now, or it failed and nothing does.
    let _ = target.close().await;
    r
}
