//! Snapshots over QMP (QEMU: blockdev.c): external ones, an overlay put
//! over an image (`blockdev-snapshot`, `blockdev-snapshot-sync`), internal
//! ones kept inside a qcow2 image (`blockdev-snapshot-internal-sync`,
//! `blockdev-snapshot-delete-internal-sync`), and `change-backing-file`.
//! The two that may be part of a `transaction` are done in its two phases:
//! each check and change first, holding its image drained, and what to
//! finish or undo left in a [`Pending`] for the transaction's end.

use crate::blockdev::Daemon;
use crate::commands::daemon_command;
use crate::transaction::{Pending, Tran};
use serde_json::Value;
use std::sync::Arc;
use strata_block::driver::SnapshotInfo;
use strata_block::report::error_report;
use strata_block::{snapshot, BlockOp, DrainGuard, Node, OpenCtx, OpenFlags};
use strata_qmp::{Qmp, QmpError};

/// An external snapshot between its two phases (QEMU:
/// ExternalSnapshotState).
pub(crate) struct External {
    old: Arc<Node>,
    /// The overlay, once opened or found.
    new: Option<Arc<Node>>,
    /// The overlay was opened by the action, which holds a reference.
    opened: bool,
    appended: bool,
    drain: Option<DrainGuard>,
}

impl External {
    /// The old image is a backing file now: read-only if it can be (QEMU:
    /// external_snapshot_commit, which ignores a failure).
    pub(crate) async fn commit(&mut self) {
        // It has a parent now, which its drain would hold back.
        self.drain = None;
        if !self.old.copy_on_read() && !self.old.is_read_only() {
            let _ = self.old.reopen_read_only(true).await;
        }
    }

    /// The overlay's parents and users go back to the old image, and the
    /// overlay lets go of it (QEMU: external_snapshot_abort).
    pub(crate) async fn abort(&mut self) {
        let Some(new) = self.new.as_ref().filter(|_| self.appended) else {
            return;
        };
        if let Err(e) = strata_block::replace_node(new, &self.old).await {
            error_report(format!("Could not undo the snapshot: {e}"));
            return;
        }
        let _ = new.set_backing(None).await;
    }

    /// The drain ends and the opener's reference on the overlay goes
    /// (QEMU: external_snapshot_clean).
    pub(crate) async fn clean(&mut self) {
        self.drain = None;
        if let Some(new) = self.new.take().filter(|_| self.opened) {
            let _ = new.close().await;
        }
    }
}

/// An internal snapshot between its two phases (QEMU:
/// InternalSnapshotState).
pub(crate) struct Internal {
    node: Arc<Node>,
    device: String,
    name: String,
    created: bool,
    drain: Option<DrainGuard>,
}

impl Internal {
    /// Deletes the snapshot the action made (QEMU: internal_snapshot_abort).
    pub(crate) async fn abort(&mut self) {
        if !self.created {
            return;
        }
        let Ok(Some(sn)) = snapshot::find(&self.node, &self.name).await else {
            return;
        };
        if let Err(e) = snapshot::delete(&self.node, Some(&sn.id), Some(&sn.name)).await {
            error_report(format!(
                "Failed to delete snapshot with id '{}' and name '{}' on device '{}' in abort: {e}",
                sn.id, sn.name, self.device
            ));
        }
    }

    pub(crate) fn clean(&mut self) {
        self.drain = None;
    }
}

impl Daemon {
    /// The node a device argument names, which must be a root: only user
    /// handles above it (QEMU: qmp_get_root_bs).
    pub(crate) fn root_node(&self, name: &str) -> Result<Arc<Node>, String> {
        let n = self.graph.lookup(name).map_err(|e| e.to_string())?;
        if !n.is_root() {
            return Err("Need a root block node".into());
        }
        Ok(n)
    }

