//! Internal snapshots above the drivers (QEMU: block/snapshot.c): the
//! operations qemu-img snapshot, qemu-nbd -l and convert -l use, each in a
//! drained section, falling back to the primary child for nodes that keep
//! no snapshots themselves (raw over a file, filters), with QEMU's errors.

use crate::driver::{ChildRole, SnapshotInfo};
use crate::error::{Error, Result};
use crate::node::{drained_async, Node};
use std::sync::Arc;

/// QEMU names the device by its BlockBackend, which tools leave unnamed.
const DEVICE: &str = "";

/// The node whose snapshots `node` stands for when it keeps none itself:
/// its primary child, if no other child holds data (QEMU:
/// bdrv_snapshot_fallback_child).
fn fallback(node: &Arc<Node>) -> Option<Arc<Node>> {
    let primary = node.primary_child()?;
    let others_hold_data = node
        .children()
        .iter()
        .any(|c| c.role != ChildRole::Backing && !Arc::ptr_eq(&c.node, &primary));
    (!others_hold_data).then_some(primary)
}

/// The node at or below `node` that keeps its snapshots, if any.
fn keeper(node: &Arc<Node>) -> Option<Arc<Node>> {
    let mut n = Arc::clone(node);
    while !n.driver().has_internal_snapshots() {
        n = fallback(&n)?;
    }
    Some(n)
}

/// The snapshots of the image (QEMU: bdrv_snapshot_list); none for nodes
/// that cannot keep any.
pub async fn list(node: &Arc<Node>) -> Result<Vec<SnapshotInfo>> {
    match keeper(node) {
        Some(k) => k.driver().snapshots().await,
        None => Err(Error::errno(libc::ENOTSUP)),
    }
}

/// Creates snapshot `sn.name` with a new id (QEMU: bdrv_snapshot_create);
/// the error is an errno, which qemu-img prints as text.
pub async fn create(node: &Arc<Node>, sn: &SnapshotInfo) -> Result<()> {
    let k = keeper(node).ok_or_else(|| Error::errno(libc::ENOTSUP))?;
    drained_async(&[Arc::clone(node)], || k.driver().snapshot_create(sn)).await
}

/// Reverts the disk to a snapshot found by id, else by name (QEMU:
/// bdrv_snapshot_goto, whose messages these are).
pub async fn goto(node: &Arc<Node>, id_or_name: &str) -> Result<()> {
    if !node.bitmaps().is_empty() {
        return Err(Error::msg(libc::EBUSY, "Device has active dirty bitmaps"));
    }
    let Some(k) = keeper(node) else {
        return Err(Error::unsupported(
            "Block driver does not support snapshots",
        ));
    };
    drained_async(&[Arc::clone(node)], || k.driver().snapshot_goto(id_or_name))
        .await
        .map_err(|e| e.context("Failed to load snapshot"))
}

/// True when the node, or the child it falls back to, keeps internal
/// snapshots (QEMU: bdrv_can_snapshot).
pub fn can_snapshot(node: &Arc<Node>) -> bool {
    keeper(node).is_some()
}

/// The first snapshot matching both `id` and `name` where both are given,
/// else the one given (QEMU: bdrv_snapshot_find_by_id_and_name, whose
/// error this is when the image lists none).
pub async fn find_by_id_and_name(
    node: &Arc<Node>,
    id: Option<&str>,
    name: Option<&str>,
) -> Result<Option<SnapshotInfo>> {
    let list = list(node)
        .await
        .map_err(|e| e.context("Failed to get a snapshot list"))?;
    Ok(list.into_iter().find(|s| {
        id.is_none_or(|id| s.id == id)
            && name.is_none_or(|n| s.name == n)
            && (id.is_some() || name.is_some())
    }))
}

/// The first snapshot with this name (QEMU: bdrv_snapshot_find, which
/// looks at names only; qemu-img snapshot -d finds by it).
pub async fn find(node: &Arc<Node>, name: &str) -> Result<Option<SnapshotInfo>> {
    Ok(list(node).await?.into_iter().find(|s| s.name == name))
}

/// Deletes the first snapshot with this id and/or name (QEMU:
/// bdrv_snapshot_delete).
pub async fn delete(node: &Arc<Node>, id: Option<&str>, name: Option<&str>) -> Result<()> {
    if id.is_none() && name.is_none() {
        return Err(Error::invalid("snapshot_id and name are both NULL"));
    }
    let Some(k) = keeper(node) else {
        return Err(Error::unsupported(format!(
            "Block format '{}' used by device '{}' does not support internal snapshot deletion",
            node.driver().format_name(),
            DEVICE
        )));
    };
    drained_async(&[Arc::clone(node)], || k.driver().snapshot_delete(id, name)).await
}

/// Shows a snapshot in place of the disk of a read-only node (QEMU:
/// bdrv_snapshot_load_tmp); no fallback, as in QEMU.
pub async fn load_tmp(node: &Arc<Node>, id: Option<&str>, name: Option<&str>) -> Result<()> {
    if id.is_none() && name.is_none() {
        return Err(Error::invalid("snapshot_id and name are both NULL"));
    }
    if !node.is_read_only() {
        return Err(Error::invalid("Device is not readonly"));
    }
    if !node.driver().has_internal_snapshots() {
        return Err(Error::unsupported(format!(
            "Block format '{}' used by device '{}' does not support temporarily loading internal snapshots",
            node.driver().format_name(),
            DEVICE
        )));
    }
    drained_async(&[Arc::clone(node)], || {
        node.driver().snapshot_load_tmp(id, name)
    })
    .await
}

/// [`load_tmp`] by id, then by name (QEMU:
/// bdrv_snapshot_load_tmp_by_id_or_name).
pub async fn load_tmp_by_id_or_name(node: &Arc<Node>, id_or_name: &str) -> Result<()> {
    match load_tmp(node, Some(id_or_name), None).await {
        Err(e) if matches!(e.code(), libc::ENOENT | libc::EINVAL) => {
            load_tmp(node, None, Some(id_or_name)).await
        }
        r => r,
    }
}

/// A `-l` argument of qemu-nbd and qemu-img convert: `snapshot.id=ID`
/// and/or `snapshot.name=NAME` (QEMU's internal_snapshot_opts), or a plain
/// id or name. `Err` carries the text QEMU's option parser reports.
pub enum SnapshotSel {
    IdOrName(String),
    IdAndName(Option<String>, Option<String>),
}

impl SnapshotSel {
    pub fn parse(arg: &str) -> std::result::Result<SnapshotSel, String> {
        if !arg.starts_with("snapshot.") {
            return Ok(SnapshotSel::IdOrName(arg.to_string()));
        }
        let (mut id, mut name) = (None, None);
        let pairs = crate::options::parse_keyval(arg, None).map_err(|e| e.to_string())?;
        for (k, v) in pairs {
            match k.as_str() {
                "snapshot.id" => id = Some(v),
                "snapshot.name" => name = Some(v),
                _ => return Err(format!("Invalid parameter '{k}'")),
            }
        }
        Ok(SnapshotSel::IdAndName(id, name))
    }

    /// Loads the selected snapshot on `node` (read-only).
    pub async fn load(&self, node: &Arc<Node>) -> Result<()> {
        match self {
            SnapshotSel::IdOrName(s) => load_tmp_by_id_or_name(node, s).await,
            SnapshotSel::IdAndName(id, name) => {
                load_tmp(node, id.as_deref(), name.as_deref()).await
            }
        }
    }
}
