//! `drive-mirror` (QEMU: qmp_drive_mirror): the target is a file name. It
//! is created first (unless `mode` is `existing`), with the source's
//! backing file as its own for `top` and `none`, opened, and mirrored to
//! like a `blockdev-mirror` target. At the end it gets the source's backing
//! node (created with absolute paths) or opens the one its header names
//! (existing).

use super::{mirror_common, BackingMode, MirrorArgs};
use crate::list::JobList;
use crate::Refused;
use serde_json::Value;
use std::sync::Arc;
use strata_block::img_create::{img_create, ImgCreate};
use strata_block::{BlockOp, Graph, OpenCtx, OpenFlags, Opts, Registry};

/// What `drive-mirror` takes beyond `blockdev-mirror`'s arguments.
#[derive(Debug, Default)]
pub struct DriveMirrorArgs {
    pub common: MirrorArgs,
    pub format: Option<String>,
    pub node_name: Option<String>,
    pub mode: Option<String>,
    pub unmap: Option<bool>,
}

pub async fn drive_mirror(
    list: &Arc<JobList>,
    graph: &Arc<Graph>,
    registry: &Arc<Registry>,
    a: DriveMirrorArgs,
) -> Result<(), Refused> {
    let bs = super::root_bs(graph, &a.common.device)?;
    bs.check_op(BlockOp::MirrorSource)
        .map_err(|e| e.to_string())?;
    let existing = a.mode.as_deref() == Some("existing");
    let format = match &a.format {
        Some(f) => Some(f.clone()),
        None if existing => None,
        None => Some(bs.format_name().to_string()),
    };
    let mut sync = a.common.sync.clone();
    let mut target_backing = bs.skip_filters().backing();
    if target_backing.is_none() && sync == "top" {
        sync = "full".into();
    }
    if sync == "none" {
        target_backing = Some(Arc::clone(&bs));
    }
    let size = bs.length();
    if a.common.replaces.is_some() && a.node_name.is_none() {
        return Err("a node-name must be provided when replacing a named node of the graph".into());
    }
    let backing_mode = if existing {
        BackingMode::Open
    } else {
        BackingMode::Source
    };
    if !existing {
        let fmt = format.as_deref().unwrap_or_default();
        let backing = target_backing.as_ref().filter(|_| sync != "full");
        let (name, bfmt) = match backing {
            Some(b) => (Some(b.filename().to_string()), Some(b.format_name())),
            None => (None, None),
        };
        let req = ImgCreate {
            filename: &a.common.target,
            format: fmt,
            backing: name.as_deref(),
            backing_format: bfmt,
            size,
            no_backing: true,
            quiet: false,
        };
        img_create(registry, req).await.map_err(|e| e.to_string())?;
    }
    let mut opts = Opts::new();
    if let Some(n) = &a.node_name {
        opts.insert("node-name".into(), Value::String(n.clone()));
    }
    let flags = OpenFlags {
        read_only: false,
        no_backing: true,
        unmap: false,
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
    let zero_target = sync == "full" && (existing || !target.driver().has_zero_init());
    let mut common = a.common;
    common.sync = sync;
    let r = mirror_common(
        list,
        graph,
        common,
        bs,
        Arc::clone(&target),
        super::Extra {
            backing_mode,
            zero_target,
            unmap: a.unmap.unwrap_or(true),
            registry: Some(Arc::clone(registry)),
        },
    )
    .await;
    // The job holds the target now, or it failed and nothing does.
    let _ = target.close().await;
    r
}