    /// The first phase of `blockdev-snapshot` (an overlay by reference)
    /// and `blockdev-snapshot-sync` (an overlay created from a file name):
    /// QEMU's checks in QEMU's order, then the overlay goes over the image
    /// and takes over its parents and users (QEMU: external_snapshot_action).
    pub(crate) async fn external_snapshot(
        &self,
        sync: bool,
        a: &Value,
        tran: &mut Tran,
    ) -> Result<(), String> {
        let s = |k: &str| a.get(k).and_then(Value::as_str);
        let old = if sync {
            let (device, node_name) = (s("device"), s("node-name"));
            node_name.and_then(|n| self.graph.find(n)).ok_or_else(|| {
                format!(
                    "Cannot find device='{}' nor node-name='{}'",
                    device.unwrap_or_default(),
                    node_name.unwrap_or_default()
                )
            })?
        } else {
            self.graph
                .lookup(s("node").unwrap_or_default())
                .map_err(|e| e.to_string())?
        };
        let drain = strata_block::drain_begin(std::slice::from_ref(&old)).await;
        let at = tran.add(Pending::External(External {
            old: Arc::clone(&old),
            new: None,
            opened: false,
            appended: false,
            drain: None,
        }));
        let Pending::External(state) = tran.get(at) else {
            unreachable!("just added")
        };
        let drain = &*state.drain.insert(drain);
        old.check_op(BlockOp::ExternalSnapshot)
            .map_err(|e| e.to_string())?;
        if !old.is_read_only() && old.is_active() {
            old.flush_drained(drain)
                .await
                .map_err(|e| format!("Write to node '{}' failed: {e}", old.name()))?;
        }
        let (new, opened) = if sync {
            (self.snapshot_overlay(&old, a).await?, true)
        } else {
            let overlay = s("overlay").unwrap_or_default();
            (
                self.graph.lookup(overlay).map_err(|e| e.to_string())?,
                false,
            )
        };
        state.new = Some(Arc::clone(&new));
        state.opened = opened;
        // A user reading the overlay would see its data change under it.
        if strata_block::perm::is_read_consistently(&new) {
            return Err("The overlay is already in use".into());
        }
        if new.driver().is_filter() {
            return Err("Filters cannot be used as overlays".into());
        }
        if new.backing().is_some() {
            return Err("The overlay already has a backing image".into());
        }
        if !new.driver().supports_backing() {
            return Err("The overlay does not support backing images".into());
        }
        if !old.is_active() && new.is_active() {
            new.inactivate().await.map_err(|e| e.to_string())?;
        }
        new.append_over(&old).await.map_err(|e| e.to_string())?;
        state.appended = true;
        Ok(())
    }

    /// `blockdev-snapshot-sync`'s overlay: created (unless `mode` is
    /// `existing`) with the image as its backing file, then opened without
    /// it. It belongs to the image's parents once appended, not to the
    /// monitor.
    async fn snapshot_overlay(&self, old: &Arc<Node>, a: &Value) -> Result<Arc<Node>, String> {
        let s = |k: &str| a.get(k).and_then(Value::as_str);
        let format = s("format").unwrap_or("qcow2");
        let new_name = s("snapshot-node-name");
        if s("node-name").is_some() && new_name.is_none() {
            return Err("New overlay node-name missing".into());
        }
        if new_name.is_some_and(|n| self.graph.find(n).is_some()) {
            return Err("New overlay node-name already in use".into());
        }
        let file = s("snapshot-file").unwrap_or_default();
        if s("mode") != Some("existing") {
            let backing = old.filename();
            let req = strata_block::img_create::ImgCreate {
                filename: file,
                format,
                backing: Some(&backing),
                backing_format: Some(old.format_name()),
                size: old.length(),
                no_backing: true,
                quiet: false,
            };
            strata_block::img_create::img_create(&self.registry, req)
                .await
                .map_err(|e| e.to_string())?;
        }
        let flags = OpenFlags {
            read_only: old.is_read_only(),
            no_backing: true,
            unmap: false,
            ..OpenFlags::default()
        };
        let ctx = OpenCtx::with_graph(Arc::clone(&self.registry), flags, Arc::clone(&self.graph));
        let mut opts = strata_block::options::Opts::new();
        if let Some(n) = new_name {
            opts.insert("node-name".into(), n.into());
        }
        ctx.open_image(Some(file), Some(format), opts)
            .await
            .map_err(|e| e.to_string())
    }

    /// The first phase of `blockdev-snapshot-internal-sync` (QEMU:
    /// internal_snapshot_action): the snapshot is taken, drained, and
    /// deleted again if the transaction fails.
    pub(crate) async fn internal_snapshot(&self, a: &Value, tran: &mut Tran) -> Result<(), String> {
        let s = |k: &str| a.get(k).and_then(Value::as_str).unwrap_or_default();
        let (device, name) = (s("device"), s("name"));
        let node = self.root_node(device)?;
        let drain = strata_block::drain_begin(std::slice::from_ref(&node)).await;
        let at = tran.add(Pending::Internal(Internal {
            node: Arc::clone(&node),
            device: device.to_string(),
            name: name.to_string(),
            created: false,
            drain: Some(drain),
        }));
        node.check_op(BlockOp::InternalSnapshot)
            .map_err(|e| e.to_string())?;
        if node.is_read_only() {
            return Err(format!("Device '{device}' is read only"));
        }
        if !snapshot::can_snapshot(&node) {
            return Err(format!(
                "Block format '{}' used by device '{device}' does not support internal snapshots",
                node.format_name()
            ));
        }
        if name.is_empty() {
            return Err("Name is empty".into());
        }
        let found = snapshot::find_by_id_and_name(&node, None, Some(name))
            .await
            .map_err(|e| e.to_string())?;
        if found.is_some() {
            return Err(format!(
                "Snapshot with name '{name}' already exists on device '{device}'"
            ));
        }
        // No guest runs here: the guest clock is the wall clock, as in
        // qemu-storage-daemon, and no instruction count is kept.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let micros = now.as_micros() as u64;
        let sn = SnapshotInfo {
            name: name.to_string(),
            date_sec: now.as_secs(),
            date_nsec: now.subsec_micros() as u64 * 1000,
            vm_clock_nsec: micros * 1000,
            icount: None,
            ..SnapshotInfo::default()
        };
        snapshot::create(&node, &sn).await.map_err(|e| {
            format!(
                "Failed to create snapshot '{name}' on device '{device}': {}",
                strata_block::error::strerror(e.code())
            )
        })?;
        if let Pending::Internal(state) = tran.get(at) {
            state.created = true;
        }
        Ok(())
    }

