//! Dirty bitmaps over QMP (QEMU: block/monitor/bitmap-qmp-cmds.c):
//! `block-dirty-bitmap-add`, `-remove`, `-clear`, `-enable`, `-disable` and
//! `-merge` on the core's in-memory bitmaps, which NBD exports offer as
//! `qemu:dirty-bitmap:NAME`. Persistent bitmaps (stored in a qcow2 image)
//! are stored in a qcow2 image by its driver (Node::add_bitmap).

use crate::blockdev::Daemon;
use crate::commands::daemon_command;
use crate::transaction::{Pending, Tran};
use serde_json::{json, Value};
use std::sync::Arc;
use strata_block::{DirtyBitmap, HBitmap, Node};
use strata_qmp::{Qmp, QmpError};

/// The bitmap `name` on the node `node`, in QEMU's words when missing
/// (block_dirty_bitmap_lookup).
pub(crate) fn lookup(
    d: &Daemon,
    node: &str,
    name: &str,
) -> Result<(Arc<Node>, Arc<DirtyBitmap>), String> {
    let n = d
        .graph
        .find(node)
        .ok_or_else(|| format!("Node '{node}' not found"))?;
    let b = n.bitmaps().lookup(name).map_err(|e| e.to_string())?;
    Ok((n, b))
}

fn str_arg<'a>(a: &'a Value, key: &str) -> &'a str {
    a.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// block-dirty-bitmap-add.
async fn add(d: &Daemon, a: &Value) -> Result<(Arc<Node>, Arc<DirtyBitmap>), String> {
    let node = d
        .graph
        .lookup(str_arg(a, "node"))
        .map_err(|e| e.to_string())?;
    let flag = |k: &str| a.get(k).and_then(Value::as_bool) == Some(true);
    let b = node
        .add_bitmap(
            str_arg(a, "name"),
            a.get("granularity").and_then(Value::as_u64),
            flag("persistent"),
            flag("disabled"),
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok((node, b))
}

/// block-dirty-bitmap-clear; the bits it had.
fn clear(d: &Daemon, a: &Value) -> Result<(Arc<DirtyBitmap>, HBitmap), String> {
    let (n, b) = lookup(d, str_arg(a, "node"), str_arg(a, "name"))?;
    let before = b.snapshot();
    n.bitmaps().clear(&b).map_err(|e| e.to_string())?;
    Ok((b, before))
}

/// block-dirty-bitmap-enable and -disable; whether it was enabled.
fn set_enabled(
    d: &Daemon,
    a: &Value,
    on: bool,
) -> Result<(Arc<Node>, Arc<DirtyBitmap>, bool), String> {
    let (n, b) = lookup(d, str_arg(a, "node"), str_arg(a, "name"))?;
    let was = b.is_enabled();
    n.bitmaps().set_enabled(&b, on).map_err(|e| e.to_string())?;
    Ok((n, b, was))
}

/// block-dirty-bitmap-merge; the target's bits before.
fn merge(d: &Daemon, a: &Value) -> Result<(Arc<DirtyBitmap>, HBitmap), String> {
    let (n, target) = lookup(d, str_arg(a, "node"), str_arg(a, "target"))?;
    let mut sources = Vec::new();
    for s in a
        .get("bitmaps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        // A name on the target's node, or {node, name} anywhere.
        let src = match s.as_str() {
            Some(name) => n
                .bitmaps()
                .find(name)
                .ok_or_else(|| format!("Dirty bitmap '{name}' not found"))?,
            None => lookup(d, str_arg(s, "node"), str_arg(s, "name"))?.1,
        };
        sources.push(src);
    }
    let before = target.snapshot();
    n.bitmaps()
        .merge(&target, &sources)
        .map_err(|e| e.to_string())?;
    Ok((target, before))
}

/// A bitmap action's first phase in a transaction (QEMU:
/// block_dirty_bitmap_*_action): done at once, undone if the transaction
/// fails; a removal only takes the bitmap out of the image, and releases
/// it when the transaction succeeds.
pub(crate) async fn action(
    d: &Daemon,
    kind: &str,
    a: &Value,
    tran: &mut Tran,
) -> Result<(), String> {
    let p = match kind {
        "block-dirty-bitmap-add" => {
            let (n, b) = add(d, a).await?;
            Pending::BitmapAdded(n, b)
        }
        "block-dirty-bitmap-clear" => {
            let (b, before) = clear(d, a)?;
            Pending::BitmapBits(b, Some(before))
        }
        "block-dirty-bitmap-merge" => {
            let (b, before) = merge(d, a)?;
            Pending::BitmapBits(b, Some(before))
        }
        "block-dirty-bitmap-enable" | "block-dirty-bitmap-disable" => {
            let (n, b, was) = set_enabled(d, a, kind.ends_with("enable"))?;
            Pending::BitmapEnabled(n, b, was)
        }
        "block-dirty-bitmap-remove" => {
            let n = d
                .graph
                .find(str_arg(a, "node"))
                .ok_or_else(|| format!("Node '{}' not found", str_arg(a, "node")))?;
            let b = n
                .detach_bitmap(str_arg(a, "name"))
                .await
                .map_err(|e| e.to_string())?;
            let persistent = b.is_persistent();
            // Not stored again while the transaction may still release it.
            b.set_persistent(false);
            b.set_busy(true);
            Pending::BitmapRemoved(n, b, persistent)
        }
        other => return Err(format!("Invalid transaction action '{other}'")),
    };
    tran.add(p);
    Ok(())
}

pub(crate) fn register(qmp: &mut Qmp, daemon: &Arc<Daemon>) {
    daemon_command(
        qmp,
        daemon,
        "block-dirty-bitmap-add",
        "BlockDirtyBitmapAdd",
        |d, a| async move { add(&d, &a).await.map(drop) },
    );
    daemon_command(
        qmp,
        daemon,
        "block-dirty-bitmap-remove",
        "BlockDirtyBitmap",
        |d, a| async move {
            let (n, _) = lookup(&d, str_arg(&a, "node"), str_arg(&a, "name"))?;
            n.remove_bitmap(str_arg(&a, "name"))
                .await
                .map_err(|e| e.to_string())
        },
    );
    daemon_command(
        qmp,
        daemon,
        "block-dirty-bitmap-clear",
        "BlockDirtyBitmap",
        |d, a| async move { clear(&d, &a).map(drop) },
    );
    for (cmd, on) in [
        ("block-dirty-bitmap-enable", true),
        ("block-dirty-bitmap-disable", false),
    ] {
        daemon_command(
            qmp,
            daemon,
            cmd,
            "BlockDirtyBitmap",
            move |d, a| async move { set_enabled(&d, &a, on).map(drop) },
        );
    }
    daemon_command(
        qmp,
        daemon,
        "block-dirty-bitmap-merge",
        "BlockDirtyBitmapMerge",
        |d, a| async move { merge(&d, &a).map(drop) },
    );
    let d = Arc::clone(daemon);
    qmp.add_command(
        "x-debug-block-dirty-bitmap-sha256",
        Some("BlockDirtyBitmap"),
        Arc::new(move |a| {
            let found = lookup(&d, str_arg(&a, "node"), str_arg(&a, "name"));
            Box::pin(async move {
                let (_, b) = found.map_err(QmpError::generic)?;
                let words = b.snapshot().words();
                let sum = strata_crypto::HashAlg::Sha256.digest(&[&words]);
                let hex: String = sum.iter().map(|x| format!("{x:02x}")).collect();
                Ok(json!({ "sha256": hex }))
            })
        }),
    );
}