    /// `blockdev-snapshot-delete-internal-sync`: the deleted snapshot, as
    /// it was (QEMU: qmp_blockdev_snapshot_delete_internal_sync).
    async fn delete_internal_snapshot(&self, a: &Value) -> Result<Value, String> {
        let s = |k: &str| a.get(k).and_then(Value::as_str);
        let device = s("device").unwrap_or_default();
        let node = self.root_node(device)?;
        let (id, name) = (s("id"), s("name"));
        if id.is_none() && name.is_none() {
            return Err("Name or id must be provided".into());
        }
        node.check_op(BlockOp::InternalSnapshotDelete)
            .map_err(|e| e.to_string())?;
        let Some(sn) = snapshot::find_by_id_and_name(&node, id, name)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Err(format!(
                "Snapshot with id '{}' and name '{}' does not exist on device '{device}'",
                id.unwrap_or("null"),
                name.unwrap_or("null")
            ));
        };
        snapshot::delete(&node, id, name)
            .await
            .map_err(|e| e.to_string())?;
        Ok(strata_block::info::snapshot_json(&sn))
    }

    /// `change-backing-file`: the backing file name an image of a root's
    /// chain stores, written with the image reopened read-write for it
    /// (QEMU: qmp_change_backing_file, which stores the image's own format
    /// as the backing format).
    async fn change_backing_file(&self, a: &Value) -> Result<(), String> {
        let s = |k: &str| a.get(k).and_then(Value::as_str).unwrap_or_default();
        let (device, backing_file) = (s("device"), s("backing-file"));
        let root = self.root_node(device)?;
        let image_name = s("image-node-name");
        let image = self
            .graph
            .find(image_name)
            .ok_or_else(|| format!("Cannot find device='' nor node-name='{image_name}'"))?;
        if image
            .find_overlay(None)
            .is_some_and(|base| Arc::ptr_eq(&base, &image))
        {
            return Err(
                "not allowing backing file change on an image without a backing file".into(),
            );
        }
        root.check_op(BlockOp::Change).map_err(|e| e.to_string())?;
        if !root.chain_contains(&image) {
            return Err(format!(
                "'{device}' and image file are not in the same chain"
            ));
        }
        let read_only = image.is_read_only();
        if read_only {
            image
                .reopen_read_only(false)
                .await
                .map_err(|e| e.to_string())?;
        }
        let format = image.format_name().to_string();
        let r = image
            .change_backing_file(Some(backing_file), Some(&format), false)
            .await
            .map_err(|e| {
                format!(
                    "Could not change backing file to '{backing_file}': {}",
                    strata_block::error::strerror(e.code())
                )
            });
        if read_only {
            image
                .reopen_read_only(true)
                .await
                .map_err(|e| e.to_string())?;
        }
        r
    }
}

/// Adds the commands of this module to `qmp`.
pub(crate) fn register(qmp: &mut Qmp, daemon: &Arc<Daemon>) {
    // The commands that are transaction actions run as a transaction of
    // one, as QEMU's do (blockdev_do_action).
    for (cmd, args, kind) in [
        (
            "blockdev-snapshot-sync",
            "BlockdevSnapshotSync",
            "blockdev-snapshot-sync",
        ),
        ("blockdev-snapshot", "BlockdevSnapshot", "blockdev-snapshot"),
        (
            "blockdev-snapshot-internal-sync",
            "BlockdevSnapshotInternal",
            "blockdev-snapshot-internal-sync",
        ),
    ] {
        daemon_command(qmp, daemon, cmd, args, move |d, a| async move {
            crate::transaction::run_one(&d, kind, &a).await
        });
    }
    daemon_command(
        qmp,
        daemon,
        "change-backing-file",
        "q_obj_change-backing-file_arg",
        |d, a| async move { d.change_backing_file(&a).await },
    );
    let d = Arc::clone(daemon);
    qmp.add_command(
        "blockdev-snapshot-delete-internal-sync",
        Some("q_obj_blockdev-snapshot-delete-internal-sync_arg"),
        Arc::new(move |a| {
            let d = Arc::clone(&d);
            Box::pin(async move {
                d.delete_internal_snapshot(&a)
                    .await
                    .map_err(QmpError::generic)
            })
        }),
    );
}

/// The QAPI types of this module's commands that no other has.
pub(crate) fn schema(s: &mut strata_qmp::Schema) {
    s.object(
        "BlockdevSnapshotInternal",
        &[("device", "str"), ("name", "str")],
    )
    .object(
        "q_obj_change-backing-file_arg",
        &[
            ("device", "str"),
            ("image-node-name", "str"),
            ("backing-file", "str"),
        ],
    )
    .object(
        "q_obj_blockdev-snapshot-delete-internal-sync_arg",
        &[("device", "str"), ("*id", "str"), ("*name", "str")],
    );
}
